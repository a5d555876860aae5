# shellcheck shell=bash
# The Docker clients and the reference daemon the Docker API tests (tests/docker_*.rs) drive:
# - Debian's moby 20.10 (`docker.io`, with containerd, runc, tini) as a private reference daemon
#   (specs/moby-reference.md), installed with a policy-rc.d that forbids starting any service, so
#   nothing runs on the host itself; the tests start their own in a namespace;
# - busybox-static (the test image's only binary) and openssl (the reference daemon's
#   certificates);
# - runc (Debian's 1.1.5; it comes with docker.io, named here because fabric's own agent runs
#   containers with it: tests/agent_containers.rs, `fabric shim`);
# - docker-py (PyPI `docker`, pinned) in its own virtual environment, exported as
#   FABRIC_DOCKER_PY (that venv's python): docker-py 7 in the system Python breaks Debian's
#   docker-compose 1.29.
# The stock docker CLI 28 is already on the machine at /usr/local/bin/docker.
FABRIC_DOCKER_PY_VERSION=7.1.0

_fabric_docker_pkgs() {
  local missing=() pair
  for pair in dockerd:docker.io runc:runc busybox:busybox-static openssl:openssl; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || [ -x "/bin/${pair%%:*}" ] ||
      missing+=("${pair#*:}")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "40-docker: not root; missing ${missing[*]} (the Docker differential tests will skip)"
    return 0
  fi
  echo "40-docker: installing ${missing[*]} (no service is started)"
  local rcd=/usr/sbin/policy-rc.d had=0
  [ -e "$rcd" ] && had=1 && cp -p "$rcd" "$rcd.fabric-save"
  printf '#!/bin/sh\nexit 101\n' >"$rcd" && chmod 755 "$rcd"
  export DEBIAN_FRONTEND=noninteractive
  local rc=0
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } || rc=$?
  if [ "$had" = 1 ]; then mv "$rcd.fabric-save" "$rcd"; else rm -f "$rcd"; fi
  return "$rc"
}

_fabric_docker_py() {
  local venv="${FABRIC_DOCKER_PY_VENV:-/opt/fabric-docker-py}"
  if [ ! -x "$venv/bin/python" ] ||
    ! "$venv/bin/python" -c "import docker, sys; sys.exit(docker.__version__ != '$FABRIC_DOCKER_PY_VERSION')" 2>/dev/null; then
    if [ "$(id -u)" -ne 0 ] && [ ! -w "$(dirname "$venv")" ]; then
      echo "40-docker: cannot create $venv (docker-py tests will skip)"
      return 0
    fi
    echo "40-docker: docker-py $FABRIC_DOCKER_PY_VERSION into $venv"
    python3 -m venv "$venv" || return 1
    "$venv/bin/pip" install -q "docker==$FABRIC_DOCKER_PY_VERSION" || return 1
  fi
  export FABRIC_DOCKER_PY="$venv/bin/python"
  echo "40-docker: docker-py $("$FABRIC_DOCKER_PY" -c 'import docker; print(docker.__version__)') at $FABRIC_DOCKER_PY"
}

if [ "${CI:-}" = "true" ]; then
  _fabric_docker_pkgs && _fabric_docker_py
else
  { _fabric_docker_pkgs && _fabric_docker_py; } || echo "warning: Docker clients not fully set up; tests/docker_*.rs say what they skip"
fi
echo "40-docker: docker CLI $(docker --version 2>/dev/null || echo missing), dockerd $(dockerd --version 2>/dev/null || echo missing)"
unset -f _fabric_docker_pkgs _fabric_docker_py

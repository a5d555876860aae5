# shellcheck shell=bash
# moby 20.10 (Debian's docker.io) as the private reference daemon of specs/moby-reference.md, for
# the Docker benchmarks (docker_api.sh, docker_run.sh), sourced after netns-lib.sh: its own
# network namespace $MOBY_NS, a private mount namespace, TLS with openssl certificates on
# 127.0.0.1:23760, cgroups under /$CGROUP. The caller sets MOBY_NS and CGROUP, and removes
# the cgroup directories on exit.

moby_start() { # sets T (certificates; the client's in $T/client) and D (data, dockerd.log)
  # --- certificates for moby (the Docker docs' recipe, 2048-bit keys) ---------------------------
  T="$TMP/certs"
  mkdir -p "$T/client"
  (
    cd "$T" || exit 1
    openssl genrsa -out ca-key.pem 2048 2>/dev/null
    openssl req -new -x509 -days 2 -key ca-key.pem -sha256 -subj /CN=ref-ca -out ca.pem
    openssl genrsa -out server-key.pem 2048 2>/dev/null
    openssl req -subj /CN=127.0.0.1 -sha256 -new -key server-key.pem -out server.csr
    printf 'subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n' >ext.cnf
    openssl x509 -req -days 2 -sha256 -in server.csr -CA ca.pem -CAkey ca-key.pem \
      -CAcreateserial -out server-cert.pem -extfile ext.cnf 2>/dev/null
    openssl genrsa -out client/key.pem 2048 2>/dev/null
    openssl req -subj /CN=alice -new -key client/key.pem -out client.csr
    echo 'extendedKeyUsage = clientAuth' >ext-client.cnf
    openssl x509 -req -days 2 -sha256 -in client.csr -CA ca.pem -CAkey ca-key.pem \
      -CAcreateserial -out client/cert.pem -extfile ext-client.cnf 2>/dev/null
    cp ca.pem client/ca.pem
  )

  # --- moby 20.10 in its own namespace -----------------------------------------------------------
  D="$TMP/moby"
  mkdir -p "$D"
  echo '{}' >"$D/daemon.json"
  addns "$MOBY_NS"
  nsenter --net="/run/netns/$MOBY_NS" -- unshare --mount --propagation private -- sh -c \
    'mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /etc/docker && exec "$@"' sh \
    dockerd --config-file "$D/daemon.json" --host "unix://$D/docker.sock" \
    --host tcp://127.0.0.1:23760 --tlsverify --tlscacert "$T/ca.pem" \
    --tlscert "$T/server-cert.pem" --tlskey "$T/server-key.pem" --data-root "$D/root" \
    --exec-root "$D/exec" --pidfile "$D/dockerd.pid" --iptables=false --ip6tables=false \
    --storage-driver overlay2 --cgroup-parent "/$CGROUP" >"$D/dockerd.log" 2>&1 &
  PIDS+=($!)
}

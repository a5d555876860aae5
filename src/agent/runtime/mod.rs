//! Containers on a host: the agent's side of running Docker containers with runc.
//!
//! Layout under the agent's `--data DIR` (the contract's): layers in `DIR/images/sha256/`,
//! each container in `DIR/containers/<vm>/` (`bundle/`, `log`, `state.json`, `shim.sock`,
//! `shim.pid`), runc's state in `DIR/runc`.
//!
//! - [`shim`]: `fabric shim`, one per run of a container: runc in the foreground, the log,
//!   attach/stop/signal/resize/status on `shim.sock`, `state.json`.
//! - [`logs`]: the bounded log and its reader.
//! - [`exec`]: `runc exec` of a process in a running container.
//! - [`streams`]: the tunnel's sub-streams (attach, logs, exec, resize) on this host.
//! - [`layers`], [`rootfs`], [`bundle`]: the image's layers fetched and verified, unpacked
//!   safely into a root filesystem, and the OCI bundle around it; [`prepare`] is the agent's
//!   [`Preparer`] made of them.
//!
//! [`Runtime`] is what the reconciler uses: the state of a container from its files, start a
//! generation (never twice: the agent writes `state.json` with the generation before it
//! starts the shim, and a shim refuses a generation that has started), stop, signal, remove.

pub mod bundle;
pub mod exec;
pub mod layers;
pub mod logs;
pub mod prepare;
pub mod rootfs;
pub mod shim;
pub mod streams;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use self::shim::{ShimClient, ShimRequest, ShimState};
use crate::control::container_spec::ContainerSpec;

/// Makes a container's bundle: its layers on this host, the root filesystem unpacked from
/// them, `config.json` and the `hostname`/`hosts`/`resolv.conf` files (img's
/// `layers::ensure_layers`, `rootfs::unpack`, `bundle::write_bundle`). The runtime marks the
/// container prepared when it succeeds.
pub trait Preparer: Send + Sync + 'static {
    /// Prepares `vm` (its container spec) into `bundle`.
    fn prepare<'a>(
        &'a self,
        vm: &'a crate::agent::api::Vm,
        bundle: &'a Path,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;
}

/// The `/etc/hosts` and `/etc/resolv.conf` of a container VM: localhost, the host name on the
/// primary NIC's address; the spec's DNS servers, else the primary network's gateway.
pub fn etc_files(vm: &crate::agent::api::Vm, spec: &ContainerSpec) -> (String, String) {
    let primary = vm
        .nics
        .iter()
        .find(|n| n.primary)
        .or_else(|| vm.nics.first());
    let mut hosts =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let name = if spec.hostname.is_empty() {
        spec.id.get(..12).unwrap_or(&spec.id).to_owned()
    } else {
        spec.hostname.clone()
    };
    if let Some(n) = primary {
        if !name.is_empty() {
            hosts.push_str(&format!("{}\t{}\n", n.ip, name));
        }
    }
    let servers: Vec<String> = if spec.dns.is_empty() {
        primary
            .and_then(|n| n.gateway.clone())
            .filter(|g| !g.is_empty())
            .into_iter()
            .collect()
    } else {
        spec.dns.clone()
    };
    let resolv: String = servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect();
    (hosts, resolv)
}

/// The file in a container's directory that remembers the last signal id delivered.
pub const SIGNAL_FILE: &str = "signal_id";

/// Marker written when a container's bundle (root filesystem and config) is complete.
pub const PREPARED_FILE: &str = "prepared";

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A file of the container could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The container is not prepared (no bundle).
    #[error("container {0} has no prepared bundle")]
    NotPrepared(String),
    /// The generation already ran (or is running).
    #[error("container {vm}: generation {generation} was already started")]
    AlreadyStarted {
        /// The container.
        vm: String,
        /// The generation.
        generation: u64,
    },
    /// The shim refused or could not be reached.
    #[error(transparent)]
    Shim(#[from] shim::ShimError),
    /// The VM id is not a UUID (it names a directory).
    #[error("{0:?} is not a VM UUID")]
    BadId(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

/// Where a container is, read from its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// No container directory, or no complete bundle.
    Absent,
    /// Bundle ready; never started (or `state.json` removed).
    Prepared,
    /// The shim of `generation` is alive and its process has not ended.
    Running {
        /// The generation.
        state: ShimState,
    },
    /// The process of `generation` ended.
    Exited {
        /// The generation, exit status and times.
        state: ShimState,
    },
    /// `state.json` names a generation whose shim is gone without recording an end (the shim
    /// was killed, or the host rebooted).
    Lost {
        /// What the state file says.
        state: ShimState,
    },
}

impl Phase {
    /// The generation last started, if any.
    pub fn generation(&self) -> Option<u64> {
        match self {
            Phase::Running { state } | Phase::Exited { state } | Phase::Lost { state } => {
                Some(state.generation)
            }
            _ => None,
        }
    }
}

/// The container runtime of one host.
#[derive(Debug, Clone)]
pub struct Runtime {
    data: PathBuf,
    shim_exe: PathBuf,
    runc: PathBuf,
    exits: Arc<tokio::sync::Notify>,
}

/// A VM UUID (or any id made of hex digits and dashes) that is safe as a directory name.
pub fn id_ok(vm: &str) -> bool {
    !vm.is_empty() && vm.len() <= 64 && vm.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl Runtime {
    /// The `fabric` executable (shims and `ns-exec` run as its hidden subcommands).
    pub fn exe(&self) -> &Path {
        &self.shim_exe
    }

    /// The runtime over data directory `data`, starting shims as `shim_exe shim …`.
    pub fn new(data: &Path, shim_exe: &Path) -> Runtime {
        Runtime {
            data: data.to_owned(),
            shim_exe: shim_exe.to_owned(),
            runc: PathBuf::from("runc"),
            exits: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Notified whenever a shim this runtime started (or adopted) ends.
    pub fn exits(&self) -> Arc<tokio::sync::Notify> {
        self.exits.clone()
    }

    /// The data directory.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// Where layers are kept (`DIR/images`).
    pub fn images_dir(&self) -> PathBuf {
        self.data.join("images")
    }

    /// runc's state root.
    pub fn runc_root(&self) -> PathBuf {
        self.data.join("runc")
    }

    /// The runc binary.
    pub fn runc(&self) -> &Path {
        &self.runc
    }

    /// A container's directory.
    pub fn dir(&self, vm: &str) -> PathBuf {
        self.data.join("containers").join(vm)
    }

    /// The containers that have a directory here.
    pub fn list(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.data.join("containers")) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| id_ok(n))
            .collect();
        v.sort();
        v
    }

    /// Makes the container's directory and returns it (the bundle goes into `bundle/`).
    pub fn create_dir(&self, vm: &str) -> Result<PathBuf, RuntimeError> {
        if !id_ok(vm) {
            return Err(RuntimeError::BadId(vm.to_owned()));
        }
        let d = self.dir(vm);
        std::fs::create_dir_all(d.join("bundle"))
            .map_err(io(format!("creating {}", d.display())))?;
        std::fs::create_dir_all(self.runc_root()).map_err(io("creating the runc root"))?;
        Ok(d)
    }

    /// Records that the bundle is complete (after the root filesystem and config are written).
    pub fn mark_prepared(&self, vm: &str) -> Result<(), RuntimeError> {
        std::fs::write(self.dir(vm).join(PREPARED_FILE), b"")
            .map_err(io(format!("marking {vm} prepared")))
    }

    /// The last signal id delivered to (or skipped for) `vm`.
    pub fn signal_done(&self, vm: &str) -> u64 {
        std::fs::read_to_string(self.dir(vm).join(SIGNAL_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Records signal `id` of `vm` as done.
    pub fn set_signal_done(&self, vm: &str, id: u64) -> Result<(), RuntimeError> {
        let d = self.dir(vm);
        let tmp = d.join("signal_id.tmp");
        std::fs::write(&tmp, id.to_string()).map_err(io("writing signal_id"))?;
        std::fs::rename(tmp, d.join(SIGNAL_FILE)).map_err(io("renaming signal_id"))
    }

    /// Where container `vm` is.
    pub fn phase(&self, vm: &str) -> Phase {
        let d = self.dir(vm);
        if !id_ok(vm) || !d.join(PREPARED_FILE).exists() {
            return Phase::Absent;
        }
        let Some(state) = ShimState::read(&d) else {
            return Phase::Prepared;
        };
        if state.finished_ms.is_some() {
            return Phase::Exited { state };
        }
        if shim_alive(&d) {
            Phase::Running { state }
        } else {
            Phase::Lost { state }
        }
    }

    /// Starts generation `generation` of `vm` (whose bundle is prepared) under a new shim in
    /// its own session. Refuses a generation that was already started.
    pub fn start(
        &self,
        vm: &str,
        spec: &ContainerSpec,
        generation: u64,
    ) -> Result<(), RuntimeError> {
        let d = self.dir(vm);
        if !d.join(PREPARED_FILE).exists() {
            return Err(RuntimeError::NotPrepared(vm.to_owned()));
        }
        if let Some(s) = ShimState::read(&d) {
            if s.generation >= generation {
                return Err(RuntimeError::AlreadyStarted {
                    vm: vm.to_owned(),
                    generation,
                });
            }
        }
        if shim_alive(&d) {
            // An earlier generation's shim is still up: it must end first.
            return Err(RuntimeError::AlreadyStarted {
                vm: vm.to_owned(),
                generation,
            });
        }
        // The generation is taken before the shim exists: a crash here leaves it taken (the
        // container reads as lost), never started twice.
        ShimState {
            generation,
            ..Default::default()
        }
        .write(&d)
        .map_err(io(format!("writing {}/state.json", d.display())))?;
        let errlog = std::fs::File::create(d.join("shim.log"))
            .map_err(io(format!("creating {}/shim.log", d.display())))?;
        let mut cmd = Command::new(&self.shim_exe);
        cmd.arg("shim")
            .arg("--dir")
            .arg(&d)
            .arg("--runc-root")
            .arg(self.runc_root())
            .arg("--runc")
            .arg(&self.runc)
            .arg("--vm")
            .arg(vm)
            .arg("--generation")
            .arg(generation.to_string())
            .arg("--stop-signal")
            .arg(if spec.stop_signal.is_empty() {
                "SIGTERM"
            } else {
                &spec.stop_signal
            });
        if spec.tty {
            cmd.arg("--tty");
        }
        if spec.open_stdin {
            cmd.arg("--stdin");
        }
        if spec.stdin_once {
            cmd.arg("--stdin-once");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(errlog))
            .env_remove("RUST_LOG");
        crate::io::pty::new_session(&mut cmd, false);
        let mut child = cmd
            .spawn()
            .map_err(io(format!("starting {} shim", self.shim_exe.display())))?;
        std::fs::write(d.join(shim::PID_FILE), child.id().to_string())
            .map_err(io("writing shim.pid"))?;
        let exits = self.exits.clone();
        std::thread::spawn(move || {
            let _ = child.wait();
            exits.notify_one();
        });
        Ok(())
    }

    /// Watches a running shim this runtime did not start (found after an agent restart):
    /// [`Runtime::exits`] is notified when its process ends.
    pub fn adopt(&self, vm: &str) {
        let client = ShimClient::new(&self.dir(vm));
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let _ = client.call(&ShimRequest::Wait).await;
            exits.notify_one();
        });
    }

    /// Asks the shim to stop the process: the stop signal, then SIGKILL after `timeout` s.
    pub async fn stop(&self, vm: &str, timeout: u32) -> Result<(), RuntimeError> {
        ShimClient::new(&self.dir(vm))
            .call(&ShimRequest::Stop { timeout })
            .await?;
        Ok(())
    }

    /// Delivers a signal to the process.
    pub async fn signal(&self, vm: &str, name: &str) -> Result<(), RuntimeError> {
        ShimClient::new(&self.dir(vm))
            .call(&ShimRequest::Signal {
                name: name.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// Waits until the process of the running shim ends; returns the final state (`None`:
    /// no shim was running).
    pub async fn wait(&self, vm: &str) -> Option<ShimState> {
        let r = ShimClient::new(&self.dir(vm))
            .call(&ShimRequest::Wait)
            .await;
        match r {
            Ok(rep) => rep.state,
            Err(_) => ShimState::read(&self.dir(vm)),
        }
    }

    /// Removes the container: kills its process, `runc delete --force`, removes its
    /// directory (the root filesystem is owned by the mapped UIDs; root removes it all).
    pub fn remove(&self, vm: &str) -> Result<(), RuntimeError> {
        if !id_ok(vm) {
            return Err(RuntimeError::BadId(vm.to_owned()));
        }
        let d = self.dir(vm);
        let root = self.runc_root();
        let runc = |args: &[&str]| {
            let _ = Command::new(&self.runc)
                .arg("--root")
                .arg(&root)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        runc(&["kill", vm, "SIGKILL"]);
        runc(&["delete", "--force", vm]);
        if let Some(pid) = read_pid(&d.join(shim::PID_FILE)) {
            if shim_alive(&d) {
                let _ = crate::io::process::signal(pid, libc::SIGKILL);
            }
        }
        match std::fs::remove_dir_all(&d) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("removing {}", d.display()))(e)),
        }
    }
}

fn read_pid(p: &Path) -> Option<u32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Whether the shim named by `dir/shim.pid` is alive (a process with that pid that is a
/// `shim` of this directory, not a recycled pid; a zombie counts as gone).
pub fn shim_alive(dir: &Path) -> bool {
    let Some(pid) = read_pid(&dir.join(shim::PID_FILE)) else {
        return false;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        {
            return false;
        }
    }
    let want = dir.as_os_str().as_encoded_bytes();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.contains(&&b"shim"[..]) && args.contains(&want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_resolv_come_from_the_primary_nic_and_the_spec() {
        let vm: crate::agent::api::Vm = serde_json::from_value(serde_json::json!({
            "uuid": "u",
            "nics": [
                {"interface": "net0", "mac": "90:b8:d0:00:00:01", "ip": "10.0.0.5",
                 "netmask": "255.255.255.0", "gateway": "10.0.0.1", "mtu": 1400,
                 "primary": true, "vnet_id": 5}
            ]
        }))
        .unwrap();
        let mut spec = ContainerSpec {
            id: "abcdef0123456789".repeat(4),
            ..Default::default()
        };
        let (hosts, resolv) = etc_files(&vm, &spec);
        assert!(hosts.starts_with("127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.ends_with("10.0.0.5\tabcdef012345\n"), "{hosts}");
        assert_eq!(resolv, "nameserver 10.0.0.1\n");
        spec.dns = vec!["9.9.9.9".into()];
        spec.hostname = "web".into();
        let (hosts, resolv) = etc_files(&vm, &spec);
        assert!(hosts.ends_with("10.0.0.5\tweb\n"), "{hosts}");
        assert_eq!(resolv, "nameserver 9.9.9.9\n");
    }

    #[test]
    fn ids_that_name_directories() {
        assert!(id_ok("0f6c3e1e-1111-4222-8333-444455556666"));
        assert!(!id_ok("../etc") && !id_ok("") && !id_ok("a/b"));
    }
}

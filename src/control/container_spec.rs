//! What a VM that is a Docker container carries besides its NICs: the process to run and how.
//!
//! The Docker layer (`src/docker/containers`) builds it at `docker create` from the request and
//! the image, the control plane stores it in the VM (`Vm::container`), the desired-state
//! snapshot hands it to the VM's agent (the VM object's `"container"`), and the agent's runtime
//! (`src/agent/runtime`) turns it into a root filesystem and an OCI bundle for runc. The agent
//! re-checks it ([`ContainerSpec::check`]): a control plane that was tricked into storing
//! something outside DESIGN's allow-list still gets nothing run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::firewall::docker::PortBinding;

/// Size of each account's user-namespace range (root inside = `uid_base` outside).
pub const UID_RANGE: u32 = 65_536;
/// The first host UID given to an account's containers; account N (0-based) gets
/// `UID_BASE_START + N * UID_RANGE`.
pub const UID_BASE_START: u32 = 1 << 20;
/// Default pids limit of a container.
pub const DEFAULT_PIDS_LIMIT: i64 = 4096;

/// The container part of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ContainerSpec {
    /// The Docker container ID: 64 lowercase hex digits, whose first 32 are the VM's UUID
    /// (sdc-docker's rule); the short ID is the first 12.
    pub id: String,
    /// The image as the user named it (`busybox`, `busybox:latest`, an ID prefix).
    pub image: String,
    /// The image ID, `sha256:<64 hex>` (its config's digest).
    pub image_id: String,
    /// The image's layers, bottom first, as `sha256:<64 hex>` of the uncompressed tar (Docker's
    /// `diff_id`; the head's blob store holds them as `DIR/images/sha256/<hex>`).
    pub layers: Vec<String>,
    /// Entrypoint (the create's, else the image's).
    pub entrypoint: Vec<String>,
    /// Command (the create's, else the image's unless the create gave an entrypoint).
    pub cmd: Vec<String>,
    /// `K=V`: the image's, then the create's (later wins), `PATH` defaulted.
    pub env: Vec<String>,
    /// Working directory (absolute; `/` when neither the create nor the image sets one).
    pub working_dir: String,
    /// `uid[:gid]` inside the container, numeric only; empty: 0:0.
    pub user: String,
    /// Host name inside (the short ID unless the create set one).
    pub hostname: String,
    /// `-t`.
    pub tty: bool,
    /// `-i`.
    pub open_stdin: bool,
    /// `StdinOnce`.
    pub stdin_once: bool,
    /// `Labels` (they also become VM tags `docker:label:<k>`).
    pub labels: BTreeMap<String, String>,
    /// `ExposedPorts` of the create and the image, `80/tcp` form, sorted.
    pub exposed: Vec<String>,
    /// `-p` bindings (host port = container port; remapping refused at create).
    pub published: Vec<PortBinding>,
    /// `-P`.
    pub publish_all: bool,
    /// `--rm`: the Docker layer deletes the VM when it has stopped.
    pub auto_remove: bool,
    /// The signal `docker stop` sends first (`SIGTERM` unless the image says otherwise).
    pub stop_signal: String,
    /// Seconds `docker stop` waits before SIGKILL when the request gives no `t`.
    pub stop_timeout: u32,
    /// Host UID and GID that root inside maps to; the range is `uid_base..uid_base+UID_RANGE`.
    pub uid_base: u32,
    /// Most processes the container may have.
    pub pids_limit: i64,
    /// DNS servers for `/etc/resolv.conf` (empty: the primary network's gateway).
    pub dns: Vec<String>,
}

impl ContainerSpec {
    /// The argv to execute: entrypoint then cmd.
    pub fn argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    /// The checks the agent repeats before it runs anything (the control plane made them at
    /// create): something to run, absolute working directory, numeric user, a UID range that
    /// is not the host's own, no NUL in any string, layers named by digest.
    pub fn check(&self) -> Result<(), String> {
        if self.argv().is_empty() {
            return Err("no command: the image has none and the create gave none".into());
        }
        let strings = self
            .argv()
            .into_iter()
            .chain(self.env.iter().cloned())
            .chain([
                self.working_dir.clone(),
                self.user.clone(),
                self.hostname.clone(),
            ]);
        for s in strings {
            if s.contains('\0') {
                return Err(format!("{s:?} contains a NUL byte"));
            }
        }
        if !self.working_dir.is_empty() && !self.working_dir.starts_with('/') {
            return Err(format!(
                "working directory {:?} is not absolute",
                self.working_dir
            ));
        }
        if !self.user.is_empty()
            && !self
                .user
                .split(':')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(format!(
                "user {:?}: only numeric uid[:gid] is supported",
                self.user
            ));
        }
        if self.uid_base < UID_BASE_START {
            return Err(format!(
                "uid_base {} is below {UID_BASE_START}: refusing to map a container onto host \
                 system UIDs",
                self.uid_base
            ));
        }
        if self.uid_base.checked_add(UID_RANGE).is_none() {
            return Err(format!(
                "uid_base {} leaves no room for its range",
                self.uid_base
            ));
        }
        for l in &self.layers {
            let hex = l.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("layer {l:?} is not a sha256 digest"));
            }
        }
        if self.hostname.len() > 63 {
            return Err(format!(
                "hostname {:?} is longer than 63 bytes",
                self.hostname
            ));
        }
        Ok(())
    }
}

/// A one-shot signal for the VM's process (`docker kill -s`): the agent delivers each `id` once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRequest {
    /// Increases with every kill of this VM.
    pub id: u64,
    /// `SIGKILL`, `SIGHUP`, ... (always with the `SIG` prefix).
    pub signal: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            cmd: vec!["sh".into()],
            working_dir: "/".into(),
            uid_base: UID_BASE_START,
            layers: vec![format!("sha256:{}", "a".repeat(64))],
            ..Default::default()
        }
    }

    #[test]
    fn checks() {
        assert_eq!(spec().check(), Ok(()));
        let mut s = spec();
        s.cmd.clear();
        assert!(s.check().is_err());
        let mut s = spec();
        s.user = "root".into();
        assert!(s.check().is_err());
        let mut s = spec();
        s.user = "1000:1000".into();
        assert_eq!(s.check(), Ok(()));
        let mut s = spec();
        s.uid_base = 0;
        assert!(s.check().is_err());
        let mut s = spec();
        s.working_dir = "tmp".into();
        assert!(s.check().is_err());
        let mut s = spec();
        s.layers = vec!["sha256:../../x".into()];
        assert!(s.check().is_err());
        let mut s = spec();
        s.env = vec!["A=\0".into()];
        assert!(s.check().is_err());
    }

    #[test]
    fn argv_is_entrypoint_then_cmd() {
        let s = ContainerSpec {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            ..Default::default()
        };
        assert_eq!(s.argv(), vec!["/bin/sh", "-c", "echo hi"]);
    }
}

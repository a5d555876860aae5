//! The agent's [`Preparer`]: img's parts put together. The layers a container needs are made
//! present in `DIR/images` (fetched from the control plane when missing, verified), unpacked
//! into `bundle/rootfs` owned by the account's UID range, and the bundle's `config.json` and
//! `hostname`/`hosts`/`resolv.conf` written.

use std::path::{Path, PathBuf};

use super::{etc_files, Preparer};
use crate::agent::api::{Api, Vm};

/// Prepares bundles from the layers of this host's control plane.
pub struct ImgPreparer {
    api: Api,
    images: PathBuf,
}

impl ImgPreparer {
    /// Layers fetched through `api` into `images` (`DIR/images`).
    pub fn new(api: Api, images: &Path) -> ImgPreparer {
        ImgPreparer {
            api,
            images: images.to_owned(),
        }
    }
}

impl Preparer for ImgPreparer {
    fn prepare<'a>(
        &'a self,
        vm: &'a Vm,
        bundle: &'a Path,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let spec = vm
                .container
                .clone()
                .ok_or_else(|| format!("VM {} is not a container", vm.uuid))?;
            let layers = super::layers::ensure_layers(&self.api, &self.images, &spec.layers)
                .await
                .map_err(|e| e.to_string())?;
            let (hosts, resolv) = etc_files(vm, &spec);
            let bundle = bundle.to_owned();
            let uuid = vm.uuid.clone();
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                searchable_by_others(&bundle)?;
                let rootfs = bundle.join("rootfs");
                // A prepare cut short before: unpack wants a fresh directory.
                if rootfs.exists() {
                    std::fs::remove_dir_all(&rootfs)
                        .map_err(|e| format!("removing {}: {e}", rootfs.display()))?;
                }
                super::rootfs::unpack(&layers, &rootfs, spec.uid_base)
                    .map_err(|e| e.to_string())?;
                let netns = Path::new("/run/netns").join(&uuid);
                super::bundle::write_bundle(
                    &bundle,
                    &super::bundle::BundleInput {
                        vm: &uuid,
                        spec: &spec,
                        netns: &netns,
                        hosts: &hosts,
                        resolv: &resolv,
                    },
                )
                .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| format!("preparing {}: {e}", vm.uuid))?
        })
    }
}

/// runc mounts the root filesystem as the container's (unprivileged) root: every directory
/// above the bundle must be searchable by others, or the start fails with a bare "permission
/// denied". Refused up front with what to change.
fn searchable_by_others(bundle: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    for dir in bundle.ancestors().skip(1) {
        if let Ok(m) = std::fs::metadata(dir) {
            if m.permissions().mode() & 0o001 == 0 {
                return Err(format!(
                    "{} is not searchable by others (mode {:o}): containers run as unprivileged \
                     UIDs and runc must reach their root filesystem; chmod o+x {} (or put --data \
                     elsewhere)",
                    dir.display(),
                    m.permissions().mode() & 0o7777,
                    dir.display()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_closed_parent_is_named() {
        let d = std::env::temp_dir().join(format!("fabric-prep-{}", std::process::id()));
        let b = d.join("containers/x/bundle");
        std::fs::create_dir_all(&b).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = searchable_by_others(&b).unwrap_err();
        assert!(
            e.contains(&d.display().to_string()) && e.contains("chmod o+x"),
            "{e}"
        );
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(searchable_by_others(&b), Ok(()));
        std::fs::remove_dir_all(&d).unwrap();
    }
}

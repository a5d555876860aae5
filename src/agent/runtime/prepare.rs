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

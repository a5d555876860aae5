//! The agent's side of the tunnel: the contract's `Handler` (i19 contract, "stream → proc").
//! This branch carries only the shapes the runtime implements; stream's branch carries the
//! whole module (`run`, which keeps `GET /servers/:own/tunnel` open) with these same items.

use crate::control::tunnel::proto::{Frame, OpenRequest};

/// The frames a [`Handler`] sends: agent → control.
pub type Frames = tokio::sync::mpsc::Sender<Frame>;
/// The frames a [`Handler`] receives: control → agent (Stdin, StdinEof, Resize).
pub type Input = tokio::sync::mpsc::Receiver<Frame>;

/// Serves the sub-streams the control plane opens (proc's runtime implements it).
pub trait Handler: Send + Sync + 'static {
    /// Serves one sub-stream until done; sends Started/Exit/Error frames as the op requires.
    fn serve(
        &self,
        req: OpenRequest,
        input: Input,
        output: Frames,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

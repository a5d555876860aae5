//! Container routes that stream: wait, attach, logs, exec, resize (over the agents' tunnels).

use super::super::api::{Op, Req};

/// The operation of a streaming `/containers/...` or `/exec/...` request, if it is one.
pub fn route(_req: &Req) -> Option<Op> {
    None
}

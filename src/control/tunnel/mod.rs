//! The control plane's side of the agents' tunnels (DESIGN "Agents never listen"): work the
//! control plane starts on a host (attach, exec, logs, resize) rides the host agent's own
//! outbound connection. [`proto`] is the wire format.

pub mod proto;

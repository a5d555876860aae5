//! Packet views and representations (smoltcp-style `Packet<T>` + `Repr`).

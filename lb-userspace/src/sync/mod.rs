//! Flow-state replication between lb nodes: the shared key, the datagram format and replay protection.

pub mod key;
pub mod replay;
pub mod wire;

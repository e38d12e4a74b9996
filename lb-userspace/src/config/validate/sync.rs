//! `[sync]`: the address this node receives replicated flows on, its peers, and the shared key
//! (read here, so `lb check-config` and a reload refuse a missing or malformed key file with the
//! position of `key_file`, and the running daemon keeps its old key).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use toml::Spanned;

use super::super::raw::RawSync;
use super::super::{ConfigError, SyncConfig};
use super::Validator;
use crate::sync::key::SyncKey;

impl Validator<'_> {
    pub(super) fn sync(&self, raw: &RawSync) -> Result<SyncConfig, ConfigError> {
        let RawSync {
            listen,
            peers,
            key_file,
        } = raw;
        let listen_address = self.sync_address("listen", listen)?;
        let mut seen = HashSet::new();
        let mut peer_addresses = Vec::with_capacity(peers.len());
        for peer in peers {
            let address = self.sync_address("peers", peer)?;
            if address == listen_address {
                return Err(self.error(
                    peer.span(),
                    format!("peer {address} is this node's own listen address; list the other nodes only"),
                ));
            }
            if address.is_ipv4() != listen_address.is_ipv4() {
                return Err(self.error(
                    peer.span(),
                    format!(
                        "peer {address} is of another address family than listen {listen_address}: \
                         one socket sends and receives, so every peer must be reachable from it"
                    ),
                ));
            }
            if !seen.insert(address) {
                return Err(self.error(peer.span(), format!("peer {address} is listed twice")));
            }
            peer_addresses.push(address);
        }
        let path = self.key_path(key_file)?;
        let key = SyncKey::from_file(&path)
            .map_err(|e| self.error(key_file.span(), format!("key_file: {e}")))?;
        Ok(SyncConfig {
            listen: listen_address,
            peers: peer_addresses,
            key_file: path,
            key,
        })
    }

    /// An IP address and a port: a specific address (it names this node to its peers, and
    /// the peers send to it), never a host name (nothing is resolved).
    fn sync_address(&self, key: &str, value: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        let text = value.get_ref();
        let problem = match text.parse::<SocketAddr>() {
            Ok(address) if address.port() == 0 => "has port 0".to_owned(),
            Ok(address) if address.ip().is_unspecified() => format!(
                "is the unspecified address {}: give this node's own address (peers know a node \
                 by the address it listens on)",
                address.ip()
            ),
            Ok(address) if address.ip().is_multicast() => "is a multicast address".to_owned(),
            Ok(address) => return Ok(address),
            Err(_) => "is not an address and port such as \"10.0.0.2:7946\" or \"[fd00::2]:7946\""
                .to_owned(),
        };
        Err(self.error(value.span(), format!("{key} `{text}` {problem}")))
    }

    fn key_path(&self, value: &Spanned<String>) -> Result<PathBuf, ConfigError> {
        let text = value.get_ref();
        if !text.starts_with('/') {
            return Err(self.error(
                value.span(),
                format!("key_file `{text}` is not an absolute path"),
            ));
        }
        Ok(PathBuf::from(text))
    }
}

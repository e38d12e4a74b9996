//! Interface lookup through `RTM_GETLINK`.

use futures_util::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkInfo, LinkLayerType, LinkMessage};

use super::{NetError, NetlinkHandle, errno};

/// An Ethernet interface as the data plane needs it: the index XDP attaches to and redirects to,
/// and the MAC written as the source of every frame sent out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    /// `IFLA_INFO_KIND`: "veth", "bridge", "vlan", ... and `None` for a physical NIC. The daemon
    /// uses it to warn about native XDP on veth (DESIGN.md §5).
    pub kind: Option<String>,
    /// `IFLA_MTU`: the largest IP packet the interface sends (encapsulated packets must fit).
    pub mtu: u32,
}

/// Linux's IFNAMSIZ less the terminating NUL.
const MAX_NAME_LEN: usize = 15;

impl NetlinkHandle {
    /// The interface called `name` in this handle's network namespace.
    ///
    /// Errors: [`NetError::InvalidInterfaceName`] for a name the kernel cannot hold,
    /// [`NetError::NoSuchInterface`], and [`NetError::NotEthernet`] for an interface without a 6-byte
    /// hardware address (L2 DSR cannot use it).
    pub async fn interface_by_name(&self, name: &str) -> Result<Interface, NetError> {
        if !valid_name(name) {
            return Err(NetError::InvalidInterfaceName {
                name: name.to_owned(),
            });
        }
        let request = self.handle.link().get().match_name(name).execute();
        match first(request).await {
            Ok(Some(link)) => interface_from(link),
            Ok(None) => Err(NetError::NoSuchInterface {
                name: name.to_owned(),
            }),
            // ENODEV is the kernel's "no such interface".
            Err(source) if errno(&source) == Some(libc::ENODEV) => Err(NetError::NoSuchInterface {
                name: name.to_owned(),
            }),
            Err(source) => Err(NetError::Netlink {
                request: format!("RTM_GETLINK for interface {name:?}"),
                source,
            }),
        }
    }

    /// The interface with index `index` in this handle's network namespace.
    ///
    /// Errors as [`NetlinkHandle::interface_by_name`], with [`NetError::NoSuchIndex`].
    pub async fn interface_by_index(&self, index: u32) -> Result<Interface, NetError> {
        // Index 0 would make the kernel look the (absent) name up instead.
        if index == 0 {
            return Err(NetError::NoSuchIndex { index });
        }
        let request = self.handle.link().get().match_index(index).execute();
        match first(request).await {
            Ok(Some(link)) => interface_from(link),
            Ok(None) => Err(NetError::NoSuchIndex { index }),
            Err(source) if errno(&source) == Some(libc::ENODEV) => {
                Err(NetError::NoSuchIndex { index })
            }
            Err(source) => Err(NetError::Netlink {
                request: format!("RTM_GETLINK for interface index {index}"),
                source,
            }),
        }
    }
}

/// The first message of a reply stream, draining the rest so the request completes.
async fn first<S>(stream: S) -> Result<Option<LinkMessage>, rtnetlink::Error>
where
    S: futures_util::Stream<Item = Result<LinkMessage, rtnetlink::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut found = None;
    while let Some(link) = stream.try_next().await? {
        found.get_or_insert(link);
    }
    Ok(found)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn interface_from(link: LinkMessage) -> Result<Interface, NetError> {
    let index = link.header.index;
    let mut name = None;
    let mut address = None;
    let mut kind = None;
    let mut mtu = 1500;
    for attribute in link.attributes {
        match attribute {
            LinkAttribute::IfName(value) => name = Some(value),
            LinkAttribute::Mtu(value) => mtu = value,
            LinkAttribute::Address(value) => address = Some(value),
            LinkAttribute::LinkInfo(infos) => {
                kind = infos.into_iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    let name = name.unwrap_or_else(|| format!("if{index}"));
    let mac = match (link.header.link_layer_type, address.as_deref()) {
        (LinkLayerType::Ether, Some(&[a, b, c, d, e, f])) => [a, b, c, d, e, f],
        (link_type, _) => {
            return Err(NetError::NotEthernet {
                name,
                index,
                link_type: link_type.to_string(),
            });
        }
    };
    Ok(Interface {
        name,
        index,
        mac,
        kind,
        mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_names_the_kernel_cannot_hold() {
        for bad in ["", "a-name-of-16-byt", "a/b", "a b", "a:1", ".", ".."] {
            assert!(!valid_name(bad), "{bad:?} accepted");
        }
        for good in ["eth0", "veth-lb.10", "a-name-of-15-by"] {
            assert!(valid_name(good), "{good:?} rejected");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unknown_names_and_indexes_are_not_found() {
        let net = NetlinkHandle::new().unwrap();
        assert!(matches!(
            net.interface_by_name("lbnet-none0").await,
            Err(NetError::NoSuchInterface { name }) if name == "lbnet-none0"
        ));
        assert!(matches!(
            net.interface_by_index(0x7fff_fff0).await,
            Err(NetError::NoSuchIndex { index: 0x7fff_fff0 })
        ));
        assert!(matches!(
            net.interface_by_name("bad/name").await,
            Err(NetError::InvalidInterfaceName { .. })
        ));
    }
}

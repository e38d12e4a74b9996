//! The XDP mode of what is attached to an interface, from `RTM_GETLINK`'s `IFLA_XDP_ATTACHED`:
//! an adopted link keeps the mode it was made with, and the kernel's link info does not say it.
//! A plain blocking netlink socket: `attach` is synchronous and may run inside a tokio runtime.

use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::dataplane::AttachMode;

/// The mode of the XDP program on `ifindex` (current network namespace); `None` when there is
/// none, several, or the kernel could not be asked.
pub fn attached_mode(ifindex: u32) -> Option<AttachMode> {
    let mut request = LinkMessage::default();
    request.header.index = ifindex;
    let mut message = NetlinkMessage::from(RouteNetlinkMessage::GetLink(request));
    message.header.flags = NLM_F_REQUEST;
    message.header.sequence_number = 1;
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_ROUTE).ok()?;
    socket.bind_auto().ok()?;
    socket.connect(&SocketAddr::new(0, 0)).ok()?;
    socket.send(&buf, 0).ok()?;
    let (reply, _) = socket.recv_from_full().ok()?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply).ok()?;
    let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = reply.payload else {
        return None;
    };
    link.attributes
        .into_iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Xdp(xdp) => xdp.into_iter().find_map(|x| match x {
                LinkXdp::Attached(XdpAttached::Driver) => Some(AttachMode::Native),
                LinkXdp::Attached(XdpAttached::SocketBuffer) => Some(AttachMode::Skb),
                _ => None,
            }),
            _ => None,
        })
}

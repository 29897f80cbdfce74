//! The IPv6 inbound passthrough source `::6/128` on `lo`.
//!
//! The proxy connects to the app from `127.0.0.6` / `::6` so that `WEFT_OUTPUT` lets that
//! connection through (`-o lo -s ::6/128 -j RETURN`). Every 127.0.0.0/8 address is already
//! local, but IPv6 loopback is only `::1/128`, so `::6` has to be added, as Istio's
//! `istio-iptables` does (`ip -6 addr add ::6/128 dev lo`). One rtnetlink request, so that
//! the init image needs no iproute2.

use std::os::fd::AsRawFd as _;

use nix::errno::Errno;
use nix::net::if_::if_nametoindex;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

/// The address added, as octets (`::6`).
pub const PASSTHROUGH_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];

/// Errors of adding the passthrough address.
#[derive(Debug, thiserror::Error)]
pub enum LoopbackError {
    /// `lo` has no index (no such interface in this namespace).
    #[error("cannot find interface lo")]
    NoLoopback(#[source] Errno),
    /// The rtnetlink socket failed.
    #[error("rtnetlink {step} failed")]
    Netlink {
        /// What was being done.
        step: &'static str,
        /// Why it failed.
        #[source]
        source: Errno,
    },
    /// The kernel refused the address.
    #[error("adding ::6/128 to lo was refused")]
    Refused(#[source] Errno),
    /// The kernel's answer was not an acknowledgement.
    #[error("unexpected rtnetlink answer ({0} bytes)")]
    Unexpected(usize),
}

const RTM_NEWADDR: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const AF_INET6: u8 = 10;

/// Adds `::6/128` to `lo` in the current network namespace; succeeds if it is already there.
pub fn add_passthrough_v6() -> Result<(), LoopbackError> {
    let index = if_nametoindex("lo").map_err(LoopbackError::NoLoopback)?;
    let request = new_address_request(index, PASSTHROUGH_V6);
    let netlink = |step| move |source| LoopbackError::Netlink { step, source };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(netlink("socket"))?;
    sendto(
        fd.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(netlink("send"))?;
    let mut answer = [0u8; 1024];
    let n = recv(fd.as_raw_fd(), &mut answer, MsgFlags::empty()).map_err(netlink("receive"))?;
    match ack_errno(&answer[..n]) {
        Some(0) => Ok(()),
        Some(e) if -e == Errno::EEXIST as i32 => Ok(()),
        Some(e) => Err(LoopbackError::Refused(Errno::from_raw(-e))),
        None => Err(LoopbackError::Unexpected(n)),
    }
}

/// An `RTM_NEWADDR` request for `address`/128 on interface `index` (netlink is host-endian).
fn new_address_request(index: u32, address: [u8; 16]) -> Vec<u8> {
    let attribute = |kind: u16| {
        let mut a = Vec::with_capacity(20);
        a.extend_from_slice(&20u16.to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(&address);
        a
    };
    let mut body = vec![AF_INET6, 128, IFA_F_NODAD, 0];
    body.extend_from_slice(&index.to_ne_bytes());
    body.extend(attribute(IFA_LOCAL));
    body.extend(attribute(IFA_ADDRESS));

    let len = u32::try_from(16 + body.len()).expect("a 64-byte message");
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&RTM_NEWADDR.to_ne_bytes());
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns it
    msg.extend(body);
    msg
}

/// The (negative or zero) error code of an `NLMSG_ERROR` acknowledgement.
fn ack_errno(answer: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes(answer.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    Some(i32::from_ne_bytes(answer.get(16..20)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let msg = new_address_request(1, PASSTHROUGH_V6);
        assert_eq!(msg.len(), 64);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().expect("len")), 64);
        assert_eq!(
            u16::from_ne_bytes(msg[4..6].try_into().expect("type")),
            RTM_NEWADDR
        );
        assert_eq!(&msg[16..20], &[AF_INET6, 128, IFA_F_NODAD, 0]);
        assert_eq!(
            u32::from_ne_bytes(msg[20..24].try_into().expect("index")),
            1
        );
        assert_eq!(
            &msg[24..28],
            &[&20u16.to_ne_bytes()[..], &IFA_LOCAL.to_ne_bytes()[..]].concat()[..]
        );
        assert_eq!(&msg[28..44], &PASSTHROUGH_V6);
        assert_eq!(&msg[48..64], &PASSTHROUGH_V6);
    }

    #[test]
    fn acks_are_read() {
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[16..20].copy_from_slice(&(-17i32).to_ne_bytes());
        assert_eq!(ack_errno(&ack), Some(-17));
        ack[4..6].copy_from_slice(&RTM_NEWADDR.to_ne_bytes());
        assert_eq!(ack_errno(&ack), None);
        assert_eq!(ack_errno(&[0u8; 3]), None);
    }
}

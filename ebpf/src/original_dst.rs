//! `cgroup/getsockopt`: `SO_ORIGINAL_DST` (`SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (`SOL_IPV6`)
//! on a redirected socket answer what conntrack answers after NAT: the `sockaddr_in` /
//! `sockaddr_in6` the client was connecting to; from `ORIG_DST` for connects redirected to
//! loopback, the socket's own address for inbound captures. Sockets that were not redirected keep the
//! kernel's answer (`ENOENT` without NAT), so the proxy's loop protection still works.

use core::ptr;

use aya_ebpf::EbpfContext as _;
use aya_ebpf::helpers::bpf_get_netns_cookie;
use aya_ebpf::macros::cgroup_sockopt;
use aya_ebpf::programs::SockoptContext;
use weft_ebpf_maps::{AF_INET, AF_INET6, Addr, Counter, OrigDst, SockKey, captured_inbound, port};

use crate::maps::{ORIG_DST, PodRules, count, pod, read_ip6, read_u32};

/// The call goes on (with our answer, if any); 0 would fail it with `EPERM`.
const PROCEED: i32 = 1;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the number.
const SO_ORIGINAL_DST: i32 = 80;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

/// Entry point for every `getsockopt` in the attached cgroups: leaves all but two options
/// alone at the cost of two loads.
#[cgroup_sockopt(getsockopt)]
pub fn weft_getsockopt(ctx: SockoptContext) -> i32 {
    match try_getsockopt(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) -> Result<i32, i32> {
    let so = ctx.sockopt;
    // SAFETY (all context accesses): `so` is the program's context, valid while it runs.
    let level = unsafe { ptr::read_volatile(ptr::addr_of!((*so).level)) };
    let optname = unsafe { ptr::read_volatile(ptr::addr_of!((*so).optname)) };
    let v6 = match (level, optname) {
        (SOL_IP, SO_ORIGINAL_DST) => false,
        (SOL_IPV6, SO_ORIGINAL_DST) => true,
        _ => return Ok(PROCEED),
    };
    let sk = unsafe { ptr::read_volatile(ptr::addr_of!((*so).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return Ok(PROCEED);
    }
    // Both families' fields are read and the family picks (see `sockops::sock_key`).
    // SAFETY (field reads of `sk`): a socket pointer the verifier checked for null above.
    let family = read_u32(unsafe { ptr::addr_of!((*sk).family) });
    let local = Addr::pick(
        family,
        read_u32(unsafe { ptr::addr_of!((*sk).src_ip4) }),
        read_ip6(unsafe { ptr::addr_of!((*sk).src_ip6) }),
    );
    let remote = Addr::pick(
        family,
        read_u32(unsafe { ptr::addr_of!((*sk).dst_ip4) }),
        read_ip6(unsafe { ptr::addr_of!((*sk).dst_ip6) }),
    );
    let local_port = read_u32(unsafe { ptr::addr_of!((*sk).src_port) }) as u16;
    let remote_port = port::from_be16(unsafe { ptr::read_volatile(ptr::addr_of!((*sk).dst_port)) });
    // SAFETY: the helper takes the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = SockKey::new(netns, local, local_port, remote, remote_port);
    // SAFETY: copied out at once.
    let stored = unsafe { ORIG_DST.get(&key) }.copied();
    let orig = match stored {
        Some(orig) => orig,
        None => match pod(netns) {
            Some(pod)
                if captured_inbound(
                    &pod,
                    (ctx.uid(), ctx.gid()),
                    &local,
                    local_port,
                    &remote,
                    &PodRules { netns },
                ) =>
            {
                OrigDst {
                    addr: local,
                    port: u32::from(local_port),
                }
            }
            _ => {
                count(Counter::OrigDstMissed);
                return Ok(PROCEED);
            }
        },
    };
    let optval =
        unsafe { ptr::read_volatile(ptr::addr_of!((*so).__bindgen_anon_2.optval)) }.cast::<u8>();
    let optval_end =
        unsafe { ptr::read_volatile(ptr::addr_of!((*so).__bindgen_anon_3.optval_end)) }
            .cast::<u8>();
    let len = if v6 {
        SOCKADDR_IN6_LEN
    } else {
        SOCKADDR_IN_LEN
    };
    // An IPv4 socket cannot be told an IPv6 destination, nor can a short buffer hold one.
    if (!v6 && !orig.addr.is_v4()) || (optval as usize) + len > optval_end as usize {
        count(Counter::OrigDstMissed);
        return Ok(PROCEED);
    }
    // SAFETY: `optval..optval + len` is inside the buffer, checked against `optval_end`.
    unsafe {
        if v6 {
            write_sockaddr_in6(optval, &orig);
        } else {
            write_sockaddr_in(optval, &orig);
        }
        // Separate 4-byte stores: LLVM would merge these adjacent fields into one 8-byte
        // store, which the verifier refuses.
        ptr::write_volatile(ptr::addr_of_mut!((*so).optlen), len as i32);
        ptr::write_volatile(ptr::addr_of_mut!((*so).retval), 0);
    }
    count(Counter::OrigDstAnswered);
    Ok(PROCEED)
}

/// `struct sockaddr_in { u16 family; be16 port; be32 addr; u8 zero[8]; }`.
///
/// # Safety
/// `p` must be valid for 16 bytes of writes.
#[inline(always)]
unsafe fn write_sockaddr_in(p: *mut u8, orig: &OrigDst) {
    let port = (orig.port as u16).to_be_bytes();
    let addr = orig.addr.v4().to_ne_bytes();
    let family = (AF_INET as u16).to_ne_bytes();
    let bytes: [u8; SOCKADDR_IN_LEN] = [
        family[0], family[1], port[0], port[1], addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0,
        0, 0, 0,
    ];
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: in bounds per the caller's contract.
        unsafe { ptr::write_volatile(p.add(i), *b) };
    }
}

/// `struct sockaddr_in6 { u16 family; be16 port; u32 flowinfo; u8 addr[16]; u32 scope_id; }`.
///
/// # Safety
/// `p` must be valid for 28 bytes of writes.
#[inline(always)]
unsafe fn write_sockaddr_in6(p: *mut u8, orig: &OrigDst) {
    let port = (orig.port as u16).to_be_bytes();
    let family = (AF_INET6 as u16).to_ne_bytes();
    let addr = orig.addr.octets();
    let head = [family[0], family[1], port[0], port[1], 0, 0, 0, 0];
    for (i, b) in head.iter().enumerate() {
        // SAFETY: in bounds per the caller's contract.
        unsafe { ptr::write_volatile(p.add(i), *b) };
    }
    for (i, b) in addr.iter().enumerate() {
        // SAFETY: in bounds per the caller's contract.
        unsafe { ptr::write_volatile(p.add(8 + i), *b) };
    }
    for i in 0..4 {
        // SAFETY: in bounds per the caller's contract.
        unsafe { ptr::write_volatile(p.add(24 + i), 0) };
    }
}

//! `cgroup/connect4` and `cgroup/connect6`: a meshed app's TCP connect goes to the proxy.

use core::ptr;

use aya_ebpf::EbpfContext as _;
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie};
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;
use weft_ebpf_maps::{Addr, Counter, IPPROTO_TCP, OrigDst, Outbound, outbound, port};

use crate::maps::{CONNECTS, PodRules, count, pod, read_ip6, read_u32};

/// The connect goes on (possibly rewritten); 0 would fail it with `EPERM`.
const PROCEED: i32 = 1;

/// IPv4 connects (and nothing else: IPv4-mapped destinations of IPv6 sockets come to
/// [`weft_connect6`]).
#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect(&ctx, false) {
        Ok(r) | Err(r) => r,
    }
}

/// IPv6 connects, including IPv4-mapped destinations.
#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect(&ctx, true) {
        Ok(r) | Err(r) => r,
    }
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, v6: bool) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY (all field accesses below): `sa` is the program's context, valid while it runs.
    if read_u32(unsafe { ptr::addr_of!((*sa).protocol) }) != IPPROTO_TCP {
        return Ok(PROCEED);
    }
    // SAFETY: the helper takes the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(pod) = pod(netns) else {
        return Ok(PROCEED);
    };
    let dst = if v6 {
        Addr::from_v6(read_ip6(unsafe { ptr::addr_of!((*sa).user_ip6) }))
    } else {
        Addr::from_v4(read_u32(unsafe { ptr::addr_of!((*sa).user_ip4) }))
    };
    let dst_port = port::from_sock_addr(read_u32(unsafe { ptr::addr_of!((*sa).user_port) }));
    let rules = PodRules { netns };
    let (to_port, counter) = match outbound(&pod, ctx.uid(), ctx.gid(), &dst, dst_port, &rules) {
        Outbound::Leave => {
            count(Counter::OutboundLeft);
            return Ok(PROCEED);
        }
        Outbound::ToOutbound => (pod.outbound_port, Counter::OutboundRedirected),
        Outbound::ToInbound => (pod.inbound_port, Counter::SelfInboundRedirected),
    };
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: dst,
        port: u32::from(dst_port),
    };
    if CONNECTS.insert(&cookie, &orig, 0).is_err() {
        // Without the original destination the proxy could not route: leave it alone.
        count(Counter::MapUpdateFailed);
        return Ok(PROCEED);
    }
    let to = dst.loopback_of();
    // SAFETY: writes of whole 4-byte context fields, which these hooks allow.
    unsafe {
        if v6 {
            let p = ptr::addr_of_mut!((*sa).user_ip6).cast::<u32>();
            for (i, w) in to.0.iter().enumerate() {
                ptr::write_volatile(p.add(i), *w);
            }
        } else {
            ptr::write_volatile(ptr::addr_of_mut!((*sa).user_ip4), to.v4());
        }
        ptr::write_volatile(
            ptr::addr_of_mut!((*sa).user_port),
            port::to_sock_addr(to_port),
        );
    }
    count(counter);
    Ok(PROCEED)
}

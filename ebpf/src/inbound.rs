//! `sk_lookup`, attached by the agent to each meshed pod's network namespace: an incoming TCP
//! connection to the pod's address is handed to the proxy's inbound listener (registered in
//! [`crate::maps::LISTENERS`] by sockops), whichever node the client is on, with no NAT. The
//! accepted socket keeps the address the client connected to, which is what
//! `getsockopt(SO_ORIGINAL_DST)` then answers (see [`weft_ebpf_maps::captured_inbound`]).

use core::ptr;

use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use aya_ebpf::macros::sk_lookup;
use aya_ebpf::programs::SkLookupContext;
use weft_ebpf_maps::{AF_INET, AF_INET6, Addr, Counter, IPPROTO_TCP, ListenerKey, inbound};

use crate::maps::{LISTENERS, PodRules, count, owner, pod, read_ip6, read_u32};

/// Entry point: `SK_PASS` without a selection lets the kernel's own lookup proceed.
#[sk_lookup]
pub fn weft_sk_lookup(ctx: SkLookupContext) -> u32 {
    match try_sk_lookup(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> Result<u32, u32> {
    let l = ctx.lookup;
    // SAFETY (all field reads): `l` is the program's context, valid while it runs.
    if read_u32(unsafe { ptr::addr_of!((*l).protocol) }) != IPPROTO_TCP {
        return Ok(SK_PASS);
    }
    let family = read_u32(unsafe { ptr::addr_of!((*l).family) });
    // Both families' fields are read and the family picks (see `sockops::sock_key`).
    let local = Addr::pick(
        family,
        read_u32(unsafe { ptr::addr_of!((*l).local_ip4) }),
        read_ip6(unsafe { ptr::addr_of!((*l).local_ip6) }),
    );
    let remote = Addr::pick(
        family,
        read_u32(unsafe { ptr::addr_of!((*l).remote_ip4) }),
        read_ip6(unsafe { ptr::addr_of!((*l).remote_ip6) }),
    );
    let Some(netns) = owner(&local) else {
        return Ok(SK_PASS);
    };
    let Some(pod) = pod(netns) else {
        return Ok(SK_PASS);
    };
    let local_port = read_u32(unsafe { ptr::addr_of!((*l).local_port) }) as u16;
    let ifindex = read_u32(unsafe { ptr::addr_of!((*l).ingress_ifindex) });
    if !inbound(
        &pod,
        &remote,
        &local,
        local_port,
        ifindex,
        &PodRules { netns },
    ) {
        count(Counter::InboundLeft);
        return Ok(SK_PASS);
    }
    let assigned = LISTENERS
        .redirect_sk_lookup(ctx, ListenerKey::new(netns, family), 0)
        .or_else(|e| {
            // An IPv6 listener that is not v6-only also takes IPv4.
            if family == AF_INET {
                LISTENERS.redirect_sk_lookup(ctx, ListenerKey::new(netns, AF_INET6), 0)
            } else {
                Err(e)
            }
        });
    if assigned.is_err() {
        // The proxy is not listening (yet): refuse rather than let the connection reach the
        // app around it.
        count(Counter::InboundNoListener);
        return Ok(SK_DROP);
    }
    count(Counter::InboundCaptured);
    Ok(SK_PASS)
}

//! `sk_msg` on [`crate::maps::SOCKS`]: a message an app socket sends to its proxy goes
//! straight into the receive queue of the proxy's end of the connection (same pod, over
//! loopback), skipping the TCP/IP stack twice. Messages towards the app keep the TCP path
//! unless the pod opted in (see [`weft_ebpf_maps::short_circuit`]: apps may read with
//! `splice(2)`, which does not see bytes queued this way).
//!
//! Bytes must stay in order: a sender that once found no peer (the peer's side was not yet
//! established) sent through TCP, and later messages put directly in the peer's queue could
//! overtake those; so such a sender is marked in [`crate::maps::TAINTED`] and stays on TCP.

use core::ptr;

use aya_ebpf::bindings::BPF_F_INGRESS;
use aya_ebpf::bindings::sk_action::SK_PASS;
use aya_ebpf::helpers::bpf_get_netns_cookie;
use aya_ebpf::macros::sk_msg;
use aya_ebpf::programs::SkMsgContext;
use weft_ebpf_maps::{Addr, Counter, SockKey, port, short_circuit};

use crate::maps::{SOCKS, TAINTED, count, pod, read_ip6, read_u32};

/// Entry point: `SK_PASS` either way (redirected, or through TCP); never drops.
#[sk_msg]
pub fn weft_sk_msg(ctx: SkMsgContext) -> u32 {
    match try_sk_msg(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) -> Result<u32, u32> {
    let md = ctx.msg;
    // Both families' fields are read and the family picks (see `sockops::sock_key`).
    // SAFETY (all field reads): `md` is the program's context, valid while it runs.
    let family = read_u32(unsafe { ptr::addr_of!((*md).family) });
    let local = Addr::pick(
        family,
        read_u32(unsafe { ptr::addr_of!((*md).local_ip4) }),
        read_ip6(unsafe { ptr::addr_of!((*md).local_ip6) }),
    );
    let remote = Addr::pick(
        family,
        read_u32(unsafe { ptr::addr_of!((*md).remote_ip4) }),
        read_ip6(unsafe { ptr::addr_of!((*md).remote_ip6) }),
    );
    let local_port = read_u32(unsafe { ptr::addr_of!((*md).local_port) }) as u16;
    let remote_port =
        port::from_sock_ops_remote(read_u32(unsafe { ptr::addr_of!((*md).remote_port) }));
    // SAFETY: the helper takes the program's context.
    let netns = unsafe { bpf_get_netns_cookie(md.cast()) };
    let key = SockKey::new(netns, local, local_port, remote, remote_port);
    // SAFETY: only presence is read.
    if unsafe { TAINTED.get(&key) }.is_some() {
        count(Counter::MessagePassed);
        return Ok(SK_PASS);
    }
    let mut peer = key.peer();
    let Some(pod) = pod(netns) else {
        return Ok(SK_PASS);
    };
    if !short_circuit(&pod, &peer) {
        return Ok(SK_PASS);
    }
    if SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(Counter::MessageRedirected);
    } else {
        if TAINTED.insert(&key, &1, 0).is_err() {
            count(Counter::MapUpdateFailed);
        }
        count(Counter::MessagePassed);
    }
    Ok(SK_PASS)
}

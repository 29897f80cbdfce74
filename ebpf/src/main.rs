//! Weft's eBPF programs: transparent redirection of meshed pods to their proxy with no rule in
//! the pod.
//!
//! - [`outbound`]: `cgroup/connect4|6` rewrite a meshed app's connect to the proxy's outbound
//!   listener on loopback (`127.0.0.1:15001`, `[::1]:15001`) and remember the original
//!   destination by socket cookie.
//! - [`sockops`]: re-keys that destination by the proxy side's 4-tuple when the connection is
//!   established, registers the proxy's inbound listeners for `sk_lookup`, puts app and proxy
//!   sockets in the `sk_msg` sockhash, and forgets everything when a socket closes.
//! - [`original_dst`]: `cgroup/getsockopt` answers `SO_ORIGINAL_DST` /
//!   `IP6T_SO_ORIGINAL_DST` on the proxy's accepted sockets as conntrack would after NAT.
//! - [`inbound`]: `sk_lookup`, attached to each meshed pod's network namespace, hands incoming
//!   connections to the proxy's inbound listener (15006) whatever node they come from.
//! - [`short_circuit`]: `sk_msg` moves bytes between app and proxy sockets directly.
//!
//! The decisions are in `weft-ebpf-maps` (pure, unit tested by the redirector).
#![no_std]
#![no_main]

mod inbound;
mod maps;
mod original_dst;
mod outbound;
mod short_circuit;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach this; it is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

/// Programs carry the GPL licence: `bpf_sk_assign` and friends need a GPL-compatible program.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

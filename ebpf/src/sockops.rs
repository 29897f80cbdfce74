//! `sockops`: the life of redirected sockets.
//!
//! - `TCP_CONNECT_CB` of a redirected app socket: watch its states, so that a connect that
//!   fails still forgets its cookie.
//! - `ACTIVE_ESTABLISHED_CB` of a redirected app socket: its original destination moves from
//!   the cookie to the proxy side's 4-tuple (what `getsockopt` will be asked about), and the
//!   socket joins the `sk_msg` sockhash. So does the proxy's passthrough socket (`127.0.0.6`).
//! - `PASSIVE_ESTABLISHED_CB` in a meshed pod: watch its states (to forget the socket on
//!   close); redirected loopback ones join the sockhash, as does the app's side of a
//!   passthrough connection.
//! - `TCP_LISTEN_CB` of the proxy's inbound listener: registered for `sk_lookup`.
//! - `STATE_CB` to `TCP_CLOSE`: forget the socket.
//!
//! Entries are removed on the proxy side's close only: an app that connects, writes and
//! closes at once must not take the answer away before the proxy has asked for it.

use core::ptr;

use aya_ebpf::EbpfContext as _;
use aya_ebpf::bindings::{
    BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
    BPF_SOCK_OPS_TCP_LISTEN_CB,
};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie};
use aya_ebpf::macros::sock_ops;
use aya_ebpf::programs::SockOpsContext;
use weft_ebpf_maps::{AF_INET, AF_INET6, Addr, Counter, ListenerKey, SockKey, pod_flags, port};

use crate::maps::{
    CONNECTS, LISTENERS, ORIG_DST, SOCKS, TAINTED, count, pod, read_ip6, read_u32, remember,
};

/// `TCP_CLOSE` in `include/net/tcp_states.h`.
const TCP_CLOSE: u32 = 7;

/// The sockops entry point; its return value is not used for these operations.
#[sock_ops]
pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
    match try_sockops(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) -> Result<u32, u32> {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return Ok(0);
    }
    // SAFETY: the helper takes the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: the helper takes the program's context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: only presence is read.
            if unsafe { CONNECTS.get(&cookie) }.is_some() {
                watch_states(ctx);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(ctx, netns),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(ctx, netns),
        BPF_SOCK_OPS_TCP_LISTEN_CB => listening(ctx, netns, family),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let key = sock_key(ctx, netns);
            let _ = ORIG_DST.remove(&key);
            let _ = TAINTED.remove(&key);
            // SAFETY: the helper takes the program's context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = CONNECTS.remove(&cookie);
        }
        _ => {}
    }
    Ok(0)
}

#[inline(always)]
fn active_established(ctx: &SockOpsContext, netns: u64) {
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let orig = unsafe { CONNECTS.get(&cookie) }.copied();
    let key = sock_key(ctx, netns);
    if let Some(orig) = orig {
        remember(&key.peer(), &orig);
        let _ = CONNECTS.remove(&cookie);
        short_circuit(ctx, netns, key);
    } else if key.local.is_passthrough() && pod(netns).is_some() {
        short_circuit(ctx, netns, key);
    }
}

#[inline(always)]
fn passive_established(ctx: &SockOpsContext, netns: u64) {
    if pod(netns).is_none() {
        return;
    }
    let key = sock_key(ctx, netns);
    // Every accepted socket of a meshed pod is watched, whether or not its original
    // destination is already known: whichever order the two ends' callbacks ran in, the
    // entry goes when the socket closes.
    watch_states(ctx);
    // SAFETY: only presence is read.
    let redirected = unsafe { ORIG_DST.get(&key) }.is_some();
    if (redirected && key.remote.is_loopback())
        || (key.remote.is_passthrough() && key.local.is_loopback())
    {
        short_circuit(ctx, netns, key);
    }
}

#[inline(always)]
fn listening(ctx: &SockOpsContext, netns: u64, family: u32) {
    let Some(pod) = pod(netns) else {
        return;
    };
    if ctx.local_port() != u32::from(pod.inbound_port) {
        return;
    }
    let mut key = ListenerKey::new(netns, family);
    // SAFETY: `ctx.ops` is the program's context, which this helper takes.
    let r = LISTENERS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY));
    count(if r.is_ok() {
        Counter::ListenerRegistered
    } else {
        Counter::MapUpdateFailed
    });
}

/// Watches the socket's states (to forget it on close) and, when the pod short-circuits
/// app↔proxy bytes at all, adds it to the `sk_msg` sockhash.
#[inline(always)]
fn short_circuit(ctx: &SockOpsContext, netns: u64, mut key: SockKey) {
    watch_states(ctx);
    if pod(netns).is_none_or(|p| p.flags & pod_flags::SHORT_CIRCUIT == 0) {
        return;
    }
    // SAFETY: `ctx.ops` is the program's context, which this helper takes.
    let r = SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY));
    count(if r.is_ok() {
        Counter::SocketShortCircuited
    } else {
        Counter::MapUpdateFailed
    });
}

#[inline(always)]
fn watch_states(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// The socket's own 4-tuple.
#[inline(always)]
fn sock_key(ctx: &SockOpsContext, netns: u64) -> SockKey {
    let ops = ctx.ops;
    // Every field is read whatever the family, and the family picks among the values: a
    // branch between two context loads lets LLVM merge them into one load at a computed
    // offset, which the verifier refuses. (The IPv6 fields read zero on IPv4 sockets.)
    // SAFETY (all field reads): `ops` is the program's context, valid while it runs.
    let local = Addr::pick(
        ctx.family(),
        read_u32(unsafe { ptr::addr_of!((*ops).local_ip4) }),
        read_ip6(unsafe { ptr::addr_of!((*ops).local_ip6) }),
    );
    let remote = Addr::pick(
        ctx.family(),
        read_u32(unsafe { ptr::addr_of!((*ops).remote_ip4) }),
        read_ip6(unsafe { ptr::addr_of!((*ops).remote_ip6) }),
    );
    let local_port = read_u32(unsafe { ptr::addr_of!((*ops).local_port) }) as u16;
    let remote_port =
        port::from_sock_ops_remote(read_u32(unsafe { ptr::addr_of!((*ops).remote_port) }));
    SockKey::new(netns, local, local_port, remote, remote_port)
}

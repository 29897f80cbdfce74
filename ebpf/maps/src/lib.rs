//! The contract between Weft's eBPF programs (`weft-ebpf`) and the node agent
//! (`weft-redirector node`): map names, `#[repr(C)]` keys and values, byte-order helpers, and
//! the pure decisions the programs take ([`outbound`], [`inbound`]), so that those are unit
//! tested on the host and run unchanged in the kernel.
//!
//! Addresses are [`Addr`]: IPv6 layout, IPv4 as IPv4-mapped (`::ffff:a.b.c.d`), so one key type
//! serves both families and an IPv6 socket talking to a mapped address matches its IPv4 peer.
//! A pod is its network namespace, named by the namespace's cookie (`bpf_get_netns_cookie`,
//! `SO_NETNS_COOKIE`).
//!
//! With the `user` feature every type is `aya::Pod`. The unit tests of these decisions live
//! in the redirector (`weft_redirector::node::rules`), which builds the map entries from the
//! injector's arguments and checks the outcome against the iptables mode's semantics.
#![no_std]

/// `AF_INET`.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u32 = 6;
/// The loopback interface's index, the same in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;
/// The source the proxy binds for inbound passthrough to the app (`127.0.0.6`, `::6`).
pub const PASSTHROUGH_V4: [u8; 4] = [127, 0, 0, 6];
/// The init step's probe: a connect to this address (TEST-NET-1, never routed) at the proxy's
/// outbound port is redirected for every meshed process but the proxy, whatever the pod's
/// lists say, so that the init step can check that the node agent has taken its pod.
pub const PROBE_V4: [u8; 4] = [192, 0, 2, 1];

/// Names of the maps in the object, which are also their file names in the pin directory
/// (kernel map names hold at most 15 characters).
pub mod names {
    /// [`crate::PodConfig`] by network-namespace cookie: the meshed pods.
    pub const PODS: &str = "PODS";
    /// [`crate::PodIp`] by [`crate::Addr`]: which pod owns an address.
    pub const POD_IPS: &str = "POD_IPS";
    /// [`crate::port_rule`] flags by [`crate::PortKey`].
    pub const PORT_RULES: &str = "PORT_RULES";
    /// LPM trie of [`crate::CidrKey`]: destinations never redirected.
    pub const OUT_EXCL_CIDRS: &str = "OUT_EXCL_CIDRS";
    /// LPM trie of [`crate::CidrKey`]: destinations redirected (when not `*`).
    pub const OUT_INCL_CIDRS: &str = "OUT_INCL_CIDRS";
    /// Interfaces whose inbound traffic is never captured, by [`crate::IfaceKey`].
    pub const IFACE_EXCL: &str = "IFACE_EXCL";
    /// [`crate::OrigDst`] by socket cookie, from `connect` until the socket is established.
    pub const CONNECTS: &str = "CONNECTS";
    /// [`crate::OrigDst`] by the proxy-side [`crate::SockKey`]: what `SO_ORIGINAL_DST` answers
    /// for connects redirected to loopback (inbound captures need no entry, see
    /// [`crate::captured_inbound`]).
    pub const ORIG_DST: &str = "ORIG_DST";
    /// Sockhash of app and proxy sockets by their own [`crate::SockKey`], for `sk_msg`.
    pub const SOCKS: &str = "SOCKS";
    /// Sender sockets that once sent through TCP and must stay there (byte order).
    pub const TAINTED: &str = "TAINTED";
    /// Sockhash of the proxies' inbound listeners by [`crate::ListenerKey`], for `sk_lookup`.
    pub const LISTENERS: &str = "LISTENERS";
    /// Per-CPU `u64` counters indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";

    /// Every map, in the order the agent reports them.
    pub const ALL: [&str; 12] = [
        PODS,
        POD_IPS,
        PORT_RULES,
        OUT_EXCL_CIDRS,
        OUT_INCL_CIDRS,
        IFACE_EXCL,
        CONNECTS,
        ORIG_DST,
        SOCKS,
        TAINTED,
        LISTENERS,
        COUNTERS,
    ];
}

/// Names of the programs in the object.
pub mod programs {
    /// `cgroup/connect4`.
    pub const CONNECT4: &str = "weft_connect4";
    /// `cgroup/connect6`.
    pub const CONNECT6: &str = "weft_connect6";
    /// `sockops`.
    pub const SOCK_OPS: &str = "weft_sockops";
    /// `cgroup/getsockopt`.
    pub const GETSOCKOPT: &str = "weft_getsockopt";
    /// `sk_msg` on [`crate::names::SOCKS`].
    pub const SK_MSG: &str = "weft_sk_msg";
    /// `sk_lookup`, attached to each meshed pod's network namespace.
    pub const SK_LOOKUP: &str = "weft_sk_lookup";
}

/// Capacities of the maps.
pub mod capacity {
    /// Meshed pods on one node.
    pub const PODS: u32 = 4096;
    /// Pod addresses on one node.
    pub const POD_IPS: u32 = 16384;
    /// Port rules of all pods.
    pub const PORT_RULES: u32 = 65536;
    /// CIDR rules of all pods, per trie.
    pub const CIDRS: u32 = 16384;
    /// Excluded interfaces of all pods.
    pub const IFACES: u32 = 4096;
    /// Connections in flight (LRU: the oldest go first when full).
    pub const CONNECTIONS: u32 = 65536;
    /// Listeners (two per pod).
    pub const LISTENERS: u32 = 16384;
}

/// An IP address in the layout the kernel hands BPF programs: four 32-bit words whose bytes
/// are in network order; IPv4 as IPv4-mapped IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Addr(pub [u32; 4]);

const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    /// An IPv4 address from a 32-bit word in network byte order (`user_ip4`, `local_ip4` …).
    pub const fn from_v4(raw: u32) -> Addr {
        Addr([0, 0, MAPPED_PREFIX, raw])
    }

    /// An IPv6 address from four words in network byte order (`user_ip6`, `local_ip6` …).
    pub const fn from_v6(raw: [u32; 4]) -> Addr {
        Addr(raw)
    }

    /// The address of a context that has both families' fields: [`AF_INET`] takes the IPv4
    /// word, anything else the IPv6 words.
    #[inline(always)]
    pub const fn pick(family: u32, v4: u32, v6: [u32; 4]) -> Addr {
        if family == AF_INET {
            Addr::from_v4(v4)
        } else {
            Addr::from_v6(v6)
        }
    }

    /// From the 16 bytes of the IPv6 (or mapped) address.
    pub const fn from_octets(o: [u8; 16]) -> Addr {
        Addr([
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ])
    }

    /// The 16 bytes of the IPv6 (or mapped) address.
    pub const fn octets(&self) -> [u8; 16] {
        let [a, b, c, d] = self.0;
        let (a, b, c, d) = (
            a.to_ne_bytes(),
            b.to_ne_bytes(),
            c.to_ne_bytes(),
            d.to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    /// Whether this is an IPv4 (mapped) address.
    pub const fn is_v4(&self) -> bool {
        self.0[0] == 0 && self.0[1] == 0 && self.0[2] == MAPPED_PREFIX
    }

    /// The IPv4 address as a word in network byte order (meaningful when [`Addr::is_v4`]).
    pub const fn v4(&self) -> u32 {
        self.0[3]
    }

    /// `127.0.0.0/8` or `::1`.
    pub const fn is_loopback(&self) -> bool {
        if self.is_v4() {
            self.0[3].to_ne_bytes()[0] == 127
        } else {
            self.0[0] == 0 && self.0[1] == 0 && self.0[2] == 0 && self.0[3] == LOOPBACK_V6_LOW
        }
    }

    /// `0.0.0.0` or `::` (a connect to it reaches the local host).
    pub const fn is_unspecified(&self) -> bool {
        (self.is_v4() && self.0[3] == 0)
            || (self.0[0] == 0 && self.0[1] == 0 && self.0[2] == 0 && self.0[3] == 0)
    }

    /// The inbound passthrough source `127.0.0.6` or `::6`.
    pub const fn is_passthrough(&self) -> bool {
        if self.is_v4() {
            self.0[3] == u32::from_ne_bytes(PASSTHROUGH_V4)
        } else {
            self.0[0] == 0 && self.0[1] == 0 && self.0[2] == 0 && self.0[3] == PASSTHROUGH_V6_LOW
        }
    }

    /// The init step's probe address ([`PROBE_V4`]).
    pub const fn is_probe(&self) -> bool {
        self.is_v4() && self.0[3] == u32::from_ne_bytes(PROBE_V4)
    }

    /// `127.0.0.1` for IPv4 (mapped), `::1` for IPv6: where a redirected connect goes.
    pub const fn loopback_of(&self) -> Addr {
        if self.is_v4() {
            Addr::from_v4(u32::from_ne_bytes([127, 0, 0, 1]))
        } else {
            Addr([0, 0, 0, LOOPBACK_V6_LOW])
        }
    }
}

const LOOPBACK_V6_LOW: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
const PASSTHROUGH_V6_LOW: u32 = u32::from_ne_bytes([0, 0, 0, 6]);

/// Ports as the different BPF contexts store them.
pub mod port {
    /// `bpf_sock_addr.user_port`: the big-endian port in the first two bytes of a `u32`.
    pub const fn from_sock_addr(raw: u32) -> u16 {
        u16::from_be(raw as u16)
    }

    /// The `bpf_sock_addr.user_port` value for `port`.
    pub const fn to_sock_addr(port: u16) -> u32 {
        port.to_be() as u32
    }

    /// `bpf_sock_ops.remote_port` and `sk_msg_md.remote_port`: network order in the upper
    /// 16 bits of the word.
    pub const fn from_sock_ops_remote(raw: u32) -> u16 {
        u32::from_be(raw) as u16
    }

    /// A `__be16` field (`bpf_sock.dst_port`, `bpf_sk_lookup.remote_port`).
    pub const fn from_be16(raw: u16) -> u16 {
        u16::from_be(raw)
    }
}

/// How one meshed pod is redirected, by its network-namespace cookie in
/// [`names::PODS`]. A pod that is not there is never touched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodConfig {
    /// [`pod_flags`].
    pub flags: u32,
    /// Connections of this UID are never redirected (the proxy's).
    pub proxy_uid: u32,
    /// Connections of this GID are never redirected (the proxy's).
    pub proxy_gid: u32,
    /// The proxy's outbound listener (15001).
    pub outbound_port: u16,
    /// The proxy's inbound listener (15006).
    pub inbound_port: u16,
}

/// [`PodConfig::flags`].
pub mod pod_flags {
    /// `--include-outbound-cidrs=*`: every destination is redirected unless excluded.
    pub const OUTBOUND_ALL: u32 = 1;
    /// `--include-inbound-ports=*`: every inbound port is captured unless excluded.
    pub const INBOUND_ALL: u32 = 2;
    /// `sk_msg` moves the app's bytes straight to its proxy.
    pub const SHORT_CIRCUIT_TO_PROXY: u32 = 4;
    /// `sk_msg` moves the proxy's bytes straight to the app too (faster, but an app that reads
    /// with `splice(2)` does not see them: opt-in).
    pub const SHORT_CIRCUIT_TO_APP: u32 = 8;
    /// Either direction.
    pub const SHORT_CIRCUIT: u32 = SHORT_CIRCUIT_TO_PROXY | SHORT_CIRCUIT_TO_APP;
}

/// Key of [`names::PORT_RULES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    /// The pod.
    pub netns: u64,
    /// The port (host order).
    pub port: u32,
    /// Zero.
    pub pad: u32,
}

impl PortKey {
    /// The key of `port` in pod `netns`.
    pub const fn new(netns: u64, port: u16) -> PortKey {
        PortKey {
            netns,
            port: port as u32,
            pad: 0,
        }
    }
}

/// Values of [`names::PORT_RULES`]: what the pod's lists say of a port.
pub mod port_rule {
    /// `--exclude-outbound-ports`.
    pub const EXCLUDE_OUT: u32 = 1;
    /// `--include-outbound-ports`.
    pub const INCLUDE_OUT: u32 = 2;
    /// `--exclude-inbound-ports`.
    pub const EXCLUDE_IN: u32 = 4;
    /// `--include-inbound-ports` (when not `*`).
    pub const INCLUDE_IN: u32 = 8;
}

/// The data of an LPM-trie key in [`names::OUT_EXCL_CIDRS`] / [`names::OUT_INCL_CIDRS`]:
/// the pod, then the address. Byte arrays only, so the data follows the prefix length with
/// no padding, as the kernel requires.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrKey {
    /// The pod's network-namespace cookie, native byte order.
    pub netns: [u8; 8],
    /// The address, IPv4 mapped.
    pub addr: [u8; 16],
}

impl CidrKey {
    /// The key data for `addr` in pod `netns`.
    pub const fn new(netns: u64, addr: &Addr) -> CidrKey {
        CidrKey {
            netns: netns.to_ne_bytes(),
            addr: addr.octets(),
        }
    }

    /// The prefix length of a CIDR of `bits` bits: the pod's cookie always matches in full,
    /// and an IPv4 prefix sits after the 96 bits of the mapped prefix.
    pub const fn prefix_len(v4: bool, bits: u8) -> u32 {
        64 + if v4 { 96 } else { 0 } + bits as u32
    }

    /// The prefix length of a lookup for a single address.
    pub const FULL: u32 = 64 + 128;
}

/// Key of [`names::IFACE_EXCL`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfaceKey {
    /// The pod.
    pub netns: u64,
    /// The interface index in the pod's network namespace.
    pub ifindex: u32,
    /// Zero.
    pub pad: u32,
}

/// Value of [`names::POD_IPS`]: the pod that owns an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodIp {
    /// The pod's network-namespace cookie.
    pub netns: u64,
}

/// A TCP socket seen from its own side, in its pod: key of [`names::ORIG_DST`] (from the
/// proxy's side) and of [`names::SOCKS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// The socket's network-namespace cookie (loopback 4-tuples repeat across pods).
    pub netns: u64,
    /// Local address.
    pub local: Addr,
    /// Remote address.
    pub remote: Addr,
    /// Local port, host order.
    pub local_port: u32,
    /// Remote port, host order.
    pub remote_port: u32,
}

impl SockKey {
    /// The key of a socket.
    pub const fn new(
        netns: u64,
        local: Addr,
        local_port: u16,
        remote: Addr,
        remote_port: u16,
    ) -> SockKey {
        SockKey {
            netns,
            local,
            remote,
            local_port: local_port as u32,
            remote_port: remote_port as u32,
        }
    }

    /// The key of the other end of the connection (in the same pod).
    pub const fn peer(&self) -> SockKey {
        SockKey {
            netns: self.netns,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Where a redirected connection was going: value of [`names::CONNECTS`] and
/// [`names::ORIG_DST`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// The address, IPv4 mapped.
    pub addr: Addr,
    /// The port, host order.
    pub port: u32,
}

/// Key of [`names::LISTENERS`]: a pod's inbound listener of one family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// The pod.
    pub netns: u64,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// Zero.
    pub pad: u32,
}

impl ListenerKey {
    /// The key of pod `netns`'s listener of `family`.
    pub const fn new(netns: u64, family: u32) -> ListenerKey {
        ListenerKey {
            netns,
            family,
            pad: 0,
        }
    }
}

/// Indexes of [`names::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connect of a meshed app rewritten to the outbound listener.
    OutboundRedirected = 0,
    /// A connect of the proxy to its own pod address rewritten to the inbound listener.
    SelfInboundRedirected,
    /// A connect of a meshed pod left alone (exclusions, loopback, the proxy).
    OutboundLeft,
    /// An incoming connection handed to the pod's inbound listener by `sk_lookup`.
    InboundCaptured,
    /// An incoming connection dropped because the pod's proxy is not listening yet.
    InboundNoListener,
    /// An incoming connection of a meshed pod left alone (excluded port or interface).
    InboundLeft,
    /// `SO_ORIGINAL_DST` answered for a redirected socket.
    OrigDstAnswered,
    /// `SO_ORIGINAL_DST` asked on a socket that was not redirected (left as `ENOENT`).
    OrigDstMissed,
    /// A proxy inbound listener registered for `sk_lookup`.
    ListenerRegistered,
    /// A socket added to the `sk_msg` sockhash.
    SocketShortCircuited,
    /// A message moved socket to socket by `sk_msg`.
    MessageRedirected,
    /// A message sent through TCP by a short-circuited socket (peer not found, or tainted).
    MessagePassed,
    /// A map update failed (map full or the kernel refused).
    MapUpdateFailed,
}

impl Counter {
    /// The number of counters.
    pub const COUNT: u32 = 13;

    /// Every counter, by index.
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::OutboundRedirected,
        Counter::SelfInboundRedirected,
        Counter::OutboundLeft,
        Counter::InboundCaptured,
        Counter::InboundNoListener,
        Counter::InboundLeft,
        Counter::OrigDstAnswered,
        Counter::OrigDstMissed,
        Counter::ListenerRegistered,
        Counter::SocketShortCircuited,
        Counter::MessageRedirected,
        Counter::MessagePassed,
        Counter::MapUpdateFailed,
    ];

    /// A metric-friendly name.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::OutboundRedirected => "outbound_redirected",
            Counter::SelfInboundRedirected => "self_inbound_redirected",
            Counter::OutboundLeft => "outbound_left",
            Counter::InboundCaptured => "inbound_captured",
            Counter::InboundNoListener => "inbound_no_listener",
            Counter::InboundLeft => "inbound_left",
            Counter::OrigDstAnswered => "original_dst_answered",
            Counter::OrigDstMissed => "original_dst_missed",
            Counter::ListenerRegistered => "listener_registered",
            Counter::SocketShortCircuited => "socket_short_circuited",
            Counter::MessageRedirected => "message_redirected",
            Counter::MessagePassed => "message_passed",
            Counter::MapUpdateFailed => "map_update_failed",
        }
    }
}

/// The lookups [`outbound`] and [`inbound`] need, done on maps in the kernel and on
/// tables in tests.
pub trait Rules {
    /// The [`port_rule`] flags of `port` (0 when the lists do not name it).
    fn port(&self, port: u16) -> u32;
    /// Whether `dst` is in the excluded outbound CIDRs.
    fn outbound_excluded(&self, dst: &Addr) -> bool;
    /// Whether `dst` is in the included outbound CIDRs.
    fn outbound_included(&self, dst: &Addr) -> bool;
    /// Whether `addr` is one of the pod's own addresses.
    fn is_own(&self, addr: &Addr) -> bool;
    /// Whether inbound traffic from interface `ifindex` is never captured.
    fn iface_excluded(&self, ifindex: u32) -> bool;
}

/// What happens to a connect of a meshed pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Not redirected.
    Leave,
    /// Rewritten to the proxy's outbound listener on loopback.
    ToOutbound,
    /// The proxy calling its own pod address: rewritten to its inbound listener on loopback,
    /// so that the call passes through inbound as traffic from another pod would.
    ToInbound,
}

/// The decision for a TCP connect by `uid`/`gid` in `pod` to `dst`:`port`, in the order of the
/// iptables mode's `WEFT_OUTPUT` chain: excluded ports; the proxy's UID (its calls to its own
/// pod address go through inbound, everything else it sends is left alone); the app talking
/// to itself (loopback, its own addresses); the proxy's GID; excluded ranges; included ports;
/// included ranges. The init step's probe ([`PROBE_V4`]) comes first.
#[inline(always)]
pub fn outbound(
    pod: &PodConfig,
    uid: u32,
    gid: u32,
    dst: &Addr,
    port: u16,
    rules: &impl Rules,
) -> Outbound {
    if dst.is_probe() && port == pod.outbound_port && uid != pod.proxy_uid && gid != pod.proxy_gid {
        return Outbound::ToOutbound;
    }
    let rule = rules.port(port);
    if rule & port_rule::EXCLUDE_OUT != 0 || dst.is_unspecified() {
        return Outbound::Leave;
    }
    let own = !dst.is_loopback() && rules.is_own(dst);
    if uid == pod.proxy_uid {
        return if own {
            Outbound::ToInbound
        } else {
            Outbound::Leave
        };
    }
    if dst.is_loopback() || own || gid == pod.proxy_gid || rules.outbound_excluded(dst) {
        return Outbound::Leave;
    }
    if rule & port_rule::INCLUDE_OUT != 0
        || pod.flags & pod_flags::OUTBOUND_ALL != 0
        || rules.outbound_included(dst)
    {
        Outbound::ToOutbound
    } else {
        Outbound::Leave
    }
}

/// Whether an incoming TCP connection from `remote` to `local`:`port` of `pod`, arriving on
/// interface `ifindex`, goes to the proxy's inbound listener. Connections from the pod itself
/// (loopback, or from one of its own addresses) are the connect hooks' business, and the
/// proxy's own listeners are never captured (a direct connection to them is not redirected and
/// the proxy refuses it).
#[inline(always)]
pub fn inbound(
    pod: &PodConfig,
    remote: &Addr,
    local: &Addr,
    port: u16,
    ifindex: u32,
    rules: &impl Rules,
) -> bool {
    if local.is_loopback()
        || remote.is_loopback()
        || ifindex == LOOPBACK_IFINDEX
        || rules.is_own(remote)
        || rules.iface_excluded(ifindex)
    {
        return false;
    }
    inbound_port_captured(pod, rules.port(port), port)
}

/// Whether a socket that the proxy (`uid`/`gid`) holds in `pod` was captured inbound by
/// `sk_lookup`, from what the socket shows: the pod's own address, a port that inbound capture
/// takes (not the proxy's listeners, not excluded), a peer outside the pod. Such a socket can
/// only have reached the proxy through its inbound listener, by `sk_lookup`, which keeps the
/// address the client dialled: its `SO_ORIGINAL_DST` is its own local address. Nothing is
/// stored per connection (`sk_lookup` cannot tell a SYN from a stray segment, so entries it
/// wrote could outlive their connection).
#[inline(always)]
pub fn captured_inbound(
    pod: &PodConfig,
    uid_gid: (u32, u32),
    local: &Addr,
    local_port: u16,
    remote: &Addr,
    rules: &impl Rules,
) -> bool {
    (uid_gid.0 == pod.proxy_uid || uid_gid.1 == pod.proxy_gid)
        && !local.is_loopback()
        && !remote.is_loopback()
        && rules.is_own(local)
        && !rules.is_own(remote)
        && inbound_port_captured(pod, rules.port(local_port), local_port)
}

/// Whether the socket `receiver` (in `pod`) is the proxy's end of an app↔proxy connection:
/// its accepted outbound (or self-inbound) socket on loopback, or its inbound passthrough
/// socket (`127.0.0.6`). Only bytes towards the proxy are short-circuited: the proxy reads
/// with `recvmsg`, while an app may read with `splice(2)` (Go's `io.Copy` between TCP
/// connections does), which does not see bytes put in a socket's queue by `sk_msg`.
#[inline(always)]
pub fn receiver_is_proxy(pod: &PodConfig, receiver: &SockKey) -> bool {
    receiver.local.is_passthrough()
        || (receiver.local.is_loopback()
            && (receiver.local_port == pod.outbound_port as u32
                || receiver.local_port == pod.inbound_port as u32))
}

/// Whether `sk_msg` may move a message straight into `receiver` (the other end of an
/// app↔proxy connection in `pod`), per the pod's [`pod_flags`].
#[inline(always)]
pub fn short_circuit(pod: &PodConfig, receiver: &SockKey) -> bool {
    let flag = if receiver_is_proxy(pod, receiver) {
        pod_flags::SHORT_CIRCUIT_TO_PROXY
    } else {
        pod_flags::SHORT_CIRCUIT_TO_APP
    };
    pod.flags & flag != 0
}

#[inline(always)]
fn inbound_port_captured(pod: &PodConfig, rule: u32, port: u16) -> bool {
    if port == pod.inbound_port || port == pod.outbound_port || rule & port_rule::EXCLUDE_IN != 0 {
        return false;
    }
    pod.flags & pod_flags::INBOUND_ALL != 0 || rule & port_rule::INCLUDE_IN != 0
}

#[cfg(feature = "user")]
mod user {
    use super::{
        Addr, CidrKey, IfaceKey, ListenerKey, OrigDst, PodConfig, PodIp, PortKey, SockKey,
    };

    // SAFETY: each is `#[repr(C)]`, `Copy`, made only of integers with explicit padding
    // fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for Addr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PodConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CidrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IfaceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PodIp {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ListenerKey {}
}

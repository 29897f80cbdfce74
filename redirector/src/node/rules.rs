//! The pure core of the agent: a pod's redirection ([`InitArgs`]) as the map entries the eBPF
//! programs read ([`PodEntries`]). The programs' decisions on those entries
//! ([`weft_ebpf_maps::outbound`], [`weft_ebpf_maps::inbound`]) are tested here against the
//! iptables mode's rules, evaluated as iptables would.
//!
//! What eBPF mode does differently, by necessity or choice:
//! - `excludeInterfaces` applies to inbound traffic only: a connect hook runs before routing
//!   and does not know the outgoing interface.
//! - Loopback destinations are never redirected, even when a loopback range is listed in
//!   `includeOutboundIPRanges` (iptables mode redirects `127.0.0.2`… then).
//! - The proxy calling `127.0.0.x` other than `127.0.0.1` is left alone (iptables sends it to
//!   inbound like a call to its pod address).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use weft_api::redirect::{CidrSet, InitArgs, PortSet};
use weft_ebpf_maps::{Addr, CidrKey, PodConfig, Rules, pod_flags, port_rule};

/// One pod's entries in the maps, without its network-namespace cookie (added when written).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodEntries {
    /// The `PODS` value.
    pub config: PodConfig,
    /// `PORT_RULES`: port to [`port_rule`] flags.
    pub ports: BTreeMap<u16, u32>,
    /// `OUT_EXCL_CIDRS`.
    pub excluded_cidrs: BTreeSet<IpNet>,
    /// `OUT_INCL_CIDRS` (empty when every destination is included).
    pub included_cidrs: BTreeSet<IpNet>,
    /// `POD_IPS`: the pod's own addresses.
    pub ips: BTreeSet<IpAddr>,
    /// `IFACE_EXCL`: interface indexes in the pod's namespace.
    pub excluded_ifindexes: BTreeSet<u32>,
    /// Excluded interfaces that the pod's namespace does not have (reported, not fatal).
    pub unknown_interfaces: Vec<String>,
}

/// The entries for a pod with `args`, addresses `ips`, and `ifindex` resolving its interface
/// names.
pub fn entries(
    args: &InitArgs,
    ips: impl IntoIterator<Item = IpAddr>,
    ifindex: impl Fn(&str) -> Option<u32>,
) -> PodEntries {
    let mut flags = 0;
    let mut included_cidrs = BTreeSet::new();
    match &args.include_outbound_cidrs {
        CidrSet::All => flags |= pod_flags::OUTBOUND_ALL,
        CidrSet::None => {}
        CidrSet::Some(nets) => included_cidrs.extend(nets.iter().map(IpNet::trunc)),
    }
    let mut ports: BTreeMap<u16, u32> = BTreeMap::new();
    let mut add = |list: &[u16], flag: u32| {
        for &p in list {
            *ports.entry(p).or_default() |= flag;
        }
    };
    match &args.include_inbound_ports {
        PortSet::All => flags |= pod_flags::INBOUND_ALL,
        PortSet::None => {}
        PortSet::Some(list) => add(list, port_rule::INCLUDE_IN),
    }
    add(&args.exclude_inbound_ports, port_rule::EXCLUDE_IN);
    add(&args.include_outbound_ports, port_rule::INCLUDE_OUT);
    add(&args.exclude_outbound_ports, port_rule::EXCLUDE_OUT);
    let mut excluded_ifindexes = BTreeSet::new();
    let mut unknown_interfaces = Vec::new();
    for name in &args.exclude_interfaces {
        match ifindex(name) {
            Some(i) => {
                excluded_ifindexes.insert(i);
            }
            None => unknown_interfaces.push(name.clone()),
        }
    }
    PodEntries {
        config: PodConfig {
            flags,
            proxy_uid: args.proxy_uid,
            proxy_gid: args.proxy_gid,
            outbound_port: args.outbound_port,
            inbound_port: args.inbound_port,
        },
        ports,
        excluded_cidrs: args
            .exclude_outbound_cidrs
            .iter()
            .map(IpNet::trunc)
            .collect(),
        included_cidrs,
        ips: ips.into_iter().map(canonical).collect(),
        excluded_ifindexes,
        unknown_interfaces,
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An address in the maps' layout.
pub fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => Addr::from_octets(v6.octets()),
    }
}

/// The address of a map entry.
pub fn ip(addr: &Addr) -> IpAddr {
    if addr.is_v4() {
        IpAddr::from(addr.v4().to_ne_bytes())
    } else {
        IpAddr::from(addr.octets())
    }
}

/// The LPM-trie key of `net` in pod `netns`: its prefix length and data.
pub fn cidr_key(netns: u64, net: &IpNet) -> (u32, CidrKey) {
    let v4 = matches!(net, IpNet::V4(_));
    (
        CidrKey::prefix_len(v4, net.prefix_len()),
        CidrKey::new(netns, &addr(net.network())),
    )
}

/// The entries of one pod as [`Rules`], for evaluating the programs' decisions in tests and
/// tools.
#[derive(Debug)]
pub struct TableRules<'a>(pub &'a PodEntries);

impl Rules for TableRules<'_> {
    fn port(&self, port: u16) -> u32 {
        self.0.ports.get(&port).copied().unwrap_or(0)
    }

    fn outbound_excluded(&self, dst: &Addr) -> bool {
        let dst = ip(dst);
        self.0.excluded_cidrs.iter().any(|n| n.contains(&dst))
    }

    fn outbound_included(&self, dst: &Addr) -> bool {
        let dst = ip(dst);
        self.0.included_cidrs.iter().any(|n| n.contains(&dst))
    }

    fn is_own(&self, addr: &Addr) -> bool {
        self.0.ips.contains(&ip(addr))
    }

    fn iface_excluded(&self, ifindex: u32) -> bool {
        self.0.excluded_ifindexes.contains(&ifindex)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use weft_api::redirect::InterceptionMode;
    use weft_ebpf_maps::{LOOPBACK_IFINDEX, Outbound, inbound, outbound};

    use super::*;
    use crate::iptables::{self, Chain, Family, Match, Rule, Target};

    const POD4: Ipv4Addr = Ipv4Addr::new(10, 44, 0, 3);
    const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x44, 0, 0, 0, 0, 0, 3);
    const ETH0: u32 = 2;
    const ETH1: u32 = 3;

    fn pod(args: &InitArgs) -> PodEntries {
        entries(
            args,
            [IpAddr::V4(POD4), IpAddr::V6(POD6)],
            |name| match name {
                "eth0" => Some(ETH0),
                "eth1" => Some(ETH1),
                _ => None,
            },
        )
    }

    fn ebpf_out(args: &InitArgs, uid: u32, gid: u32, dst: IpAddr, port: u16) -> Outbound {
        let e = pod(args);
        outbound(&e.config, uid, gid, &addr(dst), port, &TableRules(&e))
    }

    fn ebpf_in(args: &InitArgs, local: IpAddr, port: u16, ifindex: u32) -> bool {
        let remote: IpAddr = if local.is_ipv4() {
            "10.44.0.9"
        } else {
            "fd00:44::9"
        }
        .parse()
        .expect("ip");
        ebpf_in_from(args, remote, local, port, ifindex)
    }

    fn ebpf_in_from(
        args: &InitArgs,
        remote: IpAddr,
        local: IpAddr,
        port: u16,
        ifindex: u32,
    ) -> bool {
        let e = pod(args);
        inbound(
            &e.config,
            &addr(remote),
            &addr(local),
            port,
            ifindex,
            &TableRules(&e),
        )
    }

    /// What iptables does with a packet: evaluates Weft's rules from a built-in chain.
    struct Packet {
        uid: u32,
        gid: u32,
        src: IpAddr,
        dst: IpAddr,
        port: u16,
        in_iface: &'static str,
        out_iface: &'static str,
    }

    fn matches(m: &Match, p: &Packet) -> bool {
        match m {
            Match::Tcp => true,
            Match::InInterface(i) => i == p.in_iface,
            Match::OutInterface(i) => i == p.out_iface,
            Match::Source(n) => n.contains(&p.src),
            Match::Destination(n) => n.contains(&p.dst),
            Match::DestinationPort(port) => *port == p.port,
            Match::UidOwner(u) => *u == p.uid,
            Match::GidOwner(g) => *g == p.gid,
            Match::Not(m) => !matches(m, p),
        }
    }

    fn run_chain(rules: &[Rule], chain: Chain, p: &Packet) -> Option<u16> {
        for rule in rules.iter().filter(|r| r.chain == chain) {
            if rule.matches.iter().all(|m| matches(m, p)) {
                match rule.target {
                    Target::Return => return None,
                    Target::Redirect(port) => return Some(port),
                    Target::Jump(c) => {
                        if let Some(port) = run_chain(rules, c, p) {
                            return Some(port);
                        }
                        // A RETURN from Weft's chains means "not redirected" (they are
                        // the last rule of the built-in chain in each netns).
                        return None;
                    }
                }
            }
        }
        None
    }

    fn family(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    fn iptables_out(args: &InitArgs, uid: u32, gid: u32, dst: IpAddr, port: u16) -> Outbound {
        let own = dst == IpAddr::V4(POD4) || dst == IpAddr::V6(POD6);
        let out_iface = if dst.is_loopback() || own {
            "lo"
        } else {
            "eth0"
        };
        let src = match dst {
            IpAddr::V4(_) if out_iface == "lo" && !own => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(_) => IpAddr::V4(POD4),
            IpAddr::V6(_) if out_iface == "lo" && !own => IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(POD6),
        };
        let p = Packet {
            uid,
            gid,
            src,
            dst,
            port,
            in_iface: "",
            out_iface,
        };
        match run_chain(&iptables::rules(args, family(dst)), Chain::Output, &p) {
            None => Outbound::Leave,
            Some(to) if to == args.outbound_port => Outbound::ToOutbound,
            Some(_) => Outbound::ToInbound,
        }
    }

    fn iptables_in(args: &InitArgs, local: IpAddr, port: u16, in_iface: &'static str) -> bool {
        let p = Packet {
            uid: 0,
            gid: 0,
            src: IpAddr::V4(Ipv4Addr::new(10, 44, 0, 9)),
            dst: local,
            port,
            in_iface,
            out_iface: "",
        };
        run_chain(&iptables::rules(args, family(local)), Chain::Prerouting, &p).is_some()
    }

    fn cases() -> Vec<InitArgs> {
        let base = InitArgs {
            mode: InterceptionMode::Ebpf,
            ..InitArgs::default()
        };
        vec![
            base.clone(),
            InitArgs {
                exclude_outbound_ports: vec![5432, 15020],
                exclude_outbound_cidrs: vec![
                    "10.96.0.0/24".parse().expect("cidr"),
                    "fd00:96::/120".parse().expect("cidr"),
                ],
                include_outbound_ports: vec![3306, 5432],
                ..base.clone()
            },
            InitArgs {
                include_outbound_cidrs: CidrSet::Some(vec![
                    "10.96.0.0/16".parse().expect("cidr"),
                    "fd00:96::/64".parse().expect("cidr"),
                ]),
                exclude_outbound_cidrs: vec!["10.96.7.0/24".parse().expect("cidr")],
                include_inbound_ports: PortSet::Some(vec![8080, 15020]),
                ..base.clone()
            },
            InitArgs {
                include_outbound_cidrs: CidrSet::None,
                include_outbound_ports: vec![3306],
                include_inbound_ports: PortSet::None,
                exclude_inbound_ports: Vec::new(),
                ..base.clone()
            },
            InitArgs {
                proxy_uid: 2000,
                proxy_gid: 3000,
                outbound_port: 16001,
                inbound_port: 16006,
                exclude_interfaces: vec!["eth1".into()],
                ..base
            },
        ]
    }

    const OWNERS: [(u32, u32); 5] = [
        (1000, 1000),
        (1337, 1000),
        (1000, 1337),
        (2000, 0),
        (0, 3000),
    ];
    const PORTS: [u16; 9] = [80, 3306, 5432, 8080, 15001, 15006, 15020, 16006, 443];

    fn destinations() -> Vec<IpAddr> {
        [
            "10.96.0.10",
            "10.96.7.1",
            "10.44.0.9",
            "192.0.2.1",
            "127.0.0.1",
            "10.44.0.3",
            "fd00:96::10",
            "fd00:44::9",
            "fd00:44::3",
            "::1",
        ]
        .iter()
        .map(|s| s.parse().expect("ip"))
        .collect()
    }

    #[test]
    fn outbound_decisions_match_the_iptables_rules() {
        let mut checked = 0;
        for args in cases() {
            for (uid, gid) in OWNERS {
                for dst in destinations() {
                    for port in PORTS {
                        let got = ebpf_out(&args, uid, gid, dst, port);
                        if dst == IpAddr::V4(Ipv4Addr::from(weft_ebpf_maps::PROBE_V4))
                            && port == args.outbound_port
                            && uid != args.proxy_uid
                            && gid != args.proxy_gid
                        {
                            // The init step's probe: always redirected (see `ebpf::verify`).
                            assert_eq!(got, Outbound::ToOutbound);
                            checked += 1;
                            continue;
                        }
                        let want = iptables_out(&args, uid, gid, dst, port);
                        assert_eq!(
                            got, want,
                            "uid {uid} gid {gid} -> {dst} port {port} with {args:?}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 5 * 5 * 10 * 9);
    }

    #[test]
    fn inbound_decisions_match_the_iptables_rules() {
        for args in cases() {
            for local in [IpAddr::V4(POD4), IpAddr::V6(POD6)] {
                for port in PORTS {
                    for (iface, index) in [("eth0", ETH0), ("eth1", ETH1)] {
                        let want = iptables_in(&args, local, port, iface)
                            // Connections straight to the proxy's own listeners are not
                            // captured in eBPF mode: the proxy refuses them either way (not
                            // redirected there, its own port as destination in iptables).
                            && port != args.inbound_port
                            && port != args.outbound_port;
                        let got = ebpf_in(&args, local, port, index);
                        assert_eq!(got, want, "{local} port {port} on {iface} with {args:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_pod_talking_to_itself_is_the_connect_hooks_business() {
        let args = cases().remove(0);
        assert!(ebpf_in(&args, IpAddr::V4(POD4), 8080, ETH0));
        assert!(!ebpf_in(&args, IpAddr::V4(POD4), 8080, LOOPBACK_IFINDEX));
        assert!(!ebpf_in(&args, IpAddr::V4(Ipv4Addr::LOCALHOST), 8080, ETH0));
        // Locally generated packets to the pod's address may show the address's interface.
        assert!(!ebpf_in_from(
            &args,
            IpAddr::V4(POD4),
            IpAddr::V4(POD4),
            8080,
            ETH0
        ));
        assert!(!ebpf_in_from(
            &args,
            IpAddr::V6(POD6),
            IpAddr::V6(POD6),
            8080,
            ETH0
        ));
        // The proxy calling its own pod address goes through inbound; the app does not.
        assert_eq!(
            ebpf_out(&args, 1337, 1337, IpAddr::V4(POD4), 8080),
            Outbound::ToInbound
        );
        assert_eq!(
            ebpf_out(&args, 1000, 1000, IpAddr::V4(POD4), 8080),
            Outbound::Leave
        );
        assert_eq!(
            ebpf_out(&args, 1000, 1000, "0.0.0.0".parse().expect("ip"), 8080),
            Outbound::Leave
        );
    }

    #[test]
    fn documented_differences() {
        let base = cases().remove(0);
        let lo2: IpAddr = "127.0.0.2".parse().expect("ip");
        // Loopback ranges listed explicitly: iptables redirects, eBPF leaves loopback alone.
        let lo_included = InitArgs {
            include_outbound_cidrs: CidrSet::Some(vec!["127.0.0.0/8".parse().expect("cidr")]),
            ..base.clone()
        };
        assert_eq!(
            iptables_out(&lo_included, 1000, 1000, lo2, 80),
            Outbound::ToOutbound
        );
        assert_eq!(ebpf_out(&lo_included, 1000, 1000, lo2, 80), Outbound::Leave);
        // The proxy calling 127.0.0.2.
        assert_eq!(
            iptables_out(&base, 1337, 1337, lo2, 80),
            Outbound::ToInbound
        );
        assert_eq!(ebpf_out(&base, 1337, 1337, lo2, 80), Outbound::Leave);
        // An excluded interface, outbound: unknown at connect time.
        let eth1 = InitArgs {
            exclude_interfaces: vec!["eth1".into()],
            ..base
        };
        assert_eq!(pod(&eth1).excluded_ifindexes, BTreeSet::from([ETH1]));
    }

    #[test]
    fn entries_of_the_defaults_and_of_lists() {
        let e = pod(&cases().remove(0));
        assert_eq!(
            e.config.flags,
            pod_flags::OUTBOUND_ALL | pod_flags::INBOUND_ALL
        );
        assert_eq!(
            (
                e.config.proxy_uid,
                e.config.outbound_port,
                e.config.inbound_port
            ),
            (1337, 15001, 15006)
        );
        assert_eq!(
            e.ports,
            BTreeMap::from([
                (15020, port_rule::EXCLUDE_IN),
                (15021, port_rule::EXCLUDE_IN),
                (15090, port_rule::EXCLUDE_IN)
            ])
        );
        assert!(e.included_cidrs.is_empty() && e.excluded_cidrs.is_empty());
        let e = pod(&InitArgs {
            exclude_interfaces: vec!["eth1".into(), "nope0".into()],
            ..cases().remove(1)
        });
        assert_eq!(
            e.ports[&5432],
            port_rule::EXCLUDE_OUT | port_rule::INCLUDE_OUT
        );
        assert_eq!(e.unknown_interfaces, ["nope0"]);
        let mapped: IpAddr = "::ffff:10.44.0.7".parse().expect("ip");
        assert_eq!(canonical(mapped), IpAddr::V4(Ipv4Addr::new(10, 44, 0, 7)));
    }

    #[test]
    fn addresses_and_prefixes_in_the_maps_layout() {
        let v4: IpAddr = "10.44.0.3".parse().expect("ip");
        let a = addr(v4);
        assert!(a.is_v4() && !a.is_loopback());
        assert_eq!(a.octets()[10..], [0xff, 0xff, 10, 44, 0, 3]);
        assert_eq!(ip(&a), v4);
        let v6: IpAddr = "fd00:44::3".parse().expect("ip");
        assert_eq!(ip(&addr(v6)), v6);
        assert!(addr("127.9.0.1".parse().expect("ip")).is_loopback());
        assert!(addr("::1".parse().expect("ip")).is_loopback());
        assert!(addr("127.0.0.6".parse().expect("ip")).is_passthrough());
        assert!(addr("::6".parse().expect("ip")).is_passthrough());
        assert_eq!(ip(&addr(v4).loopback_of()), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(ip(&addr(v6).loopback_of()), IpAddr::V6(Ipv6Addr::LOCALHOST));
        let (len, key) = cidr_key(7, &"10.96.0.0/12".parse().expect("cidr"));
        assert_eq!(len, 64 + 96 + 12);
        assert_eq!(key.netns, 7u64.to_ne_bytes());
        let (len, _) = cidr_key(7, &"fd00::/8".parse().expect("cidr"));
        assert_eq!(len, 64 + 8);
    }

    #[test]
    fn only_bytes_towards_the_proxy_are_short_circuited_unless_asked() {
        use weft_ebpf_maps::{SockKey, receiver_is_proxy, short_circuit};
        let mut e = pod(&cases().remove(0));
        let lo = addr(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let key = |local, local_port, remote, remote_port| {
            SockKey::new(9, local, local_port, remote, remote_port)
        };
        // App → its proxy's outbound listener: the proxy's socket receives.
        let app = key(lo, 40000, lo, 15001);
        assert!(receiver_is_proxy(&e.config, &app.peer()));
        assert!(
            !receiver_is_proxy(&e.config, &app),
            "the app's socket receives through TCP"
        );
        // Inbound passthrough: the proxy (127.0.0.6) → the app on 8080.
        let passthrough = key(addr("127.0.0.6".parse().expect("ip")), 41000, lo, 8080);
        assert!(receiver_is_proxy(&e.config, &passthrough));
        assert!(!receiver_is_proxy(&e.config, &passthrough.peer()));
        // Not loopback: never.
        let remote = key(
            addr(IpAddr::V4(POD4)),
            15001,
            addr("10.44.0.9".parse().expect("ip")),
            5000,
        );
        assert!(!receiver_is_proxy(&e.config, &remote));
        // The agent's --short-circuit flags decide per direction.
        let keys = [app.peer(), app, passthrough, passthrough.peer()];
        let allowed = |e: &PodEntries| keys.map(|k| short_circuit(&e.config, &k));
        assert_eq!(
            allowed(&e),
            [false; 4],
            "entries() alone set no short-circuit flag"
        );
        e.config.flags |= crate::cli::ShortCircuit::ToProxy.flags();
        assert_eq!(allowed(&e), [true, false, true, false]);
        e.config.flags |= crate::cli::ShortCircuit::Both.flags();
        assert_eq!(allowed(&e), [true; 4]);
    }

    #[test]
    fn inbound_captures_answer_their_own_address_to_the_proxy_only() {
        use weft_ebpf_maps::captured_inbound;
        let e = pod(&cases().remove(0));
        let rules = TableRules(&e);
        let (own, peer) = (
            addr(IpAddr::V4(POD4)),
            addr("10.44.0.9".parse().expect("ip")),
        );
        let lo = addr(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let ask = |ids, local, port, remote| {
            captured_inbound(&e.config, ids, local, port, remote, &rules)
        };
        assert!(ask((1337, 1337), &own, 8080, &peer));
        assert!(ask((1000, 1337), &own, 8080, &peer), "the proxy's GID");
        assert!(
            !ask((1000, 1000), &own, 8080, &peer),
            "an app's socket was not redirected"
        );
        assert!(
            !ask((1337, 1337), &own, 15006, &peer),
            "a direct connection to the listener"
        );
        assert!(!ask((1337, 1337), &own, 15020, &peer), "an excluded port");
        assert!(!ask((1337, 1337), &own, 8080, &own), "from the pod itself");
        assert!(!ask((1337, 1337), &lo, 8080, &lo), "loopback");
        assert!(
            !ask((1337, 1337), &peer, 8080, &own),
            "not the pod's address"
        );
    }

    #[test]
    fn ports_in_each_context_layout() {
        use weft_ebpf_maps::port;
        // bpf_sock_addr.user_port: the big-endian port in the first two bytes of the word.
        let raw = u32::from_ne_bytes([0x1f, 0x90, 0, 0]);
        assert_eq!(port::from_sock_addr(raw), 8080);
        assert_eq!(port::to_sock_addr(8080), raw);
        // sock_ops remote_port: the big-endian port in the upper half of the word.
        assert_eq!(
            port::from_sock_ops_remote(u32::from_ne_bytes([0, 0, 0x1f, 0x90])),
            8080
        );
        assert_eq!(port::from_be16(u16::from_ne_bytes([0x1f, 0x90])), 8080);
    }
}

//! The NAT rules as data: [`rules`] turns [`InitArgs`] into the rule set of one address family,
//! [`render`] turns rules into `iptables-restore --noflush` input.
//!
//! The rule set mirrors Istio's `istio-iptables` in REDIRECT mode, with Weft's chain names:
//!
//! - `PREROUTING -p tcp -j WEFT_INBOUND` when any inbound port is captured; `WEFT_INBOUND`
//!   returns excluded interfaces and ports and sends the rest to `WEFT_IN_REDIRECT`
//!   (REDIRECT to the inbound port, 15006).
//! - `OUTPUT -p tcp -j WEFT_OUTPUT`; `WEFT_OUTPUT` returns excluded interfaces and ports, the
//!   inbound passthrough source (`127.0.0.6` / `::6`), the proxy's own traffic (UID and GID),
//!   app-to-app traffic on loopback and excluded ranges, and sends the rest to `WEFT_REDIRECT`
//!   (REDIRECT to the outbound port, 15001). The proxy's own connections over loopback to
//!   an address other than `127.0.0.1` / `::1` (its pod IP) go to `WEFT_IN_REDIRECT`, so that
//!   app → outbound → own pod IP passes through inbound like traffic from another pod.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use weft_api::redirect::{CidrSet, InitArgs, PortSet};

/// An IP family; each is programmed with its own binaries (`iptables*` or `ip6tables*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4, `iptables-restore`.
    V4,
    /// IPv6, `ip6tables-restore`.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// `ipv4` or `ipv6`, for logs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// Whether `net` belongs to this family.
    pub fn contains(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }

    /// The loopback host the app and the proxy use to reach each other: `127.0.0.1/32`, `::1/128`.
    pub fn loopback(self) -> IpNet {
        match self {
            Family::V4 => IpNet::from(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Family::V6 => IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        }
    }

    /// The source the proxy binds for inbound passthrough to the app: `127.0.0.6/32`, `::6/128`.
    pub fn passthrough_source(self) -> IpNet {
        match self {
            Family::V4 => IpNet::from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))),
            Family::V6 => IpNet::from(IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6))),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A chain of the nat table: the two built-in ones Weft jumps from, and Weft's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chain {
    /// Built-in `PREROUTING`: packets arriving from an interface.
    Prerouting,
    /// Built-in `OUTPUT`: packets sent by local processes.
    Output,
    /// `WEFT_INBOUND`: which inbound connections are captured.
    Inbound,
    /// `WEFT_IN_REDIRECT`: REDIRECT to the inbound port.
    InRedirect,
    /// `WEFT_OUTPUT`: which outbound connections are captured.
    Outbound,
    /// `WEFT_REDIRECT`: REDIRECT to the outbound port.
    Redirect,
}

impl Chain {
    /// Weft's own chains, in the order they are declared.
    pub const OURS: [Chain; 4] = [
        Chain::Inbound,
        Chain::Redirect,
        Chain::InRedirect,
        Chain::Outbound,
    ];

    /// The chain's name in iptables.
    pub fn name(self) -> &'static str {
        match self {
            Chain::Prerouting => "PREROUTING",
            Chain::Output => "OUTPUT",
            Chain::Inbound => "WEFT_INBOUND",
            Chain::InRedirect => "WEFT_IN_REDIRECT",
            Chain::Outbound => "WEFT_OUTPUT",
            Chain::Redirect => "WEFT_REDIRECT",
        }
    }

    /// Weft's chain of that name, if it is one.
    pub fn ours(name: &str) -> Option<Chain> {
        Chain::OURS.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One condition of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `-p tcp`; must come before [`Match::DestinationPort`].
    Tcp,
    /// `-i NAME`.
    InInterface(String),
    /// `-o NAME`.
    OutInterface(String),
    /// `-s NET`.
    Source(IpNet),
    /// `-d NET`.
    Destination(IpNet),
    /// `--dport N` (after [`Match::Tcp`]).
    DestinationPort(u16),
    /// `-m owner --uid-owner N`.
    UidOwner(u32),
    /// `-m owner --gid-owner N`.
    GidOwner(u32),
    /// The inner match negated (`! -d NET`, `-m owner ! --uid-owner N` …).
    Not(Box<Match>),
}

/// `!m` is [`Match::Not`] of `m`.
impl std::ops::Not for Match {
    type Output = Match;
    fn not(self) -> Match {
        Match::Not(Box::new(self))
    }
}

impl Match {
    fn write(&self, out: &mut String, negated: bool) {
        let bang = if negated { "! " } else { "" };
        // Writing to a String cannot fail.
        let _ = match self {
            Match::Tcp => write!(out, " {bang}-p tcp"),
            Match::InInterface(i) => write!(out, " {bang}-i {i}"),
            Match::OutInterface(i) => write!(out, " {bang}-o {i}"),
            Match::Source(n) => write!(out, " {bang}-s {n}"),
            Match::Destination(n) => write!(out, " {bang}-d {n}"),
            Match::DestinationPort(p) => write!(out, " {bang}--dport {p}"),
            Match::UidOwner(u) => write!(out, " -m owner {bang}--uid-owner {u}"),
            Match::GidOwner(g) => write!(out, " -m owner {bang}--gid-owner {g}"),
            Match::Not(m) => {
                m.write(out, !negated);
                Ok(())
            }
        };
    }
}

/// What a rule does with a matching packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `-j CHAIN`.
    Jump(Chain),
    /// `-j RETURN`: leave the chain; in Weft's chains, not redirected.
    Return,
    /// `-j REDIRECT --to-ports N`.
    Redirect(u16),
}

/// One rule appended to a chain of the nat table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The chain the rule is appended to.
    pub chain: Chain,
    /// Conditions, all of which must hold, rendered in this order.
    pub matches: Vec<Match>,
    /// What happens to a matching packet.
    pub target: Target,
}

impl Rule {
    /// A rule in `chain` with `matches` and `target`.
    pub fn new(chain: Chain, matches: impl IntoIterator<Item = Match>, target: Target) -> Rule {
        Rule {
            chain,
            matches: matches.into_iter().collect(),
            target,
        }
    }
}

/// The rule in iptables-restore syntax, e.g. `-A WEFT_OUTPUT -d 127.0.0.1/32 -j RETURN`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = format!("-A {}", self.chain);
        for m in &self.matches {
            m.write(&mut s, false);
        }
        let _ = match self.target {
            Target::Jump(c) => write!(s, " -j {c}"),
            Target::Return => write!(s, " -j RETURN"),
            Target::Redirect(p) => write!(s, " -j REDIRECT --to-ports {p}"),
        };
        f.write_str(&s)
    }
}

/// The Istio-equivalent NAT rules of `family` for `args` (whose mode is not checked: the caller
/// decides whether rules are wanted at all).
pub fn rules(args: &InitArgs, family: Family) -> Vec<Rule> {
    let mut rules = vec![
        Rule::new(
            Chain::Redirect,
            [Match::Tcp],
            Target::Redirect(args.outbound_port),
        ),
        Rule::new(
            Chain::InRedirect,
            [Match::Tcp],
            Target::Redirect(args.inbound_port),
        ),
    ];
    inbound(args, &mut rules);
    outbound(args, family, &mut rules);
    rules
}

fn inbound(args: &InitArgs, rules: &mut Vec<Rule>) {
    let excluded = dedup(&args.exclude_inbound_ports);
    // Exclusions win over an explicit include list too, so that the proxy's own ports (status,
    // readiness, metrics), which the injector passes as exclusions, are never captured.
    let captured: Vec<Rule> = match &args.include_inbound_ports {
        PortSet::None => Vec::new(),
        PortSet::All => excluded
            .iter()
            .map(|&p| {
                Rule::new(
                    Chain::Inbound,
                    [Match::Tcp, Match::DestinationPort(p)],
                    Target::Return,
                )
            })
            .chain([Rule::new(
                Chain::Inbound,
                [Match::Tcp],
                Target::Jump(Chain::InRedirect),
            )])
            .collect(),
        PortSet::Some(ports) => dedup(ports)
            .into_iter()
            .filter(|p| !excluded.contains(p))
            .map(|p| {
                Rule::new(
                    Chain::Inbound,
                    [Match::Tcp, Match::DestinationPort(p)],
                    Target::Jump(Chain::InRedirect),
                )
            })
            .collect(),
    };
    if captured.is_empty() {
        return;
    }
    rules.push(Rule::new(
        Chain::Prerouting,
        [Match::Tcp],
        Target::Jump(Chain::Inbound),
    ));
    // Istio returns excluded interfaces in PREROUTING itself; returning first thing in our own
    // chain has the same effect and leaves the built-in chain holding only our jump.
    for iface in &args.exclude_interfaces {
        rules.push(Rule::new(
            Chain::Inbound,
            [Match::InInterface(iface.clone())],
            Target::Return,
        ));
    }
    rules.extend(captured);
}

fn outbound(args: &InitArgs, family: Family, rules: &mut Vec<Rule>) {
    let out = Chain::Outbound;
    let lo = || Match::OutInterface("lo".to_owned());
    let loopback = family.loopback();

    rules.push(Rule::new(
        Chain::Output,
        [Match::Tcp],
        Target::Jump(Chain::Outbound),
    ));
    for iface in &args.exclude_interfaces {
        rules.push(Rule::new(
            out,
            [Match::OutInterface(iface.clone())],
            Target::Return,
        ));
    }
    // Port exclusions come before the loopback rules: an excluded port is never captured, not
    // even the proxy's connections to its own pod IP.
    for p in dedup(&args.exclude_outbound_ports) {
        rules.push(Rule::new(
            out,
            [Match::Tcp, Match::DestinationPort(p)],
            Target::Return,
        ));
    }
    // The proxy's inbound passthrough to the app binds this source.
    rules.push(Rule::new(
        out,
        [lo(), Match::Source(family.passthrough_source())],
        Target::Return,
    ));
    // Istio keeps app-to-app loopback traffic uncaptured unless a loopback range is included
    // explicitly (in either family).
    let loopback_included = match &args.include_outbound_cidrs {
        CidrSet::Some(nets) => nets.iter().any(|n| n.addr().is_loopback()),
        CidrSet::All | CidrSet::None => false,
    };
    for owner in [
        Match::UidOwner(args.proxy_uid),
        Match::GidOwner(args.proxy_gid),
    ] {
        // The proxy calling its own pod IP (app → outbound → same pod) goes through inbound.
        rules.push(Rule::new(
            out,
            [
                lo(),
                !Match::Destination(loopback),
                Match::Tcp,
                owner.clone(),
            ],
            Target::Jump(Chain::InRedirect),
        ));
        // The app calling itself over loopback (any address) is left alone.
        if !loopback_included {
            rules.push(Rule::new(out, [lo(), !owner.clone()], Target::Return));
        }
        // Everything else the proxy sends is never captured (no loops).
        rules.push(Rule::new(out, [owner], Target::Return));
    }
    rules.push(Rule::new(
        out,
        [Match::Destination(loopback)],
        Target::Return,
    ));
    for net in args
        .exclude_outbound_cidrs
        .iter()
        .filter(|n| family.contains(n))
    {
        rules.push(Rule::new(out, [Match::Destination(*net)], Target::Return));
    }
    for p in dedup(&args.include_outbound_ports) {
        rules.push(Rule::new(
            out,
            [Match::Tcp, Match::DestinationPort(p)],
            Target::Jump(Chain::Redirect),
        ));
    }
    match &args.include_outbound_cidrs {
        CidrSet::All => rules.push(Rule::new(out, [], Target::Jump(Chain::Redirect))),
        CidrSet::Some(nets) => {
            for net in nets.iter().filter(|n| family.contains(n)) {
                rules.push(Rule::new(
                    out,
                    [Match::Destination(*net)],
                    Target::Jump(Chain::Redirect),
                ));
            }
        }
        CidrSet::None => {}
    }
}

fn dedup<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for &i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// `iptables-restore --noflush` input for the nat table that installs `rules`: declares Weft's
/// chains (which flushes them if they exist), runs `before` (e.g. deletions of stale jumps
/// found in the current rule set), then appends `rules`. Applied in one transaction.
pub fn render(rules: &[Rule], before: &[String]) -> String {
    let mut s = String::from("*nat\n");
    for chain in Chain::OURS {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for line in before {
        let _ = writeln!(s, "{line}");
    }
    for rule in rules {
        let _ = writeln!(s, "{rule}");
    }
    s.push_str("COMMIT\n");
    s
}

/// What `init --dry-run` prints: the restore input of each family, as applied on a namespace
/// without Weft's rules.
pub fn dry_run(args: &InitArgs) -> String {
    let mut s = String::new();
    for family in Family::ALL {
        let binary = match family {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        };
        let _ = writeln!(s, "# {family}: {binary} --noflush");
        s.push_str(&render(&rules(args, family), &[]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(args: &InitArgs, family: Family) -> Vec<String> {
        rules(args, family).iter().map(Rule::to_string).collect()
    }

    #[test]
    fn default_rules_mirror_istio() {
        let v4 = text(&InitArgs::default(), Family::V4);
        for expected in [
            "-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A PREROUTING -p tcp -j WEFT_INBOUND",
            "-A WEFT_INBOUND -p tcp --dport 15021 -j RETURN",
            "-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT",
            "-A OUTPUT -p tcp -j WEFT_OUTPUT",
            "-A WEFT_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
            "-A WEFT_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m owner --uid-owner 1337 -j WEFT_IN_REDIRECT",
            "-A WEFT_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
            "-A WEFT_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A WEFT_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A WEFT_OUTPUT -j WEFT_REDIRECT",
        ] {
            assert!(
                v4.iter().any(|r| r == expected),
                "missing {expected}: {v4:#?}"
            );
        }
        let v6 = text(&InitArgs::default(), Family::V6);
        assert!(v6.contains(&"-A WEFT_OUTPUT -o lo -s ::6/128 -j RETURN".to_owned()));
        assert!(v6.contains(&"-A WEFT_OUTPUT -d ::1/128 -j RETURN".to_owned()));
    }

    #[test]
    fn exclusions_come_before_captures() {
        let args = InitArgs {
            include_outbound_cidrs: CidrSet::Some(vec!["10.0.0.0/8".parse().expect("cidr")]),
            exclude_outbound_cidrs: vec!["10.1.0.0/16".parse().expect("cidr")],
            include_outbound_ports: vec![7070],
            ..InitArgs::default()
        };
        let v4 = text(&args, Family::V4);
        let at = |r: &str| v4.iter().position(|x| x == r).expect(r);
        assert!(
            at("-A WEFT_OUTPUT -d 10.1.0.0/16 -j RETURN")
                < at("-A WEFT_OUTPUT -p tcp --dport 7070 -j WEFT_REDIRECT")
        );
        assert!(
            at("-A WEFT_OUTPUT -p tcp --dport 7070 -j WEFT_REDIRECT")
                < at("-A WEFT_OUTPUT -d 10.0.0.0/8 -j WEFT_REDIRECT")
        );
        assert!(!v4.contains(&"-A WEFT_OUTPUT -j WEFT_REDIRECT".to_owned()));
        // No v6 range was included: v6 gets only the include ports.
        let v6 = text(&args, Family::V6);
        assert!(v6.contains(&"-A WEFT_OUTPUT -p tcp --dport 7070 -j WEFT_REDIRECT".to_owned()));
        assert!(!v6.iter().any(|r| r.contains("10.")));
    }

    #[test]
    fn inbound_exclusions_win_over_include_list() {
        let args = InitArgs {
            include_inbound_ports: PortSet::Some(vec![8080, 15021, 8080]),
            ..InitArgs::default()
        };
        let v4 = text(&args, Family::V4);
        let inbound: Vec<_> = v4.iter().filter(|r| r.contains("WEFT_INBOUND ")).collect();
        assert_eq!(
            inbound,
            ["-A WEFT_INBOUND -p tcp --dport 8080 -j WEFT_IN_REDIRECT"]
        );
    }

    #[test]
    fn no_inbound_capture_means_no_prerouting_jump() {
        for ports in [PortSet::None, PortSet::Some(vec![15020])] {
            let args = InitArgs {
                include_inbound_ports: ports,
                ..InitArgs::default()
            };
            let v4 = text(&args, Family::V4);
            assert!(
                !v4.iter()
                    .any(|r| r.contains("PREROUTING") || r.contains("-A WEFT_INBOUND"))
            );
        }
    }

    #[test]
    fn loopback_include_keeps_app_loopback_captured() {
        let args = InitArgs {
            include_outbound_cidrs: CidrSet::Some(vec!["127.0.0.0/8".parse().expect("cidr")]),
            ..InitArgs::default()
        };
        assert!(
            !text(&args, Family::V4)
                .iter()
                .any(|r| r.contains("! --uid-owner"))
        );
        assert!(
            !text(&args, Family::V6)
                .iter()
                .any(|r| r.contains("! --gid-owner"))
        );
    }

    #[test]
    fn render_declares_our_chains() {
        let s = render(
            &rules(&InitArgs::default(), Family::V4),
            &["-D OUTPUT -j X".into()],
        );
        assert!(s.starts_with(
            "*nat\n:WEFT_INBOUND - [0:0]\n:WEFT_REDIRECT - [0:0]\n:WEFT_IN_REDIRECT - [0:0]\n:WEFT_OUTPUT - [0:0]\n-D OUTPUT -j X\n-A "
        ));
        assert!(s.ends_with("\nCOMMIT\n"));
    }
}

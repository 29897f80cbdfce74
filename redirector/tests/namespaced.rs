//! Root tests: the built `weft-redirector` run inside network namespaces of their own, checked
//! against `iptables-save` and against real connections.
//!
//! Each test creates its namespaces (named after the test, with a unique suffix) through a
//! guard that deletes them on drop, so also when the test panics. A "pod" namespace is joined
//! to a "peer" namespace by a veth pair:
//!
//! ```text
//!   pod  vp0 10.0.0.1/24 fd00::1/64  ──  vp1 10.0.0.2/24 fd00::2/64  peer
//!        default via the peer             lo: 10.200.0.9 10.201.0.9 10.202.0.9 fd00:200::9
//! ```
//!
//! Clients that must run as a given UID/GID are a few lines of Python started with `setpriv`
//! inside the pod namespace; listeners and root clients are opened by the test itself from a
//! thread that has entered the namespace (a socket stays in the namespace it was made in).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::io::{ErrorKind, Write as _};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, Socket, Type};
use weft_api::redirect::InitArgs;
use weft_redirector::iptables;

const BIN: &str = env!("CARGO_BIN_EXE_weft-redirector");
const TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Namespaces.

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(test: &str, role: &str) -> Netns {
        let name = format!(
            "weft-{test}-{role}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        // From here on, the guard deletes the namespace whatever happens.
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // No duplicate address detection: addresses are usable at once.
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }

    /// Runs `argv` in the namespace; it must succeed.
    fn exec(&self, argv: &[&str]) -> String {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `weft-redirector` with `args` in the namespace, whatever its outcome.
    fn redirector(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, BIN])
            .args(args)
            .env_remove("WEFT_IPTABLES_RESTORE")
            .env_remove("WEFT_IPTABLES_SAVE")
            .env_remove("WEFT_IP6TABLES_RESTORE")
            .env_remove("WEFT_IP6TABLES_SAVE")
            .output()
            .expect("run weft-redirector")
    }

    /// Runs `weft-redirector` with `args` in the namespace; it must succeed.
    fn redirector_ok(&self, args: &[&str]) -> Output {
        let out = self.redirector(args);
        assert!(
            out.status.success(),
            "weft-redirector {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The nat table of one family, without comments and counters.
    fn nat(&self, family: iptables::Family) -> String {
        let save = match family {
            iptables::Family::V4 => "iptables-save",
            iptables::Family::V6 => "ip6tables-save",
        };
        self.exec(&[save, "-t", "nat"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.rfind(" [") {
                Some(i) if l.starts_with(':') => format!("{} [0:0]", &l[..i]),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The nat tables of both families.
    fn nat_both(&self) -> [String; 2] {
        iptables::Family::ALL.map(|f| self.nat(f))
    }

    /// Runs `f` on a thread that has entered the namespace.
    fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }

    fn listen(&self, addr: &str) -> Listener {
        let addr: SocketAddr = addr.parse().expect("listen address");
        let inner = self.within(|| {
            let socket =
                Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
            if addr.is_ipv6() {
                socket.set_only_v6(true).expect("v6only");
            }
            socket.set_reuse_address(true).expect("reuseaddr");
            socket.bind(&addr.into()).expect("bind");
            socket.listen(64).expect("listen");
            socket.set_nonblocking(true).expect("nonblocking");
            TcpListener::from(socket)
        });
        Listener {
            inner,
            what: format!("{addr} in {}", self.name),
        }
    }

    /// Connects as root from the namespace to `to` and sends `token`.
    fn send(&self, to: &str, token: &str) {
        let to: SocketAddr = to.parse().expect("address");
        let mut stream = self
            .within(|| TcpStream::connect_timeout(&to, TIMEOUT))
            .expect("connect");
        writeln!(stream, "{token}").expect("send token");
    }

    /// Connects from the namespace as `uid`/`gid` to `host`:`port` (optionally from `source`)
    /// and sends `token`.
    fn send_as(
        &self,
        uid: u32,
        gid: u32,
        host: &str,
        port: u16,
        token: &str,
        source: Option<&str>,
    ) {
        const CLIENT: &str = "\
import socket, sys
host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(5)
if len(sys.argv) > 4:
    s.bind((sys.argv[4], 0))
s.connect((host, port))
s.sendall(token.encode() + b'\\n')
s.close()
";
        let (uid, gid, port) = (uid.to_string(), gid.to_string(), port.to_string());
        let mut argv = vec![
            "setpriv",
            "--reuid",
            &uid,
            "--regid",
            &gid,
            "--clear-groups",
            "/usr/bin/python3",
            "-I",
            "-c",
            CLIENT,
            host,
            &port,
            token,
        ];
        argv.extend(source);
        self.exec(&argv);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let status = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "could not delete network namespace {}: {status:?}",
                self.name
            );
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A pod namespace and a peer namespace joined by a veth pair (see the module doc).
struct Pair {
    pod: Netns,
    peer: Netns,
}

impl Pair {
    fn new(test: &str) -> Pair {
        let pair = Pair {
            pod: Netns::new(test, "pod"),
            peer: Netns::new(test, "peer"),
        };
        let (pod, peer) = (&pair.pod, &pair.peer);
        pod.ip(&[
            "link", "add", "vp0", "type", "veth", "peer", "name", "vp1", "netns", &peer.name,
        ]);
        pod.ip(&["addr", "add", "10.0.0.1/24", "dev", "vp0"]);
        pod.ip(&["addr", "add", "fd00::1/64", "dev", "vp0", "nodad"]);
        pod.ip(&["link", "set", "vp0", "up"]);
        pod.ip(&["route", "add", "default", "via", "10.0.0.2"]);
        pod.ip(&["-6", "route", "add", "default", "via", "fd00::2"]);
        peer.ip(&["addr", "add", "10.0.0.2/24", "dev", "vp1"]);
        peer.ip(&["addr", "add", "fd00::2/64", "dev", "vp1", "nodad"]);
        peer.ip(&["link", "set", "vp1", "up"]);
        for addr in [
            "10.200.0.9/32",
            "10.201.0.9/32",
            "10.202.0.9/32",
            "fd00:200::9/128",
        ] {
            peer.ip(&["addr", "add", addr, "dev", "lo"]);
        }
        pair
    }
}

// ---------------------------------------------------------------------------------------------
// Listeners.

struct Listener {
    inner: TcpListener,
    what: String,
}

/// A connection a listener accepted.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
}

impl Accepted {
    /// The destination the client asked for, before any NAT (`SO_ORIGINAL_DST`).
    fn original_dst(&self) -> SocketAddr {
        match self.stream.local_addr().expect("local addr") {
            SocketAddr::V4(_) => {
                let sa = getsockopt(&self.stream, sockopt::OriginalDst).expect("SO_ORIGINAL_DST");
                SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                    u16::from_be(sa.sin_port),
                ))
            }
            SocketAddr::V6(_) => {
                let sa = getsockopt(&self.stream, sockopt::Ip6tOriginalDst)
                    .expect("IP6T_SO_ORIGINAL_DST");
                SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sa.sin6_addr.s6_addr),
                    u16::from_be(sa.sin6_port),
                    0,
                    0,
                ))
            }
        }
    }
}

impl Listener {
    /// Waits for the connection that sends `token`; any other connection fails the test.
    fn expect(&self, token: &str) -> Accepted {
        let deadline = Instant::now() + TIMEOUT;
        let (stream, peer) = loop {
            match self.inner.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{}: no connection with {token:?}: {e}", self.what),
            }
        };
        stream.set_nonblocking(false).expect("blocking");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .expect("read token");
        assert_eq!(
            line.trim_end(),
            token,
            "{}: unexpected connection",
            self.what
        );
        Accepted { stream, peer }
    }

    /// Fails if a connection is waiting.
    fn assert_idle(&self) {
        match self.inner.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!("{}: unexpected connection from {peer}", self.what),
            Err(e) => panic!("{}: {e}", self.what),
        }
    }
}

fn sock(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip address")
}

// ---------------------------------------------------------------------------------------------
// Rule sets.

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn init_installs_rules_and_is_idempotent() {
    let ns = Netns::new("init_idempotent", "pod");
    ns.redirector_ok(&["init"]);
    let first = ns.nat_both();
    for (family, nat) in iptables::Family::ALL.iter().zip(&first) {
        for chain in [
            "WEFT_INBOUND",
            "WEFT_IN_REDIRECT",
            "WEFT_OUTPUT",
            "WEFT_REDIRECT",
        ] {
            assert!(
                nat.contains(&format!(":{chain} - [0:0]")),
                "{family}: {nat}"
            );
        }
        assert_eq!(
            nat.matches("-A PREROUTING -p tcp -j WEFT_INBOUND").count(),
            1,
            "{nat}"
        );
        assert_eq!(
            nat.matches("-A OUTPUT -p tcp -j WEFT_OUTPUT").count(),
            1,
            "{nat}"
        );
        assert!(nat.contains("-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(nat.contains("-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        assert!(
            nat.contains("-m owner --uid-owner 1337 -j WEFT_IN_REDIRECT"),
            "{nat}"
        );
        // As many rules as the model says, in our chains and the two jumps.
        let expected = iptables::rules(&InitArgs::default(), *family).len();
        assert_eq!(
            nat.lines().filter(|l| l.starts_with("-A ")).count(),
            expected,
            "{nat}"
        );
    }
    assert!(first[0].contains("-A WEFT_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN"));
    assert!(first[1].contains("-A WEFT_OUTPUT -s ::6/128 -o lo -j RETURN"));

    ns.redirector_ok(&["init"]);
    assert_eq!(ns.nat_both(), first, "a second init changed the rules");
    let lo = ns.exec(&["ip", "-6", "addr", "show", "dev", "lo"]);
    assert_eq!(lo.matches("inet6 ::6/128").count(), 1, "{lo}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn init_with_other_flags_replaces_the_rules() {
    let flags = [
        "--include-inbound-ports=",
        "--include-outbound-cidrs=10.0.0.0/8,fd00::/8",
        "--exclude-outbound-ports=22",
        "--exclude-interfaces=eth1",
    ];
    let fresh = Netns::new("init_replace", "fresh");
    let ns = Netns::new("init_replace", "pod");
    ns.redirector_ok(&["init"]);
    ns.redirector_ok(&["init", "--exclude-outbound-cidrs=192.0.2.0/24"]);
    let mut init = vec!["init"];
    init.extend(flags);
    ns.redirector_ok(&init);
    fresh.redirector_ok(&init);
    let replaced = ns.nat_both();
    assert_eq!(replaced, fresh.nat_both());
    assert!(
        !replaced[0].contains("PREROUTING -p tcp -j WEFT_INBOUND"),
        "{}",
        replaced[0]
    );
    assert!(!replaced[0].contains("192.0.2.0"), "{}", replaced[0]);
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn cleanup_removes_exactly_ours() {
    let ns = Netns::new("cleanup_exact", "pod");
    for bin in ["iptables", "ip6tables"] {
        ns.exec(&[bin, "-t", "nat", "-N", "FOREIGN"]);
        ns.exec(&[
            bin, "-t", "nat", "-A", "FOREIGN", "-p", "tcp", "--dport", "1", "-j", "RETURN",
        ]);
        ns.exec(&[
            bin, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "FOREIGN",
        ]);
        ns.exec(&[
            bin,
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "-j",
            "RETURN",
        ]);
        ns.exec(&[
            bin, "-t", "filter", "-A", "OUTPUT", "-p", "tcp", "--dport", "2", "-j", "ACCEPT",
        ]);
    }
    let before = ns.nat_both();
    let filter_before = ns.exec(&["iptables-save", "-t", "filter"]);

    ns.redirector_ok(&["init"]);
    let installed = ns.nat_both();
    for nat in &installed {
        assert!(nat.contains("-A OUTPUT -p tcp -j FOREIGN"), "{nat}");
        assert!(nat.contains("-A OUTPUT -p tcp -j WEFT_OUTPUT"), "{nat}");
    }
    ns.redirector_ok(&["cleanup"]);
    let after = ns.nat_both();
    assert_eq!(after, before, "cleanup left or removed something");
    for nat in &after {
        assert!(!nat.contains("WEFT_"), "{nat}");
    }
    ns.redirector_ok(&["cleanup"]);
    assert_eq!(ns.nat_both(), before, "a second cleanup changed something");
    let strip = |s: String| {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        strip(ns.exec(&["iptables-save", "-t", "filter"])),
        strip(filter_before)
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn cleanup_on_a_clean_namespace_succeeds() {
    let ns = Netns::new("cleanup_clean", "pod");
    let before = ns.nat_both();
    ns.redirector_ok(&["cleanup"]);
    assert_eq!(ns.nat_both(), before);
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn dry_run_changes_nothing() {
    let ns = Netns::new("dry_run", "pod");
    let before = ns.nat_both();
    let out = ns.redirector_ok(&["init", "--dry-run", "--exclude-outbound-ports=22"]);
    let args = InitArgs {
        exclude_outbound_ports: vec![22],
        ..InitArgs::default()
    };
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        iptables::dry_run(&args)
    );
    assert_eq!(ns.nat_both(), before);

    // Nor does it touch rules that are installed.
    ns.redirector_ok(&["init"]);
    let installed = ns.nat_both();
    ns.redirector_ok(&["init", "--dry-run", "--include-inbound-ports="]);
    assert_eq!(ns.nat_both(), installed);
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn mode_none_installs_nothing() {
    let ns = Netns::new("mode_none", "pod");
    let before = ns.nat_both();
    ns.redirector_ok(&["init", "--mode=none"]);
    assert_eq!(ns.nat_both(), before);
    let out = ns.redirector(&["init", "--mode=ebpf"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(ns.nat_both(), before);
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn ipv6_disabled_is_skipped_unless_v6_ranges_are_asked_for() {
    let ns = Netns::new("ipv6_disabled", "pod");
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    let before = ns.nat_both();

    let out = ns.redirector(&["init", "--include-outbound-cidrs=10.0.0.0/8,fd00::/8"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("fd00::/8") && err.contains("ipv6 is disabled"),
        "{err}"
    );
    assert_eq!(ns.nat_both(), before, "a failed init changed something");

    let out = ns.redirector_ok(&["init"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ipv6 rules skipped"));
    let [v4, v6] = ns.nat_both();
    assert!(v4.contains("-A OUTPUT -p tcp -j WEFT_OUTPUT"), "{v4}");
    assert_eq!(v6, before[1]);
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn missing_ip6tables_is_skipped_unless_v6_ranges_are_asked_for() {
    let ns = Netns::new("ip6tables_missing", "pod");
    let before = ns.nat_both();
    let missing = "--ip6tables-restore=/nonexistent/ip6tables-restore";

    let out = ns.redirector(&["init", missing, "--include-outbound-cidrs=fd00::/8"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/nonexistent/ip6tables-restore not found"),
        "{err}"
    );
    assert_eq!(ns.nat_both(), before);

    ns.redirector_ok(&["init", missing]);
    let [v4, v6] = ns.nat_both();
    assert!(v4.contains("-A OUTPUT -p tcp -j WEFT_OUTPUT"), "{v4}");
    assert_eq!(v6, before[1]);
    ns.redirector_ok(&["cleanup", missing]);
    assert_eq!(ns.nat(iptables::Family::V4), before[0]);
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn missing_iptables_fails_and_changes_nothing() {
    let ns = Netns::new("iptables_missing", "pod");
    let before = ns.nat_both();
    let out = ns.redirector(&["init", "--iptables-restore=/nonexistent/iptables-restore"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/nonexistent/iptables-restore not found"),
        "{err}"
    );
    assert!(err.contains("apt-get install iptables"), "{err}");
    assert_eq!(ns.nat_both(), before);
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn legacy_backend_chosen_by_environment() {
    let ns = Netns::new("legacy_backend", "pod");
    let legacy = |args: &[&str]| {
        run(Command::new("ip")
            .args(["netns", "exec", &ns.name, BIN])
            .args(args)
            .env("WEFT_IPTABLES_RESTORE", "iptables-legacy-restore")
            .env("WEFT_IPTABLES_SAVE", "iptables-legacy-save")
            .env("WEFT_IP6TABLES_RESTORE", "ip6tables-legacy-restore")
            .env("WEFT_IP6TABLES_SAVE", "ip6tables-legacy-save"))
    };
    let saved = |bin: &str| {
        ns.exec(&[bin, "-t", "nat"])
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with(':'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = [
        saved("iptables-legacy-save"),
        saved("ip6tables-legacy-save"),
    ];
    legacy(&["init"]);
    let installed = [
        saved("iptables-legacy-save"),
        saved("ip6tables-legacy-save"),
    ];
    for (nat, family) in installed.iter().zip(iptables::Family::ALL) {
        let expected = iptables::rules(&InitArgs::default(), family).len();
        assert_eq!(
            nat.lines().filter(|l| l.starts_with("-A ")).count(),
            expected,
            "{nat}"
        );
    }
    // The nf_tables side is untouched.
    assert!(!ns.nat(iptables::Family::V4).contains("WEFT_"));
    legacy(&["init"]);
    assert_eq!(
        [
            saved("iptables-legacy-save"),
            saved("ip6tables-legacy-save")
        ],
        installed
    );
    legacy(&["cleanup"]);
    assert_eq!(
        [
            saved("iptables-legacy-save"),
            saved("ip6tables-legacy-save")
        ],
        before
    );
}

// ---------------------------------------------------------------------------------------------
// Traffic.

const APP: u32 = 1000;
const PROXY: u32 = 1337;

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn outbound_is_redirected_except_the_proxy_and_exclusions() {
    let net = Pair::new("outbound_v4");
    net.pod.redirector_ok(&[
        "init",
        "--exclude-outbound-ports=9090",
        "--exclude-outbound-cidrs=10.201.0.0/16",
    ]);
    let outbound = net.pod.listen("0.0.0.0:15001");
    let inbound = net.pod.listen("0.0.0.0:15006");
    let remote = net.peer.listen("0.0.0.0:8080");
    let remote_excluded_port = net.peer.listen("0.0.0.0:9090");

    // The app's connection goes to the outbound listener, which can tell where it was going.
    net.pod.send_as(APP, APP, "10.200.0.9", 8080, "app", None);
    let c = outbound.expect("app");
    assert_eq!(c.original_dst(), sock("10.200.0.9:8080"));
    assert_eq!(c.peer.ip(), ip("10.0.0.1"));
    remote.assert_idle();

    // The proxy's own connections, by UID or by GID, are not redirected.
    net.pod
        .send_as(PROXY, PROXY, "10.200.0.9", 8080, "proxy", None);
    assert_eq!(
        remote.expect("proxy").stream.local_addr().expect("addr"),
        sock("10.200.0.9:8080")
    );
    net.pod
        .send_as(APP, PROXY, "10.200.0.9", 8080, "proxy-gid", None);
    remote.expect("proxy-gid");

    // Excluded port and excluded range.
    net.pod
        .send_as(APP, APP, "10.200.0.9", 9090, "excluded-port", None);
    remote_excluded_port.expect("excluded-port");
    net.pod
        .send_as(APP, APP, "10.201.0.9", 8080, "excluded-cidr", None);
    assert_eq!(
        remote
            .expect("excluded-cidr")
            .stream
            .local_addr()
            .expect("addr"),
        sock("10.201.0.9:8080")
    );

    outbound.assert_idle();
    inbound.assert_idle();
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn loopback_follows_istio() {
    let net = Pair::new("loopback");
    net.pod.redirector_ok(&["init"]);
    let outbound = net.pod.listen("0.0.0.0:15001");
    let inbound = net.pod.listen("0.0.0.0:15006");
    let app = net.pod.listen("0.0.0.0:8080");

    // The proxy calling its own pod IP (app → outbound → same pod) goes through inbound.
    net.pod
        .send_as(PROXY, PROXY, "10.0.0.1", 8080, "proxy-to-pod-ip", None);
    assert_eq!(
        inbound.expect("proxy-to-pod-ip").original_dst(),
        sock("10.0.0.1:8080")
    );
    // Its inbound passthrough from 127.0.0.6 reaches the app.
    net.pod.send_as(
        PROXY,
        PROXY,
        "10.0.0.1",
        8080,
        "passthrough",
        Some("127.0.0.6"),
    );
    let c = app.expect("passthrough");
    assert_eq!(c.peer.ip(), ip("127.0.0.6"));
    // The proxy calling the app on localhost reaches the app.
    net.pod
        .send_as(PROXY, PROXY, "127.0.0.1", 8080, "proxy-localhost", None);
    app.expect("proxy-localhost");
    // The app calling itself, on its pod IP or on localhost, is left alone.
    net.pod
        .send_as(APP, APP, "10.0.0.1", 8080, "app-to-pod-ip", None);
    app.expect("app-to-pod-ip");
    net.pod
        .send_as(APP, APP, "127.0.0.1", 8080, "app-localhost", None);
    app.expect("app-localhost");

    // Likewise with IPv6, where init adds the passthrough source ::6 to lo.
    let outbound6 = net.pod.listen("[::]:15001");
    let inbound6 = net.pod.listen("[::]:15006");
    let app6 = net.pod.listen("[::]:8080");
    assert!(
        net.pod
            .exec(&["ip", "-6", "addr", "show", "dev", "lo"])
            .contains("inet6 ::6/128")
    );
    net.pod
        .send_as(PROXY, PROXY, "fd00::1", 8080, "proxy-to-pod-ip-v6", None);
    assert_eq!(
        inbound6.expect("proxy-to-pod-ip-v6").original_dst(),
        sock("[fd00::1]:8080")
    );
    net.pod
        .send_as(PROXY, PROXY, "fd00::1", 8080, "passthrough-v6", Some("::6"));
    assert_eq!(app6.expect("passthrough-v6").peer.ip(), ip("::6"));
    net.pod
        .send_as(APP, APP, "fd00::1", 8080, "app-to-pod-ip-v6", None);
    app6.expect("app-to-pod-ip-v6");
    net.pod
        .send_as(APP, APP, "::1", 8080, "app-localhost-v6", None);
    app6.expect("app-localhost-v6");

    for idle in [&outbound, &inbound, &outbound6, &inbound6] {
        idle.assert_idle();
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn inbound_is_redirected_except_excluded_ports() {
    let net = Pair::new("inbound_v4");
    net.pod
        .redirector_ok(&["init", "--exclude-inbound-ports=15020,15021,15090,2222"]);
    let inbound = net.pod.listen("0.0.0.0:15006");
    let inbound6 = net.pod.listen("[::]:15006");
    let app = net.pod.listen("0.0.0.0:8080");
    let readiness = net.pod.listen("0.0.0.0:15021");
    let ssh = net.pod.listen("0.0.0.0:2222");

    net.peer.send("10.0.0.1:8080", "to-app");
    let c = inbound.expect("to-app");
    assert_eq!(c.original_dst(), sock("10.0.0.1:8080"));
    assert_eq!(c.peer.ip(), ip("10.0.0.2"));

    net.peer.send("[fd00::1]:8080", "to-app-v6");
    assert_eq!(
        inbound6.expect("to-app-v6").original_dst(),
        sock("[fd00::1]:8080")
    );

    net.peer.send("10.0.0.1:15021", "readiness");
    readiness.expect("readiness");
    net.peer.send("10.0.0.1:2222", "ssh");
    ssh.expect("ssh");

    app.assert_idle();
    inbound.assert_idle();
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn ipv6_outbound_is_redirected_except_the_proxy() {
    let net = Pair::new("outbound_v6");
    net.pod
        .redirector_ok(&["init", "--exclude-outbound-cidrs=10.0.0.0/8"]);
    let outbound = net.pod.listen("[::]:15001");
    let remote = net.peer.listen("[::]:8080");

    net.pod
        .send_as(APP, APP, "fd00:200::9", 8080, "app-v6", None);
    assert_eq!(
        outbound.expect("app-v6").original_dst(),
        sock("[fd00:200::9]:8080")
    );
    remote.assert_idle();

    net.pod
        .send_as(PROXY, PROXY, "fd00:200::9", 8080, "proxy-v6", None);
    remote.expect("proxy-v6");
    outbound.assert_idle();
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn include_lists_limit_capture() {
    let net = Pair::new("include_lists");
    net.pod.redirector_ok(&[
        "init",
        "--include-outbound-cidrs=10.200.0.0/16",
        "--include-outbound-ports=7070",
        "--include-inbound-ports=8080",
    ]);
    let outbound = net.pod.listen("0.0.0.0:15001");
    let inbound = net.pod.listen("0.0.0.0:15006");
    let app_other = net.pod.listen("0.0.0.0:9090");
    let remote = net.peer.listen("0.0.0.0:8080");

    net.pod
        .send_as(APP, APP, "10.200.0.9", 8080, "included-cidr", None);
    assert_eq!(
        outbound.expect("included-cidr").original_dst(),
        sock("10.200.0.9:8080")
    );
    net.pod
        .send_as(APP, APP, "10.202.0.9", 7070, "included-port", None);
    assert_eq!(
        outbound.expect("included-port").original_dst(),
        sock("10.202.0.9:7070")
    );
    net.pod
        .send_as(APP, APP, "10.202.0.9", 8080, "not-included", None);
    remote.expect("not-included");

    net.peer.send("10.0.0.1:8080", "inbound-included");
    assert_eq!(
        inbound.expect("inbound-included").original_dst(),
        sock("10.0.0.1:8080")
    );
    net.peer.send("10.0.0.1:9090", "inbound-not-included");
    app_other.expect("inbound-not-included");

    outbound.assert_idle();
    inbound.assert_idle();
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn excluded_interfaces_are_not_captured() {
    let net = Pair::new("exclude_iface");
    net.pod.redirector_ok(&["init", "--exclude-interfaces=vp0"]);
    let outbound = net.pod.listen("0.0.0.0:15001");
    let inbound = net.pod.listen("0.0.0.0:15006");
    let app = net.pod.listen("0.0.0.0:8080");
    let remote = net.peer.listen("0.0.0.0:8080");

    net.pod
        .send_as(APP, APP, "10.200.0.9", 8080, "out-vp0", None);
    remote.expect("out-vp0");
    net.peer.send("10.0.0.1:8080", "in-vp0");
    app.expect("in-vp0");

    outbound.assert_idle();
    inbound.assert_idle();
}

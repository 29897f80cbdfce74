//! Root tests of eBPF mode: the real node agent (`weft-redirector node`) with the real eBPF
//! object, in network namespaces and cgroups each test makes and removes (also on panic).
//!
//! ```text
//!   node netns: bridge br0 ──┬── pod netns eth0 10.199.0.N/24 fd00:199::N/64  cgroup <root>/node-a/pod-N
//!                            └── pod netns …                                    cgroup <root>/node-b/pod-M
//! ```
//!
//! A "node" is a cgroup subtree with its own agent (its own pins, pods directory and metrics
//! port); two nodes share the bridge, as the local node's two simulated nodes do. Processes in
//! pods are `tests/ebpf_helper.py` run with `/usr/bin/python3` in the pod's cgroup and network
//! namespace as a given UID: `serve` stands in for the proxy (UID 1337, listening on 15001 and
//! 15006, answering each connection with the port it landed on and `SO_ORIGINAL_DST`) or for
//! an app, and the clients print what they were answered.
//!
//! The tests need the eBPF object: `WEFT_BPF_OBJECT`, or `weft-ebpf.o` beside the binaries
//! (`cargo xtask test` builds it).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, SockHash};
use weft_ebpf_maps::{OrigDst, SockKey, names};
use weft_redirector::node::pods::PodFile;

const BIN: &str = env!("CARGO_BIN_EXE_weft-redirector");
const HELPER: &str = include_str!("ebpf_helper.py");
const PYTHON: &str = "/usr/bin/python3";
const PROXY: u32 = 1337;
const APP: u32 = 1000;
const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn object() -> PathBuf {
    let path = std::env::var_os("WEFT_BPF_OBJECT").map_or_else(
        || {
            Path::new(BIN)
                .parent()
                .expect("binary dir")
                .join("weft-ebpf.o")
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "eBPF object {} not found: run `cargo xtask test` (builds the eBPF object) or set WEFT_BPF_OBJECT",
        path.display()
    );
    path
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// One node: a cgroup subtree, a pods directory, an agent.
struct Node {
    cgroup: PathBuf,
    pods_dir: PathBuf,
    bpffs: PathBuf,
    listen: SocketAddr,
    agent: Option<Child>,
    log: PathBuf,
    extra: Vec<String>,
}

/// A pod: a network namespace on the bridge and a cgroup.
#[derive(Clone)]
struct Pod {
    netns: String,
    cgroup: PathBuf,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
}

/// Everything one test made; dropping it removes all of it.
struct World {
    id: String,
    bridge: String,
    cg_root: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    children: Mutex<Vec<Child>>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

impl World {
    fn new(test: &str) -> World {
        object();
        let id = format!(
            "{test}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let bridge = format!("wt-{id}-br");
        ip(&["netns", "add", &bridge]);
        let world = World {
            cg_root: PathBuf::from(format!("/sys/fs/cgroup/unified/wt-{id}")),
            id,
            bridge: bridge.clone(),
            dir: tempfile::tempdir().expect("tempdir"),
            nodes: Vec::new(),
            pods: Vec::new(),
            children: Mutex::new(Vec::new()),
        };
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge, "link", "set", "br0", "up"]);
        std::fs::create_dir_all(&world.cg_root).expect("cgroup root");
        std::fs::write(world.dir.path().join("helper.py"), HELPER).expect("helper");
        world
    }

    fn helper(&self) -> PathBuf {
        self.dir.path().join("helper.py")
    }

    /// Adds a node and starts its agent.
    fn node(&mut self, name: &str) -> usize {
        self.node_with(name, &[])
    }

    /// Adds a node whose agent gets `extra` flags.
    fn node_with(&mut self, name: &str, extra: &[&str]) -> usize {
        let cgroup = self.cg_root.join(format!("node-{name}"));
        std::fs::create_dir_all(&cgroup).expect("node cgroup");
        let pods_dir = self.dir.path().join(format!("pods-{name}"));
        std::fs::create_dir_all(&pods_dir).expect("pods dir");
        self.nodes.push(Node {
            cgroup,
            pods_dir,
            bpffs: PathBuf::from(format!("/sys/fs/bpf/weft/wt-{}-{name}", self.id)),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
            agent: None,
            log: self.dir.path().join(format!("agent-{name}.log")),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        });
        let n = self.nodes.len() - 1;
        self.start_agent(n);
        n
    }

    fn start_agent(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("agent log");
        let child = Command::new(BIN)
            .arg("node")
            .arg("--bpf-object")
            .arg(object())
            .arg("--bpffs")
            .arg(&node.bpffs)
            .arg("--cgroup-root")
            .arg(&node.cgroup)
            .arg("--pods-dir")
            .arg(&node.pods_dir)
            .arg("--listen")
            .arg(node.listen.to_string())
            .args(&node.extra)
            .env("RUST_LOG", "weft_redirector=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start agent");
        node.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((200, _)) = http_get(node.listen, "/healthz") {
                return;
            }
            if let Some(status) = node
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("agent exited with {status}: {}", self.agent_log(n));
            }
            assert!(
                Instant::now() < deadline,
                "agent not healthy: {}",
                self.agent_log(n)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_agent(&mut self, n: usize) {
        if let Some(mut child) = self.nodes[n].agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn agent_log(&self, n: usize) -> String {
        std::fs::read_to_string(&self.nodes[n].log).unwrap_or_default()
    }

    /// Adds a pod on `node`; a meshed one gets its pod file and runs the init step, which must
    /// succeed (the agent has taken it).
    fn pod(
        &mut self,
        node: usize,
        name: &str,
        meshed: bool,
        tweak: impl FnOnce(&mut PodFile),
    ) -> Pod {
        let k = self.pods.len() + 2;
        let netns = format!("wt-{}-{name}", self.id);
        ip(&["netns", "add", &netns]);
        let cgroup = self.nodes[node].cgroup.join(format!("pod-{k}"));
        let pod = Pod {
            netns: netns.clone(),
            cgroup: cgroup.clone(),
            ip4: Ipv4Addr::new(10, 199, 0, k as u8),
            ip6: format!("fd00:199::{k:x}").parse().expect("ip6"),
        };
        self.pods.push(pod.clone());
        std::fs::create_dir_all(&cgroup).expect("pod cgroup");
        run(Command::new("ip").args([
            "netns",
            "exec",
            &netns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]));
        let peer = format!("v{k}");
        ip(&[
            "-n",
            &netns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.bridge,
        ]);
        ip(&[
            "-n",
            &self.bridge,
            "link",
            "set",
            &peer,
            "master",
            "br0",
            "up",
        ]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/24", pod.ip4),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/64", pod.ip6),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        // Service VIPs are routed out of the pod and nowhere further: only redirection
        // reaches them.
        ip(&["-n", &netns, "route", "add", "default", "dev", "eth0"]);
        ip(&["-n", &netns, "-6", "route", "add", "default", "dev", "eth0"]);
        if meshed {
            let mut file = PodFile {
                namespace: "default".into(),
                name: name.into(),
                cgroup: cgroup.clone(),
                netns: PathBuf::from(format!("/var/run/netns/{netns}")),
                ips: vec![pod.ip4.into(), pod.ip6.into()],
                meshed: true,
                exclude_inbound_ports: vec![15020, 15021, 15090],
                exclude_outbound_ports: Vec::new(),
                exclude_outbound_cidrs: Vec::new(),
                include_outbound_cidrs: "*".into(),
                include_inbound_ports: "*".into(),
                include_outbound_ports: Vec::new(),
                exclude_interfaces: Vec::new(),
                proxy_uid: PROXY,
                proxy_gid: PROXY,
                outbound_port: 15001,
                inbound_port: 15006,
            };
            tweak(&mut file);
            self.write_pod_file(node, &file);
            let out = self.init(&pod, 20);
            assert!(
                out.status.success(),
                "init step failed: {}\nagent: {}",
                String::from_utf8_lossy(&out.stderr),
                self.agent_log(node)
            );
        }
        pod
    }

    fn write_pod_file(&self, node: usize, file: &PodFile) {
        let dir = &self.nodes[node].pods_dir;
        let tmp = dir.join(format!("{}.tmp", file.file_name()));
        std::fs::write(&tmp, serde_json::to_vec(file).expect("json")).expect("write pod file");
        std::fs::rename(&tmp, dir.join(file.file_name())).expect("rename pod file");
    }

    /// Runs `weft-redirector init --mode=ebpf` in the pod, as root.
    fn init(&self, pod: &Pod, timeout_secs: u64) -> Output {
        self.in_pod(
            pod,
            0,
            BIN,
            &[
                "init",
                "--mode=ebpf",
                &format!("--ebpf-timeout={timeout_secs}"),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("init")
    }

    /// A command that runs `program` in the pod's cgroup and network namespace as `uid`
    /// (and the same GID).
    fn in_pod(&self, pod: &Pod, uid: u32, program: &str, args: &[&str]) -> Command {
        self.in_pod_as(pod, uid, uid, program, args)
    }

    fn in_pod_as(&self, pod: &Pod, uid: u32, gid: u32, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && ns="$2" && uid="$3" && gid="$4" && shift 4 && exec nsenter --net="/var/run/netns/$ns" -- setpriv --reuid "$uid" --regid "$gid" --clear-groups "$@""#)
            .arg("sh")
            .arg(&pod.cgroup)
            .arg(&pod.netns)
            .arg(uid.to_string())
            .arg(gid.to_string())
            .arg(program)
            .args(args);
        cmd
    }

    /// Runs the helper in the pod and returns its output; it must succeed.
    fn helper_run(&self, pod: &Pod, uid: u32, args: &[&str]) -> String {
        let helper = self.helper();
        let mut argv = vec!["-I", helper.to_str().expect("utf-8")];
        argv.extend_from_slice(args);
        let out = run(&mut self.in_pod(pod, uid, PYTHON, &argv));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the helper in the pod in the background; returns its stdout once it printed
    /// `wait_for` (if given).
    fn helper_spawn(
        &self,
        pod: &Pod,
        uid: u32,
        args: &[&str],
        wait_for: Option<&str>,
    ) -> BufReader<ChildStdout> {
        let helper = self.helper();
        let mut argv = vec!["-I", helper.to_str().expect("utf-8")];
        argv.extend_from_slice(args);
        let mut child = self
            .in_pod(pod, uid, PYTHON, &argv)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn helper");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child);
        if let Some(want) = wait_for {
            let mut line = String::new();
            loop {
                line.clear();
                assert!(
                    out.read_line(&mut line).expect("read") > 0,
                    "helper {args:?} exited before {want:?}"
                );
                if line.trim() == want {
                    break;
                }
            }
        }
        out
    }

    /// The proxy stand-in: UID 1337 serving 15001 and 15006.
    fn proxy(&self, pod: &Pod) {
        self.helper_spawn(pod, PROXY, &["serve", "15001", "15006"], Some("ready"));
    }

    fn ask(&self, pod: &Pod, uid: u32, host: &str, port: u16) -> String {
        self.ask_as(pod, uid, uid, host, port)
    }

    fn ask_as(&self, pod: &Pod, uid: u32, gid: u32, host: &str, port: u16) -> String {
        let helper = self.helper();
        let port = port.to_string();
        let argv = ["-I", helper.to_str().expect("utf-8"), "ask", host, &port];
        let out = run(&mut self.in_pod_as(pod, uid, gid, PYTHON, &argv));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn metrics(&self, node: usize) -> String {
        http_get(self.nodes[node].listen, "/metrics")
            .expect("metrics")
            .1
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for mut c in self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Every process left in the test's cgroups (init steps, helpers' children).
        let _ = std::fs::write(self.cg_root.join("cgroup.kill"), "1");
        for n in 0..self.nodes.len() {
            self.kill_agent(n);
            let _ = Command::new(BIN)
                .args(["node", "--uninstall", "--bpffs"])
                .arg(&self.nodes[n].bpffs)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for pod in &self.pods {
            let _ = Command::new("ip")
                .args(["netns", "del", &pod.netns])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.bridge])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        for dir in self
            .pods
            .iter()
            .map(|p| p.cgroup.clone())
            .chain(self.nodes.iter().map(|n| n.cgroup.clone()))
            .chain([self.cg_root.clone()])
        {
            while std::fs::remove_dir(&dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == name {
            return words.next().unwrap_or("");
        }
    }
    panic!("no {name} in {line:?}")
}

fn counter(metrics: &str, event: &str) -> u64 {
    let key = format!("weft_redirector_ebpf_events_total{{event=\"{event}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {event} in metrics:\n{metrics}"))
}

/// Entries of the maps that follow connections, counted by iterating the pinned maps.
fn connection_map_sizes(bpffs: &Path) -> BTreeMap<&'static str, usize> {
    let open = |name: &str| MapData::from_pin(bpffs.join("maps").join(name)).expect("pinned map");
    let lru = |name: &'static str| -> usize {
        let map = Map::LruHashMap(open(name));
        match name {
            names::CONNECTS => BpfHashMap::<_, u64, OrigDst>::try_from(&map)
                .expect("map")
                .keys()
                .count(),
            names::ORIG_DST => BpfHashMap::<_, SockKey, OrigDst>::try_from(&map)
                .expect("map")
                .keys()
                .count(),
            _ => BpfHashMap::<_, SockKey, u32>::try_from(&map)
                .expect("map")
                .keys()
                .count(),
        }
    };
    let socks = Map::SockHash(open(names::SOCKS));
    BTreeMap::from([
        (names::CONNECTS, lru(names::CONNECTS)),
        (names::ORIG_DST, lru(names::ORIG_DST)),
        (names::TAINTED, lru(names::TAINTED)),
        (
            names::SOCKS,
            SockHash::<_, SockKey>::try_from(&socks)
                .expect("map")
                .keys()
                .count(),
        ),
    ])
}

// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn outbound_connects_land_on_the_proxy_with_their_original_destination() {
    let mut w = World::new("out");
    let a = w.node("a");
    let pod = w.pod(a, "app", true, |_| {});
    w.proxy(&pod);
    let line = w.ask(&pod, APP, VIP4, 80);
    assert_eq!(field(&line, "PORT"), "15001", "{line}");
    assert_eq!(field(&line, "ORIG"), "10.96.0.10:80", "{line}");
    let line = w.ask(&pod, APP, VIP6, 443);
    assert_eq!(field(&line, "PORT"), "15001", "{line}");
    assert_eq!(field(&line, "ORIG"), "[fd00:96::10]:443", "{line}");
    // Another pod's address too (not only service VIPs).
    let line = w.ask(&pod, APP, "10.199.0.77", 8080);
    assert_eq!(field(&line, "ORIG"), "10.199.0.77:8080", "{line}");
    let m = w.metrics(a);
    assert!(counter(&m, "outbound_redirected") >= 3, "{m}");
    assert!(counter(&m, "original_dst_answered") >= 3, "{m}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn the_proxy_and_unmeshed_pods_are_never_redirected() {
    let mut w = World::new("never");
    let a = w.node("a");
    let meshed = w.pod(a, "meshed", true, |_| {});
    let plain = w.pod(a, "plain", false, |_| {});
    let server = w.pod(a, "server", false, |_| {});
    w.proxy(&meshed);
    w.helper_spawn(&server, APP, &["serve", "9000"], Some("ready"));
    w.helper_spawn(&plain, APP, &["serve", "15001", "15006"], Some("ready"));
    let target = server.ip4.to_string();
    // The proxy's own connections (its UID, or its GID) go where they were sent.
    for (uid, gid) in [(PROXY, PROXY), (PROXY, APP), (APP, PROXY)] {
        for host in [target.clone(), server.ip6.to_string()] {
            let line = w.ask_as(&meshed, uid, gid, &host, 9000);
            assert_eq!(field(&line, "PORT"), "9000", "uid {uid} gid {gid}: {line}");
            assert_eq!(field(&line, "ORIG"), "-", "uid {uid} gid {gid}: {line}");
        }
    }
    // The same connect by the app is redirected.
    let line = w.ask(&meshed, APP, &target, 9000);
    assert_eq!(
        field(&line, "PORT"),
        "15001",
        "the app is redirected: {line}"
    );
    // A pod without the sidecar, in the agent's cgroup subtree, is left alone.
    let line = w.ask(&plain, APP, &target, 9000);
    assert_eq!(field(&line, "PORT"), "9000", "{line}");
    let line = w.ask(&plain, APP, &server.ip6.to_string(), 9000);
    assert_eq!(field(&line, "PORT"), "9000", "{line}");
    // Loopback inside a meshed pod is not redirected either.
    w.helper_spawn(&meshed, APP, &["serve", "7000"], Some("ready"));
    let line = w.ask(&meshed, APP, "127.0.0.1", 7000);
    assert_eq!(field(&line, "PORT"), "7000", "{line}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn inbound_is_captured_on_the_same_node_and_across_nodes() {
    let mut w = World::new("in");
    let a = w.node("a");
    let b = w.node("b");
    let target = w.pod(a, "target", true, |_| {});
    let same_node = w.pod(a, "client-a", false, |_| {});
    let other_node = w.pod(b, "client-b", true, |_| {});
    w.proxy(&target);
    w.helper_spawn(&target, APP, &["serve", "8080", "15020"], Some("ready"));
    for (client, uid, what) in [
        (&same_node, APP, "same node, unmeshed client"),
        // A meshed pod's proxy on the other node: its connects are not redirected by its own
        // agent, and the target's agent captures them on arrival.
        (&other_node, PROXY, "other node, proxy of a meshed pod"),
    ] {
        let line = w.ask(client, uid, &target.ip4.to_string(), 8080);
        assert_eq!(field(&line, "PORT"), "15006", "{what}: {line}");
        assert_eq!(
            field(&line, "ORIG"),
            format!("{}:8080", target.ip4),
            "{what}: {line}"
        );
        assert!(
            field(&line, "PEER").starts_with(&format!("{}:", client.ip4)),
            "{what}: {line}"
        );
        let line = w.ask(client, uid, &target.ip6.to_string(), 8080);
        assert_eq!(field(&line, "PORT"), "15006", "{what}: {line}");
        assert_eq!(
            field(&line, "ORIG"),
            format!("[{}]:8080", target.ip6),
            "{what}: {line}"
        );
        // The proxy's status port is excluded: straight to its listener.
        let line = w.ask(client, uid, &target.ip4.to_string(), 15020);
        assert_eq!(field(&line, "PORT"), "15020", "{what}: {line}");
        assert_eq!(field(&line, "ORIG"), "-", "{what}: {line}");
    }
    // The proxy calling its own pod address goes through inbound, as in iptables mode.
    let line = w.ask(&target, PROXY, &target.ip4.to_string(), 8080);
    assert_eq!(field(&line, "PORT"), "15006", "{line}");
    assert_eq!(
        field(&line, "ORIG"),
        format!("{}:8080", target.ip4),
        "{line}"
    );
    // The app calling its own pod address reaches itself.
    let line = w.ask(&target, APP, &target.ip4.to_string(), 8080);
    assert_eq!(field(&line, "PORT"), "8080", "{line}");
    let m = w.metrics(a);
    assert!(counter(&m, "inbound_captured") >= 4, "{m}");
    assert!(counter(&m, "listener_registered") >= 2, "{m}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn excluded_ports_and_ranges_are_not_captured() {
    let mut w = World::new("excl");
    let a = w.node("a");
    let server = w.pod(a, "server", false, |_| {});
    let pod = w.pod(a, "app", true, |f| {
        f.exclude_outbound_ports = vec![5432];
        f.exclude_outbound_cidrs = vec!["10.199.0.0/24".parse().expect("cidr")];
        f.include_outbound_ports = vec![6379];
        f.exclude_inbound_ports = vec![15020, 15021, 15090, 9090];
    });
    let client = w.pod(a, "client", false, |_| {});
    w.proxy(&pod);
    w.helper_spawn(
        &server,
        APP,
        &["serve", "5432", "6379", "8000"],
        Some("ready"),
    );
    w.helper_spawn(&pod, APP, &["serve", "9090", "8080"], Some("ready"));
    let s = server.ip4.to_string();
    // Excluded port: whatever the destination.
    assert_eq!(field(&w.ask(&pod, APP, &s, 5432), "PORT"), "5432");
    // Excluded range.
    assert_eq!(field(&w.ask(&pod, APP, &s, 8000), "PORT"), "8000");
    // An excluded range wins over an included port, as in iptables mode.
    assert_eq!(field(&w.ask(&pod, APP, &s, 6379), "PORT"), "6379");
    // Elsewhere, the included port and everything else are redirected.
    assert_eq!(field(&w.ask(&pod, APP, VIP4, 6379), "PORT"), "15001");
    // Inbound: the excluded port reaches the app; the others the proxy.
    let line = w.ask(&client, APP, &pod.ip4.to_string(), 9090);
    assert_eq!(
        (field(&line, "PORT"), field(&line, "ORIG")),
        ("9090", "-"),
        "{line}"
    );
    assert_eq!(
        field(&w.ask(&client, APP, &pod.ip4.to_string(), 8080), "PORT"),
        "15006"
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn maps_return_to_their_starting_size_after_10000_connections() {
    let mut w = World::new("maps");
    let a = w.node("a");
    let pod = w.pod(a, "app", true, |_| {});
    let client = w.pod(a, "client", false, |_| {});
    w.proxy(&pod);
    let bpffs = w.nodes[a].bpffs.clone();
    let before = connection_map_sizes(&bpffs);
    let m0 = w.metrics(a);
    let out = w.helper_run(&pod, APP, &["loop", VIP4, "80", "8000"]);
    assert!(
        out.starts_with("ok 8000 fail 0 first PORT 15001 ORIG 10.96.0.10:80"),
        "{out}"
    );
    let out = w.helper_run(
        &client,
        APP,
        &["loop", &pod.ip4.to_string(), "8080", "2000"],
    );
    assert!(
        out.starts_with(&format!(
            "ok 2000 fail 0 first PORT 15006 ORIG {}:8080",
            pod.ip4
        )),
        "{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = connection_map_sizes(&bpffs);
        if now == before || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let leftover: Vec<String> = {
        let map = Map::LruHashMap(
            MapData::from_pin(bpffs.join("maps").join(names::ORIG_DST)).expect("pinned map"),
        );
        let map = BpfHashMap::<_, SockKey, OrigDst>::try_from(&map).expect("map");
        map.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| format!("{k:?} -> {v:?}"))
            .collect()
    };
    assert_eq!(
        after, before,
        "entries left behind after 10,000 connections; ORIG_DST holds {leftover:#?}"
    );
    let m1 = w.metrics(a);
    assert!(counter(&m1, "outbound_redirected") - counter(&m0, "outbound_redirected") >= 8000);
    assert!(counter(&m1, "inbound_captured") - counter(&m0, "inbound_captured") >= 2000);
    assert_eq!(counter(&m1, "map_update_failed"), 0, "{m1}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn restarting_the_agent_under_load_fails_no_connection() {
    let mut w = World::new("restart");
    let a = w.node("a");
    let pod = w.pod(a, "app", true, |_| {});
    let client = w.pod(a, "client", false, |_| {});
    w.proxy(&pod);
    let mut outbound = w.helper_spawn(&pod, APP, &["loop", VIP4, "80", "0", "5"], None);
    let mut inbound = w.helper_spawn(
        &client,
        APP,
        &["loop", &pod.ip4.to_string(), "8080", "0", "5"],
        None,
    );
    std::thread::sleep(Duration::from_millis(1000));
    w.kill_agent(a);
    // Down for a while: the pinned programs and maps carry on.
    std::thread::sleep(Duration::from_millis(1500));
    w.start_agent(a);
    // A pod that comes while the agent is back is taken as usual.
    let late = w.pod(a, "late", true, |_| {});
    w.proxy(&late);
    assert_eq!(field(&w.ask(&late, APP, VIP4, 80), "PORT"), "15001");
    let read = |r: &mut BufReader<ChildStdout>| {
        let mut s = String::new();
        r.read_to_string(&mut s).expect("loop output");
        s
    };
    let out = read(&mut outbound);
    assert!(
        out.contains("fail 0 first PORT 15001 ORIG 10.96.0.10:80"),
        "outbound: {out}"
    );
    let inn = read(&mut inbound);
    assert!(
        inn.contains(&format!("fail 0 first PORT 15006 ORIG {}:8080", pod.ip4)),
        "inbound: {inn}"
    );
    let n: u64 = field(&out, "ok").parse().expect("count");
    assert!(n > 100, "too few connections during the restart: {out}");
    assert!(
        w.agent_log(a).contains("restarted=true"),
        "{}",
        w.agent_log(a)
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn sk_msg_moves_bytes_between_app_and_proxy_intact() {
    let mut w = World::new("skmsg");
    let a = w.node("a");
    let pod = w.pod(a, "app", true, |_| {});
    w.proxy(&pod);
    let m0 = w.metrics(a);
    for host in [VIP4, VIP6] {
        let out = w.helper_run(&pod, APP, &["echo", host, "80", "3000000"]);
        assert!(out.starts_with("match"), "{host}: {out}");
        // splice(2) reads from a socket fed by sk_msg (Go's io.Copy between TCP connections).
        let out = w.helper_run(&pod, APP, &["splice", host, "80", "1000000"]);
        assert!(out.starts_with("match"), "{host} with splice: {out}");
    }
    let m1 = w.metrics(a);
    let moved = counter(&m1, "message_redirected") - counter(&m0, "message_redirected");
    assert!(
        moved > 100,
        "bytes did not take the sk_msg path ({moved} messages):\n{m1}"
    );
    assert!(counter(&m1, "socket_short_circuited") >= 4, "{m1}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn short_circuit_can_be_off_or_both_ways() {
    let mut w = World::new("sc");
    let off = w.node_with("off", &["--short-circuit=off"]);
    let both = w.node_with("both", &["--short-circuit=both"]);
    let p_off = w.pod(off, "off", true, |_| {});
    let p_both = w.pod(both, "both", true, |_| {});
    for (node, pod, moved) in [(off, &p_off, false), (both, &p_both, true)] {
        w.proxy(pod);
        let m0 = w.metrics(node);
        let out = w.helper_run(pod, APP, &["echo", VIP4, "80", "2000000"]);
        assert!(out.starts_with("match"), "{out}");
        let m1 = w.metrics(node);
        let n = counter(&m1, "message_redirected") - counter(&m0, "message_redirected");
        assert_eq!(n > 0, moved, "messages moved: {n}\n{m1}");
        // The proxy's echo went socket to socket too when both ways are on.
        assert_eq!(counter(&m1, "socket_short_circuited") > 0, moved, "{m1}");
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn the_init_step_fails_clearly_when_the_agent_has_not_taken_the_pod() {
    let mut w = World::new("init");
    let a = w.node("a");
    let pod = w.pod(a, "orphan", false, |_| {});
    let out = w.init(&pod, 1);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node agent has not taken this pod"), "{err}");
    assert!(err.contains("interceptionMode: REDIRECT"), "{err}");
    // Once its file is there, the same step succeeds.
    let file = PodFile {
        namespace: "default".into(),
        name: "orphan".into(),
        cgroup: pod.cgroup.clone(),
        netns: PathBuf::from(format!("/var/run/netns/{}", pod.netns)),
        ips: vec![pod.ip4.into()],
        meshed: true,
        exclude_inbound_ports: vec![15020, 15021, 15090],
        exclude_outbound_ports: Vec::new(),
        exclude_outbound_cidrs: Vec::new(),
        include_outbound_cidrs: String::new(),
        include_inbound_ports: String::new(),
        include_outbound_ports: Vec::new(),
        exclude_interfaces: Vec::new(),
        proxy_uid: PROXY,
        proxy_gid: PROXY,
        outbound_port: 15001,
        inbound_port: 15006,
    };
    // Even with nothing captured outbound (no ranges, no ports), the probe is.
    w.write_pod_file(a, &file);
    let out = w.init(&pod, 20);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("verified"));
    // The agent answers on /healthz and counts its pods.
    let (status, body) = http_get(w.nodes[a].listen, "/healthz").expect("healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    let m = w.metrics(a);
    assert!(m.contains("weft_redirector_pods 1"), "{m}");
    assert!(
        m.contains("weft_redirector_map_entries{map=\"PODS\"} 1"),
        "{m}"
    );
    // Removing the file releases the pod.
    std::fs::remove_file(w.nodes[a].pods_dir.join(file.file_name())).expect("rm");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !w
        .metrics(a)
        .contains("weft_redirector_map_entries{map=\"PODS\"} 0")
    {
        assert!(
            Instant::now() < deadline,
            "pod not released: {}",
            w.metrics(a)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!w.init(&pod, 1).status.success());
    let pods = std::fs::read_dir(w.nodes[a].bpffs.join("pods"))
        .expect("pods pins")
        .count();
    assert_eq!(pods, 0, "the pod's sk_lookup link is unpinned");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn check_reports_every_hook_of_this_kernel() {
    object();
    let cg = PathBuf::from(format!(
        "/sys/fs/cgroup/unified/wt-check-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&cg).expect("cgroup");
    let out = Command::new(BIN)
        .args(["node", "--check", "--bpf-object"])
        .arg(object())
        .arg("--cgroup-root")
        .arg(&cg)
        .output()
        .expect("check");
    let _ = std::fs::remove_dir(&cg);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for hook in [
        "cgroup/connect4",
        "cgroup/connect6",
        "sockops",
        "cgroup/getsockopt",
        "sk_msg",
        "sk_lookup",
    ] {
        assert!(text.contains(&format!("ok       {hook}")), "{hook}: {text}");
    }
    // A missing object is named, with what builds it.
    let out = Command::new(BIN)
        .args([
            "node",
            "--check",
            "--bpf-object",
            "/nonexistent/weft-ebpf.o",
        ])
        .output()
        .expect("check");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cargo xtask"));
}

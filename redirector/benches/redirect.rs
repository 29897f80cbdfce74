//! The redirect's own cost, iptables mode against eBPF mode, at a fixed rate (root).
//!
//! `cargo bench -p weft-redirector --bench redirect` (or `cargo xtask bench`). Needs the eBPF
//! object beside the binaries or in `WEFT_BPF_OBJECT`, and iptables.
//!
//! Three client pods on one bridge send the same fixed-rate load to an echo server in a fourth
//! network namespace:
//! - `direct`: no sidecar, no redirect (the reference);
//! - `iptables`: `weft-redirector init` NAT rules, a forwarder on 15001 standing in for the
//!   proxy (UID 1337: reads `SO_ORIGINAL_DST`, connects there, copies bytes both ways);
//! - `ebpf`: the node agent's programs (default `--short-circuit=to-proxy`) and the same
//!   forwarder;
//! - `ebpf-both`: the same with `--short-circuit=both` (bytes towards the app short-circuited
//!   too; not the default, see `weft-redirector node --help`).
//!
//! Scenarios: `persistent` (request/response of 64 bytes over kept connections) and `connect`
//! (a new connection per request). The table shows latency percentiles and what each mode adds
//! to `direct`, written to `redirect.md` and `redirect.json` in `$WEFT_BENCH_DIR` (default
//! `target/bench/`); `WEFT_BENCH_OUT=path.json` also writes the JSON there.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::sys::socket::{getsockopt, sockopt};

const BIN: &str = env!("CARGO_BIN_EXE_weft-redirector");
const PROXY: u32 = 1337;
const APP: u32 = 1000;
const ECHO_PORT: u16 = 9000;
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 198, 0, 2);
const SIZE: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("forward") => forward(),
        Some("echo") => echo(),
        Some("client") => client(&args[1..]),
        _ => orchestrate(),
    }
}

// ---------------------------------------------------------------------------------------------
// Roles, run inside the namespaces.

fn copy(mut from: TcpStream, mut to: TcpStream) {
    // A plain read/write loop: std::io::copy would use splice(2) between sockets.
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn forward() {
    let listener = TcpListener::bind("0.0.0.0:15001").expect("bind 15001");
    println!("ready");
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let Ok(orig) = getsockopt(&conn, sockopt::OriginalDst) else {
                return;
            };
            let dst = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(orig.sin_addr.s_addr)),
                u16::from_be(orig.sin_port),
            );
            let Ok(up) = TcpStream::connect(dst) else {
                return;
            };
            let _ = (conn.set_nodelay(true), up.set_nodelay(true));
            let (c2, u2) = (
                conn.try_clone().expect("clone"),
                up.try_clone().expect("clone"),
            );
            std::thread::spawn(move || copy(c2, u2));
            copy(up, conn);
        });
    }
}

fn echo() {
    let listener = TcpListener::bind(("0.0.0.0", ECHO_PORT)).expect("bind echo");
    println!("ready");
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let reader = conn.try_clone().expect("clone");
            copy(reader, conn);
        });
    }
}

/// `client SCENARIO RATE SECS CONNS`: prints the error count, then every latency sample in
/// microseconds, space-separated.
fn client(args: &[String]) {
    let scenario = args[0].clone();
    let rate: f64 = args[1].parse().expect("rate");
    let secs: f64 = args[2].parse().expect("secs");
    let conns: usize = args[3].parse().expect("conns");
    let target = SocketAddr::from((SERVER, ECHO_PORT));
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let persistent = scenario == "persistent";
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                let mut errors = 0u64;
                let start = Instant::now() + interval.mul_f64(i as f64 / conns as f64);
                let end = start + Duration::from_secs_f64(secs);
                let mut kept: Option<TcpStream> = None;
                let mut next = start;
                while next < end {
                    wait_until(next);
                    next += interval;
                    let t = Instant::now();
                    match exchange(target, persistent, &mut kept) {
                        Ok(()) => samples.push(t.elapsed().as_micros() as u64),
                        Err(_) => {
                            errors += 1;
                            kept = None;
                        }
                    }
                }
                (samples, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in threads {
        let (samples, e) = t.join().expect("client thread");
        all.extend(samples);
        errors += e;
    }
    println!("{errors}");
    println!(
        "{}",
        all.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
    );
}

/// Sleeps most of the wait and spins the rest: a sleeping client's own wake-up would be noise
/// in every mode.
fn wait_until(at: Instant) {
    loop {
        let now = Instant::now();
        if now >= at {
            return;
        }
        if at - now > Duration::from_micros(80) {
            std::thread::sleep(at - now - Duration::from_micros(60));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// One request and its response, on the kept connection or a new one.
fn exchange(
    target: SocketAddr,
    persistent: bool,
    kept: &mut Option<TcpStream>,
) -> std::io::Result<()> {
    let payload = [7u8; SIZE];
    let mut back = [0u8; SIZE];
    let mut fresh;
    let s = if persistent {
        if kept.is_none() {
            let s = TcpStream::connect(target)?;
            s.set_nodelay(true)?;
            *kept = Some(s);
        }
        kept.as_mut().expect("kept")
    } else {
        fresh = TcpStream::connect(target)?;
        fresh.set_nodelay(true)?;
        &mut fresh
    };
    s.write_all(&payload)?;
    s.read_exact(&mut back)
}

// ---------------------------------------------------------------------------------------------
// Orchestration (root).

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) {
    sh(Command::new("ip").args(args));
}

struct Setup {
    id: String,
    cg: PathBuf,
    bpffs: Vec<PathBuf>,
    netns: Vec<String>,
    children: Vec<Child>,
    pods_dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::write(self.cg.join("cgroup.kill"), "1");
        for bpffs in &self.bpffs {
            let _ = Command::new(BIN)
                .args(["node", "--uninstall", "--bpffs"])
                .arg(bpffs)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for n in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut dirs: Vec<PathBuf> = walk(&self.cg);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            while std::fs::remove_dir(&d).is_err() && d.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = &self.id;
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

impl Setup {
    fn pod(&mut self, node: &str, name: &str, n: u8) -> (String, PathBuf) {
        let ns = format!("wb-{}-{name}", self.id);
        ip(&["netns", "add", &ns]);
        self.netns.push(ns.clone());
        let peer = format!("vb{n}");
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.netns[0],
        ]);
        ip(&[
            "-n",
            &self.netns[0],
            "link",
            "set",
            &peer,
            "master",
            "br0",
            "up",
        ]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.198.0.{n}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        let cg = self.cg.join(node).join(format!("pod-{n}"));
        std::fs::create_dir_all(&cg).expect("cgroup");
        (ns, cg)
    }

    /// Runs this binary's `role` in the pod as `uid`.
    fn run_in(&self, ns: &str, cg: &Path, uid: u32, args: &[&str]) -> Command {
        let me = std::env::current_exe().expect("current exe");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && ns="$2" && uid="$3" && shift 3 && exec nsenter --net="/var/run/netns/$ns" -- setpriv --reuid "$uid" --regid "$uid" --clear-groups "$@""#)
            .arg("sh")
            .arg(cg)
            .arg(ns)
            .arg(uid.to_string())
            .arg(me)
            .args(args);
        cmd
    }

    /// Starts an agent for the cgroup subtree `node` with `--short-circuit=short_circuit`, gives
    /// it the pod, and waits until the pod's init step says the agent took it.
    fn agent(
        &mut self,
        object: &Path,
        node: &str,
        short_circuit: &str,
        ns: &str,
        cg: &Path,
        n: u8,
    ) {
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/weft/wb-{}-{node}", self.id));
        self.bpffs.push(bpffs.clone());
        let pods_dir = self.pods_dir.path().join(node);
        std::fs::create_dir_all(&pods_dir).expect("pods dir");
        let listen = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let agent = Command::new(BIN)
            .args(["node", "--bpf-object"])
            .arg(object)
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--cgroup-root")
            .arg(self.cg.join(node))
            .arg("--pods-dir")
            .arg(&pods_dir)
            .arg(format!("--listen={listen}"))
            .arg(format!("--short-circuit={short_circuit}"))
            .stderr(Stdio::null())
            .spawn()
            .expect("agent");
        self.children.push(agent);
        let file = serde_json::json!({
            "namespace": "bench", "name": node, "cgroup": cg,
            "netns": format!("/var/run/netns/{ns}"), "ips": [format!("10.198.0.{n}")], "meshed": true,
        });
        std::fs::write(
            pods_dir.join(format!("bench_{node}.json")),
            file.to_string(),
        )
        .expect("pod file");
        let init = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec nsenter --net="/var/run/netns/$2" -- "$3" init --mode=ebpf --ebpf-timeout=30"#)
            .arg("sh")
            .arg(cg)
            .arg(ns)
            .arg(BIN)
            .output()
            .expect("init");
        assert!(
            init.status.success(),
            "eBPF init step: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }

    fn spawn_ready(&mut self, mut cmd: Command) {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready");
        assert_eq!(line.trim(), "ready");
        self.children.push(child);
    }
}

fn orchestrate() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the redirect benchmark needs root (namespaces, cgroups, eBPF, iptables)"
    );
    let object = std::env::var_os("WEFT_BPF_OBJECT").map_or_else(
        || Path::new(BIN).parent().expect("dir").join("weft-ebpf.o"),
        PathBuf::from,
    );
    assert!(
        object.is_file(),
        "eBPF object {} not found: run `cargo xtask bench` / `cargo xtask test` (builds it) or set WEFT_BPF_OBJECT",
        object.display()
    );
    let id = std::process::id().to_string();
    let bridge = format!("wb-{id}-br");
    ip(&["netns", "add", &bridge]);
    let mut s = Setup {
        cg: PathBuf::from(format!("/sys/fs/cgroup/unified/wb-{id}")),
        bpffs: Vec::new(),
        id,
        netns: vec![bridge.clone()],
        children: Vec::new(),
        pods_dir: tempfile::tempdir().expect("tempdir"),
    };
    ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &bridge, "link", "set", "br0", "up"]);

    let (server_ns, server_cg) = s.pod("plain", "server", 2);
    let (direct_ns, direct_cg) = s.pod("plain", "direct", 3);
    let (ipt_ns, ipt_cg) = s.pod("plain", "iptables", 4);
    let (ebpf_ns, ebpf_cg) = s.pod("node-a", "ebpf", 5);
    let (both_ns, both_cg) = s.pod("node-b", "ebpf-both", 6);
    let echo_cmd = s.run_in(&server_ns, &server_cg, APP, &["echo"]);
    s.spawn_ready(echo_cmd);

    // iptables mode: the init step's NAT rules.
    sh(Command::new("ip").args(["netns", "exec", &ipt_ns, BIN, "init"]));
    // eBPF mode: an agent per node (cgroup subtree), the pod's file, the init step's check.
    s.agent(&object, "node-a", "to-proxy", &ebpf_ns, &ebpf_cg, 5);
    s.agent(&object, "node-b", "both", &both_ns, &both_cg, 6);
    for (ns, cg) in [
        (&ipt_ns, &ipt_cg),
        (&ebpf_ns, &ebpf_cg),
        (&both_ns, &both_cg),
    ] {
        let cmd = s.run_in(ns, cg, PROXY, &["forward"]);
        s.spawn_ready(cmd);
    }

    // Each scenario runs in ROUNDS short rounds, the modes one after another in each
    // round, and each mode's samples of all rounds are merged: drift of the machine (other
    // work, frequency) then weighs on every mode alike.
    const ROUNDS: usize = 6;
    let scenarios = [
        ("persistent", "2000", "1.5", "4"),
        ("connect", "500", "1.5", "2"),
    ];
    let modes = [
        ("direct", &direct_ns, &direct_cg),
        ("iptables", &ipt_ns, &ipt_cg),
        ("ebpf", &ebpf_ns, &ebpf_cg),
        ("ebpf-both", &both_ns, &both_cg),
    ];
    let mut rows = Vec::new();
    for (scenario, rate, secs, conns) in scenarios {
        for &(_, ns, cg) in &modes {
            sh(&mut s.run_in(ns, cg, APP, &["client", scenario, "200", "0.5", "1"]));
        }
        let mut hists: Vec<Histogram<u64>> = modes
            .iter()
            .map(|_| Histogram::new(3).expect("histogram"))
            .collect();
        for _ in 0..ROUNDS {
            for (i, &(mode, ns, cg)) in modes.iter().enumerate() {
                let out = sh(&mut s.run_in(ns, cg, APP, &["client", scenario, rate, secs, conns]));
                let mut lines = out.lines();
                let errors: u64 = lines
                    .next()
                    .and_then(|l| l.trim().parse().ok())
                    .expect("errors");
                assert_eq!(errors, 0, "{scenario}/{mode}: {errors} errors");
                for v in lines.next().unwrap_or_default().split_whitespace() {
                    hists[i].record(v.parse().expect("sample")).expect("record");
                }
            }
        }
        let summary = |h: &Histogram<u64>| {
            vec![
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.max(),
                h.len(),
            ]
        };
        let direct = summary(&hists[0]);
        for (i, &(mode, _, _)) in modes.iter().enumerate() {
            rows.push((scenario, mode, rate, summary(&hists[i]), direct.clone()));
        }
    }
    use std::fmt::Write as _;
    let mut md = String::from(
        "# Redirect cost: iptables against eBPF\n\nFixed rate, 64-byte request/response, a forwarder standing in for the proxy (UID 1337, `SO_ORIGINAL_DST`); microseconds. `persistent`: kept connections; `connect`: a new connection per request.\n\n| scenario | mode | p50 | p90 | p99 | max | samples | added p50 | added p99 |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut json = Vec::new();
    for (scenario, mode, rate, v, d) in &rows {
        let added = |i: usize| v[i] as i64 - d[i] as i64;
        let _ = writeln!(
            md,
            "| {scenario} | {mode} | {} | {} | {} | {} | {} | {} | {} |",
            v[0],
            v[1],
            v[2],
            v[3],
            v[4],
            added(0),
            added(2)
        );
        json.push(serde_json::json!({"scenario": scenario, "mode": mode, "rate_per_s": rate, "p50_us": v[0], "p90_us": v[1], "p99_us": v[2], "max_us": v[3], "samples": v[4], "added_p50_us": added(0), "added_p99_us": added(2)}));
    }
    md.push('\n');
    for scenario in ["persistent", "connect"] {
        let pick = |mode: &str| {
            rows.iter()
                .find(|r| r.0 == scenario && r.1 == mode)
                .map(|r| (r.3[0] as f64 - r.4[0] as f64, r.3[2] as f64 - r.4[2] as f64))
        };
        for mode in ["ebpf", "ebpf-both"] {
            if let (Some(i), Some(e)) = (pick("iptables"), pick(mode)) {
                let (p50, p99) = (100.0 * (1.0 - e.0 / i.0), 100.0 * (1.0 - e.1 / i.1));
                let _ = writeln!(
                    md,
                    "- {scenario}: {mode} adds {p50:.0}% less latency than iptables at p50, {p99:.0}% less at p99 (target: at least 20% less at both): {}",
                    if p50 >= 20.0 && p99 >= 20.0 {
                        "met"
                    } else {
                        "NOT met"
                    }
                );
            }
        }
    }
    println!("\n{md}");
    let dir = std::env::var_os("WEFT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    std::fs::create_dir_all(&dir).expect("bench dir");
    std::fs::write(dir.join("redirect.md"), &md).expect("write redirect.md");
    let json = serde_json::to_string_pretty(&json).expect("json");
    std::fs::write(dir.join("redirect.json"), &json).expect("write redirect.json");
    if let Some(path) = std::env::var_os("WEFT_BENCH_OUT") {
        std::fs::write(&path, json).expect("write bench output");
    }
}

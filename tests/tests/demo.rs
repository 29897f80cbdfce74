//! `cargo xtask demo` end to end: the demo binary shows what the README promises (the call,
//! the caller's identity, STRICT refusing a pod without a sidecar, the canary steps) and
//! leaves nothing behind — namespaces, hosts files, cgroups, eBPF pins, files, processes —
//! when it finishes and when it is interrupted in the middle.
//!
//! These need root and the built binaries: `cargo xtask test` runs them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use weft_tests::binaries;
use weft_tests::localnode::CGROUP_ROOT;

/// What a local node of process `pid` left: every name that carries `weft-<pid>-` (or, for
/// cgroups and pins, `<pid>-`) in the places the local node creates things.
fn leftovers(pid: u32) -> Vec<String> {
    let prefix = format!("weft-{pid}-");
    let mut found = Vec::new();
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    for (dir, p) in [
        ("/var/run/netns", prefix.clone()),
        ("/etc/netns", prefix.clone()),
        ("/tmp", prefix.clone()),
        (CGROUP_ROOT, format!("{pid}-")),
        ("/sys/fs/bpf/weft", format!("{pid}-")),
    ] {
        for n in names(dir) {
            if n.starts_with(&p) {
                found.push(format!("{dir}/{n}"));
            }
        }
    }
    // Processes started for the node: their command lines name its files or namespaces.
    for proc in names("/proc") {
        if proc.parse::<u32>().is_err() {
            continue;
        }
        let cmdline = std::fs::read(Path::new("/proc").join(&proc).join("cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let environ = std::fs::read(Path::new("/proc").join(&proc).join("environ"))
            .map(|e| String::from_utf8_lossy(&e).into_owned())
            .unwrap_or_default();
        if cmdline.contains(&prefix) || environ.contains(&prefix) {
            found.push(format!("process {proc}: {cmdline}"));
        }
    }
    found
}

/// `v1 answered N, v2 answered M, failed F` of each canary line.
fn canary_counts(out: &str) -> Vec<(u64, u64, u64)> {
    out.lines()
        .filter(|l| l.contains("VirtualService weights"))
        .map(|l| {
            let num = |key: &str| -> u64 {
                l.split(key)
                    .nth(1)
                    .and_then(|rest| rest.trim_start().split([',', ' ']).next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no {key:?} in {l:?}"))
            };
            (num("v1 answered"), num("v2 answered"), num("failed"))
        })
        .collect()
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn the_demo_shows_the_call_the_identity_and_the_canary_and_leaves_nothing() {
    let demo = binaries::path("weft-demo").expect("weft-demo");
    let child = Command::new(demo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);

    assert!(
        stdout.contains("caller identity   spiffe://cluster.local/ns/genesis/sa/service-a"),
        "{stdout}"
    );
    assert!(stdout.contains("over HTTP/1.1"), "{stdout}");
    assert!(
        stdout.contains("identical: true, error: None"),
        "TCP echo: {stdout}"
    );
    assert!(stdout.contains("legacy (no sidecar) ->"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("legacy (no sidecar)") && l.contains("refused")),
        "STRICT let a pod without a sidecar in: {stdout}"
    );
    assert!(
        stdout.contains("service-a (sidecar, mTLS) -> service-b: {200: 1}"),
        "{stdout}"
    );
    let canary = canary_counts(&stdout);
    assert_eq!(canary.len(), 3, "{stdout}");
    assert_eq!(canary[0], (400, 0, 0), "100/0: {stdout}");
    let (v1, v2, failed) = canary[1];
    assert_eq!((v1 + v2, failed), (400, 0), "90/10: {stdout}");
    // 10% of 400 is 40; a binomial standard deviation is 6.
    assert!(
        (16..=64).contains(&v2),
        "90/10 sent {v2} of 400 to v2: {stdout}"
    );
    assert_eq!(canary[2], (0, 400, 0), "0/100: {stdout}");
    assert!(stdout.contains("local node removed."), "{stdout}");

    let left = leftovers(pid);
    assert!(left.is_empty(), "the demo left {left:#?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test"]
fn an_interrupted_demo_tears_everything_down() {
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let demo = binaries::path("weft-demo").expect("weft-demo");
        let mut child = Command::new(demo)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the demo");
        let pid = child.id();
        // Interrupt it in the middle: once the pods are running and traffic flows. The
        // output is read to its end, so the demo never writes into a closed pipe.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
            let reached = line.contains("==> service-a: gRPC");
            seen.push(line);
            if reached {
                break;
            }
        }
        assert!(
            seen.iter().any(|l| l.contains("==> service-a: gRPC")),
            "the demo ended early: {seen:#?}"
        );
        kill(Pid::from_raw(i32::try_from(pid).expect("pid")), signal).expect("signal");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "the demo ignored {signal}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(130), "{signal}: {status}");
        let left = leftovers(pid);
        assert!(left.is_empty(), "after {signal} the demo left {left:#?}");
    }
}

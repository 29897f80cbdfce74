//! The `weft-webhook` binary: `inject -f`, `validate -f`, mesh-config errors, and `serve`
//! starting and stopping on SIGTERM.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft-webhook"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.env("RUST_LOG", "warn")
        .output()
        .expect("run weft-webhook")
}

fn input(name: &str) -> String {
    common::corpus_dir()
        .join("inputs")
        .join(name)
        .display()
        .to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn inject_file_prints_the_injected_yaml() {
    let out = run(bin().args(["inject", "-f", &input("hello.yaml")]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let golden = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hello.yaml.injected"),
    )
    .expect("golden");
    let stdout = text(&out.stdout).replace(&format!(":{}", env!("CARGO_PKG_VERSION")), ":VERSION");
    assert_eq!(stdout, golden);

    // -o writes a file; stdin works.
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("out.yaml");
    let yaml = std::fs::read(input("pod.yaml")).expect("read");
    let mut child = bin()
        .args(["inject", "-f", "-", "-o"])
        .arg(&out_file)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), &yaml).expect("write");
    assert!(child.wait().expect("wait").success());
    let written = std::fs::read_to_string(&out_file).expect("output");
    assert!(written.contains("name: weft-proxy"), "{written}");
}

#[test]
fn inject_denial_and_bad_mesh_config_fail_clearly() {
    let out = run(bin().args([
        "inject",
        "-f",
        &input("traffic-annotations-bad-excludeoutboundports.yaml"),
    ]));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("traffic.sidecar.istio.io/excludeOutboundPorts") && err.contains("\"bad\""),
        "{err}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("mesh.yaml");
    std::fs::write(&bad, "terminationDrainDuration: soon\n").expect("write");
    for args in [
        vec!["inject", "-f", &input("pod.yaml")],
        vec!["serve", "--kubernetes=false", "--listen", "127.0.0.1:0"],
    ] {
        let out = run(bin().args(&args).arg("--mesh-config").arg(&bad));
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains("terminationDrainDuration") && err.contains("soon"),
            "{err}"
        );
    }

    // Unknown fields: a warning, not an error.
    let unknown = dir.path().join("unknown.yaml");
    std::fs::write(&unknown, "frobnicate: 1\n").expect("write");
    let out = run(bin()
        .args(["inject", "-f", &input("pod.yaml"), "--mesh-config"])
        .arg(&unknown));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("frobnicate"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn validate_file_reports_findings_and_exits_1_on_errors() {
    let vs = common::corpus_dir()
        .join("../samples/bookinfo/networking/virtual-service-all-v1.yaml")
        .display()
        .to_string();
    let out = run(bin().args(["validate", "-f", &vs]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("0 errors"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn serve_starts_and_stops_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    let mut child = bin()
        .args(["serve", "--kubernetes=false", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ca-out")
        .arg(&ca)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn serve");
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        std::fs::read_to_string(&ca)
            .expect("ca written")
            .contains("BEGIN CERTIFICATE")
    );
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{status}");
            break;
        }
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("serve did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

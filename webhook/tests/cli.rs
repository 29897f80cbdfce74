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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The local node's command line: CA made in `--ca-dir` on first start and reused, root
/// published there, tokens checked with `--token-public-key`, config from `--local-dir`.
#[tokio::test]
async fn serve_local_mode_issues_certificates_and_streams_config() {
    use weft_webhook::testing::{ProxyStream, TokenSigner, client_tls, issue};
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::write(
        config.join("pod.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a-1, namespace: genesis, labels: {app: a}, annotations: {sidecar.istio.io/status: '{}'}}\nspec: {serviceAccountName: a, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.44.0.2}\n",
    )
    .expect("pod");
    let signer = TokenSigner::new();
    let key = dir.path().join("token-key.pub");
    std::fs::write(&key, signer.public_key_pem()).expect("key");
    let mut roots = Vec::new();
    for _ in 0..2 {
        let (cp, hook) = (free_port(), free_port());
        let child = bin()
            .args(["serve", "--kubernetes", "false", "--listen"])
            .arg(format!("127.0.0.1:{hook}"))
            .arg("--local-dir")
            .arg(&config)
            .arg("--ca-dir")
            .arg(dir.path().join("ca"))
            .arg("--token-public-key")
            .arg(&key)
            .arg("--control-plane-listen")
            .arg(format!("127.0.0.1:{cp}"))
            .args(["--serving-ip", "127.0.0.1"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn serve");
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _child = Kill(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", cp)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "serve did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let root =
            std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).expect("root published");
        let addr = format!("127.0.0.1:{cp}").parse().expect("addr");
        let (cert, key) = issue(addr, &root, &signer, "genesis", "a").await;
        let tls = client_tls(
            &root,
            Some((&cert.cert_chain.concat(), &key.serialize_pem())),
        );
        let node = weft_api::discovery::Node {
            name: "a-1".into(),
            namespace: "genesis".into(),
            ..Default::default()
        };
        let mut stream = ProxyStream::open(addr, tls, node).await;
        assert_eq!(stream.status, 200, "{:?}", stream.error_body);
        let first = stream
            .next(Duration::from_secs(10))
            .await
            .expect("snapshot");
        assert_eq!(first.snapshot.workload.labels["app"], "a");
        roots.push(root);
    }
    assert_eq!(roots[0], roots[1], "the CA is reused across restarts");
}

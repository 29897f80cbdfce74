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

const STATEFUL_SET: &str = r#"apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
  namespace: genesis
  labels: {tier: data}
spec:
  serviceName: db
  replicas: 3
  podManagementPolicy: Parallel
  selector:
    matchLabels: {app: db}
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
        - name: db
          image: postgres:16
          ports: [{name: pg, containerPort: 5432}]
          readinessProbe:
            tcpSocket: {port: pg}
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        accessModes: [ReadWriteOnce]
        resources: {requests: {storage: 1Gi}}
"#;

const DAEMON_SET: &str = r#"apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: node-agent
  namespace: genesis
spec:
  selector:
    matchLabels: {app: node-agent}
  updateStrategy:
    type: RollingUpdate
    rollingUpdate: {maxUnavailable: 1}
  template:
    metadata:
      labels: {app: node-agent}
      annotations: {traffic.sidecar.istio.io/excludeOutboundPorts: "10250"}
    spec:
      tolerations: [{operator: Exists}]
      containers:
        - name: agent
          image: agent:2
          ports: [{containerPort: 9100}]
          livenessProbe:
            httpGet: {path: /healthz, port: 9100}
"#;

const REPLICA_SET: &str = r#"apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: frontend
  namespace: genesis
  annotations: {deployment.kubernetes.io/revision: "4"}
spec:
  replicas: 2
  minReadySeconds: 5
  selector:
    matchLabels: {app: frontend}
  template:
    metadata:
      labels: {app: frontend, version: v4}
    spec:
      containers:
        - name: web
          image: nginx:1.27
          ports: [{name: http, containerPort: 80}]
"#;

const JOB: &str = r#"apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
  namespace: genesis
spec:
  backoffLimit: 2
  ttlSecondsAfterFinished: 600
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: migrate
          image: migrate:1
          command: [migrate, up]
"#;

const UNKNOWN: &str = r#"apiVersion: example.com/v1alpha1
kind: Frobnicator
metadata:
  name: frob
  namespace: genesis
spec:
  template:
    spec:
      containers: [{name: not-a-pod, image: x}]
  knobs: [1, 2, 3]
"#;

fn yaml_docs(yaml: &str) -> Vec<serde_json::Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| <serde_json::Value as serde::Deserialize>::deserialize(d).expect("yaml document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `weft-webhook inject -f` on `yaml`: the output documents.
fn inject_file(yaml: &str) -> (String, Vec<serde_json::Value>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("in.yaml");
    std::fs::write(&file, yaml).expect("write input");
    let out = run(bin().arg("inject").arg("-f").arg(&file));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let docs = yaml_docs(&stdout);
    (stdout, docs)
}

/// A workload document came out with its pod template injected and every other field as it was.
fn check_workload(label: &str, before: &serde_json::Value, after: &serde_json::Value) {
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        v["spec"]
            .as_object_mut()
            .expect("spec")
            .remove("template")
            .expect("a template");
        v
    };
    assert_eq!(
        strip(after),
        strip(before),
        "{label}: fields besides the template"
    );
    let yaml_of = |v: &serde_json::Value| serde_yaml_ng::to_string(v).expect("yaml");
    let (_, workload, pod_before) = common::pods_in(&yaml_of(before)).remove(0);
    let (_, _, pod_after) = common::pods_in(&yaml_of(after)).remove(0);
    common::check_injected(
        label,
        &pod_before,
        &pod_after,
        common::Expect {
            native: true,
            proxy_uid: 1337,
        },
    );
    let labels = pod_after.metadata.labels.clone().unwrap_or_default();
    let expected_name = pod_before
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("app").cloned())
        .or(workload)
        .expect("a canonical name");
    assert_eq!(
        labels.get("service.istio.io/canonical-name"),
        Some(&expected_name),
        "{label}"
    );
}

#[test]
fn inject_file_injects_each_workload_kind() {
    for (kind, yaml) in [
        ("StatefulSet", STATEFUL_SET),
        ("DaemonSet", DAEMON_SET),
        ("ReplicaSet", REPLICA_SET),
        ("Job", JOB),
    ] {
        let (_, docs) = inject_file(yaml);
        assert_eq!(docs.len(), 1, "{kind}");
        assert_eq!(docs[0]["kind"], kind);
        check_workload(kind, &yaml_docs(yaml)[0], &docs[0]);
    }
    // The DaemonSet's annotation reached weft-init; the Job's pod keeps restartPolicy Never.
    let (_, docs) = inject_file(DAEMON_SET);
    let inits = docs[0]["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .expect("init containers");
    let args: Vec<&str> = inits[0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(args.contains(&"--exclude-outbound-ports=10250"), "{args:?}");
    let (_, docs) = inject_file(JOB);
    assert_eq!(
        docs[0]["spec"]["template"]["spec"]["restartPolicy"],
        "Never"
    );
}

#[test]
fn inject_file_mixes_kinds_and_passes_unknown_ones_through() {
    let config_map =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {a: \"1\"}\n";
    let input = [
        STATEFUL_SET,
        UNKNOWN,
        DAEMON_SET,
        config_map,
        REPLICA_SET,
        JOB,
    ]
    .join("---\n");
    let before = yaml_docs(&input);
    let (stdout, after) = inject_file(&input);
    assert_eq!(after.len(), before.len(), "{stdout}");
    let kinds: Vec<&str> = after.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "StatefulSet",
            "Frobnicator",
            "DaemonSet",
            "ConfigMap",
            "ReplicaSet",
            "Job"
        ]
    );
    // Kinds the injector does not know pass through untouched, even with a `spec.template`.
    assert_eq!(after[1], before[1]);
    assert_eq!(after[3], before[3]);
    assert!(
        !serde_json::to_string(&after[1])
            .expect("json")
            .contains("weft-")
    );
    for i in [0, 2, 4, 5] {
        check_workload(&format!("document {}", i + 1), &before[i], &after[i]);
    }
    assert_eq!(stdout.matches("sidecar.istio.io/status").count(), 4);
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

    // An invalid object: exit code 1, the finding naming the field.
    let invalid = common::corpus_dir()
        .join("../istio-api/invalid/istioctl-validate/invalid-virtual-service-negative-weight.yaml")
        .display()
        .to_string();
    let out = run(bin().args(["validate", "-f", &invalid]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("error: ") && l.contains("spec.http[0].route[1].weight")),
        "{stdout}"
    );
    assert!(
        text(&out.stderr).contains("1 errors"),
        "{}",
        text(&out.stderr)
    );

    // The same from a file of our own, mixed with a valid document.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dr.yaml");
    std::fs::write(
        &file,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ok, namespace: genesis}\n\
         spec: {host: reviews}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: bad, namespace: genesis}\n\
         spec:\n  host: reviews\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: -1}\n",
    )
    .expect("write");
    let out = run(bin().arg("validate").arg("-f").arg(&file));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("error: DestinationRule/genesis/bad")
            && stdout.contains("spec.trafficPolicy.connectionPool.tcp.maxConnections"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("error: DestinationRule/genesis/ok"),
        "{stdout}"
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

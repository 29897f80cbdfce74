//! `cargo xtask <task>`: Weft's tasks. Each installs what it needs (Debian packages), so the
//! README's two commands work on a fresh machine of this kind, as root.

mod deps;
mod ebpf;
mod kind;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

const USAGE: &str = "\
usage: cargo xtask <task>

  demo       run the demo on a local node (service-a calls service-b through the mesh)
  test       every test: unit, golden, in-process and local-node end-to-end (needs root)
  bench      benchmarks (target/bench/): data plane vs direct and an HAProxy pair, iptables vs
             eBPF redirection, routing rules, control-plane push, injection
  crds       regenerate deploy/crds from the Rust resource types
  lint       cargo fmt --check and clippy -D warnings
  kind-e2e   the end-to-end scenarios on a kind cluster (needs Docker and kind)
";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root()?;
    match args.first().map(String::as_str) {
        Some("test") => test(&root, &args[1..]),
        Some("demo") => demo(&root),
        Some("lint") => lint(&root),
        Some("crds") => crds(&root),
        Some("bench") => bench(&root, &args[1..]),
        Some("kind-e2e") => kind_e2e(&root, &args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task {other:?}\n{USAGE}"),
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

/// Runs a command in the workspace, echoing it; fails when it fails.
pub(crate) fn run(
    root: &Path,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<()> {
    println!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root)
        .status()
        .with_context(|| format!("run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub(crate) fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

fn require_root(task: &str) -> anyhow::Result<()> {
    let uid = Command::new("id").arg("-u").output().context("run id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "cargo xtask {task} needs root: it creates network namespaces, iptables rules and cgroups (run it with sudo)"
        );
    }
    Ok(())
}

/// Builds every workspace binary once (debug), shared by all tests.
fn build_bins(root: &Path, release: bool) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build", "--workspace", "--bins", "--locked"];
    if release {
        args.push("--release");
    }
    run(root, &cargo(), &args, &[])?;
    Ok(root
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

fn test(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    require_root("test")?;
    deps::ensure(&deps::TEST)?;
    run(root, &cargo(), &["fmt", "--all", "--check"], &[])?;
    let bins = build_bins(root, false)?;
    ebpf::build(root, &bins)?;
    let bin_dir = bins.display().to_string();
    let mut args = vec![
        "test",
        "--workspace",
        "--locked",
        "--no-fail-fast",
        "--",
        "--include-ignored",
    ];
    args.extend(extra.iter().map(String::as_str));
    run(root, &cargo(), &args, &[("WEFT_BIN_DIR", &bin_dir)])
}

fn demo(root: &Path) -> anyhow::Result<()> {
    require_root("demo")?;
    deps::ensure(&deps::DEMO)?;
    let bins = build_bins(root, false)?;
    ebpf::build(root, &bins)?;
    let demo = bins.join("weft-demo");
    run(root, &demo.display().to_string(), &[], &[])
}

fn lint(root: &Path) -> anyhow::Result<()> {
    run(root, &cargo(), &["fmt", "--all", "--check"], &[])?;
    run(
        root,
        &cargo(),
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )
}

fn crds(root: &Path) -> anyhow::Result<()> {
    run(
        root,
        &cargo(),
        &[
            "test",
            "-p",
            "weft-api",
            "--features",
            "crd",
            "--test",
            "crds",
            "--locked",
        ],
        &[("WEFT_BLESS", "1")],
    )
}

/// The benchmarks, each writing a markdown table and JSON to `target/bench/`, then one
/// summary (`target/bench/README.md`). `cargo xtask bench [NAME…]` runs only those named:
/// `dataplane`, `redirect`, `push`, `inject`, `route`.
fn bench(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    require_root("bench")?;
    deps::ensure(&deps::BENCH)?;
    let bins = build_bins(root, true)?;
    let object = ebpf::build(root, &bins)?;
    let out = root.join("target").join("bench");
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let out_s = out.display().to_string();
    let bins_s = bins.display().to_string();
    let object_s = object.display().to_string();
    let env = [
        ("WEFT_BIN_DIR", bins_s.as_str()),
        ("WEFT_BENCH_DIR", out_s.as_str()),
        ("WEFT_BPF_OBJECT", object_s.as_str()),
    ];
    let wants = |name: &str| extra.is_empty() || extra.iter().any(|e| e == name);
    let cargo_bench = |package: &str, bench: &str| {
        run(
            root,
            &cargo(),
            &["bench", "--locked", "-p", package, "--bench", bench],
            &env,
        )
    };
    if wants("dataplane") {
        run(
            root,
            &bins.join("weft-bench").display().to_string(),
            &["dataplane"],
            &env,
        )?;
    }
    if wants("redirect") {
        cargo_bench("weft-redirector", "redirect")?;
    }
    if wants("push") {
        cargo_bench("weft-webhook", "push")?;
    }
    if wants("inject") {
        cargo_bench("weft-webhook", "inject")?;
    }
    if wants("route") {
        cargo_bench("weft-proxy", "route")?;
    }
    let mut summary = String::from(
        "# Weft benchmarks\n\nWritten by `cargo xtask bench`; each section is also a file of its own here, with JSON beside it.\n",
    );
    for name in ["dataplane", "redirect", "push", "inject", "route"] {
        if let Ok(md) = std::fs::read_to_string(out.join(format!("{name}.md"))) {
            summary.push('\n');
            // Each file's headings one level down.
            for line in md.lines() {
                if line.starts_with('#') {
                    summary.push('#');
                }
                summary.push_str(line);
                summary.push('\n');
            }
        }
    }
    let readme = out.join("README.md");
    std::fs::write(&readme, summary).with_context(|| format!("write {}", readme.display()))?;
    println!("benchmarks: {}", readme.display());
    Ok(())
}

fn kind_e2e(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    kind::e2e(root, extra.iter().any(|a| a == "--keep"))
}

//! Building Weft's eBPF object (`ebpf/`) with Debian's Rust tool chain, installing what is
//! missing first. Idempotent: each step checks before it acts, so a second run only rebuilds
//! (and cargo makes that a no-op when nothing changed).
//!
//! 1. Debian packages `rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev` (rustc 1.96
//!    with a prebuilt `core` for `bpfel-unknown-none`, LLVM 22): `apt-get install` when
//!    `dpkg-query` says one is missing (`apt-get update` first, then only).
//! 2. bpf-linker 0.13.0 built against Debian's LLVM 22, into `<workspace>/target/tools`.
//! 3. `/usr/bin/cargo build --release` in `ebpf/` (its own workspace and target dir), with
//!    Debian's rustc and that bpf-linker.
//! 4. The object copied to `<profile dir>/weft-ebpf.o`, where `weft-redirector node` and the
//!    tests look for it.
//!
//! The manual steps are in `ebpf/README.md`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The Debian packages of the tool chain.
const PACKAGES: [&str; 4] = [
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
];
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const TARGET: &str = "bpfel-unknown-none";
/// The object's name beside the binaries.
pub const OBJECT: &str = "weft-ebpf.o";

/// Builds the eBPF object and copies it to `<profile_dir>/weft-ebpf.o`; returns that path.
pub fn build(workspace_root: &Path, profile_dir: &Path) -> anyhow::Result<PathBuf> {
    install_packages()?;
    let tools = workspace_root.join("target").join("tools");
    let linker_dir = install_bpf_linker(&tools)?;
    let ebpf = workspace_root.join("ebpf");
    println!("ebpf: building {} for {TARGET}", ebpf.display());
    let path = std::env::join_paths(std::iter::once(linker_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .context("PATH")?;
    let status = debian_cargo()
        .current_dir(&ebpf)
        .args(["build", "--release"])
        .env("PATH", path)
        .status()
        .with_context(|| format!("running {DEBIAN_CARGO} build in {}", ebpf.display()))?;
    if !status.success() {
        bail!(
            "building the eBPF programs in {} failed ({status})",
            ebpf.display()
        );
    }
    let built = ebpf
        .join("target")
        .join(TARGET)
        .join("release")
        .join("weft-ebpf");
    std::fs::create_dir_all(profile_dir)
        .with_context(|| format!("creating {}", profile_dir.display()))?;
    let object = profile_dir.join(OBJECT);
    std::fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    println!("ebpf: object {}", object.display());
    Ok(object)
}

/// Debian's cargo with Debian's rustc, clear of what an outer `cargo xtask` (rustup) put in
/// the environment.
fn debian_cargo() -> Command {
    let mut cmd = Command::new(DEBIAN_CARGO);
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTUP_TOOLCHAIN",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUSTC", DEBIAN_RUSTC)
        // aya-ebpf needs one unstable feature; this allows it to that crate only.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf");
    cmd
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
}

fn install_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() && Path::new(DEBIAN_CARGO).exists() && Path::new(DEBIAN_RUSTC).exists() {
        println!("ebpf: Debian tool chain present ({})", PACKAGES.join(" "));
        return Ok(());
    }
    println!(
        "ebpf: installing {} (apt-get, about 30 s)",
        missing.join(" ")
    );
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!(
                "apt-get {} failed ({status}); as root: apt-get update && apt-get install -y {}",
                args.join(" "),
                PACKAGES.join(" ")
            );
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq"];
    install.extend(PACKAGES);
    apt(&install)
}

/// Installs bpf-linker into `tools` unless that version is there; returns its `bin` dir.
fn install_bpf_linker(tools: &Path) -> anyhow::Result<PathBuf> {
    let bin = tools.join("bin");
    let linker = bin.join("bpf-linker");
    let version = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        println!(
            "ebpf: bpf-linker {BPF_LINKER_VERSION} present in {}",
            bin.display()
        );
        return Ok(bin);
    }
    println!(
        "ebpf: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 into {} (about 1 min)",
        tools.display()
    );
    let status = debian_cargo()
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
            "--root",
        ])
        .arg(tools)
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("installing bpf-linker {BPF_LINKER_VERSION} failed ({status})");
    }
    Ok(bin)
}

//! Debian packages the tasks need, installed idempotently.

use std::process::Command;

use anyhow::{Context, bail};

/// Packages for `cargo xtask test`.
pub const TEST: [&str; 5] = ["iproute2", "iptables", "python3", "util-linux", "openssl"];
/// Packages for `cargo xtask demo`.
pub const DEMO: [&str; 2] = ["iproute2", "iptables"];
/// Packages for `cargo xtask bench`.
pub const BENCH: [&str; 5] = ["iproute2", "iptables", "haproxy", "nginx-light", "openssl"];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs whatever of `pkgs` is missing (`apt-get update` only when something is).
pub fn ensure(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing Debian packages: {}", missing.join(" "));
    let status = Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("run apt-get (this task needs Debian's package manager)")?;
    if !status.success() {
        bail!("apt-get update failed");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("run apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

//! `weft-pod-exec`: starts one container process of a local-node pod. It joins the pod's
//! network namespace, makes a private mount namespace (the pod's hosts file, sysfs of that
//! network namespace, the container's volumes), joins the pod's cgroup, drops to the
//! container's user and execs the container's program. It runs as a fresh single-threaded
//! process so that none of this happens between fork and exec of a threaded parent.

use std::ffi::CString;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::unistd::{Gid, Uid, chdir, execve, setgid, setgroups, setuid};
use weft_tests::exec::{ExecSpec, SPEC_ENV};

fn main() {
    if let Err(e) = run() {
        eprintln!("weft-pod-exec: {e:#}");
        std::process::exit(127);
    }
}

fn run() -> anyhow::Result<()> {
    let spec = std::env::var(SPEC_ENV).with_context(|| format!("{SPEC_ENV} is not set"))?;
    let spec: ExecSpec = serde_json::from_str(&spec).context("invalid exec spec")?;
    if spec.argv.is_empty() {
        bail!("empty argv");
    }
    // Before the mount namespace changes: the fresh sysfs below hides the cgroup2 mount.
    if let Some(cg) = &spec.cgroup {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("join cgroup {}", cg.display()))?;
    }
    let ns = File::open(&spec.netns).with_context(|| format!("open {}", spec.netns.display()))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).context("setns(net)")?;
    if !spec.host_mounts {
        private_mounts(&spec)?;
    }
    let gid = Gid::from_raw(spec.gid);
    setgroups(&[gid]).context("setgroups")?;
    setgid(gid).context("setgid")?;
    setuid(Uid::from_raw(spec.uid)).context("setuid")?;
    if let Some(dir) = &spec.workdir {
        chdir(dir).with_context(|| format!("chdir {}", dir.display()))?;
    }
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .context("argv contains NUL")?;
    let env: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")))
        .collect::<Result<_, _>>()
        .context("env contains NUL")?;
    let Err(err) = execve(&argv[0], &argv, &env);
    bail!("exec {}: {err}", spec.argv[0])
}

/// The container's own mount namespace: sysfs of the pod's network namespace, the hosts file,
/// private dirs and volumes.
fn private_mounts(spec: &ExecSpec) -> anyhow::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS).context("unshare(mount)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make / private")?;
    // sysfs shows the mounting process's network namespace: remount it, as `ip netns exec` does.
    if umount2("/sys", MntFlags::MNT_DETACH).is_ok() {
        mount(
            Some("sysfs"),
            "/sys",
            Some("sysfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .context("mount sysfs")?;
    }
    if let Some(hosts) = &spec.hosts_file {
        bind(hosts, Path::new("/etc/hosts"), true)?;
    }
    for dir in &spec.private_dirs {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        )
        .with_context(|| format!("tmpfs on {}", dir.display()))?;
    }
    for m in &spec.mounts {
        if m.source.is_dir() {
            std::fs::create_dir_all(&m.target)
                .with_context(|| format!("mkdir {}", m.target.display()))?;
        } else {
            if let Some(parent) = m.target.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("mkdir {}", parent.display()))?;
            }
            if !m.target.exists() {
                File::create(&m.target)
                    .with_context(|| format!("create {}", m.target.display()))?;
            }
        }
        bind(&m.source, &m.target, m.read_only)?;
    }
    Ok(())
}

fn bind(source: &Path, target: &Path, read_only: bool) -> anyhow::Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("bind {} on {}", source.display(), target.display()))?;
    if read_only {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .with_context(|| format!("remount {} read-only", target.display()))?;
    }
    Ok(())
}

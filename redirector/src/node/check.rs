//! `weft-redirector node --check`: does this kernel have every hook eBPF mode needs?
//!
//! Each hook is tried for real: the object's programs are loaded (the verifier accepts them),
//! the cgroup programs attached to a scratch cgroup under the cgroup root, `sk_lookup` to a
//! scratch network namespace and `sk_msg` to the sockhash; everything is removed afterwards.

use std::fs::File;
use std::path::Path;

use aya::maps::{MapData, SockHash};
use aya::programs::{SkLookup, SkMsg};
use weft_ebpf_maps::{SockKey, names, programs};

use super::bpf::{self, CGROUP_PROGRAMS, Layout};

/// One hook and whether it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `cgroup/connect4`, `sk_lookup` …
    pub name: &'static str,
    /// `Err(why)` when it does not.
    pub result: Result<(), String>,
}

/// Tries every hook with the object at `object`, using scratch state under `cgroup_root`
/// and `bpffs_root`.
pub fn check(object: &Path, cgroup_root: &Path, bpffs_root: &Path) -> Vec<Hook> {
    let scratch = Layout {
        root: bpffs_root.join(format!("check-{}", std::process::id())),
    };
    let out = run(object, cgroup_root, &scratch);
    let _ = bpf::uninstall(&scratch);
    out
}

fn hook(name: &'static str, result: Result<(), String>) -> Hook {
    Hook { name, result }
}

fn run(object: &Path, cgroup_root: &Path, scratch: &Layout) -> Vec<Hook> {
    let mut out = Vec::new();
    if let Err(e) = bpf::ensure_bpffs(&scratch.root) {
        out.push(hook("bpffs", Err(error_chain(&e))));
        return out;
    }
    let mut ebpf = match bpf::load_programs(object, scratch) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            let name = match &e {
                bpf::BpfError::Program { hook, .. } => hook,
                _ => "eBPF object",
            };
            out.push(hook(name, Err(error_chain(&e))));
            return out;
        }
    };
    // A scratch cgroup: attaching at the root itself would affect the node.
    let cgroup_dir = cgroup_root.join(format!("weft-check-{}", std::process::id()));
    let cgroup = std::fs::create_dir_all(&cgroup_dir)
        .and_then(|()| File::open(&cgroup_dir))
        .map_err(|e| format!("cgroup v2 at {}: {e}", cgroup_root.display()));
    for (name, attach_type, hook_name) in CGROUP_PROGRAMS {
        let result = cgroup.as_ref().map_err(Clone::clone).and_then(|cg| {
            let program = ebpf.program(name).ok_or("missing from the object")?;
            let fd = program.fd().map_err(|e| e.to_string())?;
            use std::os::fd::AsFd as _;
            // Dropping the link detaches it.
            bpf::sys::link_create(fd.as_fd(), cg.as_fd(), attach_type)
                .map(drop)
                .map_err(|e| e.to_string())
        });
        out.push(hook(hook_name, result));
    }
    drop(cgroup);
    let _ = std::fs::remove_dir(&cgroup_dir);

    let sk_msg = (|| -> Result<(), String> {
        let map = ebpf.map(names::SOCKS).ok_or("no SOCKS map")?;
        let socks: SockHash<&MapData, SockKey> =
            SockHash::try_from(map).map_err(|e| e.to_string())?;
        let fd = socks.fd().try_clone().map_err(|e| e.to_string())?;
        let program: &mut SkMsg = ebpf
            .program_mut(programs::SK_MSG)
            .ok_or("missing from the object")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        let id = program.attach(&fd).map_err(|e| e.to_string())?;
        program.detach(id).map_err(|e| e.to_string())
    })();
    out.push(hook("sk_msg", sk_msg));

    let sk_lookup = (|| -> Result<(), String> {
        let program: &mut SkLookup = ebpf
            .program_mut(programs::SK_LOOKUP)
            .ok_or("missing from the object")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        // A network namespace of a thread of our own, gone when the thread ends.
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("unshare: {e}"))?;
                let ns = File::open("/proc/thread-self/ns/net").map_err(|e| e.to_string())?;
                let id = program.attach(ns).map_err(|e| e.to_string())?;
                program.detach(id).map_err(|e| e.to_string())
            })
            .join()
            .map_err(|_| "thread panicked".to_owned())?
        })
    })();
    out.push(hook("sk_lookup", sk_lookup));
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

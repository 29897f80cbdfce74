//! The eBPF object in the kernel: loading it, attaching its programs, and pinning what must
//! outlive the agent.
//!
//! Everything lives under one bpffs directory per agent instance ([`Layout`]):
//!
//! ```text
//! <root>/maps/<MAP>          maps, pinned by name (reused as they are on restart)
//! <root>/links/<program>     cgroup links at the cgroup root (connect4, connect6, sockops, getsockopt)
//! <root>/pods/<cookie>       one sk_lookup link per meshed pod's network namespace
//! ```
//!
//! While the agent is down, the pinned links keep the programs attached and the programs keep
//! using the pinned maps: traffic flows on, only changes in the set of pods wait for the agent.
//! The `sk_msg` program hangs off the `SOCKS` map itself (the kernel keeps it as long as the
//! map lives) and is attached again, identically, at each start.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray, SockHash};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{Program, ProgramError, SkLookup, SkMsg};
use aya::{Ebpf, EbpfError, EbpfLoader};
use tracing::{debug, info, warn};
use weft_ebpf_maps::{
    Addr, CidrKey, IfaceKey, ListenerKey, OrigDst, PodConfig, PodIp, PortKey, SockKey, names,
    programs,
};

/// The object's file name, looked for beside the executable by default.
pub const OBJECT_FILE: &str = "weft-ebpf.o";
/// Environment variable naming the object (the `--bpf-object` flag wins).
pub const ENV_BPF_OBJECT: &str = "WEFT_BPF_OBJECT";
/// Where bpffs is mounted.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// Parent of the instances' pin directories.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/weft";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors loading, attaching and pinning.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The object file is not there.
    #[error(
        "eBPF object {0} not found (build it with `cargo xtask test` or `cargo xtask demo`, or \
         pass --bpf-object / {ENV_BPF_OBJECT})"
    )]
    NoObject(PathBuf),
    /// The object does not load.
    #[error("loading eBPF object {path}")]
    Load {
        /// The object.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<EbpfError>,
    },
    /// A program is missing from the object.
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    /// A map is missing from the object.
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    /// The kernel refused a program or its attachment.
    #[error("eBPF program {name} ({hook}): the kernel refused it")]
    Program {
        /// The program.
        name: &'static str,
        /// The hook it needs.
        hook: &'static str,
        /// Why.
        #[source]
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("eBPF map {name}")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        #[source]
        source: MapError,
    },
    /// Pinned maps of another layout are in the way.
    #[error(
        "pinned map {path} has key/value sizes {found:?}, this agent needs {want:?}: state of \
         an incompatible version; run `weft-redirector node --uninstall` first"
    )]
    Incompatible {
        /// The pinned map.
        path: PathBuf,
        /// Its key and value sizes.
        found: (u32, u32),
        /// What this build uses.
        want: (u32, u32),
    },
    /// A filesystem or system call failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BpfError {
    let path = path.to_owned();
    move |source| BpfError::Io { what, path, source }
}

/// The pin directory of one agent instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `<bpffs>/weft/<instance>`.
    pub root: PathBuf,
}

impl Layout {
    /// Maps, pinned by name.
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// The pinned map `name`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    /// The cgroup link of `program`.
    pub fn link(&self, program: &str) -> PathBuf {
        self.root.join("links").join(program)
    }

    /// The sk_lookup links of pods.
    pub fn pods(&self) -> PathBuf {
        self.root.join("pods")
    }

    /// The sk_lookup link of the pod whose network namespace has `cookie`.
    pub fn pod(&self, cookie: u64) -> PathBuf {
        self.pods().join(cookie.to_string())
    }

    /// The cookies of the pods with a pinned sk_lookup link.
    pub fn pinned_pods(&self) -> Result<Vec<u64>, BpfError> {
        let dir = self.pods();
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("listing", &dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &dir))?;
            if let Some(cookie) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(cookie);
            }
        }
        Ok(out)
    }
}

/// The cgroup programs: name, attach type (`enum bpf_attach_type`), hook.
pub const CGROUP_PROGRAMS: [(&str, u32, &str); 4] = [
    (
        programs::CONNECT4,
        sys::BPF_CGROUP_INET4_CONNECT,
        "cgroup/connect4",
    ),
    (
        programs::CONNECT6,
        sys::BPF_CGROUP_INET6_CONNECT,
        "cgroup/connect6",
    ),
    (programs::SOCK_OPS, sys::BPF_CGROUP_SOCK_OPS, "sockops"),
    (
        programs::GETSOCKOPT,
        sys::BPF_CGROUP_GETSOCKOPT,
        "cgroup/getsockopt",
    ),
];

/// The maps, taken out of the object.
pub struct Maps {
    /// `PODS`.
    pub pods: HashMap<MapData, u64, PodConfig>,
    /// `POD_IPS`.
    pub pod_ips: HashMap<MapData, Addr, PodIp>,
    /// `PORT_RULES`.
    pub port_rules: HashMap<MapData, PortKey, u32>,
    /// `OUT_EXCL_CIDRS`.
    pub out_excl: LpmTrie<MapData, CidrKey, u32>,
    /// `OUT_INCL_CIDRS`.
    pub out_incl: LpmTrie<MapData, CidrKey, u32>,
    /// `IFACE_EXCL`.
    pub iface_excl: HashMap<MapData, IfaceKey, u32>,
    /// `CONNECTS`.
    pub connects: HashMap<MapData, u64, OrigDst>,
    /// `ORIG_DST`.
    pub orig_dst: HashMap<MapData, SockKey, OrigDst>,
    /// `SOCKS`.
    pub socks: SockHash<MapData, SockKey>,
    /// `TAINTED`.
    pub tainted: HashMap<MapData, SockKey, u32>,
    /// `LISTENERS`.
    pub listeners: SockHash<MapData, ListenerKey>,
    /// `COUNTERS`.
    pub counters: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps").finish_non_exhaustive()
    }
}

impl Maps {
    /// The number of entries of each map but the counters, by name (iterating the keys).
    pub fn sizes(&self) -> Vec<(&'static str, usize)> {
        fn n<K: aya::Pod>(keys: aya::maps::MapKeys<'_, K>) -> usize {
            keys.filter(Result::is_ok).count()
        }
        vec![
            (names::PODS, n(self.pods.keys())),
            (names::POD_IPS, n(self.pod_ips.keys())),
            (names::PORT_RULES, n(self.port_rules.keys())),
            (names::OUT_EXCL_CIDRS, n(self.out_excl.keys())),
            (names::OUT_INCL_CIDRS, n(self.out_incl.keys())),
            (names::IFACE_EXCL, n(self.iface_excl.keys())),
            (names::CONNECTS, n(self.connects.keys())),
            (names::ORIG_DST, n(self.orig_dst.keys())),
            (names::SOCKS, n(self.socks.keys())),
            (names::TAINTED, n(self.tainted.keys())),
            (names::LISTENERS, n(self.listeners.keys())),
        ]
    }

    /// The kernel counters summed over CPUs, by [`weft_ebpf_maps::Counter`] index.
    pub fn counters(&self) -> Vec<u64> {
        (0..weft_ebpf_maps::Counter::COUNT)
            .map(|i| {
                self.counters
                    .get(&i, 0)
                    .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
                    .unwrap_or(0)
            })
            .collect()
    }
}

/// The loaded object with its programs attached.
pub struct Loaded {
    /// The object (programs; the maps are in [`Loaded::maps`]).
    pub ebpf: Ebpf,
    /// The maps.
    pub maps: Maps,
    /// Whether the cgroup links were already pinned (a restart).
    pub reused_links: bool,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("reused_links", &self.reused_links)
            .finish_non_exhaustive()
    }
}

/// The object to load: `flag`, else `$WEFT_BPF_OBJECT`, else `weft-ebpf.o` beside the
/// executable. It must exist.
pub fn object_path(flag: Option<&Path>) -> Result<PathBuf, BpfError> {
    let path = match flag {
        Some(p) => p.to_owned(),
        None => match std::env::var_os(ENV_BPF_OBJECT) {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join(OBJECT_FILE)))
                .unwrap_or_else(|| PathBuf::from(OBJECT_FILE)),
        },
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(BpfError::NoObject(path))
    }
}

/// Mounts bpffs at [`BPFFS_MOUNT`] when `dir` is not on one, and creates `dir`.
pub fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let on_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    let mount = Path::new(BPFFS_MOUNT);
    if dir.starts_with(mount) && !on_bpffs(mount) {
        std::fs::create_dir_all(mount).map_err(io_err("creating", mount))?;
        nix::mount::mount(
            Some("bpf"),
            mount,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| io_err("mounting bpffs at", mount)(io::Error::from(e)))?;
        info!(path = %mount.display(), "mounted bpffs");
    }
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let parent_on_bpffs = dir.ancestors().any(|a| a.exists() && on_bpffs(a));
    if !parent_on_bpffs {
        return Err(io_err("pins need a bpf filesystem at", dir)(
            io::Error::other("not on bpffs"),
        ));
    }
    Ok(())
}

/// Key and value sizes of every map, as this build uses them.
fn map_layout(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    let s = |k: usize, v: usize| Some((k as u32, v as u32));
    match name {
        names::PODS => s(size_of::<u64>(), size_of::<PodConfig>()),
        names::POD_IPS => s(size_of::<Addr>(), size_of::<PodIp>()),
        names::PORT_RULES => s(size_of::<PortKey>(), 4),
        names::OUT_EXCL_CIDRS | names::OUT_INCL_CIDRS => s(4 + size_of::<CidrKey>(), 4),
        names::IFACE_EXCL => s(size_of::<IfaceKey>(), 4),
        names::CONNECTS => s(8, size_of::<OrigDst>()),
        names::ORIG_DST => s(size_of::<SockKey>(), size_of::<OrigDst>()),
        names::SOCKS => s(size_of::<SockKey>(), 4),
        names::TAINTED => s(size_of::<SockKey>(), 4),
        names::LISTENERS => s(size_of::<ListenerKey>(), 4),
        names::COUNTERS => s(4, 8),
        _ => None,
    }
}

/// Refuses pinned maps whose key or value size differ from this build's.
fn check_pinned_maps(layout: &Layout) -> Result<(), BpfError> {
    for name in names::ALL {
        let path = layout.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|source| BpfError::Map { name, source })?;
        let found = (info.key_size(), info.value_size());
        let Some(want) = map_layout(name) else {
            continue;
        };
        if found != want {
            return Err(BpfError::Incompatible { path, found, want });
        }
    }
    Ok(())
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Program, BpfError> {
    ebpf.program_mut(name).ok_or(BpfError::MissingProgram(name))
}

fn hook_of(name: &str) -> &'static str {
    CGROUP_PROGRAMS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, h)| *h)
        .unwrap_or(match name {
            programs::SK_MSG => "sk_msg",
            programs::SK_LOOKUP => "sk_lookup",
            _ => "?",
        })
}

/// Loads the object's programs into the kernel (maps reused from `layout` when pinned).
pub fn load_programs(object: &Path, layout: &Layout) -> Result<Ebpf, BpfError> {
    std::fs::create_dir_all(layout.maps()).map_err(io_err("creating", &layout.maps()))?;
    check_pinned_maps(layout)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(layout.maps())
        .load_file(object)
        .map_err(|source| BpfError::Load {
            path: object.to_owned(),
            source: Box::new(source),
        })?;
    for name in CGROUP_PROGRAMS
        .iter()
        .map(|(n, _, _)| *n)
        .chain([programs::SK_MSG, programs::SK_LOOKUP])
    {
        let hook = hook_of(name);
        let program = program_mut(&mut ebpf, name)?;
        let loaded = match program {
            Program::CgroupSockAddr(p) => p.load(),
            Program::SockOps(p) => p.load(),
            Program::CgroupSockopt(p) => p.load(),
            Program::SkMsg(p) => p.load(),
            Program::SkLookup(p) => p.load(),
            _ => return Err(BpfError::MissingProgram(name)),
        };
        loaded.map_err(|source| BpfError::Program { name, hook, source })?;
    }
    Ok(ebpf)
}

/// Loads the object and attaches everything: the cgroup programs at `cgroup_root` (kept if
/// already pinned from an earlier run) and `sk_msg` on the sockhash.
pub fn load(object: &Path, layout: &Layout, cgroup_root: &Path) -> Result<Loaded, BpfError> {
    ensure_bpffs(&layout.root)?;
    let links = layout.root.join("links");
    std::fs::create_dir_all(&links).map_err(io_err("creating", &links))?;
    std::fs::create_dir_all(layout.pods()).map_err(io_err("creating", &layout.pods()))?;
    let mut ebpf = load_programs(object, layout)?;
    let cgroup = File::open(cgroup_root).map_err(io_err("opening cgroup", cgroup_root))?;
    let mut reused = 0;
    for (name, attach_type, hook) in CGROUP_PROGRAMS {
        let pin = layout.link(name);
        if pin.exists() {
            match PinnedLink::from_pin(&pin) {
                Ok(_) => {
                    reused += 1;
                    debug!(program = name, "pinned link kept");
                    continue;
                }
                Err(error) => {
                    warn!(program = name, %error, "pinned link unusable, attaching again");
                    std::fs::remove_file(&pin).map_err(io_err("removing", &pin))?;
                }
            }
        }
        let program = program_mut(&mut ebpf, name)?;
        let prog_fd = program
            .fd()
            .map_err(|source| BpfError::Program { name, hook, source })?;
        let link = sys::link_create(prog_fd.as_fd(), cgroup.as_fd(), attach_type)
            .map_err(io_err("attaching to cgroup", cgroup_root))?;
        sys::obj_pin(link.as_fd(), &pin).map_err(io_err("pinning", &pin))?;
        info!(program = name, hook, cgroup = %cgroup_root.display(), "attached");
    }
    attach_sk_msg(&mut ebpf)?;
    let maps = take_maps(&mut ebpf)?;
    Ok(Loaded {
        ebpf,
        maps,
        reused_links: reused == CGROUP_PROGRAMS.len(),
    })
}

fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<(), BpfError> {
    let name = programs::SK_MSG;
    let hook = "sk_msg";
    let map = ebpf
        .map(names::SOCKS)
        .ok_or(BpfError::MissingMap(names::SOCKS))?;
    let socks: SockHash<&MapData, SockKey> =
        SockHash::try_from(map).map_err(|source| BpfError::Map {
            name: names::SOCKS,
            source,
        })?;
    let map_fd = socks
        .fd()
        .try_clone()
        .map_err(io_err("duplicating", Path::new(names::SOCKS)))?;
    let program: &mut SkMsg = program_mut(ebpf, name)?
        .try_into()
        .map_err(|source| BpfError::Program { name, hook, source })?;
    let id = program
        .attach(&map_fd)
        .map_err(|source| BpfError::Program { name, hook, source })?;
    let link = program
        .take_link(id)
        .map_err(|source| BpfError::Program { name, hook, source })?;
    // The attachment belongs to the map (kept by its pin), not to this handle, whose drop
    // would detach the program.
    std::mem::forget(link);
    Ok(())
}

fn take_maps(ebpf: &mut Ebpf) -> Result<Maps, BpfError> {
    fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
        ebpf: &mut Ebpf,
        name: &'static str,
    ) -> Result<T, BpfError> {
        let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
        T::try_from(map).map_err(|source| BpfError::Map { name, source })
    }
    Ok(Maps {
        pods: take(ebpf, names::PODS)?,
        pod_ips: take(ebpf, names::POD_IPS)?,
        port_rules: take(ebpf, names::PORT_RULES)?,
        out_excl: take(ebpf, names::OUT_EXCL_CIDRS)?,
        out_incl: take(ebpf, names::OUT_INCL_CIDRS)?,
        iface_excl: take(ebpf, names::IFACE_EXCL)?,
        connects: take(ebpf, names::CONNECTS)?,
        orig_dst: take(ebpf, names::ORIG_DST)?,
        socks: take(ebpf, names::SOCKS)?,
        tainted: take(ebpf, names::TAINTED)?,
        listeners: take(ebpf, names::LISTENERS)?,
        counters: take(ebpf, names::COUNTERS)?,
    })
}

/// Attaches `sk_lookup` to the network namespace at `netns` and pins the link for `cookie`
/// (nothing to do when pinned already).
pub fn attach_pod(
    ebpf: &mut Ebpf,
    layout: &Layout,
    cookie: u64,
    netns: &File,
) -> Result<(), BpfError> {
    let pin = layout.pod(cookie);
    if pin.exists() {
        return Ok(());
    }
    let name = programs::SK_LOOKUP;
    let hook = "sk_lookup";
    let program: &mut SkLookup = program_mut(ebpf, name)?
        .try_into()
        .map_err(|source| BpfError::Program { name, hook, source })?;
    let id = program
        .attach(netns)
        .map_err(|source| BpfError::Program { name, hook, source })?;
    let link: FdLink = program
        .take_link(id)
        .map_err(|source| BpfError::Program { name, hook, source })?
        .into();
    link.pin(&pin)
        .map_err(|e| io_err("pinning", &pin)(io::Error::other(e)))?;
    Ok(())
}

/// Unpins the `sk_lookup` link of `cookie`; the namespace's lookups are no longer captured.
pub fn detach_pod(layout: &Layout, cookie: u64) -> Result<(), BpfError> {
    let pin = layout.pod(cookie);
    match std::fs::remove_file(&pin) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", &pin)(e)),
        _ => Ok(()),
    }
}

/// Removes every pin of the instance: links detach, and maps and programs go when nothing
/// holds them any more. Running agents of that instance must be stopped first.
pub fn uninstall(layout: &Layout) -> Result<usize, BpfError> {
    if !layout.root.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    // Links first (traffic stops being redirected), then the maps.
    for dir in [layout.root.join("links"), layout.pods(), layout.maps()] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.map_err(io_err("listing", &dir))?.path();
            std::fs::remove_file(&path).map_err(io_err("removing", &path))?;
            removed += 1;
        }
        std::fs::remove_dir(&dir).map_err(io_err("removing", &dir))?;
    }
    std::fs::remove_dir(&layout.root).map_err(io_err("removing", &layout.root))?;
    Ok(removed)
}

/// The two `bpf(2)` commands aya 0.14 does not offer for every program type: a cgroup
/// `bpf_link` for `cgroup/getsockopt` that can be pinned (aya keeps that link private), used
/// alike for all four cgroup programs.
pub mod sys {
    #![expect(
        unsafe_code,
        reason = "bpf(2) has no safe wrapper for these two commands"
    )]

    use std::ffi::CString;
    use std::io;
    use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
    use std::os::unix::ffi::OsStrExt as _;
    use std::path::Path;

    /// `BPF_CGROUP_INET4_CONNECT`.
    pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    /// `BPF_CGROUP_INET6_CONNECT`.
    pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
    /// `BPF_CGROUP_SOCK_OPS`.
    pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
    /// `BPF_CGROUP_GETSOCKOPT`.
    pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;
    const BPF_OBJ_PIN: i64 = 6;
    const BPF_LINK_CREATE: i64 = 28;

    /// `union bpf_attr`, zeroed, as 32-bit words (the kernel reads the prefix it knows).
    #[repr(C, align(8))]
    struct Attr([u32; 32]);

    fn bpf(cmd: i64, attr: &mut Attr) -> io::Result<i64> {
        // SAFETY: `attr` is a valid, initialised `union bpf_attr` prefix of the size passed;
        // the kernel only reads it (and writes nothing back for these commands).
        let r = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_bpf,
                cmd,
                std::ptr::from_mut(attr),
                size_of::<Attr>(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// `BPF_LINK_CREATE` of `prog` on the cgroup `target` with `attach_type`.
    pub fn link_create(
        prog: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attach_type: u32,
    ) -> io::Result<OwnedFd> {
        let mut attr = Attr([0; 32]);
        attr.0[0] = prog.as_raw_fd() as u32;
        attr.0[1] = target.as_raw_fd() as u32;
        attr.0[2] = attach_type;
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// `BPF_OBJ_PIN` of `fd` at `path` (on bpffs).
    pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut attr = Attr([0; 32]);
        let ptr = path.as_ptr() as u64;
        attr.0[0] = ptr as u32;
        attr.0[1] = (ptr >> 32) as u32;
        attr.0[2] = fd.as_raw_fd() as u32;
        bpf(BPF_OBJ_PIN, &mut attr)?;
        Ok(())
    }
}

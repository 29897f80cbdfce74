//! The maps, pinned by name in the agent's directory so that they outlive it, and the
//! lookups the programs share.

use core::ptr;

use aya_ebpf::macros::map;
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash};
use weft_ebpf_maps::{
    Addr, CidrKey, Counter, IfaceKey, ListenerKey, OrigDst, PodConfig, PodIp, PortKey, Rules,
    SockKey, capacity,
};

#[map]
pub static PODS: HashMap<u64, PodConfig> = HashMap::pinned(capacity::PODS, 0);

#[map]
pub static POD_IPS: HashMap<Addr, PodIp> = HashMap::pinned(capacity::POD_IPS, 0);

#[map]
pub static PORT_RULES: HashMap<PortKey, u32> = HashMap::pinned(capacity::PORT_RULES, 0);

#[map]
pub static OUT_EXCL_CIDRS: LpmTrie<CidrKey, u32> = LpmTrie::pinned(capacity::CIDRS, 0);

#[map]
pub static OUT_INCL_CIDRS: LpmTrie<CidrKey, u32> = LpmTrie::pinned(capacity::CIDRS, 0);

#[map]
pub static IFACE_EXCL: HashMap<IfaceKey, u32> = HashMap::pinned(capacity::IFACES, 0);

#[map]
pub static CONNECTS: LruHashMap<u64, OrigDst> = LruHashMap::pinned(capacity::CONNECTIONS, 0);

#[map]
pub static ORIG_DST: LruHashMap<SockKey, OrigDst> = LruHashMap::pinned(capacity::CONNECTIONS, 0);

#[map]
pub static SOCKS: SockHash<SockKey> = SockHash::pinned(capacity::CONNECTIONS, 0);

#[map]
pub static TAINTED: LruHashMap<SockKey, u32> = LruHashMap::pinned(capacity::CONNECTIONS, 0);

#[map]
pub static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(capacity::LISTENERS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot of this map, valid while the program runs; no other program
        // runs on this CPU meanwhile.
        unsafe { *p += 1 };
    }
}

/// The configuration of the pod whose network namespace has cookie `netns`, if meshed.
#[inline(always)]
pub fn pod(netns: u64) -> Option<PodConfig> {
    // SAFETY: the value is copied out at once; the agent replaces values whole.
    unsafe { PODS.get(&netns) }.copied()
}

/// The pod that owns `addr`.
#[inline(always)]
pub fn owner(addr: &Addr) -> Option<u64> {
    // SAFETY: as in `pod`.
    unsafe { POD_IPS.get(addr) }.map(|p| p.netns)
}

/// Reads a `u32` field of a context, one 4-byte load (the verifier refuses wider loads of
/// many context fields, and LLVM would merge adjacent ones).
#[inline(always)]
pub fn read_u32(field: *const u32) -> u32 {
    // SAFETY: callers pass a field of the program's context, valid while it runs.
    unsafe { ptr::read_volatile(field) }
}

/// Reads a four-word address field of a context word by word.
#[inline(always)]
pub fn read_ip6(field: *const [u32; 4]) -> [u32; 4] {
    let p = field.cast::<u32>();
    // SAFETY: as in `read_u32`; the four words are inside the field.
    unsafe {
        [
            read_u32(p),
            read_u32(p.add(1)),
            read_u32(p.add(2)),
            read_u32(p.add(3)),
        ]
    }
}

/// The pod's lists, looked up in the maps.
pub struct PodRules {
    /// The pod.
    pub netns: u64,
}

impl Rules for PodRules {
    #[inline(always)]
    fn port(&self, port: u16) -> u32 {
        // SAFETY: copied out at once.
        unsafe { PORT_RULES.get(&PortKey::new(self.netns, port)) }
            .copied()
            .unwrap_or(0)
    }

    #[inline(always)]
    fn outbound_excluded(&self, dst: &Addr) -> bool {
        OUT_EXCL_CIDRS
            .get(Key::new(CidrKey::FULL, CidrKey::new(self.netns, dst)))
            .is_some()
    }

    #[inline(always)]
    fn outbound_included(&self, dst: &Addr) -> bool {
        OUT_INCL_CIDRS
            .get(Key::new(CidrKey::FULL, CidrKey::new(self.netns, dst)))
            .is_some()
    }

    #[inline(always)]
    fn is_own(&self, addr: &Addr) -> bool {
        owner(addr) == Some(self.netns)
    }

    #[inline(always)]
    fn iface_excluded(&self, ifindex: u32) -> bool {
        let key = IfaceKey {
            netns: self.netns,
            ifindex,
            pad: 0,
        };
        // SAFETY: only presence is read.
        unsafe { IFACE_EXCL.get(&key) }.is_some()
    }
}

/// Records that a redirected socket `key` (the proxy's side) was going to `orig`.
#[inline(always)]
pub fn remember(key: &SockKey, orig: &OrigDst) {
    if ORIG_DST.insert(key, orig, 0).is_err() {
        count(Counter::MapUpdateFailed);
    }
}

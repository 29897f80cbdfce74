//! Load balancing: which endpoint of a cluster gets a request or connection.
//!
//! Policies: least request (Istio's default) as power of two choices on live load (two
//! candidates drawn by weight, the one with the lower in-flight requests times peak latency
//! EWMA wins), weighted round robin, weighted random, passthrough to the original destination,
//! and consistent hashing on a request attribute with a Ketama ring or a Maglev table. Endpoints an outlier check ejected are skipped (unless fewer than
//! `minHealthPercent` remain: Envoy's panic mode), endpoints tried before are avoided on
//! retries (Istio's `previous_hosts` predicate), and new endpoints ramp up over the warmup
//! window (Envoy's slow start, linear, from 10%).
//!
//! Live state (in-flight count, latency EWMA, outlier counters, age for warmup) lives in
//! [`EndpointState`], one per endpoint address of a cluster, carried from one config version to
//! the next so that a reload neither forgets nor resets it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use tokio::time::Instant;
use weft_api::config::{self as model, HashAlgorithm, HashKey, LbPolicy};

use crate::breaker::Breaker;
use crate::outlier::{OutlierPolicy, OutlierState};
use crate::retry::Budget;
use crate::route::query_param;
use crate::snapshot::Endpoint;

/// Latency assumed for an endpoint that has not answered yet, and the floor of every estimate:
/// below it differences are scheduling noise rather than load, so idle endpoints tie and share
/// traffic by weight instead of one taking all of it for a few microseconds' edge.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Decay time of the latency EWMA (linkerd's default).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Share of its weight a brand-new endpoint starts with during warmup (Envoy's default).
const WARMUP_MIN_FACTOR: f64 = 0.1;
/// Largest weight honoured by the round-robin schedule.
const MAX_SCHEDULE_WEIGHT: u32 = 100;
/// Largest Ketama ring, in points.
const MAX_RING_SIZE: u64 = 1 << 20;

/// A stable 64-bit hash (FNV-1a, then MurmurHash3's finaliser for avalanche). Stable across
/// processes and versions, which consistent hashing needs; a dozen lines did not justify a
/// dependency.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    fmix64(h)
}

fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Live state of one endpoint of one cluster.
#[derive(Debug)]
pub struct EndpointState {
    in_flight: Arc<AtomicU32>,
    /// Peak EWMA of the time to response headers, nanoseconds as `f64` bits; 0: no sample.
    ewma: AtomicU64,
    /// When the EWMA was last updated, nanoseconds after `base`.
    ewma_at: AtomicU64,
    base: Instant,
    /// Outlier detection.
    pub outlier: OutlierState,
}

impl Default for EndpointState {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts a request in flight to an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EndpointState {
    /// A fresh endpoint, born now (for warmup).
    pub fn new() -> Self {
        EndpointState {
            in_flight: Arc::new(AtomicU32::new(0)),
            ewma: AtomicU64::new(0),
            ewma_at: AtomicU64::new(0),
            base: Instant::now(),
            outlier: OutlierState::new(),
        }
    }

    /// Counts one request until the guard drops.
    pub fn start(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.in_flight.clone())
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    fn since_base(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Folds one latency sample into the peak EWMA: a slower sample takes over at once, faster
    /// ones pull it down over [`EWMA_DECAY`].
    pub fn observe_latency(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let at = self.since_base(now);
        let prev_at = self.ewma_at.swap(at, Ordering::AcqRel);
        let prev = f64::from_bits(self.ewma.load(Ordering::Acquire));
        let next = if prev == 0.0 || sample > prev {
            sample
        } else {
            let elapsed = at.saturating_sub(prev_at) as f64;
            let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            prev * w + sample * (1.0 - w)
        };
        self.ewma.store(next.to_bits(), Ordering::Release);
    }

    /// The latency estimate at `now`, nanoseconds: the EWMA decayed over the time since its
    /// last sample (as linkerd's peak EWMA does, so that one slow answer does not keep an
    /// endpoint out of rotation forever), never below [`DEFAULT_RTT`].
    pub fn latency(&self, now: Instant) -> f64 {
        let floor = DEFAULT_RTT.as_nanos() as f64;
        let v = f64::from_bits(self.ewma.load(Ordering::Acquire));
        if v <= floor {
            return floor;
        }
        let elapsed = self
            .since_base(now)
            .saturating_sub(self.ewma_at.load(Ordering::Acquire)) as f64;
        (v * (-elapsed / EWMA_DECAY.as_nanos() as f64).exp()).max(floor)
    }

    /// Share of its weight the endpoint gets `window` into its life: linear from 10%.
    pub fn warmup_factor(&self, now: Instant, window: Option<Duration>) -> f64 {
        let Some(window) = window.filter(|w| !w.is_zero()) else {
            return 1.0;
        };
        let age = now.saturating_duration_since(self.base);
        if age >= window {
            return 1.0;
        }
        (age.as_secs_f64() / window.as_secs_f64()).max(WARMUP_MIN_FACTOR)
    }
}

/// A cluster's live state: one [`EndpointState`] per endpoint (same order as the config's
/// endpoints), plus its circuit breaker and retry budget.
#[derive(Debug)]
pub struct ClusterState {
    /// Per endpoint.
    pub endpoints: Vec<Arc<EndpointState>>,
    /// Circuit breaker counters.
    pub breaker: Arc<Breaker>,
    /// Retries in flight.
    pub budget: Arc<Budget>,
}

impl ClusterState {
    /// State for `endpoints`, taking over whatever `previous` (the same cluster in the config
    /// being replaced) knew about the same addresses.
    pub fn new(
        endpoints: &[Endpoint],
        previous: Option<&ClusterState>,
        prev_eps: &[Endpoint],
    ) -> Self {
        let old: HashMap<SocketAddr, &Arc<EndpointState>> = match previous {
            Some(p) => prev_eps
                .iter()
                .map(|e| e.addr)
                .zip(p.endpoints.iter())
                .collect(),
            None => HashMap::new(),
        };
        ClusterState {
            endpoints: endpoints
                .iter()
                .map(|e| {
                    old.get(&e.addr)
                        .map(|s| Arc::clone(s))
                        .unwrap_or_else(|| Arc::new(EndpointState::new()))
                })
                .collect(),
            breaker: previous.map(|p| p.breaker.clone()).unwrap_or_default(),
            budget: previous.map(|p| p.budget.clone()).unwrap_or_default(),
        }
    }
}

/// A compiled hash policy.
#[derive(Debug, Clone)]
pub enum HashPolicy {
    /// A header's value.
    Header(HeaderName),
    /// A cookie's value, generated when absent.
    Cookie {
        /// Cookie name.
        name: String,
        /// Path of a generated cookie.
        path: Option<String>,
        /// Lifetime of a generated cookie; `None`: a session cookie.
        ttl: Option<Duration>,
    },
    /// The client's IP address.
    SourceIp,
    /// A query parameter.
    Query(String),
}

/// The hash of one request, and the cookie to set when one was generated.
#[derive(Debug, Clone, Default)]
pub struct RequestHash {
    /// The hash; `None`: the attribute is absent (a random endpoint is used, as in Envoy).
    pub hash: Option<u64>,
    /// `Set-Cookie` for the response.
    pub set_cookie: Option<HeaderValue>,
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v.trim_matches('"'))
        })
}

/// A `Set-Cookie` value for a generated hash cookie.
pub fn set_cookie(name: &str, value: &str, path: Option<&str>, ttl: Option<Duration>) -> String {
    let mut c = format!("{name}={value}");
    if let Some(p) = path {
        c.push_str(&format!("; Path={p}"));
    }
    if let Some(t) = ttl {
        c.push_str(&format!("; Max-Age={}", t.as_secs()));
    }
    c.push_str("; HttpOnly");
    c
}

static COOKIE_SEQ: AtomicU64 = AtomicU64::new(0);

/// The hash of a client address (source-IP hashing, for requests and connections).
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash64(&v4.octets()),
        IpAddr::V6(v6) => hash64(&v6.octets()),
    }
}

impl HashPolicy {
    /// Compiles a key; `None` for an invalid header name.
    pub fn compile(key: &HashKey) -> Option<HashPolicy> {
        Some(match key {
            HashKey::Header(h) => {
                HashPolicy::Header(HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()?)
            }
            HashKey::Cookie { name, path, ttl_ms } => HashPolicy::Cookie {
                name: name.clone(),
                path: path.clone(),
                ttl: ttl_ms.map(Duration::from_millis),
            },
            HashKey::SourceIp => HashPolicy::SourceIp,
            HashKey::QueryParameter(q) => HashPolicy::Query(q.clone()),
        })
    }

    /// Hashes a request from `client`.
    pub fn hash(&self, parts: &Parts, client: IpAddr) -> RequestHash {
        let hash = |b: &[u8]| RequestHash {
            hash: Some(hash64(b)),
            set_cookie: None,
        };
        match self {
            HashPolicy::Header(name) => match parts.headers.get(name) {
                Some(v) => hash(v.as_bytes()),
                None => RequestHash::default(),
            },
            HashPolicy::SourceIp => RequestHash {
                hash: Some(hash_ip(client)),
                set_cookie: None,
            },
            HashPolicy::Query(name) => match query_param(parts.uri.query(), name) {
                Some(v) => hash(v.as_bytes()),
                None => RequestHash::default(),
            },
            HashPolicy::Cookie { name, path, ttl } => {
                if let Some(v) = cookie(parts, name) {
                    return hash(v.as_bytes());
                }
                // Envoy derives the value from the client address; a sequence number keeps
                // clients behind one address apart.
                let seq = COOKIE_SEQ.fetch_add(1, Ordering::Relaxed);
                let value = format!("{:016x}", hash64(format!("{client}/{seq}").as_bytes()));
                RequestHash {
                    hash: Some(hash64(value.as_bytes())),
                    set_cookie: HeaderValue::from_str(&set_cookie(
                        name,
                        &value,
                        path.as_deref(),
                        *ttl,
                    ))
                    .ok(),
                }
            }
        }
    }
}

/// A Ketama ring: points on a 64-bit circle, each owned by an endpoint.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// Builds the ring. Each endpoint gets `min_size` points scaled by its weight relative to
    /// the heaviest (Ketama's fixed points per server, so that adding or removing an endpoint
    /// moves only that endpoint's keys), hashed from `"<addr>_<i>"` as Envoy does; the ring
    /// is capped at [`MAX_RING_SIZE`] points.
    pub fn build(endpoints: &[Endpoint], weights: &[u32], min_size: u32) -> Ring {
        let n = endpoints.len().max(1) as u64;
        let per_host = u64::from(min_size.max(1)).min(MAX_RING_SIZE / n).max(1);
        let max_w = u64::from(weights.iter().copied().max().unwrap_or(1).max(1));
        let mut points = Vec::new();
        for (i, (e, w)) in endpoints.iter().zip(weights).enumerate() {
            let share = (per_host * u64::from(*w).max(1)).div_ceil(max_w).max(1);
            let addr = e.addr.to_string();
            for k in 0..share {
                points.push((hash64(format!("{addr}_{k}").as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// Endpoints in ring order from `hash`, each once.
    fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|p| p.0 < hash);
        let n = self.points.len();
        (0..n).map(move |k| self.points[(start + k) % n].1 as usize)
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// A Maglev lookup table.
#[derive(Debug, Clone)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table (size rounded up to a prime), each endpoint filling its preference
    /// list `weight` slots per round.
    pub fn build(endpoints: &[Endpoint], weights: &[u32], table_size: u32) -> Maglev {
        let mut m = u64::from(table_size.max(endpoints.len() as u32).max(2));
        while !is_prime(m) {
            m += 1;
        }
        let n = endpoints.len();
        let mut table = vec![u32::MAX; m as usize];
        if n == 0 {
            return Maglev { table: Vec::new() };
        }
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| {
                let name = e.addr.to_string();
                let offset = hash64(name.as_bytes()) % m;
                let skip = fmix64(hash64(name.as_bytes()) ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut filled = 0u64;
        'fill: loop {
            for i in 0..n {
                for _ in 0..weights[i].max(1) {
                    let (offset, skip) = perms[i];
                    loop {
                        let slot = ((offset + next[i] * skip) % m) as usize;
                        next[i] += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = i as u32;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Maglev { table }
    }

    fn lookup(&self, hash: u64, probe: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let h = if probe == 0 {
            hash
        } else {
            fmix64(hash ^ probe.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        };
        Some(self.table[(h % self.table.len() as u64) as usize] as usize)
    }
}

/// The compiled policy of one cluster.
#[derive(Debug)]
pub enum Balancer {
    /// Weighted round robin over an interleaved schedule.
    RoundRobin {
        /// Endpoint indices, each repeated by weight.
        schedule: Vec<u32>,
        /// Position.
        next: AtomicUsize,
    },
    /// Power of two choices on load.
    LeastRequest,
    /// Weighted random.
    Random,
    /// The original destination.
    Passthrough,
    /// Ketama ring on the request hash.
    Ring(Ring),
    /// Maglev on the request hash.
    Maglev(Maglev),
}

fn schedule(weights: &[u32]) -> Vec<u32> {
    let max = weights
        .iter()
        .map(|w| (*w).min(MAX_SCHEDULE_WEIGHT))
        .max()
        .unwrap_or(0);
    let mut s = Vec::new();
    for round in 0..max {
        for (i, w) in weights.iter().enumerate() {
            if (*w).min(MAX_SCHEDULE_WEIGHT) > round {
                s.push(i as u32);
            }
        }
    }
    s
}

impl Balancer {
    /// Compiles a cluster's policy.
    pub fn compile(lb: &model::LoadBalancer, endpoints: &[Endpoint], weights: &[u32]) -> Balancer {
        if let Some(ch) = &lb.consistent_hash {
            return match ch.algorithm {
                HashAlgorithm::Ring { min_ring_size } => {
                    Balancer::Ring(Ring::build(endpoints, weights, min_ring_size))
                }
                HashAlgorithm::Maglev { table_size } => {
                    Balancer::Maglev(Maglev::build(endpoints, weights, table_size))
                }
            };
        }
        match lb.policy {
            LbPolicy::RoundRobin => Balancer::RoundRobin {
                schedule: schedule(weights),
                next: AtomicUsize::new(0),
            },
            LbPolicy::LeastRequest => Balancer::LeastRequest,
            LbPolicy::Random => Balancer::Random,
            LbPolicy::Passthrough => Balancer::Passthrough,
        }
    }
}

/// What a pick knows about the request.
#[derive(Debug, Clone, Copy)]
pub struct PickContext {
    /// Consistent-hash value, if the cluster hashes and the request has the attribute.
    pub hash: Option<u64>,
    /// The original destination (passthrough).
    pub dst: Option<SocketAddr>,
    /// An endpoint to avoid if another is available (the one the previous try used).
    pub avoid: Option<SocketAddr>,
    /// Now.
    pub now: Instant,
}

impl PickContext {
    /// A context without hash, destination or history.
    pub fn now() -> Self {
        PickContext {
            hash: None,
            dst: None,
            avoid: None,
            now: Instant::now(),
        }
    }
}

/// What the balancer chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// An endpoint of the cluster, by index.
    Endpoint(usize),
    /// The original destination, which the cluster does not list.
    Passthrough(SocketAddr),
}

/// Everything a pick reads.
#[derive(Debug, Clone, Copy)]
pub struct PickInput<'a> {
    /// The endpoints.
    pub endpoints: &'a [Endpoint],
    /// Their weights.
    pub weights: &'a [u32],
    /// Their live state.
    pub states: &'a [Arc<EndpointState>],
    /// Outlier detection, if the cluster has it.
    pub outlier: Option<&'a OutlierPolicy>,
    /// Warmup window.
    pub warmup: Option<Duration>,
}

impl PickInput<'_> {
    /// Indices usable now: not ejected, unless too few remain (panic mode).
    fn availability(&self, now: Instant) -> Availability {
        let Some(policy) = self.outlier else {
            return Availability::All;
        };
        let n = self.states.len();
        let healthy = self
            .states
            .iter()
            .filter(|s| !s.outlier.is_ejected(now))
            .count();
        // Everyone healthy, or too few healthy (panic): use all.
        if healthy == n || healthy * 100 < n * policy.min_health_percent as usize {
            Availability::All
        } else {
            Availability::Healthy
        }
    }

    fn usable(&self, a: Availability, i: usize, now: Instant) -> bool {
        match a {
            Availability::All => true,
            Availability::Healthy => !self.states[i].outlier.is_ejected(now),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Availability {
    All,
    Healthy,
}

impl Balancer {
    /// Picks an endpoint; `None` when none is usable.
    pub fn pick(
        &self,
        input: &PickInput<'_>,
        ctx: &PickContext,
        rng: &mut fastrand::Rng,
    ) -> Option<Choice> {
        let n = input.endpoints.len();
        if let Balancer::Passthrough = self {
            let dst = ctx.dst?;
            return Some(match input.endpoints.iter().position(|e| e.addr == dst) {
                Some(i) => Choice::Endpoint(i),
                None => Choice::Passthrough(dst),
            });
        }
        if n == 0 {
            return None;
        }
        let avail = input.availability(ctx.now);
        let ok = |i: usize| input.usable(avail, i, ctx.now);
        let fresh = |i: usize| Some(input.endpoints[i].addr) != ctx.avoid;
        let first_usable = || {
            (0..n)
                .filter(|i| ok(*i))
                .find(|i| fresh(*i))
                .or_else(|| (0..n).find(|i| ok(*i)))
        };
        let warm = |i: usize, rng: &mut fastrand::Rng| {
            let f = input.states[i].warmup_factor(ctx.now, input.warmup);
            f >= 1.0 || rng.f64() < f
        };
        let chosen = match self {
            Balancer::Passthrough => None,
            Balancer::RoundRobin { schedule, next } => {
                if schedule.is_empty() {
                    None
                } else {
                    let start = next.fetch_add(1, Ordering::Relaxed);
                    let len = schedule.len();
                    let mut found = None;
                    for k in 0..len {
                        let i = schedule[(start + k) % len] as usize;
                        if ok(i) && fresh(i) && warm(i, rng) {
                            if k > 0 {
                                next.fetch_add(k, Ordering::Relaxed);
                            }
                            found = Some(i);
                            break;
                        }
                    }
                    found
                }
            }
            Balancer::Random => {
                let total: u64 = input.weights.iter().map(|w| u64::from(*w).max(1)).sum();
                let mut found = None;
                for _ in 0..8 {
                    let mut roll = rng.u64(..total);
                    let mut i = 0;
                    while i < n {
                        let w = u64::from(input.weights[i]).max(1);
                        if roll < w {
                            break;
                        }
                        roll -= w;
                        i += 1;
                    }
                    let i = i.min(n - 1);
                    if ok(i) && fresh(i) && warm(i, rng) {
                        found = Some(i);
                        break;
                    }
                }
                found
            }
            Balancer::LeastRequest => {
                // Candidates weighted by endpoint weight and warmup, so that idle endpoints
                // (a tie) share traffic by weight; the load alone decides between the two.
                let candidates: Vec<(usize, f64)> = (0..n)
                    .filter(|i| ok(*i) && fresh(*i))
                    .map(|i| {
                        let w = f64::from(input.weights[i].max(1))
                            * input.states[i].warmup_factor(ctx.now, input.warmup);
                        (i, w)
                    })
                    .collect();
                match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0].0),
                    _ => {
                        let total: f64 = candidates.iter().map(|(_, w)| w).sum();
                        let a = weighted_draw(&candidates, total, None, rng);
                        let b = weighted_draw(&candidates, total - candidates[a].1, Some(a), rng);
                        let cost = |k: usize| {
                            let s = &input.states[candidates[k].0];
                            (f64::from(s.in_flight()) + 1.0) * s.latency(ctx.now)
                        };
                        Some(candidates[if cost(b) < cost(a) { b } else { a }].0)
                    }
                }
            }
            Balancer::Ring(ring) => match ctx.hash {
                Some(h) => ring.walk(h).find(|i| ok(*i) && fresh(*i)),
                None => Some(rng.usize(..n)).filter(|i| ok(*i) && fresh(*i)),
            },
            Balancer::Maglev(m) => match ctx.hash {
                Some(h) => (0..16)
                    .filter_map(|probe| m.lookup(h, probe))
                    .find(|i| ok(*i) && fresh(*i)),
                None => Some(rng.usize(..n)).filter(|i| ok(*i) && fresh(*i)),
            },
        };
        chosen.or_else(first_usable).map(Choice::Endpoint)
    }
}

/// Index into `candidates` drawn with probability proportional to weight, skipping `except`
/// (whose weight `total` leaves out).
fn weighted_draw(
    candidates: &[(usize, f64)],
    total: f64,
    except: Option<usize>,
    rng: &mut fastrand::Rng,
) -> usize {
    let mut roll = rng.f64() * total;
    let mut last = 0;
    for (k, (_, w)) in candidates.iter().enumerate() {
        if Some(k) == except {
            continue;
        }
        last = k;
        if roll < *w {
            return k;
        }
        roll -= w;
    }
    // Rounding left the roll past the end: the last eligible candidate.
    last
}

/// The per-cluster state slot: bound when the config is installed (taking over the previous
/// version's state), or on first use.
#[derive(Debug, Default)]
pub struct StateSlot(OnceLock<Arc<ClusterState>>);

impl StateSlot {
    /// The state, created fresh if the slot was never bound.
    pub fn get(&self, endpoints: &[Endpoint]) -> &Arc<ClusterState> {
        self.0
            .get_or_init(|| Arc::new(ClusterState::new(endpoints, None, &[])))
    }

    /// Binds the slot; false when it was already bound.
    pub fn bind(&self, state: Arc<ClusterState>) -> bool {
        self.0.set(state).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                addr: SocketAddr::from(([10, 44, 0, i as u8 + 1], 8080)),
                identity: None,
            })
            .collect()
    }

    fn states(n: usize) -> Vec<Arc<EndpointState>> {
        (0..n).map(|_| Arc::new(EndpointState::new())).collect()
    }

    fn pick_index(
        b: &Balancer,
        input: &PickInput<'_>,
        ctx: &PickContext,
        rng: &mut fastrand::Rng,
    ) -> usize {
        match b.pick(input, ctx, rng).expect("a pick") {
            Choice::Endpoint(i) => i,
            Choice::Passthrough(a) => panic!("unexpected passthrough to {a}"),
        }
    }

    fn counts(b: &Balancer, input: &PickInput<'_>, picks: usize, seed: u64) -> Vec<usize> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut c = vec![0; input.endpoints.len()];
        for _ in 0..picks {
            c[pick_index(b, input, &PickContext::now(), &mut rng)] += 1;
        }
        c
    }

    fn lb(yaml: &str) -> model::LoadBalancer {
        crate::route::test_yaml(yaml).expect("yaml")
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(hash64(b"user-1"), hash64(b"user-1"));
        assert_ne!(hash64(b"user-1"), hash64(b"user-2"));
        // Pinned so that a change of function (and of every sticky mapping) is noticed.
        assert_eq!(hash64(b""), fmix64(0xcbf2_9ce4_8422_2325));
    }

    #[test]
    fn weighted_round_robin_and_random() {
        let e = eps(2);
        let st = states(2);
        let weights = [3, 1];
        let input = PickInput {
            endpoints: &e,
            weights: &weights,
            states: &st,
            outlier: None,
            warmup: None,
        };
        let rr = Balancer::compile(&lb("{policy: ROUND_ROBIN}"), &e, &weights);
        assert_eq!(counts(&rr, &input, 8, 1), vec![6, 2]);
        let random = Balancer::compile(&lb("{policy: RANDOM}"), &e, &weights);
        let c = counts(&random, &input, 4000, 42);
        assert!((2800..3200).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn least_request_prefers_the_idle_and_the_fast() {
        let e = eps(3);
        let st = states(3);
        let weights = [1, 1, 1];
        let input = PickInput {
            endpoints: &e,
            weights: &weights,
            states: &st,
            outlier: None,
            warmup: None,
        };
        let b = Balancer::compile(&lb("{policy: LEAST_REQUEST}"), &e, &weights);
        let _busy: Vec<_> = (0..10).map(|_| st[0].start()).collect();
        let c = counts(&b, &input, 3000, 3);
        assert!(
            c[0] < 100,
            "a busy endpoint only wins when paired with itself: {c:?}"
        );
        let now = Instant::now();
        st[2].observe_latency(Duration::from_millis(50), now);
        st[1].observe_latency(Duration::from_millis(1), now);
        drop(_busy);
        let c = counts(&b, &input, 3000, 4);
        assert!(c[2] < c[1] / 4, "slow endpoint gets little: {c:?}");
        assert_eq!(st[0].in_flight(), 0);
    }

    #[test]
    fn ewma_peaks_then_decays() {
        let s = EndpointState::new();
        let t = Instant::now();
        s.observe_latency(Duration::from_millis(10), t);
        let t1 = t + Duration::from_millis(1);
        s.observe_latency(Duration::from_millis(100), t1);
        assert!((s.latency(t1) - 100e6).abs() < 1.0, "peak taken at once");
        let t2 = t + Duration::from_secs(30);
        s.observe_latency(Duration::from_millis(10), t2);
        assert!(
            s.latency(t2) < 20e6,
            "decayed after 3 decay times: {}",
            s.latency(t2)
        );
    }

    #[test]
    fn estimates_fade_without_samples_and_never_go_below_the_floor() {
        let s = EndpointState::new();
        let t = Instant::now();
        assert_eq!(s.latency(t), DEFAULT_RTT.as_nanos() as f64, "no sample yet");
        s.observe_latency(Duration::from_millis(50), t);
        assert!((s.latency(t) - 50e6).abs() < 1.0);
        let later = s.latency(t + EWMA_DECAY);
        assert!(
            (later - 50e6 / std::f64::consts::E).abs() < 1e3,
            "one decay time later: {later}"
        );
        assert_eq!(
            s.latency(t + EWMA_DECAY * 10),
            DEFAULT_RTT.as_nanos() as f64,
            "faded to the floor"
        );
        let fast = EndpointState::new();
        fast.observe_latency(Duration::from_micros(80), t);
        assert_eq!(
            fast.latency(t),
            DEFAULT_RTT.as_nanos() as f64,
            "sub-floor samples tie"
        );
    }

    #[test]
    fn least_request_is_the_default_and_idle_endpoints_share_by_weight() {
        let e = eps(2);
        let st = states(2);
        let b = Balancer::compile(&lb("{}"), &e, &[1, 1]);
        assert!(matches!(b, Balancer::LeastRequest), "{b:?}");
        // Sequential traffic (nothing in flight) with sub-millisecond answers that differ.
        let now = Instant::now();
        st[0].observe_latency(Duration::from_micros(200), now);
        st[1].observe_latency(Duration::from_micros(700), now);
        for (weights, low, high) in [([1, 1], 1800, 2200), ([3, 1], 2800, 3200)] {
            let input = PickInput {
                endpoints: &e,
                weights: &weights,
                states: &st,
                outlier: None,
                warmup: None,
            };
            let c = counts(&b, &input, 4000, 11);
            assert!(
                (low..high).contains(&c[0]),
                "weights {weights:?}: share by weight {c:?}"
            );
        }
        // Real load still decides: a slow endpoint loses while its estimate is high, and is
        // back in rotation once it faded.
        st[1].observe_latency(Duration::from_millis(40), now);
        let input = PickInput {
            endpoints: &e,
            weights: &[1, 1],
            states: &st,
            outlier: None,
            warmup: None,
        };
        let at = |when: Instant, seed: u64| {
            let mut rng = fastrand::Rng::with_seed(seed);
            let ctx = PickContext {
                now: when,
                ..PickContext::now()
            };
            let mut c = [0usize; 2];
            for _ in 0..2000 {
                c[pick_index(&b, &input, &ctx, &mut rng)] += 1;
            }
            c
        };
        assert_eq!(at(now, 12)[1], 0, "slow: never preferred");
        let c = at(now + EWMA_DECAY * 6, 13);
        assert!((800..1200).contains(&c[1]), "faded: back in rotation {c:?}");
    }

    fn hashed(key: &[u8]) -> PickContext {
        PickContext {
            hash: Some(hash64(key)),
            ..PickContext::now()
        }
    }

    /// `collateral`: how many keys of remaining endpoints may move (Maglev trades a little
    /// disruption for balance; the ring moves none).
    fn stickiness_and_minimal_disruption(algorithm: &str, collateral: usize) {
        let e = eps(5);
        let st = states(5);
        let weights = [1; 5];
        let lbc = lb(&format!(
            "{{consistentHash: {{key: {{header: x-user}}, algorithm: {algorithm}}}}}"
        ));
        let b = Balancer::compile(&lbc, &e, &weights);
        let input = PickInput {
            endpoints: &e,
            weights: &weights,
            states: &st,
            outlier: None,
            warmup: None,
        };
        let mut rng = fastrand::Rng::with_seed(9);
        let keys: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| pick_index(&b, &input, &hashed(k.as_bytes()), &mut rng))
            .collect();
        for (k, want) in keys.iter().zip(&before).take(50) {
            for _ in 0..3 {
                assert_eq!(
                    pick_index(&b, &input, &hashed(k.as_bytes()), &mut rng),
                    *want,
                    "sticky"
                );
            }
        }
        let mut dist = [0usize; 5];
        for i in &before {
            dist[*i] += 1;
        }
        assert!(
            dist.iter().all(|c| (250..=550).contains(c)),
            "spread {dist:?}"
        );
        // Remove endpoint 2: only its keys move.
        let e4: Vec<Endpoint> = e
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, e)| e.clone())
            .collect();
        let st4: Vec<_> = st
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, s)| s.clone())
            .collect();
        let b4 = Balancer::compile(&lbc, &e4, &weights[..4]);
        let input4 = PickInput {
            endpoints: &e4,
            weights: &weights[..4],
            states: &st4,
            outlier: None,
            warmup: None,
        };
        let (mut moved, mut others) = (0, 0);
        for (k, old) in keys.iter().zip(&before) {
            let new = e4[pick_index(&b4, &input4, &hashed(k.as_bytes()), &mut rng)].addr;
            if new != e[*old].addr {
                if *old == 2 {
                    moved += 1;
                } else {
                    others += 1;
                }
            }
        }
        assert_eq!(moved, dist[2], "every key of the removed endpoint moved");
        assert!(
            others <= collateral,
            "{others} keys of remaining endpoints moved ({algorithm})"
        );
    }

    #[test]
    fn ring_hash_is_sticky_and_minimally_disrupted() {
        stickiness_and_minimal_disruption("{ring: {minRingSize: 1024}}", 0);
    }

    #[test]
    fn maglev_is_sticky_and_minimally_disrupted() {
        stickiness_and_minimal_disruption("{maglev: {tableSize: 65537}}", 2000 / 20);
    }

    #[test]
    fn maglev_table_is_balanced_and_prime() {
        let e = eps(3);
        let m = Maglev::build(&e, &[1, 1, 1], 1000);
        assert_eq!(m.table.len(), 1009, "rounded up to a prime");
        let mut c = [0; 3];
        for i in &m.table {
            c[*i as usize] += 1;
        }
        assert!(c.iter().all(|n| (330..=343).contains(n)), "{c:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoints_are_skipped_unless_panicking() {
        let e = eps(3);
        let st = states(3);
        let weights = [1; 3];
        let policy = OutlierPolicy::compile(
            &crate::route::test_yaml(
                "{consecutive5xxErrors: 1, maxEjectionPercent: 100, minHealthPercent: 50}",
            )
            .expect("yaml"),
        )
        .expect("policy");
        st[0].outlier.eject(Instant::now(), &policy);
        let input = PickInput {
            endpoints: &e,
            weights: &weights,
            states: &st,
            outlier: Some(&policy),
            warmup: None,
        };
        let rr = Balancer::compile(&lb("{policy: ROUND_ROBIN}"), &e, &weights);
        assert_eq!(counts(&rr, &input, 30, 1)[0], 0, "ejected skipped");
        st[1].outlier.eject(Instant::now(), &policy);
        let c = counts(&rr, &input, 30, 1);
        assert!(
            c[0] > 0 && c[1] > 0,
            "1 of 3 healthy is under 50%: panic, all used {c:?}"
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(
            counts(&rr, &input, 30, 1),
            vec![10, 10, 10],
            "back after ejection"
        );
    }

    #[test]
    fn retries_avoid_the_previous_endpoint() {
        let e = eps(2);
        let st = states(2);
        let weights = [1, 1];
        let input = PickInput {
            endpoints: &e,
            weights: &weights,
            states: &st,
            outlier: None,
            warmup: None,
        };
        let mut rng = fastrand::Rng::with_seed(1);
        for policy in ["{policy: ROUND_ROBIN}", "{policy: RANDOM}", "{}"] {
            let b = Balancer::compile(&lb(policy), &e, &weights);
            for _ in 0..20 {
                let ctx = PickContext {
                    avoid: Some(e[0].addr),
                    ..PickContext::now()
                };
                assert_eq!(pick_index(&b, &input, &ctx, &mut rng), 1, "{policy}");
            }
        }
        let one = eps(1);
        let b = Balancer::compile(&lb("{}"), &one, &[1]);
        let input = PickInput {
            endpoints: &one,
            weights: &[1],
            states: &st[..1],
            outlier: None,
            warmup: None,
        };
        let ctx = PickContext {
            avoid: Some(one[0].addr),
            ..PickContext::now()
        };
        assert_eq!(
            pick_index(&b, &input, &ctx, &mut rng),
            0,
            "the only endpoint still serves"
        );
    }

    #[test]
    fn passthrough_goes_to_the_original_destination() {
        let e = eps(2);
        let st = states(2);
        let input = PickInput {
            endpoints: &e,
            weights: &[1, 1],
            states: &st,
            outlier: None,
            warmup: None,
        };
        let b = Balancer::compile(&lb("{policy: PASSTHROUGH}"), &e, &[1, 1]);
        let mut rng = fastrand::Rng::with_seed(1);
        let ctx = PickContext {
            dst: Some(e[1].addr),
            ..PickContext::now()
        };
        assert_eq!(b.pick(&input, &ctx, &mut rng), Some(Choice::Endpoint(1)));
        let other: SocketAddr = "10.1.2.3:443".parse().expect("addr");
        let ctx = PickContext {
            dst: Some(other),
            ..PickContext::now()
        };
        assert_eq!(
            b.pick(&input, &ctx, &mut rng),
            Some(Choice::Passthrough(other))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn warmup_ramps_new_endpoints() {
        let e = eps(2);
        let old = Arc::new(EndpointState::new());
        tokio::time::advance(Duration::from_secs(120)).await;
        let st = vec![old, Arc::new(EndpointState::new())];
        let weights = [1, 1];
        let input = PickInput {
            endpoints: &e,
            weights: &weights,
            states: &st,
            outlier: None,
            warmup: Some(Duration::from_secs(60)),
        };
        let rr = Balancer::compile(&lb("{policy: ROUND_ROBIN}"), &e, &weights);
        let c = counts(&rr, &input, 2000, 5);
        assert!(c[1] < 300, "new endpoint at 10%: {c:?}");
        tokio::time::advance(Duration::from_secs(30)).await;
        let c = counts(&rr, &input, 2000, 6);
        assert!((500..900).contains(&c[1]), "half way: {c:?}");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(counts(&rr, &input, 2000, 7), vec![1000, 1000]);
    }

    #[test]
    fn cookie_hash_generates_a_cookie_with_ttl() {
        let p = HashPolicy::compile(&HashKey::Cookie {
            name: "session".into(),
            path: Some("/".into()),
            ttl_ms: Some(3_600_000),
        })
        .expect("policy");
        let client: IpAddr = "10.0.0.1".parse().expect("ip");
        let bare = http::Request::builder()
            .uri("/")
            .body(())
            .expect("req")
            .into_parts()
            .0;
        let h = p.hash(&bare, client);
        let set = h
            .set_cookie
            .expect("generated")
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(set.starts_with("session="), "{set}");
        assert!(set.contains("; Path=/; Max-Age=3600; HttpOnly"), "{set}");
        let value = set
            .trim_start_matches("session=")
            .split(';')
            .next()
            .expect("value");
        let again = http::Request::builder()
            .uri("/")
            .header("cookie", format!("a=b; session={value}"))
            .body(())
            .expect("req")
            .into_parts()
            .0;
        let h2 = p.hash(&again, client);
        assert_eq!(
            h2.hash, h.hash,
            "the generated cookie hashes as the first request did"
        );
        assert!(h2.set_cookie.is_none());
        let session = HashPolicy::compile(&HashKey::Cookie {
            name: "s".into(),
            path: None,
            ttl_ms: None,
        })
        .expect("p");
        let set = session.hash(&bare, client).set_cookie.expect("generated");
        assert!(
            !set.to_str().expect("ascii").contains("Max-Age"),
            "session cookie"
        );
    }

    #[test]
    fn state_survives_a_new_version() {
        let e = eps(2);
        let first = ClusterState::new(&e, None, &[]);
        let guard = first.endpoints[1].start();
        let mut next_eps = eps(3);
        next_eps.swap(0, 1);
        let second = ClusterState::new(&next_eps, Some(&first), &e);
        assert_eq!(
            second.endpoints[0].in_flight(),
            1,
            "same address, same state"
        );
        assert!(Arc::ptr_eq(&second.breaker, &first.breaker));
        drop(guard);
        assert_eq!(second.endpoints[0].in_flight(), 0);
        assert_eq!(second.endpoints[2].in_flight(), 0);
    }
}

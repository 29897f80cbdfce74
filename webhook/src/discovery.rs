//! Config distribution: one stream per connected proxy (`POST /weft.v1/discovery`, NDJSON
//! both ways, see [`weft_api::discovery`]).
//!
//! Changes to the [`Store`] are debounced ([`DEBOUNCE`] of quiet, at most [`MAX_DELAY`] after
//! the first change of a burst) into an *epoch*: an immutable [`Resources`] plus a cache of
//! the outbound part of snapshots, shared by proxies of equal namespace and labels (they see
//! the same services and clusters), serialised once. Each proxy's task then recomputes its
//! snapshot and sends it only when its content changed (compared by hash); versions come
//! from one counter, so they increase across the whole control plane. A slow proxy holds
//! only its own task: its queue has room for one message and newer epochs replace older
//! ones while it waits. Acks and nacks are counted and logged per proxy; the time from the
//! change to the ack is a histogram.
//!
//! The trust bundle is part of the epoch: a new one (root rotation) goes through the same
//! debounce and reaches every connected proxy on its open stream.
//!
//! A proxy is identified by its certificate (namespace and service account). The pod it
//! names must run as that service account; with [`Discovery::require_known_pods`]
//! (Kubernetes, where every pod is watched) the pod must also exist, see [`admit`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use weft_api::config::{MeshSettings, OutboundTrafficPolicy, Snapshot};
use weft_api::discovery::{
    CONTENT_TYPE_NDJSON, DiscoveryRequest, ErrorResponse, Node, decode_messages,
};

use crate::metrics::Metrics;
use crate::resources::{PodInfo, ProxyRef, Resources, Store};
use crate::translate;

/// Quiet time that ends a burst of changes.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest a change waits for its burst to end.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// Time a proxy has to introduce itself after opening the stream.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// With [`Discovery::require_known_pods`], how long a stream waits for the pods to be listed,
/// or for the pod it names to show up (its watch event may trail the proxy's start).
pub const POD_WAIT: Duration = Duration::from_secs(5);
/// Largest message accepted from a proxy.
pub const MAX_REQUEST_MESSAGE: usize = 64 << 10;
/// Parts of one encoded message; the queue to a proxy holds at most one message.
const MESSAGE_PARTS: usize = 5;
/// Unacknowledged versions remembered per proxy (for the ack latency).
const PENDING_ACKS: usize = 8;

/// Versions sent and not yet acknowledged, with the change that caused them.
type Pending = Mutex<VecDeque<(String, Option<Instant>)>>;

/// Who is on the other end of a TLS connection, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The SPIFFE ID.
    pub spiffe: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// Its namespace.
    pub namespace: String,
    /// Its service account.
    pub service_account: String,
}

/// The peer of a connection, if it showed a certificate the mesh trusts.
#[derive(Debug, Clone, Default)]
pub struct Peer(pub Option<PeerIdentity>);

#[derive(Debug)]
struct SharedOutbound {
    services: Bytes,
    clusters: Bytes,
    policy: OutboundTrafficPolicy,
    hash: u64,
}

type OutboundKey = (String, BTreeMap<String, String>);

/// One debounced state of the store.
#[derive(Debug)]
pub struct Epoch {
    /// Sequence number.
    pub seq: u64,
    /// The store generation the resources were taken at (or later).
    pub generation: u64,
    /// The resources.
    pub resources: Arc<Resources>,
    /// When the first change of this epoch's burst happened.
    pub changed_at: Instant,
    /// The PEM roots sent to proxies.
    pub trust_bundle: Arc<Vec<String>>,
    cache: Mutex<HashMap<OutboundKey, Arc<SharedOutbound>>>,
}

impl Epoch {
    fn new(
        seq: u64,
        generation: u64,
        resources: Arc<Resources>,
        trust_bundle: Arc<Vec<String>>,
        changed_at: Instant,
    ) -> Arc<Epoch> {
        Arc::new(Epoch {
            seq,
            generation,
            resources,
            changed_at,
            trust_bundle,
            cache: Mutex::new(HashMap::new()),
        })
    }
}

/// What discovery knows of a connected proxy (for `/debug`).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    /// `namespace/name`.
    pub proxy: String,
    /// Its SPIFFE ID.
    pub identity: String,
    /// Last version sent.
    pub sent: Option<String>,
    /// Last version acknowledged.
    pub acked: Option<String>,
    /// Last refusal.
    pub nacked: Option<String>,
    /// Store generation of the last view computed for it; with `acked == sent` the proxy is
    /// up to date with the store at that generation.
    pub generation: u64,
}

/// Whether proxies have caught up with the store (`GET /debug/sync`): what a harness waits on
/// after changing the config.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncStatus {
    /// The store's current generation.
    pub generation: u64,
    /// Every connected proxy.
    pub proxies: Vec<ProxyStatus>,
}

/// The discovery service.
#[derive(Debug)]
pub struct Discovery {
    store: Arc<Store>,
    epochs: watch::Sender<Arc<Epoch>>,
    metrics: Arc<Metrics>,
    trust_bundle: watch::Sender<Arc<Vec<String>>>,
    versions: AtomicU64,
    debounce: Duration,
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
    next_stream: AtomicU64,
    /// Set in Kubernetes mode: true once every pod has been listed.
    pods_listed: OnceLock<watch::Receiver<bool>>,
}

/// Whether a proxy may name a pod that the control plane does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodCheck {
    /// Local mode: the directory need not list every pod (simulated proxies, hosts); a pod
    /// that is listed must still match the certificate.
    Lenient,
    /// Kubernetes: every pod is watched, so a pod that is not there does not exist.
    Strict,
}

/// Why a config stream is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The node names another namespace than its certificate.
    #[error("node namespace {claimed:?} does not match the certificate's namespace {certified:?}")]
    Namespace {
        /// The namespace the proxy claims.
        claimed: String,
        /// The certificate's.
        certified: String,
    },
    /// The pod runs as another service account than the certificate's.
    #[error(
        "pod {namespace}/{name} runs as service account {runs_as:?}, the certificate is for {certified:?}"
    )]
    ServiceAccount {
        /// Namespace.
        namespace: String,
        /// Pod.
        name: String,
        /// The pod's service account.
        runs_as: String,
        /// The certificate's.
        certified: String,
    },
    /// The pod does not exist (Kubernetes mode).
    #[error("no pod {namespace}/{name} in the cluster")]
    NoSuchPod {
        /// Namespace.
        namespace: String,
        /// Pod.
        name: String,
    },
    /// The pods have not been listed yet (the control plane just started).
    #[error("the control plane has not listed the pods yet; try again")]
    NotListed,
}

impl Refusal {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NotListed => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        }
    }
}

/// Decides whether the holder of `identity` may stream the config of `node`, and for which
/// workload. `pod` is the pod of that name the control plane knows, if any. A node without a
/// pod name (a gateway run by hand, say) is the certificate's identity without labels.
pub fn admit(
    identity: &PeerIdentity,
    node: &Node,
    pod: Option<&PodInfo>,
    check: PodCheck,
) -> Result<ProxyRef, Refusal> {
    if node.namespace != identity.namespace {
        return Err(Refusal::Namespace {
            claimed: node.namespace.clone(),
            certified: identity.namespace.clone(),
        });
    }
    let unlisted = || ProxyRef {
        namespace: node.namespace.clone(),
        name: node.name.clone(),
        service_account: identity.service_account.clone(),
        labels: BTreeMap::new(),
        ip: node.ip,
    };
    if node.name.is_empty() {
        return Ok(unlisted());
    }
    match (pod, check) {
        (Some(pod), _) => {
            let p = ProxyRef::from_pod(pod);
            if p.service_account != identity.service_account {
                return Err(Refusal::ServiceAccount {
                    namespace: node.namespace.clone(),
                    name: node.name.clone(),
                    runs_as: p.service_account,
                    certified: identity.service_account.clone(),
                });
            }
            Ok(p)
        }
        (None, PodCheck::Lenient) => Ok(unlisted()),
        (None, PodCheck::Strict) => Err(Refusal::NoSuchPod {
            namespace: node.namespace.clone(),
            name: node.name.clone(),
        }),
    }
}

/// Errors computing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The translated snapshot breaks the model's rules (a translation bug).
    #[error("translated snapshot is invalid: {0}")]
    Invalid(#[from] weft_api::config::ConfigError),
    /// Serialisation failed.
    #[error("cannot serialise the snapshot")]
    Json(#[from] serde_json::Error),
}

fn hash_of<T: Hash + ?Sized>(v: &T) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

impl Discovery {
    /// A discovery service over `store`, with the trust bundle sent in every response.
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        trust_bundle: Vec<String>,
        debounce: Duration,
    ) -> Arc<Discovery> {
        let trust_bundle = Arc::new(trust_bundle);
        let epoch = Epoch::new(
            0,
            store.generation(),
            store.snapshot(),
            trust_bundle.clone(),
            Instant::now(),
        );
        Arc::new(Discovery {
            store,
            epochs: watch::Sender::new(epoch),
            metrics,
            trust_bundle: watch::Sender::new(trust_bundle),
            versions: AtomicU64::new(0),
            debounce,
            proxies: Mutex::new(BTreeMap::new()),
            next_stream: AtomicU64::new(0),
            pods_listed: OnceLock::new(),
        })
    }

    /// Kubernetes mode: a proxy naming a pod is refused unless that pod exists (with the
    /// certificate's service account). `listed` turns true once every pod has been listed;
    /// streams wait for it (up to [`POD_WAIT`]) rather than refusing every proxy that
    /// reconnects to a control plane that just started. Set once; later calls are ignored.
    pub fn require_known_pods(&self, listed: watch::Receiver<bool>) {
        let _ = self.pods_listed.set(listed);
    }

    /// Replaces the trust bundle sent to proxies (a root rotation). It reaches every open
    /// stream with the next epoch, debounced like a config change. No-op when unchanged.
    pub fn set_trust_bundle(&self, roots: Vec<String>) {
        self.trust_bundle.send_if_modified(|current| {
            if **current == roots {
                return false;
            }
            info!(roots = roots.len(), "trust bundle changed");
            *current = Arc::new(roots);
            true
        });
    }

    /// The trust bundle sent to proxies.
    pub fn trust_bundle(&self) -> Arc<Vec<String>> {
        self.trust_bundle.borrow().clone()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Turns store and trust-bundle changes into epochs, debounced: a burst (changes less
    /// than the debounce apart) makes one epoch, at most [`MAX_DELAY`] after its first change.
    /// Runs until the store goes away.
    pub async fn run(self: Arc<Self>) {
        let mut generation = self.store.subscribe();
        let mut bundle = self.trust_bundle.subscribe();
        let mut seq = 0;
        loop {
            tokio::select! {
                changed = generation.changed() => if changed.is_err() { return },
                // The sender lives in `self`: this never fails.
                _ = bundle.changed() => {},
            }
            let changed_at = Instant::now();
            // Tokio's clock, so that tests can run the debounce on a paused clock.
            let first = tokio::time::Instant::now();
            let mut last = first;
            loop {
                let deadline = (last + self.debounce).min(first + MAX_DELAY);
                tokio::select! {
                    changed = generation.changed() => {
                        if changed.is_err() { return; }
                        last = tokio::time::Instant::now();
                    }
                    _ = bundle.changed() => last = tokio::time::Instant::now(),
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            seq += 1;
            // Read before the snapshot: the resources are at least this generation.
            let at = self.store.generation();
            let resources = self.store.snapshot();
            let trust_bundle = bundle.borrow_and_update().clone();
            debug!(seq, generation = at, "config epoch");
            self.epochs
                .send_replace(Epoch::new(seq, at, resources, trust_bundle, changed_at));
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> Arc<Epoch> {
        self.epochs.borrow().clone()
    }

    fn shared_outbound(
        &self,
        epoch: &Epoch,
        proxy: &ProxyRef,
    ) -> Result<Arc<SharedOutbound>, DiscoveryError> {
        let key = epoch.resources.index().outbound_key(proxy);
        if let Some(hit) = epoch
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(hit.clone());
        }
        let started = Instant::now();
        let outbound = translate::outbound(&epoch.resources, proxy);
        let check = Snapshot {
            services: outbound.services,
            clusters: outbound.clusters,
            ..Snapshot::default()
        };
        check.validate()?;
        let services = Bytes::from(serde_json::to_vec(&check.services)?);
        let clusters = Bytes::from(serde_json::to_vec(&check.clusters)?);
        self.metrics
            .translate_seconds
            .observe(started.elapsed().as_secs_f64());
        let shared = Arc::new(SharedOutbound {
            hash: hash_of(&(
                &services[..],
                &clusters[..],
                outbound.outbound_traffic_policy as u8,
            )),
            services,
            clusters,
            policy: outbound.outbound_traffic_policy,
        });
        epoch
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, shared.clone());
        Ok(shared)
    }

    /// Encodes the response for `proxy` in `epoch` with `version`: `(message parts, content
    /// hash)`. The big parts (services, clusters) are shared by every proxy of the same view,
    /// not copied. The hash ignores the version, so equal content gives equal hashes.
    pub fn encode(
        &self,
        epoch: &Epoch,
        proxy: &ProxyRef,
        version: &str,
    ) -> Result<(Vec<Bytes>, u64), DiscoveryError> {
        let shared = self.shared_outbound(epoch, proxy)?;
        let workload = serde_json::to_vec(&translate::workload(proxy))?;
        let mesh = serde_json::to_vec(&MeshSettings {
            trust_domain: epoch.resources.settings.trust_domain.clone(),
            outbound_traffic_policy: shared.policy,
            protocol_detection_timeout_ms: epoch.resources.settings.protocol_detection_timeout_ms,
        })?;
        let inbound = serde_json::to_vec(&translate::inbound::inbound(&epoch.resources, proxy))?;
        let bundle = serde_json::to_vec(&*epoch.trust_bundle)?;
        let hash = hash_of(&(shared.hash, &workload, &mesh, &inbound, &bundle));
        let version = serde_json::to_vec(version)?;
        let mut head = Vec::with_capacity(workload.len() + mesh.len() + 128);
        head.extend_from_slice(b"{\"version\":");
        head.extend_from_slice(&version);
        head.extend_from_slice(b",\"snapshot\":{\"version\":");
        head.extend_from_slice(&version);
        head.extend_from_slice(b",\"workload\":");
        head.extend_from_slice(&workload);
        head.extend_from_slice(b",\"mesh\":");
        head.extend_from_slice(&mesh);
        head.extend_from_slice(b",\"services\":");
        let mut tail = Vec::with_capacity(inbound.len() + bundle.len() + 64);
        tail.extend_from_slice(b",\"inbound\":");
        tail.extend_from_slice(&inbound);
        tail.extend_from_slice(b"},\"trustBundle\":");
        tail.extend_from_slice(&bundle);
        tail.extend_from_slice(b"}\n");
        Ok((
            vec![
                Bytes::from(head),
                shared.services.clone(),
                Bytes::from_static(b",\"clusters\":"),
                shared.clusters.clone(),
                Bytes::from(tail),
            ],
            hash,
        ))
    }

    /// The snapshot of a pod, for humans (`/debug/config_dump?proxy=ns/name`).
    pub fn config_dump(&self, namespace: &str, name: &str) -> Option<Snapshot> {
        let resources = self.store.snapshot();
        let pod = resources.pod(namespace, name)?;
        Some(translate::translate(&resources, &ProxyRef::from_pod(pod)))
    }

    /// The store generation and every connected proxy's progress.
    pub fn sync_status(&self) -> SyncStatus {
        SyncStatus {
            generation: self.store.generation(),
            proxies: self.proxies(),
        }
    }

    /// The connected proxies.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        self.proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn set_status(&self, id: u64, change: impl FnOnce(&mut ProxyStatus)) {
        if let Some(s) = self
            .proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&id)
        {
            change(s);
        }
    }

    /// Serves one `POST /weft.v1/discovery`.
    pub async fn stream(self: Arc<Self>, peer: Peer, body: Body) -> Response {
        let Some(identity) = peer.0 else {
            return error(
                StatusCode::UNAUTHORIZED,
                "a workload certificate of the mesh is required",
            );
        };
        let mut incoming = body.into_data_stream();
        let mut buf = Vec::new();
        let first: Result<(Node, Vec<DiscoveryRequest>), (StatusCode, String)> =
            tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, async {
                loop {
                    let Some(Ok(chunk)) = incoming.next().await else {
                        return Err((
                            StatusCode::BAD_REQUEST,
                            "stream ended before the first message".to_owned(),
                        ));
                    };
                    buf.extend_from_slice(&chunk);
                    let mut messages: Vec<DiscoveryRequest> = decode_messages(&mut buf)
                        .map_err(|e| (StatusCode::BAD_REQUEST, format!("bad message: {e}")))?;
                    if !messages.is_empty() {
                        let node = messages.remove(0).node.ok_or_else(|| {
                            (
                                StatusCode::BAD_REQUEST,
                                "the first message must name the node".to_owned(),
                            )
                        })?;
                        return Ok((node, messages));
                    }
                    if buf.len() > MAX_REQUEST_MESSAGE {
                        return Err((
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "message too large".to_owned(),
                        ));
                    }
                }
            })
            .await
            .unwrap_or_else(|_| {
                Err((
                    StatusCode::REQUEST_TIMEOUT,
                    "no first message in time".to_owned(),
                ))
            });
        let (node, early) = match first {
            Ok(x) => x,
            Err((status, message)) => return error(status, &message),
        };
        let admitted = match self.admit_stream(&identity, &node).await {
            Ok(p) => p,
            Err(refusal) => {
                warn!(proxy = %format!("{}/{}", node.namespace, node.name), identity = %identity.spiffe, %refusal, "config stream refused");
                return error(refusal.status(), &refusal.to_string());
            }
        };
        let (tx, rx) = mpsc::channel::<Bytes>(MESSAGE_PARTS);
        let stream_id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let label = format!("{}/{}", node.namespace, node.name);
        self.proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                stream_id,
                ProxyStatus {
                    proxy: label.clone(),
                    identity: identity.spiffe.clone(),
                    sent: None,
                    acked: None,
                    nacked: None,
                    generation: 0,
                },
            );
        self.metrics.connected_proxies.inc();
        info!(proxy = %label, identity = %identity.spiffe, version = %node.proxy_version, "proxy connected");
        let pending: Arc<Pending> = Arc::default();
        let writer = tokio::spawn(self.clone().write_loop(
            stream_id,
            node.clone(),
            identity,
            admitted,
            tx,
            pending.clone(),
        ));
        let this = self.clone();
        tokio::spawn(async move {
            let mut buf = buf;
            for m in early {
                this.on_message(stream_id, &label, m, &pending);
            }
            while let Some(chunk) = incoming.next().await {
                let Ok(chunk) = chunk else { break };
                buf.extend_from_slice(&chunk);
                match decode_messages::<DiscoveryRequest>(&mut buf) {
                    Ok(messages) => {
                        for m in messages {
                            this.on_message(stream_id, &label, m, &pending);
                        }
                    }
                    Err(e) => {
                        warn!(proxy = %label, error = %e, "bad message from proxy; closing");
                        break;
                    }
                }
                if buf.len() > MAX_REQUEST_MESSAGE {
                    warn!(proxy = %label, "message too large; closing");
                    break;
                }
            }
            writer.abort();
            this.proxies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&stream_id);
            this.metrics.connected_proxies.dec();
            info!(proxy = %label, "proxy disconnected");
        });
        let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
        }));
        ([(http::header::CONTENT_TYPE, CONTENT_TYPE_NDJSON)], body).into_response()
    }

    /// [`admit`] against the store; in Kubernetes mode it first waits for the pods to be
    /// listed, and for a pod it does not know yet to appear, each up to [`POD_WAIT`].
    async fn admit_stream(
        &self,
        identity: &PeerIdentity,
        node: &Node,
    ) -> Result<ProxyRef, Refusal> {
        let lookup = |resources: &Resources| -> Result<ProxyRef, Refusal> {
            let check = if self.pods_listed.get().is_some() {
                PodCheck::Strict
            } else {
                PodCheck::Lenient
            };
            let pod = resources.pod(&node.namespace, &node.name).map(|p| &**p);
            admit(identity, node, pod, check)
        };
        let Some(listed) = self.pods_listed.get() else {
            return lookup(&self.store.snapshot());
        };
        let deadline = tokio::time::Instant::now() + POD_WAIT;
        let mut listed = listed.clone();
        match tokio::time::timeout_at(deadline, listed.wait_for(|l| *l)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return Err(Refusal::NotListed),
        }
        let mut generation = self.store.subscribe();
        loop {
            generation.borrow_and_update();
            match lookup(&self.store.snapshot()) {
                Err(Refusal::NoSuchPod { .. })
                    if tokio::time::timeout_at(deadline, generation.changed())
                        .await
                        .is_ok_and(|r| r.is_ok()) => {}
                decided => return decided,
            }
        }
    }

    fn on_message(&self, stream_id: u64, label: &str, m: DiscoveryRequest, pending: &Pending) {
        let Some(version) = m.version else { return };
        let changed_at = {
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            match p.iter().position(|(v, _)| *v == version) {
                Some(i) => {
                    let at = p[i].1;
                    p.drain(..=i);
                    at
                }
                None => None,
            }
        };
        match m.error {
            None => {
                self.metrics.acks.inc();
                if let Some(at) = changed_at {
                    self.metrics
                        .push_ack_seconds
                        .observe(at.elapsed().as_secs_f64());
                }
                debug!(proxy = %label, %version, "ack");
                self.set_status(stream_id, |s| s.acked = Some(version));
            }
            Some(reason) => {
                self.metrics.nacks.inc();
                warn!(proxy = %label, %version, %reason, "proxy refused a snapshot");
                self.set_status(stream_id, |s| {
                    s.nacked = Some(format!("{version}: {reason}"))
                });
            }
        }
    }

    async fn write_loop(
        self: Arc<Self>,
        stream_id: u64,
        node: Node,
        identity: PeerIdentity,
        admitted: ProxyRef,
        tx: mpsc::Sender<Bytes>,
        pending: Arc<Pending>,
    ) {
        let label = format!("{}/{}", node.namespace, node.name);
        let mut epochs = self.epochs.subscribe();
        let first_seq = epochs.borrow().seq;
        let mut last_hash: Option<u64> = None;
        let mut known = admitted;
        let strict = self.pods_listed.get().is_some();
        loop {
            let epoch = epochs.borrow_and_update().clone();
            let pod = epoch.resources.pod(&node.namespace, &node.name);
            let proxy = match pod {
                Some(pod) => {
                    let p = ProxyRef::from_pod(pod);
                    if p.service_account != identity.service_account {
                        warn!(proxy = %label, "pod now runs as another service account; closing");
                        return;
                    }
                    p
                }
                // A deleted pod's proxy is draining: it keeps the view of its workload.
                None if strict => known.clone(),
                None => ProxyRef {
                    namespace: node.namespace.clone(),
                    name: node.name.clone(),
                    service_account: identity.service_account.clone(),
                    labels: BTreeMap::new(),
                    ip: node.ip,
                },
            };
            known = proxy.clone();
            let version = (self.versions.fetch_add(1, Ordering::Relaxed) + 1).to_string();
            match self.encode(&epoch, &proxy, &version) {
                Ok((message, hash)) if last_hash != Some(hash) => {
                    let changed_at = (epoch.seq > first_seq).then_some(epoch.changed_at);
                    {
                        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                        p.push_back((version.clone(), changed_at));
                        while p.len() > PENDING_ACKS {
                            p.pop_front();
                        }
                    }
                    let bytes: usize = message.iter().map(Bytes::len).sum();
                    for part in message {
                        if tx.send(part).await.is_err() {
                            return;
                        }
                    }
                    last_hash = Some(hash);
                    self.metrics.pushes.inc();
                    debug!(proxy = %label, %version, bytes, "snapshot sent");
                    let generation = epoch.generation;
                    self.set_status(stream_id, |s| {
                        s.sent = Some(version);
                        s.generation = generation;
                    });
                }
                Ok(_) => {
                    // Same content as what the proxy has: it is current at this generation.
                    let generation = epoch.generation;
                    self.set_status(stream_id, |s| s.generation = generation);
                }
                Err(e) => {
                    warn!(proxy = %label, error = %e, "cannot compute the snapshot; the proxy keeps its last one")
                }
            }
            if epochs.changed().await.is_err() {
                return;
            }
        }
    }
}

/// A JSON [`ErrorResponse`] with a status.
pub fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::to_vec(&ErrorResponse {
        error: message.to_owned(),
    })
    .unwrap_or_default();
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Pod, PodSpec, Service};
    use kube::api::ObjectMeta;

    use super::*;
    use crate::resources::{Object, Settings};

    fn identity(ns: &str, sa: &str) -> PeerIdentity {
        PeerIdentity {
            spiffe: weft_api::config::spiffe_id("cluster.local", ns, sa),
            trust_domain: "cluster.local".into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    fn node(ns: &str, name: &str) -> Node {
        Node {
            name: name.into(),
            namespace: ns.into(),
            ip: None,
            proxy_version: "test".into(),
        }
    }

    fn pod(ns: &str, name: &str, sa: &str) -> PodInfo {
        PodInfo::from_pod(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some(BTreeMap::from([("app".to_owned(), name.to_owned())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(sa.into()),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn admission_decisions() {
        let id = identity("shop", "cart");
        let cart = pod("shop", "cart-1", "cart");
        for check in [PodCheck::Lenient, PodCheck::Strict] {
            // The pod exists with the certificate's service account: its labels come along.
            let p = admit(&id, &node("shop", "cart-1"), Some(&cart), check).expect("admitted");
            assert_eq!(p.labels.get("app").map(String::as_str), Some("cart-1"));
            assert_eq!(p.service_account, "cart");
            // Another namespace than the certificate's.
            assert!(matches!(
                admit(&id, &node("bank", "cart-1"), Some(&cart), check),
                Err(Refusal::Namespace { .. })
            ));
            // A pod of another service account.
            let vault = pod("shop", "vault-1", "vault");
            let refused = admit(&id, &node("shop", "vault-1"), Some(&vault), check)
                .expect_err("another account's pod");
            assert!(matches!(refused, Refusal::ServiceAccount { .. }));
            assert_eq!(refused.status(), StatusCode::FORBIDDEN);
            // No pod name claimed: the certificate's identity, without labels.
            let p = admit(&id, &node("shop", ""), None, check).expect("no pod claimed");
            assert_eq!(p.service_account, "cart");
            assert!(p.labels.is_empty());
        }
        // A pod the control plane does not know: fine in local mode, refused in Kubernetes.
        let p = admit(&id, &node("shop", "ghost"), None, PodCheck::Lenient).expect("lenient");
        assert_eq!(
            (p.name.as_str(), p.service_account.as_str()),
            ("ghost", "cart")
        );
        let refused =
            admit(&id, &node("shop", "ghost"), None, PodCheck::Strict).expect_err("strict");
        assert_eq!(
            refused,
            Refusal::NoSuchPod {
                namespace: "shop".into(),
                name: "ghost".into()
            }
        );
        assert!(refused.to_string().contains("shop/ghost"), "{refused}");
    }

    fn service(i: usize) -> Object {
        Object::service(Service {
            metadata: ObjectMeta {
                name: Some(format!("svc-{i}")),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_makes_one_epoch() {
        let store = Store::new(Settings::default());
        let debounce = Duration::from_millis(100);
        let d = Discovery::new(
            store.clone(),
            Arc::new(Metrics::default()),
            vec!["root".into()],
            debounce,
        );
        let mut epochs = d.epochs.subscribe();
        let task = tokio::spawn(d.clone().run());
        tokio::task::yield_now().await;

        // Ten changes, each well inside the debounce of the one before, spanning more than
        // the debounce in all: one epoch, holding all of them.
        for i in 0..10 {
            store.update(|r| {
                r.upsert(service(i));
                true
            });
            tokio::time::advance(Duration::from_millis(30)).await;
        }
        epochs.changed().await.expect("an epoch");
        let epoch = epochs.borrow_and_update().clone();
        assert_eq!(epoch.seq, 1);
        assert_eq!(epoch.resources.services.len(), 10);
        tokio::time::sleep(debounce * 10).await;
        assert!(!epochs.has_changed().expect("open"), "one epoch, not ten");

        // A change after the window: another epoch.
        store.update(|r| {
            r.upsert(service(10));
            true
        });
        epochs.changed().await.expect("an epoch");
        let epoch = epochs.borrow_and_update().clone();
        assert_eq!(epoch.seq, 2);
        assert_eq!(epoch.resources.services.len(), 11);

        // A new trust bundle is an epoch too.
        d.set_trust_bundle(vec!["root".into(), "next root".into()]);
        epochs.changed().await.expect("an epoch");
        let epoch = epochs.borrow_and_update().clone();
        assert_eq!(epoch.seq, 3);
        assert_eq!(epoch.trust_bundle.len(), 2);
        // The same bundle again changes nothing.
        d.set_trust_bundle(vec!["root".into(), "next root".into()]);
        tokio::time::sleep(debounce * 10).await;
        assert!(!epochs.has_changed().expect("open"));
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_longer_than_the_longest_delay_is_cut() {
        let store = Store::new(Settings::default());
        let d = Discovery::new(
            store.clone(),
            Arc::new(Metrics::default()),
            Vec::new(),
            Duration::from_millis(100),
        );
        let mut epochs = d.epochs.subscribe();
        let task = tokio::spawn(d.clone().run());
        tokio::task::yield_now().await;
        // Changes every 50 ms for 3 s: never quiet, yet proxies hear at least every MAX_DELAY.
        let mut seen = 0;
        for i in 0..60 {
            store.update(|r| {
                r.upsert(service(i));
                true
            });
            tokio::time::advance(Duration::from_millis(50)).await;
            if epochs.has_changed().expect("open") {
                epochs.borrow_and_update();
                seen += 1;
            }
        }
        assert!((2..=4).contains(&seen), "{seen} epochs in 3 s of changes");
        task.abort();
    }
}

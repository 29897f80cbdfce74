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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
use crate::resources::{ProxyRef, Resources, Store};
use crate::translate;

/// Quiet time that ends a burst of changes.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest a change waits for its burst to end.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// Time a proxy has to introduce itself after opening the stream.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
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
    cache: Mutex<HashMap<OutboundKey, Arc<SharedOutbound>>>,
}

impl Epoch {
    fn new(
        seq: u64,
        generation: u64,
        resources: Arc<Resources>,
        changed_at: Instant,
    ) -> Arc<Epoch> {
        Arc::new(Epoch {
            seq,
            generation,
            resources,
            changed_at,
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
    trust_bundle: Vec<String>,
    versions: AtomicU64,
    debounce: Duration,
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
    next_stream: AtomicU64,
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
        let epoch = Epoch::new(0, store.generation(), store.snapshot(), Instant::now());
        Arc::new(Discovery {
            store,
            epochs: watch::Sender::new(epoch),
            metrics,
            trust_bundle,
            versions: AtomicU64::new(0),
            debounce,
            proxies: Mutex::new(BTreeMap::new()),
            next_stream: AtomicU64::new(0),
        })
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Turns store changes into epochs, debounced. Runs until the store goes away.
    pub async fn run(self: Arc<Self>) {
        let mut generation = self.store.subscribe();
        let mut seq = 0;
        loop {
            if generation.changed().await.is_err() {
                return;
            }
            let first = Instant::now();
            let mut last = first;
            loop {
                let deadline = (last + self.debounce).min(first + MAX_DELAY);
                tokio::select! {
                    changed = generation.changed() => {
                        if changed.is_err() { return; }
                        last = Instant::now();
                    }
                    () = tokio::time::sleep_until(deadline.into()) => break,
                }
            }
            seq += 1;
            // Read before the snapshot: the resources are at least this generation.
            let at = self.store.generation();
            let resources = self.store.snapshot();
            debug!(seq, generation = at, "config epoch");
            self.epochs
                .send_replace(Epoch::new(seq, at, resources, first));
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
        let bundle = serde_json::to_vec(&self.trust_bundle)?;
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
        if node.namespace != identity.namespace {
            warn!(proxy = %format!("{}/{}", node.namespace, node.name), identity = %identity.spiffe, "node namespace does not match the certificate");
            return error(
                StatusCode::FORBIDDEN,
                &format!(
                    "node namespace {:?} does not match the certificate's namespace {:?}",
                    node.namespace, identity.namespace
                ),
            );
        }
        let resources = self.store.snapshot();
        if let Some(pod) = resources.pod(&node.namespace, &node.name) {
            let p = ProxyRef::from_pod(pod);
            if p.service_account != identity.service_account {
                return error(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "pod {}/{} runs as service account {:?}, the certificate is for {:?}",
                        node.namespace, node.name, p.service_account, identity.service_account
                    ),
                );
            }
        }
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
        tx: mpsc::Sender<Bytes>,
        pending: Arc<Pending>,
    ) {
        let label = format!("{}/{}", node.namespace, node.name);
        let mut epochs = self.epochs.subscribe();
        let first_seq = epochs.borrow().seq;
        let mut last_hash: Option<u64> = None;
        loop {
            let epoch = epochs.borrow_and_update().clone();
            let proxy = match epoch.resources.pod(&node.namespace, &node.name) {
                Some(pod) => {
                    let p = ProxyRef::from_pod(pod);
                    if p.service_account != identity.service_account {
                        warn!(proxy = %label, "pod now runs as another service account; closing");
                        return;
                    }
                    p
                }
                None => ProxyRef {
                    namespace: node.namespace.clone(),
                    name: node.name.clone(),
                    service_account: identity.service_account.clone(),
                    labels: BTreeMap::new(),
                    ip: node.ip,
                },
            };
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

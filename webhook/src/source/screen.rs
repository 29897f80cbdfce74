//! Screening: both sources run every Istio / Gateway API / SMI object they read through the
//! validator of [`weft_api::validate`] before the store sees it.
//!
//! Why here and not only at admission: the ValidatingWebhookConfiguration normally keeps
//! such objects out of a cluster, but not always (objects created before the webhook,
//! `failurePolicy: Ignore`, a webhook that was down), and local mode has no admission at all.
//! An object the validator rejects (an invalid regex, say) would be translated and reach
//! proxies, which refuse their whole snapshot because of it: one bad object would stall every
//! config change for every proxy that sees it.
//!
//! So an object with error findings is not used: its last good version, if there was one,
//! stays in force, otherwise it is absent. It is logged once per content (warn, with its
//! findings and their field paths), counted in `weft_config_rejected{kind}` while it is held
//! back and in `weft_config_rejections_total{kind}` per rejected version. When a valid version
//! arrives it is used, and the hold is lifted (logged at info). Warnings do not block.

use std::collections::BTreeMap;
use std::hash::{Hash as _, Hasher as _};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::Value;
use tracing::{debug, info, warn};
use weft_api::crd;
use weft_api::validate::{Finding, Severity, has_errors, validate_object};

use crate::metrics::{ConfigKindLabels, Metrics};
use crate::resources::ObjectKey;

/// A version of an object that the validator rejects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Hash of the object's content ([`content_hash`]): a version already reported is not
    /// logged again.
    pub content: u64,
    /// Every finding, errors and warnings.
    pub findings: Vec<Finding>,
}

/// A hash of an object's JSON, to tell its versions apart.
pub fn content_hash(value: &Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.to_string().hash(&mut h);
    h.finish()
}

/// Whether `object` (JSON) is of a kind that is screened: an Istio / Gateway API / SMI kind
/// Weft reads.
pub fn is_screened(object: &Value) -> bool {
    let api_version = object.get("apiVersion").and_then(Value::as_str);
    let kind = object.get("kind").and_then(Value::as_str);
    match (api_version, kind) {
        (Some(api_version), Some(kind)) => {
            crd::known_kind(crd::split_api_version(api_version).0, kind).is_some()
        }
        _ => false,
    }
}

/// Validates `object` when it is of a screened kind. `Err` (with every finding) when the
/// validator finds an error; objects of other kinds always pass.
pub fn check(object: &Value) -> Result<(), Rejected> {
    if !is_screened(object) {
        return Ok(());
    }
    let findings = validate_object(object);
    if has_errors(&findings) {
        return Err(Rejected {
            content: content_hash(object),
            findings,
        });
    }
    if !findings.is_empty() {
        debug!(
            object = %findings[0].object,
            warnings = %describe(&findings, Severity::Warning),
            "config object accepted with warnings"
        );
    }
    Ok(())
}

/// `field: message; …` of the findings of one severity.
fn describe(findings: &[Finding], severity: Severity) -> String {
    findings
        .iter()
        .filter(|f| f.severity == severity)
        .map(|f| {
            if f.field.is_empty() {
                f.message.clone()
            } else {
                format!("{}: {}", f.field, f.message)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Objects held back now, shared by a source's tasks.
#[derive(Debug, Clone, Default)]
pub struct Screen {
    held: Arc<Mutex<BTreeMap<ObjectKey, Rejected>>>,
    gauge: Family<ConfigKindLabels, Gauge>,
    counter: Family<ConfigKindLabels, Counter>,
    /// Lets everything through ([`Screen::pass_all`]).
    pass_all: bool,
}

impl Screen {
    /// A screen counting in `metrics`. ([`Screen::default`] logs the same but counts in
    /// metrics nobody exports.)
    pub fn new(metrics: &Metrics) -> Screen {
        Screen {
            held: Arc::default(),
            gauge: metrics.config_rejected.clone(),
            counter: metrics.config_rejections.clone(),
            pass_all: false,
        }
    }

    /// A screen that lets every object through unchecked, as a control plane without the
    /// validator would: only for tests of what proxies do with a snapshot they cannot use.
    pub fn pass_all() -> Screen {
        Screen {
            pass_all: true,
            ..Screen::default()
        }
    }

    /// [`check`], unless this screen lets everything through.
    pub fn check(&self, object: &Value) -> Result<(), Rejected> {
        if self.pass_all {
            return Ok(());
        }
        check(object)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ObjectKey, Rejected>> {
        // The map stays consistent across a panic elsewhere: every change is one insert or
        // remove.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_gauge(&self, held: &BTreeMap<ObjectKey, Rejected>, kind: &str) {
        let count = held.keys().filter(|k| k.kind == kind).count();
        self.gauge
            .get_or_create(&ConfigKindLabels {
                kind: kind.to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Holds `key` back with this rejected version; logs and counts it unless this very
    /// version is already held.
    pub fn hold(&self, key: &ObjectKey, rejected: Rejected) {
        let mut held = self.lock();
        if held.get(key).is_some_and(|h| h.content == rejected.content) {
            return;
        }
        warn!(
            kind = %key.kind,
            namespace = %key.namespace,
            name = %key.name,
            errors = %describe(&rejected.findings, Severity::Error),
            warnings = %describe(&rejected.findings, Severity::Warning),
            "config object rejected; its last good version, if any, stays in force"
        );
        self.counter
            .get_or_create(&ConfigKindLabels {
                kind: key.kind.clone(),
            })
            .inc();
        held.insert(key.clone(), rejected);
        self.set_gauge(&held, &key.kind);
    }

    /// Lifts the hold on `key`, if any: a valid version is in use (`fixed`), or the object is
    /// gone.
    pub fn release(&self, key: &ObjectKey, fixed: bool) {
        let mut held = self.lock();
        if held.remove(key).is_none() {
            return;
        }
        if fixed {
            info!(kind = %key.kind, namespace = %key.namespace, name = %key.name, "rejected config object fixed; using it");
        } else {
            debug!(kind = %key.kind, namespace = %key.namespace, name = %key.name, "rejected config object removed");
        }
        self.set_gauge(&held, &key.kind);
    }

    /// The keys held back now.
    pub fn held_keys(&self) -> Vec<ObjectKey> {
        self.lock().keys().cloned().collect()
    }

    /// What is held back now, with the findings of the rejected version.
    pub fn held(&self) -> Vec<(ObjectKey, Vec<Finding>)> {
        self.lock()
            .iter()
            .map(|(k, r)| (k.clone(), r.findings.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(regex: &str) -> Value {
        serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {
                "hosts": ["reviews"],
                "http": [{
                    "match": [{"uri": {"regex": regex}}],
                    "route": [{"destination": {"host": "reviews"}}],
                }],
            },
        })
    }

    fn key() -> ObjectKey {
        ObjectKey {
            kind: "networking.istio.io/VirtualService".into(),
            namespace: "shop".into(),
            name: "reviews".into(),
        }
    }

    fn metric(metrics: &Metrics, name: &str) -> Option<String> {
        let prefix = format!("{name}{{kind=\"networking.istio.io/VirtualService\"}} ");
        metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
    }

    #[test]
    fn errors_reject_warnings_pass_other_kinds_pass() {
        assert_eq!(check(&vs("^/api/.*")), Ok(()));
        let rejected = check(&vs("/api/(")).expect_err("an invalid regex");
        assert!(
            rejected
                .findings
                .iter()
                .any(|f| f.severity == Severity::Error
                    && f.field == "spec.http[0].match[0].uri.regex"),
            "{:?}",
            rejected.findings
        );
        // A name the API server would refuse is only a warning: not blocked.
        let mut warned = vs("^/api/.*");
        warned["metadata"]["name"] = "Reviews".into();
        assert_eq!(check(&warned), Ok(()));
        // Core kinds are not screened, even when they would not read.
        let service = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "a"}, "spec": {"ports": "nonsense"},
        });
        assert!(!is_screened(&service));
        assert_eq!(check(&service), Ok(()));
        // A version of a known kind that does not exist is rejected, naming the field.
        let mut old = vs("^/api/.*");
        old["apiVersion"] = "networking.istio.io/v9".into();
        let rejected = check(&old).expect_err("unknown version");
        assert!(rejected.findings.iter().any(|f| f.field == "apiVersion"));
    }

    #[test]
    fn a_version_is_reported_once_and_the_gauge_follows_the_holds() {
        let metrics = Metrics::default();
        let screen = Screen::new(&metrics);
        let bad = check(&vs("(")).expect_err("bad");
        screen.hold(&key(), bad.clone());
        screen.hold(&key(), bad.clone());
        assert_eq!(
            metric(&metrics, "weft_config_rejected").as_deref(),
            Some("1")
        );
        assert_eq!(
            metric(&metrics, "weft_config_rejections_total").as_deref(),
            Some("1"),
            "the same version twice is one rejection"
        );
        let worse = check(&vs("[")).expect_err("bad");
        assert_ne!(worse.content, bad.content);
        screen.hold(&key(), worse);
        assert_eq!(
            metric(&metrics, "weft_config_rejected").as_deref(),
            Some("1")
        );
        assert_eq!(
            metric(&metrics, "weft_config_rejections_total").as_deref(),
            Some("2")
        );
        assert_eq!(screen.held_keys(), vec![key()]);
        let held = screen.held();
        assert!(
            held[0].1.iter().any(|f| f.message.contains("\"[\"")),
            "the held findings are those of the last version: {held:?}"
        );

        screen.release(&key(), true);
        assert_eq!(
            metric(&metrics, "weft_config_rejected").as_deref(),
            Some("0")
        );
        assert!(screen.held_keys().is_empty());
        // Releasing what is not held changes nothing.
        screen.release(&key(), false);
        assert_eq!(
            metric(&metrics, "weft_config_rejected").as_deref(),
            Some("0")
        );
        // The same bad version after a fix is a new rejection: it is reported again.
        screen.hold(&key(), bad);
        assert_eq!(
            metric(&metrics, "weft_config_rejections_total").as_deref(),
            Some("3")
        );
    }
}

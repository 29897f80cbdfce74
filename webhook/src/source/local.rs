//! Local mode: every `*.yaml`, `*.yml` and `*.json` file under a directory (recursively,
//! multi-document, `kind: List` expanded) is read; the directory is polled every
//! [`POLL_INTERVAL`] and a file whose size or modification time changed is read again.
//!
//! Kinds: Namespace, Service, Pod (with `status.podIP`; endpoints come from pods matching
//! service selectors), EndpointSlice, Node (`apiVersion: v1`, its name and labels: the
//! injector reads `weft.dev/ebpf-redirect`; not translated), and every Istio / Gateway API /
//! SMI kind. Other kinds are ignored. A file that is not valid YAML is logged (file and line) and its last good
//! content is kept; a document that does not read as its kind, or that the validator rejects
//! (see [`super::screen`]), is logged and the object's last good version (from that file) is
//! kept. Objects without a namespace are in `default`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tracing::{debug, info, warn};
use weft_api::validate::parse_documents;

use super::screen::{Screen, content_hash};
use crate::resources::{Object, ObjectKey, Store, is_translated};

/// How often the directory is scanned.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Objects are compared by a hash of their JSON: keeping the JSON itself would double the
/// memory of a large directory.
#[derive(Debug, Default)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    objects: BTreeMap<ObjectKey, (u64, Object)>,
    /// Objects of the file that the validator rejects (held back by the screen).
    rejected: BTreeSet<ObjectKey>,
}

/// What one read of a file gives.
struct FileContent {
    objects: BTreeMap<ObjectKey, (u64, Object)>,
    rejected: BTreeSet<ObjectKey>,
}

/// The directory source.
#[derive(Debug)]
pub struct LocalSource {
    dir: PathBuf,
    files: HashMap<PathBuf, FileState>,
    applied: BTreeMap<ObjectKey, u64>,
    screen: Screen,
}

fn key_of_value(value: &Value) -> Option<ObjectKey> {
    let kind = value.get("kind")?.as_str()?;
    let api_version = value.get("apiVersion")?.as_str()?;
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_owned();
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_owned();
    let (group, _) = weft_api::crd::split_api_version(api_version);
    Some(match (group, kind) {
        ("", "Namespace" | "Node") => ObjectKey {
            kind: kind.to_owned(),
            namespace: String::new(),
            name,
        },
        ("", "Service" | "Pod") | ("discovery.k8s.io", "EndpointSlice") => ObjectKey {
            kind: kind.to_owned(),
            namespace,
            name,
        },
        _ => ObjectKey {
            kind: format!("{group}/{kind}"),
            namespace,
            name,
        },
    })
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            walk(&path, out);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            && !path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        {
            out.push(path);
        }
    }
}

impl LocalSource {
    /// A source for `dir` (which need not exist yet). Rejected objects are logged but counted
    /// in no exported metric until [`LocalSource::with_screen`] gives it one.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: HashMap::new(),
            applied: BTreeMap::new(),
            screen: Screen::default(),
        }
    }

    /// Holds rejected objects in `screen` (made with [`Screen::new`] to count them in the
    /// control plane's metrics).
    pub fn with_screen(mut self, screen: Screen) -> Self {
        self.screen = screen;
        self
    }

    /// The objects held back now.
    pub fn screen(&self) -> &Screen {
        &self.screen
    }

    fn read_file(
        path: &Path,
        previous: &BTreeMap<ObjectKey, (u64, Object)>,
        screen: &Screen,
    ) -> Option<FileContent> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(error) => {
                warn!(file = %path.display(), %error, "cannot read config file; keeping its last content");
                return None;
            }
        };
        let mut objects = BTreeMap::new();
        let mut rejected = BTreeSet::new();
        let keep_previous = |objects: &mut BTreeMap<ObjectKey, (u64, Object)>, key: &ObjectKey| {
            if let Some(prev) = previous.get(key) {
                objects.insert(key.clone(), prev.clone());
            }
        };
        for doc in parse_documents(&text) {
            let value = match doc.content {
                Ok(v) => v,
                Err(error) => {
                    warn!(file = %path.display(), document = doc.index, error = %error.message, "invalid YAML; keeping the file's last good content");
                    return None;
                }
            };
            let key = key_of_value(&value);
            if let Err(rejection) = screen.check(&value) {
                match key {
                    Some(key) => {
                        screen.hold(&key, rejection);
                        keep_previous(&mut objects, &key);
                        rejected.insert(key);
                    }
                    // Without a kind and name there is no object to hold back; the file is
                    // read again only when it changes, so this is logged once per content.
                    None => warn!(
                        file = %path.display(),
                        document = doc.index,
                        errors = %rejection.findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                        "config object rejected"
                    ),
                }
                continue;
            }
            match Object::from_value(&value) {
                Ok(Some(object)) => {
                    let key = object.key();
                    objects.insert(key, (content_hash(&value), object));
                }
                Ok(None) => {
                    debug!(file = %path.display(), document = doc.index, "kind ignored");
                }
                Err(error) => {
                    warn!(file = %path.display(), document = doc.index, %error, "object cannot be read; keeping its last good version");
                    if let Some(key) = key {
                        keep_previous(&mut objects, &key);
                    }
                }
            }
        }
        Some(FileContent { objects, rejected })
    }

    /// Scans the directory once and applies what changed to `store`. Returns whether
    /// anything changed.
    pub fn sync(&mut self, store: &Store) -> bool {
        let mut paths = Vec::new();
        walk(&self.dir, &mut paths);
        let mut changed_files = false;
        let present: std::collections::HashSet<&PathBuf> = paths.iter().collect();
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        changed_files |= self.files.len() != before;
        // Whether what the files reject may have changed (a file read again or gone).
        let mut screened = changed_files;
        for path in &paths {
            let stamp = std::fs::metadata(path)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
            let state = self.files.entry(path.clone()).or_default();
            if state.stamp == stamp && stamp.is_some() {
                continue;
            }
            state.stamp = stamp;
            let Some(content) = Self::read_file(path, &state.objects, &self.screen) else {
                continue;
            };
            screened = true;
            state.rejected = content.rejected;
            if content
                .objects
                .iter()
                .map(|(k, (v, _))| (k, v))
                .ne(state.objects.iter().map(|(k, (v, _))| (k, v)))
            {
                state.objects = content.objects;
                changed_files = true;
            }
        }
        if !changed_files && !screened {
            return false;
        }
        let mut desired: BTreeMap<&ObjectKey, (&u64, &Object)> = BTreeMap::new();
        let mut ordered: Vec<(&PathBuf, &FileState)> = self.files.iter().collect();
        ordered.sort_by(|a, b| a.0.cmp(b.0));
        for (_, state) in &ordered {
            for (k, (v, o)) in &state.objects {
                desired.insert(k, (v, o));
            }
        }
        if screened {
            // A hold ends when no file rejects the object any more: it was fixed (a valid
            // version is in use) or it is gone.
            let rejected: BTreeSet<&ObjectKey> =
                ordered.iter().flat_map(|(_, s)| &s.rejected).collect();
            for key in self.screen.held_keys() {
                if !rejected.contains(&key) {
                    self.screen.release(&key, desired.contains_key(&key));
                }
            }
        }
        if !changed_files {
            return false;
        }
        let removed: Vec<ObjectKey> = self
            .applied
            .keys()
            .filter(|k| !desired.contains_key(k))
            .cloned()
            .collect();
        let upserts: Vec<(ObjectKey, u64, Object)> = desired
            .iter()
            .filter(|(k, (v, _))| self.applied.get(**k) != Some(*v))
            .map(|(k, (v, o))| ((*k).clone(), **v, (*o).clone()))
            .collect();
        if removed.is_empty() && upserts.is_empty() {
            return false;
        }
        debug!(
            removed = removed.len(),
            changed = upserts.len(),
            "local config changed"
        );
        for k in &removed {
            self.applied.remove(k);
        }
        for (k, v, _) in &upserts {
            self.applied.insert(k.clone(), *v);
        }
        // Nodes are not translated: a change of nodes alone does not wake discovery.
        let translated = removed
            .iter()
            .chain(upserts.iter().map(|(k, _, _)| k))
            .any(|k| is_translated(&k.kind));
        store.update(|r| {
            for k in &removed {
                r.remove(k);
            }
            for (_, _, o) in upserts {
                r.upsert(o);
            }
            translated
        });
        true
    }

    /// Polls forever.
    pub async fn run(mut self, store: Arc<Store>) {
        info!(dir = %self.dir.display(), "watching local config directory");
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Reading files blocks; it is short, and this task is alone in doing it.
            self = match tokio::task::spawn_blocking({
                let store = store.clone();
                move || {
                    self.sync(&store);
                    self
                }
            })
            .await
            {
                Ok(s) => s,
                Err(error) => {
                    warn!(%error, "local config scan panicked; stopping it");
                    return;
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::resources::Settings;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec: {ports: [{port: 80}]}\n";

    /// A VirtualService `name` whose only route matches `regex`.
    fn routed(name: &str, regex: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  hosts: [{name}]\n  http:\n  - match: [{{uri: {{regex: '{regex}'}}}}]\n    route: [{{destination: {{host: {name}}}}}]\n"
        )
    }

    fn destination_rule(lb: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: shop}}\nspec: {{host: reviews, trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}}}\n"
        )
    }

    fn stored_lb(store: &Store) -> Option<String> {
        let r = store.snapshot();
        let entry = r.configs.get(&(
            "networking.istio.io/DestinationRule".to_owned(),
            "shop".to_owned(),
            "reviews".to_owned(),
        ))?;
        let weft_api::crd::AnyResource::DestinationRule(dr) = &*entry.resource else {
            panic!("a DestinationRule")
        };
        let value = serde_json::to_value(&dr.spec).expect("serialisable");
        value["trafficPolicy"]["loadBalancer"]["simple"]
            .as_str()
            .map(str::to_owned)
    }

    fn metric(metrics: &Metrics, name: &str) -> String {
        let prefix = format!("{name}{{kind=\"networking.istio.io/VirtualService\"}} ");
        let text = metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {prefix} in {text}"))
    }

    fn held_names(src: &LocalSource) -> Vec<String> {
        src.screen()
            .held_keys()
            .into_iter()
            .map(|k| k.name)
            .collect()
    }

    #[test]
    fn rejected_objects_are_held_back_and_the_rest_is_used() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write");
        write(
            "reviews.yaml",
            &format!(
                "{SERVICE}---\n{}---\n{}",
                routed("reviews", "^/v1/.*"),
                destination_rule("ROUND_ROBIN")
            ),
        );
        // Next to the good ones, a VirtualService with an invalid regex and no earlier version.
        write("ratings.yaml", &routed("ratings", "/v1/("));
        let store = Store::new(Settings::default());
        let metrics = Metrics::default();
        let mut src = LocalSource::new(dir.to_path_buf()).with_screen(Screen::new(&metrics));
        assert!(src.sync(&store));
        assert_eq!(store.snapshot().services.len(), 1);
        assert_eq!(
            crate::source::stored_regex(&store, "reviews").as_deref(),
            Some("^/v1/.*")
        );
        assert_eq!(stored_lb(&store).as_deref(), Some("ROUND_ROBIN"));
        assert_eq!(
            crate::source::stored_regex(&store, "ratings"),
            None,
            "rejected: absent"
        );
        assert_eq!(held_names(&src), ["ratings"]);
        let held = src.screen().held();
        assert!(
            held[0].1.iter().any(
                |f| f.field == "spec.http[0].match[0].uri.regex" && f.message.contains("/v1/(")
            ),
            "the findings name the field: {held:?}"
        );
        assert_eq!(metric(&metrics, "weft_config_rejected"), "1");

        // The good one turns bad in the same file as changes to others: those are used, the
        // bad one keeps its last good version.
        write(
            "reviews.yaml",
            &format!(
                "{SERVICE}---\n{}---\n{}",
                routed("reviews", "^/v2/[a-"),
                destination_rule("LEAST_REQUEST")
            ),
        );
        assert!(src.sync(&store));
        assert_eq!(stored_lb(&store).as_deref(), Some("LEAST_REQUEST"));
        assert_eq!(
            crate::source::stored_regex(&store, "reviews").as_deref(),
            Some("^/v1/.*")
        );
        assert_eq!(held_names(&src), ["ratings", "reviews"]);
        assert_eq!(metric(&metrics, "weft_config_rejected"), "2");
        assert_eq!(metric(&metrics, "weft_config_rejections_total"), "2");

        // Reading the same bad content again (its file rewritten with another change) does
        // not report it again.
        write(
            "reviews.yaml",
            &format!(
                "{SERVICE}---\n{}---\n{}",
                routed("reviews", "^/v2/[a-"),
                destination_rule("RANDOM")
            ),
        );
        assert!(src.sync(&store));
        assert_eq!(stored_lb(&store).as_deref(), Some("RANDOM"));
        assert_eq!(metric(&metrics, "weft_config_rejections_total"), "2");
        assert!(!src.sync(&store), "nothing changed");

        // Fixed: the fixed version is used and the hold lifted.
        write("ratings.yaml", &routed("ratings", "^/v1/(a|b)$"));
        assert!(src.sync(&store));
        assert_eq!(
            crate::source::stored_regex(&store, "ratings").as_deref(),
            Some("^/v1/(a|b)$")
        );
        assert_eq!(held_names(&src), ["reviews"]);
        assert_eq!(metric(&metrics, "weft_config_rejected"), "1");

        // The bad document leaves its file while nothing the store holds changes: the hold
        // is lifted all the same, and the last good version goes with the document.
        write(
            "reviews.yaml",
            &format!("{SERVICE}---\n{}", destination_rule("RANDOM")),
        );
        assert!(src.sync(&store));
        assert_eq!(crate::source::stored_regex(&store, "reviews"), None);
        assert!(held_names(&src).is_empty());
        assert_eq!(metric(&metrics, "weft_config_rejected"), "0");

        // A rejected object held in a file that is then deleted.
        write("details.yaml", &routed("details", "("));
        src.sync(&store);
        assert_eq!(held_names(&src), ["details"]);
        std::fs::remove_file(dir.join("details.yaml")).expect("rm");
        src.sync(&store);
        assert!(held_names(&src).is_empty());
        assert_eq!(metric(&metrics, "weft_config_rejected"), "0");
        assert_eq!(metric(&metrics, "weft_config_rejections_total"), "3");
    }

    #[test]
    fn an_unnamed_rejected_document_is_skipped_and_the_rest_of_its_file_used() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::write(
            tmp.path().join("a.yaml"),
            format!(
                "{SERVICE}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nspec: {{hosts: [x]}}\n"
            ),
        )
        .expect("write");
        let store = Store::new(Settings::default());
        let mut src = LocalSource::new(tmp.path().to_path_buf());
        assert!(src.sync(&store));
        let r = store.snapshot();
        assert_eq!(r.services.len(), 1);
        assert!(r.configs.is_empty());
        assert!(src.screen().held_keys().is_empty(), "nothing to hold");
    }

    /// The `weft.dev/ebpf-redirect` label of each stored node.
    fn node_labels(store: &Store) -> Vec<(String, Option<String>)> {
        store
            .snapshot()
            .nodes
            .iter()
            .map(|(n, l)| (n.clone(), l.get("weft.dev/ebpf-redirect").cloned()))
            .collect()
    }

    #[test]
    fn reads_nodes_and_their_labels_without_waking_discovery() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("nodes.yaml");
        let node = |name: &str, label: &str| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/hostname: {name}{label}}}\n"
            )
        };
        std::fs::write(
            &path,
            format!(
                "{}---\n{}---\n{}",
                node("node-0", ", weft.dev/ebpf-redirect: ready"),
                node("node-1", ", weft.dev/ebpf-redirect: unsupported"),
                node("node-2", ""),
            ),
        )
        .expect("write");
        let store = Store::new(Settings::default());
        let mut src = LocalSource::new(tmp.path().to_path_buf());
        assert!(src.sync(&store));
        assert_eq!(
            node_labels(&store),
            [
                ("node-0".to_owned(), Some("ready".to_owned())),
                ("node-1".to_owned(), Some("unsupported".to_owned())),
                ("node-2".to_owned(), None),
            ]
        );
        let r = store.snapshot();
        assert_eq!(
            r.nodes["node-2"]
                .get("kubernetes.io/hostname")
                .map(String::as_str),
            Some("node-2"),
            "every label is kept"
        );
        assert!(r.services.is_empty() && r.pods.is_empty() && r.configs.is_empty());
        assert_eq!(store.generation(), 0, "nodes are not translated");

        // A label changes, a node goes, and one document no longer reads as a Node: its last
        // good version stays.
        std::fs::write(
            &path,
            format!(
                "{}---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-1, labels: [not, a, map]}}\n",
                node("node-0", ", weft.dev/ebpf-redirect: unsupported"),
            ),
        )
        .expect("write");
        assert!(src.sync(&store));
        assert_eq!(
            node_labels(&store),
            [
                ("node-0".to_owned(), Some("unsupported".to_owned())),
                ("node-1".to_owned(), Some("unsupported".to_owned())),
            ]
        );
        assert_eq!(store.generation(), 0);

        // A service beside them is translated: that wakes discovery.
        std::fs::write(tmp.path().join("svc.yaml"), SERVICE).expect("write");
        assert!(src.sync(&store));
        assert_eq!(store.generation(), 1);

        std::fs::remove_file(&path).expect("rm");
        assert!(src.sync(&store));
        assert!(store.snapshot().nodes.is_empty());
        assert_eq!(store.generation(), 1);
    }

    #[test]
    fn reads_changes_keeps_last_good_and_removes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(
            dir.join("sub/a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {ports: [{port: 80}]}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: ns}\nspec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}\n",
        )
        .expect("write");
        let store = Store::new(Settings::default());
        let mut src = LocalSource::new(dir.to_path_buf());
        assert!(src.sync(&store));
        let r = store.snapshot();
        assert_eq!(r.services.len(), 1);
        assert_eq!(r.configs.len(), 1);
        assert!(!src.sync(&store), "nothing changed");

        // Broken YAML: the last good content stays.
        std::fs::write(dir.join("sub/a.yaml"), "kind: [\n").expect("write");
        src.sync(&store);
        assert_eq!(store.snapshot().services.len(), 1);

        // A bad document keeps the last good version of that object.
        std::fs::write(
            dir.join("sub/a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {ports: [{port: notanumber}]}\n",
        )
        .expect("write");
        src.sync(&store);
        let r = store.snapshot();
        assert_eq!(r.services.len(), 1);
        assert_eq!(r.configs.len(), 0, "the VirtualService left the file");

        std::fs::remove_file(dir.join("sub/a.yaml")).expect("rm");
        assert!(src.sync(&store));
        assert!(store.snapshot().services.is_empty());
    }
}

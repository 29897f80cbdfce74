//! Local mode: every `*.yaml`, `*.yml` and `*.json` file under a directory (recursively,
//! multi-document, `kind: List` expanded) is read; the directory is polled every
//! [`POLL_INTERVAL`] and a file whose size or modification time changed is read again.
//!
//! Kinds: Namespace, Service, Pod (with `status.podIP`; endpoints come from pods matching
//! service selectors), EndpointSlice, and every Istio / Gateway API / SMI kind. Other kinds
//! are ignored. A file that is not valid YAML is logged (file and line) and its last good
//! content is kept; a document that does not read as its kind is logged and the object's
//! last good version (from that file) is kept. Objects without a namespace are in `default`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tracing::{debug, info, warn};
use weft_api::validate::parse_documents;

use crate::resources::{Object, ObjectKey, Store};

/// How often the directory is scanned.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Objects are compared by a hash of their JSON: keeping the JSON itself would double the
/// memory of a large directory.
#[derive(Debug, Default)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    objects: BTreeMap<ObjectKey, (u64, Object)>,
}

fn hash_value(value: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.to_string().hash(&mut h);
    h.finish()
}

/// The directory source.
#[derive(Debug)]
pub struct LocalSource {
    dir: PathBuf,
    files: HashMap<PathBuf, FileState>,
    applied: BTreeMap<ObjectKey, u64>,
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
        ("", "Namespace") => ObjectKey {
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
    /// A source for `dir` (which need not exist yet).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: HashMap::new(),
            applied: BTreeMap::new(),
        }
    }

    fn read_file(
        path: &Path,
        previous: &BTreeMap<ObjectKey, (u64, Object)>,
    ) -> Option<BTreeMap<ObjectKey, (u64, Object)>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(error) => {
                warn!(file = %path.display(), %error, "cannot read config file; keeping its last content");
                return None;
            }
        };
        let mut objects = BTreeMap::new();
        for doc in parse_documents(&text) {
            let value = match doc.content {
                Ok(v) => v,
                Err(error) => {
                    warn!(file = %path.display(), document = doc.index, error = %error.message, "invalid YAML; keeping the file's last good content");
                    return None;
                }
            };
            let key = key_of_value(&value);
            match Object::from_value(&value) {
                Ok(Some(object)) => {
                    let key = object.key();
                    objects.insert(key, (hash_value(&value), object));
                }
                Ok(None) => {
                    debug!(file = %path.display(), document = doc.index, "kind ignored");
                }
                Err(error) => {
                    warn!(file = %path.display(), document = doc.index, %error, "object cannot be read; keeping its last good version");
                    if let Some(key) = key
                        && let Some(prev) = previous.get(&key)
                    {
                        objects.insert(key, prev.clone());
                    }
                }
            }
        }
        Some(objects)
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
        for path in &paths {
            let stamp = std::fs::metadata(path)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
            let state = self.files.entry(path.clone()).or_default();
            if state.stamp == stamp && stamp.is_some() {
                continue;
            }
            state.stamp = stamp;
            if let Some(objects) = Self::read_file(path, &state.objects)
                && objects
                    .iter()
                    .map(|(k, (v, _))| (k, v))
                    .ne(state.objects.iter().map(|(k, (v, _))| (k, v)))
            {
                state.objects = objects;
                changed_files = true;
            }
        }
        if !changed_files {
            return false;
        }
        let mut desired: BTreeMap<&ObjectKey, (&u64, &Object)> = BTreeMap::new();
        let mut ordered: Vec<(&PathBuf, &FileState)> = self.files.iter().collect();
        ordered.sort_by(|a, b| a.0.cmp(b.0));
        for (_, state) in ordered {
            for (k, (v, o)) in &state.objects {
                desired.insert(k, (v, o));
            }
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
        store.update(|r| {
            for k in &removed {
                r.remove(k);
            }
            for (_, _, o) in upserts {
                r.upsert(o);
            }
            true
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
    use crate::resources::Settings;

    #[test]
    fn reads_changes_keeps_last_good_and_removes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(
            dir.join("sub/a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {ports: [{port: 80}]}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: ns}\nspec: {hosts: [a]}\n",
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

//! The RFC 6902 patch from the pod as received to the injected pod.
//!
//! A plain JSON diff would turn "insert the proxy at `containers[0]`" into field-by-field
//! replacements of the app container at index 0, which goes wrong for any field of that
//! container the typed model does not know (a newer Kubernetes field) — it would stay behind at
//! index 0. So the patch follows the pod's shape: labels and annotations per key, containers,
//! init containers and volumes as lists keyed by name (inserted, moved, removed, or changed per
//! top-level field), anything else replaced whole.

use json_patch::jsonptr::{Pointer, PointerBuf};
use json_patch::{
    AddOperation, MoveOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation,
};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy)]
enum Shape {
    /// The pod.
    Root,
    /// `metadata`, `spec`: recurse per field.
    Object,
    /// Labels and annotations: per key, values replaced whole.
    StringMap,
    /// Containers, init containers, volumes: keyed by `name`.
    Keyed,
    /// One element of a keyed list: per top-level field.
    Element,
}

fn child_shape(parent: Shape, key: &str) -> Option<Shape> {
    match (parent, key) {
        (Shape::Root, "metadata" | "spec") => Some(Shape::Object),
        (Shape::Object, "labels" | "annotations") => Some(Shape::StringMap),
        (Shape::Object, "containers" | "initContainers" | "volumes") => Some(Shape::Keyed),
        _ => None,
    }
}

/// The patch that turns `before` into `after` (both serialized pods).
pub fn build(before: &Value, after: &Value) -> Patch {
    let mut ops = Vec::new();
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            object(&mut ops, Pointer::root(), b, a, Shape::Root)
        }
        _ => ops.push(replace(Pointer::root(), after)),
    }
    Patch(ops)
}

fn add(path: PointerBuf, value: &Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path,
        value: value.clone(),
    })
}

fn replace(path: &Pointer, value: &Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: path.to_buf(),
        value: value.clone(),
    })
}

fn object(
    ops: &mut Vec<PatchOperation>,
    path: &Pointer,
    before: &Map<String, Value>,
    after: &Map<String, Value>,
    shape: Shape,
) {
    for key in before.keys() {
        if !after.contains_key(key) {
            ops.push(PatchOperation::Remove(RemoveOperation {
                path: path.with_trailing_token(key.as_str()),
            }));
        }
    }
    for (key, a) in after {
        let child = path.with_trailing_token(key.as_str());
        let Some(b) = before.get(key) else {
            ops.push(add(child, a));
            continue;
        };
        if a == b {
            continue;
        }
        let sub = match shape {
            Shape::Root | Shape::Object => child_shape(shape, key),
            Shape::StringMap | Shape::Keyed | Shape::Element => None,
        };
        match (sub, b, a) {
            (Some(s @ (Shape::Object | Shape::StringMap)), Value::Object(b), Value::Object(a)) => {
                object(ops, &child, b, a, s)
            }
            (Some(Shape::Keyed), Value::Array(b), Value::Array(a)) => keyed(ops, &child, b, a),
            _ => ops.push(replace(&child, a)),
        }
    }
}

fn name(v: &Value) -> Option<&str> {
    v.get("name").and_then(Value::as_str)
}

fn unique_names(list: &[Value]) -> bool {
    let mut names: Vec<_> = list.iter().map(name).collect();
    let n = names.len();
    names.sort_unstable();
    names.dedup();
    names.len() == n && names.iter().all(Option::is_some)
}

fn keyed(ops: &mut Vec<PatchOperation>, path: &Pointer, before: &[Value], after: &[Value]) {
    if !unique_names(before) || !unique_names(after) {
        ops.push(replace(path, &Value::Array(after.to_vec())));
        return;
    }
    let mut current: Vec<&Value> = before.iter().collect();
    for i in (0..current.len()).rev() {
        if !after.iter().any(|a| name(a) == name(current[i])) {
            ops.push(PatchOperation::Remove(RemoveOperation {
                path: path.with_trailing_token(i),
            }));
            current.remove(i);
        }
    }
    for (j, a) in after.iter().enumerate() {
        match current.iter().position(|c| name(c) == name(a)) {
            None => {
                ops.push(add(path.with_trailing_token(j), a));
                current.insert(j, a);
            }
            Some(k) => {
                if k != j {
                    ops.push(PatchOperation::Move(MoveOperation {
                        from: path.with_trailing_token(k),
                        path: path.with_trailing_token(j),
                    }));
                    let moved = current.remove(k);
                    current.insert(j, moved);
                }
                let b = current[j];
                if b != a {
                    match (b, a) {
                        (Value::Object(b), Value::Object(a)) => {
                            object(ops, &path.with_trailing_token(j), b, a, Shape::Element)
                        }
                        _ => ops.push(replace(&path.with_trailing_token(j), a)),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(before: Value, after: Value) -> Patch {
        let patch = build(&before, &after);
        let mut doc = before.clone();
        json_patch::patch(&mut doc, &patch).expect("patch applies");
        assert_eq!(
            doc,
            after,
            "{}",
            serde_json::to_string(&patch).expect("json")
        );
        patch
    }

    #[test]
    fn insert_front_keeps_unknown_fields_on_the_app_container() {
        let before = json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "app", "futureField": 1, "image": "a"}]}
        });
        let after = json!({
            "metadata": {"name": "p", "annotations": {"a/b": "c"}},
            "spec": {"containers": [{"name": "proxy"}, {"name": "app", "futureField": 1, "image": "a"}],
                     "initContainers": [{"name": "init"}]}
        });
        let patch = check(before, after);
        let text = serde_json::to_string(&patch).expect("json");
        assert!(text.contains(r#""path":"/spec/containers/0""#), "{text}");
        assert!(!text.contains("futureField"), "{text}");
    }

    #[test]
    fn keyed_lists_remove_move_change() {
        check(
            json!({"spec": {"containers": [{"name": "a"}, {"name": "istio-proxy", "tty": true}, {"name": "b", "x": 1}],
                            "volumes": [{"name": "v"}]},
                   "metadata": {"labels": {"k": "v", "x/y": "1"}}}),
            json!({"spec": {"containers": [{"name": "proxy"}, {"name": "b", "x": 2, "y": 3}, {"name": "a"}],
                            "volumes": [{"name": "v"}, {"name": "w"}]},
                   "metadata": {"labels": {"k": "v2", "x/y": "1", "new": "n"}}}),
        );
    }

    #[test]
    fn duplicate_names_fall_back_to_replace() {
        check(
            json!({"spec": {"containers": [{"name": "a"}, {"name": "a"}]}}),
            json!({"spec": {"containers": [{"name": "p"}, {"name": "a"}, {"name": "a"}]}}),
        );
    }
}

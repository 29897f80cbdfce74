//! A YAML stream read the way `kubectl` reads it: one JSON object per document, map keys as
//! strings, duplicate keys rejected, `kind: List` expanded into its items.

use serde::Deserialize;
use serde_json::Value;

/// Why one document of a stream could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DocumentError {
    /// The offending key when known (a duplicate key), else empty.
    pub field: String,
    /// What went wrong.
    pub message: String,
}

/// One document of a stream, numbered from 1 in the order it appears.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Position in the stream, from 1 (items of a `List` share their list's number).
    pub index: usize,
    /// The document as JSON, or why it could not be read.
    pub content: Result<Value, DocumentError>,
}

/// Splits a YAML stream into documents; empty documents are skipped.
pub fn parse_documents(yaml: &str) -> Vec<Document> {
    let mut documents = Vec::new();
    for (position, deserializer) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let index = position + 1;
        let content = match serde_yaml_ng::Value::deserialize(deserializer) {
            Ok(serde_yaml_ng::Value::Null) => continue,
            Ok(value) => to_json(value),
            Err(error) => Err(yaml_error(&error)),
        };
        match content {
            Ok(Value::Object(map))
                if map.get("kind").and_then(Value::as_str) == Some("List")
                    && map.get("items").is_some_and(Value::is_array) =>
            {
                let items = map
                    .get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                documents.extend(items.into_iter().map(|item| Document {
                    index,
                    content: Ok(item),
                }));
            }
            content => documents.push(Document { index, content }),
        }
        // The parser cannot resynchronise after a syntax error.
        if documents.last().is_some_and(|d| d.content.is_err()) {
            break;
        }
    }
    documents
}

fn yaml_error(error: &serde_yaml_ng::Error) -> DocumentError {
    let message = error.to_string();
    // "duplicate entry with key \"trafficPolicy\"" names the key.
    let field = message
        .split_once("duplicate entry with key \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(key, _)| key.to_string())
        .unwrap_or_default();
    DocumentError {
        field,
        message: format!("invalid YAML: {message}"),
    }
}

/// Converts YAML to JSON as the API server does: scalar keys become strings, tags are dropped.
fn to_json(value: serde_yaml_ng::Value) -> Result<Value, DocumentError> {
    use serde_yaml_ng::Value as Yaml;
    Ok(match value {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| DocumentError {
                        field: String::new(),
                        message: format!("number {n} cannot be represented in JSON"),
                    })?
            }
        }
        Yaml::String(s) => Value::String(s),
        Yaml::Sequence(items) => {
            Value::Array(items.into_iter().map(to_json).collect::<Result<_, _>>()?)
        }
        Yaml::Mapping(mapping) => {
            let mut map = serde_json::Map::new();
            for (key, value) in mapping {
                let key = match key {
                    Yaml::String(s) => s,
                    Yaml::Number(n) => n.to_string(),
                    Yaml::Bool(b) => b.to_string(),
                    Yaml::Null => "null".to_string(),
                    other => {
                        return Err(DocumentError {
                            field: String::new(),
                            message: format!("unsupported map key {other:?}"),
                        });
                    }
                };
                if map.contains_key(&key) {
                    return Err(DocumentError {
                        message: format!("invalid YAML: key {key:?} already set in map"),
                        field: key,
                    });
                }
                map.insert(key, to_json(value)?);
            }
            Value::Object(map)
        }
        Yaml::Tagged(tagged) => to_json(tagged.value)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_and_skips_empty_ones() {
        let docs = parse_documents("a: 1\n---\n---\nb: [x]\n");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].content, Ok(serde_json::json!({"a": 1})));
        assert_eq!(docs[1].index, 3);
    }

    #[test]
    fn integer_keys_become_strings() {
        let docs = parse_documents("portLevelMtls:\n  8080:\n    mode: DISABLE\n");
        assert_eq!(
            docs[0].content,
            Ok(serde_json::json!({"portLevelMtls": {"8080": {"mode": "DISABLE"}}}))
        );
    }

    #[test]
    fn duplicate_keys_are_rejected_with_the_key() {
        let docs = parse_documents("spec:\ntrafficPolicy: {}\ntrafficPolicy:\n  tls: {}\n");
        let error = docs[0].content.clone().expect_err("duplicate key");
        assert_eq!(error.field, "trafficPolicy");
    }

    #[test]
    fn lists_are_expanded() {
        let docs = parse_documents("kind: List\nitems:\n- kind: A\n- kind: B\n");
        assert_eq!(docs.len(), 2);
    }
}

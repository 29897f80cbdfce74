//! The shared corpus of real Istio and Gateway API configuration (`../shared/corpus`): every
//! valid document parses into its type, round-trips, and validates without errors; every
//! invalid one is rejected with an error naming the expected field.
#![cfg(feature = "crd")]

use std::path::{Path, PathBuf};

use serde_json::Value;
use weft_api::crd::{self, AnyResource};
use weft_api::validate::{Finding, Severity, parse_documents, validate_documents, validate_object};

fn corpus() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus");
    assert!(
        dir.join("MANIFEST.md").is_file(),
        "the shared corpus is missing at {}: these tests need ../shared/corpus beside the repository",
        dir.display()
    );
    dir
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// Files that must be accepted: upstream examples, samples, the `-valid` CRD tests and the
/// istioctl case that is valid with a warning.
fn valid_files() -> Vec<PathBuf> {
    let root = corpus();
    let mut files = Vec::new();
    for dir in ["istio-api/valid", "gateway-api", "samples"] {
        yaml_files(&root.join(dir), &mut files);
    }
    let mut crd_tests = Vec::new();
    yaml_files(&root.join("istio-api/crd-validation"), &mut crd_tests);
    files.extend(
        crd_tests
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with("-valid.yaml")),
    );
    files.push(
        root.join("istio-api/invalid/istioctl-validate/warning-deprecated-consecutive-errors.yaml"),
    );
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn is_known(value: &Value) -> bool {
    let group = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .map(|v| crd::split_api_version(v).0);
    let kind = value.get("kind").and_then(Value::as_str);
    matches!((group, kind), (Some(g), Some(k)) if crd::known_kind(g, k).is_some())
}

/// Drops nulls, empty lists and empty maps, and compares numbers as floats: what the typed
/// form may legitimately change.
fn normalize(value: &Value) -> Option<Value> {
    match value {
        Value::Null => None,
        Value::Array(items) => {
            let items: Vec<Value> = items.iter().filter_map(normalize).collect();
            (!items.is_empty()).then_some(Value::Array(items))
        }
        Value::Object(map) => {
            // Protobuf JSON treats `prefix_rewrite` and `prefixRewrite` as one field.
            let map: serde_json::Map<String, Value> = map
                .iter()
                .filter_map(|(k, v)| normalize(v).map(|v| (camel_case(k), v)))
                .collect();
            (!map.is_empty()).then_some(Value::Object(map))
        }
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number),
        other => Some(other.clone()),
    }
}

fn camel_case(key: &str) -> String {
    let mut parts = key.split('_');
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.push_str(chars.as_str());
        }
    }
    out
}

struct Doc {
    file: String,
    index: usize,
    value: Value,
}

fn known_documents() -> Vec<Doc> {
    let root = corpus();
    let mut docs = Vec::new();
    for path in valid_files() {
        let file = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        for doc in parse_documents(&read(&path)) {
            let value = doc
                .content
                .unwrap_or_else(|e| panic!("{file} document {}: {e}", doc.index));
            if is_known(&value) {
                docs.push(Doc {
                    file: file.clone(),
                    index: doc.index,
                    value,
                });
            }
        }
    }
    docs
}

#[test]
fn every_valid_document_parses_into_its_kind() {
    let docs = known_documents();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    let mut failures = Vec::new();
    for doc in &docs {
        match AnyResource::from_value(&doc.value) {
            Ok(Some(resource)) => {
                *kinds
                    .entry(resource.known_kind().kind.to_string())
                    .or_default() += 1
            }
            Ok(None) => failures.push(format!("{} #{}: not recognised", doc.file, doc.index)),
            Err(e) => failures.push(format!("{} #{}: {e}", doc.file, doc.index)),
        }
    }
    assert!(
        failures.is_empty(),
        "documents that do not parse:\n{}",
        failures.join("\n")
    );
    assert!(
        docs.len() >= 150,
        "only {} known documents found in the corpus",
        docs.len()
    );
    for kind in [
        "VirtualService",
        "DestinationRule",
        "Gateway",
        "ServiceEntry",
        "Sidecar",
        "PeerAuthentication",
        "AuthorizationPolicy",
        "RequestAuthentication",
        "Telemetry",
        "HTTPRoute",
    ] {
        assert!(
            kinds.get(kind).is_some_and(|n| *n > 0),
            "no {kind} in the corpus: {kinds:?}"
        );
    }
    println!("{} documents parsed: {kinds:?}", docs.len());
}

#[test]
fn round_trip_is_stable_and_keeps_every_field() {
    let mut failures = Vec::new();
    for doc in known_documents() {
        let first = AnyResource::from_value(&doc.value)
            .expect("parses")
            .expect("known");
        let written = first.to_value().expect("serializes");
        let second = AnyResource::from_value(&written)
            .expect("parses again")
            .expect("known");
        if first != second {
            failures.push(format!(
                "{} #{}: parse → serialize → parse differs",
                doc.file, doc.index
            ));
        }
        for part in ["spec", "metadata"] {
            let before = doc.value.get(part).and_then(normalize);
            let after = written.get(part).and_then(normalize);
            if before != after {
                failures.push(format!(
                    "{} #{}: {part} changed in the round trip\n  input:  {}\n  output: {}",
                    doc.file,
                    doc.index,
                    before.unwrap_or_default(),
                    after.unwrap_or_default()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn errors(findings: &[Finding]) -> Vec<&Finding> {
    findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .collect()
}

#[test]
fn valid_corpus_validates_without_errors() {
    let root = corpus();
    let mut failures = Vec::new();
    let mut files = 0;
    for path in valid_files() {
        let text = read(&path);
        // The CRD test files hold several variants of one object under one name, meant to be
        // applied one at a time: validate them document by document.
        let findings: Vec<Finding> = if path.to_string_lossy().contains("crd-validation") {
            parse_documents(&text)
                .into_iter()
                .flat_map(|d| validate_object(&d.content.expect("valid YAML")))
                .collect()
        } else {
            validate_documents(&text)
        };
        files += 1;
        for finding in errors(&findings) {
            failures.push(format!(
                "{}: {finding}",
                path.strip_prefix(&root).unwrap_or(&path).display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "errors on valid configuration:\n{}",
        failures.join("\n")
    );
    println!("{files} valid files validated");
}

/// The field each `_err` document of the CRD validation tests must be rejected on, in order.
fn crd_invalid_expectations(file: &str) -> &'static [&'static str] {
    match file {
        "authz-invalid.yaml" => &[
            "spec.rules[0].from[0].source",
            "spec.rules[0].from[0].source",
        ],
        "destinationrule-invalid.yaml" => &[
            "spec.trafficPolicy.loadBalancer.warmup.minimumPercent",
            "spec.trafficPolicy.loadBalancer.warmup.duration",
            "spec.trafficPolicy.loadBalancer.warmup.aggression",
        ],
        "peerauth-invalid.yaml" => &[
            "spec.mtls.mode",
            "spec.portLevelMtls",
            "spec.portLevelMtls",
            "spec.portLevelMtls",
            "spec.portLevelMtls",
            "spec.portLevelMtls",
        ],
        other => panic!("no expectations for {other}: add them"),
    }
}

#[test]
fn crd_validation_invalid_documents_are_rejected_on_the_expected_field() {
    let dir = corpus().join("istio-api/crd-validation");
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    let mut checked = 0;
    let mut failures = Vec::new();
    for path in files
        .iter()
        .filter(|p| p.to_string_lossy().ends_with("-invalid.yaml"))
    {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name");
        let expected = crd_invalid_expectations(name);
        let docs = parse_documents(&read(path));
        assert_eq!(docs.len(), expected.len(), "{name}: document count");
        for (doc, field) in docs.into_iter().zip(expected) {
            let mut value = doc.content.expect("valid YAML");
            let expected_error = value
                .as_object_mut()
                .and_then(|m| m.remove("_err"))
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| panic!("{name} document {} has no _err", doc.index));
            let findings = validate_object(&value);
            checked += 1;
            if !errors(&findings).iter().any(|f| f.field.starts_with(field)) {
                failures.push(format!(
                    "{name} document {} (expected {expected_error:?} on {field}): got {findings:#?}",
                    doc.index
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(checked, 11, "every _err document was checked");
}

#[test]
fn istioctl_invalid_files_are_rejected_on_the_expected_field() {
    let dir = corpus().join("istio-api/invalid/istioctl-validate");
    let cases = [
        ("invalid-duplicate-key.yaml", "trafficPolicy"),
        ("invalid-unsupported-top-level-key.yaml", "unexpected_junk"),
        ("invalid-virtual-service-empty-http.yaml", "spec.http"),
        (
            "invalid-virtual-service-negative-weight.yaml",
            "spec.http[0].route[1].weight",
        ),
    ];
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    let invalid = files
        .iter()
        .filter(|p| p.to_string_lossy().contains("/invalid-"))
        .count();
    assert_eq!(
        invalid,
        cases.len(),
        "every invalid istioctl case has an expectation"
    );
    for (file, field) in cases {
        let findings = validate_documents(&read(&dir.join(file)));
        assert!(
            errors(&findings).iter().any(|f| f.field == field),
            "{file}: expected an error on {field}, got {findings:#?}"
        );
    }
}

#[test]
fn deprecated_consecutive_errors_is_a_warning() {
    let path = corpus()
        .join("istio-api/invalid/istioctl-validate/warning-deprecated-consecutive-errors.yaml");
    let findings = validate_documents(&read(&path));
    assert!(errors(&findings).is_empty(), "{findings:#?}");
    assert!(
        findings.iter().any(|f| f.severity == Severity::Warning
            && f.field == "spec.trafficPolicy.outlierDetection.consecutiveErrors"
            && f.message.contains("deprecated")),
        "{findings:#?}"
    );
}

#[test]
fn seed_examples_validate_without_errors() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed-002-mesh.yaml");
    let docs = parse_documents(&read(&path));
    assert_eq!(docs.len(), 18);
    let mut all = Vec::new();
    for doc in docs {
        let value = doc.content.expect("valid YAML");
        assert!(
            AnyResource::from_value(&value).expect("parses").is_some(),
            "document {}",
            doc.index
        );
        all.extend(validate_object(&value));
    }
    assert!(errors(&all).is_empty(), "{all:#?}");
    // Telemetry's `dimensions` is not part of the Telemetry API: reported, not fatal.
    assert!(
        all.iter()
            .any(|f| f.severity == Severity::Warning && f.field.ends_with("dimensions")),
        "{all:#?}"
    );
}

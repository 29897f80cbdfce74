//! Golden files of Weft's own output (`weft-webhook inject -f`) for the corpus inputs, in
//! native mode and, for a few, classic mode. Regenerate with `WEFT_BLESS=1 cargo test -p
//! weft-webhook --test golden`; never edit them by hand. The crate version in image tags is
//! written as `VERSION` so that a release does not change them.

mod common;

use std::path::{Path, PathBuf};

use common::{corpus_inputs, file_name, is_bad};
use weft_webhook::manifest::inject_yaml;
use weft_webhook::mesh::{MeshConfig, NativeSidecar};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn normalise(yaml: &str) -> String {
    yaml.replace(&format!(":{}", env!("CARGO_PKG_VERSION")), ":VERSION")
}

fn check(name: &str, input: &Path, mesh: &MeshConfig, failures: &mut Vec<String>) {
    let yaml = std::fs::read_to_string(input).expect("read input");
    let out = inject_yaml(&yaml, mesh, None).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut text = normalise(&out.to_yaml().expect("yaml"));
    for w in &out.warnings {
        text.push_str(&format!("# warning: {w}\n"));
    }
    let path = golden_dir().join(name);
    if std::env::var_os("WEFT_BLESS").is_some() {
        std::fs::create_dir_all(golden_dir()).expect("mkdir golden");
        std::fs::write(&path, &text).expect("write golden");
        return;
    }
    match std::fs::read_to_string(&path) {
        Ok(expected) if expected == text => {}
        Ok(expected) => {
            let line = expected
                .lines()
                .zip(text.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| expected.lines().count().min(text.lines().count()));
            failures.push(format!(
                "{name}: differs from {} at line {} (WEFT_BLESS=1 to accept)",
                path.display(),
                line + 1
            ));
        }
        Err(_) => failures.push(format!(
            "{name}: no golden file {} (WEFT_BLESS=1 to create)",
            path.display()
        )),
    }
}

#[test]
fn injected_output_matches_golden_files() {
    let mut failures = Vec::new();
    let native = MeshConfig::default();
    for input in corpus_inputs().into_iter().filter(|p| !is_bad(p)) {
        let name = format!("{}.injected", file_name(&input));
        check(&name, &input, &native, &mut failures);
    }
    let classic = MeshConfig {
        native_sidecar: NativeSidecar::Disabled,
        ..MeshConfig::default()
    };
    let inputs = common::corpus_dir().join("inputs");
    for f in ["hello.yaml", "pod.yaml", "ready_live.yaml"] {
        let name = format!("{}-classic.yaml.injected", f.trim_end_matches(".yaml"));
        check(&name, &inputs.join(f), &classic, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

//! The `sidecar.istio.io/status` annotation, written as Istio writes it so that Istio-aware tools
//! (istioctl, Kiali) see the pod as injected, and read back to tell an injected pod.

use serde::{Deserialize, Serialize};

/// What the injector added. Field order and `null` for empty lists follow Istio.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarStatus {
    /// Init containers added (in native mode the proxy is one).
    #[serde(default)]
    pub init_containers: Option<Vec<String>>,
    /// Regular containers added (the proxy in classic mode).
    #[serde(default)]
    pub containers: Option<Vec<String>>,
    /// Volumes added.
    #[serde(default)]
    pub volumes: Option<Vec<String>>,
    /// Image pull secrets added (Weft adds none).
    #[serde(default)]
    pub image_pull_secrets: Option<Vec<String>>,
    /// Revision of the injector.
    #[serde(default)]
    pub revision: String,
}

impl SidecarStatus {
    /// The annotation value.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).expect("a struct of strings always serializes")
    }

    /// Parses an annotation value; `None` when it is not a status Weft or Istio wrote.
    pub fn parse(value: &str) -> Option<SidecarStatus> {
        serde_json::from_str(value).ok()
    }

    /// Names of all containers and init containers the status lists.
    pub fn container_names(&self) -> impl Iterator<Item = &str> {
        self.init_containers
            .iter()
            .flatten()
            .chain(self.containers.iter().flatten())
            .map(String::as_str)
    }
}

fn none_if_empty(v: Vec<String>) -> Option<Vec<String>> {
    (!v.is_empty()).then_some(v)
}

impl SidecarStatus {
    /// Builds a status from what was added.
    pub fn new(
        init_containers: Vec<String>,
        containers: Vec<String>,
        volumes: Vec<String>,
        revision: &str,
    ) -> SidecarStatus {
        SidecarStatus {
            init_containers: none_if_empty(init_containers),
            containers: none_if_empty(containers),
            volumes: none_if_empty(volumes),
            image_pull_secrets: None,
            revision: revision.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_shape() {
        let s = SidecarStatus::new(
            vec!["weft-init".into(), "weft-proxy".into()],
            vec![],
            vec!["weft-token".into()],
            "default",
        );
        assert_eq!(
            s.to_annotation(),
            r#"{"initContainers":["weft-init","weft-proxy"],"containers":null,"volumes":["weft-token"],"imagePullSecrets":null,"revision":"default"}"#
        );
        assert_eq!(SidecarStatus::parse(&s.to_annotation()), Some(s));
        let istio = r#"{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}"#;
        let parsed = SidecarStatus::parse(istio).expect("istio's status parses");
        assert_eq!(
            parsed.container_names().collect::<Vec<_>>(),
            ["istio-init", "istio-proxy"]
        );
    }
}

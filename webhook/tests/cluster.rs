//! Against a real cluster (kubeconfig): the control plane's registration. Built only with the
//! `kind` feature: `cargo xtask kind-e2e` runs it on a disposable kind cluster.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, DeleteParams, PostParams};
use weft_webhook::registration;
use weft_webhook::serving_cert;

#[tokio::test]
async fn ca_bundle_is_patched_into_the_webhook_configuration() {
    let client = kube::Client::try_default().await.expect("kubeconfig");
    let name = "weft-webhook-test";
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "test.weft.dev",
            "clientConfig": {"service": {"name": "nowhere", "namespace": "default", "path": "/inject"}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"weft-test": "never"}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"]
        }]
    }))
    .expect("config");
    let _ = api.delete(name, &DeleteParams::default()).await;
    api.create(&PostParams::default(), &config)
        .await
        .expect("create");
    let cert = serving_cert::generate(&["weft-test.default.svc".to_owned()]).expect("cert");
    assert!(
        registration::patch_ca_bundle(&client, name, &cert.ca_pem)
            .await
            .expect("patch")
    );
    assert!(
        !registration::patch_ca_bundle(&client, name, &cert.ca_pem)
            .await
            .expect("again")
    );
    let got = api.get(name).await.expect("get");
    let bundle = got.webhooks.expect("webhooks")[0]
        .client_config
        .ca_bundle
        .clone();
    assert_eq!(bundle.map(|b| b.0), Some(cert.ca_pem.into_bytes()));
    assert!(
        registration::supports_native_sidecars(&client)
            .await
            .is_ok()
    );
    api.delete(name, &DeleteParams::default())
        .await
        .expect("delete");
}

//! `security.istio.io`: PeerAuthentication, AuthorizationPolicy, RequestAuthentication
//! (istio/api `security/v1beta1/*.proto`, served as v1 and v1beta1).

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{IstioStatus, PolicyTargetReference, WorkloadSelector};

/// The API group.
pub const GROUP: &str = "security.istio.io";

// ---------------------------------------------------------------------------------------------
// PeerAuthentication
// ---------------------------------------------------------------------------------------------

/// Mutual TLS mode of a workload's inbound traffic (`PeerAuthentication.MutualTLS.Mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent (namespace, then mesh); PERMISSIVE when none.
    Unset,
    /// Plain text only.
    Disable,
    /// Mutual TLS and plain text.
    Permissive,
    /// Mutual TLS only.
    Strict,
}

/// Mutual TLS settings (`PeerAuthentication.MutualTLS`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MutualTls {
    /// Mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
}

/// Which inbound traffic must be mutual TLS (`PeerAuthentication`).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    shortname = "pa",
    category = "istio-io",
    category = "security-istio-io",
    namespaced,
    status = "IstioStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Peer authentication configuration for workloads.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mtls.mode"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads this applies to; none means the namespace (or the mesh in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Mode for all ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Per-port modes (workload ports, not service ports); needs a selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<BTreeMap<String, MutualTls>>")]
    pub port_level_mtls: Option<BTreeMap<u32, MutualTls>>,
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy
// ---------------------------------------------------------------------------------------------

/// What an AuthorizationPolicy does with matching requests (`AuthorizationPolicy.Action`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationAction {
    /// Allow matching requests (the default).
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
    /// Log matching requests (needs a provider).
    Audit,
    /// Delegate to an external authorizer (`provider`).
    Custom,
}

/// External authorizer of a CUSTOM policy (`AuthorizationPolicy.ExtensionProvider`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    /// Name of a mesh-config extension provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Access control for workloads (`AuthorizationPolicy`).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "ap",
    category = "istio-io",
    category = "security-istio-io",
    namespaced,
    status = "IstioStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Configuration for access control on workloads.",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads this applies to (exclusive with `targetRef(s)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Gateways, services or service entries this applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Rules, OR-ed; `None` (no rules) and `[]` differ: an ALLOW policy without rules allows
    /// nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
    /// Action, ALLOW by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<AuthorizationAction>,
    /// External authorizer for CUSTOM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
}

/// One rule: sources, operations and conditions, AND-ed (`Rule`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Sources, OR-ed; none matches any source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<RuleFrom>>,
    /// Operations, OR-ed; none matches any operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<RuleTo>>,
    /// Extra conditions, AND-ed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// A source wrapper (`Rule.From`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleFrom {
    /// The source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// An operation wrapper (`Rule.To`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleTo {
    /// The operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// Who sends the request; fields AND-ed, values OR-ed (`Source`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities (`<trust-domain>/ns/<ns>/sa/<sa>`), `*` wildcards at either end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Negated `principals`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT principals (`<iss>/<sub>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// Negated `requestPrincipals`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Negated `namespaces`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Peer service accounts (`sa` or `ns/sa`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Negated `serviceAccounts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// Peer IPs or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// Negated `ipBlocks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs (X-Forwarded-For, PROXY protocol).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    /// Negated `remoteIpBlocks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
    /// Peer trust domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    /// Negated `trustDomains`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Vec<String>,
}

/// What the request does; fields AND-ed, values OR-ed (`Operation`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Host (authority) values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Negated `hosts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports (strings).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Negated `ports`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods (gRPC: always POST).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Negated `methods`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Paths, with `*` at either end or `{*}`/`{**}` templates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Negated `paths`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// An extra condition on a request attribute (`Condition`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Attribute, e.g. `request.headers[x-id]`, `source.ip`, `request.auth.claims[iss]`.
    pub key: String,
    /// Accepted values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Rejected values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// RequestAuthentication
// ---------------------------------------------------------------------------------------------

/// End-user (JWT) authentication for workloads (`RequestAuthentication`).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "RequestAuthentication",
    plural = "requestauthentications",
    shortname = "ra",
    category = "istio-io",
    category = "security-istio-io",
    namespaced,
    status = "IstioStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Request authentication configuration for workloads."
)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// Workloads this applies to (exclusive with `targetRef(s)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Gateways, services or service entries this applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Accepted token issuers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

/// Where a token is read from (`JWTHeader`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    /// Header name.
    pub name: String,
    /// Prefix before the token, e.g. `Bearer `.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// Copy a claim into a header (`ClaimToHeader`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    /// Header to set.
    pub header: String,
    /// Claim to copy.
    pub claim: String,
}

/// Whether a token is required (`JWTRule.Presence`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JwtPresence {
    /// A missing token is accepted (authorization decides).
    Optional,
    /// A missing token is rejected.
    Required,
}

/// One accepted issuer (`JWTRule`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// Expected `iss` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Accepted `aud` values; none accepts the service's host names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where to fetch the signing keys (exclusive with `jwks`).
    #[serde(default, alias = "jwks_uri", skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// Inline JSON Web Key Set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers the token may be in; `Authorization: Bearer` by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters the token may be in; `access_token` by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Cookies the token may be in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// Header to receive the base64 payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the forwarded request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_original_token: Option<bool>,
    /// Claims copied into headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Timeout when fetching `jwksUri` (duration string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Claims holding space-separated lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub space_delimited_claims: Vec<String>,
    /// Whether a token is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<JwtPresence>,
}

//! `split.smi-spec.io` TrafficSplit rules.

use std::collections::BTreeSet;

use super::Report;
use super::syntax::validate_fqdn;
use crate::crd::smi::TrafficSplitSpec;

/// Validates a TrafficSplit spec.
pub(crate) fn traffic_split(spec: &TrafficSplitSpec, report: &mut Report) {
    if spec.service.is_empty() {
        report.error(
            "spec.service",
            "Required value: the root service is required",
        );
    } else {
        report.check("spec.service", validate_fqdn(&spec.service));
    }
    if spec.backends.is_empty() {
        report.error(
            "spec.backends",
            "Required value: at least one backend is required",
        );
    }
    let mut seen = BTreeSet::new();
    let mut total: i64 = 0;
    for (i, backend) in spec.backends.iter().enumerate() {
        let path = format!("spec.backends[{i}]");
        if backend.service.is_empty() {
            report.error(
                format!("{path}.service"),
                "Required value: backend service is required",
            );
        } else {
            report.check(format!("{path}.service"), validate_fqdn(&backend.service));
        }
        if !seen.insert(backend.service.as_str()) {
            report.error(
                format!("{path}.service"),
                format!("duplicate backend {:?}", backend.service),
            );
        }
        if backend.weight < 0 {
            report.error(
                format!("{path}.weight"),
                format!("weight {} < 0", backend.weight),
            );
        }
        total += backend.weight.max(0);
    }
    if !spec.backends.is_empty() && total == 0 {
        report.error("spec.backends", "total backend weight = 0");
    }
    for (i, m) in spec.matches.iter().enumerate() {
        if m.kind.is_empty() {
            report.error(format!("spec.matches[{i}].kind"), "Required value");
        }
        if m.name.is_empty() {
            report.error(format!("spec.matches[{i}].name"), "Required value");
        }
    }
}

//! `telemetry.istio.io` rules, after Istio's `ValidateTelemetry`.

use super::Report;
use super::security::one_of_selector;
use super::syntax::validate_duration;
use crate::crd::telemetry::{ProviderRef, TagOperation, TelemetrySpec};

fn providers(providers: &[ProviderRef], path: &str, report: &mut Report) {
    for (i, provider) in providers.iter().enumerate() {
        if provider.name.is_empty() {
            report.error(
                format!("{path}[{i}].name"),
                "providers.name may not be empty",
            );
        }
    }
}

/// Validates a Telemetry spec.
pub(crate) fn telemetry(spec: &TelemetrySpec, report: &mut Report) {
    one_of_selector(
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        &spec.target_refs,
        report,
    );

    for (i, metrics) in spec.metrics.iter().enumerate() {
        let path = format!("spec.metrics[{i}]");
        providers(&metrics.providers, &format!("{path}.providers"), report);
        if let Some(interval) = &metrics.reporting_interval {
            report.check(
                format!("{path}.reportingInterval"),
                validate_duration(interval),
            );
        }
        for (j, o) in metrics.overrides.iter().enumerate() {
            let field = format!("{path}.overrides[{j}]");
            for (tag, tag_override) in &o.tag_overrides {
                let tag_field = format!("{field}.tagOverrides[{tag}]");
                if tag.is_empty() {
                    report.warning(&tag_field, "tagOverrides.name may not be empty");
                }
                match tag_override.operation.unwrap_or(TagOperation::Upsert) {
                    TagOperation::Upsert
                        if tag_override.value.as_deref().is_none_or(str::is_empty) =>
                    {
                        report.error(
                            format!("{tag_field}.value"),
                            "value must be set when operation is UPSERT",
                        );
                    }
                    TagOperation::Remove
                        if tag_override.value.as_deref().is_some_and(|v| !v.is_empty()) =>
                    {
                        report.error(
                            format!("{tag_field}.value"),
                            "value must not be set when operation is REMOVE",
                        );
                    }
                    _ => {}
                }
            }
            if let Some(selector) = &o.r#match {
                if selector.custom_metric.as_deref().is_some_and(str::is_empty) {
                    report.error(
                        format!("{field}.match.customMetric"),
                        "customMetric may not be empty",
                    );
                }
                if selector.custom_metric.is_some() && selector.metric.is_some() {
                    report.error(
                        format!("{field}.match"),
                        "only one of metric or customMetric may be set",
                    );
                }
            }
        }
    }

    if spec.tracing.len() > 1 {
        report.warning(
            "spec.tracing",
            "multiple tracing is not currently supported",
        );
    }
    for (i, tracing) in spec.tracing.iter().enumerate() {
        let path = format!("spec.tracing[{i}]");
        if tracing.providers.len() > 1 {
            report.warning(
                format!("{path}.providers"),
                "multiple providers is not currently supported",
            );
        }
        providers(&tracing.providers, &format!("{path}.providers"), report);
        if let Some(p) = tracing.random_sampling_percentage
            && !(0.0..=100.0).contains(&p)
        {
            report.error(
                format!("{path}.randomSamplingPercentage"),
                "randomSamplingPercentage must be in range [0.0, 100.0]",
            );
        }
        for (name, tag) in &tracing.custom_tags {
            let field = format!("{path}.customTags[{name}]");
            if name.is_empty() {
                report.error(&field, "tag name may not be empty");
            }
            let kinds = [
                tag.literal.is_some(),
                tag.environment.is_some(),
                tag.header.is_some(),
                tag.formatter.is_some(),
            ];
            match kinds.iter().filter(|k| **k).count() {
                0 => report.error(
                    &field,
                    "tag must set one of literal, environment, header or formatter",
                ),
                1 => {}
                _ => report.error(
                    &field,
                    "only one of literal, environment, header or formatter may be set",
                ),
            }
            if tag.literal.as_ref().is_some_and(|l| l.value.is_empty()) {
                report.error(
                    format!("{field}.literal.value"),
                    "literal tag value may not be empty",
                );
            }
            if tag.header.as_ref().is_some_and(|h| h.name.is_empty()) {
                report.error(
                    format!("{field}.header.name"),
                    "header tag name may not be empty",
                );
            }
            if tag.environment.as_ref().is_some_and(|e| e.name.is_empty()) {
                report.error(
                    format!("{field}.environment.name"),
                    "environment tag name may not be empty",
                );
            }
        }
    }

    for (i, logging) in spec.access_logging.iter().enumerate() {
        providers(
            &logging.providers,
            &format!("spec.accessLogging[{i}].providers"),
            report,
        );
    }
}

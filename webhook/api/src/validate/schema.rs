//! Structural checks against the generated CRD schema, as the API server applies them: types,
//! enum values, bounds, required fields, and fields the schema does not know (which the API
//! server would prune, and `kubectl` / `istioctl validate` reject).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::Value;

use super::Report;
use crate::crd;

/// The object schema of every known kind, by (group, kind).
static SCHEMAS: LazyLock<BTreeMap<(String, String), JSONSchemaProps>> = LazyLock::new(|| {
    let mut schemas = BTreeMap::new();
    // The types always render; an empty map only disables the structural checks.
    for crd in crd::crds().unwrap_or_default() {
        let schema = crd
            .spec
            .versions
            .iter()
            .find(|v| v.storage)
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.clone());
        if let Some(schema) = schema {
            schemas.insert(
                (crd.spec.group.clone(), crd.spec.names.kind.clone()),
                schema,
            );
        }
    }
    schemas
});

const TOP_LEVEL_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];

/// Checks `object` (a known group and kind) against its schema.
pub(crate) fn check(group: &str, kind: &str, object: &Value, report: &mut Report) {
    let Some(map) = object.as_object() else {
        report.error("", "object must be a map");
        return;
    };
    for key in map.keys() {
        if !TOP_LEVEL_FIELDS.contains(&key.as_str()) {
            report.error(key, format!("unknown field {key:?}"));
        }
    }
    let Some(schema) = SCHEMAS.get(&(group.to_string(), kind.to_string())) else {
        return;
    };
    let properties = schema.properties.as_ref();
    if let (Some(spec), Some(spec_schema)) =
        (map.get("spec"), properties.and_then(|p| p.get("spec")))
        && !spec.is_null()
    {
        walk(spec, spec_schema, "spec", report);
    }
}

fn camel_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Object(_) => "object".into(),
        Value::Array(_) => "array".into(),
        other => other.to_string(),
    }
}

fn is_integral(value: &Value) -> bool {
    value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
}

fn walk(value: &Value, schema: &JSONSchemaProps, path: &str, report: &mut Report) {
    // The API server prunes nulls in non-nullable fields; nothing to check either way.
    if value.is_null() {
        return;
    }
    if schema.x_kubernetes_int_or_string == Some(true) {
        if !(value.is_string() || is_integral(value)) {
            report.error(
                path,
                format!(
                    "Invalid value: {}: must be an integer or a string",
                    describe(value)
                ),
            );
        }
        return;
    }
    if let Some(expected) = schema.type_.as_deref() {
        let ok = match expected {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_number() && is_integral(value),
            "number" => value.is_number(),
            _ => true,
        };
        if !ok {
            report.error(
                path,
                format!(
                    "Invalid value: {}: must be of type {expected}, not {}",
                    describe(value),
                    type_name(value)
                ),
            );
            return;
        }
    }
    if let Some(allowed) = &schema.enum_
        && !allowed.iter().any(|a| a.0 == *value)
    {
        let supported: Vec<String> = allowed.iter().map(|a| a.0.to_string()).collect();
        report.error(
            path,
            format!(
                "Unsupported value: {}: supported values: {}",
                value,
                supported.join(", ")
            ),
        );
    }
    if let Some(number) = value.as_f64() {
        if let Some(minimum) = schema.minimum
            && number < minimum
        {
            report.error(
                path,
                format!("Invalid value: {value}: must be greater than or equal to {minimum}"),
            );
        }
        if let Some(maximum) = schema.maximum
            && number > maximum
        {
            report.error(
                path,
                format!("Invalid value: {value}: must be less than or equal to {maximum}"),
            );
        }
    }
    match value {
        Value::Object(map) => {
            for required in schema.required.iter().flatten() {
                if map.get(required).is_none_or(Value::is_null) {
                    report.error(format!("{path}.{required}"), "Required value");
                }
            }
            for (key, child) in map {
                let child_path = format!("{path}.{key}");
                // Protobuf JSON accepts the original snake_case field names too.
                let property = schema
                    .properties
                    .as_ref()
                    .and_then(|p| p.get(key).or_else(|| p.get(&camel_case(key))));
                if let Some(child_schema) = property {
                    walk(child, child_schema, &child_path, report);
                    continue;
                }
                match &schema.additional_properties {
                    Some(JSONSchemaPropsOrBool::Schema(additional)) => {
                        walk(child, additional, &format!("{path}[{key}]"), report);
                    }
                    Some(JSONSchemaPropsOrBool::Bool(true)) => {}
                    _ if schema.x_kubernetes_preserve_unknown_fields == Some(true) => {}
                    _ => report.warning(
                        child_path,
                        format!("unknown field {key:?}: not part of the schema, the API server would drop it"),
                    ),
                }
            }
        }
        Value::Array(items) => match &schema.items {
            Some(JSONSchemaPropsOrArray::Schema(item_schema)) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, item_schema, &format!("{path}[{i}]"), report);
                }
            }
            Some(JSONSchemaPropsOrArray::Schemas(item_schemas)) => {
                for (i, (item, item_schema)) in items.iter().zip(item_schemas).enumerate() {
                    walk(item, item_schema, &format!("{path}[{i}]"), report);
                }
            }
            None => {}
        },
        _ => {}
    }
}

//! The Grafana dashboard (`k8s/grafana/hsat-dashboard.json`) queries only metrics
//! hsat exports: every metric name in every PromQL expression (panel targets and
//! template variables) is in the README's metric tables (whose names a live
//! scrape is checked against), histogram series (`_bucket`, `_sum`, `_count`) by
//! their base name. Also: the dashboard shows each thing an operator needs.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// Metric names of the README's metric tables (without their `{labels}`).
fn documented_metrics() -> BTreeSet<String> {
    hsat_tests::metrics::documented_metrics()
        .into_keys()
        .collect()
}

/// PromQL words that are not metric names: keywords, and the aggregation operators
/// (`sum by (le) (...)`: not followed by a parenthesis).
const KEYWORDS: [&str; 26] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
];

/// The metric names an expression selects: identifiers outside label matchers
/// (`{...}`), range selectors (`[...]`), strings and grouping clauses
/// (`by (...)`), that are not functions (followed by `(`), keywords or numbers.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    // After `by`/`without`/`on`/`ignoring`/`group_*`, the parenthesised list holds labels.
    let mut labels_next = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += 1;
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '"' | '\'' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += 1;
                }
                i += 1;
            }
            '(' if labels_next => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                labels_next = false;
            }
            c if c.is_ascii_digit() => {
                // A number, exponent and all (`1e-3`, `0x1F`): not a name.
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric()
                        || chars[i] == '.'
                        || (matches!(chars[i], '-' | '+') && matches!(chars[i - 1], 'e' | 'E')))
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&word.as_str())
                {
                    labels_next = true;
                } else if next != Some(&'(') && !KEYWORDS.contains(&word.to_lowercase().as_str()) {
                    names.push(word);
                }
            }
            '$' => {
                // A Grafana variable outside a selector (`$__interval`): skip it.
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Every PromQL expression of the dashboard: panel targets' `expr` (at any depth,
/// rows included) and the metric of `label_values(metric, label)` variables.
fn expressions(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, item) in map {
                match (key.as_str(), item) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    ("definition", serde_json::Value::String(query)) => {
                        if let Some(inner) = query
                            .strip_prefix("label_values(")
                            .and_then(|rest| rest.rsplit_once(','))
                        {
                            out.push(inner.0.to_owned());
                        }
                    }
                    _ => expressions(item, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| expressions(i, out)),
        _ => {}
    }
}

/// A series name as documented: histogram series map to their base name.
fn documented_name<'a>(name: &'a str, documented: &BTreeSet<String>) -> Option<&'a str> {
    if documented.contains(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        name.strip_suffix(suffix)
            .filter(|base| documented.contains(*base))
    })
}

fn dashboard() -> serde_json::Value {
    let path = repo_file("k8s/grafana/hsat-dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()))
}

#[test]
fn the_expression_scanner_finds_metrics_and_only_metrics() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le, method) (rate(hsat_rpc_duration_seconds_bucket{job=~"$job",code!="OK"}[$__rate_interval])))"#
        ),
        vec!["hsat_rpc_duration_seconds_bucket"]
    );
    assert_eq!(
        metric_names("60 * deriv(hsat_committed_steps[5m]) / on(job) hast_total_steps > 1e-3"),
        vec!["hsat_committed_steps", "hast_total_steps"]
    );
    let documented = documented_metrics();
    assert_eq!(
        documented_name("hsat_step_duration_seconds_count", &documented),
        Some("hsat_step_duration_seconds")
    );
    assert_eq!(documented_name("hast_total_steps", &documented), None);
}

#[test]
fn every_dashboard_query_names_documented_metrics() {
    let documented = documented_metrics();
    assert!(
        documented.len() >= 30,
        "the README's metric tables were not found: {documented:?}"
    );
    let mut exprs = Vec::new();
    expressions(&dashboard(), &mut exprs);
    assert!(exprs.len() >= 30, "too few queries found: {exprs:#?}");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "a query without a metric: {expr}");
        for name in names {
            match documented_name(&name, &documented) {
                Some(base) => {
                    used.insert(base.to_owned());
                }
                None => panic!("`{name}` in `{expr}` is not a metric of the README's tables"),
            }
        }
    }
    // What an operator of a robust-training job looks at (the issue's list).
    for needed in [
        "hsat_job_state",
        "hsat_committed_steps",
        "hsat_generation",
        "hsat_workers_alive",
        "hsat_rpc_requests_total",
        "hsat_rpc_duration_seconds",
        "hsat_auth_failures_total",
        "hsat_step_duration_seconds",
        "hsat_loss",
        "hsat_attack_gain",
        "hsat_attack_eps",
        "hsat_learning_rate",
        "hsat_checkpoint_age_seconds",
        "hsat_worker_patches_per_second",
        "hsat_worker_data_wait_seconds",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

#[test]
fn every_panel_has_a_title_and_reads_the_chosen_prometheus() {
    let dashboard = dashboard();
    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert!(
            panel["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{panel}"
        );
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {} does not use the dashboard's datasource variable",
            panel["title"]
        );
    }
}

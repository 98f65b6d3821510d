//! Property (fuzz) tests of the config loader: arbitrary text, arbitrary TOML
//! documents, and arbitrary values for every known key through each layer (file,
//! `HSAT__...` environment, `--set`). The properties:
//!
//! - loading never panics, whatever the input;
//! - a failure is a [`ConfigError`] that says where: a parse error names its
//!   document, and a value set for a known key that is refused is reported under
//!   that key's dotted name (or its environment variable), so the user knows what
//!   to fix;
//! - a loaded config survives `to_toml_string` -> `from_toml_str` unchanged.
//!
//! A few hundred cases each keep the file to seconds, so it runs with the ordinary
//! tests in CI.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::layers::{env_var_name, schema};
use super::*;

fn config() -> ProptestConfig {
    // `PROPTEST_CASES=100000` hunts deeper by hand; CI keeps the default.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(300);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Every leaf key of the schema (the built-in defaults), dotted, with its default.
fn leaf_keys() -> Vec<(String, toml::Value)> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
        for (name, value) in table {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match value {
                toml::Value::Table(inner) => walk(&key, inner, out),
                leaf => out.push((key, leaf.clone())),
            }
        }
    }
    let mut out = Vec::new();
    walk("", &schema().expect("the defaults form a table"), &mut out);
    out
}

/// A known key, by index into [`leaf_keys`].
fn known_key() -> impl Strategy<Value = String> {
    let keys: Vec<String> = leaf_keys().into_iter().map(|(key, _)| key).collect();
    proptest::sample::select(keys)
}

/// Leaf values that find edge cases in ranges and types.
fn leaf_value() -> impl Strategy<Value = toml::Value> {
    prop_oneof![
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(2),
            Just(3),
            Just(1 << 31),
            Just(1 << 53),
            Just(i64::MAX),
            Just(i64::MIN),
            any::<i64>(),
            -10i64..300,
        ]
        .prop_map(toml::Value::Integer),
        prop_oneof![
            Just(0.0f64),
            Just(-0.0),
            Just(0.5),
            Just(1e-12),
            Just(1e300),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            any::<f64>(),
            -10.0f64..300.0,
        ]
        .prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        prop_oneof![
            Just(String::new()),
            Just("pgd".to_owned()),
            Just("none".to_owned()),
            Just("resnet18".to_owned()),
            Just("/nonexistent/path".to_owned()),
            "[a-z_]{1,10}",
            any::<String>(),
        ]
        .prop_map(toml::Value::String),
        Just(toml::Value::Datetime(
            "1979-05-27T07:32:00Z".parse().expect("a TOML datetime")
        )),
    ]
}

/// Any TOML value, nested a little.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    leaf_value().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|map| toml::Value::Table(map.into_iter().collect())),
        ]
    })
}

/// Sets `key` (dotted) to `value` in `table`, creating tables on the way (a
/// non-table in the way is replaced).
fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("split gives at least one part");
    let mut current = table;
    for part in parts {
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        current = entry.as_table_mut().expect("made a table just above");
    }
    current.insert(last.to_owned(), value);
}

/// A document of known and unknown keys set to arbitrary values.
fn document() -> impl Strategy<Value = toml::Table> {
    let key = prop_oneof![
        3 => known_key(),
        1 => "[a-z_]{1,8}(\\.[a-z_]{1,8}){0,2}",
    ];
    prop::collection::vec((key, toml_value()), 0..6).prop_map(|entries| {
        let mut table = toml::Table::new();
        for (key, value) in entries {
            set_path(&mut table, &key, value);
        }
        table
    })
}

/// What a value looks like written in an environment variable or after `--set`.
fn as_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Either loaded, or every problem is a non-empty line; returns the problems.
fn problems_of(result: &Result<Config, ConfigError>) -> Vec<String> {
    match result {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid(problems)) => problems.clone(),
        Err(other) => vec![other.to_string()],
    }
}

/// A refused value for `key` is reported under `key` (or, for values from the
/// environment, its variable name).
fn names_the_key(key: &str, result: &Result<Config, ConfigError>) -> Result<(), TestCaseError> {
    let problems = problems_of(result);
    if problems.is_empty() {
        return Ok(());
    }
    let env_name = env_var_name(key);
    prop_assert!(
        problems
            .iter()
            .any(|p| p.contains(key) || p.contains(&env_name)),
        "setting {key} failed without naming it: {problems:#?}"
    );
    Ok(())
}

/// `training.attack.eps = ...`, `model.mlp_hidden[1] = ...`, `a: unknown key`: problems
/// start with the
/// dotted key they are about.
fn starts_with_a_key(problem: &str) -> bool {
    let first = problem.split([' ', ':']).next().unwrap_or_default();
    !first.is_empty()
        && first
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']' | '-'))
}

/// A loaded config reads back equal from its own TOML.
fn round_trips(result: &Result<Config, ConfigError>) -> Result<(), TestCaseError> {
    if let Ok(config) = result {
        let text = config.to_toml_string();
        match Config::from_toml_str(&text) {
            Ok(again) => prop_assert_eq!(&again, config),
            Err(err) => prop_assert!(false, "a loaded config does not load back: {err}\n{text}"),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        match Config::from_toml_str(&text) {
            Ok(_) | Err(ConfigError::Invalid(_)) => {}
            Err(ConfigError::Parse { origin, .. }) => prop_assert_eq!(origin, "TOML text"),
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
    }

    #[test]
    fn damaged_default_documents_never_panic(
        cut in 0usize..4000,
        insert in "[\\[\\]=\"'.,{}\n a-z0-9#-]{0,8}",
    ) {
        let text = Config::default().to_toml_string();
        let mut cut = cut.min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let damaged = format!("{}{insert}{}", &text[..cut], &text[cut..]);
        let result = Config::from_toml_str(&damaged);
        if let Err(ConfigError::Invalid(problems)) = &result {
            prop_assert!(problems.iter().all(|p| !p.trim().is_empty()));
        }
        round_trips(&result)?;
    }

    #[test]
    fn arbitrary_documents_never_panic_and_problems_name_keys(document in document()) {
        let Ok(text) = toml::to_string(&document) else {
            return Ok(()); // not representable as TOML text (e.g. a value after a table)
        };
        let result = Config::from_toml_str(&text);
        if let Err(ConfigError::Invalid(problems)) = &result {
            for problem in problems {
                prop_assert!(starts_with_a_key(problem), "problem does not start with a key: {problem}");
            }
        }
        round_trips(&result)?;
    }

    #[test]
    fn any_value_of_a_known_key_in_a_file_is_judged_under_that_key(
        key in known_key(),
        value in toml_value(),
    ) {
        let mut document = toml::Table::new();
        set_path(&mut document, &key, value);
        let Ok(text) = toml::to_string(&document) else {
            return Ok(());
        };
        let result = Config::from_toml_str(&text);
        names_the_key(&key, &result)?;
        round_trips(&result)?;
    }

    #[test]
    fn any_value_of_a_known_key_in_the_environment_is_judged_under_that_key(
        key in known_key(),
        value in toml_value(),
    ) {
        let env = BTreeMap::from([(env_var_name(&key), as_text(&value))]);
        let result = load(&ConfigSources { file: None, env, overrides: Vec::new() });
        names_the_key(&key, &result)?;
        round_trips(&result)?;
    }

    #[test]
    fn any_value_of_a_known_key_after_set_is_judged_under_that_key(
        key in known_key(),
        value in toml_value(),
    ) {
        let overrides = vec![format!("{key}={}", as_text(&value))];
        let result = load(&ConfigSources { file: None, env: BTreeMap::new(), overrides });
        names_the_key(&key, &result)?;
        round_trips(&result)?;
    }

    #[test]
    fn arbitrary_environment_and_overrides_never_panic(
        env in prop::collection::btree_map("HSAT__[A-Z_]{0,24}", any::<String>(), 0..4),
        overrides in prop::collection::vec(any::<String>(), 0..3),
    ) {
        let result = load(&ConfigSources { file: None, env, overrides });
        round_trips(&result)?;
    }
}

// ---- regressions: what the properties above found, one named test each ----

/// `cluster.heartbeat_s = 1.88e-54` was accepted as a zero `Duration` (the
/// heartbeat timer panics on zero) and did not load back from its own TOML.
#[test]
fn cluster_durations_below_a_nanosecond_are_refused() {
    let result = Config::from_toml_str("[cluster]\nheartbeat_s = 1.8805115471845594e-54\n");
    let Err(ConfigError::Invalid(problems)) = result else {
        panic!("expected the tiny heartbeat to be refused, got {result:?}");
    };
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("cluster.heartbeat_s = ") && p.contains("a nanosecond")),
        "{problems:#?}"
    );
    // A nanosecond itself is a (strange but) valid duration that loads back.
    let config = Config::from_toml_str("[cluster]\nheartbeat_s = 1e-9\n").unwrap();
    assert_eq!(config.cluster.heartbeat, std::time::Duration::from_nanos(1));
    assert_eq!(
        Config::from_toml_str(&config.to_toml_string()).unwrap(),
        config
    );
}

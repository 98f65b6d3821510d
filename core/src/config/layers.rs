//! Layering: built-in defaults < TOML file < `HSAT__...` environment < `--set`.
//!
//! The config crate merges the layers (tables merge key by key, the later layer wins
//! for each leaf) and reads the environment. The merged tree is then checked against
//! the schema, which is the tree of the built-in defaults: every key must exist there
//! and hold a value of the same TOML type (an integer is accepted where a float is
//! expected, and keeps being an integer: `num_warmup_steps` depends on it). Each
//! problem names the full dotted key and the layer that set it, and all of them are
//! reported together. The checked tree is a plain `toml::Table` that deserializes into
//! [`RawConfig`] strictly: the config crate's own conversions would, for example,
//! silently round `batch_size = 2.5` to 3.

use std::collections::BTreeMap;

use ::config::{Environment, Map, Source, Value, ValueKind};

use super::ConfigError;
use super::raw::RawConfig;
use super::types::Config;

/// Environment variables read: `HSAT__SECTION__KEY`.
const ENV_PREFIX: &str = "HSAT";
/// Separates the prefix and the key's parts in environment variable names.
const ENV_SEPARATOR: &str = "__";
/// Separates the elements of a list in an environment variable.
const ENV_LIST_SEPARATOR: &str = ",";
/// What the config crate records as the origin of environment values.
const ENV_ORIGIN: &str = "the environment";
/// Origin of the values nobody set.
const DEFAULTS_ORIGIN: &str = "built-in defaults";

/// TOML type of the elements of a list key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Element {
    Integer,
    Float,
}

/// The keys holding lists, with their element type (the default of `model.mlp_hidden`
/// is empty, so the defaults cannot tell).
const LIST_KEYS: [(&str, Element); 3] = [
    ("model.mlp_hidden", Element::Integer),
    ("training.adamw.betas", Element::Float),
    ("eval.eps", Element::Float),
];

/// A parsed TOML document and where it came from (`config file runs/a.toml`).
#[derive(Debug, Clone)]
pub(crate) struct TomlLayer {
    pub origin: String,
    pub table: toml::Table,
}

/// The merged configuration and what is wrong with its keys and types.
#[derive(Debug)]
pub(crate) struct Merged {
    /// Every key present; a key with a problem holds its default.
    pub raw: RawConfig,
    /// Unknown keys and values of the wrong type, one message each.
    pub problems: Vec<String>,
    /// Where each leaf key not left at its default was set (`environment variable
    /// HSAT__TRAINING__ATTACK__EPS`).
    pub origins: BTreeMap<String, String>,
}

/// Merges the layers and checks keys and types.
pub(crate) fn merge(
    file: Option<TomlLayer>,
    env: &BTreeMap<String, String>,
    overrides: &[String],
) -> Result<Merged, ConfigError> {
    let schema = schema()?;
    let mut set_layer = Map::new();
    for arg in overrides {
        let (path, value) = parse_override(arg, &schema)?;
        let origin = format!("--set {arg}");
        insert_path(&mut set_layer, &path, to_config_value(&value, &origin));
    }

    let mut builder =
        ::config::Config::builder().add_source(Layer::from_toml(DEFAULTS_ORIGIN, &schema));
    if let Some(file) = &file {
        builder = builder.add_source(Layer::from_toml(&file.origin, &file.table));
    }
    let merged = builder
        .add_source(environment(env))
        .add_source(Layer(set_layer))
        .build()
        .and_then(|merged| merged.collect())
        .map_err(|err| ConfigError::Parse {
            origin: "the configuration layers".to_owned(),
            message: err.to_string(),
        })?;

    let mut check = SchemaCheck::new(env);
    let table = check.table(&schema, &merged, "");
    let raw = toml::Value::Table(table)
        .try_into::<RawConfig>()
        .map_err(|err| ConfigError::Parse {
            origin: "the merged configuration".to_owned(),
            message: err.to_string(),
        })?;
    Ok(Merged {
        raw,
        problems: check.problems,
        origins: check.origins,
    })
}

/// The built-in defaults as a TOML tree: both the lowest layer and the schema.
pub(crate) fn schema() -> Result<toml::Table, ConfigError> {
    let failure = |message: String| ConfigError::Parse {
        origin: DEFAULTS_ORIGIN.to_owned(),
        message,
    };
    match toml::Value::try_from(RawConfig::from(&Config::default())) {
        Ok(toml::Value::Table(table)) => Ok(table),
        Ok(other) => Err(failure(format!("expected a table, got {other}"))),
        Err(err) => Err(failure(err.to_string())),
    }
}

/// The name of the environment variable that sets `key` (`training.attack.eps` ->
/// `HSAT__TRAINING__ATTACK__EPS`).
pub(crate) fn env_var_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{ENV_SEPARATOR}{}",
        key.replace('.', ENV_SEPARATOR).to_uppercase()
    )
}

fn environment(env: &BTreeMap<String, String>) -> Environment {
    let mut source = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .try_parsing(true)
        .list_separator(ENV_LIST_SEPARATOR);
    for (key, _) in LIST_KEYS {
        source = source.with_list_parse_key(key);
    }
    source.source(Some(
        env.iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
    ))
}

/// Splits `section.key=value`. The value is a TOML value when it parses as one
/// (`4`, `0.5`, `true`, `[256, 128]`, `"text"`), else the bare text; string keys always
/// take the text as written, so `infra.out_dir=2024.10` stays a folder name.
fn parse_override(
    arg: &str,
    schema: &toml::Table,
) -> Result<(Vec<String>, toml::Value), ConfigError> {
    let bad = |reason: &str| ConfigError::BadOverride {
        arg: arg.to_owned(),
        reason: reason.to_owned(),
    };
    let Some((key, text)) = arg.split_once('=') else {
        return Err(bad(
            "expected section.key=value, e.g. --set training.attack.eps=4",
        ));
    };
    let path: Vec<String> = key.trim().split('.').map(str::to_owned).collect();
    let well_formed = |part: &String| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if !path.iter().all(well_formed) {
        return Err(bad(
            "the key must be names joined by dots, e.g. training.attack.eps",
        ));
    }
    let text = text.trim();
    let is_string_key = matches!(lookup(schema, &path), Some(toml::Value::String(_)));
    let value = match parse_toml_value(text) {
        Some(toml::Value::String(parsed)) => toml::Value::String(parsed),
        Some(parsed) if !is_string_key => parsed,
        _ => toml::Value::String(text.to_owned()),
    };
    Ok((path, value))
}

/// `text` as one TOML value, if it is one.
fn parse_toml_value(text: &str) -> Option<toml::Value> {
    let mut document: toml::Table = toml::from_str(&format!("value = {text}")).ok()?;
    if document.len() != 1 {
        return None; // `1\nother = 2` is not one value
    }
    document.remove("value")
}

fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let value = table.get(first)?;
    if rest.is_empty() {
        Some(value)
    } else {
        lookup(value.as_table()?, rest)
    }
}

/// Sets `path` in `map`; tables merge key by key (so `--set training.adamw={eps=1e-7}`
/// keeps the other adamw keys), anything else replaces.
fn insert_path(map: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        if let ValueKind::Table(incoming) = &value.kind
            && let Some(Value {
                kind: ValueKind::Table(existing),
                ..
            }) = map.get_mut(first)
        {
            for (key, item) in incoming.clone() {
                insert_path(existing, &[key], item);
            }
            return;
        }
        map.insert(first.clone(), value);
        return;
    }
    let entry = map
        .entry(first.clone())
        .or_insert_with(|| Value::new(None, ValueKind::Table(Map::new())));
    if !matches!(entry.kind, ValueKind::Table(_)) {
        *entry = Value::new(None, ValueKind::Table(Map::new()));
    }
    if let ValueKind::Table(inner) = &mut entry.kind {
        insert_path(inner, rest, value);
    }
}

fn to_config_value(value: &toml::Value, origin: &String) -> Value {
    let kind = match value {
        toml::Value::String(text) => ValueKind::String(text.clone()),
        toml::Value::Integer(number) => ValueKind::I64(*number),
        toml::Value::Float(number) => ValueKind::Float(*number),
        toml::Value::Boolean(flag) => ValueKind::Boolean(*flag),
        toml::Value::Datetime(datetime) => ValueKind::String(datetime.to_string()),
        toml::Value::Array(items) => ValueKind::Array(
            items
                .iter()
                .map(|item| to_config_value(item, origin))
                .collect(),
        ),
        toml::Value::Table(table) => ValueKind::Table(
            table
                .iter()
                .map(|(key, item)| (key.clone(), to_config_value(item, origin)))
                .collect(),
        ),
    };
    Value::new(Some(origin), kind)
}

/// A prepared tree as a config-crate source.
#[derive(Debug, Clone)]
struct Layer(Map<String, Value>);

impl Layer {
    fn from_toml(origin: &str, table: &toml::Table) -> Self {
        let origin = origin.to_owned();
        Self(
            table
                .iter()
                .map(|(key, value)| (key.clone(), to_config_value(value, &origin)))
                .collect(),
        )
    }
}

impl Source for Layer {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, ::config::ConfigError> {
        Ok(self.0.clone())
    }
}

fn dotted(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A value as it would be written in TOML, for messages.
fn show(value: &Value) -> String {
    match &value.kind {
        ValueKind::Nil => "nothing".to_owned(),
        ValueKind::Boolean(flag) => flag.to_string(),
        ValueKind::I64(number) => number.to_string(),
        ValueKind::I128(number) => number.to_string(),
        ValueKind::U64(number) => number.to_string(),
        ValueKind::U128(number) => number.to_string(),
        // Debug keeps the `.0` of `10.0`: "batch_size = 10.0: must be an integer".
        ValueKind::Float(number) => format!("{number:?}"),
        ValueKind::String(text) => format!("{text:?}"),
        ValueKind::Array(items) => {
            let items: Vec<String> = items.iter().map(show).collect();
            format!("[{}]", items.join(", "))
        }
        ValueKind::Table(_) => "a table".to_owned(),
    }
}

/// Sorted key names of a schema table: `a, b, c`.
fn names(table: &toml::Table) -> String {
    let mut names: Vec<&str> = table.keys().map(String::as_str).collect();
    names.sort_unstable();
    names.join(", ")
}

/// Edit distance, for "did you mean" hints.
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// The schema key closest to a misspelled `name`, if any is close.
fn closest<'a>(name: &str, table: &'a toml::Table) -> Option<&'a str> {
    table
        .keys()
        .map(|candidate| (levenshtein(name, candidate), candidate.as_str()))
        .filter(|&(distance, _)| distance <= 2 && distance < name.len())
        .min()
        .map(|(_, candidate)| candidate)
}

/// Walks the merged tree beside the schema.
struct SchemaCheck<'a> {
    /// Environment values as written, by lowercased variable name.
    env_text: BTreeMap<String, &'a str>,
    problems: Vec<String>,
    origins: BTreeMap<String, String>,
}

impl<'a> SchemaCheck<'a> {
    fn new(env: &'a BTreeMap<String, String>) -> Self {
        Self {
            env_text: env
                .iter()
                .map(|(name, value)| (name.to_lowercase(), value.as_str()))
                .collect(),
            problems: Vec::new(),
            origins: BTreeMap::new(),
        }
    }

    /// Where `value` (of `key`) was set, for messages.
    fn describe(value: &Value, key: &str) -> String {
        match value.origin() {
            Some(ENV_ORIGIN) => format!("environment variable {}", env_var_name(key)),
            Some(origin) => origin.to_owned(),
            None => "an unknown layer".to_owned(),
        }
    }

    fn wrong(&mut self, key: &str, value: &Value, reason: &str, origin_key: &str) {
        let origin = Self::describe(value, origin_key);
        let shown = show(value);
        self.problems
            .push(format!("{key} = {shown}: {reason} (set by {origin})"));
    }

    fn table(
        &mut self,
        schema: &toml::Table,
        merged: &Map<String, Value>,
        prefix: &str,
    ) -> toml::Table {
        let mut out = toml::Table::new();
        let mut present: Vec<&String> = merged.keys().collect();
        present.sort_unstable();
        for name in present {
            let value = &merged[name];
            let key = dotted(prefix, name);
            match schema.get(name) {
                Some(expected) => {
                    let checked = self.value(&key, expected, value);
                    out.insert(name.clone(), checked);
                }
                None => self.unknown(schema, prefix, name, value),
            }
        }
        // The defaults layer sets every key; this only keeps deserialization total.
        for (name, default) in schema {
            if !out.contains_key(name) {
                out.insert(name.clone(), default.clone());
            }
        }
        out
    }

    /// The checked value of `key`, or its default after recording a problem.
    fn value(&mut self, key: &str, expected: &toml::Value, value: &Value) -> toml::Value {
        if let toml::Value::Table(schema) = expected {
            if let ValueKind::Table(inner) = &value.kind {
                return toml::Value::Table(self.table(schema, inner, key));
            }
            let reason = format!("must be a table with the keys {}", names(schema));
            self.wrong(key, value, &reason, key);
            return expected.clone();
        }
        if let Some(origin) = value.origin()
            && origin != DEFAULTS_ORIGIN
        {
            self.origins
                .insert(key.to_owned(), Self::describe(value, key));
        }
        let checked = match expected {
            toml::Value::Integer(_) => integer(&value.kind).ok_or("must be an integer"),
            toml::Value::Float(_) => number(&value.kind).ok_or("must be a number"),
            toml::Value::Boolean(_) => match value.kind {
                ValueKind::Boolean(flag) => Ok(toml::Value::Boolean(flag)),
                _ => Err("must be true or false"),
            },
            toml::Value::String(_) => self.string(key, value).ok_or("must be a string"),
            toml::Value::Array(_) => match self.list(key, value) {
                Ok(list) => Ok(list),
                Err(ListError::Reported) => return expected.clone(),
                Err(ListError::NotAList(reason)) => Err(reason),
            },
            toml::Value::Datetime(_) | toml::Value::Table(_) => Err("has an unexpected type"),
        };
        checked.unwrap_or_else(|reason| {
            self.wrong(key, value, reason, key);
            expected.clone()
        })
    }

    /// A string; numbers and booleans from the environment are taken as written
    /// (the config crate has already parsed `2024.10` into a float).
    fn string(&self, key: &str, value: &Value) -> Option<toml::Value> {
        match &value.kind {
            ValueKind::String(text) => Some(toml::Value::String(text.clone())),
            ValueKind::Table(_) | ValueKind::Array(_) | ValueKind::Nil => None,
            _ if value.origin() == Some(ENV_ORIGIN) => {
                let name = env_var_name(key).to_lowercase();
                let text = self
                    .env_text
                    .get(&name)
                    .map_or_else(|| show(value), |text| (*text).to_owned());
                Some(toml::Value::String(text))
            }
            _ => None,
        }
    }

    /// A list key. The environment gives `256,128` as strings, a single `256` as a
    /// number and an empty value as `[""]`.
    fn list(&mut self, key: &str, value: &Value) -> Result<toml::Value, ListError> {
        let element = LIST_KEYS
            .iter()
            .find(|(list_key, _)| *list_key == key)
            .map_or(Element::Float, |&(_, element)| element);
        let reason = match element {
            Element::Integer => "must be a list of integers, e.g. [256, 128]",
            Element::Float => "must be a list of numbers, e.g. [0.9, 0.999]",
        };
        let is_blank =
            |item: &Value| matches!(&item.kind, ValueKind::String(text) if text.trim().is_empty());
        let items: Vec<&Value> = match &value.kind {
            ValueKind::Array(items) if items.len() == 1 && is_blank(&items[0]) => Vec::new(),
            ValueKind::Array(items) => items.iter().collect(),
            ValueKind::String(_) if is_blank(value) => Vec::new(),
            ValueKind::I64(_) | ValueKind::U64(_) | ValueKind::Float(_) => vec![value],
            _ => return Err(ListError::NotAList(reason)),
        };
        let mut out = Vec::with_capacity(items.len());
        let mut reported = false;
        for (index, item) in items.into_iter().enumerate() {
            let checked = match (&item.kind, element) {
                (ValueKind::String(text), _) if item.origin() == Some(ENV_ORIGIN) => {
                    element_from_text(element, text)
                }
                (kind, Element::Integer) => integer(kind),
                (kind, Element::Float) => number(kind),
            };
            match checked {
                Some(checked) => out.push(checked),
                None => {
                    let element_reason = match element {
                        Element::Integer => "must be an integer",
                        Element::Float => "must be a number",
                    };
                    self.wrong(&format!("{key}[{index}]"), item, element_reason, key);
                    reported = true;
                }
            }
        }
        if reported {
            return Err(ListError::Reported);
        }
        Ok(toml::Value::Array(out))
    }

    fn unknown(&mut self, schema: &toml::Table, prefix: &str, name: &str, value: &Value) {
        let key = dotted(prefix, name);
        let suggestion = closest(name, schema).map(|close| dotted(prefix, close));
        let mut leaves = Vec::new();
        collect_leaves(&key, value, &mut leaves);
        for (leaf, leaf_value) in leaves {
            let origin = Self::describe(leaf_value, &leaf);
            let hint = match (&suggestion, prefix) {
                (Some(close), _) => format!("did you mean {close}{}?", &leaf[key.len()..]),
                (None, "") => format!("the top-level sections are {}", names(schema)),
                (None, _) => format!("the keys of {prefix} are {}", names(schema)),
            };
            self.problems
                .push(format!("{leaf}: unknown key (set by {origin}); {hint}"));
        }
    }
}

/// Why a list value was not accepted.
enum ListError {
    /// The value is not list-like at all.
    NotAList(&'static str),
    /// Some elements were wrong; each has been reported.
    Reported,
}

/// Every leaf under `value` (itself when it is not a non-empty table), sorted.
fn collect_leaves<'v>(key: &str, value: &'v Value, out: &mut Vec<(String, &'v Value)>) {
    match &value.kind {
        ValueKind::Table(table) if !table.is_empty() => {
            let mut names: Vec<&String> = table.keys().collect();
            names.sort_unstable();
            for name in names {
                collect_leaves(&dotted(key, name), &table[name], out);
            }
        }
        _ => out.push((key.to_owned(), value)),
    }
}

/// An integer value.
fn integer(kind: &ValueKind) -> Option<toml::Value> {
    let number = match kind {
        ValueKind::I64(number) => *number,
        ValueKind::I128(number) => i64::try_from(*number).ok()?,
        ValueKind::U64(number) => i64::try_from(*number).ok()?,
        ValueKind::U128(number) => i64::try_from(*number).ok()?,
        _ => return None,
    };
    Some(toml::Value::Integer(number))
}

/// A number; integers stay integers (a float key accepts them, and
/// `num_warmup_steps` reads meaning into the difference).
fn number(kind: &ValueKind) -> Option<toml::Value> {
    match kind {
        ValueKind::Float(number) => Some(toml::Value::Float(*number)),
        _ => integer(kind),
    }
}

/// A list element given as text in an environment variable (`256,128`).
fn element_from_text(element: Element, text: &str) -> Option<toml::Value> {
    let text = text.trim();
    let as_integer = text.parse().ok().map(toml::Value::Integer);
    match element {
        Element::Integer => as_integer,
        Element::Float => as_integer.or_else(|| text.parse().ok().map(toml::Value::Float)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_var_names_use_double_underscores() {
        assert_eq!(
            env_var_name("training.attack.loss_type"),
            "HSAT__TRAINING__ATTACK__LOSS_TYPE"
        );
    }

    #[test]
    fn override_values_parse_as_toml_or_bare_text() {
        let schema = schema().unwrap();
        let value = |arg: &str| parse_override(arg, &schema).unwrap().1;
        assert_eq!(value("training.batch_size=4"), toml::Value::Integer(4));
        assert_eq!(value("training.learn_rate=1e-4"), toml::Value::Float(1e-4));
        assert_eq!(value("training.attack.eps = 4.5"), toml::Value::Float(4.5));
        assert_eq!(value("training.only_adv=true"), toml::Value::Boolean(true));
        assert_eq!(
            value("model.mlp_hidden=[256, 128]"),
            toml::Value::Array(vec![toml::Value::Integer(256), toml::Value::Integer(128)])
        );
        assert_eq!(
            value("training.attack.loss_type=\"pt\""),
            toml::Value::String("pt".into())
        );
        assert_eq!(
            value("training.attack.loss_type=pt"),
            toml::Value::String("pt".into())
        );
        // String keys keep the text: not the float 2024.1.
        assert_eq!(
            value("infra.out_dir=2024.10"),
            toml::Value::String("2024.10".into())
        );
        assert_eq!(
            value("model.init_checkpoint="),
            toml::Value::String(String::new())
        );
        // Two assignments are not one value.
        assert_eq!(
            value("training.attack.name=1\nx = 2"),
            toml::Value::String("1\nx = 2".into())
        );
        let (path, _) = parse_override("data.hidisc.num_transforms=3", &schema).unwrap();
        assert_eq!(path, ["data", "hidisc", "num_transforms"]);
    }

    #[test]
    fn malformed_overrides_are_rejected() {
        let schema = schema().unwrap();
        for arg in [
            "training.batch_size",
            "=4",
            "training..eps=1",
            "a[0]=1",
            " =1",
        ] {
            match parse_override(arg, &schema) {
                Err(ConfigError::BadOverride { arg: reported, .. }) => assert_eq!(reported, arg),
                other => panic!("{arg:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn suggestions_need_a_close_name() {
        let schema = schema().unwrap();
        let training = schema["training"].as_table().unwrap();
        assert_eq!(closest("attak", training), Some("attack"));
        assert_eq!(closest("batchsize", training), Some("batch_size"));
        assert_eq!(closest("lr", training), None);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
    }
}

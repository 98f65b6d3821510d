//! Configuration: layered sources, raw structs, validated typed config.
//!
//! Sources, lowest precedence first:
//!
//! 1. built-in defaults: the paper's settings ([`Config::default`]);
//! 2. a TOML file ([`ConfigSources::file`]);
//! 3. environment variables `HSAT__SECTION__KEY`, the key's parts joined by double
//!    underscores (`HSAT__TRAINING__ATTACK__EPS=4`); lists are comma separated
//!    (`HSAT__MODEL__MLP_HIDDEN=256,128`, empty for `[]`);
//! 4. command-line overrides `--set section.key=value`, applied in order; the value is
//!    read as a TOML value when it is one (`4`, `0.5`, `true`, `[256]`, `"text"`), else
//!    as bare text.
//!
//! The TOML layout and key names are those of the reference implementation's hydra
//! YAML (so `training.dynamic_weights_lamda`, attack `eps`/`alpha` in units of 1/255,
//! `num_warmup_steps` a float fraction or an integer count). `docs/config.md` lists
//! every key.
//!
//! Loading is two steps. The merged layers are checked key by key against the
//! defaults (unknown keys, wrong TOML types) and deserialized into raw structs with
//! `deny_unknown_fields`; then `validate` checks ranges and cross-field rules and
//! builds the typed [`Config`]. Every problem of both steps is collected, each naming
//! its full dotted key, the bad value, what is allowed, and the layer that set it,
//! so one run shows everything to fix.
//!
//! Layout: `types` (the typed config, public), `raw` (the TOML layout), `layers`
//! (merging and key/type checks), `validate` (ranges and cross-field rules),
//! `cluster` (the `[cluster]` section: raw, typed and its checks), `metrics` (the
//! `[metrics]` section), `compare`
//! `cluster` (the `[cluster]` section: raw, typed and its checks), `security`
//! (the `[security]` section: token file, limits), `compare`
//! (differences and fingerprints of two configs).

mod cluster;
mod compare;
mod layers;
mod metrics;
mod raw;
mod security;
mod types;
mod validate;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use cluster::{ClusterConfig, SILENT_HEARTBEATS};
pub(crate) use compare::compare_hex;
pub use compare::{Difference, WORKER_LOCAL_KEYS, config_differences, config_fingerprint};
pub use metrics::MetricsConfig;
pub use security::SecurityConfig;
pub use types::{
    AttackConfig, AttackKind, Backbone, Config, DataConfig, DataSource, EvalAttack, EvalConfig,
    EvalTarget, HidiscSampling, InfraConfig, KnnDevice, LoaderConfig, LossScope, LossType,
    ModelConfig, ObjectiveConfig, OptimizerConfig, ParseNameError, ScheduleKind, SchedulerConfig,
    SyntheticConfig, TrainingConfig, WarmupSteps, available_cores,
};

use layers::TomlLayer;
use raw::RawConfig;
use validate::Problem;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {} (check the path and its permissions)", path.display())]
    Read {
        /// The file given.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// A document is not valid TOML (or JSON for [`Config::from_json_value`]), or the
    /// layers could not be merged.
    #[error("cannot parse {origin}: {message}")]
    Parse {
        /// Which document: `config file runs/a.toml`, `TOML text`, ...
        origin: String,
        /// The parser's explanation, with line and column when it has them.
        message: String,
    },
    /// Keys or values are wrong: unknown keys, values of the wrong type, values out of
    /// range, inconsistent settings. One message per problem, each starting with the
    /// full dotted key and saying what is allowed and where the value was set.
    #[error("invalid configuration:{}", problem_lines(.0))]
    Invalid(Vec<String>),
    /// A `--set` argument is not `section.key=value`.
    #[error("bad override `--set {arg}`: {reason}")]
    BadOverride {
        /// The argument as given (without `--set`).
        arg: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn problem_lines(problems: &[String]) -> String {
    problems
        .iter()
        .map(|problem| format!("\n  {problem}"))
        .collect()
}

/// Everything the configuration is read from, gathered by the caller (tests pass the
/// environment as a map instead of touching the process environment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSources {
    /// TOML file, if any.
    pub file: Option<PathBuf>,
    /// Environment variables; only the `HSAT__...` ones are used.
    pub env: BTreeMap<String, String>,
    /// `section.key=value` overrides, in command-line order (later ones win).
    pub overrides: Vec<String>,
}

impl ConfigSources {
    /// Sources with the `HSAT__...` variables of the process environment (names
    /// matched case-insensitively; variables whose name is not UTF-8 are skipped).
    pub fn from_process_env(file: Option<PathBuf>, overrides: Vec<String>) -> Self {
        let env = std::env::vars_os()
            .filter_map(|(name, value)| {
                let name = name.into_string().ok()?;
                name.to_ascii_uppercase()
                    .starts_with("HSAT__")
                    .then(|| (name, value.to_string_lossy().into_owned()))
            })
            .collect();
        Self {
            file,
            env,
            overrides,
        }
    }
}

/// Loads, merges and validates the configuration:
/// defaults < `sources.file` < `sources.env` < `sources.overrides`.
pub fn load(sources: &ConfigSources) -> Result<Config, ConfigError> {
    let file = match &sources.file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            Some(parse_toml(
                format!("config file {}", path.display()),
                &text,
            )?)
        }
        None => None,
    };
    build(file, &sources.env, &sources.overrides)
}

impl Config {
    /// Defaults < `text` (a TOML document); no environment, no overrides.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let layer = parse_toml("TOML text".to_owned(), text)?;
        build(Some(layer), &BTreeMap::new(), &[])
    }

    /// Defaults < `value`, the raw form produced by [`Config::to_json_value`] (e.g. read
    /// back from a checkpoint).
    pub fn from_json_value(value: &serde_json::Value) -> Result<Config, ConfigError> {
        let origin = "JSON config".to_owned();
        let table = match toml::Value::try_from(value) {
            Ok(toml::Value::Table(table)) => table,
            Ok(_) => {
                return Err(ConfigError::Parse {
                    origin,
                    message: "expected an object at the top level".to_owned(),
                });
            }
            Err(err) => {
                return Err(ConfigError::Parse {
                    origin,
                    message: err.to_string(),
                });
            }
        };
        build(Some(TomlLayer { origin, table }), &BTreeMap::new(), &[])
    }

    /// The effective configuration in raw form (key names and nesting as in TOML, eps
    /// and alpha in units of 1/255), for checkpoints and logs; loading it back gives an
    /// equal `Config`.
    pub fn to_json_value(&self) -> serde_json::Value {
        serde_json::to_value(RawConfig::from(self)).expect(
            "the raw config is plain structs with string keys, always representable in JSON",
        )
    }

    /// The effective configuration as a TOML document in the raw layout.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(&RawConfig::from(self))
            .expect("the raw config is plain structs, values before sub-tables: valid TOML")
    }
}

fn parse_toml(origin: String, text: &str) -> Result<TomlLayer, ConfigError> {
    match toml::from_str::<toml::Table>(text) {
        Ok(table) => Ok(TomlLayer { origin, table }),
        Err(err) => Err(ConfigError::Parse {
            origin,
            message: err.to_string().trim_end().to_owned(),
        }),
    }
}

fn build(
    file: Option<TomlLayer>,
    env: &BTreeMap<String, String>,
    overrides: &[String],
) -> Result<Config, ConfigError> {
    let merged = layers::merge(file, env, overrides)?;
    let mut problems = merged.problems;
    match validate::validate(&merged.raw) {
        Ok(config) if problems.is_empty() => return Ok(config),
        Ok(_) => {}
        Err(found) => problems.extend(
            found
                .into_iter()
                .map(|problem| with_origin(problem, &merged.origins)),
        ),
    }
    Err(ConfigError::Invalid(problems))
}

/// Appends where the value was set, when it was not a default.
fn with_origin(problem: Problem, origins: &BTreeMap<String, String>) -> String {
    let key = problem.key.split('[').next().unwrap_or(&problem.key);
    match origins.get(key) {
        Some(origin) => format!("{} (set by {origin})", problem.message),
        None => problem.message,
    }
}

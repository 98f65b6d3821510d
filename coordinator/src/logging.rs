//! Log setup shared by both binaries (`hsat`, `hsat-coordinator`) and handed on to
//! the worker processes of `hsat run --workers`.
//!
//! - Format: `--log-format text|json` (a global flag) or `HSAT_LOG_FORMAT`; the
//!   flag wins. `text` is for people: colours only when stderr is a terminal, so
//!   files and pipes get plain lines. `json` is one object per line for log
//!   collectors (`{"timestamp":..,"level":"INFO","message":..,"target":..,<fields>}`).
//! - Level: `HSAT_LOG`, else `RUST_LOG`, else `info`; both take
//!   `tracing_subscriber::EnvFilter` directives (`debug`,
//!   `hsat_coordinator=debug,info`). `HSAT_LOG` exists so hsat's level can be set
//!   without changing that of other Rust programs in the same environment.
//!
//! Logs go to stderr; stdout keeps the commands' own output (tables, JSON status).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

/// Environment variable choosing the log format (`text` or `json`).
pub const LOG_FORMAT_ENV: &str = "HSAT_LOG_FORMAT";
/// Environment variable with the log level or filter directives (checked first).
pub const LOG_LEVEL_ENV: &str = "HSAT_LOG";
/// The conventional variable, used when [`LOG_LEVEL_ENV`] is unset or empty.
pub const RUST_LOG_ENV: &str = "RUST_LOG";
/// The level when neither variable is set.
const DEFAULT_FILTER: &str = "info";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The name used by the flag and [`LOG_FORMAT_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// The `--log-format` flag (global: accepted before or after the subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log lines as `text` (colours only on a terminal) or `json` (one object per
    /// line). The level comes from HSAT_LOG, else RUST_LOG (e.g. HSAT_LOG=debug or
    /// HSAT_LOG=hsat_coordinator=debug,info); default info.
    #[arg(
        long,
        global = true,
        value_enum,
        env = LOG_FORMAT_ENV,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The level variable holds something `EnvFilter` cannot parse.
    #[error(
        "{variable}={value:?} is not a log filter ({source}): give a level (error, warn, info, debug, trace) \
         or directives such as hsat_coordinator=debug,info"
    )]
    BadFilter {
        /// `HSAT_LOG` or `RUST_LOG`.
        variable: &'static str,
        /// What it holds.
        value: String,
        /// The parser's explanation.
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was installed before (a bug of the caller).
    #[error("logging was already set up in this process: {0}")]
    AlreadySet(String),
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Installs the process's log subscriber on stderr, with the level from the
/// environment (see the module docs).
pub fn init(format: LogFormat) -> Result<(), LoggingError> {
    let filter = filter_from(|name| std::env::var(name).ok())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        // Colour codes in a file or a pipe are noise for whoever reads it later.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_ansi(false)
            .try_init(),
    };
    installed.map_err(|err| LoggingError::AlreadySet(err.to_string()))?;
    let _ = FORMAT.set(format);
    Ok(())
}

/// The format [`init`] installed ([`LogFormat::Text`] before that); child processes
/// get it through [`LOG_FORMAT_ENV`] so a job's logs are all in one format.
pub fn current_format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// The filter from `HSAT_LOG`, else `RUST_LOG`, else `info`; `env` reads a variable
/// (tests pass a map). An empty variable counts as unset.
fn filter_from(env: impl Fn(&str) -> Option<String>) -> Result<EnvFilter, LoggingError> {
    for variable in [LOG_LEVEL_ENV, RUST_LOG_ENV] {
        if let Some(value) = env(variable).filter(|value| !value.trim().is_empty()) {
            return EnvFilter::try_new(&value).map_err(|source| LoggingError::BadFilter {
                variable,
                value,
                source,
            });
        }
    }
    Ok(EnvFilter::new(DEFAULT_FILTER))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn filter(pairs: &[(&str, &str)]) -> Result<String, LoggingError> {
        let env: BTreeMap<&str, &str> = pairs.iter().copied().collect();
        filter_from(|name| env.get(name).map(|value| (*value).to_owned())).map(|f| f.to_string())
    }

    #[test]
    fn hsat_log_wins_over_rust_log_and_info_is_the_default() {
        assert_eq!(filter(&[]).unwrap(), "info");
        assert_eq!(filter(&[("RUST_LOG", "warn")]).unwrap(), "warn");
        assert_eq!(
            filter(&[("RUST_LOG", "warn"), ("HSAT_LOG", "debug")]).unwrap(),
            "debug"
        );
        assert_eq!(
            filter(&[("RUST_LOG", "warn"), ("HSAT_LOG", " ")]).unwrap(),
            "warn"
        );
    }

    #[test]
    fn a_bad_filter_names_its_variable() {
        let err = filter(&[("HSAT_LOG", "hsat=loud")]).unwrap_err();
        assert!(
            matches!(&err, LoggingError::BadFilter { variable: "HSAT_LOG", value, .. } if value == "hsat=loud"),
            "{err}"
        );
        assert!(err.to_string().contains("give a level"), "{err}");
    }
}

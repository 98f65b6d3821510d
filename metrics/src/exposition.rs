//! Expositions: a registry in the OpenMetrics text format (what `prometheus-client`
//! writes and Prometheus prefers), the same in the classic text format 0.0.4 (what
//! `promtool check metrics`, older scrapers and `curl` users get), and a parser of
//! either for tests and tools.
//!
//! The two formats differ, for what hsat exposes, only in counters' family names
//! (`# TYPE x counter` with samples `x_total` in OpenMetrics, `# TYPE x_total
//! counter` in the classic format), `# UNIT` lines and the final `# EOF`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use prometheus_client::registry::Registry;

/// `Content-Type` of an OpenMetrics exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the classic text exposition.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a metrics endpoint serves: an OpenMetrics exposition made at scrape time
/// (so values that depend on the time, such as a checkpoint's age, are current).
pub trait Exposition: Send + Sync + 'static {
    /// The exposition in the OpenMetrics text format, `# EOF` included.
    fn render(&self) -> String;
}

impl Exposition for Registry {
    fn render(&self) -> String {
        encode_openmetrics(self)
    }
}

/// `registry` in the OpenMetrics text format.
pub fn encode_openmetrics(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String does not fail; a metric's own encoder could, and then
    // the scrape gets what was encoded so far (and Prometheus reports it invalid).
    if let Err(err) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %err, "cannot encode the metrics");
    }
    out
}

/// An OpenMetrics exposition in the classic text format 0.0.4.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let family = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            let kind = match kind {
                "counter" | "gauge" | "histogram" | "summary" => kind,
                _ => "untyped",
            };
            if let Some((help_name, text)) = help.take()
                && help_name == name
            {
                let _ = writeln!(out, "# HELP {family} {text}");
            }
            let _ = writeln!(out, "# TYPE {family} {kind}");
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// One sample of an exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Sample name (`hsat_rpc_requests_total`, `hsat_step_duration_seconds_count`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed exposition (either format).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    /// Family name -> type, from the `# TYPE` lines.
    pub families: BTreeMap<String, String>,
    /// Every sample, in order.
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses an exposition; `Err` names the first line that is not a comment or a
    /// sample.
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let mut scrape = Scrape::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .ok_or_else(|| format!("line {}: a TYPE without a type: {line}", number + 1))?;
                scrape.families.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let sample = parse_sample(line)
                .ok_or_else(|| format!("line {}: not a sample: {line}", number + 1))?;
            scrape.samples.push(sample);
        }
        Ok(scrape)
    }

    /// The value of the sample `name` whose labels include `labels`, if exactly one
    /// matches.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut matching = self.samples.iter().filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        });
        let first = matching.next()?;
        matching.next().is_none().then_some(first.value)
    }
}

/// `name{k="v",...} value [timestamp]`.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let consumed = loop {
            // Skip separators.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || *c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            let (start, c) = chars.next()?;
            if c == '}' {
                break start + 1;
            }
            let mut end = start;
            let mut key_end = None;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    key_end = Some(i);
                    break;
                }
                end = i;
            }
            let key = inner[start..key_end.unwrap_or(end + 1)].to_owned();
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.insert(key, value);
        };
        rest = &inner[consumed..];
    }
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        text => text.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Runs `promtool check metrics` on `text`; returns what it printed when it found
/// problems (empty when it accepted the exposition), or `Err` when promtool cannot
/// run (it comes with Debian's `prometheus` package; `scripts/setup.sh` installs it).
pub fn promtool_check(text: &str) -> Result<String, String> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| {
            format!(
                "cannot run promtool ({err}): install Debian's `prometheus` package \
                 (scripts/setup.sh does) so that `promtool` is on PATH"
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|err| format!("cannot feed promtool: {err}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|err| format!("promtool did not finish: {err}"))?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(String::new())
    } else {
        Ok(format!("exit {}: {printed}", output.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        method: String,
        code: String,
    }

    fn registry() -> Registry {
        let mut registry = Registry::default();
        let calls = Family::<Labels, Counter>::default();
        calls
            .get_or_create(&Labels {
                method: "Register".into(),
                code: "OK".into(),
            })
            .inc_by(3);
        registry.register("hsat_test_calls", "Calls by method and code", calls);
        let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        gauge.set(1.5);
        registry.register("hsat_test_level", "A level", gauge);
        let histogram = Histogram::new([0.1, 1.0]);
        histogram.observe(0.5);
        registry.register("hsat_test_duration_seconds", "Durations", histogram);
        registry
    }

    #[test]
    fn counters_get_their_total_name_in_the_classic_format() {
        let open = encode_openmetrics(&registry());
        assert!(open.contains("# TYPE hsat_test_calls counter"), "{open}");
        assert!(open.ends_with("# EOF\n"), "{open}");
        let text = openmetrics_to_text(&open);
        assert!(
            text.contains("# TYPE hsat_test_calls_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# HELP hsat_test_calls_total Calls by method and code"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(text.contains("# TYPE hsat_test_level gauge"), "{text}");
        assert!(
            text.contains("# TYPE hsat_test_duration_seconds histogram"),
            "{text}"
        );
    }

    #[test]
    fn both_formats_parse_to_the_same_samples() {
        let open = encode_openmetrics(&registry());
        let from_open = Scrape::parse(&open).unwrap();
        let from_text = Scrape::parse(&openmetrics_to_text(&open)).unwrap();
        assert_eq!(from_open.samples, from_text.samples);
        assert_eq!(
            from_text.value(
                "hsat_test_calls_total",
                &[("method", "Register"), ("code", "OK")]
            ),
            Some(3.0)
        );
        assert_eq!(from_text.value("hsat_test_level", &[]), Some(1.5));
        assert_eq!(
            from_text.value("hsat_test_duration_seconds_bucket", &[("le", "1.0")]),
            Some(1.0)
        );
        assert_eq!(
            from_text
                .families
                .get("hsat_test_calls_total")
                .map(String::as_str),
            Some("counter")
        );
    }

    #[test]
    fn label_values_with_escapes_and_separators_parse() {
        let sample = parse_sample(r#"x{a="1,2",b="say \"hi\"\n",c="}"} 4 1700000000"#).unwrap();
        assert_eq!(sample.labels["a"], "1,2");
        assert_eq!(sample.labels["b"], "say \"hi\"\n");
        assert_eq!(sample.labels["c"], "}");
        assert_eq!(sample.value, 4.0);
        assert!(Scrape::parse("x{a=1} 2").is_err());
    }

    /// `promtool check metrics` (Debian's `prometheus` package; `scripts/setup.sh`
    /// installs it) accepts the classic exposition of counters, gauges and
    /// histograms with labels. A missing promtool fails the test: it must not pass
    /// by skipping.
    #[test]
    fn promtool_accepts_the_classic_exposition() {
        let text = openmetrics_to_text(&encode_openmetrics(&registry()));
        let problems = crate::exposition::promtool_check(&text).unwrap();
        assert_eq!(problems, "", "promtool found problems:\n{problems}\n{text}");
    }
}

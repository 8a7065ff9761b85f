//! What the service says about itself: structured logs (`tracing`, human-readable or JSON
//! lines), health endpoints and Prometheus metrics.

pub mod health;
pub mod metrics;

use std::sync::Arc;

use tracing_subscriber::field::MakeExt as _;
use tracing_subscriber::fmt::format::debug_fn;
use tracing_subscriber::EnvFilter;

/// What the service reports about itself: readiness and metrics.
#[derive(Clone)]
pub struct Telemetry {
    pub health: Arc<health::Health>,
    pub metrics: Arc<metrics::Metrics>,
}

impl Telemetry {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            health: health::Health::new(),
            metrics: metrics::Metrics::new()?,
        })
    }
}

/// Installs the global subscriber, writing to stderr. `RUST_LOG` overrides `default_filter`.
pub fn init_tracing(default_filter: &str, json: bool) {
    // Colour only on a terminal: a file or pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    init_tracing_to(default_filter, json, ansi, std::io::stderr);
}

/// [`init_tracing`] with another writer: the benchmark formats every line the service would
/// log and throws it away, so logging costs what it costs in production.
pub fn init_tracing_to<W>(default_filter: &str, json: bool, ansi: bool, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    // A second init (tests) is harmless: the first subscriber stays. JSON records put the event's
    // fields at the top level and list the enclosing spans (job: job_id, tenant, pipeline;
    // step: step) under `spans`.
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init()
    } else {
        // Field values can carry text from a job (ids, idempotency keys, errors quoting them):
        // control characters are escaped so none can forge a log line.
        let fields = debug_fn(|writer, field, value| {
            if field.name() != "message" {
                write!(writer, "{field}=")?;
            }
            std::fmt::Write::write_fmt(&mut Escaping(writer), format_args!("{value:?}"))
        })
        .delimited(" ");
        builder.fmt_fields(fields).try_init()
    };
}

/// `text` with every control character (CR, LF, ESC, ...) written as its Rust escape.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    // Writing to a String cannot fail.
    let _ = std::fmt::Write::write_str(&mut Escaping(&mut out), text);
    std::borrow::Cow::Owned(out)
}

/// Writes through to the inner writer with every control character as its Rust escape, so a
/// log field is escaped as it is formatted, without a copy of its text.
struct Escaping<'a, W: ?Sized>(&'a mut W);

impl<W: std::fmt::Write + ?Sized> std::fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let mut rest = text;
        while let Some((at, c)) = rest.char_indices().find(|(_, c)| c.is_control()) {
            self.0.write_str(&rest[..at])?;
            for escaped in c.escape_default() {
                self.0.write_char(escaped)?;
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newline_in_a_field_cannot_start_a_forged_log_line() {
        let forged = "t-1\n2026-11-30T00:00:00Z  INFO job finished job_id=admin\u{1b}[2J";
        let escaped = escape_controls(forged);
        assert!(!escaped.contains('\n') && !escaped.contains('\u{1b}'));
        assert!(escaped.contains("t-1\\n2026"));
        assert_eq!(escape_controls("plain"), "plain");
    }
}

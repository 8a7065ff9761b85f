//! The provider error taxonomy (`docs/architecture.md`, section 5) and the one place that maps an error to an
//! action. Every caller decides retries and fallbacks through [`ProviderError::action`].

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    #[error("rate limited (429){}: {message}", retry_after.map(|d| format!(", retry after {}s", d.as_secs_f64())).unwrap_or_default())]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    #[error("server error {status}: {message}")]
    Server {
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    #[error("no response within {}ms", .0.as_millis())]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    /// The request went out but the exchange broke off (reset, truncated body).
    #[error("connection broke off after the request was sent: {0}")]
    Interrupted(String),
    #[error("prompt exceeds the model's context window: {0}")]
    ContextLength(String),
    #[error("blocked by the provider's content filter: {0}")]
    ContentFilter(String),
    #[error("not authorized ({status}): {message}; check the provider's api_key_env")]
    Auth { status: u16, message: String },
    #[error("request rejected ({status}): {message}")]
    BadRequest { status: u16, message: String },
    #[error("response could not be read: {0}")]
    InvalidResponse(String),
    #[error("circuit open after repeated failures; skipped")]
    CircuitOpen,
}

/// What to do after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Try the same target again after a delay (the provider's `Retry-After` when it sent one,
    /// else backoff with jitter), while attempts remain.
    RetrySameTarget { after: Option<Duration> },
    /// This target cannot serve the request: go to the next fallback without retrying.
    NextTarget,
}

impl ProviderError {
    pub fn action(&self) -> ErrorAction {
        match self {
            ProviderError::RateLimited { retry_after, .. }
            | ProviderError::Server { retry_after, .. } => ErrorAction::RetrySameTarget {
                after: *retry_after,
            },
            ProviderError::Timeout(_)
            | ProviderError::Connect(_)
            | ProviderError::Interrupted(_)
            | ProviderError::InvalidResponse(_) => ErrorAction::RetrySameTarget { after: None },
            ProviderError::ContextLength(_)
            | ProviderError::ContentFilter(_)
            | ProviderError::Auth { .. }
            | ProviderError::BadRequest { .. }
            | ProviderError::CircuitOpen => ErrorAction::NextTarget,
        }
    }

    /// Whether the provider may have billed the attempt although it failed: the request was
    /// sent and then timed out or broke off, or was answered with a body that could not be
    /// read. Such an attempt is charged at its reservation; a refused connection or an error
    /// status is not.
    pub fn may_have_been_billed(&self) -> bool {
        matches!(
            self,
            ProviderError::Timeout(_)
                | ProviderError::Interrupted(_)
                | ProviderError::InvalidResponse(_)
        )
    }

    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Server { .. } => "server_error",
            ProviderError::Timeout(_) => "timeout",
            ProviderError::Connect(_) => "connect",
            ProviderError::Interrupted(_) => "interrupted",
            ProviderError::ContextLength(_) => "context_length",
            ProviderError::ContentFilter(_) => "content_filter",
            ProviderError::Auth { .. } => "auth",
            ProviderError::BadRequest { .. } => "bad_request",
            ProviderError::InvalidResponse(_) => "invalid_response",
            ProviderError::CircuitOpen => "circuit_open",
        }
    }
}

/// Parses a `Retry-After` header: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        // Absurd values (1e20) saturate instead of panicking; the caller caps the wait.
        return (secs >= 0.0).then(|| Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = "2026-11-22T05:00:00Z".parse().unwrap();
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("0.5", now),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_retry_after("Sun, 22 Nov 2026 05:00:07 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("1e30", now), Some(Duration::MAX));
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn permanent_errors_are_not_retried_on_the_same_target() {
        let auth = ProviderError::Auth {
            status: 401,
            message: "bad key".into(),
        };
        assert_eq!(auth.action(), ErrorAction::NextTarget);
        let filter = ProviderError::ContentFilter("flagged".into());
        assert_eq!(filter.action(), ErrorAction::NextTarget);
        let limited = ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(3)),
            message: String::new(),
        };
        assert_eq!(
            limited.action(),
            ErrorAction::RetrySameTarget {
                after: Some(Duration::from_secs(3))
            }
        );
    }

    #[test]
    fn only_attempts_that_reached_the_provider_may_be_billed() {
        for sent in [
            ProviderError::Timeout(Duration::from_secs(30)),
            ProviderError::Interrupted("reset".into()),
            ProviderError::InvalidResponse("truncated".into()),
        ] {
            assert!(sent.may_have_been_billed(), "{sent}");
            assert_eq!(sent.action(), ErrorAction::RetrySameTarget { after: None });
        }
        for not_sent in [
            ProviderError::Connect("refused".into()),
            ProviderError::CircuitOpen,
            ProviderError::Server {
                status: 503,
                retry_after: None,
                message: String::new(),
            },
        ] {
            assert!(!not_sent.may_have_been_billed(), "{not_sent}");
        }
    }
}

//! Reaching the backends people run: Kafka with TLS and SASL, NATS with credentials and TLS,
//! shared by the source, the sink and the operator tools. Secrets are read from the environment or files named in the
//! config when connecting, never from the config itself, and never printed (URLs are redacted in
//! every error).

use std::path::PathBuf;

use anyhow::Context as _;

use crate::config::{redact_in, redact_url, secret_from_env, NatsAccess, NatsAuth, Secret};

/// Connects to NATS at `url` as `name` with `access`'s credentials and TLS; `field` names the
/// config section in errors. The service keeps retrying a first connection that fails
/// (`Retry::InBackground`: it reports not-ready meanwhile); a command fails at once.
pub async fn nats(
    url: &str,
    access: &NatsAccess,
    name: &str,
    field: &str,
    retry: Retry,
) -> anyhow::Result<async_nats::Client> {
    let mut options = nats_options(access, field).await?.name(name);
    if retry == Retry::InBackground {
        options = options.retry_on_initial_connect();
    }
    let client = options.connect(url).await.map_err(|e| {
        anyhow::anyhow!(
            "{field}.url: cannot connect to NATS at {}: {}",
            redact_url(url),
            redact_in(&e.to_string(), url)
        )
    })?;
    remember_counters(&client);
    Ok(client)
}

/// The NATS connections one service opens. Its source, sink and review-decisions source share
/// one when they name the same server (the same `url` string) with the same credentials and
/// TLS: acks, pulls and publishes then leave in the same writes and the broker's answers arrive
/// on one socket (two connections cost a busy replica a tenth of its CPU per job in system
/// calls and wake-ups). The shared connection is named `switchyard`; one of a sink with its own
/// server or credentials keeps the name the sink asks for.
pub struct NatsConnections {
    /// The job source's server and access, when it reads from NATS.
    source: Option<(String, NatsAccess)>,
    open: Vec<(String, NatsAccess, async_nats::Client)>,
}

impl NatsConnections {
    /// `source`: the job source's NATS server and access, if any.
    pub fn new(source: Option<(&str, &NatsAccess)>) -> Self {
        Self {
            source: source.map(|(url, access)| (url.to_owned(), access.clone())),
            open: Vec::new(),
        }
    }

    /// The open connection to `url` with `access`, or a new one named `name` (`switchyard`
    /// when it is the job source's), retried in the background when the server is not up
    /// yet; `field` names the config section in errors.
    pub async fn get(
        &mut self,
        url: &str,
        access: &NatsAccess,
        name: &str,
        field: &str,
    ) -> anyhow::Result<async_nats::Client> {
        let same = |(u, a): (&str, &NatsAccess)| u == url && a == access;
        if let Some((_, _, client)) = self.open.iter().find(|(u, a, _)| same((u, a))) {
            return Ok(client.clone());
        }
        let name = match &self.source {
            Some((u, a)) if same((u, a)) => "switchyard",
            _ => name,
        };
        let client = nats(url, access, name, field, Retry::InBackground).await?;
        self.open
            .push((url.to_owned(), access.clone(), client.clone()));
        Ok(client)
    }
}

/// The message counters of the NATS clients this process opened that are still alive, so the
/// benchmark can report broker messages per job. Dead clients are dropped from the list on each
/// connect, so it holds at most as many entries as there are live clients.
static NATS_COUNTERS: std::sync::Mutex<Vec<std::sync::Weak<async_nats::Statistics>>> =
    std::sync::Mutex::new(Vec::new());

fn remember_counters(client: &async_nats::Client) {
    let mut counters = NATS_COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    counters.retain(|c| c.strong_count() > 0);
    counters.push(std::sync::Arc::downgrade(&client.statistics()));
}

/// Messages sent plus messages received by the live NATS clients this process opened.
pub fn nats_messages() -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let counters = NATS_COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    counters
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .map(|s| s.in_messages.load(Relaxed) + s.out_messages.load(Relaxed))
        .sum()
}

/// Opens JetStream stream `config.name`, creating it when missing. Replicas starting together
/// race to create it: the losers' create fails (JetStream reports the subjects as overlapping
/// the stream the winner just made), so a failed create is followed by one more open.
pub async fn open_or_create_stream(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
    let name = config.name.clone();
    match js.get_or_create_stream(config).await {
        Ok(stream) => Ok(stream),
        Err(created) => match js.get_stream(&name).await {
            Ok(stream) => Ok(stream),
            Err(_) => Err(created.into()),
        },
    }
}

/// Whether a first connection that fails is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    InBackground,
    Never,
}

async fn nats_options(
    access: &NatsAccess,
    field: &str,
) -> anyhow::Result<async_nats::ConnectOptions> {
    let env = |name: &str, var: &str| {
        secret_from_env(&format!("{field}.auth.{name}"), var).map_err(anyhow::Error::msg)
    };
    let mut options = match &access.auth {
        NatsAuth::None => async_nats::ConnectOptions::new(),
        NatsAuth::Token { env: var } => {
            async_nats::ConnectOptions::new().token(env("token_env", var)?)
        }
        NatsAuth::UserPassword { user, password_env } => async_nats::ConnectOptions::new()
            .user_and_password(user.clone(), env("password_env", password_env)?),
        NatsAuth::NkeySeed(Secret::Env(var)) => {
            async_nats::ConnectOptions::new().nkey(env("nkey_seed_env", var)?)
        }
        NatsAuth::NkeySeed(Secret::File(path)) => {
            let seed = std::fs::read_to_string(path)
                .with_context(|| format!("{field}.auth.nkey_seed_file: cannot read {path}"))?;
            async_nats::ConnectOptions::new().nkey(seed.trim().to_owned())
        }
        NatsAuth::CredentialsFile(path) => async_nats::ConnectOptions::new()
            .credentials_file(path)
            .await
            .with_context(|| format!("{field}.auth.credentials_file: cannot use {path}"))?,
    };
    if let Some(tls) = &access.tls {
        options = options.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(PathBuf::from(ca));
        }
        if let Some((cert, key)) = &tls.client {
            options = options.add_client_certificate(PathBuf::from(cert), PathBuf::from(key));
        }
    }
    Ok(options)
}

/// A librdkafka client config for `brokers`: the pass-through `properties`, then the secret
/// ones read from the environment variables `secrets` names. `field` names the config section
/// in errors; a secret's value never appears in one.
pub fn kafka(
    brokers: &str,
    properties: &[(String, String)],
    secrets: &[(String, String)],
    field: &str,
) -> anyhow::Result<rdkafka::ClientConfig> {
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in properties {
        config.set(key, value);
    }
    for (key, var) in secrets {
        let value = secret_from_env(&format!("{field}.librdkafka_env.{key}"), var)
            .map_err(anyhow::Error::msg)?;
        config.set(key, value);
    }
    // librdkafka logs its whole config at debug level; keep secrets out of it whatever the
    // `debug` property says.
    config.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
    Ok(config)
}

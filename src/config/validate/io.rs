//! `source`, `sink` (and that outputs never overlap the jobs topic), `state` and `http`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{non_empty, positive, properties, Problems};
use crate::config::plan::*;
use crate::config::raw::{self, RawSink, RawSource, RawState};

pub(super) fn source_plan(p: &mut Problems, source: RawSource) -> SourcePlan {
    match source {
        RawSource::Kafka {
            brokers,
            group,
            topic,
            librdkafka,
            librdkafka_env,
            tenant_from,
            delay_topic,
        } => {
            let tenant_from = match tenant_from.as_deref() {
                None | Some("payload") => TenantFrom::Payload,
                Some("key") => TenantFrom::Key,
                Some(other) => match other.strip_prefix("header:") {
                    Some(name) if !name.is_empty() => TenantFrom::Header(name.to_owned()),
                    _ => {
                        p.add(
                            "source.tenant_from",
                            format!("`{other}` is not `payload` (the job's own `tenant` field), `key` (the message key must name the job's tenant) or `header:<name>` (that header must)"),
                        );
                        TenantFrom::Payload
                    }
                },
            };
            non_empty(p, "source.brokers", &brokers);
            non_empty(p, "source.group", &group);
            non_empty(p, "source.topic", &topic);
            if let Some(delay) = &delay_topic {
                non_empty(p, "source.delay_topic", delay);
                if *delay == topic {
                    p.add(
                        "source.delay_topic",
                        "must differ from source.topic (parked jobs would be read as new ones)",
                    );
                }
            }
            SourcePlan::Kafka(KafkaSourcePlan {
                brokers,
                group,
                topic,
                tenant_from,
                delay_topic,
                librdkafka: kafka_properties(p, "source", librdkafka, &librdkafka_env),
                librdkafka_env: secret_env(p, "source", librdkafka_env),
            })
        }
        RawSource::Nats {
            url,
            stream,
            subjects,
            create_stream,
            consumer,
            ack_wait_ms,
            max_deliver,
            max_ack_pending,
            batch,
            auth,
            tls,
        } => {
            let access = nats_access(p, "source", &auth, tls.as_ref());
            if !(url.starts_with("nats://") || url.starts_with("tls://") || url.contains(':')) {
                p.add(
                    "source.url",
                    format!(
                        "`{}` is not a NATS URL (nats://host:4222)",
                        crate::config::redact_url(&url)
                    ),
                );
            }
            if stream.is_empty() || stream.contains(['.', ' ', '*', '>']) {
                p.add(
                    "source.stream",
                    "a stream name cannot be empty or contain `.`, spaces or wildcards",
                );
            }
            if consumer.is_empty() || consumer.contains(['.', ' ', '*', '>']) {
                p.add(
                    "source.consumer",
                    "a consumer name cannot be empty or contain `.`, spaces or wildcards",
                );
            }
            if subjects.is_empty() {
                p.add(
                    "source.subjects",
                    "list at least one subject (e.g. switchyard.jobs.>)",
                );
            }
            if ack_wait_ms < 1000 {
                p.add(
                    "source.ack_wait_ms",
                    "must be at least 1000 (in-progress acks are sent every third of it)",
                );
            }
            if max_deliver == 0 || max_deliver < -1 {
                p.add("source.max_deliver", "must be -1 (unlimited) or at least 1");
            }
            positive(p, "source.batch", batch as u64);
            if max_ack_pending < 1 {
                p.add(
                    "source.max_ack_pending",
                    "must be at least 1 (parked jobs count against it: size it to the backlog)",
                );
            }
            SourcePlan::Nats(NatsSourcePlan {
                url,
                access,
                stream,
                subjects,
                create_stream,
                consumer,
                ack_wait: Duration::from_millis(ack_wait_ms),
                max_deliver,
                max_ack_pending,
                batch,
            })
        }
    }
}

pub(super) fn sink_plan(p: &mut Problems, sink: RawSink, source: &SourcePlan) -> SinkPlan {
    match sink {
        RawSink::Kafka {
            brokers,
            topics,
            delivery_timeout_ms,
            librdkafka,
            librdkafka_env,
        } => {
            // On the source's brokers, the sink connects as the source does: its security
            // properties (protocol, SASL, TLS) and secrets, under its own settings.
            let (inherited, inherited_secrets) = match (&brokers, source) {
                (None, SourcePlan::Kafka(k)) => (
                    k.librdkafka
                        .iter()
                        .filter(|(key, _)| is_connection_security(key))
                        .cloned()
                        .collect::<Vec<_>>(),
                    if librdkafka_env.is_empty() {
                        k.librdkafka_env.clone()
                    } else {
                        Vec::new()
                    },
                ),
                _ => (Vec::new(), Vec::new()),
            };
            let brokers = match (brokers, source) {
                (Some(b), _) => b,
                (None, SourcePlan::Kafka(k)) => k.brokers.clone(),
                (None, SourcePlan::Nats(_)) => {
                    p.add("sink.brokers", "required when the source is not Kafka");
                    String::new()
                }
            };
            let topics = topics_plan(p, topics);
            positive(p, "sink.delivery_timeout_ms", delivery_timeout_ms);
            SinkPlan::Kafka(KafkaSinkPlan {
                brokers,
                topics,
                delivery_timeout: Duration::from_millis(delivery_timeout_ms),
                librdkafka: {
                    let own = kafka_properties(p, "sink", librdkafka, &librdkafka_env);
                    let mut all: Vec<(String, String)> = inherited
                        .into_iter()
                        .filter(|(key, _)| !own.iter().any(|(k, _)| k == key))
                        .collect();
                    all.extend(own);
                    all
                },
                librdkafka_env: if librdkafka_env.is_empty() {
                    inherited_secrets
                } else {
                    secret_env(p, "sink", librdkafka_env)
                },
            })
        }
        RawSink::Nats {
            url,
            topics,
            jetstream,
            stream,
            delivery_timeout_ms,
            auth,
            tls,
        } => {
            let own = |p: &mut Problems| {
                nats_access(p, "sink", &auth.clone().unwrap_or_default(), tls.as_ref())
            };
            let (url, access) = match (url, source) {
                (Some(u), _) => (u, own(p)),
                // The source's server: its access too, unless the sink sets its own.
                (None, SourcePlan::Nats(n)) if auth.is_none() && tls.is_none() => {
                    (n.url.clone(), n.access.clone())
                }
                (None, SourcePlan::Nats(n)) => (n.url.clone(), own(p)),
                (None, SourcePlan::Kafka(_)) => {
                    p.add("sink.url", "required when the source is not NATS");
                    (String::new(), own(p))
                }
            };
            let topics = topics_plan(p, topics);
            for (field, subject) in [
                ("results", &topics.results),
                ("review", &topics.review),
                ("dlq", &topics.dlq),
            ] {
                if subject.contains(['*', '>', ' ']) {
                    p.add(
                        format!("sink.topics.{field}"),
                        "a subject prefix cannot contain wildcards or spaces",
                    );
                }
            }
            positive(p, "sink.delivery_timeout_ms", delivery_timeout_ms);
            SinkPlan::Nats(NatsSinkPlan {
                url,
                access,
                topics,
                jetstream,
                stream,
                delivery_timeout: Duration::from_millis(delivery_timeout_ms),
            })
        }
    }
}

/// The review round trip: the decisions topic must be apart from jobs and outputs.
pub(super) fn reviews_plan(
    p: &mut Problems,
    raw: crate::config::raw::RawReviews,
    source: &SourcePlan,
    sink: &SinkPlan,
    pipelines: &std::collections::BTreeMap<String, std::sync::Arc<crate::config::PipelinePlan>>,
) -> crate::config::ReviewsPlan {
    let decisions = raw.decisions;
    if decisions.is_empty() || decisions.contains(['*', '>', ' ']) {
        p.add(
            "reviews.decisions",
            "a topic / subject prefix cannot be empty or contain wildcards or spaces",
        );
    }
    let jobs: String = match source {
        SourcePlan::Kafka(k) => k.topic.clone(),
        SourcePlan::Nats(n) => n.subjects.first().cloned().unwrap_or_default(),
    };
    let jobs_prefix = jobs.trim_end_matches(".>").trim_end_matches(".*");
    if decisions == jobs
        || decisions == jobs_prefix
        || decisions.starts_with(&format!("{jobs_prefix}."))
    {
        p.add(
            "reviews.decisions",
            format!(
                "`{decisions}` overlaps the jobs topic `{jobs}`: decisions would be read as jobs"
            ),
        );
    }
    let outputs = sink.topics();
    for (field, topic) in [
        ("results", &outputs.results),
        ("review", &outputs.review),
        ("dlq", &outputs.dlq),
    ] {
        if *topic == decisions || topic.starts_with(&format!("{decisions}.")) {
            p.add(
                "reviews.decisions",
                format!("`{decisions}` is also sink.topics.{field}: outputs would be read back as decisions"),
            );
        }
    }
    if raw.expire_every_ms < 10 {
        p.add("reviews.expire_every_ms", "must be at least 10");
    }
    crate::config::ReviewsPlan {
        decisions,
        consume: raw
            .consume
            .unwrap_or_else(|| pipelines.values().any(|p| p.can_review())),
        expire_every: Duration::from_millis(raw.expire_every_ms),
    }
}

/// Outputs written where jobs are read would come back as jobs.
pub(super) fn outputs_apart_from_jobs(p: &mut Problems, source: &SourcePlan, sink: &SinkPlan) {
    let jobs_topic: String = match source {
        SourcePlan::Kafka(k) => k.topic.clone(),
        SourcePlan::Nats(n) => n.subjects.first().cloned().unwrap_or_default(),
    };
    let outputs = sink.topics();
    if let SourcePlan::Kafka(k) = source {
        if let Some(delay) = &k.delay_topic {
            for (field, topic) in [
                ("results", &outputs.results),
                ("review", &outputs.review),
                ("dlq", &outputs.dlq),
            ] {
                if topic == delay {
                    p.add(
                        format!("sink.topics.{field}"),
                        format!("`{topic}` is also source.delay_topic: outputs would be read back as parked jobs"),
                    );
                }
            }
        }
    }
    for (field, topic) in [
        ("results", &outputs.results),
        ("review", &outputs.review),
        ("dlq", &outputs.dlq),
    ] {
        let jobs_prefix = jobs_topic.trim_end_matches(".>");
        if *topic == jobs_topic
            || topic.starts_with(&format!("{jobs_prefix}."))
            || topic == jobs_prefix
        {
            p.add(format!("sink.topics.{field}"), format!("`{topic}` overlaps the jobs topic `{jobs_topic}`: outputs would be read back as jobs"));
        }
    }
}

pub(super) fn state_section(p: &mut Problems, state: RawState) -> StatePlan {
    match state {
        RawState::Memory {
            max_entries,
            result_ttl_s,
            claim_lease_ms,
        } => {
            positive(p, "state.max_entries", max_entries as u64);
            state_plan(
                p,
                StateKind::Memory { max_entries },
                result_ttl_s,
                claim_lease_ms,
            )
        }
        RawState::Redis {
            url,
            url_env,
            key_prefix,
            result_ttl_s,
            claim_lease_ms,
            timeout_ms,
            username,
            password_env,
            tls,
            tls_insecure,
            cluster,
            sentinel_master,
        } => {
            if cluster && sentinel_master.is_some() {
                p.add(
                    "state.sentinel_master",
                    "a store is either a cluster or behind sentinels, not both",
                );
            }
            positive(p, "state.timeout_ms", timeout_ms);
            if let Some(var) = &password_env {
                env_present(p, "state.password_env", var);
            }
            if username.is_some() && password_env.is_none() {
                p.add("state.password_env", "an ACL `username` needs `password_env` naming the variable that holds its password");
            }
            let plain_url = matches!(&url, Some(u) if u.starts_with("redis://"));
            if (tls.is_some() || tls_insecure) && plain_url && sentinel_master.is_none() {
                p.add("state.url", "TLS settings need a `rediss://` URL");
            }
            let tls_files_named = tls.as_ref().is_some_and(|t| {
                t.ca_file.is_some() || t.cert_file.is_some() || t.key_file.is_some()
            });
            if sentinel_master.is_some() && tls_files_named {
                p.add(
                    "state.tls",
                    "behind sentinels, TLS to the master uses the system's trusted roots only: set `tls: {}` (or `tls_insecure` for testing); CA and client certificate files are not supported there yet",
                );
            }
            if tls_insecure {
                p.warn(
                    "state.tls_insecure",
                    "certificate verification is off: for testing only, never in production",
                );
            }
            let access = RedisAccess {
                username,
                password_env,
                tls: tls.as_ref().map(|t| tls_files(p, "state.tls", t)),
                tls_insecure,
                cluster,
                sentinel_master,
            };
            let url = match (url, url_env) {
                (Some(url), None) => {
                    if !url.split(',').map(str::trim).all(|url| {
                        url.starts_with("redis://")
                            || url.starts_with("rediss://")
                            || url.starts_with("redis+unix://")
                    }) {
                        p.add(
                            "state.url",
                            format!(
                                "`{}` is not a redis:// or rediss:// URL",
                                crate::config::redact_url(&url)
                            ),
                        );
                    }
                    RedisUrl::Inline(url)
                }
                (None, Some(var)) => {
                    non_empty(p, "state.url_env", &var);
                    RedisUrl::Env(var)
                }
                (Some(_), Some(_)) => {
                    p.add("state.url", "set either `url` or `url_env`, not both");
                    RedisUrl::Inline(String::new())
                }
                (None, None) => {
                    p.add("state.url", "a redis state store needs `url` (or `url_env` naming a variable holding it)");
                    RedisUrl::Inline(String::new())
                }
            };
            let kind = StateKind::Redis {
                url,
                key_prefix,
                timeout: Duration::from_millis(timeout_ms),
                access: Box::new(access),
            };
            state_plan(p, kind, result_ttl_s, claim_lease_ms)
        }
    }
}

pub(super) fn http_listen(p: &mut Problems, listen: &str) -> Option<String> {
    match listen {
        "off" => None,
        listen
            if listen.parse::<std::net::SocketAddr>().is_ok()
                || listen
                    .rsplit_once(':')
                    .is_some_and(|(_, port)| port.parse::<u16>().is_ok()) =>
        {
            Some(listen.to_owned())
        }
        listen => {
            p.add(
                "http.listen",
                format!("`{listen}` is not host:port (or `off`)"),
            );
            None
        }
    }
}

pub(super) fn topics_plan(p: &mut Problems, topics: raw::RawTopics) -> Topics {
    for (field, topic) in [
        ("results", &topics.results),
        ("review", &topics.review),
        ("dlq", &topics.dlq),
    ] {
        non_empty(p, format!("sink.topics.{field}"), topic);
    }
    Topics {
        results: topics.results,
        review: topics.review,
        dlq: topics.dlq,
    }
}

pub(super) fn state_plan(
    p: &mut Problems,
    kind: StateKind,
    result_ttl_s: u64,
    claim_lease_ms: u64,
) -> StatePlan {
    positive(p, "state.result_ttl_s", result_ttl_s);
    if result_ttl_s > 366 * 86_400 {
        p.add("state.result_ttl_s", "must be at most a year (31622400)");
    }
    if !(1000..=86_400_000).contains(&claim_lease_ms) {
        p.add(
            "state.claim_lease_ms",
            "must be between 1000 (it is renewed every third of it) and 86400000 (a day)",
        );
    }
    StatePlan {
        kind,
        result_ttl: Duration::from_secs(result_ttl_s),
        claim_lease: Duration::from_millis(claim_lease_ms),
    }
}

/// NATS credentials and TLS files: at most one way to authenticate, and every file and
/// environment variable named must exist, so `check-config` says `ok` only when `run` can
/// present them.
fn nats_access(
    p: &mut Problems,
    section: &str,
    auth: &raw::RawNatsAuth,
    tls: Option<&raw::RawTls>,
) -> NatsAccess {
    let field = |name: &str| format!("{section}.auth.{name}");
    let mut chosen = Vec::new();
    if let Some(var) = &auth.token_env {
        env_present(p, &field("token_env"), var);
        chosen.push(NatsAuth::Token { env: var.clone() });
    }
    match (&auth.user, &auth.password_env) {
        (Some(user), Some(var)) => {
            env_present(p, &field("password_env"), var);
            chosen.push(NatsAuth::UserPassword {
                user: user.clone(),
                password_env: var.clone(),
            });
        }
        (Some(_), None) => p.add(
            field("password_env"),
            "a `user` needs `password_env` naming the variable that holds the password",
        ),
        (None, Some(_)) => p.add(
            field("user"),
            "`password_env` needs the `user` it belongs to",
        ),
        (None, None) => {}
    }
    if let Some(var) = &auth.nkey_seed_env {
        env_present(p, &field("nkey_seed_env"), var);
        chosen.push(NatsAuth::NkeySeed(Secret::Env(var.clone())));
    }
    if let Some(path) = &auth.nkey_seed_file {
        file_present(p, &field("nkey_seed_file"), path);
        chosen.push(NatsAuth::NkeySeed(Secret::File(path.clone())));
    }
    if let Some(path) = &auth.credentials_file {
        file_present(p, &field("credentials_file"), path);
        chosen.push(NatsAuth::CredentialsFile(path.clone()));
    }
    if chosen.len() > 1 {
        p.add(
            format!("{section}.auth"),
            "set one way to authenticate: token_env, user + password_env, nkey_seed_env, nkey_seed_file or credentials_file",
        );
    }
    NatsAccess {
        auth: chosen.into_iter().next().unwrap_or_default(),
        tls: tls.map(|t| tls_files(p, &format!("{section}.tls"), t)),
    }
}

/// TLS files: each named file must exist; a client certificate needs its key.
pub(super) fn tls_files(p: &mut Problems, field: &str, tls: &raw::RawTls) -> TlsFiles {
    for (name, path) in [
        ("ca_file", &tls.ca_file),
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
    ] {
        if let Some(path) = path {
            file_present(p, &format!("{field}.{name}"), path);
        }
    }
    let client = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        _ => {
            p.add(
                field,
                "a client certificate needs both `cert_file` and `key_file`",
            );
            None
        }
    };
    TlsFiles {
        ca_file: tls.ca_file.clone(),
        client,
    }
}

/// A secret's environment variable must be set (and not empty) for `run` to start.
pub(super) fn env_present(p: &mut Problems, field: &str, var: &str) {
    non_empty(p, field, var);
    if !var.is_empty() {
        if let Err(problem) = crate::config::secret_from_env(field, var) {
            p.0.push(problem);
        }
    }
}

/// A file the service reads at start-up must be readable.
pub(super) fn file_present(p: &mut Problems, field: &str, path: &str) {
    if let Err(e) = std::fs::metadata(path) {
        p.add(field, format!("cannot read `{path}`: {e}"));
    }
}

/// librdkafka properties that hold secrets: only ever set from the environment.
const SECRET_PROPERTIES: [&str; 5] = [
    "sasl.password",
    "ssl.key.password",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
    "ssl.key.pem",
];

/// The pass-through librdkafka properties; a secret written inline is an error that says where
/// it belongs instead.
fn kafka_properties(
    p: &mut Problems,
    section: &str,
    raw: BTreeMap<String, serde_norway::Value>,
    secrets: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    for key in raw.keys() {
        if SECRET_PROPERTIES.contains(&key.as_str()) {
            p.add(
                format!("{section}.librdkafka.{key}"),
                format!("a secret cannot be written in the config: name the environment variable that holds it, `{section}.librdkafka_env: {{{key}: KAFKA_SECRET_VAR}}`"),
            );
        }
        if secrets.contains_key(key) {
            p.add(
                format!("{section}.librdkafka.{key}"),
                format!("also set by `{section}.librdkafka_env`; keep one"),
            );
        }
    }
    properties(p, &format!("{section}.librdkafka"), raw)
        .into_iter()
        .filter(|(key, _)| !SECRET_PROPERTIES.contains(&key.as_str()))
        .collect()
}

/// Secret librdkafka properties by environment variable; each variable must be set, and only
/// secret properties belong here (a misspelt key would make librdkafka echo the value).
fn secret_env(
    p: &mut Problems,
    section: &str,
    raw: BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut secrets = Vec::new();
    for (key, var) in raw {
        let field = format!("{section}.librdkafka_env.{key}");
        if !SECRET_PROPERTIES.contains(&key.as_str()) {
            p.add(
                field,
                format!(
                    "not a secret librdkafka property; this takes {}",
                    SECRET_PROPERTIES.join(", ")
                ),
            );
            continue;
        }
        env_present(p, &field, &var);
        secrets.push((key, var));
    }
    secrets
}

/// librdkafka properties that say how to reach the brokers securely, which a sink on the
/// source's brokers shares with it.
fn is_connection_security(key: &str) -> bool {
    ["security.", "sasl.", "ssl.", "ssl_"]
        .iter()
        .any(|prefix| key.starts_with(prefix))
        || key == "enable.ssl.certificate.verification"
}

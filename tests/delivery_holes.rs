//! The delivery holes an audit found, each proven closed against real brokers: a crafted header
//! must not crash a job, a late redelivery must replay (not dead-letter) a finished job, and a
//! job processed twice after the state store lost its data must reach the output stream once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use switchyard::config;
use switchyard::state::{MemoryStore, StateStore};
use switchyard::testkit::{publish, publish_nats, Collected, OutputCollector};

use common::*;

const STALL: Duration = Duration::from_secs(30);

async fn publish_with_traceparent(brokers: &str, payload: &[u8], traceparent: &str) {
    publish_with_headers(brokers, payload, "acme", &[("traceparent", traceparent)]).await
}

async fn publish_with_headers(brokers: &str, payload: &[u8], key: &str, headers: &[(&str, &str)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let mut owned = OwnedHeaders::new();
    for (name, value) in headers {
        owned = owned.insert(Header {
            key: name,
            value: Some(*value),
        });
    }
    producer
        .send(
            FutureRecord::<str, [u8]>::to(JOBS_TOPIC)
                .payload(payload)
                .key(key)
                .headers(owned),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .unwrap();
}

/// Kafka in (the embedded cluster), NATS JetStream out.
fn kafka_to_nats_plan(brokers: &str, names: &NatsNames, llm: &str) -> config::Plan {
    let p = &names.prefix;
    let text = format!(
        r#"
source: {{kind: kafka, brokers: "{brokers}", group: "it-{p}", topic: {JOBS_TOPIC},
         librdkafka: {{auto.commit.interval.ms: 200, session.timeout.ms: 6000, heartbeat.interval.ms: 500}}}}
sink: {{kind: nats, url: "{nats}", stream: {os}, topics: {{results: {p}.results, review: {p}.review, dlq: {p}.dlq}}}}
state: {{kind: memory}}
http: {{listen: "127.0.0.1:0"}}
providers:
  llm: {{kind: openai, base_url: "http://{llm}/v1"}}
models:
  small: {{provider: llm, model: gpt-4o-mini, timeout_ms: 5000}}
prompts:
  answer: {{user: "{{{{input.text}}}}"}}
pipelines:
  support:
    steps:
      - {{name: answer, kind: generate, model: small, prompt: answer}}
"#,
        nats = nats_url(),
        os = names.outputs_stream,
    );
    config::load_str(&text, "test config", Vec::new()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_with_crlf_from_kafka_does_not_crash_the_job_on_a_nats_sink() {
    let kafka = kafka();
    let names = NatsNames::new();
    let llm = mock_llm(1).await;
    let plan = kafka_to_nats_plan(&kafka.bootstrap_servers(), &names, &llm.addr().to_string());
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan, StateStore::from(MemoryStore::new(1000)));
    service.wait_ready().await;

    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let brokers = kafka.bootstrap_servers();
    publish_with_traceparent(
        &brokers,
        &job("crafted", "acme", "hello"),
        &format!("{good}-x\r\nX-Injected: yes"),
    )
    .await;
    publish_with_traceparent(&brokers, &job("plain", "acme", "hello"), good).await;

    let seen = outputs.wait_for(2, STALL, |_| {}).await;
    let panics = service.metrics.job_panics.get();
    service.stop().await;
    names.delete_streams().await;
    assert_eq!(
        seen,
        2,
        "each job gets its output: {:?}",
        outputs.snapshot()
    );
    for (c, _) in outputs.snapshot() {
        assert!(
            matches!(c, Collected::Result(ref r) if !r.duplicate),
            "a fresh result each, got {c:?}"
        );
    }
    assert_eq!(panics, 0, "no job task panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_after_the_deadline_replays_the_result_instead_of_a_dead_letter() {
    let kafka = kafka();
    let llm = mock_llm(1).await;
    let brokers = kafka.bootstrap_servers();
    let plan = plan(&brokers, &llm.addr().to_string(), &[]);
    let outputs = collector(&brokers);
    let service = Service::start(plan, StateStore::from(MemoryStore::new(1000)));
    service.wait_ready().await;

    let deadline = chrono::Utc::now() + chrono::Duration::seconds(3);
    let payload = serde_json::json!({
        "id": "late-1", "tenant": "acme", "input": {"text": "my invoice is wrong"},
        "deadline": deadline.to_rfc3339(),
    })
    .to_string()
    .into_bytes();
    publish(&brokers, JOBS_TOPIC, [payload.clone()])
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(1, STALL, |_| {}).await, 1);
    // The same message again, as a redelivery arriving after the deadline.
    let wait = (deadline - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(300)).await;
    publish(&brokers, JOBS_TOPIC, [payload]).await.unwrap();
    assert_eq!(outputs.wait_for(2, STALL, |_| {}).await, 2);
    service.stop().await;

    let all = outputs.snapshot();
    assert!(
        matches!(&all[0].0, Collected::Result(r) if !r.duplicate),
        "first: its result, got {:?}",
        all[0].0
    );
    assert!(
        matches!(&all[1].0, Collected::Result(r) if r.duplicate),
        "second: the stored result replayed, not a deadline_exceeded dead letter; got {:?}",
        all[1].0
    );
}

/// Messages on the outputs stream for one subject.
async fn stream_messages(names: &NatsNames) -> u64 {
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&names.outputs_stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_processed_again_after_the_state_store_lost_it_reaches_the_output_stream_once() {
    let names = NatsNames::new();
    let llm = mock_llm(1).await;
    let mut plan = nats_plan(&names, &llm.addr().to_string(), &[]);
    // Memory state: each service below starts with an empty store, as after Redis lost its data.
    plan.state.kind = config::StateKind::Memory { max_entries: 1000 };
    let payload = job("lost-1", "acme", "where is my refund?");

    for _ in 0..2 {
        let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
            .await
            .unwrap();
        let service = Service::start(plan.clone(), StateStore::from(MemoryStore::new(1000)));
        service.wait_ready().await;
        publish_nats(&nats_url(), [(names.job_subject("acme"), payload.clone())])
            .await
            .unwrap();
        assert_eq!(outputs.wait_for(1, STALL, |_| {}).await, 1);
        service.stop().await;
        outputs.stop().await;
    }
    let stored = stream_messages(&names).await;
    names.delete_streams().await;
    assert_eq!(
        llm.stats().requests(),
        4,
        "the job really ran twice (two calls each)"
    );
    assert_eq!(
        stored, 1,
        "the second fresh result carries the same Nats-Msg-Id and JetStream drops it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_cannot_spend_another_tenants_budget_or_invent_tenants() {
    let names = NatsNames::new();
    let llm = mock_llm(1).await;
    let plan = nats_plan(
        &names,
        &llm.addr().to_string(),
        &[
            ("SWITCHYARD__TENANTS__UNKNOWN", "reject"),
            ("SWITCHYARD__TENANTS__ACME__RPS", "1000"),
            ("SWITCHYARD__TENANTS__GLOBEX__RPS", "1000"),
        ],
    );
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let mut plan = plan;
    plan.state.kind = config::StateKind::Memory { max_entries: 1000 };
    let service = Service::start(plan, StateStore::from(MemoryStore::new(1000)));
    service.wait_ready().await;
    publish_nats(
        &nats_url(),
        [
            // On acme's subject, claiming to be globex.
            (names.job_subject("acme"), job("spoof-1", "globex", "hi")),
            // A tenant nobody configured.
            (
                names.job_subject("invented"),
                job("new-1", "invented", "hi"),
            ),
            (names.job_subject("acme"), job("fine-1", "acme", "hi")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(3, STALL, |_| {}).await, 3);
    service.stop().await;
    names.delete_streams().await;

    let all = outputs.snapshot();
    let dead: Vec<_> = all
        .iter()
        .filter_map(|(c, _)| match c {
            Collected::DeadLetter(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    let spoof = dead
        .iter()
        .find(|d| d.job_id.as_deref() == Some("spoof-1"))
        .expect("the spoofed job is dead-lettered");
    assert_eq!(spoof.reason.as_str(), "invalid_job");
    assert!(
        spoof.error.contains("`globex`") && spoof.error.contains("`acme`"),
        "names both tenants: {}",
        spoof.error
    );
    assert_eq!(
        spoof.tenant.as_deref(),
        Some("acme"),
        "filed under the subject's tenant"
    );
    let invented = dead
        .iter()
        .find(|d| d.job_id.as_deref() == Some("new-1"))
        .expect("the invented tenant's job is dead-lettered");
    assert_eq!(invented.reason.as_str(), "unknown_tenant");
    assert!(
        all.iter()
            .any(|(c, _)| matches!(c, Collected::Result(r) if r.job_id == "fine-1")),
        "the honest job runs"
    );
    assert_eq!(
        llm.stats().requests(),
        2,
        "only the honest job reached the provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_back_on_its_last_jetstream_delivery_becomes_a_dead_letter_not_a_loss() {
    let names = NatsNames::new();
    // Every call takes 3 s; the drain gives in-flight jobs 200 ms, then hands them back.
    let llm = mock_llm(3000).await;
    let mut plan = nats_plan(
        &names,
        &llm.addr().to_string(),
        &[
            ("SWITCHYARD__SOURCE__MAX_DELIVER", "1"),
            ("SWITCHYARD__LIMITS__DRAIN_TIMEOUT_MS", "200"),
        ],
    );
    plan.state.kind = config::StateKind::Memory { max_entries: 1000 };
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan, StateStore::from(MemoryStore::new(1000)));
    service.wait_ready().await;
    let jobs: Vec<_> = (0..3)
        .map(|i| {
            (
                names.job_subject("acme"),
                job(&format!("last-{i}"), "acme", "a slow one"),
            )
        })
        .collect();
    publish_nats(&nats_url(), jobs).await.unwrap();
    let started = tokio::time::Instant::now();
    while llm.stats().requests() < 3 && started.elapsed() < STALL {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.stop().await;
    let seen = outputs.wait_for(3, Duration::from_secs(10), |_| {}).await;
    names.delete_streams().await;

    assert_eq!(
        seen,
        3,
        "each job has an output: {:?}",
        job_ids(&outputs.snapshot())
    );
    for (c, raw) in outputs.snapshot() {
        let Collected::DeadLetter(d) = c else {
            panic!("expected dead letters, got {c:?}");
        };
        assert_eq!(d.reason.as_str(), "max_deliveries_exceeded");
        assert_eq!(d.deliveries, Some(1));
        assert!(
            d.payload.contains("a slow one"),
            "carries the original payload"
        );
        assert_eq!(raw["deliveries"], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_job_handed_back_after_losing_its_claim_runs_again_and_commits_move_on() {
    use redis::AsyncCommands as _;
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(1500).await;
    let prefix = format!("it{:x}-", rand::random::<u64>());
    let url = redis_url();
    let env = [
        ("SWITCHYARD__STATE__KIND", "redis"),
        ("SWITCHYARD__STATE__URL", url.as_str()),
        ("SWITCHYARD__STATE__KEY_PREFIX", prefix.as_str()),
        ("SWITCHYARD__STATE__CLAIM_LEASE_MS", "1500"),
    ];
    let plan = plan(&brokers, &llm.addr().to_string(), &env);
    let state = || async {
        StateStore::open(&plan.state)
            .await
            .expect("Redis must be running at REDIS_URL")
    };
    let outputs = collector(&brokers);
    let service = Service::start(plan.clone(), state().await);
    service.wait_ready().await;

    // One partition: the job whose claim is taken, then jobs behind it.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    for i in 0..6 {
        producer
            .send(
                FutureRecord::<str, [u8]>::to(JOBS_TOPIC)
                    .key("acme")
                    .payload(&job(&format!("behind-{i}"), "acme", "hello")),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
            .unwrap();
    }
    // While `behind-0` runs, another worker takes its claim (as after a lease expiry).
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{prefix}idem:acme/acme:behind-0");
    let started = tokio::time::Instant::now();
    loop {
        let value: Option<String> = redis.get(&key).await.unwrap();
        if value.is_some_and(|v| v.starts_with("C:")) {
            break;
        }
        assert!(started.elapsed() < STALL, "the job never got its claim");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _: () = redis
        .set_options(
            &key,
            "C:intruder",
            redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(1500)),
        )
        .await
        .unwrap();

    assert_eq!(
        outputs.wait_for(6, STALL, |_| {}).await,
        6,
        "every job, the handed-back one too, has its output in this run: {:?}",
        job_ids(&outputs.snapshot())
    );
    tokio::time::sleep(Duration::from_millis(600)).await; // an auto-commit interval or two
    service.stop().await;

    // A restart in the same group must find everything committed: nothing is redelivered.
    let service = Service::start(plan.clone(), state().await);
    service.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    service.stop().await;
    let all = outputs.snapshot();
    assert_eq!(
        all.len(),
        6,
        "after the restart nothing was redelivered: {:?}",
        job_ids(&all)
    );
}

/// The job id of each output, marked when it is a replay, for assertion messages.
fn job_ids(outputs: &[(Collected, serde_json::Value)]) -> Vec<String> {
    outputs
        .iter()
        .map(|(c, _)| match c {
            Collected::Result(r) | Collected::Review(r) => {
                format!("{}{}", r.job_id, if r.duplicate { " (replay)" } else { "" })
            }
            Collected::DeadLetter(d) => format!(
                "{} dead letter {}",
                d.job_id.as_deref().unwrap_or("-"),
                d.reason.as_str()
            ),
            Collected::Unreadable { error, .. } => format!("unreadable: {error}"),
        })
        .collect()
}

/// A TCP proxy to Redis that can be cut: every connection through it stalls (as in a network
/// partition) until it is restored.
struct Partition {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _tasks: tokio_util::task::TaskTracker,
}

impl Partition {
    async fn to(upstream: &str) -> Self {
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        let (addr, tasks) = proxy(upstream, move |(cr, cw), (sr, sw)| {
            let flag = flag.clone();
            async move {
                tokio::join!(pump(cr, sw, flag.clone()), pump(sr, cw, flag));
            }
        })
        .await;
        Self {
            addr,
            cut,
            _tasks: tasks,
        }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
    }
}

type Halves = (
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
);

/// A TCP proxy on a free local port to `upstream`: each connection accepted is joined to one
/// of its own to `upstream` and handed to `serve` as (client halves, server halves).
async fn proxy<F, Fut>(
    upstream: &str,
    serve: F,
) -> (std::net::SocketAddr, tokio_util::task::TaskTracker)
where
    F: Fn(Halves, Halves) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = upstream.to_owned();
    let tasks = tokio_util::task::TaskTracker::new();
    let inner = tasks.clone();
    tasks.spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            inner.spawn(serve(client.into_split(), server.into_split()));
        }
    });
    (addr, tasks)
}

/// Copies bytes one way, holding them while the partition is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while cut.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_redis_past_its_lease_does_not_publish_over_the_one_that_took_over() {
    use redis::AsyncCommands as _;
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(1500).await;
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let partition = Partition::to(&upstream).await;
    let prefix = format!("it{:x}-", rand::random::<u64>());
    let via_proxy = format!("redis://{}", partition.addr);
    let env = [
        ("SWITCHYARD__STATE__KIND", "redis"),
        ("SWITCHYARD__STATE__URL", via_proxy.as_str()),
        ("SWITCHYARD__STATE__KEY_PREFIX", prefix.as_str()),
        ("SWITCHYARD__STATE__CLAIM_LEASE_MS", "1000"),
        ("SWITCHYARD__STATE__TIMEOUT_MS", "300"),
    ];
    let plan = plan(&brokers, &llm.addr().to_string(), &env);
    let outputs = collector(&brokers);
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;
    publish(&brokers, JOBS_TOPIC, [job("fence-1", "acme", "hello")])
        .await
        .unwrap();

    // Worker A holds the claim and is calling the provider; then it is cut off from Redis.
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{prefix}idem:acme/acme:fence-1");
    let started = tokio::time::Instant::now();
    while !redis
        .get::<_, Option<String>>(&key)
        .await
        .unwrap()
        .is_some_and(|v| v.starts_with("C:"))
    {
        assert!(started.elapsed() < STALL, "the job never got its claim");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    partition.set_cut(true);
    // A's lease lapses; worker B takes the key over, runs the job and records its result.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let b = switchyard::state::RedisStore::connect(&redis_url(), &prefix, Duration::from_secs(2))
        .await
        .unwrap();
    let switchyard::state::Claim::Acquired(token) = b
        .claim("acme/acme:fence-1", Duration::from_secs(10))
        .await
        .unwrap()
    else {
        panic!("B takes over the lapsed claim")
    };
    let now = chrono::Utc::now();
    let b_result = serde_json::json!({"kind": "result", "body": {
        "job_id": "fence-1", "tenant": "acme", "pipeline": "support", "status": "ok",
        "output": "answered by B", "route": {"category": null, "confidence": null, "model": null, "variant": null},
        "steps": [], "usage": {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0},
        "duplicate": false, "metadata": null, "received_at": now, "completed_at": now, "latency_ms": 1
    }});
    assert!(b
        .complete(
            "acme/acme:fence-1",
            &token,
            serde_json::to_vec(&b_result).unwrap().into(),
            Duration::from_secs(60)
        )
        .await
        .unwrap());
    // A is reachable again once its provider call has long finished.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    partition.set_cut(false);

    assert_eq!(outputs.wait_for(1, STALL, |_| {}).await, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    service.stop().await;
    let all = outputs.snapshot();
    let fresh: Vec<_> = all
        .iter()
        .filter(|(c, _)| matches!(c, Collected::Result(r) if !r.duplicate))
        .collect();
    assert!(
        fresh.is_empty(),
        "A must not publish a fresh result after B took over: {:?}",
        job_ids(&all)
    );
    assert!(
        all.iter()
            .all(|(c, _)| matches!(c, Collected::Result(r) if r.output == "answered by B")),
        "A answers with B's stored result: {:?}",
        job_ids(&all)
    );
    let stored: String = redis.get(&key).await.unwrap();
    assert!(
        stored.contains("answered by B"),
        "B's outcome was not overwritten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_results_topic_that_refuses_writes_keeps_the_paid_answer_and_fails_readiness() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(300).await;
    let plan = plan(&brokers, &llm.addr().to_string(), &[]);
    let outputs = collector(&brokers);
    let service = Service::start(plan, StateStore::from(MemoryStore::new(1000)));
    service.wait_ready().await;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..5).map(|i| job(&format!("acl-{i}"), "acme", "hello")),
    )
    .await
    .unwrap();
    // While the jobs call the provider, the topic starts refusing writes (an ACL change).
    kafka.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 4],
    );
    let mut went_unready = false;
    let started = tokio::time::Instant::now();
    while outputs.len() < 5 && started.elapsed() < STALL {
        went_unready |= !service.health.is_ready();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready_after = service.health.is_ready();
    service.stop().await;

    let all = outputs.snapshot();
    assert_eq!(all.len(), 5, "one output per job: {:?}", job_ids(&all));
    assert!(
        all.iter().all(
            |(c, _)| matches!(c, Collected::Result(r) if !r.duplicate && r.output.is_string())
        ),
        "every paid answer is delivered, none replaced by a dead letter: {:?}",
        job_ids(&all)
    );
    assert!(
        went_unready,
        "readiness fails while the topic refuses writes"
    );
    assert!(ready_after, "and recovers by itself once it takes them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tenant_from_key_a_kafka_producer_cannot_claim_another_tenant() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(1).await;
    let plan = plan(
        &brokers,
        &llm.addr().to_string(),
        &[("SWITCHYARD__SOURCE__TENANT_FROM", "key")],
    );
    let outputs = collector(&brokers);
    let service = Service::start(plan, StateStore::from(MemoryStore::new(1000)));
    service.wait_ready().await;
    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    // Both keyed `acme`: one claims to be globex.
    publish_with_traceparent(&brokers, &job("spoof-k", "globex", "hi"), good).await;
    publish_with_traceparent(&brokers, &job("fine-k", "acme", "hi"), good).await;
    assert_eq!(outputs.wait_for(2, STALL, |_| {}).await, 2);
    service.stop().await;
    let all = outputs.snapshot();
    let spoof = all
        .iter()
        .find_map(|(c, _)| match c {
            Collected::DeadLetter(d) if d.job_id.as_deref() == Some("spoof-k") => Some(d.clone()),
            _ => None,
        })
        .expect("the spoofed job is dead-lettered");
    assert_eq!(spoof.reason.as_str(), "invalid_job");
    assert!(spoof.error.contains("message key"), "{}", spoof.error);
    assert!(all
        .iter()
        .any(|(c, _)| matches!(c, Collected::Result(r) if r.job_id == "fine-k")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tenant_from_a_header_a_kafka_producer_cannot_claim_another_tenant() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(1).await;
    let plan = plan(
        &brokers,
        &llm.addr().to_string(),
        &[("SWITCHYARD__SOURCE__TENANT_FROM", "header:x-tenant")],
    );
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    service.wait_ready().await;
    // The gateway in front of Kafka sets x-tenant; the payload's own claim must agree.
    let vouched = [("x-tenant", "acme")];
    publish_with_headers(&brokers, &job("spoof-h", "globex", "hi"), "k", &vouched).await;
    publish_with_headers(&brokers, &job("fine-h", "acme", "hi"), "k", &vouched).await;
    publish_with_headers(&brokers, &job("bare-h", "acme", "hi"), "k", &[]).await;
    assert_eq!(outputs.wait_for(3, STALL, |_| {}).await, 3);
    service.stop().await;
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let dead = |id: &str| {
        all.iter()
            .find_map(|(c, _)| match c {
                Collected::DeadLetter(d) if d.job_id.as_deref() == Some(id) => Some(d.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{id} is dead-lettered"))
    };
    let spoof = dead("spoof-h");
    assert_eq!(spoof.reason.as_str(), "invalid_job");
    assert_eq!(
        spoof.tenant.as_deref(),
        Some("acme"),
        "filed under the vouched tenant"
    );
    assert!(spoof.error.contains("globex"), "{}", spoof.error);
    assert_eq!(
        dead("bare-h").reason.as_str(),
        "invalid_job",
        "no header, no vouched tenant"
    );
    assert!(all
        .iter()
        .any(|(c, _)| matches!(c, Collected::Result(r) if r.job_id == "fine-h")));
    assert_eq!(
        llm.stats().requests(),
        2,
        "only the vouched job reached the provider"
    );
}

/// A job running three times longer than its claim lease keeps its claim (renewed while it
/// runs): a second delivery of it meanwhile waits and is answered from the store, instead of
/// taking the claim over and calling the provider again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_its_lease_keeps_its_claim_against_a_second_delivery() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    // Two calls of 1.5 s each; the lease is 1 s.
    let llm = mock_llm(1500).await;
    let prefix = format!("it{:x}:", rand::random::<u64>());
    let plan = TestConfig::kafka(&brokers)
        .llm(llm.addr())
        .set(
            "state",
            format!(
                "{{kind: redis, url: \"{}\", key_prefix: \"{prefix}\", claim_lease_ms: 1000}}",
                redis_url()
            ),
        )
        .plan();
    let outputs = collector(&brokers);
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    let long = job("long-1", "acme", "a long one");
    publish(&brokers, JOBS_TOPIC, [long.clone()]).await.unwrap();
    eventually(STALL, "the job started", || llm.stats().requests() > 0).await;
    // The second delivery arrives while the first holds the claim, and keeps asking for it
    // well past the lease.
    publish(&brokers, JOBS_TOPIC, [long]).await.unwrap();
    assert_eq!(outputs.wait_for(2, STALL, |_| {}).await, 2);
    service.stop().await;
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let results: Vec<_> = all
        .iter()
        .map(|(c, _)| match c {
            Collected::Result(r) => r,
            other => panic!("expected results, got {other:?}"),
        })
        .collect();
    assert_eq!(
        results.iter().filter(|r| !r.duplicate).count(),
        1,
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|r| r.duplicate).count(),
        1,
        "{results:?}"
    );
    assert!(
        results.iter().all(|r| r.latency_ms >= 2500 || r.duplicate),
        "the job ran past its lease"
    );
    assert_eq!(llm.stats().requests(), 2, "no second run of the job");
}

/// A TCP proxy to NATS that, while `dropping`, swallows what the server sends for pull requests
/// (the JetStream messages they bring, and their heartbeats), as if those deliveries were lost
/// on the way. Everything else passes, frame by frame.
struct LossyNats {
    addr: std::net::SocketAddr,
    dropping: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// JetStream messages swallowed so far.
    dropped: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Pull subscriptions the client opened (`SUB _INBOX.<id>`).
    pulls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _tasks: tokio_util::task::TaskTracker,
}

impl LossyNats {
    async fn to(upstream: &str) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let dropping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let pulls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (flag, count, subs) = (dropping.clone(), dropped.clone(), pulls.clone());
        let (addr, tasks) = proxy(upstream, move |(cr, mut cw), (sr, mut sw)| {
            let (flag, count, subs) = (flag.clone(), count.clone(), subs.clone());
            async move {
                let up = forward_frames(cr, &mut sw, |op| {
                    if op[0] == "SUB" && is_pull_inbox(op[1]) {
                        subs.fetch_add(1, Relaxed);
                    }
                    true
                });
                let down = forward_frames(sr, &mut cw, |op| {
                    // A pull's messages keep their stream subject and carry an ack subject as
                    // reply; its heartbeats and status replies come on the pull's inbox itself.
                    let delivery = op[0] == "MSG" || op[0] == "HMSG";
                    let message = delivery && op.len() > 4 && op[3].starts_with("$JS.ACK.");
                    let lost =
                        (message || (delivery && is_pull_inbox(op[1]))) && flag.load(Relaxed);
                    if lost && message {
                        count.fetch_add(1, Relaxed);
                    }
                    !lost
                });
                tokio::join!(up, down);
            }
        })
        .await;
        Self {
            addr,
            dropping,
            dropped,
            pulls,
            _tasks: tasks,
        }
    }

    fn set_dropping(&self, on: bool) {
        self.dropping
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn dropped(&self) -> usize {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn pulls(&self) -> usize {
        self.pulls.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A pull's own inbox, `_INBOX.<id>` (request replies use `_INBOX.<id>.<token>`).
fn is_pull_inbox(subject: &str) -> bool {
    subject.starts_with("_INBOX.") && subject.matches('.').count() == 1
}

/// Forwards whole NATS protocol frames (a line, plus its payload for `PUB`, `HPUB`, `MSG` and
/// `HMSG`), each only if `keep` says so given the line's tokens.
async fn forward_frames(
    mut from: tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut keep: impl FnMut(&[&str]) -> bool,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..eol]).into_owned();
            let mut op: Vec<&str> = line.split_whitespace().collect();
            if op.is_empty() {
                op.push("");
            }
            let payload = matches!(op[0], "PUB" | "HPUB" | "MSG" | "HMSG");
            let len = if payload {
                eol + 2 + op.last().unwrap().parse::<usize>().unwrap() + 2
            } else {
                eol + 2
            };
            if buf.len() < len {
                break;
            }
            let frame: Vec<u8> = buf.drain(..len).collect();
            if keep(&op) && to.write_all(&frame).await.is_err() {
                return;
            }
        }
        match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_do_not_wait_on_a_jetstream_pull_the_server_no_longer_holds() {
    // The failure: the client counts messages still to come from a pull the server has already
    // answered (its messages were lost on the way, or, on a busy machine, read before async-nats
    // counted the pull as sent). Left alone, the client asks again only at its own fallback,
    // `expires` + 5 s after its last pull (35 s), and jobs wait on a stream
    // that has them.
    let names = NatsNames::new();
    let llm = mock_llm(0).await;
    let upstream = nats_url().trim_start_matches("nats://").to_owned();
    let lossy = LossyNats::to(&upstream).await;
    let via_proxy = format!("nats://{}", lossy.addr);
    let plan = nats_plan(
        &names,
        &llm.addr().to_string(),
        &[("SWITCHYARD__SOURCE__URL", via_proxy.as_str())],
    );
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;
    publish_nats(
        &nats_url(),
        [(names.job_subject("acme"), job("pull-0", "acme", "warm up"))],
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(1, STALL, |_| {}).await, 1, "warm-up job");

    // The rest of the open pull is lost on the way: the server has answered it in full.
    let pulls_before = lossy.pulls();
    lossy.set_dropping(true);
    let lost: Vec<_> = (1..=40)
        .map(|i| {
            (
                names.job_subject("acme"),
                job(&format!("pull-{i}"), "acme", "lost on the way"),
            )
        })
        .collect();
    publish_nats(&nats_url(), lost).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut last = (0, tokio::time::Instant::now());
    while lossy.dropped() == 0 || last.1.elapsed() < Duration::from_millis(500) {
        assert!(started.elapsed() < STALL, "no delivery was dropped");
        if lossy.dropped() != last.0 {
            last = (lossy.dropped(), tokio::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lossy.set_dropping(false);
    let dropped = lossy.dropped();
    let healed = tokio::time::Instant::now();

    // From now on nothing is lost. Every job, the swallowed ones included (JetStream redelivers
    // them after `ack_wait`, 3 s here), is answered within 10 s: the client's own fallback
    // would ask again only 35 s after its last pull, sent before the warm-up job.
    while outputs.len() < 41 && healed.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (seen, waited) = (outputs.len(), healed.elapsed());
    let pulls = lossy.pulls();
    service.stop().await;
    names.delete_streams().await;
    assert!(
        dropped >= 16,
        "a pull's worth of deliveries was lost: {dropped}"
    );
    assert!(
        seen >= 41 && waited < Duration::from_secs(10),
        "every job answered within 10 s of the loss ending; {seen} of 41 after {waited:?}"
    );
    assert!(
        pulls > pulls_before,
        "the pull was started afresh (pull subscriptions {pulls_before} before the loss, {pulls} after)"
    );
    assert_each_job_once(&outputs.snapshot(), 41);
}

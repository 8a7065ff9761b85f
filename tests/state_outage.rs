//! Redis stopped for a few seconds under load: intake pauses and readiness goes false, no job
//! runs without its claim, nothing is lost or processed twice, and processing resumes by itself.
//! Uses a private redis-server on a free port so the shared one is never disturbed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard::state::StateStore;
use switchyard::testkit::{publish, publish_nats, OutputCollector};

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_server(port: u16) -> Child {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (the CI script installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_pauses_intake_loses_nothing_and_recovers_by_itself() {
    let port = free_port();
    let mut redis = redis_server(port);
    let names = NatsNames::new();
    let llm = mock_llm(10).await;
    let url = format!("redis://127.0.0.1:{port}");
    let plan = nats_plan(
        &names,
        &llm.addr().to_string(),
        &[("SWITCHYARD__STATE__URL", &url)],
    );
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;

    let n = 600;
    let messages = (0..n).map(|i| {
        (
            names.job_subject("acme"),
            job(&format!("o-{i}"), "acme", "billing"),
        )
    });
    publish_nats(&nats_url(), messages).await.unwrap();
    outputs
        .wait_for(n / 4, Duration::from_secs(30), |_| {})
        .await;

    redis.kill().unwrap();
    redis.wait().unwrap();
    let down_at = Instant::now();
    // What a load balancer or Kubernetes probe sees: /readyz answers 503 and says why.
    let readyz = format!(
        "http://{}/readyz",
        service.health.http_addr().expect("the HTTP port is bound")
    );
    let http = reqwest::Client::new();
    let (status, body) = loop {
        let response = http.get(&readyz).send().await.unwrap();
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap();
        if status != 200 || down_at.elapsed() > Duration::from_secs(30) {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "readiness reflects the outage: {body}");
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(
        body["state_available"], false,
        "the reason is named: {body}"
    );
    assert_eq!(body["source_connected"], true, "{body}");
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down_at.elapsed())).await;
    let during = outputs.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let progress_while_down = outputs.len() - during;
    let mut redis = redis_server(port);

    let deadline = Instant::now() + Duration::from_secs(60);
    while originals(&outputs.snapshot()).len() < n {
        assert!(
            Instant::now() < deadline,
            "processing resumed by itself and finished every job"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while http.get(&readyz).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "ready again after the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    service.stop().await;
    let _ = redis.kill();
    let _ = redis.wait();

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    assert_no_dead_letters(&all, "a store outage dead-letters nothing");
    let per_job = originals(&all);
    // Messages prefetched before the pause may be redelivered meanwhile; those are answered
    // from the store as duplicates, never processed again.
    eprintln!(
        "{} outputs for {n} jobs ({} replayed duplicates)",
        all.len(),
        all.len() - n
    );
    assert_eq!(per_job.len(), n, "no job lost");
    assert!(per_job.values().all(|&c| c == 1), "no job processed twice");
    assert_eq!(
        llm.stats().requests(),
        2 * n as u64,
        "no provider call repeated"
    );
    assert!(
        progress_while_down <= 64,
        "no new jobs admitted while the store was down ({progress_while_down})"
    );
    names.delete_streams().await;
}

fn nats_server(port: u16, store: &std::path::Path) -> Child {
    let binary = [
        "nats-server",
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
    ]
    .into_iter()
    .find(|b| Command::new(b).arg("--version").output().is_ok())
    .expect("nats-server must be installed (the test script installs it)");
    let child = Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Every output message on the outputs stream, read back with a consumer of its own.
async fn stream_outputs(url: &str, stream: &str) -> Vec<serde_json::Value> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    use futures::StreamExt as _;
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    // Just after a restart the server may still be loading its streams.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match js.get_stream(stream).await {
            Ok(found) => break found,
            Err(e) => assert!(Instant::now() < deadline, "outputs stream: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let count = stream.info().await.unwrap().state.messages as usize;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut outputs = Vec::new();
    while outputs.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the outputs stream is readable")
            .unwrap()
            .unwrap();
        outputs.push(serde_json::from_slice(&message.payload).unwrap());
    }
    outputs
}

/// The NATS server (source and sink) killed mid-stream and started again on its own store a few
/// seconds later: the service reconnects by itself, and every job ends with exactly one result on
/// the outputs stream, none dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_outage_loses_nothing_and_the_service_reconnects_by_itself() {
    let port = free_port();
    let store = tempfile::tempdir().unwrap();
    let mut nats = nats_server(port, store.path());
    let url = format!("nats://127.0.0.1:{port}");
    let names = NatsNames::new();
    let llm = mock_llm(10).await;
    let plan = nats_plan(
        &names,
        &llm.addr().to_string(),
        &[("SWITCHYARD__SOURCE__URL", &url)],
    );
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;
    let n = 400;
    let messages = (0..n).map(|i| {
        (
            names.job_subject("acme"),
            job(&format!("o-{i}"), "acme", &format!("order {i} is late")),
        )
    });
    publish_nats(&url, messages).await.unwrap();
    eventually(Duration::from_secs(30), "processing started", || {
        llm.stats().requests() >= n as u64 / 2
    })
    .await;
    nats.kill().unwrap();
    nats.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut nats = nats_server(port, store.path());

    // Done when every job has an output on the outputs stream (read back from the stream
    // itself: a subscriber would miss what was written while it reconnected).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answered: std::collections::HashSet<String> =
            stream_outputs(&url, &names.outputs_stream)
                .await
                .iter()
                .filter_map(|o| o["job_id"].as_str().map(str::to_owned))
                .collect();
        if answered.len() >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} jobs answered 60 s after the server came back",
            answered.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    service.stop().await;
    let outputs = stream_outputs(&url, &names.outputs_stream).await;
    let _ = nats.kill();
    let _ = nats.wait();

    // Per job: its outputs, and how many of them are originals (not replays). A server killed
    // with SIGKILL may lose the writes it confirmed last (JetStream flushes its file store
    // asynchronously); a job whose original was lost that way was redelivered too (its ack
    // went with it) and is answered by its replay from Redis.
    let mut per_job: std::collections::HashMap<String, (usize, usize)> = Default::default();
    for output in &outputs {
        assert!(output.get("reason").is_none(), "no dead letter: {output}");
        let entry = per_job
            .entry(output["job_id"].as_str().unwrap().to_owned())
            .or_default();
        entry.0 += 1;
        if output["duplicate"] != true {
            entry.1 += 1;
        }
    }
    let missing_original = per_job
        .values()
        .filter(|(_, originals)| *originals == 0)
        .count();
    eprintln!(
        "{n} jobs: {} outputs stored; {missing_original} answered by a replay only",
        outputs.len()
    );
    assert_eq!(
        per_job.len(),
        n,
        "every job has an answer on the outputs stream"
    );
    assert!(
        per_job.values().all(|&(_, originals)| originals <= 1),
        "no job answered twice"
    );
}

/// The same Redis outage under a Kafka source (memory-free Redis state on a private server):
/// intake pauses, readiness fails, and afterwards every job has exactly one result and no
/// provider call was repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_under_kafka_loses_nothing_and_recovers_by_itself() {
    let port = free_port();
    let mut redis = redis_server(port);
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(50).await;
    let plan = TestConfig::kafka(&brokers)
        .llm(llm.addr())
        .set(
            "state",
            format!("{{kind: redis, url: \"redis://127.0.0.1:{port}\", key_prefix: \"k:\", claim_lease_ms: 3000}}"),
        )
        .plan();
    let outputs = collector(&brokers);
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;
    let n = 400;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| job(&format!("k-{i}"), "acme", &format!("billing {i}"))),
    )
    .await
    .unwrap();
    // Mid-stream: about a quarter of the jobs have made both their calls.
    eventually(Duration::from_secs(30), "processing started", || {
        llm.stats().requests() >= n as u64 / 2
    })
    .await;
    redis.kill().unwrap();
    redis.wait().unwrap();
    let down_at = Instant::now();
    eventually(
        Duration::from_secs(30),
        "readiness reflects the outage",
        || !service.health.is_ready(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down_at.elapsed())).await;
    let mut redis = redis_server(port);
    eventually(
        Duration::from_secs(60),
        "processing resumed by itself and finished every job",
        || originals(&outputs.snapshot()).len() >= n,
    )
    .await;
    // Listen a little longer: a late second answer would show up now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    service.stop().await;
    let _ = redis.kill();
    let _ = redis.wait();

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    assert_no_dead_letters(&all, "a store outage dead-letters nothing");
    let per_job = originals(&all);
    assert_eq!(per_job.len(), n, "no job lost");
    assert!(per_job.values().all(|&c| c == 1), "no job processed twice");
    assert_eq!(
        llm.stats().requests(),
        2 * n as u64,
        "no provider call repeated"
    );
}

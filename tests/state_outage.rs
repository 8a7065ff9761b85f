//! Redis stopped for a few seconds under load: intake pauses and readiness goes false, no job
//! runs without its claim, nothing is lost or processed twice, and processing resumes by itself.
//! Uses a private redis-server on a free port so the shared one is never disturbed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard::state::StateStore;
use switchyard::testkit::{publish_nats, Collected, OutputCollector};

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
    let dead: Vec<_> = all
        .iter()
        .filter(|(c, _)| !matches!(c, Collected::Result(_) | Collected::Review(_)))
        .collect();
    assert!(
        dead.is_empty(),
        "a store outage dead-letters nothing: {dead:?}"
    );
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

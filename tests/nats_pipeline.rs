//! NATS JetStream in and out with the Redis state store, against the real servers
//! (NATS_URL, REDIS_URL; default 127.0.0.1 standard ports).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use switchyard::state::StateStore;
use switchyard::testkit::{publish_nats, Collected, OutputCollector};
use switchyard::wire::DeadLetterReason;

use common::*;

const STALL: Duration = Duration::from_secs(30);

async fn redis_state(plan: &switchyard::config::Plan) -> StateStore {
    StateStore::open(&plan.state)
        .await
        .expect("Redis must be running at REDIS_URL")
}

/// Pending and unacknowledged messages left on the durable consumer.
async fn consumer_backlog(names: &NatsNames) -> (u64, usize) {
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(&names.jobs_stream).await.unwrap();
    let info = stream.consumer_info("switchyard").await.unwrap();
    (info.num_pending, info.num_ack_pending)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_jobs_get_one_result_each_and_malformed_messages_are_dead_lettered() {
    let names = NatsNames::new();
    let llm = mock_llm(2).await;
    let plan = nats_plan(&names, &llm.addr().to_string(), &[]);
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan.clone(), redis_state(&plan).await);
    service.wait_ready().await;

    let n = 150;
    let tenants = ["acme", "globex", "initech"];
    let mut messages: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let tenant = tenants[i % 3];
            (
                names.job_subject(tenant),
                job(&format!("n-{i}"), tenant, "my billing is wrong"),
            )
        })
        .collect();
    let malformed: Vec<Vec<u8>> = vec![
        b"not json at all".to_vec(),
        vec![0xff, 0xfe, 0xfd],
        br#"{"id":"m-1","input":{"text":"no tenant"}}"#.to_vec(),
        br#"{"id":"m-2","tenant":"acme","input":{"text":"x"},"ttl_ms":"soon"}"#.to_vec(),
    ];
    for payload in &malformed {
        messages.push((names.job_subject("acme"), payload.clone()));
    }
    let total = messages.len();
    publish_nats(&nats_url(), messages).await.unwrap();
    assert_eq!(outputs.wait_for(total, STALL, |_| {}).await, total);
    tokio::time::sleep(Duration::from_millis(300)).await;
    service.stop().await;

    let all = outputs.snapshot();
    assert_eq!(all.len(), total, "one output per message");
    assert_schema_valid(&all);
    let mut per_job: HashMap<String, usize> = HashMap::new();
    let mut dead = 0;
    for (c, _) in &all {
        match c {
            Collected::Result(r) | Collected::Review(r) => {
                *per_job.entry(r.job_id.clone()).or_default() += 1
            }
            Collected::DeadLetter(d) => {
                dead += 1;
                assert_eq!(d.reason, DeadLetterReason::InvalidJob);
                assert_eq!(d.source.transport, "nats");
                assert!(d.source.stream_seq.is_some());
            }
            Collected::Unreadable { .. } => panic!("unreadable output"),
        }
    }
    assert_eq!(dead, malformed.len());
    assert_eq!(per_job.len(), n);
    assert!(per_job.values().all(|&c| c == 1));
    assert_eq!(llm.stats().requests(), 2 * n as u64);
    assert_eq!(
        consumer_backlog(&names).await,
        (0, 0),
        "every message acked (or terminated)"
    );
    names.delete_streams().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_published_three_times_with_one_key_calls_the_provider_once() {
    let names = NatsNames::new();
    let llm = mock_llm(2).await;
    let plan = nats_plan(&names, &llm.addr().to_string(), &[]);
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan.clone(), redis_state(&plan).await);
    service.wait_ready().await;

    let payload = job("t-4821", "acme", "I was charged twice for order #4821");
    for _ in 0..3 {
        publish_nats(&nats_url(), [(names.job_subject("acme"), payload.clone())])
            .await
            .unwrap();
    }
    assert_eq!(outputs.wait_for(3, STALL, |_| {}).await, 3);
    service.stop().await;

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let dup: Vec<bool> = all
        .iter()
        .map(|(c, _)| match c {
            Collected::Result(r) | Collected::Review(r) => r.duplicate,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        dup.iter().filter(|d| !**d).count(),
        1,
        "one original result"
    );
    assert_eq!(
        dup.iter().filter(|d| **d).count(),
        2,
        "two replays from Redis"
    );
    assert_eq!(
        llm.stats().requests(),
        2,
        "one classify and one generate call in all"
    );
    names.delete_streams().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tenant_queue_naks_with_a_delay_so_other_tenants_keep_flowing() {
    let names = NatsNames::new();
    let llm = mock_llm(2).await;
    // 16 in flight; the noisy tenant may queue 4 and is admitted at 10/s.
    let plan = nats_plan(
        &names,
        &llm.addr().to_string(),
        &[
            ("SWITCHYARD__SOURCE__MAX_DELIVER", "-1"),
            ("SWITCHYARD__LIMITS__MAX_INFLIGHT_JOBS", "16"),
            ("SWITCHYARD__TENANTS", "{noisy: {rps: 10, max_queued: 4}}"),
        ],
    );
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan.clone(), redis_state(&plan).await);
    service.wait_ready().await;
    let (noisy, quiet) = (60, 20);
    let mut messages: Vec<(String, Vec<u8>)> = (0..noisy)
        .map(|i| {
            (
                names.job_subject("noisy"),
                job(&format!("nz-{i}"), "noisy", "refund"),
            )
        })
        .collect();
    messages.extend((0..quiet).map(|i| {
        (
            names.job_subject("quiet"),
            job(&format!("qt-{i}"), "quiet", "hello"),
        )
    }));
    publish_nats(&nats_url(), messages).await.unwrap();
    assert_eq!(
        outputs.wait_for(noisy + quiet, STALL, |_| {}).await,
        noisy + quiet
    );
    service.stop().await;
    names.delete_streams().await;

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let per_job = originals(&all);
    assert_eq!(per_job.len(), noisy + quiet, "no job lost");
    assert!(per_job.values().all(|&c| c == 1), "no job finished twice");
    let finished = |tenant: &str| -> Vec<chrono::DateTime<chrono::Utc>> {
        all.iter()
            .filter_map(|(c, _)| match c {
                Collected::Result(r) | Collected::Review(r) if r.tenant == tenant => {
                    Some(r.completed_at)
                }
                _ => None,
            })
            .collect()
    };
    let last_quiet = finished("quiet").into_iter().max().unwrap();
    let last_noisy = finished("noisy").into_iter().max().unwrap();
    eprintln!(
        "last quiet job done {} ms before the last noisy one",
        (last_noisy - last_quiet).num_milliseconds()
    );
    assert!(
        last_noisy - last_quiet > chrono::Duration::seconds(2),
        "the quiet tenant was not held behind the noisy one's backlog"
    );
}

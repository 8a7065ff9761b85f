//! The review round trip through NATS JetStream and Redis: review requests come back as
//! decisions (approve, edit, reject) on the decisions subject and become the job's result or a
//! `review_rejected` dead letter; the same decision twice gives one result; a decision for an
//! unknown, already-decided or other tenant's review is refused with a dead letter that says
//! why; reviews past their deadline take their default (approve, reject, rerun on a larger
//! model); pending reviews survive a restart and `switchyard reviews` lists them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use switchyard::state::StateStore;
use switchyard::testkit::{publish_nats, Collected, OutputCollector};
use switchyard::wire::{DeadLetter, JobResult};

use common::*;

const STALL: Duration = Duration::from_secs(60);

/// A generate step on `small`; jobs with `input.review: true` go to review.
fn config(names: &NatsNames, llm: std::net::SocketAddr, review: &str) -> TestConfig {
    TestConfig::nats(names)
        .llm(llm)
        .set("prompts", "plain: {user: \"{{input.text}}\"}")
        .set(
            "pipelines",
            format!(
                "support:
    steps:
      - {{name: answer, kind: generate, model: small, prompt: plain}}
    review: {review}"
            ),
        )
}

fn job(names: &NatsNames, id: &str, tenant: &str) -> (String, Vec<u8>) {
    let job = json!({"id": id, "tenant": tenant, "pipeline": "support",
                     "input": {"text": format!("Please look at {id}"), "review": true}});
    (names.job_subject(tenant), job.to_string().into_bytes())
}

fn decision(names: &NatsNames, tenant: &str, body: Value) -> (String, Vec<u8>) {
    (
        names.decision_subject(tenant),
        body.to_string().into_bytes(),
    )
}

/// The review request of job `id`.
fn request_of<'a>(outputs: &'a [(Collected, Value)], id: &str) -> &'a JobResult {
    outputs
        .iter()
        .find_map(|(c, _)| match c {
            Collected::Review(r) if r.job_id == id && !r.duplicate => Some(r),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no review request for {id}: {outputs:#?}"))
}

/// The final (non-review) results of job `id`.
fn finals<'a>(outputs: &'a [(Collected, Value)], id: &str) -> Vec<&'a JobResult> {
    outputs
        .iter()
        .filter_map(|(c, _)| match c {
            Collected::Result(r) if r.job_id == id && !r.duplicate => Some(r),
            _ => None,
        })
        .collect()
}

fn refusals(outputs: &[(Collected, Value)]) -> Vec<&DeadLetter> {
    outputs
        .iter()
        .filter_map(|(c, _)| match c {
            Collected::DeadLetter(d) if d.reason.as_str() == "decision_refused" => Some(d),
            _ => None,
        })
        .collect()
}

fn pending(service: &Service, tenant: &str) -> i64 {
    service
        .metrics
        .reviews_pending
        .with_label_values(&[tenant])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_become_results_or_rejections_once_and_bad_ones_are_refused() {
    let names = NatsNames::new();
    let llm = mock_llm(0).await;
    let plan = config(&names, llm.addr(), "{when: 'input.review == true'}").plan();
    let collector = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;
    let ids = ["approve", "edit", "reject", "twice", "other"];
    publish_nats(&nats_url(), ids.iter().map(|id| job(&names, id, "acme")))
        .await
        .unwrap();
    assert_eq!(
        collector.wait_for(ids.len(), STALL, |_| {}).await,
        ids.len()
    );
    let requests = collector.snapshot();
    let review = |id: &str| request_of(&requests, id).review.clone().unwrap();
    for id in ids {
        let request = request_of(&requests, id);
        let review = request.review.as_ref().unwrap();
        assert!(review.id.starts_with("rv-"));
        assert_eq!(
            review.input["review"],
            json!(true),
            "the reviewer sees the input"
        );
        assert!(request
            .review_reason
            .as_deref()
            .unwrap()
            .contains("review.when"));
    }
    eventually(Duration::from_secs(10), "5 reviews pending", || {
        pending(&service, "other") == 5
    })
    .await;

    let approve = |id: &str, who: &str| json!({"review_id": review(id).id, "decision": "approve", "reviewer": who});
    let decisions = vec![
        decision(&names, "acme", approve("approve", "ana")),
        decision(
            &names,
            "acme",
            json!({"review_id": review("edit").id, "decision": "edit", "reviewer": "bo", "output": {"answer": "edited by bo"}}),
        ),
        decision(
            &names,
            "acme",
            json!({"review_id": review("reject").id, "decision": "reject", "reviewer": "cy", "reason": "cites a policy we retired"}),
        ),
        decision(&names, "acme", approve("twice", "ana")),
        decision(&names, "acme", approve("twice", "ana")),
        // Another tenant's reviewer cannot decide acme's review (nor learn it exists).
        decision(&names, "globex", approve("other", "mallory")),
        decision(
            &names,
            "acme",
            json!({"review_id": "rv-00000000000000000000000000000000", "decision": "approve", "reviewer": "ana"}),
        ),
        decision(
            &names,
            "acme",
            json!({"review_id": review("edit").id, "decision": "maybe", "reviewer": "ana"}),
        ),
    ];
    publish_nats(&nats_url(), decisions).await.unwrap();
    // approve, edit, reject, twice: 4 outputs; globex, unknown, malformed: 3 refusals.
    assert_eq!(collector.wait_for(5 + 7, STALL, |_| {}).await, 12);
    // A different decision for the decided review: refused, saying what was decided.
    publish_nats(
        &nats_url(),
        [decision(&names, "acme", json!({"review_id": review("twice").id, "decision": "reject", "reviewer": "dee", "reason": "late"}))],
    )
    .await
    .unwrap();
    assert_eq!(collector.wait_for(13, STALL, |_| {}).await, 13);
    // Another tenant repeating acme's decision word for word learns nothing (not even that
    // it was decided); the job published again replays its final result.
    publish_nats(
        &nats_url(),
        [
            decision(&names, "globex", approve("twice", "ana")),
            job(&names, "approve", "acme"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(collector.wait_for(15, STALL, |_| {}).await, 15);
    // The review globex could not touch is still pending for acme.
    publish_nats(
        &nats_url(),
        [decision(&names, "acme", approve("other", "ana"))],
    )
    .await
    .unwrap();
    assert_eq!(collector.wait_for(16, STALL, |_| {}).await, 16);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outputs = collector.snapshot();

    let approved = finals(&outputs, "approve");
    assert_eq!(approved.len(), 1);
    let (r, proposed) = (approved[0], request_of(&outputs, "approve"));
    assert_eq!(r.status.as_str(), "ok");
    assert_eq!(
        r.output, proposed.output,
        "the proposed output became the result"
    );
    assert!(r.review.is_none());
    let reviewed = r.reviewed.as_ref().unwrap();
    assert_eq!(
        (
            reviewed.decision.as_str(),
            reviewed.by.as_str(),
            reviewed.expired
        ),
        ("approve", "ana", false)
    );
    assert_eq!(reviewed.review_id, review("approve").id);
    let replay = outputs
        .iter()
        .find_map(|(c, _)| match c {
            Collected::Result(r) if r.job_id == "approve" && r.duplicate => Some(r),
            _ => None,
        })
        .expect("the republished job is replayed");
    assert!(
        replay.reviewed.is_some(),
        "the replay is the decided result, not the request"
    );

    let edited = finals(&outputs, "edit");
    assert_eq!(edited.len(), 1);
    assert_eq!(edited[0].output, json!({"answer": "edited by bo"}));
    assert_eq!(edited[0].reviewed.as_ref().unwrap().by, "bo");

    let rejected = dead_letter_of(&outputs, "reject");
    assert_eq!(rejected.reason.as_str(), "review_rejected");
    assert!(
        rejected.error.contains("cy") && rejected.error.contains("cites a policy we retired"),
        "{}",
        rejected.error
    );
    assert!(
        rejected.payload.contains("Please look at reject"),
        "the job can be republished from it"
    );
    assert!(finals(&outputs, "reject").is_empty());

    assert_eq!(
        finals(&outputs, "twice").len(),
        1,
        "the same decision twice is one result"
    );
    assert_eq!(finals(&outputs, "other").len(), 1);
    assert_eq!(
        finals(&outputs, "other")[0].reviewed.as_ref().unwrap().by,
        "ana"
    );

    let refused = refusals(&outputs);
    assert_eq!(refused.len(), 5, "{refused:#?}");
    let says = |what: &str| refused.iter().filter(|d| d.error.contains(what)).count();
    assert_eq!(
        says("there is no pending review"),
        3,
        "unknown id and another tenant's review: {refused:#?}"
    );
    assert!(refused
        .iter()
        .any(|d| d.tenant.as_deref() == Some("globex") && d.error.contains("for tenant `globex`")));
    assert_eq!(
        says("was already decided: ana decided `approve`"),
        1,
        "{refused:#?}"
    );
    assert_eq!(says("not a review decision"), 1, "{refused:#?}");
    assert!(
        refused.iter().all(|d| d.payload.contains("review_id")),
        "the decision travels with its refusal"
    );
    assert_schema_valid(&outputs);

    let m = &service.metrics.review_decisions;
    let count = |d: &str| m.with_label_values(&[d]).get();
    assert_eq!(
        (
            count("approve"),
            count("edit"),
            count("reject"),
            count("duplicate"),
            count("refused")
        ),
        (3, 1, 1, 1, 5)
    );
    eventually(Duration::from_secs(10), "no review pending", || {
        pending(&service, "other") == 0
    })
    .await;
    service.stop().await;
    collector.stop().await;
    names.delete_streams().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_past_their_deadline_take_their_default() {
    let names = NatsNames::new();
    let llm = mock_llm(0).await;
    let pipeline = |name: &str, review: &str| {
        format!(
            "{name}:
    steps:
      - {{name: answer, kind: generate, model: small, prompt: plain}}
    review: {review}"
        )
    };
    let plan = config(&names, llm.addr(), "{}")
        .set(
            "pipelines",
            [
                pipeline("approves", "{when: 'input.review == true', timeout_s: 1, on_timeout: approve}"),
                pipeline("rejects", "{when: 'input.review == true', timeout_s: 1}"),
                pipeline("reruns", "{when: 'input.review == true', timeout_s: 1, on_timeout: rerun, rerun_model: large}"),
            ]
            .join("\n  "),
        )
        .set("reviews", format!("{{decisions: {}.decisions, expire_every_ms: 100}}", names.prefix))
        .plan();
    let collector = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;
    let jobs = ["approves", "rejects", "reruns"].map(|pipeline| {
        let job = json!({"id": pipeline, "tenant": "acme", "pipeline": pipeline,
                         "input": {"text": "Is this right?", "review": true}});
        (names.job_subject("acme"), job.to_string().into_bytes())
    });
    publish_nats(&nats_url(), jobs).await.unwrap();
    // Three review requests, then three settled outcomes.
    assert_eq!(collector.wait_for(6, STALL, |_| {}).await, 6);
    // A decision after the deadline passed is refused: the review took its default.
    let late = request_of(&collector.snapshot(), "approves")
        .review
        .clone()
        .unwrap()
        .id;
    publish_nats(
        &nats_url(),
        [decision(&names, "acme", json!({"review_id": late, "decision": "reject", "reviewer": "ana", "reason": "too late"}))],
    )
    .await
    .unwrap();
    assert_eq!(collector.wait_for(7, STALL, |_| {}).await, 7);
    let outputs = collector.snapshot();

    let approved = finals(&outputs, "approves");
    assert_eq!(approved.len(), 1);
    let reviewed = approved[0].reviewed.as_ref().unwrap();
    assert_eq!(
        (
            reviewed.decision.as_str(),
            reviewed.by.as_str(),
            reviewed.expired
        ),
        ("approve", "timeout", true)
    );
    assert_eq!(approved[0].output, request_of(&outputs, "approves").output);
    let review = request_of(&outputs, "approves").review.clone().unwrap();
    assert!(
        reviewed.at >= review.deadline,
        "settled at or after its deadline"
    );

    let rejected = dead_letter_of(&outputs, "rejects");
    assert_eq!(rejected.reason.as_str(), "review_rejected");
    assert!(
        rejected.error.contains("no decision by its deadline"),
        "{}",
        rejected.error
    );

    let rerun = finals(&outputs, "reruns");
    assert_eq!(rerun.len(), 1);
    let r = rerun[0];
    assert_eq!(r.reviewed.as_ref().unwrap().decision, "rerun");
    let models: Vec<_> = r.steps.iter().filter_map(|s| s.model.as_deref()).collect();
    assert_eq!(
        models,
        ["gpt-4o-mini", "gpt-4o"],
        "the proposal's call, then the re-run on the larger model: {:#?}",
        r.steps
    );
    assert!(
        r.usage.cost_usd > request_of(&outputs, "reruns").usage.cost_usd,
        "the re-run's cost is counted"
    );

    let refused = refusals(&outputs);
    assert_eq!(refused.len(), 1);
    assert!(
        refused[0]
            .error
            .contains("its deadline passed and it took its default (approve)"),
        "{}",
        refused[0].error
    );
    let m = &service.metrics.review_decisions;
    for label in ["expired_approve", "expired_reject", "expired_rerun"] {
        assert_eq!(m.with_label_values(&[label]).get(), 1, "{label}");
    }
    assert_schema_valid(&outputs);
    service.stop().await;
    collector.stop().await;
    names.delete_streams().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_reviews_survive_a_restart_and_are_listed() {
    let names = NatsNames::new();
    let llm = mock_llm(0).await;
    let config = config(&names, llm.addr(), "{when: 'input.review == true'}");
    let plan = config.plan();
    let collector = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let first = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    first.wait_ready().await;
    let n = 20;
    let ids: Vec<String> = (0..n).map(|i| format!("p-{i}")).collect();
    publish_nats(&nats_url(), ids.iter().map(|id| job(&names, id, "acme")))
        .await
        .unwrap();
    assert_eq!(collector.wait_for(n, STALL, |_| {}).await, n);
    first.stop().await;

    // Listed from the state store with no service running.
    let dir = tempfile::tempdir().unwrap();
    let file = config.write(dir.path(), "reviews.yaml");
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["reviews", "--json", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n, "every pending review is listed");
    assert!(lines
        .iter()
        .all(|l| l["tenant"] == "acme" && l["pipeline"] == "support"));

    // A new service instance takes the decisions.
    let second = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    second.wait_ready().await;
    let requests = collector.snapshot();
    let decisions = ids.iter().map(|id| {
        let review = request_of(&requests, id).review.clone().unwrap();
        decision(
            &names,
            "acme",
            json!({"review_id": review.id, "decision": "approve", "reviewer": "ana"}),
        )
    });
    publish_nats(&nats_url(), decisions).await.unwrap();
    assert_eq!(collector.wait_for(2 * n, STALL, |_| {}).await, 2 * n);
    let outputs = collector.snapshot();
    for id in &ids {
        assert_eq!(
            finals(&outputs, id).len(),
            1,
            "{id} got its result after the restart"
        );
    }
    assert!(refusals(&outputs).is_empty());
    second.stop().await;
    collector.stop().await;
    names.delete_streams().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_before_generate_spends_nothing_on_generation_until_approved() {
    let names = NatsNames::new();
    let llm = mock_llm(0).await;
    let plan = config(&names, llm.addr(), "before_generate")
        .set(
            "pipelines",
            "support:
    steps:
      - {name: summary, kind: template, template: \"Ticket: {{input.text}}\"}
      - {name: answer, kind: generate, model: small, prompt: plain}
    review: before_generate",
        )
        .plan();
    let collector = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;
    let ids = ["g-approve", "g-edit", "g-reject"];
    publish_nats(&nats_url(), ids.iter().map(|id| job(&names, id, "acme")))
        .await
        .unwrap();
    assert_eq!(collector.wait_for(3, STALL, |_| {}).await, 3);
    let requests = collector.snapshot();
    for id in ids {
        let request = request_of(&requests, id);
        assert!(request
            .review_reason
            .as_deref()
            .unwrap()
            .contains("before generation"));
        assert_eq!(request.output, Value::Null, "nothing generated yet");
        assert!(
            request.steps.iter().all(|s| s.name != "answer"),
            "{:#?}",
            request.steps
        );
        assert_eq!(request.usage.cost_usd, 0.0, "nothing spent yet");
    }
    let id_of = |id: &str| request_of(&requests, id).review.clone().unwrap().id;
    publish_nats(
        &nats_url(),
        [
            decision(&names, "acme", json!({"review_id": id_of("g-approve"), "decision": "approve", "reviewer": "ana"})),
            decision(&names, "acme", json!({"review_id": id_of("g-edit"), "decision": "edit", "reviewer": "ana", "output": "Written by hand"})),
            decision(&names, "acme", json!({"review_id": id_of("g-reject"), "decision": "reject", "reviewer": "ana", "reason": "not worth a model call"})),
        ],
    )
    .await
    .unwrap();
    assert_eq!(collector.wait_for(6, STALL, |_| {}).await, 6);
    let outputs = collector.snapshot();
    let approved = finals(&outputs, "g-approve");
    assert_eq!(approved.len(), 1);
    let answer = step_of(approved[0], "answer");
    assert!(
        answer.cost_usd > 0.0 && answer.output.is_some(),
        "generated once approved: {answer:#?}"
    );
    assert!(approved[0].output.as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(
        approved[0]
            .steps
            .iter()
            .filter(|s| s.name == "summary")
            .count(),
        1,
        "the held steps did not run again"
    );
    let edited = finals(&outputs, "g-edit");
    assert_eq!(edited[0].output, json!("Written by hand"));
    assert!(
        edited[0].steps.iter().all(|s| s.name != "answer"),
        "an edit needs no generation"
    );
    assert_eq!(
        dead_letter_of(&outputs, "g-reject").reason.as_str(),
        "review_rejected"
    );
    assert_schema_valid(&outputs);
    service.stop().await;
    collector.stop().await;
    names.delete_streams().await;
}

/// The same round trip over Kafka: decisions on `switchyard.decisions` name their tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_come_back_over_kafka_too() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(0).await;
    let plan = TestConfig::kafka(&brokers)
        .llm(llm.addr())
        .set("prompts", "plain: {user: \"{{input.text}}\"}")
        .set(
            "pipelines",
            "support:
    steps:
      - {name: answer, kind: generate, model: small, prompt: plain}
    review: {when: 'input.review == true'}",
        )
        .plan();
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    service.wait_ready().await;
    let job = |id: &str| {
        json!({"id": id, "tenant": "acme", "input": {"text": "Refund?", "review": true}})
            .to_string()
            .into_bytes()
    };
    switchyard::testkit::publish(&brokers, JOBS_TOPIC, [job("k-1"), job("k-2")])
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(2, STALL, |_| {}).await, 2);
    let requests = outputs.snapshot();
    let id_of = |id: &str| request_of(&requests, id).review.clone().unwrap().id;
    let decisions = [
        json!({"review_id": id_of("k-1"), "decision": "approve", "reviewer": "ana", "tenant": "acme"}),
        json!({"review_id": id_of("k-2"), "decision": "approve", "reviewer": "ana"}),
    ];
    switchyard::testkit::publish(
        &brokers,
        "switchyard.decisions",
        decisions.map(|d| d.to_string().into_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(4, STALL, |_| {}).await, 4);
    let all = outputs.snapshot();
    assert_eq!(finals(&all, "k-1").len(), 1);
    assert!(finals(&all, "k-2").is_empty());
    let refused = refusals(&all);
    assert!(
        refused.len() == 1 && refused[0].error.contains("names no tenant"),
        "{refused:#?}"
    );
    assert_schema_valid(&all);
    service.stop().await;
}

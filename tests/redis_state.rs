//! The Redis state store against the real server: claims are exclusive across replicas, leases
//! expire and can be taken over, outcomes are replayed, and tenants never share keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use switchyard::state::{Claim, RedisStore, Renewal};

async fn store(prefix: &str) -> RedisStore {
    RedisStore::connect(&common::redis_url(), prefix, Duration::from_secs(2))
        .await
        .expect("Redis must be running at REDIS_URL (default redis://127.0.0.1:6379)")
}

fn prefix() -> String {
    format!("it{:x}:", rand::random::<u64>())
}

#[tokio::test]
async fn only_one_replica_wins_a_claim_and_the_outcome_is_replayed() {
    let p = prefix();
    let replicas = [store(&p).await, store(&p).await, store(&p).await];
    let lease = Duration::from_secs(10);
    let claims = futures::future::join_all((0..30).map(|i| {
        let r = replicas[i % 3].clone();
        async move { r.claim("acme/k1", lease).await.unwrap() }
    }))
    .await;
    let winners: Vec<_> = claims
        .iter()
        .filter(|c| matches!(c, Claim::Acquired(_)))
        .collect();
    assert_eq!(winners.len(), 1, "exactly one claim wins: {claims:?}");
    assert!(claims
        .iter()
        .all(|c| matches!(c, Claim::Acquired(_) | Claim::Busy)));

    let Some(Claim::Acquired(winner)) = winners.first().copied() else {
        panic!("a winner")
    };
    assert!(replicas[1]
        .complete(
            "acme/k1",
            winner,
            Bytes::from_static(b"{\"stored\":true}"),
            Duration::from_secs(60),
        )
        .await
        .unwrap());
    assert_eq!(
        replicas[2].claim("acme/k1", lease).await.unwrap(),
        Claim::Done(Bytes::from_static(b"{\"stored\":true}"))
    );
}

#[tokio::test]
async fn a_crashed_workers_lease_expires_and_is_taken_over_but_a_renewed_one_is_not() {
    let p = prefix();
    let (a, b) = (store(&p).await, store(&p).await);
    let Claim::Acquired(_crashed) = a
        .claim("t/crash", Duration::from_millis(300))
        .await
        .unwrap()
    else {
        panic!("claim")
    };
    let Claim::Acquired(alive) = a
        .claim("t/alive", Duration::from_millis(300))
        .await
        .unwrap()
    else {
        panic!("claim")
    };
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            a.renew("t/alive", &alive, Duration::from_millis(300))
                .await
                .unwrap(),
            Renewal::Held
        );
    }
    assert!(
        matches!(
            b.claim("t/crash", Duration::from_secs(5)).await.unwrap(),
            Claim::Acquired(_)
        ),
        "expired lease is taken over"
    );
    assert_eq!(
        b.claim("t/alive", Duration::from_secs(5)).await.unwrap(),
        Claim::Busy,
        "a renewed lease holds"
    );
    assert_eq!(
        b.renew(
            "t/alive",
            &switchyard_token_from_claim(&b).await,
            Duration::from_secs(1)
        )
        .await
        .unwrap(),
        Renewal::Lost,
        "a stranger cannot renew"
    );
}

/// A token that owns nothing (claims a throwaway key).
async fn switchyard_token_from_claim(s: &RedisStore) -> switchyard::state::ClaimToken {
    match s
        .claim(
            &format!("t/throwaway-{}", rand::random::<u32>()),
            Duration::from_secs(1),
        )
        .await
        .unwrap()
    {
        Claim::Acquired(t) => t,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn release_gives_the_key_back_only_for_its_owner() {
    let p = prefix();
    let s = store(&p).await;
    let Claim::Acquired(owner) = s.claim("t/r", Duration::from_secs(10)).await.unwrap() else {
        panic!("claim")
    };
    let stranger = switchyard_token_from_claim(&s).await;
    s.release("t/r", &stranger).await.unwrap();
    assert_eq!(
        s.claim("t/r", Duration::from_secs(10)).await.unwrap(),
        Claim::Busy
    );
    s.release("t/r", &owner).await.unwrap();
    assert!(matches!(
        s.claim("t/r", Duration::from_secs(10)).await.unwrap(),
        Claim::Acquired(_)
    ));
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_not_a_hang() {
    let result = RedisStore::connect("redis://127.0.0.1:1", "x:", Duration::from_millis(500)).await;
    assert!(result.is_err(), "a refused connection fails start-up");
}

/// A server that accepts the connection and never answers (a half-dead node, a blackholed
/// proxy): the response timeout, not a refusal, is what ends each operation.
#[tokio::test]
async fn a_redis_that_accepts_and_never_answers_times_out_instead_of_hanging() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio_util::task::TaskTracker::new().spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let timeout = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        match RedisStore::connect(&format!("redis://{addr}"), "x:", timeout).await {
            Err(e) => Err(e.to_string()),
            Ok(store) => store
                .claim("t/silent", Duration::from_secs(10))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    })
    .await
    .expect("the store gave up on a silent server instead of hanging");
    assert!(outcome.is_err(), "a silent server is an error");
    assert!(
        started.elapsed() >= timeout,
        "it waited for the response timeout (a refusal would fail at once): {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_claim_whose_key_vanished_is_renewed_back_but_one_taken_over_is_lost() {
    let p = prefix();
    let (a, b) = (store(&p).await, store(&p).await);
    let Claim::Acquired(token) = a.claim("t/v", Duration::from_secs(10)).await.unwrap() else {
        panic!("claim")
    };
    // Redis restarted without persistence: the key is gone.
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{p}idem:t/v"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        a.renew("t/v", &token, Duration::from_secs(10))
            .await
            .unwrap(),
        Renewal::Held,
        "the owner re-establishes its claim"
    );
    assert_eq!(
        b.claim("t/v", Duration::from_secs(10)).await.unwrap(),
        Claim::Busy
    );
    // Expired and taken over: the old owner learns it lost the claim.
    let Claim::Acquired(old) = a.claim("t/w", Duration::from_millis(100)).await.unwrap() else {
        panic!("claim")
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(matches!(
        b.claim("t/w", Duration::from_secs(10)).await.unwrap(),
        Claim::Acquired(_)
    ));
    assert_eq!(
        a.renew("t/w", &old, Duration::from_secs(10)).await.unwrap(),
        Renewal::Lost
    );
}

#[tokio::test]
async fn a_worker_whose_lease_was_taken_over_cannot_record_over_the_new_holder() {
    let p = prefix();
    let (a, b) = (store(&p).await, store(&p).await);
    let Claim::Acquired(old) = a.claim("t/f", Duration::from_millis(100)).await.unwrap() else {
        panic!("claim")
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let Claim::Acquired(new) = b.claim("t/f", Duration::from_secs(10)).await.unwrap() else {
        panic!("takeover")
    };
    let ttl = Duration::from_secs(60);
    assert!(
        !a.complete("t/f", &old, Bytes::from_static(b"stale"), ttl)
            .await
            .unwrap(),
        "the stale worker's outcome is refused"
    );
    assert_eq!(
        b.claim("t/f", Duration::from_secs(10)).await.unwrap(),
        Claim::Busy,
        "the new holder's claim stands"
    );
    assert!(b
        .complete("t/f", &new, Bytes::from_static(b"fresh"), ttl)
        .await
        .unwrap());
    assert_eq!(
        a.renew("t/f", &old, Duration::from_secs(10)).await.unwrap(),
        Renewal::Finished,
        "a finished key is reported as such, not as a claim to take"
    );
    assert!(!a
        .complete("t/f", &old, Bytes::from_static(b"stale"), ttl)
        .await
        .unwrap());
    assert_eq!(
        a.claim("t/f", Duration::from_secs(10)).await.unwrap(),
        Claim::Done(Bytes::from_static(b"fresh"))
    );
}

#[tokio::test]
async fn turns_are_booked_in_order_across_replicas_and_a_parked_job_runs_on_its_ticket() {
    use switchyard::state::{Booking, Rate};
    let p = prefix();
    let (a, b) = (store(&p).await, store(&p).await);
    // 10 a second, no burst: one turn every 100 ms; a job whose turn is over 250 ms off parks.
    let rate = Rate::new(10.0, Duration::from_secs(1), Duration::ZERO);
    let park = Some(Duration::from_millis(250));
    let key = "t:{acme}:rps";
    // Two replicas book one script each: turns follow each other, whoever books.
    let first = a
        .book(
            key,
            &[("t:{acme}:ticket:j1", park), ("t:{acme}:ticket:j2", park)],
            rate,
        )
        .await
        .unwrap();
    assert_eq!(first[0], Booking::Now);
    assert!(matches!(first[1], Booking::After(w) if w > Duration::from_millis(80)));
    let second = b
        .book(
            key,
            &[("t:{acme}:ticket:j3", park), ("t:{acme}:ticket:j4", park)],
            rate,
        )
        .await
        .unwrap();
    assert!(matches!(second[0], Booking::After(w) if w <= Duration::from_millis(200)));
    let Booking::Parked(wait) = second[1] else {
        panic!("300 ms off: parked, got {:?}", second[1]);
    };
    assert!(wait > Duration::from_millis(250), "{wait:?}");
    // Back early on the other replica (a redelivery before its delay): parked for the rest,
    // and nothing more is booked for it.
    let again = a
        .book(key, &[("t:{acme}:ticket:j4", park)], rate)
        .await
        .unwrap();
    assert!(
        matches!(again[0], Booking::Parked(w) if w <= wait),
        "{again:?}"
    );
    // Back when its turn has come: it runs on its ticket, which is then used up.
    tokio::time::sleep(wait).await;
    let back = b
        .book(key, &[("t:{acme}:ticket:j4", park)], rate)
        .await
        .unwrap();
    assert!(
        matches!(back[0], Booking::Ticket(parked) if parked + Duration::from_millis(5) >= wait),
        "{back:?}"
    );
    // Another tenant's line is its own.
    let other = a
        .book("t:{globex}:rps", &[("t:{globex}:ticket:j1", park)], rate)
        .await
        .unwrap();
    assert_eq!(other[0], Booking::Now);
}

/// The semantic cache's index in Redis: entries come back in the order they were added, from a
/// given time on, trimmed to the newest `max_entries`.
#[tokio::test]
async fn a_semantic_index_keeps_its_newest_entries_and_returns_those_added_since() {
    let s = switchyard::state::StateStore::from(store(&prefix()).await);
    let ttl = Duration::from_secs(60);
    for (i, at) in [(0u8, 1_000i64), (1, 2_000), (2, 3_000)] {
        s.index_add("acme:idx", at, bytes::Bytes::from(vec![i]), 2, ttl)
            .await
            .unwrap();
    }
    let all = s.index_since("acme:idx", 0, 10).await.unwrap();
    assert_eq!(
        all.iter().map(|(b, at)| (b[0], *at)).collect::<Vec<_>>(),
        [(1, 2_000), (2, 3_000)],
        "the oldest beyond max_entries is gone"
    );
    let since = s.index_since("acme:idx", 3_000, 10).await.unwrap();
    assert_eq!(since.len(), 1);
    assert!(s.index_since("globex:idx", 0, 10).await.unwrap().is_empty());
}

/// Provider batch queues in Redis: a take moves requests into a submission (another take
/// does not see them), a requeue gives them back once, and an opened batch is listed until
/// closed; a parked job's answers go with it.
#[tokio::test]
async fn batch_queues_move_requests_through_submissions_to_open_batches() {
    let s = switchyard::state::StateStore::from(store(&prefix()).await);
    let item = |n: u8| bytes::Bytes::from(format!("{{\"n\":{n}}}"));
    s.batch_enqueue("small", vec![item(1), item(2), item(3)])
        .await
        .unwrap();
    let taken = s.batch_take("small", 2, "sub-1", 1_000).await.unwrap();
    assert_eq!(taken, [item(1), item(2)]);
    let other = s.batch_take("small", 10, "sub-2", 1_000).await.unwrap();
    assert_eq!(other, [item(3)], "taken requests are not taken twice");
    let submissions = s.batch_submissions().await.unwrap();
    assert_eq!(submissions.len(), 2);
    s.batch_requeue("sub-1", "small", taken.clone())
        .await
        .unwrap();
    s.batch_requeue("sub-1", "small", taken.clone())
        .await
        .unwrap();
    let again = s.batch_take("small", 10, "sub-3", 2_000).await.unwrap();
    assert_eq!(again, [item(1), item(2)], "a requeue gives them back once");
    s.batch_opened("sub-3", "batch-1", bytes::Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let open = s.batch_open().await.unwrap();
    assert_eq!(open.len(), 1);
    s.batch_close("batch-1").await.unwrap();
    assert!(s.batch_open().await.unwrap().is_empty());

    // An answer may come before the job's record (a batch quicker than the parking): kept.
    s.batch_answer("acme/k", "r1", item(9)).await.unwrap();
    assert_eq!(s.batch_answers("acme/k").await.unwrap().len(), 1);
    s.batch_park("acme/k", item(0)).await.unwrap();
    s.batch_answer("acme/k", "r2", item(8)).await.unwrap();
    assert_eq!(s.batch_answers("acme/k").await.unwrap().len(), 2);
    s.batch_unpark("acme/k").await.unwrap();
    assert!(s.batch_parked("acme/k").await.unwrap().is_none());
    assert!(s.batch_answers("acme/k").await.unwrap().is_empty());
}

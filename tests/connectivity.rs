//! Reaching backends the way managed services are run: a NATS server started by the test that
//! only speaks TLS and only admits an nkey user, and a check that the Kafka client is built with
//! TLS and SASL (librdkafka's mock cluster has no TLS, so a local TLS endpoint sees the
//! handshake).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use switchyard::config;
use switchyard::connect::Retry;
use switchyard::state::StateStore;

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The part of a test config after its backends: provider `llm`, model `small`, and one
/// generate step.
fn one_step(provider: &str, model: &str) -> String {
    format!(
        "providers:\n  llm: {provider}\nmodels:\n  small: {model}\nprompts:\n  p: {{user: \"{{{{input.text}}}}\"}}\n\
         pipelines:\n  support:\n    steps:\n      - {{name: answer, kind: generate, model: small, prompt: p}}\n"
    )
}

/// A CA, and a server certificate for localhost signed by it, as PEM files in `dir`.
fn certificates(dir: &std::path::Path) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    (
        write("ca.pem", ca_cert.pem()),
        write("server.pem", cert.pem()),
        write("server-key.pem", key.serialize_pem()),
    )
}

/// A private redis-server that speaks only TLS and admits only the ACL user `switchyard`.
fn redis_tls_server(port: u16, ca: &str, cert: &str, key: &str, password: &str) -> NatsServer {
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            ca,
        ])
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--user", "default", "off"])
        .args([
            "--user",
            "switchyard",
            "on",
            &format!(">{password}"),
            "~*",
            "&*",
            "+@all",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/test installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    NatsServer(child)
}

/// A server process, stopped when dropped.
struct NatsServer(Child);

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nats_server(dir: &std::path::Path, port: u16, cert: &str, key: &str, nkey: &str) -> NatsServer {
    let store = dir.join("js");
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            r#"
listen: "127.0.0.1:{port}"
tls {{ cert_file: "{cert}", key_file: "{key}" }}
authorization {{ users = [ {{ nkey: "{nkey}" }} ] }}
jetstream {{ store_dir: "{store}" }}
"#,
            store = store.display()
        ),
    )
    .unwrap();
    let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("nats-server");
    let child = Command::new(binary)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server must be installed (scripts/test installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    NatsServer(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_through_nats_with_tls_and_an_nkey_and_redis_with_tls_and_an_acl_user() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let user = nkeys::KeyPair::new_user();
    let seed_file = dir.path().join("user.nk");
    std::fs::write(&seed_file, user.seed().unwrap()).unwrap();
    let port = free_port();
    let _server = nats_server(dir.path(), port, &cert, &key, &user.public_key());
    let url = format!("nats://localhost:{port}");
    let redis_port = free_port();
    std::env::set_var("SY_TEST_REDIS_PASSWORD", "redis-s3cret");
    let _redis = redis_tls_server(redis_port, &ca, &cert, &key, "redis-s3cret");
    let llm = mock_llm(1).await;
    let text = format!(
        r#"
source: {{kind: nats, url: "{url}", stream: SECURE_JOBS, subjects: ["secure.jobs.>"],
         auth: {{nkey_seed_file: "{seed}"}}, tls: {{ca_file: "{ca}"}}}}
sink: {{kind: nats, stream: SECURE_OUT, topics: {{results: secure.results, review: secure.review, dlq: secure.dlq}}}}
state: {{kind: redis, url: "rediss://localhost:{redis_port}", username: switchyard,
        password_env: SY_TEST_REDIS_PASSWORD, tls: {{ca_file: "{ca}"}}}}
http: {{listen: "off"}}
{tail}
"#,
        tail = one_step(
            &format!("{{kind: openai, base_url: \"http://{}/v1\"}}", llm.addr()),
            "{provider: llm, model: gpt-4o-mini}"
        ),
        seed = seed_file.display(),
    );
    let plan = config::load_str(&text, "test config", Vec::new()).unwrap();
    let config::SourcePlan::Nats(source) = &plan.source else {
        panic!("a NATS source")
    };
    let access = source.access.clone();

    // Without the credentials the server turns a client away.
    let refused = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.clone().into())
        .require_tls(true)
        .connect(&url)
        .await;
    assert!(refused.is_err(), "the server admits only the nkey user");

    let client = switchyard::connect::nats(&url, &access, "test", "source", Retry::Never)
        .await
        .unwrap();
    let mut results = client.subscribe("secure.results.>").await.unwrap();
    let state = StateStore::open(&plan.state)
        .await
        .expect("Redis over TLS with the ACL user");
    let service = Service::start(plan.clone(), state);
    service.wait_ready().await;
    let js = async_nats::jetstream::new(client.clone());
    js.publish("secure.jobs.acme", job("tls-1", "acme", "hello").into())
        .await
        .unwrap()
        .await
        .unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), results.next())
        .await
        .expect("a result within 30 s")
        .unwrap();
    service.stop().await;
    let result: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(result["job_id"], "tls-1");
    assert_eq!(result["status"], "ok");

    // The claim and outcome went to the TLS Redis; without its password, or without TLS, no.
    let mut wrong = plan.state.clone();
    if let config::StateKind::Redis { access, .. } = &mut wrong.kind {
        access.password_env = Some("SY_TEST_WRONG_REDIS_PASSWORD".into());
    }
    std::env::set_var("SY_TEST_WRONG_REDIS_PASSWORD", "nope");
    assert!(
        StateStore::open(&wrong).await.is_err(),
        "a wrong password is refused"
    );
    let plain = switchyard::state::RedisStore::connect(
        &format!("redis://localhost:{redis_port}"),
        "x:",
        Duration::from_secs(2),
    )
    .await;
    assert!(plain.is_err(), "plaintext is refused");
}

#[test]
fn a_nats_config_naming_a_missing_secret_fails_check_config_naming_the_field() {
    let text = |auth: &str| {
        format!(
            r#"
source: {{kind: nats, url: "nats://127.0.0.1:4222", auth: {auth}}}
{tail}
"#,
            tail = one_step("{kind: mock}", "{provider: llm, model: m}"),
        )
    };
    let problems = |auth: &str| match config::load_str(&text(auth), "t", Vec::new()) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let missing = problems("{token_env: SY_TEST_NO_SUCH_TOKEN}");
    assert!(
        missing.contains("source.auth.token_env") && missing.contains("SY_TEST_NO_SUCH_TOKEN"),
        "{missing}"
    );
    let file = problems(r#"{credentials_file: "/nonexistent/user.creds"}"#);
    assert!(file.contains("source.auth.credentials_file"), "{file}");
    let two = problems(r#"{token_env: PATH, nkey_seed_env: PATH}"#);
    assert!(two.contains("set one way to authenticate"), "{two}");
}

/// A Kafka config for a managed cluster (SASL over TLS), its password in the environment.
fn sasl_ssl_config(brokers: &str, ca: &str, password_env: &str) -> String {
    format!(
        r#"
source: {{kind: kafka, brokers: "{brokers}", topic: jobs,
         librdkafka: {{security.protocol: SASL_SSL, sasl.mechanism: SCRAM-SHA-256,
                      sasl.username: switchyard, ssl.ca.location: "{ca}"}},
         librdkafka_env: {{sasl.password: {password_env}}}}}
{tail}
"#,
        tail = one_step("{kind: mock}", "{provider: llm, model: m}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sasl_ssl_kafka_client_is_built_and_opens_with_a_tls_handshake() {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = certificates(dir.path());
    // A "broker" that only records the first bytes a client sends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let brokers = listener.local_addr().unwrap().to_string();
    std::env::set_var("SY_TEST_KAFKA_PASSWORD", "s3cret-kafka");
    let plan = config::load_str(
        &sasl_ssl_config(&brokers, &ca, "SY_TEST_KAFKA_PASSWORD"),
        "test config",
        Vec::new(),
    )
    .unwrap();
    let config::SourcePlan::Kafka(k) = &plan.source else {
        panic!("a Kafka source")
    };
    let producer: rdkafka::producer::BaseProducer =
        switchyard::connect::kafka(&k.brokers, &k.librdkafka, &k.librdkafka_env, "source")
            .unwrap()
            .create()
            .expect("librdkafka is built with TLS and SASL");
    let _ = rdkafka::producer::Producer::client(&producer)
        .fetch_metadata(None, std::time::Duration::from_millis(10));
    let (mut socket, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the client connects")
        .unwrap();
    let mut first = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(10), socket.read_exact(&mut first))
        .await
        .expect("the client speaks first")
        .unwrap();
    assert_eq!(
        first[0], 0x16,
        "a TLS handshake record, not plaintext Kafka"
    );
    assert_eq!(first[1], 0x03, "TLS version major 3");
}

#[test]
fn check_config_fails_on_a_missing_kafka_secret_and_on_an_inline_one() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = certificates(dir.path());
    let path = dir.path().join("c.yaml");
    let run = |text: String, env: &[(&str, &str)]| {
        std::fs::write(&path, text).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command.arg("check-config").arg(&path);
        for (k, v) in env {
            command.env(k, v);
        }
        let out = command.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, said) = run(sasl_ssl_config("k:9093", &ca, "SY_TEST_UNSET_PW"), &[]);
    assert!(!ok);
    assert!(
        said.contains("source.librdkafka_env.sasl.password") && said.contains("SY_TEST_UNSET_PW"),
        "{said}"
    );
    let (ok, said) = run(
        sasl_ssl_config("k:9093", &ca, "SY_TEST_SET_PW"),
        &[("SY_TEST_SET_PW", "pw")],
    );
    assert!(ok, "a complete SASL_SSL config is ok: {said}");
    let inline = sasl_ssl_config("k:9093", &ca, "SY_TEST_SET_PW").replace(
        "sasl.username: switchyard,",
        "sasl.username: switchyard, sasl.password: hunter2,",
    );
    let (ok, said) = run(inline, &[("SY_TEST_SET_PW", "pw")]);
    assert!(!ok);
    assert!(said.contains("source.librdkafka.sasl.password"), "{said}");
    assert!(
        !said.contains("hunter2"),
        "the secret is not echoed: {said}"
    );
    let (ok, said) = run(
        sasl_ssl_config("k:9093", "/nonexistent/ca.pem", "SY_TEST_SET_PW"),
        &[("SY_TEST_SET_PW", "pw")],
    );
    assert!(!ok, "an unreadable CA file is caught before run: {said}");
}

/// A 3-master Redis Cluster on free local ports, created with `redis-cli --cluster create`.
fn redis_cluster(dir: &std::path::Path) -> (Vec<NatsServer>, Vec<u16>) {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let nodes = ports
        .iter()
        .map(|port| {
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(dir.join(format!("nodes-{port}.conf")))
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (scripts/test installs it)");
            NatsServer(child)
        })
        .collect();
    for port in &ports {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
            assert!(Instant::now() < deadline, "a cluster node did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli must be installed with redis-server");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = Command::new("redis-cli")
            .args(["-p", &ports[0].to_string(), "cluster", "info"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster did not become ok");
        std::thread::sleep(Duration::from_millis(100));
    }
    (nodes, ports)
}

fn cluster_url(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_budgets_limiters_and_the_cache_work_on_a_three_node_redis_cluster() {
    use switchyard::state::{BudgetKeys, Claim, Rate, RedisStore};
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, ports) = redis_cluster(dir.path());
    let access = config::RedisAccess {
        cluster: true,
        ..Default::default()
    };
    let store = StateStore::from(
        RedisStore::connect_with(&cluster_url(&ports), "sy:", Duration::from_secs(2), &access)
            .await
            .unwrap(),
    );
    // Tenants whose keys land on every node.
    for i in 0..30 {
        let tenant = format!("tenant-{i}");
        let key = format!("{tenant}/job-1");
        let Claim::Acquired(token) = store.claim(&key, Duration::from_secs(10)).await.unwrap()
        else {
            panic!("claim on {key}")
        };
        assert_eq!(
            store.claim(&key, Duration::from_secs(10)).await.unwrap(),
            Claim::Busy
        );
        assert!(store
            .complete(
                &key,
                &token,
                bytes::Bytes::from_static(b"done"),
                Duration::from_secs(60)
            )
            .await
            .unwrap());
        assert_eq!(
            store.claim(&key, Duration::from_secs(10)).await.unwrap(),
            Claim::Done(bytes::Bytes::from_static(b"done"))
        );
        // A budget's two keys in one script: they must share a slot, as the gate names them.
        let keys = BudgetKeys {
            day: format!("{{{tenant}}}:d:2026-11-30"),
            month: format!("{{{tenant}}}:m:2026-11"),
            day_limit: Some(1.0),
            month_limit: Some(10.0),
        };
        assert!(store.spend(&keys, 0.6, true).await.unwrap().allowed);
        assert!(
            !store.spend(&keys, 0.6, true).await.unwrap().allowed,
            "over the day's $1"
        );
        let rate = Rate::new(1.0, Duration::from_secs(60), Duration::from_secs(1));
        assert_eq!(
            store
                .throttle(&format!("t:{tenant}:rps"), 1.0, rate)
                .await
                .unwrap(),
            None
        );
        assert!(store
            .throttle(&format!("t:{tenant}:rps"), 1.0, rate)
            .await
            .unwrap()
            .is_some());
        store
            .cache_put(
                &format!("{tenant}-answer"),
                bytes::Bytes::from_static(b"42"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(
            store
                .cache_get(&format!("{tenant}-answer"))
                .await
                .unwrap()
                .as_deref(),
            Some(&b"42"[..])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_holds_across_replicas_sharing_a_redis_cluster() {
    use switchyard::testkit::{publish, Collected};
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, ports) = redis_cluster(dir.path());
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(5).await;
    let group = format!("cluster-{:x}", rand::random::<u32>());
    let text = format!(
        r#"
source: {{kind: kafka, brokers: "{brokers}", group: "{group}", topic: {JOBS_TOPIC},
         librdkafka: {{auto.commit.interval.ms: 200, session.timeout.ms: 6000, heartbeat.interval.ms: 500}}}}
state: {{kind: redis, url: "{url}", cluster: true, key_prefix: "it:"}}
http: {{listen: "off"}}
{tail}
tenants:
  thrifty: {{budget_usd_per_day: 1}}
"#,
        tail = one_step(&format!("{{kind: openai, base_url: \"http://{}/v1\"}}", llm.addr()), "{provider: llm, model: gpt-4o-mini, price: {input: 1000, output: 1000}, max_tokens: 64}"),
        url = cluster_url(&ports),
    );
    let plan = config::load_str(&text, "test config", Vec::new()).unwrap();
    let mut services = Vec::new();
    for _ in 0..3 {
        services.push(Service::start(
            plan.clone(),
            StateStore::open(&plan.state).await.unwrap(),
        ));
    }
    for s in &services {
        s.wait_ready().await;
    }
    let outputs = collector(&brokers);
    let n = 60;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| {
            job(
                &format!("c-{i}"),
                "thrifty",
                "please summarise my last three invoices",
            )
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        outputs.wait_for(n, Duration::from_secs(60), |_| {}).await,
        n
    );
    for s in services {
        s.stop().await;
    }
    let all = outputs.snapshot();
    let spent: f64 = all
        .iter()
        .filter_map(|(c, _)| match c {
            Collected::Result(r) => Some(r.usage.cost_usd),
            _ => None,
        })
        .sum();
    let refused = all
        .iter()
        .filter(|(c, _)| matches!(c, Collected::DeadLetter(d) if d.reason.as_str() == "budget_exceeded"))
        .count();
    let client =
        redis::cluster::ClusterClient::new(vec![format!("redis://127.0.0.1:{}", ports[0])])
            .unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let day_key = format!(
        "it:budget:{{thrifty}}:d:{}",
        chrono::Utc::now().format("%Y-%m-%d")
    );
    let recorded: f64 = redis::cmd("GET")
        .arg(&day_key)
        .query_async::<String>(&mut conn)
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        refused > 0 && spent > 0.0,
        "the budget ran out part way ({refused} refused)"
    );
    assert!(
        recorded <= 1.0 + 1e-9,
        "recorded ${recorded:.4} is over the $1 budget"
    );
    assert!(
        (recorded - spent).abs() < 1e-6,
        "recorded ${recorded:.4}, results ${spent:.4}"
    );
}

/// A Redis primary with one replica and three sentinels watching it as `switchyard`.
struct Sentinels {
    primary: Option<NatsServer>,
    _replica: NatsServer,
    _sentinels: Vec<NatsServer>,
    sentinel_ports: Vec<u16>,
}

fn sentinel_setup(dir: &std::path::Path, master: &str) -> Sentinels {
    let wait = |port: u16| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "a redis process did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let server = |port: u16, extra: &[String]| {
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
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        wait(port);
        NatsServer(child)
    };
    let (primary_port, replica_port) = (free_port(), free_port());
    let primary = server(primary_port, &[]);
    let replica = server(
        replica_port,
        &[
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary_port.to_string(),
        ],
    );
    let sentinel_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let sentinels = sentinel_ports
        .iter()
        .map(|port| {
            let conf = dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nsentinel monitor {master} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {master} 1000\nsentinel failover-timeout {master} 5000\n"
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            wait(*port);
            NatsServer(child)
        })
        .collect();
    // The sentinels must know the replica before a failover can promote it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &sentinel_ports[0].to_string(),
                "sentinel",
                "replicas",
                master,
            ])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains(&replica_port.to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sentinels never saw the replica"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Sentinels {
        primary: Some(primary),
        _replica: replica,
        _sentinels: sentinels,
        sentinel_ports,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_mid_stream_loses_no_job() {
    let dir = tempfile::tempdir().unwrap();
    // A master name and key prefix of this run's own: nothing else can answer for them.
    let master = format!("sy{:x}", rand::random::<u32>());
    let mut redis = sentinel_setup(dir.path(), &master);
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(40).await;
    let sentinels = redis
        .sentinel_ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let text = format!(
        r#"
source: {{kind: kafka, brokers: "{brokers}", group: "sentinel-{g:x}", topic: {JOBS_TOPIC},
         librdkafka: {{auto.commit.interval.ms: 200, session.timeout.ms: 6000, heartbeat.interval.ms: 500}}}}
state: {{kind: redis, url: "{sentinels}", sentinel_master: {master}, key_prefix: "{master}:", timeout_ms: 500}}
http: {{listen: "off"}}
limits: {{max_inflight_jobs: 32}}
{tail}
"#,
        tail = one_step(
            &format!("{{kind: openai, base_url: \"http://{}/v1\"}}", llm.addr()),
            "{provider: llm, model: gpt-4o-mini}"
        ),
        g = rand::random::<u32>(),
    );
    let plan = config::load_str(&text, "test config", Vec::new()).unwrap();
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;
    let outputs = collector(&brokers);
    let n = 600;
    switchyard::testkit::publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| job(&format!("f-{i}"), "acme", "hello")),
    )
    .await
    .unwrap();
    outputs
        .wait_for(n / 4, Duration::from_secs(60), |_| {})
        .await;
    // The primary dies; the sentinels promote the replica.
    let killed_at = outputs.len();
    drop(redis.primary.take());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let per_job = originals(&outputs.snapshot());
        if per_job.len() >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stalled at {} of {n} jobs after the failover",
            per_job.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Late duplicates, if any, arrive within a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_job = originals(&outputs.snapshot());
    service.stop().await;
    let twice = per_job.values().filter(|&&c| c > 1).count();
    eprintln!(
        "{n} jobs, primary killed after {killed_at} outputs: 0 lost, {twice} answered twice (the duplicate window)"
    );
    assert_eq!(per_job.len(), n, "no job lost");
    assert!(
        twice <= 32,
        "{twice} jobs answered twice; at most the jobs in flight at the failover may be"
    );
}

#[test]
fn check_config_catches_what_the_store_and_nats_clients_would_reject() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let check = |head: &str| {
        std::fs::write(
            &path,
            format!(
                "{head}\nproviders:\n  llm: {{kind: mock}}\nmodels:\n  small: {{provider: llm, model: m}}\n\
                 prompts:\n  p: {{user: \"{{{{input.text}}}}\"}}\npipelines:\n  s:\n    steps:\n      \
                 - {{name: a, kind: generate, model: small, prompt: p}}\n"
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, said) = check(
        "source: {kind: kafka, brokers: \"k:9092\", topic: t}\n\
         state: {kind: redis, url: \"redis://user:hunter2@cache:notaport\"}",
    );
    assert!(!ok && said.contains("state.url"), "{said}");
    assert!(
        !said.contains("hunter2"),
        "the password is not echoed: {said}"
    );
    let (ok, said) = check(
        "source: {kind: kafka, brokers: \"k:9092\", topic: t}\n\
         state: {kind: redis, url: \"rediss://cache:6380\", tls: {ca_file: \"/nonexistent/ca.pem\"}}",
    );
    assert!(!ok && said.contains("state.tls.ca_file"), "{said}");
    let (ok, said) =
        check("source: {kind: nats, url: \"nats://127.0.0.1:4222\"}\nsink: {kind: nats}");
    assert!(ok, "{said}");
}

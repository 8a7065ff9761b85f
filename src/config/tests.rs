use super::*;

const MINIMAL: &str = r#"
source: {kind: kafka, brokers: "localhost:9092"}
providers:
  local: {kind: mock}
models:
  small: {provider: local, model: mock-small, price: {input: 0.15, output: 0.6}}
prompts:
  triage: {user: "Categories: {{categories}}\n{{input.text}}"}
  answer: {system: "Be brief.", user: "{{input.text}} ({{steps.classify.output}})"}
pipelines:
  support:
    steps:
      - {name: classify, kind: classify, model: small, prompt: triage, categories: [simple, complex]}
      - {name: route, kind: route, on: classify, routes: {complex: small, default: small}, review_below_confidence: 0.5}
      - {name: answer, kind: generate, model: "{{route.model}}", prompt: answer}
"#;

fn load(text: &str) -> Result<Plan, ConfigError> {
    load_str(text, "test.yaml", Vec::new())
}

fn problems(text: &str) -> String {
    load(text).unwrap_err().to_string()
}

#[test]
fn a_minimal_config_loads_with_defaults() {
    let plan = load(MINIMAL).unwrap();
    assert_eq!(plan.default_pipeline.as_deref(), Some("support"));
    let SinkPlan::Kafka(sink) = &plan.sink else {
        panic!("kafka sink")
    };
    assert_eq!(
        sink.brokers, "localhost:9092",
        "sink brokers default to the source's"
    );
    assert_eq!(sink.topics.dlq, "switchyard.dlq");
    let steps = &plan.pipelines["support"].steps;
    assert_eq!(steps[2].needs, vec![1]);
    assert!(
        matches!(&steps[2].kind, StepKindPlan::Generate(g) if matches!(g.model, ModelChoice::FromRoute(1)))
    );
}

#[test]
fn a_typo_names_the_field() {
    let text = MINIMAL.replace("price:", "prize:");
    let e = problems(&text);
    assert!(
        e.contains("models.small") && e.contains("unknown field `prize`"),
        "{e}"
    );
}

#[test]
fn a_missing_provider_names_the_model_field() {
    let text = MINIMAL.replace("{provider: local,", "{provider: opnai,");
    let e = problems(&text);
    assert!(
        e.contains("models.small.provider") && e.contains("`opnai`"),
        "{e}"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = MINIMAL
        .replace("prompt: triage", "prompt: triag")
        .replace("default: small", "default: larg");
    let e = problems(&text);
    assert!(
        e.contains("steps[0].prompt") && e.contains("routes.default"),
        "{e}"
    );
}

#[test]
fn a_prompt_reading_a_step_it_does_not_wait_for_is_rejected() {
    let text = MINIMAL.replace(
        "{name: answer, kind: generate, model: \"{{route.model}}\", prompt: answer}",
        "{name: answer, kind: generate, model: small, prompt: answer, needs: []}",
    );
    let e = problems(&text);
    assert!(
        e.contains("does not depend on") && e.contains("needs"),
        "{e}"
    );
}

#[test]
fn environment_overrides_win_and_are_typed() {
    let env = vec![
        (
            "SWITCHYARD__SOURCE__BROKERS".to_owned(),
            "kafka-1:9092,kafka-2:9092".to_owned(),
        ),
        (
            "SWITCHYARD__LIMITS__MAX_INFLIGHT_JOBS".to_owned(),
            "7".to_owned(),
        ),
        ("UNRELATED".to_owned(), "x".to_owned()),
    ];
    let plan = load_str(MINIMAL, "t", env).unwrap();
    let SourcePlan::Kafka(source) = &plan.source else {
        panic!("kafka source")
    };
    assert_eq!(source.brokers, "kafka-1:9092,kafka-2:9092");
    assert_eq!(plan.limits.max_inflight_jobs, 7);
}

#[test]
fn a_bad_environment_override_names_the_variable_and_field() {
    let env = vec![(
        "SWITCHYARD__LIMITS__MAX_INFLIGHT_JOBS".to_owned(),
        "many".to_owned(),
    )];
    let e = load_str(MINIMAL, "t", env).unwrap_err().to_string();
    assert!(e.contains("limits.max_inflight_jobs"), "{e}");
}

#[test]
fn a_model_without_a_price_loads_with_a_warning_naming_it() {
    let text = MINIMAL.replace(", price: {input: 0.15, output: 0.6}", "");
    let plan = load(&text).unwrap();
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("models.small.price")),
        "{:?}",
        plan.warnings
    );
    assert!(load(MINIMAL).unwrap().warnings.is_empty());
}

#[test]
fn credentials_in_urls_never_reach_a_message() {
    assert_eq!(
        redact_url("nats://alice:s3cret@nats-1:4222"),
        "nats://***@nats-1:4222"
    );
    assert_eq!(
        redact_url("nats://a:b@n1:4222,nats://n2:4222"),
        "nats://***@n1:4222,nats://n2:4222"
    );
    assert_eq!(
        redact_url("rediss://default:pw@cache:6380/0"),
        "rediss://***@cache:6380/0"
    );
    assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    let message = redact_in(
        "cannot connect to nats://alice:s3cret@nats-1:4222: refused",
        "nats://alice:s3cret@nats-1:4222",
    );
    assert!(!message.contains("s3cret"), "{message}");
}

#[test]
fn an_api_key_over_plain_http_to_a_remote_host_is_warned_about() {
    let config = |base_url: &str| {
        format!(
            r#"
source: {{kind: kafka, brokers: "k:9092", topic: t}}
providers:
  llm: {{kind: openai, base_url: "{base_url}", api_key_env: KEY}}
models:
  small: {{provider: llm, model: m}}
prompts:
  p: {{user: "{{{{input.text}}}}"}}
pipelines:
  s:
    steps:
      - {{name: a, kind: generate, model: small, prompt: p}}
"#
        )
    };
    let warned = |url: &str| {
        load_str(&config(url), "t", Vec::new())
            .unwrap()
            .warnings
            .iter()
            .any(|w| w.contains("unencrypted"))
    };
    assert!(warned("http://llm.internal.example:8000/v1"));
    assert!(!warned("https://api.openai.com/v1"));
    assert!(!warned("http://127.0.0.1:11434/v1"));
    assert!(!warned("http://localhost:8000/v1"));
    assert!(!warned("http://[::1]:8000/v1"));
}

#[test]
fn a_sink_on_the_sources_brokers_connects_as_the_source_does() {
    std::env::set_var("SY_TEST_SINK_INHERITS_PW", "pw");
    let text = r#"
source: {kind: kafka, brokers: "k:9093", topic: t,
         librdkafka: {security.protocol: SASL_SSL, sasl.mechanism: PLAIN, sasl.username: u, session.timeout.ms: 45000},
         librdkafka_env: {sasl.password: SY_TEST_SINK_INHERITS_PW}}
sink: {kind: kafka, librdkafka: {sasl.mechanism: SCRAM-SHA-512}}
providers:
  llm: {kind: mock}
models:
  small: {provider: llm, model: m}
prompts:
  p: {user: "{{input.text}}"}
pipelines:
  s:
    steps:
      - {name: a, kind: generate, model: small, prompt: p}
"#;
    let plan = load_str(text, "t", Vec::new()).unwrap();
    let SinkPlan::Kafka(sink) = &plan.sink else {
        panic!("a Kafka sink")
    };
    let get = |key: &str| {
        sink.librdkafka
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("security.protocol"), Some("SASL_SSL"));
    assert_eq!(get("sasl.username"), Some("u"));
    assert_eq!(
        get("sasl.mechanism"),
        Some("SCRAM-SHA-512"),
        "the sink's own wins"
    );
    assert_eq!(
        get("session.timeout.ms"),
        None,
        "consumer settings stay with the source"
    );
    assert_eq!(
        sink.librdkafka_env,
        vec![(
            "sasl.password".to_owned(),
            "SY_TEST_SINK_INHERITS_PW".to_owned()
        )]
    );
    let misspelt = text.replace("{sasl.password: SY_TEST", "{sasl.pasword: SY_TEST");
    let problems = load_str(&misspelt, "t", Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        problems.contains("not a secret librdkafka property"),
        "{problems}"
    );
}

/// The defaults the README states, as a user gets them from a minimal file.
#[test]
fn the_documented_defaults_are_what_a_minimal_config_gets() {
    let plan = load(MINIMAL).unwrap();
    let provider = &plan.providers["local"];
    assert_eq!(
        provider.retry.max_elapsed,
        std::time::Duration::from_secs(600)
    );
    assert_eq!(
        provider.circuit.open_for,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(
        provider.circuit.window_for,
        std::time::Duration::from_secs(10)
    );
    assert_eq!(
        (
            provider.circuit.consecutive_failures,
            provider.circuit.window,
            provider.circuit.min_calls
        ),
        (5, 1000, 10)
    );
    assert_eq!(plan.http_listen.as_deref(), Some("0.0.0.0:9464"));
    let off = format!("{MINIMAL}http: {{listen: \"off\"}}\n");
    assert_eq!(
        load(&off).unwrap().http_listen,
        None,
        "http: off serves nothing"
    );
    assert_eq!(plan.limits.park_after, std::time::Duration::from_secs(1));
    assert_eq!(plan.limits.max_inflight_jobs, 1024);
    assert_eq!(plan.limits.max_running_jobs, 256);
    let nats = MINIMAL.replace(
        "source: {kind: kafka, brokers: \"localhost:9092\"}",
        "source: {kind: nats, url: \"nats://localhost:4222\"}\nsink: {kind: nats}",
    );
    let SourcePlan::Nats(source) = load(&nats).unwrap().source else {
        panic!("nats source")
    };
    assert_eq!(
        source.max_ack_pending, 50_000,
        "parked messages stay pending: the server's 1,000 would stall every tenant"
    );
}

#[test]
fn a_rate_limited_tenant_on_kafka_without_a_delay_topic_is_warned_about() {
    let limited = format!("{MINIMAL}tenants: {{acme: {{rps: 10}}}}\n");
    let warnings = load(&limited).unwrap().warnings;
    assert!(
        warnings.iter().any(|w| w.contains("source.delay_topic")),
        "{warnings:?}"
    );
    assert!(
        load(MINIMAL)
            .unwrap()
            .warnings
            .iter()
            .all(|w| !w.contains("delay_topic")),
        "no warning without an rps limit"
    );
    let parked = MINIMAL.replace(
        "source: {kind: kafka, brokers: \"localhost:9092\"}",
        "source: {kind: kafka, brokers: \"localhost:9092\", delay_topic: switchyard.jobs.delay}",
    );
    let named = format!("{parked}tenants: {{acme: {{rps: 10}}}}\n");
    assert!(
        load(&named)
            .unwrap()
            .warnings
            .iter()
            .all(|w| !w.contains("delay_topic")),
        "no warning once the delay topic is named"
    );
}

/// MINIMAL with `steps` replaced (and extra prompts for the pattern steps).
fn with_steps(steps: &str) -> String {
    let head = MINIMAL.split("pipelines:").next().unwrap_or_default().replace(
        "prompts:\n",
        "prompts:\n  chunk: {user: \"Sum up {{chunk}}\"}\n  combine: {user: \"Join {{mapped}}\"}\n  judge: {user: \"Score {{candidate}}\"}\n  plain: {user: \"{{input.text}}\"}\n",
    );
    format!("{head}pipelines:\n  support:\n    steps:\n{steps}")
}

/// Each new mistake is reported, naming its field.
#[test]
fn pattern_mistakes_name_their_field() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown step in when",
            "      - {name: a, kind: generate, model: small, prompt: plain}\n      - {name: b, kind: generate, model: small, prompt: plain, when: 'steps.nope.output == \"x\"'}\n",
            &["steps[1].when", "`nope`", "not an earlier step"],
        ),
        (
            "when reads a step it does not wait for",
            "      - {name: a, kind: generate, model: small, prompt: plain}\n      - {name: b, kind: generate, model: small, prompt: plain, needs: []}\n      - {name: c, kind: generate, model: small, prompt: plain, needs: [b], when: 'steps.a.output'}\n",
            &["steps[2].when", "add it to `needs`"],
        ),
        (
            "when that does not parse",
            "      - {name: a, kind: generate, model: small, prompt: plain, when: 'input.x =='}\n",
            &["steps[0].when", "position"],
        ),
        (
            "when reads a field the step kind has not",
            "      - {name: c, kind: classify, method: rules, categories: [x], rules: {x: [y]}}\n      - {name: b, kind: generate, model: small, prompt: plain, when: 'steps.c.categry == \"x\"'}\n",
            &["steps[1].when", "no `categry`", "category"],
        ),
        (
            "a map without a split",
            "      - {name: a, kind: generate, model: small, prompt: plain}\n      - {name: m, kind: map, over: a, model: small, prompt: chunk}\n",
            &["steps[1].over", "must name a split step"],
        ),
        (
            "a map over nothing",
            "      - {name: m, kind: map, over: nothing, model: small, prompt: chunk}\n",
            &["steps[0].over", "needs a split step"],
        ),
        (
            "a map prompt without its chunk",
            "      - {name: s, kind: split, from: input.text}\n      - {name: m, kind: map, over: s, model: small, prompt: plain}\n",
            &["steps[1].prompt", "never reads `{{chunk}}`"],
        ),
        (
            "a reduce over a split",
            "      - {name: s, kind: split, from: input.text}\n      - {name: r, kind: reduce, over: s, model: small, prompt: combine}\n",
            &["steps[1].over", "must name a map step"],
        ),
        (
            "a loop without a bound",
            "      - {name: r, kind: refine, model: small, prompt: plain, evaluator: {model: small, prompt: judge}}\n",
            &["steps[0].max_rounds", "a loop needs a bound"],
        ),
        (
            "an evaluator that never sees the answer",
            "      - {name: r, kind: refine, model: small, prompt: plain, max_rounds: 2, evaluator: {model: small, prompt: plain}}\n",
            &["steps[0].evaluator.prompt", "`{{candidate}}`"],
        ),
        (
            "overlap as large as the chunk",
            "      - {name: s, kind: split, from: input.text, size: 100, overlap: 100}\n",
            &["steps[0].overlap", "smaller than `size`"],
        ),
        (
            "a split of something that is not input or a step",
            "      - {name: s, kind: split, from: text}\n",
            &["steps[0].from", "`input.<field>`"],
        ),
        (
            "a template that is both text and json",
            "      - {name: t, kind: template, template: x, json: {a: 1}}\n",
            &["steps[0]", "exactly one of `template`"],
        ),
        (
            "a template reading a step it does not wait for",
            "      - {name: a, kind: generate, model: small, prompt: plain}\n      - {name: t, kind: template, needs: [], json: {a: '{{steps.a.output}}'}}\n",
            &["steps[1].json.a", "add it to `needs`"],
        ),
        (
            "a map's own variable in a generate prompt",
            "      - {name: a, kind: generate, model: small, prompt: chunk}\n",
            &["steps[0].prompt", "`{{chunk}}` is not available here"],
        ),
        (
            "a rule with a bad regex and an unknown category",
            "      - {name: c, kind: classify, method: rules, categories: [x], rules: [{category: y, regex: '(', confidence: 0.5}]}\n",
            &["steps[0].rules[0].regex", "steps[0].rules[0].category"],
        ),
        (
            "rules without rules",
            "      - {name: c, kind: classify, method: rules, categories: [x]}\n",
            &["steps[0].rules", "needs `rules`"],
        ),
        (
            "a route to an unknown prompt",
            "      - {name: c, kind: classify, method: rules, categories: [x], rules: {x: [y]}}\n      - {name: r, kind: route, on: c, routes: {x: {prompt: nope}, default: {prompt: plain}}}\n",
            &["steps[1].routes.x.prompt", "`nope`"],
        ),
        (
            "route.prompt without a default prompt",
            "      - {name: c, kind: classify, method: rules, categories: [x], rules: {x: [y]}}\n      - {name: r, kind: route, on: c, routes: {x: {prompt: plain}, default: small}}\n      - {name: g, kind: generate, model: small, prompt: '{{route.prompt}}'}\n",
            &["steps[2].prompt", "`default` route"],
        ),
        (
            "truncate without a context window",
            "      - {name: g, kind: generate, model: small, prompt: plain, on_context_overflow: truncate}\n",
            &["steps[0].on_context_overflow", "context_window"],
        ),
        (
            "on_failure on a step that calls no model",
            "      - {name: c, kind: classify, method: rules, categories: [x], rules: {x: [y]}, on_failure: {output: x}}\n",
            &["steps[0].on_failure", "applies to generate"],
        ),
        (
            "a map stand-in that is not a list",
            "      - {name: s, kind: split, from: input.text}\n      - {name: m, kind: map, over: s, model: small, prompt: chunk, on_failure: {output: none}}\n",
            &["steps[1].on_failure.output", "must be a list"],
        ),
        (
            "route.model without a default model",
            "      - {name: c, kind: classify, method: rules, categories: [x], rules: {x: [y]}}\n      - {name: r, kind: route, on: c, routes: {x: small, default: {branch: other}}}\n      - {name: g, kind: generate, model: '{{route.model}}', prompt: plain}\n",
            &["steps[2].model", "`default` route"],
        ),
        (
            "a typo in a pattern step",
            "      - {name: s, kind: split, from: input.text, sise: 10}\n",
            &["steps[0]", "unknown field `sise`"],
        ),
    ];
    for (what, steps, expected) in cases {
        let text = with_steps(steps);
        let e = match load(&text) {
            Ok(_) => panic!("{what}: loaded\n{text}"),
            Err(e) => e.to_string(),
        };
        for part in *expected {
            assert!(e.contains(part), "{what}: `{part}` not in:\n{e}");
        }
    }
}

#[test]
fn pipeline_level_mistakes_name_their_field() {
    let steps = "      - {name: a, kind: generate, model: small, prompt: plain}\n";
    let cases: &[(&str, &[&str])] = &[
        (
            "    output: nope\n",
            &["pipelines.support.output", "`nope`"],
        ),
        (
            "    guardrails: {input: {redact_pii: [email, ssn]}}\n",
            &["guardrails.input.redact_pii[1]", "`ssn`"],
        ),
        (
            "    guardrails: {output: {deny: ['(']}}\n",
            &["pipelines.support.guardrails", "output.deny"],
        ),
        (
            "    guardrails: {input: {injection: sometimes}}\n",
            &["guardrails.input.injection", "`sometimes`"],
        ),
        (
            "    output: {json: {a: '{{steps.zzz.output}}'}}\n",
            &["pipelines.support.output.json.a", "`zzz`"],
        ),
    ];
    for (extra, expected) in cases {
        let text = with_steps(steps).replace("    steps:\n", &format!("{extra}    steps:\n"));
        let e = match load(&text) {
            Ok(_) => panic!("loaded\n{text}"),
            Err(e) => e.to_string(),
        };
        for part in *expected {
            assert!(e.contains(part), "`{part}` not in:\n{e}");
        }
    }
}

#[test]
fn a_context_window_must_leave_room_for_a_prompt() {
    let text = MINIMAL.replace(
        "price: {input: 0.15, output: 0.6}}",
        "price: {input: 0.15, output: 0.6}, max_tokens: 512, context_window: 512}",
    );
    let e = problems(&text);
    assert!(e.contains("models.small.context_window"), "{e}");
}

#[test]
fn mock_answers_with_a_bad_regex_name_the_rule() {
    let text = MINIMAL.replace(
        "local: {kind: mock}",
        "local: {kind: mock, answers: [{match: 'ok', answer: x}, {match: '(', answer: y}]}",
    );
    let e = problems(&text);
    assert!(e.contains("providers.local.answers[1].match"), "{e}");
}

#[test]
fn prompt_cache_prices_default_per_api_and_are_charged_apart() {
    let text = MINIMAL.replace(
        "local: {kind: mock}",
        "local: {kind: mock}\n  claude: {kind: mock, api: anthropic}",
    ).replace(
        "models:\n",
        "models:\n  haiku: {provider: claude, model: h, price: {input: 1.0, output: 5.0}}\n  custom: {provider: claude, model: h, price: {input: 1.0, output: 5.0, cache_read: 0.2, cache_write: 2.0}}\n",
    );
    let plan = load(&text).unwrap();
    let haiku = plan.models["haiku"].price;
    assert_eq!((haiku.cache_read, haiku.cache_write), (0.1, 1.25));
    let small = plan.models["small"].price;
    assert_eq!((small.cache_read, small.cache_write), (0.075, 0.15));
    let custom = plan.models["custom"].price;
    // 1M prompt tokens, of which 600k read from the cache and 100k written to it.
    let response = crate::provider::ChatResponse {
        input_tokens: 1_000_000,
        output_tokens: 0,
        cache_read_tokens: 600_000,
        cache_write_tokens: 100_000,
        ..Default::default()
    };
    let cost = custom.response_cost(&response);
    assert!(
        (cost - (0.3 + 0.6 * 0.2 + 0.1 * 2.0)).abs() < 1e-9,
        "{cost}"
    );
    assert!((haiku.response_cost(&response) - (0.3 + 0.06 + 0.125)).abs() < 1e-9);
}

/// A registry in a temporary directory: `triage` v1 and v2, `production` -> v2.
fn registry(dir: &std::path::Path) -> String {
    let triage = dir.join("triage");
    std::fs::create_dir_all(&triage).unwrap();
    std::fs::write(
        triage.join("v1.yaml"),
        "user: \"Categories: {{categories}}\\n{{input.text}}\"\n",
    )
    .unwrap();
    std::fs::write(
        triage.join("v2.yaml"),
        "system: Answer in JSON.\nuser: \"Categories: {{categories}}\\nTicket: {{input.text}}\"\n",
    )
    .unwrap();
    std::fs::write(
        triage.join("labels.yaml"),
        "production: v2\ncandidate: v1\n",
    )
    .unwrap();
    MINIMAL
        .replace("prompt: triage,", "prompt: triage@production,")
        .replace(
            "pipelines:",
            &format!(
                "prompt_registry: {{dir: \"{}\"}}\npipelines:",
                dir.display()
            ),
        )
}

#[test]
fn registry_labels_resolve_to_versions_and_records_name_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let plan = load(&registry(dir.path())).unwrap();
    let StepKindPlan::Classify(ClassifyPlan {
        method: ClassifyMethod::Llm { prompt, .. },
        ..
    }) = &plan.pipelines["support"].steps[0].kind
    else {
        panic!("an LLM classify step")
    };
    assert_eq!(
        prompt.name, "triage@v2",
        "the label resolves to its version"
    );
    assert!(
        plan.warnings.iter().any(|w| w.contains("prompts.lock")),
        "no lock yet: {:?}",
        plan.warnings
    );
}

#[test]
fn a_prompt_changed_without_a_new_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = registry(dir.path());
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, &text).unwrap();
    let (lock, n) = lock_prompts(&config).unwrap();
    assert_eq!(n, 2);
    assert!(lock.ends_with("prompts.lock"));
    let plan = load(&text).unwrap();
    assert!(
        plan.warnings.iter().all(|w| !w.contains("prompts.")),
        "{:?}",
        plan.warnings
    );
    // Same version, new text.
    std::fs::write(
        dir.path().join("triage/v1.yaml"),
        "user: \"Categories: {{categories}}\\nBe nice. {{input.text}}\"\n",
    )
    .unwrap();
    let e = problems(&text);
    assert!(
        e.contains("prompts.triage@v1") && e.contains("changed since"),
        "{e}"
    );
    // A new version is fine, with a warning until it is locked.
    std::fs::write(
        dir.path().join("triage/v1.yaml"),
        "user: \"Categories: {{categories}}\\n{{input.text}}\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("triage/v3.yaml"),
        "user: \"Categories: {{categories}}\\nBe nice. {{input.text}}\"\n",
    )
    .unwrap();
    let plan = load(&text).unwrap();
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("prompts.triage@v3")),
        "{:?}",
        plan.warnings
    );
}

#[test]
fn registry_mistakes_name_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let text = registry(dir.path());
    std::fs::write(dir.path().join("triage/labels.yaml"), "production: v9\n").unwrap();
    let e = problems(&text);
    assert!(
        e.contains("prompts.triage@production") && e.contains("triage@v9"),
        "{e}"
    );
    let inline = text.replace("prompts:\n", "prompts:\n  triage@v1: {user: x}\n");
    std::fs::write(dir.path().join("triage/labels.yaml"), "production: v2\n").unwrap();
    let e = problems(&inline);
    assert!(
        e.contains("prompts.triage@v1") && e.contains("also defined by"),
        "{e}"
    );
}

fn experiment(rollout: f64, weights: &[(&str, u32)]) -> ExperimentPlan {
    ExperimentPlan {
        name: "exp".into(),
        sticky_by: StickyBy::User,
        rollout,
        variants: weights
            .iter()
            .map(|(name, weight)| VariantPlan {
                name: (*name).into(),
                weight: *weight,
                model: None,
                prompt: None,
                temperature: None,
                max_tokens: None,
            })
            .collect(),
    }
}

#[test]
fn experiment_assignment_follows_the_weights_and_the_rollout_and_is_stable() {
    let e = experiment(100.0, &[("control", 90), ("b", 10)]);
    let n = 20_000;
    let b = (0..n)
        .filter(|i| {
            e.assign(&format!("user-{i}"))
                .is_some_and(|v| v.name == "b")
        })
        .count();
    assert!((1_800..=2_200).contains(&b), "{b} of {n}");
    // The same unit, the same variant, however often it is asked (any replica, any restart).
    for i in 0..100 {
        let unit = format!("user-{i}");
        let first = e.assign(&unit).map(|v| v.name.clone());
        assert!((0..5).all(|_| e.assign(&unit).map(|v| v.name.clone()) == first));
    }
    let half = experiment(50.0, &[("control", 1), ("b", 1)]);
    let inside = (0..n)
        .filter(|i| half.assign(&format!("u{i}")).is_some())
        .count();
    assert!((9_500..=10_500).contains(&inside), "{inside} of {n}");
    assert!(experiment(0.0, &[("b", 1)]).assign("anyone").is_none());
}

#[test]
fn experiment_mistakes_name_their_field() {
    let base = "      - {name: g, kind: generate, model: small, prompt: plain, experiment: EXP}\n";
    let cases: &[(&str, &[&str])] = &[
        (
            "{variants: {a: {weight: 1, model: nope}}}",
            &["steps[0].experiment.variants.a.model", "`nope`"],
        ),
        (
            "{variants: {a: {weight: 1, max_tokens: 999999}}}",
            &["variants.a.max_tokens", "max_tokens"],
        ),
        (
            "{rollout: 150, variants: {a: {weight: 1}}}",
            &["experiment.rollout"],
        ),
        (
            "{variants: {a: {weight: 0}}}",
            &["experiment.variants", "weight above 0"],
        ),
        (
            "{variants: {a: {weight: 1, prompt: chunk}}}",
            &["variants.a.prompt", "`{{chunk}}` is not available here"],
        ),
    ];
    for (exp, expected) in cases {
        let e = problems(&with_steps(&base.replace("EXP", exp)));
        for part in *expected {
            assert!(e.contains(part), "`{part}` not in:\n{e}");
        }
    }
    let two = format!(
        "{}{}",
        base.replace("EXP", "{variants: {a: {weight: 1}}}"),
        base.replace("name: g", "name: h")
            .replace("EXP", "{variants: {a: {weight: 1}}}")
    );
    let e = problems(&with_steps(&two));
    assert!(e.contains("one experiment per pipeline"), "{e}");
}

#[test]
fn per_user_limits_merge_with_the_default_and_name_their_field() {
    let text = format!(
        "{MINIMAL}tenants:\n  default: {{per_user: {{rps: 2}}}}\n  acme: {{per_user: {{tokens_per_min: 1000}}}}\n"
    );
    let plan = load(&text).unwrap();
    let acme = plan.tenants.get("acme").per_user;
    assert_eq!((acme.rps, acme.tokens_per_min), (Some(2.0), Some(1000.0)));
    let bad = text.replace("tokens_per_min: 1000", "tokens_per_min: -5");
    let e = problems(&bad);
    assert!(e.contains("tenants.acme.per_user.tokens_per_min"), "{e}");
    let typo = text.replace("tokens_per_min: 1000", "tokens_per_mn: 1000");
    assert!(problems(&typo).contains("tokens_per_mn"));
}

/// MINIMAL with `review:` set to `review` on its pipeline.
fn with_review(review: &str) -> String {
    format!("{MINIMAL}    review: {review}\n")
}

#[test]
fn review_settings_load_and_bad_ones_name_their_field() {
    let plan = load(&with_review(
        "{timeout_s: 60, on_timeout: rerun, rerun_model: small}",
    ))
    .unwrap();
    let review = &plan.pipelines["support"].review;
    assert_eq!(
        review.on_timeout,
        crate::review::OnTimeout::Rerun {
            model: "small".into()
        }
    );
    assert!(
        plan.reviews.consume,
        "a pipeline that can review consumes decisions"
    );
    assert_eq!(plan.reviews.decisions, "switchyard.decisions");
    let gated = load(&with_review("before_generate")).unwrap();
    assert!(gated.pipelines["support"].review.before_generate);
    assert_eq!(
        load(MINIMAL).unwrap().pipelines["support"]
            .review
            .on_timeout,
        crate::review::OnTimeout::Reject,
        "a review nobody decides is rejected by default"
    );
    for (review, field, says) in [
        ("{on_timeout: rerun}", "review.rerun_model", "required"),
        (
            "{on_timeout: rerun, rerun_model: huge}",
            "review.rerun_model",
            "`huge` is not a model",
        ),
        (
            "{on_timeout: maybe}",
            "review.on_timeout",
            "not one of approve, reject, rerun",
        ),
        (
            "{rerun_model: small}",
            "review.rerun_model",
            "only used with",
        ),
        (
            "after_generate",
            "pipelines.support.review",
            "not a review keyword",
        ),
        (
            "{before_generate: true, cost_above_usd: 1}",
            "review.cost_above_usd",
            "known only after generation",
        ),
        (
            "{before_generate: true, on_timeout: rerun, rerun_model: small}",
            "review.on_timeout",
            "without approval",
        ),
        (
            "{before_generate: true, when: 'steps.answer.output == \"x\"'}",
            "review.when",
            "only after generation",
        ),
    ] {
        let e = problems(&with_review(review));
        assert!(e.contains(field) && e.contains(says), "{review}: {e}");
    }
    let overlapping = format!("{MINIMAL}reviews: {{decisions: switchyard.results}}\n");
    assert!(problems(&overlapping).contains("reviews.decisions"));
}

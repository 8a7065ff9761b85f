//! A realistic mixed workload for the demo, the benchmark and the tests: several tenants, short
//! and long texts, invalid payloads and exact duplicates, deterministic for a given size.

use serde_json::json;

/// One message of the workload and what it should produce.
#[derive(Debug, Clone)]
pub struct WorkItem {
    pub payload: Vec<u8>,
    /// The job id when the payload is a valid job.
    pub valid_id: Option<String>,
    /// Exact re-publication of an earlier item.
    pub duplicate: bool,
}

/// A realistic mixed workload of `n` messages (deterministic for a given `n`).
pub fn workload(n: usize, max_job_bytes: usize) -> Vec<WorkItem> {
    const TENANTS: [(&str, usize); 4] = [
        ("acme", 40),
        ("globex", 30),
        ("initech", 20),
        ("umbrella", 10),
    ];
    const SHORT: [&str; 8] = [
        "I was charged twice for order #{n}, please refund one of the payments.",
        "The mobile app crashes every time I upload a photo to ticket {n}.",
        "How do I reset my password? The reset email never arrives.",
        "Can I change the delivery address for order #{n}?",
        "Your invoice {n} lists a plan I cancelled last month.",
        "The export to CSV times out for workspaces with more than 10k rows.",
        "Please add my colleague to our team account.",
        "Is there a discount for annual billing?",
    ];
    const PARAGRAPH: &str = "We migrated our account last week and since then the dashboard shows \
        stale numbers, the API returns intermittent 502 errors for the reporting endpoints, and two \
        of our scheduled exports failed silently. We rely on these reports for our month-end close, \
        so this is blocking our finance team. We already tried clearing caches and regenerating API \
        keys. Could you look into what changed during the migration and tell us when it will be fixed? ";
    let mut items: Vec<WorkItem> = Vec::with_capacity(n);
    let weighted: Vec<&str> = TENANTS
        .iter()
        .flat_map(|(t, w)| std::iter::repeat_n(*t, *w))
        .collect();
    let mut valid_so_far: Vec<usize> = Vec::new();
    for i in 0..n {
        // Every 50th message is invalid (five kinds in turn), every 33rd repeats an earlier job.
        if i % 50 == 49 {
            let payload = match (i / 50) % 5 {
                0 => b"ticket 4821: charged twice {not json".to_vec(),
                1 => vec![0xff, 0xfe, b'{', 0x80, b'}'],
                2 => json!({"id": format!("bad-{i}"), "input": {"text": "no tenant"}}).to_string().into_bytes(),
                3 => json!({"id": format!("bad-{i}"), "tenant": "acme", "input": "not an object"}).to_string().into_bytes(),
                _ => json!({"id": format!("big-{i}"), "tenant": "acme", "input": {"text": "x".repeat(max_job_bytes + 10)}})
                    .to_string()
                    .into_bytes(),
            };
            items.push(WorkItem {
                payload,
                valid_id: None,
                duplicate: false,
            });
            continue;
        }
        if i % 33 == 32 && !valid_so_far.is_empty() {
            let earlier = valid_so_far[(i * 7) % valid_so_far.len()];
            let mut copy = items[earlier].clone();
            copy.duplicate = true;
            items.push(copy);
            continue;
        }
        let tenant = weighted[(i * 37) % weighted.len()];
        let text = if i % 10 == 3 {
            PARAGRAPH.repeat(2 + i % 3)
        } else {
            SHORT[(i * 13) % SHORT.len()].replace("{n}", &(4000 + i).to_string())
        };
        let id = format!("{tenant}-{i:06}");
        let priority = ["normal", "normal", "high", "low"][i % 4];
        let job = json!({
            "id": id, "tenant": tenant, "pipeline": "support",
            "input": {"text": text}, "priority": priority, "ttl_ms": 600_000,
            "user": format!("u-{}", i % 97), "metadata": {"seq": i}
        });
        valid_so_far.push(items.len());
        items.push(WorkItem {
            payload: job.to_string().into_bytes(),
            valid_id: Some(id),
            duplicate: false,
        });
    }
    items
}

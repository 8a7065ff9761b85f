//! `switchyard reviews`: the reviews waiting for a decision, from the state store the config
//! names (earliest deadline first), as a table or as JSON lines.

use std::path::Path;

use switchyard::review::PendingReview;
use switchyard::state::StateStore;

/// Prints up to `limit` pending reviews (of `tenant` only, when given).
pub async fn list(
    config_file: &Path,
    tenant: Option<&str>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let plan = super::load(config_file)?;
    let state = StateStore::open(&plan.state).await?;
    // Read past `limit` when filtering by tenant, within a bound.
    let scan = if tenant.is_some() {
        limit.saturating_mul(20).min(100_000)
    } else {
        limit
    };
    let ids = state.reviews_by_deadline(None, scan).await?;
    let mut shown = 0;
    if !json {
        println!(
            "{:<35} {:<16} {:<24} {:<16} {:<25} why",
            "review", "tenant", "job", "pipeline", "deadline"
        );
    }
    for id in ids {
        if shown >= limit {
            break;
        }
        let Some(bytes) = state.review_get(&id).await? else {
            continue;
        };
        let Ok(review) = serde_json::from_slice::<PendingReview>(&bytes) else {
            eprintln!("{id}: unreadable record");
            continue;
        };
        if tenant.is_some_and(|t| t != review.tenant) {
            continue;
        }
        shown += 1;
        if json {
            let line = serde_json::json!({
                "review_id": review.id,
                "tenant": review.tenant,
                "job_id": review.job_id,
                "pipeline": review.pipeline,
                "deadline": review.deadline,
                "on_timeout": review.on_timeout.as_str(),
                "review_reason": review.proposed.review_reason,
                "proposed_output": review.proposed.output,
            });
            println!("{line}");
        } else {
            println!(
                "{:<35} {:<16} {:<24} {:<16} {:<25} {}",
                review.id,
                review.tenant,
                review.job_id,
                review.pipeline,
                review
                    .deadline
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                review.proposed.review_reason.as_deref().unwrap_or("-")
            );
        }
    }
    if !json {
        let counts = state.review_counts().await?;
        let total: u64 = counts
            .iter()
            .filter(|(t, _)| tenant.is_none_or(|only| only == t))
            .map(|(_, n)| n)
            .sum();
        match tenant {
            Some(t) => println!("{shown} shown; {total} pending for {t}"),
            None => println!("{shown} shown; {total} pending in all"),
        }
    }
    Ok(())
}

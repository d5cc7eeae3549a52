//! Text and JSON renderings of plans, shared by `aos-cm plan` and the snapshot tests.

use crate::model::*;
use std::fmt::Write;

/// One line per action grouped by reconciler, the conditions, and a summary line.
pub fn plan_text(plans: &[Plan]) -> String {
    let mut out = String::new();
    let mut conditions: Vec<&Condition> = Vec::new();
    for p in plans {
        let _ = writeln!(out, "{} ({} actions)", p.reconciler, p.actions.len());
        for a in &p.actions {
            let _ = writeln!(out, "  {a}");
        }
        conditions.extend(&p.conditions);
    }
    conditions.sort();
    conditions.dedup();
    if !conditions.is_empty() {
        let _ = writeln!(out, "conditions ({})", conditions.len());
        for c in &conditions {
            let _ = writeln!(out, "  {c}");
        }
    }
    let total: usize = plans.iter().map(|p| p.actions.len()).sum();
    let parts: Vec<String> = plans
        .iter()
        .map(|p| format!("{} {}", p.reconciler, p.actions.len()))
        .collect();
    let _ = writeln!(
        out,
        "summary: {total} actions ({}), {} conditions{}",
        parts.join(", "),
        conditions.len(),
        if total == 0 && conditions.is_empty() {
            "; the unit has converged"
        } else {
            ""
        }
    );
    out
}

/// The plans as a JSON document: `{"plans": [...], "summary": {...}}`.
pub fn plan_json(plans: &[Plan]) -> serde_json::Value {
    let total: usize = plans.iter().map(|p| p.actions.len()).sum();
    let conditions: usize = plans.iter().map(|p| p.conditions.len()).sum();
    serde_json::json!({
        "plans": plans,
        "summary": { "actions": total, "conditions": conditions },
    })
}

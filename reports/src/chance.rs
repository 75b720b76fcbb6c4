//! The chance level of a task's primary metric, as the harness records it with each run, and
//! the report sentence that says which methods cleared it: "beats chance" is a measured claim,
//! not a reading of the table.

use crate::summary::SummaryRow;
use crate::RunRecord;
use serde::{Deserialize, Serialize};

/// Key under which a record's `extra` holds its task's [`Chance`].
pub const CHANCE_KEY: &str = "chance";

/// Standard errors a score must clear above chance to count as beating it.
pub const Z_BEATS_CHANCE: f64 = 2.0;

/// What a predictor that ignores its input scores on the dev set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chance {
    /// The primary metric it is a value of.
    pub metric: String,
    /// Its value on the dev set.
    pub value: f64,
    /// One standard error of the metric at chance over `dev_examples` examples, where a
    /// closed form exists.
    pub std_error: Option<f64>,
    /// Dev examples scored.
    pub dev_examples: usize,
    /// How the chance predictor decides, in words.
    pub rule: String,
}

/// The chance level recorded with a run, if any (records older than it carry none).
pub fn recorded_chance(r: &RunRecord) -> Option<Chance> {
    serde_json::from_value(r.extra.get(CHANCE_KEY)?.clone()).ok()
}

/// (score − chance) / standard error: how far above chance a score lies.
pub fn z_above_chance(score: f64, chance: &Chance) -> Option<f64> {
    let se = chance.std_error.filter(|s| *s > 0.0)?;
    Some((score - chance.value) / se)
}

/// `a, b, c`, or `none` for an empty list.
pub(crate) fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// A sentence on `task`'s chance level and which method × budget groups score at least
/// [`Z_BEATS_CHANCE`] standard errors above it; None when no record of the task carries one.
pub fn chance_sentence(records: &[RunRecord], rows: &[SummaryRow], task: &str) -> Option<String> {
    let chance = records
        .iter()
        .filter(|r| r.task == task)
        .find_map(recorded_chance)?;
    let mut s = format!(
        "Chance on **{task}**: {} {:.4} ({}, over {} dev examples",
        chance.metric, chance.value, chance.rule, chance.dev_examples
    );
    let Some(se) = chance.std_error else {
        s.push_str(").");
        return Some(s);
    };
    s.push_str(&format!("; one standard error {se:.4})."));
    let (mut above, mut within) = (Vec::new(), Vec::new());
    for r in rows.iter().filter(|r| r.task == task) {
        let Some(z) = r.primary_mean.and_then(|m| z_above_chance(m, &chance)) else {
            continue;
        };
        let label = format!("{} {} (z = {z:.1})", r.method, r.budget);
        if z >= Z_BEATS_CHANCE {
            above.push(label);
        } else {
            within.push(label);
        }
    }
    // Only records made before selection was kept report a best-on-dev score.
    let chosen_on_dev = records
        .iter()
        .any(|r| r.task == task && r.status == crate::RunStatus::Ok && r.selected.is_none());
    s.push_str(&format!(
        " At least {Z_BEATS_CHANCE} standard errors above it: {}. Not: {}.{}",
        list_or_none(&above),
        list_or_none(&within),
        if chosen_on_dev {
            " The scores are each run's best evaluation, so z is optimistic."
        } else {
            ""
        }
    ));
    Some(s)
}

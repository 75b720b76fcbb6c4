//! `REPORT.md`: environment, per-task tables, the comparisons with full fine-tuning and with
//! chance, failed runs and the plots.

use crate::chance::{chance_sentence, list_or_none};
use crate::plots::Plot;
use crate::summary::{compare_to_full, tasks, FullComparison, SummaryRow, HEAD_ONLY};
use crate::{RunRecord, RunStatus};
use std::fmt::Write;

fn opt_num(v: Option<f64>, decimals: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or("–".to_string(), |x| format!("{x:.decimals$}"))
}

/// Markdown table cells must not contain `|` or newlines.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Why a run did not finish, in one line.
pub fn failure_message(status: &RunStatus) -> Option<String> {
    match status {
        RunStatus::Ok => None,
        RunStatus::Diverged { step, message } => {
            Some(format!("diverged at step {step}: {message}"))
        }
        RunStatus::BudgetUnreachable { message } => Some(format!("budget unreachable: {message}")),
        RunStatus::Error { message } => Some(format!("error: {message}")),
    }
}

/// The sentence comparing a task's methods with full fine-tuning (|mean − mean_full| ≤ std_full).
pub fn comparison_sentence(rows: &[SummaryRow], task: &str) -> String {
    match compare_to_full(rows, task) {
        FullComparison::NoFullFinetune => format!(
            "On **{task}**, full fine-tuning has no ok run with a score, so no method can be compared with it."
        ),
        FullComparison::Compared {
            full_mean,
            full_std,
            within,
        } => {
            let metric = rows
                .iter()
                .find(|r| r.task == task)
                .map_or("score", |r| r.primary_metric.as_str());
            let head = format!(
                "On **{task}**, methods within one standard deviation of full fine-tuning \
                 ({metric} {full_mean:.4} ± {full_std:.4})"
            );
            if within.is_empty() {
                format!("{head}: none.")
            } else {
                let list: Vec<String> = within
                    .iter()
                    .map(|(m, budgets)| format!("{m} ({})", budgets.join(", ")))
                    .collect();
                format!("{head}: {}.", list.join(", "))
            }
        }
    }
}

fn verdict_lists(c: &crate::compare::Comparison) -> [String; 3] {
    use crate::compare::{describe, Verdict};
    let pick = |v: Verdict| {
        let items: Vec<String> = c
            .groups
            .iter()
            .filter(|g| g.verdict(&c.metric) == v)
            .map(describe)
            .collect();
        list_or_none(&items)
    };
    [
        pick(Verdict::Indistinguishable),
        pick(Verdict::Worse),
        pick(Verdict::Better),
    ]
}

/// The comparison with full fine-tuning as paired tests on the same dev examples; None when
/// the records kept no per-example outcomes (older records: [`comparison_sentence`]).
pub fn paired_full_sentence(records: &[RunRecord], task: &str) -> Option<String> {
    let c = crate::compare::compare_with(records, task, crate::summary::FULL_FINETUNE, &[])?;
    let n = c.groups.first().map_or(0, |g| g.test.examples);
    let [same, worse, better] = verdict_lists(&c);
    Some(format!(
        "On **{task}**, against full fine-tuning ({} {:.4}, {} seed{}), by a paired bootstrap of \
         the difference on the same {n} dev examples (difference, 95% CI, Holm-adjusted p over \
         {} comparisons): indistinguishable at α = 0.05: {same}; worse: {worse}; better: {better}.",
        c.metric,
        c.reference_mean,
        c.reference_runs,
        if c.reference_runs == 1 { "" } else { "s" },
        c.groups.len()
    ))
}

/// The comparison with the head-only floor as paired tests; None without outcomes.
pub fn paired_floor_sentence(records: &[RunRecord], task: &str) -> Option<String> {
    let c = crate::compare::compare_with(records, task, HEAD_ONLY, &[])?;
    let [same, worse, better] = verdict_lists(&c);
    Some(format!(
        "Against the task head trained alone on the frozen base (head_only, {} {:.4}), paired \
         as above: adding nothing it does not learn alone (indistinguishable): {same}; worse \
         than it: {worse}; better: {better}.",
        c.metric, c.reference_mean
    ))
}

/// The sentence naming the method × budget groups of `task` that score no higher than the
/// head-only floor (the task head trained alone on the frozen base); None without that control.
pub fn floor_sentence(rows: &[SummaryRow], task: &str) -> Option<String> {
    let floor = rows
        .iter()
        .find(|r| r.task == task && r.method == HEAD_ONLY)?;
    let floor_mean = floor.primary_mean?;
    let below: Vec<String> = rows
        .iter()
        .filter(|r| r.task == task && r.method != HEAD_ONLY)
        .filter(|r| r.primary_mean.is_some_and(|m| m <= floor_mean))
        .map(|r| format!("{} {}", r.method, r.budget))
        .collect();
    let list = list_or_none(&below);
    Some(format!(
        "The task head alone on the frozen base (head_only) scores {} {floor_mean:.4} on **{task}**; \
         methods at or below it, which add nothing the head does not learn alone: {list}.",
        floor.primary_metric
    ))
}

/// What the reported scores are: which evaluation each run's score comes from.
pub fn selection_sentence(records: &[RunRecord]) -> String {
    use crate::Selection;
    let ok: Vec<&RunRecord> = records
        .iter()
        .filter(|r| r.status == RunStatus::Ok)
        .collect();
    let rules: Vec<Option<Selection>> = ok
        .iter()
        .map(|r| r.selected.as_ref().map(|s| s.rule))
        .collect();
    let count = |want: Option<Selection>| rules.iter().filter(|r| **r == want).count();
    let (fin, val, old) = (
        count(Some(Selection::Final)),
        count(Some(Selection::BestOnValidation)),
        count(None),
    );
    let mut parts = Vec::new();
    if fin > 0 {
        parts.push(format!(
            "{fin} runs report the dev score after their last step (`selection = \"final\"`)"
        ));
    }
    if val > 0 {
        let held = ok
            .iter()
            .filter_map(|r| r.selected.as_ref())
            .map(|s| s.validation_examples)
            .max()
            .unwrap_or(0);
        parts.push(format!(
            "{val} runs report the dev score at the evaluation best on up to {held} validation examples held out of the training data (`selection = \"best_on_validation\"`)"
        ));
    }
    if old > 0 {
        parts.push(format!(
            "{old} runs, recorded before selection was kept, report their best dev evaluation, which the dev set chose (optimistic)"
        ));
    }
    if parts.is_empty() {
        return "No run finished.".into();
    }
    format!("Scores: {}.", parts.join("; "))
}

/// Reads one environment field of a record as text.
type EnvField = fn(&RunRecord) -> String;

/// The environment section: each field once, or each distinct value with the runs that had it.
pub fn environment(out: &mut String, records: &[RunRecord]) {
    if records.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Environment\n");
    // Records made before precision and kernels were kept ran f32 with the fused kernels.
    let fields: [(&str, EnvField); 8] = [
        ("CPU", |r| r.env.cpu.clone()),
        ("Threads", |r| r.env.threads.to_string()),
        ("candle", |r| r.env.candle_version.clone()),
        ("Device", |r| r.env.device.clone()),
        ("Precision", |r| match r.env.dtype.as_str() {
            "" => "f32".into(),
            d => d.into(),
        }),
        // The fused kernels run only for f32 on the CPU (records before this was derived at
        // run time named the process's choice even where the composites ran).
        ("Kernels", |r| {
            let f32_cpu =
                matches!(r.env.dtype.as_str(), "" | "f32" | "quantized") && r.env.device == "cpu";
            match r.env.kernels.as_str() {
                "" | "fused" if f32_cpu => "fused".into(),
                "" | "fused" | "composite" => "composite".into(),
                // Named in full where more than one implementation ran (bf16 products).
                k => k.into(),
            }
        }),
        ("OS", |r| r.env.os.clone()),
        ("Git revision", |r| {
            r.env
                .git_revision
                .clone()
                .unwrap_or_else(|| "unknown".into())
        }),
    ];
    let mut mixed = false;
    for (name, value) in fields {
        // Value → the runs that had it, in record order.
        let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
        for r in records {
            let v = value(r);
            match groups.iter_mut().find(|(g, _)| *g == v) {
                Some((_, ids)) => ids.push(&r.run_id),
                None => groups.push((v, vec![&r.run_id])),
            }
        }
        if groups.len() == 1 {
            let _ = writeln!(out, "- {name}: {}", groups[0].0);
            continue;
        }
        mixed = true;
        let parts: Vec<String> = groups
            .iter()
            .map(|(v, ids)| match ids.len() {
                1..=3 => format!("{v} ({})", ids.join(", ")),
                n => format!("{v} ({n} runs)"),
            })
            .collect();
        let _ = writeln!(out, "- {name}: {}", parts.join("; "));
    }
    if mixed {
        // Times and memory are comparable only between runs made alike.
        let _ = writeln!(
            out,
            "\nThe records were not all made in one environment: compare times only between runs that share one."
        );
    }
    let _ = writeln!(out);
}

fn task_table(out: &mut String, rows: &[&SummaryRow]) {
    let metric = rows.first().map_or("score", |r| r.primary_metric.as_str());
    let _ = writeln!(
        out,
        "| method | budget | lr | trainable params | % of base | {} (mean ± std over seeds) | 95% CI | seeds | train s | peak MB | latency unmerged ms | latency merged ms |",
        cell(metric)
    );
    let _ = writeln!(
        out,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        // One seed has no spread to show: its interval comes from the dev examples alone.
        let score = match (r.primary_mean, r.primary_std) {
            (Some(m), Some(s)) if r.n_seeds > 1 => format!("{m:.4} ± {s:.4}"),
            (m, _) => opt_num(m, 4),
        };
        let ci = r
            .primary_ci
            .map_or("–".to_string(), |c| format!("[{:.4}, {:.4}]", c.lo, c.hi));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.4}% | {} | {} | {} | {:.1} | {:.1} | {} | {} |",
            cell(&r.method),
            cell(&r.budget),
            if r.lr.is_empty() { "–" } else { &r.lr },
            r.trainable_params,
            r.trainable_percent,
            score,
            ci,
            r.n_seeds,
            r.train_seconds,
            r.peak_memory_mb,
            opt_num(r.latency_unmerged_ms, 2),
            opt_num(r.latency_merged_ms, 2),
        );
    }
}

fn embed(out: &mut String, plots: &[&Plot]) {
    for p in plots {
        let _ = writeln!(out, "![{}]({})\n", p.title, p.file_name);
    }
}

/// Suffix the harness gives a method run on the same architecture from random initialisation.
pub const RANDOM_INIT_SUFFIX: &str = "-random-init";

/// For each (method, budget) that also ran from random initialisation on `task`, a sentence
/// comparing the two: what pretraining contributes.
pub fn pretraining_sentences(rows: &[SummaryRow], task: &str) -> Vec<String> {
    let mut out = Vec::new();
    for control in rows
        .iter()
        .filter(|r| r.task == task && r.method.ends_with(RANDOM_INIT_SUFFIX))
    {
        let method = control.method.trim_end_matches(RANDOM_INIT_SUFFIX);
        let Some(pre) = rows
            .iter()
            .find(|r| r.task == task && r.method == method && r.budget == control.budget)
        else {
            continue;
        };
        let (Some(a), Some(b)) = (pre.primary_mean, control.primary_mean) else {
            continue;
        };
        let verdict = if a > b { "beats" } else { "does not beat" };
        out.push(format!(
            "Pretrained base {verdict} random initialisation under {method} ({}): {} {:.4} vs {:.4}.",
            pre.budget, pre.primary_metric, a, b
        ));
    }
    out
}

/// Appends the record files the report could not read, so a reader knows what is missing.
pub fn skipped_records(out: &mut String, skipped: &[String]) {
    if skipped.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n## Skipped records\n\n{} record files could not be read and are not in this report:\n",
        skipped.len()
    );
    for s in skipped {
        let _ = writeln!(out, "- {s}");
    }
}

/// Renders the whole report. `rows` must be [`crate::summary::summarize`] of `records`, and
/// `plots` the images written next to the report (linked by file name).
/// The task's sample generations, when its runs kept some: each dev prompt once with its
/// reference, then every method's greedy output after training and before (first seed).
pub fn generations(out: &mut String, records: &[RunRecord], task: &str) {
    let runs: Vec<&RunRecord> = records
        .iter()
        .filter(|r| r.task == task && r.extra["generations"].is_array())
        .collect();
    let Some(seed) = runs.iter().map(|r| r.seed).min() else {
        return;
    };
    let runs: Vec<&RunRecord> = runs.into_iter().filter(|r| r.seed == seed).collect();
    let samples = runs[0].extra["generations"].as_array().map_or(0, Vec::len);
    let quote = |v: &serde_json::Value| {
        let text = v.as_str().unwrap_or("").trim();
        format!("> {}", text.replace('\n', "\n> "))
    };
    let _ = writeln!(
        out,
        "### Sample generations

Greedy decoding (seed {seed}) on the first dev prompts, after training and, in brackets below each, before it.
"
    );
    for i in 0..samples {
        let first = &runs[0].extra["generations"][i];
        let _ = writeln!(out, "**Prompt {}**\n\n{}\n", i + 1, quote(&first["prompt"]));
        let _ = writeln!(out, "Reference:\n\n{}\n", quote(&first["reference"]));
        for r in &runs {
            let g = &r.extra["generations"][i];
            let _ = writeln!(out, "`{}`:\n\n{}\n", r.run_id, quote(&g["generated"]));
            let _ = writeln!(
                out,
                "(before training: {})\n",
                g["generated_before_training"]
                    .as_str()
                    .unwrap_or("")
                    .trim()
                    .replace('\n', " ")
            );
        }
    }
}

/// Where the runs' wall time went, from the records that kept it (`phase_seconds`).
fn wall_sentence(records: &[RunRecord]) -> Option<String> {
    let timed: Vec<&RunRecord> = records
        .iter()
        .filter(|r| r.phase_seconds.contains_key("wall"))
        .collect();
    if timed.is_empty() {
        return None;
    }
    let phase = |k: &str| {
        timed
            .iter()
            .filter_map(|r| r.phase_seconds.get(k))
            .sum::<f64>()
    };
    let wall = phase("wall");
    let train: f64 = timed.iter().map(|r| r.train_seconds).sum();
    let (eval, latency) = (phase("evaluation"), phase("latency"));
    let pct = |x: f64| 100.0 * x / wall.max(1e-9);
    Some(format!(
        "Wall time: {} of the runs recorded theirs, {wall:.0} s in all: training {train:.0} s \
         ({:.0}%), evaluation {eval:.0} s ({:.0}%), latency timing {latency:.0} s ({:.0}%), \
         the rest set-up, update analyses and saving.",
        timed.len(),
        pct(train),
        pct(eval),
        pct(latency)
    ))
}

pub fn render_report(records: &[RunRecord], rows: &[SummaryRow], plots: &[Plot]) -> String {
    let mut out = String::new();
    let suite = records.first().map_or("(none)", |r| r.suite.as_str());
    let _ = writeln!(out, "# peftbench report: {suite}\n");
    if records.is_empty() {
        let _ = writeln!(
            out,
            "No runs were found: the results directory holds no run records."
        );
        return out;
    }
    let ok = records.iter().filter(|r| r.status == RunStatus::Ok).count();
    let _ = writeln!(
        out,
        "{} runs, {ok} ok. {} Each is the mean ± sample standard deviation over seeds of ok \
         runs, with a 95% percentile bootstrap interval over the dev examples (and the seeds); \
         lr is the peak learning rate (with the task head's own where a run set one); trainable \
         parameters exclude the task head; MB are 10^6 bytes.\n",
        records.len(),
        selection_sentence(records)
    );
    if let Some(s) = wall_sentence(records) {
        let _ = writeln!(out, "{s}\n");
    }
    environment(&mut out, records);

    for task in tasks(records) {
        let _ = writeln!(out, "## Task: {task}\n");
        let mut task_rows: Vec<&SummaryRow> = rows.iter().filter(|r| r.task == task).collect();
        if task_rows.is_empty() {
            let _ = writeln!(out, "No ok runs.\n");
        } else {
            // `rows` is already method-then-budget ordered; the stable sort keeps budget order
            // and puts full fine-tuning with the other methods by name.
            task_rows.sort_by(|a, b| a.method.cmp(&b.method));
            task_table(&mut out, &task_rows);
            let _ = writeln!(out);
        }
        let full = paired_full_sentence(records, &task)
            .unwrap_or_else(|| comparison_sentence(rows, &task));
        let _ = writeln!(out, "{full}\n");
        if let Some(line) =
            paired_floor_sentence(records, &task).or_else(|| floor_sentence(rows, &task))
        {
            let _ = writeln!(out, "{line}\n");
        }
        if let Some(line) = chance_sentence(records, rows, &task) {
            let _ = writeln!(out, "{line}\n");
        }
        for line in pretraining_sentences(rows, &task) {
            let _ = writeln!(out, "{line}\n");
        }
        generations(&mut out, records, &task);
        let task_plots: Vec<&Plot> = plots
            .iter()
            .filter(|p| p.task.as_deref() == Some(&task))
            .collect();
        embed(&mut out, &task_plots);
    }

    let _ = writeln!(out, "## Runs that did not finish\n");
    let failed: Vec<(&RunRecord, String)> = records
        .iter()
        .filter_map(|r| Some((r, failure_message(&r.status)?)))
        .collect();
    if failed.is_empty() {
        let _ = writeln!(out, "None: every run finished ok.\n");
    } else {
        for (r, message) in failed {
            let _ = writeln!(
                out,
                "- `{}` ({}): {}",
                r.run_id,
                r.status.label(),
                message.replace('\n', " ")
            );
        }
        let _ = writeln!(out);
    }

    let global: Vec<&Plot> = plots.iter().filter(|p| p.task.is_none()).collect();
    if !global.is_empty() {
        let _ = writeln!(out, "## Cost and AdaLoRA ranks\n");
        embed(&mut out, &global);
    }
    out
}

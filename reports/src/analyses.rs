//! The report's section on the weight updates (the LoRA paper's §7): the effective rank and
//! amplification each run recorded, and heatmaps of the subspace similarity between saved
//! adapters (computed by the harness, which reads adapters; drawn and described here).

use crate::plots::{draw_to, ensure_font, file_stem, font, DrawResult, Plot, Root};
use crate::summary::{tasks, FULL_FINETUNE};
use crate::{ReportError, RunRecord, RunStatus};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// Which subspace of an adapter is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubspaceKind {
    /// The row space of `A` (the LoRA paper's Figures 3 and 4).
    A,
    /// The input directions of ΔW = B·A (its right singular vectors).
    Update,
}

impl SubspaceKind {
    fn label(self) -> &'static str {
        match self {
            SubspaceKind::A => "A",
            SubspaceKind::Update => "ΔW",
        }
    }
    fn slug(self) -> &'static str {
        match self {
            SubspaceKind::A => "a",
            SubspaceKind::Update => "dw",
        }
    }
}

/// φ(i, j) for one matrix both adapters adapt.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSimilarity {
    /// `layer5.query`.
    pub module: String,
    /// The dimension of the space the subspaces live in (the matrix's input width).
    pub dim: usize,
    /// `phi[i-1][j-1]`, `r₁ × r₂`.
    pub phi: Vec<Vec<f64>>,
}

impl ModuleSimilarity {
    fn at(&self, i: usize, j: usize) -> Option<f64> {
        self.phi.get(i - 1)?.get(j - 1).copied()
    }
    fn last(&self) -> Option<(usize, usize, f64)> {
        let i = self.phi.len();
        let j = self.phi.first()?.len();
        Some((i, j, self.at(i, j)?))
    }
}

/// Two adapters of one task compared matrix by matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct SubspaceComparison {
    /// The task.
    pub task: String,
    /// `r=8 vs r=64, seed 0` or `seed 0 vs seed 1, r=8`.
    pub label: String,
    /// Which subspace.
    pub kind: SubspaceKind,
    /// One per matrix both adapt, in layer order.
    pub modules: Vec<ModuleSimilarity>,
}

/// Pixel size of a subspace heatmap.
pub const SUBSPACE_SIZE: (u32, u32) = (1200, 760);

fn split_module(name: &str) -> (Option<usize>, &str) {
    match name.split_once('.') {
        Some((l, p)) => (l.strip_prefix("layer").and_then(|i| i.parse().ok()), p),
        None => (None, name),
    }
}

/// The projections compared, in first-seen order, and the last layer.
fn projections(c: &SubspaceComparison) -> (Vec<String>, Option<usize>) {
    let mut projs: Vec<String> = Vec::new();
    let mut last = None;
    for m in &c.modules {
        let (layer, proj) = split_module(&m.module);
        if !projs.iter().any(|p| p == proj) {
            projs.push(proj.to_string());
        }
        last = last.max(layer);
    }
    (projs, last)
}

/// The element-wise mean of φ over the layers of one projection (same shapes only).
fn mean_phi(c: &SubspaceComparison, proj: &str) -> Option<Vec<Vec<f64>>> {
    let grids: Vec<&Vec<Vec<f64>>> = c
        .modules
        .iter()
        .filter(|m| split_module(&m.module).1 == proj)
        .map(|m| &m.phi)
        .collect();
    let first = grids.first()?;
    let shape = |g: &Vec<Vec<f64>>| (g.len(), g.first().map_or(0, Vec::len));
    if grids.iter().any(|g| shape(g) != shape(first)) {
        return None;
    }
    let n = grids.len() as f64;
    Some(
        (0..first.len())
            .map(|i| {
                (0..first[i].len())
                    .map(|j| grids.iter().map(|g| g[i][j]).sum::<f64>() / n)
                    .collect()
            })
            .collect(),
    )
}

/// White (0) to dark blue (1).
fn shade(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    RGBColor(
        (255.0 - t * (255.0 - 8.0)) as u8,
        (255.0 - t * (255.0 - 48.0)) as u8,
        (255.0 - t * (255.0 - 107.0)) as u8,
    )
}

fn draw_panel(area: &Root, title: &str, phi: &[Vec<f64>]) -> DrawResult {
    let r1 = phi.len();
    let r2 = phi.first().map_or(0, Vec::len);
    let mut chart = ChartBuilder::on(area)
        .caption(title, font(18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0.5..(r2 as f64 + 0.5), (r1 as f64 + 0.5)..0.5)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("j")
        .y_desc("i")
        .x_labels(r2.min(8))
        .y_labels(r1.min(8))
        .x_label_formatter(&|v| format!("{}", v.round() as i64))
        .y_label_formatter(&|v| format!("{}", v.round() as i64))
        .label_style(font(13))
        .axis_desc_style(font(15))
        .draw()?;
    chart.draw_series(phi.iter().enumerate().flat_map(|(i, row)| {
        row.iter().enumerate().map(move |(j, v)| {
            let (x, y) = (j as f64 + 1.0, i as f64 + 1.0);
            Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], shade(*v).filled())
        })
    }))?;
    Ok(())
}

fn draw_colorbar(area: &Root) -> DrawResult {
    let (w, h) = area.dim_in_pixel();
    let (top, bottom) = (40i32, h as i32 - 60);
    let x0 = 20i32;
    for y in top..bottom {
        let t = (bottom - y) as f64 / (bottom - top) as f64;
        area.draw(&Rectangle::new(
            [(x0, y), (x0 + 24, y + 1)],
            shade(t).filled(),
        ))?;
    }
    area.draw(&Text::new("φ = 1", (x0, top - 25), font(15)))?;
    area.draw(&Text::new("0", (x0 + 6, bottom + 8), font(15)))?;
    let _ = w;
    Ok(())
}

fn draw_comparison(root: &Root, c: &SubspaceComparison) -> DrawResult {
    let (projs, last) = projections(c);
    let title = format!(
        "{}: subspace similarity of {} ({})",
        c.task,
        c.kind.label(),
        c.label
    );
    root.draw(&Text::new(title, (20, 12), font(22)))?;
    let body = root.margin(44, 0, 0, 0);
    let (main, bar) = body.split_horizontally(body.dim_in_pixel().0 - 90);
    draw_colorbar(&bar)?;
    let rows = main.split_evenly((2, projs.len().max(1)));
    let n_layers = c
        .modules
        .iter()
        .filter(|m| {
            projs
                .first()
                .is_some_and(|p| split_module(&m.module).1 == p)
        })
        .count();
    for (k, proj) in projs.iter().enumerate() {
        let module = last.map_or(proj.clone(), |l| format!("layer{l}.{proj}"));
        if let Some(m) = c.modules.iter().find(|m| m.module == module) {
            draw_panel(&rows[k], &module, &m.phi)?;
        }
        if let Some(mean) = mean_phi(c, proj) {
            draw_panel(
                &rows[projs.len() + k],
                &format!("{proj}, mean over {n_layers} layers"),
                &mean,
            )?;
        }
    }
    Ok(())
}

/// Draws one heatmap per comparison into `out_dir`.
pub fn write_subspace_plots(
    comparisons: &[SubspaceComparison],
    out_dir: &Path,
) -> Result<Vec<Plot>, ReportError> {
    if comparisons.is_empty() {
        return Ok(Vec::new());
    }
    ensure_font()?;
    let mut plots = Vec::new();
    for c in comparisons {
        let slug: String = c
            .label
            .chars()
            .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
            .collect();
        let file_name = format!(
            "subspace_{}_{}_{}.png",
            file_stem(&c.task),
            c.kind.slug(),
            slug
        );
        let path = out_dir.join(&file_name);
        draw_to(&path, SUBSPACE_SIZE, |root| draw_comparison(root, c))?;
        plots.push(Plot {
            file_name,
            path,
            title: format!(
                "{}: subspace similarity of {}, {}",
                c.task,
                c.kind.label(),
                c.label
            ),
            task: Some(c.task.clone()),
        });
    }
    Ok(plots)
}

fn mean(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = xs.into_iter().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// One sentence on a comparison: φ(1,1) and φ(r₁,r₂) averaged over the matrices, each beside
/// what random subspaces give (E φ(i, j) = max(i, j) / d).
pub fn subspace_sentence(c: &SubspaceComparison) -> String {
    let n = c.modules.len();
    let dim = c.modules.first().map_or(0, |m| m.dim);
    let top = mean(c.modules.iter().filter_map(|m| m.at(1, 1)));
    let lasts: Vec<(usize, usize, f64)> = c.modules.iter().filter_map(|m| m.last()).collect();
    let (Some(top), Some(&(i, j, _)), true) = (top, lasts.first(), dim > 0) else {
        return format!(
            "**{}** ({}): the two adapters share no adapted matrix.",
            c.label,
            c.kind.label()
        );
    };
    let whole = mean(lasts.iter().map(|l| l.2)).unwrap_or(0.0);
    let random_top = 1.0 / dim as f64;
    let random_whole = i.max(j) as f64 / dim as f64;
    let verdict = if top > 0.5 {
        "their top directions largely coincide"
    } else if top > 10.0 * random_top && top > 0.05 {
        "their top directions overlap far more than chance, but are not the same"
    } else {
        "their top directions are no closer than random ones"
    };
    format!(
        "**Subspace similarity of {} ({})**: over {n} matrices, φ(1, 1) averages {top:.3} \
         (random subspaces of ℝ^{dim}: {random_top:.3}) and φ({i}, {j}) averages {whole:.3} \
         (random: {random_whole:.3}); {verdict}.",
        c.kind.label(),
        c.label
    )
}

/// Per (method, budget) of a task: the recorded update analyses of its ok runs.
fn analysed<'a>(
    records: &'a [RunRecord],
    task: &str,
) -> BTreeMap<(String, String), Vec<&'a RunRecord>> {
    let mut out: BTreeMap<(String, String), Vec<&RunRecord>> = BTreeMap::new();
    for r in records {
        if r.task == task && r.status == RunStatus::Ok && r.update_analysis.is_some() {
            out.entry((r.method.clone(), r.budget.clone()))
                .or_default()
                .push(r);
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

struct GroupStats {
    method: String,
    budget: String,
    rank: Option<usize>,
    runs: usize,
    matrices: usize,
    min_dim: usize,
    relative_norm: f64,
    eff_median: f64,
    eff_min: usize,
    eff_max: usize,
    factor: Option<f64>,
    projected: Option<f64>,
    random: Option<f64>,
    base_top: Option<f64>,
    amp_rank: Option<usize>,
}

fn group_stats(method: &str, budget: &str, runs: &[&RunRecord]) -> Option<GroupStats> {
    let ms: Vec<&crate::MatrixUpdate> = runs
        .iter()
        .filter_map(|r| r.update_analysis.as_ref())
        .flat_map(|a| &a.matrices)
        .collect();
    if ms.is_empty() {
        return None;
    }
    let eff: Vec<usize> = ms.iter().map(|m| m.effective_rank).collect();
    let amps: Vec<&crate::Amplification> =
        ms.iter().filter_map(|m| m.amplification.as_ref()).collect();
    let amp_mean = |f: &dyn Fn(&crate::Amplification) -> f64| mean(amps.iter().map(|a| f(a)));
    let rank = runs
        .first()
        .and_then(|r| r.knob.as_ref())
        .filter(|k| k.0 == "rank")
        .map(|k| k.1);
    Some(GroupStats {
        method: method.to_string(),
        budget: budget.to_string(),
        rank,
        runs: runs.len(),
        matrices: ms.len() / runs.len().max(1),
        min_dim: ms
            .iter()
            .map(|m| m.shape[0].min(m.shape[1]))
            .min()
            .unwrap_or(0),
        relative_norm: mean(ms.iter().map(|m| m.delta_norm / m.base_norm.max(1e-300)))
            .unwrap_or(0.0),
        eff_median: median(eff.iter().map(|&e| e as f64).collect()).unwrap_or(0.0),
        eff_min: eff.iter().copied().min().unwrap_or(0),
        eff_max: eff.iter().copied().max().unwrap_or(0),
        factor: amp_mean(&|a| a.factor),
        projected: amp_mean(&|a| a.projected_norm),
        random: amp_mean(&|a| a.random_norm),
        base_top: amp_mean(&|a| a.base_top_norm),
        amp_rank: median(amps.iter().map(|a| a.rank as f64).collect()).map(|r| r as usize),
    })
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// The section on the weight updates of one task; empty when no run recorded an analysis and
/// no comparison was made.
pub fn render_task(
    out: &mut String,
    records: &[RunRecord],
    task: &str,
    comparisons: &[SubspaceComparison],
    plots: &[Plot],
) {
    let groups: Vec<GroupStats> = analysed(records, task)
        .iter()
        .filter_map(|((m, b), runs)| group_stats(m, b, runs))
        .collect();
    let comps: Vec<&SubspaceComparison> = comparisons.iter().filter(|c| c.task == task).collect();
    if groups.is_empty() && comps.is_empty() {
        return;
    }
    let _ = writeln!(out, "### {task}: the weight updates (LoRA paper §7)\n");
    if !groups.is_empty() {
        let _ = writeln!(
            out,
            "Per projection matrix, averaged over runs and matrices: ‖ΔW‖_F / ‖W‖_F; ΔW's \
             effective rank (the fewest singular values holding 90% of Σσ²), median and range; \
             and at rank r (LoRA's r, else the effective rank) the amplification factor \
             ‖ΔW‖_F / ‖UᵀWV‖_F with U, V ΔW's top-r singular vectors, beside ‖UᵀWV‖_F for \
             random U, V and for W's own top-r directions.\n"
        );
        let _ = writeln!(
            out,
            "| method | budget | runs | matrices | ‖ΔW‖/‖W‖ | effective rank (90%) | of | r | amplification | ‖UᵀWV‖ | random | W's top-r |"
        );
        let _ = writeln!(
            out,
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
        );
        for g in &groups {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.4} | {} ({}–{}) | {} | {} | {} | {} | {} | {} |",
                g.method,
                g.budget,
                g.runs,
                g.matrices,
                g.relative_norm,
                g.eff_median,
                g.eff_min,
                g.eff_max,
                g.min_dim,
                g.amp_rank.map_or("–".into(), |r| r.to_string()),
                opt(g.factor, 2),
                opt(g.projected, 3),
                opt(g.random, 3),
                opt(g.base_top, 3),
            );
        }
        let _ = writeln!(out);
        for line in update_sentences(&groups) {
            let _ = writeln!(out, "{line}\n");
        }
    }
    for c in &comps {
        let _ = writeln!(out, "{}\n", subspace_sentence(c));
        let file_prefix = format!("subspace_{}_{}_", file_stem(&c.task), c.kind.slug());
        for p in plots
            .iter()
            .filter(|p| p.file_name.starts_with(&file_prefix) && p.title.ends_with(&c.label))
        {
            let _ = writeln!(out, "![{}]({})\n", p.title, p.file_name);
        }
    }
}

fn update_sentences(groups: &[GroupStats]) -> Vec<String> {
    let mut out = Vec::new();
    let lora_ranks: Vec<usize> = groups
        .iter()
        .filter(|g| g.method == "lora")
        .filter_map(|g| g.rank)
        .collect();
    if let Some(full) = groups.iter().find(|g| g.method == FULL_FINETUNE) {
        let share = full.eff_median / full.min_dim.max(1) as f64;
        let mut ranks = lora_ranks.clone();
        ranks.sort_unstable();
        let below: Vec<String> = ranks
            .iter()
            .filter(|&&r| full.eff_median > r as f64)
            .map(|r| format!("r = {r}"))
            .collect();
        let within: Vec<String> = ranks
            .iter()
            .filter(|&&r| full.eff_median <= r as f64)
            .map(|r| format!("r = {r}"))
            .collect();
        let lora_own = median(
            groups
                .iter()
                .filter(|g| g.method == "lora")
                .map(|g| g.eff_median)
                .collect(),
        );
        let mut against = Vec::new();
        if !below.is_empty() {
            against.push(format!("more than LoRA's {}", below.join(" and ")));
        }
        if !within.is_empty() {
            against.push(format!("within LoRA's {}", within.join(" and ")));
        }
        let against = if against.is_empty() {
            String::new()
        } else {
            format!(": {}", against.join(", "))
        };
        let own = lora_own.map_or(String::new(), |m| {
            format!("; LoRA's own updates hold 90% of their energy in a median of {m} direction(s)")
        });
        out.push(format!(
            "**Effective rank**: full fine-tuning's ΔW needs a median of {} of {} directions \
             ({:.0}%) to hold 90% of its energy (range {}–{}){against}{own}.",
            full.eff_median,
            full.min_dim,
            100.0 * share,
            full.eff_min,
            full.eff_max
        ));
    }
    for g in groups.iter().filter(|g| g.method == "lora") {
        if let (Some(f), Some(p), Some(rnd), Some(top)) =
            (g.factor, g.projected, g.random, g.base_top)
        {
            let relation = if p > 2.0 * rnd {
                "W already has these directions, more than random ones"
            } else {
                "W has these directions no more than random ones"
            };
            let size = if f >= 1.0 {
                format!("ΔW is {f:.2}× W's component along them")
            } else {
                format!(
                    "ΔW is smaller than W's component along them ({f:.2}×): most of its top-r \
                     directions carry little of its energy"
                )
            };
            out.push(format!(
                "**Amplification**, LoRA at {} (r = {}): ‖ΔW‖_F / ‖UᵀWV‖_F averages {f:.2}; \
                 W's norm along ΔW's top-r directions is {p:.3}, against {rnd:.3} along random \
                 ones and {top:.3} along W's own top ones: {relation}, and {size}.",
                g.budget,
                g.amp_rank.map_or("–".into(), |r| r.to_string())
            ));
        }
    }
    out
}

/// The tasks that have something for [`render_task`].
pub fn tasks_with_analyses(
    records: &[RunRecord],
    comparisons: &[SubspaceComparison],
) -> Vec<String> {
    tasks(records)
        .into_iter()
        .filter(|t| {
            records
                .iter()
                .any(|r| &r.task == t && r.update_analysis.is_some())
                || comparisons.iter().any(|c| &c.task == t)
        })
        .collect()
}

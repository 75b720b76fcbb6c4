//! Intervals and paired tests from per-example dev outcomes: a percentile bootstrap over the
//! dev examples (and over seeds when a group has several), a paired bootstrap of the
//! difference between two groups scored on the same examples, and Holm's correction across a
//! task's comparisons. Seeded, so a report made twice says the same.

use crate::outcomes::Outcomes;

/// Bootstrap resamples behind every interval and test.
pub const RESAMPLES: usize = 2000;

/// A 95% interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// 2.5th percentile.
    pub lo: f64,
    /// 97.5th percentile.
    pub hi: f64,
}

/// Group a minus group b on the same dev examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedTest {
    /// mean(a) − mean(b) on all examples.
    pub difference: f64,
    /// 95% interval of the difference.
    pub interval: Interval,
    /// Two-sided bootstrap p-value of "no difference".
    pub p: f64,
    /// No resample crossed zero: `p` is the smallest value the resamples can resolve, an
    /// upper bound rather than an estimate.
    pub p_at_floor: bool,
    /// Dev examples both were scored on.
    pub examples: usize,
}

/// SplitMix64: small, fast and good enough to draw resample indices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        // n is at most a few thousand: the modulo bias is below 1e-15.
        (self.next() % n as u64) as usize
    }
    fn indices(&mut self, n: usize) -> Vec<usize> {
        (0..n).map(|_| self.below(n)).collect()
    }
}

/// A seed from a label, so each comparison draws its own stream.
pub fn seed_of(label: &str) -> u64 {
    label.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos.fract());
    match sorted.get(i + 1) {
        Some(next) => sorted[i] + frac * (next - sorted[i]),
        None => sorted[i],
    }
}

fn interval(mut values: Vec<f64>) -> Option<Interval> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(Interval {
        lo: quantile(&values, 0.025),
        hi: quantile(&values, 0.975),
    })
}

/// Whether every run scores the same examples.
fn paired(runs: &[&Outcomes]) -> bool {
    runs.first()
        .is_some_and(|f| !f.is_empty() && runs.iter().all(|r| r.pairs_with(f)))
}

/// The group's score on `idx`: the mean over `members` (indices into runs) of each run's metric.
fn group_score(runs: &[&Outcomes], members: &[usize], metric: &str, idx: &[usize]) -> Option<f64> {
    let mut sum = 0.0;
    for &m in members {
        sum += runs[m].metric_on(metric, idx)?;
    }
    Some(sum / members.len() as f64)
}

/// Members of a group: all runs, or a resample of them when there are several seeds.
fn members(rng: &mut Rng, n: usize) -> Vec<usize> {
    if n > 1 {
        rng.indices(n)
    } else {
        vec![0]
    }
}

/// The resampled values of `stat`, dropping resamples where it is undefined (NaN); None when
/// more than a tenth are undefined, as the interval would then describe a different quantity.
fn resampled(resamples: usize, mut stat: impl FnMut() -> Option<f64>) -> Option<Vec<f64>> {
    let mut out = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let v = stat()?;
        if v.is_finite() {
            out.push(v);
        }
    }
    (out.len() * 10 >= resamples * 9).then_some(out)
}

/// 95% percentile bootstrap interval of a group's mean score. The runs (seeds) share a dev
/// set: each resample draws examples once for all of them, and draws the runs too when there
/// are several, so the interval covers both sources of noise. None when the runs do not share
/// their examples or the metric is mostly undefined.
pub fn bootstrap_interval(
    runs: &[&Outcomes],
    metric: &str,
    resamples: usize,
    seed: u64,
) -> Option<Interval> {
    if !paired(runs) {
        return None;
    }
    let n = runs[0].len();
    let mut rng = Rng(seed);
    let values = resampled(resamples, || {
        let m = members(&mut rng, runs.len());
        let idx = rng.indices(n);
        group_score(runs, &m, metric, &idx)
    })?;
    interval(values)
}

/// Paired bootstrap of mean(a) − mean(b) on the same dev examples: each resample draws the
/// examples once for both groups, and each group's runs on their own.
pub fn paired_test(
    a: &[&Outcomes],
    b: &[&Outcomes],
    metric: &str,
    resamples: usize,
    seed: u64,
) -> Option<PairedTest> {
    if !paired(a) || !paired(b) || !a[0].pairs_with(b[0]) {
        return None;
    }
    let n = a[0].len();
    let all: Vec<usize> = (0..n).collect();
    let (ma, mb): (Vec<usize>, Vec<usize>) = ((0..a.len()).collect(), (0..b.len()).collect());
    let difference = group_score(a, &ma, metric, &all)? - group_score(b, &mb, metric, &all)?;
    let mut rng = Rng(seed);
    let diffs = resampled(resamples, || {
        let (sa, sb) = (members(&mut rng, a.len()), members(&mut rng, b.len()));
        let idx = rng.indices(n);
        Some(group_score(a, &sa, metric, &idx)? - group_score(b, &sb, metric, &idx)?)
    })?;
    let k = diffs.len() as f64;
    let below = diffs.iter().filter(|d| **d <= 0.0).count() as f64;
    let above = diffs.iter().filter(|d| **d >= 0.0).count() as f64;
    let p = (2.0 * (below.min(above) + 1.0) / (k + 1.0)).min(1.0);
    Some(PairedTest {
        difference,
        interval: interval(diffs)?,
        p,
        p_at_floor: below.min(above) == 0.0,
        examples: n,
    })
}

/// Holm's step-down adjustment of p-values (family-wise error control), in input order.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let mut out = vec![0.0; m];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        let adj = ((m - rank) as f64 * p[i]).min(1.0);
        running = running.max(adj);
        out[i] = running;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bernoulli(n: usize, p: f64, seed: u64) -> Outcomes {
        let mut rng = Rng(seed);
        let gold = vec![1; n];
        let pred = (0..n)
            .map(|_| u32::from((rng.next() >> 11) as f64 / (1u64 << 53) as f64 <= p))
            .collect();
        Outcomes::Classes { gold, pred }
    }

    /// The interval covers the true accuracy about 95% of the time.
    #[test]
    fn bootstrap_interval_has_its_nominal_coverage() {
        let trials = 200;
        let covered = (0..trials)
            .filter(|&t| {
                let o = bernoulli(300, 0.7, t);
                let iv = bootstrap_interval(&[&o], "accuracy", 500, 99 + t).unwrap();
                iv.lo <= 0.7 && 0.7 <= iv.hi
            })
            .count();
        let rate = covered as f64 / trials as f64;
        assert!((0.89..=0.99).contains(&rate), "coverage {rate}");
    }

    /// Two groups that differ by a real margin are told apart; a group against an equal one
    /// is not.
    #[test]
    fn paired_test_separates_real_differences_only() {
        let good = bernoulli(400, 0.85, 1);
        let bad = bernoulli(400, 0.65, 2);
        let t = paired_test(&[&good], &[&bad], "accuracy", 1000, 3).unwrap();
        assert!(t.p < 0.01 && t.interval.lo > 0.0, "{t:?}");
        // 0.2 apart on 400 examples: no resample reaches zero, so p is the floor 2/(k+1).
        assert!(t.p_at_floor && (t.p - 2.0 / 1001.0).abs() < 1e-12, "{t:?}");
        let same = paired_test(&[&good], &[&good], "accuracy", 1000, 3).unwrap();
        assert_eq!(same.difference, 0.0);
        assert_eq!((same.interval.lo, same.interval.hi), (0.0, 0.0));
        assert_eq!(same.p, 1.0);
        assert!(!same.p_at_floor);
    }

    #[test]
    fn outcomes_of_other_examples_are_not_compared() {
        let a = bernoulli(10, 0.5, 1);
        let b = bernoulli(11, 0.5, 1);
        assert!(paired_test(&[&a], &[&b], "accuracy", 100, 1).is_none());
        assert!(bootstrap_interval(&[&a, &b], "accuracy", 100, 1).is_none());
        assert!(bootstrap_interval(&[&a], "pair_accuracy", 100, 1).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Holm's adjusted p-values are at least the raw ones, at most 1, and keep their order.
        #[test]
        fn holm_is_monotone_and_bounded(p in proptest::collection::vec(0.0f64..=1.0, 1..12)) {
            let adj = holm(&p);
            for i in 0..p.len() {
                prop_assert!(adj[i] >= p[i] && adj[i] <= 1.0);
                for j in 0..p.len() {
                    if p[i] < p[j] { prop_assert!(adj[i] <= adj[j]); }
                }
            }
        }

        /// An interval is ordered, lies within the metric's range, and is one point for
        /// outcomes that leave nothing to resample (all right or all wrong).
        #[test]
        fn intervals_are_ordered_and_degenerate_without_noise(n in 2usize..60, p in 0.0f64..=1.0, seed in 0u64..1000) {
            let o = bernoulli(n, p, seed);
            let iv = bootstrap_interval(&[&o], "accuracy", 200, seed).unwrap();
            prop_assert!(0.0 <= iv.lo && iv.lo <= iv.hi && iv.hi <= 1.0);
            let sure = Outcomes::Classes { gold: vec![1; n], pred: vec![1; n] };
            let iv = bootstrap_interval(&[&sure], "accuracy", 200, seed).unwrap();
            prop_assert_eq!((iv.lo, iv.hi), (1.0, 1.0));
        }
    }
}

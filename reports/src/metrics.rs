//! Evaluation metrics as GLUE defines them.

/// Fraction of predictions equal to the labels.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    if gold.is_empty() {
        return f64::NAN;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / gold.len() as f64
}

/// Binary F1 of the positive class 1.
pub fn f1_binary(pred: &[usize], gold: &[usize]) -> f64 {
    let tp = pred
        .iter()
        .zip(gold)
        .filter(|(p, g)| **p == 1 && **g == 1)
        .count() as f64;
    let fp = pred
        .iter()
        .zip(gold)
        .filter(|(p, g)| **p == 1 && **g != 1)
        .count() as f64;
    let fn_ = pred
        .iter()
        .zip(gold)
        .filter(|(p, g)| **p != 1 && **g == 1)
        .count() as f64;
    if tp == 0.0 {
        return 0.0;
    }
    2.0 * tp / (2.0 * tp + fp + fn_)
}

/// Matthews correlation coefficient of binary predictions (0 when undefined, as sklearn).
pub fn matthews(pred: &[usize], gold: &[usize]) -> f64 {
    let mut c = [[0f64; 2]; 2];
    for (p, g) in pred.iter().zip(gold) {
        c[(*g).min(1)][(*p).min(1)] += 1.0;
    }
    let (tn, fp, fn_, tp) = (c[0][0], c[0][1], c[1][0], c[1][1]);
    let den = ((tp + fp) * (tp + fn_) * (tn + fp) * (tn + fn_)).sqrt();
    if den == 0.0 {
        0.0
    } else {
        (tp * tn - fp * fn_) / den
    }
}

/// Pearson correlation (NaN when either side is constant).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    if x.len() < 2 {
        return f64::NAN;
    }
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx * syy).sqrt()
}

/// Ranks with ties given their average rank (1-based), as scipy.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in &idx[i..=j] {
            r[*k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman rank correlation.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(accuracy(&[1, 0, 1, 1], &[1, 0, 0, 1]), 0.75);
        // tp=2 fp=1 fn=0 -> f1 = 4/5
        assert!((f1_binary(&[1, 0, 1, 1], &[1, 0, 0, 1]) - 0.8).abs() < 1e-12);
        // tp=2 tn=1 fp=1 fn=0: (2·1 − 1·0)/√(3·2·2·1) = 2/√12
        assert!((matthews(&[1, 0, 1, 1], &[1, 0, 0, 1]) - 2.0 / 12f64.sqrt()).abs() < 1e-12);
        assert_eq!(matthews(&[1, 1, 1], &[1, 0, 1]), 0.0);
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]) - 0.997949).abs() < 1e-5);
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 15.0, 40.0]) - 0.8).abs() < 1e-12);
        assert_eq!(ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
    }
}

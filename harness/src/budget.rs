//! Matched parameter budgets: pick each method's size knob so its trainable count is the
//! closest achievable to a target, or say it cannot get close enough.

use peftbench_backbone::{ModelConfig, Transformer};
use peftbench_methods::{Knob, MethodConfig, MethodError};
use serde::{Deserialize, Serialize};

/// A target number of trainable parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Budget {
    /// A percentage of the base model's parameters.
    Percent(f64),
    /// An absolute count.
    Params(usize),
    /// No budget: the method's configured size.
    Default,
}

impl Budget {
    /// Parses `0.5%`, `20000`, `20k`, `1.2M` or `default`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("default") {
            return Ok(Budget::Default);
        }
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("budget `{s}`: not a percentage"))?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(format!("budget `{s}`: percentage must be in (0, 100]"));
            }
            return Ok(Budget::Percent(v));
        }
        let (num, mul) = match t.chars().last() {
            Some('k') | Some('K') => (&t[..t.len() - 1], 1e3),
            Some('m') | Some('M') => (&t[..t.len() - 1], 1e6),
            _ => (t, 1.0),
        };
        let v: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("budget `{s}`: expected a count, a percentage or `default`"))?;
        if v < 1.0 {
            return Err(format!("budget `{s}`: must be at least one parameter"));
        }
        Ok(Budget::Params((v * mul).round() as usize))
    }

    /// The target count for a base model of `base_params`, if any.
    pub fn target(&self, base_params: usize) -> Option<usize> {
        match self {
            Budget::Percent(p) => {
                Some(((p / 100.0) * base_params as f64).round().max(1.0) as usize)
            }
            Budget::Params(n) => Some(*n),
            Budget::Default => None,
        }
    }
}

/// A method sized to a budget.
#[derive(Debug, Clone)]
pub struct Matched {
    /// The configuration with its knob set.
    pub config: MethodConfig,
    /// The knob chosen.
    pub knob: Option<Knob>,
    /// Trainable parameters achieved.
    pub achieved: usize,
    /// (achieved − target) / target.
    pub deviation: Option<f64>,
}

/// Largest knob value tried.
const MAX_KNOB: usize = 4096;

/// Checks that `method` is a valid configuration for `model` at some size: at its own size,
/// or, for a method the budget resizes, at any size the matcher may pick. The error is the
/// configuration's own (an unknown target module, a dropout outside [0, 1)), not a budget one.
pub fn check_method(method: &MethodConfig, model: &ModelConfig) -> Result<(), MethodError> {
    let own = method.validate(model);
    if own.is_ok() || method.knob().is_none() {
        return own;
    }
    if (1..=MAX_KNOB).any(|v| method.with_knob(v).validate(model).is_ok()) {
        return Ok(());
    }
    own
}

/// Sizes `method` to `target` on `model`. A method whose closest count deviates by more than
/// `max_deviation` (relative) is unreachable: the error says why, and nothing is resized.
pub fn match_budget(
    method: &MethodConfig,
    model: &Transformer,
    target: Option<usize>,
    max_deviation: f64,
) -> Result<Matched, String> {
    let count = |c: &MethodConfig| c.num_trainable(model).map_err(|e| e.to_string());
    let (Some(target), Some(_)) = (target, method.knob()) else {
        let achieved = count(method)?;
        return Ok(Matched {
            config: method.clone(),
            knob: method.knob(),
            achieved,
            deviation: target.map(|t| (achieved as f64 - t as f64) / t as f64),
        });
    };
    let mut best: Option<(usize, MethodConfig, usize)> = None;
    for v in 1..=MAX_KNOB {
        let c = method.with_knob(v);
        if c.validate(&model.config).is_err() {
            continue;
        }
        let n = count(&c)?;
        let gap = n.abs_diff(target);
        if best.as_ref().is_none_or(|(g, _, _)| gap < *g) {
            best = Some((gap, c, n));
        }
        // Counts grow with the knob: once past the target, nothing later is closer.
        if n > target {
            break;
        }
    }
    let (_, config, achieved) = best.ok_or_else(|| format!("{}: no valid size", method.name()))?;
    let deviation = (achieved as f64 - target as f64) / target as f64;
    if deviation.abs() > max_deviation {
        let knob = config.knob().expect("has a knob");
        return Err(format!(
            "{} cannot reach {target} trainable parameters: the closest is {achieved} ({} = {}), {:+.0}% off (limit ±{:.0}%)",
            method.name(),
            knob.name,
            knob.value,
            deviation * 100.0,
            max_deviation * 100.0
        ));
    }
    Ok(Matched {
        knob: config.knob(),
        config,
        achieved,
        deviation: Some(deviation),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_budgets() {
        assert_eq!(Budget::parse("0.5%").unwrap(), Budget::Percent(0.5));
        assert_eq!(Budget::parse("20k").unwrap(), Budget::Params(20_000));
        assert_eq!(Budget::parse("1.5M").unwrap(), Budget::Params(1_500_000));
        assert_eq!(Budget::parse("default").unwrap(), Budget::Default);
        assert!(Budget::parse("-3%").is_err());
        assert!(Budget::parse("lots").is_err());
        assert_eq!(Budget::Percent(1.0).target(1000), Some(10));
    }
}

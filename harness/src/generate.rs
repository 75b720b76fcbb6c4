//! Greedy decoding with a key/value cache, and ROUGE-L of generations against references.

use candle_core::{Device, Tensor, D};
use peftbench_backbone::{lm_logits, Encoded, Inputs, Intervention, KvCache, Transformer};

/// Greedy continuation of `prompt`: up to `max_new_tokens` ids, stopping after `eos` (which
/// is not returned). One forward over the prompt fills the cache; each later step runs the
/// decoder on the one new token.
pub fn greedy(
    model: &Transformer,
    iv: &dyn Intervention,
    prompt: &[u32],
    max_new_tokens: usize,
    eos: Option<u32>,
) -> candle_core::Result<Vec<u32>> {
    if prompt.is_empty() {
        candle_core::bail!("greedy decoding needs a non-empty prompt");
    }
    let mut cache = KvCache::new();
    let mut out = Vec::new();
    let mut next = prompt.to_vec();
    let room = model
        .config
        .max_position_embeddings
        .saturating_sub(model.config.position_offset);
    while out.len() < max_new_tokens {
        // The model's positions bound the continuation, prefixes included.
        if cache.len() + next.len() > room {
            break;
        }
        let inputs = row(&next, model.device())?;
        let enc = peftbench_backbone::no_grad(|| model.forward_cached(&inputs, iv, &mut cache))
            .map_err(candle_core::Error::wrap)?;
        let id = argmax_last(model, &enc)?;
        if Some(id) == eos {
            break;
        }
        out.push(id);
        next = vec![id];
    }
    Ok(out)
}

/// Greedy decoding without a cache: the whole sequence again for every token. The reference
/// the cached path is tested against.
pub fn greedy_uncached(
    model: &Transformer,
    iv: &dyn Intervention,
    prompt: &[u32],
    max_new_tokens: usize,
    eos: Option<u32>,
) -> candle_core::Result<Vec<u32>> {
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_new_tokens {
        let inputs = row(&seq, model.device())?;
        let enc = peftbench_backbone::no_grad(|| model.forward(&inputs, iv))
            .map_err(candle_core::Error::wrap)?;
        let id = argmax_last(model, &enc)?;
        if Some(id) == eos {
            break;
        }
        out.push(id);
        seq.push(id);
    }
    Ok(out)
}

/// The most likely next token after the last position of a one-row forward.
fn argmax_last(model: &Transformer, enc: &Encoded) -> candle_core::Result<u32> {
    let logits = lm_logits(model, enc).map_err(candle_core::Error::wrap)?;
    let last = logits.dim(1)? - 1;
    logits
        .narrow(1, last, 1)?
        .flatten_all()?
        .argmax(D::Minus1)?
        .to_scalar::<u32>()
}

/// One unpadded row.
fn row(ids: &[u32], device: &Device) -> candle_core::Result<Inputs> {
    let n = ids.len();
    Ok(Inputs {
        input_ids: Tensor::from_vec(ids.to_vec(), (1, n), device)?,
        attention_mask: Tensor::ones((1, n), candle_core::DType::U32, device)?,
        token_type_ids: None,
        packing: None,
    })
}

/// ROUGE-L F1 of `candidate` against `reference` (Lin 2004): the longest common subsequence
/// of their tokens over each length, combined as 2PR/(P+R). Tokens are lower-cased runs of
/// letters and digits, as the `rouge_score` package tokenizes (without stemming).
pub fn rouge_l(candidate: &str, reference: &str) -> f64 {
    let c = words(candidate);
    let r = words(reference);
    if c.is_empty() || r.is_empty() {
        return 0.0;
    }
    let lcs = lcs_len(&c, &r) as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (p, rec) = (lcs / c.len() as f64, lcs / r.len() as f64);
    2.0 * p * rec / (p + rec)
}

fn words(text: &str) -> Vec<String> {
    text.split(|ch: char| !ch.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Length of the longest common subsequence, in O(len(b)) memory.
fn lcs_len(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rouge_l_matches_hand_computed_values() {
        // LCS of "the cat sat on the mat" and "the cat was on the mat" is 5 of 6 each way.
        let f = rouge_l("The cat sat on the mat.", "the cat was on the mat");
        assert!((f - 5.0 / 6.0).abs() < 1e-12, "{f}");
        assert_eq!(rouge_l("a b c", "a b c"), 1.0);
        assert_eq!(rouge_l("x y", "a b"), 0.0);
        assert_eq!(rouge_l("", "a"), 0.0);
        // Subsequence, not substring: "a c" in "a b c" is 2 of 3 (P = 1, R = 2/3).
        let f = rouge_l("a c", "a b c");
        assert!((f - 0.8).abs() < 1e-12, "{f}");
    }
}

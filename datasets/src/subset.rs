//! Reproducible subsetting without a `rand` dependency.
//!
//! The harness must pick e.g. 2,000 SST-2 rows identically on every machine and every
//! version of its dependencies, so the generator is a fixed, self-contained splitmix64.

/// Minimal splitmix64 generator (Steele, Lea & Flood 2014); fixed output for a seed.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// Next 64 random bits.
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform integer in `0..bound` (`bound > 0`), unbiased (Lemire's method with rejection).
    fn below(&mut self, bound: u64) -> u64 {
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(bound);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// Indices of a seeded random sample of `min(n, len)` distinct positions in `0..len`, in sampled order.
pub fn subset_indices(len: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut idx: Vec<usize> = (0..len).collect();
    let take = n.min(len);
    // Partial Fisher-Yates: only the first `take` slots need to be drawn.
    for i in 0..take {
        let j = i + rng.below((len - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(take);
    idx
}

/// A seeded random sample of `min(n, items.len())` items (all items, shuffled, if `n` is larger).
pub fn subset<T: Clone>(items: &[T], n: usize, seed: u64) -> Vec<T> {
    subset_indices(items.len(), n, seed)
        .into_iter()
        .map(|i| items[i].clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        let items: Vec<u32> = (0..1000).collect();
        let a = subset(&items, 100, 42);
        assert_eq!(a, subset(&items, 100, 42));
        assert_ne!(a, subset(&items, 100, 43));
        assert_eq!(a.len(), 100);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 100, "no duplicates");
        // A smaller sample with the same seed is a prefix of the larger one.
        assert_eq!(subset(&items, 10, 42), a[..10]);
    }

    #[test]
    fn oversized_request_returns_a_permutation() {
        let items = ["a", "b", "c"];
        let mut all = subset(&items, 10, 7);
        all.sort_unstable();
        assert_eq!(all, items);
        assert!(subset::<u8>(&[], 5, 1).is_empty());
        assert!(subset(&items, 0, 1).is_empty());
    }

    #[test]
    fn splitmix_reference_values() {
        // Known first outputs of splitmix64 for seed 1234567 (also checked with a Python transcription).
        let mut r = SplitMix64(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn below_is_roughly_uniform() {
        let mut r = SplitMix64(9);
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            counts[r.below(3) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
    }
}

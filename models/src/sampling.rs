//! Choosing the next token from logits: greedy at temperature 0, otherwise
//! temperature, top-k and top-p (nucleus) sampling from a seeded ChaCha8
//! stream, so a seeded run gives the same text on every machine. The
//! repetition penalty follows Hugging Face: positive logits of seen tokens are
//! divided by it, negative ones multiplied.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    /// 0 is greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 keeps all.
    pub top_p: f32,
    /// 1 is off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingConfig {
    /// One line naming what is wrong, if anything.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be 0 or more, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!("repetition penalty must be above 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }

    /// Whether the sampler just takes the highest logit (temperature 0):
    /// otherwise it ranks the whole vocabulary.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// How many of a step's logits this sampler reads: `Some(k)` when only the
    /// k highest can change its choice (greedy, or top-k, without a repetition
    /// penalty), `None` when it needs them all. A device that computes the
    /// logits for another sends just those ([`TopLogits`]).
    pub fn logits_needed(&self) -> Option<usize> {
        if self.repetition_penalty != 1.0 {
            // A penalty can lower every high logit below one that was not sent.
            None
        } else if self.is_greedy() {
            Some(1)
        } else if self.top_k > 0 {
            Some(self.top_k)
        } else {
            None
        }
    }
}

pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Sampler {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Sampler { config, rng }
    }

    /// The next token; `history` is every token so far (prompt included).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let penalty = self.config.repetition_penalty;
        if penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            seen.retain(|&t| (t as usize) < logits.len());
            for t in seen {
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
        if self.config.is_greedy() {
            return argmax(logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|a, b| rank(logits, *a, *b));
        if self.config.top_k > 0 {
            order.truncate(self.config.top_k);
        }
        let max = logits[order[0]];
        let mut probs: Vec<f64> =
            order.iter().map(|&i| (((logits[i] - max) / self.config.temperature) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.config.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= self.config.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let draw = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        let mut cumulative = 0.0;
        for (p, &token) in probs.iter().zip(&order) {
            cumulative += p;
            if draw < cumulative {
                return token as u32;
            }
        }
        *order.last().expect("at least one candidate") as u32
    }
}

/// No model's vocabulary comes near this; a bigger claim is not believed.
const MAX_VOCAB: usize = 1 << 24;

/// The highest logits of a step with their token ids: as much as a sampler
/// whose [`SamplingConfig::logits_needed`] is `Some(k)` reads, in a few bytes
/// rather than the whole vocabulary's.
#[derive(Clone, Debug, PartialEq)]
pub struct TopLogits {
    pub vocab: usize,
    /// Token id and logit, in the order the sampler ranks them.
    pub entries: Vec<(u32, f32)>,
}

impl TopLogits {
    /// The `k` highest of `logits`, ranked as [`Sampler::sample`] ranks them
    /// (the first is [`argmax`]'s); `None` when they are not all finite (the
    /// filler of [`TopLogits::expand`] could then tie with them), when any
    /// logit is NaN (which [`argmax`] and the ranking place differently) or
    /// `k` is not below the vocabulary: send them all.
    pub fn of(logits: &[f32], k: usize) -> Option<TopLogits> {
        if k == 0 || k >= logits.len() || logits.iter().any(|l| l.is_nan()) {
            return None;
        }
        let ids: Vec<usize> = if k == 1 {
            vec![argmax(logits) as usize]
        } else {
            let by_rank = |a: &usize, b: &usize| rank(logits, *a, *b);
            let mut ids: Vec<usize> = (0..logits.len()).collect();
            ids.select_nth_unstable_by(k - 1, by_rank);
            ids.truncate(k);
            ids.sort_by(by_rank);
            ids
        };
        let entries: Vec<(u32, f32)> = ids.into_iter().map(|i| (i as u32, logits[i])).collect();
        entries.iter().all(|(_, l)| l.is_finite()).then_some(TopLogits { vocab: logits.len(), entries })
    }

    /// The whole vocabulary's logits as the sampler sees them: the kept ones,
    /// and minus infinity, below all of them, everywhere else.
    pub fn expand(&self) -> Vec<f32> {
        let mut logits = vec![f32::NEG_INFINITY; self.vocab];
        for &(id, l) in &self.entries {
            logits[id as usize] = l;
        }
        logits
    }

    /// As 32-bit integers, a row per entry after a first of (vocabulary,
    /// entries): token id, then the logit's bits.
    pub fn to_words(&self) -> Vec<[i32; 2]> {
        let head = [self.vocab as i32, self.entries.len() as i32];
        std::iter::once(head).chain(self.entries.iter().map(|&(id, l)| [id as i32, l.to_bits() as i32])).collect()
    }

    pub fn from_words(words: &[[i32; 2]]) -> Result<TopLogits, String> {
        let bad = || format!("top logits: {} rows do not make a vocabulary size and its entries", words.len());
        let (&[vocab, n], rows) = words.split_first().ok_or_else(bad)?;
        let vocab = usize::try_from(vocab).map_err(|_| bad())?;
        if usize::try_from(n) != Ok(rows.len()) || vocab > MAX_VOCAB {
            return Err(bad());
        }
        let entries: Vec<(u32, f32)> =
            rows.iter().map(|&[id, bits]| (id as u32, f32::from_bits(bits as u32))).collect();
        if entries.iter().any(|&(id, _)| id as usize >= vocab) {
            return Err(format!("top logits: a token id is not below the vocabulary size {vocab}"));
        }
        Ok(TopLogits { vocab, entries })
    }
}

/// How the sampler ranks tokens `a` and `b`: the higher logit first, then the
/// lower id, -0.0 and 0.0 being equal; so, without NaNs, the first is [`argmax`]'s.
fn rank(logits: &[f32], a: usize, b: usize) -> std::cmp::Ordering {
    // Adding 0.0 turns -0.0 into 0.0 and leaves every other value as it was.
    (logits[b] + 0.0).total_cmp(&(logits[a] + 0.0)).then(a.cmp(&b))
}

/// Index of the largest logit; the first on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the sampler needs, sampling from the top logits alone
        /// picks what sampling from all of them picks, ties and signed zeros
        /// included; with a NaN among them, all of them are sent.
        #[test]
        fn the_top_logits_sample_like_all_of_them(
            levels in proptest::collection::vec(-3i8..4, 2..60),
            temperature in prop_oneof![Just(0.0f32), 0.1f32..2.0],
            top_k in 0usize..8,
            top_p in prop_oneof![Just(1.0f32), 0.05f32..1.0],
            seed in any::<u64>(),
            nan_at in proptest::option::weighted(0.1, 0usize..60),
        ) {
            // Few distinct values, so ties are common; -0.0 and 0.0 both occur.
            let mut logits: Vec<f32> = levels.iter().enumerate().map(|(i, &l)| if l == 0 && i % 2 == 1 { -0.0 } else { f32::from(l) / 2.0 }).collect();
            if let Some(at) = nan_at.filter(|at| *at < logits.len()) {
                logits[at] = f32::NAN;
            }
            let config = SamplingConfig { temperature, top_k, top_p, seed, ..Default::default() };
            let Some(k) = config.logits_needed() else { return Ok(()) };
            let Some(top) = TopLogits::of(&logits, k) else {
                prop_assert!(k >= logits.len() || logits.iter().any(|l| l.is_nan()));
                return Ok(());
            };
            prop_assert!(logits.iter().all(|l| !l.is_nan()));
            prop_assert_eq!(TopLogits::from_words(&top.to_words()), Ok(top.clone()));
            let (mut all, mut kept) = (Sampler::new(config.clone()), Sampler::new(config));
            for _ in 0..4 {
                prop_assert_eq!(all.sample(&mut logits.clone(), &[]), kept.sample(&mut top.expand(), &[]));
            }
        }
    }

    #[test]
    fn samplers_that_read_every_logit_get_them_all() {
        let penalised = SamplingConfig { repetition_penalty: 1.2, ..Default::default() };
        assert_eq!(penalised.logits_needed(), None);
        let nucleus = SamplingConfig { temperature: 0.7, top_p: 0.9, ..Default::default() };
        assert_eq!(nucleus.logits_needed(), None);
        assert_eq!(TopLogits::of(&[1.0, f32::NAN, 0.5], 2), None);
        // Greedy takes the first of equal maxima, though total order ranks 0.0 above -0.0.
        assert_eq!(TopLogits::of(&[-1.0, -0.0, 0.0], 1).map(|t| t.entries), Some(vec![(1, -0.0)]));
        assert!(TopLogits::from_words(&[[1 << 30, 0]]).is_err());
        assert!(TopLogits::from_words(&[[4, 1], [4, 0]]).is_err());
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&mut [0.0, 3.0, 3.0, 1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let config = SamplingConfig { temperature: 1.0, top_k: 1, ..Default::default() };
        let mut s = Sampler::new(config);
        assert_eq!(s.sample(&mut [0.0, 1.0, 5.0], &[]), 2);
        let config = SamplingConfig { temperature: 1.0, seed: 7, ..Default::default() };
        let draws = |c: &SamplingConfig| {
            let mut s = Sampler::new(c.clone());
            (0..20).map(|_| s.sample(&mut [1.0, 1.1, 0.9, 1.0], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draws(&config), draws(&config));
        assert!(draws(&config).iter().any(|&t| t != draws(&config)[0]), "sampling should vary");
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let config = SamplingConfig { temperature: 1.0, top_p: 0.5, ..Default::default() };
        let mut s = Sampler::new(config);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 10.0, 0.0], &[]), 1);
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let config = SamplingConfig { repetition_penalty: 4.0, ..Default::default() };
        let mut s = Sampler::new(config);
        assert_eq!(s.sample(&mut [2.0, 1.0], &[0]), 1);
        assert!(SamplingConfig { top_p: 0.0, ..Default::default() }.validate().is_err());
    }
}

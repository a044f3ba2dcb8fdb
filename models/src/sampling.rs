//! Choosing the next token from logits: greedy at temperature 0, otherwise
//! temperature, top-k and top-p (nucleus) sampling from a seeded ChaCha8
//! stream, so a seeded run gives the same text on every machine. At a
//! temperature it weighs every token but ranks them only as far as it reads
//! (the top k, the nucleus, the draw), which for a peaked distribution is a
//! few hundred tokens of the vocabulary. The
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
    /// otherwise it weighs every token and ranks them as far as it reads.
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
    /// A token's worth of [`Ranking`] keys and weights, kept for the next: a
    /// vocabulary's worth is a megabyte or more, which the allocator would
    /// give back to the system and fault in again for every token.
    keys: Vec<u64>,
    weights: Vec<f64>,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Sampler {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Sampler { config, rng, keys: Vec::new(), weights: Vec::new() }
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
        let logits: &[f32] = logits;
        let vocab = logits.len();
        let mut ranking = Ranking::new(&mut self.keys, logits);
        // The candidates are the top k, or the whole vocabulary.
        let candidates = match self.config.top_k {
            k if k > 0 && k < vocab => k,
            _ => vocab,
        };
        let (max, temperature) = (logits[ranking.nth(0)], self.config.temperature);
        let exp = |token: usize| (((logits[token] - max) / temperature) as f64).exp();
        // Over the whole vocabulary, each weight is read at least twice: work them out once.
        self.weights.clear();
        if candidates == vocab {
            self.weights.extend((0..vocab).map(exp));
        }
        let weights = &self.weights;
        let weight = |token: usize| if weights.is_empty() { exp(token) } else { weights[token] };
        let total = ranking.sum(candidates, weight);
        let probability = |token: usize| weight(token) / total;
        let kept = if self.config.top_p < 1.0 {
            let mut cumulative = 0.0;
            (0..candidates)
                .position(|r| {
                    cumulative += probability(ranking.nth(r));
                    cumulative >= self.config.top_p as f64
                })
                .map_or(candidates, |r| r + 1)
        } else {
            candidates
        };
        let total = ranking.sum(kept, probability);
        let draw = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        let mut cumulative = 0.0;
        for r in 0..kept {
            let token = ranking.nth(r);
            cumulative += probability(token);
            if draw < cumulative {
                return token as u32;
            }
        }
        ranking.nth(kept - 1) as u32
    }
}

/// Token ids in the order the sampler ranks them, worked out only as far as
/// they are read. Each time the reader runs past the ranked ones, a partial
/// selection finds the next chunk (64 first, then eight times as many as are
/// ranked) and only that chunk is sorted; once a chunk would be half of what
/// is left, the rest is sorted whole. Top-k, the nucleus of a peaked
/// distribution and a draw from it end within the first few hundred tokens,
/// so sampling from a 150 000-token vocabulary does not sort it.
struct Ranking<'a> {
    /// [`rank_key`]s: `keys[..ranked]` in order, each below all of `keys[ranked..]`.
    keys: &'a mut Vec<u64>,
    ranked: usize,
}

impl<'a> Ranking<'a> {
    const FIRST_CHUNK: usize = 64;

    /// The ranking of `logits`, in `keys` (whatever they held before).
    fn new(keys: &'a mut Vec<u64>, logits: &[f32]) -> Ranking<'a> {
        keys.clear();
        keys.extend(logits.iter().enumerate().map(|(id, &l)| rank_key(id, l)));
        Ranking { keys, ranked: 0 }
    }

    /// The token ranked `r`th, the first being 0.
    fn nth(&mut self, r: usize) -> usize {
        if r >= self.ranked {
            self.rank_to((r + 1).max(8 * self.ranked).max(Self::FIRST_CHUNK));
        }
        key_id(self.keys[r])
    }

    /// The first `n` tokens, in rank order.
    fn first(&mut self, n: usize) -> impl Iterator<Item = usize> + '_ {
        self.rank_to(n);
        self.keys[..n].iter().map(|&key| key_id(key))
    }

    /// The sum of `f` over the first `n` tokens: in rank order, or in id order
    /// when `n` is the whole vocabulary, which then needs no ranking.
    fn sum(&mut self, n: usize, f: impl Fn(usize) -> f64) -> f64 {
        if n == self.keys.len() { (0..n).map(f).sum() } else { self.first(n).map(f).sum() }
    }

    fn rank_to(&mut self, n: usize) {
        let n = n.min(self.keys.len());
        if n <= self.ranked {
            return;
        }
        let rest = &mut self.keys[self.ranked..];
        let wanted = n - self.ranked;
        if 2 * wanted < rest.len() {
            rest.select_nth_unstable(wanted - 1);
            rest[..wanted].sort_unstable();
            self.ranked = n;
        } else {
            rest.sort_unstable();
            self.ranked = self.keys.len();
        }
    }
}

/// A token's place in the sampler's ranking as one integer, lower first: the
/// higher logit first (as `f32::total_cmp` orders them, but with -0.0 and 0.0
/// equal), then the lower id; so, without NaNs, the first is [`argmax`]'s.
fn rank_key(id: usize, logit: f32) -> u64 {
    // Adding 0.0 turns -0.0 into 0.0 and leaves every other value as it was.
    let bits = (logit + 0.0).to_bits();
    // Ascending in total order: negatives reversed below positives.
    let ascending = if bits >> 31 == 1 { !bits } else { bits | 1 << 31 };
    (u64::from(!ascending) << 32) | id as u64
}

fn key_id(key: u64) -> usize {
    (key & u64::from(u32::MAX)) as usize
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
        let entries: Vec<(u32, f32)> = if k == 1 {
            let best = argmax(logits);
            vec![(best, logits[best as usize])]
        } else {
            let mut keys = Vec::new();
            Ranking::new(&mut keys, logits).first(k).map(|id| (id as u32, logits[id])).collect()
        };
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
    use rand::RngCore;

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

    /// The sampler as it reads: rank the whole vocabulary, keep the top k,
    /// normalise, keep the nucleus, draw. Sums over the whole vocabulary go in
    /// id order, as [`Ranking::sum`]'s.
    fn sample_by_sorting(config: &SamplingConfig, rng: &mut ChaCha8Rng, logits: &[f32]) -> u32 {
        let in_order = |order: &[usize], values: &[f64]| {
            if order.len() == logits.len() {
                let mut by_id = vec![0.0; logits.len()];
                order.iter().zip(values).for_each(|(&i, &v)| by_id[i] = v);
                by_id.iter().sum::<f64>()
            } else {
                values.iter().sum()
            }
        };
        let mut order: Vec<usize> = (0..logits.len()).collect();
        // The higher logit first, -0.0 and 0.0 equal, then the lower id.
        order.sort_by(|&a, &b| (logits[b] + 0.0).total_cmp(&(logits[a] + 0.0)).then(a.cmp(&b)));
        if config.top_k > 0 {
            order.truncate(config.top_k);
        }
        let max = logits[order[0]];
        let mut probs: Vec<f64> =
            order.iter().map(|&i| (((logits[i] - max) / config.temperature) as f64).exp()).collect();
        let total = in_order(&order, &probs);
        probs.iter_mut().for_each(|p| *p /= total);
        if config.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= config.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total = in_order(&order, &probs);
        let draw = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        let mut cumulative = 0.0;
        for (p, &token) in probs.iter().zip(&order) {
            cumulative += p;
            if draw < cumulative {
                return token as u32;
            }
        }
        *order.last().unwrap() as u32
    }

    proptest! {
        /// Ranking only as far as it reads, the sampler draws what sorting the
        /// whole vocabulary draws: over vocabularies past several chunks, flat
        /// (the draw far down the ranking) and peaked, with ties.
        #[test]
        fn the_sampler_draws_what_sorting_everything_draws(
            levels in proptest::collection::vec(-3i8..4, 1..700),
            spread in prop_oneof![Just(0.01f32), Just(0.5f32), Just(4.0f32)],
            temperature in 0.1f32..2.0,
            top_k in prop_oneof![Just(0usize), 1usize..800],
            top_p in prop_oneof![Just(1.0f32), 0.05f32..1.0],
            seed in any::<u64>(),
        ) {
            let logits: Vec<f32> = levels.iter().map(|&l| f32::from(l) * spread).collect();
            let config = SamplingConfig { temperature, top_k, top_p, seed, ..Default::default() };
            let (mut sampler, mut rng) = (Sampler::new(config.clone()), ChaCha8Rng::seed_from_u64(seed));
            for _ in 0..4 {
                prop_assert_eq!(sampler.sample(&mut logits.clone(), &[]), sample_by_sorting(&config, &mut rng, &logits));
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

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
        if self.config.temperature == 0.0 {
            return argmax(logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
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

//! `just bench-sampler`: the time to pick one token from a step's logits, for
//! a Llama-sized vocabulary (32 000) and a Qwen2-sized one (151 936), greedy
//! and at a temperature with top-k, top-p or neither; against sorting the
//! whole vocabulary, which sampling at a temperature needs at most (it ranks
//! only as far as it reads). The logits are seeded normal draws: peaked
//! (σ = 3, most of the probability on a few dozen tokens, as a trained
//! model's usually is) and flat (σ = 0.3, the probability spread over most of
//! the vocabulary: the worst case, where the ranking is read far down).

use std::time::Instant;

use llnode_models::sampling::{Sampler, SamplingConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DRAWS: usize = 60;

/// `n` seeded draws from a normal distribution of spread `sigma` (Box-Muller).
fn logits(n: usize, sigma: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (u, v): (f32, f32) = (1.0 - rng.random::<f32>(), rng.random());
            sigma * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

/// Median milliseconds of `f` over `DRAWS` calls, each on a fresh copy of one of the steps' logits.
fn median_ms(steps: &[Vec<f32>], mut f: impl FnMut(&mut [f32])) -> f64 {
    let mut times: Vec<f64> = (0..DRAWS)
        .map(|i| {
            let mut logits = steps[i % steps.len()].clone();
            let start = Instant::now();
            f(&mut logits);
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[DRAWS / 2]
}

fn main() {
    let at = |top_k, top_p| SamplingConfig { temperature: 0.8, top_k, top_p, ..Default::default() };
    let settings = [
        ("greedy", SamplingConfig::default()),
        ("temperature 0.8", at(0, 1.0)),
        ("0.8, top-k 40", at(40, 1.0)),
        ("0.8, top-p 0.9", at(0, 0.9)),
        ("0.8, top-k 40, top-p 0.95", at(40, 0.95)),
    ];
    println!("one token from a step's logits, median of {DRAWS} (ms); x: times faster than sorting the vocabulary");
    for vocab in [32_000, 151_936] {
        for (shape, sigma) in [("peaked", 3.0), ("flat", 0.3)] {
            let steps: Vec<Vec<f32>> = (0..4).map(|seed| logits(vocab, sigma, seed)).collect();
            let sort = median_ms(&steps, |l| {
                let mut order: Vec<u32> = (0..l.len() as u32).collect();
                order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
                std::hint::black_box(order);
            });
            println!("vocabulary {vocab}, {shape} logits: sorting it takes {sort:.3} ms");
            for (name, config) in &settings {
                let mut sampler = Sampler::new(config.clone());
                let ms = median_ms(&steps, |l| {
                    std::hint::black_box(sampler.sample(l, &[]));
                });
                println!("  {name:<26} {ms:>7.3} ms {:>7.1}x", sort / ms);
            }
        }
    }
}

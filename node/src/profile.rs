//! This device's profile for the planner: memory it may use, the time each
//! of the model's units takes on its own runner, and links to its peers.
//! Also the conversion from a package's cost profile to the planner's cost
//! model, which keeps `models` and `planner` independent of each other.

use std::path::Path;

use llnode_models::cost::CostProfile;
use llnode_models::model::Model;
use llnode_planner::cost::{ModelCost, SkipTensor, UnitCost};
use llnode_planner::profile::DeviceProfile;

/// Memory kept back for the system and the node itself.
const RESERVE_BYTES: u64 = 512 << 20;
/// Prompt length and decode steps of the unit timing run.
const PROFILE_PROMPT: usize = 16;
const PROFILE_STEPS: usize = 8;

pub fn model_cost(cost: &CostProfile) -> ModelCost {
    ModelCost {
        units: cost
            .units
            .iter()
            .map(|u| UnitCost {
                name: u.name.clone(),
                weight_bytes: u.weight_bytes,
                flops_per_token: u.flops_per_token,
                out_bytes_per_token: u.out_bytes_per_token,
            })
            .collect(),
        skips: cost
            .skips
            .iter()
            .map(|s| SkipTensor {
                name: s.name.clone(),
                producer: s.producer,
                consumers: s.consumers.clone(),
                bytes_per_token: s.bytes_per_token,
            })
            .collect(),
        kv_bytes_per_token: cost.units.iter().map(|u| u.kv_bytes_per_token).collect(),
    }
}

/// Memory this device offers: the cap if given, else what the system has available minus a reserve.
pub fn memory_bytes(cap: Option<u64>) -> u64 {
    cap.unwrap_or_else(|| available_memory().saturating_sub(RESERVE_BYTES))
}

fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(2 << 30, |kb| kb * 1024)
}

/// Measures this device: every unit of the package timed on its own runner
/// (blocking: seconds for big models).
pub fn measure(id: &str, name: &str, package: Option<&Path>, memory_cap: Option<u64>) -> anyhow::Result<DeviceProfile> {
    let mem = memory_bytes(memory_cap);
    let Some(package) = package else {
        return Ok(DeviceProfile::new(id, name, mem, arithmetic_speed()));
    };
    let model = Model::open(package)?;
    let timings = llnode_models::pipeline::time_units(&model, PROFILE_PROMPT, PROFILE_STEPS)?;
    let cost = CostProfile::of(&model);
    let flops: u64 = cost.units.iter().map(|u| u.flops_per_token).sum();
    let secs: f64 = timings.iter().map(|t| t.decode_s).sum();
    let mut profile = DeviceProfile::new(id, name, mem, flops as f64 / secs.max(1e-9));
    profile.unit_time_s = Some(timings.iter().map(|t| t.decode_s).collect());
    Ok(profile)
}

/// Rough multiply-add speed for a device without the model: a small
/// matrix product in plain Rust (the model's runner is faster; the planner
/// replaces this with measured unit times once the device has the units).
fn arithmetic_speed() -> f64 {
    const N: usize = 128;
    let a: Vec<f32> = (0..N * N).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..N * N).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; N * N];
    let started = std::time::Instant::now();
    let mut reps = 0;
    while started.elapsed().as_millis() < 50 {
        for i in 0..N {
            for k in 0..N {
                let x = a[i * N + k];
                for j in 0..N {
                    c[i * N + j] += x * b[k * N + j];
                }
            }
        }
        reps += 1;
    }
    std::hint::black_box(&c);
    (2 * N * N * N * reps) as f64 / started.elapsed().as_secs_f64()
}

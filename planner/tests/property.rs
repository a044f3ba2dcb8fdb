//! Property tests on random small instances:
//!
//! - the MIP's plans are optimal: its objective equals the exhaustive
//!   optimum (within 1e-6 relative), for both objectives, with and without
//!   privacy, and both call the same instances infeasible with the same
//!   message;
//! - the simulator replays any plan at the plan's own figures: one sequence
//!   at its latency, many at its slowest device's pace;
//! - a plan whose cut moves or whose device repeats fails its check.

use llnode_planner::config::{Config, Objective};
use llnode_planner::cost::{ModelCost, SkipTensor, UnitCost};
use llnode_planner::plan::Method;
use llnode_planner::plan::PlanError;
use llnode_planner::profile::{Battery, Thermal};
use llnode_planner::profile::{DeviceProfile, Link, connect_by};
use llnode_planner::simulate::simulate;
use llnode_planner::{assign, exhaustive};
use proptest::prelude::*;

/// A small deterministic generator, so one seed describes one instance.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct Case {
    model: ModelCost,
    devices: Vec<DeviceProfile>,
    config: Config,
}

fn case(seed: u64, devices: usize, units: usize) -> Case {
    let mut rng = Rng(seed | 1);
    // A few unit templates, so that runs of identical units (blocks) occur.
    let templates: Vec<(u64, u64, u64, u64)> = (0..3)
        .map(|_| {
            (
                rng.range(1, 100) * 1_000_000,
                rng.range(1, 100) * 10_000_000,
                rng.range(1, 100) * 10_000,
                if rng.chance(50) { 0 } else { rng.range(1, 10) * 1_000 },
            )
        })
        .collect();
    let mut unit_costs = Vec::new();
    let mut kv = Vec::new();
    let mut template = 0;
    for u in 0..units {
        if rng.chance(35) {
            template = rng.below(3) as usize;
        }
        let (weight, flops, out, kv_bytes) = templates[template];
        unit_costs.push(UnitCost {
            name: format!("unit {u}"),
            weight_bytes: weight,
            flops_per_token: flops,
            out_bytes_per_token: out,
        });
        kv.push(kv_bytes);
    }
    let mut skips = Vec::new();
    if units >= 2 {
        for s in 0..rng.below(3) {
            let producer = rng.below(units as u64 - 1) as usize;
            let mut consumers: Vec<usize> = (producer + 1..units).filter(|_| rng.chance(60)).collect();
            if consumers.is_empty() {
                consumers.push(units - 1);
            }
            skips.push(SkipTensor {
                name: format!("skip {s}"),
                producer,
                consumers,
                bytes_per_token: rng.range(1, 50) * 1_000,
            });
        }
    }
    let model = ModelCost { units: unit_costs, skips, kv_bytes_per_token: kv };
    let context = rng.range(0, 2048);
    let need = model.total_memory(context);
    // Per-device radios: links between two devices take the slower one.
    let mut profiles: Vec<DeviceProfile> = Vec::new();
    let mut radios: Vec<Link> = Vec::new();
    for d in 0..devices {
        if d > 0 && rng.chance(25) {
            // An identical twin of the previous device.
            let mut twin = profiles[d - 1].clone();
            twin.id = format!("d{d}");
            profiles.push(twin);
            radios.push(radios[d - 1]);
            continue;
        }
        let mem = need * rng.range(20, 120) / 100 + 1;
        let mut device =
            DeviceProfile::new(&format!("d{d}"), &format!("Device {d}"), mem, rng.range(1, 20) as f64 * 1e9);
        if rng.chance(25) {
            device.unit_time_s = Some((0..units).map(|_| rng.range(1, 100) as f64 * 1e-3).collect());
        }
        if rng.chance(10) {
            device.thermal = Some(Thermal::Moderate);
        }
        if rng.chance(10) {
            device.battery = Some(Battery { level: 0.5, charging: false });
        }
        profiles.push(device);
        radios
            .push(Link { bandwidth_bytes_per_s: rng.range(1, 50) as f64 * 1e6, rtt_s: rng.range(0, 20) as f64 * 1e-3 });
    }
    let asymmetric = rng.chance(30);
    connect_by(&mut profiles, |a, b| {
        if asymmetric {
            Link { bandwidth_bytes_per_s: rng.range(1, 50) as f64 * 1e6, rtt_s: rng.range(0, 20) as f64 * 1e-3 }
        } else {
            radios[a].slower_of(radios[b])
        }
    });
    let config = Config {
        objective: if rng.chance(50) { Objective::Latency } else { Objective::Throughput },
        context_tokens: context,
        privacy: rng.chance(30).then(|| format!("d{}", rng.below(devices as u64))),
        // Exact costs: the MIP is held to the exhaustive optimum.
        interchangeable: 0.0,
        // With and without the search's seed (and the cutoff it brings).
        warm_start: rng.chance(70),
        ..Config::default()
    };
    Case { model, devices: profiles, config }
}

fn agree(seed: u64, devices: usize, units: usize) -> Result<(), TestCaseError> {
    let Case { model, devices, config } = case(seed, devices, units);
    let mip = assign::plan(&model, &devices, &config);
    let best = exhaustive::plan(&model, &devices, &config);
    match (mip, best) {
        (Ok(mip), Ok(best)) => {
            mip.check(&model, &devices).map_err(|e| TestCaseError::fail(format!("MIP plan fails its check: {e}")))?;
            let tolerance = 1e-6 * best.objective_s.abs().max(1e-9);
            prop_assert!(
                (mip.objective_s - best.objective_s).abs() <= tolerance,
                "{:?} under {:?}: MIP {} s ({:?}) vs exhaustive {} s ({:?})",
                config.objective,
                config.privacy,
                mip.objective_s,
                mip.assignment(),
                best.objective_s,
                best.assignment(),
            );
            prop_assert!(matches!(mip.method, Method::Mip { proven_optimal: true, .. }), "{:?}", mip.method);
        }
        (Err(a @ PlanError::Infeasible { .. }), Err(b @ PlanError::Infeasible { .. })) => {
            prop_assert_eq!(a.to_string(), b.to_string());
            let message = a.to_string();
            prop_assert!(message.contains("the model needs") && message.contains("these devices offer"));
        }
        (Err(PlanError::AllExcluded { .. }), Err(PlanError::AllExcluded { .. })) => {}
        (mip, best) => {
            return Err(TestCaseError::fail(format!(
                "they disagree: MIP {:?}, exhaustive {:?}",
                mip.map(|p| p.objective_s),
                best.map(|p| p.objective_s)
            )));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn mip_matches_exhaustive_on_few_units(seed in any::<u64>(), devices in 1usize..=4, units in 1usize..=8) {
        agree(seed, devices, units)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Up to five devices on up to twelve units, or four on up to 24.
    #[test]
    fn mip_matches_exhaustive_on_larger_instances(seed in any::<u64>(), five in any::<bool>(), units in 6usize..=24) {
        let (devices, units) = if five { (5, units.min(12)) } else { (4, units) };
        agree(seed, devices, units)?;
    }
}

fn replays(seed: u64, devices: usize, units: usize) -> Result<(), TestCaseError> {
    let Case { model, devices, config } = case(seed, devices, units);
    let plans =
        [assign::plan(&model, &devices, &config), llnode_planner::baseline::by_memory(&model, &devices, &config)];
    for plan in plans.into_iter().flatten() {
        if plan.check(&model, &devices).is_err() {
            continue;
        }
        let one = simulate(&plan, &model, &devices, &config, 1).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!((one.latency_s - plan.latency_s).abs() <= 1e-9 * plan.latency_s.max(1e-9));
        let many = simulate(&plan, &model, &devices, &config, 2 * plan.stages.len() + 2)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let pace = 1.0 / plan.bottleneck_s;
        prop_assert!(many.tokens_per_s <= pace * 1.02, "{} > {pace}", many.tokens_per_s);
        prop_assert!(many.tokens_per_s >= pace * 0.9, "{} < {pace}", many.tokens_per_s);
        prop_assert!(many.tokens_per_s >= one.tokens_per_s * 0.999);
    }
    Ok(())
}

fn checks(seed: u64, devices: usize, units: usize) -> Result<(), TestCaseError> {
    let Case { model, devices, config } = case(seed, devices, units);
    let Ok(plan) = assign::plan(&model, &devices, &config) else {
        return Ok(());
    };
    prop_assert!(plan.check(&model, &devices).is_ok());
    if plan.stages.len() >= 2 && plan.stages[0].units.len() >= 2 {
        let mut moved = plan.clone();
        moved.stages[0].units.end -= 1;
        prop_assert!(moved.check(&model, &devices).is_err());
    }
    if plan.stages.len() >= 3 {
        let mut repeated = plan.clone();
        repeated.stages[1].device = repeated.stages[2].device.clone();
        prop_assert!(repeated.check(&model, &devices).is_err());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn simulation_replays_plans_at_their_figures(seed in any::<u64>(), devices in 1usize..=4, units in 1usize..=10) {
        replays(seed, devices, units)?;
    }

    #[test]
    fn moved_cuts_and_repeated_devices_fail_the_check(seed in any::<u64>(), devices in 2usize..=4, units in 2usize..=10) {
        checks(seed, devices, units)?;
    }
}

/// Many more seeds than the property tests, for a longer check:
/// `SOAK=5000 cargo test --release -p llnode-planner --test property soak -- --ignored`.
#[test]
#[ignore]
fn soak() {
    let n: u64 = std::env::var("SOAK").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let mut failures = 0;
    for seed in 0..n {
        let s = seed.wrapping_mul(0x9E3779B97F4A7C15) ^ 0x1234_5678;
        let devices = 1 + (seed % 5) as usize;
        let units = 1 + ((seed / 5) % if devices == 5 { 12 } else { 16 }) as usize;
        if let Err(e) = agree(s, devices, units) {
            failures += 1;
            println!("seed {s} devices {devices} units {units}: {e}");
        }
    }
    assert_eq!(failures, 0);
}

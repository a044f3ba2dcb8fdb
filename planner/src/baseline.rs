//! Rules of thumb other systems split models by, to measure the planner
//! against. Each uses every device that may take work, runs the units in one
//! pass without regard to links or privacy, and may not fit: check the plan
//! ([`Plan::check`]) before trusting it.
//!
//! - [`even`]: the same number of units on every device, in input order;
//! - [`by_memory`]: units in proportion to memory, largest memory first
//!   (exo-style memory-weighted partitioning);
//! - [`by_compute`]: units in proportion to speed, fastest first
//!   (Cake-style split by compute capability).

use std::ops::Range;

use crate::config::Config;
use crate::cost::ModelCost;
use crate::instance::Instance;
use crate::plan::{Method, Plan, PlanError};
use crate::profile::DeviceProfile;

/// The same number of units on every device, in input order.
pub fn even(model: &ModelCost, devices: &[DeviceProfile], config: &Config) -> Result<Plan, PlanError> {
    let instance = instance(model, devices, config)?;
    let order: Vec<usize> = (0..instance.devices()).collect();
    let weights = vec![1.0; order.len()];
    Ok(split(&instance, &order, &weights, "even split"))
}

/// Units in proportion to memory, the largest memory first.
pub fn by_memory(model: &ModelCost, devices: &[DeviceProfile], config: &Config) -> Result<Plan, PlanError> {
    let instance = instance(model, devices, config)?;
    let mut order: Vec<usize> = (0..instance.devices()).collect();
    order.sort_by(|&a, &b| instance.cap[b].cmp(&instance.cap[a]));
    let weights: Vec<f64> = order.iter().map(|&d| instance.cap[d] as f64).collect();
    Ok(split(&instance, &order, &weights, "memory-proportional (exo)"))
}

/// Units in proportion to speed (the inverse of the time to run the whole
/// model), the fastest first.
pub fn by_compute(model: &ModelCost, devices: &[DeviceProfile], config: &Config) -> Result<Plan, PlanError> {
    let instance = instance(model, devices, config)?;
    let whole = 0..instance.units;
    let speed = |d: usize| 1.0 / instance.range_compute(d, &whole).max(f64::MIN_POSITIVE);
    let mut order: Vec<usize> = (0..instance.devices()).collect();
    order.sort_by(|&a, &b| speed(b).total_cmp(&speed(a)));
    let weights: Vec<f64> = order.iter().map(|&d| speed(d)).collect();
    Ok(split(&instance, &order, &weights, "compute-proportional (Cake)"))
}

/// The baselines carry no privacy pin: they would not honour it.
fn instance(model: &ModelCost, devices: &[DeviceProfile], config: &Config) -> Result<Instance, PlanError> {
    let config = Config { privacy: None, ..config.clone() };
    Instance::new(model, devices, &config)
}

/// Consecutive ranges in `order`, sized in proportion to `weights` (cuts at
/// the rounded cumulative shares); devices left with no units are dropped.
fn split(instance: &Instance, order: &[usize], weights: &[f64], name: &str) -> Plan {
    let units = instance.units;
    let total: f64 = weights.iter().sum();
    let mut stages: Vec<(usize, Range<usize>)> = Vec::new();
    let mut cumulative = 0.0;
    let mut start = 0;
    for (i, (&d, &w)) in order.iter().zip(weights).enumerate() {
        cumulative += w;
        let end = if i + 1 == order.len() {
            units
        } else {
            ((cumulative / total * units as f64).round() as usize).clamp(start, units)
        };
        if end > start {
            stages.push((d, start..end));
            start = end;
        }
    }
    instance.plan(&stages, Method::Baseline { name: name.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::TransformerShape;
    use crate::phone;

    fn setup() -> (ModelCost, Vec<DeviceProfile>) {
        let model = ModelCost::transformer(&TransformerShape::tiny_llama());
        let devices = phone::mesh(&[phone::REDMI_9A, phone::GALAXY_S23, phone::PIXEL_7]);
        (model, devices)
    }

    #[test]
    fn even_gives_each_device_a_third() {
        let (model, devices) = setup();
        let plan = even(&model, &devices, &Config::default()).unwrap();
        let sizes: Vec<usize> = plan.stages.iter().map(|s| s.units.len()).collect();
        assert_eq!(sizes, vec![8, 8, 8]);
        assert_eq!(plan.stages[0].device, "0-redmi-9a");
    }

    #[test]
    fn memory_and_compute_put_the_big_phones_first() {
        let (model, devices) = setup();
        let plan = by_memory(&model, &devices, &Config::default()).unwrap();
        assert_eq!(plan.stages.last().unwrap().device, "0-redmi-9a");
        assert_eq!(plan.stages.iter().map(|s| s.units.len()).sum::<usize>(), 24);
        let plan = by_compute(&model, &devices, &Config::default()).unwrap();
        assert_eq!(plan.stages[0].device, "1-galaxy-s23");
        assert!(plan.stages[0].units.len() > plan.stages[1].units.len());
    }

    #[test]
    fn the_optimised_plan_is_never_worse() {
        let (model, devices) = setup();
        for objective in [crate::config::Objective::Latency, crate::config::Objective::Throughput] {
            let config = Config { objective, ..Config::default() };
            let best = crate::assign::plan(&model, &devices, &config).unwrap();
            for rule in [even, by_memory, by_compute] {
                let plan = rule(&model, &devices, &config).unwrap();
                if plan.check(&model, &devices).is_ok() {
                    assert!(best.objective_s <= plan.objective_s + 1e-12);
                }
            }
        }
    }
}

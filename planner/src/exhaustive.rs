//! Exhaustive search for small instances: every order of every subset of
//! devices and every set of cut points, each costed by the same evaluation
//! the MIP's plans get. It is the yardstick the property tests hold the MIP
//! to, and it is only practical for a handful of devices and units.

use std::ops::Range;

use crate::config::Config;
use crate::cost::ModelCost;
use crate::instance::Instance;
use crate::plan::{Method, Plan, PlanError};
use crate::profile::DeviceProfile;

type Stages = Vec<(usize, Range<usize>)>;

/// The largest instance [`plan`] takes.
pub const MAX_DEVICES: usize = 6;
pub const MAX_UNITS: usize = 32;

/// Plans `model` on `devices` by trying every plan.
pub fn plan(model: &ModelCost, devices: &[DeviceProfile], config: &Config) -> Result<Plan, PlanError> {
    let instance = Instance::new(model, devices, config)?;
    solve(&instance)
}

pub(crate) fn solve(instance: &Instance) -> Result<Plan, PlanError> {
    if instance.devices() > MAX_DEVICES || instance.units > MAX_UNITS {
        return Err(PlanError::TooLarge {
            devices: instance.devices(),
            units: instance.units,
            max_devices: MAX_DEVICES,
            max_units: MAX_UNITS,
        });
    }
    let mut search =
        Search { instance, stages: Vec::new(), used: vec![false; instance.devices()], best: None, tried: 0 };
    match instance.pin {
        None => search.extend(0),
        Some(p) => {
            search.used[p] = true;
            for a in 1..=instance.units {
                search.stages.push((p, 0..a));
                if a == instance.units {
                    search.consider();
                } else {
                    search.middle(a);
                }
                search.stages.pop();
            }
        }
    }
    match search.best {
        Some((_, stages)) => Ok(instance.plan(&stages, Method::Exhaustive { plans_tried: search.tried })),
        None => Err(instance.infeasible()),
    }
}

struct Search<'a> {
    instance: &'a Instance,
    stages: Stages,
    used: Vec<bool>,
    best: Option<(f64, Stages)>,
    tried: u64,
}

impl Search<'_> {
    /// Every way to cover units `from..` with unused devices.
    fn extend(&mut self, from: usize) {
        let units = self.instance.units;
        if from == units {
            self.consider();
            return;
        }
        for d in 0..self.instance.devices() {
            if self.used[d] {
                continue;
            }
            self.used[d] = true;
            for end in from + 1..=units {
                self.stages.push((d, from..end));
                self.extend(end);
                self.stages.pop();
            }
            self.used[d] = false;
        }
    }

    /// Under privacy: middle stages from `from`, then the pinned device's
    /// last stage.
    fn middle(&mut self, from: usize) {
        let units = self.instance.units;
        let pin = self.stages[0].0;
        for d in 0..self.instance.devices() {
            if self.used[d] {
                continue;
            }
            self.used[d] = true;
            for end in from + 1..units {
                self.stages.push((d, from..end));
                self.stages.push((pin, end..units));
                self.consider();
                self.stages.pop();
                self.middle(end);
                self.stages.pop();
            }
            self.used[d] = false;
        }
    }

    fn consider(&mut self) {
        self.tried += 1;
        if !self.instance.admissible(&self.stages) {
            return;
        }
        let value = self.instance.objective_of(&self.instance.evaluate(&self.stages));
        if self.best.as_ref().is_none_or(|(best, _)| value < *best) {
            self.best = Some((value, self.stages.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::tests::{devices, model};

    #[test]
    fn finds_the_two_stage_split() {
        let plan = plan(&model(), &devices(), &Config::default()).unwrap();
        assert_eq!(plan.stages.len(), 2);
        assert!((plan.latency_s - 0.58).abs() < 1e-9);
        // 2 devices in either order with 1 cut among 3 places, or alone.
        assert_eq!(plan.method, Method::Exhaustive { plans_tried: 2 + 2 * 3 });
    }

    #[test]
    fn privacy_tries_the_pinned_device_at_both_ends() {
        let mut devices = devices();
        devices[0].mem_bytes = 10_000_000_000;
        let config = Config { privacy: Some("b".into()), ..Config::default() };
        let plan = plan(&model(), &devices, &config).unwrap();
        let order: Vec<&str> = plan.stages.iter().map(|s| s.device.as_str()).collect();
        assert_eq!(order, vec!["b", "a", "b"]);
    }

    #[test]
    fn refuses_large_instances() {
        let mut model = model();
        model.units = (0..40).map(|_| model.units[0].clone()).collect();
        model.kv_bytes_per_token = vec![0; 40];
        let err = plan(&model, &devices(), &Config::default()).unwrap_err();
        assert!(matches!(err, PlanError::TooLarge { .. }), "{err}");
    }
}

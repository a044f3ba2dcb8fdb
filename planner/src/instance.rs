//! The planning problem as plain tables every solver reads: seconds per unit
//! per device, bytes per unit, capacity per device, and the link between
//! every pair of devices. Also the one cost function all solvers, the
//! simulator and the property tests agree on.

use std::ops::Range;

use crate::config::{Config, Objective};
use crate::cost::{Bytes, ModelCost};
use crate::plan::{Excluded, Method, Plan, PlanError, Spare, Stage};
use crate::profile::{DeviceProfile, Link};

/// A skip tensor with its consumers sorted and deduplicated.
#[derive(Clone, Debug)]
pub(crate) struct Skip {
    pub producer: usize,
    pub consumers: Vec<usize>,
    pub bytes: u64,
}

/// Cost tables for one model on the devices that may take work.
#[derive(Clone, Debug)]
pub(crate) struct Instance {
    pub objective: Objective,
    pub context_tokens: u64,
    pub units: usize,
    /// Ids and names of the devices that may take work, in input order.
    pub ids: Vec<String>,
    pub names: Vec<String>,
    pub excluded: Vec<Excluded>,
    /// `compute[d][u]`: seconds per token of unit `u` on device `d`.
    pub compute: Vec<Vec<f64>>,
    /// `prefix[d][u]`: seconds of units `0..u` on device `d`.
    prefix: Vec<Vec<f64>>,
    /// Bytes unit `u` needs: weights and KV cache.
    pub need: Vec<u64>,
    prefix_need: Vec<u64>,
    pub cap: Vec<u64>,
    /// `link[a][b]` for `a != b`.
    pub link: Vec<Vec<Link>>,
    /// Bytes handed from unit `u` to `u + 1`; for the last unit, the token
    /// sent back to the prologue's device.
    pub out: Vec<u64>,
    pub skips: Vec<Skip>,
    /// Device that must run the first and the last unit.
    pub pin: Option<usize>,
}

/// What a list of stages costs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Evaluation {
    pub compute: Vec<f64>,
    pub send: Vec<f64>,
    pub mem: Vec<u64>,
    pub latency: f64,
    pub bottleneck: f64,
}

impl Instance {
    pub fn new(model: &ModelCost, devices: &[DeviceProfile], config: &Config) -> Result<Instance, PlanError> {
        model.validate()?;
        let units = model.units.len();
        if devices.is_empty() {
            return Err(PlanError::NoDevices);
        }
        for (i, device) in devices.iter().enumerate() {
            if devices[..i].iter().any(|d| d.id == device.id) {
                return Err(PlanError::DuplicateDevice { id: device.id.clone() });
            }
            check_device(device, units)?;
        }
        if let Some(id) = &config.privacy
            && !devices.iter().any(|d| &d.id == id)
        {
            return Err(PlanError::UnknownPrivacyDevice { id: id.clone() });
        }
        let mut kept = Vec::new();
        let mut excluded = Vec::new();
        for device in devices {
            let pinned = config.privacy.as_deref() == Some(device.id.as_str());
            match exclusion(device, config) {
                Some(reason) if !pinned => excluded.push(Excluded { device: device.id.clone(), reason }),
                _ => kept.push(device),
            }
        }
        if kept.is_empty() {
            return Err(PlanError::AllExcluded {
                reasons: excluded.iter().map(|e| format!("{}: {}", e.device, e.reason)).collect::<Vec<_>>().join("; "),
            });
        }
        let compute: Vec<Vec<f64>> = kept
            .iter()
            .map(|device| {
                let factor = match (config.thermal_derating, device.thermal) {
                    (true, Some(thermal)) if thermal.speed_factor() > 0.0 => thermal.speed_factor(),
                    _ => 1.0,
                };
                (0..units).map(|u| device.compute_s(u, &model.units[u]) / factor).collect()
            })
            .collect();
        let prefix = prefix_sums(&compute);
        let need: Vec<u64> = (0..units).map(|u| model.unit_memory(u, config.context_tokens)).collect();
        let mut prefix_need = vec![0u64; units + 1];
        for u in 0..units {
            prefix_need[u + 1] = prefix_need[u].saturating_add(need[u]);
        }
        let mut link = vec![vec![Link { bandwidth_bytes_per_s: 1.0, rtt_s: 0.0 }; kept.len()]; kept.len()];
        for (a, from) in kept.iter().enumerate() {
            for (b, to) in kept.iter().enumerate() {
                if a == b {
                    continue;
                }
                link[a][b] = from
                    .link_to(&to.id)
                    .or_else(|| to.link_to(&from.id))
                    .or(config.assumed_link)
                    .ok_or_else(|| PlanError::NoLink { from: from.id.clone(), to: to.id.clone() })?;
                check_link(&from.id, &to.id, link[a][b])?;
            }
        }
        let skips = model
            .skips
            .iter()
            .map(|s| {
                let mut consumers = s.consumers.clone();
                consumers.sort_unstable();
                consumers.dedup();
                Skip { producer: s.producer, consumers, bytes: s.bytes_per_token }
            })
            .collect();
        let pin = config.privacy.as_ref().and_then(|id| kept.iter().position(|d| &d.id == id));
        Ok(Instance {
            objective: config.objective,
            context_tokens: config.context_tokens,
            units,
            ids: kept.iter().map(|d| d.id.clone()).collect(),
            names: kept.iter().map(|d| d.name.clone()).collect(),
            excluded,
            compute,
            prefix,
            need,
            prefix_need,
            cap: kept.iter().map(|d| d.mem_bytes).collect(),
            link,
            out: model.units.iter().map(|u| u.out_bytes_per_token).collect(),
            skips,
            pin,
        })
    }

    /// The same instance with other per-unit times.
    pub fn with_compute(&self, compute: Vec<Vec<f64>>) -> Instance {
        Instance { prefix: prefix_sums(&compute), compute, ..self.clone() }
    }

    pub fn devices(&self) -> usize {
        self.ids.len()
    }

    /// Seconds to send `bytes` from device `a` to device `b` (0 on the same
    /// device).
    pub fn transfer(&self, a: usize, b: usize, bytes: u64) -> f64 {
        if a == b { 0.0 } else { self.link[a][b].transfer_s(bytes) }
    }

    /// Seconds per token of `units` on device `d`.
    pub fn range_compute(&self, d: usize, units: &Range<usize>) -> f64 {
        self.prefix[d][units.end] - self.prefix[d][units.start]
    }

    /// Bytes `units` need together.
    pub fn range_need(&self, units: &Range<usize>) -> u64 {
        self.prefix_need[units.end] - self.prefix_need[units.start]
    }

    pub fn fits(&self, d: usize, units: &Range<usize>) -> bool {
        self.range_need(units) <= self.cap[d]
    }

    /// Whether `stages` is a valid plan: consecutive non-empty ranges
    /// covering every unit, each device once (except that under privacy the
    /// pinned device runs both the first and the last stage), memory and
    /// privacy respected.
    pub fn admissible(&self, stages: &[(usize, Range<usize>)]) -> bool {
        let Some(((first, _), (last, _))) = stages.first().zip(stages.last()) else {
            return false;
        };
        let wraps = stages.len() > 1 && first == last;
        match self.pin {
            Some(p) if *first != p || *last != p => return false,
            None if wraps => return false,
            _ => {}
        }
        let mut next = 0;
        let mut mem = vec![0u64; self.devices()];
        let mut used = vec![false; self.devices()];
        for (i, (d, units)) in stages.iter().enumerate() {
            let again = wraps && i == stages.len() - 1;
            if units.start != next || units.end <= units.start || (used[*d] && !again) {
                return false;
            }
            used[*d] = true;
            mem[*d] += self.range_need(units);
            if mem[*d] > self.cap[*d] {
                return false;
            }
            next = units.end;
        }
        next == self.units
    }

    /// The cost of `stages`, which must cover the units in order. A device
    /// that runs two stages (the first and the last, under privacy) is busy
    /// for both.
    pub fn evaluate(&self, stages: &[(usize, Range<usize>)]) -> Evaluation {
        let k = stages.len();
        let mut stage_of = vec![0usize; self.units];
        for (i, (_, units)) in stages.iter().enumerate() {
            for u in units.clone() {
                stage_of[u] = i;
            }
        }
        let compute: Vec<f64> = stages.iter().map(|(d, units)| self.range_compute(*d, units)).collect();
        let mut send = vec![0.0; k];
        for i in 0..k {
            let (d, units) = &stages[i];
            let next = stages[(i + 1) % k].0;
            send[i] += self.transfer(*d, next, self.out[units.end - 1]);
        }
        let mut reached = vec![false; self.devices()];
        for skip in &self.skips {
            reached.iter_mut().for_each(|r| *r = false);
            let from = stage_of[skip.producer];
            let source = stages[from].0;
            reached[source] = true;
            for &c in &skip.consumers {
                let target = stages[stage_of[c]].0;
                if !reached[target] {
                    reached[target] = true;
                    send[from] += self.transfer(source, target, skip.bytes);
                }
            }
        }
        let mem = stages.iter().map(|(_, units)| self.range_need(units)).collect();
        let mut busy = vec![0.0; self.devices()];
        for (i, (d, _)) in stages.iter().enumerate() {
            busy[*d] += compute[i] + send[i];
        }
        Evaluation {
            latency: compute.iter().sum::<f64>() + send.iter().sum::<f64>(),
            bottleneck: busy.into_iter().fold(0.0, f64::max),
            compute,
            send,
            mem,
        }
    }

    pub fn objective_of(&self, evaluation: &Evaluation) -> f64 {
        match self.objective {
            Objective::Latency => evaluation.latency,
            Objective::Throughput => evaluation.bottleneck,
        }
    }

    /// The error for an instance no plan fits, with the memory the model
    /// needs against what the devices offer, and the reason when the sum
    /// alone does not explain it.
    pub fn infeasible(&self) -> PlanError {
        let need = self.range_need(&(0..self.units));
        let offer = self.cap.iter().fold(0u64, |s, c| s.saturating_add(*c));
        let largest = self.cap.iter().copied().max().unwrap_or(0);
        let detail = if need > offer {
            String::new()
        } else if let Some(p) = self.pin {
            let ends = self.need[0] + if self.units > 1 { self.need[self.units - 1] } else { 0 };
            if ends > self.cap[p] {
                format!(
                    ", but the private device {} must hold the first and last units ({}) and offers {}",
                    self.ids[p],
                    Bytes(ends),
                    Bytes(self.cap[p])
                )
            } else {
                ", but no split into consecutive ranges fits them with the first and last units on the private device"
                    .to_string()
            }
        } else if let Some(u) = (0..self.units).find(|&u| self.need[u] > largest) {
            format!(
                ", but unit {u} alone needs {} and the largest device offers {}",
                Bytes(self.need[u]),
                Bytes(largest)
            )
        } else {
            ", but no split into consecutive ranges fits them".to_string()
        };
        PlanError::Infeasible { need: Bytes(need), offer: Bytes(offer), context_tokens: self.context_tokens, detail }
    }

    /// The [`Plan`] for `stages`, costed by [`Instance::evaluate`].
    pub fn plan(&self, stages: &[(usize, Range<usize>)], method: Method) -> Plan {
        let evaluation = self.evaluate(stages);
        Plan {
            objective: self.objective,
            objective_s: self.objective_of(&evaluation),
            latency_s: evaluation.latency,
            bottleneck_s: evaluation.bottleneck,
            context_tokens: self.context_tokens,
            stages: stages
                .iter()
                .enumerate()
                .map(|(i, (d, units))| Stage {
                    device: self.ids[*d].clone(),
                    device_name: self.names[*d].clone(),
                    units: units.clone(),
                    compute_s: evaluation.compute[i],
                    send_s: evaluation.send[i],
                    mem_bytes: evaluation.mem[i],
                    mem_capacity_bytes: self.cap[*d],
                })
                .collect(),
            spares: self.spares(stages),
            excluded: self.excluded.clone(),
            method,
        }
    }

    /// Spare units for failover, in the memory each device's own stages
    /// leave: whole copies of the stages next to its own (the next one
    /// first, the one that feeds it next), or, for a device the plan leaves
    /// idle, of any stage, first stage first.
    pub fn spares(&self, stages: &[(usize, Range<usize>)]) -> Vec<Spare> {
        let mut used = vec![0u64; self.devices()];
        for (d, units) in stages {
            used[*d] += self.range_need(units);
        }
        let mut spares = Vec::new();
        for (d, used) in used.iter_mut().enumerate() {
            let mine: Vec<usize> = (0..stages.len()).filter(|&i| stages[i].0 == d).collect();
            let candidates: Vec<usize> = if mine.is_empty() {
                (0..stages.len()).collect()
            } else {
                mine.iter()
                    .flat_map(|&i| [i + 1, i.wrapping_sub(1)])
                    .filter(|&c| c < stages.len() && stages[c].0 != d)
                    .collect()
            };
            let mut kept: Vec<usize> = Vec::new();
            for c in candidates {
                let need = self.range_need(&stages[c].1);
                if !kept.contains(&c) && *used + need <= self.cap[d] {
                    *used += need;
                    kept.push(c);
                    spares.push(Spare { device: self.ids[d].clone(), units: stages[c].1.clone() });
                }
            }
        }
        spares
    }
}

fn prefix_sums(compute: &[Vec<f64>]) -> Vec<Vec<f64>> {
    compute
        .iter()
        .map(|row| {
            let mut sums = Vec::with_capacity(row.len() + 1);
            let mut acc = 0.0;
            sums.push(0.0);
            for t in row {
                acc += t;
                sums.push(acc);
            }
            sums
        })
        .collect()
}

fn check_device(device: &DeviceProfile, units: usize) -> Result<(), PlanError> {
    let bad = |reason: String| PlanError::BadDevice { device: device.id.clone(), reason };
    let measured = match &device.unit_time_s {
        Some(times) => {
            if times.len() != units {
                return Err(bad(format!("it has {} measured unit times but the model has {units} units", times.len())));
            }
            if let Some(u) = times.iter().position(|t| !t.is_finite() || *t < 0.0) {
                return Err(bad(format!(
                    "its measured time for unit {u} is {}, not a finite number of seconds",
                    times[u]
                )));
            }
            true
        }
        None => false,
    };
    let estimated = device.flops_per_s.is_finite() && device.flops_per_s > 0.0;
    if !(measured || estimated) {
        return Err(bad(format!(
            "it has no measured unit times and its estimated speed is {} FLOP/s",
            device.flops_per_s
        )));
    }
    if let Some(battery) = device.battery
        && !(0.0..=1.0).contains(&battery.level)
    {
        return Err(bad(format!("its battery level is {}, not between 0 and 1", battery.level)));
    }
    for (peer, link) in &device.links {
        check_link(&device.id, peer, *link)?;
    }
    Ok(())
}

fn check_link(from: &str, to: &str, link: Link) -> Result<(), PlanError> {
    let ok = link.bandwidth_bytes_per_s.is_finite()
        && link.bandwidth_bytes_per_s > 0.0
        && link.rtt_s.is_finite()
        && link.rtt_s >= 0.0;
    if ok {
        Ok(())
    } else {
        Err(PlanError::BadLink {
            from: from.to_string(),
            to: to.to_string(),
            bandwidth: link.bandwidth_bytes_per_s,
            rtt: link.rtt_s,
        })
    }
}

/// Why `device` should take no work, if it should not.
fn exclusion(device: &DeviceProfile, config: &Config) -> Option<String> {
    if let Some(battery) = device.battery
        && battery.level < config.min_battery
        && !battery.charging
    {
        return Some(format!("battery at {:.0}% and not charging", battery.level * 100.0));
    }
    match device.thermal {
        Some(thermal) if config.thermal_derating && thermal.speed_factor() == 0.0 => {
            Some(format!("thermal state {thermal:?}"))
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cost::{SkipTensor, UnitCost};
    use crate::profile::{Battery, Thermal, connect_all};

    /// Four units of 100 MB, 1 GFLOP and 1 MB each; a mask from unit 0 read
    /// by units 1..=3.
    pub fn model() -> ModelCost {
        ModelCost {
            units: (0..4)
                .map(|u| UnitCost {
                    name: format!("u{u}"),
                    weight_bytes: 100_000_000,
                    flops_per_token: 1_000_000_000,
                    out_bytes_per_token: 1_000_000,
                })
                .collect(),
            skips: vec![SkipTensor {
                name: "mask".into(),
                producer: 0,
                consumers: vec![3, 1, 2, 2],
                bytes_per_token: 500_000,
            }],
            kv_bytes_per_token: vec![0; 4],
        }
    }

    #[test]
    fn spares_fill_the_memory_own_stages_leave() {
        let mut devices = devices();
        // c is idle in the stages below and can hold two units; a can hold one more.
        devices[0].mem_bytes = 400_000_000;
        devices.push(DeviceProfile::new("c", "C", 200_000_000, 1e10));
        connect_all(&mut devices, Link { bandwidth_bytes_per_s: 1e7, rtt_s: 0.01 });
        let instance = Instance::new(&model(), &devices, &Config::default()).unwrap();
        let stages = vec![(0, 0..2), (1, 2..3), (0, 3..4)];
        // a runs two stages here only to exercise neighbours on both sides: its
        // spare room (one unit) takes b's stage, next after its first; b's
        // (150 MB) takes the stage after its own; idle c takes the first.
        let spare = |d: &str, u: Range<usize>| Spare { device: d.into(), units: u };
        assert_eq!(instance.spares(&stages), vec![spare("a", 2..3), spare("b", 3..4), spare("c", 0..2)],);
        // Nobody keeps a copy it has no room for.
        let tight = Instance::new(&model(), &super::tests::devices(), &Config::default()).unwrap();
        assert_eq!(tight.spares(&[(0, 0..2), (1, 2..4)]), vec![]);
    }

    pub fn devices() -> Vec<DeviceProfile> {
        let mut devices =
            vec![DeviceProfile::new("a", "A", 250_000_000, 1e10), DeviceProfile::new("b", "B", 250_000_000, 2e10)];
        connect_all(&mut devices, Link { bandwidth_bytes_per_s: 1e7, rtt_s: 0.01 });
        devices
    }

    #[test]
    fn evaluation_counts_hops_skips_and_the_return_trip() {
        let instance = Instance::new(&model(), &devices(), &Config::default()).unwrap();
        let e = instance.evaluate(&[(0, 0..2), (1, 2..4)]);
        assert!((e.compute[0] - 0.2).abs() < 1e-12);
        assert!((e.compute[1] - 0.1).abs() < 1e-12);
        // a -> b: 1 MB residual (0.11 s) plus the mask once (0.06 s).
        assert!((e.send[0] - 0.17).abs() < 1e-12);
        // b -> a: the 1 MB "token" back.
        assert!((e.send[1] - 0.11).abs() < 1e-12);
        assert!((e.latency - 0.58).abs() < 1e-12);
        assert!((e.bottleneck - 0.37).abs() < 1e-12);
        assert_eq!(e.mem, vec![200_000_000, 200_000_000]);
        assert!(instance.admissible(&[(0, 0..2), (1, 2..4)]));
        assert!(!instance.admissible(&[(0, 0..3), (1, 3..4)]));
        assert!(!instance.admissible(&[(0, 0..2), (0, 2..4)]));
        assert!(!instance.admissible(&[(0, 0..2)]));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut devices = devices();
        devices[1].links.clear();
        devices[0].links.clear();
        let err = Instance::new(&model(), &devices, &Config::default()).unwrap_err();
        assert!(matches!(err, PlanError::NoLink { .. }), "{err}");
        let mut devices = self::devices();
        devices[0].flops_per_s = f64::NAN;
        let err = Instance::new(&model(), &devices, &Config::default()).unwrap_err();
        assert!(err.to_string().contains("FLOP/s"), "{err}");
        let mut devices = self::devices();
        devices[1].id = "a".into();
        let err = Instance::new(&model(), &devices, &Config::default()).unwrap_err();
        assert!(matches!(err, PlanError::DuplicateDevice { .. }));
        let config = Config { privacy: Some("z".into()), ..Config::default() };
        let err = Instance::new(&model(), &self::devices(), &config).unwrap_err();
        assert!(matches!(err, PlanError::UnknownPrivacyDevice { .. }));
    }

    #[test]
    fn drained_and_overheated_devices_are_left_out() {
        let mut devices = devices();
        devices[0].battery = Some(Battery { level: 0.05, charging: false });
        devices[1].thermal = Some(Thermal::Severe);
        let instance = Instance::new(&model(), &devices, &Config::default()).unwrap();
        assert_eq!(instance.ids, vec!["b".to_string()]);
        assert!(instance.excluded[0].reason.contains("battery at 5%"));
        // Severe halves the speed.
        assert!((instance.compute[0][0] - 0.1).abs() < 1e-12);
        devices[1].thermal = Some(Thermal::Critical);
        let err = Instance::new(&model(), &devices, &Config::default()).unwrap_err();
        assert!(matches!(err, PlanError::AllExcluded { .. }), "{err}");
    }

    #[test]
    fn infeasible_says_what_is_needed_and_offered() {
        let instance = Instance::new(&model(), &devices(), &Config::default()).unwrap();
        let message = instance.infeasible().to_string();
        assert!(message.contains("the model needs 381.5 MiB"), "{message}");
        assert!(message.contains("these devices offer 476.8 MiB"), "{message}");
    }
}

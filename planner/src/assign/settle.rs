//! Plans for a mesh that already runs one: [`settle`] weighs what a new
//! plan costs to load against what it gains, trying the running stages and
//! the solver's with their devices reshuffled, and [`failover_spares`] gives
//! idle devices the units a failover would hand them.

use std::ops::Range;

use super::{Stages, plan};
use crate::config::Config;
use crate::cost::ModelCost;
use crate::instance::Instance;
use crate::plan::Plan;
use crate::profile::DeviceProfile;

/// How many times slower a device loads units while it runs a stage: its
/// cores and memory bandwidth go to both. So of two moves that load as much,
/// the one loading on an idle device wins, and the generation, which goes on
/// on the old plan meanwhile, is not slowed.
pub const BUSY_LOAD_SLOWDOWN: f64 = 2.0;

/// A plan for a mesh that already runs one (`running`: device id and units
/// per stage), weighing what a change costs to load. The candidates are
/// `plan`'s stages and `running`'s, each with its devices reshuffled (every
/// injective map of the devices it uses onto all devices, each taking all
/// the stages of one; a device of `running` that is gone hands its stages on
/// this way). A candidate costs `horizon_tokens` tokens at its objective plus
/// the seconds the slowest of its devices takes to load the units it does
/// not hold, at the device's measured loading speed (`loaded`: device id and
/// units, stages and spares; a node loads a runner per unit, so any unit it
/// holds is reused), [`BUSY_LOAD_SLOWDOWN`] times slower on a device that
/// runs a stage of `running` meanwhile (while none of its devices is gone).
/// The cheapest wins, `plan` on a tie: of equally good plans the one that
/// moves the fewest units, and the plan that runs, or the
/// one its spares make ready, unless the solver's gains over the horizon
/// outweigh loading it. `plan` itself in privacy mode (the pinned device
/// stays) or past 8 devices.
pub fn settle(
    model: &ModelCost,
    devices: &[DeviceProfile],
    config: &Config,
    plan: Plan,
    running: &[(String, Range<usize>)],
    loaded: &[(String, Range<usize>)],
    horizon_tokens: f64,
) -> Plan {
    let Some(instance) = reshapable(model, devices, config) else {
        return plan;
    };
    let index = |id: &str| instance.ids.iter().position(|d| d == id);
    let profiles: Vec<&DeviceProfile> =
        instance.ids.iter().map(|id| devices.iter().find(|p| &p.id == id).expect("the instance's devices")).collect();
    // While all of `running`'s devices are here, generations go on on it
    // during the loads; after a device left, nothing runs until they end.
    let live = running.iter().all(|(id, _)| index(id).is_some());
    let busy: Vec<bool> =
        (0..instance.devices()).map(|d| live && running.iter().any(|(id, _)| index(id) == Some(d))).collect();
    // Seconds until every device has loaded what it does not hold.
    let load_s = |stages: &Stages| -> f64 {
        (0..instance.devices())
            .map(|d| {
                let mine: Vec<&Range<usize>> = stages.iter().filter(|(x, _)| *x == d).map(|(_, u)| u).collect();
                let held = |u: usize| loaded.iter().any(|(id, h)| index(id) == Some(d) && h.contains(&u));
                let bytes: u64 = mine
                    .iter()
                    .flat_map(|m| (*m).clone())
                    .filter(|&u| !held(u))
                    .map(|u| model.units[u].weight_bytes)
                    .sum();
                profiles[d].load_s(bytes) * if busy[d] { BUSY_LOAD_SLOWDOWN } else { 1.0 }
            })
            .fold(0.0, f64::max)
    };
    let cost = |stages: &Stages| -> Option<f64> {
        instance
            .admissible(stages)
            .then(|| instance.objective_of(&instance.evaluate(stages)) * horizon_tokens + load_s(stages))
    };
    let solved = plan.assignment();
    let Some(stages) = solved.iter().map(|(id, units)| Some((index(id)?, units.clone()))).collect::<Option<Stages>>()
    else {
        return plan;
    };
    let mut best = cost(&stages).map(|c| (c, stages.clone()));
    for candidate in [&solved[..], running] {
        let mut used: Vec<&str> = candidate.iter().map(|(id, _)| id.as_str()).collect();
        used.sort_unstable();
        used.dedup();
        let mut chosen = Vec::new();
        reshuffle(&mut chosen, used.len(), instance.devices(), &mut |to: &[usize]| {
            let moved: Stages = candidate
                .iter()
                .map(|(id, units)| (to[used.binary_search(&id.as_str()).expect("used")], units.clone()))
                .collect();
            if let Some(c) = cost(&moved)
                && best.as_ref().is_none_or(|(b, _)| c < *b)
            {
                best = Some((c, moved));
            }
        });
    }
    match best {
        Some((_, best)) if best != stages => instance.plan(&best, plan.method),
        _ => plan,
    }
}

/// `plan` with spares chosen for failover: a device the plan leaves idle
/// keeps, first, copies of the units it would run if a running device left
/// (the plan [`plan`] makes without that device, [`settle`]d against `plan`
/// as the leader would), the units most leavers would give it first, as its
/// memory allows; then the spares `plan` came with (`Instance::spares`)
/// where room is left. So the likeliest move onto it loads nothing. Devices with stages
/// keep their neighbours' stages as before. `plan` as it is in privacy mode,
/// past 8 devices, or with no idle device.
pub fn failover_spares(
    model: &ModelCost,
    devices: &[DeviceProfile],
    config: &Config,
    mut plan: Plan,
    horizon_tokens: f64,
) -> Plan {
    let Some(instance) = reshapable(model, devices, config) else {
        return plan;
    };
    let running = plan.assignment();
    let idle: Vec<&String> = instance.ids.iter().filter(|id| !running.iter().any(|(d, _)| d == *id)).collect();
    if idle.is_empty() {
        return plan;
    }
    let mut leavers: Vec<&str> = running.iter().map(|(d, _)| d.as_str()).collect();
    leavers.sort_unstable();
    leavers.dedup();
    // (device, units, how many leavers would give it those units), in the order first seen.
    let mut wanted: Vec<(String, Range<usize>, usize)> = Vec::new();
    for gone in leavers {
        let rest: Vec<DeviceProfile> = devices.iter().filter(|p| p.id != gone).cloned().collect();
        let Ok(next) = self::plan(model, &rest, config) else {
            continue;
        };
        let next = settle(model, &rest, config, next, &running, &running, horizon_tokens);
        for stage in next.stages.iter().filter(|s| idle.contains(&&s.device)) {
            match wanted.iter_mut().find(|(d, u, _)| *d == stage.device && *u == stage.units) {
                Some(entry) => entry.2 += 1,
                None => wanted.push((stage.device.clone(), stage.units.clone(), 1)),
            }
        }
    }
    // A stable sort: of equally wanted units, those seen first.
    wanted.sort_by_key(|w| std::cmp::Reverse(w.2));
    // The spares the plan came with (`Instance::spares`).
    let usual = std::mem::take(&mut plan.spares);
    let mut spares: Vec<crate::plan::Spare> = usual.iter().filter(|s| !idle.contains(&&s.device)).cloned().collect();
    for device in idle {
        let d = instance.ids.iter().position(|id| id == device).expect("an instance device");
        let mut used = 0u64;
        let candidates = wanted
            .iter()
            .filter(|(id, _, _)| id == device)
            .map(|(_, units, _)| units.clone())
            .chain(usual.iter().filter(|s| &s.device == device).map(|s| s.units.clone()));
        // Kept ranges do not overlap: one that covers kept ones replaces them.
        let mut kept: Vec<Range<usize>> = Vec::new();
        for units in candidates {
            let inside = |k: &Range<usize>| units.start <= k.start && k.end <= units.end;
            let overlapping: Vec<&Range<usize>> =
                kept.iter().filter(|k| k.start < units.end && units.start < k.end).collect();
            if !overlapping.iter().all(|k| inside(k)) {
                continue;
            }
            let freed: u64 = overlapping.iter().map(|k| instance.range_need(k)).sum();
            let need = instance.range_need(&units).saturating_sub(freed);
            if used + need <= instance.cap[d] {
                used += need;
                kept.retain(|k| !inside(k));
                kept.push(units);
            }
        }
        kept.sort_by_key(|k| k.start);
        spares.extend(kept.into_iter().map(|units| crate::plan::Spare { device: device.clone(), units }));
    }
    plan.spares = spares;
    plan
}

/// The instance of a plan [`settle`] and [`failover_spares`] may change:
/// not in privacy mode (the pinned device stays) and with at most 8 devices
/// (they try every reshuffle of the devices).
fn reshapable(model: &ModelCost, devices: &[DeviceProfile], config: &Config) -> Option<Instance> {
    let instance = Instance::new(model, devices, config).ok()?;
    (config.privacy.is_none() && instance.devices() <= 8).then_some(instance)
}

/// Calls `visit` with every sequence of `k` distinct devices among `n`.
fn reshuffle(chosen: &mut Vec<usize>, k: usize, n: usize, visit: &mut dyn FnMut(&[usize])) {
    if chosen.len() == k {
        return visit(chosen);
    }
    for d in 0..n {
        if !chosen.contains(&d) {
            chosen.push(d);
            reshuffle(chosen, k, n, visit);
            chosen.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::tests::{devices, model};
    use crate::plan::{Method, Spare};

    /// Three identical devices, any two of which hold the model: whichever
    /// two the solver picks, `settle` hands the stages to the devices that
    /// already hold their units, and never for a worse plan.
    #[test]
    fn settling_keeps_units_where_they_are_loaded() {
        let mut devices = devices();
        devices[1].flops_per_s = devices[0].flops_per_s;
        devices.push(DeviceProfile::new("c", "C", 250_000_000, 1e10));
        crate::profile::connect_all(&mut devices, crate::profile::Link { bandwidth_bytes_per_s: 1e7, rtt_s: 0.01 });
        let config = Config::default();
        let fresh = plan(&model(), &devices, &config).unwrap();
        let units = |plan: &Plan, id: &str| -> Vec<Range<usize>> {
            plan.stages.iter().filter(|s| s.device == id).map(|s| s.units.clone()).collect()
        };
        for held in [
            vec![("c".to_string(), 0..2), ("a".to_string(), 2..4)],
            vec![("b".to_string(), 0..2), ("c".to_string(), 2..4)],
        ] {
            let settled = settle(&model(), &devices, &config, fresh.clone(), &held, &held, 100.0);
            settled.check(&model(), &devices).unwrap();
            assert!(settled.objective_s <= fresh.objective_s + 1e-12);
            assert_eq!(settled.stages.len(), fresh.stages.len());
            for (id, range) in &held {
                assert_eq!(units(&settled, id), vec![range.clone()], "{held:?}: {:?}", settled.explain());
            }
        }
        // Nothing held: the plan as it was.
        assert_eq!(settle(&model(), &devices, &config, fresh.clone(), &[], &[], 100.0), fresh);
    }

    /// `devices()`'s a and b with `mem` bytes each, and c with `c_mem`, as
    /// fast as a; all linked at 10 MB/s and 10 ms.
    fn with_c(mem: u64, c_mem: u64) -> Vec<DeviceProfile> {
        let mut devices = devices();
        for d in &mut devices {
            d.mem_bytes = mem;
        }
        devices.push(DeviceProfile::new("c", "C", c_mem, 1e10));
        let link = crate::profile::Link { bandwidth_bytes_per_s: 1e7, rtt_s: 0.01 };
        crate::profile::connect_all(&mut devices, link);
        devices
    }

    /// A throttled device's stage goes to the idle device holding it as a
    /// spare, on the boundaries the mesh runs, unless the solver's better
    /// boundaries make up for loading them within the horizon; a device that
    /// is gone hands its stage on the same way.
    #[test]
    fn settling_weighs_loading_against_the_gain() {
        let mut devices = with_c(300_000_000, 300_000_000);
        devices[0].flops_per_s /= 2.0;
        let config = Config::default();
        let running = vec![("a".to_string(), 0..2), ("b".to_string(), 2..4)];
        let mut loaded = running.clone();
        loaded.push(("c".to_string(), 0..2));
        // The solver's boundaries: b (twice as fast as c) runs three units.
        let instance = Instance::new(&model(), &devices, &config).unwrap();
        let fresh = instance.plan(&[(1, 0..3), (2, 3..4)], Method::Search { elapsed: std::time::Duration::ZERO });
        let stages = Plan::assignment;
        let spare = vec![("c".to_string(), 0..2), ("b".to_string(), 2..4)];
        // 0.05 s a token better, for 2 s of loading on b (it holds unit 2): worth it past 40 tokens.
        let over = |devices: &[DeviceProfile], horizon| {
            settle(&model(), devices, &config, fresh.clone(), &running, &loaded, horizon)
        };
        let short = over(&devices, 10.0);
        assert_eq!(stages(&short), spare, "{:?}", short.explain());
        short.check(&model(), &devices).unwrap();
        assert_eq!(over(&devices, 1000.0), fresh);
        // Loading speed counts: a device that loads ten times as fast makes it worth it sooner.
        let mut quick = devices.clone();
        quick.iter_mut().for_each(|d| d.load_bytes_per_s = Some(1e9));
        assert_eq!(over(&quick, 10.0), fresh);
        // a is gone: c, holding its units, takes its stage.
        let left: Vec<DeviceProfile> = devices[1..].to_vec();
        let solved = plan(&model(), &left, &config).unwrap();
        let failover = settle(&model(), &left, &config, solved, &running, &loaded, 10.0);
        assert_eq!(stages(&failover), spare, "{:?}", failover.explain());
    }

    /// Of two moves off a throttled device that load as much, the one
    /// loading on the idle device wins, though that device loads slower: the
    /// running one would load beside its stage. After a device left, nothing
    /// runs during the loads, and the quicker loader wins.
    #[test]
    fn a_move_loads_on_an_idle_device_rather_than_a_busy_one() {
        let mut devices = with_c(250_000_000, 250_000_000);
        devices[0].flops_per_s /= 2.0;
        devices[1].flops_per_s = devices[2].flops_per_s;
        devices[1].load_bytes_per_s = Some(1e8);
        devices[2].load_bytes_per_s = Some(7e7);
        let config = Config::default();
        let running = vec![("a".to_string(), 0..2), ("b".to_string(), 2..4)];
        let mut loaded = running.clone();
        loaded.push(("c".to_string(), 2..4));
        let fresh = plan(&model(), &devices, &config).unwrap();
        let settled = settle(&model(), &devices, &config, fresh, &running, &loaded, 100.0);
        settled.check(&model(), &devices).unwrap();
        let on_c = vec![("c".to_string(), 0..2), ("b".to_string(), 2..4)];
        assert_eq!(settled.assignment(), on_c, "{:?}", settled.explain());
        // a is gone: b, the quicker loader, loads its units, and c runs b's from its spares.
        let left: Vec<DeviceProfile> = devices[1..].to_vec();
        let solved = plan(&model(), &left, &config).unwrap();
        let failover = settle(&model(), &left, &config, solved, &running, &loaded, 100.0);
        let on_b = vec![("b".to_string(), 0..2), ("c".to_string(), 2..4)];
        assert_eq!(failover.assignment(), on_b, "{:?}", failover.explain());
    }

    /// An idle device keeps the units it would run if a running device
    /// left, so a failover onto it loads nothing. With room for one unit, the
    /// usual rule (whole stages, the first first) would give it nothing.
    #[test]
    fn an_idle_device_keeps_what_a_failover_would_give_it() {
        let devices = with_c(300_000_000, 150_000_000);
        let config = Config::default();
        let instance = Instance::new(&model(), &devices, &config).unwrap();
        let method = Method::Search { elapsed: std::time::Duration::ZERO };
        let running = instance.plan(&[(0, 0..2), (1, 2..4)], method.clone());
        assert_eq!(running.spares, vec![]);
        let with = failover_spares(&model(), &devices, &config, running.clone(), 100.0);
        let spare = Spare { device: "c".into(), units: 0..1 };
        assert_eq!(with.spares, vec![spare]);
        assert_eq!(with.stages, running.stages);
        // Whichever of a and b leaves, the leader's plan gives c that unit.
        let held = running.assignment();
        for gone in ["a", "b"] {
            let rest: Vec<DeviceProfile> = devices.iter().filter(|d| d.id != gone).cloned().collect();
            let next = plan(&model(), &rest, &config).unwrap();
            let next = settle(&model(), &rest, &config, next, &held, &held, 100.0);
            let on_c: Vec<Range<usize>> =
                next.stages.iter().filter(|s| s.device == "c").map(|s| s.units.clone()).collect();
            assert_eq!(on_c, vec![0..1], "{gone} leaves: {:?}", next.explain());
        }
        // A device with stages keeps the usual spares; so does a mesh with no idle device.
        let busy = instance.plan(&[(0, 0..1), (2, 1..2), (1, 2..4)], method);
        assert_eq!(failover_spares(&model(), &devices, &config, busy.clone(), 100.0), busy);
    }
}

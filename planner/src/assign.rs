//! Assignment of units to devices as a mixed-integer program solved with
//! `microlp`; `planner/README.md` writes the formulation out.
//!
//! Units that no cost can tell apart (a transformer's decoder layers on
//! estimated speeds) are grouped into blocks (`assign/block.rs`), and the program
//! decides how many units of each block each device runs and the path of
//! devices through the blocks (`assign/program.rs`). The device order is part of
//! that path, not fixed in advance.
//!
//! What is solved how:
//! - the MIP always runs and decides the plan;
//! - when [`Config::warm_start`] is set, the ordered-stage search
//!   (`search.rs`, a heuristic) hands it a first incumbent, which only
//!   lets it prune sooner;
//! - if [`Config::time_limit`] runs out, the MIP's best plan is returned with
//!   its gap ([`Method::Mip`] says whether it is proven optimal); only if the
//!   MIP has no plan at all by then is the search's plan returned, marked
//!   [`Method::Search`].

mod block;
mod bound;
mod program;

use std::collections::HashSet;
use std::ops::Range;
use std::time::Instant;

use microlp::{SolveOptions, Variable};

use crate::config::{Config, Objective};
use crate::cost::ModelCost;
use crate::instance::Instance;
use crate::plan::{Method, Plan, PlanError};
use crate::profile::DeviceProfile;
use crate::search;
use program::Program;

type Stages = Vec<(usize, Range<usize>)>;

/// Plans `model` on `devices` by solving the assignment MIP.
pub fn plan(model: &ModelCost, devices: &[DeviceProfile], config: &Config) -> Result<Plan, PlanError> {
    let instance = Instance::new(model, devices, config)?;
    solve(&instance, config)
}

/// What `plan`'s objective would be for an assignment already chosen
/// (`(device id, units)` per stage), costed on today's `devices`: lets a
/// caller weigh a new plan against the one it runs. `None` when a device is
/// gone or the assignment no longer fits.
pub fn objective_of(
    model: &ModelCost,
    devices: &[DeviceProfile],
    config: &Config,
    stages: &[(String, Range<usize>)],
) -> Option<f64> {
    let instance = Instance::new(model, devices, config).ok()?;
    let stages: Option<Stages> =
        stages.iter().map(|(id, units)| Some((instance.ids.iter().position(|d| d == id)?, units.clone()))).collect();
    let stages = stages?;
    instance.admissible(&stages).then(|| instance.objective_of(&instance.evaluate(&stages)))
}

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
/// memory allows; then the spares `plan` came with ([`Instance::spares`])
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

pub(crate) fn solve(instance: &Instance, config: &Config) -> Result<Plan, PlanError> {
    let started = Instant::now();
    let need = instance.range_need(&(0..instance.units));
    if need > instance.cap.iter().fold(0u64, |s, c| s.saturating_add(*c)) {
        return Err(instance.infeasible());
    }
    // What the MIP sees: measured times of near-identical units evened out.
    let smoothed = block::smooth(instance, config.interchangeable);
    let model = &smoothed;
    let mut seed = if config.warm_start { search::best(model) } else { None };
    let cost = |stages: &Stages| model.objective_of(&model.evaluate(stages));
    let blocks = block::blocks(model);
    // Throughput: a lower bound (`assign/bound.rs`), and the best plan its
    // exact search found, should it beat the seed.
    let mut floor = None;
    if let (Objective::Throughput, Some(stages)) = (model.objective, seed.as_mut()) {
        let value = cost(stages);
        if let Some(bound) = bound::lower_bound(model, &blocks, value) {
            floor = Some(bound.seconds);
            if let Some(found) = bound.plan.map(|found| search::polish(model, found))
                && cost(&found) < value
            {
                *stages = found;
            }
        }
    }
    let cutoff = seed.as_ref().map(cost);
    let attempt = |cutoff: Option<f64>| {
        let program = program::build(model, blocks.clone(), cutoff, floor);
        let mut options = SolveOptions::default();
        options.time_limit = Some(config.time_limit.saturating_sub(started.elapsed()));
        if let Some(stages) = &seed {
            options.warm_start = Some(hint(&program, model, stages));
        }
        program.problem.solve_with(options).map(|outcome| (program, outcome))
    };
    // The cutoff comes from a plan that meets it; should round-off still make
    // the program infeasible, solve it again without.
    let solved = match attempt(cutoff) {
        Err(microlp::Error::Infeasible) if cutoff.is_some() => attempt(None),
        other => other,
    };
    let (program, outcome) = match solved {
        Ok(solved) => solved,
        Err(microlp::Error::Infeasible) => return Err(instance.infeasible()),
        Err(e) => return Err(PlanError::Solver(e.to_string())),
    };
    let stats = outcome.stats();
    let proven = outcome.is_optimal();
    let solution = match outcome.into_solution() {
        Ok(solution) => solution,
        Err(_) => {
            return match seed {
                Some(stages) => Ok(instance.plan(&stages, Method::Search { elapsed: started.elapsed() })),
                None => Err(PlanError::TimedOut { limit: config.time_limit }),
            };
        }
    };
    let stages = read(&program, &solution, model)?;
    // The program and the evaluation describe the same costs; a mismatch is
    // a bug in one of them, not something to hand on quietly.
    let reported = solution.objective() / 1e3;
    let expected = model.objective_of(&model.evaluate(&stages));
    if (reported - expected).abs() > 1e-6 * expected.max(1e-3) {
        return Err(PlanError::Solver(format!(
            "the program's objective {reported} s disagrees with the plan's cost {expected} s"
        )));
    }
    let method = Method::Mip {
        proven_optimal: proven,
        gap: if proven { Some(0.0) } else { stats.gap },
        nodes: stats.nodes_solved,
        warm_started: seed.is_some(),
        smoothed: model.compute != instance.compute,
        elapsed: started.elapsed(),
    };
    // Reported costs are the plan's exact ones.
    let plan = instance.plan(&stages, method);
    Ok(plan)
}

fn on(solution: &microlp::Solution, var: Variable) -> bool {
    solution.var_value(var) > 0.5
}

/// The stages of a solution: follow the path from the first block.
fn read(program: &Program, solution: &microlp::Solution, instance: &Instance) -> Result<Stages, PlanError> {
    let broken = |what: &str| PlanError::Solver(format!("the solution's path {what}"));
    let nb = program.blocks.len();
    let mut v = (0..program.phys.len())
        .find(|&v| program.w[0][v].is_some_and(|w| on(solution, w)))
        .ok_or_else(|| broken("has no start"))?;
    let mut k = 0;
    let mut stages: Stages = Vec::new();
    let mut next_unit = 0;
    for _ in 0..=nb * program.phys.len() {
        let count = match (program.x[k][v], program.w[k][v]) {
            (Some(x), _) => solution.var_value(x).round() as usize,
            (None, Some(_)) => 1,
            (None, None) => return Err(broken("visits a device it may not")),
        };
        let device = program.phys[v];
        match stages.last_mut() {
            Some((last, units)) if *last == device => units.end += count,
            _ => stages.push((device, next_unit..next_unit + count)),
        }
        next_unit += count;
        if let Some(arc) = program.inside[k].iter().find(|a| a.from == v && on(solution, a.var)) {
            v = arc.to;
        } else if k + 1 == nb {
            if !instance.admissible(&stages) {
                return Err(PlanError::Solver(format!("the solution's stages {stages:?} break a constraint")));
            }
            return Ok(stages);
        } else if let Some(arc) = program.across[k].iter().find(|a| a.from == v && on(solution, a.var)) {
            v = arc.to;
            k += 1;
        } else {
            return Err(broken("stops early"));
        }
    }
    Err(broken("loops"))
}

/// `stages` with identical devices renamed so that each class is used in
/// index order, as the program requires; the cost is the same.
fn canonical(program: &Program, stages: &[(usize, Range<usize>)]) -> Stages {
    let mut stages = stages.to_vec();
    for class in &program.classes {
        let mut members = class.iter();
        for (d, _) in stages.iter_mut() {
            if class.contains(d) {
                *d = *members.next().unwrap_or(d);
            }
        }
    }
    stages
}

/// A warm-start hint: the presence, counts and arcs of `stages`.
fn hint(program: &Program, instance: &Instance, stages: &[(usize, Range<usize>)]) -> Vec<(Variable, f64)> {
    let stages = canonical(program, stages);
    // Physical stages to virtual devices: under privacy the last stage is the
    // pinned device's "last" twin.
    let twin = program.phys.len() - 1;
    let mut virtual_of = vec![0usize; instance.units];
    for (i, (d, units)) in stages.iter().enumerate() {
        let v = if instance.pin.is_some() && i > 0 && i + 1 == stages.len() { twin } else { *d };
        for u in units.clone() {
            virtual_of[u] = v;
        }
    }
    let mut nodes: Vec<(usize, usize, usize)> = Vec::new(); // (block, device, count)
    for (k, block) in program.blocks.iter().enumerate() {
        for u in block.clone() {
            match nodes.last_mut() {
                Some((bk, v, count)) if *bk == k && *v == virtual_of[u] => *count += 1,
                _ => nodes.push((k, virtual_of[u], 1)),
            }
        }
    }
    let used: HashSet<(usize, usize, usize, bool)> =
        nodes.windows(2).map(|pair| (pair[0].0, pair[0].1, pair[1].1, pair[0].0 == pair[1].0)).collect();
    let mut hint = Vec::new();
    for (k, row) in program.w.iter().enumerate() {
        for (v, w) in row.iter().enumerate() {
            let count = nodes.iter().find(|(bk, bv, _)| *bk == k && *bv == v).map_or(0, |n| n.2);
            if let Some(w) = w {
                hint.push((*w, if count > 0 { 1.0 } else { 0.0 }));
            }
            if let Some(x) = program.x[k][v] {
                hint.push((x, count as f64));
            }
        }
    }
    for (k, arcs) in program.inside.iter().enumerate() {
        for a in arcs {
            hint.push((a.var, if used.contains(&(k, a.from, a.to, true)) { 1.0 } else { 0.0 }));
        }
    }
    for (k, arcs) in program.across.iter().enumerate() {
        for a in arcs {
            hint.push((a.var, if used.contains(&(k, a.from, a.to, false)) { 1.0 } else { 0.0 }));
        }
    }
    hint
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Objective;
    use crate::cost::TransformerShape;
    use crate::instance::tests::{devices, model};
    use crate::phone;
    use crate::plan::Spare;

    #[test]
    fn splits_when_memory_forces_it() {
        for warm_start in [false, true] {
            let config = Config { warm_start, ..Config::default() };
            let plan = plan(&model(), &devices(), &config).unwrap();
            plan.check(&model(), &devices()).unwrap();
            // Each device holds two of the four units; every split costs the
            // same transfers, so the plan is 2 + 2 in either order.
            assert_eq!(plan.stages.len(), 2);
            assert!((plan.latency_s - 0.58).abs() < 1e-9, "{:?}", plan.explain());
            assert!(matches!(plan.method, Method::Mip { proven_optimal: true, .. }));
        }
    }

    #[test]
    fn a_held_assignment_is_costed_on_new_profiles() {
        let config = Config::default();
        let plan = plan(&model(), &devices(), &config).unwrap();
        let stages = plan.assignment();
        let same = objective_of(&model(), &devices(), &config, &stages).unwrap();
        assert!((same - plan.objective_s).abs() < 1e-12);
        // A device twice as slow makes the same assignment cost more.
        let mut slower = devices();
        let first = slower.iter_mut().find(|d| d.id == stages[0].0).unwrap();
        first.flops_per_s /= 2.0;
        if let Some(t) = first.unit_time_s.as_mut() {
            t.iter_mut().for_each(|x| *x *= 2.0);
        }
        assert!(objective_of(&model(), &slower, &config, &stages).unwrap() > same);
        // A stage on a device that is gone has no cost.
        let gone = vec![("nobody".to_string(), 0..model().units.len())];
        assert_eq!(objective_of(&model(), &devices(), &config, &gone), None);
    }

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

    #[test]
    fn privacy_keeps_both_ends_on_the_asking_device() {
        let mut devices = devices();
        devices[0].mem_bytes = 10_000_000_000;
        let config = Config { privacy: Some("b".into()), ..Config::default() };
        let plan = plan(&model(), &devices, &config).unwrap();
        plan.check(&model(), &devices).unwrap();
        let ends: Vec<&str> = plan.stages.iter().map(|s| s.device.as_str()).collect();
        assert_eq!(ends, vec!["b", "a", "b"]);
        assert_eq!(plan.stages[0].units, 0..1);
        assert_eq!(plan.stages[2].units, 3..4);
    }

    #[test]
    fn a_transformer_on_phones_is_planned_quickly_and_proven() {
        let model = ModelCost::transformer(&TransformerShape::tiny_llama());
        let devices = phone::mesh(&[phone::PIXEL_7, phone::GALAXY_A14, phone::REDMI_9A, phone::GALAXY_A14]);
        for objective in [Objective::Latency, Objective::Throughput] {
            let config = Config { objective, ..Config::default() };
            let plan = plan(&model, &devices, &config).unwrap();
            plan.check(&model, &devices).unwrap();
            assert!(matches!(plan.method, Method::Mip { proven_optimal: true, .. }), "{:?}", plan.method);
        }
    }

    #[test]
    fn too_little_memory_is_reported_in_bytes() {
        let mut devices = devices();
        devices[1].mem_bytes = 100_000_000;
        let err = plan(&model(), &devices, &Config::default()).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("the model needs 381.5 MiB"), "{message}");
        assert!(message.contains("these devices offer 333.8 MiB"), "{message}");
    }
}

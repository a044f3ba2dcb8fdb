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
//!
//! For a mesh that already runs a plan, `assign/settle.rs` weighs a new one
//! against what it costs to load and gives idle devices failover spares.

mod block;
mod bound;
mod program;
mod settle;

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
pub use settle::{BUSY_LOAD_SLOWDOWN, failover_spares, settle};

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

//! `llnode plan`: the plan the running node holds, who made it, and why.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use llnode_planner::config::Objective;

use crate::actor::planning::PlanView;
use crate::control::{self, LocalRequest, LocalResponse};
use crate::outln;

pub async fn view(data_dir: &Path, objective: Option<Objective>) -> anyhow::Result<PlanView> {
    match control::call(data_dir, LocalRequest::Plan { objective }).await? {
        LocalResponse::Plan(view) => Ok(*view),
        other => bail!("unexpected answer from the node: {other:?}"),
    }
}

pub fn plan(data_dir: &Path, objective: Option<Objective>, explain: bool, json: bool) -> anyhow::Result<()> {
    let rt = crate::runtime()?;
    let mut view = rt.block_on(view(data_dir, objective))?;
    if let Some(objective) = objective {
        // Wait for the leader's new plan.
        let before = view.epoch;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(view.epoch > before && view.plan.as_ref().is_some_and(|p| p.objective == objective)) {
            if Instant::now() > deadline {
                bail!(
                    "no plan for {objective} arrived within 60 s; `llnode plan --explain` shows what the planner last did"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
            view = rt.block_on(self::view(data_dir, None))?;
        }
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    print_view(&view, explain);
    Ok(())
}

/// The plan as `llnode plan` prints it.
pub fn print_view(view: &PlanView, explain: bool) {
    match (&view.leadership, &view.leader_name) {
        (Some(l), Some(name)) => outln!("leader: {name} ({}), term {}", l.leader, l.term),
        _ => outln!("leader: none yet (this node sees {} other members)", view.members.len()),
    }
    match (&view.plan, view.epoch) {
        (Some(plan), Some(epoch)) => {
            let model = view.model.as_deref().unwrap_or("?");
            outln!("plan: epoch {epoch}, model {}, minimising {}", &model[..model.len().min(16)], plan.objective);
            outln!(
                "{:<6} {:<16} {:<10} {:>11} {:>11} {:>21}",
                "stage",
                "device",
                "units",
                "compute ms",
                "sending ms",
                "memory used / offered"
            );
            for (i, s) in plan.stages.iter().enumerate() {
                outln!(
                    "{:<6} {:<16} {:<10} {:>11.2} {:>11.2} {:>10} / {:<10}",
                    i,
                    s.device_name,
                    format!("{}..{}", s.units.start, s.units.end),
                    s.compute_s * 1e3,
                    s.send_s * 1e3,
                    mib(s.mem_bytes),
                    mib(s.mem_capacity_bytes)
                );
            }
            for e in &plan.excluded {
                outln!("left out: {} ({})", e.device, e.reason);
            }
            outln!(
                "per token: {:.2} ms ({:.1} tokens/s for one sequence); slowest stage {:.2} ms ({:.1} tokens/s pipelined)",
                plan.latency_s * 1e3,
                1.0 / plan.latency_s,
                plan.bottleneck_s * 1e3,
                plan.throughput_tokens_per_s()
            );
            if explain {
                for line in plan.explain() {
                    outln!("  {line}");
                }
            }
        }
        _ => outln!("plan: none yet: {}", view.problem.as_deref().unwrap_or("waiting for the leader")),
    }
    if let Some(pace) = &view.pace {
        outln!("this device runs at {pace}");
    }
    // Measured on the plan held, as the balancer reports it: slowest first.
    for (i, (name, pace)) in view.paces.iter().enumerate() {
        let mark = if i == 0 && view.paces.len() > 1 { " (the bottleneck)" } else { "" };
        outln!("measured: {name} runs at {pace}{mark}");
    }
    if let Some(fetch) = &view.fetch {
        outln!("this device: {fetch}");
    }
    if explain {
        outln!("devices:");
        for d in &view.devices {
            outln!("  {}: {}", d.name, d.profile);
        }
        outln!("history:");
        for event in &view.history {
            outln!("  {event}");
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

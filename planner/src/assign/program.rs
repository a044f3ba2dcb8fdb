//! Builds the assignment MIP (written out in `planner/README.md`).
//!
//! The pipeline is a path through nodes `(block, device)`: a node is on the
//! path when the device runs some units of the block. Arcs join a node to
//! another device in the same block (a hop inside the block) or to a node of
//! the next block (a hop, or the same device carrying on). Under privacy the
//! pinned device appears twice, as a "first" and a "last" virtual device
//! sharing one memory; each virtual device enters the path once, which keeps
//! its units consecutive.

use std::ops::Range;

use microlp::{ComparisonOp, LinearExpr, OptimizationDirection, Problem, Variable};

use crate::config::Objective;
use crate::instance::Instance;

/// Seconds are written into the program as milliseconds, so that the
/// coefficients sit near 1.
pub(crate) const SCALE: f64 = 1e3;

/// An arc of the path: from virtual device `from` to `to`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Arc {
    pub from: usize,
    pub to: usize,
    pub var: Variable,
}

/// The program and the variables the read-out and the warm start need.
pub(crate) struct Program {
    pub problem: Problem,
    pub blocks: Vec<Range<usize>>,
    /// The physical device of each virtual device.
    pub phys: Vec<usize>,
    /// `w[b][v]`: virtual device `v` runs units of block `b` (`None` where
    /// it may not).
    pub w: Vec<Vec<Option<Variable>>>,
    /// `x[b][v]`: how many units of block `b` it runs, for blocks of two or
    /// more units (`w` is the count otherwise).
    pub x: Vec<Vec<Option<Variable>>>,
    /// Hops inside block `b`.
    pub inside: Vec<Vec<Arc>>,
    /// Arcs from block `b` to block `b + 1`.
    pub across: Vec<Vec<Arc>>,
    /// Classes of identical devices, each sorted; the program only admits
    /// plans that use the members of a class in this order.
    pub classes: Vec<Vec<usize>>,
}

enum Kind {
    Binary,
    Integer(i32),
    Fraction,
}

struct Builder<'a> {
    instance: &'a Instance,
    problem: Problem,
    phys: Vec<usize>,
    latency: bool,
    /// Busy time of each physical device, for the throughput objective.
    busy: Vec<LinearExpr>,
    /// For each block of one unit: the busy time its unit brings to
    /// whichever device runs it (compute, hand-off, skip tensors made there,
    /// the token's trip back), summed over all devices.
    single: Vec<LinearExpr>,
}

impl Builder<'_> {
    /// Adds a variable costing `cost_s` seconds per unit value, counted in
    /// the busy time of physical device `owner` and, when it belongs to the
    /// one-unit block `single`, in that block's total.
    fn var(&mut self, kind: Kind, cost_s: f64, owner: usize, single: Option<usize>) -> Variable {
        let cost = cost_s * SCALE;
        let objective = if self.latency { cost } else { 0.0 };
        let v = match kind {
            Kind::Binary => self.problem.add_binary_var(objective),
            Kind::Integer(max) => self.problem.add_integer_var(objective, (0, max)),
            Kind::Fraction => self.problem.add_var(objective, (0.0, 1.0)),
        };
        if !self.latency && cost != 0.0 {
            self.busy[owner].add(v, cost);
            if let Some(k) = single {
                self.single[k].add(v, cost);
            }
        }
        v
    }

    /// Seconds to send `bytes` between virtual devices.
    fn hop(&self, from: usize, to: usize, bytes: u64) -> f64 {
        self.instance.transfer(self.phys[from], self.phys[to], bytes)
    }

    fn row(&mut self, terms: impl IntoIterator<Item = (Variable, f64)>, op: ComparisonOp, rhs: f64) {
        let mut e = LinearExpr::empty();
        let mut any = false;
        for (v, c) in terms {
            e.add(v, c);
            any = true;
        }
        if any {
            self.problem.add_constraint(e, op, rhs);
        }
    }
}

/// Builds the program. Under the throughput objective, `cutoff` (seconds, the
/// value of a known plan) bounds every device's busy time: no better plan
/// can exceed it, and the known plan meets it, so the bound only removes
/// what cannot win, above all units a device is too slow to run. `floor`
/// (seconds, from `bound.rs`) is a lower bound on the slowest device that
/// every plan meets: the program's `T` starts there.
pub(crate) fn build(
    instance: &Instance,
    blocks: Vec<Range<usize>>,
    cutoff: Option<f64>,
    floor: Option<f64>,
) -> Program {
    let cutoff = cutoff.filter(|c| c.is_finite() && instance.objective == Objective::Throughput);
    let devices = instance.devices();
    let mut phys: Vec<usize> = (0..devices).collect();
    let last_twin = instance.pin.map(|p| {
        phys.push(p);
        devices
    });
    let n = phys.len();
    let nb = blocks.len();
    let mut b = Builder {
        instance,
        problem: Problem::new(OptimizationDirection::Minimize),
        phys: phys.clone(),
        latency: instance.objective == Objective::Latency,
        busy: (0..devices).map(|_| LinearExpr::empty()).collect(),
        single: (0..nb).map(|_| LinearExpr::empty()).collect(),
    };
    let allowed = |block: usize, v: usize| {
        let unit = blocks[block].start;
        instance.need[unit] <= instance.cap[phys[v]]
            && match instance.pin {
                None => true,
                Some(p) if block == 0 => v == p,
                Some(p) if block == nb - 1 => v == p || Some(v) == last_twin,
                Some(_) => true,
            }
    };
    // Presence and counts.
    let mut w = vec![vec![None; n]; nb];
    let mut x = vec![vec![None; n]; nb];
    for (k, block) in blocks.iter().enumerate() {
        let len = block.len();
        let mut cover = Vec::new();
        for v in 0..n {
            if !allowed(k, v) {
                continue;
            }
            let per_unit = instance.compute[phys[v]][block.start];
            // The most units of this block the device's memory holds, and
            // that it runs within the cutoff.
            let need = instance.need[block.start];
            let mut most = instance.cap[phys[v]].checked_div(need).map_or(len, |fit| len.min(fit as usize));
            if let Some(cutoff) = cutoff
                && per_unit > 0.0
            {
                most = most.min((cutoff * (1.0 + 1e-6) / per_unit).floor() as usize);
            }
            if most == 0 {
                continue;
            }
            if len == 1 {
                let wv = b.var(Kind::Binary, per_unit, phys[v], Some(k));
                w[k][v] = Some(wv);
                cover.push((wv, 1.0));
            } else {
                let wv = b.var(Kind::Binary, 0.0, phys[v], None);
                let xv = b.var(Kind::Integer(most as i32), per_unit, phys[v], None);
                b.row([(xv, 1.0), (wv, -1.0)], ComparisonOp::Ge, 0.0);
                b.row([(xv, 1.0), (wv, -(most as f64))], ComparisonOp::Le, 0.0);
                w[k][v] = Some(wv);
                x[k][v] = Some(xv);
                cover.push((xv, 1.0));
            }
        }
        // Every unit runs once (no device may run this block: infeasible).
        let mut e = LinearExpr::empty();
        for (v, c) in cover {
            e.add(v, c);
        }
        b.problem.add_constraint(e, ComparisonOp::Eq, len as f64);
    }
    // Arcs.
    let mut inside = vec![Vec::new(); nb];
    let mut across = vec![Vec::new(); nb.saturating_sub(1)];
    for k in 0..nb {
        let bytes = instance.out[blocks[k].end - 1];
        if blocks[k].len() >= 2 {
            for from in 0..n {
                for to in 0..n {
                    if from != to && w[k][from].is_some() && w[k][to].is_some() {
                        let var = b.var(Kind::Binary, b.hop(from, to, bytes), phys[from], None);
                        inside[k].push(Arc { from, to, var });
                    }
                }
            }
        }
        if k + 1 < nb {
            // Between two single units the arcs are a transport between two
            // 0/1 vectors, integral by themselves.
            let single = blocks[k].len() == 1 && blocks[k + 1].len() == 1;
            for from in 0..n {
                for to in 0..n {
                    if w[k][from].is_some() && w[k + 1][to].is_some() {
                        let kind = if single { Kind::Fraction } else { Kind::Binary };
                        let one = (blocks[k].len() == 1).then_some(k);
                        let var = b.var(kind, b.hop(from, to, bytes), phys[from], one);
                        across[k].push(Arc { from, to, var });
                    }
                }
            }
        }
    }
    // The path: each node on it has one arc in and one arc out.
    for (k, row) in w.iter().enumerate() {
        for (v, wv) in row.iter().enumerate() {
            let Some(wv) = *wv else { continue };
            if k > 0 {
                let into = inside[k].iter().chain(&across[k - 1]).filter(|a| a.to == v);
                b.row(into.map(|a| (a.var, 1.0)).chain([(wv, -1.0)]), ComparisonOp::Eq, 0.0);
            }
            if k + 1 < nb {
                let out = inside[k].iter().chain(&across[k]).filter(|a| a.from == v);
                b.row(out.map(|a| (a.var, 1.0)).chain([(wv, -1.0)]), ComparisonOp::Eq, 0.0);
            }
        }
    }
    // No cycles inside a block (Miller-Tucker-Zemlin order).
    let mut order = vec![vec![None; n]; nb];
    let big = n as f64;
    for k in 0..nb {
        if inside[k].is_empty() {
            continue;
        }
        for v in 0..n {
            if w[k][v].is_some() {
                order[k][v] = Some(b.problem.add_var(0.0, (0.0, big - 1.0)));
            }
        }
        for arc in &inside[k] {
            if let (Some(from), Some(to)) = (order[k][arc.from], order[k][arc.to]) {
                b.row([(to, 1.0), (from, -1.0), (arc.var, -big)], ComparisonOp::Ge, 1.0 - big);
            }
        }
    }
    // Entries: each virtual device joins the path once, so its units are
    // consecutive.
    let entries = |v: usize| -> Vec<(Variable, f64)> {
        let mut terms: Vec<(Variable, f64)> = w[0][v].map(|wv| (wv, 1.0)).into_iter().collect();
        for arcs in inside.iter().chain(&across) {
            terms.extend(arcs.iter().filter(|a| a.to == v && a.from != v).map(|a| (a.var, 1.0)));
        }
        terms
    };
    for v in 0..n {
        b.row(entries(v), ComparisonOp::Le, 1.0);
    }
    // At least as many stages as it takes devices to hold the model (a cut
    // the relaxation would otherwise miss: it pays for fractions of hops).
    let mut caps = instance.cap.clone();
    caps.sort_unstable_by(|a, c| c.cmp(a));
    let total = instance.range_need(&(0..instance.units));
    let mut held = 0u64;
    let fewest = caps
        .iter()
        .take_while(|&&c| {
            let short = held < total;
            held = held.saturating_add(c);
            short
        })
        .count();
    if fewest > 1 {
        b.row((0..n).flat_map(&entries), ComparisonOp::Ge, fewest as f64);
    }
    // Memory, as a share of each physical device's capacity. A share below
    // a millionth counts as a millionth, to keep the row's coefficients
    // within the range the solver handles well (a conservative rounding of a
    // few bytes).
    for p in 0..devices {
        let cap = instance.cap[p] as f64;
        let mut terms = Vec::new();
        for (k, block) in blocks.iter().enumerate() {
            let need = instance.need[block.start];
            let share = if need == 0 { 0.0 } else { (need as f64 / cap).max(1e-6) };
            for v in (0..n).filter(|&v| phys[v] == p) {
                if let Some(count) = x[k][v].or(w[k][v])
                    && share > 0.0
                {
                    terms.push((count, share));
                }
            }
        }
        b.row(terms, ComparisonOp::Le, 1.0);
    }
    // The sampled token's trip back: a transport from the last block's
    // device to the first block's (the same device under privacy: free).
    // A device that cannot hold the whole model cannot run both ends (its
    // units are consecutive): its own return arc is left out, and a cut says
    // so to the relaxation.
    if instance.pin.is_none() && nb > 1 {
        let bytes = instance.out[instance.units - 1];
        let total = instance.range_need(&(0..instance.units));
        let whole = |v: usize| instance.cap[phys[v]] >= total;
        for (v, (first, last)) in w[0].iter().zip(&w[nb - 1]).enumerate() {
            if let (Some(first), Some(last)) = (*first, *last)
                && !whole(v)
            {
                b.row([(first, 1.0), (last, 1.0)], ComparisonOp::Le, 1.0);
            }
        }
        let mut out = vec![Vec::new(); n];
        let mut into = vec![Vec::new(); n];
        for from in 0..n {
            for to in 0..n {
                if w[nb - 1][from].is_some() && w[0][to].is_some() && (from != to || whole(from)) {
                    let r = b.var(Kind::Fraction, b.hop(from, to, bytes), phys[from], Some(nb - 1));
                    out[from].push((r, 1.0));
                    into[to].push((r, 1.0));
                }
            }
        }
        for v in 0..n {
            if let Some(wv) = w[nb - 1][v] {
                b.row(out[v].iter().copied().chain([(wv, -1.0)]), ComparisonOp::Eq, 0.0);
            }
            if let Some(wv) = w[0][v] {
                b.row(into[v].iter().copied().chain([(wv, -1.0)]), ComparisonOp::Eq, 0.0);
            }
        }
    }
    // Skip tensors: a device running a consumer and not the producer receives
    // the tensor once, from whichever device runs the producer. Tensors with
    // the same producer and consumer blocks travel together (one variable,
    // their costs added).
    let block_of = |unit: usize| blocks.partition_point(|block| block.end <= unit);
    let mut groups: Vec<(usize, Vec<Range<usize>>, Vec<u64>)> = Vec::new();
    for skip in &instance.skips {
        let source = block_of(skip.producer);
        let mut consumer_blocks: Vec<usize> = skip.consumers.iter().map(|&c| block_of(c)).collect();
        consumer_blocks.dedup();
        let runs = runs(&consumer_blocks);
        match groups.iter_mut().find(|g| g.0 == source && g.1 == runs) {
            Some(group) => group.2.push(skip.bytes),
            None => groups.push((source, runs, vec![skip.bytes])),
        }
    }
    for (source, runs, sizes) in &groups {
        let source = *source;
        for v in 0..n {
            let mut receive: Vec<(Variable, f64)> = Vec::new();
            for from in (0..n).filter(|&from| from != v) {
                if let Some(wp) = w[source][from] {
                    let cost = sizes.iter().map(|&bytes| b.hop(from, v, bytes)).sum();
                    let z = b.var(Kind::Fraction, cost, phys[from], Some(source));
                    b.row([(z, 1.0), (wp, -1.0)], ComparisonOp::Le, 0.0);
                    receive.push((z, 1.0));
                }
            }
            if let Some(wp) = w[source][v] {
                receive.push((wp, 1.0));
            }
            for run in runs {
                // v runs a consumer of the run iff it runs the run's first
                // block or enters the path inside the run.
                if let Some(first) = w[run.start][v] {
                    b.row(receive.iter().copied().chain([(first, -1.0)]), ComparisonOp::Ge, 0.0);
                }
                let mut entering: Vec<(Variable, f64)> = Vec::new();
                for k in run.start..run.end {
                    if k > run.start {
                        entering.extend(inside[k].iter().filter(|a| a.to == v).map(|a| (a.var, -1.0)));
                    }
                    if k + 1 < run.end {
                        entering.extend(across[k].iter().filter(|a| a.to == v && a.from != v).map(|a| (a.var, -1.0)));
                    }
                }
                if !entering.is_empty() {
                    b.row(receive.iter().copied().chain(entering), ComparisonOp::Ge, 0.0);
                }
            }
        }
    }
    // Identical devices are interchangeable: of two, the first in input
    // order is used first and comes first.
    let pairs = twins(instance);
    let mut classes: Vec<Vec<usize>> = Vec::new();
    for &(i, j) in &pairs {
        match classes.iter_mut().find(|c| c.contains(&i)) {
            Some(class) => class.push(j),
            None => classes.push(vec![i, j]),
        }
    }
    for (i, j) in pairs {
        let used_j = entries(j);
        let used_i: Vec<(Variable, f64)> = entries(i).into_iter().map(|(v, c)| (v, -c)).collect();
        b.row(used_j.into_iter().chain(used_i), ComparisonOp::Le, 0.0);
        for k in 0..nb {
            let Some(wj) = w[k][j] else { continue };
            let earlier = (0..=k).filter_map(|k2| w[k2][i]).map(|wi| (wi, -1.0));
            b.row(earlier.chain([(wj, 1.0)]), ComparisonOp::Le, 0.0);
            if let (Some(oi), Some(oj), Some(wi)) = (order[k][i], order[k][j], w[k][i]) {
                b.row([(oi, 1.0), (oj, -1.0), (wi, big), (wj, big)], ComparisonOp::Le, 2.0 * big - 1.0);
            }
        }
    }
    if !b.latency {
        let most = cutoff.map_or(f64::INFINITY, |c| c * SCALE * (1.0 + 1e-6));
        let least = floor.map_or(0.0, |f| (f * SCALE).clamp(0.0, most));
        let t = b.problem.add_var(1.0, (least, most));
        for mut e in std::mem::take(&mut b.busy) {
            e.add(t, -1.0);
            b.problem.add_constraint(e, ComparisonOp::Le, 0.0);
        }
        // One device runs each one-unit block, so what that unit brings is
        // within the slowest stage, however the relaxation spreads it.
        for (k, mut e) in std::mem::take(&mut b.single).into_iter().enumerate() {
            if blocks[k].len() == 1 && nb > 1 {
                e.add(t, -1.0);
                b.problem.add_constraint(e, ComparisonOp::Le, 0.0);
            }
        }
    }
    Program { problem: b.problem, blocks, phys, w, x, inside, across, classes }
}

/// Maximal runs of consecutive numbers in a sorted list.
pub(crate) fn runs(sorted: &[usize]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for &u in sorted {
        match runs.last_mut() {
            Some(run) if run.end == u => run.end = u + 1,
            _ => runs.push(u..u + 1),
        }
    }
    runs
}

/// Pairs `(i, j)`, `i < j`, of devices no cost can tell apart (neither
/// pinned), each device paired with the next one like it.
pub(crate) fn twins(instance: &Instance) -> Vec<(usize, usize)> {
    let devices = instance.devices();
    let same = |i: usize, j: usize| {
        let link_eq = |a: crate::profile::Link, b: crate::profile::Link| {
            a.bandwidth_bytes_per_s.to_bits() == b.bandwidth_bytes_per_s.to_bits()
                && a.rtt_s.to_bits() == b.rtt_s.to_bits()
        };
        instance.pin != Some(i)
            && instance.pin != Some(j)
            && instance.cap[i] == instance.cap[j]
            && instance.compute[i].iter().zip(&instance.compute[j]).all(|(a, b)| a.to_bits() == b.to_bits())
            && link_eq(instance.link[i][j], instance.link[j][i])
            && (0..devices).filter(|&k| k != i && k != j).all(|k| {
                link_eq(instance.link[i][k], instance.link[j][k]) && link_eq(instance.link[k][i], instance.link[k][j])
            })
    };
    let mut pairs = Vec::new();
    for j in 0..devices {
        if let Some(i) = (0..j).rev().find(|&i| same(i, j)) {
            pairs.push((i, j));
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_gaps() {
        assert_eq!(runs(&[1, 2, 3, 5, 7, 8]), vec![1..4, 5..6, 7..9]);
        assert!(runs(&[]).is_empty());
    }
}

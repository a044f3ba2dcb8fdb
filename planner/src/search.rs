//! The ordered-stage search: a fast heuristic that seeds the MIP.
//!
//! For a fixed order of devices, a dynamic program over (next unit, last
//! device used) finds the best cut points, skipping devices freely. Two
//! things it cannot see exactly are approximated: a skip tensor is charged
//! as if it came from the previous stage rather than from its producer, and
//! the sampled token's trip back is left out. Orders come from a relaxation
//! that lets a device appear twice, from sorting by speed and by memory, and
//! from a short local search of swaps.
//!
//! For the throughput objective a second search runs: for an order of the
//! devices to use, a bisection on the slowest stage's time with a greedy
//! fill (each stage takes as many units as fit in that time) gives the
//! cuts, and a local search swaps, drops and inserts devices.
//!
//! Every candidate is costed exactly by [`Instance::evaluate`]; the best
//! admissible one is returned. Nothing here claims optimality: that is the
//! MIP's job.

use std::ops::Range;

use crate::config::Objective;
use crate::instance::Instance;

type Stages = Vec<(usize, Range<usize>)>;

/// Total dynamic-program work (states times transitions) the local search
/// may spend.
const WORK_BUDGET: usize = 30_000_000;

/// Orders the throughput search may try.
const ORDER_BUDGET: usize = 3_000;

/// The best plan the search finds, or `None` when it finds none.
pub(crate) fn best(instance: &Instance) -> Option<Stages> {
    let cost = |stages: &Stages| instance.objective_of(&instance.evaluate(stages));
    let dp = by_dp(instance);
    let found = if instance.objective == Objective::Latency {
        dp
    } else {
        match (dp, by_fill(instance)) {
            (Some(a), Some(b)) => Some(if cost(&b) < cost(&a) { b } else { a }),
            (a, b) => a.or(b),
        }
    };
    found.map(|stages| polish(instance, stages))
}

/// Moves single cuts by one unit while that helps, costed exactly: the
/// searches above approximate skip tensors and the trip back.
pub(crate) fn polish(instance: &Instance, mut stages: Stages) -> Stages {
    let cost = |stages: &Stages| instance.objective_of(&instance.evaluate(stages));
    let mut value = cost(&stages);
    let mut improved = true;
    let mut rounds = 0;
    while improved && rounds < 4 * instance.units {
        improved = false;
        rounds += 1;
        for i in 0..stages.len().saturating_sub(1) {
            for later in [false, true] {
                let mut moved = stages.clone();
                let cut = moved[i].1.end;
                let cut = if later { cut + 1 } else { cut - 1 };
                moved[i].1.end = cut;
                moved[i + 1].1.start = cut;
                if instance.admissible(&moved) {
                    let v = cost(&moved);
                    if v < value - 1e-12 {
                        (stages, value) = (moved, v);
                        improved = true;
                    }
                }
            }
        }
    }
    stages
}

/// The dynamic program over cuts, on a few orders and their swaps.
fn by_dp(instance: &Instance) -> Option<Stages> {
    let devices = instance.devices();
    let mut best: Option<(f64, Stages)> = None;
    let consider = |stages: Option<Stages>, best: &mut Option<(f64, Stages)>| -> bool {
        let Some(stages) = stages else { return false };
        if !instance.admissible(&stages) {
            return false;
        }
        let value = instance.objective_of(&instance.evaluate(&stages));
        let better = best.as_ref().is_none_or(|(v, _)| value < *v - 1e-12);
        if better {
            *best = Some((value, stages));
        }
        better
    };
    let whole = 0..instance.units;
    let others = |order: Vec<usize>| -> Vec<usize> { order.into_iter().filter(|&d| Some(d) != instance.pin).collect() };
    let by_speed = others(sorted(devices, |d| instance.range_compute(d, &whole)));
    let by_memory = others(sorted(devices, |d| -(instance.cap[d] as f64)));
    // Under privacy, the pinned device's first stage ends at one of a few
    // boundaries tried here.
    let starts: Vec<usize> = match instance.pin {
        None => vec![0],
        Some(p) => {
            let fitting = (1..=instance.units).take_while(|&a| instance.fits(p, &(0..a))).count();
            let mut starts: Vec<usize> = (1..=fitting.min(3)).collect();
            starts.extend((1..=4).map(|i| fitting * i / 4).filter(|&a| a > 3));
            starts
        }
    };
    let runs = |order: &[usize], relaxed: bool| {
        let mut found: Option<(f64, Stages)> = None;
        for &start in &starts {
            if let Some(stages) = ordered_dp(instance, order, relaxed, start) {
                // A relaxed plan may repeat a device: it only suggests an order.
                let value = if instance.admissible(&stages) {
                    instance.objective_of(&instance.evaluate(&stages))
                } else if relaxed {
                    f64::MAX
                } else {
                    continue;
                };
                if found.as_ref().is_none_or(|(v, _)| value < *v) {
                    found = Some((value, stages));
                }
            }
        }
        found.map(|(_, stages)| stages)
    };
    let mut orders = vec![by_speed.clone(), by_memory];
    if let Some(relaxed) = runs(&by_speed, true) {
        let mut order: Vec<usize> = Vec::new();
        for (d, _) in &relaxed {
            if !order.contains(d) && Some(*d) != instance.pin {
                order.push(*d);
            }
        }
        let rest: Vec<usize> = by_speed.iter().copied().filter(|d| !order.contains(d)).collect();
        order.extend(rest);
        orders.insert(0, order);
    }
    let mut best_order = orders[0].clone();
    for order in &orders {
        if consider(runs(order, false), &mut best) {
            best_order = order.clone();
        }
    }
    // Local search: swap two devices of the best order while it helps.
    let k = best_order.len();
    let per_run = (k * k * instance.units * instance.units * starts.len()).max(1);
    let mut runs_left = WORK_BUDGET / per_run;
    let mut improved = true;
    while improved && runs_left > 0 {
        improved = false;
        'swaps: for i in 0..k {
            for j in i + 1..k {
                if runs_left == 0 {
                    break 'swaps;
                }
                runs_left -= 1;
                let mut order = best_order.clone();
                order.swap(i, j);
                if consider(runs(&order, false), &mut best) {
                    best_order = order;
                    improved = true;
                }
            }
        }
    }
    best.map(|(_, stages)| stages)
}

/// The throughput search: bisection and greedy fill on orders found by a
/// local search.
fn by_fill(instance: &Instance) -> Option<Stages> {
    let devices = instance.devices();
    let whole = 0..instance.units;
    let free: Vec<usize> = sorted(devices, |d| instance.range_compute(d, &whole))
        .into_iter()
        .filter(|&d| Some(d) != instance.pin)
        .collect();
    let tried = std::cell::Cell::new(0usize);
    let evaluate = |order: &[usize]| -> Option<(f64, Stages)> {
        tried.set(tried.get() + 1);
        let stages = balance(instance, order)?;
        instance.admissible(&stages).then(|| (instance.objective_of(&instance.evaluate(&stages)), stages))
    };
    // Start from the fastest m devices, for every m.
    let mut best: Option<(f64, Vec<usize>, Stages)> = None;
    for m in 1..=free.len().max(1) {
        let order = framed(instance, &free[..m.min(free.len())]);
        if let Some((value, stages)) = evaluate(&order)
            && best.as_ref().is_none_or(|b| value < b.0)
        {
            best = Some((value, order, stages));
        }
    }
    let (mut value, mut order, mut stages) = best?;
    // Hill-climb on the middle of the order (the pinned ends stay put).
    let mut improved = true;
    while improved && tried.get() < ORDER_BUDGET {
        improved = false;
        let middle: Vec<usize> = order.iter().copied().filter(|&d| Some(d) != instance.pin).collect();
        let unused: Vec<usize> = free.iter().copied().filter(|d| !middle.contains(d)).collect();
        let mut moves: Vec<Vec<usize>> = Vec::new();
        for i in 0..middle.len() {
            for j in i + 1..middle.len() {
                let mut m = middle.clone();
                m.swap(i, j);
                moves.push(m);
            }
            if middle.len() > 1 || instance.pin.is_some() {
                let mut m = middle.clone();
                m.remove(i);
                moves.push(m);
            }
        }
        for &d in &unused {
            for i in 0..=middle.len() {
                let mut m = middle.clone();
                m.insert(i, d);
                moves.push(m);
            }
        }
        for m in moves {
            if tried.get() >= ORDER_BUDGET {
                break;
            }
            let candidate = framed(instance, &m);
            if let Some((v, s)) = evaluate(&candidate)
                && v < value - 1e-12
            {
                (value, order, stages) = (v, candidate, s);
                improved = true;
                break;
            }
        }
    }
    Some(stages)
}

/// `middle` with the pinned device at both ends, under privacy.
fn framed(instance: &Instance, middle: &[usize]) -> Vec<usize> {
    match instance.pin {
        Some(p) => std::iter::once(p).chain(middle.iter().copied()).chain([p]).collect(),
        None => middle.to_vec(),
    }
}

/// Cuts for `order` (every device used, in order) that make the slowest
/// stage as fast as the greedy fill can: bisection on that time.
fn balance(instance: &Instance, order: &[usize]) -> Option<Stages> {
    let mut high = instance.range_compute(order[0], &(0..instance.units)) * 2.0 + 1.0;
    let mut best = fill(instance, order, f64::INFINITY)?;
    high = high.max(instance.evaluate(&best).bottleneck);
    let mut low = 0.0;
    for _ in 0..40 {
        let mid = 0.5 * (low + high);
        match fill(instance, order, mid) {
            Some(stages) => {
                best = stages;
                high = mid;
            }
            None => low = mid,
        }
        if high - low <= 1e-9 * high {
            break;
        }
    }
    Some(best)
}

/// Each stage of `order` takes as many units as it can run within `limit`
/// seconds, sends included (a skip tensor is charged to its producer's
/// stage as if every later device read it), leaving one unit for each stage
/// after it. `None` when the units do not fit.
fn fill(instance: &Instance, order: &[usize], limit: f64) -> Option<Stages> {
    let units = instance.units;
    let k = order.len();
    if k == 0 || k > units {
        return None;
    }
    let mut used_mem = vec![0u64; instance.devices()];
    let mut stages = Vec::with_capacity(k);
    let mut start = 0;
    for i in 0..k {
        let d = order[i];
        let next = order[(i + 1) % k];
        let later = &order[i + 1..];
        let skip_send = |end: usize| -> f64 {
            instance
                .skips
                .iter()
                .filter(|s| (start..end).contains(&s.producer))
                .map(|s| {
                    let mut seen: Vec<usize> = Vec::new();
                    later
                        .iter()
                        .filter(|&&e| {
                            e != d && !seen.contains(&e) && {
                                seen.push(e);
                                true
                            }
                        })
                        .map(|&e| instance.transfer(d, e, s.bytes))
                        .sum::<f64>()
                })
                .sum()
        };
        let room = instance.cap[d].saturating_sub(used_mem[d]);
        let fits = |end: usize| instance.range_need(&(start..end)) <= room;
        let time = |end: usize| {
            instance.range_compute(d, &(start..end))
                + instance.transfer(d, next, instance.out[end - 1])
                + skip_send(end)
        };
        let end = if i + 1 == k {
            (fits(units) && time(units) <= limit).then_some(units)?
        } else {
            let last = units - (k - i - 1);
            let mut best = None;
            for end in start + 1..=last {
                if !fits(end) || instance.range_compute(d, &(start..end)) > limit {
                    break;
                }
                if time(end) <= limit {
                    best = Some(end);
                }
            }
            best?
        };
        used_mem[d] += instance.range_need(&(start..end));
        stages.push((d, start..end));
        start = end;
    }
    Some(stages)
}

fn sorted(devices: usize, key: impl Fn(usize) -> f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..devices).collect();
    order.sort_by(|&a, &b| key(a).total_cmp(&key(b)));
    order
}

/// Best cut points for devices taken in `order` (each used at most once, any
/// skipped), or, when `relaxed`, in any order with repeats allowed. Under
/// privacy `order` leaves out the pinned device, which runs units `0..start`
/// and the last stage.
fn ordered_dp(instance: &Instance, order: &[usize], relaxed: bool, start: usize) -> Option<Stages> {
    let units = instance.units;
    let throughput = instance.objective == Objective::Throughput;
    // Slots: the devices of `order`, then the pinned device's last stage.
    let k = order.len();
    let slots = k + usize::from(instance.pin.is_some());
    let device = |j: usize| {
        if j < k { order[j] } else { instance.pin.unwrap_or(usize::MAX) }
    };
    // value[u][j]: best cost of units 0..u with the last stage on slot j;
    // from[u][j]: (previous boundary, previous slot), usize::MAX at the start.
    let mut value = vec![vec![f64::INFINITY; slots + 1]; units + 1];
    let mut from = vec![vec![(usize::MAX, usize::MAX); slots + 1]; units + 1];
    let first_slot = slots; // the pinned device's first stage
    match instance.pin {
        Some(p) => {
            if start == 0 || start > units || !instance.fits(p, &(0..start)) {
                return None;
            }
            value[start][first_slot] = instance.range_compute(p, &(0..start));
        }
        None => {
            for (j, &d) in order.iter().enumerate() {
                for (v, row) in value.iter_mut().enumerate().skip(1) {
                    if !instance.fits(d, &(0..v)) {
                        break;
                    }
                    row[j] = instance.range_compute(d, &(0..v));
                }
            }
        }
    }
    let first_need = instance.range_need(&(0..start));
    for u in 1..units {
        for j in 0..=slots {
            let current = value[u][j];
            // The pinned device's last stage (slot k) ends the plan.
            if !current.is_finite() || (instance.pin.is_some() && j == k) {
                continue;
            }
            let c = device(j);
            let next = if j == first_slot || relaxed { 0..slots } else { j + 1..slots };
            for jn in next {
                let d = device(jn);
                if d == c {
                    continue;
                }
                let mut send = instance.transfer(c, d, instance.out[u - 1]);
                for skip in &instance.skips {
                    if skip.producer < u && skip.consumers.iter().any(|&x| x >= u) {
                        send += instance.transfer(c, d, skip.bytes);
                    }
                }
                let last_stage = jn == k && instance.pin.is_some();
                for v in u + 1..=units {
                    let range = u..v;
                    let fits = if last_stage {
                        first_need + instance.range_need(&range) <= instance.cap[d]
                    } else {
                        instance.fits(d, &range)
                    };
                    if !fits {
                        break;
                    }
                    if last_stage && v < units {
                        continue;
                    }
                    let compute = instance.range_compute(d, &range);
                    let cost = if throughput { (current + send).max(compute) } else { current + send + compute };
                    if cost < value[v][jn] {
                        value[v][jn] = cost;
                        from[v][jn] = (u, j);
                    }
                }
            }
        }
    }
    let ends: Vec<usize> = match instance.pin {
        Some(_) => vec![k, first_slot],
        None => (0..k).collect(),
    };
    let mut j = ends
        .into_iter()
        .filter(|&j| value[units][j].is_finite())
        .min_by(|&a, &b| value[units][a].total_cmp(&value[units][b]))?;
    let mut stages = Vec::new();
    let mut v = units;
    loop {
        let (u, prev) = from[v][j];
        let d = device(j);
        if u == usize::MAX {
            stages.push((d, 0..v));
            break;
        }
        stages.push((d, u..v));
        v = u;
        j = prev;
    }
    stages.reverse();
    Some(stages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::instance::tests::{devices, model};

    #[test]
    fn finds_the_two_stage_split() {
        let instance = Instance::new(&model(), &devices(), &Config::default()).unwrap();
        let stages = best(&instance).unwrap();
        assert!(instance.admissible(&stages));
        assert_eq!(stages.len(), 2);
    }

    #[test]
    fn respects_the_privacy_pin() {
        let mut devices = devices();
        devices[0].mem_bytes = 10_000_000_000;
        let config = Config { privacy: Some("b".into()), ..Config::default() };
        let instance = Instance::new(&model(), &devices, &config).unwrap();
        let stages = best(&instance).unwrap();
        // b holds two units: the first and the last; a runs the middle.
        assert_eq!(stages, vec![(1, 0..1), (0, 1..3), (1, 3..4)]);
    }
}

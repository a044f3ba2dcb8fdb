//! The exact search over device orders at a limit: for every first and
//! last device, a depth-first walk over the devices in between.

use std::cmp::Reverse;

use super::{Relaxation, Stages};

/// What the exact search says of a limit.
pub(super) enum Search {
    /// A plan busy for at most the limit.
    Found(Stages),
    /// Every order was tried or ruled out: no plan meets the limit.
    Exhausted,
    /// The budget ran out first.
    Unknown,
}

impl Relaxation<'_> {
    /// The exact search at `limit`: every first and last device (one per
    /// class of identical devices), and for each a depth-first walk over the
    /// devices in between (`Walk`), each taking the most middle units it can
    /// given the device after it.
    pub(super) fn search(&self, limit: f64, budget: &mut usize) -> Search {
        let instance = self.instance;
        if let Some(d) = self.alone(limit) {
            return Search::Found(vec![(d, 0..instance.units)]);
        }
        let best: Vec<usize> =
            (0..instance.devices()).map(|d| self.fit(d, limit - self.hop[d], instance.cap[d]).unwrap_or(0)).collect();
        let mut complete = true;
        for class in &self.classes {
            let p = class[0];
            let Some(p_room) = instance.cap[p].checked_sub(instance.need[0]) else {
                continue;
            };
            if limit - instance.compute[p][0] - self.first_hop[p] < 0.0 {
                continue;
            }
            for class in &self.classes {
                let Some(&l) = class.iter().find(|&&l| l != p) else {
                    continue;
                };
                let Some(l_most) = self.last_units(p, l, limit) else {
                    continue;
                };
                let mut used = vec![false; instance.devices()];
                used[p] = true;
                used[l] = true;
                let mut walk = Walk {
                    relaxation: self,
                    limit,
                    p,
                    l,
                    p_room,
                    l_most,
                    best: &best,
                    used,
                    path: Vec::new(),
                    budget: &mut *budget,
                    complete: true,
                };
                if let Some(stages) = walk.extend(p, 0, 0.0) {
                    return Search::Found(stages);
                }
                complete &= walk.complete;
            }
        }
        if complete { Search::Exhausted } else { Search::Unknown }
    }
}

/// A depth-first walk over the devices between a first device `p` and a
/// last device `l`: each device in the path takes the most middle units it
/// can in `limit` given its hop to the next one. A branch is cut when even
/// the most every remaining device could take (`best`, its cheapest hop)
/// cannot place every middle unit, which never cuts a plan that meets the
/// limit; of identical devices only the first unused one is tried.
struct Walk<'a> {
    relaxation: &'a Relaxation<'a>,
    limit: f64,
    p: usize,
    l: usize,
    /// Memory `p` has left after the first unit.
    p_room: u64,
    /// Middle units `l` can take.
    l_most: usize,
    best: &'a [usize],
    used: Vec<bool>,
    /// Devices between `p` and `l`, each with its units once its successor
    /// is chosen.
    path: Vec<(usize, usize)>,
    budget: &'a mut usize,
    /// Whether nothing was left out for want of budget.
    complete: bool,
}

impl Walk<'_> {
    /// Middle units `p` runs when `next` follows it and it sends `skip`
    /// seconds of skip tensors, or `None` when it cannot within the limit.
    fn first_units(&self, next: usize, skip: f64) -> Option<usize> {
        let instance = self.relaxation.instance;
        let budget = self.limit - instance.compute[self.p][0] - skip;
        let with = budget - instance.transfer(self.p, next, instance.out[1]);
        match self.relaxation.fit(self.p, with, self.p_room) {
            Some(n) if n > 0 => Some(n),
            _ => (budget - instance.transfer(self.p, next, instance.out[0]) >= 0.0).then_some(0),
        }
    }

    /// At most how many middle units `p` and the unused devices can still
    /// take when `p` already sends `skip` seconds of skip tensors: a
    /// fractional knapsack on `p`'s time, where each unused device adds its
    /// `best` units for the skip tensors `p` must send it, and `p`'s own
    /// units cost their compute time. `-inf` when `p` is already too busy.
    fn most(&self, skip: f64) -> f64 {
        let relaxation = self.relaxation;
        let instance = relaxation.instance;
        let p = self.p;
        let mut time = self.limit - instance.compute[p][0] - relaxation.first_hop[p] - skip;
        if time < 0.0 {
            return f64::NEG_INFINITY;
        }
        // (units, seconds of p's time) per item.
        let per_unit = instance.compute[p][1];
        let own_units = relaxation.fit(p, f64::INFINITY, self.p_room).unwrap_or(0) as f64;
        let mut items: Vec<(f64, f64)> = (0..instance.devices())
            .filter(|&d| !self.used[d] && self.best[d] > 0)
            .map(|d| (self.best[d] as f64, relaxation.skip[p][d]))
            .collect();
        items.push((own_units, own_units * per_unit));
        // Most units per second first; free ones before all.
        items.sort_by(|a, b| (b.0 * a.1).total_cmp(&(a.0 * b.1)));
        let mut units = 0.0;
        for (value, cost) in items {
            if cost <= time {
                units += value;
                time -= cost;
            } else {
                units += value * time / cost;
                break;
            }
        }
        // The same hair of slack as `fit`.
        units * (1.0 + 1e-12) + 1e-9
    }

    /// Extends the path after `tail` (whose units depend on what follows it),
    /// with `placed` middle units on the path before `tail` and `skip`
    /// seconds of skip tensors `p` sends the devices on it.
    fn extend(&mut self, tail: usize, placed: usize, skip: f64) -> Option<Stages> {
        if *self.budget == 0 {
            self.complete = false;
            return None;
        }
        *self.budget -= 1;
        let relaxation = self.relaxation;
        let instance = relaxation.instance;
        let (p, l, limit) = (self.p, self.l, self.limit);
        let tail_units = |e: usize| {
            if tail == p {
                return Some(0);
            }
            let hop = instance.transfer(tail, e, instance.out[1]);
            relaxation.fit(tail, limit - hop, instance.cap[tail]).filter(|&n| n > 0)
        };
        // End here: `l` follows.
        if let Some(t) = tail_units(l) {
            if let Some(last) = self.path.last_mut() {
                last.1 = t;
            }
            let first_next = self.path.first().map_or(l, |m| m.0);
            for l_reads in [false, true] {
                if l_reads && self.l_most == 0 {
                    continue;
                }
                let (l_units, l_skip) = if l_reads { (self.l_most, relaxation.skip[p][l]) } else { (0, 0.0) };
                let Some(own) = self.first_units(first_next, skip + l_skip) else {
                    continue;
                };
                if placed + t + l_units + own >= relaxation.middle {
                    match self.stages(own, l_units) {
                        Some(stages) => return Some(stages),
                        // Round-off: a plan the exact costs refuse.
                        None => self.complete = false,
                    }
                }
            }
        }
        // Or one more device, the first unused of each class, the ones that
        // can take most first.
        let mut next: Vec<usize> = relaxation
            .classes
            .iter()
            .filter_map(|class| class.iter().copied().find(|&d| !self.used[d]))
            .filter(|&e| self.best[e] > 0)
            .collect();
        next.sort_by_key(|&e| Reverse(self.best[e]));
        for e in next {
            let Some(t) = tail_units(e) else {
                continue;
            };
            let skip = skip + relaxation.skip[p][e];
            self.used[e] = true;
            let most = self.most(skip);
            self.used[e] = false;
            if (placed + t + self.best[e] + self.l_most) as f64 + most < relaxation.middle as f64 {
                continue;
            }
            if let Some(last) = self.path.last_mut() {
                last.1 = t;
            }
            self.used[e] = true;
            self.path.push((e, 0));
            let found = self.extend(e, placed + t, skip);
            self.path.pop();
            self.used[e] = false;
            if found.is_some() || *self.budget == 0 {
                return found;
            }
        }
        None
    }

    /// The plan of the path with `own` middle units on `p` and `l_units` on
    /// `l`, the units beyond the middle taken back from the end (`l` first,
    /// then the devices before it down to one unit each, then `p`), if the
    /// exact costs confirm it meets the limit.
    fn stages(&self, own: usize, l_units: usize) -> Option<Stages> {
        let instance = self.relaxation.instance;
        let units = instance.units;
        let mut counts: Vec<(usize, usize)> = vec![(self.p, own)];
        counts.extend(self.path.iter().copied());
        counts.push((self.l, l_units));
        let total: usize = counts.iter().map(|c| c.1).sum();
        let mut surplus = total - self.relaxation.middle;
        let k = counts.len();
        for (i, c) in counts.iter_mut().enumerate().rev() {
            let keep = usize::from(i > 0 && i + 1 < k);
            let cut = surplus.min(c.1.saturating_sub(keep));
            c.1 -= cut;
            surplus -= cut;
        }
        if surplus > 0 {
            return None;
        }
        let mut stages = Vec::with_capacity(k);
        let mut start = 0;
        for (i, (d, n)) in counts.into_iter().enumerate() {
            let end = start + n + usize::from(i == 0) + usize::from(i + 1 == k);
            stages.push((d, start..end));
            start = end;
        }
        let meets = start == units
            && instance.admissible(&stages)
            && instance.evaluate(&stages).bottleneck <= self.limit * (1.0 + 1e-12);
        meets.then_some(stages)
    }
}

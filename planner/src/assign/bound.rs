//! A lower bound on the throughput objective, from a relaxation that forgets
//! the order of the stages (written out in `planner/README.md`).
//!
//! The MIP's own relaxation is weak under the throughput objective: it runs
//! fractions of devices and pays fractions of their hops, so branch and
//! bound struggles to prove an incumbent optimal. The relaxation here keeps
//! what makes the bottleneck what it is (whole units, a hop out of every
//! device in use, the skip tensors the first device sends to every device
//! that reads them, memory) and drops where each range sits in the
//! pipeline. For a model of three blocks (a first unit, a block of
//! interchangeable units, a last unit: a transformer on estimated or evened
//! out speeds) whose skip tensors all go from the first unit to the middle
//! block, whether some plan has every device busy for at most `T` is then a
//! small enumeration, and a bisection on `T` gives the bound. An exact
//! search over device orders (`Walk`, in `bound/walk.rs`) then looks for a plan at the bound,
//! raising it where it proves none exists. With the bound as a constraint
//! and such a plan as the incumbent, the MIP stops at its root.

mod walk;

use std::ops::Range;

use super::program::twins;
use crate::instance::Instance;
use walk::Search;

type Stages = Vec<(usize, Range<usize>)>;

/// Orders the exact search may try (its nodes), all its steps together.
const NODE_BUDGET: usize = 400_000;

/// What the bound found.
pub(crate) struct Bound {
    /// No plan is busy for less (seconds).
    pub seconds: f64,
    /// The best plan the exact search found on the way, if any.
    pub plan: Option<Stages>,
}

/// The bound for plans busy for at most `cutoff` seconds (the value of a
/// known plan), or `None` when the instance is not of the shape above.
///
/// First a bisection on the relaxation; then a bisection between that and
/// `cutoff` with the exact search over orders (`Walk`), which finds plans
/// and, where it covers every order within its budget, raises the bound.
pub(crate) fn lower_bound(instance: &Instance, blocks: &[Range<usize>], cutoff: f64) -> Option<Bound> {
    let units = instance.units;
    let three = blocks.len() == 3 && blocks[1] == (1..units - 1);
    let skips_from_first =
        instance.skips.iter().all(|s| s.producer == 0 && s.consumers.iter().all(|c| (1..units - 1).contains(c)));
    if !three || !skips_from_first || instance.pin.is_some() || !cutoff.is_finite() {
        return None;
    }
    let relaxation = Relaxation::new(instance);
    let mut high = cutoff * (1.0 + 1e-6);
    if !relaxation.feasible(high) {
        return None;
    }
    let mut low = 0.0;
    while high - low > 1e-13 * high {
        let mid = 0.5 * (low + high);
        if relaxation.feasible(mid) {
            high = mid;
        } else {
            low = mid;
        }
    }
    let cost = |stages: &Stages| instance.objective_of(&instance.evaluate(stages));
    let mut budget = NODE_BUDGET;
    let mut plan: Option<(f64, Stages)> = None;
    let mut top = cutoff;
    // The bound itself first: it is often met.
    let mut limit = low * (1.0 + 1e-9);
    while limit < top {
        match relaxation.search(limit, &mut budget) {
            Search::Found(stages) => {
                let value = cost(&stages);
                top = top.min(value);
                if plan.as_ref().is_none_or(|(v, _)| value < *v) {
                    plan = Some((value, stages));
                }
            }
            Search::Exhausted => low = limit,
            Search::Unknown => break,
        }
        if top <= low * (1.0 + 1e-9) {
            break;
        }
        limit = 0.5 * (low + top);
    }
    Some(Bound { seconds: low, plan: plan.map(|(_, stages)| stages) })
}

/// The tables the enumeration reads.
struct Relaxation<'a> {
    instance: &'a Instance,
    /// Units in the middle block.
    middle: usize,
    /// Classes of identical devices, in input order.
    classes: Vec<Vec<usize>>,
    /// Least hop out of a device that ends on a middle unit.
    hop: Vec<f64>,
    /// Least hop out of the first unit's device (it may end on either).
    first_hop: Vec<f64>,
    /// `skip[p][v]`: the skip tensors `p` sends `v`.
    skip: Vec<Vec<f64>>,
}

impl<'a> Relaxation<'a> {
    fn new(instance: &'a Instance) -> Relaxation<'a> {
        let devices = instance.devices();
        let units = instance.units;
        let least = |d: usize, bytes: &[u64]| {
            (0..devices)
                .filter(|&e| e != d)
                .flat_map(|e| bytes.iter().map(move |&b| instance.transfer(d, e, b)))
                .fold(f64::INFINITY, f64::min)
        };
        let hop = (0..devices).map(|d| least(d, &[instance.out[1]])).collect();
        let first_hop = (0..devices).map(|d| least(d, &[instance.out[0], instance.out[1]])).collect();
        let skip = (0..devices)
            .map(|p| {
                (0..devices).map(|v| instance.skips.iter().map(|s| instance.transfer(p, v, s.bytes)).sum()).collect()
            })
            .collect();
        let mut classes: Vec<Vec<usize>> = (0..devices).map(|d| vec![d]).collect();
        for (i, j) in twins(instance) {
            let from = classes.iter().position(|c| c.contains(&j)).unwrap_or(j);
            let moved = std::mem::take(&mut classes[from]);
            if let Some(class) = classes.iter_mut().find(|c| c.contains(&i)) {
                class.extend(moved);
            }
        }
        classes.retain(|c| !c.is_empty());
        Relaxation { instance, middle: units - 2, classes, hop, first_hop, skip }
    }

    /// Middle units device `d` can run in `budget` seconds with `room`
    /// bytes, at most all of them (a hair of slack against round-off only
    /// loosens the relaxation).
    fn fit(&self, d: usize, budget: f64, room: u64) -> Option<usize> {
        if budget < 0.0 {
            return None;
        }
        let per_unit = self.instance.compute[d][1];
        let need = self.instance.need[1];
        let mut most = self.middle;
        if per_unit > 0.0 {
            most = most.min((budget / per_unit * (1.0 + 1e-12) + 1e-12).floor() as usize);
        }
        if let Some(fit) = room.checked_div(need) {
            most = most.min(fit as usize);
        }
        Some(most)
    }

    /// A device that runs the whole model within `limit` by itself (no sends).
    fn alone(&self, limit: f64) -> Option<usize> {
        let instance = self.instance;
        let whole = 0..instance.units;
        (0..instance.devices()).find(|&d| instance.fits(d, &whole) && instance.range_compute(d, &whole) <= limit)
    }

    /// Whether some choice of devices meets `limit` in the relaxation.
    fn feasible(&self, limit: f64) -> bool {
        let instance = self.instance;
        if self.alone(limit).is_some() {
            return true;
        }
        let room = |d: usize, taken: u64| instance.cap[d].checked_sub(taken);
        for pc in 0..self.classes.len() {
            let p = self.classes[pc][0];
            let Some(p_room) = room(p, instance.need[0]) else {
                continue;
            };
            // The first device's budget before skip tensors.
            let p_budget = limit - instance.compute[p][0] - self.first_hop[p];
            if p_budget < 0.0 {
                continue;
            }
            for lc in 0..self.classes.len() {
                let Some(&l) = self.classes[lc].iter().find(|&&l| l != p) else {
                    continue;
                };
                let Some(l_units) = self.last_units(p, l, limit) else {
                    continue;
                };
                // Devices left per class, with what each adds and costs the
                // first device.
                let groups: Vec<(usize, usize, f64)> = self
                    .classes
                    .iter()
                    .filter_map(|class| {
                        let free = class.iter().filter(|&&d| d != p && d != l).count();
                        let d = *class.iter().find(|&&d| d != p && d != l)?;
                        let adds = self.fit(d, limit - self.hop[d], instance.cap[d])?;
                        (adds > 0).then_some((free, adds, self.skip[p][d]))
                    })
                    .collect();
                // The last device reads the skip tensors only if it runs
                // middle units.
                for l_reads in [false, true] {
                    if l_reads && l_units == 0 {
                        continue;
                    }
                    let base_units = if l_reads { l_units } else { 0 };
                    let base_skip = if l_reads { self.skip[p][l] } else { 0.0 };
                    if self.choose(&groups, p, p_budget - base_skip, p_room, base_units) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// The most middle units the last device `l` can run (0 or more) with
    /// the last unit and the token's trip back to `p`, or `None` when it
    /// cannot be the last device within `limit`.
    fn last_units(&self, p: usize, l: usize, limit: f64) -> Option<usize> {
        let instance = self.instance;
        let last_unit = instance.units - 1;
        let room = instance.cap[l].checked_sub(instance.need[last_unit])?;
        let token = instance.transfer(l, p, instance.out[last_unit]);
        self.fit(l, limit - instance.compute[l][last_unit] - token, room)
    }

    /// Whether some number of devices of each group (devices left, units
    /// each adds, skip tensors each costs the first device), with the first
    /// device filling what its budget left after the skip tensors allows,
    /// gives every middle unit a place.
    fn choose(&self, groups: &[(usize, usize, f64)], p: usize, budget: f64, room: u64, base: usize) -> bool {
        let mut counts = vec![0usize; groups.len()];
        loop {
            let mut placed = base;
            let mut spent = 0.0;
            for (g, &n) in groups.iter().zip(&counts) {
                placed += g.1 * n;
                spent += g.2 * n as f64;
            }
            if self.fit(p, budget - spent, room).is_some_and(|own| placed + own >= self.middle) {
                return true;
            }
            // Next combination.
            let mut i = 0;
            loop {
                if i == groups.len() {
                    return false;
                }
                if counts[i] < groups[i].0 {
                    counts[i] += 1;
                    break;
                }
                counts[i] = 0;
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assign::{self, block};
    use crate::config::{Config, Objective};
    use crate::cost::{ModelCost, SkipTensor, UnitCost};
    use crate::plan::{Method, PlanError};
    use crate::profile::{DeviceProfile, Link, connect_all, connect_by};
    use crate::{exhaustive, search};
    use proptest::prelude::*;

    /// Prologue, `middle` identical layers, epilogue; every skip tensor goes
    /// from the prologue to every layer.
    fn three_blocks(
        first: &UnitCost,
        layer: &UnitCost,
        last: &UnitCost,
        middle: usize,
        kv: u64,
        skips: &[u64],
    ) -> ModelCost {
        let mut units = vec![first.clone()];
        units.extend((0..middle).map(|i| UnitCost { name: format!("layer {i}"), ..layer.clone() }));
        units.push(last.clone());
        let mut kv_bytes_per_token = vec![kv; middle + 2];
        kv_bytes_per_token[0] = 0;
        kv_bytes_per_token[middle + 1] = 0;
        ModelCost {
            units,
            skips: skips
                .iter()
                .enumerate()
                .map(|(s, &bytes)| SkipTensor {
                    name: format!("skip {s}"),
                    producer: 0,
                    consumers: (1..=middle).collect(),
                    bytes_per_token: bytes,
                })
                .collect(),
            kv_bytes_per_token,
        }
    }

    fn unit(name: &str, flops: u64, out: u64) -> UnitCost {
        UnitCost { name: name.into(), weight_bytes: 1_000, flops_per_token: flops, out_bytes_per_token: out }
    }

    fn throughput() -> Config {
        Config { objective: Objective::Throughput, interchangeable: 0.0, ..Config::default() }
    }

    /// Six layers of 1 s on three identical devices, nothing else to compute;
    /// every hop and the token back take 0.1 s, the one skip tensor 0.2 s
    /// per device that reads it. The first device pays its hop and a skip
    /// for each other device that runs layers, so with all three in use 2 +
    /// 0.5 for it and 2 + 0.1 for the others is best (a 1/3/2 or 1/2/3 split
    /// costs 3.1, two devices 3 + 0.3). The relaxation loses nothing here:
    /// all hops cost the same wherever a device sits. Memory does not bind.
    #[test]
    fn the_bound_is_the_optimum_when_placement_does_not_matter() {
        let model = three_blocks(
            &unit("prologue", 0, 100),
            &unit("layer", 1_000_000_000, 100),
            &unit("epilogue", 0, 100),
            6,
            0,
            &[200],
        );
        let mut devices: Vec<DeviceProfile> =
            ["a", "b", "c"].iter().map(|id| DeviceProfile::new(id, id, 1_000_000, 1e9)).collect();
        connect_all(&mut devices, Link { bandwidth_bytes_per_s: 1_000.0, rtt_s: 0.0 });
        let instance = Instance::new(&model, &devices, &throughput()).unwrap();
        let blocks = block::blocks(&instance);
        assert_eq!(blocks, vec![0..1, 1..7, 7..8]);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let best = exhaustive::solve(&instance).unwrap();
        assert!(close(best.objective_s, 2.5), "{}", best.objective_s);
        // Whatever the cutoff, as long as some plan meets it.
        for cutoff in [2.5, 3.1, 10.0] {
            let bound = lower_bound(&instance, &blocks, cutoff).unwrap();
            assert!(close(bound.seconds, 2.5), "{}", bound.seconds);
            assert!(bound.seconds <= 2.5 + 1e-12);
            // Above the bound, the exact search finds a plan that meets it:
            // three devices.
            if cutoff == 2.5 {
                continue;
            }
            let stages = bound.plan.expect("a plan at the bound");
            assert_eq!(stages.len(), 3, "{stages:?}");
            let value = instance.objective_of(&instance.evaluate(&stages));
            assert!(close(value, 2.5), "{stages:?}: {value}");
        }
        let mip = assign::plan(&model, &devices, &throughput()).unwrap();
        assert!(close(mip.objective_s, 2.5), "{}", mip.objective_s);

        // Memory for one unit on c (a class of its own now) and four on a
        // and b: c runs the prologue alone (a and b 3 + 0.1 each), or one
        // layer (the first device 2 + 0.5 and the last 3 + 0.1), or the
        // epilogue alone (the first 3 + 0.3); 3.1 is best, and the bound.
        let mut small = devices.clone();
        small[0].mem_bytes = 4_000;
        small[1].mem_bytes = 4_000;
        small[2].mem_bytes = 1_000;
        let instance = Instance::new(&model, &small, &throughput()).unwrap();
        let best = exhaustive::solve(&instance).unwrap();
        assert!(close(best.objective_s, 3.1), "{}", best.objective_s);
        let bound = lower_bound(&instance, &blocks, 10.0).unwrap();
        assert!(bound.seconds <= best.objective_s + 1e-12);
        assert!(close(bound.seconds, 3.1), "{}", bound.seconds);
        let mip = assign::plan(&model, &small, &throughput()).unwrap();
        assert!(close(mip.objective_s, 3.1), "{}", mip.objective_s);

        // Not the shape the bound knows: none.
        let private = Config { privacy: Some("a".into()), ..throughput() };
        let instance = Instance::new(&model, &devices, &private).unwrap();
        assert!(lower_bound(&instance, &block::blocks(&instance), 10.0).is_none());
        let mut late = model.clone();
        late.skips[0].producer = 1;
        late.skips[0].consumers = (2..=6).collect();
        let instance = Instance::new(&late, &devices, &throughput()).unwrap();
        assert!(lower_bound(&instance, &block::blocks(&instance), 10.0).is_none());
    }

    /// The generator of `tests/property.rs`, for one seed one instance.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn range(&mut self, lo: u64, hi: u64) -> u64 {
            lo + self.below(hi - lo + 1)
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// A random instance of the shape the bound takes: a prologue, `middle`
    /// identical layers and an epilogue, skip tensors from the prologue to
    /// every layer, devices of random speed (estimated, or measured alike
    /// for every layer), memory and links, some of them identical twins.
    fn case(seed: u64, devices: usize, middle: usize) -> (ModelCost, Vec<DeviceProfile>, Config) {
        let mut rng = Rng(seed | 1);
        let mut unit = |name: &str, least_flops: u64| UnitCost {
            name: name.into(),
            weight_bytes: rng.range(1, 100) * 1_000_000,
            flops_per_token: rng.range(least_flops, 100) * 10_000_000,
            out_bytes_per_token: rng.range(1, 100) * 10_000,
        };
        let (first, layer, last) = (unit("prologue", 0), unit("layer", 1), unit("epilogue", 0));
        let kv = if rng.chance(50) { 0 } else { rng.range(1, 10) * 1_000 };
        let skips: Vec<u64> = (0..rng.below(3)).map(|_| rng.range(1, 50) * 1_000).collect();
        let model = three_blocks(&first, &layer, &last, middle, kv, &skips);
        let context = rng.range(0, 2048);
        let need = model.total_memory(context);
        let mut profiles: Vec<DeviceProfile> = Vec::new();
        let mut radios: Vec<Link> = Vec::new();
        for d in 0..devices {
            if d > 0 && rng.chance(35) {
                let mut twin = profiles[d - 1].clone();
                twin.id = format!("d{d}");
                profiles.push(twin);
                radios.push(radios[d - 1]);
                continue;
            }
            let mem = need * rng.range(25, 130) / 100 + 1;
            let mut device =
                DeviceProfile::new(&format!("d{d}"), &format!("Device {d}"), mem, rng.range(1, 20) as f64 * 1e9);
            if rng.chance(25) {
                let per_layer = rng.range(1, 100) as f64 * 1e-3;
                let mut times = vec![per_layer; middle + 2];
                times[0] = rng.range(0, 30) as f64 * 1e-3;
                times[middle + 1] = rng.range(0, 30) as f64 * 1e-3;
                device.unit_time_s = Some(times);
            }
            profiles.push(device);
            radios.push(Link {
                bandwidth_bytes_per_s: rng.range(1, 50) as f64 * 1e6,
                rtt_s: rng.range(0, 20) as f64 * 1e-3,
            });
        }
        // Links between two devices take the slower radio (twins stay
        // interchangeable), or now and then are random each way.
        let asymmetric = rng.chance(25);
        connect_by(&mut profiles, |a, b| {
            if asymmetric {
                Link { bandwidth_bytes_per_s: rng.range(1, 50) as f64 * 1e6, rtt_s: rng.range(0, 20) as f64 * 1e-3 }
            } else {
                radios[a].slower_of(radios[b])
            }
        });
        let config = Config {
            context_tokens: context,
            // The bound runs only with the search's seed as its cutoff.
            warm_start: true,
            ..throughput()
        };
        (model, profiles, config)
    }

    fn holds(seed: u64, devices: usize, middle: usize) -> Result<(), TestCaseError> {
        let (model, devices, config) = case(seed, devices, middle);
        let instance = Instance::new(&model, &devices, &config).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let units = instance.units;
        let blocks = block::blocks(&instance);
        prop_assert_eq!(&blocks, &vec![0..1, 1..units - 1, units - 1..units]);
        let mip = assign::plan(&model, &devices, &config);
        let best = match exhaustive::solve(&instance) {
            Ok(best) => best,
            Err(PlanError::Infeasible { .. }) => {
                prop_assert!(matches!(mip, Err(PlanError::Infeasible { .. })), "{:?}", mip.map(|p| p.objective_s));
                return Err(TestCaseError::reject("no plan fits"));
            }
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        };
        let optimum = best.objective_s;
        let stages = crate::plan::Plan::assignment;
        // The cutoff the planner uses (the search's plan), the optimum itself
        // and a loose one: some plan meets each, so the relaxation must
        // admit it and the bound must be found, and at most the optimum.
        let mut cutoffs = vec![optimum, 2.0 * optimum + 1.0];
        if let Some(seed) = search::best(&instance) {
            cutoffs.push(instance.objective_of(&instance.evaluate(&seed)));
        }
        for cutoff in cutoffs {
            let Some(bound) = lower_bound(&instance, &blocks, cutoff) else {
                return Err(TestCaseError::fail(format!(
                    "no bound under cutoff {cutoff} though the plan {:?} takes {optimum}",
                    stages(&best)
                )));
            };
            prop_assert!(
                bound.seconds <= optimum * (1.0 + 1e-9),
                "bound {} above the optimum {} of {:?} (cutoff {})",
                bound.seconds,
                optimum,
                stages(&best),
                cutoff
            );
            let mut best_known = cutoff;
            if let Some(plan) = &bound.plan {
                prop_assert!(instance.admissible(plan));
                let value = instance.objective_of(&instance.evaluate(plan));
                prop_assert!(value >= optimum * (1.0 - 1e-9), "{:?} beats the optimum", plan);
                prop_assert!(value <= cutoff * (1.0 + 1e-9), "{:?} misses the cutoff", plan);
                best_known = best_known.min(value);
            }
            // On instances this small the exact search never runs out of
            // budget, so it closes the gap: the bound is the optimum.
            prop_assert!(
                best_known <= bound.seconds * (1.0 + 2e-9),
                "bound {} and best plan {} apart (optimum {}, cutoff {})",
                bound.seconds,
                best_known,
                optimum,
                cutoff
            );
        }
        let mip = mip.map_err(|e| TestCaseError::fail(format!("the MIP fails: {e}")))?;
        mip.check(&model, &devices).map_err(|e| TestCaseError::fail(format!("MIP plan fails its check: {e}")))?;
        prop_assert!(
            (mip.objective_s - optimum).abs() <= 1e-6 * optimum.max(1e-9),
            "MIP {} s ({:?}) vs exhaustive {} s ({:?})",
            mip.objective_s,
            stages(&mip),
            optimum,
            stages(&best)
        );
        prop_assert!(matches!(mip.method, Method::Mip { proven_optimal: true, .. }), "{:?}", mip.method);
        Ok(())
    }

    proptest! {
        // At most one case in three may lack a plan (a rejection), so most
        // cases reach the bound.
        #![proptest_config(ProptestConfig {
            cases: 128,
            max_global_rejects: 64,
            ..ProptestConfig::default()
        })]

        /// Up to five devices on up to twelve units, or four on up to 20.
        #[test]
        fn the_bound_is_below_the_optimum_the_mip_reaches(
            seed in any::<u64>(),
            devices in 2usize..=5,
            middle in 4usize..=18,
        ) {
            let middle = if devices == 5 { middle.min(10) } else { middle };
            holds(seed, devices, middle)?;
        }
    }
}

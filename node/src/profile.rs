//! This device's profile for the planner: memory it may use, the time each
//! of the model's units takes on its own runner, its battery and thermal
//! state, and links to its peers.
//! Also the conversion from a package's cost profile to the planner's cost
//! model, which keeps `models` and `planner` independent of each other.

use std::path::Path;

use llnode_models::cost::CostProfile;
use llnode_models::model::Model;
use llnode_planner::cost::{ModelCost, SkipTensor, UnitCost};
use llnode_planner::profile::{Battery, DeviceProfile, Thermal};

/// Memory kept back for the system and the node itself.
const RESERVE_BYTES: u64 = 512 << 20;
/// Prompt length and decode steps of the unit timing run.
const PROFILE_PROMPT: usize = 16;
const PROFILE_STEPS: usize = 8;

pub fn model_cost(cost: &CostProfile) -> ModelCost {
    ModelCost {
        units: cost
            .units
            .iter()
            .map(|u| UnitCost {
                name: u.name.clone(),
                weight_bytes: u.weight_bytes,
                flops_per_token: u.flops_per_token,
                out_bytes_per_token: u.out_bytes_per_token,
            })
            .collect(),
        skips: cost
            .skips
            .iter()
            .map(|s| SkipTensor {
                name: s.name.clone(),
                producer: s.producer,
                consumers: s.consumers.clone(),
                bytes_per_token: s.bytes_per_token,
            })
            .collect(),
        kv_bytes_per_token: cost.units.iter().map(|u| u.kv_bytes_per_token).collect(),
    }
}

/// Memory this device offers: the cap if given, else what the system has available minus a reserve.
pub fn memory_bytes(cap: Option<u64>) -> u64 {
    cap.unwrap_or_else(|| available_memory().saturating_sub(RESERVE_BYTES))
}

fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(2 << 30, |kb| kb * 1024)
}

/// Measures this device: every unit of the package timed on its own runner
/// (blocking: seconds for big models).
pub fn measure(id: &str, name: &str, package: Option<&Path>, memory_cap: Option<u64>) -> anyhow::Result<DeviceProfile> {
    let mem = memory_bytes(memory_cap);
    let Some(package) = package else {
        return Ok(DeviceProfile::new(id, name, mem, arithmetic_speed()));
    };
    let model = Model::open(package)?;
    let (_, package_id) = llnode_models::package::Manifest::read(package)?;
    // The last unit (final norm and LM head over the whole vocabulary) is
    // often the biggest and is not loaded to be timed: its time is its FLOPs
    // at the speed the other units ran, so measuring peaks at the memory of
    // the biggest of the others.
    let n = model.units.len();
    let timed = if n >= 3 { n - 1 } else { n };
    let timings =
        crate::alloc::loading(|| llnode_models::pipeline::time_units(&model, PROFILE_PROMPT, PROFILE_STEPS, timed))?;
    let cost = CostProfile::of(&model);
    let flops: u64 = cost.units[..timed].iter().map(|u| u.flops_per_token).sum();
    let secs: f64 = timings.iter().map(|t| t.decode_s).sum::<f64>().max(1e-9);
    let mut times: Vec<f64> = timings.iter().map(|t| t.decode_s).collect();
    times.extend(cost.units[timed..].iter().map(|u| u.flops_per_token as f64 * secs / flops.max(1) as f64));
    let mut profile = DeviceProfile::new(id, name, mem, flops as f64 / secs);
    profile.unit_time_s = Some(times);
    let loaded: u64 = timings.iter().map(|t| t.loaded_bytes).sum();
    let load_s: f64 = timings.iter().map(|t| t.load_s).sum();
    profile.load_bytes_per_s = (loaded > 0 && load_s > 0.0).then(|| loaded as f64 / load_s);
    profile.measured_on = Some(package_id);
    (profile.battery, profile.thermal) = power_state(Path::new(SYS_CLASS));
    Ok(profile)
}

/// Where Linux, Android included, shows power supplies and thermal zones.
pub const SYS_CLASS: &str = "/sys/class";

/// This device's battery (the first power supply of type `Battery`) and
/// thermal state (the worst over its thermal zones) as `class` (`/sys/class`)
/// shows them; `None` for what it does not show (desktops have no battery,
/// containers and some phones hide both).
pub fn power_state(class: &Path) -> (Option<Battery>, Option<Thermal>) {
    (battery(&class.join("power_supply")), thermal(&class.join("thermal")))
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn entries(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

fn battery(supplies: &Path) -> Option<Battery> {
    entries(supplies, "").into_iter().find_map(|supply| {
        if read(&supply.join("type"))? != "Battery" {
            return None;
        }
        let percent: f64 = read(&supply.join("capacity"))?.parse().ok()?;
        let status = read(&supply.join("status")).unwrap_or_default();
        Some(Battery {
            level: (percent / 100.0).clamp(0.0, 1.0),
            charging: matches!(status.as_str(), "Charging" | "Full"),
        })
    })
}

/// The worst state over the thermal zones, from each zone's temperature
/// against its own trip points: at or past a `critical` trip the device is
/// `Critical` (it takes no work), past `hot` it is `Severe`, past `passive`
/// (where the kernel starts to throttle) `Moderate`, else `Nominal`. A
/// device whose zones have no trip points says nothing.
fn thermal(zones: &Path) -> Option<Thermal> {
    let rank = |t: Thermal| {
        [Thermal::Nominal, Thermal::Moderate, Thermal::Severe, Thermal::Critical].iter().position(|&s| s == t)
    };
    let mut worst: Option<Thermal> = None;
    for zone in entries(zones, "thermal_zone") {
        let Some(temp) = read(&zone.join("temp")).and_then(|t| t.parse::<i64>().ok()) else {
            continue;
        };
        let mut state = None;
        for i in 0.. {
            let (Some(trip), Some(kind)) =
                (read(&zone.join(format!("trip_point_{i}_temp"))), read(&zone.join(format!("trip_point_{i}_type"))))
            else {
                break;
            };
            let Ok(trip) = trip.parse::<i64>() else { continue };
            let reached = match kind.as_str() {
                "critical" => Thermal::Critical,
                "hot" => Thermal::Severe,
                "passive" => Thermal::Moderate,
                _ => continue,
            };
            state = Some(state.unwrap_or(Thermal::Nominal));
            if temp >= trip && rank(reached) > state.and_then(rank) {
                state = Some(reached);
            }
        }
        if let Some(state) = state
            && worst.is_none_or(|w| rank(state) > rank(w))
        {
            worst = Some(state);
        }
    }
    worst
}

/// Whether the power state moved enough to tell the planner: the thermal
/// state or charging changed, or the level by 5 points.
pub fn power_changed(old: &DeviceProfile, battery: Option<Battery>, thermal: Option<Thermal>) -> bool {
    let level_moved = match (old.battery, battery) {
        (Some(a), Some(b)) => a.charging != b.charging || (a.level - b.level).abs() >= 0.05,
        (a, b) => a.is_some() != b.is_some(),
    };
    level_moved || old.thermal != thermal
}

/// Rough multiply-add speed for a device without the model: a small
/// matrix product in plain Rust (the model's runner is faster; the planner
/// replaces this with measured unit times once the device has the units).
fn arithmetic_speed() -> f64 {
    let mut m = Matrices::<128>::new();
    let started = std::time::Instant::now();
    let mut reps = 0;
    while started.elapsed().as_millis() < 50 {
        m.multiply();
        reps += 1;
    }
    m.flops() * reps as f64 / started.elapsed().as_secs_f64()
}

/// A few milliseconds of arithmetic, timed as the device this one plays
/// (`throttle` included): the median of [`PROBE_BATCHES`] batches. Against
/// the same probe when the balancer slowed the device, it says whether the
/// device came back when no step of its own can say.
pub fn probe(throttle: &crate::pace::Throttle) -> std::time::Duration {
    let mut m = Matrices::<64>::new();
    let mut batches: Vec<std::time::Duration> = (0..PROBE_BATCHES)
        .map(|_| {
            let started = std::time::Instant::now();
            (0..PROBE_REPS).for_each(|_| m.multiply());
            started.elapsed()
        })
        .collect();
    batches.sort_unstable();
    throttle.stretched(batches[PROBE_BATCHES / 2])
}

/// Batches of a probe, and products of 64×64 matrices in each (about a
/// millisecond on a phone's core).
const PROBE_BATCHES: usize = 5;
const PROBE_REPS: usize = 4;

/// Two N×N matrices and their product: the kernel of the arithmetic measures.
struct Matrices<const N: usize> {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

impl<const N: usize> Matrices<N> {
    fn new() -> Matrices<N> {
        let a = (0..N * N).map(|i| (i % 7) as f32 * 0.1).collect();
        let b = (0..N * N).map(|i| (i % 5) as f32 * 0.1).collect();
        Matrices { a, b, c: vec![0.0; N * N] }
    }

    fn flops(&self) -> f64 {
        2.0 * (N * N * N) as f64
    }

    fn multiply(&mut self) {
        let (a, b, c) = (&self.a, &self.b, &mut self.c);
        for i in 0..N {
            for k in 0..N {
                let x = a[i * N + k];
                for j in 0..N {
                    c[i * N + j] += x * b[k * N + j];
                }
            }
        }
        std::hint::black_box(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, text: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn power_state_reads_battery_and_thermal_zones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(power_state(root), (None, None));
        write(root, "power_supply/usb/type", "USB\n");
        write(root, "power_supply/battery/type", "Battery\n");
        write(root, "power_supply/battery/capacity", "42\n");
        write(root, "power_supply/battery/status", "Discharging\n");
        // A zone without trip points says nothing; a cool one with trips is nominal.
        write(root, "thermal/thermal_zone0/temp", "90000");
        write(root, "thermal/thermal_zone1/temp", "35000");
        write(root, "thermal/thermal_zone1/trip_point_0_type", "passive");
        write(root, "thermal/thermal_zone1/trip_point_0_temp", "45000");
        write(root, "thermal/thermal_zone1/trip_point_1_type", "critical");
        write(root, "thermal/thermal_zone1/trip_point_1_temp", "95000");
        let (battery, thermal) = power_state(root);
        assert_eq!(battery, Some(Battery { level: 0.42, charging: false }));
        assert_eq!(thermal, Some(Thermal::Nominal));
        // Past the passive trip: throttling, moderate; another zone past hot wins.
        write(root, "thermal/thermal_zone1/temp", "47000");
        assert_eq!(power_state(root).1, Some(Thermal::Moderate));
        write(root, "thermal/thermal_zone2/temp", "80000");
        write(root, "thermal/thermal_zone2/trip_point_0_type", "hot");
        write(root, "thermal/thermal_zone2/trip_point_0_temp", "75000");
        assert_eq!(power_state(root).1, Some(Thermal::Severe));
        write(root, "thermal/thermal_zone1/temp", "96000");
        assert_eq!(power_state(root).1, Some(Thermal::Critical));
        write(root, "power_supply/battery/status", "Charging");
        assert!(power_state(root).0.unwrap().charging);
    }

    #[test]
    fn small_battery_moves_are_not_news() {
        let mut profile = DeviceProfile::new("a", "a", 1, 1.0);
        profile.battery = Some(Battery { level: 0.50, charging: false });
        assert!(!power_changed(&profile, Some(Battery { level: 0.48, charging: false }), None));
        assert!(power_changed(&profile, Some(Battery { level: 0.44, charging: false }), None));
        assert!(power_changed(&profile, Some(Battery { level: 0.50, charging: true }), None));
        assert!(power_changed(&profile, Some(Battery { level: 0.50, charging: false }), Some(Thermal::Severe)));
    }
}

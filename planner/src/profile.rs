//! What a device offers: usable memory, how fast it runs each unit (measured
//! or estimated), its links to its peers, and its battery and thermal state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cost::UnitCost;

/// A directed link from one device to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Sustained bytes per second, as measured.
    pub bandwidth_bytes_per_s: f64,
    /// Round-trip time in seconds; every message costs this once.
    pub rtt_s: f64,
}

impl Link {
    /// Seconds to send `bytes` as one message over this link.
    pub fn transfer_s(&self, bytes: u64) -> f64 {
        bytes as f64 / self.bandwidth_bytes_per_s + self.rtt_s
    }

    /// The link through two radios: the lower bandwidth, the longer round trip.
    pub fn slower_of(self, other: Link) -> Link {
        Link {
            bandwidth_bytes_per_s: self.bandwidth_bytes_per_s.min(other.bandwidth_bytes_per_s),
            rtt_s: self.rtt_s.max(other.rtt_s),
        }
    }
}

/// Battery state as a phone reports it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Battery {
    /// Charge left, from 0 to 1.
    pub level: f64,
    pub charging: bool,
}

/// Thermal state, after Android's `PowerManager.THERMAL_STATUS_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Thermal {
    Nominal,
    Light,
    Moderate,
    Severe,
    Critical,
    Emergency,
    Shutdown,
}

impl Thermal {
    /// The share of its measured speed a device is expected to keep in this
    /// state. The figures are rough: phones throttle their big cores first,
    /// and a device in `Critical` or worse should not take work at all.
    pub fn speed_factor(self) -> f64 {
        match self {
            Thermal::Nominal | Thermal::Light => 1.0,
            Thermal::Moderate => 0.8,
            Thermal::Severe => 0.5,
            Thermal::Critical | Thermal::Emergency | Thermal::Shutdown => 0.0,
        }
    }
}

/// Loading speed taken for a device that has not measured its own: a phone
/// reading and optimising weights from flash.
pub const ASSUMED_LOAD_BYTES_PER_S: f64 = 100e6;

/// Everything the planner knows about one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceProfile {
    /// Stable identifier, unique in the mesh.
    pub id: String,
    /// A name for people ("Pixel 7").
    pub name: String,
    /// Memory the device can give to the model, in bytes.
    pub mem_bytes: u64,
    /// Measured seconds per decoded token for each unit of the model, in
    /// unit order, when the device has profiled it.
    pub unit_time_s: Option<Vec<f64>>,
    /// The model `unit_time_s` was measured on (an opaque id, such as a
    /// package hash): a planner of another model leaves those times out.
    #[serde(default)]
    pub measured_on: Option<String>,
    /// Estimated arithmetic throughput, used for units without a measurement.
    pub flops_per_s: f64,
    /// Measured bytes of weights per second it loads from disk into runners
    /// (reading and optimising the units); `None`: [`ASSUMED_LOAD_BYTES_PER_S`].
    #[serde(default)]
    pub load_bytes_per_s: Option<f64>,
    /// Links to peers, by peer id. A link missing here is taken from the
    /// peer's profile (links are assumed symmetric when measured one way).
    pub links: BTreeMap<String, Link>,
    pub battery: Option<Battery>,
    pub thermal: Option<Thermal>,
}

impl DeviceProfile {
    /// A device without measurements, links, battery or thermal state.
    pub fn new(id: &str, name: &str, mem_bytes: u64, flops_per_s: f64) -> Self {
        DeviceProfile {
            id: id.to_string(),
            name: name.to_string(),
            mem_bytes,
            unit_time_s: None,
            measured_on: None,
            flops_per_s,
            load_bytes_per_s: None,
            links: BTreeMap::new(),
            battery: None,
            thermal: None,
        }
    }

    /// Seconds per token to run `unit` (index `index` in the model): the
    /// measurement when there is one, otherwise the estimate from
    /// [`DeviceProfile::flops_per_s`].
    pub fn compute_s(&self, index: usize, unit: &UnitCost) -> f64 {
        match self.unit_time_s.as_ref().and_then(|t| t.get(index)) {
            Some(&measured) => measured,
            None => unit.flops_per_token as f64 / self.flops_per_s,
        }
    }

    /// Seconds to load `bytes` of weights into runners.
    pub fn load_s(&self, bytes: u64) -> f64 {
        bytes as f64 / self.load_bytes_per_s.filter(|r| *r > 0.0).unwrap_or(ASSUMED_LOAD_BYTES_PER_S)
    }

    /// The same device running `factor` times slower (below 1: faster).
    pub fn slow_down(&mut self, factor: f64) {
        self.flops_per_s /= factor;
        if let Some(times) = self.unit_time_s.as_mut() {
            times.iter_mut().for_each(|t| *t *= factor);
        }
    }

    /// The link from this device to `peer`, as this device measured it.
    pub fn link_to(&self, peer: &str) -> Option<Link> {
        self.links.get(peer).copied()
    }

    /// Adds (or replaces) the link to `peer`.
    pub fn with_link(mut self, peer: &str, link: Link) -> Self {
        self.links.insert(peer.to_string(), link);
        self
    }
}

/// Links every ordered pair `(a, b)` of `devices` with `link(a, b)`.
pub fn connect_by(devices: &mut [DeviceProfile], mut link: impl FnMut(usize, usize) -> Link) {
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    for (a, device) in devices.iter_mut().enumerate() {
        for (b, id) in ids.iter().enumerate() {
            if a != b {
                device.links.insert(id.clone(), link(a, b));
            }
        }
    }
}

/// Sets the same link between every pair of `devices`, both ways.
pub fn connect_all(devices: &mut [DeviceProfile], link: Link) {
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    for device in devices.iter_mut() {
        for id in &ids {
            if *id != device.id {
                device.links.insert(id.clone(), link);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_time_wins_over_estimate() {
        let unit =
            UnitCost { name: "layer".into(), weight_bytes: 1, flops_per_token: 2_000_000, out_bytes_per_token: 4 };
        let mut device = DeviceProfile::new("a", "A", 1 << 30, 1e9);
        assert!((device.compute_s(3, &unit) - 0.002).abs() < 1e-12);
        device.unit_time_s = Some(vec![0.5; 4]);
        assert_eq!(device.compute_s(3, &unit), 0.5);
        // A unit past the measured ones falls back to the estimate.
        assert!((device.compute_s(7, &unit) - 0.002).abs() < 1e-12);
    }

    #[test]
    fn links_connect_every_pair() {
        let mut devices = vec![
            DeviceProfile::new("a", "A", 1, 1.0),
            DeviceProfile::new("b", "B", 1, 1.0),
            DeviceProfile::new("c", "C", 1, 1.0),
        ];
        let link = Link { bandwidth_bytes_per_s: 1e6, rtt_s: 0.01 };
        connect_all(&mut devices, link);
        assert_eq!(devices[0].link_to("c"), Some(link));
        assert_eq!(devices[0].link_to("a"), None);
        assert!((link.transfer_s(1_000_000) - 1.01).abs() < 1e-12);
    }

    #[test]
    fn hot_devices_slow_down() {
        assert_eq!(Thermal::Nominal.speed_factor(), 1.0);
        assert!(Thermal::Severe.speed_factor() < Thermal::Moderate.speed_factor());
        assert_eq!(Thermal::Critical.speed_factor(), 0.0);
    }
}

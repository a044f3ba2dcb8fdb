//! Profiles of real Android phones, to build heterogeneous meshes like the
//! ones LinguaLinked ran on.
//!
//! RAM, SoC and memory type come from the makers' spec sheets (Google,
//! Samsung, Xiaomi product pages; Qualcomm, Google and MediaTek SoC pages).
//! Everything else is an ESTIMATE, stated with its reasoning:
//!
//! - usable memory: what an app can hold before Android's low-memory killer
//!   steps in, taken as RAM less about 3.5 GiB for the system on 8 GB phones
//!   and proportionally less on smaller ones;
//! - decode speed: decoding one token reads every fp16 weight once, so it is
//!   bound by memory bandwidth, and 2 FLOP per 2-byte weight makes FLOP/s
//!   about equal to achieved bytes/s. We take the SoC's peak DRAM bandwidth
//!   (bus width times transfer rate) and assume CPU inference achieves about
//!   30% of it on big cores, less on phones with only little cores;
//! - Wi-Fi: sustained TCP throughput phone to phone through one access point
//!   and its round trip, typical for the radio generation.

use crate::profile::{DeviceProfile, Link, connect_all};

/// One phone model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Phone {
    pub name: &'static str,
    pub soc: &'static str,
    pub ram_bytes: u64,
    /// Estimated memory an app may use.
    pub usable_bytes: u64,
    /// Estimated fp16 decode throughput.
    pub flops_per_s: f64,
    /// Estimated Wi-Fi link to a peer on the same access point.
    pub wifi: Link,
}

const GB: u64 = 1_000_000_000;
const GIB: u64 = 1 << 30;

/// Google Pixel 7: Tensor G2, 8 GB LPDDR5 (64-bit at 6400 MT/s, 51.2 GB/s
/// peak); Wi-Fi 6E.
pub const PIXEL_7: Phone = Phone {
    name: "Pixel 7",
    soc: "Google Tensor G2",
    ram_bytes: 8 * GB,
    usable_bytes: 4 * GIB + GIB / 2,
    flops_per_s: 15e9,
    wifi: Link { bandwidth_bytes_per_s: 40e6, rtt_s: 0.004 },
};

/// Samsung Galaxy S23: Snapdragon 8 Gen 2, 8 GB LPDDR5X (64-bit at 8400
/// MT/s, 67 GB/s peak); Wi-Fi 6E.
pub const GALAXY_S23: Phone = Phone {
    name: "Galaxy S23",
    soc: "Snapdragon 8 Gen 2",
    ram_bytes: 8 * GB,
    usable_bytes: 4 * GIB + GIB / 2,
    flops_per_s: 20e9,
    wifi: Link { bandwidth_bytes_per_s: 45e6, rtt_s: 0.004 },
};

/// Google Pixel 6a: Tensor (G1), 6 GB LPDDR5 (51.2 GB/s peak); Wi-Fi 6E.
pub const PIXEL_6A: Phone = Phone {
    name: "Pixel 6a",
    soc: "Google Tensor",
    ram_bytes: 6 * GB,
    usable_bytes: 3 * GIB,
    flops_per_s: 13e9,
    wifi: Link { bandwidth_bytes_per_s: 35e6, rtt_s: 0.005 },
};

/// Samsung Galaxy A14 (LTE): MediaTek Helio G80, 4 GB LPDDR4X (32-bit at
/// 3600 MT/s, 14.4 GB/s peak); Wi-Fi 5.
pub const GALAXY_A14: Phone = Phone {
    name: "Galaxy A14",
    soc: "MediaTek Helio G80",
    ram_bytes: 4 * GB,
    usable_bytes: 3 * GIB / 2,
    flops_per_s: 4e9,
    wifi: Link { bandwidth_bytes_per_s: 15e6, rtt_s: 0.008 },
};

/// Xiaomi Redmi 9A: MediaTek Helio G25 (eight Cortex-A53), 2 GB LPDDR4X
/// (32-bit at 3200 MT/s, 12.8 GB/s peak); 2.4 GHz Wi-Fi 4 only.
pub const REDMI_9A: Phone = Phone {
    name: "Redmi 9A",
    soc: "MediaTek Helio G25",
    ram_bytes: 2 * GB,
    usable_bytes: 700 * (1 << 20),
    flops_per_s: 2e9,
    wifi: Link { bandwidth_bytes_per_s: 5e6, rtt_s: 0.015 },
};

/// Every phone described here, fastest first.
pub const CATALOG: [Phone; 5] = [GALAXY_S23, PIXEL_7, PIXEL_6A, GALAXY_A14, REDMI_9A];

impl Phone {
    /// A profile for one of these phones, without links.
    pub fn profile(&self, id: &str) -> DeviceProfile {
        DeviceProfile::new(id, self.name, self.usable_bytes, self.flops_per_s)
    }
}

/// Profiles for `phones` on one access point, with ids `<index>-<name>`.
/// The link between two phones runs at the slower radio's bandwidth and
/// their round trips add half each.
pub fn mesh(phones: &[Phone]) -> Vec<DeviceProfile> {
    let mut devices: Vec<DeviceProfile> = phones
        .iter()
        .enumerate()
        .map(|(i, p)| p.profile(&format!("{i}-{}", p.name.replace(' ', "-").to_lowercase())))
        .collect();
    // Fill every pair first so the map is complete, then set the real links.
    connect_all(&mut devices, Link { bandwidth_bytes_per_s: 1.0, rtt_s: 0.0 });
    for a in 0..phones.len() {
        for b in 0..phones.len() {
            if a != b {
                let link = Link {
                    bandwidth_bytes_per_s: phones[a]
                        .wifi
                        .bandwidth_bytes_per_s
                        .min(phones[b].wifi.bandwidth_bytes_per_s),
                    rtt_s: (phones[a].wifi.rtt_s + phones[b].wifi.rtt_s) / 2.0,
                };
                let peer = devices[b].id.clone();
                devices[a].links.insert(peer, link);
            }
        }
    }
    devices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_links_every_pair_at_the_slower_radio() {
        let devices = mesh(&[GALAXY_S23, REDMI_9A, PIXEL_7]);
        assert_eq!(devices[0].id, "0-galaxy-s23");
        let link = devices[0].link_to("1-redmi-9a").unwrap();
        assert_eq!(link.bandwidth_bytes_per_s, 5e6);
        assert!((link.rtt_s - 0.0095).abs() < 1e-12);
        assert_eq!(devices[2].links.len(), 2);
    }

    #[test]
    fn catalog_is_fastest_first_and_fits_in_ram() {
        for pair in CATALOG.windows(2) {
            assert!(pair[0].flops_per_s >= pair[1].flops_per_s);
        }
        for phone in CATALOG {
            assert!(phone.usable_bytes < phone.ram_bytes);
        }
    }
}

//! The transmission map: for a grouping of consecutive units into segments,
//! which tensors each segment needs and who produces them. A tensor goes from
//! its producer straight to every segment that reads it (a mask made in the
//! prologue and used by every layer is not relayed hop by hop). The
//! initiator (the device that asked) supplies the graph inputs and receives
//! `logits`. KV caches never travel: each segment keeps its own layers'.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::segment::{UnitSpec, is_past};

/// One end of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// The device running the generation loop: owns the token ids, attention
    /// mask and positions, and samples from the logits.
    Initiator,
    Segment(usize),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub tensor: String,
    pub from: Endpoint,
    pub to: Endpoint,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransmissionMap {
    pub segments: Vec<Range<usize>>,
    pub transfers: Vec<Transfer>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GroupingError {
    #[error("segments must cover units 0..{units} in order without gaps; got {got:?}")]
    NotAPartition { units: usize, got: Vec<Range<usize>> },
}

impl TransmissionMap {
    /// The map for `segments`, which must partition the units in order.
    pub fn new(units: &[UnitSpec], segments: &[Range<usize>]) -> Result<TransmissionMap, GroupingError> {
        check_partition(units.len(), segments)?;
        let segment_of = |unit: usize| segments.iter().position(|r| r.contains(&unit)).expect("partition");
        let mut transfers = Vec::new();
        for (s, range) in segments.iter().enumerate() {
            for u in range.clone() {
                for input in &units[u].inputs {
                    if is_past(input) {
                        continue;
                    }
                    let from = match units[..u].iter().rposition(|p| p.outputs.iter().any(|o| &o.name == input)) {
                        Some(p) => Endpoint::Segment(segment_of(p)),
                        None => Endpoint::Initiator,
                    };
                    let transfer = Transfer { tensor: input.clone(), from, to: Endpoint::Segment(s) };
                    if from != Endpoint::Segment(s) && !transfers.contains(&transfer) {
                        transfers.push(transfer);
                    }
                }
            }
        }
        let last = segments.len() - 1;
        transfers.push(Transfer { tensor: "logits".into(), from: Endpoint::Segment(last), to: Endpoint::Initiator });
        Ok(TransmissionMap { segments: segments.to_vec(), transfers })
    }

    /// What segment `s` receives.
    pub fn inputs_of(&self, s: usize) -> impl Iterator<Item = &Transfer> {
        self.transfers.iter().filter(move |t| t.to == Endpoint::Segment(s))
    }

    /// What segment `s` sends, and to whom.
    pub fn outputs_of(&self, s: usize) -> impl Iterator<Item = &Transfer> {
        self.transfers.iter().filter(move |t| t.from == Endpoint::Segment(s))
    }

    /// Tensor names segment `s` must return (each once).
    pub fn output_names(&self, s: usize) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for t in self.outputs_of(s) {
            if !names.contains(&t.tensor) {
                names.push(t.tensor.clone());
            }
        }
        names
    }
}

/// Splits `units` units into `k` consecutive segments of near-equal size.
pub fn even_split(units: usize, k: usize) -> Vec<Range<usize>> {
    let k = k.clamp(1, units.max(1));
    (0..k).map(|i| (i * units / k)..((i + 1) * units / k)).collect()
}

fn check_partition(units: usize, segments: &[Range<usize>]) -> Result<(), GroupingError> {
    let mut next = 0;
    for r in segments {
        if r.start != next || r.end <= r.start {
            break;
        }
        next = r.end;
    }
    if next != units || segments.iter().any(|r| r.is_empty()) || segments.is_empty() {
        return Err(GroupingError::NotAPartition { units, got: segments.to_vec() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::{UnitKind, UnitOutput};

    fn unit(name: &str, inputs: &[&str], outputs: &[(&str, &[usize])]) -> UnitSpec {
        UnitSpec {
            name: name.into(),
            kind: UnitKind::Prologue,
            nodes: vec![],
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            shape_inputs: vec![],
            outputs: outputs
                .iter()
                .map(|(n, c)| UnitOutput { name: n.to_string(), consumers: c.to_vec(), graph_output: false })
                .collect(),
            initializers: vec![],
        }
    }

    #[test]
    fn skip_tensors_go_straight_to_their_consumers() {
        let units = vec![
            unit("prologue", &["input_ids", "attention_mask"], &[("h0", &[1]), ("mask", &[1, 2])]),
            unit("layer.0", &["h0", "mask", "past_key_values.0.key"], &[("h1", &[2])]),
            unit("layer.1", &["h1", "mask", "past_key_values.1.key"], &[("h2", &[3])]),
            unit("epilogue", &["h2"], &[("logits", &[])]),
        ];
        let map = TransmissionMap::new(&units, &[0..1, 1..2, 2..4]).unwrap();
        let seg = Endpoint::Segment;
        let mask_to_2 = Transfer { tensor: "mask".into(), from: seg(0), to: seg(2) };
        assert!(map.transfers.contains(&mask_to_2), "{map:?}");
        assert!(map.inputs_of(0).all(|t| t.from == Endpoint::Initiator));
        assert_eq!(map.output_names(0), vec!["h0", "mask"]);
        assert_eq!(map.output_names(2), vec!["logits"]);
        assert!(!map.transfers.iter().any(|t| t.tensor.starts_with("past")));
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one-segment groupings on purpose
    fn groupings_must_partition() {
        let units = vec![unit("a", &[], &[]), unit("b", &[], &[])];
        assert!(TransmissionMap::new(&units, &[0..1]).is_err());
        assert!(TransmissionMap::new(&units, &[0..1, 0..2]).is_err());
        assert!(TransmissionMap::new(&units, &[0..2]).is_ok());
        assert_eq!(even_split(6, 4), vec![0..1, 1..3, 3..4, 4..6]);
        assert_eq!(even_split(2, 5), vec![0..1, 1..2]);
    }
}

//! Pure, synchronous planning: device profiles, the cost model, the
//! assignment MIP, plan checks and a simulator. No tokio, no libp2p.
//!
//! A model is cut into units (prologue, one per decoder layer, epilogue);
//! [`assign::plan`] gives each device a consecutive range of units and
//! chooses the order of devices in the pipeline, minimising per-token
//! latency or the slowest stage under each device's memory. `exhaustive`
//! checks it on small instances, `simulate` replays plans, `baseline` holds
//! the rules of thumb it is measured against and `phone` real phones to
//! measure on; `election` picks the member that plans. `planner/README.md`
//! writes the formulation out.

pub mod assign;
pub mod baseline;
pub mod config;
pub mod cost;
pub mod election;
pub mod exhaustive;
mod instance;
pub mod phone;
pub mod plan;
pub mod profile;
mod search;
pub mod simulate;

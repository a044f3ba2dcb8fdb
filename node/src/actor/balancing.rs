//! BalancingActor: child of `llnode start`, spawned unless `--no-rebalance`.
//! Every 100 ms it takes this device's measured pace from the execution
//! actor (seconds per decoded token of its own segments, [`crate::pace`]),
//! once that covers at least [`crate::pace::MIN_SAMPLES`] steps,
//! and asks the planning actor what the device's profile promised for those
//! units. When the two differ by more than the threshold, planning
//! re-profiles the device and sends the new profile to every member, and
//! the leader re-plans. Two windows in a row must agree (both slower or both
//! faster) before anything happens, and the newer one's ratio is used: a
//! window that straddles a change would re-profile half-way and cost a
//! second move. A window in which even the fastest step of each segment is
//! slower than the threshold did not straddle one, and acts at once (the
//! leader then re-plans without waiting), unless it is the first window of
//! a plan: that one also times the move itself (devices loading spares,
//! first runs, caches arriving), so it waits for a second. Plans do not flap: besides this
//! threshold, a new assignment must beat the held one, costed on the same
//! profiles, by 10%.

use ractor::{Actor, ActorProcessingErr, ActorRef, call_t};

use crate::actor::CALL_TIMEOUT_MS;
use crate::actor::execution::ExecutionMsg;
use crate::actor::planning::{Expectation, PlanningMsg};

/// How often the pace is checked; a window also needs
/// [`crate::pace::MIN_SAMPLES`] steps, so it closes as soon as it has them.
const TICK: std::time::Duration = std::time::Duration::from_millis(100);
/// A pace this close to the profile (seconds per token) is within it, whatever
/// the ratio: a stage of a unit or two (the embeddings) takes well under a
/// millisecond, where fixed costs per step make ratios meaningless.
const MIN_DRIFT_S: f64 = 0.002;
/// Nor does a drift under this share of a whole token's time count: moving
/// the work could not win it back (the leader moves units for 10% or more).
/// A stage left with the embeddings on a throttled device measured 2.3 ms
/// against a profile of 0.08 ms, beside 30 ms tokens, and cost a second move.
const MIN_DRIFT_SHARE: f64 = 0.1;

pub struct BalancingActor;

pub struct BalancingArgs {
    pub execution: ActorRef<ExecutionMsg>,
    pub planning: ActorRef<PlanningMsg>,
    /// `--rebalance-threshold`: a pace this many times off the profile (either way) re-profiles.
    pub threshold: f64,
}

pub enum BalancingMsg {
    Tick,
}

pub struct BalancingState {
    args: BalancingArgs,
    /// How the last window compared with the profile.
    last: Drift,
    /// The plan epoch of the last window.
    epoch: u64,
}

/// A window's pace against the profile, by the threshold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drift {
    Within,
    Slower,
    Faster,
}

impl Actor for BalancingActor {
    type Msg = BalancingMsg;
    type State = BalancingState;
    type Arguments = BalancingArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<BalancingMsg>,
        args: BalancingArgs,
    ) -> Result<BalancingState, ActorProcessingErr> {
        myself.send_interval(TICK, || BalancingMsg::Tick);
        Ok(BalancingState { args, last: Drift::Within, epoch: 0 })
    }

    async fn handle(
        &self,
        _: ActorRef<BalancingMsg>,
        msg: BalancingMsg,
        state: &mut BalancingState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            BalancingMsg::Tick => {
                let args = &state.args;
                let Ok(Some(pace)) = call_t!(args.execution, ExecutionMsg::TakePace, CALL_TIMEOUT_MS) else {
                    return Ok(());
                };
                let asked = call_t!(
                    args.planning,
                    |reply| PlanningMsg::Expected { pace: pace.clone(), reply },
                    CALL_TIMEOUT_MS
                );
                let Ok(Some(Expectation { secs_per_token: expected, token_s })) = asked else { return Ok(()) };
                let ratio = pace.secs_per_token / expected;
                let drift = if (pace.secs_per_token - expected).abs() < MIN_DRIFT_S.max(MIN_DRIFT_SHARE * token_s) {
                    Drift::Within
                } else if ratio >= args.threshold {
                    Drift::Slower
                } else if ratio <= 1.0 / args.threshold {
                    Drift::Faster
                } else {
                    Drift::Within
                };
                // A window whose every step was slow did not straddle the change: no need to wait for
                // another. A plan's first window only counts with the next: it times the move as well.
                let first = std::mem::replace(&mut state.epoch, pace.epoch) != pace.epoch;
                let clean = drift == Drift::Slower && pace.fastest_secs_per_token / expected >= args.threshold;
                if !first && drift != Drift::Within && (drift == state.last || clean) {
                    args.planning.cast(PlanningMsg::Reprofile { ratio, pace, expected })?;
                    state.last = Drift::Within;
                } else {
                    state.last = drift;
                }
            }
        }
        Ok(())
    }
}

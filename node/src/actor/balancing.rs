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
//!
//! A device the balancer slowed down may lose all its work, or keep too
//! little for its pace to say anything (the embeddings), or see no prompt
//! at all: no step of its own would ever tell that it came back. So when its
//! pace slows it, it also times a few milliseconds of arithmetic
//! ([`crate::profile::probe`]); then, whenever no pace has judged it for
//! [`QUIET`], it times the probe again every [`PROBE_EVERY`], and two probes
//! in a row faster than that by the threshold re-profile it by as much
//! (never faster than its first measure), and the leader re-plans.
//!
//! Decided: a probe is compared with the probe taken when the device was
//! slowed, not with its first measure. A slowdown the probe does not see
//! (devices sharing cores or memory bandwidth, as meshes on one machine do)
//! is then never undone by it: on 3 nodes on 2 cores, probes compared with
//! the first measure moved units back and forth four times in one answer.
//! A device whose recovery its pace undoes again within two minutes waits
//! twice as long before its probes may recover it next time (2 s, up to
//! 5 min: [`Recovery`]). Probes only look for a recovery: a device that slows while
//! idle is caught by its pace once it has work.

mod recovery;

use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, call_t};
use recovery::Recovery;

use crate::actor::CALL_TIMEOUT_MS;
use crate::actor::execution::ExecutionMsg;
use crate::actor::planning::{Expectation, PlanningMsg};

/// How often the pace is checked; a window also needs
/// [`crate::pace::MIN_SAMPLES`] steps, so it closes as soon as it has them.
const TICK: Duration = Duration::from_millis(100);
/// A pace this close to the profile (seconds per token) is within it, whatever
/// the ratio: a stage of a unit or two (the embeddings) takes well under a
/// millisecond, where fixed costs per step make ratios meaningless.
const MIN_DRIFT_S: f64 = 0.002;
/// Nor does a drift under this share of a whole token's time count: moving
/// the work could not win it back (the leader moves units for 10% or more).
/// A stage left with the embeddings on a throttled device measured 2.3 ms
/// against a profile of 0.08 ms, beside 30 ms tokens, and cost a second move.
const MIN_DRIFT_SHARE: f64 = 0.1;
/// No pace for this long and a slowed device may be probed ...
const QUIET: Duration = Duration::from_secs(2);
/// ... this often (once [`Recovery`] says it is due).
const PROBE_EVERY: Duration = Duration::from_secs(2);

pub struct BalancingActor;

pub struct BalancingArgs {
    pub execution: ActorRef<ExecutionMsg>,
    pub planning: ActorRef<PlanningMsg>,
    /// `--throttle`: a probe times the device this one plays.
    pub throttle: std::sync::Arc<crate::pace::Throttle>,
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
    /// When a pace last judged this device, and when it was last probed.
    judged: Instant,
    probed: Instant,
    recovery: Recovery,
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
        let now = Instant::now();
        Ok(BalancingState {
            args,
            last: Drift::Within,
            epoch: 0,
            judged: now,
            probed: now,
            recovery: Recovery::new(now),
        })
    }

    async fn handle(
        &self,
        _: ActorRef<BalancingMsg>,
        msg: BalancingMsg,
        state: &mut BalancingState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            BalancingMsg::Tick => {
                let judged = state.judge().await?;
                let now = Instant::now();
                if judged {
                    state.judged = now;
                } else if state.recovery.due(now) && now - state.judged >= QUIET && now - state.probed >= PROBE_EVERY {
                    state.probed = now;
                    state.probe().await?;
                }
            }
        }
        Ok(())
    }
}

impl BalancingState {
    /// Compares this device's pace, if a window closed, with its profile;
    /// whether the pace could judge it (its units take long enough to tell).
    async fn judge(&mut self) -> Result<bool, ActorProcessingErr> {
        let args = &self.args;
        let Ok(Some(pace)) = call_t!(args.execution, ExecutionMsg::TakePace, CALL_TIMEOUT_MS) else {
            return Ok(false);
        };
        let asked =
            call_t!(args.planning, |reply| PlanningMsg::Expected { pace: pace.clone(), reply }, CALL_TIMEOUT_MS);
        let Ok(Some(Expectation { secs_per_token: expected, token_s })) = asked else { return Ok(false) };
        let floor = MIN_DRIFT_S.max(MIN_DRIFT_SHARE * token_s);
        let ratio = pace.secs_per_token / expected;
        let drift = if (pace.secs_per_token - expected).abs() < floor {
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
        let first = std::mem::replace(&mut self.epoch, pace.epoch) != pace.epoch;
        let clean = drift == Drift::Slower && pace.fastest_secs_per_token / expected >= args.threshold;
        if !first && drift != Drift::Within && (drift == self.last || clean) {
            args.planning.cast(PlanningMsg::Reprofile { ratio, pace, expected })?;
            self.last = Drift::Within;
            if drift == Drift::Slower {
                let probe = self.time_probe().await?;
                self.recovery.slowed(Instant::now(), probe);
            } else {
                self.recovery.sped_up();
            }
        } else {
            self.last = drift;
        }
        // Units this quick could run at any speed and stay within the floor.
        Ok(expected * (1.0 - 1.0 / args.threshold) >= floor)
    }

    /// Probes a slowed device its pace cannot judge: two probes in a row
    /// faster than when it was slowed by the threshold re-profile it.
    async fn probe(&mut self) -> Result<(), ActorProcessingErr> {
        let probe = self.time_probe().await?;
        let Some(before) = self.recovery.probed(probe, self.args.threshold) else { return Ok(()) };
        let asked = call_t!(self.args.planning, |reply| PlanningMsg::Probed { probe, before, reply }, CALL_TIMEOUT_MS);
        if let Ok(slowdown) = asked {
            self.recovery.recovered(Instant::now(), probe, slowdown, self.args.threshold);
        }
        Ok(())
    }

    /// The arithmetic probe, off the runtime, as the device this one plays.
    async fn time_probe(&self) -> Result<Duration, ActorProcessingErr> {
        let throttle = self.args.throttle.clone();
        Ok(tokio::task::spawn_blocking(move || crate::profile::probe(&throttle)).await?)
    }
}

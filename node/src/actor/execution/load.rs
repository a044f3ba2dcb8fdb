//! Loading this device's share of a plan: its segments as chains of the
//! runners it holds and of units loaded from the unit files it has or
//! fetches, then in the background the spare units the plan gives it.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;

use llnode_mesh::MeshClient;
use llnode_models::runner::{Chain, SegmentRunner};
use llnode_models::segment::is_past;
use llnode_models::transmission::TransmissionMap;
use ractor::ActorRef;

use super::plan::Ready;
use super::{ExecutionArgs, ExecutionMsg, inside};
use crate::protocol::{PlanDoc, Readiness};
use crate::store::Store;

impl Ready {
    /// Takes the spares `doc` (an epoch of the same assignment) gives this
    /// device; whether they changed.
    pub(super) fn refresh_spares(&mut self, doc: &PlanDoc, args: &ExecutionArgs) -> bool {
        let spares = spares_of(doc, &args.me.to_base58());
        let Some(manifest) = args.store.manifest(&doc.model).filter(|_| spares != self.spares) else { return false };
        self.spare_files = spare_files(&manifest, &spares, &self.files);
        // Runners of spares no longer given are freed once no plan uses them.
        let own: Vec<Range<usize>> =
            self.runners.keys().filter_map(|&s| doc.plan.stages.get(s)).map(|s| s.units.clone()).collect();
        self.held.retain(|r| own.iter().chain(&spares).any(|x| inside(&r.units(), x)));
        self.spares = spares;
        true
    }
}

/// The spare units `doc` gives device `me`.
pub(super) fn spares_of(doc: &PlanDoc, me: &str) -> Vec<Range<usize>> {
    doc.plan.spares.iter().filter(|s| s.device == me).map(|s| s.units.clone()).collect()
}

/// The files of `spares` not among `files` (those of the device's own segments).
pub(super) fn spare_files(
    manifest: &llnode_models::package::Manifest,
    spares: &[Range<usize>],
    files: &BTreeSet<String>,
) -> BTreeSet<String> {
    spares.iter().flat_map(|r| manifest.unit_files(r.clone())).filter(|f| !files.contains(f)).collect()
}

/// What a device whose load has this outcome (`None`: still loading) tells the members.
pub(super) fn readiness(ready: Option<&Result<Ready, String>>) -> Readiness {
    match ready {
        None => Readiness::Loading(String::new()),
        Some(Ok(_)) => Readiness::Ready,
        Some(Err(e)) => Readiness::Failed(e.clone()),
    }
}

/// How to run units `range` with the runners `held`: each held runner that
/// lies inside it (the longest where several start at one unit), and the
/// units between them, to load (`Err`).
pub(super) fn cover(range: Range<usize>, held: &[Arc<SegmentRunner>]) -> Vec<Result<Arc<SegmentRunner>, Range<usize>>> {
    let within: Vec<&Arc<SegmentRunner>> = held.iter().filter(|r| inside(&r.units(), &range)).collect();
    let mut parts = Vec::new();
    let mut at = range.start;
    while at < range.end {
        match within.iter().filter(|r| r.units().start == at).max_by_key(|r| r.units().end) {
            Some(runner) => {
                at = runner.units().end;
                parts.push(Ok(Arc::clone(runner)));
            }
            None => {
                let next =
                    within.iter().map(|r| r.units().start).filter(|&start| start > at).min().unwrap_or(range.end);
                parts.push(Err(at..next));
                at = next;
            }
        }
    }
    parts
}

/// In the background, after this device's own units: files of units it
/// neither runs nor keeps spare leave its disk, the files of its spare
/// units are fetched, and runners for the spare units it does not hold
/// are loaded (`SparesLoaded` under load number `load`), so that a move
/// onto them is at once.
pub(super) fn hold_spares(
    args: &ExecutionArgs,
    ready: &Ready,
    model: &str,
    load: u64,
    myself: &ActorRef<ExecutionMsg>,
) {
    let (store, model) = (args.store.clone(), model.to_string());
    let keep: BTreeSet<String> = ready.files.union(&ready.spare_files).cloned().collect();
    let (spare, client) = (ready.spare_files.clone(), args.client.clone());
    let gaps: Vec<Range<usize>> =
        ready.spares.iter().flat_map(|r| cover(r.clone(), &ready.held)).filter_map(Result::err).collect();
    let myself = myself.clone();
    tokio::spawn(async move {
        let (retained, id) = (store.clone(), model.clone());
        let _ = tokio::task::spawn_blocking(move || retained.retain(&id, &keep)).await;
        if spare.is_empty() && gaps.is_empty() {
            return;
        }
        let loaded = match store.ensure(&client, &model, &spare).await {
            Ok(dir) => tokio::task::spawn_blocking(move || load_ranges(&dir, &gaps))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r),
            Err(e) => Err(e),
        };
        match loaded {
            Ok(runners) => {
                tracing::info!(
                    "holding {} spare file(s) for failover, {} spare unit(s) loaded",
                    spare.len(),
                    runners.values().map(Vec::len).sum::<usize>()
                );
                let _ = myself
                    .cast(ExecutionMsg::SparesLoaded { load, runners: runners.into_values().flatten().collect() });
            }
            Err(e) => tracing::warn!("cannot get the spare units the plan gives this device: {e}"),
        }
    });
}

/// Loads the units of each of `ranges` from the package in `dir`, a runner
/// per unit, one after another: any later plan can reuse any of them, and
/// loading holds one unit's weights twice at most (tract optimises a graph
/// with its weights in it), not a whole segment's. Small graphs also
/// optimise faster: the built-in bench model loads in 1.1 s as 14 runners
/// against 2.5 s as one.
pub(super) fn load_ranges(
    dir: &std::path::Path,
    ranges: &[Range<usize>],
) -> Result<HashMap<Range<usize>, Vec<Arc<SegmentRunner>>>, String> {
    // The weights get huge-page mappings of their own (src/alloc.rs).
    crate::alloc::loading(|| {
        if ranges.is_empty() {
            return Ok(HashMap::new());
        }
        let model = llnode_models::package::load_units(dir, ranges).map_err(|e| e.to_string())?;
        let loaded = ranges
            .iter()
            .map(|r| {
                let units = r.clone().map(|u| {
                    let runner = SegmentRunner::load_range(&model, u..u + 1).map(Arc::new).map_err(|e| e.to_string());
                    // The unit's weights as read, before tract packed them, go back before the next unit's are read.
                    crate::alloc::hand_back();
                    runner
                });
                units.collect::<Result<Vec<_>, _>>().map(|runners| (r.clone(), runners))
            })
            .collect();
        // The graphs and tract's unpacked copies are gone: their memory goes back now, not at the next allocation.
        drop(model);
        crate::alloc::hand_back();
        loaded
    })
}

/// Gets the manifest and this device's unit files (fetching what is missing)
/// and makes each of its segments a chain of runners: those it holds
/// (`reuse`) where they fit, loading the units between them.
pub(super) async fn prepare(
    store: &Arc<Store>,
    client: &MeshClient,
    model: &str,
    segments: Vec<Range<usize>>,
    mine: Vec<usize>,
    spares: Vec<Range<usize>>,
    reuse: Vec<Arc<SegmentRunner>>,
) -> Result<Ready, String> {
    let manifest = store.ensure_manifest(client, model).await?;
    let specs: Vec<_> = manifest.units.iter().map(|u| u.spec.clone()).collect();
    let map = TransmissionMap::new(&specs, &segments).map_err(|e| format!("the plan does not fit the package: {e}"))?;
    let cache_units = specs
        .iter()
        .enumerate()
        .flat_map(|(u, spec)| spec.inputs.iter().filter(|n| is_past(n)).map(move |n| (n.clone(), u)))
        .collect();
    let files: BTreeSet<String> = mine.iter().flat_map(|&s| manifest.unit_files(segments[s].clone())).collect();
    let spare_files = spare_files(&manifest, &spares, &files);
    let covers: Vec<(usize, Vec<_>)> = mine.iter().map(|&s| (s, cover(segments[s].clone(), &reuse))).collect();
    // Held runners the new plan neither runs nor keeps spare are let go
    // before anything loads: a device holds old and new units at once only
    // while a plan it still serves keeps the old ones.
    let covering =
        |r: &Arc<SegmentRunner>| covers.iter().flat_map(|(_, parts)| parts.iter().flatten()).any(|h| Arc::ptr_eq(h, r));
    let reuse: Vec<Arc<SegmentRunner>> =
        reuse.into_iter().filter(|r| covering(r) || spares.iter().any(|s| inside(&r.units(), s))).collect();
    let gaps: Vec<Range<usize>> =
        covers.iter().flat_map(|(_, parts)| parts.iter().filter_map(|p| p.clone().err())).collect();
    let fresh = gaps.iter().map(ExactSizeIterator::len).sum();
    let mut loaded = HashMap::new();
    if !gaps.is_empty() {
        let dir = store.ensure(client, model, &files).await?;
        loaded = tokio::task::spawn_blocking(move || load_ranges(&dir, &gaps))
            .await
            .map_err(|e| format!("loading failed: {e}"))??;
    }
    let mut runners = HashMap::new();
    let mut held: Vec<Arc<SegmentRunner>> = Vec::new();
    for (s, parts) in covers {
        let parts: Vec<Arc<SegmentRunner>> =
            parts.into_iter().flat_map(|p| p.map_or_else(|gap| loaded[&gap].clone(), |held| vec![held])).collect();
        held.extend(parts.iter().cloned());
        runners.insert(s, Arc::new(Chain::new(parts)));
    }
    // Held runners that fit the new spares stay (the rest are freed once no plan uses them).
    for runner in reuse {
        let spare = spares.iter().any(|s| inside(&runner.units(), s));
        if spare && !held.iter().any(|h| Arc::ptr_eq(h, &runner)) {
            held.push(runner);
        }
    }
    Ok(Ready { map, runners, held, spares, fresh, files, spare_files, cache_units })
}

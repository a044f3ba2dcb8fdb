//! `llnode start`: runs this device's node in the foreground until Ctrl-C or
//! SIGTERM. Prints `ready <peer-id> <addr>...` once it listens.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use llnode_mesh::{DeviceKey, MeshConfig, MeshEvent, Multiaddr, Trust};
use ractor::Actor;
use tokio_util::sync::CancellationToken;

use crate::actor::balancing::{BalancingActor, BalancingArgs};
use crate::actor::discovery::{DiscoveryActor, DiscoveryArgs, DiscoveryMsg};
use crate::actor::execution::{ExecutionActor, ExecutionArgs, ExecutionMsg};
use crate::actor::planning::{PlanningActor, PlanningArgs, PlanningMsg};
use crate::actor::trust::{TrustActor, TrustArgs, TrustMsg};
use crate::control::{self, Local};
use crate::protocol::NodeMessage;
use crate::store::Store;
use llnode_mesh::wire::{ControlRequest, ControlResponse};

/// Fetch requests this node answers at once.
const SERVE_AT_ONCE: usize = 8;

pub struct StartOptions {
    /// The package this node plans for.
    pub model: Option<std::path::PathBuf>,
    pub memory: Option<u64>,
    pub objective: llnode_planner::config::Objective,
    pub listen: Vec<Multiaddr>,
    pub peers: Vec<Multiaddr>,
    pub mdns: bool,
    pub name: String,
    pub certificate_validity: Duration,
    /// `--throttle`: segment steps take this many times as long.
    pub throttle: f64,
    /// Re-profile (and so re-plan) when the measured pace drifts by this ratio; `None`: never.
    pub rebalance: Option<f64>,
    /// `--max-sessions`.
    pub max_sessions: usize,
    /// `--max-prompts`.
    pub max_prompts: usize,
    /// `--cpus`.
    pub cpus: Option<crate::cpus::CpuList>,
}

pub fn start(data_dir: &Path, options: StartOptions) -> anyhow::Result<()> {
    // Before the runtime starts its threads, which then run there too.
    if let Some(cpus) = &options.cpus {
        crate::cpus::pin(cpus)?;
    }
    crate::runtime()?.block_on(run(data_dir, options))
}

async fn run(data_dir: &Path, options: StartOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let listener = control::bind(data_dir).await?;
    let key = DeviceKey::load_or_create(&data_dir.join(llnode_mesh::identity::DEVICE_KEY_FILE))?;
    let trust = Trust::load(data_dir)?;
    let mesh = trust.mesh();
    let trust_name = trust.own_certificate().and_then(|c| c.open().ok()).map(|c| c.name);
    if mesh.is_none() {
        eprintln!(
            "note: this device is in no mesh yet, so every peer will refuse it; `llnode mesh init` or `llnode mesh join <token>`"
        );
    }
    // Checking a source package reads all its weights: seconds for big models.
    let sources: Vec<_> = options.model.iter().cloned().collect();
    let store = {
        let data_dir = data_dir.to_path_buf();
        std::sync::Arc::new(tokio::task::spawn_blocking(move || Store::open(&data_dir, &sources)).await??)
    };
    let model = store.source().map(|(id, manifest)| (id, crate::profile::model_cost(&manifest.cost)));
    let traffic = std::sync::Arc::new(crate::traffic::Traffic::default());
    let shutdown = CancellationToken::new();
    let config = MeshConfig { listen: options.listen, mdns: options.mdns, ..MeshConfig::default() };

    // The mesh's events go to the actors, which exist only once the mesh
    // client does; they wait in a channel until then, for the router below.
    // A step's tensors skip the router once the execution actor is up.
    let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel::<MeshEvent>();
    let tensors_to = std::sync::Arc::new(std::sync::OnceLock::<ractor::ActorRef<ExecutionMsg>>::new());
    let sink = {
        let tensors_to = tensors_to.clone();
        move |event| match (event, tensors_to.get()) {
            (MeshEvent::Tensor { peer, id, tensor }, Some(execution))
                if tensor.header.name != crate::actor::planning::PROBE =>
            {
                let _ = execution.cast(ExecutionMsg::Inbound { peer, id, tensor });
            }
            (event, _) => {
                let _ = events_tx.send(event);
            }
        }
    };
    let (client, mesh_task) = llnode_mesh::spawn(&key, config, trust.clone(), sink, shutdown.clone())?;

    let (discovery, discovery_handle) =
        Actor::spawn(None, DiscoveryActor, DiscoveryArgs { client: client.clone(), explicit: options.peers }).await?;
    let trust_args = TrustArgs {
        data_dir: data_dir.to_path_buf(),
        me: key.peer_id(),
        trust,
        client: client.clone(),
        certificate_validity: options.certificate_validity,
    };
    let (trust_actor, trust_handle) = Actor::spawn(None, TrustActor, trust_args).await?;
    let throttle = std::sync::Arc::new(crate::pace::Throttle::new(options.throttle));
    let (readiness_tx, readiness) = tokio::sync::watch::channel(None);
    let execution_args = ExecutionArgs {
        me: key.peer_id(),
        client: client.clone(),
        store: store.clone(),
        traffic: traffic.clone(),
        throttle: throttle.clone(),
        readiness: readiness_tx,
        max_sessions: options.max_sessions,
    };
    let (execution, execution_handle) = Actor::spawn(None, ExecutionActor, execution_args).await?;
    let _ = tensors_to.set(execution.clone());
    let planning_args = PlanningArgs {
        key: key.clone(),
        client: client.clone(),
        model,
        objective: options.objective,
        execution: execution.clone(),
        store: store.clone(),
        traffic: traffic.clone(),
        readiness: readiness.clone(),
    };
    let (planning, planning_handle) = Actor::spawn(None, PlanningActor, planning_args).await?;
    let balancing = match options.rebalance {
        Some(threshold) => {
            let args = BalancingArgs {
                execution: execution.clone(),
                planning: planning.clone(),
                throttle: throttle.clone(),
                threshold,
            };
            Some(Actor::spawn(None, BalancingActor, args).await?)
        }
        None => None,
    };
    {
        // Measuring runs the units once (all but the last): seconds for big models, so off the runtime,
        // on a thread of its own; the units' memory is handed back as it ends.
        // Members know each other by their certificates' names.
        let name = trust_name.unwrap_or_else(|| options.name.clone());
        let (planning, id) = (planning.clone(), key.peer_id().to_base58());
        let (package, memory, throttle) = (options.model.clone(), options.memory, options.throttle);
        std::thread::spawn(move || {
            match crate::profile::measure(&id, &name, package.as_deref(), memory) {
                Ok(mut profile) => {
                    // A throttled device is measured as the slower device it plays.
                    profile.slow_down(throttle);
                    let _ = planning.cast(PlanningMsg::Measured(profile));
                }
                Err(e) => tracing::error!("cannot measure this device: {e:#}"),
            }
            crate::alloc::hand_back();
        });
    }

    let router = {
        let (discovery, trust_actor, planning, execution, client, store) = (
            discovery.clone(),
            trust_actor.clone(),
            planning.clone(),
            execution.clone(),
            client.clone(),
            store.clone(),
        );
        // Members fetching units are served a few slices at a time; more wait their turn.
        let serving = std::sync::Arc::new(tokio::sync::Semaphore::new(SERVE_AT_ONCE));
        tokio::spawn(async move {
            while let Some(event) = events_rx.recv().await {
                match event {
                    MeshEvent::Member { peer } => {
                        let _ = planning.cast(PlanningMsg::MemberUp(peer));
                        let _ = execution.cast(ExecutionMsg::MemberUp(peer));
                    }
                    MeshEvent::Control { peer, id, request: ControlRequest::Node(bytes) } => {
                        match NodeMessage::decode(&bytes) {
                            Ok(NodeMessage::Fetch { model, file, offset, len }) => {
                                let (store, client, serving) = (store.clone(), client.clone(), serving.clone());
                                tokio::spawn(async move {
                                    let _turn = serving.acquire_owned().await;
                                    let slice =
                                        tokio::task::spawn_blocking(move || store.serve(&model, &file, offset, len))
                                            .await;
                                    client.respond(
                                        id,
                                        match slice {
                                            Ok(Ok(bytes)) => ControlResponse::Node(bytes),
                                            Ok(Err(reason)) => ControlResponse::Refused { reason },
                                            Err(e) => {
                                                ControlResponse::Refused { reason: format!("serving failed: {e}") }
                                            }
                                        },
                                    );
                                });
                            }
                            Ok(NodeMessage::Move(order)) => {
                                let _ = execution.cast(ExecutionMsg::Move {
                                    asker: peer,
                                    order,
                                    waiter: crate::actor::Waiter::Remote(id),
                                });
                            }
                            Ok(message) => {
                                let _ = planning.cast(PlanningMsg::Inbound { peer, id, message });
                            }
                            Err(reason) => client.respond(id, ControlResponse::Refused { reason }),
                        }
                    }
                    MeshEvent::Disconnected { peer } | MeshEvent::Refused { peer, .. } => {
                        let _ = planning.cast(PlanningMsg::MemberDown(peer));
                        let _ = execution.cast(ExecutionMsg::PeerGone(peer));
                        let _ = discovery.cast(DiscoveryMsg::Event(event));
                    }
                    MeshEvent::JoinRequest { peer, id, secret, name } => {
                        let _ = trust_actor.cast(TrustMsg::JoinRequest { peer, id, secret, name });
                    }
                    MeshEvent::Revocation { revocation, .. } => {
                        let _ = trust_actor.cast(TrustMsg::Learned { revocation });
                    }
                    MeshEvent::Trusted { peer, ref name } => {
                        let _ = trust_actor.cast(TrustMsg::Trusted { peer, name: name.clone() });
                        let _ = planning.cast(PlanningMsg::Trusted { peer, name: name.clone() });
                        let _ = discovery.cast(DiscoveryMsg::Event(event));
                    }
                    MeshEvent::Control { id, .. } => client.respond(
                        id,
                        ControlResponse::Refused { reason: "this node does not serve that request".into() },
                    ),
                    MeshEvent::Tensor { id, tensor, .. } if tensor.header.name == crate::actor::planning::PROBE => {
                        client.ack_tensor(id, llnode_mesh::wire::TensorAck::Received)
                    }
                    MeshEvent::Tensor { peer, id, tensor } => {
                        let _ = execution.cast(ExecutionMsg::Inbound { peer, id, tensor });
                    }
                    event => {
                        let _ = discovery.cast(DiscoveryMsg::Event(event));
                    }
                }
            }
        })
    };

    let addrs = wait_for_listeners(&client).await?;
    let peer_id = key.peer_id();
    let local = Local {
        peer_id: peer_id.to_base58(),
        name: options.name.clone(),
        mesh: mesh.map(|m| m.to_string()),
        client: client.clone(),
        discovery: discovery.clone(),
        trust: trust_actor.clone(),
        planning: planning.clone(),
        initiator: std::sync::Arc::new(crate::prompt::Initiator {
            me: key.peer_id(),
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(options.max_prompts)),
            max_prompts: options.max_prompts,
            client: client.clone(),
            execution: execution.clone(),
            store: store.clone(),
            traffic: traffic.clone(),
            planning: planning.clone(),
            loaded: readiness,
            tokenizers: Default::default(),
        }),
        throttle,
    };
    let server = tokio::spawn(control::serve(listener, local, shutdown.clone()));
    let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    crate::outln!("ready {peer_id} {}", addrs.join(" "));

    wait_for_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    let _ = server.await;
    let _ = mesh_task.await;
    router.abort();
    discovery.stop(None);
    trust_actor.stop(None);
    planning.stop(None);
    execution.stop(None);
    if let Some((balancing, handle)) = balancing {
        balancing.stop(None);
        let _ = handle.await;
    }
    let _ = planning_handle.await;
    let _ = execution_handle.await;
    let _ = discovery_handle.await;
    let _ = trust_handle.await;
    let _ = std::fs::remove_file(control::socket_path(data_dir));
    Ok(())
}

async fn wait_for_listeners(client: &llnode_mesh::MeshClient) -> anyhow::Result<Vec<Multiaddr>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let addrs = client.listeners().await;
        if !addrs.is_empty() {
            // Interfaces report one by one; give the rest a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Ok(client.listeners().await);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the node did not start listening within 10 s; check the --listen addresses");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

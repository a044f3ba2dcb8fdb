//! `llnode prompt`: the initiator's side of an inference across the mesh.
//! The node that is asked runs the generation loop (tokenizer, sampling,
//! stop rules) with a [`Forward`] whose steps go through the plan's
//! segments: it sends each step's token ids, mask and positions to the
//! segments that read them and waits for the last segment's logits.

use std::sync::Arc;
use std::time::Duration;

use llnode_mesh::{MeshClient, PeerId};
use llnode_models::generate::{GenerateOptions, generate};
use llnode_models::pipeline::{Forward, step_inputs};
use llnode_models::raw;
use llnode_models::runner::RunError;
use llnode_models::sampling::SamplingConfig;
use llnode_models::tokenizer::TextTokenizer;
use llnode_models::transmission::Endpoint;
use ractor::{ActorRef, call_t};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::actor::execution::{Delivery, ExecutionMsg, Route, wire_tensor};
use crate::protocol::NodeMessage;

/// How long one step may take across the mesh before the prompt fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a prompt waits for this node to load the plan (fetching its units first).
const ROUTE_WAIT_MS: u64 = 600_000;

/// What `llnode prompt` asks for (the sampling options of `llnode run`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptRequest {
    pub prompt: String,
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    pub stop: Vec<String>,
    pub chat: bool,
    pub ignore_eos: bool,
    /// The package id (or a prefix of it) the asker wants; `None` takes the plan's.
    pub model: Option<String>,
}

/// Streamed back to the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PromptEvent {
    Text(String),
    /// `first_token_s`: the prefill step, prompt in to first token out.
    Done { prompt_tokens: usize, tokens: usize, first_token_s: f64, decode_tokens_per_s: f64, epoch: u64 },
}

/// Prompts this node runs at once as initiator; more are told to retry.
pub const MAX_PROMPTS: usize = 4;

pub struct Initiator {
    pub me: PeerId,
    /// One permit per prompt in flight ([`MAX_PROMPTS`]).
    pub slots: std::sync::Arc<tokio::sync::Semaphore>,
    pub client: MeshClient,
    pub execution: ActorRef<ExecutionMsg>,
    /// Where the tokenizer and configs come from (fetched when this node lacks them).
    pub store: Arc<crate::store::Store>,
    pub traffic: Arc<crate::traffic::Traffic>,
}

/// Runs one prompt across the mesh, sending events to `events`; returns an error line on failure.
pub async fn run(initiator: &Initiator, request: PromptRequest, events: mpsc::UnboundedSender<PromptEvent>) -> Result<(), String> {
    request.sampling.validate()?;
    let _slot = initiator
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| format!("busy: this node already runs {MAX_PROMPTS} prompts; retry in a moment or ask another member"))?;
    let route = call_t!(initiator.execution, ExecutionMsg::Route, ROUTE_WAIT_MS).map_err(|e| e.to_string())??;
    if let Some(wanted) = &request.model {
        if wanted.is_empty() || !route.model.starts_with(wanted.as_str()) {
            return Err(format!(
                "the mesh's plan runs model {}, not {wanted}; start a node with --model <package> of it, or leave out --model",
                crate::store::short(&route.model)
            ));
        }
    }
    let store = &initiator.store;
    let side = store.ensure_manifest(&initiator.client, &route.model).await?.side_files();
    let package = store.ensure(&initiator.client, &route.model, &side).await?;
    let session: u64 = rand::random();
    let handle = tokio::runtime::Handle::current();
    let (me, client, execution, traffic) = (initiator.me, initiator.client.clone(), initiator.execution.clone(), initiator.traffic.clone());
    let devices = route.devices.clone();
    let result = tokio::task::spawn_blocking(move || {
        let model = llnode_models::package::load_units(&package, &[]).map_err(|e| e.to_string())?;
        let tokenizer = TextTokenizer::load(&model.dir, model.info.vocab_size).map_err(|e| e.to_string())?;
        let ids = if request.chat { tokenizer.encode_chat(&request.prompt) } else { tokenizer.encode(&request.prompt) }
            .map_err(|e| e.to_string())?;
        let options = GenerateOptions {
            max_tokens: request.max_tokens,
            sampling: request.sampling.clone(),
            stop: request.stop.clone(),
            eos: if request.ignore_eos { vec![] } else { model.info.eos_token_ids.clone() },
            context: model.info.max_positions,
        };
        let with_positions = model.inputs.iter().any(|i| i.name == "position_ids");
        let epoch = route.epoch;
        let mut forward = MeshForward { handle, me, client, execution, traffic, route, session, step: 0, past: 0, with_positions };
        let generation = generate(&mut forward, &tokenizer, &ids, &options, &mut |text| {
            let _ = events.send(PromptEvent::Text(text.to_string()));
        })
        .map_err(|e| e.to_string())?;
        let _ = events.send(PromptEvent::Done {
            prompt_tokens: generation.prompt_tokens,
            tokens: generation.tokens.len(),
            first_token_s: generation.prefill.as_secs_f64(),
            decode_tokens_per_s: generation.decode_tokens_per_s(),
            epoch,
        });
        Ok::<(), String>(())
    })
    .await
    .map_err(|e| format!("the generation task failed: {e}"))?;
    // Free the session's caches everywhere, whatever happened.
    let end = NodeMessage::EndSession { session }.encode();
    for device in devices.iter().filter(|d| **d != initiator.me) {
        let _ = initiator.client.request(*device, llnode_mesh::wire::ControlRequest::Node(end.clone())).await;
    }
    let _ = initiator.execution.cast(ExecutionMsg::EndSession { session });
    result
}

struct MeshForward {
    handle: tokio::runtime::Handle,
    me: PeerId,
    client: MeshClient,
    execution: ActorRef<ExecutionMsg>,
    traffic: Arc<crate::traffic::Traffic>,
    route: Route,
    session: u64,
    step: u64,
    past: usize,
    with_positions: bool,
}

impl Forward for MeshForward {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RunError> {
        let fail = RunError::Remote;
        self.step += 1;
        let (session, step, n) = (self.session, self.step, tokens.len() as u32);
        let acts = step_inputs(tokens, self.past, self.with_positions);
        let (reply, logits) = oneshot::channel();
        self.execution
            .cast(ExecutionMsg::AwaitLogits { session, step, reply })
            .map_err(|e| fail(format!("the node is stopping: {e}")))?;
        for t in self.route.map.transfers.iter().filter(|t| t.from == Endpoint::Initiator) {
            let Endpoint::Segment(s) = t.to else { continue };
            let value = acts.get(&t.tensor).ok_or_else(|| fail(format!("the model reads {} from the initiator", t.tensor)))?;
            let value = raw::to_raw(value).map_err(|e| fail(e.to_string()))?;
            let device = self.route.devices[s];
            if device == self.me {
                let d = Delivery { session, initiator: self.me, step, tokens: n, name: t.tensor.clone(), value };
                self.execution.cast(ExecutionMsg::Deliver(d)).map_err(|e| fail(e.to_string()))?;
            } else {
                let tensor = wire_tensor(session, step, n, &self.me, &t.tensor, &value);
                let bytes = tensor.data.len();
                self.handle
                    .block_on(self.client.send_tensor(device, tensor))
                    .map_err(|e| fail(format!("cannot reach the device running segment {s}: {e}; ask again once `llnode plan` shows a new plan")))?;
                self.traffic.record(&device, bytes);
            }
        }
        let logits = self
            .handle
            .block_on(async { tokio::time::timeout(STEP_TIMEOUT, logits).await })
            .map_err(|_| fail(format!("no logits within {} s; a device may have left (`llnode peers`)", STEP_TIMEOUT.as_secs())))?
            .map_err(|_| fail("the node dropped the step".into()))?
            .map_err(fail)?;
        self.past += tokens.len();
        Ok(logits)
    }

    fn position(&self) -> usize {
        self.past
    }
}

/// `llnode prompt`: asks the local node and prints the answer as it streams.
pub fn cli(data_dir: &std::path::Path, args: &crate::cli::GenerationArgs, model: Option<String>, stats: bool, prompt: String) -> anyhow::Result<()> {
    args.sampling().validate().map_err(anyhow::Error::msg)?;
    let request = PromptRequest {
        prompt,
        max_tokens: args.max_tokens,
        sampling: args.sampling(),
        stop: args.stop.clone(),
        chat: args.chat,
        ignore_eos: args.ignore_eos,
        model,
    };
    let rt = crate::runtime()?;
    rt.block_on(crate::control::prompt(data_dir, request, &mut |event| match event {
        PromptEvent::Text(text) => crate::out(&text),
        PromptEvent::Done { prompt_tokens, tokens, first_token_s, decode_tokens_per_s, epoch } => {
            crate::outln!();
            if stats {
                eprintln!(
                    "stats: plan_epoch={epoch} prompt_tokens={prompt_tokens} tokens={tokens} first_token_ms={:.2} decode_tok_s={decode_tokens_per_s:.2}",
                    first_token_s * 1e3
                );
            }
        }
    }))
}

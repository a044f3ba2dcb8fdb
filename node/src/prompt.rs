//! `llnode prompt`: the initiator's side of an inference across the mesh.
//! The node that is asked runs the generation loop (tokenizer, sampling,
//! stop rules: [`Generator`]) on its runtime, awaiting each step through the
//! plan's segments (`forward`): it sends each step's token ids, mask and
//! positions to the segments that read them and waits for the last
//! segment's logits.
//! Before the first step, `startup` finds the route to run on (of the model
//! asked for; in privacy mode one that keeps the tokens here) and waits until
//! every device of it has loaded its units.

mod forward;
mod startup;

use std::collections::HashMap;
use std::sync::Arc;

use llnode_mesh::{MeshClient, PeerId};
use llnode_models::generate::{GenerateError, GenerateOptions, Generation, Generator, Next};
use llnode_models::sampling::SamplingConfig;
use llnode_models::tokenizer::TextTokenizer;
use ractor::{ActorRef, call_t};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use self::forward::MeshForward;
use self::startup::Startup;
use crate::actor::execution::{ExecutionMsg, Route};
use crate::actor::planning::PlanningMsg;
use crate::protocol::NodeMessage;

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
    /// Privacy mode: the token ids and logits never leave the asking device
    /// (it runs the first and last units itself).
    #[serde(default)]
    pub private: bool,
}

/// Streamed back to the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PromptEvent {
    Text(String),
    /// The devices of the plan are still getting or loading their units:
    /// what each one is doing.
    Waiting(String),
    /// The plan changed under the generation (`why`): it waits for the next one.
    Moving {
        why: String,
    },
    /// The generation moved to a new plan (`why`) and went on after
    /// replaying `replayed` steps, `pause_s` after the interruption.
    Resumed {
        why: String,
        epoch: u64,
        replayed: usize,
        pause_s: f64,
    },
    /// Moving to plan `epoch`, the generation has replayed `done` of the
    /// `total` steps so far: said at each of the replay's checkpoints (every
    /// `REPLAY_WINDOW` steps), since a long answer takes a while to replay.
    Replaying {
        epoch: u64,
        done: usize,
        total: usize,
    },
    /// The generation moved to plan `epoch` at a token boundary, after
    /// `tokens` generated tokens, its devices handing over the KV caches of
    /// `past` tokens (prompt included) in `pause_s`.
    HandedOver {
        epoch: u64,
        tokens: usize,
        past: usize,
        pause_s: f64,
    },
    /// `first_token_s`: the prefill step, prompt in to first token out.
    /// `token_ms`: when each token's logits came, in ms from the prefill's start.
    /// `decode_compute_ms`, `decode_handoff_ms`: medians over the decode
    /// steps of the stages' compute in a step, and of the rest of its time,
    /// from its send to its logits (the network and the hand-offs between
    /// threads and devices).
    Done {
        prompt_tokens: usize,
        tokens: usize,
        first_token_s: f64,
        decode_tokens_per_s: f64,
        decode_compute_ms: f64,
        decode_handoff_ms: f64,
        epoch: u64,
        token_ms: Vec<f64>,
    },
}

pub struct Initiator {
    pub me: PeerId,
    /// One permit per prompt in flight, `max_prompts` of them (`llnode start --max-prompts`).
    pub slots: std::sync::Arc<tokio::sync::Semaphore>,
    pub max_prompts: usize,
    pub client: MeshClient,
    pub execution: ActorRef<ExecutionMsg>,
    /// Where the tokenizer and configs come from (fetched when this node lacks them).
    pub store: Arc<crate::store::Store>,
    pub traffic: Arc<crate::traffic::Traffic>,
    /// Told about moves, for `llnode plan`'s history.
    pub planning: ActorRef<PlanningMsg>,
    /// The execution actor's readiness for the plan it holds: a generation
    /// asks it for a newer route only once this says one is loaded.
    pub loaded: tokio::sync::watch::Receiver<Option<(u64, crate::protocol::Readiness)>>,
    pub tokenizers: Arc<Tokenizers>,
}

/// Tokenizers this node has parsed, by model id: parsing a `tokenizer.json`
/// takes 30-40 ms (1 MB, the built-in model's), every prompt's wait before
/// its first token. A model id names the package's content, so an entry
/// never goes stale.
#[derive(Default)]
pub struct Tokenizers(std::sync::Mutex<HashMap<String, Arc<TextTokenizer>>>);

impl Tokenizers {
    /// Models whose tokenizers are kept; one more clears them.
    const KEPT: usize = 2;

    fn of(&self, id: &str, model: &llnode_models::model::Model) -> Result<Arc<TextTokenizer>, String> {
        if let Some(tokenizer) = self.0.lock().expect("tokenizers lock").get(id) {
            return Ok(tokenizer.clone());
        }
        let tokenizer = Arc::new(TextTokenizer::load(&model.dir, model.info.vocab_size).map_err(|e| e.to_string())?);
        let mut kept = self.0.lock().expect("tokenizers lock");
        if kept.len() >= Self::KEPT {
            kept.clear();
        }
        kept.insert(id.to_string(), tokenizer.clone());
        Ok(tokenizer)
    }
}

/// Runs one prompt across the mesh, sending events to `events`; returns an error line on failure.
pub async fn run(
    initiator: &Initiator,
    request: PromptRequest,
    events: mpsc::UnboundedSender<PromptEvent>,
) -> Result<(), String> {
    request.sampling.validate()?;
    let _slot = initiator.slots.clone().try_acquire_owned().map_err(|_| {
        format!(
            "busy: this node already runs {} prompt(s) at once; retry in a moment or ask another member",
            initiator.max_prompts
        )
    })?;
    let route = call_t!(initiator.execution, |reply| ExecutionMsg::Route { after: 0, reply }, ROUTE_WAIT_MS)
        .map_err(|e| e.to_string())??;
    // With a plan held, this node has heard which models the members serve.
    let model = request.model.as_deref().map(|wanted| resolve_model(&initiator.store, wanted)).transpose()?;
    let private = request.private;
    let startup = Startup {
        me: initiator.me,
        planning: &initiator.planning,
        execution: &initiator.execution,
        events: &events,
        private,
        model,
    };
    let route = startup.ready(route).await?;
    let store = &initiator.store;
    let side = store.ensure_manifest(&initiator.client, &route.model).await?.side_files();
    let package = store.ensure(&initiator.client, &route.model, &side).await?;
    // Reading the model's description and its tokenizer, and tokenizing, are file and CPU work.
    let (tokenizers, model_id) = (initiator.tokenizers.clone(), route.model.clone());
    let (tokenizer, ids, options, with_positions) = tokio::task::spawn_blocking(move || {
        let model = llnode_models::package::load_units(&package, &[]).map_err(|e| e.to_string())?;
        let tokenizer = tokenizers.of(&model_id, &model)?;
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
        Ok::<_, String>((tokenizer, ids, options, with_positions))
    })
    .await
    .map_err(|e| format!("reading the model failed: {e}"))??;
    let mut forward = MeshForward {
        me: initiator.me,
        client: initiator.client.clone(),
        execution: initiator.execution.clone(),
        loaded: initiator.loaded.clone(),
        traffic: initiator.traffic.clone(),
        planning: initiator.planning.clone(),
        events: events.clone(),
        session: rand::random(),
        sessions: Vec::new(),
        route,
        private,
        step: 0,
        past: 0,
        history: Vec::new(),
        with_positions,
        top_logits: options.sampling.logits_needed().and_then(|k| u32::try_from(k).ok()).unwrap_or(0),
        started: std::time::Instant::now(),
        token_ms: Vec::new(),
        step_ms: Vec::new(),
    };
    forward.sessions.push((forward.session, forward.route.devices.clone()));
    tracing::info!(
        session = forward.session,
        "a prompt of {} token(s): generating on plan epoch {}",
        ids.len(),
        forward.route.epoch
    );
    // The generation runs here, on the runtime: a step's tensors and logits
    // come and go on its workers, so waiting for them costs no thread a
    // wake-up. On a blocking thread each step cost two: one node spent 0.25 ms
    // of a token outside the compute that way, 0.17 ms this way.
    let generation = generate_on(&mut forward, &tokenizer, &ids, &options, &mut |text| {
        let _ = events.send(PromptEvent::Text(text.to_string()));
    })
    .await;
    let result = generation.map_err(|e| e.to_string()).map(|generation| {
        // The first step is the prefill.
        let decode = forward.step_ms.get(1..).unwrap_or_default();
        let _ = events.send(PromptEvent::Done {
            prompt_tokens: generation.prompt_tokens,
            tokens: generation.tokens.len(),
            first_token_s: generation.prefill.as_secs_f64(),
            decode_tokens_per_s: generation.decode_tokens_per_s(),
            decode_compute_ms: median(decode.iter().map(|(_, compute)| *compute)),
            decode_handoff_ms: median(decode.iter().map(|(step, compute)| step - compute)),
            epoch: forward.route.epoch,
            token_ms: std::mem::take(&mut forward.token_ms),
        });
    });
    // Free the sessions' caches everywhere, whatever happened.
    for (session, devices) in std::mem::take(&mut forward.sessions) {
        let end = NodeMessage::EndSession { session }.encode();
        for device in devices.iter().filter(|d| **d != initiator.me) {
            let _ = initiator.client.request(*device, llnode_mesh::wire::ControlRequest::Node(end.clone())).await;
        }
        let _ = initiator.execution.cast(ExecutionMsg::EndSession { session });
    }
    result
}

/// [`llnode_models::generate::generate`]'s loop, with the mesh's steps awaited.
async fn generate_on(
    forward: &mut MeshForward,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    on_text: &mut (dyn FnMut(&str) + Send),
) -> Result<Generation, GenerateError> {
    let mut generator = Generator::new(tokenizer, prompt, options)?;
    // Sampling at a temperature weighs the whole vocabulary and ranks its
    // head: 0.06-0.8 ms a token for 32000 entries here, 0.3-4 ms for 152000
    // (`just bench-sampler`), work no runtime worker should hold. Picking the
    // highest logit takes 0.02-0.1 ms.
    let weighs = !options.sampling.is_greedy();
    let mut logits = forward.forward(prompt).await?;
    loop {
        let position = forward.position();
        let next = if weighs {
            tokio::task::block_in_place(|| generator.next(logits, position, on_text))
        } else {
            generator.next(logits, position, on_text)
        };
        match next? {
            Next::Forward(token) => logits = forward.forward(&[token]).await?,
            Next::Done(generation) => return Ok(generation),
        }
    }
}

/// Whether `route` keeps the token ids and logits on `me`: it runs the
/// first segment (which reads them) and the last (which makes the logits).
fn keeps_tokens_on(route: &Route, me: PeerId) -> bool {
    route.devices.first() == Some(&me) && route.devices.last() == Some(&me)
}

/// The one package id among those the mesh knows that starts with `wanted`.
fn resolve_model(store: &crate::store::Store, wanted: &str) -> Result<String, String> {
    let known = store.known_models();
    let matching: Vec<&String> = known.iter().filter(|id| !wanted.is_empty() && id.starts_with(wanted)).collect();
    match matching[..] {
        [id] => Ok(id.clone()),
        [] => Err(format!(
            "no member has model {wanted} (the mesh knows {}); start a node with --model <package> of it, or leave out --model",
            if known.is_empty() {
                "none yet".to_string()
            } else {
                known.iter().map(|id| crate::store::short(id)).collect::<Vec<_>>().join(", ")
            }
        )),
        _ => Err(format!("{wanted} starts several models' ids; give more of it")),
    }
}

/// What `llnode prompt` prints besides the text.
pub struct Report {
    /// The plan epoch and speed, to stderr, when done.
    pub stats: bool,
    /// When each token came, to stderr, when done.
    pub timings: bool,
}

/// `llnode prompt`: asks the local node and prints the answer as it streams.
pub fn cli(
    data_dir: &std::path::Path,
    args: &crate::cli::GenerationArgs,
    model: Option<String>,
    private: bool,
    report: Report,
    prompt: String,
) -> anyhow::Result<()> {
    args.sampling().validate().map_err(anyhow::Error::msg)?;
    let request = PromptRequest {
        prompt,
        max_tokens: args.max_tokens,
        sampling: args.sampling(),
        stop: args.stop.clone(),
        chat: args.chat,
        ignore_eos: args.ignore_eos,
        model,
        private,
    };
    let rt = crate::runtime()?;
    // Whether the answer's text has left the terminal's line open: a status line then starts a new one.
    let mut mid_line = false;
    // Why the generation is moving, once said: its resumption need not say it again.
    let mut moving: Option<String> = None;
    rt.block_on(crate::control::prompt(data_dir, request, &mut |event| {
        let status = match event {
            PromptEvent::Text(text) => {
                if !text.is_empty() {
                    mid_line = !text.ends_with('\n');
                }
                crate::out(&text);
                return;
            }
            PromptEvent::Waiting(line) => format!("waiting for {line}"),
            PromptEvent::Moving { why } => {
                let line = format!("{why}; waiting for the mesh's next plan…");
                moving = Some(why);
                line
            }
            PromptEvent::Replaying { epoch, done, total } => {
                format!("replaying the answer so far on plan epoch {epoch}: {done} of {total} steps")
            }
            PromptEvent::HandedOver { epoch, tokens, past, pause_s } => format!(
                "moved to plan epoch {epoch} after {tokens} token(s) (the caches of {past} token(s) handed over in {:.0} ms)",
                pause_s * 1e3
            ),
            PromptEvent::Resumed { why, epoch, replayed, pause_s } => {
                let why = if moving.take().as_ref() == Some(&why) { String::new() } else { format!("{why}; ") };
                format!("{why}resumed on plan epoch {epoch} after {:.0} ms (replayed {replayed} step(s))", pause_s * 1e3)
            }
            PromptEvent::Done {
                prompt_tokens,
                tokens,
                first_token_s,
                decode_tokens_per_s,
                decode_compute_ms,
                decode_handoff_ms,
                epoch,
                token_ms,
            } => {
                crate::outln!();
                if report.timings {
                    let times: Vec<String> = token_ms.iter().map(|t| format!("{t:.1}")).collect();
                    eprintln!("timings_ms: {}", times.join(" "));
                }
                if report.stats {
                    eprintln!(
                        "stats: plan_epoch={epoch} prompt_tokens={prompt_tokens} tokens={tokens} first_token_ms={:.2} decode_tok_s={decode_tokens_per_s:.2} decode_compute_ms={decode_compute_ms:.3} decode_handoff_ms={decode_handoff_ms:.3}",
                        first_token_s * 1e3
                    );
                }
                return;
            }
        };
        if std::mem::take(&mut mid_line) {
            eprintln!();
        }
        eprintln!("llnode: {status}");
    }))
}

/// The median of `values`; 0 for none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_tokenizer_is_parsed_once_and_a_third_model_starts_over() {
        let root = tempfile::tempdir().unwrap();
        let silent = llnode_models::progress::Silent;
        let export = llnode_models::synth::write_export(
            &llnode_models::synth::SynthConfig::tiny(),
            &root.path().join("export"),
            &silent,
        )
        .unwrap();
        let model = llnode_models::model::Model::from_export(&export).unwrap();
        let kept = Tokenizers::default();
        let first = kept.of("a", &model).unwrap();
        assert!(Arc::ptr_eq(&first, &kept.of("a", &model).unwrap()));
        assert_eq!(
            first.encode("hello").unwrap(),
            TextTokenizer::load(&model.dir, model.info.vocab_size).unwrap().encode("hello").unwrap()
        );
        let second = kept.of("b", &model).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(Arc::ptr_eq(&second, &kept.of("b", &model).unwrap()));
        // A third model clears the two kept: "a" is parsed again.
        kept.of("c", &model).unwrap();
        assert!(!Arc::ptr_eq(&first, &kept.of("a", &model).unwrap()));

        std::fs::remove_file(export.join("tokenizer.json")).unwrap();
        let err = kept.of("d", &model).err().unwrap();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}

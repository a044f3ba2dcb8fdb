//! The generation loop: prefill the prompt, then decode one token at a time
//! through any [`Forward`] (one process or a mesh), stopping on an
//! end-of-sequence token, a stop string, the token budget or the context
//! length, and streaming text as it becomes final.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::pipeline::Forward;
use crate::runner::RunError;
use crate::sampling::{Sampler, SamplingConfig};
use crate::tokenizer::{TextStream, TextTokenizer, TokenizerError};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation ends before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Token ids that end generation (the model's EOS); empty to never stop on a token.
    pub eos: Vec<u32>,
    /// The model's context length, when known.
    pub context: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Eos,
    Stop,
    MaxTokens,
    Context,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub prefill: Duration,
    pub decode: Duration,
}

impl Generation {
    /// Decode speed, tokens after the first per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        if n == 0 { 0.0 } else { n as f64 / self.decode.as_secs_f64() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("the prompt has {prompt} tokens but the model's context is {context}; shorten the prompt")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("invalid sampling options: {0}")]
    Sampling(String),
}

/// Generates a continuation of `prompt` (token ids), calling `on_text` with
/// each piece of final text.
pub fn generate(
    model: &mut dyn Forward,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation, GenerateError> {
    options.sampling.validate().map_err(GenerateError::Sampling)?;
    if prompt.is_empty() {
        return Err(TokenizerError::EmptyPrompt.into());
    }
    if let Some(context) = options.context
        && prompt.len() >= context
    {
        return Err(GenerateError::PromptTooLong { prompt: prompt.len(), context });
    }
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut history = prompt.to_vec();
    let mut stream = TextStream::new(prompt);
    let mut tokens = Vec::new();
    let hold_back = options.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);

    let start = Instant::now();
    let mut logits = model.forward(prompt)?;
    let prefill = start.elapsed();
    let decode_start = Instant::now();
    let finish = loop {
        if tokens.len() == options.max_tokens {
            break Finish::MaxTokens;
        }
        let token = sampler.sample(&mut logits, &history);
        if options.eos.contains(&token) {
            break Finish::Eos;
        }
        tokens.push(token);
        history.push(token);
        if stream.push(tokenizer, token)? {
            let text = stream.text();
            let from = stream.released().saturating_sub(hold_back);
            if let Some(at) = options.stop.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i)).min()
            {
                on_text(&stream.release(at));
                break Finish::Stop;
            }
            let end = text.len().saturating_sub(hold_back);
            on_text(&stream.release(end));
        }
        if tokens.len() == options.max_tokens {
            break Finish::MaxTokens;
        }
        if options.context.is_some_and(|c| model.position() + 1 >= c) {
            break Finish::Context;
        }
        logits = model.forward(&[token])?;
    };
    let decode = decode_start.elapsed();
    if finish != Finish::Stop {
        stream.finish(tokenizer)?;
        let end = stream.text().len();
        on_text(&stream.release(end));
    }
    let text = stream.text()[..stream.released()].to_string();
    Ok(Generation { tokens, text, finish, prompt_tokens: prompt.len(), prefill, decode })
}

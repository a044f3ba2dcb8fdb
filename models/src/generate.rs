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
    let mut generator = Generator::new(tokenizer, prompt, options)?;
    let mut logits = model.forward(prompt)?;
    loop {
        match generator.next(logits, model.position(), on_text)? {
            Next::Forward(token) => logits = model.forward(&[token])?,
            Next::Done(generation) => return Ok(generation),
        }
    }
}

/// The generation loop without the model: a driver runs the prompt as the
/// first step, hands each step's logits to [`Generator::next`] and runs the
/// token it answers, until it answers [`Next::Done`]. [`generate`] drives it
/// through a [`Forward`]; a driver that awaits its steps (a mesh's) can too.
pub struct Generator<'a> {
    tokenizer: &'a TextTokenizer,
    options: &'a GenerateOptions,
    sampler: Sampler,
    /// The prompt, then the tokens generated.
    history: Vec<u32>,
    stream: TextStream,
    /// Text held back from `on_text` in case it begins a stop string.
    hold_back: usize,
    prompt_tokens: usize,
    started: Instant,
    /// The first step's time, once its logits came, and when decoding began.
    prefill: Option<(Duration, Instant)>,
}

/// What to do after a step.
pub enum Next {
    /// Run this token next.
    Forward(u32),
    /// Generation ended.
    Done(Generation),
}

impl<'a> Generator<'a> {
    /// Checks the prompt and the options; the clock for the first token starts here.
    pub fn new(
        tokenizer: &'a TextTokenizer,
        prompt: &[u32],
        options: &'a GenerateOptions,
    ) -> Result<Generator<'a>, GenerateError> {
        options.sampling.validate().map_err(GenerateError::Sampling)?;
        if prompt.is_empty() {
            return Err(TokenizerError::EmptyPrompt.into());
        }
        if let Some(context) = options.context
            && prompt.len() >= context
        {
            return Err(GenerateError::PromptTooLong { prompt: prompt.len(), context });
        }
        Ok(Generator {
            tokenizer,
            options,
            sampler: Sampler::new(options.sampling.clone()),
            history: prompt.to_vec(),
            stream: TextStream::new(prompt),
            hold_back: options.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0),
            prompt_tokens: prompt.len(),
            started: Instant::now(),
            prefill: None,
        })
    }

    /// A step's `logits`, the model having seen `position` tokens in all:
    /// samples the next token and streams the text it completes; the token
    /// to run next, or the generation when it has ended (an end-of-sequence
    /// token, a stop string, the token budget or the context).
    pub fn next(
        &mut self,
        mut logits: Vec<f32>,
        position: usize,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Next, GenerateError> {
        let started = self.started;
        let clock = *self.prefill.get_or_insert_with(|| (started.elapsed(), Instant::now()));
        let options = self.options;
        if self.generated() == options.max_tokens {
            return self.done(Finish::MaxTokens, clock, on_text);
        }
        let token = self.sampler.sample(&mut logits, &self.history);
        if options.eos.contains(&token) {
            return self.done(Finish::Eos, clock, on_text);
        }
        self.history.push(token);
        if self.stream.push(self.tokenizer, token)? {
            let text = self.stream.text();
            let from = self.stream.released().saturating_sub(self.hold_back);
            if let Some(at) = options.stop.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i)).min()
            {
                on_text(&self.stream.release(at));
                return self.done(Finish::Stop, clock, on_text);
            }
            let end = text.len().saturating_sub(self.hold_back);
            on_text(&self.stream.release(end));
        }
        if self.generated() == options.max_tokens {
            return self.done(Finish::MaxTokens, clock, on_text);
        }
        if options.context.is_some_and(|c| position + 1 >= c) {
            return self.done(Finish::Context, clock, on_text);
        }
        Ok(Next::Forward(token))
    }

    /// How many tokens it has generated so far.
    fn generated(&self) -> usize {
        self.history.len() - self.prompt_tokens
    }

    /// Ends the generation: the text held back goes out, unless a stop
    /// string ended it. `clock`: the first step's time, and when decoding began.
    fn done(
        &mut self,
        finish: Finish,
        (prefill, decode_start): (Duration, Instant),
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Next, GenerateError> {
        let decode = decode_start.elapsed();
        if finish != Finish::Stop {
            self.stream.finish(self.tokenizer)?;
            let end = self.stream.text().len();
            on_text(&self.stream.release(end));
        }
        let text = self.stream.text()[..self.stream.released()].to_string();
        Ok(Next::Done(Generation {
            tokens: self.history.split_off(self.prompt_tokens),
            text,
            finish,
            prompt_tokens: self.prompt_tokens,
            prefill,
            decode,
        }))
    }
}

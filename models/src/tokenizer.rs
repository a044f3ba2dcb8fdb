//! Text in and out: the model's `tokenizer.json` (the `tokenizers` crate),
//! its chat template from `tokenizer_config.json` (rendered with minijinja),
//! and streaming detokenisation that never prints half a character.

use std::path::Path;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load {path}: {reason}")]
    Load { path: String, reason: String },
    #[error(
        "tokenizer.json has {tokenizer} tokens but the model's vocabulary has {model}; use the tokenizer exported with this model"
    )]
    VocabularyMismatch { tokenizer: usize, model: usize },
    #[error("the prompt is empty; give some text to continue")]
    EmptyPrompt,
    #[error("this model has no chat template (tokenizer_config.json has no `chat_template`); drop --chat")]
    NoChatTemplate,
    #[error("{0}")]
    Text(String),
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    config: Value,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` (and `tokenizer_config.json` when present),
    /// checking the vocabulary fits a model of `model_vocab` logits.
    pub fn load(dir: &Path, model_vocab: Option<usize>) -> Result<TextTokenizer, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| TokenizerError::Load { path: path.display().to_string(), reason: e.to_string() })?;
        if let Some(model) = model_vocab {
            let tokenizer = inner.get_vocab_size(true);
            if tokenizer > model {
                return Err(TokenizerError::VocabularyMismatch { tokenizer, model });
            }
        }
        let config = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        Ok(TextTokenizer { inner, config })
    }

    /// Token ids of `text`, with the special tokens the tokenizer's
    /// post-processor adds (a BOS for Llama-style tokenizers).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, true)
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>, TokenizerError> {
        if text.is_empty() {
            return Err(TokenizerError::EmptyPrompt);
        }
        let encoding = self.inner.encode(text, special).map_err(|e| TokenizerError::Text(e.to_string()))?;
        if encoding.get_ids().is_empty() {
            return Err(TokenizerError::EmptyPrompt);
        }
        Ok(encoding.get_ids().to_vec())
    }

    /// The prompt as a one-message chat, through the model's chat template.
    pub fn encode_chat(&self, user: &str) -> Result<Vec<u32>, TokenizerError> {
        if user.is_empty() {
            return Err(TokenizerError::EmptyPrompt);
        }
        let template = self.config["chat_template"].as_str().ok_or(TokenizerError::NoChatTemplate)?;
        let token = |key: &str| match &self.config[key] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
            _ => String::new(),
        };
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let render = env.render_str(
            template,
            minijinja::context! {
                messages => vec![minijinja::context! { role => "user", content => user }],
                add_generation_prompt => true,
                bos_token => token("bos_token"),
                eos_token => token("eos_token"),
            },
        );
        let text = render.map_err(|e| TokenizerError::Text(format!("chat template: {e}")))?;
        self.encode_with(&text, false)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(|e| TokenizerError::Text(e.to_string()))
    }
}

/// Turns generated ids into text as they come. Each new token is decoded
/// together with the few tokens before it (decoders drop a leading space or
/// merge bytes depending on what precedes), and only the new suffix is
/// appended. Text is released only once it is complete: a character split
/// across tokens waits for its last byte.
pub struct TextStream {
    ids: Vec<u32>,
    /// Window start for decoding, and how far text has been appended.
    prefix: usize,
    read: usize,
    text: String,
    released: usize,
}

impl TextStream {
    /// A stream continuing `context` (the prompt's ids).
    pub fn new(context: &[u32]) -> TextStream {
        let ids = context[context.len().saturating_sub(5)..].to_vec();
        TextStream { prefix: 0, read: ids.len(), ids, text: String::new(), released: 0 }
    }

    /// Adds a token; says whether new complete text was appended.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<bool, TokenizerError> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.ids[self.prefix..])?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(false);
        }
        let Some(piece) = now.get(before.len()..) else { return Ok(false) };
        self.text.push_str(piece);
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(true)
    }

    /// Appends whatever the last tokens decode to, complete or not.
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<(), TokenizerError> {
        if self.read < self.ids.len() {
            let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
            let now = tokenizer.decode(&self.ids[self.prefix..])?;
            let start = (0..=before.len().min(now.len())).rev().find(|&i| now.is_char_boundary(i)).unwrap_or(0);
            self.text.push_str(&now[start..]);
            self.read = self.ids.len();
        }
        Ok(())
    }

    /// Releases text up to byte `end` (clamped to a character boundary).
    pub fn release(&mut self, end: usize) -> String {
        let mut end = end.min(self.text.len());
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.released {
            return String::new();
        }
        let out = self.text[self.released..end].to_string();
        self.released = end;
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn released(&self) -> usize {
        self.released
    }
}

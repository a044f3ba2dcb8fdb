//! The built-in model's tokenizer: byte-level BPE (GPT-2's byte alphabet) with
//! merges enumerated deterministically until the vocabulary has exactly the
//! model's size, so every id the model can produce decodes to text.

use serde_json::{Value, json};

pub const EOS: &str = "<|endoftext|>";

/// GPT-2's printable stand-in for each byte.
pub fn byte_alphabet() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from('!')..=u32::from('~')).collect();
    printable.extend(u32::from('¡')..=u32::from('¬'));
    printable.extend(u32::from('®')..=u32::from('ÿ'));
    let mut table = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).expect("valid code point");
    }
    table
}

/// `tokenizer.json` content with exactly `vocab_size` ids: id 0 is the
/// end-of-text token, ids 1..=256 the bytes, the rest merged letter sequences.
pub fn tokenizer_json(vocab_size: usize) -> Value {
    assert!(vocab_size > 257, "vocabulary too small for byte-level BPE");
    let alphabet = byte_alphabet();
    let mut vocab = serde_json::Map::new();
    vocab.insert(EOS.into(), json!(0));
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i + 1));
    }
    let letters: Vec<String> = ('a'..='z').map(String::from).collect();
    let space = alphabet[b' ' as usize].to_string();
    let mut merges = Vec::new();
    // Breadth first: every token of length n extends one of length n-1.
    let mut frontier: Vec<String> = std::iter::once(space).chain(letters.iter().cloned()).collect();
    'grow: loop {
        let mut next = Vec::new();
        for prefix in &frontier {
            for letter in &letters {
                if vocab.len() == vocab_size {
                    break 'grow;
                }
                let token = format!("{prefix}{letter}");
                vocab.insert(token.clone(), json!(vocab.len()));
                merges.push(format!("{prefix} {letter}"));
                next.push(token);
            }
        }
        frontier = next;
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": 0, "content": EOS, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    })
}

/// `tokenizer_config.json`: the end-of-text token and a simple chat template.
pub fn tokenizer_config_json(max_len: usize) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": null,
        "model_max_length": max_len,
        "chat_template": "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    })
}

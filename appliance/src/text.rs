//! Stage: an instruction → the model's token ids and attention mask, as its `[tokenizer]`
//! says: a Hugging Face `tokenizer.json` (loaded with the `tokenizers` crate, the same code the
//! Python library runs), or the demo's UTF-8 bytes. Always padded to the ids input's length;
//! longer is refused or cut, per `truncation`.

use std::path::Path;

use crate::spec::{ModelSpec, Truncation};

/// Why an instruction has no tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("the instruction is {tokens} tokens, more than the model's {max}")]
    TooLong { tokens: usize, max: usize },
    #[error("the tokenizer failed: {0}")]
    Tokenizer(String),
}

/// A model's tokenizer, loaded once with the model.
#[derive(Debug)]
pub enum TextEncoder {
    /// UTF-8 bytes as ids 0-255, zero-padded; no mask.
    Utf8Bytes {
        len: usize,
        truncation: Truncation,
    },
    Tokenizer {
        tokenizer: Box<tokenizers::Tokenizer>,
        len: usize,
        pad_id: u32,
        truncation: Truncation,
        vocab: usize,
    },
}

/// One instruction's tokens, `len` each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
}

impl TextEncoder {
    /// The encoder `spec` declares, its `tokenizer.json` read from `dir`.
    pub fn load(dir: &Path, spec: &ModelSpec) -> Result<TextEncoder, String> {
        let len = spec.instruction_len();
        let t = &spec.tokenizer;
        let Some(file) = &t.file else { return Ok(TextEncoder::Utf8Bytes { len, truncation: t.truncation }) };
        let path = dir.join(file);
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| format!("{}: field `tokenizer.file`: cannot be loaded: {e}", path.display()))?;
        let pad_id = t
            .pad_id
            .or_else(|| ["[PAD]", "<pad>", "<|pad|>"].iter().find_map(|p| tokenizer.token_to_id(p)))
            .unwrap_or(0);
        let vocab = tokenizer.get_vocab_size(true);
        Ok(TextEncoder::Tokenizer { tokenizer: Box::new(tokenizer), len, pad_id, truncation: t.truncation, vocab })
    }

    /// Ids the model's embedding takes: 256 for UTF-8 bytes, the tokenizer's vocabulary.
    pub fn vocab(&self) -> usize {
        match self {
            TextEncoder::Utf8Bytes { .. } => 256,
            TextEncoder::Tokenizer { vocab, .. } => *vocab,
        }
    }

    /// What ids say, for the policies (ids a client sent itself): the UTF-8 bytes up to the
    /// padding (NULs inside kept: the policies see every byte the model sees), or the
    /// tokenizer's decoding without its padding and special tokens.
    pub fn decode(&self, ids: &[i64]) -> String {
        match self {
            TextEncoder::Utf8Bytes { .. } => {
                let len = ids.iter().rposition(|&t| t != 0).map_or(0, |i| i + 1);
                let bytes: Vec<u8> = ids[..len].iter().map(|&t| t as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            TextEncoder::Tokenizer { tokenizer, pad_id, .. } => {
                let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).filter(|i| i != pad_id).collect();
                tokenizer.decode(&ids, true).unwrap_or_default()
            }
        }
    }

    pub fn encode(&self, text: &str) -> Result<Tokens, TextError> {
        let (mut ids, len, pad, truncation) = match self {
            TextEncoder::Utf8Bytes { len, truncation } => {
                (text.bytes().map(i64::from).collect::<Vec<_>>(), *len, 0, *truncation)
            }
            TextEncoder::Tokenizer { tokenizer, len, pad_id, truncation, .. } => {
                let encoding = tokenizer.encode(text, true).map_err(|e| TextError::Tokenizer(e.to_string()))?;
                let ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
                (ids, *len, i64::from(*pad_id), *truncation)
            }
        };
        if ids.len() > len {
            match truncation {
                Truncation::Error => return Err(TextError::TooLong { tokens: ids.len(), max: len }),
                Truncation::Truncate => ids.truncate(len),
            }
        }
        let mut mask = vec![1; ids.len()];
        mask.resize(len, 0);
        ids.resize(len, pad);
        Ok(Tokens { ids, mask })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn utf8_bytes_are_padded_and_cut() {
        let e = TextEncoder::Utf8Bytes { len: 4, truncation: Truncation::Truncate };
        assert_eq!(e.encode("ab").unwrap(), Tokens { ids: vec![97, 98, 0, 0], mask: vec![1, 1, 0, 0] });
        assert_eq!(e.encode("abcdef").unwrap().ids, vec![97, 98, 99, 100]);
        let strict = TextEncoder::Utf8Bytes { len: 4, truncation: Truncation::Error };
        assert_eq!(strict.encode("abcdef").unwrap_err(), TextError::TooLong { tokens: 6, max: 4 });
    }
}

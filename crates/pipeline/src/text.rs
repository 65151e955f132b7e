//! Text conditioning on the host side: the `[text]` config section, the caption templates, the
//! word-level tokenizer (Hugging Face `tokenizers`) trained at `train-ldm` start and saved as
//! `tokenizer.json` in the run folder, and the captions drawn for each training example.
//!
//! The tokenizer NFKC-normalises and lower-cases, splits on whitespace and punctuation
//! (`\w+|[^\w\s]+`), maps each word to its id (`[UNK]` for a word never seen in training),
//! prepends `[BOS]` and pads with `[PAD]` to `max_tokens + 1` ids. `[BOS]` makes the empty
//! prompt one real token, so classifier-free training learns an embedding of "no text", the
//! analogue of the learned null class. The vocabulary is ordered by frequency, then
//! alphabetically: the same captions always give the same `tokenizer.json`.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::{Bool, Device, Shape, Tensor, TensorData};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainer};
use tokenizers::normalizers::{Lowercase, NFKC, Sequence};
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
};

use ldm_common::checkpoint::atomic_write;
use ldm_common::rng::stream;
use ldm_common::upload;
use ldm_diffusion::denoiser::TextConditioning;
use ldm_diffusion::ldm_model::LdmModel;
use ldm_diffusion::text_encoder::TextEncoderConfig;

/// Padding, id 0.
pub const PAD: &str = "[PAD]";
/// A word never seen in training, id 1.
pub const UNK: &str = "[UNK]";
/// The start of every prompt, id 2.
pub const BOS: &str = "[BOS]";

/// The `[text]` section of an LDM config, used when `diffusion.conditioning = "text"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSettings {
    /// Longest prompt in tokens (words and punctuation marks). A longer `--prompt` is an
    /// error; a longer training caption is cut to this length.
    #[serde(default = "d_max_tokens")]
    pub max_tokens: usize,
    /// Width of the text encoder's token embeddings (the backbones' cross-attention context).
    #[serde(default = "d_dim")]
    pub dim: usize,
    /// Transformer blocks of the text encoder.
    #[serde(default = "d_depth")]
    pub depth: usize,
    /// Attention heads of the text encoder; must divide `dim`.
    #[serde(default = "d_heads")]
    pub heads: usize,
}

fn d_max_tokens() -> usize {
    16
}
fn d_dim() -> usize {
    128
}
fn d_depth() -> usize {
    2
}
fn d_heads() -> usize {
    4
}

impl Default for TextSettings {
    fn default() -> Self {
        crate::config::parse_str("").expect("all keys have defaults")
    }
}

/// Prompts longer than this many tokens are refused by the config check.
const MAX_TOKENS_LIMIT: usize = 256;

impl TextSettings {
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_TOKENS_LIMIT).contains(&self.max_tokens) {
            bail!(
                "text.max_tokens = {}: expected 1 to {MAX_TOKENS_LIMIT}",
                self.max_tokens
            );
        }
        if self.dim == 0 {
            bail!("text.dim = 0: expected a positive width");
        }
        if self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
            bail!(
                "text.heads = {}: expected a divisor of text.dim = {}",
                self.heads,
                self.dim
            );
        }
        Ok(())
    }

    /// Ids the text encoder reads per prompt: `[BOS]` and up to `max_tokens` tokens.
    pub fn sequence_len(&self) -> usize {
        self.max_tokens + 1
    }

    /// The text encoder for a tokenizer of `vocab_size` ids.
    pub fn encoder_config(&self, vocab_size: usize) -> TextEncoderConfig {
        TextEncoderConfig {
            vocab_size,
            max_len: self.sequence_len(),
            dim: self.dim,
            depth: self.depth,
            heads: self.heads,
        }
    }
}

/// "a" or "an" before `word` (by its first letter).
fn article(word: &str) -> &'static str {
    match word.chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

/// The caption templates of a class name: "cat", "a cat", "the cat", "a picture of a cat",
/// "a photo of a cat", "a drawing of a cat", "a silhouette of a cat", "a cat silhouette".
pub fn class_captions(class: &str) -> Vec<String> {
    let c = class.trim();
    let a = format!("{} {c}", article(c));
    vec![
        c.to_string(),
        a.clone(),
        format!("the {c}"),
        format!("a picture of {a}"),
        format!("a photo of {a}"),
        format!("a drawing of {a}"),
        format!("a silhouette of {a}"),
        format!("{a} silhouette"),
    ]
}

/// Token ids of one prompt and its padding mask, `max_tokens + 1` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<i64>,
    /// True where the id is padding.
    pub padding: Vec<bool>,
}

/// A word-level tokenizer with a fixed sequence length.
#[derive(Clone)]
pub struct PromptTokenizer {
    inner: Tokenizer,
    /// `max_tokens`: the longest prompt, `[BOS]` not counted.
    max_tokens: usize,
}

fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

impl PromptTokenizer {
    /// Trains the tokenizer on `corpus` (one caption per item).
    pub fn train<S: AsRef<str> + Sync>(corpus: &[S], max_tokens: usize) -> Result<Self> {
        let model = WordLevel::builder()
            .unk_token(UNK.into())
            .build()
            .map_err(tk_err)?;
        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(Sequence::new(vec![NFKC.into(), Lowercase.into()])))
            .map_err(tk_err)?;
        inner.with_pre_tokenizer(Some(Whitespace));
        let mut trainer: TrainerWrapper = WordLevelTrainer::builder()
            .show_progress(false)
            .vocab_size(usize::MAX)
            .special_tokens(
                [PAD, UNK, BOS]
                    .iter()
                    .map(|t| AddedToken::from(*t, true))
                    .collect(),
            )
            .build()
            .map_err(|e| anyhow!("{e}"))?
            .into();
        inner
            .train(&mut trainer, corpus.iter().map(|s| s.as_ref()))
            .map_err(tk_err)?;
        let bos = inner
            .token_to_id(BOS)
            .expect("special tokens are in the vocabulary");
        let post = TemplateProcessing::builder()
            .try_single(format!("{BOS} $A"))
            .map_err(|e| anyhow!("{e}"))?
            .special_tokens(vec![(BOS, bos)])
            .build()
            .map_err(|e| anyhow!("{e}"))?;
        inner.with_post_processor(Some(post));
        Ok(Self::with_length(inner, max_tokens))
    }

    /// Pads every encoding with `[PAD]` to `max_tokens + 1` ids.
    fn with_length(mut inner: Tokenizer, max_tokens: usize) -> Self {
        let pad_id = inner.token_to_id(PAD).unwrap_or(0);
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_tokens + 1),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: PAD.into(),
        }));
        Self { inner, max_tokens }
    }

    /// Loads a `tokenizer.json` written by [`save`](Self::save).
    pub fn load(path: &Path, max_tokens: usize) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: not a readable tokenizer.json: {e}", path.display()))?;
        for token in [PAD, UNK, BOS] {
            if inner.token_to_id(token).is_none() {
                bail!(
                    "{}: the tokenizer has no {token} token; it was not written by `pipeline train-ldm`",
                    path.display()
                );
            }
        }
        Ok(Self::with_length(inner, max_tokens))
    }

    /// The standard `tokenizer.json` text (loadable by `Tokenizer::from_file`).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tk_err)
    }

    /// Writes `tokenizer.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        atomic_write(path, self.to_json()?.as_bytes())?;
        Ok(())
    }

    /// Number of token ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn encoding(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.inner.encode(text, true).map_err(tk_err)
    }

    /// `[BOS]`, the prompt's ids and padding. A prompt of more than `max_tokens` tokens is an
    /// error naming the limit.
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let e = self.encoding(prompt)?;
        let len = self.max_tokens + 1;
        if e.get_ids().len() > len {
            bail!(
                "{prompt:?} has {} tokens, more than this model reads (text.max_tokens = {}); shorten it",
                e.get_ids().len() - 1,
                self.max_tokens
            );
        }
        Ok(tokens(&e))
    }

    /// Like [`encode`](Self::encode), but a caption longer than `max_tokens` is cut to it
    /// (training captions).
    pub fn encode_truncated(&self, caption: &str) -> Result<Tokens> {
        let mut e = self.encoding(caption)?;
        e.truncate(self.max_tokens + 1, 0, TruncationDirection::Right);
        Ok(tokens(&e))
    }

    /// The words of `prompt` the tokenizer never saw in training, as written, each once.
    pub fn unknown_words(&self, prompt: &str) -> Result<Vec<String>> {
        let e = self.encoding(prompt)?;
        let unk = self.inner.token_to_id(UNK);
        let mut words: Vec<String> = vec![];
        for (id, &(start, end)) in e.get_ids().iter().zip(e.get_offsets()) {
            if Some(*id) == unk {
                let word = prompt.get(start..end).unwrap_or_default().to_string();
                if !words.contains(&word) {
                    words.push(word);
                }
            }
        }
        Ok(words)
    }
}

/// Ids and padding mask of a padded encoding.
fn tokens(e: &tokenizers::Encoding) -> Tokens {
    Tokens {
        ids: e.get_ids().iter().map(|&i| i64::from(i)).collect(),
        padding: e.get_attention_mask().iter().map(|&m| m == 0).collect(),
    }
}

/// The one-line warning for words of a prompt never seen in training, or `None`.
pub fn unknown_words_warning(flag: &str, words: &[String]) -> Option<String> {
    if words.is_empty() {
        return None;
    }
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    Some(format!(
        "warning: {flag}: words not seen in training: {} (they are read as {UNK}, which the model never learned)",
        quoted.join(", ")
    ))
}

/// tau_theta of a batch of prompts: the model's text encoder on their token ids.
///
/// # Shapes
/// - result: tokens `[prompts, max_tokens + 1, dim]`, pooled `[prompts, dim]`
pub fn encode_batch(model: &LdmModel, batch: &[&Tokens], device: &Device) -> TextConditioning {
    let len = batch.first().map_or(0, |t| t.ids.len());
    let ids: Vec<i64> = batch.iter().flat_map(|t| t.ids.iter().copied()).collect();
    let pad: Vec<bool> = batch
        .iter()
        .flat_map(|t| t.padding.iter().copied())
        .collect();
    let shape = Shape::new([batch.len(), len]);
    let ids = upload::int(ids, [batch.len(), len], device);
    let pad = Tensor::<2, Bool>::from_data(TensorData::new(pad, shape), device);
    model
        .encode_text(ids, pad)
        .expect("a text-conditioned model has a text encoder")
}

/// tau_theta of `prompts`, each refused when longer than `max_tokens`.
pub fn encode_prompts(
    model: &LdmModel,
    tokenizer: &PromptTokenizer,
    prompts: &[&str],
    device: &Device,
) -> Result<TextConditioning> {
    let tokens = prompts
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<Result<Vec<_>>>()?;
    Ok(encode_batch(
        model,
        &tokens.iter().collect::<Vec<_>>(),
        device,
    ))
}

/// The two inputs of classifier-free guidance for `prompts`: their encodings, and as many of
/// the `negative` prompt (the empty prompt when `None`) for the unconditional branch.
pub fn guidance_pair(
    model: &LdmModel,
    tokenizer: &PromptTokenizer,
    prompts: &[&str],
    negative: Option<&str>,
    device: &Device,
) -> Result<(TextConditioning, TextConditioning)> {
    let uncond = vec![negative.unwrap_or(""); prompts.len()];
    Ok((
        encode_prompts(model, tokenizer, prompts, device)?,
        encode_prompts(model, tokenizer, &uncond, device)?,
    ))
}

/// The captions of training: per class its templates, per image its own caption (from
/// `captions.jsonl`), and the empty prompt, all tokenized once.
pub struct Captions {
    templates: Vec<Vec<Tokens>>,
    own: Vec<Option<Tokens>>,
    empty: Tokens,
}

/// The training corpus of the tokenizer: every template of every class, then every caption.
pub fn corpus(class_names: &[String], captions: &[Option<String>]) -> Vec<String> {
    class_names
        .iter()
        .flat_map(|c| class_captions(c))
        .chain(captions.iter().flatten().cloned())
        .collect()
}

impl Captions {
    /// Tokenizes the templates of `class_names` and each image's own caption.
    pub fn new(
        tokenizer: &PromptTokenizer,
        class_names: &[String],
        captions: &[Option<String>],
    ) -> Result<Self> {
        let templates = class_names
            .iter()
            .map(|c| {
                class_captions(c)
                    .iter()
                    .map(|t| tokenizer.encode_truncated(t))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let own = captions
            .iter()
            .map(|c| {
                c.as_deref()
                    .map(|c| tokenizer.encode_truncated(c))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()
            .context("tokenizing the captions of captions.jsonl")?;
        Ok(Self {
            templates,
            own,
            empty: tokenizer.encode("")?,
        })
    }

    /// The captions of one training batch, drawn from stream(seed, "ldm-caption", step): with
    /// probability `p_uncond` the empty prompt (classifier-free training), otherwise the
    /// image's own caption with probability 1/2 when it has one, else a uniformly drawn
    /// template of its class.
    pub fn draw(
        &self,
        indices: &[usize],
        labels: &[usize],
        p_uncond: f64,
        seed: u64,
        step: u64,
    ) -> Vec<&Tokens> {
        let mut rng = stream(seed, "ldm-caption", step);
        indices
            .iter()
            .map(|&i| {
                if rng.random::<f64>() < p_uncond {
                    return &self.empty;
                }
                if let Some(own) = &self.own[i]
                    && rng.random::<bool>()
                {
                    return own;
                }
                let templates = &self.templates[labels[i]];
                &templates[rng.random_range(0..templates.len())]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        ["cat", "elephant", "ankle boot"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn trained() -> PromptTokenizer {
        let captions = vec![None, Some("A sleeping cat, on a mat".to_string())];
        PromptTokenizer::train(&corpus(&classes(), &captions), 6).unwrap()
    }

    #[test]
    fn templates_use_the_right_article() {
        let t = class_captions("elephant");
        assert!(t.contains(&"an elephant".to_string()), "{t:?}");
        assert!(t.contains(&"a silhouette of an elephant".to_string()));
        assert!(class_captions("cat").contains(&"a picture of a cat".to_string()));
        assert_eq!(class_captions("cat")[0], "cat");
    }

    #[test]
    fn training_is_deterministic_and_orders_by_frequency() {
        let (a, b) = (trained(), trained());
        let json = a.to_json().unwrap();
        assert_eq!(json, b.to_json().unwrap());
        // special tokens first, then the most frequent word ("a", in every template)
        assert_eq!(a.inner.token_to_id(PAD), Some(0));
        assert_eq!(a.inner.token_to_id(UNK), Some(1));
        assert_eq!(a.inner.token_to_id(BOS), Some(2));
        assert_eq!(a.inner.token_to_id("a"), Some(3));
        // lower-cased words and punctuation of the captions are in the vocabulary
        for word in ["sleeping", "mat", ",", "ankle", "boot"] {
            assert!(a.inner.token_to_id(word).is_some(), "{word}");
        }
        assert_eq!(a.inner.token_to_id("A"), None);
    }

    #[test]
    fn prompts_are_normalised_padded_and_bounded() {
        let t = trained();
        let a = t.encode("  A   CAT ").unwrap();
        let b = t.encode("a cat").unwrap();
        assert_eq!(a, b, "case and whitespace do not matter");
        let (bos, word_a, cat) = (2, 3, t.inner.token_to_id("cat").unwrap() as i64);
        assert_eq!(a.ids, vec![bos, word_a, cat, 0, 0, 0, 0]);
        assert_eq!(a.padding, vec![false, false, false, true, true, true, true]);
        let empty = t.encode("").unwrap();
        assert_eq!(empty.ids, vec![bos, 0, 0, 0, 0, 0, 0]);
        assert_eq!(empty.padding.iter().filter(|p| !**p).count(), 1);
        // six tokens fit, seven do not
        assert!(t.encode("a picture of a cat ,").is_ok());
        let err = t
            .encode("a picture of a sleeping cat ,")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has 7 tokens") && err.contains("text.max_tokens = 6"),
            "{err}"
        );
        let cut = t.encode_truncated("a picture of a sleeping cat ,").unwrap();
        assert_eq!(cut.ids.len(), 7);
        assert!(cut.padding.iter().all(|p| !p));
    }

    #[test]
    fn unknown_words_are_named_as_written() {
        let t = trained();
        assert!(t.unknown_words("A Cat").unwrap().is_empty());
        let words = t.unknown_words("a Zebra and a zebra, Dog").unwrap();
        assert_eq!(words, vec!["Zebra", "and", "zebra", "Dog"]);
        let line = unknown_words_warning("--prompt", &words[..1]).unwrap();
        assert!(
            line.starts_with("warning: --prompt: words not seen in training: \"Zebra\""),
            "{line}"
        );
        assert!(unknown_words_warning("--prompt", &[]).is_none());
        // unknown words still take a position, as [UNK]
        let e = t.encode("a zebra").unwrap();
        assert_eq!(e.ids[..3], [2, 3, 1]);
    }

    #[test]
    fn tokenizer_json_round_trips() {
        let t = trained();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        t.save(&path).unwrap();
        // a standard file: the tokenizers crate reads it on its own
        let plain = Tokenizer::from_file(&path).unwrap();
        let e = plain.encode("a photo of an elephant", true).unwrap();
        let ours = t.encode("a photo of an elephant").unwrap();
        let ids: Vec<i64> = e.get_ids().iter().map(|&i| i64::from(i)).collect();
        assert_eq!(ids, ours.ids);
        let back = PromptTokenizer::load(&path, 6).unwrap();
        assert_eq!(back.to_json().unwrap(), t.to_json().unwrap());
        assert_eq!(back.vocab_size(), t.vocab_size());

        std::fs::write(&path, "{").unwrap();
        let err = PromptTokenizer::load(&path, 6).err().unwrap().to_string();
        assert!(err.contains("not a readable tokenizer.json"), "{err}");
    }

    #[test]
    fn captions_are_drawn_from_the_seed() {
        let t = trained();
        let captions = vec![None, Some("a sleeping cat".to_string())];
        let c = Captions::new(&t, &classes(), &captions).unwrap();
        let labels = [0, 0];
        let draw = |seed, step, p| {
            c.draw(&[0, 1, 0, 1, 1, 0, 1, 1], &labels, p, seed, step)
                .into_iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3, 5, 0.1), draw(3, 5, 0.1));
        assert_ne!(draw(3, 5, 0.1), draw(3, 6, 0.1));
        let empty = t.encode("").unwrap();
        assert!(draw(3, 5, 0.999_999).iter().all(|x| *x == empty));
        // without dropout: image 0 gets templates of "cat", image 1 also its own caption
        let own = t.encode("a sleeping cat").unwrap();
        let cat = t.encode("cat").unwrap();
        let many: Vec<Tokens> = (0..40).flat_map(|s| draw(1, s, 0.0)).collect();
        assert!(many.iter().all(|x| *x != empty));
        assert!(many.contains(&own) && many.contains(&cat));
    }

    #[test]
    fn settings_are_validated() {
        let s = TextSettings::default();
        assert_eq!((s.max_tokens, s.dim, s.depth, s.heads), (16, 128, 2, 4));
        s.validate().unwrap();
        let err = TextSettings {
            heads: 3,
            ..s.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert_eq!(err, "text.heads = 3: expected a divisor of text.dim = 128");
        let err = TextSettings {
            max_tokens: 0,
            ..s.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("text.max_tokens = 0"), "{err}");
        assert_eq!(s.encoder_config(40).max_len, 17);
        let err = crate::config::parse_str::<TextSettings>("width = 3").unwrap_err();
        assert!(err.contains("unknown field `width`"), "{err}");
    }
}

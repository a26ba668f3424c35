//! Importing OpenCLIP models as they are downloaded: a hub folder
//! (`huggingface-cli download UCSC-VLAA/ViT-H-14-CLIPA-336-datacomp1B`
//! leaves `open_clip_config.json`, `open_clip_model.safetensors` or only
//! `open_clip_pytorch_model.bin`, and the tokenizer files), or a weights file
//! and a config. OpenCLIP's own loader (`factory.py`, `local-dir:`) reads the
//! same pieces: `model_cfg` builds the model, `preprocess_cfg` its
//! evaluation transform, and `hf_tokenizer_name` with `tokenizer_kwargs`
//! its `HFTokenizer`, which here reads the folder's vocabulary.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{import_state, parse_config};
use crate::data::tokenizer::Tokenizer;
use crate::io::read_weights;
use crate::model::{ClipConfig, TokenizerConfig};
use crate::state::StateDict;
use crate::{Error, Result};

/// The config file of a hub folder.
pub const HUB_CONFIG: &str = "open_clip_config.json";
/// The weight files of a hub folder, in the order they are preferred:
/// safetensors needs no unpickling.
pub const HUB_WEIGHTS: [&str; 2] = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"];
/// The vocabulary files a WordPiece tokenizer is read from, preferred first.
pub const VOCAB_FILES: [&str; 2] = ["vocab.txt", "tokenizer.json"];

/// An OpenCLIP model read into clipa's layout, ready for
/// [`crate::checkpoint::save`].
#[derive(Debug)]
pub struct Imported {
    /// The model's config, preprocessing included.
    pub config: ClipConfig,
    /// Its parameters under clipa's paths.
    pub state: StateDict,
    /// Its tokenizer, checked against the token embedding.
    pub tokenizer: Tokenizer,
    /// The file the weights came from.
    pub weights: PathBuf,
    /// Tensors in that file.
    pub source_tensors: usize,
}

fn missing(dir: &Path, reason: String) -> Error {
    Error::Format {
        path: dir.to_path_buf(),
        reason,
    }
}

/// Imports a downloaded hub folder. `vocab` replaces the folder's own
/// vocabulary file. A missing or contradictory piece is an error that names
/// it.
pub fn import_dir(dir: &Path, vocab: Option<&Path>) -> Result<Imported> {
    if !dir.is_dir() {
        return Err(Error::Config(format!("{} is not a folder", dir.display())));
    }
    let config = dir.join(HUB_CONFIG);
    if !config.is_file() {
        return Err(missing(
            dir,
            format!("no {HUB_CONFIG}: not an OpenCLIP hub folder"),
        ));
    }
    let weights = HUB_WEIGHTS
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            missing(
                dir,
                format!("no weights: neither {} is here", HUB_WEIGHTS.join(" nor ")),
            )
        })?;
    import(&weights, &config, vocab, Some(dir))
}

/// Whether `dir` is an OpenCLIP hub folder (it has [`HUB_CONFIG`]).
pub fn is_hub_dir(dir: &Path) -> bool {
    dir.join(HUB_CONFIG).is_file()
}

/// The model config of the hub folder `dir`, without reading its weights.
pub fn read_config(dir: &Path) -> Result<ClipConfig> {
    let path = dir.join(HUB_CONFIG);
    let json = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    parse_config(&json)
        .map(|parsed| parsed.clip)
        .map_err(|e| Error::Format {
            path,
            reason: e.to_string(),
        })
}

/// Imports a weights file (safetensors or PyTorch) with its OpenCLIP config;
/// `vocab` is the vocabulary of a model with an `hf_tokenizer_name`.
pub fn import_files(weights: &Path, config: &Path, vocab: Option<&Path>) -> Result<Imported> {
    import(weights, config, vocab, None)
}

fn import(
    weights: &Path,
    config: &Path,
    vocab: Option<&Path>,
    dir: Option<&Path>,
) -> Result<Imported> {
    let json = std::fs::read_to_string(config).map_err(|e| Error::io(config, e))?;
    let parsed = parse_config(&json).map_err(|e| Error::Format {
        path: config.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut clip = parsed.clip;
    let mut vocab = vocab.map(Path::to_path_buf);
    if let (TokenizerConfig::WordPiece { .. }, Some(dir)) = (clip.text.tokenizer, dir) {
        clip.text.tokenizer = folder_tokenizer_options(dir, clip.text.tokenizer)?;
        if vocab.is_none() {
            vocab = VOCAB_FILES
                .iter()
                .map(|f| dir.join(f))
                .find(|p| p.is_file());
        }
    }
    let tokenizer = match (&clip.text.tokenizer, vocab.as_deref()) {
        (TokenizerConfig::WordPiece { .. }, None) => {
            let name = parsed
                .hf_tokenizer
                .as_deref()
                .unwrap_or("a WordPiece model");
            let place = dir.map_or("pass --vocab FILE".to_string(), |d| {
                format!(
                    "{} has neither {}: download them with the weights, or pass --vocab FILE",
                    d.display(),
                    VOCAB_FILES.join(" nor ")
                )
            });
            return Err(Error::Config(format!(
                "the model's tokenizer is {name}, whose vocabulary is needed: {place}"
            )));
        }
        (_, vocab) => Tokenizer::for_text(&clip.text, vocab)?,
    };
    let file = read_weights(weights)?;
    let state =
        import_state(&file.tensors, &clip, parsed.custom_text).map_err(|e| Error::Format {
            path: weights.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(Imported {
        config: clip,
        state,
        tokenizer,
        weights: weights.to_path_buf(),
        source_tensors: file.tensors.len(),
    })
}

/// Lower-casing and accent stripping as HuggingFace sets them up for the
/// folder: `tokenizer_config.json` (`do_lower_case`, `strip_accents`) wins,
/// as `BertTokenizerFast` rebuilds its normaliser from it; else the
/// `tokenizer.json` normaliser; else the config's default.
fn folder_tokenizer_options(dir: &Path, config: TokenizerConfig) -> Result<TokenizerConfig> {
    let TokenizerConfig::WordPiece {
        mut lowercase,
        mut strip_accents,
        strip_sep_token,
    } = config
    else {
        return Ok(config);
    };
    let read = |name: &str| -> Result<Option<Value>> {
        let path = dir.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Format {
                path,
                reason: format!("not JSON: {e}"),
            })
    };
    // `strip_accents: null` follows lower-casing, in both files.
    let set = |obj: &Value, lower_key: &str, lowercase: &mut bool, strip: &mut bool| {
        if let Some(l) = obj.get(lower_key).and_then(Value::as_bool) {
            *lowercase = l;
            *strip = l;
        }
        if let Some(s) = obj.get("strip_accents").and_then(Value::as_bool) {
            *strip = s;
        }
    };
    if let Some(cfg) = read("tokenizer_config.json")? {
        set(&cfg, "do_lower_case", &mut lowercase, &mut strip_accents);
    } else if let Some(tok) = read("tokenizer.json")? {
        set(
            &tok["normalizer"],
            "lowercase",
            &mut lowercase,
            &mut strip_accents,
        );
    }
    Ok(TokenizerConfig::WordPiece {
        lowercase,
        strip_accents,
        strip_sep_token,
    })
}

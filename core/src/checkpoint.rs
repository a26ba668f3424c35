//! clipa checkpoint folders: `config.json` (the resolved [`ClipConfig`],
//! tokenizer included), `model.safetensors` (parameters under clipa's
//! paths) and, for a WordPiece model, `vocab.txt`. Each file is written
//! atomically (temporary file, then rename), so none is ever half-written;
//! loading checks that they describe the same model, and that every id the
//! tokenizer can emit has a row in the token embedding.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;

use crate::data::tokenizer::Tokenizer;
use crate::io::{read_safetensors, write_atomic, write_safetensors};
use crate::model::{ClipConfig, ClipModel, EvalResize, TokenizerConfig};
use crate::state::{StateDict, load_state_dict, state_dict};
use crate::{Error, Result};

/// File name of the config inside a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights inside a checkpoint folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of a WordPiece model's vocabulary inside a checkpoint folder.
pub const VOCAB_FILE: &str = "vocab.txt";

/// What a checkpoint folder holds.
#[derive(Debug)]
pub struct Checkpoint {
    /// The model's config.
    pub config: ClipConfig,
    /// Its parameters under clipa's paths.
    pub state: StateDict,
    /// Its tokenizer, checked against the token embedding.
    pub tokenizer: Tokenizer,
}

/// Writes `config`, `state` and the tokenizer's vocabulary into the folder
/// `dir` (created if needed).
pub fn save(
    dir: &Path,
    config: &ClipConfig,
    state: &StateDict,
    tokenizer: &Tokenizer,
) -> Result<()> {
    config.validate()?;
    if tokenizer.config() != config.text.tokenizer {
        return Err(Error::Config(format!(
            "the {} does not match the model's tokenizer {:?}",
            tokenizer.describe(),
            config.text.tokenizer
        )));
    }
    tokenizer.check_fits(config.text.vocab_size)?;
    if let Tokenizer::WordPiece(wp) = tokenizer {
        write_atomic(&dir.join(VOCAB_FILE), wp.vocab_txt().as_bytes())?;
    }
    let json = serde_json::to_string_pretty(config).expect("configs serialise");
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
    let meta = HashMap::from([("format".to_string(), "clipa".to_string())]);
    write_safetensors(&dir.join(WEIGHTS_FILE), state, meta)
}

/// Saves a model's config, parameters and tokenizer into `dir`.
pub fn save_model<B: Backend>(
    dir: &Path,
    model: &ClipModel<B>,
    tokenizer: &Tokenizer,
) -> Result<()> {
    save(dir, &model.config, &state_dict(model), tokenizer)
}

/// The tokenizer of the checkpoint folder `dir` whose config is `config`:
/// CLIP BPE, or WordPiece over the folder's `vocab.txt`.
pub fn load_tokenizer(dir: &Path, config: &ClipConfig) -> Result<Tokenizer> {
    let vocab = match config.text.tokenizer {
        TokenizerConfig::ClipBpe => None,
        TokenizerConfig::WordPiece { .. } => {
            let path = dir.join(VOCAB_FILE);
            if !path.is_file() {
                return Err(Error::Format {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "the model tokenizes with WordPiece, but {VOCAB_FILE} is missing"
                    ),
                });
            }
            Some(path)
        }
    };
    Tokenizer::for_text(&config.text, vocab.as_deref())
}

/// Reads the config of the checkpoint folder `dir` (no weights).
pub fn load_config(dir: &Path) -> Result<ClipConfig> {
    if !dir.is_dir() {
        return Err(Error::Config(format!(
            "checkpoint folder {} does not exist",
            dir.display()
        )));
    }
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let config = parse_config(&text).map_err(|e| Error::Format {
        path: cfg_path.clone(),
        reason: format!("not a clipa model config: {e}"),
    })?;
    config.validate()?;
    Ok(config)
}

/// Reads the config, parameters and tokenizer of the checkpoint folder `dir`.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let config = load_config(dir)?;
    // The cheap check first: a tokenizer that does not fit the model fails
    // before the weights are read.
    let tokenizer = load_tokenizer(dir, &config)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let weights = read_safetensors(&weights_path)?;
    check_against_config(&config, &weights.tensors).map_err(|reason| Error::Format {
        path: weights_path,
        reason,
    })?;
    Ok(Checkpoint {
        config,
        state: weights.tensors,
        tokenizer,
    })
}

/// A `config.json`, with the fields added since the first checkpoints
/// filled in as those checkpoints behaved: `eval_resize` (centre crop) and
/// `text.tokenizer` (CLIP BPE, the only tokenizer then).
fn parse_config(text: &str) -> serde_json::Result<ClipConfig> {
    let mut value: serde_json::Value = serde_json::from_str(text)?;
    if let Some(map) = value.as_object_mut() {
        map.entry("eval_resize")
            .or_insert_with(|| serde_json::json!(EvalResize::CenterCrop));
        if let Some(text) = map.get_mut("text").and_then(|t| t.as_object_mut()) {
            text.entry("tokenizer")
                .or_insert_with(|| serde_json::json!(TokenizerConfig::ClipBpe));
        }
    }
    serde_json::from_value(value)
}

/// Every parameter the config implies is present with its shape, and
/// nothing else is.
fn check_against_config(config: &ClipConfig, state: &StateDict) -> std::result::Result<(), String> {
    let want = crate::openclip::clipa_shapes(config);
    let mut problems = Vec::new();
    for (name, shape) in &want {
        match state.get(name) {
            None => problems.push(format!("missing tensor {name}")),
            Some(t) if t.shape.as_slice() != shape.as_slice() => problems.push(format!(
                "tensor {name} has shape {:?}, config.json expects {shape:?}",
                t.shape.as_slice()
            )),
            Some(_) => {}
        }
    }
    let extra: Vec<&str> = state
        .keys()
        .filter(|k| !want.contains_key(*k))
        .map(String::as_str)
        .collect();
    if !extra.is_empty() {
        problems.push(format!("unexpected tensor(s) {}", extra.join(", ")));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The model config of `dir`: a clipa checkpoint folder, or a downloaded
/// OpenCLIP hub folder (read as `import-openclip --dir` reads it).
pub fn load_config_or_hub(dir: &Path) -> Result<ClipConfig> {
    match !dir.join(CONFIG_FILE).is_file() && crate::openclip::is_hub_dir(dir) {
        true => crate::openclip::read_config(dir),
        false => load_config(dir),
    }
}

/// The model of `dir` on `device` with its tokenizer, its preprocessing in
/// its config: a clipa checkpoint folder, or an OpenCLIP hub folder
/// imported on the fly (`clipa train --init-from`).
pub fn load_model_or_hub<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(ClipModel<B>, Tokenizer)> {
    if dir.join(CONFIG_FILE).is_file() || !crate::openclip::is_hub_dir(dir) {
        return load_model(dir, device);
    }
    let imported = crate::openclip::import_dir(dir, None)?;
    let model = load_state_dict(imported.config.init(device), &imported.state)?;
    Ok((model, imported.tokenizer))
}

/// Builds the model of checkpoint `dir` on `device`, with its tokenizer.
pub fn load_model<B: Backend>(dir: &Path, device: &B::Device) -> Result<(ClipModel<B>, Tokenizer)> {
    let Checkpoint {
        config,
        state,
        tokenizer,
    } = load(dir)?;
    Ok((load_state_dict(config.init(device), &state)?, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::TestBackend;

    #[test]
    fn save_then_load_gives_the_same_model() {
        let dir_tmp = tempfile::tempdir().unwrap();

        let dir = dir_tmp.path().join("run");
        let device = Default::default();
        let model = ClipConfig::tiny().init::<TestBackend>(&device);
        save_model(&dir, &model, &Tokenizer::clip()).unwrap();
        let (back, tokenizer) = load_model::<TestBackend>(&dir, &device).unwrap();
        assert!(matches!(tokenizer, Tokenizer::Clip(_)));
        assert_eq!(back.config, model.config);
        assert_eq!(state_dict(&back), state_dict(&model));
        std::fs::remove_dir_all(&dir).ok();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        // Weights that do not fit the config are named, not a panic later.
        let mut state = state_dict(&model);
        state.remove("text.ln_final.beta");
        state.insert(
            "visual.proj".into(),
            burn::tensor::TensorData::new(vec![0f32; 64], [64, 1]),
        );
        save(&dir, &model.config, &state, &Tokenizer::clip()).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("missing tensor text.ln_final.beta"), "{err}");
        assert!(
            err.contains("tensor visual.proj has shape [64, 1]"),
            "{err}"
        );
    }

    #[test]
    fn a_wordpiece_model_keeps_its_vocabulary_and_it_must_fit() {
        let dir_tmp = tempfile::tempdir().unwrap();

        let dir = dir_tmp.path().join("run");
        let device = Default::default();
        let mut cfg = ClipConfig::tiny();
        cfg.text.tokenizer = TokenizerConfig::BERT_UNCASED;
        cfg.text.vocab_size = 6;
        let model = cfg.init::<TestBackend>(&device);
        let vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "cat"].map(String::from);
        let wp = crate::data::tokenizer::WordPieceTokenizer::from_tokens(vocab.to_vec()).unwrap();
        let tokenizer = Tokenizer::WordPiece(wp);
        save_model(&dir, &model, &tokenizer).unwrap();
        let back = load(&dir).unwrap();
        assert_eq!(back.tokenizer.tokenize("A cat", 4), [2, 4, 5, 0]);
        // A CLIP tokenizer cannot be saved as this model's.
        let err = save_model(&dir, &model, &Tokenizer::clip()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        // A vocabulary longer than the table is refused on load, by name.
        let long: String = (0..7).map(|i| format!("t{i}\n")).collect();
        std::fs::write(dir.join(VOCAB_FILE), format!("[CLS]\n[SEP]\n[UNK]\n{long}")).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("ids up to 9") && err.contains("has 6 rows"),
            "{err}"
        );
        std::fs::remove_file(dir.join(VOCAB_FILE)).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("vocab.txt is missing"), "{err}");
    }

    #[test]
    fn configs_from_before_the_tokenizer_field_load_as_clip_bpe() {
        let cfg = ClipConfig::tiny();
        let mut old = serde_json::to_value(&cfg).unwrap();
        old["text"].as_object_mut().unwrap().remove("tokenizer");
        assert!(old["text"].get("tokenizer").is_none());
        let back = parse_config(&old.to_string()).unwrap();
        assert_eq!(back.text.tokenizer, TokenizerConfig::ClipBpe);
        assert_eq!(back, cfg);
    }

    #[test]
    fn configs_from_before_eval_resize_load_as_centre_crop() {
        let mut cfg = ClipConfig::tiny();
        cfg.eval_resize = EvalResize::Squash;
        let mut old = serde_json::to_value(&cfg).unwrap();
        old.as_object_mut().unwrap().remove("eval_resize");
        let back = parse_config(&old.to_string()).unwrap();
        assert_eq!(back.eval_resize, EvalResize::CenterCrop);
        cfg.eval_resize = EvalResize::CenterCrop;
        assert_eq!(back, cfg);
        // A config that has it keeps it.
        cfg.eval_resize = EvalResize::Squash;
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(parse_config(&json).unwrap(), cfg);
    }
}

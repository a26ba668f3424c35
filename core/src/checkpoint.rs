//! clipa checkpoint folders: `config.json` (the resolved [`ClipConfig`]) and
//! `model.safetensors` (parameters under clipa's paths). Each file is
//! written atomically (temporary file, then rename), so neither is ever
//! half-written; loading checks that the two describe the same model.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;

use crate::io::{read_safetensors, write_atomic, write_safetensors};
use crate::model::{ClipConfig, ClipModel, EvalResize};
use crate::state::{StateDict, load_state_dict, state_dict};
use crate::{Error, Result};

/// File name of the config inside a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights inside a checkpoint folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Writes `config` and `state` into the folder `dir` (created if needed).
pub fn save(dir: &Path, config: &ClipConfig, state: &StateDict) -> Result<()> {
    config.validate()?;
    let json = serde_json::to_string_pretty(config).expect("configs serialise");
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
    let meta = HashMap::from([("format".to_string(), "clipa".to_string())]);
    write_safetensors(&dir.join(WEIGHTS_FILE), state, meta)
}

/// Saves a model's config and parameters into `dir`.
pub fn save_model<B: Backend>(dir: &Path, model: &ClipModel<B>) -> Result<()> {
    save(dir, &model.config, &state_dict(model))
}

/// Reads the config and parameters of the checkpoint folder `dir`.
pub fn load(dir: &Path) -> Result<(ClipConfig, StateDict)> {
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
    let weights_path = dir.join(WEIGHTS_FILE);
    let weights = read_safetensors(&weights_path)?;
    check_against_config(&config, &weights.tensors).map_err(|reason| Error::Format {
        path: weights_path,
        reason,
    })?;
    Ok((config, weights.tensors))
}

/// A `config.json`, with the fields added since the first checkpoints
/// filled in as those checkpoints behaved: `eval_resize` (centre crop).
fn parse_config(text: &str) -> serde_json::Result<ClipConfig> {
    let mut value: serde_json::Value = serde_json::from_str(text)?;
    if let Some(map) = value.as_object_mut() {
        map.entry("eval_resize")
            .or_insert_with(|| serde_json::json!(EvalResize::CenterCrop));
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

/// Builds the model of checkpoint `dir` on `device`.
pub fn load_model<B: Backend>(dir: &Path, device: &B::Device) -> Result<ClipModel<B>> {
    let (config, state) = load(dir)?;
    load_state_dict(config.init(device), &state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::TestBackend;
    use crate::scratch::Scratch;

    #[test]
    fn save_then_load_gives_the_same_model() {
        let dir = Scratch::absent("ckpt");
        let device = Default::default();
        let model = ClipConfig::tiny().init::<TestBackend>(&device);
        save_model(&dir, &model).unwrap();
        let back = load_model::<TestBackend>(&dir, &device).unwrap();
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
        save(&dir, &model.config, &state).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("missing tensor text.ln_final.beta"), "{err}");
        assert!(
            err.contains("tensor visual.proj has shape [64, 1]"),
            "{err}"
        );
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

//! clipa checkpoint folders: `config.json` (the resolved [`ClipConfig`]) and
//! `model.safetensors` (parameters under clipa's paths). Both files are
//! written atomically, so a crash leaves the previous version intact.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;

use crate::io::{read_safetensors, write_atomic, write_safetensors};
use crate::model::{ClipConfig, ClipModel};
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
    let config: ClipConfig = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: cfg_path.clone(),
        reason: format!("not a clipa model config: {e}"),
    })?;
    config.validate()?;
    let weights = read_safetensors(&dir.join(WEIGHTS_FILE))?;
    Ok((config, weights.tensors))
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

    #[test]
    fn save_then_load_gives_the_same_model() {
        let dir = std::env::temp_dir().join(format!("clipa-ckpt-{}", std::process::id()));
        let device = Default::default();
        let model = ClipConfig::tiny().init::<TestBackend>(&device);
        save_model(&dir, &model).unwrap();
        let back = load_model::<TestBackend>(&dir, &device).unwrap();
        assert_eq!(back.config, model.config);
        assert_eq!(state_dict(&back), state_dict(&model));
        std::fs::remove_dir_all(&dir).ok();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}

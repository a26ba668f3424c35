//! Locked towers (LiT, Zhai et al. 2022; OpenCLIP `--lock-image`,
//! `--lock-image-unlocked-groups`, `--lock-text`,
//! `--lock-text-unlocked-layers`).
//!
//! A tower is cut into layer groups as OpenCLIP's `layer_groups` does,
//! input to output: the embeddings (the patch kernel, CLS and position
//! tables and `ln_pre`; the token and position tables), one group per
//! residual block (the last one with the final LayerNorm), and the
//! projection. Locking a tower freezes all of its groups but the top
//! `unlocked_groups`. A frozen parameter is marked as not requiring a
//! gradient, so autodiff gives it none and AdamW, which updates only
//! parameters with a gradient, keeps no moments for it. A tower frozen
//! whole runs on the inner backend, without autodiff at all
//! ([`Frozen`], used by [`super::grads`]).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::model::{ClipConfig, ClipModel};
use crate::{Error, Result};

/// One tower's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TowerLock {
    /// Layer groups left trainable, counted from the output (the
    /// projection first); 0 freezes the whole tower.
    #[serde(default)]
    pub unlocked_groups: usize,
}

/// Which towers are locked, and how far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockConfig {
    /// The image tower's lock (`--lock-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<TowerLock>,
    /// The text tower's lock (`--lock-text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TowerLock>,
}

/// What of each tower trains, as the backward pass needs it: the
/// unlocked groups of a locked tower, `None` for a tower that trains whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Frozen {
    /// The image tower's unlocked groups, if it is locked.
    pub image: Option<usize>,
    /// The text tower's unlocked groups, if it is locked.
    pub text: Option<usize>,
}

impl Frozen {
    /// Whether the image tower is frozen whole (it runs without autodiff).
    pub fn whole_image(&self) -> bool {
        self.image == Some(0)
    }

    /// Whether the text tower is frozen whole.
    pub fn whole_text(&self) -> bool {
        self.text == Some(0)
    }
}

/// The lowest block of a tower of `layers` blocks that trains under
/// `unlocked` groups (`layers` where none does): a backward pass through
/// the blocks stops there.
pub fn first_trained_block(layers: usize, unlocked: Option<usize>) -> usize {
    match unlocked {
        None => 0,
        Some(u) => (layers + 1).saturating_sub(u).min(layers),
    }
}

/// Whether a tower's embeddings (its lowest group) train.
pub fn stem_trains(layers: usize, unlocked: Option<usize>) -> bool {
    unlocked.is_none_or(|u| u >= groups(layers))
}

/// Layer groups of a tower with `layers` residual blocks: the embeddings,
/// one per block, the projection.
pub fn groups(layers: usize) -> usize {
    layers + 2
}

impl LockConfig {
    /// Whether nothing is locked (the config then leaves the key out).
    pub fn is_none(&self) -> bool {
        self.image.is_none() && self.text.is_none()
    }

    /// What of each tower trains.
    pub fn frozen(&self) -> Frozen {
        Frozen {
            image: self.image.map(|t| t.unlocked_groups),
            text: self.text.map(|t| t.unlocked_groups),
        }
    }

    /// Each tower's unlocked groups are at most its groups (the error
    /// names the flag and the tower's count).
    pub fn validate(&self, model: &ClipConfig) -> Result<()> {
        let towers = [
            (
                self.image,
                model.vision.layers,
                "--lock-image-unlocked-groups (lock.image.unlocked_groups)",
                "image",
            ),
            (
                self.text,
                model.text.layers,
                "--lock-text-unlocked-layers (lock.text.unlocked_groups)",
                "text",
            ),
        ];
        for (lock, layers, key, tower) in towers {
            if let Some(l) = lock
                && l.unlocked_groups > groups(layers)
            {
                return Err(Error::Config(format!(
                    "{key} = {} is out of range: the {tower} tower has {} layer groups (embeddings, {layers} blocks, projection)",
                    l.unlocked_groups,
                    groups(layers)
                )));
            }
        }
        Ok(())
    }

    /// Freezes the locked groups of `model`'s towers (a parameter that is
    /// already frozen, such as a sin-cos position table, stays so).
    /// Returns the model and the number of frozen parameter values. Run it
    /// after every rebuild of a parameter (a stage's resize).
    pub fn apply<B: AutodiffBackend>(&self, model: ClipModel<B>) -> (ClipModel<B>, usize) {
        if self.is_none() {
            return (model, 0);
        }
        let mut freeze = Freeze {
            lock: *self,
            layers: (model.visual.blocks.len(), model.text.blocks.len()),
            path: Vec::new(),
            frozen: 0,
        };
        let model = model.map(&mut freeze);
        (model, freeze.frozen)
    }
}

impl std::fmt::Display for LockConfig {
    /// `image tower (all but the top 2 groups), text tower`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tower = |name: &str, lock: TowerLock| match lock.unlocked_groups {
            0 => format!("{name} tower"),
            n => format!("{name} tower (all but the top {n} groups)"),
        };
        let parts: Vec<String> = [("image", self.image), ("text", self.text)]
            .into_iter()
            .filter_map(|(name, lock)| lock.map(|l| tower(name, l)))
            .collect();
        match parts.is_empty() {
            true => f.write_str("nothing"),
            false => f.write_str(&parts.join(", ")),
        }
    }
}

/// The layer group of a parameter at `path` inside a tower of `layers`
/// blocks (`path` without the tower's own name): 0 for the embeddings,
/// `1 + i` for block `i` (the final LayerNorm with the last block),
/// `layers + 1` for the projection.
fn group_of(path: &[String], layers: usize) -> usize {
    match path.first().map(String::as_str) {
        Some("blocks") => {
            1 + path
                .get(1)
                .and_then(|i| i.parse::<usize>().ok())
                .unwrap_or(0)
        }
        Some("ln_post" | "ln_final") => layers,
        Some("proj" | "text_projection") => layers + 1,
        // conv1, class_embedding, positional_embedding, ln_pre,
        // token_embedding.
        _ => 0,
    }
}

/// Marks the locked parameters as needing no gradient.
struct Freeze {
    lock: LockConfig,
    /// Blocks of the image and the text tower.
    layers: (usize, usize),
    path: Vec<String>,
    frozen: usize,
}

impl Freeze {
    /// Whether the parameter at the current path is locked.
    fn locked(&self) -> bool {
        let (lock, layers) = match self.path.first().map(String::as_str) {
            Some("visual") => (self.lock.image, self.layers.0),
            Some("text") => (self.lock.text, self.layers.1),
            _ => return false, // the temperature and the bias always train
        };
        let Some(lock) = lock else {
            return false;
        };
        let n = groups(layers);
        let frozen_groups = n.saturating_sub(lock.unlocked_groups);
        group_of(&self.path[1..], layers) < frozen_groups
    }
}

impl<B: AutodiffBackend> ModuleMapper<B> for Freeze {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if !self.locked() {
            return param;
        }
        self.frozen += param.lazy_shape().num_elements();
        param.set_require_grad(false)
    }
}

#[cfg(test)]
mod tests {
    use burn::module::ModuleVisitor;

    use super::*;
    use crate::numeric::TestBackend as AB;

    /// Paths of the parameters that still require a gradient.
    struct Trainable {
        path: Vec<String>,
        out: Vec<String>,
    }

    impl ModuleVisitor<AB> for Trainable {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if param.val().is_require_grad() {
                self.out.push(self.path.join("."));
            }
        }
    }

    fn trainable(model: &ClipModel<AB>) -> Vec<String> {
        let mut t = Trainable {
            path: Vec::new(),
            out: Vec::new(),
        };
        model.visit(&mut t);
        t.out
    }

    fn lock(image: Option<usize>, text: Option<usize>) -> LockConfig {
        LockConfig {
            image: image.map(|unlocked_groups| TowerLock { unlocked_groups }),
            text: text.map(|unlocked_groups| TowerLock { unlocked_groups }),
        }
    }

    /// OpenCLIP's grouping: unlocking 1 group frees the projection, 2 the
    /// last block and the final LayerNorm too; the temperature always
    /// trains; the other tower is untouched.
    #[test]
    fn groups_unlock_from_the_top() {
        let device = Default::default();
        let cfg = ClipConfig::tiny();
        let layers = cfg.vision.layers;
        let model = cfg.init::<AB>(&device);
        let all = trainable(&model);
        let count =
            |prefix: &str, list: &[String]| list.iter().filter(|p| p.starts_with(prefix)).count();

        let (m, frozen) = lock(Some(0), None).apply(model.clone());
        let left = trainable(&m);
        assert_eq!(count("visual.", &left), 0);
        assert_eq!(count("text.", &left), count("text.", &all));
        assert!(left.contains(&"logit_scale".to_string()));
        let visual_numel: usize = {
            let v = model.visual.clone();
            v.num_params()
        };
        // The sin-cos or learned position table counts once either way.
        assert!(frozen <= visual_numel && frozen > visual_numel / 2);

        let (m, _) = lock(Some(1), None).apply(model.clone());
        let left = trainable(&m);
        assert_eq!(
            left.iter()
                .filter(|p| p.starts_with("visual."))
                .collect::<Vec<_>>(),
            ["visual.proj"]
        );

        let (m, _) = lock(Some(2), None).apply(model.clone());
        let left = trainable(&m);
        let last = format!("visual.blocks.{}.", layers - 1);
        assert!(left.iter().any(|p| p.starts_with(&last)));
        assert!(left.iter().any(|p| p.starts_with("visual.ln_post")));
        assert!(!left.iter().any(|p| p.starts_with("visual.blocks.0.")) || layers == 1);
        assert!(!left.contains(&"visual.conv1".to_string()));

        // Every group unlocked: the same trainable set as no lock.
        let (m, frozen) = lock(Some(groups(layers)), None).apply(model.clone());
        assert_eq!(trainable(&m), all);
        assert_eq!(frozen, 0);

        let (m, _) = lock(None, Some(0)).apply(model.clone());
        assert_eq!(count("text.", &trainable(&m)), 0);
        let (m, _) = lock(None, Some(1)).apply(model);
        let left = trainable(&m);
        assert_eq!(
            left.iter()
                .filter(|p| p.starts_with("text."))
                .collect::<Vec<_>>(),
            ["text.text_projection"]
        );
    }

    #[test]
    fn frozen_and_range() {
        let cfg = ClipConfig::tiny();
        let f = lock(Some(0), Some(1)).frozen();
        assert!(f.whole_image() && !f.whole_text());
        assert_eq!(LockConfig::default().frozen(), Frozen::default());
        // 3 blocks, 5 groups: 0 or 1 unlocked trains no block, 2 the
        // last, 4 every block but not the embeddings, 5 everything.
        let first = |u| first_trained_block(3, u);
        assert_eq!([first(Some(0)), first(Some(1)), first(Some(2))], [3, 3, 2]);
        assert_eq!([first(Some(4)), first(Some(5)), first(None)], [0, 0, 0]);
        assert!(!stem_trains(3, Some(4)) && stem_trains(3, Some(5)) && stem_trains(3, None));
        lock(Some(groups(cfg.vision.layers)), None)
            .validate(&cfg)
            .unwrap();
        let err = lock(None, Some(groups(cfg.text.layers) + 1))
            .validate(&cfg)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--lock-text-unlocked-layers"), "{err}");
    }

    #[test]
    fn group_of_follows_openclip() {
        let p = |s: &str| s.split('.').map(String::from).collect::<Vec<_>>();
        assert_eq!(group_of(&p("conv1"), 3), 0);
        assert_eq!(group_of(&p("ln_pre.gamma"), 3), 0);
        assert_eq!(group_of(&p("token_embedding.weight"), 3), 0);
        assert_eq!(group_of(&p("blocks.0.attn.in_proj_weight"), 3), 1);
        assert_eq!(group_of(&p("blocks.2.mlp.c_fc.weight"), 3), 3);
        assert_eq!(group_of(&p("ln_post.gamma"), 3), 3);
        assert_eq!(group_of(&p("ln_final.beta"), 3), 3);
        assert_eq!(group_of(&p("proj"), 3), 4);
        assert_eq!(group_of(&p("text_projection"), 3), 4);
    }
}

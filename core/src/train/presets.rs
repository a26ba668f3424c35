//! The training presets: one named constructor per recipe, built from typed
//! values, and [`PRESETS`], the table of name, constructor and one-line
//! description that [`TrainConfig::preset`], `clipa train --help` and
//! `clipa plan` read.
//!
//! The paper's recipes follow CLIPA-FACTS §1.6 (`clipa plan` picks among
//! them). CLIPA-v1 and the v2 report's Table 1 scaling run train the
//! PyTorch `clipa-v1-*` models (CLIP BPE); the CLIPA-v2 recipes train the
//! JAX models (`clipa-*`, BERT WordPiece: they need `vocab`). Only the
//! H/14 and bigG v2 configs are public; L/14 uses H/14's schedule, and bigG
//! at 336 px H/14's.

use super::config::{StageConfig, TrainConfig};
use crate::reduce::{ImageReduction, RandomMask, TextReduction};

/// One preset: its name, what it trains, and its constructor.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    /// The name `--preset` takes.
    pub name: &'static str,
    /// One line for `--help` and `clipa plan`.
    pub about: &'static str,
    /// Builds the run config.
    pub build: fn() -> TrainConfig,
}

/// Every training preset, in the order `--help` lists them.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "demo",
        about: "the default: the demo model on built-in synthetic data, 16 px + 8 syntax tokens, then 32 px + 16",
        build: demo,
    },
    Preset {
        name: "tiny",
        about: "one 20-step stage of the tiny model, for tests",
        build: tiny,
    },
    Preset {
        name: "fmnist",
        about: "Fashion-MNIST shards at 28 px: 50% of patches masked, then unmasked",
        build: fmnist,
    },
    Preset {
        name: "clipa-b16-i112-t16",
        about: "CLIPA-v1 B/16: LAION-400M ×6 at 112 px + 16 tokens, then 131M samples at 224 px",
        build: clipa_b16_i112_t16,
    },
    Preset {
        name: "clipa-l16-i64-t16",
        about: "CLIPA-v1 L/16: LAION-400M ×6 at 64 px + 16 syntax tokens, then 131M at 224 px",
        build: clipa_l16_i64_t16,
    },
    Preset {
        name: "clipa-l16-i96-t8",
        about: "CLIPA-v1 L/16: LAION-400M ×6 at 96 px + 8 syntax tokens, then 131M at 224 px",
        build: clipa_l16_i96_t8,
    },
    Preset {
        name: "clipa-h14-i84-t8",
        about: "CLIPA-v2 Table 1 H/14 (v1 model): 2.56B samples at 84 px + 8 tokens, then 131M at 224 px",
        build: clipa_h14_i84_t8,
    },
    Preset {
        name: "clipa-v2-l14-84-224",
        about: "CLIPA-v2 L/14: 12.8B samples at 84 px + 8 syntax tokens, then 512M at 224 px (30% masked)",
        build: clipa_v2_l14_84_224,
    },
    Preset {
        name: "clipa-v2-h14-70-224",
        about: "CLIPA-v2 H/14: 12.8B samples at 70 px + 8 syntax tokens, then 512M at 224 px (30% masked)",
        build: clipa_v2_h14_70_224,
    },
    Preset {
        name: "clipa-v2-h14-84-224",
        about: "CLIPA-v2 H/14: 12.8B samples at 84 px + 8 syntax tokens, then 512M at 224 px (30% masked)",
        build: clipa_v2_h14_84_224,
    },
    Preset {
        name: "clipa-v2-h14-84-224-336",
        about: "CLIPA-v2 H/14 at 84 px, 224 px, then 128M samples at 336 px (40% masked)",
        build: clipa_v2_h14_84_224_336,
    },
    Preset {
        name: "clipa-v2-g14-84-224",
        about: "CLIPA-v2 bigG/14: 12.8B samples at 84 px + 8 syntax tokens, then 512M at 224 px (40% masked)",
        build: clipa_v2_g14_84_224,
    },
    Preset {
        name: "clipa-v2-g14-84-224-336",
        about: "CLIPA-v2 bigG/14 at 84 px, 224 px, then 128M samples at 336 px (40% masked)",
        build: clipa_v2_g14_84_224_336,
    },
];

/// The preset named `name`.
pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// LAION-400M, six epochs: CLIPA-v1's pre-training budget.
const LAION400M_6EP: u64 = 6 * 400_000_000;

/// CLIPA-v2 pre-training length: 1,281,167 × 10,000 samples (12.8B).
const V2_SAMPLES: u64 = 12_811_670_000;

/// Steps needed to see `samples` samples at `batch` per step.
fn steps_for(samples: u64, batch: usize) -> u64 {
    samples.div_ceil(batch as u64)
}

/// Train at `size` pixels (CLIPA's resize).
fn resize(size: u32) -> ImageReduction {
    ImageReduction::Resize { size }
}

/// Drop `ratio` of the patches at random.
fn masked(ratio: f64) -> ImageReduction {
    ImageReduction::Random(RandomMask { ratio })
}

impl StageConfig {
    /// A stage at `image_size` pixels and `text_length` tokens with the
    /// given reductions; the schedule comes from [`StageConfig::schedule`].
    pub fn reduced(
        name: &str,
        image_size: u32,
        image_reduction: ImageReduction,
        text_length: usize,
        text_reduction: TextReduction,
    ) -> Self {
        Self {
            name: name.into(),
            image_size,
            image_reduction,
            text_length,
            text_reduction,
            steps: 1,
            batch_size: 1,
            accum_steps: 1,
            base_lr: 0.0,
            warmup_steps: 0,
            end_base_lr: 0.0,
        }
    }

    /// `steps` steps of `batch_size` samples at `base_lr` (per 256 samples)
    /// after `warmup_steps` of linear warm-up.
    pub fn schedule(self, steps: u64, batch_size: usize, base_lr: f64, warmup_steps: u64) -> Self {
        Self {
            steps,
            batch_size,
            base_lr,
            warmup_steps,
            ..self
        }
    }
}

/// `demo` (the default of `clipa train`).
pub fn demo() -> TrainConfig {
    let pretrain =
        StageConfig::reduced("pretrain-i16-t8", 32, resize(16), 8, TextReduction::Syntax);
    let tune = StageConfig::reduced(
        "finetune-i32-t16",
        32,
        ImageReduction::None,
        16,
        TextReduction::Truncate,
    );
    TrainConfig {
        log_every: 20,
        checkpoint_every: 500,
        ..TrainConfig::base(
            "demo",
            vec![
                pretrain.schedule(1000, 128, 1e-3, 100),
                tune.schedule(250, 128, 3e-4, 25),
            ],
        )
    }
}

/// `tiny`: the tests' run.
pub fn tiny() -> TrainConfig {
    let stage = StageConfig::reduced(
        "tiny",
        32,
        ImageReduction::None,
        16,
        TextReduction::Truncate,
    );
    TrainConfig {
        log_every: 1,
        ..TrainConfig::base("tiny", vec![stage.schedule(20, 16, 1e-3, 2)])
    }
}

/// `fmnist`: the converter's shards. 16 text tokens in both stages: the
/// converter's templates put the class word last, past token 8, so
/// truncating to 8 deleted the label from most captions.
pub fn fmnist() -> TrainConfig {
    let t = TextReduction::Truncate;
    TrainConfig::base(
        "demo",
        vec![
            StageConfig::reduced("pretrain-i28-random50-t16", 28, masked(0.5), 16, t)
                .schedule(2500, 128, 1e-3, 167),
            StageConfig::reduced("finetune-i28-t16", 28, ImageReduction::None, 16, t)
                .schedule(500, 128, 3e-4, 50),
        ],
    )
}

/// CLIPA-v1 pre-training on LAION-400M ×6 at `px` pixels, batch `batch`.
fn v1_pretrain(
    px: u32,
    text_length: usize,
    text: TextReduction,
    batch: usize,
    warmup: u64,
) -> StageConfig {
    StageConfig::reduced(
        &format!("i{px}-t{text_length}"),
        224,
        resize(px),
        text_length,
        text,
    )
    .schedule(steps_for(LAION400M_6EP, batch), batch, 8e-6, warmup)
}

/// CLIPA-v1 unmasked fine-tune: 131M samples at 224 px, at the recipe's
/// text length, batch and warmup (`clipa_torch/scripts/exp/gpu`: B/16
/// `ViT-B-16-CL16`, 16 tokens, 8192, 3072; L/16 `ViT-L-16-CL32-GAP`, 32
/// tokens, 7168, 3571).
fn v1_unmask_tune(text_length: usize, batch: usize, warmup: u64) -> StageConfig {
    StageConfig::reduced(
        "unmask-tune-224",
        224,
        ImageReduction::None,
        text_length,
        TextReduction::Truncate,
    )
    .schedule(steps_for(131_072_000, batch), batch, 8e-7, warmup)
}

/// CLIPA-v2 pre-training (`model_h/84_8_pre_training.py`): `px` pixels,
/// 8 syntax-masked tokens, batch 65,536, warmup 3,200.
fn v2_pretrain(px: u32, samples: u64, base_lr: f64) -> StageConfig {
    StageConfig::reduced(
        &format!("i{px}-t8"),
        224,
        resize(px),
        8,
        TextReduction::Syntax,
    )
    .schedule(steps_for(samples, 65_536), 65_536, base_lr, 3200)
}

/// CLIPA-v2 fine-tune at 224 px (`unmask_tuning_224_scheduleX4.py`): 512M
/// samples with 30 % of the patches masked, batch 32,768.
fn v2_tune_224() -> StageConfig {
    StageConfig::reduced(
        "unmask-tune-224",
        224,
        masked(0.3),
        32,
        TextReduction::Truncate,
    )
    .schedule(steps_for(524_288_000, 32_768), 32_768, 4e-7, 800)
}

/// bigG's fine-tune at 224 px (t5x `…224_scheduleX4`): 40 % masked, batch
/// 16,384, no warmup.
fn g14_tune_224() -> StageConfig {
    StageConfig::reduced(
        "unmask-tune-224",
        224,
        masked(0.4),
        32,
        TextReduction::Truncate,
    )
    .schedule(steps_for(524_288_000, 16_384), 16_384, 4e-7, 0)
}

/// CLIPA-v2 fine-tune at 336 px (`unmask_tuning_336_scheduleX1.py`): 128M
/// samples, 40 % masked, batch 16,384.
fn v2_tune_336() -> StageConfig {
    StageConfig::reduced(
        "unmask-tune-336",
        336,
        masked(0.4),
        32,
        TextReduction::Truncate,
    )
    .schedule(steps_for(131_072_000, 16_384), 16_384, 1e-7, 1600)
}

/// `clipa-b16-i112-t16`.
pub fn clipa_b16_i112_t16() -> TrainConfig {
    let pre = v1_pretrain(112, 16, TextReduction::Truncate, 65_536, 782);
    TrainConfig::base("clipa-v1-b16", vec![pre, v1_unmask_tune(16, 8192, 3072)])
}

/// `clipa-l16-i64-t16`.
pub fn clipa_l16_i64_t16() -> TrainConfig {
    let pre = v1_pretrain(64, 16, TextReduction::Syntax, 32_768, 1563);
    TrainConfig::base("clipa-v1-l16", vec![pre, v1_unmask_tune(32, 7168, 3571)])
}

/// `clipa-l16-i96-t8`.
pub fn clipa_l16_i96_t8() -> TrainConfig {
    let pre = v1_pretrain(96, 8, TextReduction::Syntax, 32_768, 1563);
    TrainConfig::base("clipa-v1-l16", vec![pre, v1_unmask_tune(32, 7168, 3571)])
}

/// `clipa-h14-i84-t8`: the v2 report's Table 1 scaling run on the v1 H/14.
pub fn clipa_h14_i84_t8() -> TrainConfig {
    let tune = StageConfig::reduced(
        "unmask-tune-224",
        224,
        ImageReduction::None,
        32,
        TextReduction::Truncate,
    )
    .schedule(steps_for(131_072_000, 32_768), 32_768, 4e-7, 800);
    TrainConfig::base(
        "clipa-v1-h14",
        vec![v2_pretrain(84, 2_560_000_000, 8e-6), tune],
    )
}

/// `clipa-v2-l14-84-224`.
pub fn clipa_v2_l14_84_224() -> TrainConfig {
    TrainConfig::base(
        "clipa-l14",
        vec![v2_pretrain(84, V2_SAMPLES, 8e-6), v2_tune_224()],
    )
}

/// `clipa-v2-h14-70-224`.
pub fn clipa_v2_h14_70_224() -> TrainConfig {
    TrainConfig::base(
        "clipa-h14",
        vec![v2_pretrain(70, V2_SAMPLES, 8e-6), v2_tune_224()],
    )
}

/// `clipa-v2-h14-84-224`.
pub fn clipa_v2_h14_84_224() -> TrainConfig {
    TrainConfig::base(
        "clipa-h14",
        vec![v2_pretrain(84, V2_SAMPLES, 8e-6), v2_tune_224()],
    )
}

/// `clipa-v2-h14-84-224-336`.
pub fn clipa_v2_h14_84_224_336() -> TrainConfig {
    let stages = vec![
        v2_pretrain(84, V2_SAMPLES, 8e-6),
        v2_tune_224(),
        v2_tune_336(),
    ];
    TrainConfig::base("clipa-h14", stages)
}

/// `clipa-v2-g14-84-224`.
pub fn clipa_v2_g14_84_224() -> TrainConfig {
    TrainConfig::base(
        "clipa-g14",
        vec![v2_pretrain(84, V2_SAMPLES, 4e-6), g14_tune_224()],
    )
}

/// `clipa-v2-g14-84-224-336`.
pub fn clipa_v2_g14_84_224_336() -> TrainConfig {
    let stages = vec![
        v2_pretrain(84, V2_SAMPLES, 4e-6),
        g14_tune_224(),
        v2_tune_336(),
    ];
    TrainConfig::base("clipa-g14", stages)
}

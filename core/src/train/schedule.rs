//! The learning-rate schedule of a stage: linear warmup, then a cosine
//! decay to the end value (CLIPA; OpenCLIP `scheduler.py::cosine_lr`;
//! nanoGPT `get_lr`), a constant, or a constant with a final cooldown
//! (OpenCLIP `--lr-scheduler const|const-cooldown`).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The shape of the learning rate after warmup (OpenCLIP
/// `--lr-scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrScheduler {
    /// A half cosine from the peak to the end value over the steps after
    /// warmup.
    #[default]
    Cosine,
    /// The peak until the stage ends.
    Const,
    /// The peak, then over the last `cooldown_steps` steps a polynomial
    /// decay (`cooldown_power`; 1 is linear) to the end value.
    ConstCooldown,
}

impl std::str::FromStr for LrScheduler {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(Self::Cosine),
            "const" => Ok(Self::Const),
            "const-cooldown" => Ok(Self::ConstCooldown),
            other => Err(Error::Config(format!(
                "lr scheduler {other:?}: expected cosine, const or const-cooldown"
            ))),
        }
    }
}

impl std::fmt::Display for LrScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cosine => "cosine",
            Self::Const => "const",
            Self::ConstCooldown => "const-cooldown",
        })
    }
}

/// The run's schedule settings, shared by every stage (each stage has its
/// own length, warmup, peak and end).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// The shape after warmup.
    pub scheduler: LrScheduler,
    /// Steps of the cooldown at the end of each stage (`const-cooldown`);
    /// a stage shorter than this cools down from its warmup's end.
    pub cooldown_steps: u64,
    /// Exponent of the cooldown's decay (1: linear).
    pub cooldown_power: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            scheduler: LrScheduler::Cosine,
            cooldown_steps: 0,
            cooldown_power: 1.0,
        }
    }
}

/// One stage's learning rate, step by step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageSchedule {
    /// The shape and cooldown.
    pub config: ScheduleConfig,
    /// Steps in the stage.
    pub total: u64,
    /// Linear warmup steps.
    pub warmup: u64,
    /// The peak learning rate.
    pub peak: f64,
    /// The value the decay ends at (cosine, cooldown).
    pub end: f64,
}

impl StageSchedule {
    /// The learning rate at `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let (total, warmup) = (self.total, self.warmup);
        match self.config.scheduler {
            LrScheduler::Cosine => lr_at(step, total, warmup, self.peak, self.end),
            _ if step < warmup => self.peak * (step + 1) as f64 / warmup as f64,
            LrScheduler::Const => self.peak,
            LrScheduler::ConstCooldown => {
                // OpenCLIP `const_lr_cooldown`: the cooldown starts
                // `cooldown` steps before the end (here never before the
                // warmup's end), and decays as (1 − e/es)^power.
                let start = total.saturating_sub(self.config.cooldown_steps).max(warmup);
                if step < start {
                    return self.peak;
                }
                let span = total.saturating_sub(start).max(1) as f64;
                let t = ((step - start) as f64 / span).min(1.0);
                let decay = (1.0 - t).powf(self.config.cooldown_power);
                self.end + decay * (self.peak - self.end)
            }
        }
    }
}

/// Learning rate at `step` (0-based) of a cosine stage of `total` steps:
/// `peak·(step+1)/warmup` during warmup, then a half cosine from `peak` to
/// `end` over the remaining steps.
pub fn lr_at(step: u64, total: u64, warmup: u64, peak: f64, end: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay = total.saturating_sub(warmup).max(1);
    let t = ((step - warmup) as f64 / decay as f64).min(1.0);
    end + 0.5 * (peak - end) * (1.0 + (std::f64::consts::PI * t).cos())
}

/// The peak learning rate of a stage: `base × global_batch / 256`, the
/// linear scaling rule CLIPA uses.
pub fn scaled_lr(base: f64, global_batch: usize) -> f64 {
    base * global_batch as f64 / 256.0
}

/// The per-256 base rate whose [`scaled_lr`] at `global_batch` is `lr`
/// (OpenCLIP's `--lr` is the learning rate itself).
pub fn base_lr_for(lr: f64, global_batch: usize) -> f64 {
    lr * 256.0 / global_batch as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_linear_and_reaches_the_peak() {
        assert_eq!(lr_at(0, 100, 10, 1.0, 0.0), 0.1);
        assert_eq!(lr_at(4, 100, 10, 1.0, 0.0), 0.5);
        assert_eq!(lr_at(9, 100, 10, 1.0, 0.0), 1.0);
    }

    #[test]
    fn cosine_decays_to_the_end_value() {
        assert_eq!(lr_at(10, 110, 10, 1.0, 0.0), 1.0);
        assert!((lr_at(60, 110, 10, 1.0, 0.0) - 0.5).abs() < 1e-12); // halfway
        assert!(
            (lr_at(35, 110, 10, 2.0, 0.0) - (1.0 + (std::f64::consts::PI / 4.0).cos())).abs()
                < 1e-12
        );
        assert_eq!(lr_at(110, 110, 10, 1.0, 0.1), 0.1);
        assert_eq!(lr_at(500, 110, 10, 1.0, 0.1), 0.1); // past the end: stays
        assert_eq!(lr_at(0, 5, 0, 3.0, 0.0), 3.0); // no warmup
    }

    #[test]
    fn lr_scales_with_the_global_batch() {
        assert!((scaled_lr(8e-6, 65_536) - 2.048e-3).abs() < 1e-12); // CLIPA B/16 pre-training
        assert_eq!(scaled_lr(1e-3, 256), 1e-3);
        assert!((scaled_lr(base_lr_for(5e-4, 96), 96) - 5e-4).abs() < 1e-18);
    }

    fn stage(scheduler: LrScheduler, cooldown_steps: u64, cooldown_power: f64) -> StageSchedule {
        StageSchedule {
            config: ScheduleConfig {
                scheduler,
                cooldown_steps,
                cooldown_power,
            },
            total: 100,
            warmup: 10,
            peak: 1.0,
            end: 0.1,
        }
    }

    #[test]
    fn const_holds_the_peak_after_warmup() {
        let s = stage(LrScheduler::Const, 0, 1.0);
        assert_eq!(s.lr(0), 0.1);
        assert_eq!(s.lr(9), 1.0);
        assert_eq!(s.lr(10), 1.0);
        assert_eq!(s.lr(99), 1.0);
    }

    /// OpenCLIP's `const_lr_cooldown` with 100 steps, warmup 10,
    /// cooldown 20, end 0.1: e = step − 80, es = 20,
    /// lr = (1 − e/es)^p · (1 − 0.1) + 0.1.
    #[test]
    fn const_cooldown_decays_over_the_last_steps() {
        let s = stage(LrScheduler::ConstCooldown, 20, 1.0);
        assert_eq!(s.lr(5), 0.6); // warmup
        assert_eq!(s.lr(79), 1.0);
        assert_eq!(s.lr(80), 1.0);
        assert!((s.lr(90) - 0.55).abs() < 1e-12); // halfway, linear
        assert!((s.lr(99) - (0.05 * 0.9 + 0.1)).abs() < 1e-12);
        let square = stage(LrScheduler::ConstCooldown, 20, 2.0);
        assert!((square.lr(90) - (0.25 * 0.9 + 0.1)).abs() < 1e-12);
        // A cooldown longer than the stage starts where warmup ends.
        let long = stage(LrScheduler::ConstCooldown, 500, 1.0);
        assert_eq!(long.lr(10), 1.0);
        assert!((long.lr(55) - (0.5 * 0.9 + 0.1)).abs() < 1e-12);
    }

    #[test]
    fn cosine_schedule_is_lr_at() {
        let s = stage(LrScheduler::Cosine, 0, 1.0);
        for step in [0, 9, 10, 50, 99, 100] {
            assert_eq!(s.lr(step), lr_at(step, 100, 10, 1.0, 0.1));
        }
        assert_eq!(
            "const-cooldown".parse::<LrScheduler>().unwrap(),
            LrScheduler::ConstCooldown
        );
        assert!("linear".parse::<LrScheduler>().is_err());
        assert_eq!(LrScheduler::ConstCooldown.to_string(), "const-cooldown");
    }
}

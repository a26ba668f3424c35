//! The learning-rate schedule: linear warmup, then cosine decay to the end
//! value (CLIPA and OpenCLIP `scheduler.py::cosine_lr`; nanoGPT `get_lr`).

/// Learning rate at `step` (0-based) of a stage of `total` steps:
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
    }
}

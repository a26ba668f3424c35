//! Reads of training values from the device to the host, counted.
//!
//! A read waits for everything queued before it, so on a GPU each one
//! stalls the host until the device catches up, and Burn's per-op host
//! overhead is no longer hidden behind device work. The training step
//! therefore keeps its loss, gradient norm and finite check on the device
//! ([`crate::train::step::StepStats`]); the trainer reads them at log and
//! checkpoint steps only, through [`read`], and `clipa bench` reports the
//! reads a step made from [`reads`].

use std::cell::Cell;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};

thread_local! {
    /// Reads made through [`read`] on this thread. Per thread, because a
    /// step runs on one (each replica on its own), and so that the reads
    /// of tests running beside each other do not mix.
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// The values of `t` on the host, as float64: one read, counted.
pub fn read<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    READS.set(READS.get() + 1);
    t.into_data()
        .iter::<f32>()
        .map(|v| v.elem::<f64>())
        .collect()
}

/// The reads made through [`read`] so far on this thread.
pub fn reads() -> u64 {
    READS.get()
}

//! The `clipa check` self-test: one attention layer and one residual block,
//! forward and backward, with weights and inputs drawn from a host RNG so
//! every backend computes on bit-identical numbers. The CLI runs it on the
//! chosen backend and on the CPU and compares the results.

use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};

use crate::nn::{AttentionConfig, ResidualBlock, ResidualBlockConfig};
use crate::numeric::normal_data;
use crate::state::{StateDict, grads_dict, load_state_dict, state_dict};
use crate::{Error, Result};

/// Sizes of the self-test: small enough for a software GPU, large enough to
/// exercise several heads and a non-square MLP.
#[derive(Clone, Copy, Debug)]
pub struct SelfTestShape {
    /// Batch size.
    pub batch: usize,
    /// Tokens per sample.
    pub tokens: usize,
    /// Model width.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
}

impl Default for SelfTestShape {
    fn default() -> Self {
        Self {
            batch: 4,
            tokens: 17,
            width: 64,
            heads: 4,
        }
    }
}

/// What one part of the self-test produced on one backend.
#[derive(Debug, Clone)]
pub struct PartResult {
    /// Which part: `attention` or `block`.
    pub name: &'static str,
    /// Forward output `[batch, tokens, width]`.
    pub output: TensorData,
    /// Gradient of `sum(output²)/2` w.r.t. the input and every parameter
    /// (`input` and parameter paths).
    pub grads: StateDict,
    /// Forward wall time in milliseconds, device-synchronised.
    pub forward_ms: f64,
    /// Backward wall time in milliseconds, device-synchronised.
    pub backward_ms: f64,
}

/// Runs attention and block forward and backward on `device`.
pub fn run<B: AutodiffBackend>(
    device: &B::Device,
    shape: SelfTestShape,
) -> Result<Vec<PartResult>> {
    let attn = AttentionConfig::new(shape.width, shape.heads).init::<B>(device);
    let attn = randomise(attn, 1)?;
    let (block, input) = block_and_input::<B>(device, shape, None)?;
    Ok(vec![
        part("attention", &attn, &input, device, |m, x| {
            m.forward(x, true)
        })?,
        part("block", &block, &input, device, |m, x| m.forward(x, false))?,
    ])
}

/// The self-test's block under bf16 mixed precision (float32 weights and
/// residual stream, bf16 branches), or `None` when `device` has no bf16
/// arithmetic. Its output and gradients are float32 and compare against the
/// float32 `block` part, at bf16's tolerance.
pub fn run_bf16<B: AutodiffBackend>(
    device: &B::Device,
    shape: SelfTestShape,
) -> Result<Option<PartResult>> {
    if !B::supports_dtype(device, DType::BF16) {
        return Ok(None);
    }
    let (block, input) = block_and_input::<B>(device, shape, Some(FloatDType::BF16))?;
    let result = part("block-bf16", &block, &input, device, |m, x| {
        m.forward(x, false)
    })?;
    if let Some((name, g)) = result.grads.iter().find(|(_, g)| g.dtype != DType::F32) {
        return Err(Error::Backend(format!(
            "bf16 block: gradient {name} is {:?}, not the float32 master dtype",
            g.dtype
        )));
    }
    Ok(Some(result))
}

/// The self-test's residual block (weights seeded 2, with `compute` as its
/// compute dtype) and its input `[batch, tokens, width]` (seeded 3): the
/// same numbers in every part and on every backend.
fn block_and_input<B: AutodiffBackend>(
    device: &B::Device,
    shape: SelfTestShape,
    compute: Option<FloatDType>,
) -> Result<(ResidualBlock<B>, TensorData)> {
    let SelfTestShape {
        batch,
        tokens,
        width,
        heads,
    } = shape;
    let mut block = ResidualBlockConfig::new(width, heads, 4 * width).init::<B>(device);
    block.compute = compute;
    let block = randomise(block, 2)?;
    Ok((block, normal_data([batch, tokens, width], 3, 1.0)))
}

/// Replaces every parameter with N(0, 0.1²) host noise, seeded per path.
fn randomise<B: AutodiffBackend, M: Module<B>>(module: M, seed: u64) -> Result<M> {
    let sd: StateDict = state_dict(&module)
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| {
            let dims: Vec<usize> = v.shape.to_vec();
            (k, normal_data(dims, seed * 1000 + i as u64, 0.1))
        })
        .collect();
    load_state_dict(module, &sd)
}

fn part<B, M, F>(
    name: &'static str,
    module: &M,
    input: &TensorData,
    device: &B::Device,
    forward: F,
) -> Result<PartResult>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    F: Fn(&M, Tensor<B, 3>) -> Tensor<B, 3>,
{
    let sync = || B::sync(device).map_err(|e| Error::Backend(format!("{e:?}")));
    let x = Tensor::<B, 3>::from_data(input.clone(), device).require_grad();
    sync()?;
    let t0 = Instant::now();
    let y = forward(module, x.clone());
    sync()?;
    let forward_ms = t0.elapsed().as_secs_f64() * 1e3;
    let loss = (y.clone() * y.clone()).sum() / 2.0;
    let t1 = Instant::now();
    let grads = loss.backward();
    sync()?;
    let backward_ms = t1.elapsed().as_secs_f64() * 1e3;
    let mut all = grads_dict(module, &grads);
    let dx = x
        .grad(&grads)
        .ok_or_else(|| Error::Backend("the input received no gradient".into()))?;
    all.insert("input".into(), dx.into_data());
    Ok(PartResult {
        name,
        output: y.into_data(),
        grads: all,
        forward_ms,
        backward_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::TestBackend;

    #[test]
    fn self_test_is_deterministic_and_complete() {
        let device = Default::default();
        let shape = SelfTestShape {
            batch: 2,
            tokens: 5,
            width: 8,
            heads: 2,
        };
        let a = run::<TestBackend>(&device, shape).unwrap();
        let b = run::<TestBackend>(&device, shape).unwrap();
        assert_eq!(a.len(), 2);
        for (pa, pb) in a.iter().zip(&b) {
            assert_eq!(pa.output, pb.output, "{}", pa.name);
            assert_eq!(pa.grads, pb.grads, "{}", pa.name);
        }
        // 8 attention tensors + input; 16 block tensors + input.
        assert_eq!(a[0].grads.len(), 9);
        assert_eq!(a[1].grads.len(), 17);
    }
}

//! The embedded CPU backend: Burn's `flex` (pure Rust, the `gemm` crate's
//! kernels with AVX-512 where the CPU has it, rayon threads). Chosen over
//! `ndarray` by the measurement in `docs/BENCHMARKS.md`: 1.8–2.2× faster on
//! transformer forward+backward.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use clipa_core::kernels;
use clipa_core::nn::{
    AttentionKernel, EmbeddingKernel, GeluKernel, LayerNormKernel, LinearKernel, gelu_composed,
};
use clipa_core::train::optim::{AdamWKernel, AdamWScalars, adamw_composed};
use rayon::prelude::*;

use crate::{BackendError, BackendKind, DeviceInfo};

mod alloc;
mod attention;
mod embedding;
mod gemm;
mod layer_norm;
mod linear;
mod vmath;

use gemm::Unset;
use vmath::vectorised;

pub use attention::FlexAttention;
pub use embedding::FlexEmbedding;
pub use layer_norm::FlexLayerNorm;
pub use linear::FlexLinear;

/// The concrete CPU backend with autodiff.
pub type Backend = burn::backend::Autodiff<Flex>;

/// The CPU has one device, index 0.
pub fn select(
    index: Option<usize>,
) -> Result<(burn::tensor::Device<Backend>, DeviceInfo), BackendError> {
    register_kernels();
    match index.unwrap_or(0) {
        0 => Ok((
            Default::default(),
            DeviceInfo {
                kind: BackendKind::Cpu,
                index: 0,
                name: match crate::cpu_threads() {
                    1 => "flex, 1 thread".into(),
                    n => format!("flex, {n} threads"),
                },
            },
        )),
        n => Err(BackendError::NoDevice {
            kind: BackendKind::Cpu,
            reason: format!("the CPU backend has only device 0, not {n}"),
        }),
    }
}

/// Runs `job` on one of rayon's worker threads (where the pool has two or
/// more), the calling thread waiting for it.
///
/// Every kernel and every flex op is a rayon parallel loop. Called from a
/// thread outside the pool, each one is injected into the pool's queue, a
/// sleeping worker is woken, and the caller sleeps until the last task is
/// done and wakes it: two thread hand-offs per op, hundreds per training
/// step, with only the workers computing. Called from a worker, the loop
/// splits on that worker's own deque, the worker computes its share, and
/// the serial code between the ops runs on it without a hand-off.
///
/// The other workers do not go to sleep between the job's ops while it
/// runs ([`keep_warm`]).
///
/// A one-thread pool runs `job` here instead: its one worker, blocked in a
/// job that waits on another thread's rayon work, would deadlock.
pub(crate) fn on_worker<R: Send>(job: impl FnOnce() -> R + Send) -> R {
    if rayon::current_num_threads() < 2 {
        return job();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let driver = rayon::current_thread_index();
        let done = &done;
        s.spawn_broadcast(move |_, ctx| {
            if Some(ctx.index()) != driver {
                keep_warm(done);
            }
        });
        // Set on the way out, a panic included: the scope waits for the
        // workers' loops, which would otherwise never end.
        let _stop = StopOnDrop(done);
        job()
    })
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Keeps a worker looking for work until `done`: it runs whatever rayon
/// tasks it finds, and between them gives its core to any other runnable
/// thread (`sched_yield`) instead of going to sleep.
///
/// An idle rayon worker sleeps after about 32 rounds of looking, and the
/// next parallel op must wake it: a futex wake-up, an inter-processor
/// interrupt, on a VM a halted vCPU resumed, tens of microseconds before it
/// takes its half. A training step is hundreds of short parallel ops with
/// serial code between them, so that latency is paid hundreds of times a
/// step. OpenMP's default wait policy (PyTorch's CPU threads) spins for the
/// same reason.
///
/// After [`SPIN_FOR`] without work (the job waits on its data loader, say)
/// the worker naps [`NAP`] between looks, as OpenMP's threads go to sleep
/// after their spin count: an idle job does not hold a core, and the first
/// op after such a pause goes without this worker for at most one nap.
fn keep_warm(done: &AtomicBool) {
    /// Far longer than the serial code between two ops of a step.
    const SPIN_FOR: Duration = Duration::from_millis(5);
    /// Short against the ops it may delay, long against a wake-up.
    const NAP: Duration = Duration::from_micros(500);
    let mut idle_since: Option<Instant> = None;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < SPIN_FOR {
            std::thread::yield_now();
        } else {
            std::thread::sleep(NAP);
        }
    }
}

/// Registers the CPU backend's fused kernels with core, once per process:
/// [`FlexAdamW`], [`FlexLayerNorm`] and [`FlexEmbedding`] (training;
/// flex's own LayerNorm and lookup are one op at inference), and
/// [`FlexLinear`], [`FlexGelu`] and [`FlexAttention`] (training and
/// inference); and, on glibc, the allocator settings of [`alloc`].
/// [`select`] calls it, so every command
/// and bench that runs on the CPU backend gets them.
pub fn register_kernels() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        alloc::keep_freed_memory();
        kernels::register::<dyn AdamWKernel<Flex>>(Arc::new(FlexAdamW));
        kernels::register::<dyn GeluKernel<Backend>>(Arc::new(FlexGelu));
        kernels::register::<dyn GeluKernel<Flex>>(Arc::new(FlexGelu));
        kernels::register::<dyn AttentionKernel<Backend>>(Arc::new(FlexAttention));
        kernels::register::<dyn AttentionKernel<Flex>>(Arc::new(FlexAttention));
        kernels::register::<dyn LayerNormKernel<Backend>>(Arc::new(FlexLayerNorm));
        kernels::register::<dyn EmbeddingKernel<Backend>>(Arc::new(FlexEmbedding));
        kernels::register::<dyn LinearKernel<Backend>>(Arc::new(FlexLinear));
        kernels::register::<dyn LinearKernel<Flex>>(Arc::new(FlexLinear));
    });
}

/// The exact GELU in one pass on rayon's threads, with its own backward.
///
/// [`gelu_composed`] is 5 element-wise kernels forward and about 10
/// backward on flex, whose `erf` and `exp` run on one thread with scalar
/// libm; at bench-tiny's img32 the composed GELU's `erf` alone took 6 % of
/// a training step. Here one parallel pass computes the value and, under
/// autodiff, the slope `Φ(x) + x·φ(x)` (two `exp`s per element, in
/// [`vmath`]'s vectorised float32 math rather than libm's scalar calls),
/// which the backward step multiplies the incoming gradient by (in place
/// where that buffer is not shared). Φ comes from `erfc`, so the far left
/// tail has no cancellation: more accurate than `½(1 + erf)`.
/// Flex's own fused `gelu_backward` is exact too, but computes `erf` again
/// on one thread, and measured no faster than the composition.
pub struct FlexGelu;

impl GeluKernel<Flex> for FlexGelu {
    fn gelu(&self, x: Tensor<Flex, 1>) -> Tensor<Flex, 1> {
        if x.dtype() != DType::F32 {
            return gelu_composed(x);
        }
        let y = gelu_in_place(dense(x));
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }
}

/// The value only, in place where `x` is not shared.
fn gelu_in_place(mut x: FlexTensor) -> FlexTensor {
    x.storage_mut::<f32>()
        .par_chunks_mut(CHUNK)
        .for_each(gelu_chunk);
    x
}

vectorised! {
    /// GELU in place over one chunk.
    fn gelu_chunk(c: &mut [f32]) {
        c.iter_mut().for_each(|v| *v = vmath::gelu(*v));
    }
}

vectorised! {
    /// GELU and its slope over one chunk of x, written into every slot of
    /// `y` and `slope` (each as long as `x`).
    fn gelu_and_slope_chunk(
        y: &mut [MaybeUninit<f32>],
        slope: &mut [MaybeUninit<f32>],
        x: &[f32],
    ) {
        assert!(y.len() == x.len() && slope.len() == x.len(), "one slot per input");
        for ((y, d), &x) in y.iter_mut().zip(slope.iter_mut()).zip(x) {
            let (value, s) = vmath::gelu_and_slope(x);
            y.write(value);
            d.write(s);
        }
    }
}

vectorised! {
    /// `g ⊙= d` over one chunk.
    fn multiply_chunk(g: &mut [f32], d: &[f32]) {
        g.iter_mut().zip(d).for_each(|(g, d)| *g *= d);
    }
}

impl GeluKernel<Backend> for FlexGelu {
    fn gelu(&self, x: Tensor<Backend, 1>) -> Tensor<Backend, 1> {
        if x.dtype() != DType::F32 {
            return gelu_composed(x);
        }
        let x = x.into_primitive().tensor();
        let node = x.node.clone();
        let input = dense_flex(x.primitive);
        let y = match GeluBackward
            .prepare::<NoCheckpointing>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let shape = input.layout().shape().clone();
                // Written in full by the rayon tasks, never zeroed first (a
                // `memset` of both on this thread while the workers wait).
                let (mut y, mut slope) = (Unset::new(shape.clone()), Unset::new(shape));
                y.slots()
                    .par_chunks_mut(CHUNK)
                    .zip(slope.slots().par_chunks_mut(CHUNK))
                    .zip(input.storage::<f32>().par_chunks(CHUNK))
                    .for_each(|((y, d), x)| gelu_and_slope_chunk(y, d, x));
                // SAFETY: the chunks of both cover every element, and
                // `gelu_and_slope_chunk` writes each one.
                #[allow(unsafe_code)]
                let (y, slope) = unsafe { (y.finish(), slope.finish()) };
                prep.finish(slope, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(gelu_in_place(input)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }
}

/// The backward step of [`FlexGelu`]: the incoming gradient times the
/// saved slope.
#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let slope = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let mut grad = dense_flex(grad);
            grad.storage_mut::<f32>()
                .par_chunks_mut(CHUNK)
                .zip(slope.storage::<f32>().par_chunks(CHUNK))
                .for_each(|(g, d)| multiply_chunk(g, d));
            grad
        });
    }
}

/// AdamW in one pass over each parameter, on rayon's threads.
///
/// The composed update ([`adamw_composed`]) is about 13 element-wise
/// passes, each a separate flex kernel that streams `[numel]` floats, and
/// flex runs its scalar ops on one thread. bench-tiny's 19.1 M parameters
/// (12.6 M in the token embedding) made that 110–130 ms of every step on
/// two cores. One pass reads w, g, m, v and writes w, m, v: 28 bytes per
/// parameter, 536 MB per step. Same arithmetic in the same order, so the
/// result is the composed one's (the tests below compare them).
pub struct FlexAdamW;

/// Parameters per rayon task: 64 KiB of each of the four arrays.
const CHUNK: usize = 1 << 14;

impl AdamWKernel<Flex> for FlexAdamW {
    fn update(
        &self,
        w: Tensor<Flex, 1>,
        g: Tensor<Flex, 1>,
        m: Tensor<Flex, 1>,
        v: Tensor<Flex, 1>,
        s: &AdamWScalars,
    ) -> [Tensor<Flex, 1>; 3] {
        // The master weights are float32; anything else takes the generic path.
        if [&w, &g, &m, &v].iter().any(|t| t.dtype() != DType::F32) {
            return adamw_composed(w, g, m, v, s);
        }
        let (mut w, g, mut m, mut v) = (dense(w), dense(g), dense(m), dense(v));
        let k = Coefficients::new(s);
        // Copy-on-write: a buffer still shared (say, with a saved state)
        // is copied first, so nothing else sees the update.
        let (ws, ms, vs) = (
            w.storage_mut::<f32>(),
            m.storage_mut::<f32>(),
            v.storage_mut::<f32>(),
        );
        ws.par_chunks_mut(CHUNK)
            .zip(ms.par_chunks_mut(CHUNK))
            .zip(vs.par_chunks_mut(CHUNK))
            .zip(g.storage::<f32>().par_chunks(CHUNK))
            .for_each(|(((w, m), v), g)| adamw_chunk(&k, w, m, v, g));
        [w, m, v].map(|t| Tensor::from_primitive(TensorPrimitive::Float(t)))
    }
}

/// `t`'s storage as a contiguous buffer holding exactly its elements
/// (a view is copied out first).
fn dense(t: Tensor<Flex, 1>) -> FlexTensor {
    dense_flex(t.into_primitive().tensor())
}

/// The gradient registered so far for parent `i` of `ops`, taken out of
/// `grads` for the step to add its own into and register again: `Some`
/// only where it is float32 and of `shape` (and then dense). A gradient of
/// another kind is left registered, for autodiff's `register` to add to as
/// before.
///
/// A kernel's backward that writes a gradient in a pass of its own can add
/// the earlier one in that same pass (or let `gemm` accumulate onto it),
/// where `register` would add the two with flex's element-wise add on the
/// thread that drives the step while the rayon workers wait: 32 such sums
/// of `[batch, tokens, width]` per bench-tiny step (the residual stream,
/// and the input the query, key and value projections share).
/// `Gradients::remove` takes a tensor, so a probe carries the node.
fn take_earlier_grad<S, const N: usize>(
    grads: &mut Gradients,
    ops: &Ops<S, N>,
    i: usize,
    shape: &Shape,
) -> Option<FlexTensor> {
    let node = ops.parents[i].as_ref()?;
    let mut probe = Tensor::<Backend, 1>::empty([0], &Default::default())
        .into_primitive()
        .tensor();
    probe.node = node.clone();
    probe.rc = Arc::new(node.id);
    let g = grads.remove::<Flex>(&probe)?;
    if g.dtype() == DType::F32 && g.layout().shape() == shape {
        Some(dense_flex(g))
    } else {
        grads.register::<Flex>(node.id, g);
        None
    }
}

/// `t` (float32: the byte count assumes it) as a contiguous buffer holding
/// exactly its elements, in row-major order from offset 0 (a view is
/// copied out first).
fn dense_flex(t: FlexTensor) -> FlexTensor {
    debug_assert_eq!(t.dtype(), DType::F32, "the kernels take float32 only");
    let exact = t.is_contiguous()
        && t.layout().start_offset() == 0
        && t.bytes().len() == t.layout().num_elements() * size_of::<f32>();
    if exact { t } else { t.to_contiguous() }
}

/// [`AdamWScalars`] in float32, as Burn's scalar ops convert them.
struct Coefficients {
    grad_scale: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    step_size: f32,
    keep: f32,
}

impl Coefficients {
    fn new(s: &AdamWScalars) -> Self {
        Self {
            grad_scale: s.grad_scale as f32,
            beta1: s.beta1 as f32,
            one_minus_beta1: (1.0 - s.beta1) as f32,
            beta2: s.beta2 as f32,
            one_minus_beta2: (1.0 - s.beta2) as f32,
            eps: s.eps as f32,
            step_size: s.step_size as f32,
            keep: s.keep as f32,
        }
    }
}

vectorised! {
    /// The update of one chunk, operation for operation as
    /// [`adamw_composed`] (multiplying by an exact 1 where it skips a pass).
    fn adamw_chunk(k: &Coefficients, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = g * k.grad_scale;
            *m = *m * k.beta1 + g * k.one_minus_beta1;
            *v = *v * k.beta2 + g * g * k.one_minus_beta2;
            *w = *w * k.keep - *m / (v.sqrt() + k.eps) * k.step_size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use clipa_core::numeric::{normal_data, relative_error};

    /// A job on a worker returns its value with the other workers kept
    /// looking for work, its parallel loops still split across the pool,
    /// and a job that panics hands the panic back instead of leaving the
    /// scope waiting forever on those workers.
    #[test]
    fn a_job_on_a_worker_returns_splits_its_loops_and_passes_panics_on() {
        let (sum, threads, driver) = on_worker(|| {
            let ids = std::sync::Mutex::new(std::collections::HashSet::new());
            let sum: u64 = (0..1_000_000usize)
                .into_par_iter()
                .with_max_len(1_000)
                .map(|i| {
                    let i = i as u64;
                    ids.lock().unwrap().insert(std::thread::current().id());
                    // Long enough that an idle worker steals a share.
                    std::hint::black_box((0..50).fold(i, |a, b| a ^ b))
                })
                .sum();
            let driver = rayon::current_thread_index();
            (sum, ids.into_inner().unwrap(), driver)
        });
        let want: u64 = (0..1_000_000u64)
            .map(|i| (0..50).fold(i, |a, b| a ^ b))
            .sum();
        assert_eq!(sum, want);
        if rayon::current_num_threads() >= 2 {
            assert!(driver.is_some(), "the job ran on a worker");
            assert!(threads.len() >= 2, "one thread did every task: {threads:?}");
        }
        let panicked = std::panic::catch_unwind(|| on_worker(|| panic!("a failing job")));
        assert!(panicked.is_err());
    }

    /// The fused kernel gives the composed update: with and without
    /// clipping and decay, from zero and from non-zero moments, on a length
    /// that is not a multiple of the chunk.
    #[test]
    fn fused_adamw_matches_the_composed_update() {
        let device = Default::default();
        let n = 3 * CHUNK + 77;
        let t = |seed, std| Tensor::<Flex, 1>::from_data(normal_data([n], seed, std), &device);
        let v0 = t(4, 1e-3).abs();
        for (grad_scale, keep, m, v) in [
            (1.0, 1.0, t(3, 0.0), t(3, 0.0)),
            (0.37, 1.0 - 1e-4 * 0.1, t(3, 1e-2), v0.clone()),
            (1.0, 1.0 - 5e-4 * 0.2, t(5, 1e-2), v0),
        ] {
            let s = AdamWScalars {
                grad_scale,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-6 * (1.0f64 - 0.98f64.powi(3)).sqrt(),
                step_size: 1e-3 * (1.0f64 - 0.98f64.powi(3)).sqrt() / (1.0 - 0.9f64.powi(3)),
                keep,
            };
            let (w, g) = (t(1, 0.05), t(2, 1e-2));
            let before = w.to_data();
            let want = adamw_composed(w.clone(), g.clone(), m.clone(), v.clone(), &s);
            let got = FlexAdamW.update(w, g, m, v, &s);
            let mut after = None;
            for (name, (got, want)) in ["w", "m", "v"].iter().zip(got.into_iter().zip(want)) {
                let (got, want): (TensorData, TensorData) = (got.into_data(), want.into_data());
                let err = relative_error(&got, &want);
                assert!(err <= 1e-7, "{name}: relative error {err:.2e}");
                after.get_or_insert(got);
            }
            // The step moved the weights: a kernel that did nothing would
            // not pass by matching a composed update that did nothing.
            let moved = relative_error(&after.expect("w"), &before);
            assert!(moved > 1e-6, "the weights moved by {moved:.2e}");
        }
    }

    /// The GELU kernel against the composed GELU: values and gradients
    /// through a weighted sum, on a length that is not a
    /// multiple of the chunk; then inference (no autodiff).
    #[test]
    fn fused_gelu_matches_the_composed_one() {
        let device = Default::default();
        let n = 2 * CHUNK + 5;
        let w = Tensor::<Backend, 1>::from_data(normal_data([n], 2, 1.0), &device);
        let run = |fused: bool| {
            let x =
                Tensor::<Backend, 1>::from_data(normal_data([n], 1, 2.0), &device).require_grad();
            // An intermediate, as in the model (Burn marks only leaves as
            // requiring gradients).
            let h = x.clone() * 1.5;
            let y = if fused {
                GeluKernel::<Backend>::gelu(&FlexGelu, h)
            } else {
                gelu_composed(h)
            };
            let grads = (y.clone() * w.clone()).sum().backward();
            (
                y.into_data(),
                x.grad(&grads).expect("x has a gradient").into_data(),
            )
        };
        let ((yf, gf), (yc, gc)) = (run(true), run(false));
        let err = relative_error(&yf, &yc);
        assert!(err <= 1e-7, "value relative error {err:.2e}");
        let err = relative_error(&gf, &gc);
        assert!(err <= 1e-6, "gradient relative error {err:.2e}");
        let x = Tensor::<Flex, 1>::from_data(normal_data([n], 1, 2.0), &device);
        let yi = GeluKernel::<Flex>::gelu(&FlexGelu, x.clone()).into_data();
        let err = relative_error(&yi, &gelu_composed(x).into_data());
        assert!(err <= 1e-7, "inference value relative error {err:.2e}");
    }

    /// Selecting the CPU device registers the kernels for flex.
    #[test]
    fn selecting_the_cpu_registers_the_fused_kernels() {
        select(None).expect("the CPU device");
        assert!(kernels::lookup::<dyn AdamWKernel<Flex>>().is_some());
        assert!(kernels::lookup::<dyn GeluKernel<Backend>>().is_some());
        assert!(kernels::lookup::<dyn GeluKernel<Flex>>().is_some());
        assert!(kernels::lookup::<dyn AttentionKernel<Backend>>().is_some());
        assert!(kernels::lookup::<dyn AttentionKernel<Flex>>().is_some());
        assert!(kernels::lookup::<dyn LayerNormKernel<Backend>>().is_some());
        assert!(kernels::lookup::<dyn EmbeddingKernel<Backend>>().is_some());
        assert!(kernels::lookup::<dyn LinearKernel<Backend>>().is_some());
        assert!(kernels::lookup::<dyn LinearKernel<Flex>>().is_some());
        let opt = clipa_core::train::optim::AdamW::<Flex>::new(Default::default());
        assert!(opt.is_fused());
    }
}

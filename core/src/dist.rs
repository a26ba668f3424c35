//! Data parallelism on Burn's collective operations (`burn-collective`).
//!
//! A run on `N` devices is `N` replicas of one model. Each replica holds
//! `batch / N` rows of the global batch; the contrastive loss still compares
//! every image with every caption of the global batch (the step's
//! all-gather of features, `train::step`), and the replicas' parameter
//! gradients are summed before every optimiser step, so all replicas take
//! the same step and stay identical.
//!
//! The replicas are threads of one process, one per device (burn-collective's
//! local mode). Its global mode (processes on several machines) is not used:
//! in Burn 0.21.0 its inter-node barrier never resets, so the second
//! all-reduce of a run waits forever (docs/DISTRIBUTED.md).
//!
//! Every collective call is made on the inner (non-autodiff) backend: Burn's
//! all-reduce has no backward pass, so the step writes the backward of its
//! all-gather out as a second all-reduce (see `train::step`).

use std::collections::HashSet;
use std::marker::PhantomData;

use burn::collective::{
    self, AllReduceStrategy, CollectiveConfig, CollectiveError, PeerId, ReduceOperation,
};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::{Error, Result};

/// Where one replica sits in the run, and its handle on the collective.
///
/// `Replica::single()` is the one-device case: every collective call is the
/// identity and nothing is registered, so single-device training pays
/// nothing for this.
pub struct Replica<B: AutodiffBackend> {
    rank: usize,
    world: usize,
    peer: Option<PeerId>,
    _backend: PhantomData<fn() -> B>,
}

impl<B: AutodiffBackend> std::fmt::Debug for Replica<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replica({}/{})", self.rank, self.world)
    }
}

fn collective_error(what: &str, e: CollectiveError) -> Error {
    Error::Collective(format!("{what}: {e:?}"))
}

impl<B: AutodiffBackend> Replica<B> {
    /// The only replica of a one-device run.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            peer: None,
            _backend: PhantomData,
        }
    }

    /// Joins the collective as replica `rank` of `world` (threads of this
    /// process, one per device). Blocks until every replica has joined.
    pub fn join(rank: usize, world: usize, device: &B::Device) -> Result<Self> {
        let config = CollectiveConfig::default()
            .with_num_devices(world)
            // Burn's binary tree, not its ring: the ring moves less in
            // theory (2(N−1)/N of a tensor per replica) but slices and
            // re-joins the tensor at every hop, and measured 6–7× slower on
            // 2 CPU replicas (docs/BENCHMARKS.md, `cpu/collective`).
            .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
        if world == 1 {
            return Ok(Self::single());
        }
        let peer = PeerId::from(rank);
        collective::register::<B::InnerBackend>(peer, device.clone(), config)
            .map_err(|e| collective_error("joining the collective", e))?;
        Ok(Self {
            rank,
            world,
            peer: Some(peer),
            _backend: PhantomData,
        })
    }

    /// Leaves the collective.
    pub fn leave(self) -> Result<()> {
        match self.peer {
            Some(peer) => collective::finish_collective::<B::InnerBackend>(peer)
                .map_err(|e| collective_error("leaving the collective", e)),
            None => Ok(()),
        }
    }

    /// Frees every replica of this process that is blocked in a collective
    /// call (they fail with an error): used when one replica fails, so that
    /// the others do not wait for it forever.
    pub fn abort_all() {
        collective::reset_collective::<B::InnerBackend>();
    }

    /// This replica's index in the run, `0..world`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Replicas in the run.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Replica 0 writes checkpoints, metrics and evaluations.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// The element-wise sum of `tensor` over all replicas (every replica
    /// gets the result). The identity for one replica.
    pub fn sum<const D: usize>(
        &self,
        tensor: Tensor<B::InnerBackend, D>,
    ) -> Result<Tensor<B::InnerBackend, D>> {
        let Some(peer) = self.peer else {
            return Ok(tensor);
        };
        let out = collective::all_reduce::<B::InnerBackend>(
            peer,
            tensor.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| collective_error("all-reduce", e))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Whether `flag` is set on any replica, so that all stop together.
    pub fn any(&self, flag: bool, device: &B::Device) -> Result<bool> {
        if self.peer.is_none() {
            return Ok(flag);
        }
        let t = Tensor::<B::InnerBackend, 1>::from_floats([f32::from(u8::from(flag))], device);
        Ok(self.sum(t)?.into_scalar().elem::<f32>() > 0.0)
    }

    /// Sums the parameter gradients of all replicas.
    ///
    /// The gradients are flattened, in the module's parameter order, into
    /// one `[params]` vector and summed with a single all-reduce: one
    /// round trip per step instead of one per tensor, and an order that is
    /// the same on every replica (parameter ids differ between replicas, so
    /// Burn's `GradientsParams::all_reduce`, which orders by id, cannot be
    /// used).
    pub fn sum_grads<M: AutodiffModule<B>>(
        &self,
        model: &M,
        mut grads: GradientsParams,
    ) -> Result<GradientsParams> {
        if self.peer.is_none() {
            return Ok(grads);
        }
        let mut flat = Flatten::<B> {
            grads: &mut grads,
            parts: Vec::new(),
            present: Default::default(),
        };
        model.visit(&mut flat);
        // Every replica runs the same code, so the same parameters have
        // gradients everywhere (a SigLIP bias under the softmax loss has
        // none on any replica).
        let (parts, present) = (
            std::mem::take(&mut flat.parts),
            std::mem::take(&mut flat.present),
        );
        if parts.is_empty() {
            return Ok(grads);
        }
        let summed = self.sum(Tensor::cat(parts, 0))?; // [params]
        let mut split = Unflatten::<B> {
            grads: &mut grads,
            flat: summed,
            offset: 0,
            present,
        };
        model.visit(&mut split);
        Ok(grads)
    }

    /// Gives every replica replica 0's parameters (a sum in which the other
    /// replicas contribute zeros, as broadcast is not available across
    /// nodes). Run once at the start, so that replicas initialised in
    /// parallel (whose random streams interleave) start equal.
    pub fn share_weights<M: AutodiffModule<B>>(&self, model: M) -> Result<M> {
        if self.peer.is_none() {
            return Ok(model);
        }
        let mut mapper = Share::<B> {
            replica: self,
            error: None,
        };
        let model = model.map(&mut mapper);
        match mapper.error {
            Some(e) => Err(e),
            None => Ok(model),
        }
    }
}

use burn::tensor::ElementConversion;

/// Takes each parameter's gradient out of `grads`, flattened, in visiting
/// order.
struct Flatten<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
    present: HashSet<ParamId>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.parts.push(g.reshape([-1]));
            self.present.insert(param.id);
        }
    }
}

/// Puts the summed gradients back, in the same visiting order.
struct Unflatten<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    flat: Tensor<B::InnerBackend, 1>,
    offset: usize,
    present: HashSet<ParamId>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !self.present.contains(&param.id) {
            return;
        }
        let shape = param.lazy_shape();
        let n = shape.num_elements();
        let dims: [usize; D] = shape.dims();
        let g = self.flat.clone().narrow(0, self.offset, n).reshape(dims);
        self.offset += n;
        self.grads.register::<B::InnerBackend, D>(param.id, g);
    }
}

/// Replaces each parameter by replica 0's value.
struct Share<'a, B: AutodiffBackend> {
    replica: &'a Replica<B>,
    error: Option<Error>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Share<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.error.is_some() {
            return param;
        }
        let id = param.id;
        let value = param.val().inner();
        let mine = if self.replica.is_leader() {
            value
        } else {
            value.zeros_like()
        };
        match self.replica.sum(mine) {
            Ok(shared) => param.transform_for_load(Tensor::from_inner(shared), id),
            Err(e) => {
                self.error = Some(e);
                param
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::numeric::TestBackend;
    use std::sync::{Mutex, MutexGuard};

    /// The collective server is one per backend type and process: tests
    /// that use it take turns.
    pub(crate) fn exclusive() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn replicas_sum_and_share_weights() {
        let _turn = exclusive();
        let world = 3;
        // Per replica: the sum, `any`, its own init and the shared weights.
        type Seen = (Vec<f32>, bool, Vec<f32>, Vec<f32>);
        let out: Vec<Seen> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|r| {
                    s.spawn(move || {
                        let device = Default::default();
                        let rep = Replica::<TestBackend>::join(r, world, &device).unwrap();
                        assert_eq!((rep.rank(), rep.world()), (r, world));
                        let t = Tensor::<<TestBackend as AutodiffBackend>::InnerBackend, 1>::from_floats(
                            [r as f32, 1.0],
                            &device,
                        );
                        let sum = rep.sum(t).unwrap().into_data().to_vec::<f32>().unwrap();
                        let any = rep.any(r == 1, &device).unwrap();
                        // Different random inits become replica 0's.
                        let block = crate::nn::ResidualBlockConfig::new(4, 2, 8)
                            .init::<TestBackend>(&device);
                        let weight = |b: &crate::nn::ResidualBlock<TestBackend>| {
                            b.attn.query.weight.val().into_data().to_vec::<f32>().unwrap()
                        };
                        let own = weight(&block);
                        let block = rep.share_weights(block).unwrap();
                        let shared = weight(&block);
                        rep.leave().unwrap();
                        (sum, any, own, shared)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, any, _, shared) in &out {
            assert_eq!(sum, &[3.0, 3.0]);
            assert!(any);
            assert_eq!(shared, &out[0].2, "every replica holds replica 0's init");
        }
    }
}

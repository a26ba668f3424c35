//! Data parallelism on Burn's collective operations (`burn-collective`).
//!
//! A run on `N` devices is `N` replicas of one model. Each replica holds
//! `batch / N` rows of the global batch; the contrastive loss still compares
//! every image with every caption of the global batch (the step's
//! all-gather of features, `train::step`), and the replicas' parameter
//! gradients are summed before every optimiser step, so all replicas take
//! the same step and stay identical.
//!
//! - **Local mode**: the replicas are threads of one process, one per device
//!   (burn-collective's in-process server).
//! - **Global mode**: one process per machine ("node"), each with its local
//!   replicas, joined through an orchestrator ([`serve_orchestrator`], run by
//!   `clipa orchestrator`) that tells the nodes of each other; the nodes then
//!   exchange tensors directly.
//!
//! Every collective call is made on the inner (non-autodiff) backend: Burn's
//! all-reduce has no backward pass, so the step writes the backward of its
//! all-gather out as a second all-reduce (see `train::step`).

use std::collections::HashSet;
use std::marker::PhantomData;
use std::str::FromStr;

use burn::collective::{
    self, AllReduceStrategy, CollectiveConfig, CollectiveError, PeerId, ReduceOperation,
};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_communication::Address;

use crate::{Error, Result};

/// The machines of a multi-node run, as seen from one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Machines in the run (each runs one `clipa train` process).
    pub num_nodes: u32,
    /// This machine's index, `0..num_nodes`.
    pub node_rank: u32,
    /// `host:port` of the orchestrator (`clipa orchestrator --port P`).
    pub orchestrator: String,
    /// The host name or address other nodes reach this one at.
    pub host: String,
    /// The port this node serves its tensors on.
    pub data_port: u16,
}

impl NodeConfig {
    /// Checks the ranks and addresses, naming what is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.num_nodes == 0 || self.node_rank >= self.num_nodes {
            return Err(Error::Config(format!(
                "node rank {} is not below the number of nodes {}",
                self.node_rank, self.num_nodes
            )));
        }
        if !self.orchestrator.contains(':') {
            return Err(Error::Config(format!(
                "orchestrator address '{}' needs a port (host:port)",
                self.orchestrator
            )));
        }
        if self.host.is_empty() {
            return Err(Error::Config("this node's host name is empty".into()));
        }
        Ok(())
    }

    fn address(host_port: &str) -> Address {
        Address::from_str(&format!("ws://{host_port}")).expect("any string is an address")
    }
}

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

    /// Joins the collective as local replica `local` of `local_count` on
    /// this machine (and, with `node`, of the whole run). Blocks until every
    /// local replica has joined; in global mode the first collective call
    /// then waits for the other nodes.
    pub fn join(
        local: usize,
        local_count: usize,
        node: Option<&NodeConfig>,
        device: &B::Device,
    ) -> Result<Self> {
        let mut config = CollectiveConfig::default()
            .with_num_devices(local_count)
            // Ring all-reduce moves 2(N−1)/N of a tensor per replica, the
            // bandwidth floor; burn falls back to a tree for tiny tensors.
            .with_local_all_reduce_strategy(AllReduceStrategy::Ring);
        let (rank, world) = match node {
            None => (local, local_count),
            Some(n) => {
                n.validate()?;
                config = config
                    .with_num_nodes(n.num_nodes)
                    .with_global_address(NodeConfig::address(&n.orchestrator))
                    .with_node_address(NodeConfig::address(&format!("{}:{}", n.host, n.data_port)))
                    .with_data_service_port(n.data_port)
                    .with_global_all_reduce_strategy(AllReduceStrategy::Ring);
                (
                    n.node_rank as usize * local_count + local,
                    n.num_nodes as usize * local_count,
                )
            }
        };
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

    /// Leaves the collective (the last local replica to leave closes this
    /// node's connection in global mode).
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

/// Runs the orchestrator of a multi-node run on `port` until the process is
/// stopped: it introduces the nodes to each other (the tensors then flow
/// between nodes directly).
pub fn serve_orchestrator(port: u16) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Collective(format!("starting the orchestrator's runtime: {e}")))?;
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
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
        let out: Vec<(Vec<f32>, bool, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|r| {
                    s.spawn(move || {
                        let device = Default::default();
                        let rep = Replica::<TestBackend>::join(r, world, None, &device).unwrap();
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

    #[test]
    fn a_node_config_names_its_mistakes() {
        let node = NodeConfig {
            num_nodes: 2,
            node_rank: 2,
            orchestrator: "head:3000".into(),
            host: "me".into(),
            data_port: 3001,
        };
        assert!(
            node.validate()
                .unwrap_err()
                .to_string()
                .contains("node rank 2")
        );
        let node = NodeConfig {
            node_rank: 1,
            orchestrator: "head".into(),
            ..node
        };
        assert!(
            node.validate()
                .unwrap_err()
                .to_string()
                .contains("needs a port")
        );
    }
}

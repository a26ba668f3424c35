//! Data parallelism on Burn's collective operations (`burn-collective`).
//!
//! A run on `N` devices is `N` replicas of one model. Each replica holds
//! `batch / N` rows of the global batch; the contrastive loss still compares
//! every image with every caption of the global batch (the step's
//! all-gather of features, `train::step`), and the replicas' parameter
//! gradients are summed before every optimiser step, so all replicas take
//! the same step and stay identical.
//!
//! The replicas of one machine are threads of one process, one per device
//! (burn-collective's local mode). Machines are joined by its global mode:
//! one process per machine, introduced to each other by an orchestrator that
//! node 0 hosts ([`host_orchestrator`]), with tree all-reduces between them
//! over WebSockets. burn-collective 0.21.0's inter-node barrier never reset,
//! so the second all-reduce between machines waited forever; clipa builds a
//! patched copy (`patches/burn-collective/PATCH.md`). burn-collective has no
//! timeout: `crate::nodes::Watchdog` ends a run whose machine is gone.
//!
//! A build may bring its own all-reduce for the replicas of one process
//! ([`LocalSum`]: NCCL in a `cuda-nccl` build); burn-collective then only
//! joins the machines, one registration per machine.
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
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use crate::nodes::{CollectiveClock, NodeConfig};
use crate::{Error, Result};

/// An all-reduce (sum) among the replicas of one process that takes the
/// place of burn-collective's local one: NCCL in a `cuda-nccl` build
/// (`clipa-backends`). Every replica of the process calls it with a tensor
/// of the same shape, in the same order, and gets the sum back.
pub trait LocalSum<B: Backend>: Send + Sync {
    /// The element-wise sum of `tensor` over this process's replicas.
    fn sum(
        &self,
        tensor: B::FloatTensorPrimitive,
    ) -> std::result::Result<B::FloatTensorPrimitive, String>;
}

/// How the replicas of a run are laid out: this process's devices, the
/// machine it runs on, and the all-reduce its replicas share.
pub struct Layout<B: AutodiffBackend> {
    /// Replicas (devices) in this process.
    pub local_count: usize,
    /// The machines of the run; `None` on one machine.
    pub node: Option<NodeConfig>,
    /// The address other machines reach this one at (`NodeConfig::local_host`).
    pub host: String,
    /// This process's own all-reduce; `None` uses burn-collective's.
    pub local_sum: Option<std::sync::Arc<dyn LocalSum<B::InnerBackend>>>,
    /// Every collective call of this process's replicas, for the stall
    /// check of a run across machines ([`crate::nodes::Watchdog::watch_collectives`]).
    pub clock: std::sync::Arc<CollectiveClock>,
}

impl<B: AutodiffBackend> Layout<B> {
    /// `local_count` replicas on one machine, with burn-collective.
    pub fn local(local_count: usize) -> Self {
        Self {
            local_count,
            node: None,
            host: String::new(),
            local_sum: None,
            clock: Default::default(),
        }
    }

    /// Machines in the run.
    pub fn num_nodes(&self) -> usize {
        self.node.as_ref().map_or(1, |n| n.num_nodes as usize)
    }

    /// This machine's index.
    pub fn node_rank(&self) -> usize {
        self.node.as_ref().map_or(0, |n| n.node_rank as usize)
    }

    /// Replicas in the run.
    pub fn world(&self) -> usize {
        self.num_nodes() * self.local_count
    }
}

/// The replicas of one process that have not ended yet, so that one that
/// fails can free the others from the collective calls that wait for it.
#[derive(Debug)]
pub struct Crew {
    live: std::sync::atomic::AtomicUsize,
}

impl Crew {
    /// A process of `replicas` replicas, all running.
    pub fn new(replicas: usize) -> Self {
        Self {
            live: replicas.into(),
        }
    }

    /// Marks one replica as ended. One that `failed` then resets the
    /// process's collective (every pending call fails) until all the others
    /// have ended too. Once is not enough: a replica that reaches its next
    /// all-reduce after the reset (still loading its checkpoint, say) would
    /// wait for the failed one anew.
    pub fn end<B: AutodiffBackend>(&self, failed: bool) {
        use std::sync::atomic::Ordering::SeqCst;
        self.live.fetch_sub(1, SeqCst);
        while failed && self.live.load(SeqCst) > 0 {
            Replica::<B>::abort_all();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
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
    /// This replica's index in its process, `0..local_count`.
    local: usize,
    /// Machines in the run.
    nodes: usize,
    /// burn-collective registration: every replica's, or (with a
    /// [`LocalSum`]) only local replica 0's, which joins the machines.
    peer: Option<PeerId>,
    local_sum: Option<std::sync::Arc<dyn LocalSum<B::InnerBackend>>>,
    /// The process's [`Layout::clock`].
    clock: std::sync::Arc<CollectiveClock>,
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
            local: 0,
            nodes: 1,
            peer: None,
            local_sum: None,
            clock: Default::default(),
            _backend: PhantomData,
        }
    }

    /// Joins the collective as replica `rank` of `world` (threads of this
    /// process, one per device). Blocks until every replica has joined.
    pub fn join(rank: usize, world: usize, device: &B::Device) -> Result<Self> {
        Self::join_layout(&Layout::local(world), rank, device)
    }

    /// Joins the collective as local replica `local` of `layout`. Blocks
    /// until every replica of this process has joined; across machines the
    /// first all-reduce then waits for the other machines.
    pub fn join_layout(layout: &Layout<B>, local: usize, device: &B::Device) -> Result<Self> {
        let world = layout.world();
        if world == 1 {
            return Ok(Self::single());
        }
        let rank = layout.node_rank() * layout.local_count + local;
        let mut rep = Self {
            rank,
            world,
            local,
            nodes: layout.num_nodes(),
            peer: None,
            local_sum: layout.local_sum.clone(),
            clock: layout.clock.clone(),
            _backend: PhantomData,
        };
        // Who registers with burn-collective, and as how many devices.
        let (peer, devices) = match (&layout.local_sum, &layout.node) {
            (None, _) => (PeerId::from(rank), layout.local_count),
            // The process's own all-reduce does the devices; local replica 0
            // joins the machines, one peer per machine.
            (Some(_), Some(n)) if local == 0 => (PeerId::from(n.node_rank as usize), 1),
            (Some(_), _) => return Ok(rep),
        };
        let mut config = CollectiveConfig::default()
            .with_num_devices(devices)
            // Burn's binary tree, not its ring: the ring moves less in
            // theory (2(N−1)/N of a tensor per replica) but slices and
            // re-joins the tensor at every hop, and measured 6–7× slower on
            // 2 CPU replicas (docs/BENCHMARKS.md, `cpu/collective`).
            .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
        if let Some(n) = &layout.node {
            let data_port = n.data_port();
            let address = |host: &str, port: u16| {
                // An IPv6 host goes in brackets in a URL.
                let host = match host.contains(':') {
                    true => format!("[{host}]"),
                    false => host.to_string(),
                };
                format!("ws://{host}:{port}")
                    .parse()
                    .expect("an address parses from any string")
            };
            config = config
                .with_num_nodes(n.num_nodes)
                .with_global_address(address(n.master_host(), n.orchestrator_port()))
                .with_node_address(address(&layout.host, data_port))
                .with_data_service_port(data_port)
                // The tree between machines too: the global ring cannot
                // split a tensor shorter than the number of machines (the
                // loss, the stop flag).
                .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2));
        }
        let clock = rep.clock.clone();
        let _in_flight = clock.begin();
        collective::register::<B::InnerBackend>(peer, device.clone(), config)
            .map_err(|e| collective_error("joining the collective", e))?;
        rep.peer = Some(peer);
        Ok(rep)
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

    /// The rank of this process's first replica: its replicas are ranks
    /// `local_first()..local_first() + local_count`.
    pub fn local_first(&self) -> usize {
        self.rank - self.local
    }

    /// Whether this replica is its process's first (it speaks for the
    /// process's data in [`Replica::gather_bytes`]).
    pub fn is_local_leader(&self) -> bool {
        self.local == 0
    }

    /// Machines in the run.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The element-wise sum of `tensor` over all replicas (every replica
    /// gets the result). The identity for one replica.
    pub fn sum<const D: usize>(
        &self,
        tensor: Tensor<B::InnerBackend, D>,
    ) -> Result<Tensor<B::InnerBackend, D>> {
        if self.world == 1 {
            return Ok(tensor);
        }
        let _in_flight = self.clock.begin();
        let global = |t: Tensor<B::InnerBackend, D>, peer: PeerId| {
            collective::all_reduce::<B::InnerBackend>(
                peer,
                t.into_primitive().tensor(),
                ReduceOperation::Sum,
            )
            .map(|out| Tensor::from_primitive(TensorPrimitive::Float(out)))
            .map_err(|e| collective_error("all-reduce", e))
        };
        let Some(local_sum) = &self.local_sum else {
            let peer = self
                .peer
                .expect("every replica registers without a LocalSum");
            return global(tensor, peer);
        };
        let local = |t: Tensor<B::InnerBackend, D>| {
            local_sum
                .sum(t.into_primitive().tensor())
                .map(|out| Tensor::from_primitive(TensorPrimitive::Float(out)))
                .map_err(|e| Error::Collective(format!("all-reduce: {e}")))
        };
        let machine = local(tensor)?;
        if self.nodes == 1 {
            return Ok(machine);
        }
        // Local replica 0 sums the machines; the others contribute zeros
        // to a second local sum that hands them the result.
        let all = match self.peer {
            Some(peer) => global(machine, peer)?,
            None => machine.zeros_like(),
        };
        local(all)
    }

    /// Every replica's `mine`, in rank order (an all-gather of byte
    /// strings: two sums of zero-padded slots, lengths then bytes, each
    /// byte carried exactly by an f32). For small things, such as the data
    /// loaders' positions gathered into a checkpoint.
    pub fn gather_bytes(&self, mine: &[u8], device: &B::Device) -> Result<Vec<Vec<u8>>> {
        if self.world == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        let (w, r) = (self.world, self.rank);
        let mut lens = vec![0f32; w];
        lens[r] = mine.len() as f32;
        let lens: Vec<usize> = self
            .sum(Tensor::<B::InnerBackend, 1>::from_data(
                TensorData::new(lens, [w]),
                device,
            ))?
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| Error::Collective(format!("gather: {e:?}")))?
            .into_iter()
            .map(|l| l as usize)
            .collect();
        let max = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut slots = vec![0f32; w * max];
        for (slot, &b) in slots[r * max..].iter_mut().zip(mine) {
            *slot = f32::from(b);
        }
        let all = self
            .sum(Tensor::<B::InnerBackend, 1>::from_data(
                TensorData::new(slots, [w * max]),
                device,
            ))?
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| Error::Collective(format!("gather: {e:?}")))?;
        Ok((0..w)
            .map(|i| {
                all[i * max..i * max + lens[i]]
                    .iter()
                    .map(|&v| v as u8)
                    .collect()
            })
            .collect())
    }

    /// Whether `flag` is set on any replica, so that all stop together.
    pub fn any(&self, flag: bool, device: &B::Device) -> Result<bool> {
        if self.world == 1 {
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
        if self.world == 1 {
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
        if self.world == 1 {
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

/// Fails with a one-line error when this node's tensor port is taken.
/// Called once per process before any replica registers: burn-collective
/// binds the port in a task of its own and drops a failed bind, after which
/// every machine would wait for this one forever.
pub fn check_data_port(node: &NodeConfig) -> Result<()> {
    let port = node.data_port();
    check_port(port, |e| {
        format!(
            "node {} cannot serve its tensors on port {port} (the master port + 2 + node rank): {e}",
            node.node_rank
        )
    })
}

/// Binds `port` on all interfaces once and lets it go, so that a port that
/// burn-collective would fail to bind in the background is an
/// [`Error::Config`] of `message(why)` here.
fn check_port(port: u16, message: impl FnOnce(std::io::Error) -> String) -> Result<()> {
    let bound = std::net::TcpListener::bind(("0.0.0.0", port));
    drop(bound.map_err(|e| Error::Config(message(e)))?);
    Ok(())
}

/// Runs burn-collective's orchestrator on `port` (all interfaces) in a
/// background thread of this process, for as long as it lives: node 0 of a
/// run hosts it, as torchrun's rank 0 hosts its store at `MASTER_PORT`. It
/// only introduces the machines to each other; tensors then flow between
/// them directly.
pub fn host_orchestrator(port: u16) -> Result<()> {
    // The orchestrator logs a failed bind and returns, after which every
    // machine would wait for it: find out here, with a one-line error.
    check_port(port, |e| {
        format!(
            "cannot serve the orchestrator on port {port}: {e} (choose another MASTER_PORT / --orchestrator port)"
        )
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("clipa-orchestrator")
        .build()
        .map_err(|e| Error::Collective(format!("starting the orchestrator's runtime: {e}")))?;
    std::thread::Builder::new()
        .name("clipa-orchestrator".into())
        .spawn(move || runtime.block_on(burn_collective::start_global_orchestrator(port)))
        .map_err(|e| Error::Collective(format!("starting the orchestrator: {e}")))?;
    Ok(())
}

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

    /// A replica that fails frees the others even when they reach their
    /// next all-reduce only after it failed (with a single reset, the late
    /// one waited forever).
    #[test]
    fn a_failed_replica_frees_one_that_calls_later() {
        let _turn = exclusive();
        let crew = std::sync::Arc::new(Crew::new(2));
        let (done, finished) = std::sync::mpsc::channel();
        // Not scoped: a replica that hangs must fail the test, not hang it.
        for r in 0..2 {
            let (crew, done) = (crew.clone(), done.clone());
            std::thread::spawn(move || {
                let device = Default::default();
                let rep = Replica::<TestBackend>::join(r, 2, &device).unwrap();
                let out = match r {
                    0 => Err(Error::Config("failed before its first sum".into())),
                    _ => {
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        let t = Tensor::<<TestBackend as AutodiffBackend>::InnerBackend, 1>::from_floats(
                            [1.0],
                            &device,
                        );
                        rep.sum(t).map(drop)
                    }
                };
                crew.end::<TestBackend>(out.is_err());
                done.send((r, out.is_err())).unwrap();
            });
        }
        let wait = std::time::Duration::from_secs(20);
        let mut ended: Vec<_> = (0..2)
            .map(|_| finished.recv_timeout(wait).expect("both replicas end"))
            .collect();
        ended.sort();
        assert_eq!(ended, [(0, true), (1, true)]);
    }

    /// Every replica gets every replica's bytes, in rank order, whatever
    /// their lengths (an empty one too), each byte exact.
    #[test]
    fn replicas_gather_byte_strings() {
        let _turn = exclusive();
        let world = 3;
        let mine = |r: usize| -> Vec<u8> { (0..r * 2).map(|i| (250 + i * 3) as u8).collect() };
        let got: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|r| {
                    s.spawn(move || {
                        let device = Default::default();
                        let rep = Replica::<TestBackend>::join(r, world, &device).unwrap();
                        let all = rep.gather_bytes(&mine(r), &device).unwrap();
                        rep.leave().unwrap();
                        all
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want: Vec<Vec<u8>> = (0..world).map(mine).collect();
        assert!(want[0].is_empty() && want[2].len() == 4);
        for all in got {
            assert_eq!(all, want);
        }
    }
}

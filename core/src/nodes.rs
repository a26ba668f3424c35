//! Where this process sits among the machines of a multi-node run, and a
//! watchdog that ends the run in bounded time when another machine dies.
//!
//! A run on several machines ("nodes") has one process per node. The
//! launcher hands out one address, node 0's `host:port` (`--orchestrator`,
//! or the `MASTER_ADDR` / `MASTER_PORT` that torchrun and SLURM recipes
//! export), and every port of the run derives from that master port; see
//! [`NodeConfig`].
//!
//! Why a watchdog: a collective operation waits for every peer, so when a
//! peer's machine dies the others wait forever, holding their GPUs. The
//! watchdog keeps one TCP connection from every node to node 0 (a star) with
//! a heartbeat line each second. A killed process is noticed at once (the
//! kernel closes its socket), a machine gone silent after `timeout`, and
//! node 0 tells every survivor, so that each one ends instead of hanging.
//!
//! The protocol is lines of text. Joining: `hello <rank> <nodes>` to node 0,
//! which answers `ready` once all are in, `refused <why>` to a node that
//! does not belong (a configuration mistake), or `abort <why>` when some
//! node did not join in time. Running: `hb` (heartbeat), `done` (a clean
//! end: the close that follows is no fault), `failed <rank> <why>` (the
//! sender failed on its own), `lost <rank> <why>` (node 0 to the others).

use std::fmt;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv6Addr, Shutdown, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Where this process sits among the machines of a multi-node run.
///
/// # Ports
/// All derive from the master port `P` of [`NodeConfig::master`], so that a
/// launcher hands out one address:
/// - `P`: Burn's orchestrator, run by node 0 ([`NodeConfig::orchestrator_port`]);
/// - `P + 1`: the [`Watchdog`], served by node 0 ([`NodeConfig::watch_port`]);
/// - `P + 2 + r`: node `r`'s tensor service ([`NodeConfig::data_port`]),
///   one port per node so that several nodes can share one machine.
///
/// The port methods panic on a hand-built config whose master has no port
/// or whose ports pass 65535; [`NodeConfig::resolve`] rules both out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Machines in the run, one process on each.
    pub num_nodes: u32,
    /// This machine's place, `0..num_nodes`. Node 0 runs the orchestrator
    /// and the watchdog.
    pub node_rank: u32,
    /// Node 0's address, `host:port` (`[v6]:port` for IPv6); the port is
    /// the master port `P`.
    pub master: String,
}

/// The node flags of `clipa train`, before the environment fills the gaps.
#[derive(Debug, Clone, Default)]
pub struct NodeFlags {
    /// `--num-nodes`.
    pub num_nodes: Option<u32>,
    /// `--node-rank`.
    pub node_rank: Option<u32>,
    /// `--orchestrator host:port`.
    pub orchestrator: Option<String>,
}

/// A number and where it came from, so that an error names the flag or
/// variable the user has to fix.
struct Sourced {
    value: u32,
    /// `--node-rank`, `SLURM_NODEID`.
    name: &'static str,
    /// `--node-rank 3`, `SLURM_NODEID=3`.
    shown: String,
}

/// The first of a flag and two environment variables that is set.
fn pick(
    flag: Option<u32>,
    flag_name: &'static str,
    vars: [&'static str; 2],
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<Sourced>> {
    if let Some(value) = flag {
        let shown = format!("{flag_name} {value}");
        return Ok(Some(Sourced {
            value,
            name: flag_name,
            shown,
        }));
    }
    for name in vars {
        if let Some(raw) = env(name) {
            let shown = format!("{name}={raw}");
            let not_a_number = || Error::Config(format!("{shown} is not a number"));
            let value = raw.trim().parse().map_err(|_| not_a_number())?;
            return Ok(Some(Sourced { value, name, shown }));
        }
    }
    Ok(None)
}

/// `host` and `port` of `host:port` or `[v6]:port`; `None` without a port.
fn split_host_port(address: &str) -> Option<(&str, &str)> {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split_once("]:");
    }
    let (host, port) = address.rsplit_once(':')?;
    (!host.contains(':')).then_some((host, port))
}

/// Checks a `host:port` master address, and that the ports of `num_nodes`
/// nodes fit above its port. `shown` names where it came from.
fn check_master(master: &str, num_nodes: u32, shown: &str) -> Result<()> {
    let fail = |why: String| Err(Error::Config(format!("{shown}{why}")));
    let Some((host, port)) = split_host_port(master) else {
        return fail(" has no port: write host:port ([v6]:port for IPv6)".into());
    };
    if host.is_empty() {
        return fail(" has no host: write host:port".into());
    }
    let port = match port.trim().parse::<u16>() {
        Ok(port) if port > 0 => u32::from(port),
        _ => return fail(format!(": `{port}` is not a port (1 to 65535)")),
    };
    let last = port + 1 + num_nodes; // P + 2 + (num_nodes - 1)
    if last > 65535 {
        let most = 65535 - 1 - num_nodes;
        return fail(format!(
            ": {num_nodes} nodes use ports {port} to {last} (orchestrator, watchdog, one per \
             node), past 65535; choose a master port of at most {most}"
        ));
    }
    Ok(())
}

impl NodeConfig {
    /// Resolves this process's place from the flags, else the environment
    /// `env` (`|name| std::env::var(name).ok()` in the CLI).
    ///
    /// The number of nodes is `--num-nodes`, else `SLURM_NNODES`, else
    /// `WORLD_SIZE` (torchrun with one process per node, not per GPU); the
    /// rank `--node-rank`, else `SLURM_NODEID`, else `RANK`; node 0's
    /// address `--orchestrator`, else `MASTER_ADDR` and `MASTER_PORT`.
    /// Errors name the flag or variable each value came from. `Ok(None)` is
    /// a one-machine run (no number of nodes, or 1). Under torchrun its own
    /// agent may listen on `MASTER_PORT`; `--orchestrator` then picks another.
    pub fn resolve(
        flags: &NodeFlags,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<NodeConfig>> {
        let nodes_vars = ["SLURM_NNODES", "WORLD_SIZE"];
        let nodes = pick(flags.num_nodes, "--num-nodes", nodes_vars, &env)?;
        let rank_vars = ["SLURM_NODEID", "RANK"];
        let rank = pick(flags.node_rank, "--node-rank", rank_vars, &env)?;
        if let Some(nodes) = &nodes
            && nodes.value == 0
        {
            let shown = &nodes.shown;
            return Err(Error::Config(format!(
                "{shown}: a run needs at least one node"
            )));
        }
        let (count, source) = nodes
            .as_ref()
            .map_or((1, "no --num-nodes, SLURM_NNODES or WORLD_SIZE"), |n| {
                (n.value, n.name)
            });
        if let Some(rank) = &rank
            && rank.value >= count
        {
            let shown = &rank.shown;
            let why = format!("{shown} is not below the number of nodes {count} ({source})");
            return Err(Error::Config(why));
        }
        if count == 1 {
            return Ok(None);
        }
        let Some(rank) = rank else {
            let why = format!(
                "{count} nodes ({source}) but no node rank: pass --node-rank or set SLURM_NODEID or RANK"
            );
            return Err(Error::Config(why));
        };
        let (master, shown) = match (&flags.orchestrator, env("MASTER_ADDR"), env("MASTER_PORT")) {
            (Some(address), ..) => (address.trim().into(), format!("--orchestrator {address}")),
            (None, Some(host), Some(port)) => {
                let shown = format!("MASTER_ADDR={host} MASTER_PORT={port}");
                let host = host.trim();
                let v6 = host.parse::<Ipv6Addr>().is_ok();
                let host = if v6 {
                    format!("[{host}]")
                } else {
                    host.to_string()
                };
                (format!("{host}:{}", port.trim()), shown)
            }
            (None, host, port) => {
                let why = match (host, port) {
                    (Some(host), _) => format!("MASTER_ADDR={host} is set but MASTER_PORT is not"),
                    (_, Some(port)) => format!("MASTER_PORT={port} is set but MASTER_ADDR is not"),
                    _ => format!(
                        "{count} nodes ({source}) need node 0's address: pass --orchestrator \
                         host:port or set MASTER_ADDR and MASTER_PORT"
                    ),
                };
                return Err(Error::Config(why));
            }
        };
        check_master(&master, count, &shown)?;
        Ok(Some(NodeConfig {
            num_nodes: count,
            node_rank: rank.value,
            master,
        }))
    }

    /// Checks a config that may not come from [`NodeConfig::resolve`].
    fn check(&self) -> Result<()> {
        let (rank, nodes) = (self.node_rank, self.num_nodes);
        if rank >= nodes {
            let why = format!("node rank {rank} is not below the number of nodes {nodes}");
            return Err(Error::Config(why));
        }
        check_master(
            &self.master,
            nodes,
            &format!("node 0's address {}", self.master),
        )
    }

    /// Node 0's host, without the brackets of an IPv6 address, as
    /// `(host, port).to_socket_addrs()` takes it.
    pub fn master_host(&self) -> &str {
        split_host_port(&self.master).map_or(&self.master, |(host, _)| host)
    }

    /// The master port plus `offset`.
    fn port(&self, offset: u32) -> u16 {
        let port = split_host_port(&self.master).and_then(|(_, port)| port.trim().parse().ok());
        let port: u16 = port.expect("node 0's address has a port: resolve checked it");
        u16::try_from(u32::from(port) + offset).expect("resolve checked that every port fits")
    }

    /// `P`: Burn's orchestrator, run by node 0.
    pub fn orchestrator_port(&self) -> u16 {
        self.port(0)
    }

    /// `P + 1`: the [`Watchdog`], served by node 0.
    pub fn watch_port(&self) -> u16 {
        self.port(1)
    }

    /// `P + 2 + node_rank`: this node's tensor service.
    pub fn data_port(&self) -> u16 {
        self.port(2 + self.node_rank)
    }

    /// The address other nodes reach this one at: the local IP of the route
    /// to node 0 (`127.0.0.1` when node 0 is this machine's loopback). An
    /// IPv6 address comes without brackets.
    pub fn local_host(&self) -> Result<String> {
        self.check()?;
        let host = self.master_host();
        let unreachable = |e: io::Error| Error::Collective(format!("node 0's host {host}: {e}"));
        let found = (host, self.orchestrator_port()).to_socket_addrs();
        let addresses: Vec<_> = found.map_err(unreachable)?.collect();
        // Node 0 listens on IPv4 (0.0.0.0): where a name has both kinds of
        // address, the IPv4 route is the one the others take.
        let master = addresses.iter().find(|a| a.is_ipv4()).or(addresses.first());
        let no_address = || unreachable(io::Error::new(ErrorKind::NotFound, "no address"));
        let master = master.ok_or_else(no_address)?;
        // Connecting a UDP socket picks the route and sends no packet.
        let any = if master.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(any).map_err(unreachable)?;
        socket.connect(master).map_err(unreachable)?;
        Ok(socket.local_addr().map_err(unreachable)?.ip().to_string())
    }
}

/// How long this process's collective calls have gone without progress:
/// the watchdog's stall check ([`Watchdog::watch_collectives`]).
///
/// Why: burn-collective has no timeout, so a collective that hangs while
/// every machine stays alive (a lost wake-up, a transfer that never
/// arrives) would hold every GPU of the run forever, heartbeats and all.
/// Progress is a call that begins with none in flight, or one that ends;
/// while calls are in flight and none ends, the stall grows.
#[derive(Debug, Default)]
pub struct CollectiveClock(Mutex<ClockState>);

#[derive(Debug, Default)]
struct ClockState {
    in_flight: usize,
    /// The last progress: `None` before the first call.
    progress: Option<Instant>,
}

/// A collective call in flight on a [`CollectiveClock`]; its drop is the
/// call's end.
#[derive(Debug)]
pub struct InFlight<'a>(&'a CollectiveClock);

impl CollectiveClock {
    fn state(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks a collective call as begun, until the returned guard drops.
    pub fn begin(&self) -> InFlight<'_> {
        let mut state = self.state();
        if state.in_flight == 0 {
            state.progress = Some(Instant::now());
        }
        state.in_flight += 1;
        InFlight(self)
    }

    /// How long calls have been in flight with none ending; zero when none
    /// is in flight.
    pub fn stalled_for(&self) -> Duration {
        let state = self.state();
        match (state.in_flight, state.progress) {
            (0, _) | (_, None) => Duration::ZERO,
            (_, Some(at)) => at.elapsed(),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.in_flight -= 1;
        state.progress = Some(Instant::now());
    }
}

/// A node that left the run, as the [`Watchdog`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The node's rank.
    pub node: u32,
    /// What happened: `connection closed`, `no heartbeat for 60s`,
    /// `failed: disk full`.
    pub what: String,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {} left the run: {}", self.node, self.what)
    }
}

/// Ends a multi-node run in bounded time when another node dies (the
/// module docs say why and how).
///
/// Dropping it without [`Watchdog::finish`] means this process is ending
/// abnormally: the others see its closed connection as a fault.
pub struct Watchdog {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Dropped to wake and end the heartbeat thread.
    stop: Option<mpsc::Sender<()>>,
}

struct Shared {
    rank: u32,
    /// Node 0: one per other node. Any other node: one, to node 0.
    links: Vec<Link>,
    /// Set once a fault was reported, or this node failed, finished or is
    /// dropped: from then on nothing (more) is reported.
    quiet: AtomicBool,
    /// Set once a peer's fault was reported ([`Watchdog::peer_fault_within`]).
    faulted: AtomicBool,
    on_fault: Box<dyn Fn(Fault) + Send + Sync>,
}

/// The writing half of one connection; a thread of its own reads it.
struct Link {
    rank: u32,
    writer: Mutex<TcpStream>,
    /// The peer said `done`: its closing connection is no fault.
    done: AtomicBool,
}

impl Link {
    fn send(&self, line: &str) {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        // A failed write is not reported here: a broken connection is the
        // reader's to see, and it sees it at once.
        let _ = writer.write_all(format!("{line}\n").as_bytes());
    }
}

impl Shared {
    /// Tells every other node `failed <rank> <reason>`: this node is ending
    /// on its own, and why.
    fn tell_failed(&self, reason: &str) {
        let line = format!("failed {} {}", self.rank, reason.replace(['\n', '\r'], " "));
        self.links.iter().for_each(|link| link.send(&line));
    }

    fn fault(&self, node: u32, what: String) {
        if self.quiet.swap(true, Ordering::SeqCst) {
            return;
        }
        self.faulted.store(true, Ordering::SeqCst);
        if self.rank == 0 {
            // The survivors first: `on_fault` may end this process.
            for link in self.links.iter().filter(|l| l.rank != node) {
                link.send(&format!("lost {node} {what}"));
            }
        }
        (self.on_fault)(Fault { node, what });
    }
}

/// A protocol line's first word and the rest.
fn words(line: &str) -> (&str, &str) {
    let line = line.trim_end();
    line.split_once(' ').unwrap_or((line, ""))
}

fn net(what: &str, e: io::Error) -> Error {
    Error::Collective(format!("{what}: {e}"))
}

impl Watchdog {
    /// Joins the run's watchdog and starts watching the other nodes.
    ///
    /// Node 0 waits up to `timeout` until every other node has joined; the
    /// others retry reaching node 0 for up to `timeout` (it may start
    /// later). Fails with [`Error::Collective`] naming the nodes that did
    /// not join, or [`Error::Config`] when node 0 refuses this node (another
    /// number of nodes, a taken rank). Once running, a node that sends
    /// nothing for `timeout` counts as gone.
    ///
    /// `on_fault` is called at most once per process, from a watchdog
    /// thread, when another node leaves the run. Acting on it is the
    /// caller's job: the collective may be blocked in another thread, so
    /// the CLI prints the fault and exits with a non-zero code. It should
    /// not block, as dropping the `Watchdog` waits for its threads.
    pub fn start(
        node: &NodeConfig,
        timeout: Duration,
        on_fault: impl Fn(Fault) + Send + Sync + 'static,
    ) -> Result<Watchdog> {
        node.check()?;
        let mut listener = None;
        if node.node_rank == 0 && node.num_nodes > 1 {
            let port = node.watch_port();
            let bound = TcpListener::bind(("0.0.0.0", port));
            let what =
                format!("node 0 cannot serve the watchdog on port {port} (the master port + 1)");
            listener = Some(bound.map_err(|e| net(&what, e))?);
        }
        Self::start_on(node, timeout, Box::new(on_fault), listener)
    }

    /// [`Watchdog::start`] with node 0's listener given, so that tests can
    /// bind a free port first.
    fn start_on(
        node: &NodeConfig,
        timeout: Duration,
        on_fault: Box<dyn Fn(Fault) + Send + Sync>,
        listener: Option<TcpListener>,
    ) -> Result<Watchdog> {
        if timeout.is_zero() {
            return Err(Error::Config(
                "the watchdog timeout must be positive".into(),
            ));
        }
        let deadline = Instant::now() + timeout;
        let conns = match listener {
            Some(listener) => gather(node, listener, deadline, timeout)?,
            None if node.node_rank == 0 => Vec::new(), // a one-node run
            None => vec![(0, join(node, deadline, timeout)?)],
        };
        let (mut links, mut readers) = (Vec::new(), Vec::new());
        for (rank, reader) in conns {
            let stream = reader.get_ref();
            let writer = stream
                .set_read_timeout(Some(timeout))
                .and_then(|()| stream.set_write_timeout(Some(timeout)))
                .and_then(|()| stream.try_clone())
                .map_err(|e| net("watchdog connection", e))?;
            let (writer, done) = (Mutex::new(writer), AtomicBool::new(false));
            links.push(Link { rank, writer, done });
            readers.push(reader);
        }
        let quiet = AtomicBool::new(false);
        let shared = Arc::new(Shared {
            rank: node.node_rank,
            links,
            quiet,
            faulted: AtomicBool::new(false),
            on_fault,
        });
        let (stop, stopped) = mpsc::channel::<()>();
        // Built before the threads, so that a failed spawn drops it and so
        // closes what was opened.
        let mut dog = Watchdog {
            shared: shared.clone(),
            threads: Vec::new(),
            stop: Some(stop),
        };
        // A beat well inside `timeout`, so that a short timeout never fires
        // between two heartbeats.
        let beat = (timeout / 4).min(Duration::from_secs(1));
        let beating = shared.clone();
        let heart = move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(beat) {
                let live = beating
                    .links
                    .iter()
                    .filter(|l| !l.done.load(Ordering::SeqCst));
                live.for_each(|link| link.send("hb"));
            }
        };
        let spawn_error = |e| net("cannot start a watchdog thread", e);
        let builder = thread::Builder::new().name("watchdog-beat".into());
        dog.threads.push(builder.spawn(heart).map_err(spawn_error)?);
        for (index, reader) in readers.into_iter().enumerate() {
            let shared = shared.clone();
            let builder = thread::Builder::new().name(format!("watchdog-{index}"));
            let watching = builder.spawn(move || watch(&shared, index, reader, timeout));
            dog.threads.push(watching.map_err(spawn_error)?);
        }
        Ok(dog)
    }

    /// Waits up to `grace` for the watchdog to report a peer that left;
    /// true if it did (its `on_fault` ran), false if the time passed first.
    /// Call it before [`Watchdog::fail`], which silences the reports.
    ///
    /// Why: when a peer dies, its sockets close at once for every
    /// connection, so the collective operation blocked on it often fails
    /// before the watchdog's reader sees its own closed connection. The
    /// collective's error says only "peer lost"; the watchdog's names the
    /// node and why, so a failed collective asks it first.
    pub fn peer_fault_within(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            if self.shared.faulted.load(Ordering::SeqCst) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends the run when `clock` shows collective calls in flight with none
    /// ending for `limit`: the others are told `failed: <why>` (so they end
    /// too, naming this node), and `on_stall(why)` is called once, from a
    /// watchdog thread; like `on_fault`, acting on it is the caller's job.
    /// Checked a few times per `limit`, at least four times a second; the check
    /// stops once this watchdog finishes, fails or reports a fault.
    pub fn watch_collectives(
        &mut self,
        clock: Arc<CollectiveClock>,
        limit: Duration,
        on_stall: impl Fn(String) + Send + 'static,
    ) -> Result<()> {
        let shared = self.shared.clone();
        let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let check = move || {
            while !shared.quiet.load(Ordering::SeqCst) {
                if clock.stalled_for() < limit {
                    thread::sleep(tick);
                    continue;
                }
                if shared.quiet.swap(true, Ordering::SeqCst) {
                    return;
                }
                let why = format!("no collective call between the machines finished for {limit:?}");
                shared.tell_failed(&why);
                return on_stall(why);
            }
        };
        let builder = thread::Builder::new().name("watchdog-stall".into());
        let thread = builder
            .spawn(check)
            .map_err(|e| net("cannot start a watchdog thread", e))?;
        self.threads.push(thread);
        Ok(())
    }

    /// This node failed on its own (bad data, a full disk): the others are
    /// told `failed: <reason>` instead of seeing a bare lost connection.
    /// This node's `on_fault` is not called from then on: it is ending.
    pub fn fail(&self, reason: &str) {
        self.shared.quiet.store(true, Ordering::SeqCst);
        self.shared.tell_failed(reason);
    }

    /// A clean end: tells the others `done`, so that this node's closing
    /// connection is no fault to them, and closes.
    pub fn finish(self) {
        self.shared.quiet.store(true, Ordering::SeqCst);
        self.shared.links.iter().for_each(|link| link.send("done"));
    }
}

impl fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Watchdog(node {})", self.shared.rank)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.quiet.store(true, Ordering::SeqCst);
        for link in &self.shared.links {
            let writer = link.writer.lock().unwrap_or_else(PoisonError::into_inner);
            // Wakes the reader blocked on this socket: it reads the end.
            let _ = writer.shutdown(Shutdown::Both);
        }
        drop(self.stop.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Reads one connection until it ends, and reports how it ended.
fn watch(shared: &Shared, index: usize, mut reader: BufReader<TcpStream>, timeout: Duration) {
    let link = &shared.links[index];
    let mut line = String::new();
    let what = loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break "connection closed".to_string(),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break format!("no heartbeat for {timeout:?}");
            }
            Err(e) => break format!("connection error: {e}"),
        }
        match words(&line) {
            ("done", _) => link.done.store(true, Ordering::SeqCst),
            // `failed <rank> <why>`: the sender is the node that failed.
            ("failed", rest) => {
                return shared.fault(link.rank, format!("failed: {}", words(rest).1));
            }
            ("lost", rest) if shared.rank != 0 => {
                let (node, why) = words(rest);
                return shared.fault(node.parse().unwrap_or(link.rank), why.into());
            }
            // `hb`, and lines a newer peer may add.
            _ => {}
        }
    };
    if !link.done.load(Ordering::SeqCst) {
        shared.fault(link.rank, what);
    }
}

/// Node 0: accepts the other nodes until all have said `hello`, or the
/// deadline passes.
fn gather(
    node: &NodeConfig,
    listener: TcpListener,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<(u32, BufReader<TcpStream>)>> {
    let n = node.num_nodes;
    // Indexed by rank; node 0 (this one) stays `None`.
    let mut joined: Vec<Option<BufReader<TcpStream>>> = (0..n).map(|_| None).collect();
    listener
        .set_nonblocking(true)
        .map_err(|e| net("watchdog listener", e))?;
    loop {
        let missing: Vec<_> = (1..n).filter(|&r| joined[r as usize].is_none()).collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let port = listener.local_addr().map_or(0, |a| a.port());
            let plural = if missing.len() > 1 { "s" } else { "" };
            let missing: Vec<_> = missing.iter().map(u32::to_string).collect();
            let missing = missing.join(", ");
            let why = format!(
                "node{plural} {missing} did not join within {timeout:?} (node 0's watchdog, port {port})"
            );
            for conn in joined.iter_mut().flatten() {
                let _ = writeln!(conn.get_mut(), "abort {why}");
            }
            return Err(Error::Collective(why));
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Some((rank, conn)) = greet(stream, &joined, deadline) {
                    joined[rank as usize] = Some(conn);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(net("node 0's watchdog cannot accept connections", e)),
        }
    }
    for conn in joined.iter_mut().flatten() {
        // A node gone since its hello is seen by its reader at once.
        let _ = conn.get_mut().write_all(b"ready\n");
    }
    let joined = joined.into_iter().enumerate();
    Ok(joined
        .filter_map(|(rank, conn)| Some((rank as u32, conn?)))
        .collect())
}

/// Node 0: reads a joining node's `hello`; `None` for a connection that is
/// not one (refused, or not ours at all).
fn greet(
    stream: TcpStream,
    joined: &[Option<BufReader<TcpStream>>],
    deadline: Instant,
) -> Option<(u32, BufReader<TcpStream>)> {
    let n = joined.len() as u32;
    let left = deadline.saturating_duration_since(Instant::now());
    let wait = left.clamp(Duration::from_millis(50), Duration::from_secs(2));
    stream.set_nonblocking(false).ok()?;
    stream.set_nodelay(true).ok()?;
    stream.set_read_timeout(Some(wait)).ok()?;
    let mut conn = BufReader::new(stream);
    let mut line = String::new();
    conn.read_line(&mut line).ok()?;
    let ("hello", rest) = words(&line) else {
        return None;
    };
    let (rank, nodes) = words(rest);
    let (rank, nodes) = (rank.parse::<u32>().ok()?, nodes.parse::<u32>().ok()?);
    let refusal = if nodes != n {
        format!("node {rank} was started with {nodes} nodes, node 0 with {n}")
    } else if rank == 0 || rank >= n {
        format!(
            "node rank {rank} cannot join node 0: the others of {n} nodes are 1 to {}",
            n - 1
        )
    } else if joined[rank as usize].is_some() {
        format!("node {rank} has already joined: two machines were given node rank {rank}")
    } else {
        return Some((rank, conn));
    };
    let _ = writeln!(conn.get_mut(), "refused {refusal}");
    None
}

/// Any other node: reaches node 0 (retrying while it may still be starting),
/// says `hello`, and waits for `ready`.
fn join(node: &NodeConfig, deadline: Instant, timeout: Duration) -> Result<BufReader<TcpStream>> {
    const RETRY: Duration = Duration::from_millis(200);
    let (host, port) = (node.master_host(), node.watch_port());
    let connect = |wait: Duration| -> io::Result<TcpStream> {
        let mut last = io::Error::new(ErrorKind::NotFound, "no address");
        for address in (host, port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&address, wait) {
                Ok(stream) => return Ok(stream),
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match connect(left.clamp(Duration::from_millis(50), Duration::from_secs(1))) {
            Ok(stream) => break stream,
            Err(e) if left.is_zero() => {
                let at = format!("its watchdog at {host}:{port}");
                let why = format!("node 0 did not join within {timeout:?} ({at}: {e})");
                return Err(Error::Collective(why));
            }
            Err(_) => thread::sleep(RETRY.min(left)),
        }
    };
    // Node 0 was listening when this connection was made, so its own
    // deadline falls within `timeout` from now.
    let ready_within = timeout + Duration::from_secs(1);
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(ready_within)))
        .and_then(|()| writeln!(stream, "hello {} {}", node.node_rank, node.num_nodes))
        .map_err(|e| net("node 0's watchdog", e))?;
    let mut conn = BufReader::new(stream);
    let mut line = String::new();
    let read = conn.read_line(&mut line);
    match (read, words(&line)) {
        (Ok(_), ("ready", _)) => Ok(conn),
        (Ok(_), ("refused", why)) => Err(Error::Config(why.into())),
        (Ok(_), ("abort", why)) => Err(Error::Collective(why.into())),
        (Ok(0), _) => Err(Error::Collective(
            "node 0 closed the watchdog connection".into(),
        )),
        (Ok(_), _) => Err(Error::Collective(format!(
            "node 0's watchdog said {line:?}"
        ))),
        (Err(e), _) => Err(net("node 0's watchdog did not say ready", e)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::mpsc::Receiver;

    use super::*;

    /// Resolves `args`: `--flag value` pairs are flags, `NAME=value` words
    /// the environment.
    fn resolve(args: &str) -> Result<Option<NodeConfig>> {
        let (mut flags, mut vars) = (NodeFlags::default(), HashMap::new());
        let mut words = args.split_whitespace();
        while let Some(word) = words.next() {
            let mut value = || words.next().expect("a flag's value").to_string();
            match word {
                "--num-nodes" => flags.num_nodes = Some(value().parse().unwrap()),
                "--node-rank" => flags.node_rank = Some(value().parse().unwrap()),
                "--orchestrator" => flags.orchestrator = Some(value()),
                var => {
                    let (name, value) = var.split_once('=').expect("NAME=value");
                    vars.insert(name.to_string(), value.to_string());
                }
            }
        }
        NodeConfig::resolve(&flags, |name| vars.get(name).cloned())
    }

    fn node(num_nodes: u32, node_rank: u32, master: &str) -> NodeConfig {
        NodeConfig {
            num_nodes,
            node_rank,
            master: master.into(),
        }
    }

    #[test]
    fn resolve_prefers_flags_then_slurm_then_torchrun() {
        let slurm = "SLURM_NNODES=4 SLURM_NODEID=3 MASTER_ADDR=n0 MASTER_PORT=29500";
        let torchrun = "WORLD_SIZE=3 RANK=2";
        let both = resolve(&format!("{slurm} {torchrun}")).unwrap().unwrap();
        assert_eq!(both, node(4, 3, "n0:29500"));
        let ports = (
            both.orchestrator_port(),
            both.watch_port(),
            both.data_port(),
        );
        assert_eq!(ports, (29500, 29501, 29505));
        let torch = resolve(&format!("{torchrun} MASTER_ADDR=n0 MASTER_PORT=29500"));
        assert_eq!(torch.unwrap(), Some(node(3, 2, "n0:29500")));
        let flags = "--num-nodes 2 --node-rank 1 --orchestrator [::1]:7000";
        let flagged = resolve(&format!("{flags} {slurm} {torchrun}"))
            .unwrap()
            .unwrap();
        assert_eq!(flagged, node(2, 1, "[::1]:7000"));
        assert_eq!((flagged.master_host(), flagged.data_port()), ("::1", 7003));
        let v6 = resolve("WORLD_SIZE=2 RANK=0 MASTER_ADDR=fe80::1 MASTER_PORT=9").unwrap();
        assert_eq!(v6, Some(node(2, 0, "[fe80::1]:9")));
        // One machine, and the last master port that fits 3 nodes.
        assert_eq!(resolve("").unwrap(), None);
        assert_eq!(resolve("WORLD_SIZE=1 RANK=0").unwrap(), None);
        let edge = resolve("--num-nodes 3 --node-rank 2 --orchestrator n0:65531").unwrap();
        assert_eq!(edge.unwrap().data_port(), 65535);
    }

    #[test]
    fn resolve_errors_name_their_source() {
        let cases = [
            ("SLURM_NNODES=two", "SLURM_NNODES=two is not a number"),
            ("WORLD_SIZE=2 RANK=x", "RANK=x is not a number"),
            (
                "--num-nodes 0",
                "--num-nodes 0: a run needs at least one node",
            ),
            (
                "SLURM_NNODES=2 SLURM_NODEID=3",
                "SLURM_NODEID=3 is not below the number of nodes 2 (SLURM_NNODES)",
            ),
            (
                "--num-nodes 1 RANK=1",
                "RANK=1 is not below the number of nodes 1 (--num-nodes)",
            ),
            (
                "--node-rank 2",
                "--node-rank 2 is not below the number of nodes 1 (no --num-nodes",
            ),
            (
                "--num-nodes 2 MASTER_ADDR=n0",
                "2 nodes (--num-nodes) but no node rank",
            ),
            (
                "WORLD_SIZE=2 RANK=1",
                "2 nodes (WORLD_SIZE) need node 0's address",
            ),
            (
                "WORLD_SIZE=2 RANK=1 MASTER_ADDR=n0",
                "MASTER_ADDR=n0 is set but MASTER_PORT is not",
            ),
            (
                "WORLD_SIZE=2 RANK=1 MASTER_PORT=1",
                "MASTER_PORT=1 is set but MASTER_ADDR is not",
            ),
            (
                "WORLD_SIZE=2 RANK=1 MASTER_ADDR=n0 MASTER_PORT=x",
                "MASTER_PORT=x: `x` is not a port",
            ),
            (
                "WORLD_SIZE=2 RANK=1 --orchestrator n0",
                "--orchestrator n0 has no port",
            ),
            (
                "WORLD_SIZE=2 RANK=1 --orchestrator n0:http",
                "n0:http: `http` is not a port",
            ),
            (
                "WORLD_SIZE=2 RANK=1 --orchestrator n0:0",
                "--orchestrator n0:0: `0` is not a port",
            ),
            (
                "WORLD_SIZE=2 RANK=1 --orchestrator n0:70000",
                "`70000` is not a port",
            ),
            (
                "WORLD_SIZE=2 RANK=1 --orchestrator :80",
                "--orchestrator :80 has no host",
            ),
            (
                "--num-nodes 3 --node-rank 1 --orchestrator n0:65533",
                "--orchestrator n0:65533: 3 nodes use ports 65533 to 65537 (orchestrator, watchdog, \
                 one per node), past 65535; choose a master port of at most 65531",
            ),
        ];
        for (args, expected) in cases {
            match resolve(args) {
                Err(Error::Config(why)) => {
                    assert!(
                        why.contains(expected) && !why.contains('\n'),
                        "{args}: {why}"
                    )
                }
                other => panic!("{args}: expected a config error, got {other:?}"),
            }
        }
    }

    #[test]
    fn local_host_of_a_loopback_master() {
        for master in ["localhost:29500", "127.0.0.1:29500"] {
            assert_eq!(node(2, 1, master).local_host().unwrap(), "127.0.0.1");
        }
    }

    /// The configs of an `n`-node run on this machine, and node 0's watchdog
    /// listener, bound first on a free port so that tests never race for one.
    fn run_of(n: u32) -> (Vec<NodeConfig>, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let master = format!("127.0.0.1:{}", listener.local_addr().unwrap().port() - 1);
        (
            (0..n).map(|rank| node(n, rank, &master)).collect(),
            listener,
        )
    }

    /// Starts `nodes` at once (`start` returns when all have joined); faults
    /// arrive as (the rank that saw it, the fault).
    fn start_all(
        nodes: &[NodeConfig],
        listener: TcpListener,
        timeout: Duration,
    ) -> (Vec<Result<Watchdog>>, Receiver<(u32, Fault)>) {
        let (faults, received) = mpsc::channel();
        let mut listener = Some(listener);
        let started = thread::scope(|s| {
            let mut starting = Vec::new();
            for node in nodes {
                let (faults, rank) = (faults.clone(), node.node_rank);
                let on_fault = Box::new(move |f: Fault| {
                    let _ = faults.send((rank, f));
                });
                let listener = if rank == 0 { listener.take() } else { None };
                starting
                    .push(s.spawn(move || Watchdog::start_on(node, timeout, on_fault, listener)));
            }
            starting.into_iter().map(|h| h.join().unwrap()).collect()
        });
        (started, received)
    }

    /// [`start_all`], every node started.
    fn started(
        nodes: &[NodeConfig],
        listener: TcpListener,
        timeout: Duration,
    ) -> (Vec<Watchdog>, Receiver<(u32, Fault)>) {
        let (started, received) = start_all(nodes, listener, timeout);
        (started.into_iter().map(Result::unwrap).collect(), received)
    }

    /// The next `count` faults, by the rank that saw them.
    fn faults(received: &Receiver<(u32, Fault)>, count: usize) -> Vec<(u32, Fault)> {
        let next = |_| {
            received
                .recv_timeout(Duration::from_secs(2))
                .expect("a fault within 2 s")
        };
        let mut seen: Vec<_> = (0..count).map(next).collect();
        seen.sort_by_key(|(observer, _)| *observer);
        seen
    }

    fn fault(node: u32, what: &str) -> Fault {
        Fault {
            node,
            what: what.into(),
        }
    }

    #[test]
    fn three_nodes_start_and_finish_without_faults() {
        let (nodes, listener) = run_of(3);
        let (mut dogs, received) = started(&nodes, listener, Duration::from_millis(1500));
        // Past the timeout: the heartbeats keep every connection alive.
        thread::sleep(Duration::from_millis(1800));
        let (two, zero, one) = (dogs.pop().unwrap(), dogs.remove(0), dogs.remove(0));
        one.finish();
        thread::sleep(Duration::from_millis(100));
        zero.finish();
        two.finish();
        assert!(received.recv_timeout(Duration::from_millis(300)).is_err());
    }

    #[test]
    fn a_killed_node_is_reported_to_all() {
        let (nodes, listener) = run_of(3);
        let (mut dogs, received) = started(&nodes, listener, Duration::from_secs(2));
        drop(dogs.pop()); // node 2's socket closes, as when its process is killed
        let lost = fault(2, "connection closed");
        assert_eq!(faults(&received, 2), [(0, lost.clone()), (1, lost)]);
        drop(dogs);
        let again = received.recv_timeout(Duration::from_millis(200));
        assert!(again.is_err(), "on_fault more than once: {again:?}");
    }

    #[test]
    fn a_failed_collective_waits_for_the_watchdog_to_name_the_lost_node() {
        let (nodes, listener) = run_of(2);
        let (mut dogs, received) = started(&nodes, listener, Duration::from_secs(2));
        // No fault yet: the wait runs out and says so.
        let began = Instant::now();
        assert!(!dogs[1].peer_fault_within(Duration::from_millis(150)));
        assert!(began.elapsed() >= Duration::from_millis(150));
        // Node 0's socket closes while node 1 waits: the wait ends true
        // once the fault is reported, well before its grace.
        let zero = dogs.remove(0);
        let began = Instant::now();
        let dropping = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            drop(zero);
        });
        assert!(dogs[0].peer_fault_within(Duration::from_secs(5)));
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{:?}",
            began.elapsed()
        );
        dropping.join().unwrap();
        assert_eq!(faults(&received, 1), [(1, fault(0, "connection closed"))]);
    }

    #[test]
    fn the_clock_counts_only_time_in_flight_without_an_end() {
        let clock = CollectiveClock::default();
        assert_eq!(clock.stalled_for(), Duration::ZERO);
        let first = clock.begin();
        thread::sleep(Duration::from_millis(30));
        let second = clock.begin(); // not progress: one is still in flight
        assert!(clock.stalled_for() >= Duration::from_millis(30));
        drop(first); // an end is progress
        assert!(clock.stalled_for() < Duration::from_millis(30));
        thread::sleep(Duration::from_millis(30));
        assert!(clock.stalled_for() >= Duration::from_millis(30));
        drop(second);
        assert_eq!(clock.stalled_for(), Duration::ZERO);
    }

    #[test]
    fn a_stalled_collective_ends_its_node_and_tells_the_others() {
        let (nodes, listener) = run_of(2);
        let (mut dogs, received) = started(&nodes, listener, Duration::from_secs(2));
        let limit = Duration::from_millis(200);
        let (stalls, stalled) = mpsc::channel();
        let clocks: Vec<Arc<CollectiveClock>> = (0..2).map(|_| Arc::default()).collect();
        for (dog, clock) in dogs.iter_mut().zip(&clocks) {
            let stalls = stalls.clone();
            let on_stall = move |why: String| drop(stalls.send(why));
            dog.watch_collectives(clock.clone(), limit, on_stall)
                .unwrap();
        }
        // Node 0's calls end as they should; node 1's hangs.
        let began = Instant::now();
        let hung = clocks[1].begin();
        while began.elapsed() < 3 * limit {
            drop(clocks[0].begin());
            thread::sleep(Duration::from_millis(20));
        }
        let why = "no collective call between the machines finished for 200ms";
        assert_eq!(stalled.recv_timeout(Duration::from_secs(2)).unwrap(), why);
        assert!(stalled.recv_timeout(Duration::from_millis(300)).is_err());
        assert_eq!(
            faults(&received, 1),
            [(0, fault(1, &format!("failed: {why}")))]
        );
        drop(hung);
    }

    #[test]
    fn a_failure_reaches_the_others_with_its_reason() {
        for (failing, others) in [(1, [0, 2]), (0, [1, 2])] {
            let (nodes, listener) = run_of(3);
            let (dogs, received) = started(&nodes, listener, Duration::from_secs(2));
            dogs[failing as usize].fail("disk full");
            let failed = fault(failing, "failed: disk full");
            let expected = others.map(|observer| (observer, failed.clone()));
            assert_eq!(faults(&received, 2), expected);
            assert_eq!(
                failed.to_string(),
                format!("node {failing} left the run: failed: disk full")
            );
        }
    }

    #[test]
    fn a_node_that_never_joins_fails_start() {
        let (nodes, listener) = run_of(3);
        let began = Instant::now();
        let (started, _) = start_all(&nodes[..2], listener, Duration::from_millis(500));
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{:?}",
            began.elapsed()
        );
        for result in started {
            match result {
                Err(Error::Collective(why)) => {
                    assert!(why.starts_with("node 2 did not join within 500ms"), "{why}")
                }
                other => panic!("expected a collective error, got {other:?}"),
            }
        }
    }

    #[test]
    fn node_0_refuses_nodes_of_another_run() {
        let (nodes, listener) = run_of(3);
        let stranger = node(2, 1, &nodes[1].master);
        let four = [
            nodes[0].clone(),
            nodes[1].clone(),
            stranger,
            nodes[1].clone(),
        ];
        let (started, _) = start_all(&four, listener, Duration::from_millis(600));
        let mut refusals: Vec<_> = started
            .iter()
            .filter_map(|r| match r {
                Err(Error::Config(why)) => Some(why.as_str()),
                _ => None,
            })
            .collect();
        refusals.sort();
        assert_eq!(
            refusals,
            [
                "node 1 has already joined: two machines were given node rank 1",
                "node 1 was started with 2 nodes, node 0 with 3",
            ]
        );
    }

    #[test]
    fn a_silent_node_times_out() {
        let timeout = Duration::from_millis(400);
        let read_line = |stream: &TcpStream| {
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).unwrap();
            line
        };
        // Node 0 watches a node 1 that says hello, then nothing.
        let (nodes, listener) = run_of(2);
        let watch_port = nodes[0].watch_port();
        let zero = thread::spawn(move || started(&nodes[..1], listener, timeout));
        let mut silent_1 = TcpStream::connect(("127.0.0.1", watch_port)).unwrap();
        writeln!(silent_1, "hello 1 2").unwrap();
        assert_eq!(read_line(&silent_1), "ready\n");
        let (_zero, seen_by_0) = zero.join().unwrap();
        assert_eq!(
            faults(&seen_by_0, 1),
            [(0, fault(1, "no heartbeat for 400ms"))]
        );

        // Node 1 watches a node 0 that says ready, then nothing.
        let (nodes, listener) = run_of(2);
        let silent_0 = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            assert_eq!(read_line(&stream), "hello 1 2\n");
            stream.write_all(b"ready\n").unwrap();
            stream
        });
        let (faults_1, seen_by_1) = mpsc::channel();
        let on_fault = move |f| {
            let _ = faults_1.send((1, f));
        };
        let _one = Watchdog::start(&nodes[1], timeout, on_fault).unwrap();
        let _silent_0 = silent_0.join().unwrap();
        assert_eq!(
            faults(&seen_by_1, 1),
            [(1, fault(0, "no heartbeat for 400ms"))]
        );
    }
}

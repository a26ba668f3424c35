//! `clipa train` and `clipa eval`: flags → resolved config → the core
//! trainer on the chosen backend, with a progress bar and a final report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use burn::tensor::backend::AutodiffBackend;
use clipa_backends::{BackendJob, BackendKind, Devices};
use clipa_core::data::tokenizer::Tokenizer;
use clipa_core::dist::Layout;
use clipa_core::eval::ZeroShotResult;
use clipa_core::nodes::{NodeConfig, NodeFlags, Watchdog};
use clipa_core::train::{
    self, Observer, Resume, RunOptions, StageConfig, StepMetrics, TrainConfig, TrainSummary,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::TrainArgs;

/// Preset (or config file) → flag overrides → validated config.
fn resolve(args: &TrainArgs, output: &Path) -> anyhow::Result<TrainConfig> {
    let read = |path: &Path| -> anyhow::Result<TrainConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(TrainConfig::from_toml(&text, path)?)
    };
    let mut cfg = match (&args.config, &args.preset) {
        (Some(path), _) => read(path)?,
        (None, Some(name)) => TrainConfig::preset(name)?,
        // Resuming without a config continues the run with its own.
        (None, None) if args.resume.is_some() && output.join("run.toml").is_file() => {
            read(&output.join("run.toml"))?
        }
        (None, None) => TrainConfig::preset("demo")?,
    };
    cfg.apply(&args.set)?;
    Ok(cfg)
}

/// `runs/<preset>-<UTC yyyymmdd-hhmmss>`.
fn default_output(args: &TrainArgs) -> PathBuf {
    let name = args
        .preset
        .clone()
        .or_else(|| {
            args.config
                .as_ref()
                .and_then(|p| p.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "demo".into());
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    PathBuf::from("runs").join(format!(
        "{name}-{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

/// Draws the progress bar and prints events above it.
pub(super) struct Progress {
    /// The bar of the running stage (hidden until a stage starts).
    pub(super) bar: ProgressBar,
    /// Stages in the run, for the `stage i/n` prefix.
    pub(super) stages: usize,
}

impl Observer for Progress {
    fn stage_start(&mut self, index: usize, stage: &StageConfig, first_step: u64) {
        self.bar.finish_and_clear();
        self.bar = ProgressBar::new(stage.steps).with_position(first_step);
        self.bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        self.bar.set_prefix(format!(
            "stage {}/{} {}",
            index + 1,
            self.stages,
            stage.name
        ));
        self.bar.println(format!(
            "stage {}/{} {}: {} px, image {}, text {} tokens {}, batch {}, {} steps",
            index + 1,
            self.stages,
            stage.name,
            stage.image_size,
            stage.image_reduction,
            stage.text_length,
            stage.text_reduction,
            stage.batch_size,
            stage.steps
        ));
    }

    fn log(&mut self, m: &StepMetrics, stage_step: u64) {
        self.bar.set_position(stage_step);
        let epoch = m
            .epoch
            .map(|e| format!(" epoch {e:.2}"))
            .unwrap_or_default();
        self.bar.set_message(format!(
            "loss {:.4} lr {:.2e} T {:.1} {:.0} img/s wait {:.0}%{epoch}",
            m.loss,
            m.lr,
            m.temperature,
            m.images_per_sec,
            100.0 * m.data_wait
        ));
        if !self.bar.is_hidden() {
            return;
        }
        // No terminal (CI, pipes): one line per log step instead.
        eprintln!(
            "step {} stage {} loss {:.4} lr {:.2e} T {:.1} {:.0} img/s wait {:.0}%{epoch}",
            m.step,
            m.stage + 1,
            m.loss,
            m.lr,
            m.temperature,
            m.images_per_sec,
            100.0 * m.data_wait
        );
    }

    fn message(&mut self, text: &str) {
        if self.bar.is_hidden() {
            eprintln!("{text}");
        } else {
            self.bar.println(text);
        }
    }
}

struct TrainJob {
    cfg: TrainConfig,
    opts: RunOptions,
    /// The machines of the run, when it spans several.
    node: Option<NodeConfig>,
    /// How long machines wait for each other (`--node-timeout`).
    node_timeout: Duration,
    /// How long a collective between machines may go without progress
    /// (`--collective-timeout`); `None`: forever.
    collective_timeout: Option<Duration>,
}

/// How long a failed collective waits for the watchdog to name the node
/// that left: it reads the same closed sockets, so it needs milliseconds.
const PEER_FAULT_GRACE: Duration = Duration::from_secs(5);

/// Joins the other machines of a multi-node run: node 0 serves the
/// orchestrator, then every node waits at the watchdog until all are in.
/// A machine that leaves the run later ends this one with exit code 1:
/// the collective may be blocked in another thread, and the last
/// checkpoint that every node finished is on disk (`--resume latest`).
fn join_nodes(node: &NodeConfig, timeout: Duration) -> clipa_core::Result<Watchdog> {
    if node.node_rank == 0 {
        clipa_core::dist::host_orchestrator(node.orchestrator_port())?;
    }
    eprintln!(
        "node {} of {}: waiting for the others at {}",
        node.node_rank, node.num_nodes, node.master
    );
    let rank = node.node_rank;
    Watchdog::start(node, timeout, move |fault| {
        eprintln!(
            "error: {fault}; node {rank} stops too (restart every node with --resume latest)"
        );
        std::process::exit(1);
    })
}

impl BackendJob for TrainJob {
    type Output = TrainSummary;

    fn run<B: AutodiffBackend>(self, on: Devices<B>) -> clipa_core::Result<TrainSummary> {
        let names: Vec<String> = on.info().iter().map(ToString::to_string).collect();
        // A step that cannot fit is refused before anything is made. CPU
        // replicas share the machine's memory; GPU replicas have their own.
        let replicas = on.info().len();
        let free: Option<Vec<u64>> = on.info().iter().map(clipa_backends::free_memory).collect();
        if let Some(per) = free.and_then(|f| f.into_iter().min()) {
            let per = match on.info()[0].kind {
                BackendKind::Cpu => per / replicas as u64,
                _ => per,
            };
            clipa_core::train::memory::check_fits(&self.cfg, replicas, per)?;
        }
        eprintln!(
            "training on {}; run folder {}",
            names.join(", "),
            self.opts.output.display()
        );
        let mut progress = Progress {
            bar: ProgressBar::hidden(),
            stages: self.cfg.stages.len(),
        };
        let layout = Layout::<B> {
            local_count: on.devices().len(),
            host: match &self.node {
                Some(n) => n.local_host()?,
                None => String::new(),
            },
            node: self.node.clone(),
            local_sum: on.local_sum(),
            clock: Default::default(),
        };
        let watchdog = match &self.node {
            Some(n) => {
                let mut dog = join_nodes(n, self.node_timeout)?;
                if let Some(limit) = self.collective_timeout {
                    let rank = n.node_rank;
                    dog.watch_collectives(layout.clock.clone(), limit, move |why| {
                        eprintln!(
                            "error: {why} (--collective-timeout): the run is stuck; node {rank} \
                             stops (restart every node with --resume latest)"
                        );
                        std::process::exit(1);
                    })?;
                }
                Some(dog)
            }
            None => None,
        };
        let summary = train::train_distributed::<B>(
            self.cfg,
            &self.opts,
            on.devices(),
            layout,
            &mut progress,
        );
        progress.bar.finish_and_clear();
        if let Some(w) = watchdog {
            match &summary {
                Ok(_) => w.finish(),
                // A peer that died usually breaks the collective before the
                // watchdog reads its closed connection; the watchdog's
                // report names the node (and its `on_fault` ends this
                // process), so it is given a moment first.
                Err(clipa_core::Error::Collective(_)) if w.peer_fault_within(PEER_FAULT_GRACE) => {}
                // The others hear why, instead of a lost connection.
                Err(e) => w.fail(&e.to_string()),
            }
        }
        summary
    }
}

/// Installs SIGINT/SIGTERM handling: the first signal asks the trainer to
/// checkpoint and stop; a second one exits at once.
pub(super) fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let installed = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping: writing a checkpoint (press Ctrl-C again to quit now)");
    });
    if let Err(e) = installed {
        tracing::warn!("cannot install the Ctrl-C handler: {e}");
    }
    flag
}

fn print_report(s: &TrainSummary) -> anyhow::Result<()> {
    outln!(
        "\nrun finished{}: {} steps",
        if s.interrupted {
            " early (interrupted)"
        } else {
            ""
        },
        s.steps
    );
    for st in &s.stages {
        let zs = st.zeroshot.map(|z: ZeroShotResult| {
            let skipped = match z.skipped {
                0 => String::new(),
                n => format!(", {n} unreadable skipped"),
            };
            format!(
                ", zero-shot top-1 {:.1}% (top-5 {:.1}%, chance {:.1}%, {} images{skipped})",
                100.0 * z.top1,
                100.0 * z.top5,
                100.0 * z.chance,
                z.samples
            )
        });
        outln!(
            "  {}: {:.0} s{}",
            st.name,
            st.seconds,
            zs.unwrap_or_default()
        );
    }
    let d = s.data;
    if d.bad_images + d.bad_captions + d.bad_shards > 0 {
        outln!(
            "  skipped data: {} bad images, {} bad captions, {} bad shards (of {} samples read)",
            d.bad_images,
            d.bad_captions,
            d.bad_shards,
            d.read()
        );
    }
    if s.nonfinite_skipped > 0 {
        outln!("  non-finite steps skipped: {}", s.nonfinite_skipped);
    }
    outln!("  run folder: {}", s.run_dir.display());
    if let Some(c) = &s.checkpoint {
        outln!("  checkpoint: {}", c.display());
    }
    Ok(())
}

/// `clipa train`.
pub fn run(kind: BackendKind, device: Option<usize>, args: &TrainArgs) -> anyhow::Result<()> {
    let output = args.output.clone().unwrap_or_else(|| default_output(args));
    let cfg = resolve(args, &output)?;
    if args.resume.is_none() && args.init_from.is_none() {
        // A fresh run's tokenizer comes from its model and `vocab`: a missing
        // or mismatched vocabulary fails here, before anything is trained.
        Tokenizer::for_text(&cfg.model_config()?.text, cfg.vocab.as_deref())?;
    }
    if args.dry_run {
        for line in cfg.describe_optimizer() {
            outln!("# {line}");
        }
        out!("{}", cfg.to_toml());
        return Ok(());
    }
    if args.resume == Some(Resume::Latest) && args.output.is_none() {
        bail!("--resume latest needs the --output of the run to continue");
    }
    let opts = RunOptions {
        output,
        resume: args.resume.clone(),
        interrupt: interrupt_flag(),
        lexicon: args.lexicon.clone(),
        init_from: args.init_from.clone(),
    };
    let node = NodeConfig::resolve(
        &NodeFlags {
            num_nodes: args.num_nodes,
            node_rank: args.node_rank,
            orchestrator: args.orchestrator.clone(),
        },
        |key| std::env::var(key).ok(),
    )?;
    if node.is_some() && args.output.is_none() {
        bail!("a run across machines needs --output: one run folder that every machine sees");
    }
    let job = TrainJob {
        cfg,
        opts,
        node,
        node_timeout: Duration::from_secs(args.node_timeout.max(1)),
        collective_timeout: match args.collective_timeout {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        },
    };
    let summary = match &args.devices {
        Some(set) => clipa_backends::run_on(kind, set, job)?,
        None => clipa_backends::run(kind, device, job)?,
    };
    print_report(&summary)?;
    Ok(())
}

//! Command-line flags. Global flags select the backend and the log level;
//! each subcommand has its own struct.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use clipa_backends::BackendKind;
use clipa_core::eval::{EvalResize, TemplateSet, ZeroShotFlags};
use clipa_core::plan::{Dataset, Gpu};
use clipa_core::reduce::{ImageReduction, TextReduction};
use clipa_core::search::Against;
use clipa_core::train::Resume;
use clipa_core::train::config::Precision;
use clipa_core::train::overrides::TrainOverrides;

/// Train and run CLIP image–text models the CLIPA way: pre-train on few
/// image and text tokens, fine-tune briefly at full length.
#[derive(Debug, Parser)]
#[command(name = "clipa", version, about, propagate_version = true)]
pub struct Args {
    /// Compute backend.
    #[arg(long, global = true, value_enum, default_value_t = BackendKind::Cpu, env = "CLIPA_BACKEND")]
    pub backend: BackendKind,
    /// Device index within the backend (default: the best one).
    #[arg(long, global = true, env = "CLIPA_DEVICE")]
    pub device: Option<usize>,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the compiled-in backends and whether each has a usable device.
    Backends,
    /// Self-test the selected backend: attention and a residual block,
    /// forward and backward, compared with the CPU.
    Check(CheckArgs),
    /// List the model presets with parameter counts and GFLOPs per sample.
    Models(ModelsArgs),
    /// Convert OpenCLIP weights (a hub folder, or safetensors / PyTorch
    /// weights and a config) into a clipa checkpoint folder.
    ImportOpenclip(ImportArgs),
    /// Write a clipa checkpoint as OpenCLIP weights (safetensors) and config.
    ExportOpenclip(ExportArgs),
    /// Compute L2-normalised image and text embeddings with a checkpoint.
    Embed(EmbedArgs),
    /// Print the token ids a checkpoint's tokenizer gives captions.
    Tokenize(TokenizeArgs),
    /// Exact top-k cosine search of an `embed` output file, by text or by
    /// image.
    Search(SearchArgs),
    /// Train a CLIP model (default: the `demo` preset on the built-in
    /// synthetic data, on the CPU).
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint: zero-shot accuracy on an image folder,
    /// image–text retrieval on a caption set.
    Eval(EvalArgs),
    /// Classify images with a checkpoint against labels given as text.
    Classify(ClassifyArgs),
    /// Prepare datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Draw the training curves of a run folder into RUN_DIR/plots/.
    Plot(PlotArgs),
    /// Run a scaling grid (model sizes × image and text token counts ×
    /// strategies), each point a pre-train and a fine-tune, and draw the
    /// paper's inverse-scaling figures; rerun to continue.
    Sweep(SweepArgs),
    /// Recommend a CLIPA recipe (model, image and text tokens, fine-tune)
    /// for a GPU budget, from the paper's published runs and the FLOP
    /// counter, with every assumption printed.
    Plan(PlanArgs),
    /// Time a training step (forward, loss, backward, AdamW) and an
    /// inference step of any model at any batch and token counts.
    Bench(BenchArgs),
}

/// Flags of `clipa bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Model preset (see `clipa models`).
    #[arg(long, default_value = "bench-tiny")]
    pub model: String,
    /// Vocabulary (`vocab.txt` or `tokenizer.json`) of a WordPiece model
    /// (the CLIPA-v2 presets `clipa-*`).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// Global batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Image size in pixels before reduction (default: the model's).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Image token reduction: none | resize:PX | random:RATIO | grid:K[:KEPT]
    /// | block:RATIO.
    #[arg(long, default_value = "none")]
    pub image_reduction: ImageReduction,
    /// Text tokens per caption (default: the model's context length).
    #[arg(long)]
    pub text_length: Option<usize>,
    /// Text reduction: truncate | random | block | syntax.
    #[arg(long, default_value = "truncate")]
    pub text_reduction: TextReduction,
    /// Micro-batches per step (cached-feature accumulation).
    #[arg(long, default_value_t = 1)]
    pub accum_steps: usize,
    /// Block compute precision: auto | f32 | bf16.
    #[arg(long, default_value = "auto")]
    pub precision: Precision,
    /// Per-block activation checkpointing.
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// Lock the image tower whole (LiT): no gradient, no optimiser state,
    /// no autodiff.
    #[arg(long)]
    pub lock_image: bool,
    /// Lock the text tower whole.
    #[arg(long)]
    pub lock_text: bool,
    /// Timed steps per case.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Run the peer benchmark's cases (img32, img16, img32_pd0.75,
    /// img16_txt8, img32_txt8) for bench-tiny at batch 64; the other model
    /// and size flags are ignored.
    #[arg(long)]
    pub sweep: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `clipa sweep`.
#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// Sweep file (TOML, as `--dry-run` prints it).
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// Sweep preset: cpu (default; Fashion-MNIST, three sizes, under an
    /// hour on a laptop CPU) or tiny.
    #[arg(long)]
    pub preset: Option<String>,
    /// Sweep folder (default: sweeps/<name>); rerunning continues it.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Word → part-of-speech lexicon for syntax masking (default: shipped).
    #[arg(long)]
    pub lexicon: Option<PathBuf>,
    /// Vocabulary of the grid's WordPiece (CLIPA-v2) models: a `vocab.txt`
    /// or `tokenizer.json` (overrides the sweep file's `vocab`).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// Print the resolved sweep file and exit.
    #[arg(long)]
    pub dry_run: bool,
}

/// Flags of `clipa plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// GPUs.
    #[arg(long)]
    pub gpus: usize,
    /// GPU kind: a100 | h100 | h200 | l40s | a10 | rtx4090.
    #[arg(long, default_value = "a100")]
    pub gpu: Gpu,
    /// Wall-clock hours.
    #[arg(long)]
    pub hours: f64,
    /// Pre-training samples (e.g. 2.56e9; default: each recipe's own).
    #[arg(long)]
    pub samples: Option<f64>,
    /// Only recipes published on this dataset: laion-400m | laion-2b |
    /// datacomp-1b.
    #[arg(long)]
    pub data: Option<Dataset>,
    /// Effective training TFLOP/s per GPU, e.g. measured with `clipa
    /// --backend cuda bench --json` (train_gflop / median_ms); default: the
    /// throughput the published runs imply.
    #[arg(long)]
    pub tflops: Option<f64>,
    /// Write the recommended run as a TOML file for `clipa train --config`.
    #[arg(long)]
    pub write: Option<PathBuf>,
}

/// Arguments of `clipa plot`.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// The run folder holding metrics.jsonl.
    pub run_dir: PathBuf,
}

/// Flags of `clipa train`. The overrides apply on top of the preset or
/// config file; on a multi-stage preset the image and text flags apply to
/// the first stage.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Run config (TOML, as written to `RUN/run.toml`).
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// Training preset.
    #[arg(long, value_parser = training_presets())]
    pub preset: Option<String>,
    /// Run folder (default: runs/<preset>-<UTC time>).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Continue a run: `latest` (newest checkpoint in --output) or a
    /// checkpoint folder.
    #[arg(long)]
    pub resume: Option<Resume>,
    /// Start from the weights of a clipa checkpoint folder or a downloaded
    /// OpenCLIP hub folder (`UCSC-VLAA/ViT-*-CLIPA*`) instead of a random
    /// init, keeping that model's tokenizer and preprocessing; the
    /// optimiser and schedule start fresh. --model must name the same
    /// architecture.
    #[arg(long, conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Word → part-of-speech lexicon for syntax masking (default: shipped).
    #[arg(long)]
    pub lexicon: Option<PathBuf>,
    /// Print the resolved config and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Data-parallel training, one replica per device: `0,1,2,3` or `all`.
    /// The global batch (--batch-size) is split evenly over the replicas,
    /// and the result equals one device's at that batch.
    #[arg(long, value_name = "LIST|all")]
    pub devices: Option<clipa_backends::DeviceSet>,
    /// Machines in the run, one `clipa train` on each (default:
    /// SLURM_NNODES, else torchrun's WORLD_SIZE; 1). docs/DISTRIBUTED.md
    /// has an sbatch script.
    #[arg(long, value_name = "N")]
    pub num_nodes: Option<u32>,
    /// This machine's index, 0..N (default: SLURM_NODEID, else RANK).
    #[arg(long, value_name = "R")]
    pub node_rank: Option<u32>,
    /// Node 0's HOST:PORT (default: MASTER_ADDR:MASTER_PORT). Node 0 serves
    /// the orchestrator at PORT and the watchdog at PORT+1; node r serves
    /// its tensors at PORT+2+r.
    #[arg(long, value_name = "HOST:PORT")]
    pub orchestrator: Option<String>,
    /// Seconds the machines wait for each other to join, and for a silent
    /// one before the run ends (a killed process is noticed at once).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub node_timeout: u64,
    /// Seconds a collective operation between machines may go without one
    /// finishing before every node stops with an error (a hung run,
    /// resumable with --resume latest); 0 waits forever. As PyTorch's
    /// process-group timeout, it must outlast the longest pause of one
    /// node that the others wait through, such as node 0's evaluations.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    pub collective_timeout: u64,
    /// Overrides of the preset or config file.
    #[command(flatten)]
    pub set: TrainOverrides,
}

/// Flags of `clipa eval`. Without --zeroshot-data or --retrieval-data it
/// scores the built-in synthetic held-out set.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// A checkpoint folder, or a run folder (its latest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The zero-shot evaluation set.
    #[command(flatten)]
    pub zeroshot: ZeroShotFlags,
    /// Image–caption set for retrieval: WebDataset shards (each `txt` line
    /// a caption), a clip_benchmark dataset folder, or a CSV/TSV (several
    /// rows may name one image).
    #[arg(long)]
    pub retrieval_data: Option<String>,
    /// The split of a clip_benchmark dataset root to evaluate (its
    /// `SPLIT/*.tar`); default: test.
    #[arg(long)]
    pub split: Option<String>,
    /// CSV column with image paths (--retrieval-data).
    #[arg(long, default_value = "filepath")]
    pub csv_img_key: String,
    /// CSV column with captions (--retrieval-data).
    #[arg(long, default_value = "title")]
    pub csv_caption_key: String,
    /// Evaluation preprocessing: center-crop (OpenCLIP's bicubic) or squash
    /// (CLIPA's bilinear square resize). Default: the model's own, from its
    /// config (CLIPA presets and imported `squash` configs squash).
    #[arg(long)]
    pub resize: Option<EvalResize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `clipa classify`.
#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    /// A checkpoint folder, or a run folder (its latest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Comma-separated labels: `"cat,dog,car"`.
    #[arg(long)]
    pub labels: String,
    /// Prompt templates: photo | simple | openai | FILE.
    #[arg(long, default_value = "photo")]
    pub templates: TemplateSet,
    /// Labels shown per image.
    #[arg(long, default_value_t = 3)]
    pub top: usize,
    /// Image files or folders (their PNG/JPEG files).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// `clipa data …`.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Convert Debian's `dataset-fashion-mnist` IDX files into WebDataset
    /// training shards, a test image folder and clip_benchmark test shards.
    FashionMnist(FashionMnistArgs),
}

/// Flags of `clipa data fashion-mnist`.
#[derive(Debug, clap::Args)]
pub struct FashionMnistArgs {
    /// Output folder (gets `train/` shards, a `test/` image folder and the
    /// test split in clip_benchmark's layout, `test-wds/`).
    #[arg(long)]
    pub out: PathBuf,
    /// Folder with the IDX files.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    pub input: PathBuf,
    /// Samples per training shard.
    #[arg(long, default_value_t = 10_000)]
    pub samples_per_shard: usize,
    /// Seed of the caption templates.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Convert only the first N training images (a quick subset).
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Convert only the first N test images.
    #[arg(long)]
    pub limit_test: Option<usize>,
}

/// Flags of `clipa models`.
#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    /// Count at this image size instead of each preset's default.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Count at this text length instead of each preset's context length.
    #[arg(long)]
    pub text_len: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `clipa import-openclip`: a downloaded hub folder (`--dir`), or
/// weights and a config.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["dir", "weights"])))]
pub struct ImportArgs {
    /// A downloaded OpenCLIP hub folder (`UCSC-VLAA/ViT-*-CLIPA*`):
    /// `open_clip_config.json`, `open_clip_model.safetensors` or
    /// `open_clip_pytorch_model.bin`, and its tokenizer files.
    #[arg(long, conflicts_with_all = ["weights", "config"])]
    pub dir: Option<PathBuf>,
    /// OpenCLIP state dict: safetensors, or a PyTorch file (`.bin`, `.pt`,
    /// `.pth`), which is read without running any of its code.
    #[arg(long, requires = "config")]
    pub weights: Option<PathBuf>,
    /// OpenCLIP model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`),
    /// or a hub `open_clip_config.json`.
    #[arg(long, requires = "weights")]
    pub config: Option<PathBuf>,
    /// Vocabulary (`vocab.txt` or `tokenizer.json`) of a model with an
    /// `hf_tokenizer_name` (with --dir: instead of the folder's own).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// Checkpoint folder to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// Flags of `clipa export-openclip`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// clipa checkpoint folder.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// OpenCLIP safetensors file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the OpenCLIP model-config JSON here.
    #[arg(long)]
    pub config_out: Option<PathBuf>,
    /// Nest the text tower under `text.` (OpenCLIP `CustomTextCLIP`).
    #[arg(long)]
    pub custom_text: bool,
}

/// Flags of `clipa embed`: images, captions, or both.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("inputs").required(true).multiple(true).args(["images", "texts"])))]
pub struct EmbedArgs {
    /// clipa checkpoint folder.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Image files, or folders (searched recursively for PNG, JPEG and
    /// WebP files).
    #[arg(long, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// A text file of captions, one a line.
    #[arg(long)]
    pub texts: Option<PathBuf>,
    /// safetensors file to write: `image_features` [N, D] and
    /// `text_features` [M, D], L2-normalised; file names and captions in
    /// its metadata.
    #[arg(long)]
    pub out: PathBuf,
    /// Images or captions per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

/// Flags of `clipa search`: one query, a text or an image.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("query").required(true).args(["text", "image"])))]
pub struct SearchArgs {
    /// clipa checkpoint folder that embeds the query (the one that wrote
    /// the index).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// `clipa embed` output file to search.
    #[arg(long)]
    pub index: PathBuf,
    /// Search by this text, embedded with the checkpoint's text tower.
    #[arg(long)]
    pub text: Option<String>,
    /// Search by this image, embedded with the checkpoint's image tower
    /// and evaluation preprocessing.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Results to print, best first.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Matrix of the index to search.
    #[arg(long, value_enum, default_value_t = Against::Images)]
    pub against: Against,
    /// Print one JSON object (`{"query", "against", "top", "results":
    /// [{"rank", "index", "score", "name"}, ...]}`).
    #[arg(long)]
    pub json: bool,
}

/// Flags of `clipa tokenize`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("captions").required(true).args(["texts", "text"])))]
pub struct TokenizeArgs {
    /// clipa checkpoint folder (its tokenizer and context length).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A text file of captions, one a line.
    #[arg(long)]
    pub texts: Option<PathBuf>,
    /// Captions given on the command line.
    pub text: Vec<String>,
    /// Ids per caption (default: the model's context length).
    #[arg(long)]
    pub context_length: Option<usize>,
    /// Print one JSON object (`{"context_length", "ids": [[...], ...]}`).
    #[arg(long)]
    pub json: bool,
}

/// Flags of `clipa check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Largest relative L2 error accepted against the CPU [default: 1e-4;
    /// 1e-2 on cuda, whose float32 matrix products run as TF32].
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Batch size of the test input.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sample.
    #[arg(long, default_value_t = 17)]
    pub tokens: usize,
    /// Model width (a multiple of --heads).
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
}

/// Sets up `tracing` to stderr: info by default, warn with `-q`, debug and
/// trace with `-v`/`-vv`; `RUST_LOG` overrides.
pub fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    // burn-collective logs every registration and transfer at info; at the
    // default level those would bury the progress bar.
    let quiet_deps = if verbose == 0 {
        ",burn_collective=warn,burn_communication=warn"
    } else {
        ""
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level}{quiet_deps}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

/// `--preset`'s values for `clipa train`, each with its one-line
/// description in `--help` (core's preset table).
fn training_presets() -> clap::builder::PossibleValuesParser {
    clipa_core::train::presets::PRESETS
        .iter()
        .map(|p| clap::builder::PossibleValue::new(p.name).help(p.about))
        .collect::<Vec<_>>()
        .into()
}

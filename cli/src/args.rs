//! Command-line flags. Global flags select the backend and the log level;
//! each subcommand has its own struct.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use clipa_backends::BackendKind;

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
    /// Convert OpenCLIP weights (safetensors) into a clipa checkpoint folder.
    ImportOpenclip(ImportArgs),
    /// Write a clipa checkpoint as OpenCLIP weights (safetensors) and config.
    ExportOpenclip(ExportArgs),
    /// Compute L2-normalised image embeddings with a checkpoint.
    Embed(EmbedArgs),
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

/// Flags of `clipa import-openclip`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// OpenCLIP state dict as safetensors (pickle files are refused).
    #[arg(long)]
    pub weights: PathBuf,
    /// OpenCLIP model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`).
    #[arg(long)]
    pub config: PathBuf,
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

/// Flags of `clipa embed`.
#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    /// clipa checkpoint folder.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Image files, or folders of PNG/JPEG files.
    #[arg(long, num_args = 1.., required = true)]
    pub images: Vec<PathBuf>,
    /// safetensors file to write (`image_features` [N, D]; names in metadata).
    #[arg(long)]
    pub out: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

/// Flags of `clipa check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Largest relative L2 error accepted against the CPU.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

//! `clipa`: train and run CLIP models the CLIPA way.
//!
//! `main` only prints errors; all work happens in [`run`], which returns
//! `anyhow::Result` (ripgrep's `crates/core/main.rs` shape).

use std::process::ExitCode;

mod args;
mod commands;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = <args::Args as clap::Parser>::parse();
    args::init_logging(args.verbose, args.quiet);
    commands::dispatch(&args)
}

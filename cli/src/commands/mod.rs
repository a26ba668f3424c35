//! One module per subcommand. Commands parse nothing and hold no model
//! logic: they call into `clipa-core` through `clipa-backends`.

mod backends;
mod bench;
mod check;
mod classify;
mod data;
mod embed;
mod eval;
mod interop;
mod models;
mod plan;
mod plot;
mod search;
mod sweep;
mod train;

use std::io::Write;

use anyhow::Context;

use crate::args::{Args, Command};

/// Writes one line to `out`. A closed pipe (`clipa tokenize … | head -1`)
/// ends the process quietly with success, as `head` expects of a writer;
/// any other write failure is an error.
pub(crate) fn write_line(out: &mut impl Write, line: &str) -> anyhow::Result<()> {
    written(writeln!(out, "{line}"))
}

/// Writes `text` to standard output (the `outln!` and `out!` macros), as
/// [`write_line`]: a closed pipe ends the process quietly, any other
/// failure (a full disk, `> /dev/full`) is an error. `println!` panics on
/// both.
pub(crate) fn write_out(text: &str) -> anyhow::Result<()> {
    written(std::io::stdout().lock().write_all(text.as_bytes()))
}

/// A write to standard output judged: a closed pipe exits quietly with
/// success, any other failure is an error.
fn written(result: std::io::Result<()>) -> anyhow::Result<()> {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => other.context("cannot write to standard output"),
    }
}

/// Runs the subcommand the user picked.
pub fn dispatch(args: &Args) -> anyhow::Result<()> {
    match &args.command {
        Command::Backends => backends::run(),
        Command::Check(check) => check::run(args.backend, args.device, check),
        Command::Models(models) => models::run(models),
        Command::ImportOpenclip(import) => interop::import(import),
        Command::ExportOpenclip(export) => interop::export(export),
        Command::Embed(embed) => embed::run(args.backend, args.device, embed),
        Command::Tokenize(t) => embed::tokenize(t),
        Command::Search(search) => search::run(args.backend, args.device, search),
        Command::Train(train) => train::run(args.backend, args.device, train),
        Command::Eval(eval_args) => eval::run(args.backend, args.device, eval_args),
        Command::Classify(c) => classify::run(args.backend, args.device, c),
        Command::Data(data) => data::run(data),
        Command::Plot(plot_args) => plot::run(&plot_args.run_dir),
        Command::Sweep(sweep_args) => sweep::run(args.backend, args.device, sweep_args),
        Command::Plan(plan_args) => plan::run(plan_args),
        Command::Bench(bench_args) => bench::run(args.backend, args.device, bench_args),
    }
}

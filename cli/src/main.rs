//! `clipa`: train and run CLIP models the CLIPA way.
//!
//! `main` only prints errors; all work happens in [`run`], which returns
//! `anyhow::Result` (ripgrep's `crates/core/main.rs` shape).

use std::process::ExitCode;

/// `println!` for a command's output: through
/// [`commands::write_out`], so a closed pipe ends the process quietly and
/// an unwritable standard output fails the command (`?`: the enclosing
/// function returns `anyhow::Result`) instead of panicking.
macro_rules! outln {
    () => {
        $crate::commands::write_out("\n")?
    };
    ($($arg:tt)*) => {
        $crate::commands::write_out(&format!("{}\n", format_args!($($arg)*)))?
    };
}

/// `print!` for a command's output, as `outln!`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::commands::write_out(&format!($($arg)*))?
    };
}

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
    let args = match <args::Args as clap::Parser>::try_parse() {
        Ok(args) => args,
        // `--help` and `--version` print as clap writes them.
        Err(err) if !err.use_stderr() => err.exit(),
        Err(err) => anyhow::bail!(one_line(&err.render().to_string())),
    };
    args::init_logging(args.verbose, args.quiet);
    commands::dispatch(&args)
}

/// clap's error message on one line, as every user mistake is reported: its
/// `error: ` line, then its details (the possible values, a tip) after it,
/// without the usage line and the pointer to `--help` that clap adds.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

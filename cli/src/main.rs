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
    quiet_graphics_stack();
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

/// Gives the Wayland client library that Mesa's Vulkan drivers load an
/// `XDG_RUNTIME_DIR` where none is set (containers, CI, `ssh` without a
/// login session): without one it prints `error: XDG_RUNTIME_DIR is
/// invalid or not set in the environment.` on every WGPU adapter probe,
/// which reads as clipa failing when nothing did. The folder is private
/// (0700, as the XDG spec asks) and holds no display socket, so the
/// library's connection attempt fails quietly. Runs first in `main`,
/// before any thread exists, as setting a variable requires.
fn quiet_graphics_stack() {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
            return;
        }
        let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("clipa-runtime-{uid}"));
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        // Only a folder of our own, closed to others, is used.
        let ours = std::fs::symlink_metadata(&dir)
            .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.permissions().mode() & 0o077 == 0);
        if ours {
            // SAFETY: called first in `main`, before any other thread
            // exists, so no concurrent `getenv` can observe the write.
            #[allow(unsafe_code)]
            unsafe {
                std::env::set_var("XDG_RUNTIME_DIR", &dir)
            };
        }
    }
}

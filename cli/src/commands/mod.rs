//! One module per subcommand. Commands parse nothing and hold no model
//! logic: they call into `clipa-core` through `clipa-backends`.

mod backends;
mod check;

use crate::args::{Args, Command};

/// Runs the subcommand the user picked.
pub fn dispatch(args: &Args) -> anyhow::Result<()> {
    match &args.command {
        Command::Backends => backends::run(),
        Command::Check(check) => check::run(args.backend, args.device, check),
    }
}

//! `clipa backends`: what this binary can run on, right now.

use clipa_backends::{BackendKind, probe};

/// Prints one line per backend: compiled in or not, and the device found.
pub fn run() -> anyhow::Result<()> {
    outln!("{:<6} {:<10} device", "name", "compiled");
    for kind in BackendKind::ALL {
        let status = if !kind.is_compiled() {
            format!("- (rebuild with --features {kind})")
        } else {
            match probe(kind, None) {
                Ok(info) => format!("{}: {}", info.index, info.name),
                Err(err) => format!("none: {err}"),
            }
        };
        let compiled = if kind.is_compiled() { "yes" } else { "no" };
        outln!("{:<6} {:<10} {status}", kind.name(), compiled);
    }
    Ok(())
}

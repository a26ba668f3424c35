//! The typed error of the core crate. The CLI turns it into a one-line
//! message and exit code 2.

use std::path::PathBuf;

/// Everything that can go wrong inside `clipa-core`.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Config(String),
    /// A file could not be read or written. The I/O error is part of the
    /// message and not a `source()`: an error chain printed whole (the
    /// CLI's `{:#}`) would repeat it.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        cause: std::io::Error,
    },
    /// A state dict does not match the module it is loaded into.
    #[error("weights do not match the model: {0}")]
    StateDict(String),
    /// A file has the wrong format or content.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Training cannot continue (a non-finite loss, too much bad data).
    #[error("training stopped: {0}")]
    Training(String),
    /// A collective operation between replicas failed (a replica or node
    /// left, shapes disagreed, the orchestrator is unreachable).
    #[error("data-parallel collective failed: {0}")]
    Collective(String),
    /// Another live run holds the run folder's lock.
    #[error(
        "{} is in use by another clipa run{}: wait for it to finish, or choose another --output",
        run.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        /// The run folder.
        run: PathBuf,
        /// The holder's process id, where it could be read.
        pid: Option<u32>,
    },
    /// The backend failed while running a computation.
    #[error("backend error: {0}")]
    Backend(String),
}

/// Result alias for `clipa-core`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            cause: source,
        }
    }
}

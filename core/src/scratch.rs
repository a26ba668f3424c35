//! Scratch folders for unit tests, deleted when the test ends.
//!
//! Tests that write files used to leave `clipa-*-<pid>` folders in the
//! system temp dir; every run has a new pid, so nothing ever reused or
//! removed them, and repeated runs filled the disk (one data-parallel
//! training folder is 155 MB). A [`Scratch`] removes its folder when it is
//! dropped, which also happens while a failing test unwinds.

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// The folder `clipa-<name>-<pid>` under the system temp dir, removed with
/// everything in it when the guard is dropped.
///
/// Bind it for the whole test (`let dir = Scratch::new("x");`): `let _ =`
/// or a temporary would delete the folder at once. Where code wants a
/// `PathBuf`, pass `dir.to_path_buf()` or `dir.join(..)` and keep the guard.
#[derive(Debug)]
#[must_use = "the folder is deleted as soon as the guard is dropped"]
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    /// An empty folder, created now.
    pub(crate) fn new(name: &str) -> Self {
        let dir = Self::absent(name);
        std::fs::create_dir_all(&dir.0).expect("create the scratch folder");
        dir
    }

    /// The folder's path with nothing there yet, for code under test that
    /// must create it itself (a run folder, a checkpoint).
    pub(crate) fn absent(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("clipa-{name}-{}", std::process::id()));
        // A folder left by an earlier process with the same pid (one killed
        // before its guards ran) would otherwise leak files into this test.
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Deref for Scratch {
    type Target = Path;

    /// The folder's path, so that `dir.join(..)` and `&dir` as `&Path` work.
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    /// The folder's path, for `std::fs` functions that take `AsRef<Path>`.
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    /// Removes the folder. Errors are ignored: the folder may already be
    /// gone (a test removed it on purpose), and a leftover folder must not
    /// turn a passing test into a failure.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

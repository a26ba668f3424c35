//! The run folder's advisory lock: one live run per folder. Two runs into
//! one `--output`, or a resume of a run that is still going, would overwrite
//! each other's checkpoints and metrics.
//!
//! The lock is the operating system's (`flock` on Unix, `LockFileEx` on
//! Windows, through `std::fs::File::try_lock`): it is released when the
//! holding process exits, however it exits, so a killed run's folder is
//! never left blocked. The file holds the holder's pid, for the message.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The lock file inside a run folder.
pub const LOCK_FILE: &str = "run.lock";

/// A held lock on a run folder; released when dropped (or when the
/// process ends).
#[derive(Debug)]
pub struct RunLock {
    /// Held open: closing it releases the lock.
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of run folder `run`, making the folder if needed.
    /// [`Error::Locked`] where another live process holds it.
    pub fn acquire(run: &Path) -> Result<Self> {
        std::fs::create_dir_all(run).map_err(|e| Error::io(run, e))?;
        let path = run.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                // The holder wrote its pid when it took the lock.
                let _ = file.read_to_string(&mut text);
                return Err(Error::Locked {
                    run: run.to_path_buf(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let pid = std::process::id();
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{pid}"))
            .and_then(|()| file.flush())
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second lock on a held folder fails naming this process; once the
    /// first is dropped, the folder can be locked again.
    #[test]
    fn a_held_folder_refuses_a_second_lock_until_released() {
        let dir = std::env::temp_dir().join(format!("clipa-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = RunLock::acquire(&dir).expect("a free folder locks");
        assert!(first.path().is_file());
        match RunLock::acquire(&dir) {
            Err(Error::Locked { run, pid }) => {
                assert_eq!(run, dir);
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("a held folder locked again: {other:?}"),
        }
        drop(first);
        let again = RunLock::acquire(&dir).expect("a released folder locks");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

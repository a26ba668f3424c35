//! Counts the CubeCL kernel launches of the process (wgpu, cuda) through
//! CubeCL's own profiling log at level `minimal`: each launch is logged by
//! name when it is submitted, with no timing and no device sync.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use burn::cubecl::config::profiling::ProfilingLogLevel;
use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

/// CubeCL's launch log, in a file of the process's own, and how far it has
/// been counted.
pub struct LaunchLog {
    path: PathBuf,
    /// Bytes read so far and the launches counted in them.
    read: u64,
    launches: u64,
}

impl LaunchLog {
    /// Turns CubeCL's launch log on, before any CubeCL device exists (CubeCL
    /// reads its configuration once, when the first device is made).
    /// `None` where that has already happened, or where the user's own
    /// configuration (`cubecl.toml`, `CUBECL_DEBUG_LOG`) already profiles:
    /// theirs is left alone.
    pub fn start() -> Option<Self> {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if !matches!(config.profiling.logger.level, ProfilingLogLevel::Disabled) {
            return None;
        }
        let path = std::env::temp_dir().join(format!("clipa-launches-{}.log", std::process::id()));
        // A stale file of a process with the same id would be counted too.
        let _ = std::fs::remove_file(&path);
        config.profiling.logger.level = ProfilingLogLevel::Minimal;
        config.profiling.logger.file = Some(path.clone());
        config.profiling.logger.append = true;
        let mut slot = CubeClRuntimeConfig::storage().lock();
        if slot.is_some() {
            return None;
        }
        *slot = Some(Arc::new(config));
        Some(Self {
            path,
            read: 0,
            launches: 0,
        })
    }

    /// The launches logged so far. CubeCL writes each line from a
    /// background task after the launch is submitted, so the caller syncs
    /// the device first and the count is taken once the file has stopped
    /// growing (polled every 20 ms, for at most 2 s).
    pub fn launches(&mut self) -> u64 {
        let mut quiet = 0;
        for _ in 0..100 {
            let before = self.read;
            self.count_new_lines();
            quiet = if self.read == before { quiet + 1 } else { 0 };
            if quiet == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.launches
    }

    /// Counts the `Executing …` lines written since the last count (whole
    /// lines only).
    fn count_new_lines(&mut self) {
        let Ok(mut file) = File::open(&self.path) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.read)).is_err() {
            return;
        }
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        while let Ok(n) = reader.read_line(&mut line) {
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            self.read += n as u64;
            if line.starts_with("Executing ") {
                self.launches += 1;
            }
            line.clear();
        }
    }
}

impl Drop for LaunchLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

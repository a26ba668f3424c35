//! The driving thread of a CPU job: a rayon worker, with the others kept
//! looking for work while the job runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Runs `job` on one of rayon's worker threads (where the pool has two or
/// more), the calling thread waiting for it.
///
/// Every kernel and every flex op is a rayon parallel loop. Called from a
/// thread outside the pool, each one is injected into the pool's queue, a
/// sleeping worker is woken, and the caller sleeps until the last task is
/// done and wakes it: two thread hand-offs per op, hundreds per training
/// step, with only the workers computing. Called from a worker, the loop
/// splits on that worker's own deque, the worker computes its share, and
/// the serial code between the ops runs on it without a hand-off.
///
/// The other workers do not go to sleep between the job's ops while it
/// runs ([`keep_warm`]).
///
/// A one-thread pool runs `job` here instead: its one worker, blocked in a
/// job that waits on another thread's rayon work, would deadlock.
pub(crate) fn on_worker<R: Send>(job: impl FnOnce() -> R + Send) -> R {
    if rayon::current_num_threads() < 2 {
        return job();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let driver = rayon::current_thread_index();
        let done = &done;
        s.spawn_broadcast(move |_, ctx| {
            if Some(ctx.index()) != driver {
                keep_warm(done);
            }
        });
        // Set on the way out, a panic included: the scope waits for the
        // workers' loops, which would otherwise never end.
        let _stop = StopOnDrop(done);
        job()
    })
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Keeps a worker looking for work until `done`: it runs whatever rayon
/// tasks it finds, and between them gives its core to any other runnable
/// thread (`sched_yield`) instead of going to sleep.
///
/// An idle rayon worker sleeps after about 32 rounds of looking, and the
/// next parallel op must wake it: a futex wake-up, an inter-processor
/// interrupt, on a VM a halted vCPU resumed, tens of microseconds before it
/// takes its half. A training step is hundreds of short parallel ops with
/// serial code between them, so that latency is paid hundreds of times a
/// step. OpenMP's default wait policy (PyTorch's CPU threads) spins for the
/// same reason.
///
/// After [`SPIN_FOR`] without work (the job waits on its data loader, say)
/// the worker naps [`NAP`] between looks, as OpenMP's threads go to sleep
/// after their spin count: an idle job does not hold a core, and the first
/// op after such a pause goes without this worker for at most one nap.
fn keep_warm(done: &AtomicBool) {
    /// Far longer than the serial code between two ops of a step.
    const SPIN_FOR: Duration = Duration::from_millis(5);
    /// Short against the ops it may delay, long against a wake-up.
    const NAP: Duration = Duration::from_micros(500);
    let mut idle_since: Option<Instant> = None;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < SPIN_FOR {
            std::thread::yield_now();
        } else {
            std::thread::sleep(NAP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// A job on a worker returns its value with the other workers kept
    /// looking for work, its parallel loops still split across the pool,
    /// and a job that panics hands the panic back instead of leaving the
    /// scope waiting forever on those workers.
    #[test]
    fn a_job_on_a_worker_returns_splits_its_loops_and_passes_panics_on() {
        let (sum, threads, driver) = on_worker(|| {
            let ids = std::sync::Mutex::new(std::collections::HashSet::new());
            let sum: u64 = (0..1_000_000usize)
                .into_par_iter()
                .with_max_len(1_000)
                .map(|i| {
                    let i = i as u64;
                    ids.lock().unwrap().insert(std::thread::current().id());
                    // Long enough that an idle worker steals a share.
                    std::hint::black_box((0..50).fold(i, |a, b| a ^ b))
                })
                .sum();
            let driver = rayon::current_thread_index();
            (sum, ids.into_inner().unwrap(), driver)
        });
        let want: u64 = (0..1_000_000u64)
            .map(|i| (0..50).fold(i, |a, b| a ^ b))
            .sum();
        assert_eq!(sum, want);
        if rayon::current_num_threads() >= 2 {
            assert!(driver.is_some(), "the job ran on a worker");
            assert!(threads.len() >= 2, "one thread did every task: {threads:?}");
        }
        let panicked = std::panic::catch_unwind(|| on_worker(|| panic!("a failing job")));
        assert!(panicked.is_err());
    }
}

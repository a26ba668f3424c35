//! The allocator settings of the CPU backend (glibc only).
//!
//! A training step allocates and frees the same large buffers every step:
//! activations, their gradients, the kernels' outputs, 4–17 MB each at
//! bench-tiny's img32. glibc serves a block above its mmap threshold
//! (dynamic, 128 KiB at first) with a fresh `mmap` and gives it back on
//! `free`, and it trims the heap's free top back to the kernel; either way
//! the next step's buffer is new pages, each one a page fault and a zeroing
//! in the kernel, much of it on the thread that drives the step while the
//! rayon workers wait. With the threshold at its 32 MiB maximum and no
//! trimming, those buffers come back from the heap instead.
//! `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184` had
//! that effect from the environment: system time 1.86 → 0.92 s, img32 step
//! 755 → 706 ms (docs/BENCHMARKS.md). The cost: freed memory stays with the
//! process, up to its peak use, which it needs again at the next step.
//!
//! A block above the 32 MiB ceiling, such as bench-tiny's 50 MB token
//! embedding gradient, was still a fresh `mmap` every step: about 12 000
//! page faults a step. With `mmap` off (`M_MMAP_MAX` 0) glibc serves it
//! from its heaps too. A block larger than a thread arena's 64 MiB heap
//! (a B/16 embedding gradient on a rayon worker) is still served: glibc
//! falls back to `mmap` when no heap can hold it (tested below).
#![allow(unsafe_code)]

/// Raises glibc's mmap threshold to its maximum, turns `mmap` for large
/// blocks and heap trimming off (see the module doc). Nothing on other C
/// libraries.
pub(super) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's ceiling for the threshold on 64-bit targets
        // (`DEFAULT_MMAP_THRESHOLD_MAX`, 4 MiB · sizeof(long)).
        const MMAP_THRESHOLD_MAX: libc::c_int = 32 << 20;
        // SAFETY: mallopt only changes the allocator's tuning parameters,
        // which glibc reads under its own lock; no memory is touched.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
            libc::mallopt(libc::M_MMAP_MAX, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `mmap` off, a block larger than a thread arena's 64 MiB heap
    /// must still be served on a thread that is not the main one (glibc
    /// falls back to `mmap`); if it were not, Rust would abort on the
    /// failed allocation and take the test binary with it.
    #[test]
    fn a_block_larger_than_a_thread_heap_is_served_off_the_main_thread() {
        keep_freed_memory();
        let len = std::thread::spawn(|| {
            // Two sizes: one that fits a thread heap, one that cannot.
            let mut total = 0;
            for mb in [50usize, 200] {
                let mut v = vec![0u8; mb << 20];
                v[0] = 1;
                let last = v.len() - 1;
                v[last] = 1;
                total += std::hint::black_box(&v).iter().step_by(4096).count();
            }
            total
        })
        .join()
        .expect("the allocating thread finished");
        assert_eq!(len, (250 << 20) / 4096);
    }
}

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
#![allow(unsafe_code)]

/// Raises glibc's mmap threshold to its maximum and turns heap trimming
/// off (see the module doc). Nothing on other C libraries.
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
        }
    }
}

//! The one `gemm` call the CPU kernels share: raw pointers and strides, so
//! `unsafe`, confined here and at the call sites (each with its `SAFETY`
//! reason).
#![allow(unsafe_code)]

pub(super) use gemm::Parallelism;

/// A matrix operand: its first element and its (column, row) strides.
pub(super) type Operand<P> = (P, isize, isize);

/// `dst[m×n] = alpha·dst + beta·lhs[m×k]·rhs[k×n]` (dst is not read when
/// `alpha` is 0), on rayon's threads or on the caller's alone.
///
/// # Safety
/// Every pointer must address a matrix of the given size and strides
/// within its buffer, and nothing else may access `dst`'s elements
/// meanwhile.
pub(super) unsafe fn product(
    [m, n, k]: [usize; 3],
    dst: Operand<*mut f32>,
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
    alpha: f32,
    beta: f32,
    parallelism: Parallelism,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.1,
            dst.2,
            alpha != 0.0,
            lhs.0,
            lhs.1,
            lhs.2,
            rhs.0,
            rhs.1,
            rhs.2,
            alpha,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

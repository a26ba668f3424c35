//! The one `gemm` call the CPU kernels share: raw pointers and strides, so
//! `unsafe`, confined here and at the call sites (each with its `SAFETY`
//! reason).
#![allow(unsafe_code)]

use burn::tensor::{Bytes, DType, Shape};
use burn_flex::{FlexTensor, Layout};

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

/// A raw pointer that rayon tasks share to write disjoint parts of one
/// buffer (in attention, each task owns one (batch row, head) pair's column
/// block).
#[derive(Clone, Copy)]
pub(super) struct Shared(*mut f32);
// SAFETY: the kernels give each task its own elements to write (attention:
// `Dims::offset`), so no two threads touch the same address.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer `offset` elements in. A method taking `self`, so that a
    /// closure calling it captures the whole `Shared` (Send) rather than
    /// its raw-pointer field (not Send).
    ///
    /// # Safety
    /// `offset` must lie within the buffer.
    pub(super) unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.add(offset) }
    }
}

/// A float32 output buffer that the kernels write in full (`product` with
/// `alpha` 0 reads nothing), so it is never zeroed: the `memset` of a
/// zeroed allocation was 4–5 % of a bench-tiny img32 training step, half
/// of it the linear layers' outputs and gradients.
pub(super) struct Unset {
    buf: Vec<f32>,
    shape: Shape,
}

impl Unset {
    /// Room for a `shape` tensor, none of it written yet.
    pub(super) fn new(shape: Shape) -> Self {
        Self {
            buf: Vec::with_capacity(shape.num_elements()),
            shape,
        }
    }

    /// The buffer's first element, to write through.
    pub(super) fn ptr(&mut self) -> Shared {
        Shared(self.buf.as_mut_ptr())
    }

    /// The buffer's elements, to write as slices.
    pub(super) fn slots(&mut self) -> &mut [std::mem::MaybeUninit<f32>] {
        &mut self.buf.spare_capacity_mut()[..self.shape.num_elements()]
    }

    /// The written buffer as a contiguous tensor of its shape.
    ///
    /// # Safety
    /// Every element must have been written, through [`Unset::ptr`] or
    /// [`Unset::slots`].
    pub(super) unsafe fn finish(self) -> FlexTensor {
        let Self { mut buf, shape } = self;
        // SAFETY: the capacity is at least the element count, and the
        // caller wrote all of them.
        unsafe { buf.set_len(shape.num_elements()) };
        FlexTensor::new(
            Bytes::from_elems(buf),
            Layout::contiguous(shape),
            DType::F32,
        )
    }
}

/// Writes `value` into every slot and returns them as the floats they now
/// are.
pub(super) fn filled(slots: &mut [std::mem::MaybeUninit<f32>], value: f32) -> &mut [f32] {
    slots.fill(std::mem::MaybeUninit::new(value));
    // SAFETY: every element was just written, and `MaybeUninit<f32>` has
    // the layout of `f32`.
    unsafe { &mut *(std::ptr::from_mut(slots) as *mut [f32]) }
}

/// Writes `from` into `slots` (the same length) and returns them as the
/// floats they now are.
pub(super) fn copied<'a>(
    slots: &'a mut [std::mem::MaybeUninit<f32>],
    from: &[f32],
) -> &'a mut [f32] {
    assert_eq!(slots.len(), from.len(), "a chunk and its source");
    for (slot, &x) in slots.iter_mut().zip(from) {
        slot.write(x);
    }
    // SAFETY: every element was just written, and `MaybeUninit<f32>` has
    // the layout of `f32`.
    unsafe { &mut *(std::ptr::from_mut(slots) as *mut [f32]) }
}

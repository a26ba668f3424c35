//! What the multi-tensor kernels share: how parameters are split into
//! launches, and in-place ownership.

use burn_cubecl::{CubeRuntime, tensor::CubeTensor};

/// Units per cube of the multi-tensor kernels (a power of two: the sum of
/// squares halves it in its tree reduction).
pub(super) const CUBE: u32 = 256;

/// The most tensors one launch takes whatever the binding limit: the kernel
/// is unrolled over them, so this bounds its code size.
const MAX_PER_LAUNCH: usize = 32;

/// The most cubes along x per tensor; a tensor longer than
/// `MAX_CUBES_X · CUBE` elements is strided over.
const MAX_CUBES_X: usize = 1024;

/// Elements each unit takes at least, before more cubes are added.
const PER_UNIT: usize = 4;

/// One launch of a multi-tensor kernel: the tensors it takes (indices into
/// the caller's list) and its cubes along x (each tensor gets a row of
/// them along y).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Chunk {
    /// Indices of the tensors, largest first.
    pub slots: Vec<usize>,
    /// Cubes per tensor, enough for the largest.
    pub cubes_x: u32,
}

/// Splits tensors of lengths `numels` into launches of at most
/// `per_launch` (at least one, at most [`MAX_PER_LAUNCH`]) tensors that
/// share their `keys` (a launch takes one set of scalars), each launch of
/// tensors of similar length (sorted by length), so that few cubes of a
/// row find nothing to do. Deterministic: the split depends only on the
/// lengths and keys.
pub(super) fn chunks<K: PartialEq>(numels: &[usize], keys: &[K], per_launch: usize) -> Vec<Chunk> {
    let per_launch = per_launch.clamp(1, MAX_PER_LAUNCH);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in 0..numels.len() {
        match groups.iter_mut().find(|g| keys[g[0]] == keys[i]) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    let mut out = Vec::new();
    for mut group in groups {
        group.sort_by_key(|&i| std::cmp::Reverse(numels[i]));
        for slots in group.chunks(per_launch) {
            let longest = numels[slots[0]];
            let cubes_x = longest
                .div_ceil(CUBE as usize * PER_UNIT)
                .clamp(1, MAX_CUBES_X) as u32;
            out.push(Chunk {
                slots: slots.to_vec(),
                cubes_x,
            });
        }
    }
    out
}

/// `t` itself where nothing else holds it and it is contiguous, so a kernel
/// may write it in place; a contiguous copy otherwise.
pub(super) fn own<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    if t.can_mut() && t.is_contiguous() {
        t
    } else {
        t.copy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tensor lands in exactly one launch with its own key, launches
    /// respect the binding budget, and cubes cover the longest tensor of
    /// each launch.
    #[test]
    fn chunks_cover_each_tensor_once_by_key_within_the_budget() {
        let numels = [10, 5_000_000, 512, 512, 3, 1 << 20, 77];
        let keys = [0, 1, 0, 1, 0, 1, 0];
        let got = chunks(&numels, &keys, 3);
        let mut seen = vec![0; numels.len()];
        for c in &got {
            assert!(!c.slots.is_empty() && c.slots.len() <= 3, "{c:?}");
            assert!(
                c.slots.iter().all(|&i| keys[i] == keys[c.slots[0]]),
                "{c:?}"
            );
            let longest = c.slots.iter().map(|&i| numels[i]).max().unwrap();
            assert_eq!(longest, numels[c.slots[0]], "largest first: {c:?}");
            let units = c.cubes_x as usize * CUBE as usize;
            // Strided when capped; otherwise at most PER_UNIT elements a unit.
            assert!(
                c.cubes_x as usize == MAX_CUBES_X || units * PER_UNIT >= longest,
                "{c:?}"
            );
            c.slots.iter().for_each(|&i| seen[i] += 1);
        }
        assert_eq!(seen, vec![1; numels.len()]);
        // Key 0 has four tensors: two launches of ≤ 3; key 1 has three: one.
        assert_eq!(got.len(), 3);
        // A budget of zero still makes progress, one tensor a launch; a huge
        // one is capped.
        assert_eq!(chunks(&numels, &[0; 7], 0).len(), 7);
        let many = vec![1usize; 100];
        assert_eq!(
            chunks(&many, &[(); 100], 1 << 20).len(),
            100usize.div_ceil(MAX_PER_LAUNCH)
        );
    }
}

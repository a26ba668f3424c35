//! Storages and tensors of a checkpoint: the copy budget, where storages
//! come from and how they are loaded, and gathering tensors out of them.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;

use zip::ZipArchive;

use super::unpickle::{Node, Parsed};
use super::{EXPANSION_LIMIT, RawTensor, Result, TorchDtype, format_err, read_entry};

// ---------------------------------------------------------------------------
// Storages and tensors
// ---------------------------------------------------------------------------

/// A running allowance of bytes that may still be copied out of the file.
pub(super) struct Budget {
    pub(super) left: usize,
}

impl Budget {
    pub(super) fn take(&mut self, n: usize) -> Result<()> {
        self.left = self.left.checked_sub(n).ok_or_else(|| {
            format_err(format!(
                "PyTorch checkpoint asks for more memory than {EXPANSION_LIMIT}x its own size \
                 (a hostile or corrupt file)"
            ))
        })?;
        Ok(())
    }
}

/// Where persistent ids (storages) are resolved.
pub(super) enum Source<'z> {
    /// Not inside a checkpoint body: persistent ids are a format error.
    Bare,
    /// Storages are zip entries `<prefix>data/<key>`.
    Zip {
        archive: ZipArchive<Cursor<&'z [u8]>>,
        prefix: String,
    },
    /// Storages follow the pickles; their bytes are filled in afterwards.
    Legacy,
}

pub(super) struct StorageData {
    pub(super) dtype: TorchDtype,
    pub(super) bytes: Option<Vec<u8>>,
}

/// A storage as a tensor sees it: a root storage, or an element range of
/// one (legacy view_metadata).
#[derive(Debug, Clone, Copy)]
pub(super) struct StorageRef {
    index: usize,
    dtype: TorchDtype,
    start: usize,
    /// `None`: to the end of the root storage.
    len: Option<usize>,
}

/// A decoded persistent id.
pub(super) struct Pid {
    pub(super) dtype: TorchDtype,
    pub(super) key: String,
    pub(super) numel: usize,
    pub(super) view: Option<(String, usize, usize)>,
}

pub(super) struct Storages<'z> {
    pub(super) source: Source<'z>,
    pub(super) by_key: HashMap<String, usize>,
    views: HashMap<String, StorageRef>,
    pub(super) data: Vec<StorageData>,
    budget: Budget,
}

impl<'z> Storages<'z> {
    pub(super) fn new(source: Source<'z>, budget: Budget) -> Self {
        Self {
            source,
            by_key: HashMap::new(),
            views: HashMap::new(),
            data: Vec::new(),
            budget,
        }
    }

    pub(super) fn load(&mut self, pid: Pid) -> Result<StorageRef> {
        let index = match self.by_key.get(&pid.key) {
            Some(&index) => {
                if self.data[index].dtype != pid.dtype {
                    return Err(format_err(format!(
                        "PyTorch checkpoint: storage {:?} is used with two dtypes",
                        pid.key
                    )));
                }
                index
            }
            None => {
                let bytes = match &mut self.source {
                    Source::Bare => {
                        return Err(format_err(
                            "not a PyTorch checkpoint: a pickle refers to tensor storage \
                             outside a checkpoint container",
                        ));
                    }
                    Source::Legacy => None,
                    Source::Zip { archive, prefix } => {
                        let expected =
                            pid.numel.checked_mul(pid.dtype.size_of()).ok_or_else(|| {
                                format_err("PyTorch checkpoint: storage size overflows")
                            })?;
                        let name = format!("{prefix}data/{}", pid.key);
                        let bytes = read_entry(archive, &name, expected, &mut self.budget)?;
                        if bytes.len() != expected {
                            return Err(format_err(format!(
                                "PyTorch zip checkpoint: {name} holds {} bytes, {expected} expected",
                                bytes.len()
                            )));
                        }
                        Some(bytes)
                    }
                };
                self.data.push(StorageData {
                    dtype: pid.dtype,
                    bytes,
                });
                self.by_key.insert(pid.key.clone(), self.data.len() - 1);
                self.data.len() - 1
            }
        };
        let root = StorageRef {
            index,
            dtype: pid.dtype,
            start: 0,
            len: None,
        };
        let Some((view_key, start, len)) = pid.view else {
            return Ok(root);
        };
        match self.views.get(&view_key) {
            Some(view) if view.index == index => Ok(*view),
            Some(_) => Err(format_err(format!(
                "PyTorch checkpoint: storage view {view_key:?} names two root storages"
            ))),
            None => {
                let view = StorageRef {
                    start,
                    len: Some(len),
                    ..root
                };
                self.views.insert(view_key, view);
                Ok(view)
            }
        }
    }
}

/// A tensor as `_rebuild_tensor_v2` describes it; gathered only at the end,
/// because legacy storages are read after the pickle that uses them.
#[derive(Debug)]
pub(super) struct TensorRef {
    pub(super) storage: StorageRef,
    pub(super) offset: usize,
    pub(super) shape: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

/// Gathers one tensor. On a storage's `last_use` a tensor that is exactly
/// the whole storage takes its bytes instead of copying them, so a state
/// dict is not held twice in memory.
fn materialize(t: &TensorRef, storages: &mut Storages<'_>, last_use: bool) -> Result<RawTensor> {
    let dtype = t.storage.dtype;
    let es = dtype.size_of();
    let oob = || format_err("PyTorch checkpoint: a tensor reaches outside its storage");
    let total = match &storages.data[t.storage.index].bytes {
        Some(bytes) => bytes.len() / es,
        None => {
            return Err(format_err(
                "legacy PyTorch checkpoint: a tensor's storage is missing from the file",
            ));
        }
    };
    let start = t.storage.start;
    let len = match t.storage.len {
        Some(len) => len,
        None => total.checked_sub(start).ok_or_else(oob)?,
    };
    if start.checked_add(len).is_none_or(|end| end > total) {
        return Err(oob());
    }
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(oob)?;
    if numel == 0 {
        return Ok(RawTensor {
            dtype,
            shape: t.shape.clone(),
            bytes: Vec::new(),
        });
    }
    let mut last = t.offset;
    for (&d, &s) in t.shape.iter().zip(&t.stride) {
        last = (d - 1)
            .checked_mul(s)
            .and_then(|step| last.checked_add(step))
            .ok_or_else(oob)?;
    }
    if last >= len {
        return Err(oob());
    }
    // Overlapping strides (expand) could make a tensor far larger than the
    // bytes behind it; state dicts never need that.
    if numel > len {
        return Err(format_err(
            "PyTorch checkpoint: a tensor has more elements than its storage \
             (overlapping strides are not read)",
        ));
    }
    let entry = &mut storages.data[t.storage.index];
    let whole = entry.bytes.as_ref().is_some_and(|b| b.len() == numel * es);
    if last_use
        && whole
        && start == 0
        && t.offset == 0
        && is_contiguous(&t.shape, &t.stride)
        && let Some(bytes) = entry.bytes.take()
    {
        return Ok(RawTensor {
            dtype,
            shape: t.shape.clone(),
            bytes,
        });
    }
    storages.budget.take(numel * es)?;
    let bytes = storages.data[t.storage.index]
        .bytes
        .as_deref()
        .and_then(|b| b.get(start * es..(start + len) * es))
        .and_then(|region| gather(region, es, t.offset, &t.shape, &t.stride, numel))
        .ok_or_else(oob)?;
    Ok(RawTensor {
        dtype,
        shape: t.shape.clone(),
        bytes,
    })
}

/// Copies the strided elements of `region` into a row-major buffer. The
/// caller has checked that the largest index is in bounds; slicing still
/// goes through `get` so a mistake is an error, not a panic.
fn gather(
    region: &[u8],
    es: usize,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
    numel: usize,
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(numel * es);
    let Some((&row_len, lead_shape)) = shape.split_last() else {
        out.extend_from_slice(region.get(offset * es..(offset + 1) * es)?);
        return Some(out);
    };
    let (&row_stride, lead_stride) = stride.split_last()?;
    if is_contiguous(shape, stride) {
        out.extend_from_slice(region.get(offset * es..(offset + numel) * es)?);
        return Some(out);
    }
    // An odometer over the leading dimensions; each step copies one row.
    let mut idx = vec![0usize; lead_shape.len()];
    loop {
        let base = offset
            + idx
                .iter()
                .zip(lead_stride)
                .map(|(&i, &s)| i * s)
                .sum::<usize>();
        if row_stride == 1 {
            out.extend_from_slice(region.get(base * es..(base + row_len) * es)?);
        } else {
            for j in 0..row_len {
                let at = base + j * row_stride;
                out.extend_from_slice(region.get(at * es..(at + 1) * es)?);
            }
        }
        let mut d = idx.len();
        loop {
            if d == 0 {
                return Some(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < lead_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Picks the state dict out of the top-level object and gathers its tensors.
pub(super) fn collect(
    parsed: &Parsed,
    storages: &mut Storages<'_>,
) -> Result<BTreeMap<String, RawTensor>> {
    let nodes = &parsed.nodes;
    let Node::Dict(top) = &nodes[parsed.root] else {
        return Err(format_err(format!(
            "PyTorch checkpoint: the top-level object is a {}, not a dict of tensors",
            nodes[parsed.root].kind()
        )));
    };
    let mut entries = top;
    // Training checkpoints wrap the weights: {"epoch", "state_dict", ...}.
    if let Some(&(_, v)) = entries
        .iter()
        .rev()
        .find(|(k, _)| parsed.is_str(*k, "state_dict"))
        && let Node::Dict(inner) = &nodes[v]
    {
        entries = inner;
    }
    // Later entries win, as in a Python dict.
    let mut tensors: BTreeMap<&str, &TensorRef> = BTreeMap::new();
    for &(k, v) in entries {
        if let (Node::Str(key), Node::Tensor(t)) = (&nodes[k], &nodes[v]) {
            tensors.insert(key, t);
        }
    }
    if tensors.is_empty() {
        return Err(format_err(
            "PyTorch checkpoint: no tensors in the state dict",
        ));
    }
    // DistributedDataParallel prefixes every key with `module.`.
    let strip = tensors.keys().all(|k| k.starts_with("module."));
    // Uses left per storage, so each storage is freed after its last tensor.
    let mut uses = vec![0usize; storages.data.len()];
    for t in tensors.values() {
        uses[t.storage.index] += 1;
    }
    let mut out = BTreeMap::new();
    for (key, t) in tensors {
        let key = if strip { &key["module.".len()..] } else { key };
        let index = t.storage.index;
        uses[index] -= 1;
        let last_use = uses[index] == 0;
        out.insert(key.to_string(), materialize(t, storages, last_use)?);
        if last_use {
            storages.data[index].bytes = None;
        }
    }
    Ok(out)
}

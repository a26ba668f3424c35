//! Reading PyTorch checkpoints (`torch.save` output such as
//! `open_clip_pytorch_model.bin`, `.pt`, `.pth`) without running them.
//!
//! A checkpoint is a Python pickle, and unpickling with Python executes
//! whatever callables the file names (`os.system`, `builtins.eval`, ...).
//! This module therefore carries its own restricted unpickler: it rebuilds
//! tensors, storages, `collections.OrderedDict`, dicts, lists, tuples and
//! primitives, and refuses every other pickle global by name
//! ([`TorchFileError::ForbiddenGlobal`]) as soon as the file mentions it,
//! so nothing the file names is ever called.
//!
//! Two container formats are read:
//!
//! * **zip** (torch >= 1.6, the default): a zip archive holding
//!   `<prefix>/data.pkl` (the pickle), `<prefix>/data/<key>` (raw storage
//!   bytes), and an optional `<prefix>/byteorder` (`little`; `big` is
//!   refused). Persistent ids in the pickle are
//!   `('storage', storage_type, key, location, numel)`.
//! * **legacy** (torch < 1.6, or `_use_new_zipfile_serialization=False`): a
//!   stream of pickles: the magic number, the protocol version (1001),
//!   `sys_info` (refused when it says big-endian), the main object (persistent
//!   ids `('storage', storage_type, root_key, location, numel,
//!   view_metadata)`), the list of storage keys, then for each key in that
//!   order an 8-byte little-endian element count and the elements.
//!
//! Anything else is still parsed as a pickle first, so that a malicious bare
//! pickle is reported for the global it names rather than for its format.
//!
//! The input is treated as hostile: no byte string panics, nesting depth is
//! handled with explicit stacks rather than recursion, every length is checked
//! against the remaining input before anything is allocated for it, and the
//! bytes copied out (decompressed storages, gathered tensors) are capped at a
//! multiple of the file's size so a small file cannot demand unbounded memory.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{Cursor, Read};

use zip::ZipArchive;

/// Element type of a tensor, as named by its torch storage class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchDtype {
    /// `torch.float32` (`FloatStorage`).
    F32,
    /// `torch.float64` (`DoubleStorage`).
    F64,
    /// `torch.float16` (`HalfStorage`).
    F16,
    /// `torch.bfloat16` (`BFloat16Storage`).
    BF16,
    /// `torch.int64` (`LongStorage`).
    I64,
    /// `torch.int32` (`IntStorage`).
    I32,
    /// `torch.int16` (`ShortStorage`).
    I16,
    /// `torch.int8` (`CharStorage`).
    I8,
    /// `torch.uint8` (`ByteStorage`, and `UntypedStorage`, which is bytes).
    U8,
    /// `torch.bool` (`BoolStorage`), one byte per element.
    Bool,
}

impl TorchDtype {
    /// Bytes per element.
    pub fn size_of(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
}

/// One tensor read from a checkpoint: contiguous, row-major, little-endian.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type; `bytes` holds `shape.iter().product()` elements of it.
    pub dtype: TorchDtype,
    /// Dimensions, outermost first; empty for a 0-d (scalar) tensor.
    pub shape: Vec<usize>,
    /// The elements in row-major order, little-endian, not reinterpreted.
    pub bytes: Vec<u8>,
}

/// Why a checkpoint could not be read.
#[derive(Debug)]
pub enum TorchFileError {
    /// The pickle names a global (`"module.name"`) outside the allow-list.
    /// Reported before anything else is read, and nothing is called.
    ForbiddenGlobal(String),
    /// The bytes are not a (readable) PyTorch checkpoint; the text says why.
    Format(String),
}

impl fmt::Display for TorchFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ForbiddenGlobal(name) => write!(
                f,
                "pickle global {name} is refused: only torch tensors and storages, \
                 collections.OrderedDict and plain containers are read, so no code runs"
            ),
            Self::Format(reason) => write!(f, "{reason}"),
        }
    }
}

impl std::error::Error for TorchFileError {}

type Result<T> = std::result::Result<T, TorchFileError>;

fn format_err(reason: impl Into<String>) -> TorchFileError {
    TorchFileError::Format(reason.into())
}

/// Reads every tensor of a PyTorch checkpoint held in memory.
///
/// The top-level object must be a dict; when it has a `state_dict` entry
/// that is a dict (OpenCLIP training checkpoints), that dict is read instead.
/// Only entries with string keys and tensor values are kept, and a leading
/// `module.` (DistributedDataParallel) is stripped when every key has it.
pub fn read_torch_bytes(bytes: &[u8]) -> Result<BTreeMap<String, RawTensor>> {
    // torch itself tells the formats apart by the zip local-header magic.
    if bytes.starts_with(b"PK\x03\x04") {
        read_zip(bytes)
    } else {
        read_pickle_stream(bytes)
    }
}

// ---------------------------------------------------------------------------
// Containers
// ---------------------------------------------------------------------------

/// torch's legacy-format magic number, the first pickle of such a file.
const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;
/// The protocol version pickled after the magic number.
const LEGACY_PROTOCOL: i128 = 1001;
/// Copies out of the file (decompressed storages, gathered tensors) may total
/// this many times the file's size: tied weights legitimately alias a storage
/// from a few keys, but a hostile file could alias one storage from millions.
const EXPANSION_LIMIT: usize = 8;
/// The expansion budget never drops below this, so tiny test files work.
const MIN_BUDGET: usize = 1 << 20;

fn budget_for(input_len: usize) -> Budget {
    Budget {
        left: input_len.saturating_mul(EXPANSION_LIMIT).max(MIN_BUDGET),
    }
}

fn zip_err(what: &str, e: zip::result::ZipError) -> TorchFileError {
    format_err(format!("PyTorch zip checkpoint: {what}: {e}"))
}

fn read_zip(bytes: &[u8]) -> Result<BTreeMap<String, RawTensor>> {
    let mut budget = budget_for(bytes.len());
    let mut archive =
        ZipArchive::new(Cursor::new(bytes)).map_err(|e| zip_err("unreadable archive", e))?;
    // The folder name is free (torch uses the file's stem, or `archive`):
    // take the shallowest `data.pkl`.
    let pkl_name = archive
        .file_names()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.matches('/').count())
        .map(str::to_string)
        .ok_or_else(|| {
            format_err("not a PyTorch checkpoint: a zip archive without a data.pkl entry")
        })?;
    let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();

    let byteorder_name = format!("{prefix}byteorder");
    if archive.index_for_name(&byteorder_name).is_some() {
        let order = read_entry(&mut archive, &byteorder_name, 16, &mut budget)?;
        match order.trim_ascii() {
            b"little" => {}
            b"big" => {
                return Err(format_err(
                    "PyTorch zip checkpoint written on a big-endian machine: not supported",
                ));
            }
            other => {
                return Err(format_err(format!(
                    "PyTorch zip checkpoint: unknown byteorder {:?}",
                    String::from_utf8_lossy(other)
                )));
            }
        }
    }
    let size = archive
        .by_name(&pkl_name)
        .map_err(|e| zip_err(&pkl_name, e))?
        .size();
    let size = usize::try_from(size).map_err(|_| format_err("data.pkl is too large"))?;
    let pickle = read_entry(&mut archive, &pkl_name, size, &mut budget)?;
    read_zip_pickle(&pickle, archive, prefix, budget)
}

/// Reads one zip entry of at most `max` bytes. The buffer grows with the
/// bytes actually produced, never by the size the archive declares.
fn read_entry(
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    name: &str,
    max: usize,
    budget: &mut Budget,
) -> Result<Vec<u8>> {
    budget.take(max)?;
    let file = archive.by_name(name).map_err(|e| zip_err(name, e))?;
    let mut out = Vec::new();
    file.take(max as u64)
        .read_to_end(&mut out)
        .map_err(|e| format_err(format!("PyTorch zip checkpoint: reading {name}: {e}")))?;
    Ok(out)
}

/// The zip format once `data.pkl` is in hand (split out so tests can feed
/// mutated pickles against the real storages).
fn read_zip_pickle(
    pickle: &[u8],
    archive: ZipArchive<Cursor<&[u8]>>,
    prefix: String,
    budget: Budget,
) -> Result<BTreeMap<String, RawTensor>> {
    let mut storages = Storages::new(Source::Zip { archive, prefix }, budget);
    let parsed = parse_pickle(pickle, 0, &mut storages)?;
    collect(&parsed, &mut storages)
}

fn read_pickle_stream(bytes: &[u8]) -> Result<BTreeMap<String, RawTensor>> {
    let mut storages = Storages::new(Source::Bare, budget_for(bytes.len()));
    // Parsed before any format check so a malicious bare pickle is refused
    // for the global it names.
    let magic = parse_pickle(bytes, 0, &mut storages)?;
    if !matches!(magic.nodes[magic.root], Node::Int(LEGACY_MAGIC)) {
        return Err(format_err(
            "not a PyTorch checkpoint: neither a zip archive (torch >= 1.6) nor a legacy \
             torch.save stream (which starts with torch's magic number)",
        ));
    }
    let protocol = parse_pickle(bytes, magic.end, &mut storages)?;
    if !matches!(protocol.nodes[protocol.root], Node::Int(LEGACY_PROTOCOL)) {
        return Err(format_err(
            "legacy PyTorch checkpoint: unsupported serialization protocol version",
        ));
    }
    let sys_info = parse_pickle(bytes, protocol.end, &mut storages)?;
    if let Node::Dict(entries) = &sys_info.nodes[sys_info.root] {
        let little = entries
            .iter()
            .rev()
            .find(|(k, _)| sys_info.is_str(*k, "little_endian"))
            .map(|&(_, v)| &sys_info.nodes[v]);
        if matches!(little, Some(Node::Bool(false))) {
            return Err(format_err(
                "legacy PyTorch checkpoint written on a big-endian machine: not supported",
            ));
        }
    }

    storages.source = Source::Legacy;
    let main = parse_pickle(bytes, sys_info.end, &mut storages)?;
    storages.source = Source::Bare;
    let keys = parse_pickle(bytes, main.end, &mut storages)?;
    let key_ids = match &keys.nodes[keys.root] {
        Node::List(items) | Node::Tuple(items) => items.clone(),
        other => {
            return Err(format_err(format!(
                "legacy PyTorch checkpoint: the storage key list is a {}",
                other.kind()
            )));
        }
    };

    let mut pos = keys.end;
    for id in key_ids {
        let Node::Str(key) = &keys.nodes[id] else {
            return Err(format_err(
                "legacy PyTorch checkpoint: a storage key is not a string",
            ));
        };
        let index = *storages.by_key.get(key).ok_or_else(|| {
            format_err(format!(
                "legacy PyTorch checkpoint: storage {key:?} is listed but never used"
            ))
        })?;
        let entry = &mut storages.data[index];
        if entry.bytes.is_some() {
            return Err(format_err(format!(
                "legacy PyTorch checkpoint: storage {key:?} is listed twice"
            )));
        }
        let rest = &bytes[pos..];
        let count_bytes: [u8; 8] = rest
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| truncated_storage(key))?;
        let nbytes = usize::try_from(u64::from_le_bytes(count_bytes))
            .ok()
            .and_then(|n| n.checked_mul(entry.dtype.size_of()))
            .ok_or_else(|| truncated_storage(key))?;
        let data = rest
            .get(8..)
            .and_then(|r| r.get(..nbytes))
            .ok_or_else(|| truncated_storage(key))?;
        entry.bytes = Some(data.to_vec());
        pos += 8 + nbytes;
    }
    collect(&main, &mut storages)
}

fn truncated_storage(key: &str) -> TorchFileError {
    format_err(format!(
        "legacy PyTorch checkpoint: storage {key:?} runs past the end of the file"
    ))
}

// ---------------------------------------------------------------------------
// Storages and tensors
// ---------------------------------------------------------------------------

/// A running allowance of bytes that may still be copied out of the file.
struct Budget {
    left: usize,
}

impl Budget {
    fn take(&mut self, n: usize) -> Result<()> {
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
enum Source<'z> {
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

struct StorageData {
    dtype: TorchDtype,
    bytes: Option<Vec<u8>>,
}

/// A storage as a tensor sees it: a root storage, or an element range of
/// one (legacy view_metadata).
#[derive(Debug, Clone, Copy)]
struct StorageRef {
    index: usize,
    dtype: TorchDtype,
    start: usize,
    /// `None`: to the end of the root storage.
    len: Option<usize>,
}

/// A decoded persistent id.
struct Pid {
    dtype: TorchDtype,
    key: String,
    numel: usize,
    view: Option<(String, usize, usize)>,
}

struct Storages<'z> {
    source: Source<'z>,
    by_key: HashMap<String, usize>,
    views: HashMap<String, StorageRef>,
    data: Vec<StorageData>,
    budget: Budget,
}

impl<'z> Storages<'z> {
    fn new(source: Source<'z>, budget: Budget) -> Self {
        Self {
            source,
            by_key: HashMap::new(),
            views: HashMap::new(),
            data: Vec::new(),
            budget,
        }
    }

    fn load(&mut self, pid: Pid) -> Result<StorageRef> {
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
struct TensorRef {
    storage: StorageRef,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
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
fn collect(parsed: &Parsed, storages: &mut Storages<'_>) -> Result<BTreeMap<String, RawTensor>> {
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

// ---------------------------------------------------------------------------
// The restricted unpickler
// ---------------------------------------------------------------------------

/// Index of a node in the unpickler's arena. Containers hold ids, so shared
/// references (memo, DUP) and mutation after memoizing behave as in Python,
/// and cycles cost nothing.
type Id = usize;

/// The callables and classes a checkpoint may name.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    StorageType(TorchDtype),
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    let global = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", storage) => Global::StorageType(match storage {
            "FloatStorage" => TorchDtype::F32,
            "DoubleStorage" => TorchDtype::F64,
            "HalfStorage" => TorchDtype::F16,
            "BFloat16Storage" => TorchDtype::BF16,
            "LongStorage" => TorchDtype::I64,
            "IntStorage" => TorchDtype::I32,
            "ShortStorage" => TorchDtype::I16,
            "CharStorage" => TorchDtype::I8,
            "ByteStorage" | "UntypedStorage" => TorchDtype::U8,
            "BoolStorage" => TorchDtype::Bool,
            _ => return Err(TorchFileError::ForbiddenGlobal(format!("{module}.{name}"))),
        }),
        _ => return Err(TorchFileError::ForbiddenGlobal(format!("{module}.{name}"))),
    };
    Ok(global)
}

#[derive(Debug)]
enum Node {
    None,
    Bool(bool),
    Int(i128),
    Str(String),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set,
    Global(Global),
    Storage(StorageRef),
    Tensor(Box<TensorRef>),
    /// A value whose content the reader never needs (floats, bytes, ints
    /// beyond 128 bits).
    Opaque,
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::None => "None",
            Node::Bool(_) => "bool",
            Node::Int(_) => "int",
            Node::Str(_) => "str",
            Node::Tuple(_) => "tuple",
            Node::List(_) => "list",
            Node::Dict(_) => "dict",
            Node::Set => "set",
            Node::Global(_) => "class or function",
            Node::Storage(_) => "storage",
            Node::Tensor(_) => "tensor",
            Node::Opaque => "float or bytes",
        }
    }
}

/// One unpickled object: its arena, its root, and where its STOP ended.
struct Parsed {
    nodes: Vec<Node>,
    root: Id,
    end: usize,
}

impl Parsed {
    fn is_str(&self, id: Id, s: &str) -> bool {
        matches!(&self.nodes[id], Node::Str(k) if k == s)
    }
}

fn parse_pickle(input: &[u8], start: usize, storages: &mut Storages<'_>) -> Result<Parsed> {
    let mut u = Unpickler {
        input,
        pos: start,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages,
    };
    let root = u.run()?;
    Ok(Parsed {
        nodes: u.nodes,
        root,
        end: u.pos,
    })
}

/// The unpickler's state. Memory is linear in the input: every node, stack
/// slot, mark and memo entry costs at least one opcode byte.
struct Unpickler<'p, 's, 'z> {
    input: &'p [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    /// Stack lengths at each MARK (Python's metastack).
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    storages: &'s mut Storages<'z>,
}

impl<'p> Unpickler<'p, '_, '_> {
    fn err<T>(&self, what: impl fmt::Display) -> Result<T> {
        Err(format_err(format!(
            "PyTorch checkpoint: malformed pickle near byte {}: {what}",
            self.pos
        )))
    }

    fn byte(&mut self) -> Result<u8> {
        match self.input.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => self.err("truncated (no STOP)"),
        }
    }

    /// `n` bytes, checked against the remaining input before use.
    fn take(&mut self, n: usize) -> Result<&'p [u8]> {
        let Some(bytes) = self.input.get(self.pos..).and_then(|r| r.get(..n)) else {
            return self.err(format!("a length of {n} runs past the end"));
        };
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn len_u32(&mut self) -> Result<usize> {
        let n = u32::from_le_bytes(self.array()?);
        usize::try_from(n).or_else(|_| self.err("length too large"))
    }

    fn len_u64(&mut self) -> Result<usize> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).or_else(|_| self.err("length too large"))
    }

    /// A protocol-0 argument: the bytes up to the next newline.
    fn line(&mut self) -> Result<&'p [u8]> {
        let rest = self.input.get(self.pos..).unwrap_or_default();
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("a text argument has no newline");
        };
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    fn line_str(&mut self) -> Result<String> {
        let line = self.line()?.to_vec();
        String::from_utf8(line).or_else(|_| self.err("a name is not UTF-8"))
    }

    fn line_int(&mut self) -> Result<i128> {
        let line = self.line()?;
        self.parse_int(line)
    }

    fn parse_int(&self, line: &[u8]) -> Result<i128> {
        let parsed = std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.trim().parse::<i128>().ok());
        match parsed {
            Some(v) => Ok(v),
            None => self.err("a text integer does not parse"),
        }
    }

    fn push(&mut self, node: Node) {
        self.nodes.push(node);
        self.stack.push(self.nodes.len() - 1);
    }

    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Id> {
        if self.stack.len() <= self.fence() {
            return self.err("stack underflow");
        }
        self.stack
            .pop()
            .map_or_else(|| self.err("stack underflow"), Ok)
    }

    fn top(&self) -> Result<Id> {
        if self.stack.len() <= self.fence() {
            return self.err("stack underflow");
        }
        self.stack
            .last()
            .copied()
            .map_or_else(|| self.err("stack underflow"), Ok)
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let Some(mark) = self.marks.pop() else {
            return self.err("no MARK on the stack");
        };
        if mark > self.stack.len() {
            return self.err("stack underflow");
        }
        Ok(self.stack.split_off(mark))
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Id>> {
        if self.stack.len() < self.fence() + n {
            return self.err("stack underflow");
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let top = self.top()?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => self.err(format!("memo key {key} was never stored")),
        }
    }

    fn str_node(&self, bytes: &[u8]) -> Result<Node> {
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Node::Str(s.to_string())),
            Err(_) => self.err("a unicode string is not UTF-8"),
        }
    }

    fn str_of(&self, id: Id) -> Result<&str> {
        match &self.nodes[id] {
            Node::Str(s) => Ok(s),
            other => self.err(format!("expected a str, found a {}", other.kind())),
        }
    }

    fn usize_of(&self, id: Id) -> Result<usize> {
        match &self.nodes[id] {
            Node::Int(v) => usize::try_from(*v).or_else(|_| self.err("an index is out of range")),
            other => self.err(format!("expected an int, found a {}", other.kind())),
        }
    }

    fn usize_seq(&self, id: Id) -> Result<Vec<usize>> {
        match &self.nodes[id] {
            Node::Tuple(items) | Node::List(items) => {
                items.iter().map(|&i| self.usize_of(i)).collect()
            }
            other => self.err(format!(
                "expected a tuple of ints, found a {}",
                other.kind()
            )),
        }
    }

    /// A container at the top of the stack, to be extended in place.
    fn top_container(&mut self) -> Result<&mut Node> {
        let id = self.top()?;
        Ok(&mut self.nodes[id])
    }

    fn append(&mut self, items: Vec<Id>) -> Result<()> {
        match self.top_container()? {
            Node::List(list) => {
                list.extend(items);
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.err(format!("APPEND to a {kind}"))
            }
        }
    }

    fn set_items(&mut self, items: Vec<Id>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return self.err("SETITEMS with an odd number of items");
        }
        match self.top_container()? {
            Node::Dict(dict) => {
                dict.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.err(format!("SETITEM on a {kind}"))
            }
        }
    }

    fn run(&mut self) -> Result<Id> {
        loop {
            let op = self.byte()?;
            match op {
                // PROTO
                0x80 => {
                    if self.byte()? > 5 {
                        return self.err("pickle protocol above 5");
                    }
                }
                // FRAME: framing is only a read-ahead hint.
                0x95 => {
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                b'I' => {
                    let line = self.line()?;
                    let node = match line {
                        b"00" => Node::Bool(false),
                        b"01" => Node::Bool(true),
                        _ => Node::Int(self.parse_int(line)?),
                    };
                    self.push(node);
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Node::Int(v.into()));
                }
                b'K' => {
                    let v = self.byte()?;
                    self.push(Node::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Node::Int(v.into()));
                }
                b'L' => {
                    let line = self.line()?;
                    let digits = line.strip_suffix(b"L").unwrap_or(line);
                    let text = std::str::from_utf8(digits).unwrap_or_default().trim();
                    let node = match text.parse::<i128>() {
                        Ok(v) => Node::Int(v),
                        Err(_) => {
                            let body = text.strip_prefix('-').unwrap_or(text);
                            if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
                                return self.err("a text long does not parse");
                            }
                            Node::Opaque
                        }
                    };
                    self.push(node);
                }
                // LONG1, LONG4: little-endian two's complement.
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        usize::from(self.byte()?)
                    } else {
                        self.len_u32()?
                    };
                    let bytes = self.take(n)?;
                    let node = long_node(bytes);
                    self.push(node);
                }
                b'F' => {
                    let line = self.line()?;
                    let ok = std::str::from_utf8(line)
                        .ok()
                        .is_some_and(|s| s.trim().parse::<f64>().is_ok());
                    if !ok {
                        return self.err("a text float does not parse");
                    }
                    self.push(Node::Opaque);
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Node::Opaque);
                }
                // STRING: a Python 2 str literal.
                b'S' => {
                    let line = self.line()?;
                    let Some(bytes) = decode_string_literal(line) else {
                        return self.err("a STRING literal does not parse");
                    };
                    let node = legacy_str_node(bytes);
                    self.push(node);
                }
                // BINSTRING, SHORT_BINSTRING: Python 2 str, read as UTF-8.
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        let n = i32::from_le_bytes(self.array()?);
                        usize::try_from(n).or_else(|_| self.err("negative BINSTRING length"))?
                    } else {
                        usize::from(self.byte()?)
                    };
                    let node = legacy_str_node(self.take(n)?.to_vec());
                    self.push(node);
                }
                b'V' => {
                    let line = self.line()?;
                    let Some(s) = decode_raw_unicode_escape(line) else {
                        return self.err("a UNICODE literal does not parse");
                    };
                    self.push(Node::Str(s));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.len_u32()?,
                        0x8c => usize::from(self.byte()?),
                        _ => self.len_u64()?,
                    };
                    let bytes = self.take(n)?;
                    let node = self.str_node(bytes)?;
                    self.push(node);
                }
                // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.len_u32()?,
                        b'C' => usize::from(self.byte()?),
                        _ => self.len_u64()?,
                    };
                    self.take(n)?;
                    self.push(Node::Opaque);
                }
                b')' => self.push(Node::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    let items = self.pop_n(usize::from(op - 0x84))?;
                    self.push(Node::Tuple(items));
                }
                b']' => self.push(Node::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => self.push(Node::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    if !items.len().is_multiple_of(2) {
                        return self.err("DICT with an odd number of items");
                    }
                    let pairs = items.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect();
                    self.push(Node::Dict(pairs));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                0x8f => self.push(Node::Set),
                // ADDITEMS: set contents are never needed.
                0x90 => {
                    self.pop_mark()?;
                    if !matches!(self.top_container()?, Node::Set) {
                        return self.err("ADDITEMS on something other than a set");
                    }
                }
                0x91 => {
                    self.pop_mark()?;
                    self.push(Node::Set);
                }
                b'p' => {
                    let key = self.line_int()?;
                    let key = u64::try_from(key).or_else(|_| self.err("negative memo key"))?;
                    self.memo_put(key)?;
                }
                b'q' => {
                    let key = self.byte()?;
                    self.memo_put(key.into())?;
                }
                b'r' => {
                    let key = u32::from_le_bytes(self.array()?);
                    self.memo_put(key.into())?;
                }
                0x94 => self.memo_put(self.memo.len() as u64)?,
                b'g' => {
                    let key = self.line_int()?;
                    let key = u64::try_from(key).or_else(|_| self.err("negative memo key"))?;
                    self.memo_get(key)?;
                }
                b'h' => {
                    let key = self.byte()?;
                    self.memo_get(key.into())?;
                }
                b'j' => {
                    let key = u32::from_le_bytes(self.array()?);
                    self.memo_get(key.into())?;
                }
                // GLOBAL: checked against the allow-list the moment it is read.
                b'c' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let global = resolve_global(&module, &name)?;
                    self.push(Node::Global(global));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let global = resolve_global(self.str_of(module)?, self.str_of(name)?)?;
                    self.push(Node::Global(global));
                }
                // INST: a class read like GLOBAL, called with the marked items.
                b'i' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let global = resolve_global(&module, &name)?;
                    let args = self.pop_mark()?;
                    let id = self.call(global, &args)?;
                    self.stack.push(id);
                }
                // OBJ: the class is the first marked item (already checked).
                b'o' => {
                    let items = self.pop_mark()?;
                    let Some((&cls, args)) = items.split_first() else {
                        return self.err("OBJ without a class");
                    };
                    let global = self.global_of(cls)?;
                    let id = self.call(global, args)?;
                    self.stack.push(id);
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let global = self.global_of(func)?;
                    let Node::Tuple(args) = &self.nodes[args] else {
                        return self.err("REDUCE arguments are not a tuple");
                    };
                    let args = args.clone();
                    let id = self.call(global, &args)?;
                    self.stack.push(id);
                }
                // NEWOBJ, NEWOBJ_EX: cls.__new__(cls, *args); only OrderedDict.
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?;
                    }
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let global = self.global_of(cls)?;
                    let empty = matches!(&self.nodes[args], Node::Tuple(a) if a.is_empty());
                    if global != Global::OrderedDict || !empty {
                        return self.err(format!("NEWOBJ of {global:?} is not supported"));
                    }
                    self.push(Node::Dict(Vec::new()));
                }
                // BUILD: only an OrderedDict's `_metadata` state, ignored.
                b'b' => {
                    self.pop()?;
                    if !matches!(self.top_container()?, Node::Dict(_)) {
                        return self.err("BUILD (object state) on something other than a dict");
                    }
                }
                b'P' => {
                    self.line()?;
                    return self.err("text persistent ids are not torch storages");
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let pid = self.pid(pid)?;
                    let storage = self.storages.load(pid)?;
                    self.push(Node::Storage(storage));
                }
                // EXT1, EXT2, EXT4: the copyreg extension registry names a
                // global indirectly, so it is refused like one.
                0x82..=0x84 => {
                    let code = match op {
                        0x82 => u32::from(self.byte()?),
                        0x83 => u32::from(u16::from_le_bytes(self.array()?)),
                        _ => u32::from_le_bytes(self.array()?),
                    };
                    return Err(TorchFileError::ForbiddenGlobal(format!(
                        "copyreg._extension_registry[{code}]"
                    )));
                }
                _ => return self.err(format!("unknown pickle opcode 0x{op:02x}")),
            }
        }
    }

    fn global_of(&self, id: Id) -> Result<Global> {
        match &self.nodes[id] {
            Node::Global(g) => Ok(*g),
            other => self.err(format!("calling a {}", other.kind())),
        }
    }

    /// Applies an allowed callable; returns the id of the result.
    fn call(&mut self, global: Global, args: &[Id]) -> Result<Id> {
        match (global, args) {
            (Global::OrderedDict, []) => {
                self.nodes.push(Node::Dict(Vec::new()));
                Ok(self.nodes.len() - 1)
            }
            (Global::OrderedDict, [items]) => {
                let pairs = match &self.nodes[*items] {
                    Node::Dict(pairs) => pairs.clone(),
                    Node::List(items) | Node::Tuple(items) => {
                        let mut pairs = Vec::with_capacity(items.len());
                        for &item in items {
                            match &self.nodes[item] {
                                Node::Tuple(kv) if kv.len() == 2 => pairs.push((kv[0], kv[1])),
                                _ => return self.err("OrderedDict of something other than pairs"),
                            }
                        }
                        pairs
                    }
                    other => {
                        return self.err(format!("OrderedDict of a {}", other.kind()));
                    }
                };
                self.nodes.push(Node::Dict(pairs));
                Ok(self.nodes.len() - 1)
            }
            (Global::RebuildTensorV2, [storage, offset, size, stride, _, _])
            | (Global::RebuildTensorV2, [storage, offset, size, stride, _, _, _])
            | (Global::RebuildTensor, [storage, offset, size, stride]) => {
                let storage = match &self.nodes[*storage] {
                    Node::Storage(s) => *s,
                    other => {
                        return self.err(format!("a tensor rebuilt from a {}", other.kind()));
                    }
                };
                let offset = self.usize_of(*offset)?;
                let shape = self.usize_seq(*size)?;
                let stride = self.usize_seq(*stride)?;
                if shape.len() != stride.len() {
                    return self.err("a tensor's size and stride differ in length");
                }
                self.nodes.push(Node::Tensor(Box::new(TensorRef {
                    storage,
                    offset,
                    shape,
                    stride,
                })));
                Ok(self.nodes.len() - 1)
            }
            (Global::RebuildParameter, [data, _, _]) => match &self.nodes[*data] {
                Node::Tensor(_) => Ok(*data),
                other => self.err(format!("a parameter wrapping a {}", other.kind())),
            },
            _ => self.err(format!(
                "calling {global:?} with {} arguments is not supported",
                args.len()
            )),
        }
    }

    /// Decodes `('storage', storage_type, key, location, numel[, view])`.
    fn pid(&self, id: Id) -> Result<Pid> {
        let Node::Tuple(items) = &self.nodes[id] else {
            return self.err("a persistent id is not a tuple");
        };
        let (kind, storage_type, key, numel, view) = match items.as_slice() {
            [kind, ty, key, _location, numel] => (*kind, *ty, *key, *numel, None),
            [kind, ty, key, _location, numel, view] => (*kind, *ty, *key, *numel, Some(*view)),
            _ => return self.err("a persistent id is not a 5- or 6-tuple"),
        };
        if self.str_of(kind)? != "storage" {
            return self.err("a persistent id that is not a storage");
        }
        let Node::Global(Global::StorageType(dtype)) = self.nodes[storage_type] else {
            return self.err("a persistent id without a storage class");
        };
        let view = match view.map(|v| &self.nodes[v]) {
            None | Some(Node::None) => None,
            Some(Node::Tuple(v)) if v.len() == 3 => Some((
                self.str_of(v[0])?.to_string(),
                self.usize_of(v[1])?,
                self.usize_of(v[2])?,
            )),
            Some(_) => return self.err("malformed storage view metadata"),
        };
        Ok(Pid {
            dtype,
            key: self.str_of(key)?.to_string(),
            numel: self.usize_of(numel)?,
            view,
        })
    }
}

fn long_node(bytes: &[u8]) -> Node {
    let Some(&last) = bytes.last() else {
        return Node::Int(0);
    };
    if bytes.len() > 16 {
        return Node::Opaque;
    }
    let mut buf = [if last & 0x80 != 0 { 0xff } else { 0 }; 16];
    buf[..bytes.len()].copy_from_slice(bytes);
    Node::Int(i128::from_le_bytes(buf))
}

/// Python 2 `str` payloads: text when UTF-8 (dict keys), opaque otherwise.
fn legacy_str_node(bytes: Vec<u8>) -> Node {
    match String::from_utf8(bytes) {
        Ok(s) => Node::Str(s),
        Err(_) => Node::Opaque,
    }
}

/// Decodes a protocol-0 STRING argument: a quoted Python literal with
/// backslash escapes.
fn decode_string_literal(line: &[u8]) -> Option<Vec<u8>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let (&quote, rest) = line.split_first()?;
    if quote != b'\'' && quote != b'"' {
        return None;
    }
    let body = rest.strip_suffix(&[quote])?;
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let esc = *body.get(i)?;
        i += 1;
        match esc {
            b'\\' | b'\'' | b'"' => out.push(esc),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'v' => out.push(0x0b),
            b'x' => {
                let hex = std::str::from_utf8(body.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b'0'..=b'7' => {
                let mut v = u32::from(esc - b'0');
                for _ in 0..2 {
                    match body.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            _ => out.extend_from_slice(&[b'\\', esc]),
        }
    }
    Some(out)
}

/// Decodes a protocol-0 UNICODE argument (`raw-unicode-escape`): `\uXXXX`
/// and `\UXXXXXXXX` escapes, every other byte a Latin-1 character.
fn decode_raw_unicode_escape(line: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while let Some(&b) = line.get(i) {
        let width = match (b, line.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        if width == 0 {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let hex = std::str::from_utf8(line.get(i + 2..i + 2 + width)?).ok()?;
        out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
        i += 2 + width;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/openclip_hub/clipa_v2_tiny"
    );

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).expect("fixture")
    }

    /// A zip checkpoint's prefix, `data.pkl`, and storages as (key, bytes).
    type ZipParts = (String, Vec<u8>, Vec<(String, Vec<u8>)>);

    fn zip_parts(bytes: &[u8]) -> ZipParts {
        let mut archive = ZipArchive::new(Cursor::new(bytes)).unwrap();
        let names: Vec<String> = archive.file_names().map(str::to_string).collect();
        let pkl = names.iter().find(|n| n.ends_with("/data.pkl")).unwrap();
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let mut read = |name: &str| {
            let mut out = Vec::new();
            archive
                .by_name(name)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            out
        };
        let pickle = read(pkl);
        let data = format!("{prefix}data/");
        let storages = names
            .iter()
            .filter_map(|n| n.strip_prefix(&data))
            .map(|key| (key.to_string(), read(&format!("{data}{key}"))))
            .collect();
        (prefix, pickle, storages)
    }

    /// A tiny pickle writer for hand-made checkpoints (protocol 2).
    struct Pk(Vec<u8>);

    impl Pk {
        fn new() -> Self {
            Pk(vec![0x80, 2])
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn s(self, s: &str) -> Self {
            let len = u32::try_from(s.len()).unwrap().to_le_bytes();
            self.raw(b"X").raw(&len).raw(s.as_bytes())
        }
        fn int(self, v: usize) -> Self {
            match i32::try_from(v) {
                Ok(small) => self.raw(b"J").raw(&small.to_le_bytes()),
                // LONG1 of 9 bytes, so the sign bit stays clear.
                Err(_) => self.raw(&[0x8a, 9]).raw(&(v as u128).to_le_bytes()[..9]),
            }
        }
        fn global(self, module: &str, name: &str) -> Self {
            self.raw(format!("c{module}\n{name}\n").as_bytes())
        }
        fn ints(self, v: &[usize]) -> Self {
            v.iter().fold(self.raw(b"("), |p, &x| p.int(x)).raw(b"t")
        }
        /// `_rebuild_tensor_v2` of a (possibly viewed) storage.
        #[allow(clippy::too_many_arguments)]
        fn tensor(
            self,
            ty: &str,
            key: &str,
            numel: usize,
            view: Option<(&str, usize, usize)>,
            offset: usize,
            shape: &[usize],
            stride: &[usize],
        ) -> Self {
            let p = self
                .global("torch._utils", "_rebuild_tensor_v2")
                .raw(b"((")
                .s("storage")
                .global("torch", ty)
                .s(key)
                .s("cpu")
                .int(numel);
            let p = match view {
                None => p.raw(b"N"),
                Some((k, o, n)) => p.raw(b"(").s(k).int(o).int(n).raw(b"t"),
            };
            p.raw(b"tQ")
                .int(offset)
                .ints(shape)
                .ints(stride)
                .raw(&[0x89])
                .global("collections", "OrderedDict")
                .raw(b")R")
                .raw(b"tR")
        }
        fn done(self) -> Vec<u8> {
            self.raw(b".").0
        }
    }

    /// A legacy (torch < 1.6) file: magic, protocol, sys_info, `main`, the
    /// key list, then each storage as an element count and its bytes.
    fn legacy_file(main: &[u8], storages: &[(&str, usize, &[u8])], little: bool) -> Vec<u8> {
        let mut f = vec![0x80, 2, 0x8a, 10];
        f.extend_from_slice(&LEGACY_MAGIC.to_le_bytes()[..10]);
        f.push(b'.');
        f.extend_from_slice(&[0x80, 2, b'M', 0xe9, 0x03, b'.']);
        let sys_info = Pk::new()
            .raw(b"}(")
            .s("protocol_version")
            .int(1001)
            .s("little_endian")
            .raw(&[if little { 0x88 } else { 0x89 }])
            .s("type_sizes")
            .raw(b"}(")
            .s("short")
            .int(2)
            .s("int")
            .int(4)
            .s("long")
            .int(4)
            .raw(b"uu")
            .done();
        f.extend_from_slice(&sys_info);
        f.extend_from_slice(main);
        let keys = storages
            .iter()
            .fold(Pk::new().raw(b"]("), |p, (k, _, _)| p.s(k))
            .raw(b"e")
            .done();
        f.extend_from_slice(&keys);
        for (_, es, bytes) in storages {
            f.extend_from_slice(&((bytes.len() / es) as u64).to_le_bytes());
            f.extend_from_slice(bytes);
        }
        f
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn format_err_of(r: Result<BTreeMap<String, RawTensor>>) -> String {
        match r {
            Err(TorchFileError::Format(m)) => m,
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    fn forbidden_of(r: Result<BTreeMap<String, RawTensor>>) -> String {
        match r {
            Err(TorchFileError::ForbiddenGlobal(g)) => g,
            other => panic!("expected a refused global, got {other:?}"),
        }
    }

    #[test]
    fn zip_fixture_matches_safetensors() {
        let got = read_torch_bytes(&fixture("open_clip_pytorch_model.bin")).unwrap();
        let st_bytes = fixture("open_clip_model.safetensors");
        let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
        assert_eq!(got.len(), 60);
        assert_eq!(got.len(), st.len());
        for (name, view) in st.tensors() {
            let t = &got[&name];
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            assert_eq!(t.dtype, TorchDtype::F32, "{name}");
            assert_eq!(t.shape, view.shape(), "{name}");
            assert_eq!(t.bytes, view.data(), "{name}");
        }
    }

    #[test]
    fn zip_with_other_prefix_and_deflate_reads_the_same() {
        let bytes = fixture("open_clip_pytorch_model.bin");
        let want = read_torch_bytes(&bytes).unwrap();
        let (_, pickle, storages) = zip_parts(&bytes);
        let build = |byteorder: &str| {
            let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            w.start_file("archive/data.pkl", opts).unwrap();
            w.write_all(&pickle).unwrap();
            w.start_file("archive/byteorder", opts).unwrap();
            w.write_all(byteorder.as_bytes()).unwrap();
            for (key, data) in &storages {
                w.start_file(format!("archive/data/{key}"), opts).unwrap();
                w.write_all(data).unwrap();
            }
            w.finish().unwrap().into_inner()
        };
        assert_eq!(read_torch_bytes(&build("little")).unwrap(), want);
        let msg = format_err_of(read_torch_bytes(&build("big")));
        assert!(msg.contains("big-endian"), "{msg}");
    }

    #[test]
    fn evil_pickle_is_refused_by_name() {
        let r = read_torch_bytes(&fixture("evil_pickle.bin"));
        let err = r.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("pickle global posix.system is refused"),
            "{err}"
        );
        assert!(matches!(err, TorchFileError::ForbiddenGlobal(ref g) if g == "posix.system"));
        assert!(!std::path::Path::new("evil-pickle-ran").exists());
        assert!(!std::path::Path::new(&format!("{FIXTURES}/evil-pickle-ran")).exists());
    }

    #[test]
    fn legacy_file_from_the_fixture_reads_the_same() {
        let bytes = fixture("open_clip_pytorch_model.bin");
        let want = read_torch_bytes(&bytes).unwrap();
        let (_, pickle, mut storages) = zip_parts(&bytes);
        // Storages come in the key list's order, whatever it is.
        storages.reverse();
        let table: Vec<(&str, usize, &[u8])> = storages
            .iter()
            .map(|(k, b)| (k.as_str(), 4, b.as_slice()))
            .collect();
        let legacy = legacy_file(&pickle, &table, true);
        assert_eq!(read_torch_bytes(&legacy).unwrap(), want);

        let msg = format_err_of(read_torch_bytes(&legacy_file(&pickle, &table, false)));
        assert!(msg.contains("big-endian"), "{msg}");
        // A storage cut short is an error, not a panic or a short tensor.
        let msg = format_err_of(read_torch_bytes(&legacy[..legacy.len() - 1]));
        assert!(msg.contains("past the end"), "{msg}");
    }

    #[test]
    fn foreign_globals_and_extensions_are_refused() {
        let eval = Pk::new()
            .global("builtins", "eval")
            .raw(b"(")
            .s("1+1")
            .raw(b"tR")
            .done();
        assert_eq!(forbidden_of(read_torch_bytes(&eval)), "builtins.eval");
        // INST reads its class like GLOBAL does; protocol 0.
        let inst = b"(S'touch evil'\nios\nsystem\n.";
        assert_eq!(forbidden_of(read_torch_bytes(inst)), "os.system");
        // A global hidden inside a legacy stream's main pickle.
        let main = Pk::new().global("subprocess", "call").done();
        let legacy = legacy_file(&main, &[], true);
        assert_eq!(forbidden_of(read_torch_bytes(&legacy)), "subprocess.call");
        // A torch name outside the list.
        let load = Pk::new().global("torch", "load").done();
        assert_eq!(forbidden_of(read_torch_bytes(&load)), "torch.load");
        let ext = [0x80, 2, 0x82, 0x01, b'.'];
        let g = forbidden_of(read_torch_bytes(&ext));
        assert!(g.contains("extension"), "{g}");
    }

    #[test]
    fn allowed_callables_with_wrong_arguments_are_refused() {
        let storage_call = Pk::new()
            .global("torch", "FloatStorage")
            .raw(b"(K\x03tR")
            .done();
        let msg = format_err_of(read_torch_bytes(&storage_call));
        assert!(msg.contains("StorageType"), "{msg}");
        let not_storage = Pk::new()
            .global("torch._utils", "_rebuild_tensor_v2")
            .raw(b"(")
            .s("not a storage")
            .int(0)
            .ints(&[1])
            .ints(&[1])
            .raw(&[0x89])
            .raw(b"}tR")
            .done();
        let msg = format_err_of(read_torch_bytes(&not_storage));
        assert!(msg.contains("rebuilt from a str"), "{msg}");
        let few_args = Pk::new()
            .global("torch._utils", "_rebuild_tensor_v2")
            .raw(b"(K\x00tR")
            .done();
        format_err_of(read_torch_bytes(&few_args));
        let bad_dict = Pk::new()
            .global("collections", "OrderedDict")
            .raw(b"(K\x03tR")
            .done();
        format_err_of(read_torch_bytes(&bad_dict));
        // BUILD on anything but a dict.
        let build = Pk::new().raw(b"]}b").done();
        format_err_of(read_torch_bytes(&build));
        // A bare pickle without globals is simply not a checkpoint.
        let msg = format_err_of(read_torch_bytes(&Pk::new().raw(b"}").done()));
        assert!(msg.starts_with("not a PyTorch checkpoint"), "{msg}");
        format_err_of(read_torch_bytes(b""));
    }

    fn six() -> Vec<u8> {
        f32_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    }

    #[test]
    fn prefixes_and_wrappers_are_unwrapped() {
        let data = six();
        let storages = [("0", 4, data.as_slice())];
        let ddp = Pk::new()
            .raw(b"}(")
            .s("module.a")
            .tensor("FloatStorage", "0", 6, None, 0, &[6], &[1])
            .s("module.b.c")
            .tensor("FloatStorage", "0", 6, None, 2, &[2], &[1])
            .raw(b"u")
            .done();
        let got = read_torch_bytes(&legacy_file(&ddp, &storages, true)).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["a", "b.c"]);
        assert_eq!(got["b.c"].bytes, f32_bytes(&[2.0, 3.0]));

        let mixed = Pk::new()
            .raw(b"}(")
            .s("module.a")
            .tensor("FloatStorage", "0", 6, None, 0, &[6], &[1])
            .s("b")
            .tensor("FloatStorage", "0", 6, None, 0, &[6], &[1])
            .raw(b"u")
            .done();
        let got = read_torch_bytes(&legacy_file(&mixed, &storages, true)).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["b", "module.a"]);
        // Both alias one storage: the first is copied, the last takes it.
        assert_eq!(got["b"].bytes, data);
        assert_eq!(got["module.a"].bytes, data);

        // {"epoch": 3, "state_dict": OrderedDict(...), "name": "x"}, with the
        // OrderedDict's `_metadata` BUILD state that torch writes.
        let wrapped = Pk::new()
            .raw(b"}(")
            .s("epoch")
            .int(3)
            .s("state_dict")
            .global("collections", "OrderedDict")
            .raw(b")R(")
            .s("w")
            .tensor("FloatStorage", "0", 6, None, 0, &[2, 3], &[3, 1])
            .raw(b"u}(")
            .s("_metadata")
            .raw(b"}ub")
            .s("name")
            .s("x")
            .raw(b"u")
            .done();
        let got = read_torch_bytes(&legacy_file(&wrapped, &storages, true)).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got["w"].shape, [2, 3]);
        assert_eq!(got["w"].bytes, data);
    }

    #[test]
    fn strides_scalars_views_and_dtypes() {
        let data = six();
        let halves: Vec<u8> = (0u8..8).collect();
        let longs: Vec<u8> = [7i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
        let main = Pk::new()
            .raw(b"}(")
            // A transposed view of a contiguous 3x2 tensor.
            .s("t")
            .tensor("FloatStorage", "0", 6, None, 0, &[2, 3], &[1, 2])
            .s("scalar")
            .tensor("FloatStorage", "0", 6, None, 4, &[], &[])
            .s("empty")
            .tensor("FloatStorage", "0", 6, None, 0, &[0, 3], &[3, 1])
            // Legacy view_metadata: elements 2..5 of storage 0.
            .s("view")
            .tensor("FloatStorage", "0", 6, Some(("v", 2, 3)), 1, &[2], &[1])
            .s("half")
            .tensor("HalfStorage", "1", 2, None, 0, &[2], &[1])
            .s("bf16")
            .tensor("BFloat16Storage", "2", 2, None, 1, &[1], &[1])
            .s("long")
            // A parameter wrapper around an int64 tensor.
            .global("torch._utils", "_rebuild_parameter")
            .raw(b"(")
            .tensor("LongStorage", "3", 2, None, 0, &[2], &[1])
            .raw(&[0x89])
            .global("collections", "OrderedDict")
            .raw(b")RtR")
            .raw(b"u")
            .done();
        let storages = [
            ("0", 4, data.as_slice()),
            ("1", 2, &halves[..4]),
            ("2", 2, &halves[4..]),
            ("3", 8, longs.as_slice()),
        ];
        let got = read_torch_bytes(&legacy_file(&main, &storages, true)).unwrap();
        assert_eq!(got["t"].shape, [2, 3]);
        assert_eq!(got["t"].bytes, f32_bytes(&[0.0, 2.0, 4.0, 1.0, 3.0, 5.0]));
        assert_eq!(got["scalar"].shape, Vec::<usize>::new());
        assert_eq!(got["scalar"].bytes, f32_bytes(&[4.0]));
        assert_eq!(got["empty"].shape, [0, 3]);
        assert!(got["empty"].bytes.is_empty());
        assert_eq!(got["view"].bytes, f32_bytes(&[3.0, 4.0]));
        assert_eq!(got["half"].dtype, TorchDtype::F16);
        assert_eq!(got["half"].bytes, [0, 1, 2, 3]);
        assert_eq!(got["bf16"].dtype, TorchDtype::BF16);
        assert_eq!(got["bf16"].bytes, [6, 7]);
        assert_eq!(got["long"].dtype, TorchDtype::I64);
        assert_eq!(got["long"].bytes, longs);
    }

    #[test]
    fn protocol_0_text_opcodes() {
        let main = b"(dp0\nS'w\\x41'\np1\n\
            ctorch._utils\n_rebuild_tensor_v2\np2\n\
            ((S'storage'\nctorch\nFloatStorage\nS'0'\nS'cpu'\nI6\ntQI1\n(I2\ntp3\n(I2\nt\
            I00\nccollections\nOrderedDict\n(tRtRs\
            Vk\\u00e9\ng2\n((S'storage'\nctorch\nFloatStorage\nS'0'\nS'cpu'\nL6L\ntQL0L\n\
            g3\n(I1\ntI01\n(dtRs.";
        let data = six();
        let got = read_torch_bytes(&legacy_file(main, &[("0", 4, &data)], true)).unwrap();
        assert_eq!(got["wA"].bytes, f32_bytes(&[1.0, 3.0]));
        assert_eq!(got["k\u{e9}"].bytes, f32_bytes(&[0.0, 1.0]));
    }

    #[test]
    fn bad_offsets_strides_and_lengths_are_errors() {
        let data = six();
        let storages = [("0", 4, data.as_slice())];
        let one = |offset: usize, shape: &[usize], stride: &[usize]| {
            let main = Pk::new()
                .raw(b"}(")
                .s("x")
                .tensor("FloatStorage", "0", 6, None, offset, shape, stride)
                .raw(b"u")
                .done();
            read_torch_bytes(&legacy_file(&main, &storages, true))
        };
        assert!(one(4, &[2], &[1]).is_ok());
        format_err_of(one(5, &[2], &[1]));
        format_err_of(one(0, &[2, 3], &[3, 2]));
        format_err_of(one(usize::MAX / 2, &[2], &[1]));
        // stride 0 (expand) beyond the storage's size is refused.
        format_err_of(one(0, &[1000], &[0]));
        // A string claiming 4 GB in a tiny file.
        let huge = [0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff, b'a', b'.'];
        format_err_of(read_torch_bytes(&huge));
        // A zip entry claiming more storage than the file could expand to.
        let bytes = fixture("open_clip_pytorch_model.bin");
        let (prefix, _, _) = zip_parts(&bytes);
        let archive = ZipArchive::new(Cursor::new(bytes.as_slice())).unwrap();
        let greedy = Pk::new()
            .raw(b"}(")
            .s("x")
            .tensor("FloatStorage", "0", 1 << 30, None, 0, &[1], &[1])
            .raw(b"u")
            .done();
        format_err_of(read_zip_pickle(
            &greedy,
            archive,
            prefix,
            budget_for(bytes.len()),
        ));
        // Deep nesting needs no recursion.
        let mut deep = vec![0x80, 2];
        deep.extend(std::iter::repeat_n(b']', 200_000));
        deep.extend(std::iter::repeat_n(b'a', 199_999));
        deep.push(b'.');
        let msg = format_err_of(read_torch_bytes(&deep));
        assert!(msg.starts_with("not a PyTorch checkpoint"), "{msg}");
        // Self-referencing containers are fine too.
        let cyclic = Pk::new().raw(b"]q\x00h\x00a.").done();
        format_err_of(read_torch_bytes(&cyclic));
        // Memo misses and stack underflows.
        format_err_of(read_torch_bytes(&[0x80, 2, b'h', 9, b'.']));
        format_err_of(read_torch_bytes(&[0x80, 2, b'(', b'0', b'.']));
        format_err_of(read_torch_bytes(&[0x80, 2, 0xff]));
    }

    /// A tiny xorshift so the fuzz cases are reproducible without `rand`.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn truncations_never_panic() {
        let bytes = fixture("open_clip_pytorch_model.bin");
        let (prefix, pickle, storages) = zip_parts(&bytes);
        let table: Vec<(&str, usize, &[u8])> = storages
            .iter()
            .map(|(k, b)| (k.as_str(), 4, b.as_slice()))
            .collect();
        let legacy = legacy_file(&pickle, &table, true);
        let archive = ZipArchive::new(Cursor::new(bytes.as_slice())).unwrap();
        for i in 0..200 {
            let cut = bytes.len() * i / 200;
            let _ = read_torch_bytes(&bytes[..cut]);
            let _ = read_torch_bytes(&legacy[..legacy.len() * i / 200]);
            let _ = read_zip_pickle(
                &pickle[..pickle.len() * i / 200],
                archive.clone(),
                prefix.clone(),
                budget_for(bytes.len()),
            );
        }
    }

    #[test]
    fn mutations_never_panic() {
        let bytes = fixture("open_clip_pytorch_model.bin");
        let (prefix, pickle, _) = zip_parts(&bytes);
        let archive = ZipArchive::new(Cursor::new(bytes.as_slice())).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut outcomes = [0usize; 2];
        for _ in 0..3000 {
            let r = xorshift(&mut state);
            let mut m = pickle.clone();
            let at = (r % m.len() as u64) as usize;
            let new = (r >> 32) as u8;
            m[at] = if new == m[at] { new ^ 1 } else { new };
            let result =
                read_zip_pickle(&m, archive.clone(), prefix.clone(), budget_for(bytes.len()));
            outcomes[usize::from(result.is_ok())] += 1;
        }
        // Both outcomes occur: mutations of tensor data slots parse, others not.
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    }
}

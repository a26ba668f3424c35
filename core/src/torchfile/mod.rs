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

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Cursor, Read};

use zip::ZipArchive;

use storage::{Budget, Source, Storages, collect};
use unpickle::{Id, Node, Parsed, parse_pickle};

mod opcodes;
mod storage;
#[cfg(test)]
mod tests;
mod unpickle;

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

/// Reads a legacy (pre-zip) `torch.save` stream: magic, protocol and
/// system-info pickles, the main pickle, the storage-key list, then each
/// storage's bytes in that order.
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

    read_legacy_storages(bytes, keys.end, &keys, &key_ids, &mut storages)?;
    collect(&main, &mut storages)
}

/// Fills each storage's bytes from the stream after the key list, in the
/// list's order: per storage an 8-byte little-endian element count, then
/// the elements.
fn read_legacy_storages(
    bytes: &[u8],
    start: usize,
    keys: &Parsed,
    key_ids: &[Id],
    storages: &mut Storages<'_>,
) -> Result<()> {
    let mut pos = start;
    for &id in key_ids {
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
    Ok(())
}

fn truncated_storage(key: &str) -> TorchFileError {
    format_err(format!(
        "legacy PyTorch checkpoint: storage {key:?} runs past the end of the file"
    ))
}

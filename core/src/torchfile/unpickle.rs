//! The restricted unpickler: its allowed globals, its object arena, and the
//! helpers the opcode loop (`opcodes.rs`) relies on.

use std::collections::HashMap;
use std::fmt;

use super::storage::{Pid, StorageRef, Storages, TensorRef};
use super::{Result, TorchDtype, TorchFileError, format_err};

// ---------------------------------------------------------------------------
// The restricted unpickler
// ---------------------------------------------------------------------------

/// Index of a node in the unpickler's arena. Containers hold ids, so shared
/// references (memo, DUP) and mutation after memoizing behave as in Python,
/// and cycles cost nothing.
pub(super) type Id = usize;

/// The callables and classes a checkpoint may name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    StorageType(TorchDtype),
}

pub(super) fn resolve_global(module: &str, name: &str) -> Result<Global> {
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
pub(super) enum Node {
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
    pub(super) fn kind(&self) -> &'static str {
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
pub(super) struct Parsed {
    pub(super) nodes: Vec<Node>,
    pub(super) root: Id,
    pub(super) end: usize,
}

impl Parsed {
    pub(super) fn is_str(&self, id: Id, s: &str) -> bool {
        matches!(&self.nodes[id], Node::Str(k) if k == s)
    }
}

pub(super) fn parse_pickle(
    input: &[u8],
    start: usize,
    storages: &mut Storages<'_>,
) -> Result<Parsed> {
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
pub(super) struct Unpickler<'p, 's, 'z> {
    input: &'p [u8],
    pos: usize,
    pub(super) nodes: Vec<Node>,
    pub(super) stack: Vec<Id>,
    /// Stack lengths at each MARK (Python's metastack).
    pub(super) marks: Vec<usize>,
    pub(super) memo: HashMap<u64, Id>,
    pub(super) storages: &'s mut Storages<'z>,
}

impl<'p> Unpickler<'p, '_, '_> {
    pub(super) fn err<T>(&self, what: impl fmt::Display) -> Result<T> {
        Err(format_err(format!(
            "PyTorch checkpoint: malformed pickle near byte {}: {what}",
            self.pos
        )))
    }

    pub(super) fn byte(&mut self) -> Result<u8> {
        match self.input.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => self.err("truncated (no STOP)"),
        }
    }

    /// `n` bytes, checked against the remaining input before use.
    pub(super) fn take(&mut self, n: usize) -> Result<&'p [u8]> {
        let Some(bytes) = self.input.get(self.pos..).and_then(|r| r.get(..n)) else {
            return self.err(format!("a length of {n} runs past the end"));
        };
        self.pos += n;
        Ok(bytes)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(super) fn len_u32(&mut self) -> Result<usize> {
        let n = u32::from_le_bytes(self.array()?);
        usize::try_from(n).or_else(|_| self.err("length too large"))
    }

    pub(super) fn len_u64(&mut self) -> Result<usize> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).or_else(|_| self.err("length too large"))
    }

    /// A protocol-0 argument: the bytes up to the next newline.
    pub(super) fn line(&mut self) -> Result<&'p [u8]> {
        let rest = self.input.get(self.pos..).unwrap_or_default();
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("a text argument has no newline");
        };
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    pub(super) fn line_str(&mut self) -> Result<String> {
        let line = self.line()?.to_vec();
        String::from_utf8(line).or_else(|_| self.err("a name is not UTF-8"))
    }

    pub(super) fn line_int(&mut self) -> Result<i128> {
        let line = self.line()?;
        self.parse_int(line)
    }

    pub(super) fn parse_int(&self, line: &[u8]) -> Result<i128> {
        let parsed = std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.trim().parse::<i128>().ok());
        match parsed {
            Some(v) => Ok(v),
            None => self.err("a text integer does not parse"),
        }
    }

    pub(super) fn push(&mut self, node: Node) {
        self.nodes.push(node);
        self.stack.push(self.nodes.len() - 1);
    }

    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    pub(super) fn pop(&mut self) -> Result<Id> {
        if self.stack.len() <= self.fence() {
            return self.err("stack underflow");
        }
        self.stack
            .pop()
            .map_or_else(|| self.err("stack underflow"), Ok)
    }

    pub(super) fn top(&self) -> Result<Id> {
        if self.stack.len() <= self.fence() {
            return self.err("stack underflow");
        }
        self.stack
            .last()
            .copied()
            .map_or_else(|| self.err("stack underflow"), Ok)
    }

    pub(super) fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let Some(mark) = self.marks.pop() else {
            return self.err("no MARK on the stack");
        };
        if mark > self.stack.len() {
            return self.err("stack underflow");
        }
        Ok(self.stack.split_off(mark))
    }

    pub(super) fn pop_n(&mut self, n: usize) -> Result<Vec<Id>> {
        if self.stack.len() < self.fence() + n {
            return self.err("stack underflow");
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    pub(super) fn memo_put(&mut self, key: u64) -> Result<()> {
        let top = self.top()?;
        self.memo.insert(key, top);
        Ok(())
    }

    pub(super) fn memo_get(&mut self, key: u64) -> Result<()> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => self.err(format!("memo key {key} was never stored")),
        }
    }

    pub(super) fn str_node(&self, bytes: &[u8]) -> Result<Node> {
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Node::Str(s.to_string())),
            Err(_) => self.err("a unicode string is not UTF-8"),
        }
    }

    pub(super) fn str_of(&self, id: Id) -> Result<&str> {
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
    pub(super) fn top_container(&mut self) -> Result<&mut Node> {
        let id = self.top()?;
        Ok(&mut self.nodes[id])
    }

    pub(super) fn append(&mut self, items: Vec<Id>) -> Result<()> {
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

    pub(super) fn set_items(&mut self, items: Vec<Id>) -> Result<()> {
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

    pub(super) fn global_of(&self, id: Id) -> Result<Global> {
        match &self.nodes[id] {
            Node::Global(g) => Ok(*g),
            other => self.err(format!("calling a {}", other.kind())),
        }
    }

    /// Applies an allowed callable; returns the id of the result.
    pub(super) fn call(&mut self, global: Global, args: &[Id]) -> Result<Id> {
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
    pub(super) fn pid(&self, id: Id) -> Result<Pid> {
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

pub(super) fn long_node(bytes: &[u8]) -> Node {
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
pub(super) fn legacy_str_node(bytes: Vec<u8>) -> Node {
    match String::from_utf8(bytes) {
        Ok(s) => Node::Str(s),
        Err(_) => Node::Opaque,
    }
}

/// Decodes a protocol-0 STRING argument: a quoted Python literal with
/// backslash escapes.
pub(super) fn decode_string_literal(line: &[u8]) -> Option<Vec<u8>> {
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
pub(super) fn decode_raw_unicode_escape(line: &[u8]) -> Option<String> {
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

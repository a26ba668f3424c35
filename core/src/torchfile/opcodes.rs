//! The opcode loop of the restricted unpickler.

use super::unpickle::{
    Global, Id, Node, Unpickler, decode_raw_unicode_escape, decode_string_literal, legacy_str_node,
    long_node, resolve_global,
};
use super::{Result, TorchFileError};

impl Unpickler<'_, '_, '_> {
    /// Runs the pickle program to its `STOP` and returns the result's node.
    ///
    /// Long because it is the protocol's table: one arm per opcode, in the
    /// order of CPython's `pickletools`, each a few lines of stack and memo
    /// work. Split into functions, each arm would need the whole machine
    /// handed to it, and the stack discipline would no longer read in one
    /// place.
    pub(super) fn run(&mut self) -> Result<Id> {
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
}

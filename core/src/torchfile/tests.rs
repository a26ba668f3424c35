//! Tests of the PyTorch checkpoint reader.

use super::*;
use std::io::Write;

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/openclip_hub/clipa_v2_tiny"
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
        let result = read_zip_pickle(&m, archive.clone(), prefix.clone(), budget_for(bytes.len()));
        outcomes[usize::from(result.is_ok())] += 1;
    }
    // Both outcomes occur: mutations of tensor data slots parse, others not.
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

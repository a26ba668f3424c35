//! State-dict files: safetensors, read and written, and PyTorch checkpoints
//! (`torch.save`), read by [`crate::torchfile`]'s restricted unpickler,
//! which rebuilds tensors and containers and runs no code.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{DType, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::state::StateDict;
use crate::{Error, Result};

/// A state dict and the file's free-form metadata.
#[derive(Debug, Default)]
pub struct TensorFile {
    /// The tensors, as f32 (f16 and bf16 are widened), or i64/i32 ids.
    pub tensors: StateDict,
    /// The `__metadata__` map.
    pub metadata: HashMap<String, String>,
}

fn format_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<TensorFile> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| format_err(path, format!("not a safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| format_err(path, format!("bad safetensors header: {e}")))?;
    let mut tensors = StateDict::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            other => {
                return Err(format_err(
                    path,
                    format!("tensor {name} has unsupported dtype {other:?}"),
                ));
            }
        };
        let data = widened(view.data().to_vec(), view.shape().to_vec(), dtype);
        tensors.insert(name, data);
    }
    Ok(TensorFile {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

/// A tensor from its little-endian bytes, f16, bf16 and f64 widened or
/// narrowed to f32 (clipa's float type); ids stay integers.
fn widened(bytes: Vec<u8>, shape: Vec<usize>, dtype: DType) -> TensorData {
    let data = TensorData::from_bytes_vec(bytes, shape, dtype);
    match dtype {
        DType::F16 | DType::BF16 | DType::F64 => data.convert::<f32>(),
        _ => data,
    }
}

/// Reads a state dict by its file name: safetensors, or a PyTorch
/// checkpoint (`.bin`, `.pt`, `.pth`: zip or legacy format, read without
/// running any of its code). Half-precision tensors are widened to f32.
pub fn read_weights(path: &Path) -> Result<TensorFile> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("safetensors") => read_safetensors(path),
        Some("bin" | "pt" | "pth") => read_torch(path),
        _ => Err(format_err(
            path,
            "unknown weights format: expected .safetensors, or a PyTorch .bin, .pt or .pth",
        )),
    }
}

/// Reads a PyTorch checkpoint's tensors (see [`crate::torchfile`]).
pub fn read_torch(path: &Path) -> Result<TensorFile> {
    use crate::torchfile::{TorchDtype, read_torch_bytes};
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let raw = read_torch_bytes(&bytes).map_err(|e| format_err(path, e.to_string()))?;
    let mut tensors = StateDict::new();
    for (name, t) in raw {
        let dtype = match t.dtype {
            TorchDtype::F32 => DType::F32,
            TorchDtype::F64 => DType::F64,
            TorchDtype::F16 => DType::F16,
            TorchDtype::BF16 => DType::BF16,
            TorchDtype::I64 => DType::I64,
            TorchDtype::I32 => DType::I32,
            other => {
                return Err(format_err(
                    path,
                    format!("tensor {name} has unsupported dtype {other:?}"),
                ));
            }
        };
        tensors.insert(name, widened(t.bytes, t.shape, dtype));
    }
    Ok(TensorFile {
        tensors,
        metadata: HashMap::new(),
    })
}

/// Writes a safetensors file atomically: a temporary file in the same
/// folder, then a rename, so a crash never leaves a half-written file.
pub fn write_safetensors(
    path: &Path,
    tensors: &StateDict,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, data) in tensors {
        let dtype = match data.dtype {
            DType::F32 => Dtype::F32,
            DType::I64 => Dtype::I64,
            DType::I32 => Dtype::I32,
            other => {
                return Err(format_err(
                    path,
                    format!("cannot write tensor {name} of dtype {other:?}"),
                ));
            }
        };
        let view = TensorView::new(dtype, data.shape.to_vec(), data.as_bytes())
            .map_err(|e| format_err(path, format!("tensor {name}: {e}")))?;
        views.push((name.as_str(), view));
    }
    let meta = (!metadata.is_empty()).then_some(metadata);
    let bytes = safetensors::serialize(views, meta).map_err(|e| format_err(path, e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    // Data reaches the disk before the rename makes it visible, and the
    // rename itself is made durable by syncing the folder: after a crash the
    // file is either the old one or the complete new one.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(dir)
}

/// Makes renames inside `dir` durable (a no-op where folders cannot be
/// opened, as on Windows).
pub fn sync_dir(dir: &Path) -> Result<()> {
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all().or_else(|e| {
            if cfg!(unix) {
                Err(Error::io(dir, e))
            } else {
                Ok(())
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_bits_and_metadata() {
        let dir_tmp = tempfile::tempdir().unwrap();

        let dir = dir_tmp.path().join("run");
        let path = dir.join("t.safetensors");
        let mut sd = StateDict::new();
        sd.insert(
            "a.b".into(),
            TensorData::new(vec![1.5f32, -0.0, f32::MIN_POSITIVE], [3]),
        );
        sd.insert(
            "scalar".into(),
            TensorData::new(vec![2.0f32], Vec::<usize>::new()),
        );
        sd.insert("ids".into(), TensorData::new(vec![1i64, 2, 3, 4], [2, 2]));
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        write_safetensors(&path, &sd, meta.clone()).unwrap();
        let back = read_safetensors(&path).unwrap();
        assert_eq!(back.tensors, sd);
        assert_eq!(back.metadata, meta);
    }

    #[test]
    fn garbage_is_a_named_format_error() {
        let dir_tmp = tempfile::tempdir().unwrap();

        let dir = dir_tmp.path();
        let path = dir.join("x.safetensors");
        std::fs::write(&path, b"not a tensor file").unwrap();
        let err = read_safetensors(&path).unwrap_err().to_string();
        assert!(
            err.contains("x.safetensors") && err.contains("not a safetensors file"),
            "{err}"
        );
    }
}

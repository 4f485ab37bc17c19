//! The GGUF container (llama.cpp's model file, versions 2 and 3): the header, the typed
//! metadata key/value pairs and the tensor table are parsed from a memory map of the file, and
//! tensors are handed out as byte ranges of that map, so weights are used in place. What the
//! metadata means for a Llama-family model is `gguf_model`'s business; this module only reads
//! the container and rejects anything malformed with the offset and reason.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::error::ModelError;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::UInt(v) => Some(v),
            GgufValue::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::Float(v) => Some(v),
            GgufValue::UInt(v) => Some(v as f64),
            GgufValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions innermost first, as GGUF lists them (`[cols, rows]` for a matrix).
    pub dims: Vec<usize>,
    /// The ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, 30 BF16, ...).
    pub ggml_type: u32,
    /// Byte range in the file.
    pub range: Range<usize>,
}

impl GgufTensor {
    pub fn num_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A memory-mapped GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, GgufValue>,
    pub tensors: Vec<GgufTensor>,
    pub map: Arc<Mmap>,
}

/// Bytes per block and elements per block of the ggml types this reader can size.
pub fn ggml_type_size(ggml_type: u32) -> Option<(usize, usize)> {
    Some(match ggml_type {
        0 => (4, 1),      // F32
        1 | 30 => (2, 1), // F16, BF16
        2 => (18, 32),    // Q4_0
        3 => (20, 32),    // Q4_1
        6 => (22, 32),    // Q5_0
        7 => (24, 32),    // Q5_1
        8 => (34, 32),    // Q8_0
        10 => (84, 256),  // Q2_K
        11 => (110, 256), // Q3_K
        12 => (144, 256), // Q4_K
        13 => (176, 256), // Q5_K
        14 => (210, 256), // Q6_K
        _ => return None,
    })
}

/// The name llama.cpp gives a ggml type id.
pub fn ggml_type_name(ggml_type: u32) -> String {
    match ggml_type {
        0 => "F32".into(),
        1 => "F16".into(),
        2 => "Q4_0".into(),
        3 => "Q4_1".into(),
        6 => "Q5_0".into(),
        7 => "Q5_1".into(),
        8 => "Q8_0".into(),
        10 => "Q2_K".into(),
        11 => "Q3_K".into(),
        12 => "Q4_K".into(),
        13 => "Q5_K".into(),
        14 => "Q6_K".into(),
        30 => "BF16".into(),
        other => format!("ggml type {other}"),
    }
}

/// A cursor over the header bytes; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("truncated at byte {} (wanted {n} more)", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A count that must fit what is left of the file (`min_each` bytes per item at least).
    fn count(&mut self, min_each: usize) -> Result<usize, String> {
        let at = self.pos;
        let n = self.u64()?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_each as u64) > left {
            return Err(format!("count {n} at byte {at} exceeds the file"));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, String> {
        let at = self.pos;
        let n = self.count(1)?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("string at byte {at} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, String> {
        let at = self.pos;
        Ok(match ty {
            0 => GgufValue::UInt(u64::from(self.take(1)?[0])),
            1 => GgufValue::Int(i64::from(self.take(1)?[0] as i8)),
            2 => {
                let b = self.take(2)?;
                GgufValue::UInt(u64::from(u16::from_le_bytes([b[0], b[1]])))
            }
            3 => {
                let b = self.take(2)?;
                GgufValue::Int(i64::from(i16::from_le_bytes([b[0], b[1]])))
            }
            4 => GgufValue::UInt(u64::from(self.u32()?)),
            5 => GgufValue::Int(i64::from(self.u32()? as i32)),
            6 => GgufValue::Float(f64::from(f32::from_bits(self.u32()?))),
            7 => GgufValue::Bool(self.take(1)?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(format!("arrays nested too deep at byte {at}"));
                }
                let inner = self.u32()?;
                let n = self.count(1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::UInt(self.u64()?),
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64()?)),
            other => return Err(format!("unknown value type {other} at byte {at}")),
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the mapping is read-only; a model file modified while it is served is outside
        // what any loader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(path, Arc::new(map))
    }

    fn parse(path: &Path, map: Arc<Mmap>) -> Result<Self, ModelError> {
        let err = |m: String| ModelError::parse(path, format!("GGUF: {m}"));
        let mut r = Reader {
            bytes: &map,
            pos: 0,
        };
        if r.take(4).map_err(err)? != MAGIC {
            return Err(err("not a GGUF file (bad magic)".into()));
        }
        let version = r.u32().map_err(err)?;
        if !(2..=3).contains(&version) {
            return Err(err(format!("version {version} (supported: 2, 3)")));
        }
        let n_tensors = r.count(24).map_err(err)?;
        let n_kv = r.count(13).map_err(err)?;
        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = r.string().map_err(err)?;
            let ty = r.u32().map_err(err)?;
            let value = r.value(ty, 0).map_err(err)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| err("general.alignment is not a power of two".into()))?,
        };
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string().map_err(err)?;
            let n_dims = r.u32().map_err(err)? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(err(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64().map_err(err)?;
                dims.push(
                    usize::try_from(d)
                        .map_err(|_| err(format!("tensor `{name}`: dimension {d}")))?,
                );
            }
            let ggml_type = r.u32().map_err(err)?;
            let offset = r.u64().map_err(err)?;
            infos.push((name, dims, ggml_type, offset));
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ggml_type, offset) in infos {
            let elements = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| err(format!("tensor `{name}`: size overflows")))?;
            let (block_bytes, block_len) = ggml_type_size(ggml_type).ok_or_else(|| {
                err(format!(
                    "tensor `{name}` has unknown {}",
                    ggml_type_name(ggml_type)
                ))
            })?;
            if dims[0] % block_len != 0 {
                return Err(err(format!(
                    "tensor `{name}`: rows of {} are not whole {} blocks",
                    dims[0],
                    ggml_type_name(ggml_type)
                )));
            }
            let len = elements / block_len * block_bytes;
            let start = data_start
                .checked_add(offset)
                .and_then(|s| usize::try_from(s).ok())
                .filter(|s| s.checked_add(len).is_some_and(|e| e <= map.len()))
                .ok_or_else(|| err(format!("tensor `{name}` lies outside the file")))?;
            tensors.push(GgufTensor {
                name,
                dims,
                ggml_type,
                range: start..start + len,
            });
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            map,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of `tensor`.
    pub fn bytes(&self, tensor: &GgufTensor) -> &[u8] {
        &self.map[tensor.range.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny GGUF v3 file: two metadata keys and one 2x32 Q8_0 tensor.
    fn tiny_file() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "b");
        s(&mut b, "w");
        b.extend(2u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(std::iter::repeat_n(7u8, 68));
        b
    }

    fn parse(bytes: Vec<u8>) -> Result<GgufFile, ModelError> {
        let dir = std::env::temp_dir().join(format!("stepscope-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.gguf", bytes.len()));
        std::fs::write(&path, bytes).unwrap();
        let out = GgufFile::open(&path);
        let _ = std::fs::remove_file(&path);
        out
    }

    #[test]
    fn reads_metadata_and_tensor_table() {
        let f = parse(tiny_file()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(
            f.get("general.architecture").unwrap().as_str(),
            Some("llama")
        );
        assert_eq!(
            f.get("tokenizer.ggml.tokens")
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let t = f.tensor("w").unwrap();
        assert_eq!((t.dims.clone(), t.ggml_type), (vec![32, 2], 8));
        assert_eq!(f.bytes(t), &[7u8; 68][..]);
    }

    #[test]
    fn malformed_files_are_errors_not_panics() {
        let good = tiny_file();
        // Every truncation, and a few corruptions, must fail cleanly.
        for len in 0..good.len() - 1 {
            assert!(parse(good[..len].to_vec()).is_err(), "truncated at {len}");
        }
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(parse(bad).unwrap_err().to_string().contains("bad magic"));
        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(huge).is_err());
        let mut ty = good;
        // The tensor's type field is the last little-endian 8u32 before the data.
        let pos = ty
            .windows(4)
            .rposition(|w| w == 8u32.to_le_bytes())
            .unwrap();
        ty[pos] = 99;
        assert!(parse(ty).unwrap_err().to_string().contains("unknown"));
    }
}

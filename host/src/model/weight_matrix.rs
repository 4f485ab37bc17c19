//! A projection's weights as the CPU backend multiplies them: either an f32 [`Matrix`] or a
//! [`BlockMatrix`] whose rows stay in a block format ([`BlockFormat`]: llama.cpp's Q8_0, Q5_0,
//! Q4_0, Q4_1, Q4_K with its scales unpacked, Q6_K's values in 32-element blocks, or f16/bf16).
//! A block matrix is a stack of parts, each a run of whole rows; stacking parts is how q/k/v
//! and gate/up are fused without copying. Every part owns its bytes once built: quantized rows
//! are repacked, when the part is built, into 8-row interleaved groups ([`pack_rows`]: the same
//! bytes in the order the int8 kernels read), and half-precision rows handed over as a range of
//! a memory-mapped file are copied out of it as they are (the decode kernel streamed freshly
//! allocated memory faster than the file's page-cache pages: see [`BlockMatrix::new`]), so a
//! model occupies its file's size and the file's pages are not kept. Backends that only compute
//! in f32 call [`WeightMatrix::to_f32`].

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;

use super::quant::{BlockFormat, pack_rows, packed_row};
use super::weights::Matrix;

/// Bytes of a part: a range of a shared memory map, or an owned buffer.
#[derive(Debug, Clone)]
pub enum WeightBytes {
    Mapped { map: Arc<Mmap>, range: Range<usize> },
    Owned(Arc<[u8]>),
}

impl WeightBytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            WeightBytes::Mapped { map, range } => &map[range.clone()],
            WeightBytes::Owned(b) => b,
        }
    }
}

/// `rows` whole rows of a block matrix: row-major for half precision, [`pack_rows`]' layout
/// for quantized formats.
#[derive(Debug, Clone)]
pub struct BlockPart {
    pub rows: usize,
    pub bytes: WeightBytes,
}

/// A `[rows, cols]` matrix (Hugging Face `[out, in]` layout) whose rows are in one block format.
#[derive(Debug, Clone)]
pub struct BlockMatrix {
    pub format: BlockFormat,
    pub rows: usize,
    pub cols: usize,
    pub parts: Vec<BlockPart>,
}

impl BlockMatrix {
    /// One part from row-major `bytes`; checks that they hold exactly `rows` rows of `cols`
    /// elements, packs quantized rows, and copies half-precision rows out of a memory map.
    ///
    /// The copy is for speed: on the Zen 4 machine, F16 decode at batch 1 (`bench model`, 3
    /// interleaved rounds) ran 38–39 tokens/s on 1 thread reading the file's mapped pages and
    /// 48–54 on the copy, 64–68 and 73–84 on 2 threads. Why the page-cache pages stream slower
    /// was not established (an anonymous map advised for huge pages was no faster than the
    /// file's).
    pub fn new(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        bytes: WeightBytes,
    ) -> Result<Self, String> {
        let part = Self::part(format, rows, cols, bytes)?;
        Ok(BlockMatrix {
            format,
            rows,
            cols,
            parts: vec![part],
        })
    }

    fn part(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        bytes: WeightBytes,
    ) -> Result<BlockPart, String> {
        if !cols.is_multiple_of(format.block_len()) {
            return Err(format!(
                "{} rows of {cols} elements are not whole blocks of {}",
                format.name(),
                format.block_len()
            ));
        }
        let want = rows * format.row_bytes(cols);
        let have = bytes.as_slice().len();
        if have != want {
            return Err(format!(
                "{rows}x{cols} {} needs {want} bytes, found {have}",
                format.name()
            ));
        }
        let bytes = match bytes {
            _ if format.is_quantized() => {
                WeightBytes::Owned(pack_rows(format, rows, cols, bytes.as_slice()).into())
            }
            WeightBytes::Mapped { .. } => WeightBytes::Owned(bytes.as_slice().into()),
            owned @ WeightBytes::Owned(_) => owned,
        };
        Ok(BlockPart { rows, bytes })
    }

    /// Quantizes an f32 matrix (tests and `--dtype` conversions).
    pub fn quantize(m: &Matrix, format: BlockFormat) -> Result<Self, String> {
        let mut bytes = Vec::with_capacity(m.rows * format.row_bytes(m.cols));
        if !m.cols.is_multiple_of(format.block_len()) {
            return Err(format!(
                "{} columns are not whole {} blocks",
                m.cols,
                format.name()
            ));
        }
        for i in 0..m.rows {
            bytes.extend(format.quantize_row(m.row(i)));
        }
        Self::new(format, m.rows, m.cols, WeightBytes::Owned(bytes.into()))
    }

    /// Stacks block matrices of one format and width (their parts are shared, not copied).
    pub fn vstack(parts: Vec<BlockMatrix>) -> Result<Self, String> {
        let first = parts.first().ok_or("nothing to stack")?;
        let (format, cols) = (first.format, first.cols);
        let mut out = BlockMatrix {
            format,
            rows: 0,
            cols,
            parts: Vec::new(),
        };
        for m in parts {
            if m.format != format || m.cols != cols {
                return Err(format!(
                    "cannot stack {} x{} rows on {} x{cols} rows",
                    m.format.name(),
                    m.cols,
                    format.name()
                ));
            }
            out.rows += m.rows;
            out.parts.extend(m.parts);
        }
        Ok(out)
    }

    /// The bytes of row `i` in row-major block layout.
    pub fn row_bytes(&self, mut i: usize) -> Cow<'_, [u8]> {
        let rb = self.format.row_bytes(self.cols);
        for p in &self.parts {
            if i < p.rows {
                let bytes = p.bytes.as_slice();
                return if self.format.is_quantized() {
                    Cow::Owned(packed_row(self.format, self.cols, bytes, i))
                } else {
                    Cow::Borrowed(&bytes[i * rb..(i + 1) * rb])
                };
            }
            i -= p.rows;
        }
        panic!("row {i} past the end of a block matrix");
    }

    /// Row `i` dequantized into `out` (`cols` long).
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        self.format.dequantize_row(&self.row_bytes(i), out);
    }

    /// The whole matrix in f32.
    pub fn dequantize(&self) -> Matrix {
        let mut data = vec![0f32; self.rows * self.cols];
        for (i, row) in data.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(i, row);
        }
        Matrix::new(self.rows, self.cols, data)
    }

    /// Bytes the rows occupy.
    pub fn byte_len(&self) -> usize {
        self.rows * self.format.row_bytes(self.cols)
    }
}

/// A projection's weights: f32 or a block format.
#[derive(Debug, Clone)]
pub enum WeightMatrix {
    F32(Matrix),
    Blocks(BlockMatrix),
}

impl From<Matrix> for WeightMatrix {
    fn from(m: Matrix) -> Self {
        WeightMatrix::F32(m)
    }
}

impl WeightMatrix {
    pub fn rows(&self) -> usize {
        match self {
            WeightMatrix::F32(m) => m.rows,
            WeightMatrix::Blocks(b) => b.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            WeightMatrix::F32(m) => m.cols,
            WeightMatrix::Blocks(b) => b.cols,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.rows() * self.cols()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The storage format's name (`F32`, `Q4_1`, ...).
    pub fn format_name(&self) -> &'static str {
        match self {
            WeightMatrix::F32(_) => "F32",
            WeightMatrix::Blocks(b) => b.format.name(),
        }
    }

    /// Bytes the weights occupy in memory.
    pub fn byte_len(&self) -> usize {
        match self {
            WeightMatrix::F32(m) => 4 * m.data.len(),
            WeightMatrix::Blocks(b) => b.byte_len(),
        }
    }

    /// Row `i` in f32, written into `out` (`cols` long): the embedding lookup.
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        match self {
            WeightMatrix::F32(m) => out.copy_from_slice(m.row(i)),
            WeightMatrix::Blocks(b) => b.dequantize_row(i, out),
        }
    }

    /// The matrix in f32 (borrowed when it already is).
    pub fn to_f32(&self) -> Cow<'_, Matrix> {
        match self {
            WeightMatrix::F32(m) => Cow::Borrowed(m),
            WeightMatrix::Blocks(b) => Cow::Owned(b.dequantize()),
        }
    }
}

impl PartialEq for BlockMatrix {
    /// Same format, shape and bytes (however the rows are split into parts).
    fn eq(&self, other: &Self) -> bool {
        self.format == other.format
            && self.rows == other.rows
            && self.cols == other.cols
            && (0..self.rows).all(|i| self.row_bytes(i) == other.row_bytes(i))
    }
}

impl PartialEq for WeightMatrix {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (WeightMatrix::F32(a), WeightMatrix::F32(b)) => a == b,
            (WeightMatrix::Blocks(a), WeightMatrix::Blocks(b)) => a == b,
            _ => false,
        }
    }
}

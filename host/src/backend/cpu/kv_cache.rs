//! The paged KV cache of the CPU backend: per layer, one K and one V tensor of `num_blocks`
//! blocks. Within a block, one head's data is contiguous: values as `[slot][head_dim]`, keys
//! transposed as `[head_dim][slot]`, so that the scores of a query against a whole block are a
//! sequence of vector multiply-adds with no horizontal reductions. Token position `p` of a request lives in block
//! `block_table[p / block_size]`, slot `p % block_size`.

use crate::model::{KvCacheShape, ModelError};

/// K and V storage for all layers.
pub struct PagedKvCache {
    shape: KvCacheShape,
    num_kv_heads: usize,
    head_dim: usize,
    /// Per layer: `num_blocks * num_kv_heads * block_size * head_dim` floats.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl PagedKvCache {
    pub fn new(
        shape: KvCacheShape,
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self, ModelError> {
        if shape.num_blocks == 0 || shape.block_size == 0 {
            return Err(ModelError::InvalidKvShape(format!(
                "num_blocks ({}) and block_size ({}) must be positive",
                shape.num_blocks, shape.block_size
            )));
        }
        let per_layer = shape
            .num_blocks
            .checked_mul(shape.block_size)
            .and_then(|n| n.checked_mul(num_kv_heads * head_dim))
            .filter(|&n| n.checked_mul(8 * num_layers).is_some())
            .ok_or_else(|| {
                ModelError::InvalidKvShape(format!(
                    "{} blocks of {} slots overflow the address space",
                    shape.num_blocks, shape.block_size
                ))
            })?;
        // `vec![0.0; n]` maps zeroed pages lazily, so untouched blocks cost no memory.
        let alloc = || (0..num_layers).map(|_| vec![0.0f32; per_layer]).collect();
        Ok(PagedKvCache {
            shape,
            num_kv_heads,
            head_dim,
            k: alloc(),
            v: alloc(),
        })
    }

    pub fn shape(&self) -> KvCacheShape {
        self.shape
    }

    /// Offset of the `(block, kv_head)` region (`block_size * head_dim` floats) in a layer
    /// tensor: keys at `[dim * block_size + slot]`, values at `[slot * head_dim + dim]`.
    #[inline]
    pub fn offset(&self, block: usize, kv_head: usize) -> usize {
        (block * self.num_kv_heads + kv_head) * self.shape.block_size * self.head_dim
    }

    /// Writes the K and V (`num_kv_heads * head_dim` each) of one token.
    #[inline]
    pub fn write(&mut self, layer: usize, block: usize, slot: usize, k: &[f32], v: &[f32]) {
        let (d, bs) = (self.head_dim, self.shape.block_size);
        for h in 0..self.num_kv_heads {
            let base = self.offset(block, h);
            let kt = &mut self.k[layer][base..base + bs * d];
            for (dim, &x) in k[h * d..(h + 1) * d].iter().enumerate() {
                kt[dim * bs + slot] = x;
            }
            let off = base + slot * d;
            self.v[layer][off..off + d].copy_from_slice(&v[h * d..(h + 1) * d]);
        }
    }

    /// The K and V tensors of one layer.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }
}

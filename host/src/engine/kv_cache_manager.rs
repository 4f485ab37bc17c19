//! The KV cache manager: which blocks each request holds, and prefix caching over the block pool.
//!
//! `req_to_blocks` maps a request to its block table (block ids in position order) and
//! `num_cached_block` to how many of those blocks are hashed into the prefix cache. A request's
//! full blocks are hashed (chained hashes, see [`BlockHash`]) and indexed once their K/V are
//! computed, so a later request with the same prefix takes the same blocks instead of recomputing
//! them; at least the last prompt token is always recomputed, so there are logits to sample from.
//! Prefix-cache queries and hits are counted in tokens, as vLLM does.

use super::block_pool::{BlockId, BlockPool};
use super::hashing::IdHashMap;
use super::request::{Request, RequestId};

/// Holds the block pool and every request's blocks.
#[derive(Debug, Clone)]
pub struct KvCacheManager {
    block_size: usize,
    enable_prefix_caching: bool,
    pool: BlockPool,
    req_to_blocks: IdHashMap<RequestId, Vec<BlockId>>,
    num_cached_block: IdHashMap<RequestId, usize>,
    prefix_cache_queries: u64,
    prefix_cache_hits: u64,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        Self {
            block_size,
            enable_prefix_caching,
            pool: BlockPool::new(num_blocks),
            req_to_blocks: IdHashMap::default(),
            num_cached_block: IdHashMap::default(),
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn prefix_caching_enabled(&self) -> bool {
        self.enable_prefix_caching
    }

    pub fn num_total_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    /// Blocks no request holds (cached-but-free blocks included).
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free_blocks()
    }

    /// `1 - free / total`, in [0, 1].
    pub fn usage_ratio(&self) -> f64 {
        self.pool.usage_ratio()
    }

    /// Tokens looked up in the prefix cache at admissions.
    pub fn prefix_cache_queries(&self) -> u64 {
        self.prefix_cache_queries
    }

    /// Tokens found in the prefix cache at admissions.
    pub fn prefix_cache_hits(&self) -> u64 {
        self.prefix_cache_hits
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// The request's block ids, in position order (empty for unknown ids).
    pub fn block_table(&self, request_id: RequestId) -> &[BlockId] {
        self.req_to_blocks
            .get(&request_id)
            .map_or(&[], Vec::as_slice)
    }

    /// `(blocks_allocated, blocks_cached)` of a request; zeros for unknown ids. Never fails.
    pub fn per_request_kv_metrics(&self, request_id: RequestId) -> (usize, usize) {
        let allocated = self.req_to_blocks.get(&request_id).map_or(0, Vec::len);
        let cached = self.num_cached_block.get(&request_id).copied().unwrap_or(0);
        (allocated, cached)
    }

    /// Requests that hold blocks.
    pub fn num_requests_with_blocks(&self) -> usize {
        self.req_to_blocks.len()
    }

    /// Finds the longest cached prefix of `request` (full blocks only, and never its last token),
    /// writes those block ids to `blocks` and returns the number of tokens they cover. Nothing is
    /// reserved: pass the blocks to [`allocate_slots`](Self::allocate_slots) right away.
    pub fn get_computed_blocks(&self, request: &mut Request, blocks: &mut Vec<BlockId>) -> usize {
        blocks.clear();
        if !self.enable_prefix_caching || !request.reads_prefix_cache() {
            return 0;
        }
        let max_hit_blocks = request.num_tokens().saturating_sub(1) / self.block_size;
        request.ensure_block_hashes(self.block_size, max_hit_blocks);
        for hash in &request.block_hashes[..max_hit_blocks] {
            match self.pool.cached_block(*hash) {
                Some(block) => blocks.push(block),
                None => break,
            }
        }
        blocks.len() * self.block_size
    }

    /// Makes the request's blocks cover `num_computed_tokens + new_computed_blocks + num_new_tokens`
    /// token slots: takes the prefix-cache blocks found by
    /// [`get_computed_blocks`](Self::get_computed_blocks) (at admission only) and allocates what
    /// else is missing. Returns false, changing nothing, if the pool lacks free blocks.
    pub fn allocate_slots(
        &mut self,
        request: &Request,
        num_new_tokens: usize,
        new_computed_blocks: &[BlockId],
    ) -> bool {
        let num_computed =
            request.num_computed_tokens + new_computed_blocks.len() * self.block_size;
        let num_required = (num_computed + num_new_tokens).div_ceil(self.block_size);
        let num_held = self.req_to_blocks.get(&request.id).map_or(0, Vec::len);
        let num_new_blocks = num_required.saturating_sub(num_held + new_computed_blocks.len());
        if num_new_blocks == 0 && new_computed_blocks.is_empty() {
            return true;
        }
        // Prefix hits on free cached blocks take those blocks out of the free queue too.
        let num_free_hits = new_computed_blocks
            .iter()
            .filter(|&&b| self.pool.ref_count(b) == 0)
            .count();
        if num_new_blocks + num_free_hits > self.pool.num_free_blocks() {
            return false;
        }
        let blocks = self.req_to_blocks.entry(request.id).or_default();
        if !new_computed_blocks.is_empty() {
            debug_assert!(
                blocks.is_empty(),
                "prefix-cache blocks are only taken at admission"
            );
            self.pool.touch(new_computed_blocks);
            blocks.extend_from_slice(new_computed_blocks);
            self.num_cached_block
                .insert(request.id, new_computed_blocks.len());
        }
        let allocated = self.pool.allocate(num_new_blocks, blocks);
        debug_assert!(allocated);
        allocated
    }

    /// Hashes and indexes the request's blocks that became full of computed tokens. Call after the
    /// step's forward pass wrote their K/V.
    pub fn cache_full_blocks(&mut self, request: &mut Request) {
        if !self.enable_prefix_caching {
            return;
        }
        let Some(blocks) = self.req_to_blocks.get(&request.id) else {
            return;
        };
        let num_full = (request.num_computed_tokens / self.block_size).min(blocks.len());
        let num_cached = self.num_cached_block.entry(request.id).or_insert(0);
        if num_full <= *num_cached {
            return;
        }
        request.ensure_block_hashes(self.block_size, num_full);
        let newly_full = blocks[*num_cached..num_full]
            .iter()
            .zip(&request.block_hashes[*num_cached..num_full]);
        for (&block, &hash) in newly_full {
            self.pool.cache_block(block, hash);
        }
        *num_cached = num_full;
    }

    /// Releases all of the request's blocks (a no-op for unknown ids). Its last blocks are freed
    /// first, so they are evicted before the prefix blocks other requests are likelier to share.
    pub fn free(&mut self, request_id: RequestId) {
        self.num_cached_block.remove(&request_id);
        if let Some(blocks) = self.req_to_blocks.remove(&request_id) {
            self.pool.free_blocks(blocks.iter().rev().copied());
        }
    }

    /// Counts one admission's lookup: `num_tokens` queried, `num_hit_tokens` found.
    pub fn record_prefix_cache_query(&mut self, num_tokens: usize, num_hit_tokens: usize) {
        if self.enable_prefix_caching {
            self.prefix_cache_queries += num_tokens as u64;
            self.prefix_cache_hits += num_hit_tokens as u64;
        }
    }

    /// Checks the pool's invariants, that every block's ref count equals the number of requests
    /// holding it, that no request holds a block twice, and that cached-block counts are in range.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        let mut holders = vec![0u32; self.pool.num_blocks()];
        for (request_id, blocks) in &self.req_to_blocks {
            let mut sorted = blocks.clone();
            sorted.sort_unstable();
            if sorted.windows(2).any(|w| w[0] == w[1]) {
                return Err(format!(
                    "request {request_id} holds a block twice: {blocks:?}"
                ));
            }
            for &block in blocks {
                let Some(count) = holders.get_mut(block as usize) else {
                    return Err(format!(
                        "request {request_id} holds block {block} outside the pool"
                    ));
                };
                *count += 1;
            }
            let cached = self.num_cached_block.get(request_id).copied().unwrap_or(0);
            if cached > blocks.len() {
                return Err(format!(
                    "request {request_id}: {cached} cached of {} blocks",
                    blocks.len()
                ));
            }
            for &block in &blocks[..cached] {
                if self.pool.block_hash(block).is_none() {
                    return Err(format!(
                        "request {request_id}: counted-cached block {block} has no hash"
                    ));
                }
            }
        }
        for (block, &count) in holders.iter().enumerate() {
            let ref_count = self.pool.ref_count(block as BlockId);
            if ref_count != count {
                return Err(format!(
                    "block {block}: ref count {ref_count} but {count} requests hold it"
                ));
            }
        }
        if let Some(id) = self
            .num_cached_block
            .keys()
            .find(|id| !self.req_to_blocks.contains_key(id))
        {
            return Err(format!(
                "num_cached_block has request {id}, which holds no blocks"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::RequestRng;
    use crate::engine::sampling_params::SamplingParams;

    fn request(id: RequestId, prompt: Vec<u32>) -> Request {
        Request::new(id, prompt, SamplingParams::greedy(8), RequestRng::new(0))
    }

    /// Admits a request the way the scheduler does, computes all its tokens, caches its blocks.
    fn admit_and_compute(kv: &mut KvCacheManager, req: &mut Request) -> usize {
        let mut hit_blocks = Vec::new();
        let hit = kv.get_computed_blocks(req, &mut hit_blocks);
        assert!(kv.allocate_slots(req, req.num_tokens() - hit, &hit_blocks));
        req.num_computed_tokens = req.num_tokens();
        kv.cache_full_blocks(req);
        kv.check_invariants().unwrap();
        hit
    }

    #[test]
    fn prefix_hit_shares_blocks_and_never_covers_the_last_token() {
        let mut kv = KvCacheManager::new(16, 4, true);
        let mut a = request(1, (0..10).collect());
        assert_eq!(admit_and_compute(&mut kv, &mut a), 0);
        assert_eq!(kv.per_request_kv_metrics(1), (3, 2));

        // Same first 2 full blocks, different tail.
        let mut b = request(2, (0..8).chain([99, 98]).collect());
        assert_eq!(admit_and_compute(&mut kv, &mut b), 8);
        assert_eq!(kv.block_table(2)[..2], kv.block_table(1)[..2]);
        assert_eq!(kv.pool().ref_count(kv.block_table(1)[0]), 2);

        // A prompt of exactly 2 full blocks: only 1 block may come from the cache.
        let mut c = request(3, (0..8).collect());
        assert_eq!(admit_and_compute(&mut kv, &mut c), 4);

        kv.free(1);
        kv.free(2);
        kv.free(3);
        kv.check_invariants().unwrap();
        assert_eq!(kv.num_free_blocks(), 16);
        assert_eq!(kv.per_request_kv_metrics(1), (0, 0));
        assert_eq!(kv.per_request_kv_metrics(12345), (0, 0));
    }

    #[test]
    fn a_requests_last_blocks_are_evicted_before_its_first_ones() {
        let mut kv = KvCacheManager::new(3, 2, true);
        let mut a = request(1, (0..6).collect());
        admit_and_compute(&mut kv, &mut a);
        let blocks = kv.block_table(1).to_vec();
        kv.free(1);
        // All three blocks are full and cached; the deepest one goes first.
        let order: Vec<BlockId> = kv.pool().free_queue().iter().collect();
        assert_eq!(order, vec![blocks[2], blocks[1], blocks[0]]);
    }

    #[test]
    fn allocation_fails_without_side_effects() {
        let mut kv = KvCacheManager::new(3, 4, true);
        let mut a = request(1, (0..8).collect());
        admit_and_compute(&mut kv, &mut a);
        let b = request(2, (100..110).collect());
        assert!(!kv.allocate_slots(&b, 10, &[]));
        assert_eq!(kv.per_request_kv_metrics(2), (0, 0));
        assert_eq!(kv.num_free_blocks(), 1);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn prefix_caching_disabled_never_hits() {
        let mut kv = KvCacheManager::new(16, 4, false);
        let mut a = request(1, (0..10).collect());
        admit_and_compute(&mut kv, &mut a);
        let mut b = request(2, (0..10).collect());
        assert_eq!(admit_and_compute(&mut kv, &mut b), 0);
        assert_eq!(kv.per_request_kv_metrics(2), (3, 0));
    }
}

//! A space map: the allocation bitmap of one area (metadata blocks or data chunks), kept in
//! bitmap blocks read through the block cache.  Bit `i` set means entry `i` of the area is in
//! use.  Allocation is next-fit from a hint that the caller persists, so a search is
//! amortized O(1) and wraps around the end of the area.
//!
//! An area may defer the reuse of what it frees: entries freed by the open transaction are
//! recorded in the cache's pending list and not handed out again before it commits (their
//! old content may still be needed if the transaction is lost).

use super::block::*;
use super::cache::{Cache, CacheMem};

/// Bits of allocation state per bitmap block.
pub const BITS_PER_BITMAP: u64 = ((BLOCK_SIZE - HEADER_SIZE) * 8) as u64;

/// Most frees one transaction may defer (the cache memory's pending list holds at least
/// this many entries).
pub const PENDING_MAX: usize = 1024;

/// The state of one area's space map.  The caller keeps `used` and `hint` (they are
/// persisted with its state) and `deferred` (for the open transaction), and stores them back
/// after every call that changes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceMap {
    /// First bitmap block.
    pub bitmap_start: u64,
    /// Entries in the area.
    pub size: u64,
    /// Entries in use (the number of set bits).
    pub used: u64,
    /// Where the next search starts (taken modulo `size`; any value is valid).
    pub hint: u64,
    /// Store id the bitmap blocks carry in their headers.
    pub store_id: u64,
    /// `Some(n)`: frees are deferred, `n` are pending (in the cache's pending list);
    /// `None`: a freed entry can be allocated again at once.
    pub deferred: Option<usize>,
}

/// Byte offset and mask of bit `i` within its bitmap block.
fn bit_pos(i: u64) -> (usize, u8) {
    let bit = i % BITS_PER_BITMAP;
    (HEADER_SIZE + (bit / 8) as usize, 1u8 << (bit % 8))
}

impl SpaceMap {
    fn pending(&self) -> usize {
        self.deferred.unwrap_or(0)
    }

    /// The cache slot of the bitmap block holding bit `i` (validated when read); `pin`:
    /// protect it from eviction for the operation in progress.
    fn bitmap_block<M: CacheMem>(
        &self,
        io: &mut impl BlockIo,
        cache: &mut Cache<M>,
        i: u64,
        pin: bool,
    ) -> Result<usize> {
        let blk = self.bitmap_start + i / BITS_PER_BITMAP;
        let (slot, fresh) = if pin {
            cache.get(io, blk, false)?
        } else {
            cache.get_unpinned(io, blk)?
        };
        if fresh {
            if let Err(e) =
                check_header(io, cache.data(slot), BlockType::Bitmap, blk, self.store_id)
            {
                cache.discard(slot);
                return Err(e);
            }
        }
        Ok(slot)
    }

    /// Whether entry `i` is allocated.
    pub fn is_allocated<M: CacheMem>(
        &self,
        io: &mut impl BlockIo,
        cache: &mut Cache<M>,
        i: u64,
    ) -> Result<bool> {
        let slot = self.bitmap_block(io, cache, i, true)?;
        let (byte, m) = bit_pos(i);
        Ok(cache.data(slot)[byte] & m != 0)
    }

    /// Allocates a free entry, next-fit from the hint; `None` if the area is full.  The
    /// bitmap blocks scanned on the way are not pinned in the cache (only the one that gets
    /// a bit set stays, dirty), so a search never depends on the cache size.
    pub fn alloc<M: CacheMem>(
        &mut self,
        io: &mut impl BlockIo,
        cache: &mut Cache<M>,
    ) -> Result<Option<u64>> {
        let total = self.size;
        let pending = self.pending();
        if total == 0 || self.used.saturating_add(pending as u64) >= total {
            return Ok(None);
        }
        let mut i = self.hint % total;
        let mut scanned = 0u64;
        while scanned <= total {
            let slot = self.bitmap_block(io, cache, i, false)?;
            let bit0 = i % BITS_PER_BITMAP;
            let end = bit0 + (BITS_PER_BITMAP - bit0).min(total - i);
            let mut bit = bit0;
            let mut found = None;
            while bit < end {
                if bit % 64 == 0 && bit + 64 <= end {
                    let o = HEADER_SIZE + (bit / 8) as usize;
                    if get64(cache.data(slot), o) == u64::MAX {
                        bit += 64;
                        continue;
                    }
                }
                let byte = cache.data(slot)[HEADER_SIZE + (bit / 8) as usize];
                if byte & (1 << (bit % 8)) == 0 {
                    let c = i - bit0 + bit;
                    if !(self.deferred.is_some() && cache.pending()[..pending].contains(&c)) {
                        found = Some(c);
                        break;
                    }
                }
                bit += 1;
            }
            if let Some(c) = found {
                let (byte, m) = bit_pos(c);
                cache.data_mut(slot)[byte] |= m;
                self.used += 1;
                self.hint = c + 1;
                return Ok(Some(c));
            }
            scanned += end - bit0;
            i = (i + (end - bit0)) % total;
        }
        Ok(None)
    }

    /// Frees entry `i` (deferred: recorded as pending until the transaction commits).
    pub fn free<M: CacheMem>(
        &mut self,
        io: &mut impl BlockIo,
        cache: &mut Cache<M>,
        i: u64,
    ) -> Result<()> {
        if i >= self.size {
            return Err(Error::Corrupt {
                block: 0,
                what: "freeing a block outside its area",
            });
        }
        if self.deferred.is_some() && self.pending() >= PENDING_MAX {
            // (Before anything changes: callers keep within PENDING_MAX.)
            return Err(Error::TxFull);
        }
        let slot = self.bitmap_block(io, cache, i, true)?;
        let (byte, m) = bit_pos(i);
        if cache.data(slot)[byte] & m == 0 {
            return Err(Error::Corrupt {
                block: cache.block_of(slot),
                what: "double free in allocation bitmap",
            });
        }
        cache.data_mut(slot)[byte] &= !m;
        self.used = self.used.saturating_sub(1);
        if let Some(n) = self.deferred {
            cache.pending()[n] = i;
            self.deferred = Some(n + 1);
        }
        Ok(())
    }
}

/// Writes the bitmap blocks of an empty area (`blocks` blocks from `start`), with the first
/// `set` entries marked in use.
pub fn format(
    io: &mut impl BlockIo,
    start: u64,
    blocks: u64,
    set: u64,
    store_id: u64,
    scratch: &mut Block,
) -> Result<()> {
    for i in 0..blocks {
        scratch.fill(0);
        init_header(scratch, BlockType::Bitmap, start + i, store_id);
        for e in i * BITS_PER_BITMAP..set.min((i + 1) * BITS_PER_BITMAP) {
            let (byte, m) = bit_pos(e);
            scratch[byte] |= m;
        }
        seal(io, scratch);
        io.write_block(start + i, scratch)?;
    }
    Ok(())
}

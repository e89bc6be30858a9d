//! The exception btree: the generic btree of `pdata` keyed by origin chunk, whose values are
//! exceptions `{COW chunk, share bitmap}` sorted by COW chunk within a chunk.  All exceptions
//! of one origin chunk live in one leaf, so a chunk is looked up with a single descent.
//! This module gives the typed view the store and the tools use.

use super::format::MAX_SNAPSHOTS;
use crate::pdata::block::{Block, LeReader, LeWriter, Result};
use crate::pdata::btree::{self, Value};
use crate::pdata::cache::Cached;

pub use crate::pdata::btree::{count, init_node, level, node_type, prune, NodeStore, Path, Root};
// For the tools (the checker, the forger and the bulk builder); the kernel target uses none.
#[cfg_attr(not(feature = "std"), expect(unused_imports, reason = "for the tools"))]
pub use crate::pdata::btree::{internal_entry, set_count, set_internal_entry, INTERNAL_CAP};

/// One exception: the copy of origin chunk `chunk` kept in COW chunk `cow`, shared by the
/// snapshot slots whose bits are set in `share`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Exception {
    /// Origin chunk.
    pub chunk: u64,
    /// COW data chunk holding the copy.
    pub cow: u64,
    /// Bitmap of the snapshot slots that read this copy.
    pub share: u64,
}

/// The value of a leaf entry (the key is the origin chunk): u64 COW chunk, u64 share bitmap.
/// (The default, share 0, is invalid: `validate` rejects it.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExceptionValue {
    /// COW data chunk holding the copy.
    pub cow: u64,
    /// Bitmap of the snapshot slots that read this copy.
    pub share: u64,
}

impl Value for ExceptionValue {
    const SIZE: usize = 16;
    /// Chunks in the COW data area.
    type Context = u64;

    #[inline]
    fn pack(&self, w: &mut LeWriter<'_>) {
        w.u64(self.cow);
        w.u64(self.share);
    }

    #[inline]
    fn unpack(r: &mut LeReader<'_>) -> Result<Self> {
        Ok(ExceptionValue {
            cow: r.u64()?,
            share: r.u64()?,
        })
    }

    fn sub_key(&self) -> u64 {
        self.cow
    }

    fn validate(&self, data_chunks: &u64) -> core::result::Result<(), &'static str> {
        if self.share == 0 {
            return Err("exception with empty share bitmap");
        }
        if self.cow >= *data_chunks {
            return Err("exception points outside the COW data area");
        }
        Ok(())
    }

    fn validate_same_key(
        prev: &Self,
        next: &Self,
        run: usize,
    ) -> core::result::Result<(), &'static str> {
        if prev.share & next.share != 0 {
            return Err("two exceptions of one chunk share a snapshot");
        }
        if run > MAX_SNAPSHOTS {
            return Err("more than 64 exceptions for one chunk");
        }
        Ok(())
    }

    fn validate_leaf(
        n: usize,
        entry: impl Fn(usize) -> (u64, Self),
    ) -> core::result::Result<(), &'static str> {
        // One COW chunk in two exceptions of this leaf (across leaves: `shsnap check`).  A
        // 2048-bit filter of the chunks seen so far: only an entry whose bit is already set
        // is compared with the earlier ones (a few per leaf, not all of them: every leaf
        // read from disk pays this).
        let mut seen = [0u64; 32];
        for i in 0..n {
            let c = entry(i).1.cow;
            let h = (c.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 53) as usize;
            if seen[h / 64] & (1 << (h % 64)) != 0 && (0..i).any(|j| entry(j).1.cow == c) {
                return Err("one COW chunk used by two exceptions");
            }
            seen[h / 64] |= 1 << (h % 64);
        }
        Ok(())
    }
}

/// Exceptions per leaf.
pub const LEAF_CAP: usize = btree::leaf_cap::<ExceptionValue>();

/// Exception `i` of a leaf.
pub fn leaf_entry(b: &Block, i: usize) -> Exception {
    let (chunk, v) = btree::leaf_entry::<ExceptionValue>(b, i);
    Exception {
        chunk,
        cow: v.cow,
        share: v.share,
    }
}

/// Writes exception `i` of a leaf (the count is set apart: `set_count`).
#[cfg_attr(not(feature = "std"), expect(dead_code, reason = "for the tools"))]
pub fn set_leaf_entry(b: &mut Block, i: usize, e: &Exception) {
    let v = ExceptionValue {
        cow: e.cow,
        share: e.share,
    };
    btree::set_leaf_entry(b, i, e.chunk, &v);
}

/// Sets the share bitmap of leaf entry `i`.
pub fn set_leaf_share(b: &mut Block, i: usize, share: u64) {
    let mut v = btree::leaf_value::<ExceptionValue>(b, i);
    v.share = share;
    btree::set_leaf_value(b, i, &v);
}

/// Structural validation of a node just read (see `pdata::btree::validate_node`); `child_ok`
/// says whether a child block number is plausible, `data_chunks` bounds COW chunks.
pub fn validate_node(
    b: &Block,
    blk: u64,
    want_level: u16,
    child_ok: impl Fn(u64) -> bool,
    data_chunks: u64,
) -> Result<()> {
    btree::validate_node::<ExceptionValue>(b, blk, want_level, child_ok, &data_chunks)
}

/// Range of leaf indices holding exceptions of `chunk`.
pub fn chunk_range(b: &Block, chunk: u64) -> (usize, usize) {
    btree::key_range::<ExceptionValue>(b, chunk)
}

/// Descends to the leaf covering `chunk`.
pub fn find_leaf(ns: &mut impl NodeStore, root: Root, chunk: u64) -> Result<Path> {
    btree::find_leaf::<ExceptionValue>(ns, root, chunk)
}

/// As `find_leaf`, without reading from disk: `Miss` if a node on the way is not loaded.
pub fn find_cached_leaf(ns: &mut impl NodeStore, root: Root, chunk: u64) -> Result<Cached<Path>> {
    btree::find_cached_leaf::<ExceptionValue>(ns, root, chunk)
}

/// Inserts an exception (the caller guarantees (chunk, cow) is not present).
pub fn insert(ns: &mut impl NodeStore, root: &mut Root, e: Exception) -> Result<()> {
    let v = ExceptionValue {
        cow: e.cow,
        share: e.share,
    };
    btree::insert(ns, root, e.chunk, v)
}

/// Removes exception `idx` of the leaf on `path`; prunes the leaf if it becomes empty.
pub fn remove_at(ns: &mut impl NodeStore, root: &mut Root, path: &Path, idx: usize) -> Result<()> {
    btree::remove_at::<ExceptionValue>(ns, root, path, idx)
}

/// Removes exception `i` of a leaf block (the caller prunes the leaf if it becomes empty).
pub fn leaf_remove(b: &mut Block, i: usize) {
    btree::leaf_remove::<ExceptionValue>(b, i)
}

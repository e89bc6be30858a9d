//! Offline reading of a COW device: consistency check, dump and delta.  Independent of
//! `Store` (it walks the blocks itself) so that it can judge what the store wrote.

use crate::exception_store::exceptions::{self as btree, Exception};
use crate::exception_store::format::*;
use crate::exception_store::journal;
use crate::exception_store::superblock::*;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::format;
use std::string::String;
use std::vec::Vec;

/// A device seen through a write overlay, so that journal replay never modifies the source.
pub struct Overlay<D: BlockIo> {
    /// The device underneath.
    pub inner: D,
    writes: HashMap<u64, Block>,
}

impl<D: BlockIo> Overlay<D> {
    /// Wraps a device.
    pub fn new(inner: D) -> Self {
        Overlay {
            inner,
            writes: HashMap::new(),
        }
    }
}

impl<D: BlockIo> BlockIo for Overlay<D> {
    fn read_block(&mut self, nr: u64, buf: &mut Block) -> PdataResult<()> {
        match self.writes.get(&nr) {
            Some(b) => {
                buf.copy_from_slice(b);
                Ok(())
            }
            None => self.inner.read_block(nr, buf),
        }
    }
    fn write_block(&mut self, nr: u64, buf: &Block) -> PdataResult<()> {
        self.writes.insert(nr, *buf);
        Ok(())
    }
    fn flush(&mut self) -> PdataResult<()> {
        Ok(())
    }
    fn size_blocks(&self) -> u64 {
        self.inner.size_blocks()
    }
    fn crc32c(&self, data: &[u8]) -> u32 {
        self.inner.crc32c(data)
    }
}

/// A snapshot as the superblock records it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapInfo {
    /// Slot (bit) number.
    pub slot: usize,
    /// User id.
    pub id: u32,
    /// "live", "invalid" or "deleting".
    pub state: &'static str,
    /// Creation sequence.
    pub create_seq: u64,
    /// Exceptions owned alone.
    pub owned: u64,
    /// Replication: creation sequence of the source snapshot it copies (0: not a replica).
    pub source_seq: u64,
}

/// The result of reading a store.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Problems found; empty means clean.
    pub errors: Vec<String>,
    /// Journal transactions that replay applied (in the overlay).
    pub replayed: u64,
    /// Btree depth.
    pub depth: u32,
    /// Btree nodes visited.
    pub nodes: u64,
    /// Exceptions.
    pub exceptions: u64,
    /// Chunk size in sectors.
    pub chunk_sectors: u32,
    /// The store's identity for replication (32 hex digits).
    pub uuid: String,
    /// Replication source store (32 hex digits), if replicas were received.
    pub source_uuid: Option<String>,
    /// Bytes of receive progress recorded.
    pub progress_bytes: usize,
    /// Data chunks used / total.
    pub data_used: u64,
    /// Data chunks in all.
    pub data_total: u64,
    /// Metadata blocks used.
    pub meta_used: u64,
    /// Metadata blocks in all.
    pub meta_total: u64,
    /// Whether the store was closed cleanly.
    pub clean: bool,
    /// Snapshots.
    pub snapshots: Vec<SnapInfo>,
}

/// Every exception of a store, by chunk.
pub type ExceptionMap = BTreeMap<u64, Vec<Exception>>;

fn err(r: &mut Report, s: String) {
    if r.errors.len() < 1000 {
        r.errors.push(s);
    }
}

/// Reads (replaying the journal into an overlay) and checks a store.  Returns the report and,
/// when the tree could be read, all exceptions.
pub fn check<D: BlockIo>(dev: D) -> (Report, Option<(Super, ExceptionMap)>) {
    check_with(dev, true)
}

/// A set of block or chunk numbers below a known bound: one bit each (the pages of a big,
/// sparsely used set are never touched).
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: u64) -> Self {
        BitSet(std::vec![0; n.div_ceil(64) as usize])
    }
    /// Sets bit `i`; false if it was set already.
    fn insert(&mut self, i: u64) -> bool {
        let (w, m) = ((i / 64) as usize, 1u64 << (i % 64));
        let was = self.0[w] & m != 0;
        self.0[w] |= m;
        !was
    }
    fn word(&self, w: u64) -> u64 {
        self.0.get(w as usize).copied().unwrap_or(0)
    }
}

/// As `check`; `keep_map`: also collect every exception (for `dump` and `delta`).  Without
/// it, memory is a bit per metadata block and per data chunk, whatever the number of
/// exceptions (`shsnap check` of a store of many millions of exceptions, in a small VM).
pub fn check_with<D: BlockIo>(dev: D, keep_map: bool) -> (Report, Option<(Super, ExceptionMap)>) {
    let mut r = Report::default();
    let mut io = Overlay::new(dev);
    let mut b = [0u8; BLOCK_SIZE];
    let mut b2 = [0u8; BLOCK_SIZE];
    let dev_blocks = io.size_blocks();
    if let Err(e) = io.read_block(0, &mut b) {
        err(&mut r, format!("superblock: {}", e));
        return (r, None);
    }
    let sb0 = match Super::decode(&io, &b, 0, dev_blocks) {
        Ok(s) => s,
        Err(e) => {
            err(&mut r, format!("superblock: {}", e));
            return (r, None);
        }
    };
    let (region, l0) = (sb0.layout.journal_region(), sb0.layout);
    match journal::replay(
        &mut io,
        region,
        |h| l0.is_journalable(h),
        sb0.store_id,
        &mut b,
        &mut b2,
    ) {
        Ok((_, rep)) => r.replayed = rep.applied,
        Err(e) => {
            err(&mut r, format!("journal: {}", e));
            return (r, None);
        }
    }
    if io.read_block(STATE_BLOCK, &mut b).is_err() {
        err(&mut r, "state block unreadable".into());
        return (r, None);
    }
    let sb = match Super::decode(&io, &b, STATE_BLOCK, dev_blocks) {
        Ok(s) if s.store_id != sb0.store_id || s.layout != sb0.layout => {
            err(
                &mut r,
                "state block disagrees with the superblock on identity or layout".into(),
            );
            return (r, None);
        }
        Ok(s) => s,
        Err(e) => {
            err(&mut r, format!("state block after journal replay: {}", e));
            return (r, None);
        }
    };
    let l = sb.layout;
    r.depth = sb.root.depth;
    r.chunk_sectors = l.chunk_sectors;
    let hex = |u: &[u8; 16]| u.iter().map(|b| format!("{:02x}", b)).collect::<String>();
    r.uuid = hex(&sb.replication_uuid());
    r.source_uuid = (sb.source_uuid != [0; 16]).then(|| hex(&sb.source_uuid));
    r.progress_bytes = sb.progress.get().map_or(0, |p| p.len());
    r.data_used = sb.data_used;
    r.data_total = l.data_chunks;
    r.meta_used = sb.meta_used;
    r.meta_total = l.meta_blocks;
    r.clean = sb.flags & SB_DIRTY == 0 && r.replayed == 0;
    for (i, s) in sb.snaps.iter().enumerate() {
        if s.flags != 0 {
            let state = if s.flags & SNAP_DELETING != 0 {
                "deleting"
            } else if s.flags & SNAP_INVALID != 0 {
                "invalid"
            } else {
                "live"
            };
            r.snapshots.push(SnapInfo {
                slot: i,
                id: s.id,
                state,
                create_seq: s.create_seq,
                owned: s.owned,
                source_seq: s.source_seq,
            });
        }
    }
    // Walk the tree: (block, level, low key, high key (exclusive, None = unbounded)).
    let mut map = ExceptionMap::new();
    let mut meta_refs = BitSet::new(l.meta_blocks);
    let mut data_refs = BitSet::new(l.data_chunks);
    let mut stack = std::vec![(sb.root.block, (sb.root.depth - 1) as u16, 0u64, None::<u64>)];
    let named = sb.live_mask() | sb.mask(SNAP_DELETING);
    let mut owned = [0u64; MAX_SNAPSHOTS];
    let mut tree_ok = true;
    while let Some((blk, level, lo, hi)) = stack.pop() {
        r.nodes += 1;
        if !l.is_meta(blk) {
            err(
                &mut r,
                format!("block {}: btree pointer outside the metadata area", blk),
            );
            tree_ok = false;
            continue;
        }
        if !meta_refs.insert(blk - l.meta_start) {
            err(
                &mut r,
                format!("block {}: btree node referenced twice", blk),
            );
            tree_ok = false;
            continue;
        }
        if io.read_block(blk, &mut b).is_err() {
            err(&mut r, format!("block {}: unreadable", blk));
            tree_ok = false;
            continue;
        }
        let v = check_header(&io, &b, btree::node_type(level), blk, sb.store_id)
            .and_then(|_| btree::validate_node(&b, blk, level, |c| l.is_meta(c), l.data_chunks));
        if let Err(e) = v {
            err(&mut r, format!("btree node: {}", e));
            tree_ok = false;
            continue;
        }
        let n = btree::count(&b);
        let in_range = |k: u64| k >= lo && hi.is_none_or(|h| k < h);
        if level == 0 {
            if n == 0 && blk != sb.root.block {
                err(&mut r, format!("block {}: empty leaf below the root", blk));
            }
            // Shares of the current chunk (a chunk's exceptions are all in one leaf: a leaf
            // holds only keys of its parent's range, checked above).
            let mut run = (u64::MAX, 0u64);
            for i in 0..n {
                let e = btree::leaf_entry(&b, i);
                r.exceptions += 1;
                if !in_range(e.chunk) {
                    err(
                        &mut r,
                        format!(
                            "block {}: chunk {} outside the key range of its parent",
                            blk, e.chunk
                        ),
                    );
                }
                if e.share & !named != 0 {
                    err(
                        &mut r,
                        format!(
                            "block {}: chunk {} names snapshot slots {:#x} that are not live",
                            blk,
                            e.chunk,
                            e.share & !named
                        ),
                    );
                }
                if !data_refs.insert(e.cow) {
                    err(
                        &mut r,
                        format!("block {}: COW chunk {} used by two exceptions", blk, e.cow),
                    );
                }
                if e.share.count_ones() == 1 {
                    owned[e.share.trailing_zeros() as usize] += 1;
                }
                if run.0 != e.chunk {
                    run = (e.chunk, 0);
                }
                let overlap = run.1 & e.share != 0;
                run.1 |= e.share;
                if keep_map {
                    let v = map.entry(e.chunk).or_default();
                    if v.iter().any(|x| x.share & e.share != 0) {
                        err(
                            &mut r,
                            format!(
                                "block {}: chunk {} has overlapping share bitmaps",
                                blk, e.chunk
                            ),
                        );
                    }
                    v.push(e);
                } else if overlap {
                    err(
                        &mut r,
                        format!(
                            "block {}: chunk {} has overlapping share bitmaps",
                            blk, e.chunk
                        ),
                    );
                }
            }
        } else {
            if level as u32 + 1 > sb.root.depth {
                err(&mut r, format!("block {}: level above the root", blk));
            }
            if blk == sb.root.block && n < 2 && sb.root.depth > 1 {
                err(
                    &mut r,
                    format!("block {}: internal root with a single child", blk),
                );
            }
            for i in 0..n {
                let (k, c) = btree::internal_entry(&b, i);
                if i > 0 && !in_range(k) {
                    err(
                        &mut r,
                        format!("block {}: key {} outside the parent's range", blk, k),
                    );
                }
                let clo = if i == 0 { lo } else { k };
                let chi = if i + 1 < n {
                    Some(btree::internal_entry(&b, i + 1).0)
                } else {
                    hi
                };
                stack.push((c, level - 1, clo, chi));
            }
        }
    }
    // Space accounting against the bitmaps.
    if tree_ok {
        // Bit i of the area is bit i % BITS_PER_BITMAP of bitmap block i / BITS_PER_BITMAP;
        // BITS_PER_BITMAP is a multiple of 64, so the comparison goes a word at a time.
        const WORDS: u64 = BITS_PER_BITMAP / 64;
        for (name, start, nbits, refs) in [
            ("metadata", l.meta_bitmap_start, l.meta_blocks, &meta_refs),
            ("data", l.data_bitmap_start, l.data_chunks, &data_refs),
        ] {
            let used = if name == "data" {
                sb.data_used
            } else {
                sb.meta_used
            };
            let mut set = 0u64;
            let mut bad = 0u64;
            'blocks: for j in 0..nbits.div_ceil(BITS_PER_BITMAP) {
                let blk = start + j;
                if io.read_block(blk, &mut b).is_err() {
                    err(&mut r, format!("block {}: unreadable bitmap", blk));
                    break;
                }
                if let Err(e) = check_header(&io, &b, BlockType::Bitmap, blk, sb.store_id) {
                    err(&mut r, format!("{} bitmap: {}", name, e));
                    break;
                }
                for w in 0..WORDS {
                    let first = j * BITS_PER_BITMAP + w * 64;
                    if first >= nbits {
                        break 'blocks;
                    }
                    let mask = if nbits - first >= 64 {
                        u64::MAX
                    } else {
                        (1u64 << (nbits - first)) - 1
                    };
                    let on = get64(&b, HEADER_SIZE + 8 * w as usize) & mask;
                    set += on.count_ones() as u64;
                    let mut diff = on ^ refs.word(first / 64);
                    while diff != 0 {
                        let k = diff.trailing_zeros() as u64;
                        diff &= diff - 1;
                        bad += 1;
                        if bad <= 5 {
                            let is_set = on & (1 << k) != 0;
                            err(
                                &mut r,
                                format!(
                                    "{} bitmap: bit {} is {} but the tree {} it",
                                    name,
                                    first + k,
                                    if is_set { "set" } else { "clear" },
                                    if is_set {
                                        "does not reference"
                                    } else {
                                        "references"
                                    }
                                ),
                            );
                        }
                    }
                }
            }
            if bad > 5 {
                err(
                    &mut r,
                    format!("{} bitmap: {} mismatches in all", name, bad),
                );
            }
            if set != used {
                err(
                    &mut r,
                    format!(
                        "{} space: superblock counts {} used, bitmap has {}",
                        name, used, set
                    ),
                );
            }
        }
        for (i, s) in sb.snaps.iter().enumerate() {
            if s.flags & SNAP_LIVE != 0 && s.owned != owned[i] {
                err(
                    &mut r,
                    format!(
                        "snapshot {} (slot {}): owned count {} but the tree has {}",
                        s.id, i, s.owned, owned[i]
                    ),
                );
            }
        }
    }
    (r, if tree_ok { Some((sb, map)) } else { None })
}

/// Where `who` (None: the origin; Some(slot)) reads `chunk` from: None = the origin chunk.
pub fn source(map: &ExceptionMap, chunk: u64, who: Option<usize>) -> Option<u64> {
    let slot = who?;
    map.get(&chunk)?
        .iter()
        .find(|e| e.share & (1 << slot) != 0)
        .map(|e| e.cow)
}

/// Chunk ranges [start, end) whose content may differ between `a` and `b`.
pub fn delta(map: &ExceptionMap, a: Option<usize>, b: Option<usize>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &chunk in map.keys() {
        if source(map, chunk, a) != source(map, chunk, b) {
            match out.last_mut() {
                Some(last) if last.1 == chunk => last.1 = chunk.saturating_add(1),
                _ => out.push((chunk, chunk.saturating_add(1))),
            }
        }
    }
    out
}

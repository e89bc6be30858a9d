//! Structure-aware forgery of a store's metadata, with valid checksums (crc32c is not a
//! signature: anyone can recompute it).  For tests of the core and of the kernel module: one
//! call edits one field of one structure (journal header, state block, btree node) to a value
//! a correct store never writes, and reseals the block.
//!
//! The forgery works on the blocks at their home location; a transaction still in the
//! journal may overwrite it at replay (close the store cleanly first to forge the live state).

use crate::exception_store::exceptions as btree;
use crate::exception_store::format::*;
use crate::exception_store::superblock::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::format;
use std::string::String;
use std::vec::Vec;

/// The kinds of forgery: name and what it does.
pub const KINDS: &[(&str, &str)] = &[
    (
        "journal-seq",
        "newest journal header: sequence near u64::MAX",
    ),
    ("journal-off", "newest journal header: offset near u64::MAX"),
    (
        "journal-desc-count",
        "a descriptor at the replay start with an out-of-range count",
    ),
    ("owned", "a snapshot slot's owned counter near u64::MAX"),
    ("create-seq", "next creation sequence near u64::MAX"),
    (
        "replica",
        "a snapshot marked a replica (source sequence near u64::MAX), no replication source",
    ),
    (
        "cursor",
        "deletion cursor near u64::MAX, one snapshot marked deleting",
    ),
    ("depth", "btree depth changed"),
    ("used", "space counters at the area sizes"),
    ("key-order", "two entries of a btree node swapped"),
    (
        "overlap",
        "two exceptions of one chunk with overlapping share bitmaps",
    ),
    ("level", "a btree node's level (and type) changed"),
    (
        "child-outside",
        "an internal child pointer outside the metadata area",
    ),
    (
        "child-level",
        "an internal child pointer to a node of the wrong level",
    ),
    (
        "child-sibling",
        "an internal child pointer to a sibling (keys outside its range)",
    ),
    ("key-range", "a key moved outside its parent's key range"),
    ("cow-twice", "one COW chunk used by two exceptions"),
    ("cow-range", "a COW chunk outside the data area"),
    ("count", "a btree node's entry count too large"),
];

/// A btree node found by walking the tree from the state block's root.
#[derive(Clone, Copy, Debug)]
struct Node {
    block: u64,
    level: u16,
    count: usize,
    lo: u64,
    hi: Option<u64>,
}

struct Ctx<'a, D: BlockIo> {
    io: &'a mut D,
    store_id: u64,
    sb: Super,
    nodes: Vec<Node>,
}

fn read<D: BlockIo>(io: &mut D, nr: u64) -> Result<Block> {
    let mut b = [0u8; BLOCK_SIZE];
    io.read_block(nr, &mut b)?;
    Ok(b)
}

fn write<D: BlockIo>(io: &mut D, nr: u64, b: &mut Block) -> Result<()> {
    seal(io, b);
    io.write_block(nr, b)?;
    Ok(io.flush()?)
}

fn walk<D: BlockIo>(io: &mut D, sb: &Super) -> Vec<Node> {
    let l = sb.layout;
    let mut out = Vec::new();
    let mut stack = std::vec![(
        sb.root.block,
        sb.root.depth.saturating_sub(1) as u16,
        0u64,
        None
    )];
    while let Some((blk, level, lo, hi)) = stack.pop() {
        if !l.is_meta(blk) || out.len() > 100_000 || out.iter().any(|n: &Node| n.block == blk) {
            continue;
        }
        let Ok(b) = read(io, blk) else { continue };
        if check_header(io, &b, btree::node_type(level), blk, sb.store_id).is_err()
            || btree::level(&b) != level
        {
            continue;
        }
        let n = btree::count(&b);
        out.push(Node {
            block: blk,
            level,
            count: n,
            lo,
            hi,
        });
        if level > 0 && n <= btree::INTERNAL_CAP {
            for i in 0..n {
                let (k, c) = btree::internal_entry(&b, i);
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
    out
}

const LEAF_ENTRY: usize = 24;
const INTERNAL_ENTRY: usize = 16;

fn entry_size(level: u16) -> usize {
    if level == 0 {
        LEAF_ENTRY
    } else {
        INTERNAL_ENTRY
    }
}

impl<D: BlockIo> Ctx<'_, D> {
    fn state(&mut self, rng: &mut SmallRng, what: &str) -> Result<String> {
        let mut b = read(self.io, STATE_BLOCK)?;
        let live: Vec<usize> = (0..MAX_SNAPSHOTS)
            .filter(|&i| self.sb.snaps[i].flags & SNAP_LIVE != 0)
            .collect();
        let slot = if live.is_empty() {
            0
        } else {
            live[rng.gen_range(0..live.len())]
        };
        // Forged through the typed encoding: only the field named changes.
        let mut s = self.sb;
        let near_max = u64::MAX - rng.gen_range(0..4u64);
        let msg = match what {
            "owned" => {
                s.snaps[slot].owned = near_max;
                format!("slot {} owned counter = {}", slot, near_max)
            }
            "replica" => {
                s.snaps[slot].source_seq = near_max;
                s.source_uuid = [0; 16];
                format!("slot {} replica of seq {} without a source", slot, near_max)
            }
            "create-seq" => {
                s.next_seq = near_max;
                format!("next creation sequence = {}", near_max)
            }
            "cursor" => {
                s.delete_cursor = near_max;
                if !live.is_empty() {
                    s.snaps[slot].flags = SNAP_DELETING;
                }
                format!(
                    "deletion cursor = {}, slot {} deleting: {}",
                    near_max,
                    slot,
                    !live.is_empty()
                )
            }
            "depth" => {
                let d = self.sb.root.depth;
                let v = [d + 1, d.saturating_sub(1).max(1), MAX_DEPTH as u32, d + 2]
                    [rng.gen_range(0..4)];
                s.root.depth = v;
                format!("btree depth {} -> {}", d, v)
            }
            _ => {
                s.meta_used = s.layout.meta_blocks;
                s.data_used = s.layout.data_chunks;
                "space counters = area sizes".into()
            }
        };
        s.encode(&mut b, STATE_BLOCK);
        write(self.io, STATE_BLOCK, &mut b)?;
        Ok(format!("state block 3: {}", msg))
    }

    fn journal(&mut self, rng: &mut SmallRng, what: &str) -> Result<String> {
        let mut best: Option<(JournalHeader, u64)> = None;
        for nr in [1u64, 2] {
            let b = read(self.io, nr)?;
            if let Ok(h) = JournalHeader::decode(self.io, &b, nr, self.store_id) {
                if best.is_none_or(|(x, _)| (h.seq, h.off) > (x.seq, x.off)) {
                    best = Some((h, nr));
                }
            }
        }
        let Some((mut h, nr)) = best else {
            return Err(Error::Invalid("no valid journal header"));
        };
        let l = self.sb.layout;
        match what {
            "journal-seq" => {
                h.seq = u64::MAX - rng.gen_range(0..4u64);
            }
            "journal-off" => {
                h.off = u64::MAX - rng.gen_range(0..1000u64);
            }
            _ => {
                let loc = l.journal_start + h.off % l.journal_blocks;
                let n = [0u32, MAX_TX_BLOCKS as u32 + 1, u32::MAX][rng.gen_range(0..3)];
                let mut d = [0u8; BLOCK_SIZE];
                init_header(&mut d, BlockType::JournalDesc, loc, self.store_id);
                put64(&mut d, 32, h.seq);
                put32(&mut d, 40, n);
                write(self.io, loc, &mut d)?;
                return Ok(format!(
                    "journal descriptor at block {} (seq {}): count {}",
                    loc, h.seq, n
                ));
            }
        }
        let mut b = [0u8; BLOCK_SIZE];
        h.encode(self.io, self.store_id, nr, &mut b);
        self.io.write_block(nr, &b)?;
        self.io.flush()?;
        Ok(format!(
            "journal header {}: offset {}, sequence {}",
            nr, h.off, h.seq
        ))
    }

    fn pick(&self, rng: &mut SmallRng, f: impl Fn(&Node) -> bool) -> Option<Node> {
        let v: Vec<&Node> = self.nodes.iter().filter(|n| f(n)).collect();
        if v.is_empty() {
            None
        } else {
            Some(*v[rng.gen_range(0..v.len())])
        }
    }

    fn node(&mut self, rng: &mut SmallRng, what: &str) -> Result<Option<String>> {
        let l = self.sb.layout;
        let target = match what {
            "key-order" => self.pick(rng, |n| n.count >= 2),
            "overlap" | "cow-twice" => self.pick(rng, |n| n.level == 0 && n.count >= 2),
            "child-outside" | "child-level" => self.pick(rng, |n| n.level > 0),
            "child-sibling" => self.pick(rng, |n| n.level > 0 && n.count >= 2),
            "key-range" => self.pick(rng, |n| n.count >= 1 && (n.lo > 0 || n.hi.is_some())),
            "cow-range" => self.pick(rng, |n| n.level == 0 && n.count >= 1),
            _ => self.pick(rng, |_| true),
        };
        let Some(t) = target else { return Ok(None) };
        let mut b = read(self.io, t.block)?;
        let es = entry_size(t.level);
        let off = |i: usize| HEADER_SIZE + i * es;
        let n = t.count;
        let msg = match what {
            "key-order" => {
                let i = rng.gen_range(0..n - 1);
                let (x, y) = (off(i), off(i + 1));
                let mut tmp = [0u8; 24];
                tmp[..es].copy_from_slice(&b[x..x + es]);
                b.copy_within(y..y + es, x);
                b[y..y + es].copy_from_slice(&tmp[..es]);
                format!("entries {} and {} swapped", i, i + 1)
            }
            "overlap" => {
                let i = rng.gen_range(1..n);
                let p = btree::leaf_entry(&b, i - 1);
                let e = btree::leaf_entry(&b, i);
                let (c0, c1) = (p.cow.min(e.cow), p.cow.max(e.cow));
                put64(&mut b, off(i - 1) + 8, c0);
                put64(&mut b, off(i), p.chunk);
                put64(&mut b, off(i) + 8, c1);
                put64(&mut b, off(i) + 16, e.share | p.share);
                format!(
                    "entry {}: chunk {} like entry {}, share {:#x} overlapping {:#x}",
                    i,
                    p.chunk,
                    i - 1,
                    e.share | p.share,
                    p.share
                )
            }
            "cow-twice" => {
                let i = rng.gen_range(0..n);
                let mut j = rng.gen_range(0..n - 1);
                if j >= i {
                    j += 1;
                }
                let c = btree::leaf_entry(&b, i).cow;
                put64(&mut b, off(j) + 8, c);
                format!("entry {} takes COW chunk {} of entry {}", j, c, i)
            }
            "cow-range" => {
                let i = rng.gen_range(0..n);
                let c = [l.data_chunks, l.data_chunks + 1, u64::MAX][rng.gen_range(0..3)];
                put64(&mut b, off(i) + 8, c);
                format!("entry {}: COW chunk {}", i, c)
            }
            "level" => {
                let v = [t.level ^ 1, t.level + 1, u16::MAX][rng.gen_range(0..3)];
                put16(&mut b, 26, v);
                put32(&mut b, 4, btree::node_type(v).tag());
                format!("level {} -> {} (type to match)", t.level, v)
            }
            "count" => {
                let cap = if t.level == 0 {
                    btree::LEAF_CAP
                } else {
                    btree::INTERNAL_CAP
                };
                let v = [cap + 1, u16::MAX as usize, n + 1][rng.gen_range(0..3)];
                put16(&mut b, 24, v as u16);
                format!("count {} -> {}", n, v)
            }
            "child-outside" => {
                let i = rng.gen_range(0..n);
                let c = [
                    0,
                    STATE_BLOCK,
                    l.meta_start - 1,
                    l.meta_start + l.meta_blocks,
                    l.data_start,
                    u64::MAX,
                ][rng.gen_range(0..6)];
                put64(&mut b, off(i) + 8, c);
                format!("child {} -> block {}", i, c)
            }
            "child-level" => {
                let i = rng.gen_range(0..n);
                let want = t.level - 1;
                let other = self
                    .pick(rng, |x| x.level != want)
                    .map_or(t.block, |x| x.block);
                put64(&mut b, off(i) + 8, other);
                format!("child {} (level {}) -> block {}", i, want, other)
            }
            "child-sibling" => {
                let i = rng.gen_range(0..n);
                let mut j = rng.gen_range(0..n - 1);
                if j >= i {
                    j += 1;
                }
                let c = btree::internal_entry(&b, j).1;
                put64(&mut b, off(i) + 8, c);
                format!("child {} -> block {} (child {})", i, c, j)
            }
            _ => {
                // key-range: the last key up to the upper bound, or the first below the lower.
                let key_off = |i: usize| off(i);
                match t.hi {
                    Some(h) if t.lo == 0 || rng.gen_bool(0.5) => {
                        let k = h.saturating_add(rng.gen_range(0..3));
                        put64(&mut b, key_off(n - 1), k);
                        format!("last key -> {} (range ends at {})", k, h)
                    }
                    _ => {
                        let i = if t.level == 0 { 0 } else { n.min(2) - 1 };
                        let k = t.lo - 1;
                        put64(&mut b, key_off(i), k);
                        format!("key {} -> {} (range starts at {})", i, k, t.lo)
                    }
                }
            }
        };
        write(self.io, t.block, &mut b)?;
        Ok(Some(format!(
            "btree node {} (level {}, {} entries): {}",
            t.block, t.level, n, msg
        )))
    }
}

/// Applies one forgery of `kind` (a name from `KINDS`; None: chosen by `seed`) to the store
/// on `io`, with checksums recomputed.  Returns one line saying what was forged.
pub fn forge<D: BlockIo>(io: &mut D, seed: u64, kind: Option<&str>) -> Result<String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let b0 = read(io, 0)?;
    let (store_id, _) = Super::decode_identity(io, &b0, io.size_blocks())?;
    let b3 = read(io, STATE_BLOCK)?;
    let sb = Super::decode(io, &b3, STATE_BLOCK, io.size_blocks())?;
    let nodes = walk(io, &sb);
    let mut ctx = Ctx {
        io,
        store_id,
        sb,
        nodes,
    };
    let first = match kind {
        Some(k) => KINDS
            .iter()
            .position(|(n, _)| *n == k)
            .ok_or(Error::Invalid("unknown forgery kind"))?,
        None => rng.gen_range(0..KINDS.len()),
    };
    // A kind the tree cannot take (no internal node, say) falls through to the next one.
    for i in 0..KINDS.len() {
        let k = KINDS[(first + i) % KINDS.len()].0;
        let r = match k {
            "journal-seq" | "journal-off" | "journal-desc-count" => Some(ctx.journal(&mut rng, k)?),
            "owned" | "create-seq" | "replica" | "cursor" | "depth" | "used" => {
                Some(ctx.state(&mut rng, k)?)
            }
            _ => ctx.node(&mut rng, k)?,
        };
        if let Some(msg) = r {
            return Ok(format!("forged {}: {}", k, msg));
        }
    }
    Err(Error::Invalid("nothing to forge"))
}

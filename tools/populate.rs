//! `shsnap-bench populate`: writes a big, valid store straight onto a COW device, bottom-up
//! and streamed (full leaves in key order, the internal levels as their children complete,
//! then the bitmaps, the journal headers, the state block and the superblock), with the
//! core's own encoders.  Memory does not depend on the store size (one open node per tree
//! level and a 1 MiB write buffer); only metadata blocks are written, so a sparse device of
//! several TiB stays sparse.  The result is a clean store (`shsnap check` says so) as the
//! kernel would have left it after a clean close.
//!
//! The exceptions are generated, not recorded: group g (one origin chunk) sits at origin
//! chunk floor(g * stride); most groups hold one exception shared by every snapshot, every
//! `split-every`-th group two (one owned by a single snapshot, as after a snapshot write,
//! one shared by the others), every `partial-every`-th group one shared by the oldest
//! snapshots only (the younger ones still read the origin).  Their COW chunks fill the data
//! area from chunk 0: the first `full-blocks` data-bitmap blocks entirely, then with a free
//! chunk every `hole-every` chunks; `scatter` hands those chunks out in a scattered order
//! (an affine permutation) instead of in key order.

use shsnap_core::exception_store::exceptions::{
    self as btree, Exception, Root, INTERNAL_CAP, LEAF_CAP,
};
use shsnap_core::exception_store::format::{
    init_header, seal, Block, BlockIo, BlockType, Error, PdataError, PdataResult, Result,
    BLOCK_SIZE, HEADER_SIZE, MAX_DEPTH, MAX_SNAPSHOTS,
};
use shsnap_core::exception_store::superblock::{
    JournalHeader, Layout, Progress, SnapSlot, Super, BITS_PER_BITMAP, SNAP_LIVE, STATE_BLOCK,
};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

const USAGE: &str = "usage: shsnap-bench populate <cow-dev> [<exceptions> [<snapshots>]] [options]
  --chunk-sectors N   chunk size in 512-byte sectors (8 = 4 KiB; default 8)
  --exceptions N      exceptions to write (or --occupancy)
  --occupancy P       exceptions = P% of the data area's chunks (P may be fractional)
  --snapshots S       live snapshots, ids and slots 0..S-1 (1..64; default 64)
  --stride F          origin chunk of group g = floor(g * F) (F >= 1; default 1)
  --split-every M     every M-th group: two exceptions, {slot s} and the others (default 0: none)
  --partial-every P   every P-th group: shared by the oldest snapshots only (default 0: none)
  --full-blocks B     the first B data-bitmap blocks (32512 chunks each) allocated solid
  --hole-every K      after them, one free chunk every K chunks (default 0: none)
  --scatter           COW chunks handed out in a scattered order, not in key order
  --leaf-fill N       exceptions per leaf at most (default 169: full leaves)
  --hint C            data allocation hint in the state block (default 0: the first search
                      after activation starts at chunk 0 and crosses every full bitmap block)";

/// What to build.
#[derive(Debug, Clone)]
struct Params {
    path: String,
    chunk_sectors: u32,
    exceptions: Option<u64>,
    occupancy: Option<f64>,
    snaps: u32,
    stride: f64,
    split_every: u64,
    partial_every: u64,
    full_blocks: u64,
    hole_every: u64,
    scatter: bool,
    leaf_fill: usize,
    hint: u64,
}

fn parse(args: &[String]) -> std::result::Result<Params, String> {
    let mut p = Params {
        path: String::new(),
        chunk_sectors: 8,
        exceptions: None,
        occupancy: None,
        snaps: 64,
        stride: 1.0,
        split_every: 0,
        partial_every: 0,
        full_blocks: 0,
        hole_every: 0,
        scatter: false,
        leaf_fill: LEAF_CAP,
        hint: 0,
    };
    let mut pos = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if !a.starts_with("--") {
            pos.push(a.clone());
            continue;
        }
        if a == "--scatter" {
            p.scatter = true;
            continue;
        }
        let v = it.next().ok_or(format!("{} needs a value\n{}", a, USAGE))?;
        let bad = || format!("bad value for {}: {}", a, v);
        let int = || v.parse::<u64>().map_err(|_| bad());
        match a.as_str() {
            "--chunk-sectors" => p.chunk_sectors = v.parse().map_err(|_| bad())?,
            "--exceptions" => p.exceptions = Some(int()?),
            "--occupancy" => {
                let f: f64 = v.parse().map_err(|_| bad())?;
                if !(f > 0.0 && f <= 100.0) {
                    return Err(bad());
                }
                p.occupancy = Some(f)
            }
            "--snapshots" => p.snaps = v.parse().map_err(|_| bad())?,
            "--stride" => {
                p.stride = v.parse().map_err(|_| bad())?;
                if !(p.stride >= 1.0 && p.stride < 1e6) {
                    return Err(bad());
                }
            }
            "--split-every" => p.split_every = int()?,
            "--partial-every" => p.partial_every = int()?,
            "--full-blocks" => p.full_blocks = int()?,
            "--hole-every" => {
                p.hole_every = int()?;
                if p.hole_every == 1 {
                    return Err(format!("{}: a hole every chunk leaves no room", a));
                }
            }
            "--leaf-fill" => {
                p.leaf_fill = v.parse().map_err(|_| bad())?;
                if !(2..=LEAF_CAP).contains(&p.leaf_fill) {
                    return Err(bad());
                }
            }
            "--hint" => p.hint = int()?,
            _ => return Err(format!("unknown option {}\n{}", a, USAGE)),
        }
    }
    match pos.as_slice() {
        [path] => p.path = path.clone(),
        [path, e] => {
            p.path = path.clone();
            p.exceptions = Some(e.parse().map_err(|_| "bad exception count")?);
        }
        [path, e, s] => {
            p.path = path.clone();
            p.exceptions = Some(e.parse().map_err(|_| "bad exception count")?);
            p.snaps = s.parse().map_err(|_| "bad snapshot count")?;
        }
        _ => return Err(USAGE.into()),
    }
    if p.exceptions.is_some() == p.occupancy.is_some() {
        return Err(format!(
            "give the number of exceptions or --occupancy (one of them)\n{}",
            USAGE
        ));
    }
    if !(1..=MAX_SNAPSHOTS as u32).contains(&p.snaps) {
        return Err("snapshots: 1 to 64".into());
    }
    Ok(p)
}

/// Which data chunks hold exceptions: chunk-index order (`pos`) and the allocation bitmap.
struct Alloc {
    full: u64,
    hole_every: u64,
    count: u64,
    /// Scatter permutation x -> (a x + b) mod count (a coprime to count), or identity.
    mul: u64,
    add: u64,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Alloc {
    fn new(p: &Params, count: u64) -> Alloc {
        let full = (p.full_blocks.saturating_mul(BITS_PER_BITMAP)).min(count);
        let (mut mul, add) = (1, 0);
        if p.scatter && count > 2 {
            // Near count / golden ratio: neighbours in key order land far apart.
            mul = ((count as f64 * 0.618_033_988_7) as u64).max(2);
            while gcd(mul, count) != 1 {
                mul += 1;
            }
            return Alloc {
                full,
                hole_every: p.hole_every,
                count,
                mul,
                add: count / 3,
            };
        }
        Alloc {
            full,
            hole_every: p.hole_every,
            count,
            mul,
            add,
        }
    }

    /// Data chunk of the idx-th allocated chunk (in chunk order).
    fn pos(&self, idx: u64) -> u64 {
        if idx < self.full || self.hole_every < 2 {
            return idx;
        }
        let r = idx - self.full;
        let k = self.hole_every;
        self.full + r / (k - 1) * k + r % (k - 1)
    }

    /// COW chunk of the x-th exception in key order.
    fn cow_of(&self, x: u64) -> u64 {
        let idx = ((x as u128 * self.mul as u128 + self.add as u128) % self.count as u128) as u64;
        self.pos(idx)
    }

    /// Whether data chunk `c` is allocated.
    fn allocated(&self, c: u64) -> bool {
        if self.count == 0 || c > self.pos(self.count - 1) {
            return false;
        }
        !(c >= self.full
            && self.hole_every >= 2
            && (c - self.full) % self.hole_every == self.hole_every - 1)
    }
}

/// The exceptions in key order, one origin chunk (group) at a time.
struct Gen<'a> {
    p: &'a Params,
    all: u64,
    total: u64,
    /// Exceptions handed out so far.
    done: u64,
    g: u64,
    last_chunk: u64,
}

impl<'a> Gen<'a> {
    fn new(p: &'a Params, total: u64) -> Self {
        let all = if p.snaps == 64 {
            u64::MAX
        } else {
            (1u64 << p.snaps) - 1
        };
        Gen {
            p,
            all,
            total,
            done: 0,
            g: 0,
            last_chunk: 0,
        }
    }

    /// The next group's shares ((chunk, [share; 2], how many)), or None at the end.
    fn next_group(&mut self) -> Option<(u64, [u64; 2], usize)> {
        if self.done >= self.total {
            return None;
        }
        let g = self.g;
        self.g += 1;
        let mut chunk = (g as f64 * self.p.stride) as u64;
        if g > 0 && chunk <= self.last_chunk {
            chunk = self.last_chunk + 1;
        }
        self.last_chunk = chunk;
        let s = self.p.snaps as u64;
        let (m, pe) = (self.p.split_every, self.p.partial_every);
        let r = if s >= 2 && m > 0 && g % m == m - 1 && self.total - self.done >= 2 {
            let slot = (g / m) % s;
            ([self.all & !(1u64 << slot), 1u64 << slot], 2)
        } else if s >= 2 && pe > 0 && g % pe == pe - 1 {
            let j = 1 + (g / pe) % (s - 1); // slots 0..j share it, j..s read the origin
            ([(1u64 << j) - 1, 0], 1)
        } else {
            ([self.all, 0], 1)
        };
        self.done += r.1 as u64;
        Some((chunk, r.0, r.1))
    }
}

/// Writes blocks in runs of consecutive numbers (one pwrite per run, at most 1 MiB).
struct Writer {
    file: File,
    blocks: u64,
    buf: Vec<u8>,
    start: u64,
    written: u64,
}

const RUN: usize = 256;

impl Writer {
    fn put(&mut self, nr: u64, b: &Block) -> PdataResult<()> {
        if nr >= self.blocks {
            return Err(PdataError::Io { block: nr });
        }
        let n = (self.buf.len() / BLOCK_SIZE) as u64;
        if n > 0 && (nr != self.start + n || n as usize == RUN) {
            self.drain()?;
        }
        if self.buf.is_empty() {
            self.start = nr;
        }
        self.buf.extend_from_slice(b);
        self.written += 1;
        Ok(())
    }

    fn drain(&mut self) -> PdataResult<()> {
        if !self.buf.is_empty() {
            self.file
                .write_all_at(&self.buf, self.start * BLOCK_SIZE as u64)
                .map_err(|_| PdataError::Io { block: self.start })?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl BlockIo for Writer {
    fn read_block(&mut self, nr: u64, _: &mut Block) -> PdataResult<()> {
        Err(PdataError::Io { block: nr })
    }
    fn write_block(&mut self, nr: u64, b: &Block) -> PdataResult<()> {
        self.put(nr, b)
    }
    fn flush(&mut self) -> PdataResult<()> {
        self.drain()?;
        self.file.sync_data().map_err(|_| PdataError::Flush)
    }
    fn size_blocks(&self) -> u64 {
        self.blocks
    }
    fn crc32c(&self, data: &[u8]) -> u32 {
        shsnap_core::host::crc32c(data)
    }
}

/// The tree under construction: one open node per level; node j of level l goes to parent
/// j * n[l+1] / n[l] (children spread evenly, at most INTERNAL_CAP each).
struct Builder {
    store_id: u64,
    meta_start: u64,
    meta_blocks: u64,
    next_meta: u64,
    /// Nodes per level (level 0: leaves), known in advance.
    n: Vec<u64>,
    /// Nodes finalized per level.
    made: Vec<u64>,
    /// Per level: open node, its parent index, its first key.
    open: Vec<(Box<Block>, usize, u64)>,
    root: u64,
}

impl Builder {
    fn new(store_id: u64, l: &Layout, leaves: u64) -> Builder {
        let mut n = vec![leaves.max(1)];
        while *n.last().unwrap() > 1 {
            n.push(n.last().unwrap().div_ceil(INTERNAL_CAP as u64));
        }
        let open = (0..n.len())
            .map(|lv| {
                let mut b = Box::new([0u8; BLOCK_SIZE]);
                btree::init_node(&mut b, lv as u16);
                (b, 0usize, 0u64)
            })
            .collect();
        Builder {
            store_id,
            meta_start: l.meta_start,
            meta_blocks: l.meta_blocks,
            next_meta: 0,
            made: vec![0; n.len()],
            n,
            open,
            root: 0,
        }
    }

    fn depth(&self) -> usize {
        self.n.len()
    }

    /// Seals and writes the open node of `lv` (its contents filled by the caller) and adds
    /// it to its parent.
    fn finish(&mut self, w: &mut Writer, lv: usize) -> Result<()> {
        if self.next_meta >= self.meta_blocks {
            return Err(Error::NoMetaSpace);
        }
        let blk = self.meta_start + self.next_meta;
        self.next_meta += 1;
        let key = {
            let (b, cnt, key) = &mut self.open[lv];
            btree::set_count(b, *cnt);
            init_header(b, btree::node_type(lv as u16), blk, self.store_id);
            *key
        };
        seal(w, &mut self.open[lv].0);
        w.put(blk, &self.open[lv].0)?;
        let j = self.made[lv];
        self.made[lv] += 1;
        let b = &mut self.open[lv];
        b.0.fill(0);
        btree::init_node(&mut b.0, lv as u16);
        b.1 = 0;
        if lv + 1 == self.depth() {
            self.root = blk;
            return Ok(());
        }
        // Parent of node j: the open parent, unless j starts the next one.
        let (n, np) = (self.n[lv] as u128, self.n[lv + 1] as u128);
        let parent = (j as u128 * np / n) as u64;
        if parent > self.made[lv + 1] {
            self.finish(w, lv + 1)?;
        }
        let p = &mut self.open[lv + 1];
        if p.1 == 0 {
            p.2 = key;
        }
        btree::set_internal_entry(&mut p.0, p.1, key, blk);
        p.1 += 1;
        debug_assert!(p.1 <= INTERNAL_CAP);
        Ok(())
    }

    /// Closes every open node, bottom up.
    fn close(&mut self, w: &mut Writer) -> Result<Root> {
        for lv in 0..self.depth() {
            if self.open[lv].1 > 0 || (lv + 1 == self.depth() && self.made[lv] == 0) {
                self.finish(w, lv)?;
            }
        }
        Ok(Root {
            block: self.root,
            depth: self.depth() as u32,
        })
    }
}

/// Groups per leaf, as the writer packs them: no origin chunk across two leaves.
fn count_leaves(p: &Params, total: u64) -> u64 {
    let mut g = Gen::new(p, total);
    let (mut leaves, mut fill) = (0u64, 0usize);
    while let Some((_, _, k)) = g.next_group() {
        if fill == 0 || fill + k > p.leaf_fill {
            leaves += 1;
            fill = 0;
        }
        fill += k;
    }
    leaves
}

pub fn populate(args: &[String]) -> std::result::Result<(), String> {
    let p = parse(args)?;
    let t = Instant::now();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p.path)
        .map_err(|e| format!("{}: {}", p.path, e))?;
    let size = {
        let mut f = &file;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).map_err(|e| e.to_string())?
    };
    let blocks = size / BLOCK_SIZE as u64;
    let l = Layout::compute(blocks, p.chunk_sectors, 0).map_err(|e| e.to_string())?;
    let total = match (p.exceptions, p.occupancy) {
        (Some(e), _) => e,
        (_, Some(o)) => (l.data_chunks as f64 * o / 100.0) as u64,
        _ => unreachable!(),
    };
    let alloc = Alloc::new(&p, total);
    if total > 0 && alloc.pos(total - 1) >= l.data_chunks {
        return Err(format!(
            "{} exceptions with a hole every {} chunks need {} data chunks; the data area has {}",
            total,
            p.hole_every,
            alloc.pos(total - 1) + 1,
            l.data_chunks
        ));
    }
    let leaves = count_leaves(&p, total);
    let mut sid = [0u8; 24];
    getrandom(&mut sid);
    let store_id = u64::from_le_bytes(sid[..8].try_into().unwrap()) | 1;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sid[8..]);
    let mut w = Writer {
        file,
        blocks,
        buf: Vec::with_capacity(RUN * BLOCK_SIZE),
        start: 0,
        written: 0,
    };
    let mut tree = Builder::new(store_id, &l, leaves);
    if tree.depth() > MAX_DEPTH {
        return Err("tree too deep".into());
    }
    // Leaves, in key order, with the internal levels as they complete.
    let mut gen = Gen::new(&p, total);
    let mut owned = [0u64; MAX_SNAPSHOTS];
    let mut x = 0u64; // exception index in key order
    let mut groups = 0u64;
    while let Some((chunk, shares, k)) = gen.next_group() {
        groups += 1;
        if tree.open[0].1 > 0 && tree.open[0].1 + k > p.leaf_fill {
            tree.finish(&mut w, 0).map_err(|e| e.to_string())?;
        }
        let mut ex = [Exception {
            chunk,
            cow: 0,
            share: 0,
        }; 2];
        for i in 0..k {
            ex[i].cow = alloc.cow_of(x);
            ex[i].share = shares[i];
            x += 1;
            if shares[i].count_ones() == 1 {
                owned[shares[i].trailing_zeros() as usize] += 1;
            }
        }
        if k == 2 && ex[0].cow > ex[1].cow {
            ex.swap(0, 1);
        }
        let leaf = &mut tree.open[0];
        if leaf.1 == 0 {
            leaf.2 = chunk;
        }
        for e in &ex[..k] {
            btree::set_leaf_entry(&mut leaf.0, leaf.1, e);
            leaf.1 += 1;
        }
    }
    let root = tree.close(&mut w).map_err(|e| e.to_string())?;
    let meta_used = tree.next_meta;
    assert_eq!(x, total);
    assert_eq!(tree.made[0], leaves.max(1));
    // Bitmaps: metadata (blocks 0..meta_used of the area), data (the allocation pattern).
    let mut b = Box::new([0u8; BLOCK_SIZE]);
    let mut full_bitmaps = 0u64;
    for (start, nblocks, nbits, data) in [
        (
            l.meta_bitmap_start,
            l.meta_bitmap_blocks,
            l.meta_blocks,
            false,
        ),
        (
            l.data_bitmap_start,
            l.data_bitmap_blocks,
            l.data_chunks,
            true,
        ),
    ] {
        for i in 0..nblocks {
            b.fill(0);
            init_header(&mut b, BlockType::Bitmap, start + i, store_id);
            let first = i * BITS_PER_BITMAP;
            let end = (first + BITS_PER_BITMAP).min(nbits);
            let mut set = 0;
            for c in first..end {
                let on = if data {
                    alloc.allocated(c)
                } else {
                    c < meta_used
                };
                if !on {
                    if !data || c > alloc.pos(total.max(1) - 1) {
                        break; // (both patterns end with a run of clear bits)
                    }
                    continue;
                }
                let bit = (c - first) as usize;
                b[HEADER_SIZE + bit / 8] |= 1 << (bit % 8);
                set += 1;
            }
            if data && set == BITS_PER_BITMAP {
                full_bitmaps += 1;
            }
            seal(&w, &mut b);
            w.put(start + i, &b).map_err(|e| e.to_string())?;
        }
    }
    // The journal: empty (a stale transaction of an earlier store must not replay).
    b.fill(0);
    for i in 0..l.journal_blocks {
        w.put(l.journal_start + i, &b).map_err(|e| e.to_string())?;
    }
    for nr in [1, 2] {
        JournalHeader { off: 0, seq: 1 }.encode(&w, store_id, nr, &mut b);
        w.put(nr, &b).map_err(|e| e.to_string())?;
    }
    let mut snaps = [SnapSlot::default(); MAX_SNAPSHOTS];
    for i in 0..p.snaps as usize {
        snaps[i] = SnapSlot {
            id: i as u32,
            flags: SNAP_LIVE,
            create_seq: i as u64 + 1,
            owned: owned[i],
            source_seq: 0,
        };
    }
    let sb = Super {
        store_id,
        uuid,
        flags: 0,
        layout: l,
        meta_used,
        data_used: total,
        root,
        delete_cursor: 0,
        next_seq: p.snaps as u64 + 1,
        alloc_hint: [meta_used % l.meta_blocks, p.hint],
        source_uuid: [0; 16],
        progress: Progress::NONE,
        snaps,
    };
    sb.encode(&mut b, STATE_BLOCK);
    seal(&w, &mut b);
    w.put(STATE_BLOCK, &b).map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())?;
    // The superblock last: until it is durable the device is not a store.
    sb.encode(&mut b, 0);
    seal(&w, &mut b);
    w.put(0, &b).map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())?;
    let el = t.elapsed().as_secs_f64();
    let owned_total: u64 = owned.iter().sum();
    println!(
        "populate: {} exceptions in {} origin chunks shared by {} snapshots ({} owned alone), \
         {} leaves, depth {}, {} metadata blocks written to {} in {:.1} s",
        total, groups, p.snaps, owned_total, leaves, root.depth, w.written, p.path, el
    );
    println!(
        "populate: data area {} chunks of {} KiB, {} used ({:.2}%), {} full data-bitmap blocks, \
         last origin chunk {}",
        l.data_chunks,
        p.chunk_sectors / 2,
        total,
        total as f64 * 100.0 / l.data_chunks as f64,
        full_bitmaps,
        gen.last_chunk
    );
    println!(
        "populate-info exceptions={} groups={} last_chunk={} data_chunks={} full_bitmaps={} leaves={} depth={} meta_used={} chunk_sectors={}",
        total, groups, gen.last_chunk, l.data_chunks, full_bitmaps, leaves, root.depth, meta_used, p.chunk_sectors
    );
    Ok(())
}

fn getrandom(buf: &mut [u8]) {
    use rand::RngCore;
    rand::thread_rng().fill_bytes(buf);
}

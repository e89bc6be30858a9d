//! The metadata journal: a circular log of physical block images.
//!
//! A transaction is one descriptor block followed by the images of every dirty metadata block.
//! The descriptor carries the transaction's sequence number, the home block and the crc32c of
//! each image; all of them, and the descriptor's own checksum, must match for the transaction
//! to be replayed, so a torn transaction is simply not there.  Commit order:
//!
//! 1. flush (COW data copied for this transaction is durable before anything names it),
//! 2. write descriptor + images, flush (the commit point),
//! 3. write the images home (no flush: the next checkpoint flushes them).
//!
//! A checkpoint (right after a commit that leaves less room than the largest transaction,
//! so that every cached block is committed and none is dirty) flushes the home writes and
//! moves the older journal header (block 1 or 2) to the current offset.  Replay starts at the header and applies
//! transactions with consecutive sequence numbers until one is missing or incomplete.

use super::block::*;
pub use super::cache::MAX_TX_BLOCKS;
use super::cache::{Cache, CacheMem};

/// Offset of a descriptor's entry table: after the block header and `DescHead`.
const D_ENTRIES: usize = HEADER_SIZE + DescHead::SIZE;
const D_ENTRY: usize = 16;

/// The two journal header copies (blocks 1 and 2).
const HEADER_BLOCKS: [u64; 2] = [1, 2];

/// Where the journal lives on the device: `blocks` blocks from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First journal block.
    pub start: u64,
    /// Journal length in blocks.
    pub blocks: u64,
}

/// The fields of a descriptor after its block header: u64 sequence number, u32 count of
/// images (and entries), 4 reserved bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DescHead {
    seq: u64,
    count: u32,
}

impl DescHead {
    /// Bytes on disk.
    const SIZE: usize = 16;

    /// Packs into descriptor `d`.
    fn pack(&self, d: &mut Block) {
        let mut w = LeWriter::new(&mut d[HEADER_SIZE..D_ENTRIES]);
        w.u64(self.seq);
        w.u32(self.count);
        w.zeros(4);
        debug_assert!(w.fits() && w.pos() == Self::SIZE);
    }

    /// The head of descriptor `d`.
    fn unpack(d: &Block) -> Result<Self> {
        let mut r = LeReader::new(&d[HEADER_SIZE..D_ENTRIES]);
        Ok(DescHead {
            seq: r.u64()?,
            count: r.u32()?,
        })
    }
}

/// One entry of a descriptor: the home block of an image and the crc32c of the whole image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DescEntry {
    home: u64,
    crc: u32,
}

impl DescEntry {
    /// Packs as entry `i` of descriptor `d`: u64 home, u32 crc, 4 reserved bytes.
    fn pack(&self, d: &mut Block, i: usize) {
        let mut table = LeWriter::new(&mut d[D_ENTRIES..]);
        let mut w = LeWriter::new(table.entry(i, D_ENTRY));
        w.u64(self.home);
        w.u32(self.crc);
        w.zeros(4);
        debug_assert!(w.fits());
    }

    /// Entry `i` of descriptor `d`.
    fn unpack(d: &Block, i: usize) -> Result<Self> {
        let mut r = LeReader::new(LeReader::new(&d[D_ENTRIES..]).entry(i, D_ENTRY)?);
        Ok(DescEntry {
            home: r.u64()?,
            crc: r.u32()?,
        })
    }
}

/// A journal header (blocks 1 and 2): where replay starts.  Written only at checkpoints,
/// alternately to each copy, so a torn write leaves the other one intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalHeader {
    /// Journal offset (monotonic; block = journal_start + off % journal_blocks) of the first
    /// transaction not yet known to be home.
    pub off: u64,
    /// Sequence number that transaction must carry.
    pub seq: u64,
}

impl JournalHeader {
    /// Encodes into a sealed block for copy `nr` (1 or 2).
    pub fn encode(&self, io: &impl BlockIo, store_id: u64, nr: u64, b: &mut Block) {
        b.fill(0);
        init_header(b, BlockType::JournalHeader, nr, store_id);
        let mut w = LeWriter::new(&mut b[HEADER_SIZE..]);
        w.u64(self.off);
        w.u64(self.seq);
        debug_assert!(w.fits());
        seal(io, b);
    }

    /// Decodes and validates copy `nr`.
    pub fn decode(io: &impl BlockIo, b: &Block, nr: u64, store_id: u64) -> Result<Self> {
        check_header(io, b, BlockType::JournalHeader, nr, store_id)?;
        let mut r = LeReader::new(&b[HEADER_SIZE..]);
        Ok(JournalHeader {
            off: r.u64()?,
            seq: r.u64()?,
        })
    }
}

/// Writes an empty journal over `region` (whatever log was there before is invalidated)
/// and both header copies pointing at its start.
pub fn format(
    io: &mut impl BlockIo,
    region: Region,
    store_id: u64,
    scratch: &mut Block,
) -> Result<()> {
    scratch.fill(0);
    for i in 0..region.blocks {
        io.write_block(region.start + i, scratch)?;
    }
    for nr in HEADER_BLOCKS {
        JournalHeader { off: 0, seq: 1 }.encode(io, store_id, nr, scratch);
        io.write_block(nr, scratch)?;
    }
    Ok(())
}

/// Largest journal offset or sequence number accepted from a journal header.  Both grow by
/// at most MAX_TX_BLOCKS + 1 per commit and a replay covers one journal (at most 8192
/// blocks), so below this bound no addition can overflow.
pub const JOURNAL_POS_MAX: u64 = 1 << 62;

// The descriptor must describe the largest transaction.
const _: () = assert!(D_ENTRIES + MAX_TX_BLOCKS * D_ENTRY <= BLOCK_SIZE);

/// The live state of the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Journal {
    /// First journal block.
    pub start: u64,
    /// Journal length in blocks.
    pub size: u64,
    /// Offset where the next transaction goes (monotonic).
    pub off: u64,
    /// Sequence number of the next transaction.
    pub seq: u64,
    /// Offset recorded in the journal header (the oldest transaction replay would read).
    pub tail: u64,
    /// Transactions committed by this instance.
    pub commits: u64,
    /// Journal header copy (1 or 2) the next checkpoint writes.
    pub next_header: u64,
}

impl Journal {
    fn loc(&self, off: u64) -> u64 {
        // `size` is never 0 (the layout has at least MIN_JOURNAL_BLOCKS).  No `%`: its
        // division-by-zero panic (`panic_const_rem_by_zero`) is not on the noreturn list of
        // 6.12's objtool, which then warns that a function ending in it falls through.
        self.start + off.checked_rem(self.size).unwrap_or(0)
    }
}

/// Writes committed blocks home, makes them durable, and moves the replay start to the
/// current offset.
pub fn checkpoint<M: CacheMem>(
    io: &mut impl BlockIo,
    cache: &mut Cache<M>,
    j: &mut Journal,
    store_id: u64,
) -> Result<()> {
    cache.write_committed(io)?;
    write_header(io, j, store_id, cache.scratch(0))
}

/// Flushes home writes and records the current offset in the older journal header.
pub fn write_header(
    io: &mut impl BlockIo,
    j: &mut Journal,
    store_id: u64,
    scratch: &mut Block,
) -> Result<()> {
    io.flush()?;
    JournalHeader {
        off: j.off,
        seq: j.seq,
    }
    .encode(io, store_id, j.next_header, scratch);
    io.write_block(j.next_header, scratch)?;
    io.flush()?;
    j.next_header = 3 - j.next_header;
    j.tail = j.off;
    Ok(())
}

/// Commits every dirty block of `cache` as one transaction.
#[inline(never)]
pub fn commit<M: CacheMem>(
    io: &mut impl BlockIo,
    cache: &mut Cache<M>,
    j: &mut Journal,
    store_id: u64,
) -> Result<()> {
    let n = cache.ndirty();
    if n == 0 {
        return Ok(());
    }
    if n > MAX_TX_BLOCKS {
        return Err(Error::Bug("transaction larger than the journal descriptor"));
    }
    let used = j.off.checked_sub(j.tail).filter(|&u| u <= j.size);
    let (Some(used), Some(next_off), Some(next_seq)) =
        (used, j.off.checked_add(n as u64 + 1), j.seq.checked_add(1))
    else {
        return Err(Error::Bug("journal position out of range"));
    };
    if j.size - used < n as u64 + 1 {
        // Every commit leaves room for the largest transaction (below).
        return Err(Error::Bug("journal full"));
    }
    let (blocks, slots, staging) = cache.commit_view();
    let dloc = j.loc(j.off);
    let (desc, images) = staging.split_at_mut(1);
    let desc = &mut desc[0];
    desc.fill(0);
    init_header(desc, BlockType::JournalDesc, dloc, store_id);
    DescHead {
        seq: j.seq,
        count: n as u32,
    }
    .pack(desc);
    let mut i = 0usize;
    for (b, s) in blocks.iter_mut().zip(slots.iter()) {
        if !Cache::<M>::slot_dirty(s) {
            continue;
        }
        if i == n {
            return Err(Error::Bug("dirty count mismatch"));
        }
        seal(io, b);
        DescEntry {
            home: Cache::<M>::slot_block(s),
            crc: sealed_block_crc(io, b),
        }
        .pack(desc, i);
        images[i].copy_from_slice(b);
        i += 1;
    }
    seal(io, desc);
    // One request (two if the log wraps): PREFLUSH makes the chunk copies of this
    // transaction durable first, FUA makes the transaction durable: the commit point.
    // FUA covers only its own request, so when the log wraps both parts carry FUA: the
    // transaction is durable as a whole when the second returns.
    let run = &staging[..n + 1];
    let first = (j.size - j.off % j.size).min(run.len() as u64) as usize;
    if first == run.len() {
        io.write_run(dloc, run, true, true)?;
    } else {
        io.write_run(dloc, &run[..first], true, true)?;
        io.write_run(j.start, &run[first..], false, true)?;
    }
    // Home writes happen lazily: at eviction or at the next checkpoint.
    cache.mark_all_committed();
    j.off = next_off;
    j.seq = next_seq;
    j.commits = j.commits.saturating_add(1);
    // Make room for the next transaction now, while no block is dirty.  Later, a block
    // changed again since this commit would hold only its new image in memory, and a
    // checkpoint could not write the committed one home before moving the replay start
    // past the only durable copy of it.
    if j.size - (j.off - j.tail) < MAX_TX_BLOCKS as u64 + 1 {
        checkpoint(io, cache, j, store_id)?;
    }
    Ok(())
}

/// What a replay found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Transactions applied.
    pub applied: u64,
    /// Blocks written home.
    pub blocks: u64,
    /// A transaction at the end was incomplete (torn by a crash) and was dropped.
    pub torn_tail: bool,
}

enum TxCheck {
    End,
    Torn,
    Valid(u32),
}

#[expect(
    clippy::too_many_arguments,
    reason = "replay's state (journal, what may go home, store id) and scratch blocks, as the \
              other replay steps take them, plus the position checked"
)]
fn check_tx(
    io: &mut impl BlockIo,
    j: &Journal,
    home_ok: &impl Fn(u64) -> bool,
    store_id: u64,
    off: u64,
    seq: u64,
    d: &mut Block,
    b: &mut Block,
) -> Result<TxCheck> {
    let dloc = j.loc(off);
    io.read_block(dloc, d)?;
    if check_header(io, d, BlockType::JournalDesc, dloc, store_id).is_err() {
        return Ok(TxCheck::End);
    }
    let DescHead {
        seq: dseq,
        count: n,
    } = DescHead::unpack(d)?;
    if dseq != seq {
        return Ok(TxCheck::End);
    }
    if n == 0 || n as usize > MAX_TX_BLOCKS {
        return Err(Error::Corrupt {
            block: dloc,
            what: "journal descriptor count out of range",
        });
    }
    for i in 0..n as u64 {
        let e = DescEntry::unpack(d, i as usize)?;
        if !home_ok(e.home) {
            return Err(Error::Corrupt {
                block: dloc,
                what: "journal descriptor names a block outside metadata",
            });
        }
        io.read_block(j.loc(off + 1 + i), b)?;
        if block_crc(io, b) != e.crc || header_blocknr(b) != e.home {
            return Ok(TxCheck::Torn);
        }
    }
    Ok(TxCheck::Valid(n))
}

/// Whether replay would apply a transaction (read-only open: nothing is written).  Returns
/// the journal state as the header records it.  `home_ok` says which blocks a transaction
/// may write home (a descriptor naming another block is corrupt).
#[inline(never)]
pub fn needs_replay(
    io: &mut impl BlockIo,
    region: Region,
    home_ok: impl Fn(u64) -> bool,
    store_id: u64,
    d: &mut Block,
    b: &mut Block,
) -> Result<(Journal, bool)> {
    let j = read_header(io, region, store_id, d)?;
    let pending = match check_tx(io, &j, &home_ok, store_id, j.off, j.seq, d, b)? {
        TxCheck::End => false,
        TxCheck::Valid(_) => true,
        TxCheck::Torn => {
            torn_is_last(io, &j, &home_ok, store_id, d, b)?;
            false
        }
    };
    Ok((j, pending))
}

/// The journal state the newest valid journal header records.
fn read_header(
    io: &mut impl BlockIo,
    region: Region,
    store_id: u64,
    d: &mut Block,
) -> Result<Journal> {
    let mut best: Option<(JournalHeader, u64)> = None;
    for nr in HEADER_BLOCKS {
        io.read_block(nr, d)?;
        if let Ok(h) = JournalHeader::decode(io, d, nr, store_id) {
            if best.is_none_or(|(b, _)| (h.seq, h.off) > (b.seq, b.off)) {
                best = Some((h, nr));
            }
        }
    }
    let Some((jh, newest)) = best else {
        return Err(Error::Corrupt {
            block: 1,
            what: "both journal headers are damaged",
        });
    };
    // Offsets and sequence numbers grow by one per block and per transaction: 2^62 of
    // either cannot be reached, so a header beyond is forged or damaged (and would overflow).
    if jh.off > JOURNAL_POS_MAX || jh.seq > JOURNAL_POS_MAX {
        return Err(Error::Corrupt {
            block: newest,
            what: "journal header offset or sequence out of range",
        });
    }
    Ok(Journal {
        start: region.start,
        size: region.blocks,
        off: jh.off,
        seq: jh.seq,
        tail: jh.off,
        commits: 0,
        next_header: 3 - newest,
    })
}

/// A torn transaction at `j.off` (its descriptor in `d`) must be the last one: if a
/// complete successor follows, a journal block was damaged, and stopping there would lose
/// committed data.  (The count is at most MAX_TX_BLOCKS: check_tx checked it.)
fn torn_is_last(
    io: &mut impl BlockIo,
    j: &Journal,
    home_ok: &impl Fn(u64) -> bool,
    store_id: u64,
    d: &mut Block,
    b: &mut Block,
) -> Result<()> {
    let n = DescHead::unpack(d)?.count as u64;
    if let TxCheck::Valid(_) = check_tx(io, j, home_ok, store_id, j.off + n + 1, j.seq + 1, d, b)? {
        return Err(Error::Corrupt {
            block: j.loc(j.off),
            what: "journal damaged before a later committed transaction",
        });
    }
    Ok(())
}

/// Replays the journal from the header's position; returns the journal state to continue
/// from (the header has been moved past what was replayed).  `home_ok`: as `needs_replay`.
#[inline(never)]
pub fn replay(
    io: &mut impl BlockIo,
    region: Region,
    home_ok: impl Fn(u64) -> bool,
    store_id: u64,
    d: &mut Block,
    b: &mut Block,
) -> Result<(Journal, ReplayReport)> {
    let mut j = read_header(io, region, store_id, d)?;
    let mut rep = ReplayReport::default();
    let mut scanned = 0u64;
    while scanned < j.size {
        match check_tx(io, &j, &home_ok, store_id, j.off, j.seq, d, b)? {
            TxCheck::End => break,
            TxCheck::Torn => {
                torn_is_last(io, &j, &home_ok, store_id, d, b)?;
                rep.torn_tail = true;
                break;
            }
            TxCheck::Valid(n) => {
                // d still holds this descriptor: apply the images.
                for i in 0..n as u64 {
                    let home = DescEntry::unpack(d, i as usize)?.home;
                    io.read_block(j.loc(j.off + 1 + i), b)?;
                    io.write_block(home, b)?;
                    rep.blocks += 1;
                }
                j.off += n as u64 + 1;
                j.seq += 1;
                scanned += n as u64 + 1;
                rep.applied += 1;
            }
        }
    }
    // Skip a sequence number so that a stale, torn descriptor can never match again.
    j.seq += 1;
    write_header(io, &mut j, store_id, d)?;
    Ok((j, rep))
}

#[cfg(test)]
mod tests {
    use super::super::cache::VecMem as TestMem;
    use super::super::testing::TestDev;
    use super::*;

    const STORE: u64 = 0x10c;

    /// The descriptor layout of Documentation/format.md, byte by byte.
    #[test]
    fn descriptor_layout_is_the_documented_one() {
        let mut d = [0xffu8; BLOCK_SIZE];
        DescHead {
            seq: 0x0102_0304_0506_0708,
            count: 0x1112_1314,
        }
        .pack(&mut d);
        DescEntry {
            home: 0x2122_2324_2526_2728,
            crc: 0x3132_3334,
        }
        .pack(&mut d, 1);
        assert_eq!(d[32..40], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(d[40..48], [0x14, 0x13, 0x12, 0x11, 0, 0, 0, 0]);
        assert_eq!(d[64..72], 0x2122_2324_2526_2728u64.to_le_bytes());
        assert_eq!(d[72..80], [0x34, 0x33, 0x32, 0x31, 0, 0, 0, 0]);
        let h = DescHead::unpack(&d).unwrap();
        assert_eq!((h.seq, h.count), (0x0102_0304_0506_0708, 0x1112_1314));
        let e = DescEntry::unpack(&d, 1).unwrap();
        assert_eq!((e.home, e.crc), (0x2122_2324_2526_2728, 0x3132_3334));
    }
    const REGION: Region = Region {
        start: 4,
        blocks: 2 * (MAX_TX_BLOCKS as u64 + 1) + 2,
    };
    /// Home blocks live from 1000 on.
    const HOME: u64 = 1000;

    fn home_ok(b: u64) -> bool {
        b >= HOME
    }

    /// A formatted journal, opened (an empty replay) with a cache over it.
    fn setup() -> (TestDev, Cache<TestMem>, Journal) {
        let mut dev = TestDev::new(HOME + 100);
        let mut cache = Cache::new(TestMem::new(32)).unwrap();
        format(&mut dev, REGION, STORE, cache.scratch(0)).unwrap();
        let (a, b) = cache.scratch2();
        let (j, rep) = replay(&mut dev, REGION, home_ok, STORE, a, b).unwrap();
        assert_eq!(rep, ReplayReport::default());
        (dev, cache, j)
    }

    /// Dirties home blocks `blocks` with `fill` as their content, then commits.
    fn tx(
        dev: &mut TestDev,
        cache: &mut Cache<TestMem>,
        j: &mut Journal,
        blocks: &[u64],
        fill: u8,
    ) {
        cache.begin_op();
        for &nr in blocks {
            let slot = cache.get_new(dev, nr).unwrap();
            let b = cache.data_mut(slot);
            init_header(b, BlockType::Bitmap, nr, STORE);
            b[HEADER_SIZE..].fill(fill);
        }
        commit(dev, cache, j, STORE).unwrap();
    }

    fn replay_fresh(dev: &mut TestDev) -> Result<(Journal, ReplayReport)> {
        let (mut a, mut b) = ([0u8; BLOCK_SIZE], [0u8; BLOCK_SIZE]);
        replay(dev, REGION, home_ok, STORE, &mut a, &mut b)
    }

    #[test]
    fn commit_then_replay_writes_home() {
        let (mut dev, mut cache, mut j) = setup();
        tx(&mut dev, &mut cache, &mut j, &[HOME, HOME + 1], 0xa1);
        tx(&mut dev, &mut cache, &mut j, &[HOME + 1, HOME + 2], 0xb2);
        // Home writes are lazy: nothing reached home yet (a crash now).
        assert_eq!(dev.peek(HOME), [0; BLOCK_SIZE]);
        let (j2, rep) = replay_fresh(&mut dev).unwrap();
        assert_eq!((rep.applied, rep.blocks, rep.torn_tail), (2, 4, false));
        assert_eq!(dev.peek(HOME)[HEADER_SIZE], 0xa1);
        assert_eq!(
            dev.peek(HOME + 1)[HEADER_SIZE],
            0xb2,
            "the later image wins"
        );
        assert_eq!(dev.peek(HOME + 2)[HEADER_SIZE], 0xb2);
        // Replay moved the header past both and skipped a sequence number.
        assert_eq!((j2.off, j2.seq), (j.off, j.seq + 1));
        let (_, again) = replay_fresh(&mut dev).unwrap();
        assert_eq!(again.applied, 0, "nothing is replayed twice");
        let (a, b) = cache.scratch2();
        let (_, pending) = needs_replay(&mut dev, REGION, home_ok, STORE, a, b).unwrap();
        assert!(!pending);
    }

    #[test]
    fn torn_tail_is_dropped() {
        let (mut dev, mut cache, mut j) = setup();
        tx(&mut dev, &mut cache, &mut j, &[HOME], 0x11);
        let second = j.off;
        tx(&mut dev, &mut cache, &mut j, &[HOME, HOME + 5], 0x22);
        // Tear the second transaction: its last image never reached the disk.
        let last = REGION.start + (second + 2) % REGION.blocks;
        dev.write_block(last, &[0; BLOCK_SIZE]).unwrap();
        let (a, b) = cache.scratch2();
        let (_, pending) = needs_replay(&mut dev, REGION, home_ok, STORE, a, b).unwrap();
        assert!(pending, "the first transaction is complete");
        let (_, rep) = replay_fresh(&mut dev).unwrap();
        assert_eq!((rep.applied, rep.torn_tail), (1, true));
        assert_eq!(dev.peek(HOME)[HEADER_SIZE], 0x11);
        assert_eq!(dev.peek(HOME + 5), [0; BLOCK_SIZE]);
    }

    #[test]
    fn damage_before_a_committed_transaction_fails() {
        let (mut dev, mut cache, mut j) = setup();
        let first = j.off;
        tx(&mut dev, &mut cache, &mut j, &[HOME], 0x11);
        tx(&mut dev, &mut cache, &mut j, &[HOME + 1], 0x22);
        let img = REGION.start + (first + 1) % REGION.blocks;
        let mut b = dev.peek(img);
        b[HEADER_SIZE + 7] ^= 0x40;
        dev.write_block(img, &b).unwrap();
        let r = replay_fresh(&mut dev);
        assert!(
            matches!(r, Err(Error::Corrupt { what, .. }) if what.contains("damaged before")),
            "{:?}",
            r
        );
    }

    #[test]
    fn descriptor_naming_a_foreign_block_is_corrupt() {
        let (mut dev, mut cache, mut j) = setup();
        tx(&mut dev, &mut cache, &mut j, &[HOME + 3], 0x33);
        let mut a = [0u8; BLOCK_SIZE];
        let mut b = [0u8; BLOCK_SIZE];
        let r = replay(&mut dev, REGION, |h| h > HOME + 3, STORE, &mut a, &mut b);
        assert!(matches!(r, Err(Error::Corrupt { .. })), "{:?}", r);
    }
}

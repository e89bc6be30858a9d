//! Userspace tests of the shared exception store core: a model-based random test against a
//! plain in-memory model of an origin and up to 64 snapshots, crash simulation at every write
//! and flush boundary, and corruption of every metadata block type.

mod common;
use common::seed;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shsnap_core::check;
use shsnap_core::exception_store::format::{Block, BlockIo, Error, PdataError, BLOCK_SIZE};
use shsnap_core::exception_store::superblock::Super;
use shsnap_core::exception_store::{
    format, FormatParams, OriginWrite, SnapWrite, Source, Step, Store,
};
use shsnap_core::host::{MemDev, VecMem};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

const CHUNKS: u64 = 512;

type S = Store<MemDev, VecMem, Box<Super>>;

fn sbox() -> Box<Super> {
    Box::new(Super::empty())
}

fn new_dev(blocks: u64) -> MemDev {
    let mut dev = MemDev::new(blocks);
    let mut scratch = [0u8; BLOCK_SIZE];
    format(
        &mut dev,
        &FormatParams {
            chunk_sectors: 8,
            store_id: 0x1234_5678,
            uuid: [7; 16],
            meta_blocks: 0,
        },
        &mut scratch,
    )
    .unwrap();
    dev.flush().unwrap();
    dev
}

/// `unwrap` for a mutation where the transaction cannot be full.
trait UnwrapDone<T> {
    fn unwrap_done(self) -> T;
}

impl<T> UnwrapDone<T> for Result<Step<T>, Error> {
    fn unwrap_done(self) -> T {
        match self.unwrap() {
            Step::Done(t) => t,
            Step::CommitFirst => panic!("transaction full"),
        }
    }
}

/// What a mutation did right after a commit (the transaction cannot be full then).
fn done<T>(step: Step<T>) -> Result<T, Error> {
    match step {
        Step::Done(t) => Ok(t),
        Step::CommitFirst => panic!("transaction full right after a commit"),
    }
}

fn tag_block(tag: u64) -> Block {
    let mut b = [0u8; BLOCK_SIZE];
    for i in 0..BLOCK_SIZE / 8 {
        b[i * 8..i * 8 + 8].copy_from_slice(&tag.to_le_bytes());
    }
    b
}

/// The plain model plus the simulated origin device.
#[derive(Clone, Default)]
struct Model {
    /// Origin content (tags), as acknowledged.
    origin: Vec<u64>,
    /// Snapshot id -> content.
    snaps: BTreeMap<u32, Vec<u64>>,
}

struct Sim {
    /// After every commit that returns: a power cut that drops every volatile write must
    /// recover exactly the committed state (a commit is durable when it returns).
    durability_checks: bool,
    /// Commits whose journal transaction wrapped the end of the log.
    wrapped_commits: u64,
    /// Durability checks done.
    durability_checked: u64,
    store: Option<S>,
    model: Model,
    /// Model after the last commit that returned.
    committed: Model,
    /// Origin writes waiting for the commit that makes their copies durable.
    pending_origin: Vec<(u64, u64)>,
    /// Snapshot writes waiting for commit (acknowledged at commit).
    next_tag: u64,
    commits: u64,
    /// Snapshot writes not yet committed: (id, chunk, tag).  After a power cut each such
    /// chunk may hold the old or the new content (the write was never acknowledged).
    unacked: Vec<(u32, u64, u64)>,
}

impl Sim {
    fn new(dev: MemDev) -> Sim {
        Sim::with_cache(dev, 256)
    }

    fn with_cache(dev: MemDev, cache: usize) -> Sim {
        let store = Store::open(dev, VecMem::new(cache), sbox()).unwrap();
        let model = Model {
            origin: vec![0; CHUNKS as usize],
            snaps: BTreeMap::new(),
        };
        Sim {
            durability_checks: false,
            wrapped_commits: 0,
            durability_checked: 0,
            store: Some(store),
            committed: model.clone(),
            model,
            pending_origin: vec![],
            next_tag: 1,
            commits: 0,
            unacked: vec![],
        }
    }

    fn s(&mut self) -> &mut S {
        self.store.as_mut().unwrap()
    }

    fn data_block(&mut self, cow: u64) -> u64 {
        self.s().sb().layout.data_start + cow
    }

    fn commit(&mut self) -> Result<(), Error> {
        let j0 = *self.s().journal();
        self.s().commit()?;
        let j1 = *self.s().journal();
        let wrapped = j1.off > j0.off && j0.off % j0.size + (j1.off - j0.off) > j0.size;
        if wrapped {
            self.wrapped_commits += 1;
        }
        for (c, t) in std::mem::take(&mut self.pending_origin) {
            self.model.origin[c as usize] = t;
        }
        self.committed = self.model.clone();
        self.commits += 1;
        self.unacked.clear();
        if self.durability_checks {
            self.check_durable(wrapped);
        }
        Ok(())
    }

    /// A power cut now, losing every write not yet durable, must recover the committed state.
    fn check_durable(&mut self, wrapped: bool) {
        let dev = self.s().io().clone();
        let img = dev.crash(|_| false, None);
        let m = self.committed.clone();
        let what = format!(
            "commit {} (wrapped the log: {}): power cut right after it returned",
            self.commits, wrapped
        );
        let mut st = Store::open(img, VecMem::new(128), sbox())
            .unwrap_or_else(|e| panic!("{}: open: {}", what, e));
        verify(&mut st, &m, &m.origin).unwrap_or_else(|e| panic!("{}: {}", what, e));
        self.durability_checked += 1;
    }

    fn retry<T>(
        &mut self,
        mut f: impl FnMut(&mut S) -> Result<Step<T>, Error>,
    ) -> Result<T, Error> {
        match f(self.s())? {
            Step::CommitFirst => {
                self.commit()?;
                done(f(self.s())?)
            }
            Step::Done(t) => Ok(t),
        }
    }

    fn origin_write(&mut self, chunk: u64) -> Result<(), Error> {
        // A write to a chunk with a write already pending must wait for that commit.
        if self.pending_origin.iter().any(|&(c, _)| c == chunk) {
            self.commit()?;
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        match self.retry(|s| s.origin_write(chunk))? {
            OriginWrite::NoCopy => {}
            OriginWrite::Copy(cow) => {
                let blk = self.data_block(cow);
                let old = tag_block(self.model.origin[chunk as usize]);
                self.s().io().write_block(blk, &old)?;
            }
            OriginWrite::Invalidated(_) => panic!("COW full in the model test"),
        }
        self.pending_origin.push((chunk, tag));
        Ok(())
    }

    fn snap_write(&mut self, id: u32, chunk: u64) -> Result<(), Error> {
        let slot = self.s().sb().slot_of(id).unwrap();
        let tag = self.next_tag;
        self.next_tag += 1;
        let (blk, in_place) = match self.retry(|s| s.snapshot_write(chunk, slot))? {
            SnapWrite::InPlace(c) => (self.data_block(c), true),
            SnapWrite::Copy { to, .. } => (self.data_block(to), false),
        };
        self.unacked.push((id, chunk, tag));
        if in_place {
            // No metadata changes, so no commit (and no flush) may follow: the write is
            // acknowledged when durable on its own (the user's FUA or flush).
            self.s()
                .io()
                .write_run(blk, &[tag_block(tag)], false, true)?;
        } else {
            self.s().io().write_block(blk, &tag_block(tag))?;
        }
        self.model.snaps.get_mut(&id).unwrap()[chunk as usize] = tag;
        Ok(())
    }

    fn create(&mut self, id: u32) -> Result<(), Error> {
        self.commit()?; // origin writes before the snapshot are in it
        self.retry(|s| s.create_snapshot(id))?;
        self.model.snaps.insert(id, self.model.origin.clone());
        self.commit()
    }

    fn delete(&mut self, id: u32) -> Result<(), Error> {
        self.retry(|s| s.delete_snapshot(id))?;
        self.model.snaps.remove(&id);
        Ok(())
    }

    fn delete_steps(&mut self, n: usize) -> Result<(), Error> {
        for _ in 0..n {
            if !self.s().delete_step(4)? {
                break;
            }
            if self.s().needs_commit() {
                self.commit()?;
            }
        }
        Ok(())
    }
}

/// Checks every snapshot of an open store against `m` (origin content from `origin`).
fn verify(s: &mut S, m: &Model, origin: &[u64]) -> Result<(), String> {
    verify_with(s, m, origin, |_, _, _| false)
}

/// As `verify`, also accepting a chunk content for which `also(id, chunk, tag)` holds.
fn verify_with(
    s: &mut S,
    m: &Model,
    origin: &[u64],
    also: impl Fn(u32, u64, u64) -> bool,
) -> Result<(), String> {
    let ds = s.sb().layout.data_start;
    let live: Vec<u32> = s
        .sb()
        .snaps
        .iter()
        .filter(|x| x.flags & 1 != 0)
        .map(|x| x.id)
        .collect();
    let mut want: Vec<u32> = m.snaps.keys().copied().collect();
    let mut got = live.clone();
    want.sort();
    got.sort();
    if want != got {
        return Err(format!("live snapshots {:?}, model {:?}", got, want));
    }
    for (&id, content) in &m.snaps {
        let slot = s.sb().slot_of(id).unwrap();
        for c in 0..CHUNKS {
            let tag = match s.lookup(c, slot).map_err(|e| e.to_string())? {
                Source::Origin => origin[c as usize],
                Source::Cow(cow) => {
                    let mut b = [0u8; BLOCK_SIZE];
                    s.io().read_block(ds + cow, &mut b).unwrap();
                    u64::from_le_bytes(b[..8].try_into().unwrap())
                }
            };
            if tag != content[c as usize] && !also(id, c, tag) {
                return Err(format!(
                    "snapshot {} chunk {}: read tag {}, expected {}",
                    id, c, tag, content[c as usize]
                ));
            }
        }
    }
    Ok(())
}

fn check_clean(dev: &MemDev) {
    let (rep, _) = check::check(dev.clone());
    assert!(rep.errors.is_empty(), "check found: {:?}", rep.errors);
}

/// One random step of the workload.
fn step(sim: &mut Sim, rng: &mut SmallRng, next_id: &mut u32) -> Result<(), Error> {
    let nsnaps = sim.model.snaps.len();
    let r = rng.gen_range(0..100);
    let chunk = if rng.gen_bool(0.5) {
        rng.gen_range(0..32)
    } else {
        rng.gen_range(0..CHUNKS)
    };
    if r < 45 {
        sim.origin_write(chunk)
    } else if r < 80 && nsnaps > 0 {
        let ids: Vec<u32> = sim.model.snaps.keys().copied().collect();
        let id = ids[rng.gen_range(0..ids.len())];
        sim.snap_write(id, chunk)
    } else if r < 88 && sim.s().sb().snaps.iter().any(|s| s.flags == 0) {
        *next_id += 1;
        sim.create(*next_id * 7)
    } else if r < 93 && nsnaps > 0 {
        let ids: Vec<u32> = sim.model.snaps.keys().copied().collect();
        sim.delete(ids[rng.gen_range(0..ids.len())])
    } else if r < 97 {
        sim.delete_steps(rng.gen_range(1..4))
    } else {
        sim.commit()
    }
}

#[test]
fn model_random_ops() {
    let seeds: u64 = std::env::var("SHSNAP_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let first = seed("SHSNAP_MODEL_SEED", 0);
    let mut total = 0u64;
    for seed in first..first + seeds {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut sim = Sim::new(new_dev(16384));
        let mut next_id = 0;
        for i in 0..6000 {
            step(&mut sim, &mut rng, &mut next_id).unwrap();
            total += 1;
            if i % 1000 == 999 {
                sim.commit().unwrap();
                let (m, o) = (sim.model.clone(), sim.model.origin.clone());
                verify(sim.s(), &m, &o)
                    .unwrap_or_else(|e| panic!("seed {} step {}: {}", seed, i, e));
            }
        }
        // Finish deletions, close cleanly, reopen, verify, check.
        while sim.s().delete_pending() {
            sim.delete_steps(100).unwrap();
            sim.commit().unwrap();
        }
        sim.commit().unwrap();
        let (m, o) = (sim.model.clone(), sim.model.origin.clone());
        let (dev, _, _) = sim.store.take().unwrap().close().unwrap();
        check_clean(&dev);
        let (rep, _) = check::check(dev.clone());
        assert!(rep.clean);
        let mut s = Store::open(dev, VecMem::new(128), sbox()).unwrap();
        verify(&mut s, &m, &o).unwrap_or_else(|e| panic!("seed {} after reopen: {}", seed, e));
    }
    println!("model: {} random operations checked", total);
}

#[test]
fn sixty_four_snapshots_one_copy() {
    let mut sim = Sim::new(new_dev(16384));
    for id in 0..64 {
        sim.create(id).unwrap();
    }
    assert_eq!(sim.s().create_snapshot(1000), Err(Error::TooManySnapshots));
    assert_eq!(sim.s().create_snapshot(3), Err(Error::DuplicateId));
    let before = sim.s().usage().data_used;
    sim.origin_write(5).unwrap();
    sim.commit().unwrap();
    // One exception, one chunk, for all 64 snapshots.
    assert_eq!(sim.s().usage().data_used, before + 1);
    let mut n = 0;
    sim.s()
        .exceptions_of(5, |e| {
            assert_eq!(e.share, u64::MAX);
            n += 1
        })
        .unwrap();
    assert_eq!(n, 1);
    // A second write to the same chunk copies nothing.
    assert_eq!(sim.s().origin_write(5).unwrap_done(), OriginWrite::NoCopy);
    // A snapshot write splits the shared exception.
    sim.snap_write(10, 5).unwrap();
    sim.commit().unwrap();
    let mut shares = vec![];
    sim.s().exceptions_of(5, |e| shares.push(e.share)).unwrap();
    shares.sort();
    assert_eq!(shares, vec![1 << 10, u64::MAX & !(1 << 10)]);
    // Written again: in place.
    let slot = sim.s().sb().slot_of(10).unwrap();
    assert!(matches!(
        sim.s().snapshot_write(5, slot).unwrap_done(),
        SnapWrite::InPlace(_)
    ));
    let (m, o) = (sim.model.clone(), sim.model.origin.clone());
    verify(sim.s(), &m, &o).unwrap();
}

#[test]
fn cow_full_invalidates_sharers_only() {
    let mut dev = MemDev::new(4096);
    let mut scratch = [0u8; BLOCK_SIZE];
    format(
        &mut dev,
        &FormatParams {
            chunk_sectors: 256,
            store_id: 9,
            uuid: [1; 16],
            meta_blocks: 0,
        },
        &mut scratch,
    )
    .unwrap();
    let mut s = Store::open(dev, VecMem::new(128), sbox()).unwrap();
    let total = s.usage().data_total;
    let a = s.create_snapshot(1).unwrap_done();
    s.commit().unwrap();
    for c in 0..total {
        assert!(matches!(
            s.origin_write(c).unwrap_done(),
            OriginWrite::Copy(_)
        ));
        if s.needs_commit() {
            s.commit().unwrap();
        }
    }
    let b = s.create_snapshot(2).unwrap_done();
    assert_eq!(
        s.origin_write(total + 1).unwrap_done(),
        OriginWrite::Invalidated(1 << a | 1 << b)
    );
    assert_eq!(s.lookup(0, a), Err(Error::SnapshotInvalid));
    s.commit().unwrap();
    let (dev, _, _) = s.close().unwrap();
    check_clean(&dev);
}

/// A device shared between a store that may fail to open (and so never give it back) and
/// the test that wants to see what that open wrote.
#[derive(Clone)]
struct Shared(Rc<RefCell<MemDev>>);

impl BlockIo for Shared {
    fn read_block(&mut self, nr: u64, buf: &mut Block) -> Result<(), PdataError> {
        self.0.borrow_mut().read_block(nr, buf)
    }
    fn write_block(&mut self, nr: u64, buf: &Block) -> Result<(), PdataError> {
        self.0.borrow_mut().write_block(nr, buf)
    }
    fn flush(&mut self) -> Result<(), PdataError> {
        self.0.borrow_mut().flush()
    }
    fn write_run(
        &mut self,
        nr: u64,
        bufs: &[Block],
        pf: bool,
        fua: bool,
    ) -> Result<(), PdataError> {
        self.0.borrow_mut().write_run(nr, bufs, pf, fua)
    }
    fn size_blocks(&self) -> u64 {
        self.0.borrow().size_blocks()
    }
    fn crc32c(&self, data: &[u8]) -> u32 {
        self.0.borrow().crc32c(data)
    }
}

/// The image a power cut leaves, in one of four ways: every volatile write dropped, all
/// kept, a random subset kept, or a random subset kept with one of them torn.
fn power_cut(dev: &MemDev, how: u32, rng: &mut SmallRng) -> MemDev {
    let n = dev.unflushed();
    match how % 4 {
        0 => dev.crash(|_| false, None),
        1 => dev.crash(|_| true, None),
        2 => dev.crash(|_| rng.gen_bool(0.5), None),
        _ => {
            let torn = if n > 0 {
                Some((rng.gen_range(0..n), rng.gen_range(1..8)))
            } else {
                None
            };
            dev.crash(|_| rng.gen_bool(0.7), torn)
        }
    }
}

/// Recovers `img` and checks it with `ok`; then the same with power cuts during the recovery
/// (at a random write of the replay and header update, then recovered again) and right
/// after a recovery (its unflushed writes dropped or torn, recovered again).
fn recover_checked(img: &MemDev, ctx: &str, rng: &mut SmallRng, ok: &dyn Fn(&mut S) -> bool) {
    recover_checked_cache(img, ctx, rng, ok, 128)
}

fn recover_checked_cache(
    img: &MemDev,
    ctx: &str,
    rng: &mut SmallRng,
    ok: &dyn Fn(&mut S) -> bool,
    cache: usize,
) {
    let (rep, _) = check::check(img.clone());
    assert!(rep.errors.is_empty(), "{}: check: {:?}", ctx, rep.errors);
    let mut s = Store::open(img.clone(), VecMem::new(cache), sbox())
        .unwrap_or_else(|e| panic!("{}: open: {}", ctx, e));
    assert!(
        ok(&mut s),
        "{}: recovered state matches no committed state",
        ctx
    );
    let open_writes = s.io().writes;
    // A power cut after the recovery.
    let (d, _, _) = s.abandon();
    let how = rng.gen_range(0..4);
    let img2 = power_cut(&d, how, rng);
    let mut s = Store::open(img2, VecMem::new(cache), sbox())
        .unwrap_or_else(|e| panic!("{}: open after a cut after recovery ({}): {}", ctx, how, e));
    assert!(
        ok(&mut s),
        "{}: state changed by a cut after recovery ({})",
        ctx,
        how
    );
    // Power cuts during the recovery.
    for _ in 0..2 {
        let k = rng.gen_range(0..=open_writes);
        let dev = Shared(Rc::new(RefCell::new(img.clone())));
        dev.0.borrow_mut().fail_after_writes = Some(k);
        if let Ok(s) = Store::open(dev.clone(), VecMem::new(cache), sbox()) {
            let _ = s.abandon();
        }
        let d = dev.0.borrow().clone();
        let how = rng.gen_range(0..4);
        let mut img3 = power_cut(&d, how, rng);
        img3.fail_after_writes = None;
        let (rep, _) = check::check(img3.clone());
        assert!(
            rep.errors.is_empty(),
            "{}: cut at write {} of recovery ({}): check: {:?}",
            ctx,
            k,
            how,
            rep.errors
        );
        let mut s = Store::open(img3, VecMem::new(cache), sbox()).unwrap_or_else(|e| {
            panic!(
                "{}: open after a cut at write {} of recovery: {}",
                ctx, k, e
            )
        });
        assert!(
            ok(&mut s),
            "{}: cut at write {} of recovery ({}): state matches no committed state",
            ctx,
            k,
            how
        );
    }
}

/// Runs a workload until the device fails at write number `cut`, then checks power-cut
/// images: the recovered store passes check and equals the state of the last commit that
/// returned, or of the commit in flight at the cut (never an older one).
fn crash_at(seed: u64, cut: u64, steps: u32, rng2: &mut SmallRng) -> bool {
    crash_at_dev(seed, cut, steps, rng2, new_dev(8192), 256)
}

fn crash_at_dev(
    seed: u64,
    cut: u64,
    steps: u32,
    rng2: &mut SmallRng,
    base: MemDev,
    cache: usize,
) -> bool {
    let start_writes = base.writes;
    let mut sim = Sim::with_cache(base, cache);
    sim.s().io().fail_after_writes = Some(start_writes + cut);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut next_id = 0;
    let mut hit = false;
    for _ in 0..steps {
        if step(&mut sim, &mut rng, &mut next_id).is_err() {
            hit = true;
            break;
        }
    }
    if !hit {
        return false;
    }
    // `after_ok`: the state of the last commit that returned (even inside the failing
    // step); `in_flight`: the state had the failing commit become durable.
    let after_ok = sim.committed.clone();
    let in_flight = {
        let mut m = sim.model.clone();
        for &(c, t) in &sim.pending_origin {
            m.origin[c as usize] = t;
        }
        m
    };
    let (dev, _, _) = sim.store.take().unwrap().abandon();
    let origin_now = sim.model.origin.clone();
    let unacked = sim.unacked.clone();
    for trial in 0..4 {
        let img = power_cut(&dev, trial, rng2);
        let ctx = format!("seed {} cut {} trial {}", seed, cut, trial);
        // Origin content: writes whose commit returned are on the origin; a write whose
        // commit was in flight may or may not have reached it.
        let ok = |s: &mut S| {
            let also = |id: u32, c: u64, tag: u64| {
                unacked
                    .iter()
                    .any(|&(i, ch, t)| i == id && ch == c && t == tag)
            };
            [&after_ok, &in_flight].iter().any(|m| {
                verify_with(s, m, &origin_now, also).is_ok()
                    || verify_with(s, m, &m.origin, also).is_ok()
            })
        };
        recover_checked(&img, &ctx, rng2, &ok);
    }
    true
}

/// Writes (after format) of the uninterrupted workload of `seed`.
fn workload_writes(seed: u64, steps: u32, base: MemDev, cache: usize) -> u64 {
    let start = base.writes;
    let mut sim = Sim::with_cache(base, cache);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut next_id = 0;
    for _ in 0..steps {
        step(&mut sim, &mut rng, &mut next_id).unwrap();
    }
    sim.s().io().writes - start
}

/// Cut points across a whole run of `total` writes: every write of the first 40, then
/// `n` more spread evenly with random jitter up to the last write.
fn cut_points(total: u64, n: u64, rng: &mut SmallRng) -> Vec<u64> {
    let mut v: Vec<u64> = (1..=40.min(total)).collect();
    if total > 40 {
        let span = total - 40;
        for i in 0..n {
            let lo = 40 + span * i / n;
            let hi = (40 + span * (i + 1) / n).max(lo + 1);
            v.push(rng.gen_range(lo..hi) + 1);
        }
    }
    v.push(total);
    v.sort();
    v.dedup();
    v
}

#[test]
fn crash_at_every_write() {
    const STEPS: u32 = 1500;
    let base = seed("SHSNAP_CRASH_SEED", 0);
    let mut rng2 = SmallRng::seed_from_u64(base ^ 99);
    let n: u64 = std::env::var("SHSNAP_CRASH_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let mut points = 0;
    let mut last = 0;
    for seed in base..base + 3 {
        let total = workload_writes(seed, STEPS, new_dev(8192), 256);
        for cut in cut_points(total, n, &mut rng2) {
            if crash_at(seed, cut, STEPS, &mut rng2) {
                points += 1;
                last = last.max(cut);
            }
        }
    }
    println!(
        "crash: {} power-cut points (up to write {}) x 4 images, each also cut during and after recovery, recovered and verified",
        points, last
    );
    assert!(points > 100);
}

/// Power cuts right after each journal checkpoint of a long workload (the checkpoint moves
/// the replay start past transactions whose blocks must all be home by then).
#[test]
fn crash_after_every_checkpoint() {
    const STEPS: u32 = 4000;
    let base = seed("SHSNAP_CHECKPOINT_SEED", 0);
    let mut rng2 = SmallRng::seed_from_u64(base ^ 7);
    let mut points = 0;
    for seed in base..base + 3 {
        // The same workload, uninterrupted, to find the journal header writes.
        let base = new_dev(8192);
        let start = base.writes;
        let mut sim = Sim::new(base);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut next_id = 0;
        for _ in 0..STEPS {
            step(&mut sim, &mut rng, &mut next_id).unwrap();
        }
        let log = sim.s().io().log.clone();
        let headers: Vec<u64> = (start as usize..log.len())
            .filter(|&i| log[i] == 1 || log[i] == 2)
            .map(|i| i as u64 - start)
            .collect();
        for &h in &headers {
            for cut in [h + 1, h + 2] {
                if crash_at(seed, cut, STEPS, &mut rng2) {
                    points += 1;
                }
            }
        }
    }
    println!(
        "crash: {} power cuts just after a checkpoint recovered",
        points
    );
    // Beyond the header written when the store is opened: the journal wrapped.
    assert!(
        points >= 12,
        "the workload must wrap the journal: {} points",
        points
    );
}

#[test]
fn corruption_is_detected() {
    // Build a store with a deep enough tree, snapshots and a journal in use.
    let mut sim = Sim::new(new_dev(16384));
    for id in 1..=3 {
        sim.create(id).unwrap();
    }
    for c in 0..CHUNKS {
        sim.origin_write(c).unwrap();
        if c % 3 == 0 {
            sim.snap_write(2, c).unwrap();
        }
    }
    sim.commit().unwrap();
    let (dev, _, _) = sim.store.take().unwrap().close().unwrap();
    check_clean(&dev);
    let sb = *Store::open(dev.clone(), VecMem::new(128), sbox())
        .unwrap()
        .sb();
    let l = sb.layout;
    let (_, Some((_, map))) = check::check(dev.clone()) else {
        panic!()
    };
    assert!(!map.is_empty());
    // Metadata blocks in use: superblock, journal header, bitmaps, every allocated node.
    let mut targets = vec![
        (0u64, "superblock"),
        (3, "state block"),
        (l.meta_bitmap_start, "meta bitmap"),
        (l.data_bitmap_start, "data bitmap"),
        (sb.root.block, "btree root"),
    ];
    let mut s = Store::open(dev.clone(), VecMem::new(128), sbox()).unwrap();
    for i in 0..l.meta_blocks {
        if s.is_allocated(shsnap_core::exception_store::Area::Meta, i)
            .unwrap()
            && l.meta_start + i != sb.root.block
        {
            targets.push((l.meta_start + i, "btree node"));
        }
    }
    let mut detected = 0;
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_CORRUPTION_SEED", 5));
    for &(blk, what) in &targets {
        for _ in 0..8 {
            let mut d = dev.clone();
            let bit = rng.gen_range(0..BLOCK_SIZE * 8);
            d.flip_bit(blk, bit);
            let (rep, _) = check::check(d.clone());
            assert!(
                !rep.errors.is_empty(),
                "flip of bit {} in {} block {} not detected by check",
                bit,
                what,
                blk
            );
            // Opening either fails cleanly or the damage surfaces as an error on use, never a panic.
            if let Ok(mut s) = Store::open(d, VecMem::new(128), sbox()) {
                let mut failed = false;
                for c in 0..CHUNKS {
                    if s.lookup(c, 0).is_err() {
                        failed = true;
                        break;
                    }
                }
                assert!(
                    failed || blk == l.meta_bitmap_start || blk == l.data_bitmap_start,
                    "{} damage went unnoticed by the store",
                    what
                );
            }
            detected += 1;
        }
    }
    println!(
        "corruption: {} bit flips in {} metadata blocks detected",
        detected,
        targets.len()
    );
}

#[test]
fn journal_damage_and_torn_commit() {
    // Commit a few transactions without checkpoint, then damage a journal block in the middle.
    let mut sim = Sim::new(new_dev(16384));
    sim.create(1).unwrap();
    for c in 0..30 {
        sim.origin_write(c).unwrap();
        sim.commit().unwrap();
    }
    let j = *sim.s().journal();
    assert!(j.off - j.tail > 30, "transactions still in the log");
    let (dev, _, _) = sim.store.take().unwrap().abandon();
    // Flip a bit in an image of an early transaction: replay must refuse, not stop silently.
    let mut d = dev.clone();
    d.flip_bit(j.start + (j.tail % j.size) + 1, 100 * 8);
    let (rep, _) = check::check(d.clone());
    assert!(
        rep.errors.iter().any(|e| e.contains("journal")),
        "{:?}",
        rep.errors
    );
    assert!(matches!(
        Store::open(d, VecMem::new(128), sbox()),
        Err(Error::Pdata(PdataError::Corrupt { .. }))
    ));
    // Random bytes and other formats are refused as not-a-store.
    let mut junk = MemDev::new(4096);
    let mut rng = SmallRng::seed_from_u64(1);
    let mut b = [0u8; BLOCK_SIZE];
    rng.fill(&mut b[..]);
    junk.poke(0, &b);
    assert!(matches!(
        Store::open(junk, VecMem::new(128), sbox()),
        Err(Error::NotAStore(_))
    ));
    // A truncated device is refused.
    let mut small = MemDev::new(dev.size_blocks() / 2);
    for blk in 0..small.size_blocks() {
        small.poke(blk, &dev.peek(blk));
    }
    assert!(matches!(
        Store::open(small, VecMem::new(128), sbox()),
        Err(Error::NotAStore(_))
    ));
}

#[test]
fn delta_between_snapshots() {
    let mut sim = Sim::new(new_dev(16384));
    sim.create(1).unwrap();
    for c in [3, 4, 5, 9] {
        sim.origin_write(c).unwrap();
    }
    sim.create(2).unwrap();
    sim.snap_write(2, 20).unwrap();
    sim.commit().unwrap();
    let (dev, _, _) = sim.store.take().unwrap().close().unwrap();
    let (rep, Some((sb, map))) = check::check(dev) else {
        panic!()
    };
    assert!(rep.errors.is_empty());
    let s1 = sb.slot_of(1);
    let s2 = sb.slot_of(2);
    assert_eq!(check::delta(&map, s1, None), vec![(3, 6), (9, 10)]);
    assert_eq!(check::delta(&map, s1, s2), vec![(3, 6), (9, 10), (20, 21)]);
    assert_eq!(check::delta(&map, s2, None), vec![(20, 21)]);
}

#[test]
fn wrong_version_and_foreign_store_id_refused() {
    use shsnap_core::exception_store::format::{get32, put32, seal};
    let dev = new_dev(4096);
    // A newer format version, correctly checksummed: refused as not-a-store.
    let mut d = dev.clone();
    let mut b = d.peek(0);
    let v = get32(&b, 32);
    put32(&mut b, 32, v + 1);
    seal(&d, &mut b);
    d.poke(0, &b);
    assert!(matches!(
        Store::open(d.clone(), VecMem::new(128), sbox()),
        Err(Error::NotAStore(_))
    ));
    let (rep, _) = check::check(d);
    assert!(
        rep.errors.iter().any(|e| e.contains("version")),
        "{:?}",
        rep.errors
    );
    // A state block from another store (other store id) is refused.
    let other = new_dev(4096);
    let mut d = dev.clone();
    let mut b = other.peek(3);
    b[16] ^= 0xff; // another store id, resealed
    seal(&d, &mut b);
    d.poke(3, &b);
    assert!(Store::open(d, VecMem::new(128), sbox()).is_err());
}

/// Long random mutation test ("fuzz"): random bytes written over random metadata blocks of a
/// valid store (several at a time), then open, lookups, writes and check.  Must never panic;
/// every damage to a block in use is an error, never silently wrong structure.
#[test]
fn fuzz_open_mutated_images() {
    let iters: u64 = std::env::var("SHSNAP_FUZZ")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut sim = Sim::new(new_dev(8192));
    for id in 1..=4 {
        sim.create(id).unwrap();
        for c in 0..120 {
            sim.origin_write((c * 7 + id as u64) % CHUNKS).unwrap();
        }
    }
    sim.commit().unwrap();
    let (dev, _, _) = sim.store.take().unwrap().abandon(); // journal left to replay
    let meta_end = Store::open(dev.clone(), VecMem::new(128), sbox())
        .unwrap()
        .sb()
        .layout
        .data_start;
    let (_, Some((sb0, map))) = check::check(dev.clone()) else {
        panic!("check of the base image")
    };
    let j_start = sb0.layout.journal_start;
    let j_end = j_start + sb0.layout.journal_blocks;
    let mut rng = SmallRng::seed_from_u64(seed("SHSNAP_FUZZ_SEED", 77));
    let (mut opened, mut refused) = (0u64, 0u64);
    for _ in 0..iters {
        let mut d = dev.clone();
        let mut hit = vec![];
        for _ in 0..rng.gen_range(1..4) {
            let blk = rng.gen_range(0..meta_end);
            hit.push(blk);
            let mut b = d.peek(blk);
            match rng.gen_range(0..3) {
                0 => {
                    let i = rng.gen_range(0..BLOCK_SIZE);
                    b[i] = rng.gen();
                }
                1 => {
                    let i = rng.gen_range(0..BLOCK_SIZE - 64);
                    rng.fill(&mut b[i..i + 64]);
                }
                _ => rng.fill(&mut b[..]),
            }
            d.poke(blk, &b);
        }
        let _ = check::check(d.clone());
        match Store::open(d, VecMem::new(64), sbox()) {
            Ok(mut s) => {
                opened += 1;
                for c in 0..64 {
                    // The value the store held, or an error: never a wrong answer.
                    // (Damage to the journal may drop the last transactions as torn.)
                    let in_log = hit.iter().any(|&b| b >= j_start && b < j_end);
                    if let (Ok(src), false) = (s.lookup(c, 0), in_log) {
                        assert_eq!(
                            src,
                            map_source(&map, c, 0),
                            "fuzz: lookup of chunk {} (blocks changed: {:?})",
                            c,
                            hit
                        );
                    }
                }
                for c in 0..64 {
                    let _ = s.origin_write(c * 3);
                }
                let _ = s.commit();
            }
            Err(_) => refused += 1,
        }
    }
    println!(
        "fuzz: {} mutated images: {} opened (damage outside what open reads), {} refused, no panic",
        iters, opened, refused
    );
}

/// Every commit is durable when it returns, including one whose journal transaction wraps
/// the end of the log (written as two requests): a power cut right after it, losing every
/// write that no flush or FUA made durable, recovers exactly the committed state.
#[test]
fn returned_commit_survives_power_cut() {
    let base = seed("SHSNAP_DURABLE_SEED", 11);
    let mut wrapped = 0;
    let mut checked = 0;
    for seed in base..base + 2 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut sim = Sim::new(new_dev(8192));
        sim.durability_checks = true;
        let mut next_id = 0;
        for i in 0..1500 {
            step(&mut sim, &mut rng, &mut next_id)
                .unwrap_or_else(|e| panic!("seed {} step {}: {}", seed, i, e));
        }
        wrapped += sim.wrapped_commits;
        checked += sim.durability_checked;
    }
    println!(
        "crash: {} returned commits ({} wrapping the log) survived a power cut right after",
        checked, wrapped
    );
    assert!(
        wrapped >= 2,
        "the workload must wrap the log: {} wraps",
        wrapped
    );
}

/// Where snapshot `slot` reads `chunk` from, by the exception map `check` read.
fn map_source(map: &check::ExceptionMap, chunk: u64, slot: usize) -> Source {
    match check::source(map, chunk, Some(slot)) {
        Some(c) => Source::Cow(c),
        None => Source::Origin,
    }
}

/// Metadata forged with valid checksums (one field of one structure at a time, see
/// `shsnap_core::forge::KINDS`): open, lookups, writes, creates, deletes, the deletion sweep
/// and check must never panic (overflow checks are on, as in the kernel) nor hang, and every
/// lookup returns what the store held before the forgery, or an error.
#[test]
fn forged_metadata_with_valid_checksums() {
    use shsnap_core::forge;
    let base = seed("SHSNAP_FORGE_SEED", 1);
    let iters: u64 = std::env::var("SHSNAP_FORGE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(18 * 40);
    // A store with an internal root, 4 snapshots, shared and private exceptions.
    let mut sim = Sim::new(new_dev(8192));
    for id in 1..=4 {
        sim.create(id).unwrap();
        for c in 0..200 {
            sim.origin_write((c * 7 + id as u64) % CHUNKS).unwrap();
        }
        for c in 0..20 {
            sim.snap_write(id, c * 5).unwrap();
        }
    }
    sim.commit().unwrap();
    let (dev, _, _) = sim.store.take().unwrap().close().unwrap();
    let (rep, Some((sb, map))) = check::check(dev.clone()) else {
        panic!("check of the base image")
    };
    assert!(rep.errors.is_empty() && rep.depth >= 2, "{:?}", rep);
    let slots: Vec<usize> = (0..64).filter(|&i| sb.snaps[i].flags & 1 != 0).collect();
    let (mut opened, mut refused, mut lookup_errors) = (0u64, 0u64, 0u64);
    let mut kinds_done = std::collections::BTreeSet::new();
    let only = std::env::var("SHSNAP_FORGE_KIND").ok();
    for it in 0..iters {
        let kind = forge::KINDS[it as usize % forge::KINDS.len()].0;
        if only.as_deref().map_or(false, |k| k != kind) {
            continue;
        }
        let mut d = dev.clone();
        let what = forge::forge(&mut d, base + it, Some(kind))
            .unwrap_or_else(|e| panic!("forge {} seed {}: {}", kind, base + it, e));
        kinds_done.insert(what.split(':').next().unwrap().to_string());
        let ctx = format!("seed {} ({}): {}", base + it, kind, what);
        let _ = check::check(d.clone());
        let mut s = match Store::open(d, VecMem::new(64), sbox()) {
            Ok(s) => s,
            Err(_) => {
                refused += 1;
                continue;
            }
        };
        opened += 1;
        for &slot in &slots {
            for c in 0..CHUNKS {
                match s.lookup(c, slot) {
                    Ok(src) => assert_eq!(
                        src,
                        map_source(&map, c, slot),
                        "{}: lookup of chunk {} by slot {}",
                        ctx,
                        c,
                        slot
                    ),
                    Err(_) => lookup_errors += 1,
                }
            }
        }
        // Every mutation: no panic, no hang, whatever it returns.
        let mut rng = SmallRng::seed_from_u64(base + it);
        for _ in 0..50 {
            let c = rng.gen_range(0..CHUNKS);
            let r = match rng.gen_range(0..6) {
                0 | 1 => s.origin_write(c).map(|r| r.map(|_| ())),
                2 => s
                    .snapshot_write(c, slots[rng.gen_range(0..slots.len())])
                    .map(|r| r.map(|_| ())),
                3 => s
                    .create_snapshot(rng.gen_range(100..200))
                    .map(|r| r.map(|_| ())),
                4 => s.delete_snapshot(rng.gen_range(1..5)),
                _ => s.delete_step(8).map(|_| Step::Done(())),
            };
            if r == Ok(Step::CommitFirst) || s.needs_commit() {
                let _ = s.commit();
            }
        }
        for _ in 0..10_000 {
            match s.delete_step(16) {
                Ok(true) => {
                    if s.commit().is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        let _ = s.commit();
        if let Ok((d, _, _)) = s.close() {
            let _ = check::check(d);
        }
    }
    println!(
        "forge: {} forged images ({} kinds): {} opened, {} refused, {} lookups failed cleanly, no panic, no wrong lookup",
        iters,
        kinds_done.len(),
        opened,
        refused,
        lookup_errors
    );
}

/// A store whose first `full` data-bitmap blocks are full (every chunk they cover in use),
/// with 4 KiB chunks and a small metadata area.
fn well_filled_dev(full: u64) -> MemDev {
    use shsnap_core::exception_store::format::{init_header, seal, BlockType, HEADER_SIZE};
    use shsnap_core::exception_store::superblock::BITS_PER_BITMAP;
    let blocks = (full + 4) * BITS_PER_BITMAP + 20_000;
    let mut dev = MemDev::new(blocks);
    let mut scratch = [0u8; BLOCK_SIZE];
    let sb = format(
        &mut dev,
        &FormatParams {
            chunk_sectors: 8,
            store_id: 0x77,
            uuid: [3; 16],
            meta_blocks: 1024,
        },
        &mut scratch,
    )
    .unwrap();
    let l = sb.layout;
    assert!(l.data_bitmap_blocks > full);
    for i in 0..full {
        let mut b = [0xffu8; BLOCK_SIZE];
        b[..HEADER_SIZE].fill(0);
        init_header(
            &mut b,
            BlockType::Bitmap,
            l.data_bitmap_start + i,
            sb.store_id,
        );
        seal(&dev, &mut b);
        dev.poke(l.data_bitmap_start + i, &b);
    }
    let mut s = sb;
    s.data_used = full * BITS_PER_BITMAP;
    s.encode(&mut scratch, 3);
    seal(&dev, &mut scratch);
    dev.poke(3, &scratch);
    dev
}

/// Allocation after reopening a well-filled store: more full data-bitmap blocks than cache
/// slots.  The search must not pin what it scans (CacheFull) and must not rescan from chunk
/// 0 at every open (the hint is kept in the state block).
#[test]
fn alloc_after_reopen_of_full_store() {
    use shsnap_core::exception_store::superblock::BITS_PER_BITMAP;
    let cache = 64;
    let full = 80u64;
    let dev = well_filled_dev(full);
    let mut s = Store::open(dev, VecMem::new(cache), sbox()).unwrap();
    let a = s.create_snapshot(1).unwrap_done();
    s.commit().unwrap();
    let r = s.origin_write(0);
    println!(
        "alloc: first copy after open with {} full bitmap blocks, {}-block cache: {:?}",
        full, cache, r
    );
    assert_eq!(r, Ok(Step::Done(OriginWrite::Copy(full * BITS_PER_BITMAP))));
    s.commit().unwrap();
    let (dev, _, _) = s.close().unwrap();
    // Reopened: the next allocation continues where the last one stopped.
    let mut s = Store::open(dev, VecMem::new(cache), sbox()).unwrap();
    let reads = s.cache_reads();
    assert_eq!(
        s.origin_write(1),
        Ok(Step::Done(OriginWrite::Copy(full * BITS_PER_BITMAP + 1)))
    );
    let reads = s.cache_reads() - reads;
    println!(
        "alloc: after reopen, the next copy read {} metadata blocks",
        reads
    );
    assert!(
        reads <= 4,
        "allocation rescanned the bitmaps: {} reads",
        reads
    );
    assert_eq!(s.lookup(1, a), Ok(Source::Cow(full * BITS_PER_BITMAP + 1)));
    s.commit().unwrap();
    let _ = s.close().unwrap();
}

/// The deletion sweep on a fragmented store: one full leaf (169 exceptions) whose COW chunks
/// sit in 169 different data-bitmap blocks, swept with a 64-slot cache.  Every step must stay
/// within what one transaction (and the cache) can hold.
#[test]
fn delete_sweep_of_fragmented_leaf() {
    use shsnap_core::exception_store::exceptions as btree;
    use shsnap_core::exception_store::format::{get64, put64, seal, HEADER_SIZE};
    use shsnap_core::exception_store::superblock::BITS_PER_BITMAP;
    let n = btree::LEAF_CAP as u64;
    let mut dev = MemDev::new((n + 2) * BITS_PER_BITMAP + 20_000);
    let mut scratch = [0u8; BLOCK_SIZE];
    format(
        &mut dev,
        &FormatParams {
            chunk_sectors: 8,
            store_id: 0x99,
            uuid: [4; 16],
            meta_blocks: 1024,
        },
        &mut scratch,
    )
    .unwrap();
    let mut s = Store::open(dev, VecMem::new(256), sbox()).unwrap();
    s.create_snapshot(1).unwrap_done();
    s.commit().unwrap();
    for c in 0..n {
        assert_eq!(s.origin_write(c), Ok(Step::Done(OriginWrite::Copy(c))));
    }
    s.commit().unwrap();
    let sb = *s.sb();
    let (mut dev, _, _) = s.close().unwrap();
    assert_eq!(sb.root.depth, 1);
    let l = sb.layout;
    // Move exception i to COW chunk i * BITS_PER_BITMAP (bit 0 of data-bitmap block i).
    let mut leaf = dev.peek(sb.root.block);
    assert_eq!(btree::count(&leaf) as u64, n);
    let mut bm0 = dev.peek(l.data_bitmap_start);
    for i in 0..n {
        let o = HEADER_SIZE + i as usize * 24;
        assert_eq!(get64(&leaf, o + 8), i);
        put64(&mut leaf, o + 8, i * BITS_PER_BITMAP);
        if i > 0 {
            bm0[HEADER_SIZE + (i / 8) as usize] &= !(1 << (i % 8));
            let mut bm = dev.peek(l.data_bitmap_start + i);
            bm[HEADER_SIZE] |= 1;
            seal(&dev, &mut bm);
            dev.poke(l.data_bitmap_start + i, &bm);
        }
    }
    seal(&dev, &mut leaf);
    dev.poke(sb.root.block, &leaf);
    seal(&dev, &mut bm0);
    dev.poke(l.data_bitmap_start, &bm0);
    check_clean(&dev);
    // Delete the snapshot and sweep with a small cache, committing as the store asks.
    let mut s = Store::open(dev, VecMem::new(64), sbox()).unwrap();
    s.delete_snapshot(1).unwrap_done();
    s.commit().unwrap();
    let mut steps = 0;
    let r = loop {
        steps += 1;
        match s.delete_step(4) {
            Ok(true) if steps < 10_000 => {}
            Ok(more) => break Ok(more),
            Err(e) => break Err(e),
        }
        if let Err(e) = s.commit() {
            break Err(e);
        }
    };
    println!(
        "delete: sweep of one leaf over {} bitmap blocks with a 64-slot cache: {:?} after {} steps",
        n, r, steps
    );
    assert_eq!(r, Ok(false));
    s.commit().unwrap();
    assert_eq!(s.usage().data_used, 0);
    let (dev, _, _) = s.close().unwrap();
    check_clean(&dev);
}

/// A device that panics on any write or flush (a read-only open must write nothing).
struct NoWrite(MemDev);

impl BlockIo for NoWrite {
    fn read_block(&mut self, nr: u64, buf: &mut Block) -> Result<(), PdataError> {
        self.0.read_block(nr, buf)
    }
    fn write_block(&mut self, nr: u64, _: &Block) -> Result<(), PdataError> {
        panic!("read-only store wrote block {}", nr)
    }
    fn flush(&mut self) -> Result<(), PdataError> {
        panic!("read-only store flushed")
    }
    fn write_run(&mut self, nr: u64, _: &[Block], _: bool, _: bool) -> Result<(), PdataError> {
        panic!("read-only store wrote blocks from {}", nr)
    }
    fn size_blocks(&self) -> u64 {
        self.0.size_blocks()
    }
    fn crc32c(&self, data: &[u8]) -> u32 {
        self.0.crc32c(data)
    }
}

#[test]
fn open_readonly_writes_nothing() {
    let mut sim = Sim::new(new_dev(8192));
    for id in 1..=3 {
        sim.create(id).unwrap();
        for c in 0..100 {
            sim.origin_write((c * 5 + id as u64) % CHUNKS).unwrap();
        }
        sim.snap_write(id, 7).unwrap();
    }
    sim.delete(2).unwrap(); // deleting, sweep not done
    sim.commit().unwrap();
    let m = sim.model.clone();
    // Journal left to replay: refused.
    let (dirty, _, _) = sim.store.take().unwrap().abandon();
    let r = Store::open_readonly(NoWrite(dirty.clone()), VecMem::new(64), sbox());
    println!("readonly: journal to replay: {:?}", r.as_ref().err());
    assert_eq!(r.err(), Some(Error::NeedsReplay));
    // Closed cleanly: lookups work, mutations fail, nothing is written.
    let s = Store::open(dirty, VecMem::new(128), sbox()).unwrap();
    let (clean, _, _) = s.close().unwrap();
    let mut s = Store::open_readonly(NoWrite(clean), VecMem::new(64), sbox()).unwrap();
    for (&id, content) in &m.snaps {
        let slot = s.sb().slot_of(id).unwrap();
        for c in 0..CHUNKS {
            let tag = match s.lookup(c, slot).unwrap() {
                Source::Origin => m.origin[c as usize],
                Source::Cow(cow) => {
                    let mut b = [0u8; BLOCK_SIZE];
                    let ds = s.sb().layout.data_start;
                    s.io().read_block(ds + cow, &mut b).unwrap();
                    u64::from_le_bytes(b[..8].try_into().unwrap())
                }
            };
            assert_eq!(tag, content[c as usize], "snapshot {} chunk {}", id, c);
        }
    }
    let slot = s.sb().slot_of(1).unwrap();
    let results = [
        s.origin_write(3).map(|_| ()),
        s.origin_write(CHUNKS + 5).map(|_| ()),
        s.snapshot_write(3, slot).map(|_| ()),
        s.create_snapshot(50).map(|_| ()),
        s.delete_snapshot(1).map(|_| ()),
        s.delete_step(4).map(|_| ()),
        s.invalidate(1),
    ];
    println!("readonly: mutations: {:?}", results);
    assert!(results.iter().all(|r| *r == Err(Error::ReadOnly)));
    assert_eq!(s.commit(), Ok(()));
    assert!(s.close().is_ok());
}

// ---- a big store with a small cache ---------------------------------------------------

const BIG_CHUNKS: u64 = 70_000;
const BIG_CACHE: usize = 32;

/// Model of the big run in terms of sources (no data is written): snapshot id -> where each
/// chunk reads from.
type BigModel = BTreeMap<u32, Vec<Source>>;

struct Big {
    s: S,
    model: BigModel,
    committed: BigModel,
    next_id: u32,
    next_chunk: u64,
}

impl Big {
    fn commit(&mut self) -> Result<(), Error> {
        self.s.commit()?;
        self.committed = self.model.clone();
        Ok(())
    }

    fn retry<T>(&mut self, f: impl Fn(&mut S) -> Result<Step<T>, Error>) -> Result<T, Error> {
        if self.s.needs_commit() {
            self.commit()?;
        }
        match f(&mut self.s)? {
            Step::CommitFirst => {
                self.commit()?;
                done(f(&mut self.s)?)
            }
            Step::Done(t) => Ok(t),
        }
    }

    fn step(&mut self, rng: &mut SmallRng) -> Result<(), Error> {
        let r = rng.gen_range(0..1000);
        let ids: Vec<u32> = self.model.keys().copied().collect();
        if r < 800 || ids.is_empty() {
            // Mostly new chunks in order (the tree grows to depth 3), some random ones.
            let c = if r < 700 && self.next_chunk < BIG_CHUNKS {
                self.next_chunk += 1;
                self.next_chunk - 1
            } else {
                rng.gen_range(0..BIG_CHUNKS)
            };
            if let OriginWrite::Copy(cow) = self.retry(|s| s.origin_write(c))? {
                for v in self.model.values_mut() {
                    if v[c as usize] == Source::Origin {
                        v[c as usize] = Source::Cow(cow);
                    }
                }
            }
        } else if r < 960 {
            let id = ids[rng.gen_range(0..ids.len())];
            let c = rng.gen_range(0..self.next_chunk.max(1));
            let slot = self.s.sb().slot_of(id).unwrap();
            if let SnapWrite::Copy { to, .. } = self.retry(|s| s.snapshot_write(c, slot))? {
                self.model.get_mut(&id).unwrap()[c as usize] = Source::Cow(to);
            }
        } else if r < 970 && ids.len() < 6 && self.s.sb().snaps.iter().any(|x| x.flags == 0) {
            self.next_id += 1;
            let id = self.next_id;
            self.retry(|s| s.create_snapshot(id))?;
            self.model
                .insert(id, vec![Source::Origin; BIG_CHUNKS as usize]);
        } else if r < 972 && ids.len() > 3 {
            // Snapshots 1 and 2 stay, so that the tree keeps growing.
            let id = ids[rng.gen_range(2..ids.len())];
            self.retry(|s| s.delete_snapshot(id))?;
            self.model.remove(&id);
        } else if r < 990 {
            if self.s.needs_commit() {
                self.commit()?;
            }
            self.s.delete_step(2)?;
        } else {
            self.commit()?;
        }
        Ok(())
    }
}

fn big_dev() -> MemDev {
    let mut dev = MemDev::new(BIG_CHUNKS + 12_000);
    let mut scratch = [0u8; BLOCK_SIZE];
    format(
        &mut dev,
        &FormatParams {
            chunk_sectors: 8,
            store_id: 0xb16,
            uuid: [5; 16],
            meta_blocks: 4096,
        },
        &mut scratch,
    )
    .unwrap();
    dev
}

/// Runs the big workload for `steps` steps, the device failing at write `cut` (if any).
/// Returns the run, and whether the cut was hit.
fn big_run(seed: u64, steps: u64, cut: Option<u64>) -> (Big, bool) {
    let mut dev = big_dev();
    dev.fail_after_writes = cut.map(|c| dev.writes + c);
    let s = Store::open(dev, VecMem::new(BIG_CACHE), sbox()).unwrap();
    let mut b = Big {
        s,
        model: BigModel::new(),
        committed: BigModel::new(),
        next_id: 0,
        next_chunk: 0,
    };
    let mut rng = SmallRng::seed_from_u64(seed);
    for _ in 0..3 {
        b.next_id += 1;
        let id = b.next_id;
        b.retry(|s| s.create_snapshot(id)).unwrap();
        b.model
            .insert(id, vec![Source::Origin; BIG_CHUNKS as usize]);
    }
    if b.commit().is_err() {
        return (b, true);
    }
    for i in 0..steps {
        if let Err(e) = b.step(&mut rng) {
            if cut.is_none() {
                panic!("big run, seed {} step {}: {}", seed, i, e);
            }
            return (b, true);
        }
    }
    if b.commit().is_err() {
        return (b, true);
    }
    (b, false)
}

fn big_verify(s: &mut S, m: &BigModel) -> Result<(), String> {
    let mut live: Vec<u32> = (0..64)
        .filter(|&i| s.sb().snaps[i].flags & 1 != 0)
        .map(|i| s.sb().snaps[i].id)
        .collect();
    live.sort();
    let want: Vec<u32> = m.keys().copied().collect();
    if live != want {
        return Err(format!("live snapshots {:?}, model {:?}", live, want));
    }
    for (&id, v) in m {
        let slot = s.sb().slot_of(id).unwrap();
        for c in 0..BIG_CHUNKS {
            let got = s.lookup(c, slot).map_err(|e| e.to_string())?;
            if got != v[c as usize] {
                return Err(format!(
                    "snapshot {} chunk {}: {:?}, expected {:?}",
                    id, c, got, v[c as usize]
                ));
            }
        }
    }
    Ok(())
}

/// A store of 50k+ exceptions (btree depth 3, internal splits) run through a 32-block cache
/// (committed blocks evicted and written home between checkpoints), with power cuts across
/// the whole run, during recovery, and every recovered store checked against the model.
#[test]
fn big_store_small_cache_power_cuts() {
    let seed = seed("SHSNAP_BIG_SEED", 3);
    let cuts: u64 = std::env::var("SHSNAP_BIG_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    const STEPS: u64 = 75_000;
    let t0 = std::time::Instant::now();
    let (mut b, hit) = big_run(seed, STEPS, None);
    assert!(!hit);
    let writes = b.s.io().writes - big_dev().writes;
    let depth = b.s.sb().root.depth;
    let m = b.model.clone();
    big_verify(&mut b.s, &m).unwrap();
    let (dev, _, _) = b.s.close().unwrap();
    let (rep, _) = check::check(dev.clone());
    assert!(
        rep.errors.is_empty(),
        "{:?}",
        &rep.errors[..rep.errors.len().min(5)]
    );
    println!(
        "big: {} steps, {} exceptions, depth {}, {} btree nodes, {} writes, {}-block cache, {:.1} s",
        STEPS,
        rep.exceptions,
        rep.depth,
        rep.nodes,
        writes,
        BIG_CACHE,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        rep.exceptions >= 50_000 && depth >= 3,
        "{} exceptions, depth {}",
        rep.exceptions,
        depth
    );
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xc07);
    let mut done = 0;
    for k in 0..cuts {
        // Spread over the whole run, jittered.
        let lo = writes * k / cuts;
        let hi = writes * (k + 1) / cuts;
        let cut = rng.gen_range(lo.max(1)..hi.max(lo.max(1) + 1));
        let (b, hit) = big_run(seed, STEPS, Some(cut));
        assert!(hit, "cut {} not reached", cut);
        let (after_ok, in_flight) = (b.committed.clone(), b.model.clone());
        let (dev, _, _) = b.s.abandon();
        for how in [0, 3] {
            let img = power_cut(&dev, how, &mut rng);
            let ctx = format!("seed {} cut {} ({})", seed, cut, how);
            let ok =
                |s: &mut S| big_verify(s, &after_ok).is_ok() || big_verify(s, &in_flight).is_ok();
            recover_checked_cache(&img, &ctx, &mut rng, &ok, BIG_CACHE);
            done += 1;
        }
    }
    println!(
        "big: {} power cuts across {} writes (each also cut during and after recovery) recovered and verified, {:.1} s in all",
        done,
        writes,
        t0.elapsed().as_secs_f64()
    );
}

/// The online delta (`Store::delta`) lists a chunk if and only if the two snapshots read it
/// from different places, whatever the paging (few leaves per call, or a caller that stops
/// early), and a snapshot against itself differs nowhere.
#[test]
fn online_delta_matches_lookups() {
    let first = seed("SHSNAP_DELTA_SEED", 0);
    let mut pairs = 0;
    for seed in first..first + 3 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut sim = Sim::new(new_dev(16384));
        let mut next_id = 0;
        for _ in 0..3000 {
            step(&mut sim, &mut rng, &mut next_id).unwrap();
        }
        sim.commit().unwrap();
        let slots: Vec<usize> = (0..64)
            .filter(|&i| {
                let s = sim.s().sb().snaps[i];
                s.is_live() && !s.is_invalid()
            })
            .collect();
        assert!(slots.len() >= 3, "seed {}: too few snapshots", seed);
        for &a in &slots {
            for &b in &slots {
                let mut want = vec![];
                for c in 0..CHUNKS {
                    if sim.s().lookup(c, a).unwrap() != sim.s().lookup(c, b).unwrap() {
                        want.push(c);
                    }
                }
                if a == b {
                    assert!(want.is_empty());
                }
                // One leaf per call.
                let mut got = vec![];
                let mut next = Some(0);
                while let Some(start) = next {
                    next = sim
                        .s()
                        .delta(a, b, start, 1, |c| {
                            got.push(c);
                            true
                        })
                        .unwrap();
                }
                assert_eq!(got, want, "seed {} slots {} {}", seed, a, b);
                // A caller that takes at most 3 chunks per call.
                let mut got = vec![];
                let mut next = Some(0);
                while let Some(start) = next {
                    let mut n = 0;
                    next = sim
                        .s()
                        .delta(a, b, start, 64, |c| {
                            n += 1;
                            if n > 3 {
                                return false;
                            }
                            got.push(c);
                            true
                        })
                        .unwrap();
                }
                assert_eq!(got, want, "seed {} slots {} {} (stopping)", seed, a, b);
                pairs += 1;
            }
        }
    }
    println!("online delta: {} snapshot pairs checked", pairs);
}

/// Replica snapshots record their source identity; the receive progress is kept until a
/// replica is created; both survive a reopen; another source store resets the old replicas.
#[test]
fn replica_identity_and_progress() {
    let mut sim = Sim::new(new_dev(16384));
    sim.create(1).unwrap();
    let s = sim.s();
    done(s.set_progress(&[7; 84]).unwrap()).unwrap();
    assert!(s.set_progress(&[7; 129]).is_err());
    done(s.create_replica(2, [0xaa; 16], 5).unwrap()).unwrap();
    assert!(s.create_replica(3, [0; 16], 5).is_err());
    assert!(s.create_replica(3, [0xaa; 16], 0).is_err());
    assert_eq!(s.sb().progress.get(), Some(&[][..]));
    done(s.set_progress(&[9; 10]).unwrap()).unwrap();
    done(s.create_replica(3, [0xaa; 16], 9).unwrap()).unwrap();
    done(s.set_progress(&[8; 128]).unwrap()).unwrap();
    s.commit().unwrap();
    let (dev, _, _) = sim.store.take().unwrap().close().unwrap();
    check_clean(&dev);
    let mut s = Store::open(dev, VecMem::new(128), sbox()).unwrap();
    let seq_of = |s: &S, id| s.sb().snaps[s.sb().slot_of(id).unwrap()].source_seq;
    assert_eq!(s.sb().source_uuid, [0xaa; 16]);
    assert_eq!(s.sb().progress.get(), Some(&[8; 128][..]));
    assert_eq!((seq_of(&s, 1), seq_of(&s, 2), seq_of(&s, 3)), (0, 5, 9));
    // Deleting a replica forgets its source; a replica of another store resets the others.
    done(s.delete_snapshot(2).unwrap()).unwrap();
    done(s.create_replica(4, [0xbb; 16], 1).unwrap()).unwrap();
    s.commit().unwrap();
    assert_eq!(s.sb().source_uuid, [0xbb; 16]);
    assert_eq!((seq_of(&s, 3), seq_of(&s, 4)), (0, 1));
    assert!(s
        .sb()
        .snaps
        .iter()
        .all(|x| x.is_live() || x.source_seq == 0));
}

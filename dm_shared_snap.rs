// SPDX-License-Identifier: GPL-2.0

//! dm-shared-snap: device-mapper targets for many long-lived snapshots of one volume.
//!
//! `shared-origin` maps the origin and owns the COW device, which holds ONE
//! exception store shared by up to 64 snapshots; `shared-snapshot` maps one snapshot.  An
//! origin write to a chunk still shared with snapshots copies the chunk once, whatever the
//! number of snapshots, commits the new exception through the journal, and only then lets
//! the write reach the origin.
//!
//! Concurrency: `map` never waits for I/O.  It answers from cached metadata under a try-lock
//! and otherwise defers the bio to the origin's worker, which handles bios in batches: plan
//! (metadata changes in memory), copy chunks (dm-io, one buffer), commit (one journal transaction for
//! the batch), wait for snapshot reads still reading the origin, then release the bios.

use core::fmt::Write;
use kernel::c_str;
use kernel::prelude::*;
use kernel::sync::Arc;

mod dm;
// The core's `pub` items are the Cargo crate's API (lib.rs); here they are crate-visible.
// Items only the tools use carry their own `dead_code` expectation.
#[allow(unreachable_pub)]
mod exception_store;
#[allow(unreachable_pub)]
mod pdata;
mod store_io;

use dm::{
    Bio, BioKind, BioRef, Copier, CtrTarget, Device, EventHandle, Inflight, MapBio, MapResult,
    Output, Registration, Registry, StatusType, Target, TargetOps, TryMutex, WorkHandler, Worker,
};
use exception_store::format::{
    Block, BlockIo, Error as StoreError, PdataError, BLOCK_SIZE, MAX_SNAPSHOTS,
};
use exception_store::superblock::Super;
use exception_store::{Cached, FormatParams, OriginWrite, SnapWrite, Source, Step, Store};
use store_io::{CacheMemory, MetaIo};

module! {
    type: DmSharedSnapModule,
    name: "dm_shared_snap",
    author: "dm-shared-snap developers",
    description: "device-mapper shared snapshots: one exception store for up to 64 snapshots",
    license: "GPL",
}

struct DmSharedSnapModule {
    origin: Option<Registration<Origin>>,
    snapshot: Option<Registration<Snapshot>>,
}

impl kernel::Module for DmSharedSnapModule {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let origin = Registration::new(c_str!("shared-origin"), [1, 0, 0])?;
        let snapshot = Registration::new(c_str!("shared-snapshot"), [1, 0, 0])?;
        pr_info!("shared-snapshot targets registered\n");
        Ok(DmSharedSnapModule {
            origin: Some(origin),
            snapshot: Some(snapshot),
        })
    }
}

impl Drop for DmSharedSnapModule {
    fn drop(&mut self) {
        drop(self.snapshot.take());
        drop(self.origin.take());
        ORIGINS.free();
    }
}

type KStore = Store<MetaIo, CacheMemory, KBox<Super>>;

/// Metadata blocks cached per origin (4 KiB each).
const CACHE_BLOCKS: usize = 512;
/// Bios handled per worker batch (one journal commit).
const BATCH: usize = 32;
/// Bios a batch sets aside for the next one (their chunk is in it) before it stops looking.
const BATCH_LATER: usize = 64;
/// Bios a batch takes off the queue at most (writes that need no copy are sent on at once).
const BATCH_POPS: usize = 256;
/// Leaves visited per snapshot-deletion step.
const DELETE_STEP_LEAVES: usize = 16;

// Per-bio word: who the bio belongs to and which in-flight counter it holds.
const TAG_WRITE_COUNTED: u64 = 1;
const TAG_READ_COUNTED: u64 = 2;
const TAG_SNAP: u64 = 1 << 8;
const TAG_SLOT_SHIFT: u32 = 16;

/// The devices an active origin target claims: a second origin on any of them is refused,
/// and a snapshot finds its origin by the first two.
#[derive(PartialEq, Eq, Clone, Copy)]
struct OriginKey {
    /// The mapped device of the `shared-origin` table.
    md: u32,
    /// The origin device under it.
    origin: u32,
    /// The COW device.
    cow: u32,
}

static ORIGINS: Registry<OriginKey, Shared> = Registry::new();

/// A dev_t printed as dm prints devices ("major:minor").
struct DevT(u32);

impl core::fmt::Display for DevT {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}:{}", self.0 >> 20, self.0 & 0xfffff)
    }
}

/// What the worker may use while the origin target exists: the origin target's open
/// devices and its dm_target (for events).  The origin's destructor takes it away under the
/// state lock before it releases them, so whoever holds the lock and sees it may use it.
#[derive(Clone)]
struct Attached {
    origin_h: Device,
    cow_h: Device,
    event: EventHandle,
}

/// Mutable per-origin state, behind the origin's lock.
struct State {
    /// None once the origin target is destroyed: snapshots still active then fail their I/O.
    attached: Option<Attached>,
    store: Option<KBox<KStore>>,
    /// Why the COW device was given up (snapshots then fail; the origin keeps working).
    failed: Option<&'static str>,
    /// Active snapshot targets per slot.
    snap_refs: [u32; MAX_SNAPSHOTS],
    /// Worker statistics (the `stats` message).
    stats: Stats,
    /// Copies chunks for the worker's batches.
    copier: Copier,
    /// Set when the batch in progress lost its store (its copies and commit are void).
    gave_up: bool,
    /// A snapshot was invalidated (COW device full) and that is not committed yet: until it
    /// is, an origin write that needs no copy only because of it must wait for the commit.
    invalidation_pending: bool,
    /// The origin is suspending or suspended: background work (the deletion sweep) waits.
    suspended: bool,
}

impl State {
    /// Raises a dm event on the origin (wakes `dmsetup wait`), if it still exists.
    fn raise_event(&self) {
        if let Some(a) = &self.attached {
            a.event.raise();
        }
    }
}

/// Counters reported by the `stats` message.
#[derive(Default)]
struct Stats {
    batches: u64,
    bios: u64,
    copy_jobs: u64,
    copied_chunks: u64,
    /// Deferred origin writes that needed no copy, sent on at once by the worker.
    passed: u64,
    commits: u64,
    /// Worker time (ns) spent planning, waiting for copies, committing, releasing.
    plan_ns: u64,
    copy_ns: u64,
    commit_ns: u64,
    release_ns: u64,
}

/// What is shared between an origin target, its worker and its snapshot targets.  It
/// outlives the origin target while snapshot targets hold it.  The origin's devices are
/// reachable from it only through `State.attached` and the store (whose metadata I/O holds
/// the COW device): `Origin::dtr` takes both away under the state lock, so that the last
/// reference to each of the origin table's devices goes before its destructor returns.
pub(crate) struct Shared {
    // Shut down first, by `Drop`: drains the worker while everything it uses is alive.
    worker: Worker<Shared>,
    state: TryMutex<State>,
    writes_inflight: Inflight,
    /// Snapshot reads in flight (from the origin or the COW device): a batch that lets the
    /// origin or another snapshot overwrite what such a read may be reading waits for them.
    snap_reads: Inflight,
    key: OriginKey,
    /// The table was loaded read-only: nothing is written to any device.
    readonly: bool,
    chunk_sectors: u64,
    chunk_shift: u32,
    data_sector: u64,
    /// Length of the origin target: the largest snapshot, and where copies of a last,
    /// partial chunk stop (dm keeps it a multiple of every device's logical block size).
    origin_sectors: u64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.worker.shutdown();
    }
}

/// The `shared-origin` target.  (The issue asked for `shared-snapshot-origin`, but target
/// type names travel in the 16-byte `dm_target_spec.target_type` of the dm ioctl ABI, so
/// names of 16 characters or more cannot be loaded by dmsetup at all.)
pub(crate) struct Origin {
    shared: Arc<Shared>,
    origin: Device,
    cow: Device,
}

/// The `shared-snapshot` target.  It opens the origin and COW devices itself (as
/// dm-snapshot's snapshot does), so that its bios never depend on the origin table's
/// devices, and a mounted origin and its snapshots share the claim on the origin device.
pub(crate) struct Snapshot {
    shared: Arc<Shared>,
    slot: usize,
    id: u32,
    /// Its table, or its origin's, is read-only: writes fail.
    readonly: bool,
    origin: Device,
    cow: Device,
}

fn parse_u32(s: &CStr) -> Option<u32> {
    let s = s.to_str().ok()?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn fail(t: &Target, msg: &'static CStr, e: Error) -> Error {
    t.set_error(msg);
    e
}

/// The errno for a store error, and the ti->error message a constructor sets with it.
/// `opening`: the error came from formatting or opening the COW device in a constructor,
/// where a device that holds no usable store is an invalid argument; on a store in use,
/// every failure that is not the caller's own mistake is an I/O error.
fn store_errno(e: StoreError, opening: bool) -> (Error, &'static CStr) {
    let errno = match e {
        StoreError::Pdata(PdataError::Io { .. } | PdataError::Flush) | StoreError::DataCopy => EIO,
        StoreError::NoMemory => ENOMEM,
        StoreError::DuplicateId => EEXIST,
        StoreError::TooManySnapshots => ENOSPC,
        StoreError::NoSuchSnapshot => ENOENT,
        StoreError::ReadOnly => EROFS,
        _ if opening => EINVAL,
        _ => EIO,
    };
    let msg = match e {
        StoreError::NotAStore(_) => {
            c_str!("COW device holds no shared-snapshot store (foreign data, wrong version or truncated)")
        }
        StoreError::Pdata(PdataError::Corrupt { .. }) => {
            c_str!("COW device metadata is corrupt (see dmesg, run shsnap check)")
        }
        StoreError::Pdata(PdataError::Io { .. } | PdataError::Flush) => {
            c_str!("I/O error reading the COW device")
        }
        StoreError::Invalid(_) => c_str!("COW device too small for a store"),
        _ => c_str!("cannot open the exception store"),
    };
    (errno, msg)
}

/// The part of a COW device the store can use: whole 4 KiB blocks (what its queue limits
/// are checked over, so that a device of an odd size stacks on a 4 KiB-sector target).
fn store_sectors(cow: &Device) -> u64 {
    cow.sectors() & !(exception_store::format::BLOCK_SECTORS - 1)
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

impl Origin {
    /// Formats the COW device if its first block is zero.
    #[inline(never)]
    fn format_if_new(
        t: &CtrTarget,
        cow: &Device,
        io: &mut MetaIo,
        chunk: u32,
        readonly: bool,
    ) -> Result {
        let mut buf = KVec::from_elem(0u8, BLOCK_SIZE, GFP_KERNEL)?;
        let block: &mut Block = (&mut buf[..]).try_into().map_err(|_| EINVAL)?;
        if let Err(e) = io.read_block(0, block) {
            pr_err!("{}: reading the COW superblock: {}\n", cow.name(), e);
            return Err(fail(t, c_str!("I/O error reading the COW device"), EIO));
        }
        if is_zero(block) && readonly {
            return Err(fail(
                t,
                c_str!("COW device holds no store, and a read-only table formats nothing"),
                EROFS,
            ));
        }
        if is_zero(block) {
            let p = FormatParams {
                chunk_sectors: chunk,
                store_id: dm::random_u64() | 1,
                uuid: [0; 16],
                meta_blocks: 0,
            };
            if let Err(e) = exception_store::format(io, &p, block) {
                pr_err!("{}: formatting the COW device: {}\n", cow.name(), e);
                let (e, m) = store_errno(e, true);
                return Err(fail(t, m, e));
            }
            pr_info!(
                "{}: formatted a new exception store, chunk {} sectors\n",
                cow.name(),
                chunk
            );
        }
        Ok(())
    }

    #[inline(never)]
    fn open_store(t: &CtrTarget, cow: &Device, chunk: u32, readonly: bool) -> Result<KBox<KStore>> {
        let mut io = MetaIo::new(cow)?;
        let mem = CacheMemory::new(CACHE_BLOCKS)?;
        Self::format_if_new(t, cow, &mut io, chunk, readonly)?;
        let sb = KBox::new(Super::empty(), GFP_KERNEL)?;
        let opened = if readonly {
            Store::open_readonly(io, mem, sb)
        } else {
            Store::open(io, mem, sb)
        };
        match opened {
            Ok(s) => {
                if s.sb().layout.chunk_sectors != chunk {
                    pr_err!(
                        "{}: store has chunk size {}, table says {}\n",
                        cow.name(),
                        s.sb().layout.chunk_sectors,
                        chunk
                    );
                    let e = fail(
                        t,
                        c_str!("chunk size differs from the one the COW device was formatted with"),
                        EINVAL,
                    );
                    // Opened read-write, the store is marked in use: close it cleanly.
                    Self::close_store(KBox::new(s, GFP_KERNEL)?, readonly, cow.name());
                    return Err(e);
                }
                if s.replay.applied > 0 {
                    pr_info!(
                        "{}: journal replay applied {} transactions\n",
                        cow.name(),
                        s.replay.applied
                    );
                }
                Ok(KBox::new(s, GFP_KERNEL)?)
            }
            Err(e) => {
                pr_err!("{}: cannot open exception store: {}\n", cow.name(), e);
                let (e, m) = store_errno(e, true);
                Err(fail(t, m, e))
            }
        }
    }

    /// The rest of the constructor, once the devices are claimed.
    #[inline(never)]
    fn construct(
        t: &CtrTarget,
        key: OriginKey,
        origin: Device,
        cow: Device,
        chunk: u32,
        started: u64,
    ) -> Result<KBox<Self>> {
        let readonly = !t.is_writable();
        let store = Self::open_store(t, &cow, chunk, readonly)?;
        let cache_bytes = store.mem().bytes();
        // No split at chunk boundaries: `map` passes runs of unshared chunks whole and cuts
        // off the first chunk of a run that needs a copy.
        if let Err(e) = t.setup(0, 1) {
            Self::close_store(store, readonly, cow.name());
            return Err(fail(t, c_str!("cannot set the maximum I/O size"), e));
        }
        let data_sector = store.sb().layout.chunk_sector(0);
        let nsnaps = store.sb().live_mask().count_ones();
        let usage = store.usage();
        let attached = Attached {
            origin_h: origin.clone(),
            cow_h: cow.clone(),
            event: t.event_handle(),
        };
        let shared = Shared {
            worker: Worker::new(),
            state: TryMutex::new(State {
                attached: Some(attached),
                store: Some(store),
                failed: None,
                snap_refs: [0; MAX_SNAPSHOTS],
                stats: Stats::default(),
                copier: Copier::new()?,
                gave_up: false,
                invalidation_pending: false,
                suspended: false,
            })?,
            writes_inflight: Inflight::new()?,
            snap_reads: Inflight::new()?,
            key,
            readonly,
            chunk_sectors: chunk as u64,
            chunk_shift: chunk.trailing_zeros(),
            data_sector,
            origin_sectors: t.len(),
        };
        // On any error below, dropping `shared` drops the store unclosed: the next
        // activation replays its journal, as after a crash.
        let shared = Arc::new(shared, GFP_KERNEL)?;
        Worker::start(&shared)?;
        let o = KBox::new(
            Origin {
                shared,
                origin,
                cow,
            },
            GFP_KERNEL,
        )?;
        // Visible to snapshots only now that nothing can fail any more.
        ORIGINS.publish(&key, o.shared.clone());
        pr_info!(
            "origin {} on COW {}{}: {} snapshots, {}/{} chunks, {}/{} metadata blocks, \
             cache {} KiB, activated in {} us\n",
            o.origin.name(),
            o.cow.name(),
            if readonly { " (read-only)" } else { "" },
            nsnaps,
            usage.data_used,
            usage.data_total,
            usage.meta_used,
            usage.meta_total,
            cache_bytes / 1024,
            (dm::now_ns() - started) / 1000
        );
        Ok(o)
    }

    /// Closes the store (commit, mark clean, checkpoint), or only drops it when the table
    /// is read-only and must write nothing.
    fn close_store(store: KBox<KStore>, readonly: bool, name: &CStr) {
        if readonly {
            drop(KBox::into_inner(store).abandon());
        } else if let Err(e) = KBox::into_inner(store).close() {
            pr_err!("{}: closing the exception store: {}\n", name, e);
        }
    }
}

impl TargetOps for Origin {
    fn ctr(t: &CtrTarget, args: &[&CStr]) -> Result<KBox<Self>> {
        let started = dm::now_ns();
        if args.len() < 3 {
            return Err(fail(
                t,
                c_str!(
                    "expected <origin_dev> <cow_dev> <chunk_sectors> [<#features> <feature>...]"
                ),
                EINVAL,
            ));
        }
        let Some(chunk) = parse_u32(args[2]) else {
            return Err(fail(t, c_str!("invalid chunk size"), EINVAL));
        };
        if !chunk.is_power_of_two() || !(8..=2048).contains(&chunk) {
            return Err(fail(
                t,
                c_str!("chunk size must be a power of two from 8 to 2048 sectors"),
                EINVAL,
            ));
        }
        if args.len() > 3 {
            let Some(nf) = parse_u32(args[3]) else {
                return Err(fail(t, c_str!("invalid feature count"), EINVAL));
            };
            if args.len() != 4 + nf as usize {
                return Err(fail(
                    t,
                    c_str!("feature count does not match the arguments"),
                    EINVAL,
                ));
            }
            if nf > 0 {
                return Err(fail(t, c_str!("unknown feature"), EINVAL));
            }
        }
        let origin = t
            .get_device(args[0])
            .map_err(|e| fail(t, c_str!("cannot open origin device"), e))?;
        let cow = t
            .get_device(args[1])
            .map_err(|e| fail(t, c_str!("cannot open COW device"), e))?;
        if origin.devt() == cow.devt() {
            return Err(fail(t, c_str!("origin and COW device must differ"), EINVAL));
        }
        if origin.is_zoned() || cow.is_zoned() {
            return Err(fail(t, c_str!("zoned devices are not supported"), EINVAL));
        }
        if t.len() > origin.sectors() {
            return Err(fail(
                t,
                c_str!("target is larger than the origin device"),
                EINVAL,
            ));
        }
        let key = OriginKey {
            md: t.devt(),
            origin: origin.devt(),
            cow: cow.devt(),
        };
        // Claimed before the store is opened (which may format or replay it), so that two
        // tables can never open one store; a device already claimed as origin or COW by
        // another origin cannot be either here.
        let claimed = |k: &OriginKey| {
            k.md == key.md
                || [k.origin, k.cow].contains(&key.origin)
                || [k.origin, k.cow].contains(&key.cow)
        };
        if ORIGINS.claim(key, claimed).is_err() {
            return Err(fail(
                t,
                c_str!("origin or COW device is in use by another shared-origin target"),
                EBUSY,
            ));
        }
        let r = Self::construct(t, key, origin, cow, chunk, started);
        if r.is_err() {
            ORIGINS.release(&key);
        }
        r
    }

    fn dtr(self: KBox<Self>, _t: &Target) {
        let sh = &*self.shared;
        // New snapshots cannot find this origin any more; the devices stay claimed until
        // the store is closed, so that no other origin can open it meanwhile.
        drop(ORIGINS.unpublish(&sh.key));
        // Let the worker finish what it holds while the devices are still ours.
        sh.worker.flush();
        let mut st = sh.state.lock();
        // From here on, snapshots still active fail their I/O instead of reaching devices
        // this target is about to release.  `attached` and the store hold the only clones
        // of this table's devices in `Shared`: both go before this destructor returns, as
        // `Device` requires.
        st.attached = None;
        let store = st.store.take();
        if st.failed.is_none() {
            st.failed = Some("origin target removed");
            if let Some(store) = store {
                Self::close_store(store, sh.readonly, self.cow.name());
            }
        }
        drop(st);
        ORIGINS.release(&sh.key);
        // Bios snapshots deferred meanwhile are failed by the worker (no store).
        sh.worker.kick();
    }

    fn map(&self, t: &Target, mut bio: MapBio<'_>) -> MapResult {
        let sh = &*self.shared;
        bio.set_tag(0);
        let off = bio.sector() - t.begin();
        let origin_h = &self.origin;
        match bio.kind() {
            BioKind::Read | BioKind::Flush => {
                bio.remap(origin_h, off);
                MapResult::Remapped
            }
            // The block layer lets writes through to a read-only mapped device.
            BioKind::Write if sh.readonly => MapResult::Kill,
            BioKind::Write => {
                let end = off + bio.sectors() as u64;
                let chunk = off >> sh.chunk_shift;
                if let Some(mut guard) = sh.state.try_lock() {
                    let st = &mut *guard;
                    // The leading run of chunks no live snapshot shares goes straight through.
                    let unshared_end = match (&st.failed, st.store.as_mut()) {
                        (None, Some(s)) => {
                            let mut c = chunk;
                            while c << sh.chunk_shift < end
                                && s.origin_sharers_cached(c) == Ok(Cached::Hit(0))
                            {
                                c += 1;
                            }
                            end.min(c << sh.chunk_shift)
                        }
                        _ => end,
                    };
                    if unshared_end > off {
                        if unshared_end < end
                            && bio.accept_partial((unshared_end - off) as u32).is_err()
                        {
                            return MapResult::Kill;
                        }
                        bio.set_tag(TAG_WRITE_COUNTED);
                        sh.writes_inflight.inc();
                        bio.remap(origin_h, off);
                        return MapResult::Remapped;
                    }
                }
                // The worker takes one chunk per bio: dm maps the rest as a new bio.
                let chunk_end = end.min((chunk + 1) << sh.chunk_shift);
                if chunk_end < end && bio.accept_partial((chunk_end - off) as u32).is_err() {
                    return MapResult::Kill;
                }
                // Deferred bios carry their offset in the target as sector.
                bio.remap(origin_h, off);
                sh.worker.defer(bio.into_inner());
                MapResult::Submitted
            }
            BioKind::Discard | BioKind::Other => MapResult::Kill,
        }
    }

    fn end_io(&self, bio: &BioRef) {
        self.shared.end_io(bio);
    }

    fn status(&self, ty: StatusType, out: &mut Output) {
        let sh = &*self.shared;
        match ty {
            StatusType::Info => {
                let st = sh.state.lock();
                match (&st.failed, st.store.as_ref()) {
                    (None, Some(s)) => {
                        let u = s.usage();
                        let sb = s.sb();
                        let _ = write!(
                            out,
                            "{}/{} {}/{} {} ok ",
                            u.data_used,
                            u.data_total,
                            u.meta_used,
                            u.meta_total,
                            sb.live_mask().count_ones()
                        );
                        let mut any = false;
                        for snap in sb.snaps.iter().filter(|x| x.is_live() && x.is_invalid()) {
                            let _ =
                                write!(out, "{}{}", if any { "," } else { "invalid:" }, snap.id);
                            any = true;
                        }
                        if !any {
                            let _ = write!(out, "-");
                        }
                    }
                    (why, _) => {
                        let _ = write!(out, "- - - fail {}", why.unwrap_or("closed"));
                    }
                }
            }
            StatusType::Table => {
                let _ = write!(
                    out,
                    "{} {} {}",
                    self.origin.name(),
                    self.cow.name(),
                    sh.chunk_sectors
                );
            }
            StatusType::Other => {}
        }
    }

    fn message(&self, _t: &Target, args: &[&CStr], out: &mut Output) -> Result {
        let sh = &*self.shared;
        let cmd = args.first().and_then(|a| a.to_str().ok()).unwrap_or("");
        match (cmd, args.len()) {
            ("create", 2) | ("delete", 2) => {
                let Some(id) = parse_u32(args[1]) else {
                    pr_err!("{}: invalid snapshot id\n", self.origin.name());
                    return Err(EINVAL);
                };
                if sh.readonly {
                    pr_err!("{}: read-only table: no {}\n", self.origin.name(), cmd);
                    return Err(EROFS);
                }
                let mut st = sh.state.lock();
                let st = &mut *st;
                if st.failed.is_some() {
                    pr_err!(
                        "{}: COW device failed; snapshots unavailable\n",
                        self.origin.name()
                    );
                    return Err(EIO);
                }
                let Some(store) = st.store.as_mut() else {
                    return Err(EIO);
                };
                if cmd == "create" {
                    // Writes mapped straight through before this point must be on the origin
                    // before the snapshot exists; new ones wait for the lock we hold.
                    sh.writes_inflight.wait_zero();
                    sh.create(store, id)
                } else {
                    let r = sh.delete(store, &st.snap_refs, id);
                    sh.worker.kick();
                    r
                }
            }
            ("stats", 1) => {
                let st = sh.state.lock();
                let s = &st.stats;
                let meta_reads = st.store.as_ref().map_or(0, |s| s.cache_reads());
                let _ = write!(
                    out,
                    "batches {} bios {} copy_jobs {} copied_chunks {} commits {} \
                     plan_us {} copy_us {} commit_us {} release_us {} meta_reads {} passed {}",
                    s.batches,
                    s.bios,
                    s.copy_jobs,
                    s.copied_chunks,
                    s.commits,
                    s.plan_ns / 1000,
                    s.copy_ns / 1000,
                    s.commit_ns / 1000,
                    s.release_ns / 1000,
                    meta_reads,
                    s.passed
                );
                Ok(())
            }
            ("list", 1) => {
                let st = sh.state.lock();
                if let Some(s) = st.store.as_ref() {
                    let mut first = true;
                    for snap in s.sb().snaps.iter().filter(|x| x.is_live()) {
                        let _ = write!(out, "{}{}", if first { "" } else { " " }, snap.id);
                        first = false;
                    }
                }
                Ok(())
            }
            _ => {
                pr_err!(
                    "{}: unknown message (expected create <id>, delete <id>, list or stats)\n",
                    self.origin.name()
                );
                Err(EINVAL)
            }
        }
    }

    fn presuspend(&self) {
        // Background work stops before dm waits for the I/O in flight: the deletion sweep
        // starts no new step until resume, and the step running now ends under the lock.
        self.shared.state.lock().suspended = true;
    }

    fn presuspend_undo(&self) {
        self.resume();
    }

    fn postsuspend(&self) {
        let sh = &*self.shared;
        sh.worker.flush();
        let mut st = sh.state.lock();
        if st.failed.is_none() && !sh.readonly {
            if let Some(s) = st.store.as_mut() {
                if let Err(e) = s.commit() {
                    pr_err!("{}: commit at suspend: {}\n", self.cow.name(), e);
                }
            }
        }
    }

    fn resume(&self) {
        self.shared.state.lock().suspended = false;
        self.shared.worker.kick();
    }

    fn device(&self, idx: u32) -> Option<(&Device, u64)> {
        // The origin is mapped linearly over [0, len); the COW device is addressed anywhere
        // in it, so it counts whole (it may be smaller than the origin).
        match idx {
            0 => Some((&self.origin, self.shared.origin_sectors)),
            1 => Some((&self.cow, store_sectors(&self.cow))),
            _ => None,
        }
    }
}

/// The snapshot slot a snapshot bio's tag names.
fn slot_of_tag(tag: u64) -> usize {
    ((tag >> TAG_SLOT_SHIFT) & 63) as usize
}

/// Result of planning one deferred bio.
enum Action {
    /// Origin write; copy the chunk to this COW chunk first.
    OriginWrite(Option<u64>),
    /// Snapshot read from here.
    SnapRead(Source),
    /// Snapshot write to COW chunk `dst`, after copying `from` there.
    SnapWrite { dst: u64, from: Option<Source> },
    /// Complete with this errno.
    Fail(Error),
}

struct Item {
    bio: Bio,
    off: u64,
    action: Action,
}

impl Shared {
    fn chunk_of(&self, off: u64) -> u64 {
        off >> self.chunk_shift
    }

    fn cow_sector(&self, cow_chunk: u64, off: u64) -> u64 {
        self.data_sector + (cow_chunk << self.chunk_shift) + (off & (self.chunk_sectors - 1))
    }

    fn end_io(&self, bio: &BioRef) {
        let tag = bio.tag();
        if tag & TAG_WRITE_COUNTED != 0 {
            self.writes_inflight.dec();
        }
        if tag & TAG_READ_COUNTED != 0 {
            self.snap_reads.dec();
        }
    }

    fn create(&self, store: &mut KStore, id: u32) -> Result {
        match commit_op(store, |s| s.create_snapshot(id).map(|r| r.map(|_| ()))) {
            Ok(()) => {
                pr_info!("{}: created snapshot {}\n", DevT(self.key.origin), id);
                Ok(())
            }
            Err(e) => {
                pr_err!(
                    "{}: cannot create snapshot {}: {}\n",
                    DevT(self.key.origin),
                    id,
                    e
                );
                Err(store_errno(e, false).0)
            }
        }
    }

    fn delete(&self, store: &mut KStore, refs: &[u32; MAX_SNAPSHOTS], id: u32) -> Result {
        if let Some(slot) = store.sb().slot_of(id) {
            if refs[slot] > 0 {
                pr_err!(
                    "{}: snapshot {} has an active device; remove it first\n",
                    DevT(self.key.origin),
                    id
                );
                return Err(EBUSY);
            }
        }
        match commit_op(store, |s| s.delete_snapshot(id)) {
            Ok(()) => {
                pr_info!("{}: deleted snapshot {}\n", DevT(self.key.origin), id);
                Ok(())
            }
            Err(e) => {
                pr_err!(
                    "{}: cannot delete snapshot {}: {}\n",
                    DevT(self.key.origin),
                    id,
                    e
                );
                Err(store_errno(e, false).0)
            }
        }
    }

    /// Gives up on the COW device: snapshots fail from now on, the origin keeps working.
    /// After an error that left the in-memory store unusable: reopen it from disk (journal
    /// replay drops the unfinished transaction), mark every snapshot invalid there and
    /// commit, so that origin writes may go on without copy-out and no snapshot is ever
    /// read stale, even after a restart.  If even that fails, snapshots fail from now on
    /// (the origin still works).
    fn give_up(&self, st: &mut State, why: &'static str, e: StoreError) {
        st.gave_up = true;
        if st.failed.is_some() {
            return;
        }
        pr_err!(
            "{}: {} ({}); invalidating all snapshots of {}\n",
            DevT(self.key.cow),
            why,
            e,
            DevT(self.key.origin)
        );
        st.raise_event();
        if self.readonly {
            // Nothing may be written: snapshots fail until the next activation.
            st.store = None;
            st.failed = Some(why);
            return;
        }
        match st.store.take().map(|old| Self::reopen_invalidated(old)) {
            Some(Ok(b)) => {
                pr_err!(
                    "{}: snapshots marked invalid on disk; the origin continues\n",
                    DevT(self.key.cow)
                );
                st.store = Some(b);
            }
            Some(Err(e2)) => {
                pr_err!(
                    "{}: cannot record the invalidation ({}); snapshots fail until reactivation\n",
                    DevT(self.key.cow),
                    e2
                );
                st.failed = Some(why);
            }
            None => st.failed = Some(why),
        }
    }

    #[inline(never)]
    fn reopen_invalidated(old: KBox<KStore>) -> core::result::Result<KBox<KStore>, StoreError> {
        let (io, mem, sb) = KBox::into_inner(old).abandon();
        let mut s = Store::open(io, mem, sb)?;
        let live = s.sb().live_mask();
        s.invalidate(live)?;
        s.commit()?;
        KBox::new(s, GFP_NOWAIT | __GFP_NOWARN).map_err(|_| StoreError::NoMemory)
    }

    fn plan(&self, st: &mut State, bio: &Bio, off: u64) -> Step<Action> {
        let tag = bio.tag();
        let chunk = self.chunk_of(off);
        let snap = tag & TAG_SNAP != 0;
        if st.failed.is_some() || st.store.is_none() {
            return Step::Done(if snap {
                Action::Fail(EIO)
            } else {
                Action::OriginWrite(None)
            });
        }
        let Some(store) = st.store.as_mut() else {
            return Step::Done(Action::Fail(EIO));
        };
        if !snap {
            return match store.origin_write(chunk) {
                Ok(Step::Done(OriginWrite::NoCopy)) => Step::Done(Action::OriginWrite(None)),
                Ok(Step::Done(OriginWrite::Copy(c))) => Step::Done(Action::OriginWrite(Some(c))),
                Ok(Step::Done(OriginWrite::Invalidated(mask))) => {
                    st.invalidation_pending = true;
                    pr_err!(
                        "{}: COW device full: invalidated snapshot slots {:#x}\n",
                        DevT(self.key.cow),
                        mask
                    );
                    st.raise_event();
                    Step::Done(Action::OriginWrite(None))
                }
                Ok(Step::CommitFirst) => Step::CommitFirst,
                Err(e) => {
                    self.give_up(st, "metadata error on origin write", e);
                    Step::Done(Action::OriginWrite(None))
                }
            };
        }
        let slot = slot_of_tag(tag);
        if bio.kind() == BioKind::Read {
            return Step::Done(match store.lookup(chunk, slot) {
                Ok(src) => Action::SnapRead(src),
                Err(StoreError::SnapshotInvalid) | Err(StoreError::NoSuchSnapshot) => {
                    Action::Fail(EIO)
                }
                Err(e) => {
                    self.give_up(st, "metadata error on snapshot read", e);
                    Action::Fail(EIO)
                }
            });
        }
        Step::Done(match store.snapshot_write(chunk, slot) {
            Ok(Step::Done(SnapWrite::InPlace(c))) => Action::SnapWrite { dst: c, from: None },
            // The chunk is copied even when the bio covers all of it: the commit that maps
            // the new chunk is durable before the bio's data is, and a power cut between
            // the two must show the snapshot's old data there, not the chunk's last use.
            Ok(Step::Done(SnapWrite::Copy { from, to })) => Action::SnapWrite {
                dst: to,
                from: Some(from),
            },
            Ok(Step::CommitFirst) => return Step::CommitFirst,
            Err(StoreError::NoDataSpace) => {
                st.invalidation_pending = true;
                pr_err!(
                    "{}: COW device full: snapshot slot {} invalidated\n",
                    DevT(self.key.cow),
                    slot
                );
                st.raise_event();
                Action::Fail(EIO)
            }
            Err(StoreError::SnapshotInvalid) | Err(StoreError::NoSuchSnapshot) => Action::Fail(EIO),
            Err(e) => {
                self.give_up(st, "metadata error on snapshot write", e);
                Action::Fail(EIO)
            }
        })
    }

    /// Sends an origin write to the origin device.
    fn submit_origin_write(&self, at: &Attached, mut bio: Bio, off: u64) {
        // Counted like the writes `map` passes through: a snapshot created from now on
        // waits for it.
        bio.set_tag(TAG_WRITE_COUNTED);
        self.writes_inflight.inc();
        bio.remap(&at.origin_h, off);
        bio.submit();
    }

    /// Sends a snapshot read (counted: see `snap_reads`).
    fn submit_snap_read(&self, mut bio: Bio, dev: &Device, sector: u64) {
        bio.set_tag(bio.tag() | TAG_READ_COUNTED);
        self.snap_reads.inc();
        bio.remap(dev, sector);
        bio.submit();
    }

    /// Plans, copies, commits and releases one batch.  Returns false when the queue is empty.
    fn run_batch(&self, st: &mut State) -> bool {
        let Some(at) = st.attached.clone() else {
            // The origin target is gone: fail what snapshots still send.
            let mut any = false;
            while let Some(bio) = self.worker.pop() {
                bio.endio(EIO.to_errno());
                any = true;
            }
            return any;
        };
        st.gave_up = false;
        let t0 = dm::now_ns();
        let mut items: [Option<Item>; BATCH] = [const { None }; BATCH];
        let mut n = 0;
        // Bios for a chunk already in the batch, in arrival order: they wait for the next one.
        let mut later: [Option<Bio>; BATCH_LATER] = [const { None }; BATCH_LATER];
        let mut nlater = 0;
        let mut popped = 0;
        while n < BATCH && popped < BATCH_POPS {
            let Some(bio) = self.worker.pop() else { break };
            popped += 1;
            let off = bio.sector();
            let chunk = self.chunk_of(off);
            // One bio per chunk per batch: copies within a batch never depend on each other.
            if items[..n]
                .iter()
                .flatten()
                .any(|it| self.chunk_of(it.off) == chunk)
            {
                if nlater == BATCH_LATER {
                    self.worker.push_front(bio);
                    break;
                }
                later[nlater] = Some(bio);
                nlater += 1;
                continue;
            }
            match self.plan(st, &bio, off) {
                // An origin write deferred only because `map` found the lock taken, to a
                // chunk no snapshot needs copied: it goes now, as `map` would have sent it,
                // instead of taking a place in the batch and waiting for its commit.
                Step::Done(Action::OriginWrite(None))
                    if st.failed.is_none() && !st.gave_up && !st.invalidation_pending =>
                {
                    st.stats.passed += 1;
                    self.submit_origin_write(&at, bio, off);
                }
                Step::Done(action) => {
                    items[n] = Some(Item { bio, off, action });
                    n += 1;
                }
                Step::CommitFirst if n > 0 => {
                    // Transaction full: finish this batch first.
                    self.worker.push_front(bio);
                    break;
                }
                Step::CommitFirst => {
                    self.worker.push_front(bio);
                    if let Some(s) = st.store.as_mut() {
                        if let Err(e) = s.commit() {
                            self.give_up(st, "journal commit failed", e);
                        }
                    }
                }
            }
        }
        // Back at the head of the queue, ahead of everything that came after them.
        for slot in later[..nlater].iter_mut().rev() {
            if let Some(bio) = slot.take() {
                self.worker.push_front(bio);
            }
        }
        if n == 0 {
            // Only writes sent on at once: the queue may still hold more.
            return popped > 0;
        }
        let t1 = dm::now_ns();
        let mut copying = false;
        // Whether this batch lets data that a snapshot read in flight may be reading be
        // overwritten once it is released: an origin write, or a snapshot's write that
        // unshares a chunk (so that the origin, or the other sharers of its COW chunk, may
        // then write it in place without the worker).
        let mut drain_reads = false;
        // Adjacent chunks going to adjacent COW chunks are copied as one run.
        let mut run: Option<(&Device, u64, u64, u64)> = None;
        let mut batch = st.copier.batch();
        for it in items[..n].iter().flatten() {
            let chunk = self.chunk_of(it.off);
            let copy = match it.action {
                Action::OriginWrite(c) => {
                    drain_reads = true;
                    c.map(|c| {
                        (
                            &at.origin_h,
                            chunk << self.chunk_shift,
                            self.cow_sector(c, 0),
                        )
                    })
                }
                Action::SnapWrite {
                    dst,
                    from: Some(src),
                } => {
                    drain_reads = true;
                    Some(match src {
                        Source::Origin => (
                            &at.origin_h,
                            chunk << self.chunk_shift,
                            self.cow_sector(dst, 0),
                        ),
                        Source::Cow(c) => {
                            (&at.cow_h, self.cow_sector(c, 0), self.cow_sector(dst, 0))
                        }
                    })
                }
                _ => None,
            };
            let Some((dev, src, dst)) = copy else {
                continue;
            };
            // The last chunk of an origin whose size is not a multiple of the chunk size
            // is copied only as far as the target goes (no snapshot reads beyond it).
            let len = if dev.same(&at.origin_h) {
                self.chunk_sectors
                    .min(self.origin_sectors.saturating_sub(src))
            } else {
                self.chunk_sectors
            };
            if len == 0 {
                continue;
            }
            if st.gave_up {
                continue;
            }
            copying = true;
            st.stats.copied_chunks += 1;
            match run.as_mut() {
                Some((d, s, t, n)) if d.same(dev) && *s + *n == src && *t + *n == dst => *n += len,
                _ => {
                    if let Some((d, s, t, n)) = run.take() {
                        batch.copy(d, s, &at.cow_h, t, n);
                        st.stats.copy_jobs += 1;
                    }
                    run = Some((dev, src, dst, len));
                }
            }
        }
        if let Some((d, s, t, n)) = run.take() {
            batch.copy(d, s, &at.cow_h, t, n);
            st.stats.copy_jobs += 1;
        }
        let copied = if copying {
            batch.wait()
        } else {
            drop(batch);
            Ok(())
        };
        st.stats.batches += 1;
        st.stats.bios += n as u64;
        if copied.is_err() {
            self.give_up(st, "copy to the COW device failed", StoreError::DataCopy);
        }
        let t2 = dm::now_ns();
        // An invalidated snapshot stops sharing its chunks: the origin may then write them
        // in place (the commit below clears the flag).
        let invalidated = st.invalidation_pending;
        if st.failed.is_none() && !st.gave_up {
            if let Some(s) = st.store.as_mut() {
                let dirty = s.is_dirty();
                match s.commit() {
                    Ok(()) if dirty => st.stats.commits += 1,
                    Ok(()) => {}
                    Err(e) => self.give_up(st, "journal commit failed", e),
                }
                if st.failed.is_none() && !st.gave_up {
                    st.invalidation_pending = false;
                }
            }
        }
        if drain_reads || invalidated || st.gave_up {
            // Snapshot reads in flight must finish before what they read can change.
            self.snap_reads.wait_zero();
        }
        // Reads planned before their snapshot was invalidated in this batch fail.
        let valid = st.store.as_ref().map_or(0, |s| s.sb().valid_mask());
        let t3 = dm::now_ns();
        let failed = st.failed.is_some() || st.gave_up;
        for it in items[..n].iter_mut() {
            let Some(Item {
                mut bio,
                off,
                action,
            }) = it.take()
            else {
                continue;
            };
            match action {
                Action::OriginWrite(_) => self.submit_origin_write(&at, bio, off),
                Action::Fail(e) => bio.endio(e.to_errno()),
                _ if failed => bio.endio(EIO.to_errno()),
                Action::SnapRead(_) if valid & (1 << slot_of_tag(bio.tag())) == 0 => {
                    bio.endio(EIO.to_errno())
                }
                Action::SnapRead(Source::Origin) => self.submit_snap_read(bio, &at.origin_h, off),
                Action::SnapRead(Source::Cow(c)) => {
                    self.submit_snap_read(bio, &at.cow_h, self.cow_sector(c, off))
                }
                Action::SnapWrite { dst: c, .. } => {
                    bio.remap(&at.cow_h, self.cow_sector(c, off));
                    bio.submit();
                }
            }
        }
        let t4 = dm::now_ns();
        st.stats.plan_ns += t1 - t0;
        st.stats.copy_ns += t2 - t1;
        st.stats.commit_ns += t3 - t2;
        st.stats.release_ns += t4 - t3;
        true
    }

    /// Runs one bounded step of snapshot deletion; returns true if more remains.
    fn delete_step(&self, st: &mut State) -> bool {
        if st.failed.is_some() || st.suspended || self.readonly {
            return false;
        }
        let Some(s) = st.store.as_mut() else {
            return false;
        };
        if !s.delete_pending() {
            return false;
        }
        let r = s
            .delete_step(DELETE_STEP_LEAVES)
            .and_then(|more| s.commit().map(|_| more));
        match r {
            Ok(more) => more,
            Err(e) => {
                self.give_up(st, "snapshot deletion failed", e);
                false
            }
        }
    }
}

// SAFETY: `Shared::drop` shuts the worker down before any field is dropped; `work` holds
// only `&Shared` (the last `Arc` is dropped by a target's destructor or a failed
// constructor, never by the worker) and never flushes or shuts down its own worker.
unsafe impl WorkHandler for Shared {
    fn worker(&self) -> &Worker<Self> {
        &self.worker
    }

    /// The worker's entry point.
    fn work(&self) {
        loop {
            let mut st = self.state.lock();
            if !self.run_batch(&mut st) {
                let more = self.delete_step(&mut st);
                drop(st);
                if more {
                    self.worker.kick();
                }
                return;
            }
        }
    }
}

/// Runs a store operation as its own committed transaction (committing first if the open
/// transaction is full), for messages that must be durable before they answer.
fn commit_op(
    store: &mut KStore,
    mut op: impl FnMut(&mut KStore) -> core::result::Result<Step<()>, StoreError>,
) -> core::result::Result<(), StoreError> {
    if let Step::CommitFirst = op(store)? {
        store.commit()?;
        if let Step::CommitFirst = op(store)? {
            // An empty transaction has room for any operation.
            return Err(PdataError::Bug("transaction full right after a commit").into());
        }
    }
    store.commit()
}

impl TargetOps for Snapshot {
    fn ctr(t: &CtrTarget, args: &[&CStr]) -> Result<KBox<Self>> {
        if args.len() != 2 {
            return Err(fail(t, c_str!("expected <origin_dev> <snap_id>"), EINVAL));
        }
        let Some(id) = parse_u32(args[1]) else {
            return Err(fail(t, c_str!("invalid snapshot id"), EINVAL));
        };
        // The origin device itself (as for dm-snapshot), or, as tables written before
        // allowed, the mapped device of its active `shared-origin` table.
        let named = t
            .get_device(args[0])
            .map_err(|e| fail(t, c_str!("cannot open origin device"), e))?;
        let devt = named.devt();
        // The origin device first: a stacked origin may sit on another origin's mapped device.
        let found = ORIGINS
            .find(|k| k.origin == devt)
            .or_else(|| ORIGINS.find(|k| k.md == devt));
        let Some(shared) = found else {
            return Err(fail(
                t,
                c_str!("no active shared-origin target on this device"),
                ENODEV,
            ));
        };
        if t.len() > shared.origin_sectors {
            return Err(fail(
                t,
                c_str!("snapshot is larger than its origin"),
                EINVAL,
            ));
        }
        // Our own references to the devices the snapshot's bios go to.  The mapped origin
        // device is not kept open: that would keep it from being mounted.
        let origin = if devt == shared.key.origin {
            named
        } else {
            drop(named);
            t.get_device_devt(shared.key.origin)
                .map_err(|e| fail(t, c_str!("cannot open the origin's device"), e))?
        };
        let cow = t
            .get_device_devt(shared.key.cow)
            .map_err(|e| fail(t, c_str!("cannot open the origin's COW device"), e))?;
        t.setup(shared.chunk_sectors as u32, 1)
            .map_err(|e| fail(t, c_str!("cannot set the maximum I/O size"), e))?;
        let readonly = shared.readonly || !t.is_writable();
        let mut snap = KBox::new(
            Snapshot {
                shared,
                slot: 0,
                id,
                readonly,
                origin,
                cow,
            },
            GFP_KERNEL,
        )?;
        // Taken last, so that no failure above leaves a reference behind.
        let mut st = snap.shared.state.lock();
        if st.failed.is_some() {
            return Err(fail(t, c_str!("the origin's COW device has failed"), EIO));
        }
        let Some(slot) = st.store.as_ref().and_then(|s| s.sb().slot_of(id)) else {
            return Err(fail(t, c_str!("no such snapshot"), ENOENT));
        };
        st.snap_refs[slot] += 1;
        drop(st);
        snap.slot = slot;
        Ok(snap)
    }

    fn dtr(self: KBox<Self>, _t: &Target) {
        let mut st = self.shared.state.lock();
        st.snap_refs[self.slot] = st.snap_refs[self.slot].saturating_sub(1);
    }

    fn map(&self, t: &Target, mut bio: MapBio<'_>) -> MapResult {
        let sh = &*self.shared;
        let tag = TAG_SNAP | ((self.slot as u64) << TAG_SLOT_SHIFT);
        bio.set_tag(tag);
        let off = bio.sector() - t.begin();
        let kind = bio.kind();
        match kind {
            // A snapshot's data lives on the COW device (or is the unchanged origin).
            BioKind::Flush => {
                bio.remap(&self.cow, 0);
                return MapResult::Remapped;
            }
            BioKind::Write if self.readonly => return MapResult::Kill,
            BioKind::Read | BioKind::Write => {}
            _ => return MapResult::Kill,
        }
        let chunk = sh.chunk_of(off);
        if let Some(mut st) = sh.state.try_lock() {
            if st.failed.is_some() {
                return MapResult::Kill;
            }
            if let Some(s) = st.store.as_mut() {
                let fast = if kind == BioKind::Read {
                    match s.lookup_cached(chunk, self.slot) {
                        Ok(Cached::Hit(src)) => Some(src),
                        Err(StoreError::SnapshotInvalid) | Err(StoreError::NoSuchSnapshot) => {
                            return MapResult::Kill
                        }
                        Ok(Cached::Miss) | Err(_) => None,
                    }
                } else {
                    // Only a chunk this snapshot owns alone can be written without the worker.
                    match s.owned_alone_cached(chunk, self.slot) {
                        Ok(Cached::Hit(own)) if !s.sb().snaps[self.slot].is_invalid() => {
                            own.map(Source::Cow)
                        }
                        _ => None,
                    }
                };
                let (dev, sector) = match fast {
                    Some(Source::Origin) => (&self.origin, off),
                    Some(Source::Cow(c)) => (&self.cow, sh.cow_sector(c, off)),
                    None => {
                        drop(st);
                        return self.defer(bio, off);
                    }
                };
                if kind == BioKind::Read {
                    // Counted before the lock goes: see `Shared::snap_reads`.
                    bio.set_tag(tag | TAG_READ_COUNTED);
                    sh.snap_reads.inc();
                }
                bio.remap(dev, sector);
                return MapResult::Remapped;
            }
        }
        self.defer(bio, off)
    }

    fn end_io(&self, bio: &BioRef) {
        self.shared.end_io(bio);
    }

    fn status(&self, ty: StatusType, out: &mut Output) {
        match ty {
            StatusType::Info => {
                let st = self.shared.state.lock();
                let slot = st.store.as_ref().map(|s| s.sb().snaps[self.slot]);
                match slot {
                    Some(s) if st.failed.is_none() && !s.is_invalid() => {
                        let _ = write!(out, "active {}", s.owned);
                    }
                    Some(s) => {
                        let _ = write!(out, "invalid {}", s.owned);
                    }
                    None => {
                        let _ = write!(out, "invalid 0");
                    }
                }
            }
            StatusType::Table => {
                let _ = write!(out, "{} {}", self.origin.name(), self.id);
            }
            StatusType::Other => {}
        }
    }

    fn message(&self, _t: &Target, _args: &[&CStr], _out: &mut Output) -> Result {
        Err(EINVAL)
    }

    fn device(&self, idx: u32) -> Option<(&Device, u64)> {
        // Reads come from the origin over [0, len) and from anywhere on the COW device,
        // writes and flushes go to the COW device: both stack their limits (flush/FUA,
        // logical block size).
        match idx {
            0 => Some((&self.origin, self.shared.origin_sectors)),
            1 => Some((&self.cow, store_sectors(&self.cow))),
            _ => None,
        }
    }
}

impl Snapshot {
    /// Hands a bio to the origin's worker (deferred bios carry their offset in the target
    /// as sector).
    fn defer(&self, mut bio: MapBio<'_>, off: u64) -> MapResult {
        bio.remap(&self.origin, off);
        self.shared.worker.defer(bio.into_inner());
        MapResult::Submitted
    }
}

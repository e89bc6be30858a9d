// SPDX-License-Identifier: GPL-2.0

//! The origin's worker: the bios `map` deferred, handled in batches (plan, copy, commit,
//! release), and the background deletion sweep.

use kernel::prelude::*;

use super::bio_ctx::BioCtx;
use super::mode::Mode;
use super::shared::{Attached, Shared, State};
use super::DevT;
use crate::dm::{self, Bio, BioKind, Device, WorkHandler, Worker};
use crate::exception_store::format::Error as StoreError;
use crate::exception_store::{OriginWrite, SnapWrite, Source, Step};

/// Bios handled per worker batch at most (one journal commit, whose cache flushes the
/// batch shares): with 32, QD32 sequential writes split at 64 KiB chunks paid two host
/// flushes per 2 MiB on virtio, where dm-snapshot puts every exception whose copy finished
/// into its next commit.  Fewer with larger chunks (see [`batch_cap`]).
const BATCH: usize = 128;

/// A batch plans at least this many bios, and more only while their chunks total at most
/// [`BATCH_COPY_BYTES`]: the first bio of a batch waits for all its copies, which go
/// through the copier's 2 MiB buffer a part at a time.
const BATCH_MIN: usize = 32;

/// See [`BATCH_MIN`].
const BATCH_COPY_BYTES: u64 = 8 << 20;

/// The bios a batch plans at most for chunks of `chunk_sectors` (128 for 64 KiB chunks or
/// smaller, 32 from 256 KiB).
fn batch_cap(chunk_sectors: u64) -> usize {
    let by_bytes = (BATCH_COPY_BYTES >> 9) / chunk_sectors.max(1);
    (by_bytes.min(BATCH as u64) as usize).max(BATCH_MIN)
}

/// Bios a batch sets aside for the next one (their chunk is in it) before it stops looking.
const BATCH_LATER: usize = 64;

/// Bios a batch takes off the queue at most (writes that need no copy are sent on at once).
const BATCH_POPS: usize = 256;

/// Rounds of planning a batch runs at most after its first (see `Shared::run_batch`): each
/// waits for a copy, and the bios of the first round wait for all of them.
const JOIN_ROUNDS: usize = 3;

/// Leaves visited per snapshot-deletion step.
const DELETE_STEP_LEAVES: usize = 16;

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

/// A batch's item slots, one per bio it may plan, allocated with the origin target and
/// lent to each batch in turn (under the state lock): the worker allocates nothing per
/// batch, and a batch does not sit on the kernel stack.
///
/// # Invariants
///
/// Between batches, holds [`batch_cap`] slots for the origin's chunk size, all `None`.
pub(super) struct BatchSlots(KVec<Option<Item>>);

impl BatchSlots {
    pub(super) fn new(chunk_sectors: u64) -> Result<Self> {
        let n = batch_cap(chunk_sectors);
        let mut v = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            // Within the capacity just allocated: no allocation.
            v.push(None, GFP_KERNEL)?;
        }
        // INVARIANT: `batch_cap` slots, all None.
        Ok(BatchSlots(v))
    }
}

/// One batch of deferred bios, committed by one journal transaction, handled in steps with
/// the state lock held throughout (see `Shared::run_batch`):
/// [`plan`](Batch::plan) takes bios off the queue and plans their metadata changes,
/// [`copy`](Batch::copy) copies the chunks they need to the COW device,
/// [`commit`](Batch::commit) commits the batch and waits for the snapshot reads it must not
/// overtake, and [`release`](Batch::release) sends its bios on (or fails them).
struct Batch<'a> {
    sh: &'a Shared,
    /// The origin target's devices, for the whole batch.
    at: Attached,
    /// The bios planned: the first `n` of the slots, one per bio it may plan (see
    /// [`BatchSlots`]).
    items: KVec<Option<Item>>,
    n: usize,
    /// The first `copied` items have had their chunks copied.
    copied: usize,
    /// Whether this batch lets data that a snapshot read in flight may be reading be
    /// overwritten once it is released: an origin write, or a snapshot's write that
    /// unshares a chunk (so that the origin, or the other sharers of its COW chunk, may
    /// then write it in place without the worker).  Found by `copy`.
    drain_reads: bool,
}

impl<'a> Batch<'a> {
    fn new(sh: &'a Shared, at: Attached, slots: BatchSlots) -> Self {
        Batch {
            sh,
            at,
            items: slots.0,
            n: 0,
            copied: 0,
            drain_reads: false,
        }
    }

    /// Takes bios off the queue and plans them (metadata changes in memory), until the
    /// batch is full, the transaction is, or the queue is empty; origin writes that need no
    /// copy are sent on at once.  Returns the number of bios taken off the queue.
    fn plan(&mut self, st: &mut State) -> usize {
        let sh = self.sh;
        // Bios for a chunk already in the batch, in arrival order: they wait for the next one.
        let mut later: [Option<Bio>; BATCH_LATER] = [const { None }; BATCH_LATER];
        let mut nlater = 0;
        let mut popped = 0;
        while self.n < self.items.len() && popped < BATCH_POPS {
            let Some(bio) = sh.worker.pop() else { break };
            popped += 1;
            let off = bio.sector();
            let chunk = sh.chunk_of(off);
            // One bio per chunk per batch: copies within a batch never depend on each other.
            if self.items[..self.n]
                .iter()
                .flatten()
                .any(|it| sh.chunk_of(it.off) == chunk)
            {
                if nlater == BATCH_LATER {
                    sh.worker.push_front(bio);
                    break;
                }
                later[nlater] = Some(bio);
                nlater += 1;
                continue;
            }
            match sh.plan(st, &bio, off) {
                // An origin write deferred only because `map` found the lock taken, to a
                // chunk no snapshot needs copied: it goes now, as `map` would have sent it,
                // instead of taking a place in the batch and waiting for its commit.
                Step::Done(Action::OriginWrite(None)) if st.mode == Mode::Write => {
                    st.stats.passed += 1;
                    sh.submit_origin_write(&self.at, bio, off);
                }
                Step::Done(action) => {
                    self.items[self.n] = Some(Item { bio, off, action });
                    self.n += 1;
                }
                Step::CommitFirst if self.n > 0 => {
                    // Transaction full: finish this batch first.
                    sh.worker.push_front(bio);
                    break;
                }
                Step::CommitFirst => {
                    sh.worker.push_front(bio);
                    if let Some(s) = st.store.as_mut() {
                        if let Err(e) = s.commit() {
                            sh.give_up(st, "journal commit failed", e);
                        }
                    }
                }
            }
        }
        // Back at the head of the queue, ahead of everything that came after them.
        for slot in later[..nlater].iter_mut().rev() {
            if let Some(bio) = slot.take() {
                sh.worker.push_front(bio);
            }
        }
        popped
    }

    /// Copies the chunks the bios planned since the last call need to the COW device (runs
    /// of adjacent chunks as one copy), unless the batch lost its store.
    fn copy(&mut self, st: &mut State) {
        let sh = self.sh;
        let at = &self.at;
        let (first, n) = (self.copied, self.n);
        self.copied = n;
        let mut copying = false;
        // Adjacent chunks going to adjacent COW chunks are copied as one run.
        let mut run: Option<(&Device, u64, u64, u64)> = None;
        let mut copies = st.copier.batch();
        for it in self.items[first..n].iter().flatten() {
            let chunk = sh.chunk_of(it.off);
            let copy = match it.action {
                Action::OriginWrite(c) => {
                    self.drain_reads = true;
                    c.map(|c| (&at.origin_h, chunk << sh.chunk_shift, sh.cow_sector(c, 0)))
                }
                Action::SnapWrite {
                    dst,
                    from: Some(src),
                } => {
                    self.drain_reads = true;
                    Some(match src {
                        Source::Origin => {
                            (&at.origin_h, chunk << sh.chunk_shift, sh.cow_sector(dst, 0))
                        }
                        Source::Cow(c) => (&at.cow_h, sh.cow_sector(c, 0), sh.cow_sector(dst, 0)),
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
                sh.chunk_sectors.min(sh.origin_sectors.saturating_sub(src))
            } else {
                sh.chunk_sectors
            };
            if len == 0 {
                continue;
            }
            if st.mode.batch_lost() {
                continue;
            }
            copying = true;
            st.stats.copied_chunks += 1;
            match run.as_mut() {
                Some((d, s, t, n)) if d.same(dev) && *s + *n == src && *t + *n == dst => *n += len,
                _ => {
                    if let Some((d, s, t, n)) = run.take() {
                        copies.copy(d, s, &at.cow_h, t, n);
                        st.stats.copy_jobs += 1;
                    }
                    run = Some((dev, src, dst, len));
                }
            }
        }
        if let Some((d, s, t, n)) = run.take() {
            copies.copy(d, s, &at.cow_h, t, n);
            st.stats.copy_jobs += 1;
        }
        let copied = if copying {
            copies.wait()
        } else {
            drop(copies);
            Ok(())
        };
        if copied.is_err() {
            sh.give_up(st, "copy to the COW device failed", StoreError::DataCopy);
        }
    }

    /// Commits the batch (unless it lost its store), then waits for the snapshot reads in
    /// flight that its release could overtake.
    fn commit(&mut self, st: &mut State) {
        let sh = self.sh;
        // An invalidated snapshot stops sharing its chunks: the origin may then write them
        // in place (the commit below clears the flag).
        let invalidated = st.mode.invalidation_pending();
        if !st.mode.batch_lost() {
            if let Some(s) = st.store.as_mut() {
                let dirty = s.is_dirty();
                match s.commit() {
                    Ok(()) if dirty => st.stats.commits += 1,
                    Ok(()) => {}
                    Err(e) => sh.give_up(st, "journal commit failed", e),
                }
                if st.mode == Mode::InvalidationPending {
                    sh.set_mode(st, Mode::Write);
                }
            }
        }
        if self.drain_reads || invalidated || st.mode.batch_lost() {
            // Snapshot reads in flight must finish before what they read can change.
            sh.snap_reads.wait_zero();
        }
    }

    /// Gives the item slots back for the next batch (all empty again after `release`).
    fn into_slots(mut self) -> BatchSlots {
        for it in self.items[..self.n].iter_mut() {
            // Nothing is left after `release`; a bio left here by a bug fails, not leaks.
            if let Some(it) = it.take() {
                it.bio.endio(EIO.to_errno());
            }
        }
        // INVARIANT: the items came from a `BatchSlots` and keep its length; every slot
        // past `n` was never filled, and the first `n` are empty now.
        BatchSlots(core::mem::replace(&mut self.items, KVec::new()))
    }

    /// Sends the batch's bios on, or fails them.
    fn release(&mut self, st: &mut State) {
        let sh = self.sh;
        let at = &self.at;
        // Reads planned before their snapshot was invalidated in this batch fail.
        let valid = st.store.as_ref().map_or(0, |s| s.sb().valid_mask());
        let failed = st.mode.batch_lost();
        for it in self.items[..self.n].iter_mut() {
            let Some(Item {
                mut bio,
                off,
                action,
            }) = it.take()
            else {
                continue;
            };
            match action {
                Action::OriginWrite(_) => sh.submit_origin_write(&at, bio, off),
                Action::Fail(e) => bio.endio(e.to_errno()),
                _ if failed => bio.endio(EIO.to_errno()),
                Action::SnapRead(_) if valid & (1 << BioCtx::from_tag(bio.tag()).slot()) == 0 => {
                    bio.endio(EIO.to_errno())
                }
                Action::SnapRead(Source::Origin) => sh.submit_snap_read(bio, &at.origin_h, off),
                Action::SnapRead(Source::Cow(c)) => {
                    sh.submit_snap_read(bio, &at.cow_h, sh.cow_sector(c, off))
                }
                Action::SnapWrite { dst: c, .. } => {
                    bio.remap(&at.cow_h, sh.cow_sector(c, off));
                    bio.submit();
                }
            }
        }
    }
}

impl Shared {
    fn plan(&self, st: &mut State, bio: &Bio, off: u64) -> Step<Action> {
        let ctx = BioCtx::from_tag(bio.tag());
        let chunk = self.chunk_of(off);
        let snap = ctx.snap_slot.is_some();
        if st.mode.is_failed() || st.store.is_none() {
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
                    pr_err!(
                        "{}: COW device full: invalidated snapshot slots {:#x}\n",
                        DevT(self.key.cow),
                        mask
                    );
                    self.set_mode(st, Mode::InvalidationPending);
                    Step::Done(Action::OriginWrite(None))
                }
                Ok(Step::CommitFirst) => Step::CommitFirst,
                Err(e) => {
                    self.give_up(st, "metadata error on origin write", e);
                    Step::Done(Action::OriginWrite(None))
                }
            };
        }
        let slot = ctx.slot();
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
                pr_err!(
                    "{}: COW device full: snapshot slot {} invalidated\n",
                    DevT(self.key.cow),
                    slot
                );
                self.set_mode(st, Mode::InvalidationPending);
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
        bio.set_tag(BioCtx::counted_write().to_tag());
        self.writes_inflight.inc();
        bio.remap(&at.origin_h, off);
        bio.submit();
    }

    /// Sends a snapshot read (counted: see `snap_reads`).
    fn submit_snap_read(&self, mut bio: Bio, dev: &Device, sector: u64) {
        let ctx = BioCtx::from_tag(bio.tag());
        bio.set_tag(
            BioCtx {
                read_counted: true,
                ..ctx
            }
            .to_tag(),
        );
        self.snap_reads.inc();
        bio.remap(dev, sector);
        bio.submit();
    }

    /// Plans, copies, commits and releases one batch.  Returns false when the queue is empty.
    fn run_batch(&self, st: &mut State) -> bool {
        // The slots are lent to the batch and given back whatever way it ends.
        let slots = core::mem::replace(&mut st.batch_slots, BatchSlots(KVec::new()));
        let (more, slots) = self.run_batch_in(st, slots);
        st.batch_slots = slots;
        more
    }

    /// [`run_batch`](Self::run_batch) with the slots lent: gives them back with its result.
    fn run_batch_in(&self, st: &mut State, slots: BatchSlots) -> (bool, BatchSlots) {
        let Some(at) = st.attached.clone() else {
            // The origin target is gone: fail what snapshots still send.
            let mut any = false;
            while let Some(bio) = self.worker.pop() {
                bio.endio(EIO.to_errno());
                any = true;
            }
            return (any, slots);
        };
        if let Mode::GaveUp { .. } = st.mode {
            self.set_mode(st, Mode::Write);
        }
        let mut batch = Batch::new(self, at, slots);
        let t0 = dm::now_ns();
        let popped = batch.plan(st);
        if batch.n == 0 {
            // Only writes sent on at once: the queue may still hold more.
            return (popped > 0, batch.into_slots());
        }
        let t1 = dm::now_ns();
        batch.copy(st);
        let mut t2 = dm::now_ns();
        st.stats.plan_ns += t1 - t0;
        st.stats.copy_ns += t2 - t1;
        // Bios that arrived while the chunks were copied join this commit instead of waiting
        // for one of their own: the rest of a large write that device-mapper split at chunk
        // boundaries, or other writers.  Their chunks are copied before the commit too.
        // A few rounds at most, so that the first bios do not wait long for a trickle.
        let mut rounds = 0;
        while batch.n < batch.items.len() && rounds < JOIN_ROUNDS && !st.mode.batch_lost() {
            rounds += 1;
            let planned = batch.n;
            batch.plan(st);
            let t = dm::now_ns();
            st.stats.plan_ns += t - t2;
            if batch.n == planned {
                t2 = t;
                break;
            }
            batch.copy(st);
            t2 = dm::now_ns();
            st.stats.copy_ns += t2 - t;
            st.stats.joined += (batch.n - planned) as u64;
        }
        st.stats.batches += 1;
        st.stats.bios += batch.n as u64;
        batch.commit(st);
        let t3 = dm::now_ns();
        batch.release(st);
        let t4 = dm::now_ns();
        st.stats.commit_ns += t3 - t2;
        st.stats.release_ns += t4 - t3;
        (true, batch.into_slots())
    }

    /// Runs one bounded step of snapshot deletion; returns true if more remains.
    fn delete_step(&self, st: &mut State) -> bool {
        if st.mode.is_failed() || st.suspended || self.readonly {
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
            self.worker.cond_resched();
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

// SPDX-License-Identifier: GPL-2.0

//! What an origin target shares with its worker and its snapshot targets ([`Shared`]), its
//! mutable state behind one lock ([`State`]), the registry of active origins ([`ORIGINS`]),
//! and the store's lifecycle: format or open at construction, close at removal.

use kernel::c_str;
use kernel::prelude::*;

use super::bio_ctx::BioCtx;
use super::errors::open_error;
use super::fail;
use super::mode::Mode;
use super::worker::BatchSlots;
use crate::dm::{
    self, BioRef, Copier, CtrTarget, Device, EventHandle, Inflight, Registry, TryMutex, Worker,
};
use crate::exception_store::format::{Block, BlockIo, BLOCK_SIZE, MAX_SNAPSHOTS};
use crate::exception_store::superblock::Super;
use crate::exception_store::{self, FormatParams, Store};
use crate::store_io::{CacheMemory, MetaIo};

pub(super) type KStore = Store<MetaIo, CacheMemory, KBox<Super>>;

/// Metadata blocks cached per origin (4 KiB each).
const CACHE_BLOCKS: usize = 512;

/// The devices an active origin target claims: a second origin on any of them is refused,
/// and a snapshot finds its origin by the first two.
#[derive(PartialEq, Eq, Clone, Copy)]
pub(super) struct OriginKey {
    /// The mapped device of the `shared-origin` table.
    pub(super) md: u32,
    /// The origin device under it.
    pub(super) origin: u32,
    /// The COW device.
    pub(super) cow: u32,
}

pub(super) static ORIGINS: Registry<OriginKey, Shared> = Registry::new();

/// What the worker may use while the origin target exists: the origin target's open
/// devices and its dm_target (for events).  The origin's destructor takes it away under the
/// state lock before it releases them, so whoever holds the lock and sees it may use it.
#[derive(Clone)]
pub(super) struct Attached {
    pub(super) origin_h: Device,
    pub(super) cow_h: Device,
    pub(super) event: EventHandle,
}

/// Mutable per-origin state, behind the origin's lock.
pub(super) struct State {
    /// None once the origin target is destroyed: snapshots still active then fail their I/O.
    pub(super) attached: Option<Attached>,
    /// The exception store: there in every mode but `Mode::Failed`.
    pub(super) store: Option<KBox<KStore>>,
    /// Normal or degraded operation (changed only by `Shared::set_mode`).
    pub(super) mode: Mode,
    /// Active snapshot targets per slot.
    pub(super) snap_refs: [u32; MAX_SNAPSHOTS],
    /// Worker statistics (the `stats` message).
    pub(super) stats: Stats,
    /// Copies chunks for the worker's batches.
    pub(super) copier: Copier,
    /// The worker's batch item slots (lent to each batch).
    pub(super) batch_slots: BatchSlots,
    /// The origin is suspending or suspended: background work (the deletion sweep) waits.
    pub(super) suspended: bool,
}

impl State {
    /// Raises a dm event on the origin (wakes `dmsetup wait`), if it still exists.
    pub(super) fn raise_event(&self) {
        if let Some(a) = &self.attached {
            a.event.raise();
        }
    }
}

/// Counters reported by the `stats` message.
#[derive(Default)]
pub(super) struct Stats {
    pub(super) batches: u64,
    pub(super) bios: u64,
    pub(super) copy_jobs: u64,
    pub(super) copied_chunks: u64,
    /// Deferred origin writes that needed no copy, sent on at once by the worker.
    pub(super) passed: u64,
    /// Bios planned in a batch's later rounds, while its earlier copies ran (counted in
    /// `bios` too).
    pub(super) joined: u64,
    pub(super) commits: u64,
    /// Worker time (ns) spent planning, waiting for copies, committing, releasing.
    pub(super) plan_ns: u64,
    pub(super) copy_ns: u64,
    pub(super) commit_ns: u64,
    pub(super) release_ns: u64,
}

/// What is shared between an origin target, its worker and its snapshot targets.  It
/// outlives the origin target while snapshot targets hold it.  The origin's devices are
/// reachable from it only through `State.attached` and the store (whose metadata I/O holds
/// the COW device): `Origin::dtr` takes both away under the state lock, so that the last
/// reference to each of the origin table's devices goes before its destructor returns.
pub(crate) struct Shared {
    // Shut down first, by `Drop`: drains the worker while everything it uses is alive.
    pub(super) worker: Worker<Shared>,
    pub(super) state: TryMutex<State>,
    pub(super) writes_inflight: Inflight,
    /// Snapshot reads in flight (from the origin or the COW device): a batch that lets the
    /// origin or another snapshot overwrite what such a read may be reading waits for them.
    pub(super) snap_reads: Inflight,
    pub(super) key: OriginKey,
    /// The table was loaded read-only: nothing is written to any device.
    pub(super) readonly: bool,
    pub(super) chunk_sectors: u64,
    pub(super) chunk_shift: u32,
    pub(super) data_sector: u64,
    /// Length of the origin target: the largest snapshot, and where copies of a last,
    /// partial chunk stop (dm keeps it a multiple of every device's logical block size).
    pub(super) origin_sectors: u64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.worker.shutdown();
    }
}

/// The part of a COW device the store can use: whole 4 KiB blocks (what its queue limits
/// are checked over, so that a device of an odd size stacks on a 4 KiB-sector target).
pub(super) fn store_sectors(cow: &Device) -> u64 {
    cow.sectors() & !(exception_store::format::BLOCK_SECTORS - 1)
}

/// A random version-4 uuid (RFC 9562): the store's identity for replication.
fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&dm::random_u64().to_le_bytes());
    u[8..].copy_from_slice(&dm::random_u64().to_le_bytes());
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

impl Shared {
    /// Chunks of the origin (the last one is short if its size is not a multiple).
    pub(super) fn origin_chunks(&self) -> u64 {
        self.origin_sectors.div_ceil(self.chunk_sectors)
    }

    /// Formats the COW device if its first block is zero.
    #[inline(never)]
    pub(super) fn format_if_new(
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
                uuid: random_uuid(),
                meta_blocks: 0,
            };
            if let Err(e) = exception_store::format(io, &p, block) {
                pr_err!("{}: formatting the COW device: {}\n", cow.name(), e);
                let (m, e) = open_error(&e);
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
    pub(super) fn open_store(
        t: &CtrTarget,
        cow: &Device,
        chunk: u32,
        readonly: bool,
    ) -> Result<KBox<KStore>> {
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
                let (m, e) = open_error(&e);
                Err(fail(t, m, e))
            }
        }
    }

    /// Closes the store (commit, mark clean, checkpoint), or only drops it when the table
    /// is read-only and must write nothing.
    pub(super) fn close_store(store: KBox<KStore>, readonly: bool, name: &CStr) {
        if readonly {
            drop(KBox::into_inner(store).abandon());
        } else if let Err(e) = KBox::into_inner(store).close() {
            pr_err!("{}: closing the exception store: {}\n", name, e);
        }
    }

    pub(super) fn chunk_of(&self, off: u64) -> u64 {
        off >> self.chunk_shift
    }

    pub(super) fn cow_sector(&self, cow_chunk: u64, off: u64) -> u64 {
        self.data_sector + (cow_chunk << self.chunk_shift) + (off & (self.chunk_sectors - 1))
    }

    pub(super) fn end_io(&self, bio: &BioRef) {
        let ctx = BioCtx::from_tag(bio.tag());
        if ctx.write_counted {
            self.writes_inflight.dec();
        }
        if ctx.read_counted {
            self.snap_reads.dec();
        }
    }
}

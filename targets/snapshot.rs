// SPDX-License-Identifier: GPL-2.0

//! The `shared-snapshot` target: maps one snapshot of an active origin.

use core::fmt::Write;
use kernel::c_str;
use kernel::prelude::*;
use kernel::sync::Arc;

use super::bio_ctx::BioCtx;
use super::shared::{store_sectors, Shared, ORIGINS};
use super::{fail, parse_u32};
use crate::dm::{
    BioKind, BioRef, CtrTarget, Device, MapBio, MapResult, Output, StatusType, Target, TargetOps,
};
use crate::exception_store::format::Error as StoreError;
use crate::exception_store::{Cached, Source};

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
        if st.mode.is_failed() {
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
        let ctx = BioCtx::snap(self.slot);
        bio.set_tag(ctx.to_tag());
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
            if st.mode.is_failed() {
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
                    bio.set_tag(
                        BioCtx {
                            read_counted: true,
                            ..ctx
                        }
                        .to_tag(),
                    );
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
                    Some(s) if !st.mode.is_failed() && !s.is_invalid() => {
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

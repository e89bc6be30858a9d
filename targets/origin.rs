// SPDX-License-Identifier: GPL-2.0

//! The `shared-origin` target: maps the origin, owns the COW device and its store.

use core::fmt::Write;
use kernel::c_str;
use kernel::prelude::*;
use kernel::sync::Arc;

use super::bio_ctx::BioCtx;
use super::mode::Mode;
use super::shared::{store_sectors, Attached, OriginKey, Shared, State, Stats, ORIGINS};
use super::worker::BatchSlots;
use super::{fail, parse_u32};
use crate::dm::{
    self, BioKind, BioRef, Copier, CtrTarget, Device, Inflight, MapBio, MapResult, Output,
    StatusType, Target, TargetOps, TryMutex, Worker,
};
use crate::exception_store::format::MAX_SNAPSHOTS;
use crate::exception_store::Cached;

/// The `shared-origin` target.  (Not `shared-snapshot-origin`: target type names travel in
/// the 16-byte `dm_target_spec.target_type` of the dm ioctl ABI, so a name of 16 characters
/// or more cannot be loaded by dmsetup at all.)
pub(crate) struct Origin {
    pub(super) shared: Arc<Shared>,
    pub(super) origin: Device,
    pub(super) cow: Device,
}

impl Origin {
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
        let store = Shared::open_store(t, &cow, chunk, readonly)?;
        let cache_bytes = store.mem().bytes();
        // No split at chunk boundaries: `map` passes runs of unshared chunks whole and cuts
        // off the first chunk of a run that needs a copy.
        if let Err(e) = t.setup(0, 1) {
            Shared::close_store(store, readonly, cow.name());
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
                mode: Mode::Write,
                snap_refs: [0; MAX_SNAPSHOTS],
                stats: Stats::default(),
                copier: Copier::new()?,
                batch_slots: BatchSlots::new(chunk as u64)?,
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
        if !st.mode.is_failed() {
            if let Some(store) = store {
                Shared::close_store(store, sh.readonly, self.cow.name());
            }
            sh.set_mode(
                &mut st,
                Mode::Failed {
                    why: "origin target removed",
                },
            );
        }
        drop(st);
        ORIGINS.release(&sh.key);
        // Bios snapshots deferred meanwhile are failed by the worker (no store).
        sh.worker.kick();
    }

    fn map(&self, t: &Target, mut bio: MapBio<'_>) -> MapResult {
        let sh = &*self.shared;
        bio.set_tag(BioCtx::default().to_tag());
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
                    let unshared_end = match (st.mode, st.store.as_mut()) {
                        (mode, Some(s)) if !mode.is_failed() => {
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
                        bio.set_tag(BioCtx::counted_write().to_tag());
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
                match (st.mode, st.store.as_ref()) {
                    (Mode::Failed { why }, _) => {
                        let _ = write!(out, "- - - fail {}", why);
                    }
                    (_, Some(s)) => {
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
                    (_, None) => {
                        let _ = write!(out, "- - - fail closed");
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
        self.handle_message(args, out)
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
        if !st.mode.is_failed() && !sh.readonly {
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

// SPDX-License-Identifier: GPL-2.0

//! The binding layer: safe Rust types over the device-mapper, bio, dm-io (metadata I/O and
//! chunk copies), workqueue and locking C APIs, reached through the small C glue in
//! `dm/glue.c`.
//!
//! This is the only module of the crate with `unsafe` code.  Callbacks from device-mapper
//! arrive in the `extern "C"` entry points below and are dispatched to the safe
//! [`TargetOps`] implementations of the crate root.  Per-target state is `Sync` and reached
//! through `&self`: `map` runs on many CPUs at once.

use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::ffi::{c_char, c_int, c_uint, c_void};
use kernel::prelude::*;

use crate::pdata::block::{self as fmt_, Block, BLOCK_SECTORS, BLOCK_SIZE};
use crate::pdata::cache::{CacheMem, Parts, Slot, SCRATCH_BLOCKS};

mod ffi {
    use super::*;

    #[repr(C)]
    pub(super) struct DmTarget {
        _p: [u8; 0],
    }
    #[repr(C)]
    pub(super) struct DmDev {
        _p: [u8; 0],
    }
    #[repr(C)]
    pub(super) struct Bio {
        _p: [u8; 0],
    }
    #[repr(C)]
    pub(super) struct IoClient {
        _p: [u8; 0],
    }
    #[repr(C)]
    pub(super) struct CMutex {
        _p: [u8; 0],
    }
    #[repr(C)]
    pub(super) struct CWorker {
        _p: [u8; 0],
    }
    #[repr(C)]
    pub(super) struct CInflight {
        _p: [u8; 0],
    }
    #[repr(C)]
    pub(super) struct CCopier {
        _p: [u8; 0],
    }

    extern "C" {
        pub(super) fn dmss_register() -> c_int;
        pub(super) fn dmss_unregister();
        pub(super) fn dmss_ti_private(ti: *mut DmTarget) -> *mut c_void;
        pub(super) fn dmss_ti_set_private(ti: *mut DmTarget, p: *mut c_void);
        pub(super) fn dmss_ti_set_error(ti: *mut DmTarget, msg: *const c_char);
        pub(super) fn dmss_ti_begin(ti: *mut DmTarget) -> u64;
        pub(super) fn dmss_ti_len(ti: *mut DmTarget) -> u64;
        pub(super) fn dmss_ti_setup(
            ti: *mut DmTarget,
            max_io_len: u32,
            pbd: c_uint,
            flush_bios: c_uint,
        ) -> c_int;
        pub(super) fn dmss_ti_devt(ti: *mut DmTarget) -> u32;
        pub(super) fn dmss_ti_event(ti: *mut DmTarget);
        pub(super) fn dmss_ti_writable(ti: *mut DmTarget) -> c_int;
        pub(super) fn dmss_get_device(
            ti: *mut DmTarget,
            path: *const c_char,
            err: *mut c_int,
        ) -> *mut DmDev;
        pub(super) fn dmss_put_device(ti: *mut DmTarget, d: *mut DmDev);
        pub(super) fn dmss_dev_sectors(d: *mut DmDev) -> u64;
        pub(super) fn dmss_dev_zoned(d: *mut DmDev) -> c_int;
        pub(super) fn dmss_dev_devt(d: *mut DmDev) -> u32;
        pub(super) fn dmss_dev_name(d: *mut DmDev) -> *const c_char;
        pub(super) fn dmss_bio_kind(bio: *mut Bio) -> c_int;
        pub(super) fn dmss_bio_sector(bio: *mut Bio) -> u64;
        pub(super) fn dmss_bio_sectors(bio: *mut Bio) -> u32;
        pub(super) fn dmss_bio_accept_partial(bio: *mut Bio, n: u32) -> c_int;
        pub(super) fn dmss_bio_remap(bio: *mut Bio, d: *mut DmDev, sector: u64);
        pub(super) fn dmss_bio_endio(bio: *mut Bio, err: c_int);
        pub(super) fn dmss_bio_submit(bio: *mut Bio);
        pub(super) fn dmss_bio_pbd(bio: *mut Bio) -> *mut u64;
        pub(super) fn dmss_worker_create(ctx: *mut c_void) -> *mut CWorker;
        pub(super) fn dmss_worker_destroy(w: *mut CWorker);
        pub(super) fn dmss_worker_defer(w: *mut CWorker, bio: *mut Bio);
        pub(super) fn dmss_worker_pop(w: *mut CWorker) -> *mut Bio;
        pub(super) fn dmss_worker_push_front(w: *mut CWorker, bio: *mut Bio);
        pub(super) fn dmss_worker_kick(w: *mut CWorker);
        pub(super) fn dmss_worker_flush(w: *mut CWorker);
        pub(super) fn dmss_mutex_create() -> *mut CMutex;
        pub(super) fn dmss_mutex_destroy(m: *mut CMutex);
        pub(super) fn dmss_mutex_lock(m: *mut CMutex);
        pub(super) fn dmss_mutex_trylock(m: *mut CMutex) -> c_int;
        pub(super) fn dmss_mutex_unlock(m: *mut CMutex);
        pub(super) fn dmss_registry_lock();
        pub(super) fn dmss_registry_unlock();
        pub(super) fn dmss_inflight_create() -> *mut CInflight;
        pub(super) fn dmss_inflight_destroy(f: *mut CInflight);
        pub(super) fn dmss_inflight_inc(f: *mut CInflight);
        pub(super) fn dmss_inflight_dec(f: *mut CInflight);
        pub(super) fn dmss_inflight_wait_zero(f: *mut CInflight);
        pub(super) fn dmss_io_client_create() -> *mut IoClient;
        pub(super) fn dmss_io_client_destroy(c: *mut IoClient);
        pub(super) fn dmss_io(
            c: *mut IoClient,
            d: *mut DmDev,
            sector: u64,
            count: u32,
            buf: *mut c_void,
            op: c_int,
        ) -> c_int;
        pub(super) fn dmss_copier_create() -> *mut CCopier;
        pub(super) fn dmss_copier_destroy(c: *mut CCopier);
        pub(super) fn dmss_copy(
            c: *mut CCopier,
            src: *mut DmDev,
            ss: u64,
            dst: *mut DmDev,
            ds: u64,
            n: u64,
        );
        pub(super) fn dmss_copy_wait(c: *mut CCopier) -> c_int;
        pub(super) fn dmss_crc32c(data: *const c_void, len: usize) -> u32;
        pub(super) fn dmss_random_u64() -> u64;
        pub(super) fn dmss_now_ns() -> u64;
        pub(super) fn dmss_vzalloc(size: usize) -> *mut c_void;
        pub(super) fn dmss_vfree(p: *mut c_void);
    }
}

const IO_READ: c_int = 0;
const IO_WRITE: c_int = 1;
const IO_FLUSH: c_int = 2;
const IO_PREFLUSH: c_int = 4;
const IO_FUA: c_int = 8;

/// `DM_MAPIO_*` results of `map`.
pub(crate) enum MapResult {
    /// The bio was remapped: device-mapper submits it.
    Remapped,
    /// The target took the bio and will submit or complete it later.
    Submitted,
    /// Fail the bio with -EIO.
    Kill,
}

/// Status requested by `dmsetup status` (Info) or `dmsetup table` (Table).
#[derive(PartialEq, Eq, Clone, Copy)]
pub(crate) enum StatusType {
    /// STATUSTYPE_INFO.
    Info,
    /// STATUSTYPE_TABLE.
    Table,
    /// STATUSTYPE_IMA and anything newer.
    Other,
}

/// A bounded text sink over a C result buffer (status and message output).
pub(crate) struct Output {
    buf: *mut u8,
    len: usize,
    max: usize,
}

impl Output {
    /// Whether anything was written.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Write for Output {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.max == 0 {
            return Ok(());
        }
        for &b in s.as_bytes() {
            if self.len + 1 >= self.max {
                break;
            }
            // SAFETY: `buf` points to `max` writable bytes (dm's result buffer) and
            // `len + 1 < max`, so both this byte and the terminator below are in bounds.
            unsafe {
                *self.buf.add(self.len) = b;
                *self.buf.add(self.len + 1) = 0;
            }
            self.len += 1;
        }
        Ok(())
    }
}

/// The operations of a target type.  Implemented by the crate root for both targets.
pub(crate) trait TargetOps: Sized + Send + Sync {
    /// Constructor: parses the table line.  On error, set the message with `t.set_error`.
    fn ctr(t: &Target, args: &[&CStr]) -> Result<KBox<Self>>;
    /// Destructor (devices are released by dropping `self`).
    fn dtr(self: KBox<Self>, t: &Target);
    /// Maps a bio; must not wait for I/O.
    fn map(&self, t: &Target, bio: MapBio<'_>) -> MapResult;
    /// Called when a bio remapped by this target completes.
    fn end_io(&self, bio: &BioRef);
    /// Writes status text.
    fn status(&self, ty: StatusType, out: &mut Output);
    /// Handles `dmsetup message`; output goes to `out`.
    fn message(&self, t: &Target, args: &[&CStr], out: &mut Output) -> Result;
    /// Before suspend.
    fn presuspend(&self) {}
    /// The suspend that called `presuspend` was abandoned (interrupted, or the file system
    /// could not be frozen): the target runs on as before.
    fn presuspend_undo(&self) {}
    /// After suspend: no bio is in flight.
    fn postsuspend(&self) {}
    /// On resume.
    fn resume(&self) {}
    /// Device `idx` used by this target and the number of its sectors the target uses
    /// from sector 0 (for queue limits: flush/FUA support, logical block size), None past
    /// the last.
    fn device(&self, idx: u32) -> Option<(DevHandle, u64)>;
}

/// A `struct dm_target` handed to a callback.
pub(crate) struct Target(NonNull<ffi::DmTarget>);

impl Target {
    /// First sector of the target in the mapped device.
    pub(crate) fn begin(&self) -> u64 {
        // SAFETY: `self.0` is the live dm_target of the current callback.
        unsafe { ffi::dmss_ti_begin(self.0.as_ptr()) }
    }

    /// Length of the target in sectors.
    pub(crate) fn len(&self) -> u64 {
        // SAFETY: as in `begin`.
        unsafe { ffi::dmss_ti_len(self.0.as_ptr()) }
    }

    /// Sets `ti->error`, which dm prints when the constructor fails.
    pub(crate) fn set_error(&self, msg: &'static CStr) {
        // SAFETY: the message is static, so it outlives the dm_target that points at it.
        unsafe { ffi::dmss_ti_set_error(self.0.as_ptr(), msg.as_char_ptr()) }
    }

    /// Sets the largest bio (split at chunk boundaries), per-bio data and flush bios.
    pub(crate) fn setup(&self, max_io_len: u32, flush_bios: u32) -> Result {
        // SAFETY: called from the constructor, when dm expects these fields to be set.
        let r = unsafe { ffi::dmss_ti_setup(self.0.as_ptr(), max_io_len, 8, flush_bios) };
        if r < 0 {
            return Err(Error::from_errno(r));
        }
        Ok(())
    }

    /// dev_t of the mapped device this target belongs to.
    pub(crate) fn devt(&self) -> u32 {
        // SAFETY: as in `begin`.
        unsafe { ffi::dmss_ti_devt(self.0.as_ptr()) }
    }

    /// Whether the table was loaded read-write (`dmsetup create --readonly` loads it
    /// read-only: the target must then write nothing).
    pub(crate) fn is_writable(&self) -> bool {
        // SAFETY: as in `begin`; the table's mode is fixed when it is created.
        unsafe { ffi::dmss_ti_writable(self.0.as_ptr()) != 0 }
    }

    /// A handle for raising dm events later (see [`EventHandle`]).
    pub(crate) fn event_handle(&self) -> EventHandle {
        EventHandle(self.0)
    }

    /// Opens a device named by a table argument.
    pub(crate) fn get_device(&self, path: &CStr) -> Result<Device> {
        let mut err: c_int = 0;
        // SAFETY: `path` is NUL-terminated; `err` is a valid out-parameter.
        let d = unsafe { ffi::dmss_get_device(self.0.as_ptr(), path.as_char_ptr(), &mut err) };
        match NonNull::new(d) {
            Some(d) => Ok(Device { dev: d, ti: self.0 }),
            None => Err(Error::from_errno(if err < 0 { err } else { -19 })),
        }
    }
}

impl Target {
    /// Opens a device by its number (as "major:minor", which dm_get_device accepts).
    pub(crate) fn get_device_devt(&self, devt: u32) -> Result<Device> {
        let mut buf = [0u8; 24];
        let mut w = ByteWriter {
            buf: &mut buf,
            len: 0,
        };
        fmt::Write::write_fmt(&mut w, format_args!("{}:{}", devt >> 20, devt & 0xfffff))
            .map_err(|_| EINVAL)?;
        let len = w.len;
        // `buf` is zeroed and holds at most 23 bytes of digits and ':', so it ends in NUL.
        let name = CStr::from_bytes_with_nul(&buf[..=len]).map_err(|_| EINVAL)?;
        self.get_device(name)
    }
}

/// Formats into a byte buffer, keeping its last byte free for a terminator.
struct ByteWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if end >= self.buf.len() {
            return Err(fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Raises dm table events from the worker.  Valid while the target exists: the owner keeps
/// it in per-target state, which the destructor frees before the dm_target goes.
#[derive(Clone, Copy)]
pub(crate) struct EventHandle(NonNull<ffi::DmTarget>);

// SAFETY: dm_table_event may be called from any process context.
unsafe impl Send for EventHandle {}
// SAFETY: as above; the handle is only read.
unsafe impl Sync for EventHandle {}

impl EventHandle {
    /// dm_table_event(): wakes `dmsetup wait` and udev listeners.
    pub(crate) fn raise(&self) {
        // SAFETY: see the type's invariant: the target outlives the handle's users.
        unsafe { ffi::dmss_ti_event(self.0.as_ptr()) }
    }
}

/// A device opened with dm_get_device; released on drop.
pub(crate) struct Device {
    dev: NonNull<ffi::DmDev>,
    ti: NonNull<ffi::DmTarget>,
}

// SAFETY: a dm_dev may be used and released from any process context.
unsafe impl Send for Device {}
// SAFETY: all methods only read the dm_dev.
unsafe impl Sync for Device {}

impl Device {
    /// Size in sectors.
    pub(crate) fn sectors(&self) -> u64 {
        // SAFETY: `dev` is open until drop.
        unsafe { ffi::dmss_dev_sectors(self.dev.as_ptr()) }
    }

    /// A zoned block device (writes must stay sequential per zone).
    pub(crate) fn is_zoned(&self) -> bool {
        // SAFETY: as in `sectors`.
        unsafe { ffi::dmss_dev_zoned(self.dev.as_ptr()) != 0 }
    }

    /// dev_t.
    pub(crate) fn devt(&self) -> u32 {
        // SAFETY: as in `sectors`.
        unsafe { ffi::dmss_dev_devt(self.dev.as_ptr()) }
    }

    /// The "major:minor" name dm uses in table output.
    pub(crate) fn name(&self) -> &CStr {
        // SAFETY: dm_dev->name is a NUL-terminated array inside the dm_dev, which lives as
        // long as `self`.
        unsafe { CStr::from_char_ptr(ffi::dmss_dev_name(self.dev.as_ptr())) }
    }

    /// A non-owning handle.  Whoever stores it must drop it before this Device (the origin
    /// context owns both the devices and every structure holding handles, and drops the
    /// latter first).
    pub(crate) fn handle(&self) -> DevHandle {
        DevHandle(self.dev)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: the device was obtained from dm_get_device on this target, which is still
        // alive: devices are dropped in the target's destructor at the latest.
        unsafe { ffi::dmss_put_device(self.ti.as_ptr(), self.dev.as_ptr()) }
    }
}

/// A non-owning reference to an open device (see [`Device::handle`]).
#[derive(Clone, Copy)]
pub(crate) struct DevHandle(NonNull<ffi::DmDev>);

impl DevHandle {
    /// Whether both handles name the same open device.
    pub(crate) fn same(&self, other: &DevHandle) -> bool {
        self.0 == other.0
    }
}

// SAFETY: see Device.
unsafe impl Send for DevHandle {}
// SAFETY: see Device.
unsafe impl Sync for DevHandle {}

/// Kinds of bios the targets distinguish.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BioKind {
    /// REQ_OP_READ.
    Read,
    /// REQ_OP_WRITE with data, or WRITE_ZEROES.
    Write,
    /// An empty REQ_PREFLUSH.
    Flush,
    /// REQ_OP_DISCARD.
    Discard,
    /// Anything else.
    Other,
}

/// A bio the target is responsible for: it must be remapped and returned from `map`,
/// submitted, or completed.  Dropping one without doing so would hang its submitter, so the
/// methods consume it.
#[repr(transparent)]
pub(crate) struct Bio(NonNull<ffi::Bio>);

// SAFETY: a bio may be submitted or completed from any context.
unsafe impl Send for Bio {}

/// Read access to a bio's fields (shared by [`Bio`] and completion callbacks).
#[repr(transparent)]
pub(crate) struct BioRef(NonNull<ffi::Bio>);

impl BioRef {
    /// The bio's class.
    pub(crate) fn kind(&self) -> BioKind {
        // SAFETY: the bio is live while we hold it.
        match unsafe { ffi::dmss_bio_kind(self.0.as_ptr()) } {
            0 => BioKind::Read,
            1 => BioKind::Write,
            2 => BioKind::Flush,
            3 => BioKind::Discard,
            _ => BioKind::Other,
        }
    }

    /// First sector (in the mapped device's numbering until remapped).
    pub(crate) fn sector(&self) -> u64 {
        // SAFETY: as in `kind`.
        unsafe { ffi::dmss_bio_sector(self.0.as_ptr()) }
    }

    /// Length in sectors.
    pub(crate) fn sectors(&self) -> u32 {
        // SAFETY: as in `kind`.
        unsafe { ffi::dmss_bio_sectors(self.0.as_ptr()) }
    }

    /// The target's per-bio word (set up by `Target::setup`).
    pub(crate) fn tag(&self) -> u64 {
        // SAFETY: per_io_data_size is 8 for both targets, so the per-bio data is a u64.
        unsafe { *ffi::dmss_bio_pbd(self.0.as_ptr()) }
    }
}

/// A bio inside `map`: a [`Bio`] that may also be shortened, which dm allows only there.
/// The lifetime ties it to one `map` call.
pub(crate) struct MapBio<'a>(Bio, PhantomData<&'a mut ()>);

impl MapBio<'_> {
    /// Keeps the first `sectors` sectors for this call; dm core maps the rest as a new bio.
    /// Err when dm cannot shorten this bio (zoned device) or `sectors` is not inside it.
    pub(crate) fn accept_partial(&mut self, sectors: u32) -> Result {
        if self.0.kind() != BioKind::Read && self.0.kind() != BioKind::Write {
            return Err(EINVAL);
        }
        // SAFETY: we are inside the map callback of this clone (a `MapBio` exists only
        // there), and it carries data, so it is not one of dm's duplicated flush bios; the
        // glue checks the length and the zoned case that dm would BUG on.
        match unsafe { ffi::dmss_bio_accept_partial((self.0).0.as_ptr(), sectors) } {
            0 => Ok(()),
            e => Err(Error::from_errno(e)),
        }
    }

    /// The bio, to keep beyond `map` (deferred to the worker).
    pub(crate) fn into_inner(self) -> Bio {
        self.0
    }
}

impl Deref for MapBio<'_> {
    type Target = Bio;
    fn deref(&self) -> &Bio {
        &self.0
    }
}

impl DerefMut for MapBio<'_> {
    fn deref_mut(&mut self) -> &mut Bio {
        &mut self.0
    }
}

impl Deref for Bio {
    type Target = BioRef;
    fn deref(&self) -> &BioRef {
        // SAFETY: Bio and BioRef are both #[repr(transparent)] over NonNull<ffi::Bio>.
        unsafe { &*(self as *const Bio as *const BioRef) }
    }
}

impl Bio {
    /// Sets the per-bio word.
    pub(crate) fn set_tag(&mut self, v: u64) {
        // SAFETY: see `BioRef::tag`; we own the bio, so nobody else writes it.
        unsafe { *ffi::dmss_bio_pbd(self.0.as_ptr()) = v }
    }

    /// Points the bio at `dev`, sector `sector`.
    pub(crate) fn remap(&mut self, dev: DevHandle, sector: u64) {
        // SAFETY: both pointers are live (DevHandle's invariant).
        unsafe { ffi::dmss_bio_remap(self.0.as_ptr(), dev.0.as_ptr(), sector) }
    }

    /// Completes the bio with `err` (0 or a negative errno).
    pub(crate) fn endio(self, err: c_int) {
        // SAFETY: we own the bio; completing it ends our responsibility.
        unsafe { ffi::dmss_bio_endio(self.0.as_ptr(), err) }
    }

    /// Submits the (remapped) bio.
    pub(crate) fn submit(self) {
        // SAFETY: we own the bio and it has been remapped to an open device.
        unsafe { ffi::dmss_bio_submit(self.0.as_ptr()) }
    }
}

/// The per-origin worker: a FIFO of deferred bios and a work item on its own
/// WQ_MEM_RECLAIM workqueue that calls `crate::Shared::work`.
///
/// Created empty, started once the context it serves has a stable address, and shut down
/// (draining queued work) by the context's owner before the context is freed; `Drop` shuts
/// down too.  A bio deferred after shutdown is failed with -EIO instead of being lost.
pub(crate) struct Worker(AtomicPtr<ffi::CWorker>);

impl Worker {
    /// A worker that is not started yet.
    pub(crate) const fn new() -> Self {
        Worker(AtomicPtr::new(core::ptr::null_mut()))
    }

    /// Starts the worker for `ctx`, which must stay alive until `shutdown` returns.
    pub(crate) fn start(&self, ctx: &crate::Shared) -> Result {
        // SAFETY: plain allocation of the C worker; the context pointer is only used by the
        // work function while the worker exists, and the owner shuts the worker down before
        // freeing the context (see the type's documentation).
        let w = unsafe { ffi::dmss_worker_create(ctx as *const crate::Shared as *mut c_void) };
        if w.is_null() {
            return Err(ENOMEM);
        }
        self.0.store(w, Ordering::Release);
        Ok(())
    }

    fn get(&self) -> Option<NonNull<ffi::CWorker>> {
        NonNull::new(self.0.load(Ordering::Acquire))
    }

    /// Queues a bio for the worker.
    pub(crate) fn defer(&self, bio: Bio) {
        match self.get() {
            // SAFETY: the worker is live; ownership of the bio passes to the list.
            Some(w) => unsafe { ffi::dmss_worker_defer(w.as_ptr(), bio.0.as_ptr()) },
            None => bio.endio(EIO.to_errno()),
        }
    }

    /// Takes the oldest deferred bio.
    pub(crate) fn pop(&self) -> Option<Bio> {
        let w = self.get()?;
        // SAFETY: the worker is live; a popped bio is owned by the caller.
        NonNull::new(unsafe { ffi::dmss_worker_pop(w.as_ptr()) }).map(Bio)
    }

    /// Puts a bio back at the head of the queue (to be processed next).
    pub(crate) fn push_front(&self, bio: Bio) {
        match self.get() {
            // SAFETY: as in `defer`.
            Some(w) => unsafe { ffi::dmss_worker_push_front(w.as_ptr(), bio.0.as_ptr()) },
            None => bio.endio(EIO.to_errno()),
        }
    }

    /// Schedules the work item.
    pub(crate) fn kick(&self) {
        if let Some(w) = self.get() {
            // SAFETY: the worker is live.
            unsafe { ffi::dmss_worker_kick(w.as_ptr()) }
        }
    }

    /// Waits until queued work has run (not from the worker itself).
    pub(crate) fn flush(&self) {
        if let Some(w) = self.get() {
            // SAFETY: the worker is live.
            unsafe { ffi::dmss_worker_flush(w.as_ptr()) }
        }
    }

    /// Drains and destroys the workqueue.
    pub(crate) fn shutdown(&self) {
        let w = self.0.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if !w.is_null() {
            // SAFETY: we took the only pointer; destroy_workqueue runs the pending work
            // item to completion first, and the bio list is empty by then.
            unsafe { ffi::dmss_worker_destroy(w) }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A mutex with a non-blocking `try_lock` (for `map`), guarding `T`.
pub(crate) struct TryMutex<T> {
    m: NonNull<ffi::CMutex>,
    data: UnsafeCell<T>,
}

// SAFETY: access to `data` is serialised by the mutex.
unsafe impl<T: Send> Send for TryMutex<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for TryMutex<T> {}

/// Holds a [`TryMutex`] locked.
pub(crate) struct TryMutexGuard<'a, T> {
    lock: &'a TryMutex<T>,
}

impl<T> TryMutex<T> {
    /// Creates an unlocked mutex.
    pub(crate) fn new(data: T) -> Result<Self> {
        // SAFETY: plain allocation; NULL on failure.
        let m = NonNull::new(unsafe { ffi::dmss_mutex_create() }).ok_or(ENOMEM)?;
        Ok(TryMutex {
            m,
            data: UnsafeCell::new(data),
        })
    }

    /// Locks, sleeping if needed.
    pub(crate) fn lock(&self) -> TryMutexGuard<'_, T> {
        // SAFETY: the mutex is live.
        unsafe { ffi::dmss_mutex_lock(self.m.as_ptr()) };
        TryMutexGuard { lock: self }
    }

    /// Locks if free, without sleeping.
    pub(crate) fn try_lock(&self) -> Option<TryMutexGuard<'_, T>> {
        // SAFETY: the mutex is live.
        if unsafe { ffi::dmss_mutex_trylock(self.m.as_ptr()) } != 0 {
            Some(TryMutexGuard { lock: self })
        } else {
            None
        }
    }
}

impl<T> Drop for TryMutex<T> {
    fn drop(&mut self) {
        // SAFETY: no guard can exist (it would borrow self).
        unsafe { ffi::dmss_mutex_destroy(self.m.as_ptr()) }
    }
}

impl<T> Deref for TryMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the mutex.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for TryMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the mutex, so this is the only reference.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for TryMutexGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: we hold the mutex.
        unsafe { ffi::dmss_mutex_unlock(self.lock.m.as_ptr()) }
    }
}

/// A counter of bios in flight that can be waited on until it drops to zero.
pub(crate) struct Inflight(NonNull<ffi::CInflight>);

// SAFETY: atomic counter and wait queue on the C side.
unsafe impl Send for Inflight {}
// SAFETY: as above.
unsafe impl Sync for Inflight {}

impl Inflight {
    /// A zero counter.
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: plain allocation; NULL on failure.
        NonNull::new(unsafe { ffi::dmss_inflight_create() })
            .map(Inflight)
            .ok_or(ENOMEM)
    }
    /// +1.
    pub(crate) fn inc(&self) {
        // SAFETY: live counter.
        unsafe { ffi::dmss_inflight_inc(self.0.as_ptr()) }
    }
    /// -1, waking waiters at zero.
    pub(crate) fn dec(&self) {
        // SAFETY: live counter.
        unsafe { ffi::dmss_inflight_dec(self.0.as_ptr()) }
    }
    /// Sleeps until the counter is zero.
    pub(crate) fn wait_zero(&self) {
        // SAFETY: live counter.
        unsafe { ffi::dmss_inflight_wait_zero(self.0.as_ptr()) }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        // SAFETY: no one else holds the counter any more.
        unsafe { ffi::dmss_inflight_destroy(self.0.as_ptr()) }
    }
}

/// Chunk copies through one preallocated buffer with dm-io: queued for a batch, then run
/// (all reads, then all writes, per buffer-full) and waited for together.
pub(crate) struct Copier(NonNull<ffi::CCopier>);

// SAFETY: used by the worker only, under the origin's state lock, so the C side's queue is
// never touched by two threads at once.
unsafe impl Send for Copier {}
// SAFETY: as above.
unsafe impl Sync for Copier {}

impl Copier {
    /// A copier with its dm-io client and buffer.
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: allocations and dm-io client creation; NULL on failure.
        NonNull::new(unsafe { ffi::dmss_copier_create() })
            .map(Copier)
            .ok_or(ENOMEM)
    }

    /// Queues a copy of `n` sectors (it runs at the next `wait`, or when the queue is full).
    pub(crate) fn copy(
        &self,
        src: DevHandle,
        src_sector: u64,
        dst: DevHandle,
        dst_sector: u64,
        n: u64,
    ) {
        // SAFETY: both devices are open (DevHandle invariant) and stay open until `wait`
        // returns (the worker waits before the batch ends); dm-io allocates from its
        // mempools and never fails the call.
        unsafe {
            ffi::dmss_copy(
                self.0.as_ptr(),
                src.0.as_ptr(),
                src_sector,
                dst.0.as_ptr(),
                dst_sector,
                n,
            )
        }
    }

    /// Runs and waits for every copy queued since the last wait; Err if any failed.
    pub(crate) fn wait(&self) -> Result {
        // SAFETY: live copier.
        match unsafe { ffi::dmss_copy_wait(self.0.as_ptr()) } {
            0 => Ok(()),
            e => Err(Error::from_errno(e)),
        }
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        // SAFETY: no copy is outstanding (every batch is waited for).
        unsafe { ffi::dmss_copier_destroy(self.0.as_ptr()) }
    }
}

/// Synchronous metadata I/O to the COW device (the store's `BlockIo`).
pub(crate) struct MetaIo {
    client: NonNull<ffi::IoClient>,
    dev: DevHandle,
    blocks: u64,
}

// SAFETY: dm-io clients may be used from any process context; the store that owns this is
// behind the origin's lock.
unsafe impl Send for MetaIo {}

impl MetaIo {
    /// I/O to `dev` (whose size fixes the store's device size).
    pub(crate) fn new(dev: &Device) -> Result<Self> {
        // SAFETY: allocation of a dm-io client; NULL on failure.
        let client = NonNull::new(unsafe { ffi::dmss_io_client_create() }).ok_or(ENOMEM)?;
        Ok(MetaIo {
            client,
            dev: dev.handle(),
            blocks: dev.sectors() / BLOCK_SECTORS,
        })
    }

    fn io(&self, nr: u64, blocks: u32, buf: *mut c_void, op: c_int) -> fmt_::Result<()> {
        // SAFETY: `buf` covers `blocks` blocks (or is NULL for a flush) and stays valid during
        // this synchronous call; the device is open (DevHandle invariant).
        let r = unsafe {
            ffi::dmss_io(
                self.client.as_ptr(),
                self.dev.0.as_ptr(),
                nr * BLOCK_SECTORS,
                blocks * BLOCK_SECTORS as u32,
                buf,
                op,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(fmt_::Error::Io { block: nr })
        }
    }
}

impl Drop for MetaIo {
    fn drop(&mut self) {
        // SAFETY: no I/O is in flight (all of it is synchronous).
        unsafe { ffi::dmss_io_client_destroy(self.client.as_ptr()) }
    }
}

impl fmt_::BlockIo for MetaIo {
    fn read_block(&mut self, nr: u64, buf: &mut Block) -> fmt_::Result<()> {
        if nr >= self.blocks {
            return Err(fmt_::Error::Io { block: nr });
        }
        self.io(nr, 1, buf.as_mut_ptr() as *mut c_void, IO_READ)
    }

    fn write_block(&mut self, nr: u64, buf: &Block) -> fmt_::Result<()> {
        if nr >= self.blocks {
            return Err(fmt_::Error::Io { block: nr });
        }
        // dm-io only reads from the buffer for a write.
        self.io(nr, 1, buf.as_ptr() as *mut c_void, IO_WRITE)
    }

    fn write_run(
        &mut self,
        nr: u64,
        bufs: &[Block],
        preflush: bool,
        fua: bool,
    ) -> fmt_::Result<()> {
        let n = bufs.len() as u64;
        if n == 0 || nr + n > self.blocks {
            return Err(fmt_::Error::Io { block: nr });
        }
        let mut op = IO_WRITE;
        if preflush {
            op |= IO_PREFLUSH;
        }
        if fua {
            op |= IO_FUA;
        }
        // One request over the contiguous blocks; dm-io only reads from the buffer.
        self.io(nr, n as u32, bufs.as_ptr() as *mut c_void, op)
    }

    fn flush(&mut self) -> fmt_::Result<()> {
        self.io(0, 0, core::ptr::null_mut(), IO_FLUSH)
            .map_err(|_| fmt_::Error::Io { block: u64::MAX })
    }

    fn size_blocks(&self) -> u64 {
        self.blocks
    }

    fn crc32c(&self, data: &[u8]) -> u32 {
        // SAFETY: `data` is a valid slice.
        unsafe { ffi::dmss_crc32c(data.as_ptr() as *const c_void, data.len()) }
    }
}

/// A random u64 (store ids).
pub(crate) fn random_u64() -> u64 {
    // SAFETY: get_random_u64 has no preconditions.
    unsafe { ffi::dmss_random_u64() }
}

/// Monotonic time in nanoseconds.
pub(crate) fn now_ns() -> u64 {
    // SAFETY: ktime_get_ns has no preconditions.
    unsafe { ffi::dmss_now_ns() }
}

/// Cache memory for the store: page-aligned blocks from vmalloc, bookkeeping from kmalloc.
pub(crate) struct CacheMemory {
    blocks: NonNull<Block>,
    nblocks: usize,
    slots: KVec<Slot>,
    buckets: KVec<u32>,
    pending: KVec<u64>,
}

// SAFETY: the vmalloc area is owned exclusively by this struct.
unsafe impl Send for CacheMemory {}

impl CacheMemory {
    /// Memory for a cache of `n` blocks.
    pub(crate) fn new(n: usize) -> Result<Self> {
        let nblocks = n + SCRATCH_BLOCKS;
        // SAFETY: plain allocation; NULL on failure.
        let p = unsafe { ffi::dmss_vzalloc(nblocks * BLOCK_SIZE) } as *mut Block;
        let blocks = NonNull::new(p).ok_or(ENOMEM)?;
        let mem = CacheMemory {
            blocks,
            nblocks,
            slots: KVec::from_elem(Slot::new(), n, GFP_KERNEL)?,
            buckets: KVec::from_elem(0u32, (2 * n).next_power_of_two(), GFP_KERNEL)?,
            pending: KVec::from_elem(0u64, 1024, GFP_KERNEL)?,
        };
        Ok(mem)
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.nblocks * BLOCK_SIZE
            + self.slots.len() * core::mem::size_of::<Slot>()
            + self.buckets.len() * 4
            + self.pending.len() * 8
    }
}

impl Drop for CacheMemory {
    fn drop(&mut self) {
        // SAFETY: allocated by dmss_vzalloc in `new`, freed once.
        unsafe { ffi::dmss_vfree(self.blocks.as_ptr() as *mut c_void) }
    }
}

impl CacheMem for CacheMemory {
    fn parts(&mut self) -> Parts<'_> {
        // SAFETY: `blocks` points to `nblocks` zero-initialised blocks owned by self; the
        // returned borrow is tied to `&mut self`.
        let blocks = unsafe { core::slice::from_raw_parts_mut(self.blocks.as_ptr(), self.nblocks) };
        Parts {
            blocks,
            slots: &mut self.slots,
            buckets: &mut self.buckets,
            pending: &mut self.pending,
        }
    }
    fn blocks(&self) -> &[Block] {
        // SAFETY: as in `parts`, shared.
        unsafe { core::slice::from_raw_parts(self.blocks.as_ptr(), self.nblocks) }
    }
    fn slots(&self) -> &[Slot] {
        &self.slots
    }
}

/// A global table of live objects (origins, found by snapshots), guarded by a C mutex
/// shared by all registries.  An entry is claimed under a key first (so that two
/// constructors cannot both take the same devices), published when the object is ready, and
/// released by its owner.  The table grows as needed: there is no fixed limit.
pub(crate) struct Registry<K, T> {
    entries: UnsafeCell<KVec<Option<(K, Option<kernel::sync::Arc<T>>)>>>,
}

// SAFETY: `entries` is only accessed under dmss_registry_lock.
unsafe impl<K: Send, T: Send + Sync> Sync for Registry<K, T> {}

impl<K: PartialEq, T> Registry<K, T> {
    /// An empty registry.
    pub(crate) const fn new() -> Self {
        Registry {
            entries: UnsafeCell::new(KVec::new()),
        }
    }

    fn with<R>(
        &self,
        f: impl FnOnce(&mut KVec<Option<(K, Option<kernel::sync::Arc<T>>)>>) -> R,
    ) -> R {
        // SAFETY: the registry lock serialises all access to `entries`, so this is the only
        // reference while `f` runs.
        unsafe {
            ffi::dmss_registry_lock();
            let r = f(&mut *self.entries.get());
            ffi::dmss_registry_unlock();
            r
        }
    }

    /// Claims `key` unless an entry's key is `busy` for it (EBUSY), atomically.
    pub(crate) fn claim(&self, key: K, busy: impl Fn(&K) -> bool) -> Result {
        self.with(|e| {
            if e.iter().flatten().any(|(k, _)| busy(k)) {
                return Err(EBUSY);
            }
            match e.iter_mut().find(|x| x.is_none()) {
                Some(slot) => *slot = Some((key, None)),
                None => e.push(Some((key, None)), GFP_KERNEL)?,
            }
            Ok(())
        })
    }

    /// Hides the object under `key` from `find`; the claim stays until `release`.
    pub(crate) fn unpublish(&self, key: &K) -> Option<kernel::sync::Arc<T>> {
        self.with(|e| {
            let (_, slot) = e.iter_mut().flatten().find(|(k, _)| k == key)?;
            slot.take()
        })
    }

    /// Makes `v` visible to `find` under the claimed `key`.
    pub(crate) fn publish(&self, key: &K, v: kernel::sync::Arc<T>) {
        self.with(|e| {
            if let Some((_, slot)) = e.iter_mut().flatten().find(|(k, _)| k == key) {
                *slot = Some(v);
            }
        })
    }

    /// Releases the claim on `key` and returns its object, if published.
    pub(crate) fn release(&self, key: &K) -> Option<kernel::sync::Arc<T>> {
        self.with(|e| {
            let x = e
                .iter_mut()
                .find(|x| matches!(x, Some((k, _)) if k == key))?;
            x.take().and_then(|(_, v)| v)
        })
    }

    /// Frees the table's memory (module exit: no entry is left, since every target was
    /// destroyed before the module can go).
    pub(crate) fn free(&self) {
        self.with(|e| drop(core::mem::replace(e, KVec::new())));
    }

    /// The published object of the first entry whose key satisfies `f`.
    pub(crate) fn find(&self, f: impl Fn(&K) -> bool) -> Option<kernel::sync::Arc<T>> {
        self.with(|e| {
            e.iter()
                .flatten()
                .find(|(k, v)| v.is_some() && f(k))
                .and_then(|(_, v)| v.clone())
        })
    }
}

// ---- registration and entry points ----------------------------------------------------------

/// Registers both target types.
pub(crate) fn register() -> Result {
    // SAFETY: called once from module init.
    let r = unsafe { ffi::dmss_register() };
    if r < 0 {
        return Err(Error::from_errno(r));
    }
    Ok(())
}

/// Unregisters both target types.
pub(crate) fn unregister() {
    // SAFETY: called once from module exit, after a successful register().
    unsafe { ffi::dmss_unregister() }
}

type Kind0 = crate::Origin;
type Kind1 = crate::Snapshot;

fn target(ti: *mut ffi::DmTarget) -> Target {
    // SAFETY: device-mapper never calls a target method with a NULL dm_target.
    Target(unsafe { NonNull::new_unchecked(ti) })
}

fn ctx<'a, T>(ti: *mut ffi::DmTarget) -> &'a T {
    // SAFETY: ti->private was set by a successful ctr to a leaked KBox<T> of this target's
    // type (kind selects T) and is only freed by dtr, after which dm makes no more calls.
    unsafe { &*(ffi::dmss_ti_private(ti) as *const T) }
}

const MAX_ARGS: usize = 16;

fn args<'a>(argc: c_uint, argv: *mut *mut c_char, buf: &mut [&'a CStr; MAX_ARGS]) -> Option<usize> {
    let n = argc as usize;
    if n > MAX_ARGS {
        return None;
    }
    for (i, slot) in buf.iter_mut().enumerate().take(n) {
        // SAFETY: dm passes `argc` valid NUL-terminated strings that outlive the callback.
        *slot = unsafe { CStr::from_char_ptr(*argv.add(i)) };
    }
    Some(n)
}

fn do_ctr<T: TargetOps>(ti: *mut ffi::DmTarget, argc: c_uint, argv: *mut *mut c_char) -> c_int {
    let t = target(ti);
    let mut buf = [kernel::c_str!(""); MAX_ARGS];
    let Some(n) = args(argc, argv, &mut buf) else {
        t.set_error(kernel::c_str!("too many arguments"));
        return EINVAL.to_errno();
    };
    match T::ctr(&t, &buf[..n]) {
        Ok(b) => {
            // SAFETY: ti is live; the pointer is reclaimed in dtr.
            unsafe { ffi::dmss_ti_set_private(ti, KBox::into_raw(b) as *mut c_void) };
            0
        }
        Err(e) => e.to_errno(),
    }
}

fn do_dtr<T: TargetOps>(ti: *mut ffi::DmTarget) {
    // SAFETY: set by a successful ctr (dm calls dtr only then); reclaimed exactly once.
    let b = unsafe { KBox::from_raw(ffi::dmss_ti_private(ti) as *mut T) };
    b.dtr(&target(ti));
}

fn status_type(ty: c_int) -> StatusType {
    match ty {
        0 => StatusType::Info,
        1 => StatusType::Table,
        _ => StatusType::Other,
    }
}

fn bio(b: *mut ffi::Bio) -> Bio {
    // SAFETY: dm never passes a NULL bio.
    Bio(unsafe { NonNull::new_unchecked(b) })
}

macro_rules! dispatch {
    ($kind:expr, $t:ident => $e:expr) => {
        if $kind == 0 {
            type $t = Kind0;
            $e
        } else {
            type $t = Kind1;
            $e
        }
    };
}

#[no_mangle]
extern "C" fn dmss_rust_ctr(
    ti: *mut ffi::DmTarget,
    kind: c_int,
    argc: c_uint,
    argv: *mut *mut c_char,
) -> c_int {
    dispatch!(kind, T => do_ctr::<T>(ti, argc, argv))
}

#[no_mangle]
extern "C" fn dmss_rust_dtr(ti: *mut ffi::DmTarget, kind: c_int) {
    dispatch!(kind, T => do_dtr::<T>(ti))
}

#[no_mangle]
extern "C" fn dmss_rust_map(ti: *mut ffi::DmTarget, kind: c_int, b: *mut ffi::Bio) -> c_int {
    let r = dispatch!(kind, T => ctx::<T>(ti).map(&target(ti), MapBio(bio(b), PhantomData)));
    match r {
        MapResult::Submitted => 0,
        MapResult::Remapped => 1,
        MapResult::Kill => 4,
    }
}

#[no_mangle]
extern "C" fn dmss_rust_end_io(ti: *mut ffi::DmTarget, kind: c_int, b: *mut ffi::Bio) {
    // SAFETY: dm never passes a NULL bio.
    let r = BioRef(unsafe { NonNull::new_unchecked(b) });
    dispatch!(kind, T => ctx::<T>(ti).end_io(&r))
}

#[no_mangle]
extern "C" fn dmss_rust_status(
    ti: *mut ffi::DmTarget,
    kind: c_int,
    ty: c_int,
    result: *mut c_char,
    maxlen: c_uint,
) {
    let mut out = Output {
        buf: result,
        len: 0,
        max: maxlen as usize,
    };
    dispatch!(kind, T => ctx::<T>(ti).status(status_type(ty), &mut out))
}

#[no_mangle]
extern "C" fn dmss_rust_message(
    ti: *mut ffi::DmTarget,
    kind: c_int,
    argc: c_uint,
    argv: *mut *mut c_char,
    result: *mut c_char,
    maxlen: c_uint,
) -> c_int {
    let mut out = Output {
        buf: result,
        len: 0,
        max: maxlen as usize,
    };
    if maxlen > 0 {
        // SAFETY: result has maxlen >= 1 bytes.
        unsafe { *result = 0 };
    }
    let mut buf = [kernel::c_str!(""); MAX_ARGS];
    let Some(n) = args(argc, argv, &mut buf) else {
        return EINVAL.to_errno();
    };
    let r = dispatch!(kind, T => ctx::<T>(ti).message(&target(ti), &buf[..n], &mut out));
    match r {
        Ok(()) if !out.is_empty() => 1,
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

#[no_mangle]
extern "C" fn dmss_rust_presuspend(ti: *mut ffi::DmTarget, kind: c_int) {
    dispatch!(kind, T => ctx::<T>(ti).presuspend())
}

#[no_mangle]
extern "C" fn dmss_rust_presuspend_undo(ti: *mut ffi::DmTarget, kind: c_int) {
    dispatch!(kind, T => ctx::<T>(ti).presuspend_undo())
}

#[no_mangle]
extern "C" fn dmss_rust_postsuspend(ti: *mut ffi::DmTarget, kind: c_int) {
    dispatch!(kind, T => ctx::<T>(ti).postsuspend())
}

#[no_mangle]
extern "C" fn dmss_rust_resume(ti: *mut ffi::DmTarget, kind: c_int) {
    dispatch!(kind, T => ctx::<T>(ti).resume())
}

#[no_mangle]
extern "C" fn dmss_rust_device(
    ti: *mut ffi::DmTarget,
    kind: c_int,
    idx: c_uint,
    len: *mut u64,
) -> *mut ffi::DmDev {
    match dispatch!(kind, T => ctx::<T>(ti).device(idx)) {
        Some((d, n)) => {
            // SAFETY: the glue passes a pointer to a local u64.
            unsafe { *len = n };
            d.0.as_ptr()
        }
        None => core::ptr::null_mut(),
    }
}

#[no_mangle]
extern "C" fn dmss_rust_work(c: *mut c_void) {
    // SAFETY: the worker was created by `Worker::new::<Shared>` with an Arc reference that
    // stays alive until the worker is destroyed, after its last work item ran.
    let s = unsafe { &*(c as *const crate::Shared) };
    s.work();
}

// SPDX-License-Identifier: GPL-2.0

//! Target types: the [`TargetOps`] trait a target implements, its registration (one
//! `target_type` and one operations table per Rust type), the `dm_target` handed to each
//! callback, and the callbacks' argument and output conventions.

use core::ffi::c_void;
use core::fmt;
use core::marker::PhantomData;
use core::ops::Deref;
use core::ptr::NonNull;
use kernel::ffi::{c_char, c_int, c_uint};
use kernel::prelude::*;

use super::bio::{BioRef, MapBio, PER_BIO_DATA};
use super::device::Device;
use super::ffi;

fn consts() -> &'static ffi::Consts {
    // SAFETY: `dmss_consts` is a `const` object of the glue, initialised at build time and
    // never written.
    unsafe { &ffi::dmss_consts }
}

/// The result of `map` (`DM_MAPIO_*`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapResult {
    /// `DM_MAPIO_REMAPPED`: the bio was remapped and device-mapper submits it.
    Remapped,
    /// `DM_MAPIO_SUBMITTED`: the target took the bio and will submit or complete it later.
    Submitted,
    /// `DM_MAPIO_KILL`: fail the bio with -EIO.
    Kill,
}

impl MapResult {
    fn to_c(self) -> c_int {
        let c = consts();
        match self {
            MapResult::Remapped => c.mapio_remapped,
            MapResult::Submitted => c.mapio_submitted,
            MapResult::Kill => c.mapio_kill,
        }
    }
}

/// Status requested by `dmsetup status` (Info) or `dmsetup table` (Table).
#[derive(PartialEq, Eq, Clone, Copy)]
pub(crate) enum StatusType {
    /// `STATUSTYPE_INFO`.
    Info,
    /// `STATUSTYPE_TABLE`.
    Table,
    /// `STATUSTYPE_IMA` and anything newer.
    Other,
}

impl StatusType {
    fn from_c(ty: c_int) -> Self {
        let c = consts();
        if ty == c.statustype_info {
            StatusType::Info
        } else if ty == c.statustype_table {
            StatusType::Table
        } else {
            StatusType::Other
        }
    }
}

/// A bounded text sink over a C result buffer (status and message output), always
/// NUL-terminated when it has room for one byte.
///
/// # Invariants
///
/// `buf` is valid for writes of `max` bytes while this value exists (it is created by this
/// module for one callback and only lent out), and `len < max` unless `max == 0`.
pub(crate) struct Output {
    buf: *mut u8,
    len: usize,
    max: usize,
}

impl Output {
    /// # Safety
    ///
    /// `buf` is valid for writes of `max` bytes while the result exists.
    unsafe fn new(buf: *mut c_char, max: c_uint) -> Self {
        // INVARIANT: the caller's guarantee; `len` is 0.
        Output {
            buf: buf.cast(),
            len: 0,
            max: max as usize,
        }
    }

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
            // SAFETY: `buf` is valid for `max` bytes (type invariant) and `len + 1 < max`, so
            // both this byte and the terminator after it are in bounds.
            unsafe {
                *self.buf.add(self.len) = b;
                *self.buf.add(self.len + 1) = 0;
            }
            self.len += 1;
        }
        Ok(())
    }
}

/// The operations of a target type.  All but the constructor and destructor may run on
/// many CPUs at once, so they get `&self` and the state must be `Sync`.
pub(crate) trait TargetOps: Sized + Send + Sync {
    /// Constructor: parses the table line.  On error, set the message with `t.set_error`.
    fn ctr(t: &CtrTarget, args: &[&CStr]) -> Result<KBox<Self>>;
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
    fn device(&self, idx: u32) -> Option<(&Device, u64)>;
}

/// The `struct dm_target` a callback runs for.
///
/// # Invariants
///
/// The pointer is the live dm_target of the callback in progress; a `Target` exists only
/// for the duration of that callback (it is created by this module and lent out).
pub(crate) struct Target(NonNull<ffi::DmTarget>);

impl Target {
    /// First sector of the target in the mapped device.
    pub(crate) fn begin(&self) -> u64 {
        // SAFETY: the dm_target is live (type invariant); `begin` is fixed at creation.
        unsafe { ffi::dmss_ti_begin(self.0.as_ptr()) }
    }

    /// Length of the target in sectors.
    pub(crate) fn len(&self) -> u64 {
        // SAFETY: the dm_target is live (type invariant); `len` is fixed at creation.
        unsafe { ffi::dmss_ti_len(self.0.as_ptr()) }
    }

    /// Sets `ti->error`, which dm prints when the constructor fails.
    pub(crate) fn set_error(&self, msg: &'static CStr) {
        // SAFETY: the dm_target is live (type invariant), and the message is static, so it
        // outlives the dm_target that points at it.
        unsafe { ffi::dmss_ti_set_error(self.0.as_ptr(), msg.as_char_ptr()) }
    }

    /// dev_t of the mapped device this target belongs to.
    pub(crate) fn devt(&self) -> u32 {
        // SAFETY: the dm_target and its table are live (type invariant).
        unsafe { ffi::dmss_ti_devt(self.0.as_ptr()) }
    }

    /// Whether the table was loaded read-write (`dmsetup create --readonly` loads it
    /// read-only: the target must then write nothing).
    pub(crate) fn is_writable(&self) -> bool {
        // SAFETY: the dm_target and its table are live (type invariant); the table's mode
        // is fixed when it is created.
        unsafe { ffi::dmss_ti_writable(self.0.as_ptr()) != 0 }
    }

    /// A handle for raising dm events later (see [`EventHandle`]).
    pub(crate) fn event_handle(&self) -> EventHandle {
        // INVARIANT: the owner's rule documented on `EventHandle`.
        EventHandle(self.0)
    }
}

/// The dm_target of a constructor call: a [`Target`] that may also be set up and open
/// devices, which dm allows only there.
///
/// # Invariants
///
/// `t` is the dm_target of the constructor call in progress (a `CtrTarget` is created by
/// this module for that call and only lent out).
pub(crate) struct CtrTarget {
    t: Target,
}

impl Deref for CtrTarget {
    type Target = Target;
    fn deref(&self) -> &Target {
        &self.t
    }
}

impl CtrTarget {
    /// Sets the largest bio (split at `max_io_len` boundaries; 0 for none) and the number
    /// of flush bios the target gets (and no discard bios).
    pub(crate) fn setup(&self, max_io_len: u32, flush_bios: u32) -> Result {
        // SAFETY: called from the constructor (type invariant), when dm expects these fields
        // to be set; the per-bio data size stays what `Adapter::ctr` set.
        let r =
            unsafe { ffi::dmss_ti_setup(self.t.0.as_ptr(), max_io_len, PER_BIO_DATA, flush_bios) };
        if r < 0 {
            return Err(Error::from_errno(r));
        }
        Ok(())
    }

    /// Opens a device named by a table argument.  Every reference to it must be dropped by
    /// the time the target's destructor returns (see [`Device`]).
    pub(crate) fn get_device(&self, path: &CStr) -> Result<Device> {
        // SAFETY: we are in the constructor of this live dm_target (type invariant); the
        // rest of the contract is the owner's rule documented on `Device`.
        unsafe { Device::open(self.t.0, path) }
    }

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

/// Raises dm table events from outside a callback (the worker).
///
/// # Invariants
///
/// The dm_target is live while the handle is used: its owner keeps the handle in state
/// that the target's destructor takes away (under the lock its users hold) before the
/// dm_target goes.
#[derive(Clone, Copy)]
pub(crate) struct EventHandle(NonNull<ffi::DmTarget>);

// SAFETY: dm_table_event may be called from any process context.
unsafe impl Send for EventHandle {}
// SAFETY: the handle is only read; dm_table_event does its own locking.
unsafe impl Sync for EventHandle {}

impl EventHandle {
    /// dm_table_event(): wakes `dmsetup wait` and udev listeners.
    pub(crate) fn raise(&self) {
        // SAFETY: the dm_target is live while the handle is used (type invariant).
        unsafe { ffi::dmss_ti_event(self.0.as_ptr()) }
    }
}

// ---- registration ---------------------------------------------------------------------------

/// A registered target type `T`; unregistered on drop.
///
/// # Invariants
///
/// The pointer is the glue's `struct dmss_target` returned by a successful
/// `dmss_target_register` with `Adapter::<T>::VTABLE`, not yet unregistered.
pub(crate) struct Registration<T: TargetOps> {
    t: NonNull<ffi::CTarget>,
    _type: PhantomData<fn(T)>,
}

// SAFETY: registration and unregistration may happen from any process context.
unsafe impl<T: TargetOps> Send for Registration<T> {}
// SAFETY: `&Registration` offers no method.
unsafe impl<T: TargetOps> Sync for Registration<T> {}

impl<T: TargetOps> Registration<T> {
    /// Registers `T` as target type `name`, version `version`.
    pub(crate) fn new(name: &'static CStr, version: [u32; 3]) -> Result<Self> {
        let mut err: c_int = 0;
        // SAFETY: `name` is static, so it outlives the target type; `version` is read during
        // the call only; the table is a promoted constant, so it is static too, and its
        // functions implement the callbacks' contract for `T`.
        let t = unsafe {
            ffi::dmss_target_register(
                name.as_char_ptr(),
                version.as_ptr(),
                Adapter::<T>::VTABLE,
                &mut err,
            )
        };
        match NonNull::new(t) {
            // INVARIANT: a successful registration.
            Some(t) => Ok(Registration {
                t,
                _type: PhantomData,
            }),
            None => Err(Error::from_errno(if err < 0 { err } else { -22 })),
        }
    }
}

impl<T: TargetOps> Drop for Registration<T> {
    fn drop(&mut self) {
        // SAFETY: registered and not yet unregistered (type invariant); dm refuses to unload
        // the module while a target of this type exists, so no callback can run afterwards.
        unsafe { ffi::dmss_target_unregister(self.t.as_ptr()) }
    }
}

/// The most arguments a table line or message may have.
const MAX_ARGS: usize = 16;

/// Reads dm's `argc`/`argv` into `buf`; None if there are more than [`MAX_ARGS`].
///
/// # Safety
///
/// `argv` holds `argc` valid NUL-terminated strings that outlive `'a`.
unsafe fn args<'a>(
    argc: c_uint,
    argv: *mut *mut c_char,
    buf: &mut [&'a CStr; MAX_ARGS],
) -> Option<usize> {
    let n = argc as usize;
    if n > MAX_ARGS {
        return None;
    }
    for (i, slot) in buf.iter_mut().enumerate().take(n) {
        // SAFETY: `i < argc`, and the caller guarantees the strings are valid for `'a`.
        *slot = unsafe { CStr::from_char_ptr(*argv.add(i)) };
    }
    Some(n)
}

/// The C entry points of target type `T`.
struct Adapter<T>(PhantomData<T>);

impl<T: TargetOps> Adapter<T> {
    const VTABLE: &'static ffi::TargetOpsTable = &ffi::TargetOpsTable {
        ctr: Self::ctr,
        dtr: Self::dtr,
        map: Self::map,
        end_io: Self::end_io,
        status: Self::status,
        message: Self::message,
        presuspend: Self::presuspend,
        presuspend_undo: Self::presuspend_undo,
        postsuspend: Self::postsuspend,
        resume: Self::resume,
        device: Self::device,
    };

    /// # Safety
    ///
    /// `ti` is a live dm_target of type `T`'s target type, during a callback.
    unsafe fn target(ti: *mut ffi::DmTarget) -> Target {
        // SAFETY: dm never calls a target method with a NULL dm_target.
        // INVARIANT: the caller's guarantee; the result lives in the callback only.
        Target(unsafe { NonNull::new_unchecked(ti) })
    }

    /// # Safety
    ///
    /// `ti` is a live dm_target of type `T`'s target type whose constructor succeeded and
    /// whose destructor has not started, and the result is not used beyond the callback.
    unsafe fn ctx<'a>(ti: *mut ffi::DmTarget) -> &'a T {
        // SAFETY: the glue calls this table's functions only for targets of the type
        // registered with it, so `ti->private` was set by `Self::ctr` to a leaked `KBox<T>`;
        // it is reclaimed only by `Self::dtr`, after which dm makes no more calls.
        unsafe { &*(ffi::dmss_ti_private(ti) as *const T) }
    }

    /// # Safety
    ///
    /// dm's `ctr` contract: `ti` is a new dm_target of `T`'s type, `argv` holds `argc`
    /// strings valid during the call.
    unsafe extern "C" fn ctr(
        ti: *mut ffi::DmTarget,
        argc: c_uint,
        argv: *mut *mut c_char,
    ) -> c_int {
        // SAFETY: the dm_target is live during the call (dm's contract).
        let t = unsafe { Self::target(ti) };
        let mut buf = [kernel::c_str!(""); MAX_ARGS];
        // SAFETY: dm's contract: `argc` strings that outlive this call, and `buf` does not
        // escape it.
        let Some(n) = (unsafe { args(argc, argv, &mut buf) }) else {
            t.set_error(kernel::c_str!("too many arguments"));
            return EINVAL.to_errno();
        };
        // SAFETY: the constructor is where dm expects these fields to be set: per-bio data
        // for the tag every bio of this target carries (see `BioRef`), no split, no flush
        // or discard bios until the target's own `setup`.
        let r = unsafe { ffi::dmss_ti_setup(ti, 0, PER_BIO_DATA, 0) };
        if r < 0 {
            return r;
        }
        // INVARIANT: this is the constructor call of `t`.
        let ct = CtrTarget { t };
        match T::ctr(&ct, &buf[..n]) {
            Ok(b) => {
                // SAFETY: the dm_target is live; the leaked box is reclaimed by `Self::dtr`,
                // the only other user of `ti->private`.
                unsafe { ffi::dmss_ti_set_private(ti, KBox::into_raw(b) as *mut c_void) };
                0
            }
            Err(e) => e.to_errno(),
        }
    }

    /// # Safety
    ///
    /// dm's `dtr` contract: `ti`'s constructor succeeded, and dm makes no call for it after
    /// this one.
    unsafe extern "C" fn dtr(ti: *mut ffi::DmTarget) {
        // SAFETY: `ti->private` is the `KBox<T>` leaked by `Self::ctr` (dm calls dtr only
        // after a successful ctr), reclaimed exactly once, here.
        let b = unsafe { KBox::from_raw(ffi::dmss_ti_private(ti) as *mut T) };
        // SAFETY: the dm_target is live during the call.
        b.dtr(&unsafe { Self::target(ti) });
    }

    /// # Safety
    ///
    /// dm's `map` contract: a constructed dm_target of `T`'s type and a live bio it owns.
    unsafe extern "C" fn map(ti: *mut ffi::DmTarget, b: *mut ffi::Bio) -> c_int {
        // SAFETY: dm never passes a NULL bio; it is a bio of this target (set up by `ctr`),
        // handed over for this `map` call, which the `MapBio` does not outlive.
        let bio = unsafe { MapBio::from_raw(NonNull::new_unchecked(b)) };
        // SAFETY: a constructed target during a callback (dm's contract).
        let (c, t) = unsafe { (Self::ctx(ti), Self::target(ti)) };
        c.map(&t, bio).to_c()
    }

    /// # Safety
    ///
    /// dm's `end_io` contract: a constructed dm_target of `T`'s type and a bio it mapped.
    unsafe extern "C" fn end_io(ti: *mut ffi::DmTarget, b: *mut ffi::Bio) {
        // SAFETY: dm never passes a NULL bio, and it is live during the call; the
        // reference does not escape it.
        let r = unsafe { BioRef::from_raw(NonNull::new_unchecked(b)) };
        // SAFETY: a constructed target during a callback (dm's contract).
        unsafe { Self::ctx(ti) }.end_io(&r)
    }

    /// # Safety
    ///
    /// dm's `status` contract: a constructed dm_target of `T`'s type and a result buffer
    /// of `maxlen` bytes (NUL-terminated by the glue when `maxlen > 0`).
    unsafe extern "C" fn status(
        ti: *mut ffi::DmTarget,
        ty: c_int,
        result: *mut c_char,
        maxlen: c_uint,
    ) {
        // SAFETY: dm's contract: `result` is writable for `maxlen` bytes during the call,
        // and `out` does not escape it.
        let mut out = unsafe { Output::new(result, maxlen) };
        // SAFETY: a constructed target during a callback (dm's contract).
        unsafe { Self::ctx(ti) }.status(StatusType::from_c(ty), &mut out)
    }

    /// # Safety
    ///
    /// dm's `message` contract: a constructed dm_target of `T`'s type, `argc` strings in
    /// `argv` and a result buffer of `maxlen` bytes, all valid during the call.
    unsafe extern "C" fn message(
        ti: *mut ffi::DmTarget,
        argc: c_uint,
        argv: *mut *mut c_char,
        result: *mut c_char,
        maxlen: c_uint,
    ) -> c_int {
        // SAFETY: dm's contract: `result` is writable for `maxlen` bytes during the call,
        // and `out` does not escape it.
        let mut out = unsafe { Output::new(result, maxlen) };
        if maxlen > 0 {
            // SAFETY: `result` has at least one byte.
            unsafe { *result = 0 };
        }
        let mut buf = [kernel::c_str!(""); MAX_ARGS];
        // SAFETY: dm's contract: `argc` strings that outlive this call, and `buf` does not
        // escape it.
        let Some(n) = (unsafe { args(argc, argv, &mut buf) }) else {
            return EINVAL.to_errno();
        };
        // SAFETY: a constructed target during a callback (dm's contract).
        let (c, t) = unsafe { (Self::ctx(ti), Self::target(ti)) };
        match c.message(&t, &buf[..n], &mut out) {
            Ok(()) if !out.is_empty() => 1,
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }

    /// # Safety
    ///
    /// dm's suspend contract: a constructed dm_target of `T`'s type.
    unsafe extern "C" fn presuspend(ti: *mut ffi::DmTarget) {
        // SAFETY: a constructed target during a callback (dm's contract).
        unsafe { Self::ctx(ti) }.presuspend()
    }

    /// # Safety
    ///
    /// As for [`Self::presuspend`].
    unsafe extern "C" fn presuspend_undo(ti: *mut ffi::DmTarget) {
        // SAFETY: a constructed target during a callback (dm's contract).
        unsafe { Self::ctx(ti) }.presuspend_undo()
    }

    /// # Safety
    ///
    /// As for [`Self::presuspend`].
    unsafe extern "C" fn postsuspend(ti: *mut ffi::DmTarget) {
        // SAFETY: a constructed target during a callback (dm's contract).
        unsafe { Self::ctx(ti) }.postsuspend()
    }

    /// # Safety
    ///
    /// As for [`Self::presuspend`].
    unsafe extern "C" fn resume(ti: *mut ffi::DmTarget) {
        // SAFETY: a constructed target during a callback (dm's contract).
        unsafe { Self::ctx(ti) }.resume()
    }

    /// # Safety
    ///
    /// dm's `iterate_devices` contract (through the glue): a constructed dm_target of `T`'s
    /// type, and `len` valid for a write.
    unsafe extern "C" fn device(
        ti: *mut ffi::DmTarget,
        idx: c_uint,
        len: *mut u64,
    ) -> *mut ffi::DmDev {
        // SAFETY: a constructed target during a callback (dm's contract).
        match unsafe { Self::ctx(ti) }.device(idx) {
            Some((d, n)) => {
                // SAFETY: the glue passes a pointer to its local u64.
                unsafe { *len = n };
                // The device stays open: `d` borrows the target's context, which lives
                // until the destructor, and dm uses the pointer during iteration only.
                d.raw()
            }
            None => core::ptr::null_mut(),
        }
    }
}

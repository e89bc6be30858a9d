// SPDX-License-Identifier: GPL-2.0

//! Block devices a target opened with `dm_get_device`.

use core::ptr::NonNull;
use kernel::ffi::c_int;
use kernel::prelude::*;
use kernel::sync::Arc;

use super::ffi;

/// The open device behind every [`Device`] reference.
///
/// # Invariants
///
/// `dev` was returned by `dm_get_device` on `ti` and is put exactly once, when the last
/// reference goes; `ti` is live until then (see [`Device`]).
struct DevInner {
    dev: NonNull<ffi::DmDev>,
    ti: NonNull<ffi::DmTarget>,
}

// SAFETY: a dm_dev may be used and released from any process context; nothing in it is
// tied to the thread that opened it.
unsafe impl Send for DevInner {}
// SAFETY: every method only reads the dm_dev, which dm does not change while it is open.
unsafe impl Sync for DevInner {}

impl Drop for DevInner {
    fn drop(&mut self) {
        // SAFETY: by the type invariant this is the only put of `dev`, and `ti` (whose table
        // holds the device) is live: the last reference goes in the target's destructor
        // at the latest (see `Device`).
        unsafe { ffi::dmss_put_device(self.ti.as_ptr(), self.dev.as_ptr()) }
    }
}

/// A reference-counted device opened by a target's constructor ([`super::target::CtrTarget::get_device`]).
///
/// Cloning takes another reference; the device is released (`dm_put_device`) when the last
/// one is dropped, so no reference can outlive the open device, whatever order the owners'
/// fields drop in.  Structures that hold references (bios remapped to it, queued copies,
/// metadata I/O) therefore keep the device open for as long as they can use it.
///
/// The one rule the owner keeps: every reference of a target's devices is dropped before
/// that target's destructor returns (dm tears the table that holds the devices down right
/// after it).  Targets keep their devices in their own context, and state that outlives the
/// target drops its references in the destructor.
#[derive(Clone)]
pub(crate) struct Device(Arc<DevInner>);

impl Device {
    /// Opens `path` for `ti` in the table's mode.
    ///
    /// # Safety
    ///
    /// `ti` is the live dm_target of a constructor call, and the reference returned (and
    /// its clones) is dropped before that target's destructor returns, or before the
    /// constructor returns an error.
    pub(super) unsafe fn open(ti: NonNull<ffi::DmTarget>, path: &CStr) -> Result<Self> {
        let mut err: c_int = 0;
        // SAFETY: `ti` is live (caller's guarantee); `path` is NUL-terminated and `err` a valid
        // out-parameter for the duration of the call.
        let d = unsafe { ffi::dmss_get_device(ti.as_ptr(), path.as_char_ptr(), &mut err) };
        let Some(dev) = NonNull::new(d) else {
            return Err(Error::from_errno(if err < 0 { err } else { -19 }));
        };
        // INVARIANT: `dev` is freshly opened on `ti`, which outlives every reference (the
        // caller's guarantee); it is put once, by `DevInner::drop`.
        let inner = DevInner { dev, ti };
        // On allocation failure `inner` is dropped here, which puts the device.
        Ok(Device(Arc::new(inner, GFP_KERNEL)?))
    }

    pub(super) fn raw(&self) -> *mut ffi::DmDev {
        self.0.dev.as_ptr()
    }

    /// Size in sectors.
    pub(crate) fn sectors(&self) -> u64 {
        // SAFETY: the device is open while a reference exists (type invariant).
        unsafe { ffi::dmss_dev_sectors(self.raw()) }
    }

    /// A zoned block device (writes must stay sequential per zone).
    pub(crate) fn is_zoned(&self) -> bool {
        // SAFETY: as in `sectors`.
        unsafe { ffi::dmss_dev_zoned(self.raw()) != 0 }
    }

    /// dev_t.
    pub(crate) fn devt(&self) -> u32 {
        // SAFETY: as in `sectors`.
        unsafe { ffi::dmss_dev_devt(self.raw()) }
    }

    /// The "major:minor" name dm uses in table output.
    pub(crate) fn name(&self) -> &CStr {
        // SAFETY: dm_dev->name is a NUL-terminated array inside the dm_dev, which stays open
        // (and unchanged) as long as this reference, which the returned borrow cannot outlive.
        unsafe { CStr::from_char_ptr(ffi::dmss_dev_name(self.raw())) }
    }

    /// Whether both references name the same open device.
    pub(crate) fn same(&self, other: &Device) -> bool {
        self.0.dev == other.0.dev
    }
}

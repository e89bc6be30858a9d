// SPDX-License-Identifier: GPL-2.0

//! Bios handed to a target: owned ([`Bio`]), inside `map` ([`MapBio`]), or read-only at
//! completion ([`BioRef`]).

use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;
use kernel::bindings;
use kernel::ffi::c_int;
use kernel::prelude::*;

use super::device::Device;
use super::ffi;

/// Bytes of per-bio data every target of this module gets (`ti->per_io_data_size`, set
/// before its constructor runs): the bio's tag, a u64.
pub(super) const PER_BIO_DATA: u32 = core::mem::size_of::<u64>() as u32;

/// Kinds of bios the targets distinguish, classified from `bio_op()` (`REQ_OP_*`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BioKind {
    /// `REQ_OP_READ`.
    Read,
    /// `REQ_OP_WRITE` with data, or `REQ_OP_WRITE_ZEROES`.
    Write,
    /// An empty `REQ_OP_WRITE` (a `REQ_PREFLUSH` without data).
    Flush,
    /// `REQ_OP_DISCARD`.
    Discard,
    /// Anything else.
    Other,
}

/// Read access to a bio's fields (shared by [`Bio`] and completion callbacks).
///
/// # Invariants
///
/// The pointer is a live bio of a target of this module (all of which have 8 bytes of
/// per-bio data, see [`PER_BIO_DATA`]), for as long as this value (or the borrow it is
/// reached through) exists.
#[repr(transparent)]
pub(crate) struct BioRef(NonNull<ffi::Bio>);

impl BioRef {
    /// # Safety
    ///
    /// `bio` is a live bio of a target set up with [`PER_BIO_DATA`], and stays live
    /// while the result exists.
    pub(super) unsafe fn from_raw(bio: NonNull<ffi::Bio>) -> BioRef {
        // INVARIANT: the caller's guarantee.
        BioRef(bio)
    }

    /// The bio's class.
    pub(crate) fn kind(&self) -> BioKind {
        // SAFETY: the bio is live (type invariant).
        match unsafe { ffi::dmss_bio_op(self.0.as_ptr()) } {
            bindings::req_op_REQ_OP_READ => BioKind::Read,
            // An empty write is a flush (REQ_PREFLUSH without data).
            bindings::req_op_REQ_OP_WRITE if self.sectors() == 0 => BioKind::Flush,
            bindings::req_op_REQ_OP_WRITE | bindings::req_op_REQ_OP_WRITE_ZEROES => BioKind::Write,
            bindings::req_op_REQ_OP_DISCARD => BioKind::Discard,
            _ => BioKind::Other,
        }
    }

    /// First sector (in the mapped device's numbering until remapped).
    pub(crate) fn sector(&self) -> u64 {
        // SAFETY: the bio is live (type invariant).
        unsafe { ffi::dmss_bio_sector(self.0.as_ptr()) }
    }

    /// Length in sectors.
    pub(crate) fn sectors(&self) -> u32 {
        // SAFETY: the bio is live (type invariant).
        unsafe { ffi::dmss_bio_sectors(self.0.as_ptr()) }
    }

    /// The target's per-bio word.
    pub(crate) fn tag(&self) -> u64 {
        // SAFETY: the per-bio data is 8 bytes, aligned for a u64, of a live bio (type
        // invariant); the word is written only by the bio's owner, which reads it here or
        // hands it on with the bio.
        unsafe { *ffi::dmss_bio_pbd(self.0.as_ptr()) }
    }
}

/// A bio the target is responsible for: it must be remapped and returned from `map`,
/// submitted, or completed.  Dropping one without doing so would hang its submitter, so the
/// methods that end the responsibility consume it.
///
/// # Invariants
///
/// As for [`BioRef`], and the holder owns the bio: nobody else submits, completes or
/// writes the per-bio word of it.
#[repr(transparent)]
pub(crate) struct Bio(BioRef);

// SAFETY: a bio may be remapped, submitted or completed from any context, by whoever owns it.
unsafe impl Send for Bio {}

impl Bio {
    /// # Safety
    ///
    /// `bio` is a live bio of a target set up with [`PER_BIO_DATA`], and ownership
    /// of it passes to the result.
    pub(super) unsafe fn from_raw(bio: NonNull<ffi::Bio>) -> Bio {
        // INVARIANT: the caller's guarantee.
        Bio(BioRef(bio))
    }

    /// The pointer, handing ownership on to the caller.
    pub(super) fn into_raw(self) -> *mut ffi::Bio {
        (self.0).0.as_ptr()
    }

    fn raw(&self) -> *mut ffi::Bio {
        (self.0).0.as_ptr()
    }

    /// Sets the per-bio word.
    pub(crate) fn set_tag(&mut self, v: u64) {
        // SAFETY: see `BioRef::tag`; we own the bio, so nobody else accesses the word.
        unsafe { *ffi::dmss_bio_pbd(self.raw()) = v }
    }

    /// Points the bio at `dev`, sector `sector`.
    ///
    /// The bio keeps only the block device: whoever submits it (dm for `map`'s result, or
    /// [`Bio::submit`]) must hold `dev` until it completes, as targets do with the devices
    /// of their table.
    pub(crate) fn remap(&mut self, dev: &Device, sector: u64) {
        // SAFETY: the bio is live and ours (type invariant); the device is open while `dev`
        // exists (Device invariant).
        unsafe { ffi::dmss_bio_remap(self.raw(), dev.raw(), sector) }
    }

    /// Completes the bio with `err` (0 or a negative errno).
    pub(crate) fn endio(self, err: c_int) {
        // SAFETY: we own the bio; completing it ends our responsibility, and `self` is
        // consumed, so it cannot be used again.
        unsafe { ffi::dmss_bio_endio(self.raw(), err) }
    }

    /// Submits the (remapped) bio.
    pub(crate) fn submit(self) {
        // SAFETY: we own the bio and it has been remapped to an open device; `self` is
        // consumed, so it cannot be used again.
        unsafe { ffi::dmss_bio_submit(self.raw()) }
    }
}

impl Deref for Bio {
    type Target = BioRef;
    fn deref(&self) -> &BioRef {
        &self.0
    }
}

/// A bio inside `map`: a [`Bio`] that may also be shortened, which dm allows only there.
/// The lifetime ties it to one `map` call.
///
/// # Invariants
///
/// The bio was handed to the `map` callback that is running now.
pub(crate) struct MapBio<'a>(Bio, PhantomData<&'a mut ()>);

impl MapBio<'_> {
    /// # Safety
    ///
    /// As for [`Bio::from_raw`], and `bio` is the argument of the `map` call that is running
    /// now; the result does not escape it (its lifetime is the call's).
    pub(super) unsafe fn from_raw(bio: NonNull<ffi::Bio>) -> Self {
        // SAFETY: the caller's guarantee covers `Bio::from_raw`'s.
        // INVARIANT: the caller's guarantee.
        MapBio(unsafe { Bio::from_raw(bio) }, PhantomData)
    }

    /// Keeps the first `sectors` sectors for this call; dm core maps the rest as a new bio.
    /// Err when dm cannot shorten this bio (zoned device) or `sectors` is not inside it.
    pub(crate) fn accept_partial(&mut self, sectors: u32) -> Result {
        if self.0.kind() != BioKind::Read && self.0.kind() != BioKind::Write {
            return Err(EINVAL);
        }
        // SAFETY: we are inside the map callback of this bio (type invariant), and it carries
        // data, so it is not one of dm's duplicated flush bios (dm_accept_partial_bio's
        // preconditions); the glue checks the length and the zoned case dm would BUG on.
        match unsafe { ffi::dmss_bio_accept_partial(self.0.raw(), sectors) } {
            0 => Ok(()),
            e => Err(Error::from_errno(e)),
        }
    }

    /// The bio, to keep beyond `map` (deferred to a worker).
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

// SPDX-License-Identifier: GPL-2.0

//! dm-io: synchronous sector I/O on an open device (for metadata) and batched sector copies
//! between devices (for copy-out).  Both speak sectors and bytes only.

use core::ffi::c_void;
use core::marker::PhantomData;
use core::ptr::NonNull;
use kernel::bindings;
use kernel::prelude::*;

use super::device::Device;
use super::ffi;

/// Bytes per sector.
pub(crate) const SECTOR_SIZE: usize = 512;

const fn flag(bit: bindings::req_flag_bits) -> u32 {
    1 << bit
}

const OPF_READ: u32 = bindings::req_op_REQ_OP_READ;
const OPF_WRITE: u32 = bindings::req_op_REQ_OP_WRITE | flag(bindings::req_flag_bits___REQ_SYNC);
const REQ_PREFLUSH: u32 = flag(bindings::req_flag_bits___REQ_PREFLUSH);
const REQ_FUA: u32 = flag(bindings::req_flag_bits___REQ_FUA);

/// Synchronous I/O to one device through a dm-io client.
///
/// # Invariants
///
/// `client` is a live dm-io client owned by this value; `dev` keeps the device open.
pub(crate) struct SyncIo {
    client: NonNull<ffi::IoClient>,
    dev: Device,
}

// SAFETY: a dm-io client may be used from any process context; `&mut self` on every I/O
// method keeps two threads from using it at once.
unsafe impl Send for SyncIo {}

impl SyncIo {
    /// I/O to `dev`.
    pub(crate) fn new(dev: &Device) -> Result<Self> {
        // SAFETY: creation of a dm-io client: no precondition, NULL on failure.
        let client = NonNull::new(unsafe { ffi::dmss_io_client_create() }).ok_or(ENOMEM)?;
        Ok(SyncIo {
            client,
            dev: dev.clone(),
        })
    }

    /// The device's size in sectors.
    pub(crate) fn sectors(&self) -> u64 {
        self.dev.sectors()
    }

    /// # Safety
    ///
    /// `buf` is NULL with `sectors == 0`, or valid for `sectors` sectors of access (writes
    /// for a read, reads for a write) for the duration of the call.
    unsafe fn io(&mut self, sector: u64, sectors: u32, buf: *mut c_void, opf: u32) -> Result {
        // SAFETY: the client is live and the device open (type invariant); `buf` is valid as
        // the caller guarantees, and dm_io is synchronous here, so nothing refers to it
        // after the call.
        let r = unsafe {
            ffi::dmss_io(
                self.client.as_ptr(),
                self.dev.raw(),
                sector,
                sectors,
                buf,
                opf,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(Error::from_errno(r))
        }
    }

    fn sectors_of(len: usize) -> Result<u32> {
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(EINVAL);
        }
        u32::try_from(len / SECTOR_SIZE).map_err(|_| EINVAL)
    }

    /// Reads `buf.len()` bytes (whole sectors) from `sector`.
    pub(crate) fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result {
        let n = Self::sectors_of(buf.len())?;
        // SAFETY: `buf` is writable for `n` sectors and borrowed for the call.
        unsafe { self.io(sector, n, buf.as_mut_ptr().cast(), OPF_READ) }
    }

    /// Writes `buf` (whole sectors) at `sector`, with a preceding cache flush and/or FUA.
    pub(crate) fn write(&mut self, sector: u64, buf: &[u8], preflush: bool, fua: bool) -> Result {
        let n = Self::sectors_of(buf.len())?;
        let mut opf = OPF_WRITE;
        if preflush {
            opf |= REQ_PREFLUSH;
        }
        if fua {
            opf |= REQ_FUA;
        }
        // SAFETY: `buf` is readable for `n` sectors and borrowed for the call; dm-io only
        // reads from the buffer of a write, so the cast to a mutable pointer writes nothing.
        unsafe { self.io(sector, n, buf.as_ptr() as *mut c_void, opf) }
    }

    /// Flushes the device's write cache.
    pub(crate) fn flush(&mut self) -> Result {
        // SAFETY: an empty flush: NULL buffer, no sectors.
        unsafe { self.io(0, 0, core::ptr::null_mut(), OPF_WRITE | REQ_PREFLUSH) }
    }
}

impl Drop for SyncIo {
    fn drop(&mut self) {
        // SAFETY: every I/O is synchronous, so none is in flight; the client is ours and
        // destroyed once.
        unsafe { ffi::dmss_io_client_destroy(self.client.as_ptr()) }
    }
}

/// Sector copies through one preallocated buffer with dm-io: queued in a [`CopyBatch`],
/// then run (all reads, then all writes, per buffer-full) and waited for together.
///
/// # Invariants
///
/// The pointer is a live C copier owned by this value.  Its queue holds only copies of the
/// current [`CopyBatch`]: a new batch starts by discarding whatever a forgotten one left.
pub(crate) struct Copier(NonNull<ffi::CCopier>);

// SAFETY: the C copier may be used from any process context; only a `CopyBatch`, which
// borrows the copier mutably, touches its queue.
unsafe impl Send for Copier {}

impl Copier {
    /// A copier with its dm-io client and buffer.
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: allocations and dm-io client creation: no precondition, NULL on failure.
        NonNull::new(unsafe { ffi::dmss_copier_create() })
            .map(Copier)
            .ok_or(ENOMEM)
    }

    /// Starts a batch of copies between devices that outlive it.
    pub(crate) fn batch<'a>(&'a mut self) -> CopyBatch<'a> {
        // SAFETY: the copier is live and borrowed mutably, so no other batch uses it; a
        // batch leaked with `mem::forget` may have left copies naming devices that are
        // closed by now: they never run.
        unsafe { ffi::dmss_copy_discard(self.0.as_ptr()) };
        CopyBatch {
            copier: self,
            queued: false,
            _devs: PhantomData,
        }
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        // SAFETY: no batch exists (it would borrow the copier) and copies complete before
        // the call that runs them returns, so none is in flight; queued ones are never run
        // again; the copier is ours and destroyed once.
        unsafe { ffi::dmss_copier_destroy(self.0.as_ptr()) }
    }
}

/// Copies queued on a [`Copier`]; they run at [`CopyBatch::wait`] (or when the queue is
/// full).  Dropping the batch without `wait` abandons the copies not run yet: a batch is
/// dropped that way only on an error path, whose transaction is abandoned too.
///
/// # Invariants
///
/// Every device named by a queued copy is borrowed for `'a`, so it stays open until the
/// batch is gone; the copier's queue is empty when `queued` is false.
pub(crate) struct CopyBatch<'a> {
    copier: &'a mut Copier,
    queued: bool,
    _devs: PhantomData<&'a Device>,
}

impl<'a> CopyBatch<'a> {
    /// Queues a copy of `n` sectors.
    pub(crate) fn copy(
        &mut self,
        src: &'a Device,
        src_sector: u64,
        dst: &'a Device,
        dst_sector: u64,
        n: u64,
    ) {
        // SAFETY: the copier is live (Copier invariant) and used only through this batch,
        // which holds it mutably; both devices are borrowed for 'a, so they stay open while
        // the batch exists, and a queued copy runs only inside a call on this batch (when
        // the queue is full, or `wait`); dropping the batch discards what is left.  dm-io
        // allocates from its mempools, so the call cannot fail.
        unsafe {
            ffi::dmss_copy(
                self.copier.0.as_ptr(),
                src.raw(),
                src_sector,
                dst.raw(),
                dst_sector,
                n,
            )
        };
        // INVARIANT: the queue may now hold copies.
        self.queued = true;
    }

    fn run(&mut self) -> Result {
        // SAFETY: the copier is live and ours (see `copy`); the call runs and waits for every
        // queued copy, leaving the queue empty.
        let r = unsafe { ffi::dmss_copy_wait(self.copier.0.as_ptr()) };
        // INVARIANT: the queue is empty.
        self.queued = false;
        match r {
            0 => Ok(()),
            e => Err(Error::from_errno(e)),
        }
    }

    /// Runs and waits for every copy queued; Err if any failed.
    pub(crate) fn wait(mut self) -> Result {
        self.run()
    }
}

impl Drop for CopyBatch<'_> {
    fn drop(&mut self) {
        if self.queued {
            // SAFETY: the copier is live and ours (see `copy`); no queued copy is in flight.
            unsafe { ffi::dmss_copy_discard(self.copier.0.as_ptr()) };
        }
    }
}

// SPDX-License-Identifier: GPL-2.0

//! A worker: a FIFO of deferred bios and a work item on its own per-CPU WQ_MEM_RECLAIM
//! workqueue, which calls [`WorkHandler::work`] on the context that owns the worker.

use core::ffi::c_void;
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::prelude::*;
use kernel::sync::Arc;

use super::bio::Bio;
use super::ffi;

/// The context a [`Worker`] serves: it owns the worker and is called back to do the work.
///
/// # Safety
///
/// The worker's work item reaches the context through a raw pointer, so an implementer
/// guarantees that the work item never outlives it: its `Drop` calls [`Worker::shutdown`]
/// before any other field is dropped, and [`WorkHandler::work`] never drops the last `Arc`
/// of the context nor calls [`Worker::flush`] or [`Worker::shutdown`] (they would wait for
/// the running work item itself).
pub(crate) unsafe trait WorkHandler: Send + Sync + Sized {
    /// The worker inside `self`.
    fn worker(&self) -> &Worker<Self>;
    /// Runs on the workqueue after `defer` or `kick` (never twice at once).
    fn work(&self);
}

/// The worker of a context `T` (a field of `T`, see [`Worker::start`]).
///
/// Created empty, started once the context has a stable address, and shut down (draining
/// queued work) before the context's other fields go: `Drop` shuts down, and the context
/// calls [`Worker::shutdown`] in its own `Drop` so that the worker stops before any other of
/// its fields is dropped.  A bio deferred after shutdown, or before start, is failed with
/// -EIO instead of being lost.
///
/// # Invariants
///
/// The pointer is NULL or a live C worker owned by this value, whose context pointer is the
/// `T` that contains this value, inside an `Arc` (so it does not move); the C worker is
/// destroyed (which waits for the running work item) before the `T` is freed.
pub(crate) struct Worker<T: WorkHandler>(AtomicPtr<ffi::CWorker>, PhantomData<fn(&T)>);

impl<T: WorkHandler> Worker<T> {
    /// A worker that is not started yet.
    pub(crate) const fn new() -> Self {
        Worker(AtomicPtr::new(core::ptr::null_mut()), PhantomData)
    }

    /// The C work function.
    ///
    /// # Safety
    ///
    /// `ctx` is the pointer `start` registered: a `T` that is live until the C worker is
    /// destroyed (type invariant).
    unsafe extern "C" fn run(ctx: *mut c_void) {
        // SAFETY: the caller's guarantee: `ctx` points to a live `T`, and the worker is
        // destroyed (waiting for this call) before `T` is freed.
        let t = unsafe { &*(ctx as *const T) };
        t.work();
    }

    /// Starts the worker of `ctx` (`ctx.worker()`, which must be a field of `ctx`).
    /// EINVAL if it is not, or if it is already started.
    pub(crate) fn start(ctx: &Arc<T>) -> Result {
        let w = ctx.worker();
        let base = &**ctx as *const T as usize;
        let at = w as *const Self as usize;
        if at < base || at + core::mem::size_of::<Self>() > base + core::mem::size_of::<T>() {
            return Err(EINVAL);
        }
        if !w.0.load(Ordering::Acquire).is_null() {
            return Err(EINVAL);
        }
        let p = &**ctx as *const T as *mut c_void;
        // SAFETY: `run` dereferences `p` only while the C worker exists.  The worker lies
        // inside `*ctx` (checked above), which sits in an `Arc` and so does not move, and
        // `T`'s `Drop` shuts the worker down before any other field goes (the `WorkHandler`
        // contract), so `p` points to a live `T` whenever `run` is called.
        let cw = unsafe { ffi::dmss_worker_create(Self::run, p) };
        if cw.is_null() {
            return Err(ENOMEM);
        }
        // INVARIANT: see the SAFETY comment above.
        w.0.store(cw, Ordering::Release);
        Ok(())
    }

    fn get(&self) -> Option<NonNull<ffi::CWorker>> {
        NonNull::new(self.0.load(Ordering::Acquire))
    }

    /// Queues a bio for the worker.
    pub(crate) fn defer(&self, bio: Bio) {
        match self.get() {
            // SAFETY: the worker is live (type invariant); ownership of the bio passes to
            // its list.
            Some(w) => unsafe { ffi::dmss_worker_defer(w.as_ptr(), bio.into_raw()) },
            None => bio.endio(EIO.to_errno()),
        }
    }

    /// Takes the oldest deferred bio.
    pub(crate) fn pop(&self) -> Option<Bio> {
        let w = self.get()?;
        // SAFETY: the worker is live (type invariant).
        let b = NonNull::new(unsafe { ffi::dmss_worker_pop(w.as_ptr()) })?;
        // SAFETY: only bios of this module's targets are deferred (a `Bio` is needed for
        // that), and a popped bio is no longer on the list: ownership passes to the caller.
        Some(unsafe { Bio::from_raw(b) })
    }

    /// Puts a bio back at the head of the queue (to be processed next).
    pub(crate) fn push_front(&self, bio: Bio) {
        match self.get() {
            // SAFETY: the worker is live (type invariant); ownership of the bio passes to
            // its list.
            Some(w) => unsafe { ffi::dmss_worker_push_front(w.as_ptr(), bio.into_raw()) },
            None => bio.endio(EIO.to_errno()),
        }
    }

    /// Schedules the work item.
    pub(crate) fn kick(&self) {
        if let Some(w) = self.get() {
            // SAFETY: the worker is live (type invariant).
            unsafe { ffi::dmss_worker_kick(w.as_ptr()) }
        }
    }

    /// Gives the CPU to other tasks if the scheduler wants it: a handler that loops over
    /// many steps calls this between them, with no lock held. A per-CPU work item that
    /// finds its next step ready without waiting would otherwise hold the CPU as long as
    /// bios keep coming (dm-thin's worker does the same between deferred bios).
    pub(crate) fn cond_resched(&self) {
        // SAFETY: `dmss_cond_resched` takes no argument and reaches no memory of ours. It
        // may sleep; a call under a spinlock would be a bug that `might_sleep` reports, not
        // a memory-safety one.
        unsafe { ffi::dmss_cond_resched() }
    }

    /// Waits until queued work has run (not from the worker itself).
    pub(crate) fn flush(&self) {
        if let Some(w) = self.get() {
            // SAFETY: the worker is live (type invariant).
            unsafe { ffi::dmss_worker_flush(w.as_ptr()) }
        }
    }

    /// Drains and destroys the workqueue (not from the worker itself).
    pub(crate) fn shutdown(&self) {
        let w = self.0.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if !w.is_null() {
            // SAFETY: the swap took the only pointer, so the worker is destroyed once and
            // no later call reaches it; destroy_workqueue runs the pending work item to
            // completion first, and the bio list is empty by then.
            unsafe { ffi::dmss_worker_destroy(w) }
        }
    }
}

impl<T: WorkHandler> Drop for Worker<T> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// SPDX-License-Identifier: GPL-2.0

//! Locks and counters that Rust-for-Linux 6.12 does not offer: a mutex with `try_lock`, a
//! counter that can be waited on until zero, and a global registry of live objects.

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;
use kernel::prelude::*;
use kernel::sync::Arc;

use super::ffi;

/// A mutex with a non-blocking `try_lock` (for `map`), guarding `T`.
///
/// # Invariants
///
/// `m` is a live, initialised C mutex owned by this value; `data` is accessed only by the
/// holder of `m` (through a [`TryMutexGuard`]).
pub(crate) struct TryMutex<T> {
    m: NonNull<ffi::CMutex>,
    data: UnsafeCell<T>,
}

// SAFETY: the value may move to another thread with its data; the C mutex is not tied to
// the thread that created it.
unsafe impl<T: Send> Send for TryMutex<T> {}
// SAFETY: `data` is reached only by the holder of the mutex (type invariant), so sharing the
// lock shares `T` between threads one at a time, which `T: Send` allows.
unsafe impl<T: Send> Sync for TryMutex<T> {}

/// Holds a [`TryMutex`] locked.
///
/// # Invariants
///
/// The current thread holds `lock.m`.
pub(crate) struct TryMutexGuard<'a, T> {
    lock: &'a TryMutex<T>,
}

impl<T> TryMutex<T> {
    /// Creates an unlocked mutex.
    pub(crate) fn new(data: T) -> Result<Self> {
        // SAFETY: allocation and mutex_init of a new mutex; no precondition, NULL on failure.
        let m = NonNull::new(unsafe { ffi::dmss_mutex_create() }).ok_or(ENOMEM)?;
        // INVARIANT: `m` is new and ours; no guard exists yet.
        Ok(TryMutex {
            m,
            data: UnsafeCell::new(data),
        })
    }

    /// Locks, sleeping if needed.
    pub(crate) fn lock(&self) -> TryMutexGuard<'_, T> {
        // SAFETY: the mutex is live while `self` is (type invariant).
        unsafe { ffi::dmss_mutex_lock(self.m.as_ptr()) };
        // INVARIANT: mutex_lock returned, so we hold it.
        TryMutexGuard { lock: self }
    }

    /// Locks if free, without sleeping.
    pub(crate) fn try_lock(&self) -> Option<TryMutexGuard<'_, T>> {
        // SAFETY: the mutex is live while `self` is (type invariant).
        if unsafe { ffi::dmss_mutex_trylock(self.m.as_ptr()) } != 0 {
            // INVARIANT: mutex_trylock returned 1, so we hold it.
            Some(TryMutexGuard { lock: self })
        } else {
            None
        }
    }
}

impl<T> Drop for TryMutex<T> {
    fn drop(&mut self) {
        // SAFETY: `&mut self` proves no guard exists (a guard borrows the mutex), so the
        // mutex is unlocked and unused; it was created by `new` and is destroyed once.
        unsafe { ffi::dmss_mutex_destroy(self.m.as_ptr()) }
    }
}

impl<T> Deref for TryMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the mutex (type invariant), so no one else accesses `data`.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for TryMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the mutex (type invariant) and is borrowed mutably, so this
        // is the only reference to `data`.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for TryMutexGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: we hold the mutex (type invariant) and give it up once, here.
        unsafe { ffi::dmss_mutex_unlock(self.lock.m.as_ptr()) }
    }
}

/// A counter of operations in flight that can be waited on until it drops to zero.
///
/// # Invariants
///
/// The pointer is a live C counter (atomic plus wait queue) owned by this value.
pub(crate) struct Inflight(NonNull<ffi::CInflight>);

// SAFETY: the C counter is an atomic with a wait queue, usable from any thread.
unsafe impl Send for Inflight {}
// SAFETY: as above: all operations are atomic or wait-queue operations.
unsafe impl Sync for Inflight {}

impl Inflight {
    /// A zero counter.
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: allocation and initialisation; no precondition, NULL on failure.
        NonNull::new(unsafe { ffi::dmss_inflight_create() })
            .map(Inflight)
            .ok_or(ENOMEM)
    }

    /// +1.
    pub(crate) fn inc(&self) {
        // SAFETY: the counter is live while `self` is (type invariant).
        unsafe { ffi::dmss_inflight_inc(self.0.as_ptr()) }
    }

    /// -1, waking waiters at zero.
    pub(crate) fn dec(&self) {
        // SAFETY: the counter is live while `self` is (type invariant).
        unsafe { ffi::dmss_inflight_dec(self.0.as_ptr()) }
    }

    /// Sleeps until the counter is zero.
    pub(crate) fn wait_zero(&self) {
        // SAFETY: the counter is live while `self` is (type invariant).
        unsafe { ffi::dmss_inflight_wait_zero(self.0.as_ptr()) }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        // SAFETY: `&mut self` proves nobody else uses the counter any more (a waiter or an
        // updater would borrow it); it is freed once.
        unsafe { ffi::dmss_inflight_destroy(self.0.as_ptr()) }
    }
}

type Entries<K, T> = KVec<Option<(K, Option<Arc<T>>)>>;

/// A global table of live objects, guarded by one C mutex shared by all registries.  An
/// entry is claimed under a key first (so that two constructors cannot both take the same
/// resources), published when the object is ready, and released by its owner.  The table
/// grows as needed: there is no fixed limit.
///
/// # Invariants
///
/// `entries` is accessed only with the registry mutex (`dmss_registry_lock`) held.
pub(crate) struct Registry<K, T> {
    entries: UnsafeCell<Entries<K, T>>,
}

// SAFETY: `entries` is only accessed under the registry mutex (type invariant), one thread
// at a time; keys move between threads (`K: Send`) and objects are shared (`Arc<T>` is
// Send and Sync when `T: Send + Sync`).
unsafe impl<K: Send, T: Send + Sync> Sync for Registry<K, T> {}

impl<K: PartialEq, T> Registry<K, T> {
    /// An empty registry.
    pub(crate) const fn new() -> Self {
        Registry {
            entries: UnsafeCell::new(KVec::new()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Entries<K, T>) -> R) -> R {
        // SAFETY: the registry mutex is a static C mutex; locking has no precondition.
        unsafe { ffi::dmss_registry_lock() };
        // SAFETY: we hold the registry mutex, which serialises every access to `entries`
        // (type invariant), so this is the only reference while `f` runs.
        let r = f(unsafe { &mut *self.entries.get() });
        // SAFETY: we locked it above.
        unsafe { ffi::dmss_registry_unlock() };
        r
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
    pub(crate) fn unpublish(&self, key: &K) -> Option<Arc<T>> {
        self.with(|e| {
            let (_, slot) = e.iter_mut().flatten().find(|(k, _)| k == key)?;
            slot.take()
        })
    }

    /// Makes `v` visible to `find` under the claimed `key`.
    pub(crate) fn publish(&self, key: &K, v: Arc<T>) {
        self.with(|e| {
            if let Some((_, slot)) = e.iter_mut().flatten().find(|(k, _)| k == key) {
                *slot = Some(v);
            }
        })
    }

    /// Releases the claim on `key` and returns its object, if published.
    pub(crate) fn release(&self, key: &K) -> Option<Arc<T>> {
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
    pub(crate) fn find(&self, f: impl Fn(&K) -> bool) -> Option<Arc<T>> {
        self.with(|e| {
            e.iter()
                .flatten()
                .find(|(k, v)| v.is_some() && f(k))
                .and_then(|(_, v)| v.clone())
        })
    }
}

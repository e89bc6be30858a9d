// SPDX-License-Identifier: GPL-2.0

//! Zeroed, page-aligned memory from vmalloc (large caches that need not be physically
//! contiguous, and that dm-io can read and write).

use core::ptr::NonNull;
use kernel::init::Zeroable;
use kernel::prelude::*;

use super::ffi;

/// A zero-initialised array of `T` from vzalloc.
///
/// # Invariants
///
/// `p` points to `n` initialised values of `T` in a vmalloc area owned by this value,
/// aligned for `T` (vmalloc areas are page-aligned, and `new` checks `T`'s alignment).
pub(crate) struct VBuf<T: Zeroable> {
    p: NonNull<T>,
    n: usize,
}

// SAFETY: the area is owned exclusively by this value, so it moves with it like a `KVec<T>`.
unsafe impl<T: Zeroable + Send> Send for VBuf<T> {}
// SAFETY: shared access only hands out `&[T]`, as a `KVec<T>` would.
unsafe impl<T: Zeroable + Sync> Sync for VBuf<T> {}

impl<T: Zeroable> VBuf<T> {
    /// `n` zeroed values (`n` > 0, of a type without drop glue).
    pub(crate) fn new(n: usize) -> Result<Self> {
        let bytes = n.checked_mul(core::mem::size_of::<T>()).ok_or(ENOMEM)?;
        if bytes == 0
            || core::mem::needs_drop::<T>()
            || core::mem::align_of::<T>() > kernel::page::PAGE_SIZE
        {
            return Err(EINVAL);
        }
        // SAFETY: vzalloc has no precondition; NULL on failure.
        let p = NonNull::new(unsafe { ffi::dmss_vzalloc(bytes) }.cast::<T>()).ok_or(ENOMEM)?;
        // INVARIANT: the area holds `bytes` zero bytes, page-aligned, which are `n` valid
        // values of `T` (`T: Zeroable`), aligned since `align_of::<T>() <= PAGE_SIZE`.
        Ok(VBuf { p, n })
    }

    /// The number of values.
    pub(crate) fn len(&self) -> usize {
        self.n
    }

    /// The values.
    pub(crate) fn as_slice(&self) -> &[T] {
        // SAFETY: `p` points to `n` initialised, aligned values owned by `self` (type
        // invariant); the borrow is tied to `&self`.
        unsafe { core::slice::from_raw_parts(self.p.as_ptr(), self.n) }
    }

    /// The values, mutably.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { core::slice::from_raw_parts_mut(self.p.as_ptr(), self.n) }
    }
}

impl<T: Zeroable> Drop for VBuf<T> {
    fn drop(&mut self) {
        // SAFETY: the area came from vzalloc in `new` and is freed once, here; the values
        // need no drop (`new` refuses types that do).
        unsafe { ffi::dmss_vfree(self.p.as_ptr().cast()) }
    }
}

// SPDX-License-Identifier: GPL-2.0

//! Small kernel services: checksums, random numbers, time.

use super::ffi;

/// CRC32C (Castagnoli) of `data`, as `~crc32c(~0, data)` (the usual finalised value).
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    // SAFETY: `data` is a valid slice, read during the call only.
    unsafe { ffi::dmss_crc32c(data.as_ptr().cast(), data.len()) }
}

/// A random u64.
pub(crate) fn random_u64() -> u64 {
    // SAFETY: get_random_u64 has no precondition.
    unsafe { ffi::dmss_random_u64() }
}

/// Monotonic time in nanoseconds.
pub(crate) fn now_ns() -> u64 {
    // SAFETY: ktime_get_ns has no precondition.
    unsafe { ffi::dmss_now_ns() }
}

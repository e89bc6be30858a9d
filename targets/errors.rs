// SPDX-License-Identifier: GPL-2.0

//! Store errors as the targets report them, in one place: the errno of a failed message,
//! and the errno and `ti->error` message of a store that cannot be opened.  (A bio the
//! worker fails gets EIO whatever the store's error: a snapshot that lost data, or whose
//! store failed, fails its I/O.)

use kernel::c_str;
use kernel::prelude::*;

use crate::exception_store::format::{Error as StoreError, PdataError};

/// The errno of a store operation that failed (a message).
pub(super) fn errno(e: &StoreError) -> Error {
    match e {
        StoreError::Pdata(PdataError::Io { .. } | PdataError::Flush) | StoreError::DataCopy => EIO,
        StoreError::NoMemory => ENOMEM,
        StoreError::DuplicateId => EEXIST,
        StoreError::TooManySnapshots => ENOSPC,
        StoreError::NoSuchSnapshot => ENOENT,
        StoreError::ReadOnly => EROFS,
        StoreError::Invalid(_) => EINVAL,
        _ => EIO,
    }
}

/// The errno and ti->error message for a store that cannot be opened (or formatted) by a
/// constructor: a device that holds no usable store is an invalid argument of the table
/// line; I/O errors and lack of memory keep their own errno.
pub(super) fn open_error(e: &StoreError) -> (&'static CStr, Error) {
    let errno = match e {
        StoreError::Pdata(PdataError::Io { .. } | PdataError::Flush) | StoreError::NoMemory => {
            errno(e)
        }
        _ => EINVAL,
    };
    let msg = match e {
        StoreError::NotAStore(_) => {
            c_str!("COW device holds no shared-snapshot store (foreign data, wrong version or truncated)")
        }
        StoreError::Pdata(PdataError::Corrupt { .. }) => {
            c_str!("COW device metadata is corrupt (see dmesg, run shsnap check)")
        }
        StoreError::Pdata(PdataError::Io { .. } | PdataError::Flush) => {
            c_str!("I/O error reading the COW device")
        }
        StoreError::Invalid(_) => c_str!("COW device too small for a store"),
        _ => c_str!("cannot open the exception store"),
    };
    (msg, errno)
}

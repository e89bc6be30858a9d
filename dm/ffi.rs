// SPDX-License-Identifier: GPL-2.0

//! Declarations of the C glue (`dm/glue.h`), private to the binding layer.
//!
//! The opaque types stand for C structures that only the glue looks into.

use kernel::ffi::{c_char, c_int, c_uint, c_void};

macro_rules! opaque {
    ($($(#[$m:meta])* $name:ident;)*) => {$(
        $(#[$m])*
        #[repr(C)]
        pub(super) struct $name {
            _p: [u8; 0],
        }
    )*};
}

opaque! {
    /// `struct dm_target`.
    DmTarget;
    /// `struct dm_dev`.
    DmDev;
    /// `struct bio`.
    Bio;
    /// `struct dm_io_client`.
    IoClient;
    /// `struct mutex`.
    CMutex;
    /// `struct dmss_worker`.
    CWorker;
    /// `struct dmss_inflight`.
    CInflight;
    /// `struct dmss_copier`.
    CCopier;
    /// `struct dmss_target`: a registered target type.
    CTarget;
}

/// `struct dmss_consts`: kernel constants the glue reads from the C headers.
#[repr(C)]
pub(super) struct Consts {
    pub(super) mapio_submitted: c_int,
    pub(super) mapio_remapped: c_int,
    pub(super) mapio_kill: c_int,
    pub(super) statustype_info: c_int,
    pub(super) statustype_table: c_int,
}

/// `struct dmss_target_ops`: one target type's callbacks.
#[repr(C)]
pub(super) struct TargetOpsTable {
    pub(super) ctr: unsafe extern "C" fn(*mut DmTarget, c_uint, *mut *mut c_char) -> c_int,
    pub(super) dtr: unsafe extern "C" fn(*mut DmTarget),
    pub(super) map: unsafe extern "C" fn(*mut DmTarget, *mut Bio) -> c_int,
    pub(super) end_io: unsafe extern "C" fn(*mut DmTarget, *mut Bio),
    pub(super) status: unsafe extern "C" fn(*mut DmTarget, c_int, *mut c_char, c_uint),
    pub(super) message:
        unsafe extern "C" fn(*mut DmTarget, c_uint, *mut *mut c_char, *mut c_char, c_uint) -> c_int,
    pub(super) presuspend: unsafe extern "C" fn(*mut DmTarget),
    pub(super) presuspend_undo: unsafe extern "C" fn(*mut DmTarget),
    pub(super) postsuspend: unsafe extern "C" fn(*mut DmTarget),
    pub(super) resume: unsafe extern "C" fn(*mut DmTarget),
    pub(super) device: unsafe extern "C" fn(*mut DmTarget, c_uint, *mut u64) -> *mut DmDev,
}

extern "C" {
    pub(super) static dmss_consts: Consts;

    pub(super) fn dmss_target_register(
        name: *const c_char,
        version: *const c_uint,
        ops: *const TargetOpsTable,
        err: *mut c_int,
    ) -> *mut CTarget;
    pub(super) fn dmss_target_unregister(t: *mut CTarget);

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

    pub(super) fn dmss_bio_op(bio: *mut Bio) -> c_uint;
    pub(super) fn dmss_bio_sector(bio: *mut Bio) -> u64;
    pub(super) fn dmss_bio_sectors(bio: *mut Bio) -> u32;
    pub(super) fn dmss_bio_accept_partial(bio: *mut Bio, n: u32) -> c_int;
    pub(super) fn dmss_bio_remap(bio: *mut Bio, d: *mut DmDev, sector: u64);
    pub(super) fn dmss_bio_endio(bio: *mut Bio, err: c_int);
    pub(super) fn dmss_bio_submit(bio: *mut Bio);
    pub(super) fn dmss_bio_pbd(bio: *mut Bio) -> *mut u64;

    pub(super) fn dmss_worker_create(
        f: unsafe extern "C" fn(*mut c_void),
        ctx: *mut c_void,
    ) -> *mut CWorker;
    pub(super) fn dmss_worker_destroy(w: *mut CWorker);
    pub(super) fn dmss_worker_defer(w: *mut CWorker, bio: *mut Bio);
    pub(super) fn dmss_worker_pop(w: *mut CWorker) -> *mut Bio;
    pub(super) fn dmss_worker_push_front(w: *mut CWorker, bio: *mut Bio);
    pub(super) fn dmss_worker_kick(w: *mut CWorker);
    pub(super) fn dmss_cond_resched();
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
        opf: u32,
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
    pub(super) fn dmss_copy_discard(c: *mut CCopier);

    pub(super) fn dmss_crc32c(data: *const c_void, len: usize) -> u32;
    pub(super) fn dmss_random_u64() -> u64;
    pub(super) fn dmss_now_ns() -> u64;
}

//! Device-mapper operations as ioctls on `/dev/mapper/control`, the way libdevmapper makes
//! them (`linux/dm-ioctl.h`, interface version 4), for `shsnap send` and `receive`: one
//! ioctl costs microseconds where running `dmsetup` costs a process (half a second under
//! an emulator).
//!
//! Each call is one buffer: a `struct dm_ioctl` (312 bytes) and its data from
//! `data_start`, `data_size` bytes in all.  The buffer is built and read here byte by byte
//! at the header's offsets (checked against the C header by the tests), so the only unsafe
//! code is the `ioctl` and `mknod` calls themselves.  An output that does not fit
//! (`DM_BUFFER_FULL_FLAG`) is asked again with a buffer twice as large.
//!
//! The device is always named by `name` (uuid and dev zero: the kernel refuses a lookup
//! naming two of them).  No udev cookie is passed: without udev (the test guests), the
//! nodes in `/dev/mapper` are made by [`mknod`] and removed by [`remove`], as libdevmapper
//! does when udev does not manage them.

use std::ffi::CString;
use std::fmt;
use std::format;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

// ---------------------------------------------------------------------------------------
// The interface (linux/dm-ioctl.h).

/// `DM_VERSION_MAJOR`: the interface version sent (the kernel refuses another major, or a
/// minor above its own: 0 is below every kernel's).
pub const VERSION: [u32; 3] = [4, 0, 0];
/// `DM_IOCTL`: the ioctl type.
pub const DM_IOCTL: u32 = 0xfd;
/// `DM_NAME_LEN`: a name's bytes with its NUL.
pub const NAME_LEN: usize = 128;
/// `DM_UUID_LEN`.
pub const UUID_LEN: usize = 129;
/// `DM_MAX_TYPE_NAME`: a target type's bytes with its NUL.
pub const MAX_TYPE_NAME: usize = 16;

/// `sizeof(struct dm_ioctl)`.
pub const HEADER_SIZE: usize = 312;
/// Offsets of the fields of `struct dm_ioctl`.
pub mod header {
    /// `__u32 version[3]`.
    pub const VERSION: usize = 0;
    /// `__u32 data_size`: the whole buffer, this struct included.
    pub const DATA_SIZE: usize = 12;
    /// `__u32 data_start`: where the data starts, from the start of this struct.
    pub const DATA_START: usize = 16;
    /// `__u32 target_count`.
    pub const TARGET_COUNT: usize = 20;
    /// `__s32 open_count`.
    pub const OPEN_COUNT: usize = 24;
    /// `__u32 flags`.
    pub const FLAGS: usize = 28;
    /// `__u32 event_nr` (in: the udev cookie).
    pub const EVENT_NR: usize = 32;
    /// `__u32 padding`.
    pub const PADDING: usize = 36;
    /// `__u64 dev` (`huge_encode_dev`).
    pub const DEV: usize = 40;
    /// `char name[DM_NAME_LEN]`.
    pub const NAME: usize = 48;
    /// `char uuid[DM_UUID_LEN]`.
    pub const UUID: usize = 176;
    /// `char data[7]`: the header is copied up to here (`offsetof(struct dm_ioctl, data)`).
    pub const DATA: usize = 305;
}

/// `sizeof(struct dm_target_spec)`; the parameters (NUL-terminated) follow it.
pub const SPEC_SIZE: usize = 40;
/// Offsets of the fields of `struct dm_target_spec`.
pub mod spec {
    /// `__u64 sector_start`.
    pub const SECTOR_START: usize = 0;
    /// `__u64 length`.
    pub const LENGTH: usize = 8;
    /// `__s32 status`.
    pub const STATUS: usize = 16;
    /// `__u32 next`: in DM_TABLE_LOAD from this spec, in DM_TABLE_STATUS from the first.
    pub const NEXT: usize = 20;
    /// `char target_type[DM_MAX_TYPE_NAME]`.
    pub const TARGET_TYPE: usize = 24;
}

/// Offsets of the fields of `struct dm_name_list` (DM_LIST_DEVICES).
pub mod name_list {
    /// `__u64 dev`.
    pub const DEV: usize = 0;
    /// `__u32 next`: to the next record, from the start of this one; 0 for the last.
    pub const NEXT: usize = 8;
    /// `char name[]`.
    pub const NAME: usize = 12;
}

/// Offsets of the fields of `struct dm_target_msg` (DM_TARGET_MSG).
pub mod target_msg {
    /// `__u64 sector`.
    pub const SECTOR: usize = 0;
    /// `char message[]`.
    pub const MESSAGE: usize = 8;
}

/// The command numbers (`DM_*_CMD`).
pub mod cmd {
    /// `DM_VERSION_CMD`.
    pub const VERSION: u32 = 0;
    /// `DM_LIST_DEVICES_CMD`.
    pub const LIST_DEVICES: u32 = 2;
    /// `DM_DEV_CREATE_CMD`.
    pub const DEV_CREATE: u32 = 3;
    /// `DM_DEV_REMOVE_CMD`.
    pub const DEV_REMOVE: u32 = 4;
    /// `DM_DEV_SUSPEND_CMD` (a resume without `DM_SUSPEND_FLAG`).
    pub const DEV_SUSPEND: u32 = 6;
    /// `DM_DEV_STATUS_CMD`.
    pub const DEV_STATUS: u32 = 7;
    /// `DM_TABLE_LOAD_CMD`.
    pub const TABLE_LOAD: u32 = 9;
    /// `DM_TABLE_STATUS_CMD`.
    pub const TABLE_STATUS: u32 = 12;
    /// `DM_TARGET_MSG_CMD`.
    pub const TARGET_MSG: u32 = 14;
}

/// `DM_READONLY_FLAG`.
pub const READONLY_FLAG: u32 = 1 << 0;
/// `DM_SUSPEND_FLAG`.
pub const SUSPEND_FLAG: u32 = 1 << 1;
/// `DM_STATUS_TABLE_FLAG`: DM_TABLE_STATUS prints the table, not the status.
pub const STATUS_TABLE_FLAG: u32 = 1 << 4;
/// `DM_ACTIVE_PRESENT_FLAG`.
pub const ACTIVE_PRESENT_FLAG: u32 = 1 << 5;
/// `DM_BUFFER_FULL_FLAG`: the output did not fit.
pub const BUFFER_FULL_FLAG: u32 = 1 << 8;
/// `DM_DATA_OUT_FLAG`: a target message printed something.
pub const DATA_OUT_FLAG: u32 = 1 << 16;

/// `_IOC(dir, type, nr, size)` of the kernel (`include/uapi/asm-generic/ioctl.h`, and the
/// architectures with 3 direction bits).
const fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> u32 {
    const NRSHIFT: u32 = 0;
    const TYPESHIFT: u32 = NRSHIFT + 8;
    const SIZESHIFT: u32 = TYPESHIFT + 8;
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips32r6",
        target_arch = "mips64",
        target_arch = "mips64r6",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    const SIZEBITS: u32 = 13;
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips32r6",
        target_arch = "mips64",
        target_arch = "mips64r6",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    const SIZEBITS: u32 = 14;
    const DIRSHIFT: u32 = SIZESHIFT + SIZEBITS;
    (dir << DIRSHIFT) | (ty << TYPESHIFT) | (nr << NRSHIFT) | (size << SIZESHIFT)
}

/// `_IOWR(DM_IOCTL, nr, struct dm_ioctl)`: the request number of command `nr`.
pub const fn request(nr: u32) -> u32 {
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips32r6",
        target_arch = "mips64",
        target_arch = "mips64r6",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    const READ_WRITE: u32 = 2 | 4;
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips32r6",
        target_arch = "mips64",
        target_arch = "mips64r6",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    const READ_WRITE: u32 = 1 | 2;
    ioc(READ_WRITE, DM_IOCTL, nr, HEADER_SIZE as u32)
}

/// The device number the kernel encodes in `dev` (`huge_encode_dev`: the minor's low 8
/// bits, the 12-bit major, the minor's high 12 bits) as a `dev_t`.
pub fn decode_dev(dev: u64) -> libc::dev_t {
    let major = ((dev >> 8) & 0xfff) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    libc::makedev(major, minor)
}

/// `major:minor` of `dev`, as tables print it.
pub fn dev_string(dev: libc::dev_t) -> String {
    format!("{}:{}", libc::major(dev), libc::minor(dev))
}

// ---------------------------------------------------------------------------------------
// Buffers.

/// Largest buffer asked for (the kernel takes up to 1 GiB).
const MAX_BUFFER: usize = 64 << 20;
/// The first buffer of a command with output (as libdevmapper).
const OUT_BUFFER: usize = 16 << 10;

/// One ioctl's buffer: the header and the data.
struct Buf(Vec<u8>);

impl Buf {
    /// A zeroed buffer of `size` bytes (at least the header) whose header has the
    /// version, `data_size`, `data_start` just past the header, `name` and `flags`.
    fn new(size: usize, name: Option<&str>, flags: u32) -> Buf {
        let mut b = Buf(vec![0; size.max(HEADER_SIZE)]);
        for (i, v) in VERSION.iter().enumerate() {
            b.put_u32(header::VERSION + 4 * i, *v);
        }
        let len = b.0.len() as u32;
        b.put_u32(header::DATA_SIZE, len);
        b.put_u32(header::DATA_START, HEADER_SIZE as u32);
        b.put_u32(header::FLAGS, flags);
        if let Some(name) = name {
            // check_name kept it below NAME_LEN, without NUL.
            b.0[header::NAME..header::NAME + name.len()].copy_from_slice(name.as_bytes());
        }
        b
    }

    fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }

    /// The u32 at `at`; None past the end.
    fn u32_at(&self, at: usize) -> Option<u32> {
        let b = self.0.get(at..at.checked_add(4)?)?;
        Some(u32::from_ne_bytes(b.try_into().ok()?))
    }

    fn u64_at(&self, at: usize) -> Option<u64> {
        let b = self.0.get(at..at.checked_add(8)?)?;
        Some(u64::from_ne_bytes(b.try_into().ok()?))
    }

    fn header_u32(&self, at: usize) -> u32 {
        self.u32_at(at).unwrap_or(0)
    }

    fn flags(&self) -> u32 {
        self.header_u32(header::FLAGS)
    }

    fn dev(&self) -> libc::dev_t {
        decode_dev(self.u64_at(header::DEV).unwrap_or(0))
    }

    /// The end of the data the kernel returned: its `data_size`, within the buffer.
    fn data_end(&self) -> usize {
        (self.header_u32(header::DATA_SIZE) as usize).min(self.0.len())
    }

    /// The string at `at` up to its NUL (which must come before `end`).
    fn str_at(&self, at: usize, end: usize) -> Option<String> {
        let b = self.0.get(at..end.min(self.0.len()))?;
        let n = b.iter().position(|&c| c == 0)?;
        Some(String::from_utf8_lossy(&b[..n]).into_owned())
    }
}

// ---------------------------------------------------------------------------------------
// Errors.

/// A failed operation: what was asked, and the ioctl's errno (or another cause).
#[derive(Debug)]
struct Failure {
    what: String,
    call: &'static str,
    err: io::Error,
}

impl Failure {
    fn errno(&self) -> Option<i32> {
        self.err.raw_os_error()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.call {
            "" => write!(f, "{}: {}", self.what, self.err)?,
            call => write!(f, "{}: {}: {}", self.what, call, self.err)?,
        }
        if self.errno() == Some(libc::ENXIO) && self.call.starts_with("DM_") {
            write!(f, " (no such device)")?;
        }
        Ok(())
    }
}

impl From<Failure> for String {
    fn from(f: Failure) -> String {
        f.to_string()
    }
}

fn invalid(what: &str, why: String) -> Failure {
    Failure {
        what: what.to_string(),
        call: "",
        err: io::Error::new(io::ErrorKind::InvalidInput, why),
    }
}

/// A dm name the kernel takes: not empty, below `DM_NAME_LEN` bytes, no NUL, no '/'.
fn check_name(what: &str, name: &str) -> Result<(), Failure> {
    if name.is_empty()
        || name.len() >= NAME_LEN
        || name.contains('\0')
        || name.contains('/')
        || matches!(name, "." | ".." | "control")
    {
        return Err(invalid(what, format!("{:?} is not a dm device name", name)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The control device.

const CONTROL: &str = "/dev/mapper/control";

/// `/dev/mapper/control`, open for the ioctls.
struct Control(File);

impl Control {
    /// Opens the control device; if it is missing, makes it first (the misc device
    /// `device-mapper`, as libdevmapper does).
    fn open() -> Result<Control, Failure> {
        let open = || OpenOptions::new().read(true).write(true).open(CONTROL);
        let f = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                make_control()?;
                open()
            }
            r => r,
        };
        f.map(Control).map_err(|err| Failure {
            what: CONTROL.to_string(),
            call: "open",
            err,
        })
    }

    /// Makes the ioctl `nr` with `b`; the kernel reads and writes `b` in place.
    fn ioctl(
        &self,
        what: &dyn Fn() -> String,
        call: &'static str,
        nr: u32,
        b: &mut Buf,
    ) -> Result<(), Failure> {
        // The kernel reads data_size bytes from the buffer and writes back at most as many.
        assert!(b.0.len() >= HEADER_SIZE && b.header_u32(header::DATA_SIZE) as usize == b.0.len());
        // SAFETY: the fd is open; the pointer is to `b.0`, live and exclusively borrowed
        // for the call, and as long as the `data_size` its header declares, which bounds
        // what the kernel reads and writes (ctl_ioctl: copy_params, copy_to_user of a
        // data_size the commands keep within it).
        let r = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                request(nr) as libc::Ioctl,
                b.0.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(Failure {
                what: what(),
                call,
                err: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Makes the ioctl `nr` with a buffer from `build(size)`, twice as large each time the
    /// kernel says the output did not fit; the buffer of the call that fit.
    fn ioctl_out(
        &self,
        what: &dyn Fn() -> String,
        call: &'static str,
        nr: u32,
        first: usize,
        build: &dyn Fn(usize) -> Buf,
    ) -> Result<Buf, Failure> {
        let mut size = first.max(OUT_BUFFER);
        loop {
            let mut b = build(size);
            self.ioctl(what, call, nr, &mut b)?;
            if b.flags() & BUFFER_FULL_FLAG == 0 {
                return Ok(b);
            }
            if size >= MAX_BUFFER {
                return Err(Failure {
                    what: what(),
                    call,
                    err: io::Error::other(format!("the output is larger than {} bytes", size)),
                });
            }
            size *= 2;
        }
    }

    /// DM_DEV_STATUS of `name`: its device number, None if there is no such device.
    fn status(&self, name: &str) -> Result<Option<libc::dev_t>, Failure> {
        let what = || format!("status {}", name);
        check_name(&what(), name)?;
        let mut b = Buf::new(HEADER_SIZE, Some(name), 0);
        match self.ioctl(&what, "DM_DEV_STATUS", cmd::DEV_STATUS, &mut b) {
            Ok(()) => Ok(Some(b.dev())),
            Err(f) if f.errno() == Some(libc::ENXIO) => Ok(None),
            Err(f) => Err(f),
        }
    }

    fn table(&self, name: &str) -> Result<Vec<TargetLine>, Failure> {
        let what = || format!("table {}", name);
        check_name(&what(), name)?;
        let b = self.ioctl_out(
            &what,
            "DM_TABLE_STATUS",
            cmd::TABLE_STATUS,
            OUT_BUFFER,
            &|size| Buf::new(size, Some(name), STATUS_TABLE_FLAG),
        )?;
        parse_table(&b).map_err(|why| Failure {
            what: what(),
            call: "DM_TABLE_STATUS",
            err: io::Error::new(io::ErrorKind::InvalidData, why),
        })
    }

    fn list(&self) -> Result<Vec<(String, libc::dev_t)>, Failure> {
        let what = || "list".to_string();
        let b = self.ioctl_out(
            &what,
            "DM_LIST_DEVICES",
            cmd::LIST_DEVICES,
            OUT_BUFFER,
            &|size| Buf::new(size, None, 0),
        )?;
        parse_list(&b).map_err(|why| Failure {
            what: what(),
            call: "DM_LIST_DEVICES",
            err: io::Error::new(io::ErrorKind::InvalidData, why),
        })
    }

    fn remove(&self, name: &str) -> Result<(), Failure> {
        let what = || format!("remove {}", name);
        check_name(&what(), name)?;
        // Busy a moment after it was made or closed while udev, if there is one, probes
        // it: tried again, as `dmsetup remove --retry`.
        let mut tries = 0;
        loop {
            let mut b = Buf::new(HEADER_SIZE, Some(name), 0);
            match self.ioctl(&what, "DM_DEV_REMOVE", cmd::DEV_REMOVE, &mut b) {
                Err(f) if f.errno() == Some(libc::EBUSY) && tries < REMOVE_TRIES => {
                    tries += 1;
                    std::thread::sleep(REMOVE_WAIT);
                }
                r => return r,
            }
        }
    }
}

const REMOVE_TRIES: u32 = 25;
const REMOVE_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Makes `/dev/mapper/control`: the char device 10:minor of `device-mapper` in
/// `/proc/misc`.
fn make_control() -> Result<(), Failure> {
    let fail = |call, err| Failure {
        what: CONTROL.to_string(),
        call,
        err,
    };
    let misc = fs::read_to_string("/proc/misc").map_err(|e| fail("reading /proc/misc", e))?;
    let minor = misc
        .lines()
        .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [minor, "device-mapper"] => minor.parse::<u32>().ok(),
            _ => None,
        })
        .ok_or_else(|| {
            fail(
                "open",
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "missing, and no device-mapper in /proc/misc (is dm-mod loaded?)",
                ),
            )
        })?;
    fs::create_dir_all("/dev/mapper").map_err(|e| fail("mkdir /dev/mapper", e))?;
    match make_node(CONTROL, libc::S_IFCHR, libc::makedev(10, minor)) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(fail("mknod", e)),
        _ => Ok(()),
    }
}

/// mknod(2) of `path` with mode 0600 of `kind` (`S_IFBLK`, `S_IFCHR`).
fn make_node(path: &str, kind: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let c = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string that lives through the call.
    let r = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, dev) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// What the kernel returns.

/// One target of a table: `<start> <len> <type> <params>`, as `dmsetup table` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetLine {
    /// First sector.
    pub start: u64,
    /// Sectors.
    pub len: u64,
    /// Target type (`shared-origin`, `linear`, ...).
    pub ttype: String,
    /// The parameters, as the target prints its table.
    pub params: String,
}

impl fmt::Display for TargetLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.start, self.len, self.ttype, self.params
        )
    }
}

/// The targets of a DM_TABLE_STATUS answer: `target_count` specs from `data_start`, each
/// followed by its string; `next` is the offset of the next from the first.
fn parse_table(b: &Buf) -> Result<Vec<TargetLine>, String> {
    let count = b.header_u32(header::TARGET_COUNT) as usize;
    let base = b.header_u32(header::DATA_START) as usize;
    let end = b.data_end();
    let mut lines = Vec::new();
    let mut off = 0usize;
    for i in 0..count {
        let at = base
            .checked_add(off)
            .filter(|&at| at.checked_add(SPEC_SIZE).is_some_and(|e| e <= end))
            .ok_or_else(|| format!("target {} is past the answer ({} bytes)", i, end))?;
        let field = |o| b.u64_at(at + o).unwrap_or(0);
        let ttype = b
            .str_at(
                at + spec::TARGET_TYPE,
                at + spec::TARGET_TYPE + MAX_TYPE_NAME,
            )
            .ok_or_else(|| format!("target {}: type not NUL-terminated", i))?;
        let params = b
            .str_at(at + SPEC_SIZE, end)
            .ok_or_else(|| format!("target {}: parameters not NUL-terminated", i))?;
        lines.push(TargetLine {
            start: field(spec::SECTOR_START),
            len: field(spec::LENGTH),
            ttype,
            params,
        });
        let next = b.u32_at(at + spec::NEXT).unwrap_or(0) as usize;
        if i + 1 < count && next <= off {
            return Err(format!("target {}: next {} goes back", i, next));
        }
        off = next;
    }
    Ok(lines)
}

/// The devices of a DM_LIST_DEVICES answer: `dm_name_list` records from `data_start`,
/// each `next` bytes after the one before (0: the last); a first `dev` of 0: none.
fn parse_list(b: &Buf) -> Result<Vec<(String, libc::dev_t)>, String> {
    let mut at = b.header_u32(header::DATA_START) as usize;
    let end = b.data_end();
    let mut out = Vec::new();
    loop {
        // No device: data_size is data_start (the dev 0 the kernel writes there is not
        // copied back; the buffer was zeroed).
        if out.is_empty() && (at + name_list::NAME > end || b.u64_at(at) == Some(0)) {
            return Ok(out);
        }
        let dev = b
            .u64_at(at + name_list::DEV)
            .filter(|_| at + name_list::NAME <= end)
            .ok_or_else(|| format!("a record at {} is past the answer ({} bytes)", at, end))?;
        let name = b
            .str_at(at + name_list::NAME, end)
            .ok_or_else(|| format!("the name at {} is not NUL-terminated", at))?;
        out.push((name, decode_dev(dev)));
        match b.u32_at(at + name_list::NEXT).unwrap_or(0) as usize {
            0 => return Ok(out),
            next if next < name_list::NAME => {
                return Err(format!("the record at {} has next {}", at, next))
            }
            next => at += next,
        }
    }
}

/// A DM_TABLE_LOAD buffer: the targets as `dm_target_spec`s from `data_start`, each
/// followed by its parameters (backslashes doubled, as libdevmapper: the kernel splits
/// them with `\` as escape) and padded to 8 bytes; `next` from this spec to the next.
fn load_buffer(name: &str, flags: u32, targets: &[TargetLine]) -> Result<Buf, String> {
    let mut data: Vec<u8> = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        if t.ttype.is_empty() || t.ttype.len() >= MAX_TYPE_NAME || t.ttype.contains('\0') {
            return Err(format!("target {}: bad target type {:?}", i, t.ttype));
        }
        if t.params.contains('\0') {
            return Err(format!("target {}: a NUL in the parameters", i));
        }
        let params = t.params.replace('\\', "\\\\");
        let len = (SPEC_SIZE + params.len() + 1).next_multiple_of(8);
        let at = data.len();
        data.resize(at + len, 0);
        let s = &mut data[at..at + len];
        s[spec::SECTOR_START..][..8].copy_from_slice(&t.start.to_ne_bytes());
        s[spec::LENGTH..][..8].copy_from_slice(&t.len.to_ne_bytes());
        s[spec::STATUS..][..4].copy_from_slice(&0i32.to_ne_bytes());
        s[spec::NEXT..][..4].copy_from_slice(&(len as u32).to_ne_bytes());
        s[spec::TARGET_TYPE..][..t.ttype.len()].copy_from_slice(t.ttype.as_bytes());
        s[SPEC_SIZE..][..params.len()].copy_from_slice(params.as_bytes());
    }
    if HEADER_SIZE + data.len() > MAX_BUFFER {
        return Err("the table is too large".to_string());
    }
    let mut b = Buf::new(HEADER_SIZE + data.len(), Some(name), flags);
    b.put_u32(header::TARGET_COUNT, targets.len() as u32);
    b.0[HEADER_SIZE..].copy_from_slice(&data);
    Ok(b)
}

/// A DM_TARGET_MSG buffer of `size` bytes: the `dm_target_msg` at `data_start`.
fn message_buffer(size: usize, name: &str, sector: u64, msg: &str) -> Buf {
    let mut b = Buf::new(size, Some(name), 0);
    b.put_u64(HEADER_SIZE + target_msg::SECTOR, sector);
    let at = HEADER_SIZE + target_msg::MESSAGE;
    b.0[at..at + msg.len()].copy_from_slice(msg.as_bytes());
    b
}

/// The output of a DM_TARGET_MSG answer: the string at `data_start` if the kernel set
/// `DM_DATA_OUT_FLAG`, else empty.
fn message_output(b: &Buf) -> Result<String, String> {
    if b.flags() & DATA_OUT_FLAG == 0 {
        return Ok(String::new());
    }
    let at = b.header_u32(header::DATA_START) as usize;
    b.str_at(at, b.data_end())
        .ok_or_else(|| "the output is not NUL-terminated".to_string())
}

// ---------------------------------------------------------------------------------------
// The operations.

/// `dmsetup message NAME SECTOR MSG`: sends `msg` to the target at `sector`; what it
/// printed (empty if nothing).  A message whose output does not fit is sent again with a
/// larger buffer (as libdevmapper does), so one with effects must print little (those of
/// `shared-origin` print nothing).
pub fn message(name: &str, sector: u64, msg: &str) -> Result<String, String> {
    let what = || format!("message {} {} {}", name, sector, msg);
    check_name(&what(), name)?;
    if msg.contains('\0') {
        return Err(invalid(&what(), "a NUL in the message".to_string()).into());
    }
    let ctl = Control::open()?;
    let need = HEADER_SIZE + target_msg::MESSAGE + msg.len() + 1;
    let b = ctl.ioctl_out(&what, "DM_TARGET_MSG", cmd::TARGET_MSG, need, &|size| {
        message_buffer(size, name, sector, msg)
    })?;
    message_output(&b).map_err(|why| format!("{}: DM_TARGET_MSG: {}", what(), why))
}

/// `dmsetup table NAME`: the targets of the device's active table (none if it has none).
pub fn table(name: &str) -> Result<Vec<TargetLine>, String> {
    Ok(Control::open()?.table(name)?)
}

/// `dmsetup ls`: every dm device, its name and device number.
pub fn list() -> Result<Vec<(String, libc::dev_t)>, String> {
    Ok(Control::open()?.list()?)
}

/// `dmsetup table`: every dm device and the targets of its active table.  A device
/// removed between the list and its table is left out.
pub fn tables() -> Result<Vec<(String, Vec<TargetLine>)>, String> {
    let ctl = Control::open()?;
    let mut out = Vec::new();
    for (name, _) in ctl.list()? {
        match ctl.table(&name) {
            Ok(t) => out.push((name, t)),
            Err(f) if f.errno() == Some(libc::ENXIO) => {}
            Err(f) => return Err(f.into()),
        }
    }
    Ok(out)
}

/// Whether a dm device `name` exists (`dmsetup info NAME`).
pub fn exists(name: &str) -> Result<bool, String> {
    Ok(Control::open()?.status(name)?.is_some())
}

/// `dmsetup create NAME [--readonly] --table ...`: makes the device, loads the table
/// (read-only: `DM_READONLY_FLAG`) and resumes it; if the load or the resume fails, the
/// device is removed again.
pub fn create(name: &str, readonly: bool, targets: &[TargetLine]) -> Result<(), String> {
    let what = || format!("create {}", name);
    check_name(&what(), name)?;
    let flags = if readonly { READONLY_FLAG } else { 0 };
    let mut load =
        load_buffer(name, flags, targets).map_err(|why| invalid(&what(), why).to_string())?;
    let ctl = Control::open()?;
    let mut b = Buf::new(HEADER_SIZE, Some(name), 0);
    ctl.ioctl(&what, "DM_DEV_CREATE", cmd::DEV_CREATE, &mut b)?;
    let r = ctl
        .ioctl(&what, "DM_TABLE_LOAD", cmd::TABLE_LOAD, &mut load)
        .and_then(|()| {
            let mut b = Buf::new(HEADER_SIZE, Some(name), 0);
            ctl.ioctl(&what, "DM_DEV_SUSPEND (resume)", cmd::DEV_SUSPEND, &mut b)
        });
    if let Err(f) = r {
        return Err(match ctl.remove(name) {
            Ok(()) => f.to_string(),
            Err(g) => format!("{}; then {}", f, g),
        });
    }
    Ok(())
}

/// `dmsetup remove NAME`: removes the device (tried again for 5 s while it is busy), then
/// its node `/dev/mapper/NAME` if that is a block device node of its number.
pub fn remove(name: &str) -> Result<(), String> {
    let ctl = Control::open()?;
    let dev = ctl.status(name)?;
    ctl.remove(name)?;
    let path = node_path(name);
    if let (Some(dev), Ok(m)) = (dev, fs::symlink_metadata(&path)) {
        if m.file_type().is_block_device() && m.rdev() == dev {
            fs::remove_file(&path).map_err(|e| format!("{}: unlink: {}", path, e))?;
        }
    }
    Ok(())
}

fn node_path(name: &str) -> String {
    format!("/dev/mapper/{}", name)
}

/// `dmsetup mknodes NAME`: makes sure `/dev/mapper/NAME` is the device's block node (or a
/// link to it, as udev makes): made if missing, made again if it is a block node or a link
/// of another device (a stale one); an error if something else is there.
pub fn mknod(name: &str) -> Result<(), String> {
    let ctl = Control::open()?;
    let dev = ctl
        .status(name)?
        .ok_or_else(|| format!("mknod {}: no such dm device", name))?;
    let path = node_path(name);
    let right = |m: &fs::Metadata| m.file_type().is_block_device() && m.rdev() == dev;
    let err = |call: &str, e: io::Error| format!("{}: {}: {}", path, call, e);
    match fs::metadata(&path) {
        Ok(m) if right(&m) => return Ok(()),
        Ok(m) if !m.file_type().is_block_device() => {
            return Err(format!(
                "{}: not a block device node (the node of {} should be there)",
                path,
                dev_string(dev)
            ))
        }
        // Another device's node, or a dangling link: replaced.
        Ok(_) => fs::remove_file(&path).map_err(|e| err("unlink", e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if fs::symlink_metadata(&path).is_ok() {
                fs::remove_file(&path).map_err(|e| err("unlink", e))?;
            }
        }
        Err(e) => return Err(err("stat", e)),
    }
    fs::create_dir_all("/dev/mapper").map_err(|e| format!("/dev/mapper: mkdir: {}", e))?;
    match make_node(&path, libc::S_IFBLK, dev) {
        // Made meanwhile (by udev): checked below.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        r => r.map_err(|e| err("mknod", e))?,
    }
    match fs::metadata(&path) {
        Ok(m) if right(&m) => Ok(()),
        Ok(_) => Err(format!(
            "{}: is not the block device {} after mknod",
            path,
            dev_string(dev)
        )),
        Err(e) => Err(err("stat", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    /// struct dm_ioctl, dm_target_spec and dm_name_list as the header declares them.
    #[repr(C)]
    struct DmIoctl {
        version: [u32; 3],
        data_size: u32,
        data_start: u32,
        target_count: u32,
        open_count: i32,
        flags: u32,
        event_nr: u32,
        padding: u32,
        dev: u64,
        name: [u8; NAME_LEN],
        uuid: [u8; UUID_LEN],
        data: [u8; 7],
    }

    #[repr(C)]
    struct DmTargetSpec {
        sector_start: u64,
        length: u64,
        status: i32,
        next: u32,
        target_type: [u8; MAX_TYPE_NAME],
    }

    #[repr(C)]
    struct DmNameList {
        dev: u64,
        next: u32,
        name: [u8; 0],
    }

    #[repr(C)]
    struct DmTargetMsg {
        sector: u64,
        message: [u8; 0],
    }

    #[test]
    fn layout() {
        use core::mem::{offset_of, size_of};
        assert_eq!(size_of::<DmIoctl>(), HEADER_SIZE);
        assert_eq!(HEADER_SIZE, 312);
        assert_eq!(offset_of!(DmIoctl, version), header::VERSION);
        assert_eq!(offset_of!(DmIoctl, data_size), header::DATA_SIZE);
        assert_eq!(offset_of!(DmIoctl, data_start), header::DATA_START);
        assert_eq!(offset_of!(DmIoctl, target_count), header::TARGET_COUNT);
        assert_eq!(offset_of!(DmIoctl, open_count), header::OPEN_COUNT);
        assert_eq!(offset_of!(DmIoctl, flags), header::FLAGS);
        assert_eq!(offset_of!(DmIoctl, event_nr), header::EVENT_NR);
        assert_eq!(offset_of!(DmIoctl, padding), header::PADDING);
        assert_eq!(offset_of!(DmIoctl, dev), header::DEV);
        assert_eq!(offset_of!(DmIoctl, name), header::NAME);
        assert_eq!(offset_of!(DmIoctl, uuid), header::UUID);
        assert_eq!(offset_of!(DmIoctl, data), header::DATA);
        // By hand: 3 + 6 u32 and a padding u32 = 40, dev 8 = 48, name 128 = 176, uuid
        // 129 = 305, data 7 = 312.
        assert_eq!(
            (header::DEV, header::NAME, header::UUID, header::DATA),
            (40, 48, 176, 305)
        );
        assert_eq!(size_of::<DmTargetSpec>(), SPEC_SIZE);
        assert_eq!(SPEC_SIZE, 40);
        assert_eq!(offset_of!(DmTargetSpec, sector_start), spec::SECTOR_START);
        assert_eq!(offset_of!(DmTargetSpec, length), spec::LENGTH);
        assert_eq!(offset_of!(DmTargetSpec, status), spec::STATUS);
        assert_eq!(offset_of!(DmTargetSpec, next), spec::NEXT);
        assert_eq!(offset_of!(DmTargetSpec, target_type), spec::TARGET_TYPE);
        assert_eq!((spec::STATUS, spec::NEXT, spec::TARGET_TYPE), (16, 20, 24));
        assert_eq!(offset_of!(DmNameList, dev), name_list::DEV);
        assert_eq!(offset_of!(DmNameList, next), name_list::NEXT);
        assert_eq!(offset_of!(DmNameList, name), name_list::NAME);
        assert_eq!(name_list::NAME, 12);
        assert_eq!(offset_of!(DmTargetMsg, sector), target_msg::SECTOR);
        assert_eq!(offset_of!(DmTargetMsg, message), target_msg::MESSAGE);
        // The data starts 8-aligned right after the header (get_result_buffer).
        assert_eq!(HEADER_SIZE % 8, 0);
    }

    /// The request numbers by hand: _IOWR = direction read|write (3) << 30, size 312 =
    /// 0x138 << 16, type 0xfd << 8, nr.
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips32r6",
        target_arch = "mips64",
        target_arch = "mips64r6",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    #[test]
    fn request_numbers() {
        assert_eq!(request(cmd::VERSION), 0xc138_fd00);
        assert_eq!(request(cmd::LIST_DEVICES), 0xc138_fd02);
        assert_eq!(request(cmd::DEV_CREATE), 0xc138_fd03);
        assert_eq!(request(cmd::DEV_REMOVE), 0xc138_fd04);
        assert_eq!(request(cmd::DEV_SUSPEND), 0xc138_fd06);
        assert_eq!(request(cmd::DEV_STATUS), 0xc138_fd07);
        assert_eq!(request(cmd::TABLE_LOAD), 0xc138_fd09);
        assert_eq!(request(cmd::TABLE_STATUS), 0xc138_fd0c);
        assert_eq!(request(cmd::TARGET_MSG), 0xc138_fd0e);
    }

    /// The C compiler's view of the header, if there is one: sizes, offsets, the request
    /// numbers and the flags, against ours.  Skipped without `cc` or the header.
    #[test]
    fn against_the_c_header() {
        let dir: PathBuf = std::env::temp_dir().join(format!(
            "shsnap-dm-ioctl-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("layout.c");
        let exe = dir.join("layout");
        let cc = |program: &str| {
            fs::write(&src, program).unwrap();
            Command::new("cc").arg("-o").arg(&exe).arg(&src).output()
        };
        // Skipped without a C compiler or without the header; then the check must build.
        match cc("#include <linux/dm-ioctl.h>\nint main(void) { return 0; }\n") {
            Ok(o) if o.status.success() => {}
            r => {
                std::eprintln!("skipped: no cc, or no linux/dm-ioctl.h: {:?}", r);
                fs::remove_dir_all(&dir).unwrap();
                return;
            }
        }
        let built = cc(C_PROGRAM).unwrap();
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let out = Command::new(&exe).output().unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let ours: Vec<(&str, u64)> = vec![
            ("sizeof_dm_ioctl", HEADER_SIZE as u64),
            ("version", header::VERSION as u64),
            ("data_size", header::DATA_SIZE as u64),
            ("data_start", header::DATA_START as u64),
            ("target_count", header::TARGET_COUNT as u64),
            ("open_count", header::OPEN_COUNT as u64),
            ("flags", header::FLAGS as u64),
            ("event_nr", header::EVENT_NR as u64),
            ("padding", header::PADDING as u64),
            ("dev", header::DEV as u64),
            ("name", header::NAME as u64),
            ("uuid", header::UUID as u64),
            ("data", header::DATA as u64),
            ("sizeof_dm_target_spec", SPEC_SIZE as u64),
            ("sector_start", spec::SECTOR_START as u64),
            ("length", spec::LENGTH as u64),
            ("status", spec::STATUS as u64),
            ("next", spec::NEXT as u64),
            ("target_type", spec::TARGET_TYPE as u64),
            ("nl_dev", name_list::DEV as u64),
            ("nl_next", name_list::NEXT as u64),
            ("nl_name", name_list::NAME as u64),
            ("msg_sector", target_msg::SECTOR as u64),
            ("msg_message", target_msg::MESSAGE as u64),
            ("DM_NAME_LEN", NAME_LEN as u64),
            ("DM_UUID_LEN", UUID_LEN as u64),
            ("DM_MAX_TYPE_NAME", MAX_TYPE_NAME as u64),
            ("DM_VERSION_MAJOR", VERSION[0] as u64),
            ("DM_IOCTL", DM_IOCTL as u64),
            ("DM_VERSION", request(cmd::VERSION) as u64),
            ("DM_LIST_DEVICES", request(cmd::LIST_DEVICES) as u64),
            ("DM_DEV_CREATE", request(cmd::DEV_CREATE) as u64),
            ("DM_DEV_REMOVE", request(cmd::DEV_REMOVE) as u64),
            ("DM_DEV_SUSPEND", request(cmd::DEV_SUSPEND) as u64),
            ("DM_DEV_STATUS", request(cmd::DEV_STATUS) as u64),
            ("DM_TABLE_LOAD", request(cmd::TABLE_LOAD) as u64),
            ("DM_TABLE_STATUS", request(cmd::TABLE_STATUS) as u64),
            ("DM_TARGET_MSG", request(cmd::TARGET_MSG) as u64),
            ("DM_READONLY_FLAG", READONLY_FLAG as u64),
            ("DM_SUSPEND_FLAG", SUSPEND_FLAG as u64),
            ("DM_STATUS_TABLE_FLAG", STATUS_TABLE_FLAG as u64),
            ("DM_ACTIVE_PRESENT_FLAG", ACTIVE_PRESENT_FLAG as u64),
            ("DM_BUFFER_FULL_FLAG", BUFFER_FULL_FLAG as u64),
            ("DM_DATA_OUT_FLAG", DATA_OUT_FLAG as u64),
        ];
        let theirs: Vec<(&str, u64)> = text
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap();
                (k, v.parse().unwrap())
            })
            .collect();
        assert_eq!(theirs, ours);
    }

    // What the kernel does with and to the buffers (drivers/md/dm-ioctl.c), ported.

    fn align8(v: usize) -> usize {
        (v + 7) & !7
    }

    fn put(b: &mut [u8], at: usize, v: &[u8]) {
        b[at..at + v.len()].copy_from_slice(v);
    }

    /// populate_table: the targets of a DM_TABLE_LOAD buffer, with its checks.
    fn kernel_populate_table(b: &[u8]) -> Result<Vec<(u64, u64, String, String)>, String> {
        let u32_at = |at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().unwrap());
        let param_size = u32_at(header::DATA_SIZE) as usize;
        assert_eq!(param_size, b.len());
        let count = u32_at(header::TARGET_COUNT);
        if count == 0 {
            return Err("no targets specified".into());
        }
        let end = param_size;
        let mut last = 0usize; // the spec pointer, from the start of the buffer
        let mut next = u32_at(header::DATA_START) as usize;
        let mut min_size = HEADER_SIZE;
        let mut out = Vec::new();
        for _ in 0..count {
            if next < min_size {
                return Err("next target spec overlaps".into());
            }
            // next_target
            let remaining = end - last;
            if remaining.wrapping_sub(SPEC_SIZE) <= next {
                return Err("Target spec extends beyond end of parameters".into());
            }
            if !next.is_multiple_of(8) {
                return Err("Next dm_target_spec is not 8-byte aligned".into());
            }
            let at = last + next;
            let params_at = at + SPEC_SIZE;
            let nul = b[params_at..end]
                .iter()
                .position(|&c| c == 0)
                .ok_or("target parameters not NUL-terminated")?;
            min_size = params_at + nul - at + 1;
            let tt = &b[at + spec::TARGET_TYPE..at + spec::TARGET_TYPE + MAX_TYPE_NAME];
            let tt = &tt[..tt
                .iter()
                .position(|&c| c == 0)
                .ok_or("type not terminated")?];
            out.push((
                u64_at(at + spec::SECTOR_START),
                u64_at(at + spec::LENGTH),
                String::from_utf8(tt.to_vec()).unwrap(),
                String::from_utf8(b[params_at..params_at + nul].to_vec()).unwrap(),
            ));
            last = at;
            next = u32_at(at + spec::NEXT) as usize;
        }
        Ok(out)
    }

    /// validate_params and the name lookup of a request naming a device.
    fn kernel_names(b: &[u8]) -> String {
        let name = &b[header::NAME..header::NAME + NAME_LEN];
        assert_eq!(b[header::UUID], 0, "a uuid as well as a name");
        assert_eq!(
            &b[header::DEV..header::DEV + 8],
            &[0; 8],
            "a dev as well as a name"
        );
        let n = name.iter().position(|&c| c == 0).unwrap();
        String::from_utf8(name[..n].to_vec()).unwrap()
    }

    #[test]
    fn the_header() {
        let b = Buf::new(1000, Some("vol"), READONLY_FLAG);
        assert_eq!(b.0.len(), 1000);
        assert_eq!(
            (0..3).map(|i| b.header_u32(4 * i)).collect::<Vec<_>>(),
            vec![4, 0, 0]
        );
        assert_eq!(b.header_u32(header::DATA_SIZE), 1000);
        assert_eq!(b.header_u32(header::DATA_START), 312);
        assert_eq!(b.flags(), READONLY_FLAG);
        assert_eq!(kernel_names(&b.0), "vol");
        assert_eq!(Buf::new(10, None, 0).0.len(), HEADER_SIZE);
        let long = "x".repeat(NAME_LEN - 1);
        assert!(check_name("t", &long).is_ok());
        assert_eq!(kernel_names(&Buf::new(HEADER_SIZE, Some(&long), 0).0), long);
        for bad in [
            "",
            "a/b",
            ".",
            "..",
            "control",
            "a\0b",
            &"x".repeat(NAME_LEN),
        ] {
            assert!(check_name("t", bad).is_err(), "{:?}", bad);
        }
    }

    #[test]
    fn a_table_load_as_the_kernel_reads_it() {
        let targets = vec![
            TargetLine {
                start: 0,
                len: 2097152,
                ttype: "shared-snapshot".into(),
                params: "254:0 7".into(),
            },
            TargetLine {
                start: 2097152,
                len: 8,
                ttype: "linear".into(),
                params: "7:0 0".into(),
            },
            TargetLine {
                start: 2097160,
                len: 1,
                ttype: "error".into(),
                params: String::new(),
            },
            TargetLine {
                start: 2097161,
                len: 1,
                ttype: "crypt".into(),
                params: "a\\b".into(),
            },
        ];
        let b = load_buffer("snap", READONLY_FLAG, &targets).unwrap();
        assert_eq!(b.0.len() % 8, 0);
        assert_eq!(b.flags(), READONLY_FLAG);
        assert_eq!(kernel_names(&b.0), "snap");
        let got = kernel_populate_table(&b.0).unwrap();
        let want: Vec<_> = targets
            .iter()
            .map(|t| {
                let p = t.params.replace('\\', "\\\\");
                (t.start, t.len, t.ttype.clone(), p)
            })
            .collect();
        assert_eq!(got, want);
        // One target: the buffer ends right after its padded parameters.
        let one = load_buffer("snap", 0, &targets[..1]).unwrap();
        assert_eq!(
            one.0.len(),
            HEADER_SIZE + align8(SPEC_SIZE + "254:0 7".len() + 1)
        );
        assert!(kernel_populate_table(&one.0).is_ok());
        for bad in ["", "a-type-name-too-long", "a\0b"] {
            let t = TargetLine {
                ttype: bad.to_string(),
                ..targets[0].clone()
            };
            assert!(load_buffer("snap", 0, &[t]).is_err(), "{:?}", bad);
        }
    }

    /// retrieve_status: the answer to DM_TABLE_STATUS in a buffer of `size` bytes; false
    /// if the kernel would set DM_BUFFER_FULL_FLAG.
    fn kernel_table_status(b: &mut Buf, targets: &[(u64, u64, &str, &str)]) -> bool {
        let param_size = b.0.len();
        b.put_u32(header::DATA_START, HEADER_SIZE as u32);
        b.put_u32(header::DATA_SIZE, header::DATA as u32);
        let len = param_size - HEADER_SIZE;
        let mut outptr = 0usize;
        let mut used = 0;
        let mut full = false;
        for &(start, length, tt, params) in targets {
            let remaining = len - outptr;
            if remaining <= SPEC_SIZE {
                full = true;
                break;
            }
            let at = HEADER_SIZE + outptr;
            b.put_u64(at + spec::SECTOR_START, start);
            b.put_u64(at + spec::LENGTH, length);
            put(&mut b.0, at + spec::TARGET_TYPE, &[0; MAX_TYPE_NAME]);
            put(&mut b.0, at + spec::TARGET_TYPE, tt.as_bytes());
            outptr += SPEC_SIZE;
            let remaining = len - outptr;
            // The target's status: DMEMIT truncates to remaining - 1 bytes.
            let n = params.len().min(remaining - 1);
            put(&mut b.0, HEADER_SIZE + outptr, &params.as_bytes()[..n]);
            b.0[HEADER_SIZE + outptr + n] = 0;
            let l = n + 1;
            if l == remaining {
                full = true;
                break;
            }
            outptr += l;
            used = HEADER_SIZE + outptr;
            outptr = align8(outptr);
            b.put_u32(at + spec::NEXT, outptr as u32);
        }
        if used != 0 {
            b.put_u32(header::DATA_SIZE, used as u32);
        }
        b.put_u32(header::TARGET_COUNT, targets.len() as u32);
        if full {
            b.put_u32(header::FLAGS, b.flags() | BUFFER_FULL_FLAG);
        }
        !full
    }

    #[test]
    fn a_table_as_the_kernel_writes_it() {
        let targets = [
            (0, 2097152, "shared-origin", "254:0 254:1 16"),
            (2097152, 8, "linear", "7:0 0"),
            (2097160, 8, "error", ""),
        ];
        let mut b = Buf::new(OUT_BUFFER, Some("vol"), STATUS_TABLE_FLAG);
        assert!(kernel_table_status(&mut b, &targets));
        let lines = parse_table(&b).unwrap();
        assert_eq!(
            lines
                .iter()
                .map(|t| (t.start, t.len, t.ttype.as_str(), t.params.as_str()))
                .collect::<Vec<_>>(),
            targets
        );
        assert_eq!(
            lines[0].to_string(),
            "0 2097152 shared-origin 254:0 254:1 16"
        );
        // No active table.
        let mut b = Buf::new(OUT_BUFFER, Some("vol"), STATUS_TABLE_FLAG);
        assert!(kernel_table_status(&mut b, &[]));
        assert_eq!(parse_table(&b).unwrap(), vec![]);
        // Too small: the flag is set (ioctl_out asks again); what is there is never read
        // past the buffer.
        for size in HEADER_SIZE..HEADER_SIZE + 100 {
            let mut b = Buf::new(size, Some("vol"), STATUS_TABLE_FLAG);
            if !kernel_table_status(&mut b, &targets) {
                assert_ne!(b.flags() & BUFFER_FULL_FLAG, 0);
                let _ = parse_table(&b);
            }
        }
    }

    /// list_devices: `with_event_nr`: the layout since 4.45 (event_nr and flags after each
    /// name), else the older one.
    fn kernel_list(b: &mut Buf, devices: &[(&str, u64)], with_event_nr: bool) {
        let param_size = b.0.len();
        b.put_u32(header::DATA_START, HEADER_SIZE as u32);
        b.put_u32(header::DATA_SIZE, header::DATA as u32);
        let record = |name: &str| {
            if with_event_nr {
                align8(name_list::NAME + name.len() + 1) + 8
            } else {
                align8(16 + name.len() + 1)
            }
        };
        let needed: usize = devices.iter().map(|(n, _)| record(n)).sum();
        let len = param_size - HEADER_SIZE;
        if len < needed || len < 8 {
            b.put_u32(header::FLAGS, b.flags() | BUFFER_FULL_FLAG);
            return;
        }
        b.put_u32(header::DATA_SIZE, (HEADER_SIZE + needed) as u32);
        b.put_u64(HEADER_SIZE, 0);
        let mut at = HEADER_SIZE;
        let mut old: Option<usize> = None;
        for &(name, dev) in devices {
            if let Some(o) = old {
                b.put_u32(o + name_list::NEXT, (at - o) as u32);
            }
            b.put_u64(at + name_list::DEV, dev);
            b.put_u32(at + name_list::NEXT, 0);
            put(&mut b.0, at + name_list::NAME, name.as_bytes());
            b.0[at + name_list::NAME + name.len()] = 0;
            old = Some(at);
            if with_event_nr {
                let ev = align8(at + name_list::NAME + name.len() + 1);
                b.put_u32(ev, 77);
                b.put_u32(ev + 4, 0);
                at = ev + 8;
            } else {
                at = align8(at + 16 + name.len() + 1);
            }
        }
        assert_eq!(at - HEADER_SIZE, needed);
    }

    /// huge_encode_dev of (major, minor).
    fn encode(major: u64, minor: u64) -> u64 {
        (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
    }

    #[test]
    fn a_list_as_the_kernel_writes_it() {
        let devices = [
            ("a", encode(253, 0)),
            ("shsnap-send-vol-7", encode(253, 1)),
            ("x".repeat(NAME_LEN - 1).leak() as &str, encode(253, 300)),
            ("1234567", encode(259, 1 << 19)),
        ];
        for with_event_nr in [true, false] {
            let mut b = Buf::new(OUT_BUFFER, None, 0);
            kernel_list(&mut b, &devices, with_event_nr);
            let got = parse_list(&b).unwrap();
            assert_eq!(got.len(), devices.len());
            for ((name, dev), (want, encoded)) in got.iter().zip(devices) {
                assert_eq!(name, want);
                assert_eq!(*dev, decode_dev(encoded));
            }
            let mut b = Buf::new(OUT_BUFFER, None, 0);
            kernel_list(&mut b, &[], with_event_nr);
            assert_eq!(parse_list(&b).unwrap(), vec![]);
            let mut b = Buf::new(HEADER_SIZE + 40, None, 0);
            kernel_list(&mut b, &devices, with_event_nr);
            assert_ne!(b.flags() & BUFFER_FULL_FLAG, 0);
        }
    }

    #[test]
    fn device_numbers() {
        for (major, minor) in [
            (253, 0),
            (253, 255),
            (253, 256),
            (7, 3),
            (259, 1 << 19),
            (4095, 0xfffff),
        ] {
            let d = decode_dev(encode(major, minor));
            assert_eq!(
                (libc::major(d) as u64, libc::minor(d) as u64),
                (major, minor)
            );
            assert_eq!(d, libc::makedev(major as u32, minor as u32));
            assert_eq!(dev_string(d), format!("{}:{}", major, minor));
        }
    }

    #[test]
    fn a_message_as_the_kernel_reads_and_answers_it() {
        let msg = "delta 5 6 0";
        let mut b = message_buffer(OUT_BUFFER, "vol", 0, msg);
        assert_eq!(kernel_names(&b.0), "vol");
        // target_message: the dm_target_msg at data_start, past the header's fields, its
        // message NUL-terminated within data_size.
        let start = b.header_u32(header::DATA_START) as usize;
        assert!(start >= header::DATA);
        assert_eq!(b.u64_at(start + target_msg::SECTOR), Some(0));
        let text = &b.0[start + target_msg::MESSAGE..];
        let n = text.iter().position(|&c| c == 0).unwrap();
        assert_eq!(&text[..n], msg.as_bytes());
        // No output.
        assert_eq!(message_output(&b).unwrap(), "");
        // Output: at the result buffer (data_start reset to just past the header), data_size
        // cut to it, DM_DATA_OUT_FLAG.
        let out = "0+3 9+1 next 12";
        b.put_u32(header::DATA_START, align8(HEADER_SIZE) as u32);
        put(&mut b.0, HEADER_SIZE, out.as_bytes());
        b.0[HEADER_SIZE + out.len()] = 0;
        b.put_u32(header::DATA_SIZE, (HEADER_SIZE + out.len() + 1) as u32);
        b.put_u32(header::FLAGS, DATA_OUT_FLAG);
        assert_eq!(message_output(&b).unwrap(), out);
        // The smallest buffer message() asks for holds the message.
        let need = HEADER_SIZE + target_msg::MESSAGE + msg.len() + 1;
        let b = message_buffer(need, "vol", 0, msg);
        assert_eq!(*b.0.last().unwrap(), 0);
    }

    const C_PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/dm-ioctl.h>
#define P(k, v) printf("%s %llu\n", k, (unsigned long long)(v))
#define O(t, f) P(#f, offsetof(struct t, f))
int main(void)
{
	P("sizeof_dm_ioctl", sizeof(struct dm_ioctl));
	O(dm_ioctl, version); O(dm_ioctl, data_size); O(dm_ioctl, data_start);
	O(dm_ioctl, target_count); O(dm_ioctl, open_count); O(dm_ioctl, flags);
	O(dm_ioctl, event_nr); O(dm_ioctl, padding); O(dm_ioctl, dev); O(dm_ioctl, name);
	O(dm_ioctl, uuid); O(dm_ioctl, data);
	P("sizeof_dm_target_spec", sizeof(struct dm_target_spec));
	O(dm_target_spec, sector_start); O(dm_target_spec, length);
	O(dm_target_spec, status); O(dm_target_spec, next); O(dm_target_spec, target_type);
	P("nl_dev", offsetof(struct dm_name_list, dev));
	P("nl_next", offsetof(struct dm_name_list, next));
	P("nl_name", offsetof(struct dm_name_list, name));
	P("msg_sector", offsetof(struct dm_target_msg, sector));
	P("msg_message", offsetof(struct dm_target_msg, message));
	P("DM_NAME_LEN", DM_NAME_LEN); P("DM_UUID_LEN", DM_UUID_LEN);
	P("DM_MAX_TYPE_NAME", DM_MAX_TYPE_NAME);
	P("DM_VERSION_MAJOR", DM_VERSION_MAJOR); P("DM_IOCTL", DM_IOCTL);
	P("DM_VERSION", DM_VERSION); P("DM_LIST_DEVICES", DM_LIST_DEVICES);
	P("DM_DEV_CREATE", DM_DEV_CREATE); P("DM_DEV_REMOVE", DM_DEV_REMOVE);
	P("DM_DEV_SUSPEND", DM_DEV_SUSPEND); P("DM_DEV_STATUS", DM_DEV_STATUS);
	P("DM_TABLE_LOAD", DM_TABLE_LOAD); P("DM_TABLE_STATUS", DM_TABLE_STATUS);
	P("DM_TARGET_MSG", DM_TARGET_MSG);
	P("DM_READONLY_FLAG", DM_READONLY_FLAG); P("DM_SUSPEND_FLAG", DM_SUSPEND_FLAG);
	P("DM_STATUS_TABLE_FLAG", DM_STATUS_TABLE_FLAG);
	P("DM_ACTIVE_PRESENT_FLAG", DM_ACTIVE_PRESENT_FLAG);
	P("DM_BUFFER_FULL_FLAG", DM_BUFFER_FULL_FLAG);
	P("DM_DATA_OUT_FLAG", DM_DATA_OUT_FLAG);
	return 0;
}
"#;
}

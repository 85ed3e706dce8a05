//! libnbd through FFI, against the 1.14 API (Debian bookworm's `libnbd-dev`).
//!
//! The only module with `unsafe`. `Handle` is a safe wrapper: every buffer handed to an
//! asynchronous command is owned by the handle until libnbd retires that command, so no
//! caller can free or move memory libnbd still reads or writes.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};

use bytes::Bytes;

#[repr(C)]
struct RawHandle {
    _private: [u8; 0],
}

#[repr(C)]
struct CompletionCallback {
    callback: Option<extern "C" fn(*mut c_void, *mut c_int) -> c_int>,
    user_data: *mut c_void,
    free: Option<extern "C" fn(*mut c_void)>,
}

#[repr(C)]
struct ListCallback {
    callback: Option<extern "C" fn(*mut c_void, *const c_char, *const c_char) -> c_int>,
    user_data: *mut c_void,
    free: Option<extern "C" fn(*mut c_void)>,
}

#[repr(C)]
struct ContextCallback {
    callback: Option<extern "C" fn(*mut c_void, *const c_char) -> c_int>,
    user_data: *mut c_void,
    free: Option<extern "C" fn(*mut c_void)>,
}

#[repr(C)]
struct ExtentCallback {
    callback: Option<
        extern "C" fn(*mut c_void, *const c_char, u64, *mut u32, usize, *mut c_int) -> c_int,
    >,
    user_data: *mut c_void,
    free: Option<extern "C" fn(*mut c_void)>,
}

const NO_COMPLETION: CompletionCallback = CompletionCallback {
    callback: None,
    user_data: std::ptr::null_mut(),
    free: None,
};
const CMD_FLAG_FAST_ZERO: u32 = 0x10;
const SIZE_MINIMUM: c_int = 0;
const SIZE_MAXIMUM: c_int = 2;
const STRICT_ALIGN: u32 = 0x10;
const ALLOCATION: &CStr = c"base:allocation";
/// The prefix of QEMU's dirty bitmap contexts (`qemu:dirty-bitmap:NAME`).
pub const DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

#[link(name = "nbd")]
extern "C" {
    fn nbd_create() -> *mut RawHandle;
    fn nbd_close(h: *mut RawHandle);
    fn nbd_get_error() -> *const c_char;
    fn nbd_get_errno() -> c_int;
    fn nbd_set_opt_mode(h: *mut RawHandle, enable: bool) -> c_int;
    fn nbd_aio_is_negotiating(h: *mut RawHandle) -> c_int;
    fn nbd_aio_opt_list(h: *mut RawHandle, list: ListCallback, cb: CompletionCallback) -> c_int;
    fn nbd_opt_abort(h: *mut RawHandle) -> c_int;
    fn nbd_aio_opt_list_meta_context(
        h: *mut RawHandle,
        list: ContextCallback,
        cb: CompletionCallback,
    ) -> c_int;
    fn nbd_add_meta_context(h: *mut RawHandle, name: *const c_char) -> c_int;
    fn nbd_aio_connect_uri(h: *mut RawHandle, uri: *const c_char) -> c_int;
    fn nbd_aio_is_connecting(h: *mut RawHandle) -> c_int;
    fn nbd_aio_is_ready(h: *mut RawHandle) -> c_int;
    fn nbd_set_uri_allow_local_file(h: *mut RawHandle, allow: bool) -> c_int;
    fn nbd_get_strict_mode(h: *mut RawHandle) -> u32;
    fn nbd_set_strict_mode(h: *mut RawHandle, flags: u32) -> c_int;
    fn nbd_get_block_size(h: *mut RawHandle, size_type: c_int) -> i64;
    fn nbd_set_pread_initialize(h: *mut RawHandle, request: bool) -> c_int;
    fn nbd_is_read_only(h: *mut RawHandle) -> c_int;
    fn nbd_can_flush(h: *mut RawHandle) -> c_int;
    fn nbd_can_trim(h: *mut RawHandle) -> c_int;
    fn nbd_can_zero(h: *mut RawHandle) -> c_int;
    fn nbd_can_fast_zero(h: *mut RawHandle) -> c_int;
    fn nbd_can_meta_context(h: *mut RawHandle, name: *const c_char) -> c_int;
    fn nbd_get_size(h: *mut RawHandle) -> i64;
    fn nbd_aio_pread(
        h: *mut RawHandle,
        buf: *mut c_void,
        count: usize,
        offset: u64,
        cb: CompletionCallback,
        flags: u32,
    ) -> i64;
    fn nbd_aio_pwrite(
        h: *mut RawHandle,
        buf: *const c_void,
        count: usize,
        offset: u64,
        cb: CompletionCallback,
        flags: u32,
    ) -> i64;
    fn nbd_aio_zero(
        h: *mut RawHandle,
        count: u64,
        offset: u64,
        cb: CompletionCallback,
        flags: u32,
    ) -> i64;
    fn nbd_aio_trim(
        h: *mut RawHandle,
        count: u64,
        offset: u64,
        cb: CompletionCallback,
        flags: u32,
    ) -> i64;
    fn nbd_aio_flush(h: *mut RawHandle, cb: CompletionCallback, flags: u32) -> i64;
    fn nbd_aio_command_completed(h: *mut RawHandle, cookie: u64) -> c_int;
    fn nbd_aio_peek_command_completed(h: *mut RawHandle) -> i64;
    fn nbd_aio_in_flight(h: *mut RawHandle) -> c_int;
    fn nbd_poll(h: *mut RawHandle, timeout: c_int) -> c_int;
    fn nbd_aio_block_status(
        h: *mut RawHandle,
        count: u64,
        offset: u64,
        extent: ExtentCallback,
        cb: CompletionCallback,
        flags: u32,
    ) -> i64;
    fn nbd_shutdown(h: *mut RawHandle, flags: u32) -> c_int;
}

/// libnbd's message for the last failed call on this thread.
fn last_error() -> String {
    // SAFETY: nbd_get_error returns NULL or a NUL-terminated string in thread-local storage,
    // valid until the next libnbd call on this thread; we copy it out at once.
    unsafe {
        let p = nbd_get_error();
        if p.is_null() {
            "unknown libnbd error".to_string()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// A connection that failed: libnbd's message, and its errno (0 where it set none).
#[derive(Debug)]
pub struct ConnectError {
    pub message: String,
    pub errno: i32,
}

impl From<String> for ConnectError {
    fn from(message: String) -> ConnectError {
        ConnectError { message, errno: 0 }
    }
}

/// The last failed call's message and errno.
fn last_failure() -> ConnectError {
    // SAFETY: nbd_get_errno only reads thread-local state.
    let errno = unsafe { nbd_get_errno() };
    ConnectError {
        message: last_error(),
        errno,
    }
}

/// What the server offers, read once after connecting.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caps {
    pub read_only: bool,
    pub can_flush: bool,
    pub can_trim: bool,
    pub can_zero: bool,
    pub can_fast_zero: bool,
    pub has_allocation: bool,
    /// The dirty bitmap asked for at connect is offered (false when none was asked for).
    pub has_dirty: bool,
    /// The server's minimum block size and largest read or write; 0 where it named none.
    pub block_min: u64,
    pub block_max: u64,
}

/// An asynchronous command and the memory it needs until it is retired.
pub enum Command {
    /// Read `len` bytes after the `buf.len()` bytes already in `buf` (the frame header's
    /// room), into its spare capacity: the buffer is not zeroed first. `buf` comes back
    /// `len` bytes longer.
    Read {
        offset: u64,
        buf: Vec<u8>,
        len: usize,
    },
    Write {
        offset: u64,
        data: Bytes,
    },
    Zero {
        offset: u64,
        len: u64,
        fast: bool,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Allocation (`base:allocation`) from `offset`, as `(length, flags)` pairs, and the
    /// dirty bitmap's when one was asked for at connect; the server may describe less
    /// than `len`.
    BlockStatus {
        offset: u64,
        len: u64,
    },
}

/// A retired command: the buffer of a read, the extents of a block status, nothing
/// otherwise.
pub enum Completed {
    Read(Vec<u8>),
    Extents(Status),
    Other,
}

/// What a block status command reported, per context, as `(length, flags)` pairs.
#[derive(Default)]
pub struct Status {
    pub allocation: Vec<(u64, u32)>,
    /// The dirty bitmap's (empty when none was asked for).
    pub dirty: Vec<(u64, u32)>,
}

pub struct Handle {
    raw: *mut RawHandle,
    /// The dirty bitmap context asked for at connect.
    bitmap: Option<CString>,
    /// Buffers of in-flight commands, by cookie; libnbd may touch them until retired.
    held: HashMap<u64, Option<Held>>,
}

enum Held {
    /// A read's buffer and how many bytes it will have when the read completes.
    Read(Vec<u8>, usize),
    Write(#[allow(dead_code)] Bytes),
    /// Where a block status command's callback collects the extents (boxed: its address
    /// is given to libnbd and must not move, while `held` may move this value).
    Extents(Box<Status>),
}

/// The extent callback of a block status command: appends to the `Vec` in `user`.
extern "C" fn collect_extents(
    user: *mut c_void,
    context: *const c_char,
    _offset: u64,
    entries: *mut u32,
    n: usize,
    _error: *mut c_int,
) -> c_int {
    // SAFETY: libnbd passes our `user_data` (the boxed Status held under the command's
    // cookie until it is retired, and called only before that, on the thread that polls),
    // a NUL-terminated context name and `n` u32s. Only the contexts asked for at connect
    // come: allocation and at most one dirty bitmap.
    unsafe {
        let name = CStr::from_ptr(context);
        let status = &mut *user.cast::<Status>();
        let out = if name == ALLOCATION {
            &mut status.allocation
        } else if name.to_bytes().starts_with(DIRTY_BITMAP.as_bytes()) {
            &mut status.dirty
        } else {
            return 0;
        };
        let pairs = std::slice::from_raw_parts(entries, n);
        out.extend(pairs.chunks_exact(2).map(|p| (u64::from(p[0]), p[1])));
    }
    0
}

/// The list callback of `list_exports`: appends each export's name to the `Vec` in `user`.
extern "C" fn collect_export(user: *mut c_void, name: *const c_char, _: *const c_char) -> c_int {
    // SAFETY: libnbd passes our `user_data` (a Vec that outlives the command: `list_exports`
    // polls it to completion before returning) and a NUL-terminated name.
    unsafe {
        let out = &mut *user.cast::<Vec<String>>();
        out.push(CStr::from_ptr(name).to_string_lossy().into_owned());
    }
    0
}

/// The context callback of `list_dirty_bitmaps`: appends each context's name to the `Vec`
/// in `user`.
extern "C" fn collect_context(user: *mut c_void, name: *const c_char) -> c_int {
    // SAFETY: libnbd passes our `user_data` (a Vec that outlives the command: the caller
    // polls it to completion and closes the handle before reading it) and a NUL-terminated
    // name.
    unsafe {
        let out = &mut *user.cast::<Vec<String>>();
        out.push(CStr::from_ptr(name).to_string_lossy().into_owned());
    }
    0
}

/// The completion callback of `list_exports`: keeps the command's error (0: none).
extern "C" fn keep_error(user: *mut c_void, error: *mut c_int) -> c_int {
    // SAFETY: libnbd passes our `user_data` (an i32 that outlives the command) and a valid
    // pointer to the command's error.
    unsafe { *user.cast::<c_int>() = *error };
    1
}

/// The names of the exports the server at `uri` lists (`NBD_OPT_LIST`), asked on a new
/// connection that never selects an export; `None` when the server lists none, refuses,
/// or does not answer within `deadline`.
pub fn list_exports(
    uri: &str,
    allow_local_file: bool,
    deadline: std::time::Duration,
) -> Option<Vec<String>> {
    let started = std::time::Instant::now();
    let handle = Handle::start(uri, allow_local_file, true).ok()?;
    handle.dial(uri, started, Some(deadline)).ok()?;
    // SAFETY: live handle.
    if unsafe { nbd_aio_is_negotiating(handle.raw) } != 1 {
        return None;
    }
    let mut names: Box<Vec<String>> = Box::default();
    let mut error: Box<c_int> = Box::new(-1);
    let list = ListCallback {
        callback: Some(collect_export),
        user_data: (&mut *names as *mut Vec<String>).cast(),
        free: None,
    };
    let done = CompletionCallback {
        callback: Some(keep_error),
        user_data: (&mut *error as *mut c_int).cast(),
        free: None,
    };
    // SAFETY: live handle in negotiation. `names` and `error` are boxed (their addresses
    // do not move) and outlive every use libnbd makes of them: the handle is closed
    // (`drop(handle)`, which ends the command) before either is read or dropped.
    let listed = unsafe { nbd_aio_opt_list(handle.raw, list, done) } != -1
        && handle.settle(started, Some(deadline)).is_ok();
    drop(handle);
    (listed && *error == 0 && !names.is_empty()).then_some(*names)
}

/// The dirty bitmaps the export at `uri` offers (`NBD_OPT_LIST_META_CONTEXT` with the
/// query `qemu:dirty-bitmap:`), by name, asked on a new connection that never selects the
/// export; `None` when the server cannot say within `deadline`.
pub fn list_dirty_bitmaps(
    uri: &str,
    allow_local_file: bool,
    deadline: std::time::Duration,
) -> Option<Vec<String>> {
    let started = std::time::Instant::now();
    let handle = Handle::start(uri, allow_local_file, true).ok()?;
    let query = CString::new(DIRTY_BITMAP).ok()?;
    // SAFETY: live handle; the string outlives the call (libnbd copies it).
    if unsafe { nbd_add_meta_context(handle.raw, query.as_ptr()) } == -1 {
        return None;
    }
    handle.dial(uri, started, Some(deadline)).ok()?;
    // SAFETY: live handle.
    if unsafe { nbd_aio_is_negotiating(handle.raw) } != 1 {
        return None;
    }
    let mut names: Box<Vec<String>> = Box::default();
    let mut error: Box<c_int> = Box::new(-1);
    let list = ContextCallback {
        callback: Some(collect_context),
        user_data: (&mut *names as *mut Vec<String>).cast(),
        free: None,
    };
    let done = CompletionCallback {
        callback: Some(keep_error),
        user_data: (&mut *error as *mut c_int).cast(),
        free: None,
    };
    // SAFETY: live handle in negotiation. `names` and `error` are boxed (their addresses do
    // not move) and outlive every use libnbd makes of them: the handle is closed
    // (`drop(handle)`) before either is read or dropped.
    let listed = unsafe { nbd_aio_opt_list_meta_context(handle.raw, list, done) } != -1
        && handle.settle(started, Some(deadline)).is_ok();
    // SAFETY: live handle.
    let negotiating = listed && unsafe { nbd_aio_is_negotiating(handle.raw) } == 1;
    if negotiating {
        // SAFETY: live handle in negotiation; ends it politely (the server logs no error).
        unsafe { nbd_opt_abort(handle.raw) };
    }
    drop(handle);
    (listed && *error == 0).then(|| {
        names
            .iter()
            .filter_map(|n| n.strip_prefix(DIRTY_BITMAP))
            .map(str::to_string)
            .collect()
    })
}

// SAFETY: a libnbd handle may be used from any thread (libnbd locks it internally); the
// buffers it holds are owned, heap-allocated and Send. We use each handle from one thread.
unsafe impl Send for Handle {}

impl Handle {
    /// Connect to an NBD URI exactly as libnbd parses it, asking for `base:allocation`.
    /// `allow_local_file` lets the URI name local files (`tls-psk-file`): only for URIs
    /// the local user gave, never for one that came in a message.
    ///
    /// libnbd's client-side alignment check is turned off: the caller aligns its requests
    /// to `Caps::block_min` itself, and must be able to try the final partial block of an
    /// export whose size is not a multiple of it (a server may accept it).
    ///
    /// A server that has not finished the handshake after `deadline` is given up on.
    pub fn connect(
        uri: &str,
        allow_local_file: bool,
        deadline: Option<std::time::Duration>,
        bitmap: Option<&str>,
    ) -> Result<Handle, ConnectError> {
        let started = std::time::Instant::now();
        let mut handle = Handle::start(uri, allow_local_file, false)?;
        if let Some(name) = bitmap {
            let context = CString::new(format!("{DIRTY_BITMAP}{name}"))
                .map_err(|_| "bitmap name contains a NUL byte".to_string())?;
            handle.bitmap = Some(context);
        }
        // SAFETY: `raw` is a live handle owned by `handle`; the strings outlive the calls
        // (libnbd copies them).
        unsafe {
            if nbd_add_meta_context(handle.raw, ALLOCATION.as_ptr()) == -1 {
                return Err(last_failure());
            }
            if let Some(context) = &handle.bitmap {
                if nbd_add_meta_context(handle.raw, context.as_ptr()) == -1 {
                    return Err(last_failure());
                }
            }
            // libnbd zeroes every read buffer before reading into it (a guard for callers
            // that might look at a failed read's buffer). `retire` exposes a read's bytes
            // only when it succeeded, so that memset is pure cost: 9% of the sender's CPU.
            if nbd_set_pread_initialize(handle.raw, false) == -1 {
                return Err(last_failure());
            }
            let strict = nbd_get_strict_mode(handle.raw) & !STRICT_ALIGN;
            if nbd_set_strict_mode(handle.raw, strict) == -1 {
                return Err(last_failure());
            }
        }
        handle.dial(uri, started, deadline)?;
        // SAFETY: live handle.
        if unsafe { nbd_aio_is_ready(handle.raw) } != 1 {
            return Err(last_failure());
        }
        Ok(handle)
    }

    /// A new handle for `uri`, not yet connected; `opt_mode` stops it in negotiation.
    fn start(uri: &str, allow_local_file: bool, opt_mode: bool) -> Result<Handle, ConnectError> {
        // The URI is checked before libnbd allocates anything.
        CString::new(uri).map_err(|_| "URI contains a NUL byte".to_string())?;
        // SAFETY: nbd_create has no preconditions; NULL means failure and is checked.
        let raw = unsafe { nbd_create() };
        if raw.is_null() {
            return Err(last_failure());
        }
        let handle = Handle {
            raw,
            bitmap: None,
            held: HashMap::new(),
        };
        // SAFETY: `raw` is a live handle owned by `handle`.
        unsafe {
            if nbd_set_uri_allow_local_file(handle.raw, allow_local_file) == -1 {
                return Err(last_failure());
            }
            if opt_mode && nbd_set_opt_mode(handle.raw, true) == -1 {
                return Err(last_failure());
            }
        }
        Ok(handle)
    }

    /// Connect to `uri` and run the handshake as far as it goes by itself (to ready, or to
    /// negotiation in opt mode), giving up after `deadline` from `started`.
    fn dial(
        &self,
        uri: &str,
        started: std::time::Instant,
        deadline: Option<std::time::Duration>,
    ) -> Result<(), ConnectError> {
        let c_uri = CString::new(uri).map_err(|_| "URI contains a NUL byte".to_string())?;
        // SAFETY: live handle; the string outlives the call.
        if unsafe { nbd_aio_connect_uri(self.raw, c_uri.as_ptr()) } == -1 {
            return Err(last_failure());
        }
        self.settle(started, deadline)
    }

    /// Poll until the handle leaves the connecting states (handshake or option in flight).
    fn settle(
        &self,
        started: std::time::Instant,
        deadline: Option<std::time::Duration>,
    ) -> Result<(), ConnectError> {
        // SAFETY: live handle.
        while unsafe { nbd_aio_is_connecting(self.raw) } == 1 {
            if deadline.is_some_and(|d| started.elapsed() >= d) {
                return Err(format!(
                    "the server did not finish the NBD handshake in {} s",
                    started.elapsed().as_secs()
                )
                .into());
            }
            // SAFETY: live handle.
            if unsafe { nbd_poll(self.raw, 500) } == -1 {
                return Err(last_failure());
            }
        }
        Ok(())
    }

    pub fn size(&self) -> Result<u64, String> {
        // SAFETY: live handle, connected.
        let n = unsafe { nbd_get_size(self.raw) };
        u64::try_from(n).map_err(|_| last_error())
    }

    pub fn caps(&self) -> Caps {
        let flag = |v: c_int| v == 1;
        let block = |kind: c_int| {
            // SAFETY: live connected handle; returns a value saved from the handshake.
            u64::try_from(unsafe { nbd_get_block_size(self.raw, kind) }).unwrap_or(0)
        };
        // SAFETY: live connected handle; these calls only read negotiated flags.
        unsafe {
            Caps {
                read_only: flag(nbd_is_read_only(self.raw)),
                can_flush: flag(nbd_can_flush(self.raw)),
                can_trim: flag(nbd_can_trim(self.raw)),
                can_zero: flag(nbd_can_zero(self.raw)),
                can_fast_zero: flag(nbd_can_fast_zero(self.raw)),
                has_allocation: flag(nbd_can_meta_context(self.raw, ALLOCATION.as_ptr())),
                has_dirty: self
                    .bitmap
                    .as_ref()
                    .is_some_and(|c| flag(nbd_can_meta_context(self.raw, c.as_ptr()))),
                block_min: block(SIZE_MINIMUM),
                block_max: block(SIZE_MAXIMUM),
            }
        }
    }

    /// Start a command; returns its cookie. On failure the command never started.
    pub fn submit(&mut self, cmd: Command) -> Result<u64, String> {
        // SAFETY: live handle. Read and write buffers are moved into `self.held` under the
        // returned cookie before this function returns and stay there until `retire`, so the
        // pointers given to libnbd stay valid for as long as libnbd may use them.
        let (cookie, held) = unsafe {
            match cmd {
                Command::Read {
                    offset,
                    mut buf,
                    len,
                } => {
                    buf.reserve(len);
                    // Spare capacity: uninitialised until libnbd fills it; `retire` extends
                    // the buffer over it only when the read succeeded.
                    let ptr = buf.spare_capacity_mut().as_mut_ptr().cast::<c_void>();
                    (
                        nbd_aio_pread(self.raw, ptr, len, offset, NO_COMPLETION, 0),
                        Some(Held::Read(buf, len)),
                    )
                }
                Command::Write { offset, data } => {
                    let ptr = data.as_ptr().cast::<c_void>();
                    (
                        nbd_aio_pwrite(self.raw, ptr, data.len(), offset, NO_COMPLETION, 0),
                        Some(Held::Write(data)),
                    )
                }
                Command::Zero { offset, len, fast } => {
                    let flags = if fast { CMD_FLAG_FAST_ZERO } else { 0 };
                    (
                        nbd_aio_zero(self.raw, len, offset, NO_COMPLETION, flags),
                        None,
                    )
                }
                Command::Trim { offset, len } => {
                    (nbd_aio_trim(self.raw, len, offset, NO_COMPLETION, 0), None)
                }
                Command::Flush => (nbd_aio_flush(self.raw, NO_COMPLETION, 0), None),
                Command::BlockStatus { offset, len } => {
                    let mut out: Box<Status> = Box::default();
                    let extent = ExtentCallback {
                        callback: Some(collect_extents),
                        user_data: (&mut *out as *mut Status).cast(),
                        free: None,
                    };
                    // NBD lengths in block status requests are 32-bit: the largest multiple
                    // of any minimum block size (at most 64 KiB) that fits.
                    let len = len.min(u64::from(u32::MAX) & !0xffff_u64);
                    (
                        nbd_aio_block_status(self.raw, len, offset, extent, NO_COMPLETION, 0),
                        Some(Held::Extents(out)),
                    )
                }
            }
        };
        let cookie = u64::try_from(cookie).map_err(|_| last_error())?;
        self.held.insert(cookie, held);
        Ok(cookie)
    }

    pub fn in_flight(&self) -> usize {
        // SAFETY: live handle.
        let n = unsafe { nbd_aio_in_flight(self.raw) };
        usize::try_from(n).unwrap_or(0)
    }

    /// Wait up to `timeout_ms` for the socket and advance the state machine.
    pub fn poll(&mut self, timeout_ms: i32) -> Result<(), String> {
        // SAFETY: live handle.
        if unsafe { nbd_poll(self.raw, timeout_ms) } == -1 {
            return Err(last_error());
        }
        Ok(())
    }

    /// Retire one completed command, if any: its cookie and its outcome.
    pub fn retire(&mut self) -> Option<(u64, Result<Completed, String>)> {
        // SAFETY: live handle; peek does not retire, so the cookie stays valid for the call below.
        let cookie = u64::try_from(unsafe { nbd_aio_peek_command_completed(self.raw) }).ok()?;
        if cookie == 0 {
            return None;
        }
        // SAFETY: `cookie` names a completed command of this handle; retiring it ends
        // libnbd's use of its buffer, which we release only after this call.
        let rc = unsafe { nbd_aio_command_completed(self.raw, cookie) };
        let result = if rc == -1 { Err(last_error()) } else { Ok(()) };
        let held = self.held.remove(&cookie).flatten();
        Some((
            cookie,
            result.map(|()| match held {
                Some(Held::Read(mut buf, len)) => {
                    // SAFETY: the read succeeded, so libnbd wrote all `len` bytes of the
                    // spare capacity reserved for it in `submit`.
                    unsafe { buf.set_len(buf.len() + len) };
                    Completed::Read(buf)
                }
                Some(Held::Extents(out)) => Completed::Extents(*out),
                _ => Completed::Other,
            }),
        ))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: `raw` is live and dropped exactly once; nbd_close abandons in-flight
        // commands, after which the buffers in `held` (dropped after this body) are unused.
        unsafe {
            if self.in_flight() == 0 {
                nbd_shutdown(self.raw, 0);
            }
            nbd_close(self.raw);
        }
    }
}

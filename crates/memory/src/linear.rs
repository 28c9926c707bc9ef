//! Copies to and from guest-linear memory, translating once per page.

use core::fmt;

use crate::{
    translate, Access, DirectMap, GuestLinearAddr, GuestPhysMemory, PagingMode, PagingRegs,
    TranslateError, Translation,
};

/// Calls `$f` with the memory object the copy should use: `$mem`'s
/// [`DirectMap`](crate::DirectMap) when it has one (every entry and page
/// then checked and read inline), `$mem` itself otherwise. One virtual
/// call per copy, not one per entry, when `$mem` is a `dyn`.
macro_rules! with_direct {
    ($mem:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $mem.direct_map() {
            Some(direct) => $f(&direct, $($arg),*),
            None => $f($mem, $($arg),*),
        }
    };
}

/// How the linear address space of `mode` wraps: 32 bits outside long
/// mode (a range crossing 0xFFFF_FFFF continues at 0), 64 bits in long mode
/// (the canonical hole is caught by `translate`).
fn linear_mask(mode: PagingMode) -> u64 {
    if mode.is_long() {
        u64::MAX
    } else {
        0xFFFF_FFFF
    }
}

/// Bytes from `la` to the end of the page `t` maps it with, capped at
/// `remaining`; at least 1 when `remaining > 0`.
fn chunk_len(la: u64, t: &Translation, remaining: usize) -> usize {
    // page_size is a power of two >= 4 KiB, so the subtraction cannot wrap
    // and the result is at least 1.
    let in_page = t.page_size - (la & (t.page_size - 1));
    usize::try_from(in_page).map_or(remaining, |n| n.min(remaining))
}

fn phys_error(e: crate::PhysAccessError) -> TranslateError {
    TranslateError::PhysUnreadable { gpa: e.gpa }
}

/// Copy `buf.len()` bytes from guest-linear memory, translating once per
/// page (not per byte).
///
/// Errors name the first byte that failed: the page's first byte in the
/// range for translation errors, the first unbacked byte for
/// [`TranslateError::PhysUnreadable`]. On error `buf` holds unspecified
/// data.
pub fn read_linear<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    buf: &mut [u8],
    access: Access,
) -> Result<(), TranslateError> {
    with_direct!(mem, read_linear_in(regs, la, buf, access))
}

fn read_linear_in<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    buf: &mut [u8],
    access: Access,
) -> Result<(), TranslateError> {
    let mask = linear_mask(regs.mode());
    let mut cur = la.0 & mask;
    let mut rest = buf;
    // Each round consumes at least one byte, so this ends.
    while !rest.is_empty() {
        let t = translate(mem, regs, GuestLinearAddr(cur), access)?;
        let n = chunk_len(cur, &t, rest.len());
        let (head, tail) = rest.split_at_mut(n);
        mem.read_phys(t.gpa, head).map_err(phys_error)?;
        rest = tail;
        cur = cur.wrapping_add(n as u64) & mask;
    }
    Ok(())
}

/// Copy `data` into guest-linear memory, translating once per page.
///
/// `access.write` is forced on, so the guest's write protection always
/// applies. Every page is translated before anything is written, so a
/// page fault or non-canonical address leaves guest memory untouched (the
/// guest can page the range in and retry). Only a
/// [`TranslateError::PhysUnreadable`] can leave a prefix written.
pub fn write_linear<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    data: &[u8],
    access: Access,
) -> Result<(), TranslateError> {
    with_direct!(mem, write_linear_in(regs, la, data, access))
}

fn write_linear_in<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    data: &[u8],
    access: Access,
) -> Result<(), TranslateError> {
    let access = access.as_write();
    let mask = linear_mask(regs.mode());
    let start = la.0 & mask;

    // Pass 1: every page must translate.
    let mut cur = start;
    let mut remaining = data.len();
    while remaining > 0 {
        let t = translate(mem, regs, GuestLinearAddr(cur), access)?;
        let n = chunk_len(cur, &t, remaining);
        remaining -= n;
        cur = cur.wrapping_add(n as u64) & mask;
    }

    // Pass 2: translate again (the tables may be among the bytes written)
    // and copy.
    let mut cur = start;
    let mut rest = data;
    while !rest.is_empty() {
        let t = translate(mem, regs, GuestLinearAddr(cur), access)?;
        let n = chunk_len(cur, &t, rest.len());
        let (head, tail) = rest.split_at(n);
        mem.write_phys(t.gpa, head).map_err(phys_error)?;
        rest = tail;
        cur = cur.wrapping_add(n as u64) & mask;
    }
    Ok(())
}

/// Copies `N` bytes of guest-linear memory into VMM memory, once.
///
/// This is how to fetch a guest structure (a request header, a length and
/// a pointer): no double fetch, decide only on the copy. Parse the array
/// returned here and never read the same guest bytes again for the same
/// decision, or a second vCPU could change them between the check and the
/// use. Same errors as [`read_linear`]; the range may cross pages.
pub fn read_linear_array<const N: usize, M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
) -> Result<[u8; N], TranslateError> {
    let mut buf = [0u8; N];
    read_linear(mem, regs, la, &mut buf, access)?;
    Ok(buf)
}

/// Typed little-endian reads and writes of guest-linear memory, built on
/// [`read_linear_array`] and [`write_linear`]: same errors, may cross a
/// page (and wrap like them).
macro_rules! typed_linear {
    ($($ty:ident $read:ident $write:ident;)*) => {$(
        #[doc = concat!("Reads a little-endian `", stringify!($ty), "` from guest-linear `la`")]
        #[doc = "(see [`read_linear`] for the errors)."]
        pub fn $read<M: GuestPhysMemory + ?Sized>(
            mem: &M,
            regs: &PagingRegs,
            la: GuestLinearAddr,
            access: Access,
        ) -> Result<$ty, TranslateError> {
            read_linear_array(mem, regs, la, access).map($ty::from_le_bytes)
        }

        #[doc = concat!("Writes `value` as a little-endian `", stringify!($ty), "` at guest-linear")]
        #[doc = "`la` (see [`write_linear`]: all pages are checked before any byte is"]
        #[doc = "written)."]
        pub fn $write<M: GuestPhysMemory + ?Sized>(
            mem: &M,
            regs: &PagingRegs,
            la: GuestLinearAddr,
            value: $ty,
            access: Access,
        ) -> Result<(), TranslateError> {
            write_linear(mem, regs, la, &value.to_le_bytes(), access)
        }
    )*};
}

typed_linear! {
    u8 read_linear_u8 write_linear_u8;
    u16 read_linear_u16 write_linear_u16;
    u32 read_linear_u32 write_linear_u32;
    u64 read_linear_u64 write_linear_u64;
}

/// Why [`read_cstr`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CStrError {
    /// A byte before the terminating NUL could not be read.
    Unreadable(TranslateError),
    /// No NUL within the buffer's length.
    TooLong,
}

impl fmt::Display for CStrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable(e) => write!(f, "string unreadable: {e}"),
            Self::TooLong => f.write_str("string too long (no NUL within the limit)"),
        }
    }
}

impl core::error::Error for CStrError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Unreadable(e) => Some(e),
            Self::TooLong => None,
        }
    }
}

/// Read a NUL-terminated name of at most `buf.len()` bytes including the
/// NUL (VMM-call function 0 reads at most 256). Returns the length without
/// the NUL; `buf[..len]` holds the name and `buf[len]` the NUL.
///
/// Reads page by page and stops at the first NUL, so bytes after the NUL
/// may be unmapped. The access is a supervisor read ([`Access::READ`]);
/// see [`read_cstr_with_access`] to read with the caller's privilege.
pub fn read_cstr<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    buf: &mut [u8],
) -> Result<usize, CStrError> {
    read_cstr_with_access(mem, regs, la, buf, Access::READ)
}

/// Find the NUL-terminated name at `la`, at most `N` bytes including the
/// NUL, and hand it (without the NUL) to `f`: the VMM-call lookup's path.
/// A name that ends in the page it starts in, the usual case, costs one
/// translation and one scan that stops at the NUL: a short one is copied
/// into a small buffer (no `N`-byte buffer to clear), a longer one goes on
/// into an `N`-byte buffer; one that crosses pages is gathered by
/// [`read_cstr_with_access`].
#[inline]
pub fn with_cstr<const N: usize, M: GuestPhysMemory + ?Sized, R>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, CStrError> {
    match mem.direct_map() {
        Some(direct) => with_cstr_direct::<N, _>(&direct, regs, la, access, f),
        None => with_cstr_in::<N, _, _>(mem, regs, la, access, f),
    }
}

/// [`with_cstr`] through a [`DirectMap`]: a short name in the clear range
/// is scanned by whole aligned words straight into a small buffer
/// ([`DirectMap::clear_cstr`]); anything else goes on like
/// [`with_cstr_in`] from the translation made.
#[inline(always)]
fn with_cstr_direct<const N: usize, R>(
    direct: &DirectMap<'_>,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, CStrError> {
    let la = GuestLinearAddr(la.0 & linear_mask(regs.mode()));
    let t = translate(direct, regs, la, access).map_err(CStrError::Unreadable)?;
    // The name's bytes in this page, at most N.
    let n = chunk_len(la.0, &t, N);
    // Room for the words around SHORT_NAME bytes at any alignment; only
    // the words read are written (no zeroing on the exit path).
    let mut buf = [core::mem::MaybeUninit::<u64>::uninit(); SHORT_NAME / 8 + 1];
    if let Some(name) = direct.clear_cstr(t.gpa.0, n.min(SHORT_NAME), &mut buf) {
        return Ok(f(name));
    }
    cstr_rest_of_page::<N, _, _>(direct, regs, la, access, t.gpa, n, f)
}

fn with_cstr_in<const N: usize, M: GuestPhysMemory + ?Sized, R>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, CStrError> {
    let la = GuestLinearAddr(la.0 & linear_mask(regs.mode()));
    let t = translate(mem, regs, la, access).map_err(CStrError::Unreadable)?;
    // The name's bytes in this page, at most N.
    let n = chunk_len(la.0, &t, N);
    let first = n.min(SHORT_NAME);
    let mut short = [0u8; SHORT_NAME];
    if let (Ok(w), Some(head)) = (mem.map(t.gpa, first), short.get_mut(..first)) {
        if let Some(pos) = w.read_until_nul(head) {
            return Ok(f(head.get(..pos).unwrap_or(&[])));
        }
    }
    cstr_rest_of_page::<N, _, _>(mem, regs, la, access, t.gpa, n, f)
}

/// Names shorter than this take [`with_cstr`]'s shortest path (the
/// standard names are at most 11 bytes).
const SHORT_NAME: usize = 32;

/// [`with_cstr`] for a name not ended in its first [`SHORT_NAME`] bytes:
/// the rest of the page (`n` bytes at `gpa` in all, translated already),
/// then the general path for one that crosses pages, is too long, or
/// unreadable (which also finds the right error).
#[cold]
#[inline(never)]
fn cstr_rest_of_page<const N: usize, M: GuestPhysMemory + ?Sized, R>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
    gpa: crate::GuestPhysAddr,
    n: usize,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, CStrError> {
    let mut buf = [0u8; N];
    if let Some(page) = buf.get_mut(..n) {
        if let Ok(Some(pos)) = mem.read_until_nul_phys(gpa, page) {
            return Ok(f(buf.get(..pos).unwrap_or(&[])));
        }
    }
    let len = read_cstr_with_access_in(mem, regs, la, &mut buf, access)?;
    Ok(f(buf.get(..len).unwrap_or(&[])))
}

/// [`read_cstr`] with an explicit access (e.g. [`Access::USER_READ`] when
/// the caller runs at CPL 3, so it cannot name kernel memory).
pub fn read_cstr_with_access<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    buf: &mut [u8],
    access: Access,
) -> Result<usize, CStrError> {
    with_direct!(mem, read_cstr_with_access_in(regs, la, buf, access))
}

fn read_cstr_with_access_in<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    buf: &mut [u8],
    access: Access,
) -> Result<usize, CStrError> {
    let mask = linear_mask(regs.mode());
    let mut cur = la.0 & mask;
    let mut done = 0usize;
    let mut rest = buf;
    while !rest.is_empty() {
        let t =
            translate(mem, regs, GuestLinearAddr(cur), access).map_err(CStrError::Unreadable)?;
        let n = chunk_len(cur, &t, rest.len());
        let (head, tail) = rest.split_at_mut(n);
        // Copy only up to the NUL: most names are a few bytes long, the
        // buffer is the 256-byte maximum. If the page runs out of RAM
        // part-way, the bytes before the first unbacked one may still
        // hold the NUL (read_until_nul_phys looks there).
        match mem.read_until_nul_phys(t.gpa, head) {
            Ok(Some(pos)) => return Ok(done + pos),
            Ok(None) => {}
            Err(e) => return Err(CStrError::Unreadable(phys_error(e))),
        }
        done += n;
        rest = tail;
        cur = cur.wrapping_add(n as u64) & mask;
    }
    Err(CStrError::TooLong)
}

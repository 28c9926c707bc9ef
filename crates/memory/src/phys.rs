//! Guest-physical memory as the VMM sees it, and its two layouts.

use core::fmt;
use core::marker::PhantomData;
use core::ops::Range;

use crate::{GuestPhysAddr, PhysWindow};

/// A guest-physical access touched a byte that is not backed by guest RAM
/// (or that the VMM must not reach on the guest's behalf).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PhysAccessError {
    /// The first byte of the access that is not backed by guest RAM.
    pub gpa: GuestPhysAddr,
}

impl fmt::Display for PhysAccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest-physical {} is not backed by guest RAM", self.gpa)
    }
}

impl core::error::Error for PhysAccessError {}

/// Guest-physical memory as the VMM sees it: one object per VM, shared by
/// all its vCPUs (`&self` everywhere, and `Sync`).
///
/// Implementors decide which guest-physical ranges are RAM; nothing assumes
/// RAM starts at 0 or is contiguous. An access is all-or-nothing from the
/// caller's view: on error the contents of `buf` are unspecified, and the
/// error names the first byte that is not backed (callers rely on that to
/// use the readable prefix, see [`read_until_nul_phys`]).
///
/// Guest memory changes under the VMM's feet (other vCPUs, the guest's
/// processors, DMA), so it is never borrowed as a Rust slice: the only
/// required method, [`map`](Self::map), checks a range and hands out a
/// [`PhysWindow`], which copies in and out with atomic accesses; every
/// other method is built on it. Decide only on values copied out once:
/// reading the same guest bytes twice may give two answers.
///
/// [`read_until_nul_phys`]: Self::read_until_nul_phys
pub trait GuestPhysMemory: Sync {
    /// Checks guest-physical `gpa..gpa+len` and returns a window over it.
    /// Fails, naming the first offending byte, unless every byte is guest
    /// RAM the VMM may reach. `len == 0` touches nothing and always
    /// succeeds.
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<PhysWindow<'_>, PhysAccessError>;

    /// Fills `buf` from guest-physical memory starting at `gpa`.
    #[inline]
    fn read_phys(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), PhysAccessError> {
        // An implementor returning a short window must not be able to
        // make the copy go out of bounds: `read` refuses it.
        if self.map(gpa, buf.len())?.read(buf) {
            Ok(())
        } else {
            Err(PhysAccessError { gpa })
        }
    }

    /// Writes `data` to guest-physical memory starting at `gpa`. Nothing
    /// is written when any byte is unreachable.
    #[inline]
    fn write_phys(&self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), PhysAccessError> {
        if self.map(gpa, data.len())?.write(data) {
            Ok(())
        } else {
            Err(PhysAccessError { gpa })
        }
    }

    /// Copies bytes starting at `gpa` into `buf` up to the first NUL:
    /// `Ok(Some(n))` when `buf[n]` is the NUL (`buf[..n]` the bytes before
    /// it; a few bytes after it may be overwritten), `Ok(None)` when `buf`
    /// filled up without one. When the range runs into an unreachable byte
    /// the bytes before it still count: `Err` only when no NUL comes
    /// first, naming that byte.
    fn read_until_nul_phys(
        &self,
        gpa: GuestPhysAddr,
        buf: &mut [u8],
    ) -> Result<Option<usize>, PhysAccessError> {
        let e = match self.map(gpa, buf.len()) {
            Ok(w) if w.len() == buf.len() => return Ok(w.read_until_nul(buf)),
            Ok(_) => return Err(PhysAccessError { gpa }),
            Err(e) => e,
        };
        // The readable prefix, when the error names a byte inside the
        // range (an implementor blaming a byte outside it gets no trust).
        let prefix = e
            .gpa
            .0
            .checked_sub(gpa.0)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0 && n < buf.len());
        let (Some(n), Some(head)) = (prefix, prefix.and_then(|n| buf.get_mut(..n))) else {
            return Err(e);
        };
        match self.map(gpa, n) {
            Ok(w) if w.len() == n => w.read_until_nul(head).map(Some).ok_or(e),
            _ => Err(e),
        }
    }

    /// Reads a little-endian `u32` (paging-structure entries, counters) in
    /// one atomic load when `gpa` is 4-byte aligned.
    #[inline]
    fn read_u32_phys(&self, gpa: GuestPhysAddr) -> Result<u32, PhysAccessError> {
        self.map(gpa, 4)?.load_u32().ok_or(PhysAccessError { gpa })
    }

    /// Reads a little-endian `u64` in one atomic load when `gpa` is 8-byte
    /// aligned (page walks read every entry through this).
    #[inline]
    fn read_u64_phys(&self, gpa: GuestPhysAddr) -> Result<u64, PhysAccessError> {
        self.map(gpa, 8)?.load_u64().ok_or(PhysAccessError { gpa })
    }

    /// Writes a little-endian `u32`, in one atomic store when aligned.
    #[inline]
    fn write_u32_phys(&self, gpa: GuestPhysAddr, value: u32) -> Result<(), PhysAccessError> {
        if self.map(gpa, 4)?.store_u32(value) {
            Ok(())
        } else {
            Err(PhysAccessError { gpa })
        }
    }

    /// Writes a little-endian `u64`, in one atomic store when aligned.
    #[inline]
    fn write_u64_phys(&self, gpa: GuestPhysAddr, value: u64) -> Result<(), PhysAccessError> {
        if self.map(gpa, 8)?.store_u64(value) {
            Ok(())
        } else {
            Err(PhysAccessError { gpa })
        }
    }

    /// Atomically replaces the little-endian `u64` at `gpa` with `new` if
    /// it holds `current` (setting accessed/dirty bits in a guest
    /// page-table entry that the guest's processors update too):
    /// `Ok(Ok(previous))` when it did, `Ok(Err(actual))` when the value
    /// was different. Fails like any access, and also (naming `gpa`) when
    /// `gpa` is not 8-byte aligned: a locked operation must not straddle
    /// words, and entries never do.
    fn compare_exchange_u64_phys(
        &self,
        gpa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, PhysAccessError> {
        self.map(gpa, 8)?
            .compare_exchange_u64(current, new)
            .ok_or(PhysAccessError { gpa })
    }

    /// Atomically adds `value` (wrapping) to the little-endian `u32` at
    /// `gpa` and returns the previous value (a counter shared with the
    /// guest, such as `log_set_buf`'s). Writes made before it are visible
    /// to whoever reads the new value. Fails like
    /// [`compare_exchange_u64_phys`](Self::compare_exchange_u64_phys)
    /// when `gpa` is not 4-byte aligned.
    fn fetch_add_u32_phys(&self, gpa: GuestPhysAddr, value: u32) -> Result<u32, PhysAccessError> {
        self.map(gpa, 4)?
            .fetch_add_u32(value)
            .ok_or(PhysAccessError { gpa })
    }
}

/// The first byte of `gpa..gpa+len` that lies outside every range of
/// `ram` or inside one of `hidden`; `None` when the VMM may reach every
/// byte. The one range check of both layouts.
///
/// Ranges may come in any order and overlap; empty or reversed ranges
/// contain nothing. The work is bounded by the number of ranges, whatever
/// the access.
#[inline(always)]
pub(crate) fn first_unreachable(
    gpa: u64,
    len: usize,
    ram: &[Range<u64>],
    hidden: &[Range<u64>],
) -> Option<u64> {
    if len == 0 {
        // Touches no byte, so nothing can be unreachable.
        return None;
    }
    // The last byte; None when the access runs past 2^64 - 1.
    let last = u64::try_from(len - 1).ok().and_then(|n| gpa.checked_add(n));
    let mut bad = match last {
        // One RAM range holds the whole access: every page walk and page
        // copy, so this is the path to keep short.
        Some(last) if ram.iter().any(|r| r.start <= gpa && last < r.end) => None,
        _ => first_outside(gpa, len, ram),
    };
    // An access past 2^64 - 1 covers every byte from `gpa` on.
    let last = last.unwrap_or(u64::MAX);
    for h in hidden {
        if h.start < h.end && h.start <= last && h.end > gpa {
            let first = h.start.max(gpa);
            bad = Some(bad.map_or(first, |b| b.min(first)));
        }
    }
    bad
}

/// The first byte of `gpa..gpa+len` (`len > 0`) inside no range of `ram`.
#[cold]
fn first_outside(gpa: u64, len: usize, ram: &[Range<u64>]) -> Option<u64> {
    // One past the last byte; may be 2^64 or beyond, hence u128.
    let end = u128::from(gpa) + len as u128;
    // Walk from range to range: each round moves `cur` past the end of a
    // RAM range containing it, which can then never contain it again, so
    // there are at most `ram.len() + 1` rounds.
    let mut cur = gpa;
    loop {
        if u128::from(cur) >= end {
            return None;
        }
        match ram.iter().find(|r| r.start <= cur && cur < r.end) {
            Some(r) => cur = r.end,
            None => return Some(cur),
        }
    }
}

/// The window for `gpa..gpa+len` at host `base + gpa`, after the shared
/// range check: the mapping both layouts use.
///
/// # Safety
/// `base + pa` must be valid for atomic access, for the window's lifetime,
/// for every `pa` inside `ram` and outside `hidden` (the contract of both
/// layouts' constructors).
#[inline(always)]
unsafe fn window<'m>(
    base: *mut u8,
    ram: &[Range<u64>],
    hidden: &[Range<u64>],
    gpa: GuestPhysAddr,
    len: usize,
) -> Result<PhysWindow<'m>, PhysAccessError> {
    if let Some(bad) = first_unreachable(gpa.0, len, ram, hidden) {
        return Err(PhysAccessError {
            gpa: GuestPhysAddr(bad),
        });
    }
    let offset = usize::try_from(gpa.0).map_err(|_| PhysAccessError { gpa })?;
    // SAFETY: every byte of the range is inside `ram` and outside
    // `hidden` (checked above), which the caller guarantees is valid at
    // base + pa. wrapping_add: the block need not be one Rust allocation
    // (the direct map is not), and nothing is dereferenced here.
    Ok(unsafe { PhysWindow::new(base.wrapping_add(offset), len) })
}

/// The isolated layout: guest RAM is one block of host memory mapped at
/// guest-physical 0 (guest-physical `x` is host `base + x`), optionally
/// with holes the VMM refuses to touch on the guest's behalf.
pub struct IsolatedMemory<'a> {
    base: *mut u8,
    /// `0..len`.
    ram: Range<u64>,
    holes: &'a [Range<u64>],
    _block: PhantomData<&'a mut [u8]>,
}

// SAFETY: the block is only ever reached through `PhysWindow`, whose every
// access is atomic, so any number of threads may use the object at once;
// the hole list is a shared slice. Sending it hands over nothing that is
// tied to a thread.
unsafe impl Sync for IsolatedMemory<'_> {}
// SAFETY: see above.
unsafe impl Send for IsolatedMemory<'_> {}

impl<'a> IsolatedMemory<'a> {
    /// Uses the `len` bytes at `base` as guest-physical `0..len`; the
    /// guest-physical ranges in `holes` are unreachable: every access
    /// touching them fails as if they were not RAM. Empty or reversed
    /// ranges forbid nothing. Aligning `base` to 8 bytes makes aligned
    /// guest accesses single atomic ones (a 2 MiB-aligned block does).
    ///
    /// # Safety
    /// For `'a`, the block must stay mapped and writable, and be reached
    /// only through this object (and the guest and its devices): no Rust
    /// reference to any of it, and no non-atomic access by other code.
    pub unsafe fn from_raw(base: *mut u8, len: usize, holes: &'a [Range<u64>]) -> Self {
        Self {
            base,
            // usize is at most 64 bits on every target this crate
            // supports.
            ram: 0..u64::try_from(len).unwrap_or(u64::MAX),
            holes,
            _block: PhantomData,
        }
    }

    /// Uses `ram` as guest-physical `0..ram.len()`. Safe: the exclusive
    /// borrow hands the block to this object for `'a` (a
    /// `&'static mut [u8]` for good), so nothing else can reach it.
    pub fn new(ram: &'a mut [u8]) -> Self {
        Self::with_holes(ram, &[])
    }

    /// Like [`new`](Self::new), with `holes` unreachable (see
    /// [`from_raw`](Self::from_raw)).
    pub fn with_holes(ram: &'a mut [u8], holes: &'a [Range<u64>]) -> Self {
        // SAFETY: `ram` is exclusively borrowed for 'a and valid for reads
        // and writes of its length; the object never makes a reference
        // from it.
        unsafe { Self::from_raw(ram.as_mut_ptr(), ram.len(), holes) }
    }

    /// The forbidden guest-physical ranges.
    pub fn holes(&self) -> &[Range<u64>] {
        self.holes
    }

    /// Size of guest RAM in bytes (holes included).
    pub fn len(&self) -> u64 {
        self.ram.end
    }

    /// True when the guest has no RAM at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl GuestPhysMemory for IsolatedMemory<'_> {
    #[inline]
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<PhysWindow<'_>, PhysAccessError> {
        // SAFETY: `from_raw`'s contract: base + x is valid for x in 0..len.
        unsafe {
            window(
                self.base,
                core::slice::from_ref(&self.ram),
                self.holes,
                gpa,
                len,
            )
        }
    }
}

/// The pass-through layout: guest-physical is host-physical, reached
/// through the hypervisor's direct map (`phys_to_virt(pa) = base + pa`),
/// and only inside usable RAM: any access touching a non-RAM address
/// (MMIO, firmware tables) or a hidden range (the hypervisor's own
/// memory) fails, naming the first such byte.
pub struct PassthroughMemory<'a> {
    base: *mut u8,
    ram: &'a [Range<u64>],
    hidden: &'a [Range<u64>],
}

// SAFETY: as for IsolatedMemory: atomic accesses only, shared lists.
unsafe impl Sync for PassthroughMemory<'_> {}
// SAFETY: see above.
unsafe impl Send for PassthroughMemory<'_> {}

impl<'a> PassthroughMemory<'a> {
    /// Guest memory at physical addresses `ram` (usable RAM from the
    /// firmware's map) minus `hidden` (the hypervisor's own memory),
    /// reached at `direct_map + pa`. Ranges may come in any order and
    /// overlap; empty or reversed ones contain nothing.
    ///
    /// # Safety
    /// For `'a` and every physical address `pa` inside `ram` and outside
    /// `hidden`, `direct_map + pa` must be mapped and writable (no
    /// overflow), and be reached only through objects of this crate, the
    /// guest and devices: no Rust reference to it and no non-atomic access
    /// by other code.
    pub unsafe fn new(
        direct_map: *mut u8,
        ram: &'a [Range<u64>],
        hidden: &'a [Range<u64>],
    ) -> Self {
        Self {
            base: direct_map,
            ram,
            hidden,
        }
    }

    /// The RAM ranges.
    pub fn ram(&self) -> &[Range<u64>] {
        self.ram
    }

    /// The hidden ranges.
    pub fn hidden(&self) -> &[Range<u64>] {
        self.hidden
    }
}

impl GuestPhysMemory for PassthroughMemory<'_> {
    #[inline]
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<PhysWindow<'_>, PhysAccessError> {
        // SAFETY: `new`'s contract: base + pa is valid for every pa inside
        // `ram` and outside `hidden`.
        unsafe { window(self.base, self.ram, self.hidden, gpa, len) }
    }
}

#[cfg(test)]
impl IsolatedMemory<'_> {
    /// Test support: a copy of all of guest RAM, holes included (the VMM's
    /// own view, which no guest-supplied address may use).
    pub(crate) fn snapshot(&self) -> std::vec::Vec<u8> {
        let len = usize::try_from(self.len()).unwrap_or(0);
        let mut copy = std::vec![0u8; len];
        // SAFETY: `from_raw`'s contract covers the whole block.
        let whole = unsafe { PhysWindow::new(self.base, len) };
        assert!(whole.read(&mut copy));
        copy
    }
}

//! Guest-physical memory as the VMM sees it, and its two layouts.

use core::fmt;
use core::marker::PhantomData;
use core::mem::MaybeUninit;
use core::ops::Range;

use crate::window::load_word;
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

    /// The layout as plain data, when guest-physical `x` is host
    /// `base + x` wherever it is reachable: the page walk and the linear
    /// copies then check each entry or page inline, with no call through a
    /// `dyn GuestPhysMemory` per entry. `None` (the default) makes them go
    /// through [`map`](Self::map) and the other methods. An implementor
    /// returning `Some` must answer every access through it exactly as
    /// through its own methods.
    #[inline]
    fn direct_map(&self) -> Option<DirectMap<'_>> {
        None
    }

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

/// The longest range of guest-physical addresses inside one range of
/// `ram` and outside every range of `hidden` (empty when there is none):
/// the range [`DirectMap`] checks an access against with two compares.
///
/// Work is `ram.len() * hidden.len()^2` at most, once per layout object.
pub(crate) fn clear_span(ram: &[Range<u64>], hidden: &[Range<u64>]) -> Range<u64> {
    let hidden_nonempty = || hidden.iter().filter(|h| h.start < h.end);
    let mut best = 0..0;
    for r in ram.iter().filter(|r| r.start < r.end) {
        // A longest clear piece starts at the range's start or at the end
        // of a hidden range.
        let starts = core::iter::once(r.start).chain(hidden_nonempty().map(|h| h.end));
        for s in starts {
            if s < r.start || s >= r.end || hidden_nonempty().any(|h| h.start <= s && s < h.end) {
                continue;
            }
            // Up to the next hidden range starting after `s` (none starts
            // at or before `s` and ends after it: checked above).
            let end = hidden_nonempty()
                .filter(|h| h.start > s)
                .map(|h| h.start)
                .fold(r.end, u64::min);
            if end - s > best.end - best.start {
                best = s..end;
            }
        }
    }
    best
}

/// The clear range of a layout ([`clear_span`] of its lists), where
/// guest-physical `x` is host `base + x` with nothing to check but the
/// range itself, in the forms the inline checks use. Computed once, when
/// the layout is made.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clear {
    base: *mut u8,
    /// `start..start + len`.
    start: u64,
    len: u64,
    /// The aligned 8-byte words inside it: `words` of them from
    /// `word_start` (8-byte aligned); none when the host block is not
    /// 8-byte aligned, so that every word read is one aligned load.
    word_start: u64,
    words: u64,
}

impl Clear {
    /// The clear range of `ram` minus `hidden` at host `base`.
    fn new(base: *mut u8, ram: &[Range<u64>], hidden: &[Range<u64>]) -> Self {
        let clear = clear_span(ram, hidden);
        let word_start = clear.start.checked_next_multiple_of(8).unwrap_or(u64::MAX);
        let word_end = clear.end & !7;
        Self {
            base,
            start: clear.start,
            len: clear.end - clear.start,
            word_start,
            words: if base.addr().is_multiple_of(8) {
                word_end.saturating_sub(word_start) / 8
            } else {
                0
            },
        }
    }

    /// The window over `gpa..gpa+len` when it lies in the clear range.
    #[inline(always)]
    fn window<'m>(&self, gpa: GuestPhysAddr, len: usize) -> Option<PhysWindow<'m>> {
        let off = gpa.0.wrapping_sub(self.start);
        // `off <= len` (an address before the start wraps to a huge
        // offset) and no run past the end.
        if off <= self.len && (len as u64) <= self.len - off {
            // SAFETY: inside the clear range, valid at base + x (the
            // contract of the layout that made it).
            return Some(unsafe { at(self.base, gpa, len) });
        }
        None
    }

    /// Whether the aligned word at `gpa` lies in the clear range: one
    /// compare checks both the range and the alignment (the offset rotated
    /// right by 3 is below `words` only when its low 3 bits are clear).
    #[inline(always)]
    fn has_word(&self, gpa: u64) -> bool {
        gpa.wrapping_sub(self.word_start).rotate_right(3) < self.words
    }
}

/// The window for `gpa..gpa+len` at host `base + gpa`: the mapping both
/// layouts use. `clear` decides the usual access with two compares;
/// anything else goes through the check of every range.
///
/// # Safety
/// `base + pa` must be valid for atomic access, for the window's lifetime,
/// for every `pa` inside `ram` and outside `hidden` (the contract of both
/// layouts' constructors), and `clear` must be `Clear::new(base, ram,
/// hidden)`.
#[inline(always)]
unsafe fn window<'m>(
    base: *mut u8,
    ram: &[Range<u64>],
    hidden: &[Range<u64>],
    clear: &Clear,
    gpa: GuestPhysAddr,
    len: usize,
) -> Result<PhysWindow<'m>, PhysAccessError> {
    if let Some(w) = clear.window(gpa, len) {
        return Ok(w);
    }
    // SAFETY: the caller's contract.
    unsafe { window_checked(base, ram, hidden, gpa, len) }
}

// Guest-physical addresses become host offsets with `as usize` below:
// lossless on the 64-bit hosts this crate is for.
const _: () = assert!(usize::BITS == 64);

/// The window at `base + gpa`.
///
/// # Safety
/// Every byte of `gpa..gpa+len` is valid for atomic access at
/// `base + pa`, for the window's lifetime.
#[inline(always)]
unsafe fn at<'m>(base: *mut u8, gpa: GuestPhysAddr, len: usize) -> PhysWindow<'m> {
    // wrapping_add: the block need not be one Rust allocation (the direct
    // map is not), and nothing is dereferenced here.
    // SAFETY: the caller's guarantee.
    unsafe { PhysWindow::new(base.wrapping_add(gpa.0 as usize), len) }
}

/// [`window`] outside the clear range: check every range.
///
/// # Safety
/// As for [`window`].
#[cold]
#[inline(never)]
unsafe fn window_checked<'m>(
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
    usize::try_from(gpa.0).map_err(|_| PhysAccessError { gpa })?;
    // SAFETY: every byte of the range is inside `ram` and outside
    // `hidden` (checked above), which the caller guarantees is valid at
    // base + pa.
    Ok(unsafe { at(base, gpa, len) })
}

/// A layout as plain data, for the page walk and the linear copies (see
/// [`GuestPhysMemory::direct_map`]): guest-physical `x` is host `base + x`
/// throughout a clear range (RAM, nothing hidden), so the usual access is
/// one subtraction and two compares, inline; any other goes to the layout
/// it came from. It copies like that layout (atomically, through
/// [`PhysWindow`]). Two references: cheap to make and to pass.
#[derive(Clone, Copy)]
pub struct DirectMap<'a> {
    clear: &'a Clear,
    /// The layout, for every access outside the clear range.
    layout: &'a dyn GuestPhysMemory,
}

impl fmt::Debug for DirectMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectMap")
            .field("clear", self.clear)
            .finish_non_exhaustive()
    }
}

// SAFETY: as for the layouts it comes from: every access is atomic and
// goes through `PhysWindow`; the layout is `Sync` (a supertrait).
unsafe impl Sync for DirectMap<'_> {}
// SAFETY: see above; shared references to `Sync` data may move.
unsafe impl Send for DirectMap<'_> {}

impl<'a> DirectMap<'a> {
    /// # Safety
    /// For `'a`, `clear.base + x` must be valid for atomic access for every
    /// `x` in the clear range, which `layout` must map the same way (its
    /// [`map`](GuestPhysMemory::map) would hand out `base + x` for them).
    unsafe fn new(clear: &'a Clear, layout: &'a dyn GuestPhysMemory) -> Self {
        Self { clear, layout }
    }

    /// [`GuestPhysMemory::map`], for as long as the layout lives.
    #[inline(always)]
    pub fn window(
        &self,
        gpa: GuestPhysAddr,
        len: usize,
    ) -> Result<PhysWindow<'a>, PhysAccessError> {
        match self.clear.window(gpa, len) {
            Some(w) => Ok(w),
            None => self.layout.map(gpa, len),
        }
    }

    /// The layout this map came from.
    #[inline(always)]
    pub(crate) fn layout(&self) -> &'a dyn GuestPhysMemory {
        self.layout
    }

    /// The aligned 8-byte word at `gpa` when it lies in the clear range
    /// (a paging-structure entry, the page walk's one read per level);
    /// `None` otherwise, even when the layout could read it.
    #[inline(always)]
    pub(crate) fn clear_word(&self, gpa: u64) -> Option<u64> {
        if self.clear.has_word(gpa) {
            // SAFETY: an aligned word inside the clear range (`new`'s
            // contract), at an aligned host address (base is aligned, or
            // there are no words).
            return Some(unsafe { load_word(self.clear.base.wrapping_add(gpa as usize)) });
        }
        None
    }

    /// The NUL-terminated string at `gpa`, at most `n` bytes with the NUL
    /// (the words covering them must fit `buf`), copied to `buf` by whole
    /// aligned words: `Some(string)` (in `buf`, without its NUL) when its
    /// NUL comes within `n` bytes; `None` when the words covering
    /// `gpa..gpa+n` are not all in the clear range or no NUL comes within
    /// `n` bytes. `buf` need not be initialised: only the words read are
    /// written, and only bytes of those are returned.
    ///
    /// Reading whole words reads up to 7 bytes before `gpa` and after the
    /// range: guest RAM in the clear range, which the VMM may read (never
    /// its own memory), and which do not count (the bytes before are
    /// forced non-zero, the bytes after come after the limit).
    #[inline(always)]
    pub(crate) fn clear_cstr<'b>(
        &self,
        gpa: u64,
        n: usize,
        buf: &'b mut [MaybeUninit<u64>],
    ) -> Option<&'b [u8]> {
        let skip = (gpa & 7) as usize;
        let first = gpa & !7;
        // Words covering gpa..gpa+n: the last one starts at or before
        // gpa + n - 1.
        let words = (skip + n).div_ceil(8);
        let last = first.checked_add(8 * (words as u64).checked_sub(1)?)?;
        if !self.clear.has_word(first) || !self.clear.has_word(last) || words > buf.len() {
            return None;
        }
        // All words from `first` to `last` are in the clear range (it is
        // one range). The bytes before gpa must not look like a NUL.
        let mut mask = (1u64 << (8 * skip)) - 1;
        for (k, d) in buf.iter_mut().take(words).enumerate() {
            // SAFETY: an aligned word between `first` and `last`, in the
            // clear range.
            let w = unsafe { load_word(self.clear.base.wrapping_add((first as usize) + 8 * k)) };
            // Stored as loaded: the bytes keep guest memory's order.
            d.write(w);
            let v = w | mask;
            mask = 0;
            let zero = v.wrapping_sub(0x0101_0101_0101_0101) & !v & 0x8080_8080_8080_8080;
            if zero != 0 {
                let at = 8 * k + (zero.trailing_zeros() / 8) as usize;
                // The NUL must come within n bytes of gpa.
                if at >= skip + n {
                    return None;
                }
                // SAFETY: words 0..=k of `buf` are written (above), and
                // skip <= at < 8 * (k + 1): the bytes skip..at lie in them
                // (in guest memory's byte order). The buffer stays borrowed
                // as long as the slice.
                return Some(unsafe {
                    core::slice::from_raw_parts(buf.as_ptr().cast::<u8>().add(skip), at - skip)
                });
            }
        }
        None
    }
}

impl GuestPhysMemory for DirectMap<'_> {
    #[inline(always)]
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<PhysWindow<'_>, PhysAccessError> {
        self.window(gpa, len)
    }

    #[inline(always)]
    fn direct_map(&self) -> Option<DirectMap<'_>> {
        Some(*self)
    }
}

/// The isolated layout: guest RAM is one block of host memory mapped at
/// guest-physical 0 (guest-physical `x` is host `base + x`), optionally
/// with holes the VMM refuses to touch on the guest's behalf.
pub struct IsolatedMemory<'a> {
    base: *mut u8,
    /// `0..len`.
    ram: Range<u64>,
    holes: &'a [Range<u64>],
    /// Its clear range.
    clear: Clear,
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
        // usize is at most 64 bits on every target this crate supports.
        let ram = 0..u64::try_from(len).unwrap_or(u64::MAX);
        Self {
            base,
            clear: Clear::new(base, core::slice::from_ref(&ram), holes),
            ram,
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
        // SAFETY: `from_raw`'s contract: base + x is valid for x in 0..len
        // outside the holes; `clear` is `clear_span` of the same lists.
        unsafe {
            window(
                self.base,
                core::slice::from_ref(&self.ram),
                self.holes,
                &self.clear,
                gpa,
                len,
            )
        }
    }

    #[inline]
    fn direct_map(&self) -> Option<DirectMap<'_>> {
        // SAFETY: `clear` is inside RAM and outside the holes, valid at
        // base + x (`from_raw`'s contract), and `map` hands out base + x.
        Some(unsafe { DirectMap::new(&self.clear, self) })
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
    /// Its clear range.
    clear: Clear,
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
            clear: Clear::new(direct_map, ram, hidden),
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
        // `ram` and outside `hidden`; `clear` is `clear_span` of the same
        // lists.
        unsafe { window(self.base, self.ram, self.hidden, &self.clear, gpa, len) }
    }

    #[inline]
    fn direct_map(&self) -> Option<DirectMap<'_>> {
        // SAFETY: `clear` is inside RAM and outside the hidden ranges,
        // valid at base + pa (`new`'s contract), and `map` hands out
        // base + pa.
        Some(unsafe { DirectMap::new(&self.clear, self) })
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

//! [`PhysWindow`]: a checked range of guest memory, reached only through
//! raw pointers and relaxed atomic accesses.
//!
//! See [`PhysWindow`] for why atomics.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

// Guest memory is little-endian; so is every host this crate targets
// (x86-64). Word copies move bytes in host order, which is only the
// guest's order on a little-endian host.
const _: () = assert!(cfg!(target_endian = "little"));

/// A range of guest memory that an implementation of
/// [`GuestPhysMemory`](crate::GuestPhysMemory) checked and handed out: a raw
/// host pointer and a length, with copy methods only.
///
/// There is no way to borrow the bytes as a slice: every access is an
/// atomic load or store, so a window stays sound while the guest, devices
/// and other vCPUs write the same memory. The window borrows the memory
/// object (`'a`), so it cannot outlive it.
///
/// # Why atomics, and not references or volatile copies
///
/// Guest memory is written concurrently by the guest's processors, by
/// DMA devices and by the VMM code of the other vCPUs. A Rust reference
/// (`&[u8]`, `&mut [u8]`) over it would promise the compiler that nobody
/// else writes it while the reference lives, which is false, so this
/// crate never creates one: every byte is loaded or stored through a raw
/// pointer by an atomic operation.
///
/// Atomics rather than `read_volatile`/`write_volatile`, because:
///
/// - Volatile accesses are, for concurrency, plain non-atomic accesses
///   (the `core::ptr::read_volatile` documentation says so): two vCPUs
///   copying into the same guest page at once would be a data race, which
///   is undefined behaviour. Relaxed atomic accesses never race with each
///   other.
/// - Page-table entries must be read in one load (the guest and the other
///   vCPUs set accessed and dirty bits under our feet, a torn entry would
///   combine two different mappings), and the later read-modify-writes
///   (accessed/dirty bits, the `log_set_buf` counter) need atomics anyway:
///   one kind of access throughout.
/// - On x86-64 a relaxed atomic load or store of 1, 4 or 8 bytes is a plain
///   `MOV`, with no fence and no lock prefix: the same instructions a
///   volatile copy would produce.
///
/// Copies shorter than 64 bytes move 8-byte words with relaxed `AtomicU64`
/// accesses over the naturally aligned middle of the range and single
/// bytes (`AtomicU8`) at the unaligned edges, unrolled eight words at a
/// time. Longer ones (a page of a bulk copy) use the processor's string
/// moves (`REP MOVSQ`) inside an `asm!` block (see `string_copy`): as
/// opaque to the compiler as an atomic access, and the fastest copy on the
/// bare-metal target, which has no SIMD registers.
///
/// What Rust's memory model does not cover: when another agent accesses
/// the same bytes concurrently with a *different* size (the guest always,
/// another vCPU sometimes: a byte at the edge of one copy inside a word of
/// another), the C++-derived model leaves mixed-size races undefined. x86
/// defines them (every aligned access of up to 8 bytes is single-copy
/// atomic, SDM vol. 3A, 9.1.1), the guest is outside the Rust abstract
/// machine, and no compiler transformation is allowed to invent or widen
/// accesses to atomics; this is the same footing every hypervisor and
/// kernel written in Rust or C stands on for memory shared with hardware.
#[derive(Debug)]
pub struct PhysWindow<'a> {
    ptr: *mut u8,
    len: usize,
    _memory: PhantomData<&'a ()>,
}

/// Relaxed is enough for copies: the VMM acts on the values it copied,
/// never on an ordering between guest bytes. The read-modify-writes use
/// [`RMW`].
const RELAXED: Ordering = Ordering::Relaxed;

/// Read-modify-writes are acquire-release: whatever this vCPU wrote
/// before (the log bytes before the counter that publishes them) is
/// visible to anyone who sees the new value. On x86-64 every locked
/// instruction is a full barrier anyway, so this costs nothing.
const RMW: Ordering = Ordering::AcqRel;

impl PhysWindow<'_> {
    /// A window over `len` bytes of host memory at `ptr`.
    ///
    /// # Safety
    /// For the window's lifetime, `ptr..ptr+len` must be valid for atomic
    /// reads and writes (mapped, writable, and never accessed by anyone in
    /// this program through a Rust reference or non-atomically), and must be
    /// memory the caller's guest may use. `len == 0` needs nothing.
    #[inline]
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        Self {
            ptr,
            len,
            _memory: PhantomData,
        }
    }

    /// The window's length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the window covers no byte.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of offset `at` (for the recording test hook and
    /// alignment checks only; never dereferenced outside this module).
    #[inline]
    fn addr(&self, at: usize) -> usize {
        self.ptr.addr().wrapping_add(at)
    }

    /// Copies the first `dst.len()` bytes of the window into `dst`; false
    /// (nothing copied) when the window is shorter.
    #[inline]
    pub fn read(&self, dst: &mut [u8]) -> bool {
        if dst.len() > self.len {
            return false;
        }
        record(self.addr(0), dst.len());
        // SAFETY: dst.len() <= self.len, so every byte read lies in the
        // window, which `new`'s contract makes valid for atomic reads.
        unsafe { copy_out(self.ptr, dst) };
        true
    }

    /// Copies `src` into the first `src.len()` bytes of the window; false
    /// (nothing written) when the window is shorter.
    #[inline]
    pub fn write(&self, src: &[u8]) -> bool {
        if src.len() > self.len {
            return false;
        }
        record(self.addr(0), src.len());
        // SAFETY: as in `read`, for atomic writes.
        unsafe { copy_in(self.ptr, src) };
        true
    }

    /// Copies bytes into `dst` until one of them is NUL or `dst` is full,
    /// and returns the NUL's index. A few bytes of `dst` after the NUL may
    /// be overwritten too (the rest of the word holding it); `None` when
    /// the window or `dst` ends first (then the shorter of the two is
    /// copied).
    ///
    /// Reads aligned pieces only, each one atomic load: one byte, two
    /// bytes and four bytes as needed up to the first 8-byte boundary
    /// (three loads, not up to seven), then words, then the last bytes. A
    /// short name ends in the first piece or two, so little is copied past
    /// the NUL.
    #[inline]
    pub fn read_until_nul(&self, dst: &mut [u8]) -> Option<usize> {
        let n = dst.len().min(self.len);
        let dst = dst.get_mut(..n)?;
        // Conservative for the test hook: the scan may stop earlier.
        record(self.addr(0), n);
        let mut done = 0usize;
        // Head: a 1-, a 2- and a 4-byte piece, each taken when the address
        // has that bit set and the piece fits. Afterwards the address is
        // 8-byte aligned, or fewer than 8 bytes are left (a piece did not
        // fit), which the tail takes.
        for size in [1usize, 2, 4] {
            if self.addr(done) & size != 0 && n - done >= size {
                let Some(d) = dst.get_mut(done..done + size) else {
                    break;
                };
                // SAFETY: done + size <= n <= self.len: inside the window;
                // the address is size-aligned (its lower bits are clear:
                // the smaller pieces cleared them).
                let v = unsafe { load_piece(self.ptr.wrapping_add(done), size) };
                d.copy_from_slice(&v.to_le_bytes()[..size]);
                if let Some(i) = zero_byte(v, size) {
                    return Some(done + i);
                }
                done += size;
            }
        }
        let (_, rest) = dst.split_at_mut(done);
        let mut words = rest.chunks_exact_mut(8);
        if self.addr(done).is_multiple_of(8) {
            for d in &mut words {
                // SAFETY: done + 8 <= n: inside the window; aligned
                // (checked above, and each round adds 8).
                let w = unsafe { load64(self.ptr.wrapping_add(done)) };
                d.copy_from_slice(&w.to_ne_bytes());
                if let Some(i) = zero_byte(w, 8) {
                    return Some(done + i);
                }
                done += 8;
            }
        }
        let tail = dst.get_mut(done..)?;
        for (i, b) in tail.iter_mut().enumerate() {
            // SAFETY: done + i < n: the last bytes of the window.
            *b = unsafe { load8(self.ptr.wrapping_add(done + i)) };
            if *b == 0 {
                return Some(done + i);
            }
        }
        None
    }

    /// The first 4 bytes as a little-endian `u32`, in one atomic load when
    /// their host address is 4-byte aligned (byte by byte otherwise).
    /// `None` when the window is shorter.
    #[inline]
    pub fn load_u32(&self) -> Option<u32> {
        if self.len < 4 {
            return None;
        }
        record(self.addr(0), 4);
        if self.addr(0).is_multiple_of(4) {
            // SAFETY: 4 bytes in the window (contract of `new`), aligned.
            Some(u32::from_le(unsafe {
                AtomicU32::from_ptr(self.ptr.cast()).load(RELAXED)
            }))
        } else {
            let mut b = [0u8; 4];
            // SAFETY: 4 bytes in the window.
            unsafe { copy_out_cold(self.ptr, &mut b) };
            Some(u32::from_le_bytes(b))
        }
    }

    /// The first 8 bytes as a little-endian `u64`, in one atomic load when
    /// aligned (see [`load_u32`](Self::load_u32)).
    #[inline]
    pub fn load_u64(&self) -> Option<u64> {
        if self.len < 8 {
            return None;
        }
        record(self.addr(0), 8);
        if self.addr(0).is_multiple_of(8) {
            // SAFETY: 8 bytes in the window, aligned.
            Some(u64::from_le(unsafe {
                AtomicU64::from_ptr(self.ptr.cast()).load(RELAXED)
            }))
        } else {
            let mut b = [0u8; 8];
            // SAFETY: 8 bytes in the window.
            unsafe { copy_out_cold(self.ptr, &mut b) };
            Some(u64::from_le_bytes(b))
        }
    }

    /// Stores `value` little-endian into the first 4 bytes, in one atomic
    /// store when aligned. False (nothing written) when the window is
    /// shorter.
    #[inline]
    pub fn store_u32(&self, value: u32) -> bool {
        if self.len < 4 {
            return false;
        }
        record(self.addr(0), 4);
        if self.addr(0).is_multiple_of(4) {
            // SAFETY: 4 bytes in the window, aligned.
            unsafe { AtomicU32::from_ptr(self.ptr.cast()).store(value.to_le(), RELAXED) };
        } else {
            // SAFETY: 4 bytes in the window.
            unsafe { copy_in_cold(self.ptr, &value.to_le_bytes()) };
        }
        true
    }

    /// Stores `value` little-endian into the first 8 bytes (see
    /// [`store_u32`](Self::store_u32)).
    #[inline]
    pub fn store_u64(&self, value: u64) -> bool {
        if self.len < 8 {
            return false;
        }
        record(self.addr(0), 8);
        if self.addr(0).is_multiple_of(8) {
            // SAFETY: 8 bytes in the window, aligned.
            unsafe { AtomicU64::from_ptr(self.ptr.cast()).store(value.to_le(), RELAXED) };
        } else {
            // SAFETY: 8 bytes in the window.
            unsafe { copy_in_cold(self.ptr, &value.to_le_bytes()) };
        }
        true
    }

    /// Atomically replaces the first 8 bytes (little-endian) with `new` if
    /// they hold `current`: `Ok(previous)` on success, `Err(actual)`
    /// otherwise, like [`AtomicU64::compare_exchange`]. `None` when the
    /// window is shorter than 8 bytes or its host address is not 8-byte
    /// aligned (a locked operation must not straddle words).
    #[inline]
    pub fn compare_exchange_u64(&self, current: u64, new: u64) -> Option<Result<u64, u64>> {
        if self.len < 8 || !self.addr(0).is_multiple_of(8) {
            return None;
        }
        record(self.addr(0), 8);
        // SAFETY: 8 bytes in the window, aligned.
        let atomic = unsafe { AtomicU64::from_ptr(self.ptr.cast()) };
        let r = atomic.compare_exchange(current.to_le(), new.to_le(), RMW, Ordering::Acquire);
        Some(r.map(u64::from_le).map_err(u64::from_le))
    }

    /// Atomically adds `value` (wrapping) to the little-endian `u32` in the
    /// first 4 bytes and returns the previous value. `None` when the window
    /// is shorter or not 4-byte aligned.
    #[inline]
    pub fn fetch_add_u32(&self, value: u32) -> Option<u32> {
        if self.len < 4 || !self.addr(0).is_multiple_of(4) {
            return None;
        }
        record(self.addr(0), 4);
        // SAFETY: 4 bytes in the window, aligned.
        let atomic = unsafe { AtomicU32::from_ptr(self.ptr.cast()) };
        Some(atomic.fetch_add(value, RMW))
    }
}

/// One relaxed atomic load of the 8-byte little-endian word at `p` (for
/// [`DirectMap`](crate::DirectMap)'s entry reads, which checked the range
/// and the alignment already).
///
/// # Safety
/// `p` is 8-byte aligned and valid for atomic reads of 8 bytes.
#[inline(always)]
pub(crate) unsafe fn load_word(p: *mut u8) -> u64 {
    record(p.addr(), 8);
    // SAFETY: the caller's guarantee.
    u64::from_le(unsafe { load64(p) })
}

/// One relaxed atomic byte load.
///
/// # Safety
/// `p` is valid for atomic reads.
#[inline(always)]
unsafe fn load8(p: *mut u8) -> u8 {
    // SAFETY: the caller's guarantee; AtomicU8 has alignment 1.
    unsafe { AtomicU8::from_ptr(p) }.load(RELAXED)
}

/// One relaxed atomic 8-byte load.
///
/// # Safety
/// `p` is 8-byte aligned and valid for atomic reads of 8 bytes.
#[inline(always)]
unsafe fn load64(p: *mut u8) -> u64 {
    // SAFETY: the caller's guarantee.
    unsafe { AtomicU64::from_ptr(p.cast()) }.load(RELAXED)
}

/// One relaxed atomic load of a `size`-byte piece (1, 2, 4 or 8),
/// zero-extended, in little-endian order.
///
/// # Safety
/// `p` is `size`-aligned and valid for atomic reads of `size` bytes.
#[inline(always)]
unsafe fn load_piece(p: *mut u8, size: usize) -> u64 {
    // SAFETY: the caller's guarantee, for the size taken.
    unsafe {
        match size {
            1 => u64::from(load8(p)),
            2 => u64::from(AtomicU16::from_ptr(p.cast()).load(RELAXED)),
            4 => u64::from(AtomicU32::from_ptr(p.cast()).load(RELAXED)),
            _ => load64(p),
        }
    }
}

/// Index of the first zero byte among the low `size` bytes of `v` (in
/// memory order, little-endian), if any: the classic bit trick, in which
/// only a zero byte borrows into its own top bit first; bytes above
/// `size` are zero and must not count.
#[inline(always)]
fn zero_byte(v: u64, size: usize) -> Option<usize> {
    let low = u64::MAX >> (64 - 8 * size as u32);
    let found = v.wrapping_sub(0x0101_0101_0101_0101) & !v & 0x8080_8080_8080_8080 & low;
    (found != 0).then(|| (found.trailing_zeros() / 8) as usize)
}

/// Bytes per round of the copy loops: eight words, so the loop's own
/// instructions are a small part of each round.
const BLOCK: usize = 64;

/// Bytes from `p` up to the next 8-byte boundary, at most `n`.
#[inline(always)]
fn head_len(p: *mut u8, n: usize) -> usize {
    (p.addr().wrapping_neg() & 7).min(n)
}

/// Copies `dst.len()` bytes of guest memory at `src` into `dst`: bytes up
/// to the first 8-byte boundary, then aligned words (eight per round),
/// then the last bytes.
///
/// # Safety
/// `src..src+dst.len()` is valid for atomic reads.
#[inline]
unsafe fn copy_out(src: *mut u8, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if dst.len() >= STRING_COPY_MIN {
        // SAFETY: the caller's guarantee; `dst` is the host's own buffer.
        unsafe { string_copy(src, dst.as_mut_ptr(), dst.len()) };
        return;
    }
    if dst.len() < 8 {
        // Short copies (an instruction's bytes, a field): bytes only,
        // none of the word machinery.
        for (i, b) in dst.iter_mut().enumerate() {
            // SAFETY: i < dst.len(): inside the range.
            *b = unsafe { load8(src.wrapping_add(i)) };
        }
        return;
    }
    let head = head_len(src, dst.len());
    let (first, rest) = dst.split_at_mut(head);
    for (i, b) in first.iter_mut().enumerate() {
        // SAFETY: i < head <= dst.len(): inside the range.
        *b = unsafe { load8(src.wrapping_add(i)) };
    }
    // `p` is 8-byte aligned from here on.
    let mut p = src.wrapping_add(head);
    let mut blocks = rest.chunks_exact_mut(BLOCK);
    for block in &mut blocks {
        let w: [u64; BLOCK / 8] = core::array::from_fn(|k| {
            // SAFETY: BLOCK bytes at p are inside the range, p is aligned.
            unsafe { load64(p.wrapping_add(8 * k)) }
        });
        for (d, w) in block.chunks_exact_mut(8).zip(w) {
            d.copy_from_slice(&w.to_ne_bytes());
        }
        p = p.wrapping_add(BLOCK);
    }
    let mut words = blocks.into_remainder().chunks_exact_mut(8);
    for d in &mut words {
        // SAFETY: 8 bytes at p are inside the range, p is aligned.
        d.copy_from_slice(&unsafe { load64(p) }.to_ne_bytes());
        p = p.wrapping_add(8);
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        // SAFETY: the last bytes of the range.
        *b = unsafe { load8(p.wrapping_add(i)) };
    }
}

/// Copies of at least this many bytes (a page's worth in bulk copies) go
/// through [`string_copy`]; shorter ones (fields, instructions, names) use
/// the word loops, which have no start-up cost.
#[cfg(target_arch = "x86_64")]
const STRING_COPY_MIN: usize = 64;

/// Copies `len` bytes from `src` to `dst` with the processor's string
/// moves: `REP MOVSB` up to the 8-byte boundary of `src`, `REP MOVSQ` for
/// the aligned words, `REP MOVSB` for the rest (Intel SDM vol. 2B, MOVS
/// and REP; vol. 1, 7.3.9.3 on fast-string operation, which makes them
/// the fastest bulk copy on processors without usable vector registers,
/// as in the hypervisor). One side is guest memory.
///
/// Why this is sound where a plain `copy_nonoverlapping` of guest memory
/// would not be: the moves happen inside an `asm!` block, which the
/// compiler treats as an opaque operation on the memory behind the
/// pointers it is given. Nothing in the Rust program accesses the guest
/// side non-atomically, no reference to it exists, and the compiler can
/// neither tear, repeat nor elide the copy; concurrent writers (the
/// guest, devices, other vCPUs' atomic copies) see ordinary x86 memory
/// accesses, which the architecture defines (SDM vol. 3A, "Guaranteed
/// Atomic Operations" and "Fast-String Operation and Out-of-Order
/// Stores": the stores of a fast-string operation may be seen out of
/// order, which a byte copy never relies on). The host side is the
/// caller's own buffer. DF is clear on entry to any `asm!` block (the
/// Rust inline assembly rules), so the moves go forward.
///
/// # Safety
/// `src..src+len` is valid for reads and `dst..dst+len` for writes, and
/// the two do not overlap; the side that is Rust memory is not borrowed
/// elsewhere.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn string_copy(src: *mut u8, dst: *mut u8, len: usize) {
    let head = head_len(src, len);
    let words = (len - head) / 8;
    let tail = len - head - 8 * words;
    // SAFETY: the moves stay inside src..src+len and dst..dst+len (head +
    // 8 * words + tail = len); they do not overlap (the caller); RSI, RDI
    // and RCX are declared clobbered; no stack use.
    unsafe {
        core::arch::asm!(
            "rep movsb",
            "mov rcx, {words}",
            "rep movsq",
            "mov rcx, {tail}",
            "rep movsb",
            words = in(reg) words,
            tail = in(reg) tail,
            inout("rcx") head => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags),
        );
    }
}

/// [`copy_out`] for the unaligned typed loads, kept out of line so the
/// aligned path (every page-table entry) stays a few instructions.
///
/// # Safety
/// As for [`copy_out`].
#[cold]
#[inline(never)]
unsafe fn copy_out_cold(src: *mut u8, dst: &mut [u8]) {
    // SAFETY: the caller's guarantee.
    unsafe { copy_out(src, dst) }
}

/// [`copy_in`] for the unaligned typed stores (see [`copy_out_cold`]).
///
/// # Safety
/// As for [`copy_in`].
#[cold]
#[inline(never)]
unsafe fn copy_in_cold(dst: *mut u8, src: &[u8]) {
    // SAFETY: the caller's guarantee.
    unsafe { copy_in(dst, src) }
}

/// Copies `src` into guest memory at `dst`, split like [`copy_out`].
///
/// # Safety
/// `dst..dst+src.len()` is valid for atomic writes.
#[inline]
unsafe fn copy_in(dst: *mut u8, src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if src.len() >= STRING_COPY_MIN {
        // SAFETY: the caller's guarantee; `src` is the host's own buffer.
        unsafe { string_copy(src.as_ptr().cast_mut(), dst, src.len()) };
        return;
    }
    let store8 = |p: *mut u8, v: u8| {
        // SAFETY: every caller below passes a byte of the range.
        unsafe { AtomicU8::from_ptr(p) }.store(v, RELAXED)
    };
    let store64 = |p: *mut u8, v: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(v);
        // SAFETY: every caller below passes an aligned word of the range.
        unsafe { AtomicU64::from_ptr(p.cast()) }.store(u64::from_ne_bytes(w), RELAXED)
    };
    let head = head_len(dst, src.len());
    let (first, rest) = src.split_at(head);
    for (i, &b) in first.iter().enumerate() {
        store8(dst.wrapping_add(i), b);
    }
    let mut p = dst.wrapping_add(head);
    let mut blocks = rest.chunks_exact(BLOCK);
    for block in &mut blocks {
        for (k, w) in block.chunks_exact(8).enumerate() {
            store64(p.wrapping_add(8 * k), w);
        }
        p = p.wrapping_add(BLOCK);
    }
    let mut words = blocks.remainder().chunks_exact(8);
    for w in &mut words {
        store64(p, w);
        p = p.wrapping_add(8);
    }
    for (i, &b) in words.remainder().iter().enumerate() {
        store8(p.wrapping_add(i), b);
    }
}

#[cfg(test)]
#[inline(always)]
fn record(addr: usize, len: usize) {
    if len > 0 {
        touched::record(addr, len);
    }
}

#[cfg(not(test))]
#[inline(always)]
fn record(_addr: usize, _len: usize) {}

/// Test hook: every host range a window touches, so tests can check that
/// no access ever reaches a hidden or non-RAM byte. Compiled only into
/// this crate's own tests.
#[cfg(test)]
pub(crate) mod touched {
    use std::cell::RefCell;
    use std::vec::Vec;

    std::thread_local! {
        static LOG: RefCell<Option<Vec<(usize, usize)>>> = const { RefCell::new(None) };
    }

    pub(super) fn record(addr: usize, len: usize) {
        LOG.with(|l| {
            if let Some(log) = l.borrow_mut().as_mut() {
                log.push((addr, len));
            }
        });
    }

    /// Runs `f` and returns the host ranges (address, length) it touched
    /// through windows on this thread.
    pub(crate) fn during<R>(f: impl FnOnce() -> R) -> (R, Vec<(usize, usize)>) {
        LOG.with(|l| *l.borrow_mut() = Some(Vec::new()));
        let r = f();
        let log = LOG.with(|l| l.borrow_mut().take()).unwrap_or_default();
        (r, log)
    }
}

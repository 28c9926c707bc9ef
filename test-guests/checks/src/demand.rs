//! Demand paging for the `log_read` checks in long mode: a window of
//! 4 KiB pages at `WINDOW` (PML4 slot 320) whose not-present pages the
//! #PF handler maps, while armed, to fresh frames of a small pool and then
//! returns to the faulting instruction (which, for a VMM call the VMM
//! turned into an injected #PF, is the VMCALL/VMMCALL itself: it runs
//! again). Pages of the window:
//! - `BUF_PAGES` pages from `WINDOW`: the `log_read_4level` buffer; the
//!   first is present, the others are left not present by [`reset`];
//! - `READ_ONLY` (present, not writable) and `SUPERVISOR` (present,
//!   writable, supervisor only: no U bit anywhere on the path) for
//!   `log_read_refused`.
//!
//! All frames are this image's own (identity-mapped) pages, so the checks
//! can look at them through their physical addresses too.

use crate::cpu;
use crate::entry::{Page, TG_PML4};
use crate::interrupts::ExceptionFrame;
use core::arch::asm;
use core::cell::UnsafeCell;
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The window's first page (PML4 slot 320, PDPT 0, PD 0, PT 0).
pub const WINDOW: u64 = 0xFFFF_A000_0000_0000;
/// Pages of the demand-paged buffer.
pub const BUF_PAGES: u64 = 3;
/// A present, read-only page.
pub const READ_ONLY: u64 = WINDOW + 8 * 4096;
/// A present, writable, supervisor-only page.
pub const SUPERVISOR: u64 = WINDOW + 9 * 4096;

/// Frames: 0 = the buffer's first page, 1 = `READ_ONLY`, 2 = `SUPERVISOR`,
/// the rest the pool the handler maps.
const FRAMES: usize = 8;
const FIRST_POOL_FRAME: usize = 3;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const PF_VECTOR: u64 = 14;

/// The window's PDPT, PD and PT, and the frames.
#[repr(C, align(4096))]
struct Memory {
    pdpt: Page,
    pd: Page,
    pt: Page,
    frames: [Page; FRAMES],
}

/// Wrapper that lets the memory be a plain static.
struct Shared(UnsafeCell<Memory>);

// SAFETY: one CPU; the memory is written by the checks and by the #PF
// handler, which only runs while a check waits in a VMM call.
unsafe impl Sync for Shared {}

static MEMORY: Shared = Shared(UnsafeCell::new(Memory {
    pdpt: [0; 512],
    pd: [0; 512],
    pt: [0; 512],
    frames: [[0; 512]; FRAMES],
}));

/// The armed range `[LO, HI)`; `LO == HI` when disarmed.
static ARMED_LO: AtomicU64 = AtomicU64::new(0);
static ARMED_HI: AtomicU64 = AtomicU64::new(0);
/// Next pool frame to hand out.
static NEXT_FRAME: AtomicU64 = AtomicU64::new(FIRST_POOL_FRAME as u64);
/// Faults handled since the last `reset`, the first one's CR2 and error
/// code, and every error code or-ed.
static FAULTS: AtomicU64 = AtomicU64::new(0);
static FIRST_CR2: AtomicU64 = AtomicU64::new(0);
static FIRST_ERROR: AtomicU64 = AtomicU64::new(0);
static ERRORS_OR: AtomicU64 = AtomicU64::new(0);

/// What the handler did since the last [`reset`].
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub faults: u64,
    pub first_cr2: u64,
    pub first_error: u64,
    pub errors_or: u64,
}

fn memory() -> *mut Memory {
    MEMORY.0.get()
}

/// Guest-physical (= linear, identity-mapped) address of frame `n`.
fn frame_phys(n: usize) -> u64 {
    assert!(n < FRAMES);
    // SAFETY: only the address is taken.
    unsafe { addr_of_mut!((*memory()).frames[n]) as u64 }
}

/// Writes entry `index` of the window's page table.
fn set_pte(index: usize, value: u64) {
    assert!(index < 512);
    // SAFETY: the page table is this module's; one CPU, and the handler
    // only runs while the check that called this waits in a VMM call.
    unsafe { addr_of_mut!((*memory()).pt[index]).write_volatile(value) }
}

/// Maps the window (PML4 slot 320) and puts its pages in their initial
/// state: the buffer's first page present, the others not present, the
/// pool full again, the frames filled with `fill`, the statistics cleared.
/// Disarmed.
pub fn reset(fill: u8) {
    disarm();
    let m = memory();
    // SAFETY: the tables and frames are this module's; the PML4 slot is
    // otherwise unused; one CPU, and the handler is disarmed.
    unsafe {
        let pdpt = addr_of_mut!((*m).pdpt);
        let pd = addr_of_mut!((*m).pd);
        let pt = addr_of_mut!((*m).pt);
        let pml4 = addr_of_mut!(TG_PML4).cast::<u64>();
        pml4.add(((WINDOW >> 39) & 0x1FF) as usize)
            .write_volatile(pdpt as u64 | PRESENT | WRITABLE);
        pdpt.cast::<u64>()
            .write_volatile(pd as u64 | PRESENT | WRITABLE);
        pd.cast::<u64>()
            .write_volatile(pt as u64 | PRESENT | WRITABLE);
        for n in 0..FRAMES {
            addr_of_mut!((*m).frames[n])
                .cast::<u8>()
                .write_bytes(fill, 4096);
        }
    }
    set_pte(0, frame_phys(0) | PRESENT | WRITABLE);
    for i in 1..BUF_PAGES as usize {
        set_pte(i, 0);
    }
    set_pte(page_index(READ_ONLY), frame_phys(1) | PRESENT);
    set_pte(page_index(SUPERVISOR), frame_phys(2) | PRESENT | WRITABLE);
    NEXT_FRAME.store(FIRST_POOL_FRAME as u64, Relaxed);
    FAULTS.store(0, Relaxed);
    FIRST_CR2.store(0, Relaxed);
    FIRST_ERROR.store(0, Relaxed);
    ERRORS_OR.store(0, Relaxed);
    cpu::reload_cr3();
}

fn page_index(va: u64) -> usize {
    ((va - WINDOW) >> 12) as usize
}

/// Arms the handler for not-present faults in `[lo, hi)` (inside the
/// buffer's pages).
pub fn arm(lo: u64, hi: u64) {
    assert!(WINDOW <= lo && lo <= hi && hi <= WINDOW + BUF_PAGES * 4096);
    ARMED_LO.store(lo, Relaxed);
    ARMED_HI.store(hi, Relaxed);
}

/// Disarms the handler.
pub fn disarm() {
    ARMED_LO.store(0, Relaxed);
    ARMED_HI.store(0, Relaxed);
}

/// What the handler did since the last `reset`.
pub fn stats() -> Stats {
    Stats {
        faults: FAULTS.load(Relaxed),
        first_cr2: FIRST_CR2.load(Relaxed),
        first_error: FIRST_ERROR.load(Relaxed),
        errors_or: ERRORS_OR.load(Relaxed),
    }
}

/// Guest-physical address of the frame behind `READ_ONLY` or `SUPERVISOR`.
pub fn fixed_frame(va: u64) -> u64 {
    match va {
        READ_ONLY => frame_phys(1),
        SUPERVISOR => frame_phys(2),
        _ => panic!("no fixed frame behind {va:#x}"),
    }
}

/// Called by the exception handler first: a not-present #PF inside the
/// armed range maps the page to the next pool frame and returns true (the
/// stub then resumes the faulting instruction unchanged). Anything else,
/// or an empty pool, returns false.
pub fn try_handle(frame: &ExceptionFrame, cr2: u64) -> bool {
    let (lo, hi) = (ARMED_LO.load(Relaxed), ARMED_HI.load(Relaxed));
    if frame.vector != PF_VECTOR || frame.error & PRESENT != 0 || !(lo..hi).contains(&cr2) {
        return false;
    }
    let next = NEXT_FRAME.load(Relaxed) as usize;
    if next >= FRAMES {
        return false;
    }
    NEXT_FRAME.store(next as u64 + 1, Relaxed);
    if FAULTS.fetch_add(1, Relaxed) == 0 {
        FIRST_CR2.store(cr2, Relaxed);
        FIRST_ERROR.store(frame.error, Relaxed);
    }
    ERRORS_OR.fetch_or(frame.error, Relaxed);
    set_pte(page_index(cr2), frame_phys(next) | PRESENT | WRITABLE);
    // SAFETY: drops a stale translation of the page just mapped (none can
    // exist for a not-present page, but it costs nothing).
    unsafe { asm!("invlpg [{}]", in(reg) cr2, options(nostack, preserves_flags)) }
    true
}

//! The guest's own page tables beyond the entry code's identity map, made
//! to give the VMM's guest-linear reads something to walk: 4 KiB pages
//! backed by non-adjacent frames, 2 MiB pages at a high address, and holes.
//!
//! Layout (all present mappings are supervisor, writable):
//! - 0 .. 1 GiB: identity, 2 MiB pages (entry code).
//! - 0xE000_0000 .. +2 MiB: identity, outside guest RAM (entry code).
//! - `HIGH_4K` + 0x0000: data page 0; + 0x1000: data page 2; + 0x2000: hole.
//! - `HIGH_2M`: physical `PHYS_2M_A`; `HIGH_2M` + 2 MiB: `PHYS_2M_B`.
//! - `UNMAPPED` (PML4 slot 128): nothing.
//!
//! Added for the ring-3 and NX checks (the only user or NX mappings):
//! - the first 2 MiB of the identity map become 4 KiB pages (same frames),
//!   and only the user code and user data pages (`user.rs`) are user pages
//!   (U set on the PML4, PDPT and PD entries on their path too);
//! - `HIGH_NX` (data page 1, NX) and `HIGH_EXEC` (data page 1, executable),
//!   mapped by `efer_is_guests` once EFER.NXE is on.

use crate::cpu;
use crate::entry::{
    Page, TG_DATA_PAGES, TG_PDPT_2M, TG_PDPT_4K, TG_PD_2M, TG_PD_4K, TG_PML4, TG_PT_4K,
};
use crate::user::{self, TG_PT_LOW};
use core::ptr::addr_of_mut;

/// Guest-physical address outside guest RAM, identity-mapped.
pub const OUTSIDE_RAM: u64 = 0xE000_0000;
/// Linear address in a PML4 slot left empty.
pub const UNMAPPED: u64 = 0x0000_4000_0000_0000;
/// The lowest non-canonical address.
pub const NON_CANONICAL: u64 = 0x0000_8000_0000_0000;
/// Two 4 KiB pages backed by non-adjacent frames; the third is a hole.
pub const HIGH_4K: u64 = 0xFFFF_8000_0000_0000;
/// Two 2 MiB pages backed by frames in reverse order.
pub const HIGH_2M: u64 = 0xFFFF_C000_0020_0000;
/// Frame behind `HIGH_2M`.
pub const PHYS_2M_A: u64 = 0x0200_0000;
/// Frame behind `HIGH_2M + 2 MiB` (below A, so the two are not contiguous).
pub const PHYS_2M_B: u64 = 0x0100_0000;

/// Data page 1 mapped with NX (bit 63); holds a `ret`.
pub const HIGH_NX: u64 = HIGH_4K + 0x3000;
/// Data page 1 again, executable.
pub const HIGH_EXEC: u64 = HIGH_4K + 0x4000;

const PRESENT_WRITABLE: u64 = 0x3;
const USER: u64 = 0x4;
const LARGE: u64 = 0x80;
const NX: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

fn table(t: *mut Page) -> *mut u64 {
    t.cast()
}

fn set(t: *mut Page, index: usize, value: u64) {
    assert!(index < 512);
    // SAFETY: `t` is one of the entry code's page-aligned 4 KiB tables and
    // the index is in range; one CPU, so no concurrent access.
    unsafe { table(t).add(index).write_volatile(value) }
}

fn pml4_index(va: u64) -> usize {
    ((va >> 39) & 0x1FF) as usize
}

fn pd_index(va: u64) -> usize {
    ((va >> 21) & 0x1FF) as usize
}

/// The guest-physical address of data page `n` (0..3).
pub fn data_page_phys(n: usize) -> u64 {
    assert!(n < 3);
    // Identity-mapped, so the address is the physical one.
    addr_of_mut!(TG_DATA_PAGES) as u64 + 4096 * n as u64
}

/// Adds the high mappings. The frames behind `HIGH_2M` are only written
/// by the checks after they confirm guest RAM covers them.
pub fn map_test_pages() {
    let (pml4, pdpt_4k, pd_4k, pt_4k, pdpt_2m, pd_2m) = (
        addr_of_mut!(TG_PML4),
        addr_of_mut!(TG_PDPT_4K),
        addr_of_mut!(TG_PD_4K),
        addr_of_mut!(TG_PT_4K),
        addr_of_mut!(TG_PDPT_2M),
        addr_of_mut!(TG_PD_2M),
    );
    debug_assert_eq!(pml4_index(HIGH_4K), 256);
    set(pml4, pml4_index(HIGH_4K), pdpt_4k as u64 | PRESENT_WRITABLE);
    set(pdpt_4k, 0, pd_4k as u64 | PRESENT_WRITABLE);
    set(pd_4k, 0, pt_4k as u64 | PRESENT_WRITABLE);
    set(pt_4k, 0, data_page_phys(0) | PRESENT_WRITABLE);
    set(pt_4k, 1, data_page_phys(2) | PRESENT_WRITABLE);

    debug_assert_eq!(pml4_index(HIGH_2M), 384);
    set(pml4, pml4_index(HIGH_2M), pdpt_2m as u64 | PRESENT_WRITABLE);
    set(pdpt_2m, 0, pd_2m as u64 | PRESENT_WRITABLE);
    set(
        pd_2m,
        pd_index(HIGH_2M),
        PHYS_2M_A | PRESENT_WRITABLE | LARGE,
    );
    set(
        pd_2m,
        pd_index(HIGH_2M + 0x20_0000),
        PHYS_2M_B | PRESENT_WRITABLE | LARGE,
    );
    map_user_pages();
    cpu::reload_cr3();
}

fn get(t: *mut Page, index: usize) -> u64 {
    assert!(index < 512);
    // SAFETY: as in `set`.
    unsafe { table(t).add(index).read_volatile() }
}

/// Splits the identity map's first 2 MiB into 4 KiB pages (same frames,
/// same rights) and makes the user code and data pages user pages. The
/// caller reloads CR3.
fn map_user_pages() {
    let user_pages = [user::code_page(), user::data_page()];
    for page in user_pages {
        assert!(
            page < 0x20_0000 && page % 4096 == 0,
            "user page {page:#x} outside the first 2 MiB or unaligned"
        );
    }
    let pml4 = addr_of_mut!(TG_PML4);
    // Identity-mapped: the table addresses in the entries are usable.
    let pdpt = (get(pml4, 0) & ADDR_MASK) as *mut Page;
    let pd = (get(pdpt, 0) & ADDR_MASK) as *mut Page;
    assert!(
        // Accessed and dirty aside.
        get(pd, 0) & !0x60 == PRESENT_WRITABLE | LARGE,
        "the identity map's first 2 MiB page is not as the entry code built it"
    );
    let pt = addr_of_mut!(TG_PT_LOW);
    for i in 0..512 {
        let pa = i as u64 * 4096;
        let user = if user_pages.contains(&pa) { USER } else { 0 };
        set(pt, i, pa | PRESENT_WRITABLE | user);
    }
    set(pd, 0, pt as u64 | PRESENT_WRITABLE | USER);
    set(pdpt, 0, get(pdpt, 0) | USER);
    set(pml4, 0, get(pml4, 0) | USER);
}

/// Maps `HIGH_NX` (NX) and `HIGH_EXEC` to data page 1 and puts a `ret` at
/// its start. Only valid with EFER.NXE set (bit 63 is reserved otherwise).
pub fn map_nx_test_pages() {
    let page = data_page_phys(1);
    // SAFETY: data page 1 belongs to this guest and nothing else uses it.
    unsafe { (page as *mut u8).write_volatile(0xC3) };
    let pt = addr_of_mut!(TG_PT_4K);
    set(pt, 3, page | PRESENT_WRITABLE | NX);
    set(pt, 4, page | PRESENT_WRITABLE);
    cpu::reload_cr3();
}

/// Writes `bytes` at linear address `va` through the guest's mappings.
///
/// # Safety
/// `va .. va + bytes.len()` must be mapped, writable, and not in use.
pub unsafe fn write_linear(va: u64, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: the caller guarantees the range is mapped and unused.
        unsafe { ((va + i as u64) as *mut u8).write_volatile(b) }
    }
}

/// Reads one byte at a guest-physical (identity-mapped) address.
pub fn read_phys(pa: u64) -> u8 {
    assert!(pa < 1 << 30, "only the first 1 GiB is identity-mapped");
    // SAFETY: the first 1 GiB is identity-mapped; callers pass addresses in
    // guest RAM.
    unsafe { (pa as *const u8).read_volatile() }
}

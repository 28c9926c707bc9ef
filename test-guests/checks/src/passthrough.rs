//! The `passthrough` mode: checks that prove the pass-through layout from
//! the inside. thinvisor loads the guest at its own physical addresses on
//! the real machine and keeps one block of memory (high below 4 GiB) for
//! itself, hidden: the guest's memory map must not offer it, reads of it
//! see a zero filler page, writes to it are dropped. The guest owns the
//! rest of the machine: its other processors (`smp.rs`) and its interrupts
//! (`timer.rs`).
//!
//! thinvisor's block is learnt from thinvisor's own log (VMM call
//! `log_read`, docs/vmm-call.md): its boot log has the line
//! `thinvisor reserves N KiB at 0xSTART..0xEND`.

use crate::boot::BootInfo;
use crate::cpu::{self, vmm_call, Regs};
use crate::entry::{self, Page, TG_PML4};
use crate::{recover, smp, timer};
use core::arch::asm;
use core::cell::UnsafeCell;
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use thinvisor_abi as abi;

pub use crate::checks::{why, CheckResult, Why};

/// Returns from the check with a formatted reason.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::passthrough::why(format_args!($($arg)*)))
    };
}

/// Fails the check unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::passthrough::fail!($($arg)*);
        }
    };
}
pub(crate) use {ensure, fail};

// ------------------------------------------------------------ page tables

const PRESENT_WRITABLE: u64 = 0x3;
const LARGE: u64 = 0x80;
/// PWT and PCD: uncached, for device registers (SDM vol. 3A, 12.12.3).
const UNCACHED: u64 = 0x18;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Page directories for GiBs the entry code left unmapped.
#[repr(C, align(4096))]
struct SparePds(UnsafeCell<[Page; 4]>);
// SAFETY: used only by `map_identity_2m` on the BSP.
unsafe impl Sync for SparePds {}
static SPARE_PDS: SparePds = SparePds(UnsafeCell::new([[0; 512]; 4]));
static SPARE_USED: AtomicUsize = AtomicUsize::new(0);

/// Maps the 2 MiB page holding `pa` (below 512 GiB) identity and writable
/// in the guest's long-mode tables (`uncached` for device registers),
/// unless the entry code already did (0 .. 1 GiB); adds a page directory
/// for its GiB when there is none. Panics when the spare directories run
/// out or the slot maps something else.
pub fn map_identity_2m(pa: u64, uncached: bool) {
    assert!(pa < 1 << 39, "{pa:#x} is beyond PML4 slot 0");
    let base = pa & !0x1F_FFFF;
    let flags = PRESENT_WRITABLE | LARGE | if uncached { UNCACHED } else { 0 };
    // SAFETY: the entry code's tables are identity-mapped 4 KiB pages in
    // this image; one CPU changes them (the APs never use them).
    unsafe {
        let pml4 = addr_of_mut!(TG_PML4).cast::<u64>();
        let pdpt = (pml4.read_volatile() & ADDR_MASK) as *mut u64;
        let pdpte = pdpt.add(((pa >> 30) & 0x1FF) as usize);
        if pdpte.read_volatile() & 1 == 0 {
            let used = SPARE_USED.fetch_add(1, Relaxed);
            assert!(used < 4, "out of spare page directories");
            let pd = SPARE_PDS.0.get().cast::<Page>().add(used);
            pd.write_bytes(0, 1);
            pdpte.write_volatile(pd as u64 | PRESENT_WRITABLE);
        }
        let pd = (pdpte.read_volatile() & ADDR_MASK) as *mut u64;
        let pde = pd.add(((pa >> 21) & 0x1FF) as usize);
        let old = pde.read_volatile();
        if old & 1 != 0 {
            assert!(
                old & ADDR_MASK & !0x1F_FFFF == base && old & LARGE != 0,
                "{base:#x} is mapped to something else ({old:#x})"
            );
            if (old & UNCACHED != 0) == uncached {
                return;
            }
        }
        pde.write_volatile(base | flags);
        asm!("invlpg [{}]", in(reg) base, options(nostack, preserves_flags));
    }
}

// ------------------------------------------------------------ thinvisor's log

/// A buffer for thinvisor's log.
const LOG_BUF_LEN: usize = 16 * 1024;
#[repr(C, align(4096))]
struct LogBuf(UnsafeCell<[u8; LOG_BUF_LEN]>);
// SAFETY: one CPU; only `read_log` (and the VMM, during its call) writes it.
unsafe impl Sync for LogBuf {}
static LOG_BUF: LogBuf = LogBuf(UnsafeCell::new([0; LOG_BUF_LEN]));

/// Function 0 on `name`.
pub fn lookup(name: &str) -> u64 {
    let mut buf = [0u8; 64];
    buf[..name.len()].copy_from_slice(name.as_bytes());
    let mut r = Regs {
        rax: abi::FN_LOOKUP,
        rbx: buf.as_ptr() as u64,
        ..Regs::default()
    };
    vmm_call(&mut r);
    r.rax
}

/// thinvisor's log from the start of the stream (as much as fits).
pub fn read_log() -> Result<&'static [u8], Why> {
    let number = lookup(abi::names::LOG_READ);
    ensure!(number != 0, "lookup of \"log_read\" returned 0");
    let buf = LOG_BUF.0.get() as u64;
    let (n, first) = recover::vmm_call4(
        cpu::uses_vmcall(),
        number,
        buf,
        LOG_BUF_LEN as u64,
        0,
        recover::PF,
    )
    .map_err(|c| why(format_args!("log_read raised vector {}", c.vector)))?;
    ensure!(
        n != u64::MAX && n as usize <= LOG_BUF_LEN,
        "log_read({buf:#x}, {LOG_BUF_LEN}, 0) returned {n:#x}"
    );
    ensure!(
        first == 0,
        "the log's first {first} bytes have left the ring"
    );
    // SAFETY: the VMM wrote `n` bytes into the static buffer and is done.
    Ok(unsafe { core::slice::from_raw_parts(buf as *const u8, n as usize) })
}

/// Parses `0x` and hex digits at the start of `s`: (value, rest).
pub fn hex(s: &[u8]) -> Option<(u64, &[u8])> {
    let digits = s.strip_prefix(b"0x")?;
    let n = digits.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let text = core::str::from_utf8(&digits[..n]).ok()?;
    Some((u64::from_str_radix(text, 16).ok()?, &digits[n..]))
}

/// thinvisor's block, from the line `thinvisor reserves N KiB at
/// 0xSTART..0xEND` of its log.
pub fn thinvisor_block() -> Result<(u64, u64), Why> {
    const KEY: &[u8] = b"thinvisor reserves ";
    let log = read_log()?;
    let Some(at) = log.windows(KEY.len()).position(|w| w == KEY) else {
        fail!(
            "no \"thinvisor reserves\" line in {} bytes of thinvisor's log",
            log.len()
        )
    };
    let rest = &log[at + KEY.len()..];
    let kib_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let kib: u64 = core::str::from_utf8(&rest[..kib_len])
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let parsed = rest[kib_len..]
        .strip_prefix(b" KiB at ")
        .and_then(hex)
        .and_then(|(start, r)| Some((start, hex(r.strip_prefix(b"..")?)?.0)));
    let Some((start, end)) = parsed else {
        let line_len = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        fail!(
            "cannot parse \"thinvisor reserves {}\"",
            core::str::from_utf8(&rest[..line_len.min(60)]).unwrap_or("?")
        )
    };
    ensure!(
        start < end && end - start == kib << 10,
        "the block {start:#x}..{end:#x} is not {kib} KiB"
    );
    ensure!(
        start.is_multiple_of(4096) && end.is_multiple_of(4096),
        "the block {start:#x}..{end:#x} is not page-aligned"
    );
    Ok((start, end))
}

// ---------------------------------------------------------------- checks

/// Multiboot v1 info: flags bit 6, `mmap_length` at 44, `mmap_addr` at 48
/// (Multiboot Specification 0.6.96, 3.3).
const FLAG_MMAP: u32 = 1 << 6;
/// Memory map type of available RAM.
pub const MMAP_AVAILABLE: u32 = 1;

/// Reads a little-endian dword at a guest-physical address below 512 GiB
/// (identity-mapped by the entry code in the first GiB, by
/// `map_identity_2m` above).
fn phys32(pa: u64) -> u32 {
    if pa + 4 > 1 << 30 {
        map_identity_2m(pa, false);
        map_identity_2m(pa + 3, false);
    }
    // SAFETY: identity-mapped (above); the caller reads the loader's
    // information structure, which lies in RAM.
    unsafe { (pa as *const u32).read_unaligned() }
}

fn phys64(pa: u64) -> u64 {
    u64::from(phys32(pa)) | u64::from(phys32(pa + 4)) << 32
}

/// One memory map entry: (base, length, type).
pub type MmapEntry = (u64, u64, u32);

/// Entries of the memory map kept.
const MMAP_MAX: usize = 64;

/// The multiboot memory map the guest received, at most `MMAP_MAX`
/// entries.
pub fn memory_map() -> Result<([MmapEntry; MMAP_MAX], usize), Why> {
    let copy = entry::boot_copy();
    ensure!(
        copy.magic == crate::boot::MULTIBOOT_MAGIC && copy.info != 0,
        "not entered by a multiboot loader"
    );
    ensure!(
        copy.flags & FLAG_MMAP != 0,
        "the multiboot information has no memory map (flags {:#x})",
        copy.flags
    );
    let info = u64::from(copy.info);
    let (len, addr) = (u64::from(phys32(info + 44)), u64::from(phys32(info + 48)));
    ensure!(
        addr + len <= 1 << 39,
        "the memory map at {addr:#x} lies beyond 512 GiB"
    );
    let mut entries = [(0, 0, 0); MMAP_MAX];
    let mut n = 0;
    let mut at = addr;
    while at + 24 <= addr + len {
        let size = u64::from(phys32(at));
        ensure!(size >= 20, "memory map entry at {at:#x} has size {size}");
        ensure!(
            n < entries.len(),
            "more than {} memory map entries",
            entries.len()
        );
        entries[n] = (phys64(at + 4), phys64(at + 12), phys32(at + 20));
        n += 1;
        at += size + 4;
    }
    ensure!(n > 0, "the memory map at {addr:#x} ({len} bytes) is empty");
    Ok((entries, n))
}

/// `mmap_hides_thinvisor`: no available entry of the guest's multiboot
/// memory map overlaps thinvisor's block (a map that ends below it, or
/// one that lists it reserved, both pass).
fn mmap_hides_thinvisor() -> CheckResult {
    let (start, end) = thinvisor_block()?;
    let (entries, n) = memory_map()?;
    let available_end = entries[..n]
        .iter()
        .filter(|e| e.2 == MMAP_AVAILABLE)
        .map(|e| e.0 + e.1)
        .max()
        .unwrap_or(0);
    say!(
        "test-guest: thinvisor's block {start:#x}..{end:#x}; memory map: {n} entries, available up to {available_end:#x}"
    );
    for &(base, len, kind) in &entries[..n] {
        ensure!(
            kind != MMAP_AVAILABLE || base + len <= start || base >= end,
            "available entry {base:#x}..{:#x} overlaps thinvisor's {start:#x}..{end:#x}",
            base + len
        );
    }
    Ok(())
}

/// Maps thinvisor's block where the entry code's first GiB does not
/// reach; returns it.
fn mapped_block() -> Result<(u64, u64), Why> {
    let (start, end) = thinvisor_block()?;
    ensure!(
        end <= 1 << 39,
        "the block {start:#x}..{end:#x} lies beyond 512 GiB"
    );
    let mut pa = start & !0x1F_FFFF;
    while pa < end {
        map_identity_2m(pa, false);
        pa += 0x20_0000;
    }
    Ok((start, end))
}

/// `hidden_reads_filler`: every 4 KiB page of thinvisor's block reads as
/// zeros (the filler page thinvisor maps there read-only), every
/// quadword of it.
fn hidden_reads_filler() -> CheckResult {
    let (start, end) = mapped_block()?;
    for page in (start..end).step_by(4096) {
        for off in (0..4096).step_by(8) {
            // SAFETY: the block is identity-mapped (`mapped_block`);
            // reading it must be harmless, which is what is checked.
            let v = unsafe { ((page + off) as *const u64).read_volatile() };
            ensure!(
                v == 0,
                "thinvisor's memory shows through: {v:#x} at {:#x}",
                page + off
            );
        }
    }
    say!(
        "test-guest: {} pages of thinvisor's block read as zeros",
        (end - start) / 4096
    );
    Ok(())
}

/// What one store of `hidden_writes_dropped` did: how many times the
/// instruction after it ran (1 when the VMM skipped exactly the store).
fn store(kind: usize, page: u64, value: u32) -> u64 {
    let mut after = 0u64;
    // SAFETY: the page is thinvisor's hidden block, identity-mapped; the
    // VMM must drop the store and skip the instruction (or stop the run).
    // Only `page`, `value` and `after` are touched.
    unsafe {
        match kind {
            0 => asm!("mov dword ptr [{p}], {v:e}", "inc {a}",
                      p = in(reg) page, v = in(reg) value, a = inout(reg) after, options(nostack)),
            1 => asm!("mov dword ptr [{p} + 0x10], {v:e}", "inc {a}",
                      p = in(reg) page, v = in(reg) value, a = inout(reg) after, options(nostack)),
            2 => asm!("mov dword ptr [{p} + 0x400], {v:e}", "inc {a}",
                      p = in(reg) page, v = in(reg) value, a = inout(reg) after, options(nostack)),
            3 => asm!("mov dword ptr [{p} + {i} * 4 + 0x20], {v:e}", "inc {a}",
                      p = in(reg) page, i = in(reg) 3u64, v = in(reg) value,
                      a = inout(reg) after, options(nostack)),
            4 => asm!("mov dword ptr [{p}], 0x5A5A5A5A", "inc {a}",
                      p = in(reg) page, a = inout(reg) after, options(nostack)),
            _ => asm!("mov dword ptr [{p} + 0x800], 0x12345678", "inc {a}",
                      p = in(reg) page, a = inout(reg) after, options(nostack)),
        }
    }
    after
}

/// The stores: addressing form and the offsets they write.
const STORES: [(&str, &[u64]); 6] = [
    ("mov [reg], reg", &[0]),
    ("mov [reg+disp8], reg", &[0x10]),
    ("mov [reg+disp32], reg", &[0x400]),
    ("mov [reg+reg*4+disp8], reg", &[0x2C]),
    ("mov [reg], imm32", &[0]),
    ("mov [reg+disp32], imm32", &[0x800]),
];

/// `hidden_writes_dropped`: dword stores (register and immediate sources,
/// several addressing forms) into the first, a middle and the last page
/// of thinvisor's block do not stick, and the guest continues right after
/// each (the instruction after it runs once). thinvisor must drop the
/// write and skip the instruction; without that it stops the run on the
/// first store, which is why this check runs last.
fn hidden_writes_dropped() -> CheckResult {
    let (start, end) = mapped_block()?;
    let pages = [start, start + (((end - start) / 2) & !0xFFF), end - 4096];
    for page in pages {
        for (kind, (form, offsets)) in STORES.iter().enumerate() {
            let after = store(kind, page, 0xC0DE_0000 | kind as u32);
            ensure!(
                after == 1,
                "after `{form}` to {page:#x} the next instruction ran {after} times"
            );
            for &off in *offsets {
                // SAFETY: identity-mapped (`mapped_block`).
                let v = unsafe { ((page + off) as *const u32).read_volatile() };
                ensure!(
                    v == 0,
                    "`{form}` to {:#x} stuck: reads back {v:#x}",
                    page + off
                );
            }
        }
    }
    say!(
        "test-guest: {} stores into thinvisor's block dropped",
        pages.len() * STORES.len()
    );
    Ok(())
}

/// `log_set_buf_refused`: see `logbuf::refused_around_block`.
fn log_set_buf_refused() -> CheckResult {
    crate::logbuf::refused_around_block()
}

/// One check: its reported name and its body.
type Check = (&'static str, fn() -> CheckResult);

/// The checks, in report order; the writes last (see
/// `hidden_writes_dropped`).
const CHECKS: [Check; 11] = [
    ("mmap_hides_thinvisor", mmap_hides_thinvisor),
    ("log_set_buf_refused", log_set_buf_refused),
    ("hidden_reads_filler", hidden_reads_filler),
    ("apic_base_guarded", crate::guarded::apic_base_guarded),
    ("mtrr_guarded", crate::guarded::mtrr_guarded),
    ("pat_guarded", crate::guarded::pat_guarded),
    ("lvt_init_dropped", crate::guarded::lvt_init_dropped),
    ("timer_wakes_hlt", timer::timer_wakes_hlt),
    ("aps_start", smp::aps_start),
    ("pci_bar_guarded", crate::pci::pci_bar_guarded),
    ("hidden_writes_dropped", hidden_writes_dropped),
];

/// Runs every check, prints the summary and ends the run.
pub fn run_all(_boot: &BootInfo) -> ! {
    for (name, check) in CHECKS {
        crate::checks::run_one(name, check);
    }
    crate::checks::finish()
}

//! The `loader` mode: the test guest starts thinvisor itself, as
//! thinvisor.efi does under UEFI, and goes on running as its guest
//! (crates/handoff, the resume tag of crates/boot/src/resume.rs).
//!
//! A multiboot v1 loader boots the test guest *without* thinvisor, with
//! thinvisor.elf (the ELF64) as its first module. Bare, the mode
//! 1. finds room: thinvisor's image range ([`Plan::range`], where its
//!    segments must lie), a block for thinvisor (`BLOCK_SIZE`, 2 MiB
//!    aligned, as high as the memory map allows below 1 GiB, which the
//!    entry code maps) and scratch space for a copy of the module, all
//!    away from this image, the modules, the multiboot information and
//!    the low 1 MiB ([`thinvisor_handoff::layout::highest_free`]);
//! 2. copies the module to the scratch space (a loader may have put it
//!    inside the image range) and loads the image ([`Plan::load`]);
//! 3. builds thinvisor's multiboot2 information: the command line (what
//!    follows `--` on its own, default `log=info`), its own multiboot
//!    memory map as it is, the ACPI RSDP when it finds one, and the
//!    resume tag with the block and the RSDP;
//! 4. masks the PICs, adds its timer gate to its IDT, enables its local
//!    APIC, sets recognizable FS/GS bases, KERNEL_GS_BASE and PAT, writes
//!    the switch's low page ([`switch::prepare`]), turns interrupts on,
//!    loads patterns into the callee-saved registers, and calls
//!    [`switch::thinvisor_handoff_enter`] from assembly (no Rust frame in
//!    between that could save those registers itself).
//!
//! When the call returns, thinvisor has resumed the guest: the checks
//! (`resume_*`) compare the state with the snapshot taken before the
//! call, make VMM calls, take an interrupt through the unchanged IDT,
//! read thinvisor's block (zeros: hidden) and, when the MADT lists more
//! than one processor, start the APs with INIT-SIPI-SIPI (`smp.rs`):
//! thinvisor holds them and must run them as its guest too.
//!
//! Before thinvisor reads the resume tag, it boots as from any multiboot2
//! loader and stops for want of a guest module; that run shows the
//! handoff itself worked (its log has the command line and the map).
//!
//! `loader nojump` does everything but the jump (the call returns 0 at
//! once): the checks then run bare, which tests them. Those about the
//! state, the interrupt and the callee-saved registers must pass; those
//! that need thinvisor must fail.

use crate::boot::BootInfo;
use crate::checks::{finish, run_one};
use crate::cpu;
use crate::entry;
use crate::passthrough::{self, ensure, fail, why, CheckResult, MmapEntry, Why};
use crate::timer::{self, pit_delay_us, Lapic, TIMER_VECTOR};
use crate::{global, recover, smp};
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
use thinvisor_abi as abi;
use thinvisor_boot::resume::{ResumeState, RESUME_VERSION};
use thinvisor_handoff::image::Plan;
use thinvisor_handoff::info::{InfoBuilder, Region};
use thinvisor_handoff::layout::{highest_free, Range};
use thinvisor_handoff::switch;

/// thinvisor's block: enough for its image, heap and two processors.
const BLOCK_SIZE: u64 = 8 << 20;
const BLOCK_ALIGN: u64 = 2 << 20;
/// Everything the loader picks lies below this: the entry code's identity
/// map (and so below 4 GiB, as the 32-bit entry needs).
const LIMIT: u64 = 1 << 30;
const PAGE: u64 = 4096;
/// The ICR's low dword for a fixed interrupt to this processor itself:
/// destination shorthand "self" (bits 19:18 = 01), level assert (SDM vol.
/// 3A, 11.6.1).
const ICR_SELF: u32 = 0x0004_4000;

/// Values the loader puts in the registers and MSRs it must find again.
const FS_BASE_VALUE: u64 = 0x0000_0000_1234_5000;
const GS_BASE_VALUE: u64 = 0xFFFF_8000_0ABC_D000;
const KERNEL_GS_BASE_VALUE: u64 = 0x0000_7FFF_F000_0000;
/// PAT entries 0-3 as at reset (WB, WT, UC-, UC: the entry code's tables
/// use 0 and 3), 4 WC and 5 WP instead of the reset's WB and WT (SDM vol.
/// 3A, 13.12.2).
const PAT_VALUE: u64 = 0x0007_0501_0007_0406;
/// RBX, RBP, R12, R13, R14, R15 across the call.
const CALLEE_SAVED: [u64; 6] = [
    0x5EED_0BB0_0000_0003,
    0x5EED_0BB0_0000_0005,
    0x5EED_0BB0_0000_000C,
    0x5EED_0BB0_0000_000D,
    0x5EED_0BB0_0000_000E,
    0x5EED_0BB0_0000_000F,
];
/// What the loader writes into the block before the call (xor the
/// address).
const BLOCK_PATTERN: u64 = 0xB10C_B10C_0000_0000;
const CALLEE_NAMES: [&str; 6] = ["rbx", "rbp", "r12", "r13", "r14", "r15"];

/// thinvisor's CPUID signature leaf.
const CPUID_LEAF: u32 = 0x4000_0000;

const MSR_EFER: u32 = 0xC000_0080;
const MSR_FS_BASE: u32 = 0xC000_0100;
const MSR_GS_BASE: u32 = 0xC000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xC000_0102;
const MSR_PAT: u32 = 0x277;

// ------------------------------------------------------------ memory

/// The low page of the switch and thinvisor's multiboot2 information:
/// in this image (below 2 MiB: identity-mapped, executable, and below
/// where thinvisor's image goes).
#[repr(C, align(4096))]
struct Handoff {
    low_page: [u8; 4096],
    info: [u8; 8192],
}

struct Shared(UnsafeCell<Handoff>);
// SAFETY: one processor uses it, before the APs are started.
unsafe impl Sync for Shared {}
static HANDOFF: Shared = Shared(UnsafeCell::new(Handoff {
    low_page: [0; 4096],
    info: [0; 8192],
}));

unsafe extern "C" {
    static __image_start: u8;
    /// The hostile mode's buffers, last in `.bss` (linker.ld): this mode
    /// does not use them, so thinvisor's image may be loaded over them.
    static __hostile_start: u8;
}

/// Reads a dword at a physical address below 1 GiB (identity-mapped).
fn phys32(pa: u64) -> u32 {
    assert!(pa + 4 <= LIMIT, "{pa:#x} is beyond the identity map");
    // SAFETY: identity-mapped RAM or firmware tables, read only.
    unsafe { (pa as *const u32).read_unaligned() }
}

/// A multiboot v1 module: [start, end).
#[derive(Clone, Copy, Default)]
struct Module {
    start: u64,
    end: u64,
}

/// Multiboot v1 info flags bit 3: `mods_count` (offset 20) and
/// `mods_addr` (24), 16-byte entries (Multiboot Specification 0.6.96, 3.3).
const FLAG_MODS: u32 = 1 << 3;
const MAX_MODULES: usize = 4;

fn modules() -> Result<([Module; MAX_MODULES], usize), Why> {
    let copy = entry::boot_copy();
    ensure!(
        copy.magic == crate::boot::MULTIBOOT_MAGIC && copy.info != 0,
        "not entered by a multiboot loader"
    );
    ensure!(
        copy.flags & FLAG_MODS != 0,
        "no modules in the multiboot information (flags {:#x}): pass thinvisor.elf as one",
        copy.flags
    );
    let info = u64::from(copy.info);
    let count = phys32(info + 20) as usize;
    let addr = u64::from(phys32(info + 24));
    ensure!(
        count > 0,
        "the loader passed no module: pass thinvisor.elf as one"
    );
    let mut out = [Module::default(); MAX_MODULES];
    let n = count.min(MAX_MODULES);
    for (i, m) in out[..n].iter_mut().enumerate() {
        let at = addr + 16 * i as u64;
        *m = Module {
            start: u64::from(phys32(at)),
            end: u64::from(phys32(at + 4)),
        };
        ensure!(
            m.start < m.end && m.end <= LIMIT,
            "module {i} at {:#x}..{:#x} is empty or beyond the identity map",
            m.start,
            m.end
        );
    }
    Ok((out, n))
}

/// The ACPI RSDP (ACPI 6.5, 5.2.5.1): in the EBDA's first KiB or in
/// 0xE0000..0x100000, on 16-byte boundaries, with a valid checksum over
/// its first 20 bytes (and over `length` bytes from revision 2 on).
fn find_rsdp() -> Option<(u64, usize)> {
    let ebda = u64::from(phys32(0x40E) & 0xFFFF) << 4;
    let areas = [(ebda, ebda + 1024), (0xE_0000, 0x10_0000)];
    for (start, end) in areas {
        if start < 0x8_0000 || end > 0x10_0000 {
            continue;
        }
        for at in (start..end - 36).step_by(16) {
            // SAFETY: low memory (BIOS area), identity-mapped, read only.
            let bytes = unsafe { core::slice::from_raw_parts(at as *const u8, 36) };
            if &bytes[..8] != b"RSD PTR " || sum(&bytes[..20]) != 0 {
                continue;
            }
            if bytes[15] < 2 {
                return Some((at, 20));
            }
            let len = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]) as usize;
            if (36..=1024).contains(&len) && at + len as u64 <= end {
                // SAFETY: as above, `len` bytes inside the area.
                let all = unsafe { core::slice::from_raw_parts(at as *const u8, len) };
                if sum(all) == 0 {
                    return Some((at, len));
                }
            }
        }
    }
    None
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// Processors the MADT lists as enabled or online-capable (ACPI 6.5,
/// 5.2.12: Processor Local APIC entries, type 0, flags at 4; Local x2APIC,
/// type 9, flags at 8), found through the RSDT or XSDT; `None` without a
/// readable MADT.
fn madt_processors(rsdp: u64) -> Option<usize> {
    let revision = phys32(rsdp + 12) >> 24;
    let (root, entry_size) = if revision >= 2 && phys32(rsdp + 28) == 0 {
        (u64::from(phys32(rsdp + 24)), 8)
    } else {
        (u64::from(phys32(rsdp + 16)), 4)
    };
    if root == 0 || root + 36 > LIMIT {
        return None;
    }
    let root_len = u64::from(phys32(root + 4));
    let mut at = root + 36;
    while at + entry_size <= root + root_len.min(4096) {
        let table = if entry_size == 8 {
            u64::from(phys32(at)) | u64::from(phys32(at + 4)) << 32
        } else {
            u64::from(phys32(at))
        };
        at += entry_size;
        if table == 0 || table + 44 > LIMIT || phys32(table) != u32::from_le_bytes(*b"APIC") {
            continue;
        }
        let len = u64::from(phys32(table + 4)).min(64 * 1024);
        let mut count = 0;
        let mut e = table + 44;
        while e + 2 <= table + len {
            let word = phys32(e);
            let (ty, elen) = (word & 0xFF, u64::from((word >> 8) & 0xFF));
            if elen < 2 {
                break;
            }
            let flags = match ty {
                0 if elen >= 8 => phys32(e + 4),
                9 if elen >= 16 => phys32(e + 8),
                _ => 0,
            };
            if flags & 0b11 != 0 {
                count += 1;
            }
            e += elen;
        }
        return Some(count);
    }
    None
}

// ------------------------------------------------------------ state

/// What the checks compare across the call.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Snapshot {
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    gdtr: (u16, u64),
    idtr: (u16, u64),
    /// CS, SS, DS, ES, FS, GS, TR, LDTR.
    selectors: [u16; 8],
    rflags: u64,
    fs_base: u64,
    gs_base: u64,
    kernel_gs_base: u64,
    pat: u64,
}

const SELECTOR_NAMES: [&str; 8] = ["cs", "ss", "ds", "es", "fs", "gs", "tr", "ldtr"];
const RFLAGS_IF: u64 = 1 << 9;

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the MSRs read here exist on every 64-bit processor (EFER,
    // the segment bases, PAT: SDM vol. 4, table 2-2); RDMSR only reads.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,
             options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// # Safety
/// The MSR exists and the value changes nothing the guest relies on.
unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: passed on from the caller.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack, preserves_flags))
    };
}

fn snapshot() -> Snapshot {
    let mut s = Snapshot::default();
    let mut table = [0u8; 10];
    let (cr3, rflags): (u64, u64);
    let mut sel = [0u16; 8];
    // SAFETY: reads of control registers, descriptor-table registers,
    // selectors and RFLAGS; SGDT/SIDT write the 10 bytes of `table`.
    unsafe {
        asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags));
        asm!("pushfq", "pop {}", out(reg) rflags, options(nomem, preserves_flags));
        asm!("sgdt [{}]", in(reg) table.as_mut_ptr(), options(nostack, preserves_flags));
        s.gdtr = (
            u16::from_le_bytes([table[0], table[1]]),
            u64::from_le_bytes(table[2..10].try_into().unwrap_or_default()),
        );
        asm!("sidt [{}]", in(reg) table.as_mut_ptr(), options(nostack, preserves_flags));
        s.idtr = (
            u16::from_le_bytes([table[0], table[1]]),
            u64::from_le_bytes(table[2..10].try_into().unwrap_or_default()),
        );
        asm!("mov {:x}, cs", out(reg) sel[0], options(nomem, nostack, preserves_flags));
        asm!("mov {:x}, ss", out(reg) sel[1], options(nomem, nostack, preserves_flags));
        asm!("mov {:x}, ds", out(reg) sel[2], options(nomem, nostack, preserves_flags));
        asm!("mov {:x}, es", out(reg) sel[3], options(nomem, nostack, preserves_flags));
        asm!("mov {:x}, fs", out(reg) sel[4], options(nomem, nostack, preserves_flags));
        asm!("mov {:x}, gs", out(reg) sel[5], options(nomem, nostack, preserves_flags));
        asm!("str {:x}", out(reg) sel[6], options(nomem, nostack, preserves_flags));
        asm!("sldt {:x}", out(reg) sel[7], options(nomem, nostack, preserves_flags));
    }
    s.cr0 = cpu::read_cr0();
    s.cr3 = cr3;
    s.cr4 = cpu::read_cr4();
    s.efer = rdmsr(MSR_EFER);
    s.selectors = sel;
    s.rflags = rflags;
    s.fs_base = rdmsr(MSR_FS_BASE);
    s.gs_base = rdmsr(MSR_GS_BASE);
    s.kernel_gs_base = rdmsr(MSR_KERNEL_GS_BASE);
    s.pat = rdmsr(MSR_PAT);
    s
}

// The call into thinvisor with the callee-saved registers set to
// `CALLEE_SAVED` and read back right after it returns (SysV AMD64 ABI,
// 3.2.1: RBX, RBP, R12-R15 belong to the caller), so only thinvisor's
// resume stands between the two. Arguments: RDI state, RSI low page,
// EDX entry, ECX info (as `thinvisor_handoff_enter`), R8 where the six
// registers go, R9 the function to call (`thinvisor_handoff_enter`, or
// `tg_loader_nojump` for a run without the jump). Seven pushes keep RSP
// 16-byte aligned at the call.
global_asm!(
    ".section .text.tg_loader, \"ax\"",
    ".global tg_loader_call",
    "tg_loader_call:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push r8",
    "movabs rbx, {p0}",
    "movabs rbp, {p1}",
    "movabs r12, {p2}",
    "movabs r13, {p3}",
    "movabs r14, {p4}",
    "movabs r15, {p5}",
    "call r9",
    "pop r8",
    "mov [r8], rbx",
    "mov [r8 + 8], rbp",
    "mov [r8 + 16], r12",
    "mov [r8 + 24], r13",
    "mov [r8 + 32], r14",
    "mov [r8 + 40], r15",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    // `nojump`: the call returns 0 at once, as if thinvisor had resumed.
    ".global tg_loader_nojump",
    "tg_loader_nojump:",
    "xor eax, eax",
    "ret",
    ".text",
    p0 = const CALLEE_SAVED[0],
    p1 = const CALLEE_SAVED[1],
    p2 = const CALLEE_SAVED[2],
    p3 = const CALLEE_SAVED[3],
    p4 = const CALLEE_SAVED[4],
    p5 = const CALLEE_SAVED[5],
);

unsafe extern "sysv64" {
    fn tg_loader_call(
        state: *mut ResumeState,
        low_page: u64,
        entry: u32,
        info: u32,
        out: *mut [u64; 6],
        function: unsafe extern "sysv64" fn(*mut ResumeState, u64, u32, u32) -> u64,
    ) -> u64;
    fn tg_loader_nojump(state: *mut ResumeState, low_page: u64, entry: u32, info: u32) -> u64;
}

// ------------------------------------------------------------ preparation

/// What the bare part set up.
struct Prepared {
    entry: u32,
    info: u32,
    state: *mut ResumeState,
    low_page: u64,
    block: Range,
    processors: Option<usize>,
    lapic: Lapic,
}

/// The command line for thinvisor: what follows `--` in the guest's own.
fn thinvisor_cmdline(own: &str) -> &str {
    match own.split_once(" -- ") {
        Some((_, rest)) if !rest.trim().is_empty() => rest.trim(),
        _ => "log=info",
    }
}

fn prepare(boot: &BootInfo) -> Result<Prepared, Why> {
    let (mods, n_mods) = modules()?;
    let module = mods[0];
    let (map, n_map) = passthrough::memory_map()?;
    let regions: [Region; 64] = core::array::from_fn(|i| {
        let (start, len, kind): MmapEntry = map[i];
        Region { start, len, kind }
    });
    let regions = &regions[..n_map];

    // The module as it lies: its program headers say where it goes.
    // SAFETY: the module is RAM the loader filled, identity-mapped
    // (checked below the limit), and nothing writes it while it is read.
    let file = unsafe {
        core::slice::from_raw_parts(
            module.start as *const u8,
            (module.end - module.start) as usize,
        )
    };
    let plan = Plan::of(file).map_err(|e| why(format_args!("module 0: {e}")))?;
    let image = plan.range();

    // What must survive the load: this image but the hostile buffers,
    // the multiboot information.
    let own = (
        addr_of!(__image_start) as u64,
        (addr_of!(__hostile_start) as u64).next_multiple_of(PAGE),
    );
    let copy = entry::boot_copy();
    let info_v1 = u64::from(copy.info) & !(PAGE - 1);
    let mmap = (
        u64::from(phys32(u64::from(copy.info) + 48)),
        u64::from(phys32(u64::from(copy.info) + 48)) + u64::from(phys32(u64::from(copy.info) + 44)),
    );
    let mut keep: [Range; 3 + MAX_MODULES] = [(0, 0); 3 + MAX_MODULES];
    keep[0] = own;
    keep[1] = (info_v1, info_v1 + PAGE);
    keep[2] = mmap;
    for (name, range) in [
        ("this image", own),
        ("the multiboot information", keep[1]),
        ("the memory map", mmap),
    ] {
        ensure!(
            range.1 <= image.0 || range.0 >= image.1,
            "thinvisor's image {:#x}..{:#x} overlaps {name} {:#x}..{:#x}",
            image.0,
            image.1,
            range.0,
            range.1
        );
    }
    for (i, m) in mods[..n_mods].iter().enumerate() {
        keep[3 + i] = (m.start & !(PAGE - 1), m.end.next_multiple_of(PAGE));
    }
    // Busy for the block and the scratch copy: the low 1 MiB, all of
    // this image, the modules, the information, thinvisor's image range,
    // and the 2 MiB test frames at 16 and 32 MiB (`paging.rs`).
    let mut busy: [Range; 9 + MAX_MODULES] = [(0, 0); 9 + MAX_MODULES];
    busy[0] = (0, 1 << 20);
    busy[1] = (own.0, image_end());
    busy[2] = keep[1];
    busy[3] = keep[2];
    busy[4] = image;
    busy[5] = (0x100_0000, 0x120_0000);
    busy[6] = (0x200_0000, 0x220_0000);
    busy[9..9 + n_mods].copy_from_slice(&keep[3..3 + n_mods]);
    let Some(block_start) = highest_free(regions, &busy, BLOCK_SIZE, BLOCK_ALIGN, LIMIT) else {
        fail!("no room for a {} MiB block below 1 GiB", BLOCK_SIZE >> 20)
    };
    let block = (block_start, block_start + BLOCK_SIZE);
    busy[7] = block;
    let scratch_len = (module.end - module.start).next_multiple_of(PAGE);
    let Some(scratch) = highest_free(regions, &busy, scratch_len, PAGE, LIMIT) else {
        fail!(
            "no room for a {} KiB copy of thinvisor.elf",
            scratch_len >> 10
        )
    };
    say!(
        "test-guest: loader: thinvisor.elf at {:#x}..{:#x}, image {:#x}..{:#x} (entry {:#x}); block {:#x}..{:#x}; copied through {:#x}",
        module.start,
        module.end,
        image.0,
        image.1,
        plan.entry,
        block.0,
        block.1,
        scratch
    );

    // SAFETY: scratch lies in available RAM no one uses (busy list
    // above), identity-mapped below LIMIT, disjoint from the module.
    let copy = unsafe {
        core::ptr::copy_nonoverlapping(file.as_ptr(), scratch as *mut u8, file.len());
        core::slice::from_raw_parts(scratch as *const u8, file.len())
    };
    plan.load(copy, |pa, bytes| {
        // SAFETY: the image range is RAM that overlaps nothing this
        // guest keeps (checked above), identity-mapped below LIMIT.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), pa as *mut u8, bytes.len()) }
    });

    // The block holds a pattern until thinvisor takes it: a page that
    // still shows it afterwards was neither used nor hidden.
    for q in (block.0..block.1).step_by(8) {
        // SAFETY: the block is free RAM (busy list above), identity-mapped.
        unsafe { (q as *mut u64).write_volatile(BLOCK_PATTERN ^ q) };
    }

    let rsdp = find_rsdp();
    let processors = rsdp.and_then(|(at, _)| madt_processors(at));
    match rsdp {
        Some((at, len)) => say!(
            "test-guest: loader: RSDP at {at:#x} ({len} bytes), {} processors in the MADT",
            processors.map_or(0, |n| n)
        ),
        None => say!("test-guest: loader: no RSDP found"),
    }

    let handoff = HANDOFF.0.get();
    // SAFETY: one processor, nothing else refers to HANDOFF.
    let info_buf = unsafe { &mut *addr_of_mut!((*handoff).info) };
    let info_pa = info_buf.as_ptr() as u64;
    let too_small = |_| why(format_args!("the information does not fit in 8 KiB"));
    let mut b = InfoBuilder::new(info_buf).map_err(too_small)?;
    let cmdline = thinvisor_cmdline(boot.cmdline());
    b.cmdline(cmdline).map_err(too_small)?;
    b.memory_map(regions).map_err(too_small)?;
    if let Some((at, len)) = rsdp {
        // SAFETY: the RSDP found above, `len` checked bytes.
        let bytes = unsafe { core::slice::from_raw_parts(at as *const u8, len) };
        b.rsdp(bytes).map_err(too_small)?;
    }
    let state = ResumeState {
        version: RESUME_VERSION,
        size: core::mem::size_of::<ResumeState>() as u32,
        block_start: block.0,
        block_end: block.1,
        rsdp: rsdp.map_or(0, |r| r.0),
        ..ResumeState::default()
    };
    b.resume(&state).map_err(too_small)?;
    let (len, resume_at) = b.finish().map_err(too_small)?;
    let Some(resume_at) = resume_at else {
        fail!("the builder lost the resume tag")
    };
    say!(
        "test-guest: loader: information at {info_pa:#x} ({len} bytes), thinvisor's command line \"{cmdline}\""
    );
    let lapic = Lapic::find()?;
    Ok(Prepared {
        entry: plan.entry,
        info: info_pa as u32,
        state: (info_pa + resume_at as u64) as *mut ResumeState,
        low_page: handoff as u64 + core::mem::offset_of!(Handoff, low_page) as u64,
        block,
        processors,
        lapic,
    })
}

/// The end of this image (its last `.bss` page).
fn image_end() -> u64 {
    unsafe extern "C" {
        static __image_end: u8;
    }
    addr_of!(__image_end) as u64
}

// ------------------------------------------------------------ the mode

/// Runs the mode; never returns.
pub fn run(boot: &BootInfo) -> ! {
    global::set_current_check("loader_prepare");
    let p = match prepare(boot) {
        Ok(p) => p,
        Err(w) => {
            say!("FAIL loader_prepare: {}", w.as_str());
            global::record(false);
            finish()
        }
    };
    // The state to find again.
    timer::install_for_loader(&p.lapic);
    p.lapic.enable();
    // SAFETY: the MSRs exist in long mode; nothing in this guest uses
    // FS/GS bases or PAT entries 4-7 (its tables use entries 0 and 3).
    unsafe {
        wrmsr(MSR_FS_BASE, FS_BASE_VALUE);
        wrmsr(MSR_GS_BASE, GS_BASE_VALUE);
        wrmsr(MSR_KERNEL_GS_BASE, KERNEL_GS_BASE_VALUE);
        wrmsr(MSR_PAT, PAT_VALUE);
    }
    // SAFETY: the low page is this image's own, below 2 MiB:
    // identity-mapped, writable, executable (the entry code's 2 MiB pages
    // have no NX), used for nothing else.
    unsafe { switch::prepare(p.low_page) };
    let nojump = boot
        .cmdline()
        .split(" -- ")
        .next()
        .is_some_and(|own| own.split_ascii_whitespace().any(|t| t == "nojump"));
    if nojump {
        say!("test-guest: loader: nojump: not entering thinvisor, the checks run bare");
    } else {
        say!("test-guest: loader: entering thinvisor at {:#x}", p.entry);
    }
    crate::console::drain();
    // Interrupts on across the call: the PICs are masked and the local
    // APIC timer is off, so nothing arrives, but thinvisor must give
    // RFLAGS.IF back.
    // SAFETY: STI; every source that could interrupt is masked.
    unsafe { asm!("sti", options(nomem, nostack)) };
    let before = snapshot();
    let mut callee = [0u64; 6];
    // SAFETY: `prepare` loaded thinvisor's image where it belongs and
    // built its information in this image's static memory (below 4 GiB,
    // identity-mapped), `state` points at the resume tag's payload in it,
    // `low_page` is a page of this image; this is the BSP in 64-bit mode
    // at CPL 0, and the only processor running.
    let returned = unsafe {
        let function = if nojump {
            tg_loader_nojump
        } else {
            switch::thinvisor_handoff_enter
        };
        tg_loader_call(p.state, p.low_page, p.entry, p.info, &mut callee, function)
    };
    let after = snapshot();
    // SAFETY: CLI only masks interrupts.
    unsafe { asm!("cli", options(nomem, nostack)) };
    say!("test-guest: loader: back from thinvisor (returned {returned:#x})");
    // SAFETY: the payload thinvisor resumed from, in this image.
    let recorded = unsafe { p.state.read_volatile() };
    say!(
        "test-guest: loader: recorded rip {:#x} rsp {:#x} cr3 {:#x} efer {:#x}",
        recorded.rip,
        recorded.gprs[4],
        recorded.cr3,
        recorded.efer
    );

    run_one("resume_returned", || {
        ensure!(returned == 0, "switch returned {returned:#x}, not 0");
        Ok(())
    });
    run_one("resume_cpuid_signature", resume_cpuid_signature);
    let answers = lookup(abi::names::DBGSH).is_ok();
    run_one("resume_lookup_dbgsh", || {
        lookup(abi::names::DBGSH).map(|_| ())
    });
    // The checks below make VMM calls that are not recoverable (a #UD
    // would end the run): they run only when thinvisor answered.
    let needs_thinvisor = |check: fn() -> CheckResult| -> CheckResult {
        ensure!(answers, "no VMM call answers (see resume_lookup_dbgsh)");
        check()
    };
    run_one("resume_control_registers", || {
        same("cr0", before.cr0, after.cr0)?;
        same("cr3", before.cr3, after.cr3)?;
        same("cr4", before.cr4, after.cr4)?;
        same("efer", before.efer, after.efer)
    });
    run_one("resume_descriptor_tables", || {
        same("gdtr limit", before.gdtr.0.into(), after.gdtr.0.into())?;
        same("gdtr base", before.gdtr.1, after.gdtr.1)?;
        same("idtr limit", before.idtr.0.into(), after.idtr.0.into())?;
        same("idtr base", before.idtr.1, after.idtr.1)?;
        for (i, name) in SELECTOR_NAMES.iter().enumerate() {
            same(name, before.selectors[i].into(), after.selectors[i].into())?;
        }
        Ok(())
    });
    run_one("resume_rflags_if", || {
        ensure!(
            before.rflags & RFLAGS_IF != 0,
            "IF was not set before the call"
        );
        ensure!(
            after.rflags & RFLAGS_IF != 0,
            "IF clear after the call (rflags {:#x}, before {:#x})",
            after.rflags,
            before.rflags
        );
        Ok(())
    });
    run_one("resume_msrs", || {
        same("fs base", FS_BASE_VALUE, after.fs_base)?;
        same("gs base", GS_BASE_VALUE, after.gs_base)?;
        same("kernel gs base", KERNEL_GS_BASE_VALUE, after.kernel_gs_base)?;
        same("pat", PAT_VALUE, after.pat)?;
        same("pat before", PAT_VALUE, before.pat)
    });
    run_one("resume_callee_saved", || {
        for (i, name) in CALLEE_NAMES.iter().enumerate() {
            same(name, CALLEE_SAVED[i], callee[i])?;
        }
        Ok(())
    });
    run_one("resume_interrupt", || resume_interrupt(&p.lapic));
    run_one("resume_block_hidden", || block_hidden(p.block));
    let block = p.block;
    BLOCK.store(block.0, Relaxed);
    run_one("resume_block_used", || needs_thinvisor(block_used));
    match p.processors {
        Some(n) if n > 1 => run_one("resume_aps_start", || needs_thinvisor(smp::aps_start)),
        n => say!(
            "test-guest: loader: {} processor(s) in the MADT, no AP to start",
            n.map_or(0, |n| n)
        ),
    }
    finish()
}

fn same(what: &str, before: u64, after: u64) -> CheckResult {
    ensure!(
        before == after,
        "{what} was {before:#x} before the call, {after:#x} after"
    );
    Ok(())
}

fn resume_cpuid_signature() -> CheckResult {
    let [_, b, c, d] = cpu::cpuid(CPUID_LEAF, 0);
    let mut sig = [0u8; 12];
    for (k, w) in [b, c, d].iter().enumerate() {
        sig[4 * k..4 * k + 4].copy_from_slice(&w.to_le_bytes());
    }
    ensure!(
        sig == abi::CPUID_SIGNATURE,
        "CPUID {CPUID_LEAF:#x} says {sig:02x?} (EBX, ECX, EDX bytes)"
    );
    Ok(())
}

/// `resume_interrupt`: a self-IPI on the timer vector arrives through
/// the IDT the loader had before the call (SIDT unchanged, checked by
/// `resume_descriptor_tables`), and its handler's EOI works.
fn resume_interrupt(lapic: &Lapic) -> CheckResult {
    let before = timer::ticks();
    ensure!(
        lapic.send_ipi(ICR_SELF | u32::from(TIMER_VECTOR), 0),
        "the self-IPI stayed pending"
    );
    let mut waited = 0;
    while timer::ticks() == before && waited < 100 {
        // SAFETY: STI then CLI around a short wait: the IDT has the
        // timer, spurious and PIC gates; every other source is masked.
        unsafe { asm!("sti", "nop", "nop", "cli", options(nomem, nostack)) };
        pit_delay_us(1000);
        waited += 1;
    }
    ensure!(
        timer::ticks() > before,
        "no interrupt on vector {TIMER_VECTOR:#x} within {waited} ms of the self-IPI"
    );
    Ok(())
}

/// `resume_block_hidden`: every quadword of the block handed to
/// thinvisor reads as zero (thinvisor maps its memory to a filler page).
fn block_hidden(block: Range) -> CheckResult {
    for page in (block.0..block.1).step_by(PAGE as usize) {
        for off in (0..PAGE).step_by(8) {
            // SAFETY: below LIMIT, identity-mapped; reading it must be
            // harmless, which is what is checked.
            let v = unsafe { ((page + off) as *const u64).read_volatile() };
            let at = page + off;
            ensure!(
                v != BLOCK_PATTERN ^ at,
                "{at:#x} still holds the loader's pattern: neither used nor hidden"
            );
            ensure!(
                v == 0,
                "thinvisor's memory shows through: {v:#x} at {at:#x}"
            );
        }
    }
    say!(
        "test-guest: {} pages of the block read as zeros",
        (block.1 - block.0) / PAGE
    );
    Ok(())
}

/// Function 0 on `name`, with a #UD caught (no VMM there).
fn lookup(name: &str) -> Result<u64, Why> {
    let mut buf = [0u8; 64];
    buf[..name.len()].copy_from_slice(name.as_bytes());
    let (n, _) = recover::vmm_call4(
        cpu::uses_vmcall(),
        abi::FN_LOOKUP,
        buf.as_ptr() as u64,
        0,
        0,
        recover::UD,
    )
    .map_err(|c| why(format_args!("the VMM call raised vector {}", c.vector)))?;
    ensure!(n != 0, "lookup of \"{name}\" returned 0");
    Ok(n)
}

/// The block handed to thinvisor's start (for `block_used`).
static BLOCK: AtomicU64 = AtomicU64::new(0);

/// `resume_block_used`: thinvisor's log says it reserves memory inside
/// the block it was given, and nothing else.
fn block_used() -> CheckResult {
    let start_given = BLOCK.load(Relaxed);
    let block = (start_given, start_given + BLOCK_SIZE);
    let (start, end) = passthrough::thinvisor_block()?;
    ensure!(
        block.0 <= start && end <= block.1,
        "thinvisor reserves {start:#x}..{end:#x}, outside the block {:#x}..{:#x} it was given",
        block.0,
        block.1
    );
    Ok(())
}

//! The `hostile` mode (issue 9, in the spirit of HyperCube): every
//! processor of the machine, in thinvisor's pass-through layout, runs its
//! own seeded stream of random operations against thinvisor at once, and
//! thinvisor must survive all of them: answer, refuse, or inject the
//! exception the hardware would raise, never hang, crash or let the guest
//! into its memory.
//!
//! Command line: `test-guest.elf hostile [seed=N] [ops=N] [storm=N]`.
//! `seed` (default 1) seeds the streams (CPU with APIC ID `i` uses
//! `seed + i`); operation `k` of a CPU is a pure function of its seed and
//! `k` ([`Rng::for_op`]), so a seed always gives the same sequence, even
//! when an INIT restarts the processor in the middle of it (the operation
//! interrupted runs again). `ops` is the operations per CPU (default
//! 60 000); `storm` the INIT-SIPI-SIPI cycles the BSP sends the APs while
//! they work (default 8, see `DEFAULT_STORM`).
//!
//! The operations (see [`one_op`]):
//! - random VMM calls, either instruction, every register random: function
//!   0 on any address at all; `dbgsh` with random answers; `log_set_buf`
//!   with buffers from [`logset_pick`] (valid ones only inside `LOGSET`,
//!   so thinvisor never writes memory the guest needs; the rest must be
//!   refused, which is checked); `log_read` into this CPU's scratch or
//!   places it must not write; unknown numbers. Registers thinvisor must
//!   preserve are checked after each call;
//! - VMM calls through hostile guest page tables ([`build_tables`]): a PML4
//!   entry pointing to itself, a PDPT entry pointing to the PML4, tables
//!   and 4 KiB / 2 MiB / 1 GiB pages in thinvisor's block, in the local
//!   APIC, the IOAPIC and the PCI hole, reserved bits, the top of the
//!   address space (wrapping);
//! - names and buffers crossing from a good page into a bad one, with the
//!   expected answer checked ([`name_op`]);
//! - random CPUID leaves and subleaves (thinvisor's leaves checked);
//! - CR0/CR4 bit flips ([`cr_op`]: the invalid ones must raise #GP; on
//!   VT-x often with CR0.NE/CR4.VMXE, so that thinvisor's checks decide);
//! - RDMSR/WRMSR from [`MSRS`] and random numbers, #GP caught (thinvisor's
//!   protected MSRs must raise it); writes that would break the guest
//!   itself are never made (see [`MsrKind`]);
//! - port I/O: reads anywhere but the ports the run needs, writes only to
//!   [`SAFE_WRITE_PORTS`];
//! - self-IPIs on vectors 0x40-0x4F (handled, counted), IPIs to the other
//!   CPUs, NMIs to all, stray SIPIs to the APs (ignored by running
//!   processors), and the INIT storm;
//! - conversations with the debug shell ([`shell_op`]): hostile `mem` and
//!   `log` commands, junk, overlong lines.
//!
//! `only=KIND` runs one kind of operation of the stream (see [`ONLY`]).
//!
//! Pass: no failure recorded, at least `MIN_TOTAL_OPS` operations, every
//! CPU's last lookup of "dbgsh" returns the number the BSP found first,
//! the guards around the buffers thinvisor may write are intact and the
//! real-mode IVT page (which a wrapping write would hit) unchanged.
//! thinvisor's canary is checked by thinvisor when the run ends.

use crate::boot::BootInfo;
use crate::checks::{self, why, CheckResult, Why};
use crate::cpu::{self, Regs};
use crate::entry::{Page, EXC64_STUB_SIZE, TG_EXC64_STUBS, TG_PML4};
use crate::interrupts::ExceptionFrame;
use crate::passthrough::{self, map_identity_2m};
use crate::timer::{self, pit_delay_us, Lapic};
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::mem::offset_of;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use thinvisor_abi as abi;

/// Processors the mode keeps state for (by APIC ID); others stay halted.
const MAX_CPUS: usize = 4;
/// Default operations per CPU: two CPUs make 120 000.
const DEFAULT_OPS: u64 = 60_000;
/// The run must have made at least this many operations in all.
const MIN_TOTAL_OPS: u64 = 100_000;
/// Default INIT-SIPI-SIPI cycles the BSP sends the APs during the run:
/// each AP must be stopped in the middle of its stream, come back through
/// the trampoline still under thinvisor (its next VMM call answers) and
/// go on. thinvisor emulates INIT and SIPI (docs/security.md, "INIT and
/// SIPI"); a real INIT would reset the AP out of thinvisor on SVM and
/// never be consumed under Bochs' VT-x.
const DEFAULT_STORM: u64 = 8;
/// The APs' trampoline page: SIPI vector 9 (the `passthrough` mode's is
/// at 0x8000).
const TRAMPOLINE: u64 = 0x9000;
/// Each AP's stack.
const AP_STACK: usize = 16 * 1024;
/// What the #PF, #GP and #UD vectors are.
const PF: u64 = 14;
const GP: u64 = 13;
const UD: u64 = 6;
/// thinvisor's answer "refused".
const REFUSED: u64 = u64::MAX;
/// Self-IPI vectors with a handler.
const IPI_BASE: u8 = 0x40;
const IPI_VECTORS: u8 = 16;

/// Physical addresses of devices (the machines' defaults).
const LAPIC: u64 = 0xFEE0_0000;
const IOAPIC: u64 = 0xFEC0_0000;
const PCI_HOLE: u64 = 0xE000_0000;

// ------------------------------------------------------------ random

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: small, fast, and good enough to pick operations.
struct Rng(u64);

impl Rng {
    /// The generator of operation `op` of the stream `seed`: a pure
    /// function of both, so an operation interrupted by INIT is the same
    /// when it runs again.
    fn for_op(seed: u64, op: u64) -> Rng {
        Rng(mix(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ mix(op.wrapping_add(0x1234_5678))
        ))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A number below `n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ------------------------------------------------------------ per-CPU state

/// Counters per CPU (indices into `Cpu::counts`).
const C_CALLS: usize = 0;
const C_WALKS: usize = 1;
const C_NAMES: usize = 2;
const C_CPUID: usize = 3;
const C_MSR: usize = 4;
const C_IO: usize = 5;
const C_IPI: usize = 6;
const C_SIPI: usize = 7;
const C_PF: usize = 8;
const C_GP: usize = 9;
const C_REFUSED: usize = 10;
const C_LOGSET: usize = 11;
const C_INIT: usize = 12;
const C_IPI_OTHERS: usize = 13;
const C_NMI: usize = 14;
const C_SHELL: usize = 15;
const C_CR: usize = 16;
const COUNTERS: usize = 17;

/// One processor's state. Written by that processor (the counters, its
/// progress), read by the BSP for the report once it is done.
struct Cpu {
    /// Operations finished; where the stream continues after an INIT.
    ops: AtomicU64,
    counts: [AtomicU64; COUNTERS],
    /// Times the processor entered the mode (1 + restarts).
    entries: AtomicU64,
    /// Self-IPIs its handler counted.
    ipis: AtomicU64,
    /// NMIs its handler counted.
    nmis: AtomicU64,
    /// Failures, and the first one's description in `first`.
    failures: AtomicU64,
    /// 1 when it finished and made its last lookup (in `last_lookup`).
    done: AtomicU64,
    last_lookup: AtomicU64,
    /// Recovery: the vectors armed (a bit mask, 0 = none), where to
    /// resume, and what was caught (vector + 1, 0 = nothing).
    armed: AtomicU64,
    resume: AtomicU64,
    caught: AtomicU64,
    caught_error: AtomicU64,
    caught_cr2: AtomicU64,
}

const fn new_cpu() -> Cpu {
    Cpu {
        ops: AtomicU64::new(0),
        counts: [const { AtomicU64::new(0) }; COUNTERS],
        entries: AtomicU64::new(0),
        ipis: AtomicU64::new(0),
        nmis: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        done: AtomicU64::new(0),
        last_lookup: AtomicU64::new(0),
        armed: AtomicU64::new(0),
        resume: AtomicU64::new(0),
        caught: AtomicU64::new(0),
        caught_error: AtomicU64::new(0),
        caught_cr2: AtomicU64::new(0),
    }
}

#[no_mangle]
static TG_HOSTILE_CPUS: [Cpu; MAX_CPUS] = [const { new_cpu() }; MAX_CPUS];

/// The first failure of each CPU (written once, by that CPU).
struct FirstFailures(UnsafeCell<[[Option<Why>; KEPT_FAILURES]; MAX_CPUS]>);
// SAFETY: row `i` is written only by CPU `i`, each entry once (the
// `failures` counter picks it), and read by the BSP after that CPU is
// done.
unsafe impl Sync for FirstFailures {}
static FIRST: FirstFailures = FirstFailures(UnsafeCell::new(
    [const { [const { None }; KEPT_FAILURES] }; MAX_CPUS],
));
/// Failures described in the report, per CPU.
const KEPT_FAILURES: usize = 4;

/// Whether the mode is running (the exception hook is live).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The BSP's APIC ID (its slot).
static BSP_SLOT: AtomicU64 = AtomicU64::new(0);

/// Everything the operations need, fixed before the APs start.
#[derive(Clone, Copy)]
struct Ctx {
    seed: u64,
    ops: u64,
    storm: u64,
    intel: bool,
    dbgsh: u64,
    log_set_buf: u64,
    log_read: u64,
    block: (u64, u64),
    /// End of the highest available RAM (or 4 GiB, whichever is larger).
    ram_top: u64,
    lapic: u64,
    /// `only=KIND`: the range of [`one_op`]'s pick to run (the others are
    /// skipped, so the operations that do run are the seed's own).
    only: Option<(u64, u64)>,
}

struct CtxCell(UnsafeCell<Option<Ctx>>);
// SAFETY: written once by the BSP before ACTIVE is set and the APs start;
// only read afterwards.
unsafe impl Sync for CtxCell {}
static CTX: CtxCell = CtxCell(UnsafeCell::new(None));

fn ctx() -> Ctx {
    // SAFETY: see `CtxCell`.
    unsafe { (*CTX.0.get()).expect("hostile context not set") }
}

/// Records a failure of CPU `cpu`.
fn failed(cpu: usize, args: core::fmt::Arguments<'_>) {
    let c = &TG_HOSTILE_CPUS[cpu];
    let n = c.failures.fetch_add(1, SeqCst) as usize;
    if n < KEPT_FAILURES {
        // SAFETY: see `FirstFailures`.
        unsafe { (*FIRST.0.get())[cpu][n] = Some(why(args)) };
    }
}

macro_rules! expect {
    ($cpu:expr, $cond:expr, $($arg:tt)*) => {
        if !$cond {
            failed($cpu, format_args!($($arg)*));
        }
    };
}

// ------------------------------------------------------------ memory

/// A CPU's scratch for `log_read`: the whole 64 KiB log fits from any
/// offset the calls use, then a guard page that must stay 0xA5.
#[repr(C, align(4096))]
struct Scratch {
    buf: [u8; 72 * 1024],
    guard: [u8; 4096],
}

/// Memory thinvisor may write, and the hostile page tables.
#[repr(C, align(4096))]
struct Memory {
    scratch: [Scratch; MAX_CPUS],
    /// Name pages, one per CPU, mapped several times in `pt`.
    names: [Page; MAX_CPUS],
    /// The only place valid `log_set_buf` buffers lie; then a guard.
    logset: [u8; LOGSET_LEN],
    logset_guard: [u8; 4096],
    /// PML4 slot `SLOT_TREE`: PDPT, PD and PT.
    pdpt: Page,
    pd: Page,
    pt: Page,
    /// PML4 slot 511: the path to the last page of the address space.
    top_pdpt: Page,
    top_pd: Page,
    top_pt: Page,
    top_page: Page,
    /// Copy of physical page 0 (the real-mode IVT) at the start.
    page0: Page,
}

const LOGSET_LEN: usize = 32 * 1024;

struct MemoryCell(UnsafeCell<Memory>);
// SAFETY: the BSP builds it before the APs start; afterwards each CPU
// writes only its own scratch and name page, thinvisor writes the
// scratch, `logset` and the top page, and the tables are read-only.
unsafe impl Sync for MemoryCell {}

#[no_mangle]
#[link_section = ".bss_hostile"]
static TG_HOSTILE_MEMORY: MemoryCell = MemoryCell(UnsafeCell::new(Memory {
    scratch: [const {
        Scratch {
            buf: [0; 72 * 1024],
            guard: [0; 4096],
        }
    }; MAX_CPUS],
    names: [[0; 512]; MAX_CPUS],
    logset: [0; LOGSET_LEN],
    logset_guard: [0; 4096],
    pdpt: [0; 512],
    pd: [0; 512],
    pt: [0; 512],
    top_pdpt: [0; 512],
    top_pd: [0; 512],
    top_pt: [0; 512],
    top_page: [0; 512],
    page0: [0; 512],
}));

fn mem() -> *mut Memory {
    TG_HOSTILE_MEMORY.0.get()
}

fn scratch(cpu: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of_mut!((*mem()).scratch[cpu].buf) as u64 }
}

fn name_page(cpu: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of_mut!((*mem()).names[cpu]) as u64 }
}

fn logset() -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of_mut!((*mem()).logset) as u64 }
}

/// The APs' stacks.
#[repr(C, align(4096))]
struct Stacks(UnsafeCell<[[u8; AP_STACK]; MAX_CPUS]>);
// SAFETY: each AP uses its own slot as its stack, nothing else touches it.
unsafe impl Sync for Stacks {}
#[no_mangle]
#[link_section = ".bss_hostile"]
static TG_HOSTILE_STACKS: Stacks = Stacks(UnsafeCell::new([[0; AP_STACK]; MAX_CPUS]));

/// The slot of the CPU whose stack holds `addr`: an AP's stack, else the
/// BSP (which runs on the boot stack).
fn slot_of_stack(addr: u64) -> usize {
    let base = TG_HOSTILE_STACKS.0.get() as u64;
    if addr >= base && addr < base + (AP_STACK * MAX_CPUS) as u64 {
        ((addr - base) / AP_STACK as u64) as usize
    } else {
        BSP_SLOT.load(Relaxed) as usize
    }
}

// ------------------------------------------------------------ page tables

const P: u64 = 1;
const W: u64 = 2;
const PS: u64 = 0x80;
/// A reserved bit on every machine the tests use (MAXPHYADDR < 52).
const RSVD: u64 = 1 << 51;

/// PML4 slots of the hostile tables.
const SLOT_SELF: u64 = 400;
const SLOT_TREE: u64 = 401;
const SLOT_MMIO: u64 = 402;
const SLOT_BLOCK: u64 = 403;
const SLOT_RSVD: u64 = 404;
const SLOT_TOP: u64 = 511;
/// Entries of the PT per CPU (`PT_GROUP * cpu` is the CPU's first).
const PT_GROUP: u64 = 16;
/// The PT entry that maps the PT itself (read-only).
const PT_SELF: u64 = 500;

/// A linear address from its four table indices and page offset.
fn va(p4: u64, p3: u64, p2: u64, p1: u64, off: u64) -> u64 {
    let raw = (p4 & 0x1FF) << 39
        | (p3 & 0x1FF) << 30
        | (p2 & 0x1FF) << 21
        | (p1 & 0x1FF) << 12
        | (off & 0xFFF);
    // Sign-extend bit 47.
    ((raw << 16) as i64 >> 16) as u64
}

/// The pairs of a CPU's PT group: (first page: the name page, writable;
/// what the next page is). Offsets within the group.
const PAIRS: [(u64, Next); 6] = [
    (0, Next::Refused),  // thinvisor's block
    (2, Next::Refused),  // the local APIC
    (4, Next::Fault),    // not present
    (6, Next::Either),   // reserved bit
    (8, Next::Refused),  // the IOAPIC
    (12, Next::Refused), // the PCI hole
];
/// Name page read-only at this offset; the next two map the name page
/// twice in a row (a name that crosses into the same frame's start).
const PT_READ_ONLY: u64 = 10;
const PT_TWICE: u64 = 11;

/// What `log_read` must do with a buffer running into the next page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Return all ones, write nothing.
    Refused,
    /// Inject #PF for the next page, write nothing.
    Fault,
    /// Either of the two.
    Either,
}

/// Builds the hostile tables (BSP, before the APs start).
fn build_tables(block: (u64, u64)) {
    let m = mem();
    // SAFETY: the BSP alone runs; the tables are this module's, the PML4
    // slots are unused by the rest of the guest, and the guest itself
    // never touches the linear addresses behind them (only thinvisor's
    // page walker does, during VMM calls).
    unsafe {
        let pml4 = addr_of_mut!(TG_PML4).cast::<u64>();
        let pml4_pa = pml4 as u64;
        let pdpt = addr_of_mut!((*m).pdpt).cast::<u64>();
        let pd = addr_of_mut!((*m).pd).cast::<u64>();
        let pt = addr_of_mut!((*m).pt).cast::<u64>();
        let set = |t: *mut u64, i: u64, v: u64| t.add(i as usize).write_volatile(v);
        // A PML4 entry pointing to the PML4 itself (read-only).
        set(pml4, SLOT_SELF, pml4_pa | P);
        set(pml4, SLOT_TREE, pdpt as u64 | P | W);
        set(pml4, SLOT_MMIO, LAPIC | P | W);
        set(pml4, SLOT_BLOCK, block.0 | P | W);
        set(pml4, SLOT_RSVD, pdpt as u64 | P | W | RSVD);
        // PDPT: loops, tables and 1 GiB pages in bad places.
        set(pdpt, 0, pml4_pa | P); // PDPT -> PML4
        set(pdpt, 1, block.0 | P | W); // PD in thinvisor's block
        set(pdpt, 2, LAPIC | P | W); // PD in the local APIC
        set(pdpt, 3, (block.0 & !0x3FFF_FFFF) | P | W | PS); // 1 GiB over the block
        set(pdpt, 4, pd as u64 | P | W);
        set(pdpt, 5, 0xC000_0000 | P | W | PS); // 1 GiB of MMIO and holes
        set(pdpt, 6, 0xC000_0000 | 0x2000 | P | W | PS); // reserved bit 13
        set(pdpt, 7, pd as u64 | P | W | RSVD);
        set(pdpt, 8, pdpt as u64 | P); // PDPT -> itself
                                       // PD: 2 MiB pages in bad places, loops.
        set(pd, 0, (block.0 & !0x1F_FFFF) | P | W | PS);
        set(pd, 1, LAPIC | P | W | PS);
        set(pd, 2, IOAPIC | P | W | PS);
        set(pd, 3, PCI_HOLE | P | W | PS);
        set(pd, 4, pt as u64 | P | W);
        set(pd, 5, LAPIC | P | W); // PT in the local APIC
        set(pd, 6, block.0 | P | W); // PT in thinvisor's block
        set(pd, 7, pd as u64 | P); // PD -> itself
        set(pd, 8, pml4_pa | P); // PD -> PML4
                                 // PT: per CPU, its name page before bad pages.
        for cpu in 0..MAX_CPUS as u64 {
            let b = PT_GROUP * cpu;
            let name = name_page(cpu as usize);
            set(pt, b, name | P | W);
            set(pt, b + 1, block.0 | P | W);
            set(pt, b + 2, name | P | W);
            set(pt, b + 3, LAPIC | P | W);
            set(pt, b + 4, name | P | W);
            set(pt, b + 5, 0);
            set(pt, b + 6, name | P | W);
            set(pt, b + 7, name | P | W | RSVD);
            set(pt, b + 8, name | P | W);
            set(pt, b + 9, IOAPIC | P | W);
            set(pt, b + PT_READ_ONLY, name | P);
            set(pt, b + PT_TWICE, name | P | W);
            set(pt, b + PT_TWICE + 1, name | P | W);
            set(pt, b + 13, PCI_HOLE | P | W);
        }
        set(pt, PT_SELF, pt as u64 | P);
        // The last page of the address space, present and writable: a
        // buffer that runs past it wraps to linear 0 (physical page 0).
        let (tp, td, tt) = (
            addr_of_mut!((*m).top_pdpt).cast::<u64>(),
            addr_of_mut!((*m).top_pd).cast::<u64>(),
            addr_of_mut!((*m).top_pt).cast::<u64>(),
        );
        set(pml4, SLOT_TOP, tp as u64 | P | W);
        set(tp, 511, td as u64 | P | W);
        set(td, 511, tt as u64 | P | W);
        set(tt, 511, addr_of_mut!((*m).top_page) as u64 | P | W);
        // Guards and the copy of page 0.
        for s in (*m).scratch.iter_mut() {
            s.guard.fill(0xA5);
        }
        (*m).logset_guard.fill(0xA5);
    }
    copy_page0(mem_page0());
    cpu::reload_cr3();
}

fn mem_page0() -> *mut u8 {
    // SAFETY: only the address is taken.
    unsafe { addr_of_mut!((*mem()).page0).cast::<u8>() }
}

/// Copies physical (and linear) page 0, the real-mode IVT, to `dst`: a
/// write that wraps around the top of the address space would land there.
/// In assembly: Rust may not read through address 0.
fn copy_page0(dst: *mut u8) {
    // SAFETY: page 0 is identity-mapped RAM (`paging.rs`); `dst` is a
    // 4 KiB buffer of this module.
    unsafe {
        asm!(
            "rep movsb",
            inout("rsi") 0u64 => _,
            inout("rdi") dst => _,
            inout("rcx") 4096u64 => _,
            options(nostack, preserves_flags)
        )
    }
}

/// The last page of the address space.
const TOP_PAGE: u64 = 0xFFFF_FFFF_FFFF_F000;

/// An address thinvisor's page walker may only read through (function 0):
/// anything hostile.
fn read_va(rng: &mut Rng, cx: &Ctx) -> u64 {
    let off = rng.below(4096);
    let any = |rng: &mut Rng| rng.below(512);
    match rng.below(14) {
        0 => va(SLOT_SELF, any(rng), any(rng), any(rng), off),
        1 => va(SLOT_TREE, 0, any(rng), any(rng), off),
        2 => va(SLOT_TREE, rng.below(3), any(rng), any(rng), off),
        3 => va(
            rng.pick(&[SLOT_MMIO, SLOT_BLOCK, SLOT_RSVD]),
            any(rng),
            any(rng),
            any(rng),
            off,
        ),
        4 => block_in_gib(rng, cx),
        5 => va(SLOT_TREE, rng.pick(&[5, 6, 7, 8]), any(rng), any(rng), off),
        6 => va(SLOT_TREE, 4, rng.below(4), any(rng), off),
        7 => va(SLOT_TREE, 4, 4, any(rng), off),
        8 => va(SLOT_TREE, 4, 5 + rng.below(4), any(rng), off),
        9 => TOP_PAGE + off,
        10 => rng.pick(&[LAPIC, IOAPIC, PCI_HOLE, cx.block.0, cx.block.1 - 64]) + rng.below(56),
        11 => rng.pick(&[
            0x0000_8000_0000_0000,
            0xFFFF_7FFF_FFFF_FFF0,
            0x0000_7FFF_FFFF_FFFD,
        ]),
        12 => rng.next(),
        _ => va(any(rng), any(rng), any(rng), any(rng), off),
    }
}

/// A linear address in the 1 GiB page over thinvisor's block that lands
/// inside the block.
fn block_in_gib(rng: &mut Rng, cx: &Ctx) -> u64 {
    let (start, end) = cx.block;
    let pa = start + rng.below(end - start);
    va(SLOT_TREE, 3, 0, 0, 0) + (pa & 0x3FFF_FFFF)
}

/// A buffer `log_read` may be given: this CPU's scratch (writable; the
/// bool says so), or a place it must not write. Never memory the guest
/// needs: every writable path ends in this CPU's own pages.
fn write_va(rng: &mut Rng, cx: &Ctx, cpu: usize) -> (u64, bool) {
    let off = rng.below(4096);
    let any = |rng: &mut Rng| rng.below(512);
    let group = PT_GROUP * cpu as u64;
    let bad = match rng.below(16) {
        0..=3 => return (scratch(cpu) + rng.below(4090), true),
        4 => va(SLOT_SELF, any(rng), any(rng), any(rng), off),
        5 => va(
            SLOT_TREE,
            rng.pick(&[0, 1, 2, 5, 6, 7, 8]),
            any(rng),
            any(rng),
            off,
        ),
        6 => va(
            rng.pick(&[SLOT_MMIO, SLOT_BLOCK, SLOT_RSVD]),
            any(rng),
            any(rng),
            any(rng),
            off,
        ),
        7 => block_in_gib(rng, cx),
        8 => va(SLOT_TREE, 4, rng.below(4), any(rng), off),
        9 => va(SLOT_TREE, 4, 5 + rng.below(4), any(rng), off),
        10 => {
            // This CPU's group: its name page (writable), or a bad page.
            let i = rng.below(PT_GROUP);
            let a = va(SLOT_TREE, 4, 4, group + i, off);
            let writable = matches!(i, 0 | 2 | 4 | 6 | 8 | PT_TWICE | 12);
            return (a, writable);
        }
        11 => va(SLOT_TREE, 4, 4, rng.pick(&[PT_SELF, 200, 511]), off),
        12 => return (TOP_PAGE + off, true),
        13 => rng.pick(&[LAPIC, IOAPIC, PCI_HOLE, cx.block.0, cx.block.1 - 64]) + rng.below(56),
        14 => rng.pick(&[
            0x0000_8000_0000_0000,
            0xFFFF_7FFF_FFFF_FFF0,
            0x8000_0000_0000_0000,
        ]),
        _ => va(
            rng.pick(&[128, 200, 300, 405, 510]),
            any(rng),
            any(rng),
            any(rng),
            off,
        ),
    };
    (bad, false)
}

// ------------------------------------------------------------ recovery

/// Arms `mask` (vector bits) on `cpu` for the next instruction.
fn arm(cpu: usize, mask: u64) {
    let c = &TG_HOSTILE_CPUS[cpu];
    c.caught.store(0, Relaxed);
    c.resume.store(0, Relaxed);
    c.armed.store(mask, Relaxed);
}

/// What an armed instruction raised.
#[derive(Clone, Copy, Debug)]
struct Caught {
    vector: u64,
    error: u64,
    cr2: u64,
}

fn disarm(cpu: usize) -> Result<(), Caught> {
    let c = &TG_HOSTILE_CPUS[cpu];
    c.armed.store(0, Relaxed);
    c.resume.store(0, Relaxed);
    match c.caught.swap(0, Relaxed) {
        0 => Ok(()),
        v => Err(Caught {
            vector: v - 1,
            error: c.caught_error.load(Relaxed),
            cr2: c.caught_cr2.load(Relaxed),
        }),
    }
}

/// Called first by the exception handler: an exception the running CPU
/// armed resumes at its resume address (the frame's other registers are
/// restored as they were). False otherwise (the exception stays fatal).
pub fn try_recover(frame: &mut ExceptionFrame, cr2: u64) -> bool {
    if !ACTIVE.load(Relaxed) || frame.vector >= 64 {
        return false;
    }
    let cpu = slot_of_stack(frame as *const ExceptionFrame as u64);
    let c = &TG_HOSTILE_CPUS[cpu];
    let resume = c.resume.load(Relaxed);
    if c.armed.load(Relaxed) & (1 << frame.vector) == 0 || resume == 0 {
        return false;
    }
    c.caught_error.store(frame.error, Relaxed);
    c.caught_cr2
        .store(if frame.vector == PF { cr2 } else { 0 }, Relaxed);
    c.caught.store(frame.vector + 1, Relaxed);
    c.armed.store(0, Relaxed);
    c.resume.store(0, Relaxed);
    frame.rip = resume;
    true
}

/// A VMM call with every register from `regs` (and back into it), #PF,
/// #GP and #UD caught.
fn call(cpu: usize, vmcall: bool, regs: &mut Regs) -> Result<(), Caught> {
    arm(cpu, 1 << PF | 1 << GP | 1 << UD);
    let resume = TG_HOSTILE_CPUS[cpu].resume.as_ptr();
    // SAFETY: `regs` is exclusive, `resume` is this CPU's slot; the
    // callers pick buffers thinvisor may write (see `write_va`,
    // `logset_pick`).
    unsafe {
        if vmcall {
            crate::cpu::vmcall_regs(regs, resume)
        } else {
            crate::cpu::vmmcall_regs(regs, resume)
        }
    }
    disarm(cpu)
}

/// RDMSR, #GP (and #UD) caught.
fn rdmsr(cpu: usize, msr: u32) -> Result<u64, Caught> {
    let (lo, hi): (u32, u32);
    arm(cpu, 1 << GP | 1 << UD);
    // SAFETY: RDMSR only reads; a fault resumes at 2 with the registers
    // restored (EAX/EDX then hold stale values, discarded).
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov qword ptr [{r}], {t}",
            "rdmsr",
            "2:",
            t = out(reg) _,
            r = in(reg) TG_HOSTILE_CPUS[cpu].resume.as_ptr(),
            in("ecx") msr,
            out("eax") lo,
            out("edx") hi,
            options(nostack, preserves_flags),
        )
    }
    disarm(cpu).map(|()| u64::from(hi) << 32 | u64::from(lo))
}

/// WRMSR, #GP (and #UD) caught.
///
/// # Safety
/// The write must not break the guest (see `MsrKind`).
unsafe fn wrmsr(cpu: usize, msr: u32, value: u64) -> Result<(), Caught> {
    arm(cpu, 1 << GP | 1 << UD);
    // SAFETY: the caller vouches for the value; a fault resumes at 2.
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov qword ptr [{r}], {t}",
            "wrmsr",
            "2:",
            t = out(reg) _,
            r = in(reg) TG_HOSTILE_CPUS[cpu].resume.as_ptr(),
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags),
        )
    }
    disarm(cpu)
}

/// Port I/O of 1, 2 or 4 bytes; any exception thinvisor injected caught.
///
/// # Safety
/// For writes: the port must be one the run may write (`SAFE_WRITE_PORTS`).
unsafe fn port_io(cpu: usize, port: u16, size: u8, write: Option<u32>) -> Result<u32, Caught> {
    let mut value = write.unwrap_or(0);
    arm(cpu, 1 << GP | 1 << UD | 1 << PF);
    let r = TG_HOSTILE_CPUS[cpu].resume.as_ptr();
    // SAFETY: the caller picked the port; a fault resumes at 2.
    unsafe {
        macro_rules! io {
            ($insn:literal) => {
                asm!(
                    "lea {t}, [rip + 2f]",
                    "mov qword ptr [{r}], {t}",
                    $insn,
                    "2:",
                    t = out(reg) _,
                    r = in(reg) r,
                    in("dx") port,
                    inout("eax") value,
                    options(nostack, preserves_flags),
                )
            };
        }
        match (size, write.is_some()) {
            (1, false) => io!("in al, dx"),
            (2, false) => io!("in ax, dx"),
            (_, false) => io!("in eax, dx"),
            (1, true) => io!("out dx, al"),
            (2, true) => io!("out dx, ax"),
            (_, true) => io!("out dx, eax"),
        }
    }
    disarm(cpu).map(|()| value)
}

/// CPUID; anything thinvisor injected caught.
fn cpuid(cpu: usize, leaf: u32, sub: u32) -> Result<[u32; 4], Caught> {
    let (a, b, c, d): (u32, u64, u32, u32);
    arm(cpu, 1 << GP | 1 << UD);
    // SAFETY: CPUID only writes the four registers (RBX swapped through a
    // scratch register, LLVM reserves it); a fault resumes at 2 with the
    // registers restored (RBX included, so the swap back still holds).
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov qword ptr [{r}], {t}",
            "mov {b}, rbx",
            "cpuid",
            "2:",
            "xchg {b}, rbx",
            t = out(reg) _,
            r = in(reg) TG_HOSTILE_CPUS[cpu].resume.as_ptr(),
            b = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") sub => c,
            out("edx") d,
            options(nostack, preserves_flags),
        )
    }
    disarm(cpu).map(|()| [a, b as u32, c, d])
}

// ------------------------------------------------------------ interrupts

/// The IDT every CPU loads: the 32 exception stubs without IST (each CPU
/// handles its exceptions on its own stack: the APs have no TSS, and the
/// handler finds the CPU from the stack), the self-IPI vectors, and
/// harmless gates for the PICs' and the APIC's spurious vectors.
#[repr(C, align(16))]
struct Idt(UnsafeCell<[u64; 512]>);
// SAFETY: built by the BSP before any CPU loads it; read-only afterwards.
unsafe impl Sync for Idt {}
static IDT: Idt = Idt(UnsafeCell::new([0; 512]));

#[no_mangle]
static TG_HOSTILE_LAPIC: AtomicU64 = AtomicU64::new(LAPIC);

unsafe extern "C" {
    fn tg_hostile_ipi_isr();
    fn tg_hostile_ignore_isr();
    fn tg_hostile_nmi_isr();
    static tg_hostile_trampoline: u8;
    static tg_hostile_trampoline_end: u8;
}

// The self-IPI handler counts the interrupt for the CPU whose APIC ID the
// APIC reports (the slot), then EOIs.
global_asm!(
    r#"
.section .text.tg_hostile_isr, "ax"
.code64
.global tg_hostile_ipi_isr
tg_hostile_ipi_isr:
    push rax
    push rcx
    mov rax, qword ptr [rip + TG_HOSTILE_LAPIC]
    mov eax, dword ptr [rax + 0x20]
    shr eax, 24
    cmp eax, {max}
    jae 1f
    imul eax, eax, {cpu_size}
    lea rcx, [rip + TG_HOSTILE_CPUS]
    lock inc qword ptr [rcx + rax + {ipis}]
1:
    mov rax, qword ptr [rip + TG_HOSTILE_LAPIC]
    mov dword ptr [rax + 0xB0], 0
    pop rcx
    pop rax
    iretq
.global tg_hostile_ignore_isr
tg_hostile_ignore_isr:
    iretq
/* NMIs: counted like the IPIs, no EOI (SDM vol. 3A, 11.8.5). */
.global tg_hostile_nmi_isr
tg_hostile_nmi_isr:
    push rax
    push rcx
    mov rax, qword ptr [rip + TG_HOSTILE_LAPIC]
    mov eax, dword ptr [rax + 0x20]
    shr eax, 24
    cmp eax, {max}
    jae 1f
    imul eax, eax, {cpu_size}
    lea rcx, [rip + TG_HOSTILE_CPUS]
    lock inc qword ptr [rcx + rax + {nmis}]
1:
    pop rcx
    pop rax
    iretq
"#,
    max = const MAX_CPUS,
    cpu_size = const core::mem::size_of::<Cpu>(),
    ipis = const offset_of!(Cpu, ipis),
    nmis = const offset_of!(Cpu, nmis),
);

/// A 64-bit interrupt gate, selector 0x08, DPL 0, no IST.
fn gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | (((handler >> 16) & 0xFFFF) << 48);
    [low, handler >> 32]
}

fn build_idt() {
    let idt = IDT.0.get();
    let stubs = addr_of!(TG_EXC64_STUBS) as u64;
    // SAFETY: the BSP alone, before any CPU loads this IDT.
    unsafe {
        let set = |v: usize, h: u64| {
            let [lo, hi] = gate(h);
            (*idt)[2 * v] = lo;
            (*idt)[2 * v + 1] = hi;
        };
        for v in 0..32 {
            set(v, stubs + v as u64 * EXC64_STUB_SIZE);
        }
        for v in 0x20..0x30 {
            set(v, tg_hostile_ignore_isr as *const () as u64);
        }
        for v in IPI_BASE..IPI_BASE + IPI_VECTORS {
            set(usize::from(v), tg_hostile_ipi_isr as *const () as u64);
        }
        set(0xFF, tg_hostile_ignore_isr as *const () as u64);
        set(2, tg_hostile_nmi_isr as *const () as u64);
    }
}

#[repr(C, packed)]
struct DescriptorPtr {
    limit: u16,
    base: u64,
}

/// Loads the IDT, turns on CR0.WP (so read-only pages are read-only at
/// CPL 0 too: the hostile tables' loops are read-only, and thinvisor must
/// refuse to write through them) and software-enables this CPU's APIC
/// (after an INIT it is disabled again).
fn enter_cpu(lapic: u64) {
    const CR0_WP: u64 = 1 << 16;
    // SAFETY: the guest never writes read-only pages itself.
    unsafe { cpu::write_cr0(cpu::read_cr0() | CR0_WP) };
    let ptr = DescriptorPtr {
        limit: 256 * 16 - 1,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the IDT is static and complete (`build_idt`); the APIC page
    // is identity-mapped uncached (`Lapic::find` on the BSP); TPR 0, SVR
    // enabled with spurious vector 0xFF.
    unsafe {
        asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags));
        ((lapic + 0x80) as *mut u32).write_volatile(0);
        ((lapic + 0xF0) as *mut u32).write_volatile(0x1FF);
    }
}

/// Sends an IPI through the xAPIC (high dword first); waits, bounded,
/// until it left.
fn send_ipi(lapic: u64, low: u32, dest: u32) -> bool {
    // SAFETY: the APIC page is identity-mapped uncached; ICR writes only
    // send the IPI the caller chose.
    unsafe {
        ((lapic + 0x310) as *mut u32).write_volatile(dest << 24);
        ((lapic + 0x300) as *mut u32).write_volatile(low);
        (0..100_000).any(|_| ((lapic + 0x300) as *const u32).read_volatile() & (1 << 12) == 0)
    }
}

// ------------------------------------------------------------ the APs

// The trampoline (copied to TRAMPOLINE, run at CS = 0x0900, IP = 0):
// into 32-bit protected mode on the entry code's GDT, then to
// `tg_hostile_ap32` in this image.
global_asm!(
    r#"
.section .rodata.tg_hostile_trampoline, "a"
.code16
.global tg_hostile_trampoline
tg_hostile_trampoline:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl tg_hostile_gdtr - tg_hostile_trampoline
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $tg_hostile_ap32
.balign 8
tg_hostile_gdtr:
    .word 9 * 8 - 1
    .long TG_GDT
.global tg_hostile_trampoline_end
tg_hostile_trampoline_end:
.code64
.text
"#,
    options(att_syntax)
);

// 32-bit: the APIC ID picks the stack; long mode on the guest's own page
// tables (EFER.LME added to what is there), then Rust with the APIC ID.
global_asm!(
    r#"
.section .text.tg_hostile_ap, "ax"
.code32
.global tg_hostile_ap32
tg_hostile_ap32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov eax, 1
    cpuid
    shr ebx, 24
    cmp ebx, {max}
    jae 9f
    mov esp, ebx
    inc esp
    imul esp, esp, {stack}
    add esp, offset TG_HOSTILE_STACKS
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, offset TG_PML4
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    push 0x08
    mov eax, offset tg_hostile_ap64
    push eax
    retf
9:
    cli
    hlt
    jmp 9b
.code64
tg_hostile_ap64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov esp, esp
    mov edi, ebx
    xor ebp, ebp
    call {main}
    ud2
.text
"#,
    max = const MAX_CPUS,
    stack = const AP_STACK,
    main = sym ap_main,
);

/// An AP, on its own stack, after every start (the first SIPI and every
/// restart of the storm): continue its stream where it stopped.
extern "sysv64" fn ap_main(apic_id: u32) -> ! {
    let cpu = apic_id as usize;
    let c = &TG_HOSTILE_CPUS[cpu];
    // A restart may have cut an armed instruction short.
    c.armed.store(0, Relaxed);
    c.resume.store(0, Relaxed);
    c.caught.store(0, Relaxed);
    let cx = ctx();
    enter_cpu(cx.lapic);
    c.entries.fetch_add(1, SeqCst);
    run_stream(cpu, &cx, false);
    finish_cpu(cpu);
    cpu::halt_forever()
}

/// The last lookup, then done.
fn finish_cpu(cpu: usize) {
    let c = &TG_HOSTILE_CPUS[cpu];
    c.last_lookup
        .store(passthrough::lookup(abi::names::DBGSH), SeqCst);
    c.done.store(1, SeqCst);
}

// ------------------------------------------------------------ operations

/// Runs CPU `cpu`'s operations from where it is to `ops`; the BSP also
/// drives the INIT storm (`bsp`).
fn run_stream(cpu: usize, cx: &Ctx, bsp: bool) {
    let c = &TG_HOSTILE_CPUS[cpu];
    let seed = cx.seed.wrapping_add(cpu as u64);
    let storm_every = if bsp && cx.storm > 0 {
        (cx.ops / (cx.storm + 1)).max(1)
    } else {
        0
    };
    loop {
        let k = c.ops.load(Relaxed);
        if k >= cx.ops {
            break;
        }
        let mut rng = Rng::for_op(seed, k);
        if storm_every != 0
            && k > 0
            && k.is_multiple_of(storm_every)
            && c.counts[C_INIT].load(Relaxed) < cx.storm
        {
            init_cycle(cpu, cx);
        }
        one_op(cpu, cx, &mut rng, bsp);
        c.ops.store(k + 1, Relaxed);
    }
}

fn count(cpu: usize, counter: usize) {
    TG_HOSTILE_CPUS[cpu].counts[counter].fetch_add(1, Relaxed);
}

/// One random operation.
fn one_op(cpu: usize, cx: &Ctx, rng: &mut Rng, bsp: bool) {
    let pick = rng.below(1000);
    if let Some((lo, hi)) = cx.only {
        if !(lo..=hi).contains(&pick) {
            return;
        }
    }
    match pick {
        0..=399 => random_call(cpu, cx, rng),
        400..=549 => walk_call(cpu, cx, rng),
        550..=599 => name_op(cpu, cx, rng),
        600..=689 => cpuid_op(cpu, cx, rng),
        690..=719 => cr_op(cpu, cx, rng),
        720..=849 => msr_op(cpu, cx, rng),
        850..=949 => io_op(cpu, rng),
        950..=974 => self_ipi(cpu, cx, rng),
        975..=984 => ipi_others(cpu, cx, rng),
        985..=989 => nmi_all(cpu, cx),
        990..=994 => shell_op(cpu, cx, rng),
        _ if bsp => stray_sipi(cpu, cx, rng),
        _ => cpuid_op(cpu, cx, rng),
    }
}

/// The kinds `only=` names, and their range of `one_op`'s pick.
const ONLY: [(&str, u64, u64); 12] = [
    ("calls", 0, 399),
    ("walks", 400, 549),
    ("names", 550, 599),
    ("cpuid", 600, 689),
    ("cr", 690, 719),
    ("msr", 720, 849),
    ("io", 850, 949),
    ("self-ipi", 950, 974),
    ("ipi", 975, 984),
    ("nmi", 985, 989),
    ("shell", 990, 994),
    ("sipi", 995, 999),
];

/// Random values for every register.
fn random_regs(rng: &mut Rng) -> Regs {
    Regs {
        rax: rng.next(),
        rbx: rng.next(),
        rcx: rng.next(),
        rdx: rng.next(),
        rsi: rng.next(),
        rdi: rng.next(),
        rbp: rng.next(),
        r8: rng.next(),
        r9: rng.next(),
        r10: rng.next(),
        r11: rng.next(),
        r12: rng.next(),
        r13: rng.next(),
        r14: rng.next(),
        r15: rng.next(),
    }
}

/// A length for `log_read`: none, small, or anything.
fn length(rng: &mut Rng) -> u64 {
    match rng.below(5) {
        0 => 0,
        1 => rng.next(),
        2 => 1 + rng.below(16),
        _ => rng.below(6000),
    }
}

/// A stream offset for `log_read`.
fn offset(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => 0,
        1 => rng.next(),
        2 => u64::MAX - rng.below(16),
        _ => rng.below(80_000),
    }
}

/// A function number that is none of thinvisor's: its low 32 bits are not
/// a small number (a VMM that wrongly used EAX in 64-bit mode would then
/// still not run a real function with these registers).
fn unknown_number(rng: &mut Rng) -> u64 {
    let n = rng.next();
    match n as u32 {
        1..=0xFF => n | 0x8000_0000,
        _ => n,
    }
}

/// Makes the call and checks what thinvisor must preserve: every register
/// but RAX (and RBX for `log_read`) after a return, every register after
/// an injected #PF. Returns the outcome.
fn checked_call(
    cpu: usize,
    cx: &Ctx,
    rng: &mut Rng,
    regs: Regs,
    what: &str,
) -> (Regs, Result<(), Caught>) {
    let vmcall = rng.chance(50);
    let mut out = regs;
    let r = call(cpu, vmcall, &mut out);
    let insn = if vmcall { "VMCALL" } else { "VMMCALL" };
    match r {
        Ok(()) => {
            let mut want = regs;
            want.rax = out.rax;
            if regs.rax == cx.log_read {
                want.rbx = out.rbx;
            }
            expect!(
                cpu,
                want == out,
                "{what} ({insn}, RAX {:#x} RBX {:#x}) changed registers it must keep",
                regs.rax,
                regs.rbx
            );
        }
        Err(c) if c.vector == PF => {
            count(cpu, C_PF);
            expect!(
                cpu,
                out == regs,
                "{what} ({insn}) injected #PF and changed registers"
            );
            expect!(
                cpu,
                regs.rax == cx.log_read,
                "{what} ({insn}, RAX {:#x} RBX {:#x}) injected #PF (cr2 {:#x}); only log_read may",
                regs.rax,
                regs.rbx,
                c.cr2
            );
        }
        Err(c) => failed(
            cpu,
            format_args!(
                "{what} ({insn}, RAX {:#x} RBX {:#x} RCX {:#x}) raised vector {} error {:#x}",
                regs.rax, regs.rbx, regs.rcx, c.vector, c.error
            ),
        ),
    }
    if r.is_ok() && out.rax == REFUSED {
        count(cpu, C_REFUSED);
    }
    (out, r)
}

/// A random VMM call.
fn random_call(cpu: usize, cx: &Ctx, rng: &mut Rng) {
    count(cpu, C_CALLS);
    let mut regs = random_regs(rng);
    match rng.below(100) {
        0..=29 => {
            regs.rax = abi::FN_LOOKUP;
            regs.rbx = if rng.chance(50) {
                read_va(rng, cx)
            } else {
                regs.rbx
            };
            let _ = checked_call(cpu, cx, rng, regs, "lookup");
        }
        30..=44 => {
            regs.rax = cx.dbgsh;
            regs.rbx = match rng.below(4) {
                0 => u64::MAX,
                1 => 0,
                2 => rng.below(0x200),
                _ => regs.rbx,
            };
            let _ = checked_call(cpu, cx, rng, regs, "dbgsh");
        }
        45..=46 => logset_call(cpu, cx, rng, regs),
        47..=79 => {
            regs.rax = cx.log_read;
            let (buf, writable) = write_va(rng, cx, cpu);
            regs.rbx = buf;
            regs.rcx = length(rng);
            regs.rdx = offset(rng);
            let (out, r) = checked_call(cpu, cx, rng, regs, "log_read");
            log_read_verdict(cpu, regs, out, r, writable);
        }
        _ => {
            regs.rax = unknown_number(rng);
            let (out, r) = checked_call(cpu, cx, rng, regs, "unknown function");
            expect!(
                cpu,
                r.is_err() || out.rax == 0,
                "unknown function {:#x} returned {:#x}",
                regs.rax,
                out.rax
            );
        }
    }
}

/// What `log_read` may have done with a buffer that is (not) writable.
fn log_read_verdict(cpu: usize, regs: Regs, out: Regs, r: Result<(), Caught>, writable: bool) {
    if r.is_err() {
        return;
    }
    if !writable {
        expect!(
            cpu,
            out.rax == REFUSED || out.rax == 0,
            "log_read({:#x}, {:#x}, {:#x}) into a place it must not write returned {:#x}",
            regs.rbx,
            regs.rcx,
            regs.rdx,
            out.rax
        );
    } else {
        expect!(
            cpu,
            out.rax <= regs.rcx || out.rax == REFUSED,
            "log_read({:#x}, {:#x}, {:#x}) returned {:#x}",
            regs.rbx,
            regs.rcx,
            regs.rdx,
            out.rax
        );
    }
}

/// A `log_set_buf` buffer: (RBX, RCX, accepted?). Valid buffers lie only
/// inside `LOGSET`; everything else must be refused.
fn logset_pick(rng: &mut Rng, cx: &Ctx) -> (u64, u64, bool) {
    let area = logset();
    let end = area + LOGSET_LEN as u64;
    match rng.below(12) {
        0..=2 => {
            let at = area + (rng.below(LOGSET_LEN as u64 - 128) & !3);
            let size = 128 + rng.below(end - at - 128 + 1);
            (at, size, true)
        }
        3 => (area + (rng.below(LOGSET_LEN as u64 - 256) | 1), 128, false),
        4 => (area, rng.below(128), false),
        5 => (area, (16 << 20) + 1 + rng.below(1 << 40), false),
        6 => (
            cx.block.0 + (rng.below(cx.block.1 - cx.block.0) & !3),
            128 + rng.below(4096),
            false,
        ),
        7 => (cx.block.0 - 64, 4096, false),
        8 => (rng.pick(&[LAPIC, IOAPIC, PCI_HOLE, 0xA0000]), 4096, false),
        9 => (u64::MAX - 63, 4096, false),
        10 => (0, rng.next(), true),
        _ => {
            let at = (cx.ram_top + (rng.next() % (1 << 46))) & !3;
            (at.max(cx.ram_top), 128 + rng.below(8192), false)
        }
    }
}

fn logset_call(cpu: usize, cx: &Ctx, rng: &mut Rng, mut regs: Regs) {
    count(cpu, C_LOGSET);
    let (rbx, rcx, ok) = logset_pick(rng, cx);
    regs.rax = cx.log_set_buf;
    regs.rbx = rbx;
    regs.rcx = rcx;
    let (out, r) = checked_call(cpu, cx, rng, regs, "log_set_buf");
    if r.is_ok() {
        let want = if ok { 0 } else { REFUSED };
        expect!(
            cpu,
            out.rax == want,
            "log_set_buf({rbx:#x}, {rcx:#x}) returned {:#x}, expected {want:#x}",
            out.rax
        );
    }
}

/// Function 0 or `log_read` through the hostile tables.
fn walk_call(cpu: usize, cx: &Ctx, rng: &mut Rng) {
    count(cpu, C_WALKS);
    let mut regs = random_regs(rng);
    if rng.chance(50) {
        regs.rax = abi::FN_LOOKUP;
        regs.rbx = read_va(rng, cx);
        let _ = checked_call(cpu, cx, rng, regs, "lookup through hostile tables");
    } else {
        let (buf, writable) = loop {
            let pick = write_va(rng, cx, cpu);
            // Mostly the hostile tables, not plain scratch.
            if !pick.1 || pick.0 < scratch(cpu) || pick.0 >= scratch(cpu) + 4096 || rng.chance(10) {
                break pick;
            }
        };
        regs.rax = cx.log_read;
        regs.rbx = buf;
        regs.rcx = length(rng);
        regs.rdx = offset(rng);
        let (out, r) = checked_call(cpu, cx, rng, regs, "log_read through hostile tables");
        log_read_verdict(cpu, regs, out, r, writable);
    }
}

/// "dbgsh" ending right before a bad page, or crossing into the same
/// frame mapped again, must be found; `log_read` into a buffer running
/// from the name page into a bad page must write nothing.
fn name_op(cpu: usize, cx: &Ctx, rng: &mut Rng) {
    count(cpu, C_NAMES);
    let page = name_page(cpu) as *mut u8;
    let group = PT_GROUP * cpu as u64;
    let vmcall = rng.chance(50);
    let lookup = |addr: u64| {
        let mut r = Regs {
            rax: abi::FN_LOOKUP,
            rbx: addr,
            ..Regs::default()
        };
        match call(cpu, vmcall, &mut r) {
            Ok(()) => r.rax,
            Err(c) => {
                failed(
                    cpu,
                    format_args!("lookup at {addr:#x} raised vector {}", c.vector),
                );
                0
            }
        }
    };
    if rng.chance(30) {
        // "dbg" at the end of the frame, "sh" at its start: mapped twice
        // in a row, the name crosses from the first mapping to the second.
        // SAFETY: the name page is this CPU's; thinvisor writes it only
        // during this CPU's own calls.
        unsafe {
            page.add(0xFFD).copy_from_nonoverlapping(b"dbg".as_ptr(), 3);
            page.copy_from_nonoverlapping(c"sh".as_ptr().cast(), 3);
        }
        let addr = va(SLOT_TREE, 4, 4, group + PT_TWICE, 0xFFD);
        let got = lookup(addr);
        expect!(
            cpu,
            got == cx.dbgsh,
            "lookup of \"dbgsh\" crossing pages at {addr:#x} returned {got}"
        );
        return;
    }
    let (first, next) = rng.pick(&PAIRS);
    let base = va(SLOT_TREE, 4, 4, group + first, 0);
    if rng.chance(50) {
        // SAFETY: the name page is this CPU's (see above).
        unsafe {
            page.add(0xFFA)
                .copy_from_nonoverlapping(c"dbgsh".as_ptr().cast(), 6)
        };
        let got = lookup(base + 0xFFA);
        expect!(
            cpu,
            got == cx.dbgsh,
            "lookup of \"dbgsh\" ending right before a bad page at {:#x} returned {got}",
            base + 0xFFA
        );
        return;
    }
    // log_read from 0xF00 of the name page into the next one; or into the
    // read-only mapping.
    let (buf, len, next) = if rng.chance(15) {
        (
            va(SLOT_TREE, 4, 4, group + PT_READ_ONLY, 0x800),
            0x100,
            Next::Refused,
        )
    } else {
        (base + 0xF00, 0x200, next)
    };
    let off = (buf & 0xFFF) as usize;
    // SAFETY: the name page is this CPU's (see above).
    unsafe { page.add(off).write_bytes(0x5A, 0x1000 - off) };
    let mut r = Regs {
        rax: cx.log_read,
        rbx: buf,
        rcx: len,
        rdx: 0,
        ..Regs::default()
    };
    let result = call(cpu, vmcall, &mut r);
    // SAFETY: the name page is this CPU's (see above).
    let untouched = (off..0x1000).all(|i| unsafe { page.add(i).read_volatile() } == 0x5A);
    let fault_ok = |c: &Caught| c.vector == PF && c.cr2 & !0xFFF == (buf & !0xFFF) + 0x1000;
    let ok = match (next, result) {
        (Next::Refused, Ok(())) => r.rax == REFUSED,
        (Next::Fault, Err(c)) => fault_ok(&c),
        (Next::Either, Ok(())) => r.rax == REFUSED,
        (Next::Either, Err(c)) => c.vector == PF,
        _ => false,
    };
    if let Err(c) = result {
        if c.vector == PF {
            count(cpu, C_PF);
        }
    }
    expect!(
        cpu,
        ok && untouched,
        "log_read({buf:#x}, {len:#x}, 0) into a bad page: {} ({}), the good page {}",
        match result {
            Ok(()) => "returned",
            Err(_) => "raised",
        },
        match result {
            Ok(()) => r.rax,
            Err(c) => c.vector << 32 | c.cr2 & 0xFFFF_FFFF,
        },
        if untouched { "untouched" } else { "WRITTEN" }
    );
}

/// MOV to CR0 or CR4 (`CR`), #GP caught.
///
/// # Safety
/// The value must keep the guest running, or the write must fault (see
/// `cr_op`).
unsafe fn write_cr<const CR: u8>(cpu: usize, value: u64) -> Result<(), Caught> {
    arm(cpu, 1 << GP | 1 << UD);
    let r = TG_HOSTILE_CPUS[cpu].resume.as_ptr();
    // SAFETY: the caller vouches for the value; a fault resumes at 2 with
    // the registers restored. Not `nomem`: memory accesses must not move
    // across a change of paging or protection.
    unsafe {
        match CR {
            0 => asm!(
                "lea {t}, [rip + 2f]",
                "mov qword ptr [{r}], {t}",
                "mov cr0, {v}",
                "2:",
                t = out(reg) _,
                r = in(reg) r,
                v = in(reg) value,
                options(nostack, preserves_flags),
            ),
            _ => asm!(
                "lea {t}, [rip + 2f]",
                "mov qword ptr [{r}], {t}",
                "mov cr4, {v}",
                "2:",
                t = out(reg) _,
                r = in(reg) r,
                v = in(reg) value,
                options(nostack, preserves_flags),
            ),
        }
    }
    disarm(cpu)
}

/// CR0 bits toggled, and what must happen (Intel SDM vol. 3A, 2.5; MOV
/// CR in vol. 2B): true = the write must raise #GP in 64-bit mode. On
/// VT-x a write touching CR0.NE or CR4.VMXE exits and thinvisor checks it
/// itself (`crates/vmx/src/cr_write.rs`). PE and PG are only ever
/// cleared (must fault: leaving protected mode or paging in 64-bit mode).
/// EM, TS and MP are harmless: the guest has no x87/SSE code.
const CR0_BITS: [(u32, bool); 11] = [
    (0, true),   // PE off
    (31, true),  // PG off
    (1, false),  // MP
    (2, false),  // EM
    (3, false),  // TS
    (5, false),  // NE (VT-x: owned by thinvisor, shadowed)
    (16, false), // WP (restored at once)
    (18, false), // AM
    (30, false), // CD
    (29, false), // NW: with CD clear, must fault (checked below)
    (40, true),  // reserved (bits 63:32)
];

/// CR4 bits toggled: (bit, must fault). PAE off and LA57 changed in 64-bit
/// mode fault, VMXE (thinvisor hides VMX; AMD has none) and reserved bits
/// too. The rest are harmless while they last: SMEP/SMAP (the guest runs
/// no code from and touches no user pages here), PKE/PKS (keys 0), CET
/// (no S_CET enables), PCIDE (CR3's PCID is 0).
const CR4_BITS: [(u32, bool); 21] = [
    (5, true),  // PAE off
    (12, true), // LA57
    (13, true), // VMXE
    (0, false),
    (1, false),
    (2, false),
    (3, false),
    (4, false),
    (6, false),
    (7, false),
    (8, false),
    (9, false),
    (10, false),
    (11, false),
    (16, false),
    (17, false),
    (18, false),
    (20, false),
    (21, false),
    (22, false),
    (40, true),
];

/// A bit of CR0 or CR4 flipped, then the old value written back: writes
/// that must fault must, others may (a feature the processor lacks), and
/// what a write that succeeded set must read back (on VT-x through
/// thinvisor's read shadows).
///
/// On VT-x, CR0.NE or CR4.VMXE is often flipped too, so that the write
/// exits and thinvisor's own checks (`crates/vmx/src/cr_write.rs`) decide.
/// On SVM, CR writes are not intercepted and reach the processor itself:
/// there only the harmless bits are flipped, because QEMU's TCG and Bochs'
/// AMD model do not raise the #GP for the invalid ones (turning PE off in
/// long mode hangs QEMU and panics Bochs), which is theirs to fix, not
/// thinvisor's.
fn cr_op(cpu: usize, cx: &Ctx, rng: &mut Rng) {
    count(cpu, C_CR);
    let cr4 = rng.chance(50);
    let old = if cr4 {
        cpu::read_cr4()
    } else {
        cpu::read_cr0()
    };
    let (bit, must_fault) = loop {
        let (bit, fault) = if cr4 {
            rng.pick(&CR4_BITS)
        } else {
            rng.pick(&CR0_BITS)
        };
        let invalid = fault || (!cr4 && bit == 29);
        if cx.intel || !invalid {
            break (bit, fault);
        }
    };
    let owned_bit = if cr4 { 13 } else { 5 };
    let owned = if !cx.intel || rng.chance(60) || bit == owned_bit {
        0
    } else {
        1 << owned_bit
    };
    let new = old ^ 1 << bit ^ owned;
    // NW without CD is invalid, and so is CR4.VMXE (hidden from the guest).
    let must_fault = must_fault
        || (cr4 && new & (1 << 13) != 0)
        || (!cr4 && new & (1 << 29) != 0 && new & (1 << 30) == 0);
    // SAFETY: every bit in the tables is harmless while it lasts or must
    // fault (see CR0_BITS, CR4_BITS); the old value is written back.
    let w = unsafe {
        if cr4 {
            write_cr::<4>(cpu, new)
        } else {
            write_cr::<0>(cpu, new)
        }
    };
    let name = if cr4 { "CR4" } else { "CR0" };
    match w {
        Err(c) if c.vector == GP => count(cpu, C_GP),
        Err(c) => failed(
            cpu,
            format_args!("MOV {name}, {new:#x} raised vector {}", c.vector),
        ),
        Ok(()) => {
            expect!(
                cpu,
                !must_fault,
                "MOV {name}, {new:#x} (bit {bit} of {old:#x}) did not raise #GP"
            );
            let now = if cr4 {
                cpu::read_cr4()
            } else {
                cpu::read_cr0()
            };
            // CR0.ET (bit 4) is fixed to 1. CD and NW are compared: on
            // VT-x, VM entry never loads them from the guest's CR0 field
            // (SDM vol. 3C, 26.3.2.1), so a write thinvisor emulates (one
            // that flips NE) must set them in the processor itself.
            let mask = if cr4 { u64::MAX } else { !(1 << 4) };
            expect!(
                cpu,
                now & mask == new & mask,
                "{name} reads {now:#x} after MOV {name}, {new:#x}"
            );
        }
    }
    // SAFETY: the value the guest ran with.
    let back = unsafe {
        if cr4 {
            write_cr::<4>(cpu, old)
        } else {
            write_cr::<0>(cpu, old)
        }
    };
    let now = if cr4 {
        cpu::read_cr4()
    } else {
        cpu::read_cr0()
    };
    expect!(
        cpu,
        back.is_ok() && now == old,
        "{name} back to {old:#x}: {}, reads {now:#x}",
        if back.is_ok() { "done" } else { "#GP" }
    );
}

/// Leaves worth asking for.
const LEAVES: [u32; 12] = [
    0,
    1,
    7,
    0xB,
    0xD,
    0x4000_0000,
    0x4000_0001,
    0x4000_00FF,
    0x8000_0000,
    0x8000_0001,
    0x8000_0008,
    0x8000_000A,
];

fn cpuid_op(cpu: usize, cx: &Ctx, rng: &mut Rng) {
    count(cpu, C_CPUID);
    let leaf = match rng.below(6) {
        0 => rng.next() as u32,
        1 => rng.pick(&LEAVES),
        2 => rng.below(0x20) as u32,
        3 => 0x4000_0000 + rng.below(0x100) as u32,
        4 => 0x8000_0000 + rng.below(0x30) as u32,
        _ => rng.pick(&[
            0xFFFF_FFFF,
            0x8FFF_FFFF,
            0x4FFF_FFFF,
            0xC000_0000,
            0x2000_0000,
        ]),
    };
    let sub = if rng.chance(50) {
        rng.below(4) as u32
    } else {
        rng.next() as u32
    };
    match cpuid(cpu, leaf, sub) {
        Err(c) => failed(
            cpu,
            format_args!("CPUID {leaf:#x}/{sub:#x} raised vector {}", c.vector),
        ),
        Ok([_, b, c, d]) => match leaf {
            0x4000_0000 => {
                let mut sig = [0u8; 12];
                for (i, w) in [b, c, d].iter().enumerate() {
                    sig[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
                }
                expect!(
                    cpu,
                    sig == abi::CPUID_SIGNATURE,
                    "CPUID 0x40000000/{sub:#x}: not thinvisor's signature"
                );
            }
            1 => expect!(
                cpu,
                c & (1 << 31) != 0 && c & (1 << 5) == 0,
                "CPUID 1: ECX {c:#x} (hypervisor bit clear or VMX shown)"
            ),
            0x8000_0001 if !cx.intel => expect!(
                cpu,
                c & (1 << 2) == 0,
                "CPUID 0x80000001: SVM shown (ECX {c:#x})"
            ),
            _ => {}
        },
    }
}

/// How the MSR ops treat an MSR.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MsrKind {
    /// The virtualization extension's own MSRs: on its vendor thinvisor
    /// hides them, so every read and every write must raise #GP. On the
    /// other vendor the hardware answers (a real processor raises #GP;
    /// QEMU's TCG reads unknown MSRs as 0 and ignores writes). Random
    /// values.
    Protected { intel: bool },
    /// IA32_FEATURE_CONTROL: writes must raise #GP on VT-x (thinvisor);
    /// random values.
    FeatureControl,
    /// EFER: single bits toggled and restored; LME, LMA and NXE never
    /// (long mode and the page tables' format depend on them); SVME must
    /// raise #GP.
    Efer,
    /// A random value, then the old one back: harmless while it lasts
    /// (the guest makes no SYSCALL/SYSENTER, does not use FS/GS/TSC_AUX,
    /// and the emulators ignore memory types).
    RandomRestore,
    /// Only the value read is written back (IA32_APIC_BASE: moving or
    /// disabling the APIC, or x2APIC mode, breaks the guest's xAPIC
    /// accesses; SMRR/TSEG: SMM's own memory; fixed MTRRs, MISC_ENABLE,
    /// HWCR, SYSCFG, TSC: the machine's set-up).
    WriteBack,
    /// Read only (DEBUGCTL: single-stepping on branches would trap).
    ReadOnly,
    /// x2APIC registers: read; written only when the read raised #GP
    /// (xAPIC mode), and then the write must raise #GP too (thinvisor
    /// intercepts the ICR's writes). ICR values are harmless self-IPIs.
    X2apic,
}

/// The MSRs and ranges (inclusive) the ops pick from.
const MSRS: [(u32, u32, MsrKind); 25] = [
    (
        0xC001_0114,
        0xC001_0114,
        MsrKind::Protected { intel: false },
    ), // VM_CR
    (
        0xC001_0117,
        0xC001_0117,
        MsrKind::Protected { intel: false },
    ), // VM_HSAVE_PA
    (0x480, 0x491, MsrKind::Protected { intel: true }), // IA32_VMX_*
    (0x3A, 0x3A, MsrKind::FeatureControl),
    (0xC000_0080, 0xC000_0080, MsrKind::Efer),
    (0x1B, 0x1B, MsrKind::WriteBack),       // APIC_BASE
    (0x200, 0x20F, MsrKind::RandomRestore), // variable MTRRs
    (0x250, 0x250, MsrKind::WriteBack),
    (0x258, 0x259, MsrKind::WriteBack),
    (0x268, 0x26F, MsrKind::WriteBack),
    (0x2FF, 0x2FF, MsrKind::RandomRestore), // MTRR_DEF_TYPE
    (0xFE, 0xFE, MsrKind::WriteBack),       // MTRRCAP
    (0x277, 0x277, MsrKind::RandomRestore), // PAT
    (0x1F2, 0x1F3, MsrKind::WriteBack),     // SMRR
    (0xC001_0112, 0xC001_0113, MsrKind::WriteBack), // TSEG
    (0x800, 0x8FF, MsrKind::X2apic),
    (0x10, 0x10, MsrKind::WriteBack),                   // TSC
    (0x174, 0x176, MsrKind::RandomRestore),             // SYSENTER
    (0xC000_0081, 0xC000_0084, MsrKind::RandomRestore), // STAR..SFMASK
    (0xC000_0100, 0xC000_0103, MsrKind::RandomRestore), // FS/GS/KGS base, TSC_AUX
    (0x1D9, 0x1D9, MsrKind::ReadOnly),                  // DEBUGCTL
    (0x1A0, 0x1A0, MsrKind::WriteBack),                 // MISC_ENABLE
    (0xC001_0015, 0xC001_0015, MsrKind::WriteBack),     // HWCR
    (0xC001_0010, 0xC001_0010, MsrKind::WriteBack),     // SYSCFG
    (0x8B, 0x8B, MsrKind::ReadOnly),                    // microcode revision
];

/// Write-only MSRs whose write acts (microcode loading, barriers): never
/// written with random values, even where a read raised #GP.
const NEVER_WRITE: [u32; 5] = [0x79, 0x49, 0x10B, 0xC001_0020, 0x48];

fn msr_op(cpu: usize, cx: &Ctx, rng: &mut Rng) {
    count(cpu, C_MSR);
    let (msr, kind) = if rng.chance(70) {
        let (lo, hi, kind) = rng.pick(&MSRS);
        (lo + rng.below(u64::from(hi - lo) + 1) as u32, kind)
    } else {
        let msr = match rng.below(5) {
            0 => rng.next() as u32,
            1 => rng.below(0x1000) as u32,
            2 => 0xC000_0000 + rng.below(0x200) as u32,
            3 => 0xC001_0000 + rng.below(0x1100) as u32,
            _ => 0x4000_0000 + rng.below(0x200) as u32,
        };
        // Random numbers inside the table's ranges get the table's rules.
        let kind = MSRS
            .iter()
            .find(|&&(lo, hi, _)| (lo..=hi).contains(&msr))
            .map_or(MsrKind::ReadOnly, |e| e.2);
        (msr, kind)
    };
    let read = rdmsr(cpu, msr);
    match read {
        Err(c) if c.vector == GP => count(cpu, C_GP),
        Err(c) => failed(
            cpu,
            format_args!("RDMSR {msr:#x} raised vector {}", c.vector),
        ),
        Ok(_) => {}
    }
    let value = rng.next();
    match kind {
        MsrKind::Protected { intel } if intel != cx.intel => {
            // SAFETY: the other vendor's MSR: no such MSR here, or an
            // emulator's placeholder.
            let _ = unsafe { wrmsr(cpu, msr, value) };
        }
        MsrKind::Protected { .. } => {
            expect!(
                cpu,
                read.is_err(),
                "RDMSR {msr:#x} (protected) returned {:#x}",
                read.unwrap_or(0)
            );
            // SAFETY: a write this MSR's kind allows (see MsrKind).
            let w = unsafe { wrmsr(cpu, msr, value) };
            expect!(
                cpu,
                w.is_err(),
                "WRMSR {msr:#x} (protected) of {value:#x} succeeded"
            );
            if w.is_err() {
                count(cpu, C_GP);
            }
        }
        MsrKind::FeatureControl => {
            // SAFETY: a write this MSR's kind allows (see MsrKind).
            let w = unsafe { wrmsr(cpu, msr, value) };
            expect!(
                cpu,
                !cx.intel || w.is_err(),
                "WRMSR IA32_FEATURE_CONTROL of {value:#x} succeeded"
            );
        }
        MsrKind::Efer => {
            let Ok(old) = read else {
                failed(cpu, format_args!("RDMSR EFER raised #GP"));
                return;
            };
            expect!(cpu, old & (1 << 12) == 0, "EFER {old:#x} shows SVME");
            let reserved = 16 + rng.below(48) as u32;
            let bit = rng.pick(&[0u32, 12, 12, 13, 14, 15, 1, 9, reserved]);
            // SAFETY: a write this MSR's kind allows (see MsrKind).
            let w = unsafe { wrmsr(cpu, msr, old ^ 1 << bit) };
            if bit == 12 {
                expect!(
                    cpu,
                    w.is_err(),
                    "WRMSR EFER {:#x} (SVME) succeeded",
                    old ^ 1 << bit
                );
            }
            // SAFETY: a write this MSR's kind allows (see MsrKind).
            let back = unsafe { wrmsr(cpu, msr, old) };
            expect!(cpu, back.is_ok(), "WRMSR EFER back to {old:#x} raised #GP");
        }
        MsrKind::RandomRestore => {
            if let Ok(old) = read {
                let v = match rng.below(4) {
                    0 => value,
                    1 => (((value << 16) as i64) >> 16) as u64,
                    2 => 0,
                    _ => old ^ 1 << rng.below(64),
                };
                // SAFETY: a write this MSR's kind allows (see MsrKind).
                let _ = unsafe { wrmsr(cpu, msr, v) };
                // SAFETY: a write this MSR's kind allows (see MsrKind).
                let back = unsafe { wrmsr(cpu, msr, old) };
                expect!(
                    cpu,
                    back.is_ok(),
                    "WRMSR {msr:#x} back to {old:#x} raised #GP"
                );
            }
        }
        MsrKind::WriteBack => {
            if let Ok(old) = read {
                // SAFETY: a write this MSR's kind allows (see MsrKind).
                let w = unsafe { wrmsr(cpu, msr, old) };
                if msr == 0x1B {
                    expect!(
                        cpu,
                        w.is_ok(),
                        "WRMSR APIC_BASE of its own value {old:#x} raised #GP"
                    );
                }
            }
        }
        MsrKind::ReadOnly => {
            if read.is_err()
                && !NEVER_WRITE.contains(&msr)
                && !MSRS.iter().any(|&(lo, hi, _)| (lo..=hi).contains(&msr))
            {
                // SAFETY: a write this MSR's kind allows (see MsrKind).
                let _ = unsafe { wrmsr(cpu, msr, value) };
            }
        }
        MsrKind::X2apic => {
            if read.is_err() {
                let v = if msr == 0x830 {
                    // Fixed, edge, to self, a handled vector.
                    (1 << 18) | (u64::from(IPI_BASE) + rng.below(u64::from(IPI_VECTORS)))
                } else {
                    value
                };
                // SAFETY: a write this MSR's kind allows (see MsrKind).
                let w = unsafe { wrmsr(cpu, msr, v) };
                expect!(
                    cpu,
                    w.is_err(),
                    "WRMSR {msr:#x} of {v:#x} in xAPIC mode succeeded"
                );
            }
        }
    }
}

/// Ports never touched, read or written: COM1 (the console), port 0xE9,
/// the PIT and port 0x61 (the BSP's delays), the RTC/CMOS index, PCI
/// configuration (0xCF8-0xCFF, with the reset register), the ports that
/// end the run (QEMU 0xF4, Bochs 0x8900) and Bochs' debugger and info
/// ports. Reads elsewhere, including the ports thinvisor intercepts
/// (0x64, the ACPI PM1a block, 0xCF9's neighbours), must simply work.
const NO_TOUCH: [(u16, u16); 11] = [
    (0x3F8, 0x3FF),
    (0xE9, 0xE9),
    (0x40, 0x43),
    (0x61, 0x61),
    (0x70, 0x71),
    (0xCF8, 0xCFF),
    (0xF4, 0xF7),
    (0x8900, 0x8901),
    (0x8A00, 0x8A01),
    (0x400, 0x403),
    (0xB2, 0xB2),
];

/// Ports written with random values: POST, unused DMA page registers,
/// COM2-COM4 and LPT2 (absent or unused; their IRQs are masked at the
/// PICs and no IRQ reaches the IOAPIC unrouted), the APM status port.
const SAFE_WRITE_PORTS: [(u16, u16); 7] = [
    (0x80, 0x80),
    (0x84, 0x86),
    (0x88, 0x8B),
    (0x2F8, 0x2FF),
    (0x3E8, 0x3EF),
    (0x2E8, 0x2EF),
    (0xB3, 0xB3),
];

/// Reads worth making: ports thinvisor intercepts (0x64, the PM1a block of
/// QEMU's PIIX4 at 0x600 and of Bochs at 0xB000) and ordinary devices.
const READ_PORTS: [u16; 12] = [
    0x64, 0x60, 0x600, 0x604, 0xB000, 0xB004, 0x92, 0x21, 0xA1, 0x1F7, 0x511, 0x80,
];

fn io_op(cpu: usize, rng: &mut Rng) {
    count(cpu, C_IO);
    let size = rng.pick(&[1u8, 2, 4]);
    let write = rng.chance(30);
    let port = if write {
        let (lo, hi) = rng.pick(&SAFE_WRITE_PORTS);
        lo + rng.below(u64::from(hi - lo) + 1) as u16
    } else if rng.chance(40) {
        rng.pick(&READ_PORTS)
    } else {
        rng.next() as u16
    };
    let last = port.saturating_add(u16::from(size) - 1);
    if NO_TOUCH.iter().any(|&(lo, hi)| port <= hi && last >= lo) {
        return;
    }
    if write
        && !SAFE_WRITE_PORTS
            .iter()
            .any(|&(lo, hi)| port >= lo && last <= hi)
    {
        return;
    }
    let value = rng.next() as u32;
    // SAFETY: writes only to SAFE_WRITE_PORTS (checked above).
    let r = unsafe { port_io(cpu, port, size, write.then_some(value)) };
    if let Err(c) = r {
        failed(
            cpu,
            format_args!(
                "{} port {port:#x} ({size} bytes) raised vector {}",
                if write { "OUT" } else { "IN" },
                c.vector
            ),
        );
    }
}

/// A self-IPI on a handled vector; it must arrive once interrupts are on.
fn self_ipi(cpu: usize, cx: &Ctx, rng: &mut Rng) {
    count(cpu, C_IPI);
    let vector = u32::from(IPI_BASE) + rng.below(u64::from(IPI_VECTORS)) as u32;
    let c = &TG_HOSTILE_CPUS[cpu];
    let before = c.ipis.load(SeqCst);
    // Fixed delivery, edge, destination shorthand "self".
    let sent = send_ipi(cx.lapic, (1 << 18) | vector, 0);
    let mut arrived = false;
    for _ in 0..100_000 {
        // SAFETY: the IDT has gates for every vector that can arrive (the
        // self-IPI vectors, the PICs' (masked) and the APIC's spurious).
        unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) };
        if c.ipis.load(SeqCst) > before {
            arrived = true;
            break;
        }
    }
    expect!(
        cpu,
        sent && arrived,
        "self-IPI on vector {vector:#x} {}",
        if sent {
            "never arrived"
        } else {
            "stayed pending"
        }
    );
}

/// A fixed IPI on a handled vector to every other CPU: it arrives whenever
/// the target next enables interrupts, maybe while thinvisor handles one
/// of its exits (then it must stay pending for the guest).
fn ipi_others(cpu: usize, cx: &Ctx, rng: &mut Rng) {
    count(cpu, C_IPI_OTHERS);
    let vector = u32::from(IPI_BASE) + rng.below(u64::from(IPI_VECTORS)) as u32;
    // Fixed, edge, all excluding self.
    let sent = send_ipi(cx.lapic, 0x000C_0000 | vector, 0);
    expect!(cpu, sent, "an IPI to the other CPUs stayed pending");
}

/// An NMI to every CPU, this one included: it lands in the guest, or in
/// thinvisor while it handles an exit (which must hand it to the guest).
/// The handler counts it; at the end every CPU must have seen one.
fn nmi_all(cpu: usize, cx: &Ctx) {
    count(cpu, C_NMI);
    // NMI, level assert, all including self.
    let sent = send_ipi(cx.lapic, 0x0008_4400, 0);
    expect!(cpu, sent, "an NMI IPI stayed pending");
}

/// Commands typed into the debug shell: its memory dump at thinvisor's
/// block, devices, the top of the address space; lengths past the limit;
/// junk, backspaces, NULs, an overlong line.
fn shell_command(rng: &mut Rng, cx: &Ctx, out: &mut [u16; 160]) -> usize {
    use core::fmt::Write;
    struct Buf<'a>(&'a mut [u16; 160], usize);
    impl Write for Buf<'_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            for b in s.bytes() {
                if self.1 < self.0.len() {
                    self.0[self.1] = u16::from(b);
                    self.1 += 1;
                }
            }
            Ok(())
        }
    }
    let mut b = Buf(out, 0);
    let (start, end) = cx.block;
    let _ = match rng.below(16) {
        0 => write!(b, "mem {start:#x}"),
        1 => write!(b, "mem {:#x} 64", start - 16),
        2 => write!(b, "mem {:#x} 32", end - 8),
        3 => write!(b, "mem {LAPIC:#x} 64"),
        4 => write!(b, "mem 0xffffffffffffffff 65536"),
        5 => write!(b, "mem 0xfffffffffffffff0 65536"),
        6 => write!(b, "mem 0 65537"),
        7 => write!(b, "mem {:#x} 48", cx.ram_top - 16),
        8 => write!(b, "log 18446744073709551615"),
        9 => write!(b, "log {}", rng.below(40)),
        10 => write!(
            b,
            "{}",
            rng.pick(&["stat", "cpu", "help", "exit", "mem", "log x", "mem 0x 1"])
        ),
        11 => write!(b, "mem 0x{:x} {}", rng.next(), rng.next()),
        _ => {
            // Junk: any byte (NUL as 0x100), backspaces, overlong.
            let n = if rng.chance(20) {
                150
            } else {
                rng.below(40) as usize
            };
            for _ in 0..n {
                let c = match rng.below(8) {
                    0 => 0x08,
                    1 => 0x7F,
                    2 => 0x100,
                    _ => 1 + rng.below(0xFF) as u16,
                };
                if b.1 < b.0.len() {
                    b.0[b.1] = c;
                    b.1 += 1;
                }
            }
            Ok(())
        }
    };
    let n = b.1.min(159);
    out[n] = u16::from(if rng.chance(50) { b'\n' } else { b'\r' });
    n + 1
}

/// A bounded conversation with the debug shell: answer what it sends, type
/// a command when it asks. What is left pending stays for later calls
/// (this CPU's, the other's, the random ones). Every answer the shell
/// gives must be one the ABI knows.
fn shell_op(cpu: usize, cx: &Ctx, rng: &mut Rng) {
    count(cpu, C_SHELL);
    let mut cmd = [0u16; 160];
    let len = shell_command(rng, cx, &mut cmd);
    let mut typed = 0;
    let mut answer = u64::MAX;
    for _ in 0..60 {
        let mut r = Regs {
            rax: cx.dbgsh,
            rbx: answer,
            ..Regs::default()
        };
        if let Err(c) = call(cpu, rng.chance(50), &mut r) {
            failed(cpu, format_args!("dbgsh raised vector {}", c.vector));
            return;
        }
        answer = match r.rax {
            0 if typed < len => {
                typed += 1;
                u64::from(cmd[typed - 1])
            }
            0 => 0,
            1..=0x100 | 0x10A => 0,
            u64::MAX => u64::MAX,
            v => {
                failed(cpu, format_args!("dbgsh returned {v:#x}"));
                return;
            }
        };
    }
}

/// A lone SIPI to the APs: running processors ignore it (SDM vol. 3A,
/// 9.4.4.1), so nothing may happen; its vector is the trampoline's, so
/// that even a wrong start re-enters the stream.
fn stray_sipi(cpu: usize, cx: &Ctx, _rng: &mut Rng) {
    count(cpu, C_SIPI);
    // Start-up, all excluding self.
    let sent = send_ipi(cx.lapic, 0x000C_4600 | (TRAMPOLINE >> 12) as u32, 0);
    expect!(cpu, sent, "a stray SIPI stayed pending");
}

/// One INIT-SIPI-SIPI cycle to every AP that is running: each must come
/// back through the trampoline and continue its stream.
fn init_cycle(cpu: usize, cx: &Ctx) {
    count(cpu, C_INIT);
    let bsp = BSP_SLOT.load(Relaxed) as usize;
    let aps: [bool; MAX_CPUS] =
        core::array::from_fn(|i| i != bsp && TG_HOSTILE_CPUS[i].entries.load(SeqCst) > 0);
    let before: [u64; MAX_CPUS] = core::array::from_fn(|i| TG_HOSTILE_CPUS[i].entries.load(SeqCst));
    for ap in (0..MAX_CPUS).filter(|&i| aps[i]) {
        let ok = send_ipi(cx.lapic, 0x4500, ap as u32);
        pit_delay_us(10_000);
        let ok = ok && send_ipi(cx.lapic, 0x4600 | (TRAMPOLINE >> 12) as u32, ap as u32);
        pit_delay_us(200);
        let ok = ok && send_ipi(cx.lapic, 0x4600 | (TRAMPOLINE >> 12) as u32, ap as u32);
        expect!(cpu, ok, "INIT/SIPI to APIC ID {ap} stayed pending");
        let back = (0..500).any(|_| {
            pit_delay_us(1000);
            TG_HOSTILE_CPUS[ap].entries.load(SeqCst) > before[ap]
        });
        expect!(
            cpu,
            back,
            "APIC ID {ap} did not come back within 500 ms of INIT-SIPI-SIPI"
        );
    }
}

// ------------------------------------------------------------ the run

/// `key=N` from the command line.
fn arg(cmdline: &str, key: &str) -> Option<u64> {
    cmdline.split_ascii_whitespace().find_map(|t| {
        let v = t.strip_prefix(key)?.strip_prefix('=')?;
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        }
    })
}

/// Runs the mode and ends the run.
pub fn run(boot: &BootInfo) -> ! {
    checks::run_one("hostile", || hostile(boot));
    checks::finish()
}

fn hostile(boot: &BootInfo) -> CheckResult {
    let cmdline = boot.cmdline();
    let seed = arg(cmdline, "seed").unwrap_or(1);
    let ops = arg(cmdline, "ops").unwrap_or(DEFAULT_OPS);
    let intel = cpu::uses_vmcall();
    let storm = arg(cmdline, "storm").unwrap_or(DEFAULT_STORM);
    let only = cmdline.split_ascii_whitespace().find_map(|t| {
        let kind = t.strip_prefix("only=")?;
        ONLY.iter().find(|o| o.0 == kind).map(|o| (o.1, o.2))
    });
    let block = passthrough::thinvisor_block()?;
    let lapic = Lapic::find()?;
    passthrough::ensure!(
        !lapic.x2apic,
        "the local APIC is in x2APIC mode (the mode needs xAPIC)"
    );
    passthrough::ensure!(lapic.bsp, "not the BSP");
    let dbgsh = passthrough::lookup(abi::names::DBGSH);
    let log_set_buf = passthrough::lookup(abi::names::LOG_SET_BUF);
    let log_read = passthrough::lookup(abi::names::LOG_READ);
    passthrough::ensure!(
        dbgsh != 0 && log_set_buf != 0 && log_read != 0,
        "lookups: dbgsh {dbgsh}, log_set_buf {log_set_buf}, log_read {log_read}"
    );
    let (map, n) = passthrough::memory_map()?;
    let ram_top = map[..n]
        .iter()
        .filter(|e| e.2 == passthrough::MMAP_AVAILABLE)
        .map(|e| e.0 + e.1)
        .max()
        .unwrap_or(0)
        .max(1 << 32);
    passthrough::ensure!(
        map[..n]
            .iter()
            .any(|&(base, len, kind)| kind == passthrough::MMAP_AVAILABLE
                && base <= TRAMPOLINE
                && base + len >= TRAMPOLINE + 4096),
        "the memory map does not offer the trampoline's page {TRAMPOLINE:#x}"
    );
    say!(
        "test-guest: hostile: seed {seed}, {ops} operations per CPU, {storm} INIT-SIPI-SIPI cycles, {}",
        cpu::call_insn_name()
    );
    // Identity mappings the hostile addresses use (the guest itself never
    // touches them): thinvisor's block, the IOAPIC, the PCI hole is mapped
    // by the entry code, the local APIC by `Lapic::find`.
    let mut pa = block.0 & !0x1F_FFFF;
    while pa < block.1 {
        map_identity_2m(pa, false);
        pa += 0x20_0000;
    }
    map_identity_2m(IOAPIC, true);
    timer::mask_pics();
    build_tables(block);
    build_idt();
    TG_HOSTILE_LAPIC.store(lapic.base, SeqCst);
    // SAFETY: written once here, before ACTIVE and before any AP starts.
    unsafe {
        *CTX.0.get() = Some(Ctx {
            seed,
            ops,
            storm,
            intel,
            dbgsh,
            log_set_buf,
            log_read,
            block,
            ram_top,
            lapic: lapic.base,
            only,
        })
    };
    let cx = ctx();
    let bsp = lapic.id() as usize;
    passthrough::ensure!(bsp < MAX_CPUS, "the BSP's APIC ID {bsp} is too large");
    BSP_SLOT.store(bsp as u64, SeqCst);
    ACTIVE.store(true, SeqCst);
    enter_cpu(cx.lapic);
    TG_HOSTILE_CPUS[bsp].entries.store(1, SeqCst);
    start_aps(&cx)?;
    run_stream(bsp, &cx, true);
    finish_cpu(bsp);
    // Wait for the APs (bounded: 120 s of PIT time).
    let started: [bool; MAX_CPUS] =
        core::array::from_fn(|i| TG_HOSTILE_CPUS[i].entries.load(SeqCst) > 0);
    let all_done = |s: &[bool; MAX_CPUS]| {
        (0..MAX_CPUS).all(|i| !s[i] || TG_HOSTILE_CPUS[i].done.load(SeqCst) != 0)
    };
    for _ in 0..120_000 {
        if all_done(&started) {
            break;
        }
        pit_delay_us(1000);
    }
    ACTIVE.store(false, SeqCst);
    report(&cx, &started)
}

/// Starts the APs (INIT-SIPI-SIPI to all but self) into `ap_main`.
fn start_aps(cx: &Ctx) -> CheckResult {
    let start = addr_of!(tg_hostile_trampoline) as u64;
    let len = addr_of!(tg_hostile_trampoline_end) as u64 - start;
    // SAFETY: the trampoline page is low RAM the memory map offers (checked
    // by the caller), identity-mapped; no AP runs yet.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len as usize)
    };
    passthrough::ensure!(
        send_ipi(cx.lapic, 0x000C_4500, 0),
        "the INIT IPI stayed pending"
    );
    pit_delay_us(10_000);
    for _ in 0..2 {
        passthrough::ensure!(
            send_ipi(cx.lapic, 0x000C_4600 | (TRAMPOLINE >> 12) as u32, 0),
            "a SIPI stayed pending"
        );
        pit_delay_us(200);
    }
    // Give them 200 ms to arrive.
    let bsp = BSP_SLOT.load(Relaxed) as usize;
    for _ in 0..200 {
        pit_delay_us(1000);
    }
    let aps = (0..MAX_CPUS)
        .filter(|&i| i != bsp && TG_HOSTILE_CPUS[i].entries.load(SeqCst) > 0)
        .count();
    say!("test-guest: hostile: {aps} APs started");
    Ok(())
}

fn report(cx: &Ctx, started: &[bool; MAX_CPUS]) -> CheckResult {
    // Unregister whatever a random call registered.
    let mut r = Regs {
        rax: cx.log_set_buf,
        ..Regs::default()
    };
    cpu::vmm_call(&mut r);
    let mut total = 0;
    let mut failures = 0;
    let mut cpus = 0;
    for cpu in (0..MAX_CPUS).filter(|&i| started[i]) {
        cpus += 1;
        let c = &TG_HOSTILE_CPUS[cpu];
        let n = |i: usize| c.counts[i].load(SeqCst);
        let ops = c.ops.load(SeqCst);
        total += ops;
        say!(
            "test-guest: hostile CPU {cpu}: {ops} operations: {} VMM calls ({} log_set_buf), {} through hostile tables, {} name checks, {} CPUID, {} CR0/CR4, {} MSR, {} port I/O, {} self-IPIs, {} IPIs to the others ({} interrupts taken), {} NMIs sent ({} taken), {} shell conversations, {} stray SIPIs, {} INIT cycles sent; {} #PF injected, {} #GP, {} refused; entered {} times; last lookup of \"dbgsh\" = {}{}",
            n(C_CALLS),
            n(C_LOGSET),
            n(C_WALKS),
            n(C_NAMES),
            n(C_CPUID),
            n(C_CR),
            n(C_MSR),
            n(C_IO),
            n(C_IPI),
            n(C_IPI_OTHERS),
            c.ipis.load(SeqCst),
            n(C_NMI),
            c.nmis.load(SeqCst),
            n(C_SHELL),
            n(C_SIPI),
            n(C_INIT),
            n(C_PF),
            n(C_GP),
            n(C_REFUSED),
            c.entries.load(SeqCst),
            c.last_lookup.load(SeqCst),
            if c.done.load(SeqCst) != 0 { "" } else { " (NOT DONE)" }
        );
        let f = c.failures.load(SeqCst);
        failures += f;
        if f > 0 {
            say!("test-guest: hostile CPU {cpu}: {f} failures, the first:");
            for i in 0..KEPT_FAILURES.min(f as usize) {
                // SAFETY: see `FirstFailures`; the CPU is done (or the run
                // fails anyway and the text is only printed).
                let first = unsafe {
                    (*FIRST.0.get())[cpu][i]
                        .as_ref()
                        .map_or("?", |w| w.as_str())
                };
                say!("test-guest: hostile CPU {cpu}:   {first}");
            }
        }
    }
    say!(
        "test-guest: hostile: {total} operations on {cpus} CPUs, seed {}",
        cx.seed
    );
    passthrough::ensure!(failures == 0, "{failures} failures (see above)");
    let nmis_sent: u64 = (0..MAX_CPUS)
        .map(|i| TG_HOSTILE_CPUS[i].counts[C_NMI].load(SeqCst))
        .sum();
    for cpu in (0..MAX_CPUS).filter(|&i| started[i]) {
        let c = &TG_HOSTILE_CPUS[cpu];
        passthrough::ensure!(c.done.load(SeqCst) != 0, "CPU {cpu} did not finish");
        passthrough::ensure!(
            nmis_sent == 0 || c.nmis.load(SeqCst) > 0,
            "{nmis_sent} NMIs sent to every CPU, none reached CPU {cpu}"
        );
        passthrough::ensure!(
            c.last_lookup.load(SeqCst) == cx.dbgsh,
            "CPU {cpu}'s last lookup of \"dbgsh\" returned {}, not {}",
            c.last_lookup.load(SeqCst),
            cx.dbgsh
        );
    }
    passthrough::ensure!(
        cpus >= 2,
        "only {cpus} CPU ran (the mode needs -smp 2 or more)"
    );
    passthrough::ensure!(
        total >= MIN_TOTAL_OPS.min(cx.ops * cpus),
        "only {total} operations"
    );
    let m = mem();
    // SAFETY: every CPU is done; only thinvisor could have written these.
    unsafe {
        for cpu in 0..MAX_CPUS {
            passthrough::ensure!(
                (*m).scratch[cpu].guard.iter().all(|&b| b == 0xA5),
                "the guard after CPU {cpu}'s scratch was written"
            );
        }
        passthrough::ensure!(
            (*m).logset_guard.iter().all(|&b| b == 0xA5),
            "the guard after the log_set_buf area was written"
        );
        let mut now = [0u8; 4096];
        copy_page0(now.as_mut_ptr());
        let copy = core::slice::from_raw_parts(addr_of!((*m).page0).cast::<u8>(), 4096);
        passthrough::ensure!(
            now[..] == copy[..],
            "physical page 0 changed (a wrapping write?)"
        );
    }
    say!(
        "test-guest: hostile: thinvisor answered every CPU's last lookup with {}",
        cx.dbgsh
    );
    Ok(())
}

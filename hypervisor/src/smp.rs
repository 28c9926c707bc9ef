//! Bringing the application processors under thinvisor.
//!
//! In the pass-through layout every processor runs the guest under
//! thinvisor (docs/architecture.md, "All processors"). The boot processor
//! starts the others itself before the guest runs, with the usual INIT,
//! SIPI, SIPI broadcast (Intel SDM vol. 3A, 9.4.4.1), through a real-mode
//! trampoline in a page of low memory that it lends from the guest and
//! gives back afterwards. Each application processor climbs to long mode
//! on thinvisor's own page tables, takes a stack and a per-processor area
//! from the heap, turns on the virtualization extension and waits, in the
//! guest, for the guest's own INIT and SIPI (VT-x: the wait-for-SIPI
//! activity state; SVM: in the host until the boot processor's guest sends
//! it a SIPI, see svm_backend.rs).

use core::sync::atomic::{AtomicU32, Ordering};

use log::{info, warn};
use thinvisor_boot::{BootInfo, MemKind};
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

use crate::{mem, percpu, PAGE};

/// Application processors that reached Rust code.
static ARRIVED: AtomicU32 = AtomicU32::new(0);

/// Stack of each application processor.
pub const AP_STACK_SIZE: u64 = 32 * 1024;

// The trampoline, copied to a page below 1 MiB and entered at its first
// byte by a SIPI (CS = page >> 4, IP = 0). Its data sits at fixed offsets
// right after the first jump (the `TR_*` constants), filled in by the boot
// processor before the SIPIs. Processors take it one at a time (the lock)
// because they share its stack until Rust gives them their own.
core::arch::global_asm!(
    ".pushsection .rodata.ap_trampoline, \"a\"",
    ".global thinvisor_ap_trampoline",
    ".global thinvisor_ap_trampoline_end",
    ".global thinvisor_ap_pm32",
    ".global thinvisor_ap_lm64",
    ".code16",
    "thinvisor_ap_trampoline:",
    "jmp 9f",
    ".balign 8",
    // The GDT starts at the page itself: its null entry is the jump
    // above (the processor never reads entry 0), 0x08.. the rest.
    ".quad 0x00CF9A000000FFFF", // 0x08: 32-bit code
    ".quad 0x00CF92000000FFFF", // 0x10: data
    ".quad 0x00AF9A000000FFFF", // 0x18: 64-bit code
    ".quad 0",
    // 0x28: GDTR (limit, base), 0x30: far pointer to the 32-bit code,
    // 0x38: CR3, 0x3C: EFER bits, 0x40: the Rust entry, 0x48: the lock,
    // 0x4C: the 64-bit code's linear address.
    ".word 0x1F",
    ".long 0",
    ".word 0",
    ".long 0",
    ".word 0x08",
    ".word 0",
    ".long 0",
    ".long 0",
    ".quad 0",
    ".long 0",
    ".long 0",
    "9:",
    "cli",
    "cld",
    "mov ax, cs",
    "mov ds, ax",
    "2:",
    "lock bts word ptr [0x48], 0",
    "jnc 3f",
    "pause",
    "jmp 2b",
    "3:",
    // EBX = the page's linear address, kept through the mode switches.
    "xor ebx, ebx",
    "mov bx, cs",
    "shl ebx, 4",
    "lgdt [0x28]",
    "mov eax, cr0",
    "or eax, 1",
    "mov cr0, eax",
    // jmp far dword [0x30]: to 32-bit protected mode.
    ".byte 0x66, 0xFF, 0x2E",
    ".word 0x30",
    ".code32",
    "thinvisor_ap_pm32:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "lea esp, [ebx + 0x1000]",
    // PAE, thinvisor's page tables, EFER as on the boot processor, paging.
    "mov eax, cr4",
    "or eax, 0x20",
    "mov cr4, eax",
    "mov eax, [ebx + 0x38]",
    "mov cr3, eax",
    "mov ecx, 0xC0000080",
    "rdmsr",
    "or eax, [ebx + 0x3C]",
    "wrmsr",
    "mov eax, cr0",
    "or eax, 0x80010000",
    "mov cr0, eax",
    "mov eax, [ebx + 0x4C]",
    "push 0x18",
    "push eax",
    "retf",
    ".code64",
    "thinvisor_ap_lm64:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "lea rsp, [rbx + 0x1000]",
    "mov rdi, rbx",
    "mov rax, [rbx + 0x40]",
    "call rax",
    "ud2",
    "thinvisor_ap_trampoline_end:",
    ".text",
    ".popsection",
);

/// Offsets of the trampoline's data (see the assembly above).
const TR_GDT: u64 = 0;
const TR_GDTR_BASE: u64 = 0x2A;
const TR_FAR32: u64 = 0x30;
const TR_CR3: u64 = 0x38;
const TR_EFER: u64 = 0x3C;
const TR_ENTRY: u64 = 0x40;
const TR_LOCK: u64 = 0x48;
const TR_LM64: u64 = 0x4C;

extern "C" {
    static thinvisor_ap_trampoline: u8;
    static thinvisor_ap_trampoline_end: u8;
    static thinvisor_ap_pm32: u8;
    static thinvisor_ap_lm64: u8;
}

/// Offset of a trampoline symbol from its start.
fn offset(sym: *const u8) -> u64 {
    sym as u64 - core::ptr::addr_of!(thinvisor_ap_trampoline) as u64
}

/// A page of available memory below 1 MiB (above the real-mode IVT and
/// BIOS data area), for the trampoline.
fn trampoline_page(boot: &BootInfo) -> Option<u64> {
    boot.memory_map()
        .iter()
        .filter(|r| r.kind == MemKind::Available)
        .find_map(|r| {
            let start = r.start.max(0x8000).next_multiple_of(PAGE);
            (start + PAGE <= r.end().min(0x9_F000)).then_some(start)
        })
}

/// What the application processors run once in long mode: `main` with
/// this processor's area installed.
static AP_MAIN: spin::Once<fn(&'static percpu::PerCpu) -> !> = spin::Once::new();

/// Start every other processor; each runs `ap_main` once it has its own
/// stack and per-processor area. Returns how many arrived.
pub fn start_aps(boot: &BootInfo, ap_main: fn(&'static percpu::PerCpu) -> !) -> u32 {
    AP_MAIN.call_once(|| ap_main);
    let Some(page) = trampoline_page(boot) else {
        warn!("no free page below 1 MiB for the processor trampoline: the guest runs on one processor");
        return 0;
    };
    let start = core::ptr::addr_of!(thinvisor_ap_trampoline);
    let end = core::ptr::addr_of!(thinvisor_ap_trampoline_end);
    let len = end as usize - start as usize;
    let dst = mem::phys_to_virt(page);
    let mut saved = [0u8; PAGE as usize];
    let (cr3, _) = x86_64::registers::control::Cr3::read_raw();
    // SAFETY: EFER exists on every 64-bit processor.
    let efer = unsafe { Msr::new(0xC000_0080).read() } & ((1 << 8) | (1 << 11));
    let put32 = |at: u64, v: u64| {
        // SAFETY: inside the trampoline page (offsets below 0x50).
        unsafe { (dst.add(at as usize) as *mut u32).write_unaligned(v as u32) }
    };
    // SAFETY: `page` is available RAM below 1 MiB, inside the direct map;
    // nothing runs there before the guest starts, and its bytes are put
    // back below. The template is `len` bytes of thinvisor's image.
    unsafe {
        core::ptr::copy_nonoverlapping(dst, saved.as_mut_ptr(), PAGE as usize);
        core::ptr::write_bytes(dst, 0, PAGE as usize);
        core::ptr::copy_nonoverlapping(start, dst, len);
    }
    put32(TR_GDTR_BASE, page + TR_GDT);
    put32(
        TR_FAR32,
        page + offset(core::ptr::addr_of!(thinvisor_ap_pm32)),
    );
    put32(TR_CR3, cr3.start_address().as_u64());
    put32(TR_EFER, efer);
    put32(
        TR_LM64,
        page + offset(core::ptr::addr_of!(thinvisor_ap_lm64)),
    );
    // SAFETY: as above.
    unsafe {
        (dst.add(TR_ENTRY as usize) as *mut u64).write_unaligned(ap_entry as *const () as u64)
    };
    mem::map_low_identity(true);

    let before = ARRIVED.load(Ordering::Acquire);
    // INIT, then SIPI twice (Intel SDM vol. 3A, 9.4.4.1, "Typical AP
    // Initialization Sequence"): to all processors but this one.
    const ALL_BUT_SELF: u32 = 3 << 18;
    const ASSERT: u32 = 1 << 14;
    const LEVEL: u32 = 1 << 15;
    const INIT: u32 = 5 << 8;
    const STARTUP: u32 = 6 << 8;
    log::debug!("starting application processors: trampoline at {page:#x}");
    send_ipi(ALL_BUT_SELF | ASSERT | LEVEL | INIT);
    delay_us(10_000);
    log::debug!("INIT sent");
    for _ in 0..2 {
        send_ipi(ALL_BUT_SELF | ASSERT | STARTUP | (page >> 12) as u32);
        delay_us(200);
    }
    // Wait until no processor has arrived for 50 ms (at most 1 s), then
    // until the last one has left the trampoline.
    let mut seen = before;
    let mut quiet = 0;
    for _ in 0..1000 {
        delay_us(1000);
        let now = ARRIVED.load(Ordering::Acquire);
        if now != seen {
            seen = now;
            quiet = 0;
        } else {
            quiet += 1;
            if quiet >= 50 {
                break;
            }
        }
    }
    let lock = mem::phys_to_virt(page + TR_LOCK) as *const AtomicU32;
    for _ in 0..1000 {
        // SAFETY: the lock word inside the trampoline page, which stays
        // mapped and ours until it is restored below.
        if unsafe { &*lock }.load(Ordering::Acquire) == 0 {
            break;
        }
        delay_us(1000);
    }
    mem::map_low_identity(false);
    // SAFETY: as above; no processor uses the page any more.
    unsafe { core::ptr::copy_nonoverlapping(saved.as_ptr(), dst, PAGE as usize) };
    let n = seen - before;
    info!(
        "{n} application processor(s) under thinvisor (trampoline at {page:#x}, {} KiB each)",
        (AP_STACK_SIZE + percpu::area_size() as u64) >> 10
    );
    n
}

/// First Rust code of an application processor, on the trampoline's shared
/// stack: take a stack of its own, release the trampoline, continue.
extern "sysv64" fn ap_entry(trampoline: u64) -> ! {
    let Some(stack) = mem::alloc_zeroed(AP_STACK_SIZE, PAGE) else {
        stop_this_cpu("out of memory for an application processor's stack")
    };
    let top = mem::phys_to_virt(stack) as u64 + AP_STACK_SIZE;
    let lock = mem::phys_to_virt(trampoline + TR_LOCK);
    // SAFETY: the new stack is this processor's own; once RSP points
    // there the trampoline's stack is no longer used and the next processor
    // may take it.
    unsafe {
        core::arch::asm!(
            "mov rsp, {top}",
            "mov dword ptr [{lock}], 0",
            "call {next}",
            "ud2",
            top = in(reg) top,
            lock = in(reg) lock,
            next = sym ap_start,
            options(noreturn)
        )
    }
}

/// An application processor on its own stack.
extern "sysv64" fn ap_start() -> ! {
    let index = ARRIVED.fetch_add(1, Ordering::AcqRel) + 1;
    let Some(area) = percpu::init_ap(index) else {
        stop_this_cpu("out of memory for an application processor's area")
    };
    crate::idt::init();
    match AP_MAIN.get() {
        Some(main) => main(area),
        None => stop_this_cpu("no work for application processors"),
    }
}

/// A held application processor: wait in the host for the SIPI the guest
/// sends it (apic.rs); where it starts and its view of the VM.
pub fn wait_for_guest_start(
    cpu: &percpu::PerCpu,
) -> (thinvisor_vmm::InitialState, thinvisor_vmm::Vmm<'static>) {
    let Some(vm) = crate::VM.get() else {
        stop_this_cpu("no virtual machine")
    };
    log::debug!("CPU {}: waiting for the guest's SIPI", cpu.index);
    let vector = crate::apic::wait_for_first_sipi(cpu.apic_id);
    log::debug!("CPU {}: SIPI {vector:#x}", cpu.index);
    (
        thinvisor_vmm::InitialState::sipi(vector),
        thinvisor_vmm::Vmm::new(vm),
    )
}

/// Park this processor for good, saying why.
pub fn stop_this_cpu(why: &str) -> ! {
    log::error!("CPU stopped: {why}");
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Send an IPI to all other processors (the shorthand is in `low`).
fn send_ipi(low: u32) {
    send_ipi_to(0, low)
}

/// Send an IPI through this processor's local APIC to `dest` (physical
/// APIC ID, unless `low` has a shorthand): the x2APIC ICR MSR when x2APIC
/// is on, else the xAPIC registers (Intel SDM vol. 3A, 11.6.1, 11.12.9).
pub fn send_ipi_to(dest: u32, low: u32) {
    const IA32_APIC_BASE: u32 = 0x1B;
    const X2APIC_ENABLE: u64 = 1 << 10;
    // SAFETY: IA32_APIC_BASE exists on every processor with a local APIC.
    let base = unsafe { Msr::new(IA32_APIC_BASE).read() };
    if base & X2APIC_ENABLE != 0 {
        // SAFETY: the x2APIC ICR; the IPI goes to processors thinvisor
        // starts or holds.
        unsafe { Msr::new(0x830).write((u64::from(dest) << 32) | u64::from(low)) };
        return;
    }
    let apic = mem::phys_to_virt(base & 0xF_FFFF_F000);
    // SAFETY: the xAPIC page is inside the direct map (below 4 GiB); the
    // ICR high then low registers, volatile as device registers are.
    unsafe {
        // ICR high may hold a destination the guest wrote for its own next
        // IPI: put it back afterwards.
        let guest_high = (apic.add(0x310) as *const u32).read_volatile();
        (apic.add(0x310) as *mut u32).write_volatile(dest << 24);
        (apic.add(0x300) as *mut u32).write_volatile(low);
        // Wait for the delivery status to clear.
        for _ in 0..100_000 {
            if (apic.add(0x300) as *const u32).read_volatile() & (1 << 12) == 0 {
                break;
            }
            core::hint::spin_loop();
        }
        (apic.add(0x310) as *mut u32).write_volatile(guest_high);
    }
}

/// Wait about `us` microseconds on the PIT's channel 2, which nothing
/// else uses (its gate is the PC speaker's, kept silent).
pub fn delay_us(us: u32) {
    const PIT_HZ: u64 = 1_193_182;
    let mut left = u64::from(us) * PIT_HZ / 1_000_000;
    let mut ctrl = Port::<u8>::new(0x61);
    let mut mode = Port::<u8>::new(0x43);
    let mut ch2 = Port::<u8>::new(0x42);
    while left > 0 {
        let count = left.min(0xFFFF) as u16;
        left -= u64::from(count);
        // SAFETY: the PIT and port 0x61 (gate 2 on, speaker off); the
        // guest has not started, so nobody else programs them now.
        unsafe {
            let old = ctrl.read();
            ctrl.write((old & !0x02) | 0x01);
            mode.write(0xB0); // channel 2, low/high byte, mode 0
            ch2.write(count as u8);
            ch2.write((count >> 8) as u8);
            for _ in 0..10_000_000u32 {
                if ctrl.read() & 0x20 != 0 {
                    break;
                }
            }
            ctrl.write(old);
        }
    }
}

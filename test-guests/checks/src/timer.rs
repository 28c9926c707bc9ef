//! Time and the local APIC for the pass-through checks: delays on the PIT,
//! the local APIC (xAPIC through its MMIO page, or x2APIC through MSRs),
//! and the check `timer_wakes_hlt`.
//!
//! In the pass-through layout the guest owns the machine's interrupt
//! hardware: thinvisor intercepts neither external interrupts nor HLT, so
//! a timer interrupt must reach the guest's IDT directly and wake a HLT.

use crate::cpu::{inb, outb};
use crate::passthrough::{self, CheckResult};
use crate::recover;
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

// ------------------------------------------------------------------- PIT

/// The PIT's input clock (Hz).
const PIT_HZ: u64 = 1_193_182;
/// PIT channel 2 data port and the mode/command port.
const PIT_CH2: u16 = 0x42;
const PIT_CMD: u16 = 0x43;
/// Port 0x61 (NMI status and control): bit 0 gates channel 2, bit 1
/// drives the speaker, bit 5 reads channel 2's OUT.
const PORT_61: u16 = 0x61;
/// Bound on one poll of channel 2's OUT (far above what 50 ms take on
/// QEMU TCG or Bochs), so a missing PIT cannot hang the run.
const PIT_SPIN_LIMIT: u64 = 50_000_000;

/// Waits `us` microseconds (at most 50 000) on PIT channel 2 in mode 0
/// ("interrupt on terminal count", polled through port 0x61 bit 5; Intel
/// 8254 data sheet, mode 0; the method Linux's `pit_calibrate_tsc` uses).
/// Channel 2 is the speaker channel: nothing else in the guest uses it.
/// False when OUT never went high.
pub fn pit_delay_us(us: u64) -> bool {
    let count = (us * PIT_HZ / 1_000_000).clamp(1, 0xFFFF);
    // Gate on, speaker off.
    outb(PORT_61, (inb(PORT_61) & !0x02) | 0x01);
    // Channel 2, low then high byte, mode 0, binary.
    outb(PIT_CMD, 0b1011_0000);
    outb(PIT_CH2, count as u8);
    outb(PIT_CH2, (count >> 8) as u8);
    for _ in 0..PIT_SPIN_LIMIT {
        if inb(PORT_61) & 0x20 != 0 {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// Waits `ms` milliseconds in PIT steps of 1 ms.
pub fn pit_delay_ms(ms: u64) -> bool {
    (0..ms).all(|_| pit_delay_us(1000))
}

// ------------------------------------------------------------ local APIC

/// IA32_APIC_BASE (Intel SDM vol. 3A, 11.4.4): bit 8 BSP, bit 10 x2APIC
/// enable (EXTD), bit 11 APIC global enable, bits 12.. the xAPIC page.
const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_EXTD: u64 = 1 << 10;
const APIC_BASE_EN: u64 = 1 << 11;

/// Register offsets in the xAPIC page (SDM vol. 3A, table 11-1); the
/// x2APIC MSR is 0x800 + offset / 16 (11.12.1.2).
pub const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xB0;
const REG_SVR: u32 = 0xF0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3E0;

/// ICR delivery status (xAPIC only; SDM vol. 3A, 11.6.1).
const ICR_PENDING: u32 = 1 << 12;
/// LVT mask bit and the timer's periodic mode (SDM vol. 3A, 11.5.1).
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;

/// The local APIC as the guest found it.
#[derive(Clone, Copy, Debug)]
pub struct Lapic {
    /// Physical (and, identity-mapped, linear) address of the xAPIC page.
    pub base: u64,
    /// x2APIC mode: registers are MSRs.
    pub x2apic: bool,
    /// This processor is the bootstrap processor.
    pub bsp: bool,
}

impl Lapic {
    /// Reads IA32_APIC_BASE and, in xAPIC mode, maps the register page
    /// identity and uncached. Fails when the APIC is globally disabled.
    pub fn find() -> Result<Lapic, passthrough::Why> {
        let msr = recover::rdmsr(IA32_APIC_BASE, recover::GP)
            .map_err(|c| passthrough::why(format_args!("RDMSR IA32_APIC_BASE: #{}", c.vector)))?;
        if msr & APIC_BASE_EN == 0 {
            return Err(passthrough::why(format_args!(
                "the local APIC is disabled (IA32_APIC_BASE {msr:#x})"
            )));
        }
        let lapic = Lapic {
            base: msr & 0x000F_FFFF_FFFF_F000,
            x2apic: msr & APIC_BASE_EXTD != 0,
            bsp: msr & APIC_BASE_BSP != 0,
        };
        if !lapic.x2apic {
            passthrough::map_identity_2m(lapic.base, true);
        }
        Ok(lapic)
    }

    /// Reads a 32-bit register.
    pub fn read(&self, reg: u32) -> u32 {
        if self.x2apic {
            let (lo, _hi): (u32, u32);
            // SAFETY: x2APIC mode is on, so the MSR 0x800 + reg / 16
            // exists; reading an APIC register has no side effects.
            unsafe {
                asm!("rdmsr", in("ecx") 0x800 + reg / 16, out("eax") lo, out("edx") _hi,
                     options(nomem, nostack, preserves_flags))
            }
            lo
        } else {
            // SAFETY: `find` mapped the APIC page identity and uncached;
            // APIC registers are read as aligned dwords (SDM vol. 3A,
            // 11.4.1).
            unsafe { ((self.base + u64::from(reg)) as *const u32).read_volatile() }
        }
    }

    /// Writes a 32-bit register.
    pub fn write(&self, reg: u32, value: u32) {
        if self.x2apic {
            // SAFETY: as in `read`; the caller picks the register and value.
            unsafe {
                asm!("wrmsr", in("ecx") 0x800 + reg / 16, in("eax") value, in("edx") 0u32,
                     options(nomem, nostack, preserves_flags))
            }
        } else {
            // SAFETY: as in `read`.
            unsafe { ((self.base + u64::from(reg)) as *mut u32).write_volatile(value) }
        }
    }

    /// This processor's APIC ID.
    pub fn id(&self) -> u32 {
        let raw = self.read(REG_ID);
        if self.x2apic {
            raw
        } else {
            raw >> 24
        }
    }

    /// Software-enables the APIC (SVR bit 8, spurious vector 0xFF) and
    /// accepts every priority (TPR 0): after a reset the APIC is
    /// software-disabled (SDM vol. 3A, 11.4.7.2, 11.9).
    pub fn enable(&self) {
        self.write(REG_TPR, 0);
        self.write(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    }

    /// Sends an IPI: `low` is the ICR's low dword (vector, delivery mode,
    /// level, shorthand), `dest` the destination APIC ID (unused with a
    /// shorthand). In xAPIC mode waits (bounded) until the APIC has sent
    /// it (SDM vol. 3A, 11.6.1: the high dword first, the low one
    /// triggers). False when it stayed pending.
    pub fn send_ipi(&self, low: u32, dest: u32) -> bool {
        if self.x2apic {
            let value = (u64::from(dest) << 32) | u64::from(low);
            // SAFETY: x2APIC mode: the ICR is one 64-bit MSR (0x830; SDM
            // vol. 3A, 11.12.9); the caller chose the IPI.
            unsafe {
                asm!("wrmsr", in("ecx") 0x830u32, in("eax") value as u32,
                     in("edx") (value >> 32) as u32, options(nomem, nostack, preserves_flags))
            }
            return true;
        }
        self.write(REG_ICR_HIGH, dest << 24);
        self.write(REG_ICR_LOW, low);
        (0..1_000_000).any(|_| self.read(REG_ICR_LOW) & ICR_PENDING == 0)
    }
}

// ------------------------------------------------- IDT with extra gates

/// The vectors this module adds: the timer, and the APIC's spurious
/// vector (no EOI, SDM vol. 3A, 11.9).
pub const TIMER_VECTOR: u8 = 0x40;
pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// Where the legacy PICs are moved before they are masked, so that a
/// spurious IRQ 7 or 15 lands on a harmless gate and not on an exception
/// vector (the BIOS leaves IRQ 0-7 on vectors 8-15).
const PIC_BASE: u8 = 0x20;

/// Ticks the timer handler counted.
static TICKS: AtomicU64 = AtomicU64::new(0);
/// 1 when the handler must EOI through the x2APIC MSR.
static EOI_X2APIC: AtomicU8 = AtomicU8::new(0);
/// The xAPIC EOI register's address.
static EOI_ADDR: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    /// Counts a tick and EOIs.
    fn tg_timer_isr();
    /// Returns at once (spurious interrupts, masked PIC lines).
    fn tg_ignore_isr();
}

global_asm!(
    r#"
.section .text.tg_timer, "ax"
.code64
.global tg_timer_isr
tg_timer_isr:
    push rax
    push rcx
    push rdx
    lock inc qword ptr [rip + {ticks}]
    cmp byte ptr [rip + {x2}], 0
    jne 1f
    mov rax, qword ptr [rip + {eoi}]
    mov dword ptr [rax], 0
    jmp 2f
1:
    mov ecx, 0x80B
    xor eax, eax
    xor edx, edx
    wrmsr
2:
    pop rdx
    pop rcx
    pop rax
    iretq
.global tg_ignore_isr
tg_ignore_isr:
    iretq
"#,
    ticks = sym TICKS,
    x2 = sym EOI_X2APIC,
    eoi = sym EOI_ADDR,
);

/// A copy of the IDT in use plus the gates above.
#[repr(C, align(16))]
struct Idt(UnsafeCell<[u64; 512]>);
// SAFETY: written only by `install_gates` on the BSP with interrupts off,
// before LIDT; afterwards only the CPU reads it.
unsafe impl Sync for Idt {}
static IDT: Idt = Idt(UnsafeCell::new([0; 512]));

/// Pseudo-descriptor for SIDT/LIDT.
#[repr(C, packed)]
struct DescriptorPtr {
    limit: u16,
    base: u64,
}

fn sidt() -> DescriptorPtr {
    let mut ptr = DescriptorPtr { limit: 0, base: 0 };
    // SAFETY: SIDT stores 10 bytes into `ptr`.
    unsafe { asm!("sidt [{}]", in(reg) &mut ptr, options(nostack, preserves_flags)) };
    ptr
}

/// # Safety
/// `ptr` must describe a valid 64-bit IDT that stays in place.
unsafe fn lidt(ptr: &DescriptorPtr) {
    // SAFETY: passed on from the caller.
    unsafe { asm!("lidt [{}]", in(reg) ptr, options(readonly, nostack, preserves_flags)) };
}

/// A 64-bit interrupt gate (SDM vol. 3A, 6.14.1): selector 0x08, DPL 0,
/// no IST (the handlers run on the interrupted stack, ring 0 only).
fn gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | (((handler >> 16) & 0xFFFF) << 48);
    [low, handler >> 32]
}

/// Loads a copy of the IDT in use with the timer, spurious and PIC gates
/// added; returns the old IDT's descriptor to restore.
fn install_gates() -> DescriptorPtr {
    let old = sidt();
    let idt = IDT.0.get();
    let old_entries = (usize::from(old.limit) + 1) / 8;
    // SAFETY: interrupts are off and this is the only user of IDT; the
    // old IDT is the guest's own (identity-mapped, `old_entries` quadwords).
    unsafe {
        for i in 0..512 {
            let v = if i < old_entries {
                ((old.base as *const u64).add(i)).read_volatile()
            } else {
                0
            };
            (*idt)[i] = v;
        }
        let set = |vector: u8, handler: u64| {
            let [lo, hi] = gate(handler);
            (*idt)[usize::from(vector) * 2] = lo;
            (*idt)[usize::from(vector) * 2 + 1] = hi;
        };
        set(TIMER_VECTOR, tg_timer_isr as *const () as u64);
        set(SPURIOUS_VECTOR, tg_ignore_isr as *const () as u64);
        for irq in 0..16 {
            set(PIC_BASE + irq, tg_ignore_isr as *const () as u64);
        }
    }
    let ptr = DescriptorPtr {
        limit: 256 * 16 - 1,
        base: idt as u64,
    };
    // SAFETY: IDT is static and now holds the old gates plus the new ones.
    unsafe { lidt(&ptr) };
    old
}

/// For the `loader` mode: the PICs masked and this module's gates added
/// to the IDT in use, which stays loaded (the IDT the loader hands over
/// and must find again after thinvisor resumed it), EOIs sent to
/// `lapic`. Interrupts stay off.
pub fn install_for_loader(lapic: &Lapic) {
    EOI_X2APIC.store(u8::from(lapic.x2apic), Relaxed);
    EOI_ADDR.store(lapic.base + u64::from(REG_EOI), Relaxed);
    mask_pics();
    let _old = install_gates();
}

/// Ticks the timer gate counted (each interrupt on `TIMER_VECTOR`).
pub fn ticks() -> u64 {
    TICKS.load(Relaxed)
}

/// Moves the 8259 PICs to vectors 0x20-0x2F and masks every line (ICW1-4,
/// then OCW1; 8259A data sheet): only the local APIC timer may interrupt.
pub fn mask_pics() {
    let io_wait = || outb(0x80, 0);
    for (cmd, data, base, cascade) in [(0x20, 0x21, PIC_BASE, 4), (0xA0, 0xA1, PIC_BASE + 8, 2)] {
        outb(cmd, 0x11); // ICW1: edge, cascade, ICW4 follows
        io_wait();
        outb(data, base); // ICW2: vector base
        io_wait();
        outb(data, cascade); // ICW3: slave on IRQ 2 / cascade identity 2
        io_wait();
        outb(data, 0x01); // ICW4: 8086 mode
        io_wait();
        outb(data, 0xFF); // OCW1: all masked
    }
}

// ------------------------------------------------------- timer_wakes_hlt

/// HLTs that must each be woken by a tick.
const HALTS: u32 = 5;

/// `timer_wakes_hlt`: the local APIC timer, calibrated against the PIT to
/// about 100 Hz (an OS's tick rate; Bochs' clock advances only 2000
/// instructions a millisecond, so a 1 kHz timer whose EOIs exit leaves the
/// guest little else to do), periodic on vector 0x40; the handler counts ticks and
/// EOIs. With interrupts on, ticks must arrive while the guest spins;
/// then `sti; hlt` five times must each return with the count grown (HLT
/// runs natively and the interrupt wakes it; under an intercepted HLT the
/// run would stop). The PICs are masked first (the BIOS may leave the PIT
/// on IRQ 0, which would arrive on vector 8).
pub fn timer_wakes_hlt() -> CheckResult {
    let lapic = Lapic::find()?;
    EOI_X2APIC.store(u8::from(lapic.x2apic), Relaxed);
    EOI_ADDR.store(lapic.base + u64::from(REG_EOI), Relaxed);
    mask_pics();
    let old_idt = install_gates();
    let result = run_timer(&lapic);
    // Timer off, interrupts off, the old IDT back whatever happened.
    lapic.write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    lapic.write(REG_TIMER_INITIAL, 0);
    // SAFETY: CLI only masks interrupts.
    unsafe { asm!("cli", options(nomem, nostack)) };
    // SAFETY: the old descriptor is the IDT the guest set up at start-up.
    unsafe { lidt(&old_idt) };
    result
}

fn run_timer(lapic: &Lapic) -> CheckResult {
    lapic.enable();
    // Calibrate: divide by 16, one-shot from all ones, masked, 10 ms.
    lapic.write(REG_TIMER_DIVIDE, 0x3);
    lapic.write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    lapic.write(REG_TIMER_INITIAL, u32::MAX);
    passthrough::ensure!(pit_delay_us(10_000), "PIT channel 2 never reached 0");
    let elapsed = u32::MAX - lapic.read(REG_TIMER_CURRENT);
    lapic.write(REG_TIMER_INITIAL, 0);
    passthrough::ensure!(
        elapsed > 0,
        "the local APIC timer did not count in 10 ms (current count stuck)"
    );
    // 10 ms.
    let period = elapsed.max(16);
    say!(
        "test-guest: local APIC {} at {:#x}, ID {}; timer {} ticks per ms (divide by 16)",
        if lapic.x2apic { "x2APIC" } else { "xAPIC" },
        lapic.base,
        lapic.id(),
        elapsed / 10
    );
    TICKS.store(0, Relaxed);
    lapic.write(REG_LVT_TIMER, LVT_PERIODIC | u32::from(TIMER_VECTOR));
    lapic.write(REG_TIMER_INITIAL, period);
    // Interrupts on while spinning: ticks must arrive before any HLT, so
    // a broken timer fails the check instead of halting for good.
    // SAFETY: the IDT has the timer, spurious and PIC gates; every other
    // source is masked.
    unsafe { asm!("sti", options(nomem, nostack)) };
    let spun = (0..200).find(|_| {
        pit_delay_us(1000);
        TICKS.load(Relaxed) >= 2
    });
    // SAFETY: as above.
    unsafe { asm!("cli", options(nomem, nostack)) };
    passthrough::ensure!(
        spun.is_some(),
        "no timer interrupt in 200 ms with interrupts on ({} ticks)",
        TICKS.load(Relaxed)
    );
    for i in 0..HALTS {
        let before = TICKS.load(Relaxed);
        // SAFETY: STI's interrupt shadow covers the HLT, so the tick
        // cannot slip in between; the periodic timer wakes the HLT and
        // its handler returns after it.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
        let after = TICKS.load(Relaxed);
        passthrough::ensure!(
            after > before,
            "HLT {i} returned without a tick ({before} ticks before and after)"
        );
    }
    say!(
        "test-guest: {HALTS} HLTs woken by the timer, {} ticks in all",
        TICKS.load(Relaxed)
    );
    Ok(())
}

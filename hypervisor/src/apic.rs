//! The local APIC seen from the guest, and INIT/SIPI emulation.
//!
//! The xAPIC page is read-only in the nested tables for the whole run (and
//! the x2APIC ICR MSR's writes are intercepted), so every guest write to
//! it exits and is carried out here on the real APIC — except INIT and
//! STARTUP IPIs, which never reach the hardware: a real INIT would reset
//! the processor out of thinvisor on SVM (QEMU resets it even with the
//! INIT intercept) and stays pending forever under Bochs' VT-x. thinvisor
//! plays the target processor's part itself (docs/security.md, "INIT and
//! SIPI"):
//!
//! - INIT to a running processor marks it in its [`HostSignals`] and kicks
//!   it with an NMI (NMIs exit on both backends); its next entry turns
//!   into `Exit::Init`, and it waits in the host, in HLT, for a SIPI.
//! - SIPI to a processor that saw INIT records the vector and wakes it
//!   with an NMI; it resets its vCPU to real mode at `vector << 12`.
//! - INIT to the boot processor is ignored (logged): after INIT the boot
//!   processor would run the firmware's reset vector again.
//! - INIT or SIPI to a processor thinvisor does not hold is dropped: it
//!   must never start outside thinvisor.
//!
//! The application processors wait the same way for their first SIPI
//! (docs/architecture.md, "All processors").

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use log::{info, warn};
use thinvisor_memory::GuestPhysAddr;
use thinvisor_vmm::apic::{
    DeliveryMode, DestinationMode, Icr, LogicalId, Shorthand, XAPIC_DFR, XAPIC_ICR_HIGH,
    XAPIC_ICR_LOW, XAPIC_LDR,
};
use thinvisor_vmm::{DeviceWrite, HostSignals};
use x86_64::registers::model_specific::Msr;

use crate::{mem, percpu};

/// Processors (by APIC ID) whose INIT/SIPI thinvisor handles.
const MAX_APIC_ID: usize = 64;

/// Per APIC ID, the processor's start-up state: 0 = not a processor
/// thinvisor holds; otherwise [`AP`] or [`BOOT`], with [`INIT_SEEN`] and
/// [`RUNNING`] (whose bits 7:0 are the vector it last started at).
static MAILBOX: [AtomicU32; MAX_APIC_ID] = [const { AtomicU32::new(0) }; MAX_APIC_ID];
/// An application processor under thinvisor.
const AP: u32 = 1 << 8;
/// INIT arrived since the processor last started: a SIPI starts it.
const INIT_SEEN: u32 = 1 << 9;
/// The processor runs the guest.
const RUNNING: u32 = 1 << 10;
/// The boot processor.
const BOOT: u32 = 1 << 11;

/// Per APIC ID, the processor's signals (its per-CPU area's).
static SIGNALS: [AtomicPtr<HostSignals>; MAX_APIC_ID] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_APIC_ID];

/// Per APIC ID, its xAPIC LDR and DFR as the guest wrote them (logical
/// destinations of INIT and SIPI are resolved against these).
static LDR: [AtomicU32; MAX_APIC_ID] = [const { AtomicU32::new(0) }; MAX_APIC_ID];
static DFR: [AtomicU32; MAX_APIC_ID] = [const { AtomicU32::new(u32::MAX) }; MAX_APIC_ID];

/// The xAPIC pages whose writes are watched (0: free slot). One unless
/// the guest moves a processor's APIC ([`write_apic_base`]).
static WATCHED: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_ENABLE: u64 = 1 << 11;
const X2APIC_ENABLE: u64 = 1 << 10;
const APIC_BASE_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Local vector table entries with a delivery mode (SDM vol. 3A, table
/// 11-1), and the mode that means INIT.
const LVT_CMCI: u64 = 0x2F0;
const LVT_THERMAL: u64 = 0x330;
const LVT_PERF: u64 = 0x340;
const LVT_LINT0: u64 = 0x350;
const LVT_LINT1: u64 = 0x360;
const LVT_MODE_INIT: u64 = 5;

/// The one APIC device.
pub static APIC: ApicPage = ApicPage;

/// Take the boot processor's part and make the local APIC's page
/// read-only to the guest so its ICR writes reach thinvisor. Called once
/// on the boot processor before the guest runs.
pub fn watch_icr() {
    let cpu = percpu::current();
    register(cpu.apic_id, BOOT);
    // SAFETY: IA32_APIC_BASE exists on every processor with a local APIC.
    let base = unsafe { Msr::new(IA32_APIC_BASE).read() };
    if base & X2APIC_ENABLE != 0 {
        info!("local APIC in x2APIC mode: the ICR MSR's writes are watched");
        return;
    }
    let page = base & APIC_BASE_MASK;
    match watch_page(page) {
        Ok(()) => {
            info!("local APIC at {page:#x}: guest writes are emulated (INIT and SIPI by thinvisor)")
        }
        Err(e) => warn!("cannot watch the local APIC at {page:#x}: {e}"),
    }
}

/// Write-protect `page` in the nested tables, once.
fn watch_page(page: u64) -> Result<(), &'static str> {
    if WATCHED.iter().any(|w| w.load(Ordering::Acquire) == page) {
        return Ok(());
    }
    if !mem::is_mapped(page, 4096) {
        return Err("outside the host's direct map");
    }
    let slot = WATCHED
        .iter()
        .find(|w| w.load(Ordering::Acquire) == 0)
        .ok_or("too many APIC pages")?;
    crate::passthrough::write_protect_mapped(page)?;
    slot.store(page, Ordering::Release);
    Ok(())
}

/// Whether `gpa` lies in a watched APIC page.
pub fn is_apic_page(gpa: GuestPhysAddr) -> bool {
    let page = gpa.as_u64() & !0xFFF;
    WATCHED
        .iter()
        .any(|w| w.load(Ordering::Acquire) == page && page != 0)
}

/// A guest write to IA32_APIC_BASE that `thinvisor_vmm::guard` let
/// through: the new xAPIC page is watched before the write lands, so the
/// guest cannot escape the ICR watch by moving its APIC. False (the guest
/// gets #GP) when the page cannot be watched or the processor refuses.
pub fn write_apic_base(value: u64) -> bool {
    if value & APIC_ENABLE != 0 && value & X2APIC_ENABLE == 0 {
        let page = value & APIC_BASE_MASK;
        if let Err(e) = watch_page(page) {
            warn!("guest APIC base {value:#x} refused: its page cannot be watched ({e})");
            return false;
        }
    }
    // SAFETY: the guest's own APIC base, checked by the guard and now
    // watched; a #GP (reserved bits, an invalid mode change) comes back
    // as false.
    unsafe { crate::msr::write(IA32_APIC_BASE, value) }
}

/// Record this processor's slot and signals.
fn register(apic_id: u32, kind: u32) -> Option<&'static AtomicU32> {
    let slot = MAILBOX.get(apic_id as usize)?;
    let signals = &percpu::current().signals as *const HostSignals as *mut HostSignals;
    SIGNALS[apic_id as usize].store(signals, Ordering::Release);
    slot.store(kind, Ordering::Release);
    Some(slot)
}

/// Called by an application processor before its first run: wait (in the
/// host) until the guest sends it INIT and then SIPI; the SIPI's vector.
pub fn wait_for_first_sipi(apic_id: u32) -> u8 {
    let Some(slot) = register(apic_id, AP) else {
        crate::smp::stop_this_cpu("APIC ID too large for thinvisor's table")
    };
    wait_until_started(slot)
}

/// The guest sent this (running) processor INIT, or the hardware's INIT
/// exit (VT-x) says one arrived: wait for the SIPI. None for the boot
/// processor, which ignores INIT.
pub fn wait_for_sipi() -> Option<u8> {
    let cpu = percpu::current();
    let emulated = cpu.signals.take_init();
    let slot = MAILBOX.get(cpu.apic_id as usize)?;
    if slot.load(Ordering::Acquire) & AP == 0 {
        warn!(
            "INIT to the boot processor (APIC ID {}) ignored",
            cpu.apic_id
        );
        return None;
    }
    if !emulated {
        // An INIT from the hardware (a device's, VT-x): do what the
        // sender's side does for an IPI.
        init(slot);
    }
    info!(
        "CPU {} (APIC ID {}): INIT from the guest, waiting for a SIPI",
        cpu.index, cpu.apic_id
    );
    let vector = wait_until_started(slot);
    info!(
        "CPU {}: SIPI {vector:#x}, restarting at {:#x}",
        cpu.index,
        u32::from(vector) << 12
    );
    Some(vector)
}

/// Sleep until the slot says RUNNING; its vector.
///
/// The processor sleeps in HLT with interrupts off; the sender of the SIPI
/// wakes it with an NMI (an NMI ends HLT whatever RFLAGS.IF says). A
/// spinning processor would take a whole host core from an emulator, or
/// power on real hardware, for as long as the OS boots.
fn wait_until_started(slot: &AtomicU32) -> u8 {
    let cpu = percpu::current();
    loop {
        let v = slot.load(Ordering::Acquire);
        if v & RUNNING != 0 {
            // The wake-up and kick NMIs are thinvisor's, not the guest's,
            // and INIT drops whatever NMI waited. One may still be on its
            // way (the SIPI can come before this processor got here):
            // let it land in the host first, or the restarted guest would
            // take it in the middle of its real-mode start-up code.
            for _ in 0..KICK_WAIT_SPINS {
                if cpu.signals.kicks_arrived() {
                    break;
                }
                core::hint::spin_loop();
            }
            cpu.signals.drop_nmis();
            return v as u8;
        }
        // Bounded sleep: an NMI may come between the load and HLT; the
        // sender sends one per SIPI (two per start-up).
        x86_64::instructions::hlt();
    }
}

/// How long a restarting processor waits for thinvisor's NMIs still on
/// their way (an IPI lands within microseconds; the bound only matters
/// when two of them were merged into one).
const KICK_WAIT_SPINS: u32 = 100_000;

/// INIT to the processor behind `slot`: it stops and waits for a SIPI.
/// True when it was running (it must be told).
fn init(slot: &AtomicU32) -> bool {
    let old = slot
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some((v & AP) | INIT_SEEN)
        })
        .unwrap_or(0);
    old & RUNNING != 0
}

/// SIPI with `vector` to the processor behind `slot`: starts it if it
/// waits after an INIT; ignored otherwise (as by the hardware: SDM vol.
/// 3A, 9.4.4.1 — a SIPI only reaches a processor in wait-for-SIPI).
fn startup(slot: &AtomicU32, vector: u8) -> bool {
    slot.compare_exchange(
        AP | INIT_SEEN,
        AP | RUNNING | u32::from(vector),
        Ordering::AcqRel,
        Ordering::Acquire,
    )
    .is_ok()
}

/// NMI to processor `apic_id` (SDM vol. 3A, 11.6.1: delivery mode NMI,
/// physical destination): wakes it from HLT, or makes it exit. Counted in
/// its signals first, so that it can tell it from the guest's.
fn kick(apic_id: u32) {
    const NMI: u32 = 4 << 8;
    const ASSERT: u32 = 1 << 14;
    if let Some(signals) = signals_of(apic_id) {
        signals.expect_kick();
    }
    crate::smp::send_ipi_to(apic_id, ASSERT | NMI);
}

/// A registered processor's signals.
fn signals_of(apic_id: u32) -> Option<&'static HostSignals> {
    let p = SIGNALS.get(apic_id as usize)?.load(Ordering::Acquire);
    // SAFETY: a registered processor's signals live in its per-CPU area,
    // which is never freed.
    unsafe { p.as_ref() }
}

/// Writes to a watched APIC page.
pub struct ApicPage;

impl DeviceWrite for ApicPage {
    fn write(&self, gpa: GuestPhysAddr, size: u8, value: u64) -> u64 {
        let page = gpa.as_u64() & !0xFFF;
        let offset = gpa.as_u64() & 0xFFF;
        if !is_my_xapic(page) {
            // A page this processor's APIC does not decode (another
            // processor's, or one a moved APIC left behind): plain memory
            // or a device, written as the guest asked.
            return plain_write(gpa, size, value);
        }
        let reg = mem::phys_to_virt(gpa.as_u64() & !0xF) as *mut u32;
        // SAFETY: a watched page lies in the direct map (watch_page);
        // APIC registers are 32-bit, 16-byte aligned, accessed whole.
        let old = u64::from(unsafe { reg.read_volatile() });
        if size != 4 || offset & 0xF != 0 {
            warn!("guest APIC write of {size} bytes at offset {offset:#x} ignored");
            return old;
        }
        let me = percpu::current().apic_id as usize;
        match offset {
            XAPIC_ICR_LOW => {
                let high = mem::phys_to_virt(page + XAPIC_ICR_HIGH) as *const u32;
                // SAFETY: as above; ICR high holds what the guest wrote
                // there (its writes go through to the hardware).
                let icr = Icr::xapic(value as u32, unsafe { high.read_volatile() });
                if startup_ipi(&icr) {
                    return old;
                }
            }
            // A local interrupt programmed to deliver INIT would reach
            // the hardware as one (SDM vol. 3A, 11.5.1: LINT0/1, the
            // performance, thermal and CMCI entries may use mode 101).
            LVT_CMCI | LVT_THERMAL | LVT_PERF | LVT_LINT0 | LVT_LINT1
                if (value >> 8) & 7 == LVT_MODE_INIT =>
            {
                warn!(
                    "guest LVT write {value:#x} at offset {offset:#x} (delivery mode INIT) dropped"
                );
                return old;
            }
            XAPIC_LDR if me < MAX_APIC_ID => LDR[me].store(value as u32, Ordering::Release),
            XAPIC_DFR if me < MAX_APIC_ID => DFR[me].store(value as u32, Ordering::Release),
            _ => {}
        }
        // SAFETY: as above; the guest's own register write.
        unsafe { reg.write_volatile(value as u32) };
        old
    }
}

/// Whether this processor's local APIC, in xAPIC mode, decodes `page`.
fn is_my_xapic(page: u64) -> bool {
    // SAFETY: IA32_APIC_BASE exists on every processor with a local APIC.
    let base = unsafe { Msr::new(IA32_APIC_BASE).read() };
    base & APIC_ENABLE != 0 && base & X2APIC_ENABLE == 0 && base & APIC_BASE_MASK == page
}

/// The guest's store of `size` bytes at `gpa`, done by the host.
fn plain_write(gpa: GuestPhysAddr, size: u8, value: u64) -> u64 {
    let at = mem::phys_to_virt(gpa.as_u64());
    // SAFETY: watched pages lie in the direct map (watch_page) and the
    // store was the guest's own, of its own size, inside that page (the
    // decoder splits none across pages).
    unsafe {
        match size {
            1 => {
                let old = at.read_volatile();
                at.write_volatile(value as u8);
                old.into()
            }
            2 => {
                let p = at as *mut u16;
                let old = p.read_unaligned();
                p.write_unaligned(value as u16);
                old.into()
            }
            4 => {
                let p = at as *mut u32;
                let old = p.read_unaligned();
                p.write_unaligned(value as u32);
                old.into()
            }
            _ => {
                let p = at as *mut u64;
                let old = p.read_unaligned();
                p.write_unaligned(value);
                old
            }
        }
    }
}

/// A guest write to the x2APIC ICR MSR (reserved bits already refused by
/// the core): INIT and SIPI emulated, anything else sent. False when the
/// APIC is not in x2APIC mode (the MSR does not exist then: the guest gets
/// #GP).
pub fn x2apic_icr_write(value: u64) -> bool {
    // SAFETY: IA32_APIC_BASE exists on every processor with a local APIC;
    // the guest's APIC is this processor's own (pass-through).
    if unsafe { Msr::new(IA32_APIC_BASE).read() } & X2APIC_ENABLE == 0 {
        return false;
    }
    if startup_ipi(&Icr::x2apic(value)) {
        return true;
    }
    // SAFETY: the guest's own IPI, as it asked: x2APIC mode is on (checked
    // above) and no reserved bit is set (checked by the core).
    unsafe { Msr::new(thinvisor_vmm::apic::X2APIC_ICR_MSR).write(value) };
    true
}

/// INIT, INIT de-assert and SIPI: carried out here for every processor
/// they reach, never sent. True when `icr` was one of them.
fn startup_ipi(icr: &Icr) -> bool {
    let mode = icr.delivery_mode();
    if !matches!(mode, DeliveryMode::Init | DeliveryMode::Startup) {
        // INIT level de-assert does nothing on current processors (SDM
        // vol. 3A, 11.6.1): swallowed too.
        return mode == DeliveryMode::InitDeassert;
    }
    let me = percpu::current().apic_id;
    // Whether the IPI names one processor (a broadcast naturally misses
    // the IDs no processor has).
    let exact = icr.shorthand() == Shorthand::None
        && icr.destination_mode() == DestinationMode::Physical
        && icr.destination() != icr.broadcast_id();
    let mut dropped = false;
    for (id, slot) in MAILBOX.iter().enumerate() {
        let logical = LogicalId {
            ldr: LDR[id].load(Ordering::Acquire),
            dfr: DFR[id].load(Ordering::Acquire),
        };
        let id = id as u32;
        if !icr.reaches(id, me, logical) {
            continue;
        }
        let state = slot.load(Ordering::Acquire);
        if state & AP == 0 {
            if state & BOOT == 0 {
                dropped = true;
            } else if mode == DeliveryMode::Init {
                warn!("INIT to the boot processor (APIC ID {id}) ignored");
            }
            continue;
        }
        match mode {
            DeliveryMode::Init => {
                if init(slot) {
                    tell_init(id, me);
                }
            }
            _ => {
                if startup(slot, icr.vector()) && id != me {
                    kick(id);
                }
            }
        }
    }
    if dropped && exact {
        warn!(
            "IPI {:#x} to a processor thinvisor does not hold: dropped",
            icr.raw
        );
    }
    true
}

/// Tell running processor `id` that INIT came: its signals, then an NMI
/// that makes it exit (or its own next entry look, when it is the sender).
fn tell_init(id: u32, me: u32) {
    let Some(signals) = signals_of(id) else {
        return;
    };
    signals.post_init();
    if id == me {
        signals.kick_self();
    } else {
        kick(id);
    }
}

//! The local APIC seen from the guest: its page is read-only in the nested
//! tables (and the x2APIC ICR MSR's writes are intercepted), so every
//! guest write to it exits and is carried out here on the real APIC,
//! except the INIT and SIPI IPIs addressed to processors thinvisor holds,
//! which it delivers itself: the application processors wait in the host
//! until then, on both vendors (docs/architecture.md, "All processors").

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use log::{info, warn};
use thinvisor_memory::GuestPhysAddr;
use thinvisor_vmm::apic::{DeliveryMode, Icr, XAPIC_ICR_HIGH, XAPIC_ICR_LOW};
use thinvisor_vmm::DeviceWrite;
use x86_64::registers::model_specific::Msr;

use crate::{mem, percpu};

/// Processors (by APIC ID) whose INIT/SIPI thinvisor handles.
const MAX_APIC_ID: usize = 64;

/// Per APIC ID: 0 = not held by thinvisor, HELD = waiting for INIT,
/// HELD|INIT = INIT seen, waiting for SIPI, STARTED|vector = SIPI given.
static MAILBOX: [AtomicU32; MAX_APIC_ID] = [const { AtomicU32::new(0) }; MAX_APIC_ID];
const HELD: u32 = 1 << 8;
const INIT_SEEN: u32 = 1 << 9;
const STARTED: u32 = 1 << 10;

/// The xAPIC page's physical address; 0 when not watched.
static APIC_PAGE: AtomicU64 = AtomicU64::new(0);
/// The page once watched, after it was given back.
static RELEASED_PAGE: AtomicU64 = AtomicU64::new(0);

/// The one APIC device.
pub static APIC: ApicPage = ApicPage;

/// Make the local APIC's page read-only to the guest so its ICR writes
/// reach thinvisor. Called once on the boot processor before the guest
/// runs.
pub fn watch_icr() {
    const IA32_APIC_BASE: u32 = 0x1B;
    const X2APIC_ENABLE: u64 = 1 << 10;
    // SAFETY: IA32_APIC_BASE exists on every processor with a local APIC.
    let base = unsafe { Msr::new(IA32_APIC_BASE).read() };
    if base & X2APIC_ENABLE != 0 {
        info!("local APIC in x2APIC mode: the ICR MSR's writes are watched");
        return;
    }
    let page = base & 0xF_FFFF_F000;
    match crate::passthrough::write_protect(page) {
        Ok(()) => {
            APIC_PAGE.store(page, Ordering::Release);
            info!(
                "local APIC at {page:#x}: guest writes are emulated (INIT/SIPI to held processors)"
            );
        }
        Err(e) => warn!("cannot watch the local APIC at {page:#x}: {e}"),
    }
}

/// Whether `gpa` lies in the APIC page thinvisor watched and gave back.
pub fn was_apic_page(gpa: GuestPhysAddr) -> bool {
    let page = RELEASED_PAGE.load(Ordering::Acquire);
    page != 0 && gpa.as_u64() & !0xFFF == page
}

/// Once every held processor has been started, the guest's APIC writes
/// need not exit any more: give the page back (EOIs and timer writes then
/// run at full speed). A later INIT/SIPI from the guest (a processor taken
/// offline and back) goes to the hardware: VT-x handles it as INIT and
/// SIPI exits; on SVM it is not supported (docs/architecture.md).
fn release_when_all_started() {
    let all = MAILBOX.iter().all(|slot| {
        let v = slot.load(Ordering::Acquire);
        v & HELD == 0 || v & STARTED != 0
    });
    if !all {
        return;
    }
    let page = APIC_PAGE.swap(0, Ordering::AcqRel);
    if page == 0 {
        return;
    }
    match crate::passthrough::write_unprotect(page) {
        Ok(()) => {
            RELEASED_PAGE.store(page, Ordering::Release);
            info!("every processor started: the local APIC's page is the guest's again");
        }
        Err(e) => {
            warn!("cannot give the local APIC's page back: {e}");
            APIC_PAGE.store(page, Ordering::Release);
        }
    }
}

/// Whether `gpa` lies in the watched APIC page.
pub fn is_apic_page(gpa: GuestPhysAddr) -> bool {
    let page = APIC_PAGE.load(Ordering::Acquire);
    page != 0 && gpa.as_u64() & !0xFFF == page
}

/// Called by an application processor before it waits: from now on
/// thinvisor holds its INIT/SIPI.
fn hold(apic_id: u32) -> Option<&'static AtomicU32> {
    let slot = MAILBOX.get(apic_id as usize)?;
    slot.store(HELD, Ordering::Release);
    Some(slot)
}

/// Wait (in the host) until the guest sends this processor INIT and then
/// SIPI; the SIPI's vector.
///
/// The processor sleeps in HLT with interrupts off; the boot processor
/// wakes it with an NMI once the SIPI is posted (an NMI ends HLT whatever
/// RFLAGS.IF says). A spinning processor would take a whole host core from
/// an emulator, or power on real hardware, for as long as the OS boots.
pub fn wait_for_sipi(apic_id: u32) -> u8 {
    let Some(slot) = hold(apic_id) else {
        crate::smp::stop_this_cpu("APIC ID too large for thinvisor's table")
    };
    let cpu = percpu::current();
    loop {
        let v = slot.load(Ordering::Acquire);
        if v & STARTED != 0 {
            // The wake-up NMIs were thinvisor's, not the guest's.
            cpu.nmi_pending.store(0, Ordering::Release);
            return v as u8;
        }
        // Bounded sleep: the NMI may have come between the load and HLT;
        // then the next timer-free wake-up is the next NMI, so the boot
        // processor sends one per SIPI it posts (two per start-up).
        x86_64::instructions::hlt();
    }
}

/// Wake processor `apic_id` from its HLT with an NMI IPI (SDM vol. 3A,
/// 11.6.1: delivery mode NMI, physical destination).
fn wake(apic_id: u32) {
    const NMI: u32 = 4 << 8;
    const ASSERT: u32 = 1 << 14;
    crate::smp::send_ipi_to(apic_id, ASSERT | NMI);
}

/// Writes to the APIC page.
pub struct ApicPage;

impl DeviceWrite for ApicPage {
    fn write(&self, gpa: GuestPhysAddr, size: u8, value: u64) -> u64 {
        let offset = gpa.as_u64() & 0xFFF;
        let reg = mem::phys_to_virt(gpa.as_u64() & !0xF) as *mut u32;
        // SAFETY: the APIC page lies in the direct map (below 4 GiB); APIC
        // registers are 32-bit, 16-byte aligned, accessed whole.
        let old = u64::from(unsafe { reg.read_volatile() });
        if size != 4 || offset & 0xF != 0 {
            warn!("guest APIC write of {size} bytes at offset {offset:#x} ignored");
            return old;
        }
        if offset == XAPIC_ICR_LOW {
            let high = mem::phys_to_virt((gpa.as_u64() & !0xFFF) + XAPIC_ICR_HIGH) as *const u32;
            // SAFETY: as above; ICR high holds what the guest wrote there
            // (its writes go through to the hardware).
            let icr = Icr::xapic(value as u32, unsafe { high.read_volatile() });
            if startup_ipi(&icr) {
                return old;
            }
        }
        // SAFETY: as above; the guest's own register write.
        unsafe { reg.write_volatile(value as u32) };
        old
    }
}

/// A guest write to the x2APIC ICR MSR (reserved bits already refused by
/// the core): start a held processor, or send. False when the APIC is not
/// in x2APIC mode (the MSR does not exist then: the guest gets #GP).
pub fn x2apic_icr_write(value: u64) -> bool {
    const IA32_APIC_BASE: u32 = 0x1B;
    const X2APIC_ENABLE: u64 = 1 << 10;
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

/// INIT/SIPI to processors thinvisor holds: delivered here, not sent.
/// True when the IPI concerned only such processors.
fn startup_ipi(icr: &Icr) -> bool {
    let mode = icr.delivery_mode();
    if !matches!(
        mode,
        DeliveryMode::Init | DeliveryMode::InitDeassert | DeliveryMode::Startup
    ) {
        return false;
    }
    let me = percpu::current().apic_id;
    let mut held_any = false;
    let mut others = false;
    for (id, slot) in MAILBOX.iter().enumerate() {
        let id = id as u32;
        if !icr.targets(id, me) || id == me {
            continue;
        }
        let state = slot.load(Ordering::Acquire);
        if state & HELD == 0 {
            others = true;
            continue;
        }
        held_any = true;
        match mode {
            DeliveryMode::Init if state & STARTED == 0 => {
                slot.store(HELD | INIT_SEEN, Ordering::Release)
            }
            DeliveryMode::Startup if state == HELD | INIT_SEEN => {
                slot.store(HELD | STARTED | u32::from(icr.vector()), Ordering::Release);
                wake(id);
            }
            DeliveryMode::Init if state & STARTED != 0 => {
                warn!("INIT to running processor {id} (APIC ID) not supported yet: ignored")
            }
            _ => {}
        }
    }
    if others && held_any {
        warn!(
            "IPI {:#x} to held and other processors: only the held ones got it",
            icr.raw
        );
    }
    if held_any && mode == DeliveryMode::Startup {
        release_when_all_started();
    }
    held_any
}

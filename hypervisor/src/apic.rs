//! The local APIC seen from the guest on SVM: its page is read-only in the
//! nested tables, so every guest write to it exits and is carried out here
//! on the real APIC, except the INIT and SIPI IPIs addressed to processors
//! thinvisor holds, which it delivers itself (SVM has no wait-for-SIPI
//! state to leave them in; AMD APM vol. 2, 15.29 discusses INIT).

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
        warn!("x2APIC is on: the guest's INIT/SIPI go to the hardware (not yet intercepted)");
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
pub fn wait_for_sipi(apic_id: u32) -> u8 {
    let Some(slot) = hold(apic_id) else {
        crate::smp::stop_this_cpu("APIC ID too large for thinvisor's table")
    };
    loop {
        let v = slot.load(Ordering::Acquire);
        if v & STARTED != 0 {
            return v as u8;
        }
        core::hint::spin_loop();
    }
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
                slot.store(HELD | STARTED | u32::from(icr.vector()), Ordering::Release)
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
    held_any
}

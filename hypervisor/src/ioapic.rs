//! The I/O APICs seen from the guest: their register pages are read-only
//! in the nested tables, so each guest write exits and is carried out here
//! on the real I/O APIC — except a redirection entry set to deliver INIT.
//! Such an entry would send a processor a real INIT, which on SVM resets
//! it out of thinvisor (docs/security.md, "INIT and SIPI"); the write is
//! dropped. Reads are not intercepted.
//!
//! The registers are indirect (Intel 82093AA I/O APIC datasheet, 3.0): the
//! guest selects a register through IOREGSEL (offset 0x00) and reads or
//! writes it through IOWIN (offset 0x10); redirection entry n is registers
//! 0x10 + 2n (low dword: vector, delivery mode in bits 10:8, ...) and
//! 0x11 + 2n (destination). IOREGSEL is readable, so a write of IOWIN is
//! judged by what the hardware holds, with no state kept here.

use core::sync::atomic::{AtomicU64, Ordering};

use log::{info, warn};
use thinvisor_memory::GuestPhysAddr;
use thinvisor_vmm::DeviceWrite;

use crate::mem;

/// The watched I/O APIC pages (0: free slot).
static PAGES: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
/// The first redirection entry's register.
const IOREDTBL: u32 = 0x10;
/// Delivery mode INIT (bits 10:8 = 101).
const MODE_INIT: u64 = 5;

/// Watch every I/O APIC the MADT lists. Called once before the guest runs.
pub fn watch() {
    let mut found = [0u64; 4];
    let n =
        thinvisor_boot::acpi::io_apics_at(&mem::DirectMapReader, crate::acpi_rsdp(), &mut found);
    for (slot, &address) in PAGES.iter().zip(&found[..n]) {
        let page = address & !0xFFF;
        if !mem::is_mapped(page, 4096) {
            warn!("I/O APIC at {address:#x} lies outside the host's direct map: not watched");
            continue;
        }
        match crate::passthrough::write_protect_mapped(page) {
            Ok(()) => {
                slot.store(page, Ordering::Release);
                info!("I/O APIC at {address:#x}: guest writes are checked (no INIT delivery)");
            }
            Err(e) => warn!("cannot watch the I/O APIC at {address:#x}: {e}"),
        }
    }
}

/// Whether `gpa` lies in a watched I/O APIC page.
pub fn is_ioapic_page(gpa: GuestPhysAddr) -> bool {
    let page = gpa.as_u64() & !0xFFF;
    page != 0 && PAGES.iter().any(|p| p.load(Ordering::Acquire) == page)
}

/// The one I/O APIC device.
pub static IOAPIC: IoApicPage = IoApicPage;

/// Writes to a watched I/O APIC page.
pub struct IoApicPage;

impl DeviceWrite for IoApicPage {
    fn write(&self, gpa: GuestPhysAddr, size: u8, value: u64) -> u64 {
        let page = gpa.as_u64() & !0xFFF;
        let offset = gpa.as_u64() & 0xFFF;
        let reg = mem::phys_to_virt(gpa.as_u64() & !0x3) as *mut u32;
        if size != 4 || offset & 0x3 != 0 {
            // The registers are 32-bit, accessed whole (datasheet 3.0).
            warn!("guest I/O APIC write of {size} bytes at offset {offset:#x} ignored");
            return 0;
        }
        if offset == IOWIN {
            let sel = mem::phys_to_virt(page + IOREGSEL) as *const u32;
            // SAFETY: a watched page lies in the direct map (`watch`);
            // IOREGSEL is a 32-bit register read whole.
            let selected = unsafe { sel.read_volatile() } & 0xFF;
            if selected >= IOREDTBL
                && (selected - IOREDTBL).is_multiple_of(2)
                && (value >> 8) & 7 == MODE_INIT
            {
                warn!(
                    "guest I/O APIC redirection entry {} set to deliver INIT ({value:#x}): dropped",
                    (selected - IOREDTBL) / 2
                );
                return 0;
            }
        }
        // SAFETY: as above; the guest's own register write.
        unsafe { reg.write_volatile(value as u32) };
        0
    }
}

//! AMD-Vi: programming the IOMMUs (AMD IOMMU spec rev. 3.x, 3.3
//! "IOMMU Initialization", 2.4 "Commands", 2.5 "Event Logging").

use core::ops::Range;

use thinvisor_iommu::amdvi::{self as spec, Event};
use thinvisor_iommu::ivrs::Ivhd;
use thinvisor_iommu::tables::{self, Format, Identity};
use thinvisor_iommu::{DmaFault, SourceId};

use super::{wait_for, Regs};
use crate::mem;

const MAX: usize = thinvisor_iommu::ivrs::MAX_UNITS;

/// One IOMMU: its registers, its command ring and event log (one page
/// each, in thinvisor's block), where thinvisor reads the event log next.
#[derive(Clone, Copy)]
struct Unit {
    regs: Regs,
    commands: u64,
    command_tail: usize,
    events: u64,
    event_head: usize,
    /// An 8-byte word COMPLETION_WAIT stores to.
    completion: u64,
    efr: u64,
    /// The IOMMU's own PCI function: its ID and the physical address of
    /// its PCI Status register in ECAM space, when the MCFG gave one.
    pci: SourceId,
    pci_status: Option<u64>,
}

/// The IOMMUs, once translation is on.
pub struct Units {
    units: [Option<Unit>; MAX],
}

/// The register window's size: 16 KiB, or 512 KiB with the performance
/// counters (EFR.PCSup, bit 9) (3.4).
pub fn mmio_len(u: &Ivhd) -> u64 {
    if u.efr & (1 << 9) != 0 {
        512 * 1024
    } else {
        spec::MMIO_LEN
    }
}

fn page() -> Result<u64, &'static str> {
    mem::alloc_zeroed(4096, 4096).ok_or("out of memory for an IOMMU ring")
}

impl Unit {
    /// Queues a command and tells the IOMMU (the tail register).
    fn submit(&mut self, cmd: [u64; 2]) {
        let slot = mem::phys_to_virt(self.commands + self.command_tail as u64) as *mut u64;
        // SAFETY: the command ring is a page of thinvisor's block that
        // only this unit's (locked) owner writes; the slot lies inside it.
        unsafe {
            slot.write_volatile(cmd[0]);
            slot.add(1).write_volatile(cmd[1]);
        }
        self.command_tail = (self.command_tail + spec::COMMAND_LEN) % spec::RING_BYTES;
        self.regs
            .write64(spec::COMMAND_TAIL, self.command_tail as u64);
    }

    /// COMPLETION_WAIT: every earlier command done, or a timeout.
    fn sync(&mut self, token: u64) -> Result<(), &'static str> {
        let word = mem::phys_to_virt(self.completion) as *mut u64;
        // SAFETY: the completion word is a heap page of this unit's.
        unsafe { word.write_volatile(0) };
        self.submit(spec::completion_wait(self.completion, token));
        // SAFETY: as above; the IOMMU writes it, thinvisor reads.
        if wait_for(|| unsafe { word.read_volatile() } == token) {
            Ok(())
        } else {
            Err("the IOMMU did not complete its commands")
        }
    }
}

/// Builds the tables and the device table, and switches every IOMMU on.
pub fn enable(
    units: &[Ivhd],
    top: u64,
    hidden: &[Range<u64>],
    ecam: Option<super::Ecam>,
) -> Result<Units, &'static str> {
    let levels = if top <= 1 << 39 { 3 } else { 4 };
    let built = tables::build(
        &mut mem::HeapTables,
        Format::AmdVi,
        &Identity {
            top,
            hidden,
            levels,
            huge_2m: true,
            huge_1g: true,
        },
    )
    .map_err(|_| "out of memory for the I/O page tables")?;
    let max_id = units.iter().map(|u| u.max_device_id).max().unwrap_or(0);
    let bytes = spec::device_table_bytes(max_id);
    let table =
        mem::alloc_zeroed(bytes as u64, 4096).ok_or("out of memory for the device table")?;
    // SAFETY: freshly allocated from thinvisor's heap, `bytes` long,
    // 8-byte aligned, used only as the device table.
    let entries =
        unsafe { core::slice::from_raw_parts_mut(mem::phys_to_virt(table) as *mut u64, bytes / 8) };
    spec::fill_device_table(
        entries,
        spec::device_table_entry(built.root.as_u64(), levels),
    );
    log::debug!(
        "iommu: AMD-Vi tables: {levels} levels, {} I/O page tables; device table at {table:#x} for DeviceIDs 0..={max_id:#x} ({} KiB)",
        built.tables,
        bytes >> 10
    );
    let mut all = Units { units: [None; MAX] };
    for (slot, u) in all.units.iter_mut().zip(units) {
        let regs = Regs { base: u.base };
        let mut unit = Unit {
            regs,
            commands: page()?,
            command_tail: 0,
            events: page()?,
            event_head: 0,
            completion: page()?,
            efr: regs.read64(spec::EXTENDED_FEATURE),
            pci: SourceId(u.device_id),
            pci_status: ecam
                .filter(|_| u.segment == 0)
                .and_then(|e| e.config(u.device_id))
                .map(|config| config + 6),
        };
        if unit.efr == u64::MAX {
            return Err("an IOMMU's registers read as all ones");
        }
        log::debug!(
            "iommu: AMD-Vi unit at {:#x} (PCI {}, capability at {:#x}): EFR {:#x}",
            u.base,
            thinvisor_iommu::SourceId(u.device_id),
            u.capability_offset,
            unit.efr
        );
        enable_unit(&mut unit, table, bytes / spec::DTE_LEN, max_id)?;
        *slot = Some(unit);
    }
    Ok(all)
}

/// 3.3's order: off; device table, command buffer and event log bases,
/// pointers zeroed, status cleared; command buffer and event log on, then
/// the IOMMU; everything it may have cached invalidated, and a
/// completion wait to be sure. Interrupts stay off: thinvisor polls.
fn enable_unit(u: &mut Unit, table: u64, entries: usize, max_id: u16) -> Result<(), &'static str> {
    let r = u.regs;
    let control = r.read64(spec::CONTROL);
    let off = control
        & !(spec::CONTROL_IOMMU_EN
            | spec::CONTROL_CMD_BUF_EN
            | spec::CONTROL_EVENT_LOG_EN
            | spec::CONTROL_EVENT_INT_EN
            | spec::CONTROL_COM_WAIT_INT_EN);
    r.write64(spec::CONTROL, off);
    r.write64(
        spec::DEVICE_TABLE_BASE,
        spec::device_table_base(table, entries),
    );
    r.write64(spec::COMMAND_BUFFER_BASE, spec::ring_base(u.commands));
    r.write64(spec::EVENT_LOG_BASE, spec::ring_base(u.events));
    for reg in [
        spec::COMMAND_HEAD,
        spec::COMMAND_TAIL,
        spec::EVENT_HEAD,
        spec::EVENT_TAIL,
    ] {
        r.write64(reg, 0);
    }
    r.write64(
        spec::STATUS,
        spec::STATUS_EVENT_OVERFLOW | spec::STATUS_EVENT_LOG_INT | spec::STATUS_COM_WAIT_INT,
    );
    let on = off | spec::CONTROL_CMD_BUF_EN | spec::CONTROL_EVENT_LOG_EN;
    r.write64(spec::CONTROL, on);
    r.write64(spec::CONTROL, on | spec::CONTROL_IOMMU_EN);
    if u.efr & spec::EFR_IA_SUP != 0 {
        u.submit(spec::invalidate_all());
    } else {
        // Without INVALIDATE_IOMMU_ALL: the domain's translations, then
        // every device table entry, a ring's worth at a time.
        u.submit(spec::invalidate_domain_pages());
        let mut id = 0u32;
        while id <= u32::from(max_id) {
            for _ in 0..128 {
                if id > u32::from(max_id) {
                    break;
                }
                u.submit(spec::invalidate_devtab_entry(id as u16));
                id += 1;
            }
            u.sync(0x7468_696e_0000_0000 | u64::from(id))?;
        }
    }
    u.sync(0x7468_696e_7669_736f)
}

impl Unit {
    /// Logs the events at the head of the event log, zeroing each, and
    /// moves the head register on. The entries are read until an empty
    /// one rather than up to the tail register: QEMU 7.2 never updates
    /// the tail register it shows software, and an empty (zeroed) slot is
    /// as good a stop on real hardware. An overflow (the IOMMU stopped
    /// logging) is cleared by the spec's restart (2.5.2): log off, status
    /// cleared, pointers zeroed, log on.
    fn poll(&mut self, report: &mut dyn FnMut(&DmaFault)) {
        let mut seen = 0;
        while seen < spec::RING_BYTES / spec::EVENT_LEN {
            let slot = mem::phys_to_virt(self.events + self.event_head as u64) as *mut u64;
            // SAFETY: the event log is a page of thinvisor's block; the
            // slot lies inside it; the IOMMU writes it, thinvisor reads and
            // zeroes what it consumed.
            let e = unsafe { [slot.read_volatile(), slot.add(1).read_volatile()] };
            match spec::decode_event(e) {
                Event::Empty => break,
                Event::PageFault(f) => report(&f),
                Event::Other {
                    code,
                    source,
                    address,
                } => log::warn!(
                    "iommu: AMD-Vi event {} ({code:#x}) from {source} at {address:#x}",
                    spec::event_name(code)
                ),
            }
            // SAFETY: as above.
            unsafe {
                slot.write_volatile(0);
                slot.add(1).write_volatile(0);
            }
            self.event_head = (self.event_head + spec::EVENT_LEN) % spec::RING_BYTES;
            seen += 1;
        }
        self.poll_pci_status();
        let r = self.regs;
        if seen > 0 {
            r.write64(spec::EVENT_HEAD, self.event_head as u64);
        }
        if r.read64(spec::STATUS) & spec::STATUS_EVENT_OVERFLOW != 0 {
            let control = r.read64(spec::CONTROL);
            r.write64(spec::CONTROL, control & !spec::CONTROL_EVENT_LOG_EN);
            r.write64(spec::STATUS, spec::STATUS_EVENT_OVERFLOW);
            r.write64(spec::EVENT_HEAD, 0);
            r.write64(spec::EVENT_TAIL, 0);
            self.event_head = 0;
            let log = mem::phys_to_virt(self.events);
            // SAFETY: the event log page, not being written: logging is off.
            unsafe { core::ptr::write_bytes(log, 0, spec::RING_BYTES) };
            r.write64(spec::CONTROL, control | spec::CONTROL_EVENT_LOG_EN);
            log::warn!("iommu: an AMD-Vi event log overflowed; some faults were not recorded");
        }
    }
}

impl Unit {
    /// The IOMMU's PCI Status register: Signaled Target Abort (bit 11,
    /// write 1 to clear) means it refused a device's request. That is
    /// the only trace a blocked DMA leaves on QEMU 7.2's AMD-Vi model,
    /// which never writes its event log (its `amdvi_test_mask` ORs where
    /// it should AND, so every event counts as an overflow); on hardware
    /// the event log has the details and this line comes as well.
    fn poll_pci_status(&mut self) {
        const SIGNALED_TARGET_ABORT: u16 = 1 << 11;
        let Some(status) = self.pci_status else {
            return;
        };
        let reg = mem::phys_to_virt(status) as *mut u16;
        // SAFETY: the IOMMU's PCI Status register in the ECAM window
        // (checked mapped at discovery); a 16-bit volatile access touches
        // no other register, and writing 1 to the abort bit only clears it
        // (the other write-1-to-clear bits are written 0).
        let value = unsafe { reg.read_volatile() };
        if value != u16::MAX && value & SIGNALED_TARGET_ABORT != 0 {
            // SAFETY: as above.
            unsafe { reg.write_volatile(SIGNALED_TARGET_ABORT) };
            super::report_abort(self.pci);
        }
    }
}

impl Units {
    /// Logs and clears the events of every IOMMU.
    pub fn poll(&mut self, report: &mut dyn FnMut(&DmaFault)) {
        for u in self.units.iter_mut().flatten() {
            u.poll(report);
        }
    }
}

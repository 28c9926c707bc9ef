//! The pass-through layout: the guest is the machine's own OS.
//! Guest-physical is host-physical everywhere except thinvisor's own block
//! of memory, which the guest is never given (docs/architecture.md,
//! "Layouts").

use core::ops::Range;

use log::info;
use spin::{Mutex, Once};
use thinvisor_boot::e820::GuestMap;
use thinvisor_boot::entry::Entry32;
use thinvisor_boot::phys::{PhysWrite, PhysWriteError};
use thinvisor_boot::{guest, linux, BootInfo, MemKind, MAX_MODULES, MAX_REGIONS};
use thinvisor_memory::mtrr::{MtrrMsrs, Mtrrs};
use thinvisor_memory::nested::NptError;
use thinvisor_memory::passthrough::{Format, Layout, PassThroughTables};
use thinvisor_memory::{HostPhysAddr, PassthroughMemory};
use thinvisor_vmm::{FaultVerdict, Gpr, InitialState, NestedFault, NestedFaults, StartMode};
use x86_64::registers::model_specific::Msr;

use crate::{mem, GuestLayout, GuestMemory, GuestSetup, PAGE};

const SIZE_2M: u64 = 2 << 20;
const SIZE_4G: u64 = 4 << 30;

/// The legacy video and ROM area: device memory and firmware the VMM must
/// never read or write on a guest's behalf.
const LEGACY_HOLE: Range<u64> = 0xA_0000..0x10_0000;

/// Guest-physical ranges the VMM refuses to reach for the guest.
static HOLES: Once<[Range<u64>; 2]> = Once::new();

/// The guest's memory for another processor's vCPU: the one object the
/// first vCPU uses too (it is shared and `Sync`).
pub fn vcpu_memory() -> &'static GuestMemory {
    match crate::shared_guest_memory() {
        Some(memory) => memory,
        None => boot_error!("internal error: a vCPU before the guest's memory"),
    }
}

/// The RAM the VMM may reach for the guest: the firmware's available
/// regions (so never MMIO, firmware tables or holes between), and how many.
static RAM: Once<([Range<u64>; MAX_REGIONS], usize)> = Once::new();

/// The guest's memory for the VMM: the available RAM of the firmware's
/// map, minus thinvisor's block and the legacy area; and `top`, the end of
/// the guest-physical space the tables map.
pub(crate) fn guest_memory(boot: &BootInfo, hidden: mem::Reserved) -> (u64, &'static GuestMemory) {
    let ram = RAM.call_once(|| {
        let mut ram = [const { 0..0 }; MAX_REGIONS];
        let mut n = 0;
        let available = boot
            .memory_map()
            .iter()
            .filter(|r| r.kind == MemKind::Available);
        for (slot, r) in ram.iter_mut().zip(available) {
            *slot = r.start..r.end();
            n += 1;
        }
        (ram, n)
    });
    let ram = &ram.0[..ram.1];
    let ram_end = ram.iter().map(|r| r.end).max().unwrap_or(0);
    let holes = HOLES.call_once(|| [hidden.start..hidden.end, LEGACY_HOLE]);
    // SAFETY: all available memory is inside the direct map (relocate
    // mapped it), and the VMM reaches it only through this object: the
    // holes keep every access out of thinvisor's own memory, and nothing
    // outside the available regions (MMIO) is ever touched.
    let memory = unsafe { PassthroughMemory::new(mem::phys_to_virt(0), ram, holes) };
    // Everything up to 4 GiB (the PCI hole, the local APIC, the I/O APIC,
    // HPET, firmware) and all RAM above it is the guest's.
    let top = ram_end.max(SIZE_4G).next_multiple_of(SIZE_2M);
    (top, crate::guest_memory(GuestMemory::Passthrough(memory)))
}

/// Writes into the machine's memory for the loaders, through the direct
/// map; never into thinvisor's block or the legacy area, never outside
/// the direct map.
struct DirectMap<'a> {
    holes: &'a [Range<u64>],
}

impl DirectMap<'_> {
    fn check(&self, pa: u64, len: u64) -> Result<(), PhysWriteError> {
        let err = PhysWriteError { addr: pa, len };
        let end = pa.checked_add(len).ok_or(err)?;
        if !mem::is_mapped(pa, len) || self.holes.iter().any(|h| h.start < end && pa < h.end) {
            return Err(err);
        }
        Ok(())
    }
}

impl PhysWrite for DirectMap<'_> {
    fn write(&mut self, pa: u64, bytes: &[u8]) -> Result<(), PhysWriteError> {
        self.check(pa, bytes.len() as u64)?;
        // SAFETY: checked above: mapped guest RAM outside thinvisor's own
        // memory; the guest does not run yet.
        unsafe { mem::phys_slice_mut(pa, bytes.len() as u64) }.copy_from_slice(bytes);
        Ok(())
    }

    fn zero(&mut self, pa: u64, len: u64) -> Result<(), PhysWriteError> {
        self.check(pa, len)?;
        // SAFETY: as in `write`.
        unsafe { mem::phys_slice_mut(pa, len) }.fill(0);
        Ok(())
    }
}

/// The machine's memory map with thinvisor's block reserved: what every
/// map the guest receives says.
fn guest_map(boot: &BootInfo, hidden: mem::Reserved) -> GuestMap {
    match GuestMap::new(boot.memory_map(), &[(hidden.start, hidden.end)]) {
        Ok(map) => {
            if map.dropped_bytes() != 0 {
                log::warn!(
                    "the guest's memory map has more entries than fit: {} KiB of small usable ranges left out",
                    map.dropped_bytes() >> 10
                );
            }
            map
        }
        Err(e) => boot_error!("the guest's memory map: {e}"),
    }
}

/// The boot modules' ranges: the loaders must not write over what they
/// are still reading.
fn module_ranges(boot: &BootInfo) -> ([(u64, u64); MAX_MODULES], usize) {
    let mut out = [(0, 0); MAX_MODULES];
    let mut n = 0;
    for (slot, m) in out.iter_mut().zip(boot.modules()) {
        *slot = (m.start, m.end);
        n += 1;
    }
    (out, n)
}

/// The neutral start state of a 32-bit boot protocol's entry.
fn initial_from(e: &Entry32) -> InitialState {
    let mut s = InitialState::multiboot(e.eip, e.eax, e.ebx);
    s.mode = StartMode::Flat32 {
        eip: e.eip,
        code: e.code_selector,
        data: e.data_selector,
    };
    for (reg, value) in [
        (Gpr::Rcx, e.ecx),
        (Gpr::Rdx, e.edx),
        (Gpr::Rsi, e.esi),
        (Gpr::Rdi, e.edi),
        (Gpr::Rbp, e.ebp),
        (Gpr::Rsp, e.esp),
    ] {
        s.gprs[reg as usize] = value.into();
    }
    if let Some(g) = e.gdtr {
        s.gdt = (g.base.into(), g.limit);
    }
    s
}

/// A multiboot v1 kernel run as the machine's own OS: loaded at its own
/// physical addresses, with the machine's memory map in which thinvisor's
/// block is reserved.
pub fn multiboot_guest(
    boot: &BootInfo,
    hidden: mem::Reserved,
    image: &[u8],
    cmdline: &str,
) -> (GuestSetup, &'static GuestMemory) {
    let (top, memory) = guest_memory(boot, hidden);
    let map = guest_map(boot, hidden);
    let (avoid, n) = module_ranges(boot);
    let holes = HOLES.get().map_or(&[][..], |h| &h[..]);
    let loaded = match guest::load_multiboot_passthrough(
        image,
        cmdline.as_bytes(),
        &map,
        &avoid[..n],
        &mut DirectMap { holes },
    ) {
        Ok(l) => l,
        Err(e) => boot_error!("guest module: {e}"),
    };
    info!(
        "pass-through: guest kernel loaded at its own addresses {:#x}..{:#x}: entry {:#x}, multiboot information at {:#x}; thinvisor's {:#x}..{:#x} reserved in its map",
        loaded.kernel.start, loaded.kernel.end, loaded.entry.eip, loaded.info, hidden.start, hidden.end
    );
    let guest = GuestSetup {
        memory: GuestLayout::Passthrough { top, hidden },
        initial: initial_from(&loaded.entry),
    };
    (guest, memory)
}

/// Linux as the machine's own OS (`boot=linux`): the first module is the
/// bzImage, whose module string after its path is the kernel's command
/// line; the second, if any, the initrd. Loaded by the 32-bit boot
/// protocol with an E820 table in which thinvisor's block is reserved.
pub fn linux_guest(boot: &BootInfo, hidden: mem::Reserved) -> (GuestSetup, &'static GuestMemory) {
    let (top, memory) = guest_memory(boot, hidden);
    let map = guest_map(boot, hidden);
    let (avoid, n) = module_ranges(boot);
    let modules = boot.modules();
    let Some(kernel) = modules.first() else {
        boot_error!("boot=linux: no boot module; pass the Linux bzImage as the first module and its initrd as the second")
    };
    let read = |m: &thinvisor_boot::Module| -> &'static [u8] {
        if !mem::is_mapped(m.start, m.len()) {
            boot_error!(
                "boot module at {:#x} lies outside the memory the firmware reported",
                m.start
            );
        }
        // SAFETY: mapped (checked), reserved from every allocator and
        // avoided by the loader, so nothing writes it while it is read.
        unsafe { mem::phys_slice_mut(m.start, m.len()) }
    };
    let image = read(kernel);
    let initrd = modules.get(1).map(read);
    // The module string is "<path> <kernel command line>".
    let cmdline = kernel
        .string()
        .trim_start()
        .split_once(char::is_whitespace)
        .map_or("", |(_, rest)| rest.trim());
    let holes = HOLES.get().map_or(&[][..], |h| &h[..]);
    let l = match linux::load_linux(
        image,
        initrd,
        cmdline.as_bytes(),
        &map,
        &avoid[..n],
        &mut DirectMap { holes },
    ) {
        Ok(l) => l,
        Err(e) => boot_error!("boot=linux: {e}"),
    };
    info!(
        "Linux (boot protocol {}.{:02}) loaded at {:#x} ({} KiB), boot_params at {:#x}, command line \"{cmdline}\"; its E820 table has thinvisor's {:#x}..{:#x} reserved",
        l.protocol >> 8,
        l.protocol & 0xFF,
        l.plan.kernel,
        l.plan.kernel_len >> 10,
        l.plan.boot_params,
        hidden.start,
        hidden.end
    );
    if let Some((start, end)) = l.plan.initrd {
        info!(
            "initrd at {start:#x}..{end:#x} ({} KiB)",
            (end - start) >> 10
        );
    }
    let guest = GuestSetup {
        memory: GuestLayout::Passthrough { top, hidden },
        initial: initial_from(&l.entry),
    };
    (guest, memory)
}

/// The pass-through second-level tables, once built; behind a lock only
/// for the rare fault that maps a new region.
static TABLES: Once<Mutex<PassThroughTables>> = Once::new();

/// Which second-level format to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    Npt,
    Ept,
}

/// Build the identity tables of [0, `top`) with thinvisor's block read-only
/// on a zero filler page; for EPT with the memory types of the MTRRs as
/// the firmware left them (the processor ignores the MTRRs under EPT).
/// Returns the root.
pub fn build_tables(
    kind: TableKind,
    top: u64,
    hidden: mem::Reserved,
    huge_1g: bool,
) -> HostPhysAddr {
    let Some(filler) = mem::alloc_zeroed(PAGE, PAGE) else {
        boot_error!("out of memory for the filler page")
    };
    // thinvisor's block, and the IOMMUs' registers (docs/architecture.md,
    // "IOMMU"): the guest reads zeros there and its writes are dropped.
    let mut own = [const { 0..0 }; 1 + thinvisor_iommu::dmar::MAX_UNITS];
    own[0] = hidden.start..hidden.end;
    let mmio = crate::iommu::mmio_ranges();
    own[1..=mmio.len()].clone_from_slice(mmio);
    let own = &own[..=mmio.len()];
    let max_phys_addr = match core::arch::x86_64::__cpuid(0x8000_0000).eax {
        e if e >= 0x8000_0008 => core::arch::x86_64::__cpuid(0x8000_0008).eax as u8,
        _ => 36,
    };
    let layout = Layout {
        top,
        hidden: own,
        filler: HostPhysAddr::new(filler),
        huge_1g,
        max_phys_addr,
    };
    let built = match kind {
        TableKind::Npt => PassThroughTables::build(&mut mem::HeapTables, Format::Npt, &layout),
        TableKind::Ept => {
            let has_mtrr = core::arch::x86_64::__cpuid(1).edx & (1 << 12) != 0;
            let mtrrs = if has_mtrr {
                // SAFETY: MtrrMsrs::read reads only the MTRR MSRs that
                // IA32_MTRRCAP says exist (CPUID.1:EDX.MTRR checked).
                Mtrrs::new(&MtrrMsrs::read(
                    |m| unsafe { Msr::new(m).read() },
                    max_phys_addr,
                ))
            } else {
                Mtrrs::uniform(thinvisor_memory::mtrr::MemoryType::WriteBack)
            };
            PassThroughTables::build(&mut mem::HeapTables, Format::Ept(&mtrrs), &layout)
        }
    };
    let tables = match built {
        Ok(t) => t,
        Err(e) => boot_error!("cannot build the pass-through tables: {e:?}"),
    };
    info!(
        "pass-through {}: identity map of {} GiB, thinvisor's {:#x}..{:#x} read-only filler; {} tables ({} KiB)",
        if kind == TableKind::Npt { "nested paging" } else { "EPT" },
        top >> 30,
        hidden.start,
        hidden.end,
        tables.tables(),
        tables.tables() * 4
    );
    let root = tables.root();
    TABLES.call_once(|| Mutex::new(tables));
    crate::pci::watch_ecam();
    root
}

/// Make `range` read-only to the guest (its writes exit), before the
/// guest runs.
pub fn write_protect_range(range: Range<u64>) -> Result<(), &'static str> {
    let tables = TABLES.get().ok_or("no pass-through tables")?;
    tables
        .lock()
        .write_protect_range(&mut mem::HeapTables, range)
        .map_err(|e| match e {
            NptError::Hidden => "it overlaps hidden memory",
            NptError::OutOfMemory => "out of memory for tables",
            _ => "it is not page-aligned",
        })
}

/// Map the page at `pa` if the guest has not touched it yet, and make it
/// read-only to the guest; every vCPU drops its translations of it at its
/// next entry (one may hold a writable one).
pub fn write_protect_mapped(pa: u64) -> Result<(), &'static str> {
    let tables = TABLES.get().ok_or("no pass-through tables")?;
    let mut tables = tables.lock();
    let gpa = thinvisor_memory::GuestPhysAddr::new(pa);
    match tables.map_fault(&mut mem::HeapTables, gpa) {
        Ok(_) | Err(NptError::AlreadyMapped) => {}
        Err(NptError::Hidden) => return Err("thinvisor's own memory"),
        Err(_) => return Err("the page cannot be mapped"),
    }
    tables
        .write_protect(&mut mem::HeapTables, gpa)
        .map_err(|_| "the page is not mapped")?;
    GENERATION.fetch_add(1, core::sync::atomic::Ordering::AcqRel);
    Ok(())
}

/// Bumped whenever a page's permissions change: every vCPU flushes its
/// nested TLB at its next entry when it sees a new value.
pub static GENERATION: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Nested page faults in the pass-through layout.
pub struct PassthroughFaults;

impl NestedFaults for PassthroughFaults {
    fn on_fault(&self, fault: &NestedFault) -> FaultVerdict {
        let Some(tables) = TABLES.get() else {
            return FaultVerdict::Outside;
        };
        if fault.write && crate::apic::is_apic_page(fault.gpa) {
            return FaultVerdict::Device(&crate::apic::APIC);
        }
        if fault.write && crate::ioapic::is_ioapic_page(fault.gpa) {
            return FaultVerdict::Device(&crate::ioapic::IOAPIC);
        }
        if fault.write && crate::pci::is_ecam(fault.gpa) {
            return FaultVerdict::Device(&crate::pci::ECAM_WRITES);
        }
        let mut tables = tables.lock();
        if tables.is_hidden(fault.gpa) {
            return if fault.write {
                FaultVerdict::HiddenWrite
            } else {
                FaultVerdict::Outside
            };
        }
        match tables.map_fault(&mut mem::HeapTables, fault.gpa) {
            Ok(range) => {
                log::debug!(
                    "pass-through: mapped {:#x}..{:#x} on first access",
                    range.start,
                    range.end
                );
                FaultVerdict::Mapped
            }
            Err(NptError::Hidden) => FaultVerdict::HiddenWrite,
            Err(e) => {
                log::error!("pass-through: cannot map {:#x}: {e:?}", fault.gpa.as_u64());
                FaultVerdict::Outside
            }
        }
    }
}

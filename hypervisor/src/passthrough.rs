//! The pass-through layout: the guest is the machine's own OS.
//! Guest-physical is host-physical everywhere except thinvisor's own block
//! of memory, which the guest is never given (docs/architecture.md,
//! "Layouts").

use core::ops::Range;

use log::info;
use spin::{Mutex, Once};
use thinvisor_boot::{guest, multiboot1, BootInfo, MemKind, MAX_REGIONS};
use thinvisor_memory::mtrr::{MtrrMsrs, Mtrrs};
use thinvisor_memory::nested::NptError;
use thinvisor_memory::passthrough::{Format, Layout, PassThroughTables};
use thinvisor_memory::{HostPhysAddr, PassthroughMemory};
use thinvisor_vmm::{FaultVerdict, InitialState, NestedFault, NestedFaults};
use x86_64::registers::model_specific::Msr;

use crate::{mem, GuestLayout, GuestMemory, GuestSetup, PAGE};

const SIZE_2M: u64 = 2 << 20;
const SIZE_4G: u64 = 4 << 30;

/// The legacy video and ROM area: device memory and firmware the VMM must
/// never read or write on a guest's behalf.
const LEGACY_HOLE: Range<u64> = 0xA_0000..0x10_0000;

/// Guest-physical ranges the VMM refuses to reach for the guest.
static HOLES: Once<[Range<u64>; 2]> = Once::new();

/// The RAM the VMM may reach for the guest: the firmware's available
/// regions (so never MMIO, firmware tables or holes between), and how many.
static RAM: Once<([Range<u64>; MAX_REGIONS], usize)> = Once::new();

/// The guest's memory for the VMM: the available RAM of the firmware's
/// map, minus thinvisor's block and the legacy area; and `top`, the end of
/// the guest-physical space the tables map.
fn guest_memory(boot: &BootInfo, hidden: mem::Reserved) -> (u64, &'static GuestMemory) {
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

/// A multiboot v1 kernel run as the machine's own OS: loaded at its own
/// physical addresses, with a memory map that ends below thinvisor.
pub fn multiboot_guest(
    boot: &BootInfo,
    hidden: mem::Reserved,
    image: &[u8],
    cmdline: &str,
) -> (GuestSetup, &'static GuestMemory) {
    let (top, memory) = guest_memory(boot, hidden);
    // The kernel and its information structure go below thinvisor's block;
    // the map the kernel receives ends there too.
    // SAFETY: [0, hidden.start) is mapped RAM the guest owns; the boot
    // loader's modules and information are read before the kernel runs.
    let low = unsafe { mem::phys_slice_mut(0, hidden.start) };
    let kernel = match guest::load_multiboot_kernel(image, low) {
        Ok(k) => k,
        Err(e) => boot_error!("guest module: {e}"),
    };
    let info_at = kernel.load_end.next_multiple_of(PAGE);
    let mbi = match guest::write_multiboot1_info(low, info_at, cmdline.as_bytes()) {
        Ok(a) => a,
        Err(e) => boot_error!("guest module: {e}"),
    };
    info!(
        "pass-through: guest kernel loaded at its own addresses: entry {:#x}, multiboot information at {:#x}; thinvisor's {:#x}..{:#x} hidden",
        kernel.entry, mbi, hidden.start, hidden.end
    );
    let guest = GuestSetup {
        memory: GuestLayout::Passthrough { top, hidden },
        initial: InitialState::multiboot(kernel.entry, multiboot1::MAGIC, mbi),
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
    #[allow(clippy::single_range_in_vec_init)] // one hidden range, as a slice
    let own = [hidden.start..hidden.end];
    let max_phys_addr = match core::arch::x86_64::__cpuid(0x8000_0000).eax {
        e if e >= 0x8000_0008 => core::arch::x86_64::__cpuid(0x8000_0008).eax as u8,
        _ => 36,
    };
    let layout = Layout {
        top,
        hidden: &own,
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
    root
}

/// Nested page faults in the pass-through layout.
pub struct PassthroughFaults;

impl NestedFaults for PassthroughFaults {
    fn on_fault(&self, fault: &NestedFault) -> FaultVerdict {
        let Some(tables) = TABLES.get() else {
            return FaultVerdict::Outside;
        };
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

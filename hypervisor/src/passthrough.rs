//! The pass-through layout: the guest is the machine's own OS.
//! Guest-physical is host-physical everywhere except thinvisor's own block
//! of memory, which the guest is never given (docs/architecture.md,
//! "Layouts").

use core::ops::Range;

use log::info;
use spin::Once;
use thinvisor_boot::{guest, multiboot1, BootInfo, MemKind};
use thinvisor_memory::SliceMemory;
use thinvisor_vmm::InitialState;

use crate::{mem, GuestLayout, GuestSetup, PAGE};

const SIZE_2M: u64 = 2 << 20;
const SIZE_4G: u64 = 4 << 30;

/// The legacy video and ROM area: device memory and firmware the VMM must
/// never read or write on a guest's behalf.
const LEGACY_HOLE: Range<u64> = 0xA_0000..0x10_0000;

/// Guest-physical ranges the VMM refuses to reach for the guest.
static HOLES: Once<[Range<u64>; 2]> = Once::new();

/// The guest's memory for the VMM: all RAM below the end of available
/// memory, minus thinvisor's block and the legacy area.
pub(crate) fn guest_memory(boot: &BootInfo, hidden: mem::Reserved) -> (u64, SliceMemory<'static>) {
    let ram_end = boot
        .memory_map()
        .iter()
        .filter(|r| r.kind == MemKind::Available)
        .map(|r| r.end())
        .max()
        .unwrap_or(0);
    let holes = HOLES.call_once(|| [hidden.start..hidden.end, LEGACY_HOLE]);
    // SAFETY: [0, ram_end) is inside the direct map (relocate mapped all
    // available memory); the holes keep every VMM access out of
    // thinvisor's own memory.
    let ram = unsafe { mem::phys_slice_mut(0, ram_end) };
    // Everything up to 4 GiB (the PCI hole, the local APIC, the I/O APIC,
    // HPET, firmware) and all RAM above it is the guest's.
    let top = ram_end.max(SIZE_4G).next_multiple_of(SIZE_2M);
    (top, SliceMemory::with_holes(ram, holes))
}

/// A multiboot v1 kernel run as the machine's own OS: loaded at its own
/// physical addresses, with a memory map that ends below thinvisor.
pub fn multiboot_guest(
    boot: &BootInfo,
    hidden: mem::Reserved,
    image: &[u8],
    cmdline: &str,
) -> (GuestSetup, SliceMemory<'static>) {
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

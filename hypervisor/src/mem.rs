//! Physical memory as the hypervisor reaches it: the direct map (set up
//! for the first 4 GiB by the entry code, extended to all memory once the
//! allocator exists), and the frame allocator built from the memory map.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use thinvisor_boot::alloc::FrameAllocator;
use thinvisor_boot::multiboot1::PhysRead;
use thinvisor_memory::nested::TableAllocator;
use thinvisor_memory::HostPhysAddr;

/// Where the direct map of physical memory starts (PML4 slot 256).
pub const PHYS_OFFSET: u64 = 0xFFFF_8000_0000_0000;
/// What the entry code maps with 2 MiB pages, both identity (the image,
/// the boot information) and in the direct map.
pub const BOOT_MAP_SIZE: u64 = 4 << 30;
/// The end of the direct map: [`BOOT_MAP_SIZE`] until
/// [`extend_direct_map`] maps the rest. Nothing above it is read.
static DIRECT_MAP_END: AtomicU64 = AtomicU64::new(BOOT_MAP_SIZE);
const SIZE_1G: u64 = 1 << 30;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// The physical range [start, end) the hypervisor image occupies,
/// .bss and boot stack included.
pub fn image_range() -> (u64, u64) {
    // Linker-script symbols: only their addresses are taken.
    (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    )
}

/// Whether [pa, pa + len) lies inside the direct map.
pub fn is_mapped(pa: u64, len: u64) -> bool {
    pa.checked_add(len)
        .is_some_and(|end| end <= DIRECT_MAP_END.load(Relaxed))
}

/// Whether [pa, pa + len) is identity-mapped (the entry code's first 4 GiB).
pub fn is_identity_mapped(pa: u64, len: u64) -> bool {
    pa.checked_add(len).is_some_and(|end| end <= BOOT_MAP_SIZE)
}

/// Map physical memory up to `top` (rounded up to 1 GiB) into the direct
/// map, with 1 GiB pages where the processor has them (CPUID
/// Fn8000_0001 EDX.Page1GB), else 2 MiB pages. Tables come from `frames`,
/// which hands out low (already mapped) memory first. Returns the end of
/// the direct map.
pub fn extend_direct_map(frames: &mut FrameAllocator, top: u64) -> Result<u64, &'static str> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE: u64 = 0x83;
    let top = top
        .checked_next_multiple_of(SIZE_1G)
        .ok_or("memory map ends beyond 2^64")?;
    let gibs = top / SIZE_1G;
    // PML4 slots 256..511 hold the direct map: at most 128 TiB.
    if gibs > 256 * 512 {
        return Err("more physical memory than the direct map can hold (128 TiB)");
    }
    let huge_1g = core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 26) != 0;
    let (pml4_frame, _) = x86_64::registers::control::Cr3::read_raw();
    let mut tables = FrameTables(frames);
    let pml4 = pml4_frame.start_address().as_u64();
    for gib in BOOT_MAP_SIZE / SIZE_1G..gibs {
        let slot = 256 + (gib / 512) as usize;
        let pdpt = match tables.table(HostPhysAddr::new(pml4))[slot] {
            e if e & 1 != 0 => e & 0x000F_FFFF_FFFF_F000,
            _ => {
                let new = tables
                    .alloc_table()
                    .ok_or("out of memory for the direct map")?;
                tables.table(HostPhysAddr::new(pml4))[slot] = new.as_u64() | PRESENT_WRITABLE;
                new.as_u64()
            }
        };
        let base = gib * SIZE_1G;
        let entry = if huge_1g {
            base | HUGE
        } else {
            let pd = tables
                .alloc_table()
                .ok_or("out of memory for the direct map")?;
            for (j, e) in tables.table(pd).iter_mut().enumerate() {
                *e = (base + ((j as u64) << 21)) | HUGE;
            }
            pd.as_u64() | PRESENT_WRITABLE
        };
        tables.table(HostPhysAddr::new(pdpt))[(gib % 512) as usize] = entry;
    }
    // Only not-present entries changed, but flush anyway: cheap, once.
    x86_64::instructions::tlb::flush_all();
    DIRECT_MAP_END.store(top.max(BOOT_MAP_SIZE), Relaxed);
    Ok(DIRECT_MAP_END.load(Relaxed))
}

/// The direct-map address of physical `pa`.
pub fn phys_to_virt(pa: u64) -> *mut u8 {
    (PHYS_OFFSET + pa) as *mut u8
}

/// A slice over physical memory.
///
/// # Safety
/// The range must be mapped ([`is_mapped`]) and not be used through any
/// other reference while the slice lives.
pub unsafe fn phys_slice_mut(pa: u64, len: u64) -> &'static mut [u8] {
    // SAFETY: the caller guarantees the range is mapped and unaliased.
    unsafe { core::slice::from_raw_parts_mut(phys_to_virt(pa), len as usize) }
}

/// Physical reads for the boot-information parsers, bounded by the map.
pub struct DirectMapReader;

impl PhysRead for DirectMapReader {
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
        if !is_mapped(pa, buf.len() as u64) {
            return false;
        }
        // SAFETY: the range is inside the direct map; boot information is
        // only read, and nothing writes to it concurrently.
        let src = unsafe { core::slice::from_raw_parts(phys_to_virt(pa), buf.len()) };
        buf.copy_from_slice(src);
        true
    }
}

/// Allocate zeroed memory from the frame allocator.
pub fn alloc_zeroed(frames: &mut FrameAllocator, size: u64, align: u64) -> Option<u64> {
    let pa = frames.alloc(size, align)?;
    if !is_mapped(pa, size) {
        return None;
    }
    // SAFETY: fresh frames inside the direct map (checked above) that no
    // one else references yet.
    unsafe { phys_slice_mut(pa, size) }.fill(0);
    Some(pa)
}

/// Page tables for the nested paging builder, from the frame allocator.
pub struct FrameTables<'a>(pub &'a mut FrameAllocator);

impl TableAllocator for FrameTables<'_> {
    fn alloc_table(&mut self) -> Option<HostPhysAddr> {
        alloc_zeroed(self.0, 4096, 4096).map(HostPhysAddr::new)
    }

    fn table(&mut self, pa: HostPhysAddr) -> &mut [u64; 512] {
        // SAFETY: `pa` came from alloc_table: a page-aligned, mapped page
        // used only as this page table.
        unsafe { &mut *(phys_to_virt(pa.as_u64()) as *mut [u64; 512]) }
    }
}

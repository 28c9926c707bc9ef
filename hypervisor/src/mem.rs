//! Physical memory as the hypervisor reaches it: the direct map set up by
//! the entry code, and the frame allocator built from the memory map.

use thinvisor_boot::alloc::FrameAllocator;
use thinvisor_boot::multiboot1::PhysRead;
use thinvisor_memory::nested::TableAllocator;
use thinvisor_memory::HostPhysAddr;

/// Where the direct map of physical memory starts (PML4 slot 256).
pub const PHYS_OFFSET: u64 = 0xFFFF_8000_0000_0000;
/// How much physical memory the direct map covers (the entry code's
/// 2 MiB mappings). Nothing above it is allocated or read.
pub const DIRECT_MAP_SIZE: u64 = 4 << 30;

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
        .is_some_and(|end| end <= DIRECT_MAP_SIZE)
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
    // SAFETY: fresh frames below DIRECT_MAP_SIZE (everything above is
    // reserved at start-up) that no one else references yet.
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

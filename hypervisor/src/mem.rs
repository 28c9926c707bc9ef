//! Physical memory as the hypervisor reaches it: the direct map (set up
//! for the first 4 GiB by the entry code, rebuilt for all memory when
//! thinvisor moves itself high), thinvisor's own block of memory (image and
//! heap), and the frame allocators.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use thinvisor_boot::alloc::FrameAllocator;
use thinvisor_boot::multiboot1::PhysRead;
use thinvisor_memory::nested::TableAllocator;
use thinvisor_memory::HostPhysAddr;

/// Where the direct map of physical memory starts (PML4 slot 256).
pub const PHYS_OFFSET: u64 = 0xFFFF_8000_0000_0000;
/// Where the image is linked: the top 2 GiB (PML4 slot 511, PDPT slot
/// 510), at this base plus its load address (see linker.ld).
pub const KERNEL_VMA: u64 = 0xFFFF_FFFF_8000_0000;
/// What the entry code maps with 2 MiB pages, both identity (the image,
/// the boot information) and in the direct map.
pub const BOOT_MAP_SIZE: u64 = 4 << 30;
/// The end of the direct map: [`BOOT_MAP_SIZE`] until [`relocate`] maps
/// the rest. Nothing above it is read.
static DIRECT_MAP_END: AtomicU64 = AtomicU64::new(BOOT_MAP_SIZE);
/// Where the image's first byte is in physical memory: its load address
/// until [`relocate`] moves it.
static IMAGE_PHYS: AtomicU64 = AtomicU64::new(0);
const SIZE_2M: u64 = 2 << 20;
const SIZE_1G: u64 = 1 << 30;
const PAGE: u64 = 4096;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const PRESENT_WRITABLE: u64 = 0x3;
const HUGE: u64 = 0x83;

/// Memory thinvisor keeps for itself beyond its image: page tables, the
/// per-processor areas (stacks, VMCB/VMCS, host save areas), nested page
/// tables, the Rust heap ([`RUST_HEAP_SIZE`]). About 100 KiB per processor
/// (docs/architecture.md, "Memory"); the block is rounded up to 2 MiB, so
/// the heap gets what the image leaves.
pub const HEAP_SIZE: u64 = 3 << 20;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    static __boot_start: u8;
    static __boot_end: u8;
}

/// The linked (virtual) range of the image proper, .bss and the boot
/// stack included.
fn image_virt() -> (u64, u64) {
    // Linker-script symbols: only their addresses are taken.
    (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    )
}

/// The physical range [start, end) the boot loader put thinvisor in: the
/// boot part (headers, entry, its page tables) and the image proper.
pub fn loaded_range() -> (u64, u64) {
    let (_, end) = image_virt();
    (core::ptr::addr_of!(__boot_start) as u64, end - KERNEL_VMA)
}

/// Bytes the image proper needs, rounded to whole pages.
pub fn image_size() -> u64 {
    let (start, end) = image_virt();
    (end - start).next_multiple_of(PAGE)
}

/// The end of the direct map: [`BOOT_MAP_SIZE`] until [`relocate`], then
/// the top of memory it mapped.
pub fn direct_map_end() -> u64 {
    DIRECT_MAP_END.load(Relaxed)
}

/// Whether [pa, pa + len) lies inside the direct map.
pub fn is_mapped(pa: u64, len: u64) -> bool {
    pa.checked_add(len)
        .is_some_and(|end| end <= DIRECT_MAP_END.load(Relaxed))
}

/// Whether [pa, pa + len) is identity-mapped (the entry code's first 4
/// GiB, until [`relocate`]).
pub fn is_identity_mapped(pa: u64, len: u64) -> bool {
    IMAGE_PHYS.load(Relaxed) == 0 && pa.checked_add(len).is_some_and(|end| end <= BOOT_MAP_SIZE)
}

/// thinvisor's own memory: one block, high in RAM, holding the image and
/// the heap. The guest never sees it (the pass-through layout hides it).
#[derive(Clone, Copy, Debug)]
pub struct Reserved {
    pub start: u64,
    pub end: u64,
}

/// The heap: every page thinvisor allocates after relocation comes from
/// here, on any processor.
static HEAP: spin::Mutex<Option<FrameAllocator>> = spin::Mutex::new(None);
/// The heap's size when it was made.
static HEAP_TOTAL: AtomicU64 = AtomicU64::new(0);

/// The bytes thinvisor's block takes: the image, [`HEAP_SIZE`] and
/// `extra`, rounded up to 2 MiB.
pub fn block_size(extra: u64) -> u64 {
    (image_size() + HEAP_SIZE + extra).next_multiple_of(SIZE_2M)
}

/// Move thinvisor into a block of [`block_size`] bytes, aligned to
/// `align` (2 MiB when thinvisor picks the place; a page in the block a
/// resuming loader reserved), taken from the top of what `frames` offers
/// below 4 GiB: copy the image there, build page tables in
/// the block (the direct map of [0, `top`), 1 GiB pages where the
/// processor has them, and the image at its linked addresses), switch to
/// them. Every virtual address stays the same; only the physical pages
/// behind the image change. From then on the old load area is ordinary
/// memory and [`alloc_zeroed`] hands out pages of the block. `extra`
/// bytes are added to the heap (an AMD-Vi device table).
pub fn relocate(
    frames: &mut FrameAllocator,
    top: u64,
    extra: u64,
    align: u64,
) -> Result<Reserved, &'static str> {
    let image = image_size();
    let size = block_size(extra);
    let base = frames
        .alloc_high(size, align, BOOT_MAP_SIZE)
        .ok_or("no room below 4 GiB for thinvisor's memory")?;
    let heap_map = [thinvisor_boot::MemRegion {
        start: base + image,
        len: size - image,
        kind: thinvisor_boot::MemKind::Available,
    }];
    let mut heap = FrameAllocator::new(&heap_map, &[]);
    let top = top
        .max(BOOT_MAP_SIZE)
        .checked_next_multiple_of(SIZE_1G)
        .ok_or("memory map ends beyond 2^64")?;
    let pml4 = build_host_tables(&mut heap, top, base)?;
    let (virt_start, virt_end) = image_virt();
    // SAFETY: the block is free memory inside the boot map (below 4 GiB)
    // that nothing references; the copy reads the image through its linked
    // addresses and the stub switches CR3 before anything writes to memory
    // again, so the copy is exact; the new tables map the image at the same
    // virtual addresses and the direct map like the boot tables did.
    unsafe {
        thinvisor_relocate(
            phys_to_virt(base),
            virt_start as *const u8,
            (virt_end - virt_start) as usize,
            pml4,
        );
    }
    IMAGE_PHYS.store(base, Relaxed);
    DIRECT_MAP_END.store(top, Relaxed);
    log::debug!("direct map: {} GiB of physical memory", top >> 30);
    HEAP_TOTAL.store(heap.free_bytes(), Relaxed);
    *HEAP.lock() = Some(heap);
    Ok(Reserved {
        start: base,
        end: base + size,
    })
}

// Copy the image and switch to the new tables with no memory write in
// between: the stack is part of what is copied.
//
// extern "sysv64" fn(dst: *mut u8, src: *const u8, len: usize, cr3: u64)
core::arch::global_asm!(
    // In the image's own text, never the low entry code's (the section
    // named here, whatever section the previous block left current).
    ".pushsection .text.thinvisor_relocate, \"ax\"",
    ".global thinvisor_relocate",
    "thinvisor_relocate:",
    "mov rax, rcx",
    "mov rcx, rdx",
    "rep movsb",
    "mov cr3, rax",
    "ret",
    ".popsection",
);

extern "sysv64" {
    fn thinvisor_relocate(dst: *mut u8, src: *const u8, len: usize, cr3: u64);
}

/// The host's page tables after relocation: the direct map of [0, `top`)
/// and the image at its linked addresses, backed by `image_base`.
fn build_host_tables(
    heap: &mut FrameAllocator,
    top: u64,
    image_base: u64,
) -> Result<u64, &'static str> {
    const OOM: &str = "out of memory for thinvisor's page tables";
    let gibs = top / SIZE_1G;
    // PML4 slots 256..511 hold the direct map: at most 128 TiB.
    if gibs > 255 * 512 {
        return Err("more physical memory than the direct map can hold");
    }
    let huge_1g = core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 26) != 0;
    let mut tables = FrameTables(heap);
    let pml4 = tables.alloc_table().ok_or(OOM)?.as_u64();
    for gib in 0..gibs {
        let pdpt = next_table(&mut tables, pml4, 256 + (gib / 512) as usize).ok_or(OOM)?;
        let base = gib * SIZE_1G;
        let entry = if huge_1g {
            base | HUGE
        } else {
            let pd = tables.alloc_table().ok_or(OOM)?;
            for (j, e) in tables.table(pd).iter_mut().enumerate() {
                *e = (base + ((j as u64) << 21)) | HUGE;
            }
            pd.as_u64() | PRESENT_WRITABLE
        };
        tables.table(HostPhysAddr::new(pdpt))[(gib % 512) as usize] = entry;
    }
    let (start, end) = image_virt();
    let mut va = start;
    while va < end {
        let pdpt = next_table(&mut tables, pml4, index(va, 39)).ok_or(OOM)?;
        let pd = next_table(&mut tables, pdpt, index(va, 30)).ok_or(OOM)?;
        let pt = next_table(&mut tables, pd, index(va, 21)).ok_or(OOM)?;
        let pa = image_base + (va - start);
        tables.table(HostPhysAddr::new(pt))[index(va, 12)] = pa | PRESENT_WRITABLE;
        va += PAGE;
    }
    Ok(pml4)
}

fn index(va: u64, shift: u32) -> usize {
    ((va >> shift) & 0x1FF) as usize
}

/// The table entry `i` of `table` points to, made when absent.
fn next_table(tables: &mut FrameTables<'_>, table: u64, i: usize) -> Option<u64> {
    let entry = tables.table(HostPhysAddr::new(table))[i];
    if entry & 1 != 0 {
        return Some(entry & ADDR_MASK);
    }
    let new = tables.alloc_table()?.as_u64();
    tables.table(HostPhysAddr::new(table))[i] = new | PRESENT_WRITABLE;
    Some(new)
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

/// Allocate zeroed memory from `frames` (before relocation, and for the
/// isolated layout's guest RAM).
pub fn alloc_zeroed_from(frames: &mut FrameAllocator, size: u64, align: u64) -> Option<u64> {
    let pa = frames.alloc(size, align)?;
    if !is_mapped(pa, size) {
        return None;
    }
    // SAFETY: fresh frames inside the direct map (checked above) that no
    // one else references yet.
    unsafe { phys_slice_mut(pa, size) }.fill(0);
    Some(pa)
}

/// Allocate zeroed memory from thinvisor's heap (after [`relocate`]).
pub fn alloc_zeroed(size: u64, align: u64) -> Option<u64> {
    let mut heap = HEAP.lock();
    alloc_zeroed_from(heap.as_mut()?, size, align)
}

/// Bytes left in thinvisor's heap.
pub fn heap_free() -> u64 {
    HEAP.lock().as_ref().map_or(0, FrameAllocator::free_bytes)
}

/// Say how much of the heap the guest's setup took.
pub fn log_heap_use() {
    log::info!(
        "thinvisor's heap: {} KiB used, {} KiB free",
        (HEAP_TOTAL.load(Relaxed) - heap_free()) >> 10,
        heap_free() >> 10
    );
}

/// Page tables for the nested paging builder, from the frame allocator.
pub struct FrameTables<'a>(pub &'a mut FrameAllocator);

impl TableAllocator for FrameTables<'_> {
    fn alloc_table(&mut self) -> Option<HostPhysAddr> {
        alloc_zeroed_from(self.0, 4096, 4096).map(HostPhysAddr::new)
    }

    fn table(&mut self, pa: HostPhysAddr) -> &mut [u64; 512] {
        // SAFETY: `pa` came from alloc_table: a page-aligned, mapped page
        // used only as this page table.
        unsafe { &mut *(phys_to_virt(pa.as_u64()) as *mut [u64; 512]) }
    }
}

/// Page tables for the nested paging builder, from thinvisor's heap.
pub struct HeapTables;

impl TableAllocator for HeapTables {
    fn alloc_table(&mut self) -> Option<HostPhysAddr> {
        alloc_zeroed(4096, 4096).map(HostPhysAddr::new)
    }

    fn table(&mut self, pa: HostPhysAddr) -> &mut [u64; 512] {
        // SAFETY: `pa` came from alloc_table: a page-aligned, mapped page
        // used only as this page table.
        unsafe { &mut *(phys_to_virt(pa.as_u64()) as *mut [u64; 512]) }
    }
}

/// The identity map of the first 2 MiB in thinvisor's page tables, for the
/// processor trampoline's switch to long mode (its code runs at its
/// physical address); on only while application processors start.
pub fn map_low_identity(on: bool) {
    let (pml4, _) = x86_64::registers::control::Cr3::read_raw();
    let pml4 = pml4.start_address().as_u64();
    let mut tables = HeapTables;
    if on {
        let (Some(pdpt), Some(pd)) = (tables.alloc_table(), tables.alloc_table()) else {
            log::warn!("out of memory for the trampoline's identity map");
            return;
        };
        tables.table(pd)[0] = HUGE;
        tables.table(pdpt)[0] = pd.as_u64() | PRESENT_WRITABLE;
        tables.table(HostPhysAddr::new(pml4))[0] = pdpt.as_u64() | PRESENT_WRITABLE;
    } else {
        // The two tables stay allocated (8 KiB): freeing is not worth an
        // allocator that frees.
        tables.table(HostPhysAddr::new(pml4))[0] = 0;
    }
    x86_64::instructions::tlb::flush_all();
}

/// The Rust heap, for the few things that need `alloc`: the instruction
/// decoder's tables (iced-x86 builds them once, about 360 KiB). Carved out
/// of thinvisor's heap at boot; nothing on an exit path allocates.
#[global_allocator]
static ALLOCATOR: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// Bytes of thinvisor's heap given to the Rust allocator.
pub const RUST_HEAP_SIZE: u64 = 512 * 1024;

/// Give the Rust allocator its memory (once, after [`relocate`]).
pub fn init_rust_heap() -> Result<(), &'static str> {
    let pa = alloc_zeroed(RUST_HEAP_SIZE, PAGE).ok_or("out of memory for the Rust heap")?;
    // SAFETY: a fresh block of thinvisor's heap, used by nothing else, for
    // as long as thinvisor runs.
    unsafe {
        ALLOCATOR
            .lock()
            .init(phys_to_virt(pa), RUST_HEAP_SIZE as usize)
    };
    Ok(())
}

//! A physical frame allocator built from the firmware's memory map, for the
//! time before the hypervisor has any heap.
//!
//! It keeps a sorted list of free, page-aligned, disjoint ranges in a fixed
//! array. Firmware maps overlap, come unsorted and contain empty entries, so
//! the list is built by union of the available entries, then subtraction of
//! every other entry (an overlap of available and reserved memory is treated
//! as reserved) and of the caller's reserved ranges. When the fixed array is
//! full, the smallest piece of free memory is forgotten: losing a little free
//! memory is safe, handing out memory that is in use is not.

use crate::{align_down, align_up, MemKind, MemRegion, PAGE_SIZE};

/// Free ranges tracked at most.
pub const MAX_FREE_RANGES: usize = 256;

/// Memory below this address (real-mode IVT, BIOS data, EBDA, VGA, option
/// ROMs, and what a BIOS guest expects to own) is never handed out.
pub const LOW_MEMORY_END: u64 = 0x10_0000;

/// Physical frame allocator with fixed capacity.
#[derive(Clone)]
pub struct FrameAllocator {
    /// Sorted by start; disjoint and non-adjacent; page-aligned; non-empty.
    ranges: [(u64, u64); MAX_FREE_RANGES],
    len: usize,
}

impl core::fmt::Debug for FrameAllocator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrameAllocator")
            .field("free", &self.free_ranges())
            .finish()
    }
}

impl FrameAllocator {
    /// Builds the allocator from a memory map, keeping only Available memory
    /// at or above 1 MiB, minus every `[start, end)` in `reserved` (the
    /// hypervisor image, boot modules, the boot information...).
    pub fn new(map: &[MemRegion], reserved: &[(u64, u64)]) -> Self {
        let mut this = FrameAllocator {
            ranges: [(0, 0); MAX_FREE_RANGES],
            len: 0,
        };
        for region in map.iter().filter(|r| r.kind == MemKind::Available) {
            // Shrink inward to whole pages.
            let Some(start) = align_up(region.start.max(LOW_MEMORY_END), PAGE_SIZE) else {
                continue;
            };
            let end = align_down(region.end(), PAGE_SIZE);
            this.add(start, end);
        }
        for region in map.iter().filter(|r| r.kind != MemKind::Available) {
            this.remove_outward(region.start, region.end());
        }
        for &(start, end) in reserved {
            this.remove_outward(start, end);
        }
        this
    }

    /// Allocates `size` bytes (rounded up to whole pages), contiguous and
    /// aligned to `align`, which must be a power of two of at least 4096.
    /// Takes the lowest address that fits; `None` when nothing fits or the
    /// request is invalid (zero size, bad alignment).
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() || align < PAGE_SIZE {
            return None;
        }
        let size = align_up(size, PAGE_SIZE)?;
        let (index, addr) = self
            .free_ranges()
            .iter()
            .enumerate()
            .find_map(|(i, &(s, e))| {
                let addr = align_up(s, align)?;
                (addr.checked_add(size)? <= e).then_some((i, addr))
            })?;
        self.carve(index, addr, addr + size);
        Some(addr)
    }

    /// Like [`alloc`](Self::alloc), but takes the highest address that
    /// fits below `below`: memory the hypervisor keeps for itself goes high,
    /// out of the way of the guest's own load addresses (bzImages at 1 MiB,
    /// multiboot kernels at their link addresses, boot sectors at 0x7C00).
    pub fn alloc_high(&mut self, size: u64, align: u64, below: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() || align < PAGE_SIZE {
            return None;
        }
        let size = align_up(size, PAGE_SIZE)?;
        let (index, addr) =
            self.free_ranges()
                .iter()
                .enumerate()
                .rev()
                .find_map(|(i, &(s, e))| {
                    let top = e.min(below).checked_sub(size)?;
                    let addr = align_down(top, align);
                    (addr >= s).then_some((i, addr))
                })?;
        self.carve(index, addr, addr + size);
        Some(addr)
    }

    /// Bytes still free.
    pub fn free_bytes(&self) -> u64 {
        self.free_ranges().iter().map(|&(s, e)| e - s).sum()
    }

    /// The free ranges `[start, end)`, sorted (for logging and tests).
    pub fn free_ranges(&self) -> &[(u64, u64)] {
        self.ranges.get(..self.len).unwrap_or(&[])
    }

    /// Removes `[start, end)`, widened to whole pages, from the free ranges.
    pub fn reserve(&mut self, start: u64, end: u64) {
        self.remove_outward(start, end);
    }

    fn remove_outward(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let start = align_down(start, PAGE_SIZE);
        let end = align_up(end, PAGE_SIZE).unwrap_or(u64::MAX);
        self.remove(start, end);
    }

    /// Adds `[start, end)` (page-aligned), merging with overlapping or
    /// touching ranges.
    fn add(&mut self, mut start: u64, mut end: u64) {
        if end <= start {
            return;
        }
        // Ranges [first, last) touch or overlap the new one.
        let first = self.free_ranges().partition_point(|&(_, e)| e < start);
        let last = self.free_ranges().partition_point(|&(s, _)| s <= end);
        if first < last {
            if let (Some(&(s, _)), Some(&(_, e))) =
                (self.ranges.get(first), self.ranges.get(last - 1))
            {
                start = start.min(s);
                end = end.max(e);
            }
            self.ranges[first] = (start, end);
            // Drop the ranges that were merged into `first`.
            self.ranges.copy_within(last..self.len, first + 1);
            self.len -= last - first - 1;
            return;
        }
        self.insert(first, (start, end));
    }

    /// Removes `[start, end)` from every free range.
    fn remove(&mut self, start: u64, end: u64) {
        // Each pass cuts one overlapping range. The search restarts every
        // time because a full array may have dropped a range and shifted the
        // rest; what is left of a cut range ends at `start` or begins at
        // `end`, so it is not found again.
        loop {
            let i = self.free_ranges().partition_point(|&(_, e)| e <= start);
            match self.free_ranges().get(i) {
                Some(&(s, e)) if s < end => self.carve(i, start.max(s), end.min(e)),
                _ => break,
            }
        }
    }

    /// Cuts `[cut_start, cut_end)`, which lies inside range `index`, out of it.
    fn carve(&mut self, index: usize, cut_start: u64, cut_end: u64) {
        let Some(&(s, e)) = self.ranges.get(index) else {
            return;
        };
        let left = (s, cut_start);
        let right = (cut_end, e);
        match (left.0 < left.1, right.0 < right.1) {
            (true, true) => {
                self.ranges[index] = left;
                self.insert(index + 1, right);
            }
            (true, false) => self.ranges[index] = left,
            (false, true) => self.ranges[index] = right,
            (false, false) => self.delete(index),
        }
    }

    /// Inserts a range at `index`, keeping order; when the array is full the
    /// smallest range (possibly the new one) is dropped.
    fn insert(&mut self, index: usize, range: (u64, u64)) {
        if self.len == MAX_FREE_RANGES {
            let smallest = self
                .free_ranges()
                .iter()
                .enumerate()
                .min_by_key(|&(_, &(s, e))| e - s)
                .map(|(i, &(s, e))| (i, e - s));
            match smallest {
                Some((i, size)) if size < range.1 - range.0 => {
                    self.delete(i);
                    let index = if i < index { index - 1 } else { index };
                    self.insert(index, range);
                }
                _ => {}
            }
            return;
        }
        self.ranges.copy_within(index..self.len, index + 1);
        self.ranges[index] = range;
        self.len += 1;
    }

    fn delete(&mut self, index: usize) {
        if index < self.len {
            self.ranges.copy_within(index + 1..self.len, index);
            self.len -= 1;
        }
    }
}

/// One past the highest address of any entry in `map`, whatever its kind (0
/// for an empty map); the extent of physical memory to map or pass through.
pub fn max_phys_end(map: &[MemRegion]) -> u64 {
    map.iter()
        .filter(|r| r.len != 0)
        .map(MemRegion::end)
        .max()
        .unwrap_or(0)
}

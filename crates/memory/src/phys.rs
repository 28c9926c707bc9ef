//! Guest-physical memory as the VMM sees it.

use core::fmt;
use core::ops::Range;

use crate::GuestPhysAddr;

/// A guest-physical access touched a byte that is not backed by guest RAM
/// (or that the VMM must not reach on the guest's behalf).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PhysAccessError {
    /// The first byte of the access that is not backed by guest RAM.
    pub gpa: GuestPhysAddr,
}

impl fmt::Display for PhysAccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest-physical {} is not backed by guest RAM", self.gpa)
    }
}

impl core::error::Error for PhysAccessError {}

/// Guest-physical memory as the VMM sees it.
///
/// Implementors decide which guest-physical ranges are RAM; nothing assumes
/// RAM starts at 0 or is contiguous. An access is all-or-nothing from the
/// caller's view: on error the contents of `buf` are unspecified, and the
/// error names the first byte that is not backed (callers rely on that to
/// use the readable prefix, see [`crate::read_cstr`]).
///
/// "Mapping" a range ([`map`](Self::map), [`map_mut`](Self::map_mut))
/// borrows it as a host slice; dropping the slice is the unmap, so the
/// borrow checker guarantees nothing uses a mapping after it is gone. The
/// VMM runs while the calling vCPU is stopped, which is what makes a plain
/// slice over guest RAM sound for that time.
pub trait GuestPhysMemory {
    /// Borrows guest-physical `gpa..gpa+len` for reading. Fails, naming the
    /// first offending byte, unless every byte is guest RAM the VMM may
    /// reach. `len == 0` touches nothing and always succeeds.
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<&[u8], PhysAccessError>;

    /// Borrows guest-physical `gpa..gpa+len` for writing, with the same
    /// rules as [`map`](Self::map).
    fn map_mut(&mut self, gpa: GuestPhysAddr, len: usize) -> Result<&mut [u8], PhysAccessError>;

    /// Fills `buf` from guest-physical memory starting at `gpa`.
    fn read_phys(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), PhysAccessError> {
        let src = self.map(gpa, buf.len())?;
        // An implementor returning a slice of the wrong length must not be
        // able to make `copy_from_slice` panic.
        let src = src.get(..buf.len()).ok_or(PhysAccessError { gpa })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    /// Writes `data` to guest-physical memory starting at `gpa`.
    fn write_phys(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), PhysAccessError> {
        let dst = self.map_mut(gpa, data.len())?;
        let dst = dst.get_mut(..data.len()).ok_or(PhysAccessError { gpa })?;
        dst.copy_from_slice(data);
        Ok(())
    }

    /// Reads a little-endian `u32` (paging-structure entries, counters).
    fn read_u32_phys(&self, gpa: GuestPhysAddr) -> Result<u32, PhysAccessError> {
        let mut b = [0u8; 4];
        self.read_phys(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64`.
    fn read_u64_phys(&self, gpa: GuestPhysAddr) -> Result<u64, PhysAccessError> {
        let mut b = [0u8; 8];
        self.read_phys(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian `u32`.
    fn write_u32_phys(&mut self, gpa: GuestPhysAddr, value: u32) -> Result<(), PhysAccessError> {
        self.write_phys(gpa, &value.to_le_bytes())
    }

    /// Writes a little-endian `u64`.
    fn write_u64_phys(&mut self, gpa: GuestPhysAddr, value: u64) -> Result<(), PhysAccessError> {
        self.write_phys(gpa, &value.to_le_bytes())
    }
}

/// Guest RAM as one contiguous host buffer mapped at guest-physical 0 (the
/// "isolated layout": guest-physical `x` is `ram[x]`), optionally with
/// holes the VMM refuses to touch on the guest's behalf.
pub struct SliceMemory<'a> {
    ram: &'a mut [u8],
    holes: &'a [Range<u64>],
}

impl<'a> SliceMemory<'a> {
    /// Uses `ram` as guest-physical `0..ram.len()`.
    pub fn new(ram: &'a mut [u8]) -> Self {
        Self { ram, holes: &[] }
    }

    /// Like [`new`](Self::new), but the guest-physical ranges in `holes`
    /// are unreachable: every access touching them fails as if they were
    /// not RAM. For the pass-through layout, where the hypervisor's own
    /// memory lies inside the guest-physical range and a guest-supplied
    /// address must never reach it (page tables placed there included).
    /// Empty or reversed ranges forbid nothing.
    pub fn with_holes(ram: &'a mut [u8], holes: &'a [Range<u64>]) -> Self {
        Self { ram, holes }
    }

    /// The forbidden guest-physical ranges.
    pub fn holes(&self) -> &[Range<u64>] {
        self.holes
    }

    /// Size of guest RAM in bytes (holes included).
    pub fn len(&self) -> u64 {
        // usize is at most 64 bits on every target this crate supports.
        u64::try_from(self.ram.len()).unwrap_or(u64::MAX)
    }

    /// True when the guest has no RAM at all.
    pub fn is_empty(&self) -> bool {
        self.ram.is_empty()
    }

    /// All of guest RAM, holes included: this is the VMM's own view, not
    /// one a guest-supplied address may use.
    pub fn as_slice(&self) -> &[u8] {
        self.ram
    }

    /// All of guest RAM, writable, holes included (see
    /// [`as_slice`](Self::as_slice)).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.ram
    }

    /// The host range for `gpa..gpa+len`, or the first guest-physical byte
    /// of it that lies outside RAM or inside a hole.
    fn range(&self, gpa: GuestPhysAddr, len: usize) -> Result<Range<usize>, PhysAccessError> {
        if len == 0 {
            // Touches no byte, so nothing can be unbacked.
            return Ok(0..0);
        }
        let size = self.ram.len();
        let start = match usize::try_from(gpa.0) {
            Ok(s) if s < size => s,
            _ => return Err(PhysAccessError { gpa }),
        };
        // Past the end of RAM (or of the address space): the first
        // unbacked byte is the end of RAM, unless a hole comes first.
        let end = start.checked_add(len).filter(|&e| e <= size);
        let mut first_bad = if end.is_some() {
            None
        } else {
            Some(self.len())
        };
        // start < size <= u64::MAX, and end <= size when it is Some.
        let (lo, hi) = (gpa.0, end.map_or(self.len(), |e| e as u64));
        for hole in self.holes {
            if hole.start < hi && hole.end > lo && hole.start < hole.end {
                let bad = hole.start.max(lo);
                first_bad = Some(first_bad.map_or(bad, |b| b.min(bad)));
            }
        }
        match (first_bad, end) {
            (None, Some(end)) => Ok(start..end),
            (bad, _) => Err(PhysAccessError {
                gpa: GuestPhysAddr(bad.unwrap_or(gpa.0)),
            }),
        }
    }
}

impl GuestPhysMemory for SliceMemory<'_> {
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<&[u8], PhysAccessError> {
        let r = self.range(gpa, len)?;
        self.ram.get(r).ok_or(PhysAccessError { gpa })
    }

    fn map_mut(&mut self, gpa: GuestPhysAddr, len: usize) -> Result<&mut [u8], PhysAccessError> {
        let r = self.range(gpa, len)?;
        self.ram.get_mut(r).ok_or(PhysAccessError { gpa })
    }

    // Page walks read every table entry through these: one bounds check
    // and one load, instead of the provided map-and-copy.
    fn read_u32_phys(&self, gpa: GuestPhysAddr) -> Result<u32, PhysAccessError> {
        let r = self.range(gpa, 4)?;
        let bytes = self.ram.get(r).and_then(|b| b.try_into().ok());
        bytes.map(u32::from_le_bytes).ok_or(PhysAccessError { gpa })
    }

    fn read_u64_phys(&self, gpa: GuestPhysAddr) -> Result<u64, PhysAccessError> {
        let r = self.range(gpa, 8)?;
        let bytes = self.ram.get(r).and_then(|b| b.try_into().ok());
        bytes.map(u64::from_le_bytes).ok_or(PhysAccessError { gpa })
    }
}

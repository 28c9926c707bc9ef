//! Guest-physical memory as the VMM sees it.

use core::fmt;

use crate::GuestPhysAddr;

/// A guest-physical access touched a byte that is not backed by guest RAM.
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
pub trait GuestPhysMemory {
    /// Fills `buf` from guest-physical memory starting at `gpa`.
    fn read_phys(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), PhysAccessError>;

    /// Writes `data` to guest-physical memory starting at `gpa`.
    fn write_phys(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), PhysAccessError>;

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
/// "isolated layout": guest-physical `x` is `ram[x]`).
pub struct SliceMemory<'a> {
    ram: &'a mut [u8],
}

impl<'a> SliceMemory<'a> {
    /// Uses `ram` as guest-physical `0..ram.len()`.
    pub fn new(ram: &'a mut [u8]) -> Self {
        Self { ram }
    }

    /// Size of guest RAM in bytes.
    pub fn len(&self) -> u64 {
        // usize is at most 64 bits on every target this crate supports.
        u64::try_from(self.ram.len()).unwrap_or(u64::MAX)
    }

    /// True when the guest has no RAM at all.
    pub fn is_empty(&self) -> bool {
        self.ram.is_empty()
    }

    /// All of guest RAM.
    pub fn as_slice(&self) -> &[u8] {
        self.ram
    }

    /// All of guest RAM, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.ram
    }

    /// The host range for `gpa..gpa+len`, or the first guest-physical byte
    /// of it that lies outside RAM.
    fn range(
        &self,
        gpa: GuestPhysAddr,
        len: usize,
    ) -> Result<core::ops::Range<usize>, PhysAccessError> {
        let size = self.ram.len();
        if len == 0 {
            // Touches no byte, so nothing can be unbacked.
            return Ok(0..0);
        }
        let start = match usize::try_from(gpa.0) {
            Ok(s) if s <= size => s,
            _ => return Err(PhysAccessError { gpa }),
        };
        match start.checked_add(len) {
            Some(end) if end <= size => Ok(start..end),
            // The first unbacked byte is the end of RAM, unless the access
            // starts exactly there (then it is `gpa` itself, same value).
            _ => Err(PhysAccessError {
                gpa: GuestPhysAddr(self.len()),
            }),
        }
    }
}

impl GuestPhysMemory for SliceMemory<'_> {
    fn read_phys(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), PhysAccessError> {
        let r = self.range(gpa, buf.len())?;
        let src = self.ram.get(r).ok_or(PhysAccessError { gpa })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_phys(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), PhysAccessError> {
        let r = self.range(gpa, data.len())?;
        let dst = self.ram.get_mut(r).ok_or(PhysAccessError { gpa })?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

//! DMA remapping, the parts that need no hardware: reading the firmware's
//! description of the IOMMUs (ACPI DMAR for Intel VT-d, IVRS for AMD-Vi),
//! building the tables they walk, and decoding what they report.
//!
//! thinvisor's policy is one and the same for every device: all
//! guest-physical memory is reachable 1:1, except thinvisor's own block
//! (and whatever else the caller hides), which no device may read or
//! write (docs/architecture.md, "IOMMU"; docs/security.md, "DMA").
//!
//! The hypervisor binary does the MMIO programming (hypervisor/src/iommu);
//! everything here is plain data in, plain data out, `no_std`, and tested
//! on the host. The parsers take firmware tables as byte slices and never
//! panic, whatever the bytes (proptests here, libFuzzer targets in
//! `fuzz/`).
#![no_std]

pub mod acpi;
pub mod amdvi;
pub mod dmar;
pub mod ivrs;
pub mod tables;
pub mod vtd;

/// Little-endian field readers over a slice that answer `None` past its
/// end: every firmware field is read through these.
pub(crate) fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub(crate) fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

pub(crate) fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The ACPI system description table header's size (ACPI 6.5, 5.2.6).
pub const SDT_HEADER_LEN: usize = 36;

/// A table's bytes as its header's length field says, when the slice holds
/// that much and the length covers at least `min` bytes.
pub(crate) fn table_body<'a>(table: &'a [u8], signature: &[u8; 4], min: usize) -> Option<&'a [u8]> {
    if table.get(..4)? != signature {
        return None;
    }
    let len = le32(table, 4)? as usize;
    if len < min {
        return None;
    }
    table.get(..len)
}

/// A PCI requester ID (bus, device, function) as `bb:dd.f`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceId(pub u16);

impl core::fmt::Display for SourceId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.0 >> 8,
            (self.0 >> 3) & 0x1F,
            self.0 & 7
        )
    }
}

/// A fault a remapping unit reported, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaFault {
    /// The requester.
    pub source: SourceId,
    /// The address the device used (page-granular on VT-d).
    pub address: u64,
    /// A write (else a read).
    pub write: bool,
    /// The vendor's reason code (VT-d fault reason; AMD-Vi event code).
    pub reason: u8,
    /// The reason in words.
    pub why: &'static str,
}

impl core::fmt::Display for DmaFault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "device {} {} at {:#x} blocked: {} (reason {:#x})",
            self.source,
            if self.write { "write" } else { "read" },
            self.address,
            self.why,
            self.reason
        )
    }
}

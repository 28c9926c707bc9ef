//! Intel VT-d: register layout, capability decoding, the root and context
//! tables, and fault records (Intel Virtualization Technology for
//! Directed I/O, Architecture Specification rev. 4.1; section numbers
//! below are that document's).
//!
//! thinvisor uses legacy mode (RTADDR.TTM = 00): a root table of 256
//! entries, one per bus, each pointing at a context table of 256 entries,
//! one per device/function (3.4.2, 9.1, 9.3). Every device gets the same
//! translation, so all 256 root entries point at one context table, and
//! all of its 256 entries point at the one second-level table
//! ([`crate::tables`]) under domain 1: two 4 KiB tables cover every
//! requester of a segment.

use thinvisor_memory::nested::TableAllocator;
use thinvisor_memory::HostPhysAddr;

use crate::{DmaFault, SourceId};

// Register offsets (10.4, table 10-3).
/// Version.
pub const VER: usize = 0x00;
/// Capability (10.4.2).
pub const CAP: usize = 0x08;
/// Extended Capability (10.4.3).
pub const ECAP: usize = 0x10;
/// Global Command (10.4.4), 32-bit.
pub const GCMD: usize = 0x18;
/// Global Status (10.4.5), 32-bit.
pub const GSTS: usize = 0x1C;
/// Root Table Address (10.4.6).
pub const RTADDR: usize = 0x20;
/// Context Command (10.4.7).
pub const CCMD: usize = 0x28;
/// Fault Status (10.4.9), 32-bit.
pub const FSTS: usize = 0x34;
/// Fault Event Control (10.4.10), 32-bit.
pub const FECTL: usize = 0x38;

// GCMD / GSTS bits (10.4.4, 10.4.5).
/// Translation Enable / Status.
pub const GCMD_TE: u32 = 1 << 31;
/// Set Root Table Pointer / Root Table Pointer Status.
pub const GCMD_SRTP: u32 = 1 << 30;
/// Write Buffer Flush / Status.
pub const GCMD_WBF: u32 = 1 << 27;
/// Queued Invalidation Enable / Status.
pub const GCMD_QIE: u32 = 1 << 26;
/// Interrupt Remapping Enable / Status.
pub const GCMD_IRE: u32 = 1 << 25;
/// The GSTS bits that report one-shot commands: they must not be written
/// back through GCMD (10.4.4, the recommended read-modify-write).
pub const GSTS_ONE_SHOT: u32 = GCMD_SRTP | (1 << 29) | GCMD_WBF | (1 << 24);

/// The GCMD value that issues `command` (one bit) while keeping the
/// persistent states GSTS reports (TE, QIE, IRE, CFI): GCMD has no
/// memory of its own (10.4.4).
pub fn gcmd(gsts: u32, command: u32) -> u32 {
    (gsts & !GSTS_ONE_SHOT) | command
}

// CCMD bits (10.4.7).
/// Invalidate Context-Cache.
pub const CCMD_ICC: u64 = 1 << 63;
/// Context Invalidation Request Granularity: global.
pub const CCMD_CIRG_GLOBAL: u64 = 1 << 61;

// IOTLB Invalidate register (10.4.8.1), at ECAP.IRO * 16 + 8.
/// Invalidate IOTLB.
pub const IOTLB_IVT: u64 = 1 << 63;
/// IOTLB Invalidation Request Granularity: global.
pub const IOTLB_IIRG_GLOBAL: u64 = 1 << 60;
/// Drain reads and writes.
pub const IOTLB_DR_DW: u64 = (1 << 49) | (1 << 48);

// FSTS bits (10.4.9).
/// Primary Fault Overflow (RW1C).
pub const FSTS_PFO: u32 = 1 << 0;
/// Primary Pending Fault.
pub const FSTS_PPF: u32 = 1 << 1;
/// The write-1-to-clear status bits: PFO, AFO, APF, IQE, ICE, ITE.
pub const FSTS_CLEAR: u32 = 0x7D;
/// Fault Event Control: Interrupt Mask.
pub const FECTL_IM: u32 = 1 << 31;

/// The capability and extended capability registers, decoded (10.4.2,
/// 10.4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub cap: u64,
    pub ecap: u64,
}

impl Caps {
    /// Required Write-Buffer Flushing.
    pub fn rwbf(&self) -> bool {
        self.cap & (1 << 4) != 0
    }
    /// Caching Mode: not-present entries may be cached.
    pub fn caching_mode(&self) -> bool {
        self.cap & (1 << 7) != 0
    }
    /// Supported Adjusted Guest Address Widths (bit 1: 39-bit 3-level,
    /// bit 2: 48-bit 4-level, bit 3: 57-bit 5-level).
    pub fn sagaw(&self) -> u8 {
        ((self.cap >> 8) & 0x1F) as u8
    }
    /// Maximum Guest Address Width.
    pub fn mgaw(&self) -> u8 {
        ((self.cap >> 16) & 0x3F) as u8 + 1
    }
    /// Where the fault recording registers start.
    pub fn fault_recording_offset(&self) -> usize {
        (((self.cap >> 24) & 0x3FF) as usize) * 16
    }
    /// How many fault recording registers there are.
    pub fn fault_records(&self) -> usize {
        ((self.cap >> 40) & 0xFF) as usize + 1
    }
    /// Second Level Large Page Support: 2 MiB.
    pub fn large_2m(&self) -> bool {
        self.cap & (1 << 34) != 0
    }
    /// Second Level Large Page Support: 1 GiB.
    pub fn large_1g(&self) -> bool {
        self.cap & (1 << 35) != 0
    }
    /// Coherency: the unit snoops its table reads. Without it the tables
    /// must be flushed from the caches before it reads them.
    pub fn coherent(&self) -> bool {
        self.ecap & 1 != 0
    }
    /// Queued Invalidation support.
    pub fn queued_invalidation(&self) -> bool {
        self.ecap & (1 << 1) != 0
    }
    /// Where the IOTLB registers start.
    pub fn iotlb_offset(&self) -> usize {
        (((self.ecap >> 8) & 0x3FF) as usize) * 16
    }
    /// Scalable Mode Translation Support. thinvisor uses legacy mode,
    /// which RTADDR.TTM = 00 selects on every unit (10.4.6).
    pub fn scalable_mode(&self) -> bool {
        self.ecap & (1 << 43) != 0
    }

    /// The table depth to use for addresses below `top`: 3 levels when
    /// they suffice and the unit has them, else 4; None when the unit
    /// supports neither that covers `top`.
    pub fn levels_for(&self, top: u64) -> Option<u8> {
        let fits = |levels: u32| top <= 1u64 << (12 + 9 * levels);
        if self.sagaw() & 0b10 != 0 && fits(3) {
            Some(3)
        } else if self.sagaw() & 0b100 != 0 && fits(4) {
            Some(4)
        } else {
            None
        }
    }
}

/// Context-entry Address Width for a table depth (9.3): 1 = 39-bit,
/// 2 = 48-bit.
fn address_width(levels: u8) -> u64 {
    u64::from(levels) - 2
}

/// The domain every device belongs to (domain 0 is reserved when caching
/// mode is on, 6.2.2; 1 is always valid).
pub const DOMAIN: u64 = 1;

/// Builds the root table and the one shared context table: every
/// bus/device/function translates through `second_level` (a table of
/// `levels` levels) in [`DOMAIN`]. Returns the root table's address
/// (for RTADDR) or None when out of memory.
///
/// Root entry (9.1): bit 0 Present, bits 63:12 Context-table Pointer.
/// Context entry (9.3): low bit 0 Present, bit 1 Fault Processing
/// Disable (0: faults are recorded), bits 3:2 Translation Type (00:
/// untranslated requests through the second-level tables), bits 63:12
/// the second-level table; high bits 2:0 Address Width, bits 23:8
/// Domain Identifier.
pub fn root_and_context(
    alloc: &mut dyn TableAllocator,
    second_level: HostPhysAddr,
    levels: u8,
) -> Option<HostPhysAddr> {
    let context = alloc.alloc_table()?;
    let low = second_level.as_u64() | 1;
    let high = address_width(levels) | (DOMAIN << 8);
    let table = alloc.table(context);
    for devfn in 0..256 {
        table[2 * devfn] = low;
        table[2 * devfn + 1] = high;
    }
    let root = alloc.alloc_table()?;
    let table = alloc.table(root);
    for bus in 0..256 {
        table[2 * bus] = context.as_u64() | 1;
        table[2 * bus + 1] = 0;
    }
    Some(root)
}

/// A fault recording register (10.4.14): the low and high quadwords.
/// F (bit 127) set means it holds a fault; software clears it by writing
/// 1 to it.
pub fn decode_fault(low: u64, high: u64) -> Option<DmaFault> {
    if high & (1 << 63) == 0 {
        return None;
    }
    let reason = ((high >> 32) & 0xFF) as u8;
    Some(DmaFault {
        source: SourceId(high as u16),
        address: low & !0xFFF,
        // T (bit 126; T1 in rev. 3+): 0 = write, 1 = read (or an atomic).
        write: high & (1 << 62) == 0,
        reason,
        why: fault_reason(reason),
    })
}

/// The fault reasons of legacy-mode DMA remapping (appendix A,
/// "Non-Recoverable Fault Reason Encodings").
pub fn fault_reason(reason: u8) -> &'static str {
    match reason {
        0x1 => "root entry not present",
        0x2 => "context entry not present",
        0x3 => "invalid context entry",
        0x4 => "address beyond the domain's width",
        0x5 => "write to a page not mapped writable (thinvisor's memory)",
        0x6 => "read of a page not mapped readable (thinvisor's memory)",
        0x7 => "second-level table unreachable",
        0x8 => "root table unreachable",
        0x9 => "context table unreachable",
        0xA => "reserved bits in a root entry",
        0xB => "reserved bits in a context entry",
        0xC => "reserved bits in a second-level entry",
        0xD => "translation type blocked",
        _ => "other fault",
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::tables::tests::Tables;
    use std::vec::Vec;

    /// QEMU 7.2's intel-iommu with aw-bits=39: SAGAW 39-bit, MGAW 39,
    /// FRO 0x220, NFR 1, SLLPS 2M+1G; ECAP IRO 0x200 (IOTLB at 0x208).
    const QEMU_CAP: u64 = (0b10 << 8) | (38 << 16) | (0x22 << 24) | (3 << 34);
    const QEMU_ECAP: u64 = (0x20 << 8) | 0b110;

    #[test]
    fn qemu_caps() {
        let c = Caps {
            cap: QEMU_CAP,
            ecap: QEMU_ECAP,
        };
        assert_eq!(c.sagaw(), 0b10);
        assert_eq!(c.mgaw(), 39);
        assert_eq!(c.fault_recording_offset(), 0x220);
        assert_eq!(c.fault_records(), 1);
        assert!(c.large_2m() && c.large_1g());
        assert_eq!(c.iotlb_offset(), 0x200);
        assert_eq!(c.levels_for(4 << 30), Some(3));
        assert_eq!(c.levels_for(1 << 40), None);
        assert!(!c.caching_mode());
    }

    #[test]
    fn gcmd_keeps_states_drops_one_shots() {
        assert_eq!(gcmd(GCMD_SRTP, GCMD_TE), GCMD_TE);
        assert_eq!(
            gcmd(GCMD_TE | GCMD_IRE | GCMD_WBF, GCMD_SRTP),
            GCMD_TE | GCMD_IRE | GCMD_SRTP
        );
    }

    #[test]
    fn shared_context_table() {
        let mut t = Tables(Vec::new());
        let sl = HostPhysAddr::new(0x7000);
        let root = root_and_context(&mut t, sl, 3).unwrap();
        let r = *t.table(root);
        let ctx = r[0] & !0xFFF;
        assert!(r.chunks(2).all(|e| e[0] == ctx | 1 && e[1] == 0));
        let c = *t.table(HostPhysAddr::new(ctx));
        assert!(c.chunks(2).all(|e| e[0] == 0x7001 && e[1] == 0x101));
    }

    #[test]
    fn fault_records() {
        assert_eq!(decode_fault(0x1234_5000, 0), None);
        // QEMU: a write from 00:03.0, reason 5.
        let f = decode_fault(0x1fa0_0000, (1 << 63) | (5 << 32) | 0x18).unwrap();
        assert_eq!(f.source, SourceId(0x18));
        assert!(f.write);
        assert_eq!(f.address, 0x1fa0_0000);
        assert_eq!(std::format!("{}", f.source), "00:03.0");
        let f = decode_fault(0, (1 << 63) | (1 << 62) | (6 << 32) | 0x0101).unwrap();
        assert!(!f.write);
        assert_eq!(std::format!("{}", f.source), "01:00.1");
    }
}

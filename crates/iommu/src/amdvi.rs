//! AMD-Vi: register layout, the device table, commands and event log
//! entries (AMD I/O Virtualization Technology (IOMMU) Specification,
//! rev. 3.x; section numbers below are that document's).
//!
//! thinvisor gives every DeviceID the same Device Table Entry (2.2.2.1):
//! V and TV set, Mode = the I/O page table depth, the one identity table
//! of [`crate::tables`] as Page Table Root Pointer, IR and IW set (so the
//! page tables alone decide), domain 1, interrupts not remapped (IV
//! clear: they pass through as before).

use crate::{DmaFault, SourceId};

// MMIO registers (3.4).
/// Device Table Base Address: bits 51:12 base, bits 8:0 size in 4 KiB
/// pages minus one.
pub const DEVICE_TABLE_BASE: usize = 0x0000;
/// Command Buffer Base Address: bits 51:12 base, bits 59:56 ComLen
/// (2^ComLen entries, at least 8).
pub const COMMAND_BUFFER_BASE: usize = 0x0008;
/// Event Log Base Address: bits 51:12 base, bits 59:56 EventLen.
pub const EVENT_LOG_BASE: usize = 0x0010;
/// IOMMU Control Register.
pub const CONTROL: usize = 0x0018;
/// IOMMU Extended Feature Register.
pub const EXTENDED_FEATURE: usize = 0x0030;
/// Command Buffer Head / Tail Pointer (bits 18:4: byte offset).
pub const COMMAND_HEAD: usize = 0x2000;
pub const COMMAND_TAIL: usize = 0x2008;
/// Event Log Head / Tail Pointer.
pub const EVENT_HEAD: usize = 0x2010;
pub const EVENT_TAIL: usize = 0x2018;
/// IOMMU Status Register.
pub const STATUS: usize = 0x2020;
/// The register window's size.
pub const MMIO_LEN: u64 = 0x4000;

// Control register bits (3.4.4).
pub const CONTROL_IOMMU_EN: u64 = 1 << 0;
pub const CONTROL_EVENT_LOG_EN: u64 = 1 << 2;
pub const CONTROL_EVENT_INT_EN: u64 = 1 << 3;
pub const CONTROL_COM_WAIT_INT_EN: u64 = 1 << 4;
pub const CONTROL_CMD_BUF_EN: u64 = 1 << 12;

// Status register bits (3.4.13).
/// EventOverflow (RW1C).
pub const STATUS_EVENT_OVERFLOW: u64 = 1 << 0;
/// EventLogInt (RW1C).
pub const STATUS_EVENT_LOG_INT: u64 = 1 << 1;
/// ComWaitInt (RW1C).
pub const STATUS_COM_WAIT_INT: u64 = 1 << 2;

/// Extended Feature Register: INVALIDATE_IOMMU_ALL supported (IASup).
pub const EFR_IA_SUP: u64 = 1 << 6;

/// Bytes per device table entry, command, event.
pub const DTE_LEN: usize = 32;
pub const COMMAND_LEN: usize = 16;
pub const EVENT_LEN: usize = 16;
/// Entries of the command buffer and the event log thinvisor uses: 256
/// (the minimum, one 4 KiB page each).
pub const RING_ENTRIES_LOG2: u64 = 8;
pub const RING_BYTES: usize = 16 << RING_ENTRIES_LOG2;

/// The domain every device belongs to.
pub const DOMAIN: u64 = 1;

/// The Device Table Base register value for a table of `entries`
/// DeviceIDs at `base` (4 KiB aligned): the size field counts 4 KiB
/// pages minus one, 128 entries per page.
pub fn device_table_base(base: u64, entries: usize) -> u64 {
    let pages = entries.div_ceil(4096 / DTE_LEN).clamp(1, 512) as u64;
    base | (pages - 1)
}

/// Bytes of a device table for DeviceIDs 0..=`max_id`, whole pages.
pub fn device_table_bytes(max_id: u16) -> usize {
    ((usize::from(max_id) + 1) * DTE_LEN).next_multiple_of(4096)
}

/// A ring base register (command buffer, event log) for
/// [`RING_ENTRIES_LOG2`] entries at `base`.
pub fn ring_base(base: u64) -> u64 {
    base | (RING_ENTRIES_LOG2 << 56)
}

/// The device table entry (four quadwords) translating through `root`
/// (a table of `levels` levels).
pub fn device_table_entry(root: u64, levels: u8) -> [u64; 4] {
    const V: u64 = 1 << 0;
    const TV: u64 = 1 << 1;
    const IR: u64 = 1 << 61;
    const IW: u64 = 1 << 62;
    [
        V | TV | (u64::from(levels) << 9) | (root & 0x000F_FFFF_FFFF_F000) | IR | IW,
        DOMAIN,
        0,
        0,
    ]
}

/// Fills a device table (as quadwords) with `entry` for every DeviceID.
pub fn fill_device_table(table: &mut [u64], entry: [u64; 4]) {
    for dte in table.chunks_exact_mut(4) {
        dte.copy_from_slice(&entry);
    }
}

// Commands (2.4): opcode in bits 63:60 of the first quadword.
const OP_COMPLETION_WAIT: u64 = 0x1;
const OP_INVALIDATE_DEVTAB_ENTRY: u64 = 0x2;
const OP_INVALIDATE_IOMMU_PAGES: u64 = 0x3;
const OP_INVALIDATE_IOMMU_ALL: u64 = 0x8;

/// COMPLETION_WAIT (2.4.1) with S set: when every earlier command is
/// done, the IOMMU writes `data` to `store` (8-byte aligned).
pub fn completion_wait(store: u64, data: u64) -> [u64; 2] {
    [
        (store & 0x000F_FFFF_FFFF_FFF8) | 1 | (OP_COMPLETION_WAIT << 60),
        data,
    ]
}

/// INVALIDATE_DEVTAB_ENTRY (2.4.2).
pub fn invalidate_devtab_entry(device_id: u16) -> [u64; 2] {
    [u64::from(device_id) | (OP_INVALIDATE_DEVTAB_ENTRY << 60), 0]
}

/// INVALIDATE_IOMMU_PAGES (2.4.3) of every address of [`DOMAIN`]: S and
/// PDE set, address 0x7FFF_FFFF_FFFF_F000.
pub fn invalidate_domain_pages() -> [u64; 2] {
    [
        (DOMAIN << 32) | (OP_INVALIDATE_IOMMU_PAGES << 60),
        0x7FFF_FFFF_FFFF_F000 | 0b11,
    ]
}

/// INVALIDATE_IOMMU_ALL (2.4.7), when EFR.IASup says it exists.
pub fn invalidate_all() -> [u64; 2] {
    [OP_INVALIDATE_IOMMU_ALL << 60, 0]
}

/// An event log entry (2.5), decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// An empty slot (thinvisor zeroes each entry it consumed).
    Empty,
    /// IO_PAGE_FAULT: a device reached an address its tables deny.
    PageFault(DmaFault),
    /// Any other event: its code and device.
    Other {
        code: u8,
        source: SourceId,
        address: u64,
    },
}

/// Decodes one 16-byte event log entry.
///
/// IO_PAGE_FAULT (2.5.3): dword 0 bits 15:0 DeviceID; dword 1 bits 31:28
/// EventCode (2), bits 27:16 flags (bit 21 RW: a write, bit 20 PR: the
/// page was present, bit 19 I: an interrupt request); quadword 1 the
/// address. QEMU 7.2 puts its own permission bits in the low flag bits
/// (2 = write, at the NX position), so a write it blocks reads as a read
/// here: the decoder follows the specification.
pub fn decode_event(e: [u64; 2]) -> Event {
    if e == [0, 0] {
        return Event::Empty;
    }
    let code = ((e[0] >> 60) & 0xF) as u8;
    let source = SourceId(e[0] as u16);
    let address = e[1];
    if code != 2 {
        return Event::Other {
            code,
            source,
            address,
        };
    }
    let flags = (e[0] >> 48) & 0xFFF;
    let present = flags & (1 << 4) != 0;
    Event::PageFault(DmaFault {
        source,
        address,
        write: flags & (1 << 5) != 0,
        reason: code,
        why: if present {
            "IO_PAGE_FAULT, permission denied (thinvisor's memory)"
        } else {
            "IO_PAGE_FAULT, page not mapped (thinvisor's memory or beyond RAM)"
        },
    })
}

/// The name of an event code (2.5, table "Event Codes").
pub fn event_name(code: u8) -> &'static str {
    match code {
        0x1 => "ILLEGAL_DEV_TABLE_ENTRY",
        0x2 => "IO_PAGE_FAULT",
        0x3 => "DEV_TAB_HARDWARE_ERROR",
        0x4 => "PAGE_TAB_HARDWARE_ERROR",
        0x5 => "ILLEGAL_COMMAND_ERROR",
        0x6 => "COMMAND_HARDWARE_ERROR",
        0x7 => "IOTLB_INV_TIMEOUT",
        0x8 => "INVALID_DEVICE_REQUEST",
        0x9 => "INVALID_PPR_REQUEST",
        0xA => "EVENT_COUNTER_ZERO",
        _ => "unknown event",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers() {
        assert_eq!(device_table_bytes(0xFFFF), 2 << 20);
        assert_eq!(device_table_bytes(0x00FF), 8192);
        assert_eq!(device_table_base(0x10_0000, 65536), 0x10_01FF);
        assert_eq!(device_table_base(0x10_0000, 256), 0x10_0001);
        assert_eq!(ring_base(0x20_0000), 0x0800_0000_0020_0000);
    }

    #[test]
    fn entries_and_commands() {
        let dte = device_table_entry(0x1234_5000, 3);
        assert_eq!(dte[0], 0x6000_0000_1234_5603);
        assert_eq!(dte[1], 1);
        let mut table = [0u64; 16];
        fill_device_table(&mut table, dte);
        assert!(table.chunks(4).all(|e| e == dte));
        assert_eq!(completion_wait(0x1000, 7), [0x1000_0000_0000_1001, 7]);
        assert_eq!(invalidate_all(), [0x8000_0000_0000_0000, 0]);
        assert_eq!(invalidate_devtab_entry(0x18)[0], 0x2000_0000_0000_0018);
        assert_eq!(invalidate_domain_pages()[0] >> 60, 3);
    }

    #[test]
    fn events() {
        assert_eq!(decode_event([0, 0]), Event::Empty);
        // A write to a not-present page by 00:03.0.
        let e = [0x2000_0000_0000_0018 | (1 << (48 + 5)), 0x1fa0_0000];
        let Event::PageFault(f) = decode_event(e) else {
            panic!("not a page fault")
        };
        assert!(f.write);
        assert_eq!((f.source, f.address), (SourceId(0x18), 0x1fa0_0000));
        assert_eq!(
            decode_event([0x1000_0000_0000_0100, 0]),
            Event::Other {
                code: 1,
                source: SourceId(0x100),
                address: 0
            }
        );
    }
}

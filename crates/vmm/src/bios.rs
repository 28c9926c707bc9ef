//! The BIOS memory answers a chain-booted guest gets (`boot=chain`).
//!
//! In the chain-boot path the machine's BIOS boots the first hard disk
//! inside the guest, so the guest's OS loader asks the BIOS, not thinvisor,
//! how much memory there is. thinvisor's own block must look like memory
//! nobody may use. As in BitVisor, a small real-mode INT 15h handler is put
//! at the top of conventional memory (the BIOS data area's base-memory size
//! at 0x413 is lowered to make room) and IVT entry 0x15 points to it. It
//! answers the three memory functions from data thinvisor writes next to
//! it, without any exit, and hands every other function to the BIOS's own
//! handler:
//!
//! - AX=E820h "Query System Address Map" (ACPI Specification 6.5, 15.1
//!   "INT 15H, E820H"): one entry per call from [`E820Table`], in which
//!   thinvisor's block and the handler's own memory are reserved (type 2);
//! - AX=E801h "Get memory size for large configurations" (Ralf Brown's
//!   Interrupt List, INT 15/AX=E801h) and AH=88h "Get extended memory size"
//!   (RBIL INT 15/AH=88h): sizes derived from the same table by
//!   [`E820Table::legacy_sizes`], so they never reach into thinvisor's
//!   block.
//!
//! This module holds the architecture-neutral part, host-tested: the table
//! (thinvisor builds the guest's map with `thinvisor_boot::e820::GuestMap`
//! and hands it over; [`E820Table::build`] also merges a raw map itself,
//! with the same rules), the layout of the data the handler reads
//! ([`stub`]), and the answers it gives ([`E820Table::answer`] states in
//! Rust what the 16-bit handler does). The handler itself is
//! `hypervisor/src/chain.rs`.

/// The 'SMAP' signature E820 callers pass in EDX and get back in EAX.
pub const SMAP: u32 = 0x534D_4150;
/// E820 type: usable RAM.
pub const E820_USABLE: u32 = 1;
/// E820 type: reserved, not to be used by the OS.
pub const E820_RESERVED: u32 = 2;
/// E820 type: ACPI tables, reclaimable once read.
pub const E820_ACPI: u32 = 3;
/// E820 type: ACPI NVS, preserved across sleep.
pub const E820_NVS: u32 = 4;
/// E820 type: unusable (bad) memory.
pub const E820_UNUSABLE: u32 = 5;
/// Bytes of one entry as the table stores it and the basic call returns it:
/// base (8), length (8), type (4).
pub const ENTRY_BYTES: usize = 20;
/// Bytes of an entry with the ACPI 3.0 extended attributes (a dword, bit 0
/// "enabled"), returned when the caller's buffer (ECX) holds 24 bytes.
pub const EXTENDED_ENTRY_BYTES: usize = 24;
/// Entries the table holds (Linux's `boot_params.e820_table` holds 128).
pub const MAX_ENTRIES: usize = 128;
/// Firmware map entries accepted (thinvisor's boot information keeps 128).
pub const MAX_INPUT: usize = 128;
/// Ranges that may be hidden.
pub const MAX_HIDDEN: usize = 4;
/// AH on error: "function not supported" (RBIL INT 15, AH=86h status).
pub const ERROR_AH: u8 = 0x86;

const MIB: u64 = 1 << 20;
const FOUR_GIB: u64 = 4 << 30;

/// One E820 entry: `len` bytes from `base`, of E820 type `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub base: u64,
    pub len: u64,
    pub kind: u32,
}

impl E820Entry {
    /// One past the last byte (saturating at the top of the address space).
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }

    /// The 20 bytes the E820 call returns for this entry.
    pub fn to_bytes(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[0..8].copy_from_slice(&self.base.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.kind.to_le_bytes());
        b
    }
}

/// Why the table could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// More firmware entries than [`MAX_INPUT`].
    TooManyInputs,
    /// More hidden ranges than [`MAX_HIDDEN`].
    TooManyHidden,
    /// The result needs more than [`MAX_ENTRIES`] entries.
    TooManyEntries,
}

impl core::fmt::Display for TableError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            TableError::TooManyInputs => "the firmware's memory map has too many entries",
            TableError::TooManyHidden => "too many ranges to hide from the guest",
            TableError::TooManyEntries => "the guest's memory map needs more than 128 entries",
        })
    }
}

/// How strongly a type claims a byte when entries overlap: usable < ACPI
/// reclaimable < reserved < ACPI NVS < unusable, so that no byte any entry
/// calls reserved is handed out as RAM (Linux's `e820__update_table` rule,
/// except that reserved also beats ACPI reclaimable).
fn rank(kind: u32) -> u8 {
    match kind {
        E820_USABLE => 0,
        E820_ACPI => 1,
        E820_NVS => 3,
        E820_UNUSABLE => 4,
        // Reserved and every type this code does not know.
        _ => 2,
    }
}

/// Where the 16-bit handler looks for what it answers: byte offsets from
/// the start of its memory (its code segment's offset 0). thinvisor fills
/// the header in, the handler's code follows it, the E820 table follows the
/// code at [`table_offset`](stub::table_offset).
pub mod stub {
    use super::{E820Table, ENTRY_BYTES};

    /// u32: the BIOS's INT 15h vector (offset, then segment, as in the
    /// IVT): every function the handler does not answer goes there.
    pub const OLD_INT15: usize = 0;
    /// u32: entries in the table (the E820 continuation values are 0..this).
    pub const E820_COUNT: usize = 4;
    /// u16: offset of the table.
    pub const TABLE_OFFSET: usize = 8;
    /// u16: the E801h answer's AX and CX: KiB from 1 MiB to 16 MiB.
    pub const E801_AX: usize = 10;
    /// u16: the E801h answer's BX and DX: 64 KiB blocks above 16 MiB.
    pub const E801_BX: usize = 12;
    /// u16: the AH=88h answer (AX): KiB of extended memory from 1 MiB.
    pub const AH88_AX: usize = 14;
    /// Bytes of the header; the code starts here.
    pub const HEADER_BYTES: usize = 16;

    /// Where the table goes after `code_len` bytes of header and code.
    pub const fn table_offset(code_len: usize) -> usize {
        code_len.next_multiple_of(4)
    }

    /// Bytes the handler's memory needs for `code_len` bytes of header and
    /// code and `entries` entries.
    pub const fn area_bytes(code_len: usize, entries: usize) -> usize {
        table_offset(code_len) + entries * ENTRY_BYTES
    }

    /// Fill in the header and the table of `area`, whose first `code_len`
    /// bytes already hold the header's room and the code. None when
    /// `area` is too small or the offsets do not fit 16 bits (the handler
    /// addresses its data through CS).
    pub fn write_data(
        area: &mut [u8],
        code_len: usize,
        old_int15: u32,
        table: &E820Table,
    ) -> Option<usize> {
        let entries = table.entries();
        let at = table_offset(code_len);
        let total = area_bytes(code_len, entries.len());
        if code_len < HEADER_BYTES || total > area.len() || total > 0x1_0000 {
            return None;
        }
        let sizes = table.legacy_sizes();
        let mut put = |offset: usize, bytes: &[u8]| {
            area[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(OLD_INT15, &old_int15.to_le_bytes());
        put(E820_COUNT, &(entries.len() as u32).to_le_bytes());
        put(TABLE_OFFSET, &(at as u16).to_le_bytes());
        put(E801_AX, &sizes.e801_ax.to_le_bytes());
        put(E801_BX, &sizes.e801_bx.to_le_bytes());
        put(AH88_AX, &sizes.ah88_ax.to_le_bytes());
        for (i, e) in entries.iter().enumerate() {
            put(at + i * ENTRY_BYTES, &e.to_bytes());
        }
        Some(total)
    }
}

/// The registers of an E820 call that decide its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Query {
    /// Continuation value: 0 for the first entry.
    pub ebx: u32,
    /// Size of the caller's buffer (at least 20).
    pub ecx: u32,
    /// Must be [`SMAP`].
    pub edx: u32,
}

/// A successful E820 answer (CF clear, EAX = [`SMAP`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Answer {
    /// What is written to ES:DI; only the first `ecx` bytes.
    pub bytes: [u8; EXTENDED_ENTRY_BYTES],
    /// Bytes written: 20, or 24 with the extended attributes.
    pub ecx: u32,
    /// The next continuation value; 0 after the last entry.
    pub ebx: u32,
}

/// The answers of E801h and 88h.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LegacySizes {
    /// E801h AX (and CX): KiB of contiguous usable memory from 1 MiB up to
    /// 16 MiB, at most 0x3C00.
    pub e801_ax: u16,
    /// E801h BX (and DX): 64 KiB blocks of contiguous usable memory from
    /// 16 MiB, up to 4 GiB.
    pub e801_bx: u16,
    /// AH=88h AX: KiB of contiguous usable memory from 1 MiB, at most
    /// 63 MiB (SeaBIOS's cap; RBIL notes BIOSes stop at 15 or 63 MiB).
    pub ah88_ax: u16,
}

/// A sorted, non-overlapping E820 table with adjacent entries of one type
/// merged.
#[derive(Clone, Debug)]
pub struct E820Table {
    entries: [E820Entry; MAX_ENTRIES],
    len: usize,
}

const EMPTY: E820Entry = E820Entry {
    base: 0,
    len: 0,
    kind: 0,
};

impl E820Table {
    /// The table for `map` (the firmware's entries, in any order, possibly
    /// overlapping) with every byte of `hidden` (`[start, end)` ranges)
    /// reserved, whatever the firmware said about it. Where entries overlap
    /// the most restrictive type wins (see `rank`); bytes no entry names stay
    /// out of the table.
    pub fn build(map: &[E820Entry], hidden: &[(u64, u64)]) -> Result<Self, TableError> {
        if map.len() > MAX_INPUT {
            return Err(TableError::TooManyInputs);
        }
        if hidden.len() > MAX_HIDDEN {
            return Err(TableError::TooManyHidden);
        }
        // Every boundary, sorted: between two neighbours the type is one.
        let mut points = [0u64; 2 * (MAX_INPUT + MAX_HIDDEN)];
        let mut n = 0;
        for (start, end) in map
            .iter()
            .map(|e| (e.base, e.end()))
            .chain(hidden.iter().copied())
        {
            points[n] = start;
            points[n + 1] = end;
            n += 2;
        }
        let points = &mut points[..n];
        points.sort_unstable();
        let mut table = Self {
            entries: [EMPTY; MAX_ENTRIES],
            len: 0,
        };
        for w in points.windows(2) {
            let (lo, hi) = (w[0], w[1]);
            if lo >= hi {
                continue;
            }
            let kind = if hidden.iter().any(|&(s, e)| s <= lo && hi <= e) {
                Some(E820_RESERVED)
            } else {
                map.iter()
                    .filter(|e| e.len > 0 && e.base <= lo && hi <= e.end())
                    .map(|e| e.kind)
                    .max_by_key(|&k| rank(k))
            };
            if let Some(kind) = kind {
                table.push(lo, hi, kind)?;
            }
        }
        Ok(table)
    }

    /// Append [lo, hi) of `kind`, merged with the last entry when it
    /// continues it.
    fn push(&mut self, lo: u64, hi: u64, kind: u32) -> Result<(), TableError> {
        if let Some(last) = self.entries[..self.len].last_mut() {
            if last.kind == kind && last.end() == lo {
                last.len = hi - last.base;
                return Ok(());
            }
        }
        let slot = self
            .entries
            .get_mut(self.len)
            .ok_or(TableError::TooManyEntries)?;
        *slot = E820Entry {
            base: lo,
            len: hi - lo,
            kind,
        };
        self.len += 1;
        Ok(())
    }

    /// The entries, sorted by address.
    pub fn entries(&self) -> &[E820Entry] {
        &self.entries[..self.len]
    }

    /// The E820 call as the 16-bit handler answers it: entry EBX, 24 bytes
    /// when the buffer holds them, EBX = 0 after the last entry. Errors
    /// (CF set, AH = [`ERROR_AH`]): a signature other than 'SMAP', a buffer
    /// smaller than 20 bytes, a continuation value past the table.
    pub fn answer(&self, q: E820Query) -> Result<E820Answer, u8> {
        if q.edx != SMAP || (q.ecx as usize) < ENTRY_BYTES {
            return Err(ERROR_AH);
        }
        let entry = self.entries().get(q.ebx as usize).ok_or(ERROR_AH)?;
        let mut bytes = [0u8; EXTENDED_ENTRY_BYTES];
        bytes[..ENTRY_BYTES].copy_from_slice(&entry.to_bytes());
        let ecx = if q.ecx as usize >= EXTENDED_ENTRY_BYTES {
            // ACPI 3.0 extended attributes: bit 0, "enabled" (an entry
            // with it clear is to be ignored).
            bytes[ENTRY_BYTES..].copy_from_slice(&1u32.to_le_bytes());
            EXTENDED_ENTRY_BYTES as u32
        } else {
            ENTRY_BYTES as u32
        };
        let next = q.ebx + 1;
        Ok(E820Answer {
            bytes,
            ecx,
            ebx: if next as usize >= self.len { 0 } else { next },
        })
    }

    /// The end of the usable memory that runs without a gap from `from`
    /// (None when `from` is not usable).
    pub fn usable_run_end(&self, from: u64) -> Option<u64> {
        let mut i = self
            .entries()
            .iter()
            .position(|e| e.kind == E820_USABLE && e.base <= from && from < e.end())?;
        let mut end = self.entries[i].end();
        // The table is merged, but a run may still be split by a firmware
        // entry of the same type that did not merge (it always merges here;
        // this keeps the rule independent of that).
        while let Some(next) = self.entries().get(i + 1) {
            if next.kind != E820_USABLE || next.base != end {
                break;
            }
            end = next.end();
            i += 1;
        }
        Some(end)
    }

    /// E801h and 88h, from the table: only memory the table calls usable
    /// and that runs on without a gap counts, so neither answer reaches
    /// into a reserved range such as thinvisor's block.
    pub fn legacy_sizes(&self) -> LegacySizes {
        let from_1m = self
            .usable_run_end(MIB)
            .map_or(0, |end| end.min(FOUR_GIB) - MIB);
        let above_16m = self
            .usable_run_end(16 * MIB)
            .map_or(0, |end| end.min(FOUR_GIB) - 16 * MIB);
        LegacySizes {
            e801_ax: (from_1m.min(15 * MIB) >> 10) as u16,
            e801_bx: (above_16m >> 16).min(0xFFFF) as u16,
            ah88_ax: (from_1m.min(63 * MIB) >> 10) as u16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(base: u64, len: u64, kind: u32) -> E820Entry {
        E820Entry { base, len, kind }
    }

    /// SeaBIOS's map on QEMU `pc` with 512 MiB.
    fn seabios_512m() -> [E820Entry; 6] {
        [
            e(0, 0x9_FC00, 1),
            e(0x9_FC00, 0x400, 2),
            e(0xF_0000, 0x1_0000, 2),
            e(0x10_0000, 0x1FEE_0000, 1),
            e(0x1FFE_0000, 0x2_0000, 2),
            e(0xFFFC_0000, 0x4_0000, 2),
        ]
    }

    const BLOCK: (u64, u64) = (0x1F80_0000, 0x1FC0_0000);
    const LOW: (u64, u64) = (0x9_E000, 0x9_FC00);

    #[test]
    fn hidden_ranges_are_reserved_and_split_ram() {
        let t = E820Table::build(&seabios_512m(), &[BLOCK, LOW]).unwrap();
        assert_eq!(
            t.entries(),
            &[
                e(0, 0x9_E000, 1),
                e(0x9_E000, 0x2000, 2),
                e(0xF_0000, 0x1_0000, 2),
                e(0x10_0000, 0x1F70_0000, 1),
                e(0x1F80_0000, 0x40_0000, 2),
                e(0x1FC0_0000, 0x3E_0000, 1),
                e(0x1FFE_0000, 0x2_0000, 2),
                e(0xFFFC_0000, 0x4_0000, 2),
            ]
        );
        for entry in t.entries().iter().filter(|x| x.kind == E820_USABLE) {
            assert!(entry.end() <= BLOCK.0 || entry.base >= BLOCK.1);
        }
    }

    #[test]
    fn overlaps_resolve_to_the_most_restrictive_type() {
        let map = [
            e(0x1000, 0x3000, 1),
            e(0x2000, 0x1000, 3),
            e(0x2800, 0x1000, 2),
            e(0x6000, 0x1000, 4),
            e(0x6000, 0x1000, 1),
        ];
        let t = E820Table::build(&map, &[]).unwrap();
        assert_eq!(
            t.entries(),
            &[
                e(0x1000, 0x1000, 1),
                e(0x2000, 0x800, 3),
                e(0x2800, 0x1000, 2),
                e(0x3800, 0x800, 1),
                e(0x6000, 0x1000, 4),
            ]
        );
    }

    #[test]
    fn degenerate_inputs() {
        assert!(E820Table::build(&[], &[]).unwrap().entries().is_empty());
        let top = e(u64::MAX - 0xFFF, 0x2000, 1);
        let t = E820Table::build(&[top, e(5, 0, 1)], &[(10, 5)]).unwrap();
        assert_eq!(t.entries(), &[e(u64::MAX - 0xFFF, 0xFFF, 1)]);
        let many = [e(0, 1, 1); MAX_INPUT + 1];
        assert_eq!(
            E820Table::build(&many, &[]).unwrap_err(),
            TableError::TooManyInputs
        );
        // 128 separate entries fit; hiding one byte in each of two more
        // splits does not.
        let sparse: [E820Entry; MAX_INPUT] =
            core::array::from_fn(|i| e(i as u64 * 0x2000, 0x1000, 1));
        assert_eq!(E820Table::build(&sparse, &[]).unwrap().entries().len(), 128);
        assert_eq!(
            E820Table::build(&sparse, &[(0x10, 0x20)]).unwrap_err(),
            TableError::TooManyEntries
        );
    }

    #[test]
    fn e820_calls() {
        let t = E820Table::build(&seabios_512m(), &[BLOCK, LOW]).unwrap();
        let n = t.entries().len() as u32;
        let q = |ebx, ecx, edx| t.answer(E820Query { ebx, ecx, edx });
        let first = q(0, 20, SMAP).unwrap();
        assert_eq!((first.ecx, first.ebx), (20, 1));
        assert_eq!(&first.bytes[..20], &t.entries()[0].to_bytes());
        let ext = q(4, 64, SMAP).unwrap();
        assert_eq!((ext.ecx, ext.ebx), (24, 5));
        assert_eq!(&ext.bytes[..20], &e(0x1F80_0000, 0x40_0000, 2).to_bytes());
        assert_eq!(&ext.bytes[20..], &[1, 0, 0, 0]);
        assert_eq!(q(n - 1, 20, SMAP).unwrap().ebx, 0);
        assert_eq!(q(n, 20, SMAP), Err(ERROR_AH));
        assert_eq!(q(u32::MAX, 20, SMAP), Err(ERROR_AH));
        assert_eq!(q(0, 19, SMAP), Err(ERROR_AH));
        assert_eq!(q(0, 20, 0x5041_4D53), Err(ERROR_AH));
        // Walking from 0 visits every entry once.
        let (mut ebx, mut seen) = (0, 0);
        loop {
            let a = q(ebx, 20, SMAP).unwrap();
            seen += 1;
            ebx = a.ebx;
            if ebx == 0 {
                break;
            }
        }
        assert_eq!(seen, n);
    }

    #[test]
    fn legacy_sizes_stop_at_the_hidden_block() {
        let t = E820Table::build(&seabios_512m(), &[BLOCK, LOW]).unwrap();
        let s = t.legacy_sizes();
        assert_eq!(s.e801_ax, 0x3C00);
        assert_eq!(
            u64::from(s.e801_bx),
            (BLOCK.0 - 16 * MIB) >> 16,
            "E801 BX ends at thinvisor's block"
        );
        assert_eq!(s.ah88_ax, 63 * 1024);
        // Without the block the run goes on to SeaBIOS's own reservation.
        let bare = E820Table::build(&seabios_512m(), &[]).unwrap();
        assert_eq!(
            u64::from(bare.legacy_sizes().e801_bx),
            (0x1FFE_0000 - 16 * MIB) >> 16
        );
        // A small machine whose block sits below 16 MiB.
        let small = E820Table::build(
            &[e(0, 0xA_0000, 1), e(MIB, 11 * MIB, 1)],
            &[(8 * MIB, 12 * MIB)],
        )
        .unwrap()
        .legacy_sizes();
        assert_eq!(
            (small.e801_ax, small.e801_bx, small.ah88_ax),
            (7 * 1024, 0, 7 * 1024)
        );
        let none = E820Table::build(&[e(0, 0xA_0000, 1)], &[]).unwrap();
        assert_eq!(none.legacy_sizes().ah88_ax, 0);
    }

    #[test]
    fn handler_data_layout() {
        let t = E820Table::build(&seabios_512m(), &[BLOCK, LOW]).unwrap();
        let code_len = 0x95;
        let mut area = [0xCCu8; 1024];
        let total = stub::write_data(&mut area, code_len, 0xF000_F859, &t).unwrap();
        let at = stub::table_offset(code_len);
        assert_eq!(at, 0x98);
        assert_eq!(total, at + t.entries().len() * ENTRY_BYTES);
        let u16_at = |o: usize| u16::from_le_bytes([area[o], area[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(area[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(stub::OLD_INT15), 0xF000_F859);
        assert_eq!(u32_at(stub::E820_COUNT), t.entries().len() as u32);
        assert_eq!(usize::from(u16_at(stub::TABLE_OFFSET)), at);
        let s = t.legacy_sizes();
        assert_eq!(u16_at(stub::E801_AX), s.e801_ax);
        assert_eq!(u16_at(stub::E801_BX), s.e801_bx);
        assert_eq!(u16_at(stub::AH88_AX), s.ah88_ax);
        // The code's bytes (after the header) are untouched.
        assert!(area[stub::HEADER_BYTES..code_len]
            .iter()
            .all(|&b| b == 0xCC));
        // What the handler copies for continuation value 4: the entry at
        // table + 4 * 20.
        let entry = &area[at + 4 * ENTRY_BYTES..at + 5 * ENTRY_BYTES];
        let answer = t
            .answer(E820Query {
                ebx: 4,
                ecx: 20,
                edx: SMAP,
            })
            .unwrap();
        assert_eq!(entry, &answer.bytes[..20]);
        assert!(area[total..].iter().all(|&b| b == 0xCC));
        // Too small an area, or a code length that leaves no header.
        assert_eq!(stub::write_data(&mut area[..200], code_len, 0, &t), None);
        assert_eq!(stub::write_data(&mut area, 8, 0, &t), None);
    }
}

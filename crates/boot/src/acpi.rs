//! The one ACPI fact thinvisor needs before the guest runs: the I/O port of
//! the PM1a control register, through which an OS powers the machine off
//! (writing SLP_EN). thinvisor watches it to report the run's end (its exit
//! tables) before the machine goes away.
//!
//! The RSDP is the one the loader passed (a UEFI loader must: ACPI 6.5,
//! 5.2.5.2, the firmware gives it in its configuration table, not in the
//! BIOS areas), or else searched where a BIOS puts it (ACPI 6.5, 5.2.5.1:
//! the first KiB of the EBDA, then 0xE0000-0xFFFFF on 16-byte
//! boundaries); the RSDT
//! (or, from revision 2, the XSDT) lists the tables; the FADT ("FACP")
//! holds PM1a_CNT_BLK (offset 64) and, from ACPI 2.0, X_PM1a_CNT_BLK
//! (offset 172, a Generic Address Structure). Every table is
//! checksum-verified and bounds-checked: firmware tables are input like any
//! other (addresses in them wrap rather than overflow; the reader refuses
//! what it cannot reach).

use crate::multiboot1::PhysRead;

/// Tables followed at most in the RSDT/XSDT.
const MAX_ENTRIES: usize = 64;

/// The PM1a control register's I/O port, or None when the firmware has no
/// usable ACPI tables (or puts the register in memory space); the RSDP
/// searched in the BIOS areas.
pub fn pm1a_control_port(mem: &dyn PhysRead) -> Option<u16> {
    pm1a_control_port_at(mem, None)
}

/// [`pm1a_control_port`] from the RSDP at `rsdp` when the loader gave
/// one (checked like any other), else from the BIOS areas' RSDP.
pub fn pm1a_control_port_at(mem: &dyn PhysRead, rsdp: Option<u64>) -> Option<u16> {
    let rsdp = match rsdp {
        Some(at) => rsdp_at(mem, at)?,
        None => find_rsdp(mem)?,
    };
    let fadt = find_table(mem, &rsdp, *b"FACP")?;
    let (addr, len) = fadt;
    // X_PM1a_CNT_BLK: address space 1 = system I/O (ACPI 6.5, table 5.1).
    if len >= 184 {
        let mut gas = [0u8; 12];
        if mem.read(addr.wrapping_add(172), &mut gas) && gas[0] == 1 {
            let port = u64::from_le_bytes(gas[4..12].try_into().ok()?);
            if port != 0 && port <= 0xFFFF {
                return Some(port as u16);
            }
        }
    }
    if len >= 68 {
        let port = read_u32(mem, addr.wrapping_add(64))?;
        if port != 0 && port <= 0xFFFF {
            return Some(port as u16);
        }
    }
    None
}

/// The I/O APICs' register pages, from the MADT ("APIC", ACPI 6.5, 5.2.12:
/// entries of type 1, "I/O APIC", address at offset 4), at most
/// `out.len()`; how many were found. thinvisor watches their writes: a
/// redirection entry can deliver INIT (docs/security.md).
pub fn io_apics(mem: &dyn PhysRead, out: &mut [u64]) -> usize {
    io_apics_at(mem, None, out)
}

/// [`io_apics`] from the RSDP at `rsdp` when the loader gave one.
pub fn io_apics_at(mem: &dyn PhysRead, rsdp: Option<u64>, out: &mut [u64]) -> usize {
    let rsdp = match rsdp {
        Some(at) => rsdp_at(mem, at),
        None => find_rsdp(mem),
    };
    let Some(rsdp) = rsdp else {
        return 0;
    };
    let Some((madt, len)) = find_table(mem, &rsdp, *b"APIC") else {
        return 0;
    };
    let mut n = 0;
    // The entries follow the 36-byte header, the local APIC address and
    // the flags.
    let mut at = 44;
    while at + 2 <= len && n < out.len() {
        let mut head = [0u8; 2];
        if !mem.read(madt.wrapping_add(at), &mut head) || head[1] < 2 {
            break;
        }
        if head[0] == 1 && head[1] >= 12 {
            if let Some(address) = read_u32(mem, madt.wrapping_add(at + 4)) {
                out[n] = address.into();
                n += 1;
            }
        }
        at += u64::from(head[1]);
    }
    n
}

/// Whether `at` holds an RSDP whose every byte a reader of it takes is
/// readable and checksummed (ACPI 6.5, 5.2.5.3): the signature, the ACPI
/// 1.0 checksum over 20 bytes and, from revision 2, the extended checksum
/// over its Length (36 bytes, at most a page accepted). The `acpi` crate
/// reads Length bytes without a bound: an RSDP from the loader is checked
/// here first.
pub fn rsdp_is_valid(mem: &dyn PhysRead, at: u64) -> bool {
    let mut v1 = [0u8; 20];
    if !mem.read(at, &mut v1) || &v1[..8] != b"RSD PTR " || checksum(&v1) != 0 {
        return false;
    }
    if v1[15] == 0 {
        return true;
    }
    let Some(len) = read_u32(mem, at.wrapping_add(20)) else {
        return false;
    };
    if !(36..=4096).contains(&len) {
        return false;
    }
    let mut all = [0u8; 4096];
    let bytes = &mut all[..len as usize];
    mem.read(at, bytes) && checksum(bytes) == 0
}

/// The RSDT or XSDT: its address and whether entries are 64-bit.
struct Rsdp {
    table: u64,
    wide: bool,
}

fn find_rsdp(mem: &dyn PhysRead) -> Option<Rsdp> {
    let ebda = u64::from(read_u16(mem, 0x40E).unwrap_or(0)) << 4;
    let areas = [(ebda, ebda + 1024), (0xE_0000, 0x10_0000)];
    for (start, end) in areas {
        if start == 0 {
            continue;
        }
        let mut at = start;
        while at + 20 <= end {
            if let Some(r) = rsdp_at(mem, at) {
                return Some(r);
            }
            at += 16;
        }
    }
    None
}

fn rsdp_at(mem: &dyn PhysRead, at: u64) -> Option<Rsdp> {
    let mut v1 = [0u8; 20];
    if !mem.read(at, &mut v1) || &v1[..8] != b"RSD PTR " || checksum(&v1) != 0 {
        return None;
    }
    let revision = v1[15];
    let rsdt = u32::from_le_bytes(v1[16..20].try_into().ok()?);
    if revision >= 2 {
        let mut v2 = [0u8; 36];
        if mem.read(at, &mut v2) && checksum(&v2) == 0 {
            let xsdt = u64::from_le_bytes(v2[24..32].try_into().ok()?);
            if xsdt != 0 {
                return Some(Rsdp {
                    table: xsdt,
                    wide: true,
                });
            }
        }
    }
    (rsdt != 0).then_some(Rsdp {
        table: rsdt.into(),
        wide: false,
    })
}

/// The table with `signature` listed in the RSDT/XSDT: its address and
/// length, checksum verified.
fn find_table(mem: &dyn PhysRead, rsdp: &Rsdp, signature: [u8; 4]) -> Option<(u64, u64)> {
    let len = table_len(mem, rsdp.table)?;
    let entry_size = if rsdp.wide { 8 } else { 4 };
    let entries = ((len.saturating_sub(36)) / entry_size).min(MAX_ENTRIES as u64);
    for i in 0..entries {
        let at = rsdp.table.wrapping_add(36 + i * entry_size);
        let table = if rsdp.wide {
            let mut b = [0u8; 8];
            mem.read(at, &mut b).then(|| u64::from_le_bytes(b))?
        } else {
            u64::from(read_u32(mem, at)?)
        };
        let mut sig = [0u8; 4];
        if mem.read(table, &mut sig) && sig == signature {
            if let Some(len) = table_len(mem, table) {
                return Some((table, len));
            }
        }
    }
    None
}

/// A table's length from its header, when the whole table checksums to 0.
fn table_len(mem: &dyn PhysRead, at: u64) -> Option<u64> {
    let len = u64::from(read_u32(mem, at.wrapping_add(4))?);
    if !(36..=64 * 1024).contains(&len) {
        return None;
    }
    let mut sum = 0u8;
    let mut chunk = [0u8; 256];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(256) as usize;
        let buf = chunk.get_mut(..n)?;
        if !mem.read(at.wrapping_add(done), buf) {
            return None;
        }
        sum = buf.iter().fold(sum, |s, &b| s.wrapping_add(b));
        done += n as u64;
    }
    (sum == 0).then_some(len)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
}

fn read_u16(mem: &dyn PhysRead, at: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    mem.read(at, &mut b).then(|| u16::from_le_bytes(b))
}

fn read_u32(mem: &dyn PhysRead, at: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    mem.read(at, &mut b).then(|| u32::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// 1 MiB of fake physical memory.
    struct Mem(Vec<u8>);

    impl PhysRead for Mem {
        fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
            let Ok(start) = usize::try_from(pa) else {
                return false;
            };
            match start
                .checked_add(buf.len())
                .and_then(|end| self.0.get(start..end))
            {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    fn fix_checksum(bytes: &mut [u8], at: usize) {
        bytes[at] = 0;
        let sum = checksum(bytes);
        bytes[at] = 0u8.wrapping_sub(sum);
    }

    fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; 36];
        t[..4].copy_from_slice(sig);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        fix_checksum(&mut t, 9);
        t
    }

    /// SeaBIOS-like: RSDP v0 in the BIOS area, RSDT with an APIC table and
    /// the FADT (PM1a control at 0x604).
    fn seabios(pm1a: u32) -> Mem {
        let mut m = vec![0u8; 1 << 20];
        let mut fadt_body = vec![0u8; 116 - 36];
        fadt_body[64 - 36..68 - 36].copy_from_slice(&pm1a.to_le_bytes());
        let fadt = table(b"FACP", &fadt_body);
        // MADT: local APIC address, flags, a local APIC (type 0), an I/O
        // APIC (type 1) at 0xFEC00000, an interrupt override (type 2).
        let mut madt = vec![0, 0, 0xE0, 0xFE, 1, 0, 0, 0];
        madt.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]);
        madt.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xC0, 0xFE, 0, 0, 0, 0]);
        madt.extend_from_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        let apic = table(b"APIC", &madt);
        m[0x7000..0x7000 + apic.len()].copy_from_slice(&apic);
        m[0x8000..0x8000 + fadt.len()].copy_from_slice(&fadt);
        let mut entries = Vec::new();
        entries.extend_from_slice(&0x7000u32.to_le_bytes());
        entries.extend_from_slice(&0x8000u32.to_le_bytes());
        let rsdt = table(b"RSDT", &entries);
        m[0x9000..0x9000 + rsdt.len()].copy_from_slice(&rsdt);
        let mut rsdp = [0u8; 20];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[16..20].copy_from_slice(&0x9000u32.to_le_bytes());
        fix_checksum(&mut rsdp, 8);
        m[0xF_6A00..0xF_6A14].copy_from_slice(&rsdp);
        Mem(m)
    }

    #[test]
    fn finds_pm1a_control() {
        assert_eq!(pm1a_control_port(&seabios(0x604)), Some(0x604));
        assert_eq!(pm1a_control_port(&seabios(0)), None);
    }

    #[test]
    fn finds_io_apics() {
        let mut out = [0u64; 4];
        assert_eq!(io_apics(&seabios(0x604), &mut out), 1);
        assert_eq!(out[0], 0xFEC0_0000);
        assert_eq!(io_apics(&seabios(0x604), &mut []), 0);
        assert_eq!(io_apics(&Mem(vec![0u8; 1 << 20]), &mut out), 0);
        // From the loader's RSDP.
        let mut m = seabios(0x604);
        let rsdp: Vec<u8> = m.0[0xF_6A00..0xF_6A14].to_vec();
        m.0[0xF_6A00..0xF_6A14].fill(0);
        m.0[0x5_0000..0x5_0014].copy_from_slice(&rsdp);
        assert_eq!(io_apics(&m, &mut out), 0);
        assert_eq!(io_apics_at(&m, Some(0x5_0000), &mut out), 1);
    }

    #[test]
    fn takes_the_rsdp_the_loader_gives() {
        // A UEFI machine: the RSDP outside the BIOS areas.
        let mut m = seabios(0x604);
        let rsdp: Vec<u8> = m.0[0xF_6A00..0xF_6A14].to_vec();
        m.0[0xF_6A00..0xF_6A14].fill(0);
        m.0[0x5_0000..0x5_0014].copy_from_slice(&rsdp);
        assert_eq!(pm1a_control_port(&m), None);
        assert_eq!(pm1a_control_port_at(&m, Some(0x5_0000)), Some(0x604));
        // A wrong address finds nothing, and does not fall back.
        assert_eq!(pm1a_control_port_at(&m, Some(0x5_0010)), None);
        assert_eq!(pm1a_control_port_at(&m, Some(u64::MAX - 4)), None);
        assert_eq!(pm1a_control_port_at(&seabios(0x604), None), Some(0x604));
        assert!(rsdp_is_valid(&m, 0x5_0000));
        assert!(!rsdp_is_valid(&m, 0x5_0010));
    }

    #[test]
    fn rsdp_lengths_are_bounded() {
        let mut m = Mem(vec![0u8; 0x2000]);
        let mut rsdp = [0u8; 36];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[15] = 2;
        for (len, ok) in [(36u32, true), (35, false), (4097, false), (u32::MAX, false)] {
            rsdp[20..24].copy_from_slice(&len.to_le_bytes());
            fix_checksum(&mut rsdp[..20], 8);
            fix_checksum(&mut rsdp, 32);
            m.0[0x100..0x124].copy_from_slice(&rsdp);
            assert_eq!(rsdp_is_valid(&m, 0x100), ok, "length {len}");
        }
        // Past the end of memory.
        assert!(!rsdp_is_valid(&m, 0x1FF0));
    }

    #[test]
    fn refuses_bad_checksums_and_absent_tables() {
        let mut m = seabios(0x604);
        m.0[0x8000 + 40] ^= 1; // break the FADT's checksum
        assert_eq!(pm1a_control_port(&m), None);
        assert_eq!(pm1a_control_port(&Mem(vec![0u8; 1 << 20])), None);
        // Memory too small to hold the BIOS area: nothing, no panic.
        assert_eq!(pm1a_control_port(&Mem(vec![0u8; 4096])), None);
        // A huge length in the RSDT header.
        let mut m = seabios(0x604);
        m.0[0x9004..0x9008].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pm1a_control_port(&m), None);
    }

    proptest::proptest! {
        #[test]
        fn hostile_tables_never_panic(flips in proptest::collection::vec((0usize..0x10000, 0u8..=255), 0..64)) {
            let mut m = seabios(0x604);
            for (at, v) in flips {
                m.0[0x7000 + at % 0x3000] = v;
            }
            let _ = pm1a_control_port(&m);
            let _ = io_apics(&m, &mut [0u64; 4]);
        }
    }
}

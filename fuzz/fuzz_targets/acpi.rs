//! The ACPI walk (`thinvisor_boot::acpi::pm1a_control_port`) over
//! arbitrary physical memory: an RSDP in the EBDA or the BIOS area, an
//! RSDT or XSDT, a FADT and other tables, at fuzzed places with fuzzed
//! fields and (when asked) correct checksums, then raw byte writes on
//! top.
//!
//! Checked: no panic; a port found is not 0; the answer does not depend
//! on how often it is asked; and for tables the harness built without
//! raw writes on top, the answer is the model's (X_PM1a_CNT_BLK when the
//! FADT is long enough and it names a non-zero I/O port that fits 16
//! bits, else PM1a_CNT_BLK when non-zero and it fits, else none).

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use thinvisor_boot::acpi::{io_apics, pm1a_control_port};
use thinvisor_memory_fuzz::boot::Mem;

/// Memory: the first MiB and 64 KiB above it for the tables.
const MEM_LEN: usize = 0x11_0000;

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
}

/// A table header of `len` bytes with `sig` (checksum fixed later).
fn table(sig: &[u8; 4], len: usize, body: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; len.max(36)];
    t[..4].copy_from_slice(sig);
    t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    let n = body.len().min(t.len() - 36);
    t[36..36 + n].copy_from_slice(&body[..n]);
    t
}

fn fix_checksum(t: &mut [u8], at: usize) {
    if t.len() > at {
        t[at] = 0;
        t[at] = 0u8.wrapping_sub(sum(t));
    }
}

/// A place for a table above 1 MiB (or anywhere, now and then).
fn place(u: &mut Unstructured<'_>, len: usize) -> Result<u64> {
    Ok(if u.ratio(15u8, 16u8)? {
        0x10_0000 + u.int_in_range(0..=(0x1_0000 - len.min(0x1_0000)) as u64)?
    } else {
        u64::from(u.arbitrary::<u32>()?)
    })
}

fn write(mem: &mut Mem, at: u64, bytes: &[u8]) {
    if at
        .checked_add(bytes.len() as u64)
        .is_some_and(|e| e <= MEM_LEN as u64)
    {
        mem.write(at, bytes);
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut mem = Mem::new(0, MEM_LEN);
    let checksums = u.ratio(7u8, 8u8)?;

    // The FADT.
    let fadt_len = match u.int_in_range(0u8..=4)? {
        0 => 116,
        1 => 244,
        2 => 276,
        3 => u.int_in_range(36..=300)?,
        _ => u.int_in_range(0..=0x1_0000)?,
    };
    let mut fadt = table(b"FACP", fadt_len, &[]);
    fadt[4..8].copy_from_slice(&(fadt_len as u32).to_le_bytes());
    let pm1a: u32 = match u.int_in_range(0u8..=3)? {
        0 => 0,
        1 | 2 => u.int_in_range(1..=0xFFFF)?,
        _ => u.arbitrary()?,
    };
    let gas_space: u8 = if u.ratio(3u8, 4u8)? {
        1
    } else {
        u.arbitrary()?
    };
    let xport: u64 = match u.int_in_range(0u8..=3)? {
        0 => 0,
        1 | 2 => u.int_in_range(1..=0xFFFF)?,
        _ => u.arbitrary()?,
    };
    if fadt.len() >= 68 {
        fadt[64..68].copy_from_slice(&pm1a.to_le_bytes());
    }
    if fadt.len() >= 184 {
        fadt[172] = gas_space;
        fadt[176..184].copy_from_slice(&xport.to_le_bytes());
    }
    if checksums {
        fix_checksum(&mut fadt, 9);
    }
    let fadt_at = place(u, fadt.len())?;
    write(&mut mem, fadt_at, &fadt);

    // Other tables, and the RSDT/XSDT listing them with the FADT.
    let wide = u.arbitrary()?;
    let mut entries = Vec::new();
    for _ in 0..u.int_in_range(0u8..=4)? {
        let sig = *u.choose(&[*b"APIC", *b"HPET", *b"FACP", *b"SSDT"])?;
        let len = u.int_in_range(36..=100)?;
        let mut t = table(&sig, len, u.bytes(8)?);
        if checksums {
            fix_checksum(&mut t, 9);
        }
        let at = place(u, t.len())?;
        write(&mut mem, at, &t);
        entries.push(at);
    }
    let fadt_index = u.int_in_range(0..=entries.len())?;
    entries.insert(fadt_index, fadt_at);
    let mut body = Vec::new();
    for &e in &entries {
        if wide {
            body.extend_from_slice(&e.to_le_bytes());
        } else {
            body.extend_from_slice(&(e as u32).to_le_bytes());
        }
    }
    let sdt_len = 36 + body.len();
    let mut sdt = table(if wide { b"XSDT" } else { b"RSDT" }, sdt_len, &body);
    if checksums {
        fix_checksum(&mut sdt, 9);
    }
    let sdt_at = place(u, sdt.len())?;
    write(&mut mem, sdt_at, &sdt);

    // The RSDP: revision 2 with the XSDT, or 0 with the RSDT.
    let mut rsdp = vec![0u8; 36];
    rsdp[..8].copy_from_slice(b"RSD PTR ");
    rsdp[15] = if wide { 2 } else { u.int_in_range(0..=1)? };
    rsdp[16..20].copy_from_slice(&(if wide { 0 } else { sdt_at as u32 }).to_le_bytes());
    rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
    if wide {
        rsdp[24..32].copy_from_slice(&sdt_at.to_le_bytes());
    }
    if checksums {
        fix_checksum(&mut rsdp[..20], 8);
        fix_checksum(&mut rsdp, 32);
    }
    let in_ebda = u.arbitrary()?;
    let rsdp_at = if in_ebda {
        let seg: u16 = u.int_in_range(0x8000..=0x9FC0)?;
        write(&mut mem, 0x40E, &seg.to_le_bytes());
        (u64::from(seg) << 4) + 16 * u.int_in_range(0u64..=61)?
    } else {
        0xE_0000 + 16 * u.int_in_range(0u64..=0x1FFD)?
    };
    write(&mut mem, rsdp_at, &rsdp);

    // Hostile bytes on top.
    let mut raw = false;
    while !u.is_empty() {
        raw = true;
        let at = if u.arbitrary()? {
            [fadt_at, sdt_at, rsdp_at][u.int_in_range(0..=2)?] + u.int_in_range(0u64..=300)?
        } else {
            u.int_in_range(0..=MEM_LEN as u64)?
        };
        let len = u.int_in_range(0..=8)?;
        let bytes = u.bytes(len)?.to_vec();
        write(&mut mem, at, &bytes);
    }

    let got = pm1a_control_port(&mem);
    assert_ne!(got, Some(0));
    assert_eq!(pm1a_control_port(&mem), got, "a second walk disagrees");
    // The MADT walk: bounded by its output, repeatable.
    let mut first = [0u64; 4];
    let n = io_apics(&mem, &mut first);
    assert!(n <= first.len());
    let mut again = [0u64; 4];
    assert_eq!(io_apics(&mem, &mut again), n, "a second MADT walk disagrees");
    assert_eq!(first, again);
    let all_inside = [fadt_at, sdt_at, rsdp_at]
        .iter()
        .zip([fadt.len(), sdt.len(), 36])
        .all(|(&a, l)| a + l as u64 <= MEM_LEN as u64)
        && entries.iter().all(|&e| e + 36 <= MEM_LEN as u64);
    let tables_ok = checksums && all_inside && (36..=0x1_0000).contains(&fadt_len);
    if !raw && tables_ok && entries.len() <= 64 {
        // The first FACP listed wins; the harness's FADT is the only one
        // unless it placed other FACPs, or tables overlap.
        // The EBDA pointer (0x40E) is written after the tables: a table
        // over it is corrupted by it.
        let ebda_pointer = in_ebda.then_some((0x40E, 2));
        let ranges: Vec<(u64, u64)> = std::iter::once((rsdp_at, 36))
            .chain(std::iter::once((sdt_at, sdt.len() as u64)))
            .chain(std::iter::once((fadt_at, fadt.len() as u64)))
            .chain(ebda_pointer)
            .collect();
        let overlap = ranges.iter().enumerate().any(|(i, a)| {
            ranges[i + 1..]
                .iter()
                .any(|b| a.0 < b.0 + b.1 && b.0 < a.0 + a.1)
        });
        if !overlap && sdt_at != 0 && entries.len() == 1 {
            let want = if fadt_len >= 184 && gas_space == 1 && xport != 0 && xport <= 0xFFFF {
                Some(xport as u16)
            } else if fadt_len >= 68 && pm1a != 0 && pm1a <= 0xFFFF {
                Some(pm1a as u16)
            } else {
                None
            };
            assert_eq!(
                got, want,
                "fadt len {fadt_len}, pm1a {pm1a:#x}, x {gas_space} {xport:#x}"
            );
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

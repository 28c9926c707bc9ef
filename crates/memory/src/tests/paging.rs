//! `translate` in every mode: page sizes, permissions with exact error
//! codes, reserved bits, canonical checks, unreadable and looping tables.

use std::vec;

use super::{guest_ram, Counting, RAM, TABLES, TABLES_END};
use crate::pagetable::*;
use crate::paging::translate_with_maxphyaddr;
use crate::pf_error::{FETCH as I, PRESENT as PR, RESERVED as R, USER as U, WRITE as W};
use crate::*;

pub(super) fn tables(mem: &IsolatedMemory<'_>, mode: PagingMode) -> PageTables {
    PageTables::new(mem, mode, TABLES, TABLES_END).unwrap()
}

pub(super) fn tr(
    mem: &IsolatedMemory<'_>,
    regs: &PagingRegs,
    la: u64,
    access: Access,
) -> Result<Translation, TranslateError> {
    translate(mem, regs, GuestLinearAddr(la), access)
}

pub(super) fn gpa(
    mem: &IsolatedMemory<'_>,
    regs: &PagingRegs,
    la: u64,
    access: Access,
) -> Result<(u64, u64), TranslateError> {
    tr(mem, regs, la, access).map(|t| (t.gpa.0, t.page_size))
}

pub(super) fn pf<T>(la: u64, error_code: u32) -> Result<T, TranslateError> {
    Err(TranslateError::PageFault {
        la: GuestLinearAddr(la),
        error_code,
    })
}

#[test]
fn disabled_is_identity_on_32_bits() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let regs = PagingRegs::default();
    let t = tr(&mem, &regs, 0x1_2345_6789, Access::USER_WRITE).unwrap();
    assert_eq!(
        t,
        Translation {
            gpa: GuestPhysAddr(0x2345_6789),
            page_size: SIZE_4K,
            writable: true,
            user: true,
            executable: true,
        }
    );
    // Tables are not consulted, whatever CR3 says.
    let regs = PagingRegs {
        cr3: u64::MAX,
        ..regs
    };
    assert_eq!(
        gpa(&mem, &regs, 0xFFFF_FFFF, Access::FETCH),
        Ok((0xFFFF_FFFF, SIZE_4K))
    );
}

#[test]
fn bits32_4k_pages() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Bits32);
    pt.map(&mem, 0xC000_0000, 0x30_0000, SIZE_4K, RW | US)
        .unwrap();
    pt.map(&mem, 0xC000_2000, 0x7F_F000, SIZE_4K, 0).unwrap();
    let regs = pt.regs();
    let t = tr(&mem, &regs, 0xC000_0123, Access::USER_WRITE).unwrap();
    assert_eq!(
        t,
        Translation {
            gpa: GuestPhysAddr(0x30_0123),
            page_size: SIZE_4K,
            writable: true,
            user: true,
            executable: true,
        }
    );
    // Only the low 32 bits of the linear address count.
    assert_eq!(
        gpa(&mem, &regs, 0xDEAD_0000_C000_0FFF, Access::READ),
        Ok((0x30_0FFF, SIZE_4K))
    );
    let t = tr(&mem, &regs, 0xC000_2008, Access::READ).unwrap();
    assert_eq!((t.gpa.0, t.writable, t.user), (0x7F_F008, false, false));
    // The PT exists but this PTE does not.
    assert_eq!(
        gpa(&mem, &regs, 0xC000_1000, Access::READ),
        pf(0xC000_1000, 0)
    );
    // No PDE at all.
    assert_eq!(
        gpa(&mem, &regs, 0x1000, Access::USER_WRITE),
        pf(0x1000, U | W)
    );
}

#[test]
fn bits32_4m_pages_and_pse36() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Bits32);
    pt.map(&mem, 0x8000_0000, 0x40_0000, SIZE_4M, RW).unwrap();
    pt.map(&mem, 0x4000_0000, 0xAB_C040_0000, SIZE_4M, US)
        .unwrap();
    assert_eq!(
        pt.read_entry(&mem, 0x4000_0000, 2),
        Ok(0xC040_0000 | (0xAB << 13) | PS | US | P)
    );
    let regs = pt.regs();
    let t = tr(&mem, &regs, 0x8012_3456, Access::WRITE).unwrap();
    assert_eq!(
        (t.gpa.0, t.page_size, t.writable, t.user),
        (0x52_3456, SIZE_4M, true, false)
    );
    assert_eq!(
        gpa(&mem, &regs, 0x403F_FFFF, Access::USER_READ),
        Ok((0xAB_C07F_FFFF, SIZE_4M))
    );
    // Bit 21 of a 4 MiB PDE is reserved.
    pt.update_entry(&mem, 0x8000_0000, 2, |e| e | 1 << 21)
        .unwrap();
    assert_eq!(
        gpa(&mem, &regs, 0x8000_0000, Access::READ),
        pf(0x8000_0000, PR | R)
    );
    assert_eq!(
        gpa(&mem, &regs, 0x8000_0000, Access::USER_WRITE),
        pf(0x8000_0000, PR | R | U | W)
    );
    // Physical bits at or above a smaller MAXPHYADDR are reserved too.
    let narrow =
        translate_with_maxphyaddr(&mem, &regs, GuestLinearAddr(0x4000_0000), Access::READ, 36);
    assert_eq!(narrow, pf(0x4000_0000, PR | R));
}

#[test]
fn bits32_ps_ignored_without_cr4_pse() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Bits32);
    pt.map(&mem, 0xC000_0000, 0x30_0000, SIZE_4K, RW).unwrap();
    pt.update_entry(&mem, 0xC000_0000, 2, |e| e | PS).unwrap();
    let pt_addr = pt.read_entry(&mem, 0xC000_0000, 2).unwrap() & 0xFFFF_F000;
    assert_eq!(pt_addr, TABLES + SIZE_4K);
    let mut regs = pt.regs();
    regs.cr4 &= !PagingRegs::CR4_PSE;
    assert_eq!(
        gpa(&mem, &regs, 0xC000_0042, Access::READ),
        Ok((0x30_0042, SIZE_4K))
    );
    // With PSE on, the same PDE is a 4 MiB page: its bits 31:22 (0) and
    // 20:13 (0x80, from address bit 20) give physical 0x80_0000_0000.
    regs.cr4 |= PagingRegs::CR4_PSE;
    assert_eq!(
        gpa(&mem, &regs, 0xC000_0042, Access::READ),
        Ok((0x80_0000_0042, SIZE_4M))
    );
}

#[test]
fn bits32_has_no_nx() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Bits32);
    pt.map(&mem, 0x40_0000, 0x30_0000, SIZE_4K, US).unwrap();
    let mut regs = pt.regs();
    regs.efer |= PagingRegs::EFER_NXE;
    let t = tr(&mem, &regs, 0x40_0000, Access::USER_FETCH).unwrap();
    assert!(t.executable);
    // I/D is not reported for 32-bit paging, even with EFER.NXE...
    assert_eq!(gpa(&mem, &regs, 0x50_0000, Access::FETCH), pf(0x50_0000, 0));
    // ...but is with SMEP.
    regs.cr4 |= PagingRegs::CR4_SMEP;
    assert_eq!(gpa(&mem, &regs, 0x50_0000, Access::FETCH), pf(0x50_0000, I));
    // Permissions still apply.
    assert_eq!(
        gpa(&mem, &regs, 0x40_0000, Access::USER_WRITE),
        pf(0x40_0000, PR | W | U)
    );
    assert_eq!(
        gpa(&mem, &regs, 0x40_0000, Access::WRITE),
        pf(0x40_0000, PR | W)
    );
    regs.cr0 &= !PagingRegs::CR0_WP;
    assert_eq!(
        gpa(&mem, &regs, 0x40_0000, Access::WRITE),
        Ok((0x30_0000, SIZE_4K))
    );
}

#[test]
fn pae_4k_and_2m_pages() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Pae);
    pt.map(&mem, 0xC000_0000, 0x30_0000, SIZE_4K, RW | US)
        .unwrap();
    pt.map(&mem, 0x4020_0000, 0xF_FFE0_0000, SIZE_2M, RW)
        .unwrap();
    let mut regs = pt.regs();
    assert_eq!(
        tr(&mem, &regs, 0xC000_0ABC, Access::USER_WRITE),
        Ok(Translation {
            gpa: GuestPhysAddr(0x30_0ABC),
            page_size: SIZE_4K,
            writable: true,
            user: true,
            executable: true,
        })
    );
    assert_eq!(
        gpa(&mem, &regs, 0x4032_3456, Access::WRITE),
        Ok((0xF_FFF2_3456, SIZE_2M))
    );
    // Upper linear bits and CR3 bits 63:32 and 4:0 are ignored.
    regs.cr3 |= 0xFFFF_FFFF_0000_001F;
    assert_eq!(
        gpa(&mem, &regs, 0x7_C000_0ABC, Access::READ),
        Ok((0x30_0ABC, SIZE_4K))
    );
    // PDPTE 0 is not present.
    assert_eq!(gpa(&mem, &regs, 0x1000, Access::READ), pf(0x1000, 0));
}

#[test]
fn pae_pdpt_is_32_byte_aligned() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Pae);
    pt.map(&mem, 0xC000_0000, 0x30_0000, SIZE_4K, RW).unwrap();
    // Move the four PDPTEs to offset 0x60 of another page.
    let mut pdpt = [0u8; 32];
    mem.read_phys(pt.root(), &mut pdpt).unwrap();
    let moved = TABLES_END - SIZE_4K + 0x60;
    mem.write_phys(GuestPhysAddr(moved), &pdpt).unwrap();
    mem.write_phys(pt.root(), &[0; 32]).unwrap();
    let mut regs = pt.regs();
    regs.cr3 = moved | 0x18;
    assert_eq!(
        gpa(&mem, &regs, 0xC000_0010, Access::READ),
        Ok((0x30_0010, SIZE_4K))
    );
}

#[test]
fn pae_nx_and_reserved_bits() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Pae);
    let la = 0xC000_0000;
    pt.map(&mem, la, 0x30_0000, SIZE_4K, RW | US | NX).unwrap();
    let mut regs = pt.regs();
    let t = tr(&mem, &regs, la, Access::USER_READ).unwrap();
    assert!(!t.executable && t.writable && t.user);
    assert_eq!(gpa(&mem, &regs, la, Access::FETCH), pf(la, PR | I));
    assert_eq!(gpa(&mem, &regs, la, Access::USER_FETCH), pf(la, PR | I | U));
    // A not-present fetch reports I/D with NXE.
    assert_eq!(
        gpa(&mem, &regs, 0xC000_1000, Access::FETCH),
        pf(0xC000_1000, I)
    );
    // Without NXE bit 63 is reserved, and I/D is not reported.
    regs.efer &= !PagingRegs::EFER_NXE;
    assert_eq!(gpa(&mem, &regs, la, Access::READ), pf(la, PR | R));
    assert_eq!(gpa(&mem, &regs, la, Access::FETCH), pf(la, PR | R));
    regs.efer |= PagingRegs::EFER_NXE;

    // PAE: bits 62:MAXPHYADDR are reserved in PDEs and PTEs.
    pt.update_entry(&mem, la, 1, |e| e & !NX | 1 << 52).unwrap();
    assert_eq!(gpa(&mem, &regs, la, Access::READ), pf(la, PR | R));
    pt.update_entry(&mem, la, 1, |e| e & !(1 << 52) | 1 << 62)
        .unwrap();
    assert_eq!(gpa(&mem, &regs, la, Access::WRITE), pf(la, PR | R | W));
    pt.update_entry(&mem, la, 1, |e| e & !(1 << 62)).unwrap();
    assert_eq!(
        gpa(&mem, &regs, la, Access::FETCH),
        Ok((0x30_0000, SIZE_4K))
    );
    // PDPTE: bits 2:1 and 63:M are reserved (no R/W, U/S, NX there); 8:5
    // are Intel-reserved but AMD's A bit, which QEMU sets: not checked.
    for bit in [1, 2, 52, 63] {
        pt.update_entry(&mem, la, 3, |e| e | 1 << bit).unwrap();
        assert_eq!(
            gpa(&mem, &regs, la, Access::READ),
            pf(la, PR | R),
            "bit {bit}"
        );
        pt.update_entry(&mem, la, 3, |e| e & !(1 << bit)).unwrap();
    }
    // PWT/PCD, bits 8:5 and the ignored bits 11:9 are fine.
    pt.update_entry(&mem, la, 3, |e| e | 0xFF8).unwrap();
    assert_eq!(gpa(&mem, &regs, la, Access::READ), Ok((0x30_0000, SIZE_4K)));
    // A not-present PDPTE.
    pt.update_entry(&mem, la, 3, |e| e & !P).unwrap();
    assert_eq!(gpa(&mem, &regs, la, Access::USER_WRITE), pf(la, U | W));
}

#[test]
fn pae_2m_reserved_and_pat_bits() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Pae);
    let la = 0x8000_0000;
    pt.map(&mem, la, 0x40_0000, SIZE_2M, RW).unwrap();
    let regs = pt.regs();
    // Bit 12 is PAT, not an address bit.
    pt.update_entry(&mem, la, 2, |e| e | 1 << 12).unwrap();
    assert_eq!(
        gpa(&mem, &regs, la + 5, Access::READ),
        Ok((0x40_0005, SIZE_2M))
    );
    for bit in [13, 20] {
        pt.update_entry(&mem, la, 2, |e| e | 1 << bit).unwrap();
        assert_eq!(
            gpa(&mem, &regs, la, Access::READ),
            pf(la, PR | R),
            "bit {bit}"
        );
        pt.update_entry(&mem, la, 2, |e| e & !(1 << bit)).unwrap();
    }
}

#[test]
fn level4_page_sizes() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Level4);
    pt.map(&mem, 0xFFFF_8000_0000_1000, 0x30_0000, SIZE_4K, RW)
        .unwrap();
    pt.map(&mem, 0x0000_7F00_0020_0000, 0x40_0000, SIZE_2M, US)
        .unwrap();
    pt.map(
        &mem,
        0xFFFF_FFFF_C000_0000,
        0xF_FFFF_C000_0000,
        SIZE_1G,
        RW | US,
    )
    .unwrap();
    let regs = pt.regs();
    assert_eq!(
        tr(&mem, &regs, 0xFFFF_8000_0000_1FFF, Access::WRITE),
        Ok(Translation {
            gpa: GuestPhysAddr(0x30_0FFF),
            page_size: SIZE_4K,
            writable: true,
            user: false,
            executable: true,
        })
    );
    assert_eq!(
        gpa(&mem, &regs, 0x0000_7F00_003F_FFFF, Access::USER_FETCH),
        Ok((0x5F_FFFF, SIZE_2M))
    );
    assert_eq!(
        gpa(&mem, &regs, 0xFFFF_FFFF_DEAD_BEEF, Access::USER_WRITE),
        Ok((0xF_FFFF_DEAD_BEEF, SIZE_1G))
    );
    // Bits 62:52 are ignored (software/protection-key bits), not reserved.
    pt.update_entry(&mem, 0xFFFF_8000_0000_1000, 1, |e| {
        e | 0x7FF0_0000_0000_0000
    })
    .unwrap();
    assert_eq!(
        gpa(&mem, &regs, 0xFFFF_8000_0000_1000, Access::READ),
        Ok((0x30_0000, SIZE_4K))
    );
    // PAT (bit 12) in large pages is not an address bit.
    pt.update_entry(&mem, 0xFFFF_FFFF_C000_0000, 3, |e| e | 1 << 12)
        .unwrap();
    assert_eq!(
        gpa(&mem, &regs, 0xFFFF_FFFF_C000_0000, Access::READ),
        Ok((0xF_FFFF_C000_0000, SIZE_1G))
    );
    // CR3's flag bits and bit 63 (PCID no-flush) do not move the root.
    let noisy = PagingRegs {
        cr3: regs.cr3 | 1 << 63 | 0x18,
        ..regs
    };
    assert_eq!(
        gpa(&mem, &noisy, 0xFFFF_8000_0000_1000, Access::READ),
        Ok((0x30_0000, SIZE_4K))
    );
}

#[test]
fn level4_reserved_bits() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Level4);
    let (la4k, la2m, la1g) = (0x1000, 0x4000_0000, 0x80_0000_0000);
    pt.map(&mem, la4k, 0x30_0000, SIZE_4K, RW).unwrap();
    pt.map(&mem, la2m, 0x40_0000, SIZE_2M, RW).unwrap();
    pt.map(&mem, la1g, 0x4000_0000, SIZE_1G, RW).unwrap();
    let mut regs = pt.regs();
    let rsvd = |mem: &IsolatedMemory<'_>, regs: &PagingRegs, la| {
        gpa(mem, regs, la, Access::READ) == pf(la, PR | R)
    };
    // PS in a PML4E.
    pt.update_entry(&mem, la4k, 4, |e| e | PS).unwrap();
    assert!(rsvd(&mem, &regs, la4k));
    pt.update_entry(&mem, la4k, 4, |e| e & !PS).unwrap();
    // Bits 20:13 of a 2 MiB PDE, 29:13 of a 1 GiB PDPTE.
    for bit in [13, 20] {
        pt.update_entry(&mem, la2m, 2, |e| e | 1 << bit).unwrap();
        assert!(rsvd(&mem, &regs, la2m), "2M bit {bit}");
        pt.update_entry(&mem, la2m, 2, |e| e & !(1 << bit)).unwrap();
    }
    for bit in [13, 21, 29] {
        pt.update_entry(&mem, la1g, 3, |e| e | 1 << bit).unwrap();
        assert!(rsvd(&mem, &regs, la1g), "1G bit {bit}");
        pt.update_entry(&mem, la1g, 3, |e| e & !(1 << bit)).unwrap();
    }
    // The same bits are address bits in a non-leaf PDE.
    assert!(gpa(&mem, &regs, la4k, Access::READ).is_ok());
    // NX without EFER.NXE, at any level.
    regs.efer &= !PagingRegs::EFER_NXE;
    for level in 1..=4 {
        pt.update_entry(&mem, la4k, level, |e| e | NX).unwrap();
        assert!(rsvd(&mem, &regs, la4k), "level {level}");
        pt.update_entry(&mem, la4k, level, |e| e & !NX).unwrap();
    }
    // Physical-address bits at or above MAXPHYADDR (52 here, so try 40).
    pt.update_entry(&mem, la4k, 1, |e| e | 1 << 45).unwrap();
    assert_eq!(
        gpa(&mem, &regs, la4k, Access::READ),
        Ok((0x30_0000 | 1 << 45, SIZE_4K))
    );
    let narrow = |mem: &IsolatedMemory<'_>| {
        translate_with_maxphyaddr(mem, &regs, GuestLinearAddr(la4k), Access::USER_READ, 40)
    };
    assert_eq!(narrow(&mem), pf(la4k, PR | R | U));
    pt.update_entry(&mem, la4k, 1, |e| e & !(1 << 45)).unwrap();
    assert_eq!(narrow(&mem), pf(la4k, PR | U)); // back to a plain U/S violation
    pt.update_entry(&mem, la4k, 3, |e| e | 1 << 40).unwrap();
    assert_eq!(narrow(&mem), pf(la4k, PR | R | U));
}

#[test]
fn level5_page_sizes_and_canonical() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Level5);
    pt.map(&mem, 0xFF00_0000_0000_1000, 0x30_0000, SIZE_4K, RW | US)
        .unwrap();
    pt.map(&mem, 0x00FF_FFFF_FFE0_0000, 0x60_0000, SIZE_2M, RW)
        .unwrap();
    pt.map(&mem, 0x0001_0000_4000_0000, 0x8000_0000, SIZE_1G, 0)
        .unwrap();
    let regs = pt.regs();
    assert_eq!(
        gpa(&mem, &regs, 0xFF00_0000_0000_1234, Access::USER_WRITE),
        Ok((0x30_0234, SIZE_4K))
    );
    assert_eq!(
        gpa(&mem, &regs, 0x00FF_FFFF_FFFF_FFFF, Access::WRITE),
        Ok((0x7F_FFFF, SIZE_2M))
    );
    let t = tr(&mem, &regs, 0x0001_0000_4000_0008, Access::READ).unwrap();
    assert_eq!(
        (t.gpa.0, t.page_size, t.writable, t.user),
        (0x8000_0008, SIZE_1G, false, false)
    );
    // 48-bit-non-canonical is canonical with LA57, and just not mapped.
    assert_eq!(
        gpa(&mem, &regs, 0x0000_8000_0000_0000, Access::READ),
        pf(0x0000_8000_0000_0000, 0)
    );
    for la in [
        0x0100_0000_0000_0000,
        0xFE00_0000_0000_0000,
        0x8000_0000_0000_0000,
    ] {
        assert_eq!(
            gpa(&mem, &regs, la, Access::READ),
            Err(TranslateError::NonCanonical {
                la: GuestLinearAddr(la)
            })
        );
    }
    // PS is reserved in a PML5E.
    pt.update_entry(&mem, 0xFF00_0000_0000_1000, 5, |e| e | PS)
        .unwrap();
    assert_eq!(
        gpa(&mem, &regs, 0xFF00_0000_0000_1000, Access::READ),
        pf(0xFF00_0000_0000_1000, PR | R)
    );
}

#[test]
fn level4_canonical() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let pt = tables(&mem, PagingMode::Level4);
    let regs = pt.regs();
    for la in [
        0x0000_8000_0000_0000,
        0xFFFF_7FFF_FFFF_FFFF,
        0x8000_0000_0000_0000,
        0x0001_0000_0000_0000,
    ] {
        assert_eq!(
            gpa(&mem, &regs, la, Access::READ),
            Err(TranslateError::NonCanonical {
                la: GuestLinearAddr(la)
            })
        );
    }
    for la in [0x0000_7FFF_FFFF_FFFF, 0xFFFF_8000_0000_0000, u64::MAX, 0] {
        assert_eq!(gpa(&mem, &regs, la, Access::READ), pf(la, 0));
    }
}

/// Builds a 4-level mapping of one page whose entries carry `flags[0]`
/// (PML4E) .. `flags[3]` (PTE), and returns the outcome of `access`.
fn outcome(flags: [u64; 4], wp: bool, nxe: bool, access: Access) -> Result<(), u32> {
    let la = 0x7000_1000;
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Level4);
    pt.map(&mem, la, 0x30_0000, SIZE_4K, 0).unwrap();
    // Bottom up, so the path to each entry is intact when it is changed.
    for (i, f) in flags.iter().enumerate().rev() {
        let level = 4 - i as u32;
        pt.update_entry(&mem, la, level, |e| e & 0x000F_FFFF_FFFF_F000 | f)
            .unwrap();
    }
    let mut regs = pt.regs();
    if !wp {
        regs.cr0 &= !PagingRegs::CR0_WP;
    }
    if !nxe {
        regs.efer &= !PagingRegs::EFER_NXE;
    }
    match tr(&mem, &regs, la, access) {
        Ok(t) => {
            assert_eq!(t.gpa, GuestPhysAddr(0x30_0000));
            Ok(())
        }
        Err(TranslateError::PageFault { la: at, error_code }) => {
            assert_eq!(at.0, la);
            Err(error_code)
        }
        Err(e) => panic!("unexpected {e:?}"),
    }
}

#[test]
fn permissions_with_exact_error_codes() {
    let all = P | RW | US;
    assert_eq!(outcome([all; 4], true, true, Access::USER_WRITE), Ok(()));
    assert_eq!(outcome([all; 4], true, true, Access::USER_FETCH), Ok(()));
    for level in 0..4 {
        // U/S clear at one level: user accesses fail, supervisor ones pass.
        let mut f = [all; 4];
        f[level] = P | RW;
        assert_eq!(outcome(f, true, true, Access::USER_READ), Err(PR | U));
        assert_eq!(outcome(f, true, true, Access::USER_WRITE), Err(PR | U | W));
        assert_eq!(outcome(f, true, true, Access::USER_FETCH), Err(PR | U | I));
        assert_eq!(outcome(f, true, true, Access::WRITE), Ok(()));

        // R/W clear at one level: user writes always fail, supervisor
        // writes only with CR0.WP.
        let mut f = [all; 4];
        f[level] = P | US;
        assert_eq!(outcome(f, true, true, Access::USER_READ), Ok(()));
        assert_eq!(outcome(f, true, true, Access::USER_WRITE), Err(PR | U | W));
        assert_eq!(outcome(f, false, true, Access::USER_WRITE), Err(PR | U | W));
        assert_eq!(outcome(f, true, true, Access::WRITE), Err(PR | W));
        assert_eq!(outcome(f, false, true, Access::WRITE), Ok(()));

        // NX at one level: fetches fail with NXE; without NXE the bit is
        // reserved.
        let mut f = [all; 4];
        f[level] = all | NX;
        assert_eq!(outcome(f, true, true, Access::FETCH), Err(PR | I));
        assert_eq!(outcome(f, true, true, Access::USER_FETCH), Err(PR | U | I));
        assert_eq!(outcome(f, true, true, Access::USER_WRITE), Ok(()));
        assert_eq!(outcome(f, true, false, Access::READ), Err(PR | R));
        assert_eq!(outcome(f, true, false, Access::FETCH), Err(PR | R));

        // Not present at one level.
        let mut f = [all; 4];
        f[level] = RW | US;
        assert_eq!(outcome(f, true, true, Access::READ), Err(0));
        assert_eq!(outcome(f, true, true, Access::USER_WRITE), Err(U | W));
        assert_eq!(outcome(f, true, true, Access::FETCH), Err(I));
        assert_eq!(outcome(f, true, false, Access::FETCH), Err(0));
    }
    // A supervisor write to a user page is fine when R/W is set.
    assert_eq!(outcome([all; 4], true, true, Access::WRITE), Ok(()));
    // Not-present wins over rights the walk never finished collecting.
    assert_eq!(
        outcome([P | RW, all, all, RW | US], true, true, Access::USER_READ),
        Err(U)
    );
    // Reserved bits win over rights, and are reported with the access bits.
    assert_eq!(
        outcome(
            [P | RW, all, all, all | NX],
            true,
            false,
            Access::USER_WRITE
        ),
        Err(PR | R | U | W)
    );
    // A reserved bit above a not-present entry is found first.
    assert_eq!(
        outcome([all | NX, all, RW, all], true, false, Access::READ),
        Err(PR | R)
    );
    // SMEP makes I/D reported even without NXE.
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let pt = tables(&mem, PagingMode::Level4);
    let mut regs = pt.regs();
    regs.efer &= !PagingRegs::EFER_NXE;
    regs.cr4 |= PagingRegs::CR4_SMEP;
    assert_eq!(gpa(&mem, &regs, 0, Access::USER_FETCH), pf(0, U | I));
}

#[test]
fn tables_outside_guest_ram() {
    let unreadable = |la: u64, table_gpa: u64| {
        Err(TranslateError::TableUnreadable {
            la: GuestLinearAddr(la),
            table_gpa: GuestPhysAddr(table_gpa),
        })
    };
    let ram_end = RAM as u64;
    for mode in [
        PagingMode::Bits32,
        PagingMode::Pae,
        PagingMode::Level4,
        PagingMode::Level5,
    ] {
        let mut ram = guest_ram();
        let mem = IsolatedMemory::new(&mut ram);
        let mut pt = tables(&mem, mode);
        let la = 0x40_0000;
        pt.map(&mem, la, 0x30_0000, SIZE_4K, RW).unwrap();
        let mut regs = pt.regs();
        // CR3 beyond RAM. PAE reads PDPTE 0, the others index 0 / 1.
        regs.cr3 = ram_end;
        let first = if mode == PagingMode::Bits32 { 4 } else { 0 };
        assert_eq!(
            gpa(&mem, &regs, la, Access::READ),
            unreadable(la, ram_end + first),
            "{mode:?}"
        );
        // The page table beyond RAM.
        regs.cr3 = pt.root().0;
        pt.update_entry(&mem, la, 2, |e| e & 0xFFF | 0xC000_0000)
            .unwrap();
        // PTE index 0 in every mode.
        assert_eq!(
            gpa(&mem, &regs, la, Access::READ),
            unreadable(la, 0xC000_0000),
            "{mode:?}"
        );
    }
    // An entry straddling the end of RAM is unreadable too.
    let mut small = vec![0u8; 0x2004];
    let mem = IsolatedMemory::new(&mut small);
    let regs = PagingRegs {
        cr0: PagingRegs::CR0_PG,
        cr3: 0x1000,
        cr4: PagingRegs::CR4_PAE,
        efer: PagingRegs::EFER_LMA,
    };
    // PML4 index 0 -> entry at 0x1000 is readable (zero = not present).
    assert_eq!(gpa(&mem, &regs, 0, Access::READ), pf(0, 0));
    let regs = PagingRegs {
        cr3: 0x2000,
        ..regs
    };
    assert_eq!(gpa(&mem, &regs, 0, Access::READ), unreadable(0, 0x2000));
}

#[test]
fn self_referencing_tables_terminate() {
    // 4-level: PML4[0] points at the PML4 itself, at every level.
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let pt = tables(&mem, PagingMode::Level4);
    let root = pt.root().0;
    mem.write_u64_phys(pt.root(), root | P | RW | US).unwrap();
    // The recursive slot 511 as well.
    mem.write_u64_phys(GuestPhysAddr(root + 511 * 8), root | P | RW)
        .unwrap();
    let regs = pt.regs();
    assert_eq!(
        gpa(&mem, &regs, 0xABC, Access::USER_WRITE),
        Ok((root + 0xABC, SIZE_4K))
    );
    assert_eq!(
        gpa(&mem, &regs, 0xFFFF_FFFF_FFFF_F008, Access::WRITE),
        Ok((root + 8, SIZE_4K))
    );
    // Through slot 0 three times, then slot 511 as the PTE: its rights
    // (no U/S) apply.
    assert_eq!(
        gpa(&mem, &regs, 0x1FF008, Access::READ),
        Ok((root + 8, SIZE_4K))
    );
    assert_eq!(
        gpa(&mem, &regs, 0x1FF008, Access::USER_READ),
        pf(0x1FF008, PR | U)
    );
    // Each walk reads exactly one entry per level.
    let counting = Counting {
        inner: &mem,
        reads: Default::default(),
    };
    translate(&counting, &regs, GuestLinearAddr(0), Access::READ).unwrap();
    assert_eq!(counting.reads.get(), 4);
    // A self-reference with PS where PS is reserved stops at once.
    mem.write_u64_phys(pt.root(), root | P | PS).unwrap();
    assert_eq!(gpa(&mem, &regs, 0, Access::READ), pf(0, PR | R));

    // 5-level, fully self-referencing.
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let pt = tables(&mem, PagingMode::Level5);
    let root = pt.root().0;
    mem.write_u64_phys(pt.root(), root | P).unwrap();
    let counting = Counting {
        inner: &mem,
        reads: Default::default(),
    };
    assert_eq!(
        translate(&counting, &pt.regs(), GuestLinearAddr(0x10), Access::READ).map(|t| t.gpa.0),
        Ok(root + 0x10)
    );
    assert_eq!(counting.reads.get(), 5);

    // 32-bit: PD[0] points at the PD.
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let pt = tables(&mem, PagingMode::Bits32);
    let root = pt.root().0;
    mem.write_u32_phys(pt.root(), root as u32 | 1).unwrap();
    assert_eq!(
        gpa(&mem, &pt.regs(), 0x7, Access::READ),
        Ok((root + 7, SIZE_4K))
    );

    // PAE: the PDPT page is also the PD and the PT.
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let pt = tables(&mem, PagingMode::Pae);
    let root = pt.root().0;
    mem.write_u64_phys(pt.root(), root | P).unwrap();
    assert_eq!(
        gpa(&mem, &pt.regs(), 0x7, Access::READ),
        Ok((root + 7, SIZE_4K))
    );
}

/// Tables in RAM outside the layout's clear range (the longest piece of
/// RAM without holes): the inline walk meets an entry it does not read,
/// and the walk through the layout must give the same answers as with no
/// hole at all; a table in the hole stays unreadable.
#[test]
fn tables_outside_the_clear_range() {
    let la = 0x7F00_1234_5678;
    let mut plain = guest_ram();
    let mut holed = guest_ram();
    // The hole leaves 0..3 MiB (the tables) and 3 MiB + 4 KiB..8 MiB (the
    // longer piece: the clear range).
    #[allow(clippy::single_range_in_vec_init)] // a list of one range
    let holes = [0x30_0000..0x30_1000];
    let mut regs = PagingRegs::default();
    for ram in [&mut plain, &mut holed] {
        let mem = IsolatedMemory::new(ram);
        let mut pt = tables(&mem, PagingMode::Level4);
        pt.map(&mem, la & !0xFFF, 0x40_0000, SIZE_4K, RW | US)
            .unwrap();
        pt.map(&mem, 0x1000, 0x30_0000, SIZE_4K, RW).unwrap();
        regs = pt.regs();
    }
    let plain_mem = IsolatedMemory::new(&mut plain);
    let holed_mem = IsolatedMemory::with_holes(&mut holed, &holes);
    for access in [Access::READ, Access::USER_WRITE, Access::FETCH] {
        for a in [la, la + 0x800, 0x1000, 0x1FFF] {
            assert_eq!(
                translate(&holed_mem, &regs, GuestLinearAddr(a), access),
                translate(&plain_mem, &regs, GuestLinearAddr(a), access),
                "{a:#x} {access:?}"
            );
        }
    }
    let mut buf = [0u8; 16];
    assert_eq!(
        read_linear(
            &holed_mem,
            &regs,
            GuestLinearAddr(la),
            &mut buf,
            Access::READ
        ),
        Ok(())
    );
    // The data page in the hole is unreadable, though it translates.
    assert_eq!(
        read_linear(
            &holed_mem,
            &regs,
            GuestLinearAddr(0x1000),
            &mut buf,
            Access::READ
        ),
        Err(TranslateError::PhysUnreadable {
            gpa: GuestPhysAddr(0x30_0000)
        })
    );
}

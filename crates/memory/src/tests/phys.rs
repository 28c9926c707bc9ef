//! `map` / `map_mut` and forbidden ranges ("holes") of `SliceMemory`, and
//! how the walk and the copies see a hole.

use core::ops::Range;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::guest_ram;
use super::paging::tables;
use crate::pagetable::*;
use crate::*;

fn err<T>(gpa: u64) -> Result<T, PhysAccessError> {
    Err(PhysAccessError {
        gpa: GuestPhysAddr(gpa),
    })
}

#[test]
fn map_and_unmap() {
    let mut ram: Vec<u8> = (0..32).collect();
    let mut mem = SliceMemory::new(&mut ram);
    assert_eq!(mem.map(GuestPhysAddr(4), 3), Ok(&[4u8, 5, 6][..]));
    assert_eq!(mem.map(GuestPhysAddr(31), 1), Ok(&[31u8][..]));
    assert_eq!(mem.map(GuestPhysAddr(30), 3), err(32));
    assert_eq!(mem.map(GuestPhysAddr(32), 1), err(32));
    assert_eq!(mem.map(GuestPhysAddr(u64::MAX), 2), err(u64::MAX));
    assert_eq!(mem.map(GuestPhysAddr(1), usize::MAX), err(32));
    // Nothing touched, nothing can fail.
    assert_eq!(mem.map(GuestPhysAddr(u64::MAX), 0), Ok(&[][..]));
    {
        let view = mem.map_mut(GuestPhysAddr(8), 4).unwrap();
        view.copy_from_slice(&[0xAA; 4]);
        // The view ends here: that is the unmap.
    }
    assert_eq!(mem.read_u32_phys(GuestPhysAddr(8)), Ok(0xAAAA_AAAA));
    assert_eq!(mem.map_mut(GuestPhysAddr(29), 4).map(|v| v.len()), err(32));
}

#[test]
fn holes_are_unreachable() {
    let mut ram = vec![7u8; 64];
    // One hole in the middle, one empty, one reversed, one beyond RAM.
    #[allow(clippy::reversed_empty_ranges)]
    let holes = [16..24, 40..40, 50..45, 100..200];
    let mut mem = SliceMemory::with_holes(&mut ram, &holes);
    assert_eq!(mem.holes().len(), 4);
    let mut buf = [0u8; 8];
    assert_eq!(mem.read_phys(GuestPhysAddr(8), &mut buf), Ok(()));
    assert_eq!(mem.read_phys(GuestPhysAddr(9), &mut buf), err(16));
    assert_eq!(mem.read_phys(GuestPhysAddr(16), &mut buf), err(16));
    assert_eq!(mem.read_phys(GuestPhysAddr(20), &mut buf), err(20));
    assert_eq!(mem.read_phys(GuestPhysAddr(23), &mut buf), err(23));
    assert_eq!(mem.read_phys(GuestPhysAddr(24), &mut buf), Ok(()));
    // Empty and reversed ranges forbid nothing.
    assert_eq!(mem.read_phys(GuestPhysAddr(38), &mut buf), Ok(()));
    assert_eq!(mem.read_phys(GuestPhysAddr(44), &mut buf), Ok(()));
    // Crossing a hole and the end of RAM: the hole comes first.
    assert_eq!(mem.map(GuestPhysAddr(10), 100).map(|s| s.len()), err(16));
    assert_eq!(mem.map(GuestPhysAddr(60), 8).map(|s| s.len()), err(64));
    // A failed write changes nothing.
    assert_eq!(mem.write_phys(GuestPhysAddr(12), &[1; 8]), err(16));
    assert_eq!(mem.map_mut(GuestPhysAddr(17), 1).map(|s| s.len()), err(17));
    assert!(mem.as_slice().iter().all(|&b| b == 7));
    // The VMM's own view still covers the hole.
    assert_eq!(mem.as_slice().len(), 64);
    assert_eq!(mem.len(), 64);
}

#[test]
fn walks_and_copies_stop_at_holes() {
    let mut ram = guest_ram();
    let (regs, pte) = {
        let mut mem = SliceMemory::new(&mut ram);
        let mut pt = tables(&mut mem, PagingMode::Level4);
        pt.map(&mut mem, 0x1000, 0x50_0000, SIZE_4K, RW).unwrap();
        pt.map(&mut mem, 0x2000, 0x60_0000, SIZE_4K, RW).unwrap();
        pt.map(&mut mem, 0x40_0000, 0x70_0000, SIZE_4K, RW).unwrap();
        mem.write_phys(GuestPhysAddr(0x50_0FFC), b"ab\0x").unwrap();
        mem.write_phys(GuestPhysAddr(0x60_0000), b"cd").unwrap();
        let pte = pt.entry_gpa(&mem, 0x40_0000, 1).unwrap();
        (pt.regs(), pte.0)
    };
    // The second data page, and the page table for 0x40_0000.
    let holes = [0x60_0000..0x60_1000, pte..pte + 8];
    let mut mem = SliceMemory::with_holes(&mut ram, &holes);
    let la = GuestLinearAddr;

    let mut buf = [0u8; 8];
    assert_eq!(
        read_linear(&mem, &regs, la(0x1FFC), &mut buf, Access::READ),
        Err(TranslateError::PhysUnreadable {
            gpa: GuestPhysAddr(0x60_0000)
        })
    );
    assert_eq!(
        write_linear(&mut mem, &regs, la(0x1FFC), &buf, Access::WRITE),
        Err(TranslateError::PhysUnreadable {
            gpa: GuestPhysAddr(0x60_0000)
        })
    );
    assert_eq!(&mem.as_slice()[0x60_0000..0x60_0002], b"cd");
    assert_eq!(
        translate(&mem, &regs, la(0x40_0000), Access::READ),
        Err(TranslateError::TableUnreadable {
            la: la(0x40_0000),
            table_gpa: GuestPhysAddr(pte),
        })
    );
    // The name ends before the hole, so it is readable.
    let mut name = [0u8; 16];
    assert_eq!(read_cstr(&mem, &regs, la(0x1FFC), &mut name), Ok(2));
}

/// Model: byte `b` is reachable when it is in RAM and in no hole.
fn reachable(ram_len: u64, holes: &[Range<u64>], b: u64) -> bool {
    b < ram_len && !holes.iter().any(|h| h.contains(&b))
}

proptest! {
    #[test]
    fn holes_match_a_byte_model(
        holes in prop::collection::vec((0u64..300, 0u64..40), 0..4),
        accesses in prop::collection::vec((0u64..300, 0usize..64), 32),
    ) {
        const LEN: u64 = 256;
        let holes: Vec<Range<u64>> = holes.iter().map(|&(s, l)| s..s + l).collect();
        let mut ram: Vec<u8> = (0..LEN).map(|b| b as u8).collect();
        let mut mem = SliceMemory::with_holes(&mut ram, &holes);
        for &(gpa, len) in &accesses {
            let first_bad = (gpa..gpa + len as u64).find(|&b| !reachable(LEN, &holes, b));
            let got = mem.map(GuestPhysAddr(gpa), len).map(<[u8]>::to_vec);
            match first_bad {
                Some(b) => prop_assert_eq!(got, err(b)),
                None => {
                    let want: Vec<u8> = (gpa..gpa + len as u64).map(|b| b as u8).collect();
                    prop_assert_eq!(got, Ok(want));
                }
            }
            let got = mem.map_mut(GuestPhysAddr(gpa), len).map(|s| s.len());
            prop_assert_eq!(got, first_bad.map_or(Ok(len), err));
        }
    }
}

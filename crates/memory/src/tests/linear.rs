//! `read_linear` / `write_linear`: page crossings, wrap-around, the
//! canonical hole, unbacked memory, once-per-page translation.

use std::vec;

use super::paging::{pf, tables};
use super::{guest_ram, Counting, Windows, RAM};
use crate::pagetable::*;
use crate::pf_error::{PRESENT as PR, USER as U, WRITE as W};
use crate::*;

fn read<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: u64,
    len: usize,
) -> Result<std::vec::Vec<u8>, TranslateError> {
    let mut buf = vec![0u8; len];
    read_linear(mem, regs, GuestLinearAddr(la), &mut buf, Access::READ)?;
    Ok(buf)
}

#[test]
fn crosses_into_a_non_adjacent_page() {
    for (mode, la) in [
        (PagingMode::Bits32, 0xC000_0FFE),
        (PagingMode::Pae, 0xC000_0FFE),
        (PagingMode::Level4, 0xFFFF_8000_0000_0FFE),
        (PagingMode::Level5, 0xFF80_0000_0000_0FFE),
    ] {
        let mut ram = guest_ram();
        let mem = IsolatedMemory::new(&mut ram);
        let mut pt = tables(&mem, mode);
        let page = la & !0xFFF;
        // The second linear page lies *below* the first physically.
        pt.map(&mem, page, 0x50_0000, SIZE_4K, RW).unwrap();
        pt.map(&mem, page + SIZE_4K, 0x30_7000, SIZE_4K, RW)
            .unwrap();
        mem.write_phys(GuestPhysAddr(0x50_0FFE), &[1, 2]).unwrap();
        mem.write_phys(GuestPhysAddr(0x30_7000), &[3, 4, 5])
            .unwrap();
        mem.write_phys(GuestPhysAddr(0x50_1000), &[0xEE; 3])
            .unwrap();
        let regs = pt.regs();
        assert_eq!(
            read(&mem, &regs, la, 5),
            Ok(vec![1, 2, 3, 4, 5]),
            "{mode:?}"
        );

        write_linear(
            &mem,
            &regs,
            GuestLinearAddr(la),
            &[9, 8, 7, 6],
            Access::WRITE,
        )
        .unwrap();
        assert_eq!(&mem.snapshot()[0x50_0FFE..0x50_1000], &[9, 8]);
        assert_eq!(&mem.snapshot()[0x30_7000..0x30_7003], &[7, 6, 5]);
        assert_eq!(&mem.snapshot()[0x50_1000..0x50_1002], &[0xEE, 0xEE]);
    }
}

#[test]
fn translates_once_per_page() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Level4);
    pt.map_range(&mem, 0x10_0000_0000, 0x40_0000, 4 * SIZE_4K, RW)
        .unwrap();
    pt.map(&mem, 0x20_0000_0000, 0x60_0000, SIZE_2M, RW)
        .unwrap();
    let regs = pt.regs();
    let counting = Counting {
        inner: &mem,
        reads: Default::default(),
    };
    // 0x10_0000_0800 + 0x2000 bytes touches 3 pages: 3 walks of 4 entries
    // plus 3 data reads.
    let mut buf = vec![0u8; 0x2000];
    read_linear(
        &counting,
        &regs,
        GuestLinearAddr(0x10_0000_0800),
        &mut buf,
        Access::READ,
    )
    .unwrap();
    assert_eq!(counting.reads.get(), 3 * 4 + 3);
    // Inside one 2 MiB page: one walk of 3 entries, one data read.
    counting.reads.set(0);
    let mut buf = vec![0u8; 0x10000];
    read_linear(
        &counting,
        &regs,
        GuestLinearAddr(0x20_0000_0800),
        &mut buf,
        Access::READ,
    )
    .unwrap();
    assert_eq!(counting.reads.get(), 3 + 1);
    // Nothing to copy, nothing to read (even at a non-canonical address).
    counting.reads.set(0);
    read_linear(
        &counting,
        &regs,
        GuestLinearAddr(1 << 63),
        &mut [],
        Access::READ,
    )
    .unwrap();
    assert_eq!(counting.reads.get(), 0);
}

#[test]
fn wraps_at_4_gib_outside_long_mode() {
    for mode in [PagingMode::Bits32, PagingMode::Pae] {
        let mut ram = guest_ram();
        let mem = IsolatedMemory::new(&mut ram);
        let mut pt = tables(&mem, mode);
        pt.map(&mem, 0xFFFF_F000, 0x50_0000, SIZE_4K, RW).unwrap();
        pt.map(&mem, 0, 0x60_0000, SIZE_4K, RW).unwrap();
        mem.write_phys(GuestPhysAddr(0x50_0FFD), &[1, 2, 3])
            .unwrap();
        mem.write_phys(GuestPhysAddr(0x60_0000), &[4, 5]).unwrap();
        let regs = pt.regs();
        assert_eq!(
            read(&mem, &regs, 0xFFFF_FFFD, 5),
            Ok(vec![1, 2, 3, 4, 5]),
            "{mode:?}"
        );
        // Upper bits of the starting address are dropped too.
        assert_eq!(
            read(&mem, &regs, 0x7_FFFF_FFFD, 5),
            Ok(vec![1, 2, 3, 4, 5]),
            "{mode:?}"
        );
        // A failure after the wrap names the wrapped address.
        assert_eq!(read(&mem, &regs, 0xFFFF_FFFF, 0x1002), pf(0x1000, 0));
    }
    // Paging off: physical = linear mod 4 GiB.
    let mem = Windows::new(&[(0, 0x1000), (0xFFFF_F000, 0x1000)]);
    mem.write_phys(GuestPhysAddr(0xFFFF_FFFE), &[1, 2]).unwrap();
    mem.write_phys(GuestPhysAddr(0), &[3, 4]).unwrap();
    let off = PagingRegs::default();
    assert_eq!(read(&mem, &off, 0xFFFF_FFFE, 4), Ok(vec![1, 2, 3, 4]));
    assert_eq!(read(&mem, &off, 0x1_0000_0000, 2), Ok(vec![3, 4]));
}

#[test]
fn long_mode_canonical_hole_and_top_wrap() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Level4);
    pt.map(&mem, 0x7FFF_FFFF_F000, 0x50_0000, SIZE_4K, RW)
        .unwrap();
    pt.map(&mem, 0xFFFF_FFFF_FFFF_F000, 0x51_0000, SIZE_4K, RW)
        .unwrap();
    pt.map(&mem, 0, 0x52_0000, SIZE_4K, RW).unwrap();
    mem.write_phys(GuestPhysAddr(0x51_0FFF), &[1]).unwrap();
    mem.write_phys(GuestPhysAddr(0x52_0000), &[2]).unwrap();
    let regs = pt.regs();
    let hole = Err(TranslateError::NonCanonical {
        la: GuestLinearAddr(0x8000_0000_0000),
    });
    assert_eq!(read(&mem, &regs, 0x7FFF_FFFF_FFFC, 8), hole);
    assert!(read(&mem, &regs, 0x7FFF_FFFF_FFFC, 4).is_ok());
    assert_eq!(read(&mem, &regs, 0x8000_0000_0000, 1), hole);
    let hole_write = write_linear(
        &mem,
        &regs,
        GuestLinearAddr(0x7FFF_FFFF_FFFC),
        &[0xAA; 8],
        Access::WRITE,
    );
    assert_eq!(hole_write, hole.map(|_| ()));
    assert_eq!(&mem.snapshot()[0x50_0FFC..0x50_1000], &[0; 4]);
    // The top of the address space continues at 0 (both canonical).
    assert_eq!(read(&mem, &regs, u64::MAX, 2), Ok(vec![1, 2]));
}

#[test]
fn data_outside_guest_ram() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Level4);
    let ram_end = RAM as u64;
    pt.map(&mem, 0x1000, ram_end - SIZE_4K, SIZE_4K, RW)
        .unwrap();
    pt.map(&mem, 0x2000, ram_end, SIZE_4K, RW).unwrap();
    pt.map(&mem, 0x3000, 0xF_FFFF_FFFF_F000, SIZE_4K, RW)
        .unwrap();
    let regs = pt.regs();
    fn unbacked<T>(gpa: u64) -> Result<T, TranslateError> {
        Err(TranslateError::PhysUnreadable {
            gpa: GuestPhysAddr(gpa),
        })
    }
    assert!(read(&mem, &regs, 0x1FF0, 0x10).is_ok());
    assert_eq!(read(&mem, &regs, 0x1FF0, 0x20), unbacked(ram_end));
    assert_eq!(read(&mem, &regs, 0x3008, 1), unbacked(0xF_FFFF_FFFF_F008));
    assert_eq!(
        write_linear(&mem, &regs, GuestLinearAddr(0x2004), &[1], Access::WRITE),
        unbacked(ram_end + 4)
    );
}

#[test]
fn write_checks_every_page_before_writing() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Pae);
    pt.map(&mem, 0x1000, 0x50_0000, SIZE_4K, RW | US).unwrap();
    pt.map(&mem, 0x2000, 0x51_0000, SIZE_4K, US).unwrap();
    pt.map(&mem, 0x3000, 0x52_0000, SIZE_4K, RW).unwrap();
    let regs = pt.regs();
    let write = |la: u64, len: usize, access| {
        write_linear(&mem, &regs, GuestLinearAddr(la), &vec![0x5A; len], access)
    };
    // The second page is read-only: nothing is written, not even page 1.
    assert_eq!(write(0x1800, 0x1000, Access::WRITE), pf(0x2000, PR | W));
    // Write permission is required even if the caller asked for a read.
    assert_eq!(write(0x2000, 1, Access::READ), pf(0x2000, PR | W));
    assert_eq!(write(0x2000, 1, Access::USER_READ), pf(0x2000, PR | W | U));
    // A user write to a supervisor page.
    assert_eq!(write(0x3000, 1, Access::USER_WRITE), pf(0x3000, PR | W | U));
    // A missing page after good ones.
    assert_eq!(write(0x1000, 0x4000, Access::WRITE), pf(0x2000, PR | W));
    assert_eq!(write(0x3FFF, 2, Access::WRITE), pf(0x4000, W));
    assert!(mem.snapshot()[0x50_0000..0x53_0000].iter().all(|&b| b == 0));
    // WP off: supervisor writes pass read-only pages.
    let no_wp = PagingRegs {
        cr0: regs.cr0 & !PagingRegs::CR0_WP,
        ..regs
    };
    write_linear(
        &mem,
        &no_wp,
        GuestLinearAddr(0x1FFF),
        &[1, 2, 3],
        Access::WRITE,
    )
    .unwrap();
    assert_eq!(mem.snapshot()[0x50_0FFF], 1);
    assert_eq!(&mem.snapshot()[0x51_0000..0x51_0002], &[2, 3]);
}

#[test]
fn typed_access_crosses_pages() {
    for mode in [
        PagingMode::Bits32,
        PagingMode::Pae,
        PagingMode::Level4,
        PagingMode::Level5,
    ] {
        let mut ram = guest_ram();
        let mem = IsolatedMemory::new(&mut ram);
        let mut pt = tables(&mem, mode);
        // Two linear pages, physically apart and in reverse order; a
        // read-only page after them.
        pt.map(&mem, 0x40_0000, 0x50_0000, SIZE_4K, RW).unwrap();
        pt.map(&mem, 0x40_1000, 0x30_7000, SIZE_4K, RW).unwrap();
        pt.map(&mem, 0x40_2000, 0x31_0000, SIZE_4K, 0).unwrap();
        let regs = pt.regs();
        let la = GuestLinearAddr;
        let bytes: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
        write_linear(&mem, &regs, la(0x40_0FFB), &bytes, Access::WRITE).unwrap();

        assert_eq!(
            read_linear_u8(&mem, &regs, la(0x40_0FFB), Access::READ),
            Ok(1)
        );
        assert_eq!(
            read_linear_u16(&mem, &regs, la(0x40_0FFF), Access::READ),
            Ok(0x0605)
        );
        assert_eq!(
            read_linear_u32(&mem, &regs, la(0x40_0FFD), Access::READ),
            Ok(0x0605_0403)
        );
        assert_eq!(
            read_linear_u64(&mem, &regs, la(0x40_0FFB), Access::READ),
            Ok(u64::from_le_bytes(bytes))
        );
        assert_eq!(
            read_linear_array::<3, _>(&mem, &regs, la(0x40_0FFE), Access::READ),
            Ok([4, 5, 6])
        );

        write_linear_u64(&mem, &regs, la(0x40_0FFC), u64::MAX - 1, Access::WRITE).unwrap();
        assert_eq!(
            &mem.snapshot()[0x50_0FFC..0x50_1000],
            &[0xFE, 0xFF, 0xFF, 0xFF]
        );
        assert_eq!(
            &mem.snapshot()[0x30_7000..0x30_7005],
            &[0xFF, 0xFF, 0xFF, 0xFF, 0]
        );
        write_linear_u32(&mem, &regs, la(0x40_0FFE), 0x0A0B_0C0D, Access::WRITE).unwrap();
        write_linear_u16(&mem, &regs, la(0x40_0FFF), 0x1122, Access::WRITE).unwrap();
        write_linear_u8(&mem, &regs, la(0x40_1002), 0x33, Access::WRITE).unwrap();
        assert_eq!(
            read_linear_u64(&mem, &regs, la(0x40_0FFC), Access::READ),
            Ok(0xFF33_0A11_220D_FFFE),
            "{mode:?}"
        );

        // Errors are read_linear's / write_linear's, and a refused write
        // leaves every byte alone.
        let pf_at = |la: u64, code| pf::<()>(la, code);
        assert_eq!(
            read_linear_u32(&mem, &regs, la(0x40_2FFE), Access::READ),
            pf(0x40_3000, 0)
        );
        assert_eq!(
            write_linear_u32(&mem, &regs, la(0x40_1FFE), 0, Access::WRITE),
            pf_at(0x40_2000, PR | W)
        );
        assert_eq!(&mem.snapshot()[0x30_7FFE..0x30_8000], &[0, 0]);
        assert_eq!(
            read_linear_u16(&mem, &regs, la(0x40_0000), Access::USER_READ),
            pf(0x40_0000, PR | U)
        );
    }
}

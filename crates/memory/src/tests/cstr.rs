//! `read_cstr`: the VMM-call name reader.

use std::vec;

use super::guest_ram;
use super::paging::{pf, tables};
use crate::pagetable::*;
use crate::pf_error::{PRESENT as PR, USER as U};
use crate::*;

const NAME_MAX: usize = 256;

fn cstr<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: u64,
) -> Result<std::string::String, CStrError> {
    let mut buf = [0xFFu8; NAME_MAX];
    let copied = read_cstr(mem, regs, GuestLinearAddr(la), &mut buf);
    // The in-place reader must agree with the copying one in every case.
    let in_place =
        with_cstr::<NAME_MAX, _, _>(mem, regs, GuestLinearAddr(la), Access::READ, |n| n.to_vec());
    match (&copied, &in_place) {
        (Ok(n), Ok(name)) => assert_eq!(&buf[..*n], &name[..]),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("read_cstr {copied:?} but with_cstr {in_place:?}"),
    }
    let n = copied?;
    assert_eq!(buf[n], 0);
    Ok(std::string::String::from_utf8(buf[..n].to_vec()).unwrap())
}

fn unreadable<T>(e: Result<T, TranslateError>) -> Result<std::string::String, CStrError> {
    Err(CStrError::Unreadable(e.err().unwrap()))
}

#[test]
fn name_crossing_into_a_non_adjacent_page() {
    for (mode, la) in [
        (PagingMode::Bits32, 0xC000_0FFE),
        (PagingMode::Pae, 0xC000_0FFE),
        (PagingMode::Level4, 0xFFFF_8000_0000_0FFE),
        (PagingMode::Level5, 0xFFFF_FF00_0000_0FFE),
    ] {
        let mut ram = guest_ram();
        let mem = IsolatedMemory::new(&mut ram);
        let mut pt = tables(&mem, mode);
        let page = la & !0xFFF;
        pt.map(&mem, page, 0x60_0000, SIZE_4K, 0).unwrap();
        pt.map(&mem, page + SIZE_4K, 0x20_3000, SIZE_4K, 0).unwrap();
        mem.write_phys(GuestPhysAddr(0x60_0FFE), b"db").unwrap();
        mem.write_phys(GuestPhysAddr(0x20_3000), b"gsh\0junk")
            .unwrap();
        mem.write_phys(GuestPhysAddr(0x60_1000), b"WXYZ").unwrap();
        assert_eq!(cstr(&mem, &pt.regs(), la), Ok("dbgsh".into()), "{mode:?}");
    }
}

#[test]
fn length_limits() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Level4);
    // Three consecutive pages, names placed to cross between them.
    pt.map_range(&mem, 0x40_0000, 0x40_0000, 3 * SIZE_4K, 0)
        .unwrap();
    let regs = pt.regs();
    let at = 0x40_0F80u64;
    let name = |mem: &IsolatedMemory<'_>, len: usize, nul: bool| {
        let mut bytes = vec![b'a'; len];
        if nul {
            bytes.push(0);
        }
        bytes.push(b'z'); // something non-NUL after it
        mem.write_phys(GuestPhysAddr(at), &bytes).unwrap();
    };
    name(&mem, 255, true);
    assert_eq!(cstr(&mem, &regs, at).map(|s| s.len()), Ok(255));
    name(&mem, 256, false);
    assert_eq!(cstr(&mem, &regs, at), Err(CStrError::TooLong));
    name(&mem, 256, true);
    assert_eq!(cstr(&mem, &regs, at), Err(CStrError::TooLong));
    name(&mem, 0, true);
    assert_eq!(cstr(&mem, &regs, at), Ok("".into()));
    // No room even for the NUL.
    assert_eq!(
        read_cstr(&mem, &regs, GuestLinearAddr(at), &mut []),
        Err(CStrError::TooLong)
    );
    // A smaller limit.
    name(&mem, 4, true);
    let mut small = [0u8; 4];
    assert_eq!(
        read_cstr(&mem, &regs, GuestLinearAddr(at), &mut small),
        Err(CStrError::TooLong)
    );
    let mut small = [0u8; 5];
    assert_eq!(
        read_cstr(&mem, &regs, GuestLinearAddr(at), &mut small),
        Ok(4)
    );
}

#[test]
fn stops_at_the_nul_before_unmapped_memory() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Level4);
    pt.map(&mem, 0x40_0000, 0x50_0000, SIZE_4K, 0).unwrap();
    let regs = pt.regs();
    // Ends two bytes before the unmapped page 0x40_1000.
    mem.write_phys(GuestPhysAddr(0x50_0FF8), b"abcdef\0\0")
        .unwrap();
    assert_eq!(cstr(&mem, &regs, 0x40_0FF8), Ok("abcdef".into()));
    // NUL as the very last byte of the page.
    mem.write_phys(GuestPhysAddr(0x50_0FF8), b"abcdefg\0")
        .unwrap();
    assert_eq!(cstr(&mem, &regs, 0x40_0FF8), Ok("abcdefg".into()));
    // No NUL before the unmapped page: the fault names the next page.
    mem.write_phys(GuestPhysAddr(0x50_0FF8), b"abcdefgh")
        .unwrap();
    assert_eq!(
        cstr(&mem, &regs, 0x40_0FF8),
        unreadable(pf::<()>(0x40_1000, 0))
    );
    // Unmapped start.
    assert_eq!(
        cstr(&mem, &regs, 0x40_1000),
        unreadable(pf::<()>(0x40_1000, 0))
    );
    // Non-canonical start.
    assert_eq!(
        cstr(&mem, &regs, 0x8000_0000_0000),
        Err(CStrError::Unreadable(TranslateError::NonCanonical {
            la: GuestLinearAddr(0x8000_0000_0000)
        }))
    );
    // Supervisor page, read with the caller's user privilege.
    let mut buf = [0u8; NAME_MAX];
    assert_eq!(
        read_cstr_with_access(
            &mem,
            &regs,
            GuestLinearAddr(0x40_0FF8),
            &mut buf,
            Access::USER_READ
        ),
        unreadable(pf::<()>(0x40_0FF8, PR | U)).map(|s| s.len())
    );
}

#[test]
fn stops_at_the_nul_before_the_end_of_ram() {
    // RAM that ends 3 bytes into a page.
    let mut ram = vec![0u8; 0x3003];
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = PageTables::new(&mem, PagingMode::Bits32, 0, 0x2000).unwrap();
    pt.map(&mem, 0x1000, 0x3000, SIZE_4K, 0).unwrap();
    let regs = pt.regs();
    mem.write_phys(GuestPhysAddr(0x3000), b"ab\0").unwrap();
    assert_eq!(cstr(&mem, &regs, 0x1000), Ok("ab".into()));
    mem.write_phys(GuestPhysAddr(0x3000), b"abc").unwrap();
    assert_eq!(
        cstr(&mem, &regs, 0x1000),
        Err(CStrError::Unreadable(TranslateError::PhysUnreadable {
            gpa: GuestPhysAddr(0x3003)
        }))
    );
    // Starting past the end.
    assert_eq!(
        cstr(&mem, &regs, 0x1004),
        Err(CStrError::Unreadable(TranslateError::PhysUnreadable {
            gpa: GuestPhysAddr(0x3004)
        }))
    );
}

#[test]
fn name_wrapping_at_4_gib() {
    let mut ram = guest_ram();
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt = tables(&mem, PagingMode::Pae);
    pt.map(&mem, 0xFFFF_F000, 0x50_0000, SIZE_4K, 0).unwrap();
    pt.map(&mem, 0, 0x51_0000, SIZE_4K, 0).unwrap();
    mem.write_phys(GuestPhysAddr(0x50_0FFE), b"lo").unwrap();
    mem.write_phys(GuestPhysAddr(0x51_0000), b"g_read\0")
        .unwrap();
    assert_eq!(cstr(&mem, &pt.regs(), 0xFFFF_FFFE), Ok("log_read".into()));
}

/// Names at every alignment near the start and the end of a page, of every
/// length up to past the short buffer, with and without a NUL, in RAM
/// whose clear range ends right after the page (a hole follows) or not:
/// the word scan of the inline path must agree with a byte-by-byte model
/// and never touch the hole.
#[test]
fn every_offset_and_length() {
    const PAGE: u64 = 0x40_0000;
    for hole in [false, true] {
        let mut ram = guest_ram();
        let base = ram.as_ptr() as usize;
        #[allow(clippy::single_range_in_vec_init)] // a list of one range
        let holes = [PAGE + 0x1000..PAGE + 0x2000];
        let mem = if hole {
            IsolatedMemory::with_holes(&mut ram, &holes)
        } else {
            IsolatedMemory::new(&mut ram)
        };
        let mut pt = tables(&mem, PagingMode::Level4);
        pt.map(&mem, 0x1000, PAGE, SIZE_4K, 0).unwrap();
        // The next linear page maps the hole (or plain RAM).
        pt.map(&mem, 0x2000, PAGE + 0x1000, SIZE_4K, 0).unwrap();
        let regs = pt.regs();
        let offsets = (0..24).chain(0x1000 - 48..0x1000);
        for off in offsets {
            for len in [0usize, 1, 2, 3, 5, 7, 8, 9, 15, 16, 23, 31, 32, 33, 40, 47] {
                // Bytes 0x80.. (bit 7 set: a borrow trick must not misread
                // them) and a NUL after `len` of them, unless the page ends
                // first.
                let fill: std::vec::Vec<u8> = (0..0x1000 - off)
                    .map(|i| 0x80 | (i as u8 % 0x7F + 1))
                    .collect();
                mem.write_phys(GuestPhysAddr(PAGE + off), &fill).unwrap();
                let nul_in_page = off + len as u64 <= 0xFFF;
                if nul_in_page {
                    mem.write_phys(GuestPhysAddr(PAGE + off + len as u64), &[0])
                        .unwrap();
                }
                if !hole {
                    // The name may go on into the next page: end it there.
                    mem.write_phys(GuestPhysAddr(PAGE + 0x1000), &[0]).unwrap();
                }
                let (got, touched) = crate::window::touched::during(|| {
                    with_cstr::<NAME_MAX, _, _>(
                        &mem,
                        &regs,
                        GuestLinearAddr(0x1000 + off),
                        Access::READ,
                        |n| n.to_vec(),
                    )
                });
                if hole {
                    let hole_host = base + (PAGE as usize + 0x1000);
                    for (at, n) in touched {
                        assert!(
                            at + n <= hole_host || at >= hole_host + 0x1000,
                            "offset {off:#x} length {len} touched the hole"
                        );
                    }
                }
                let want = if nul_in_page {
                    Ok(fill[..len].to_vec())
                } else if hole {
                    Err(CStrError::Unreadable(TranslateError::PhysUnreadable {
                        gpa: GuestPhysAddr(PAGE + 0x1000),
                    }))
                } else {
                    Ok(fill.clone())
                };
                assert_eq!(got, want, "hole {hole} offset {off:#x} length {len}");
                // The copying reader agrees.
                let mut buf = [0xFFu8; NAME_MAX];
                let copied = read_cstr(&mem, &regs, GuestLinearAddr(0x1000 + off), &mut buf);
                assert_eq!(copied.map(|n| buf[..n].to_vec()), want);
            }
        }
    }
}

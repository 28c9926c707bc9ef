//! The two layouts: windows (`map`), forbidden ranges (holes, hidden
//! ranges, non-RAM), the atomic operations, sharing between threads, and
//! how the walk and the copies see a hole. The property tests check every
//! operation against a byte model, including that no access ever touches
//! a byte it may not reach.

use core::ops::Range;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::guest_ram;
use super::paging::tables;
use crate::pagetable::*;
use crate::window::touched;
use crate::*;

fn err<T>(gpa: u64) -> Result<T, PhysAccessError> {
    Err(PhysAccessError {
        gpa: GuestPhysAddr(gpa),
    })
}

/// What a window over `gpa..gpa+len` holds.
fn view<M: GuestPhysMemory>(mem: &M, gpa: u64, len: usize) -> Result<Vec<u8>, PhysAccessError> {
    let w = mem.map(GuestPhysAddr(gpa), len)?;
    let mut out = vec![0u8; len];
    assert!(w.read(&mut out));
    Ok(out)
}

#[test]
fn map_and_unmap() {
    let mut ram: Vec<u8> = (0..32).collect();
    let mem = IsolatedMemory::new(&mut ram);
    assert_eq!(view(&mem, 4, 3), Ok(vec![4u8, 5, 6]));
    assert_eq!(view(&mem, 31, 1), Ok(vec![31u8]));
    assert_eq!(view(&mem, 30, 3), err(32));
    assert_eq!(view(&mem, 32, 1), err(32));
    assert_eq!(view(&mem, u64::MAX, 2), err(u64::MAX));
    assert_eq!(
        mem.map(GuestPhysAddr(1), usize::MAX).map(|w| w.len()),
        err(32)
    );
    // Nothing touched, nothing can fail.
    assert_eq!(view(&mem, u64::MAX, 0), Ok(vec![]));
    {
        let window = mem.map(GuestPhysAddr(8), 4).unwrap();
        assert!(window.write(&[0xAA; 4]));
        // A window copies no more than it covers.
        assert!(!window.write(&[0; 5]));
        assert!(!window.read(&mut [0; 5]));
        // The window ends here: that is the unmap.
    }
    assert_eq!(mem.read_u32_phys(GuestPhysAddr(8)), Ok(0xAAAA_AAAA));
    assert_eq!(mem.map(GuestPhysAddr(29), 4).map(|v| v.len()), err(32));
}

#[test]
fn holes_are_unreachable() {
    let mut ram = vec![7u8; 64];
    // One hole in the middle, one empty, one reversed, one beyond RAM.
    #[allow(clippy::reversed_empty_ranges)]
    let holes = [16..24, 40..40, 50..45, 100..200];
    let mem = IsolatedMemory::with_holes(&mut ram, &holes);
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
    assert_eq!(mem.map(GuestPhysAddr(17), 1).map(|s| s.len()), err(17));
    assert!(mem.snapshot().iter().all(|&b| b == 7));
    // The VMM's own view still covers the hole.
    assert_eq!(mem.snapshot().len(), 64);
    assert_eq!(mem.len(), 64);
}

#[test]
fn walks_and_copies_stop_at_holes() {
    let mut ram = guest_ram();
    let (regs, pte) = {
        let mem = IsolatedMemory::new(&mut ram);
        let mut pt = tables(&mem, PagingMode::Level4);
        pt.map(&mem, 0x1000, 0x50_0000, SIZE_4K, RW).unwrap();
        pt.map(&mem, 0x2000, 0x60_0000, SIZE_4K, RW).unwrap();
        pt.map(&mem, 0x40_0000, 0x70_0000, SIZE_4K, RW).unwrap();
        mem.write_phys(GuestPhysAddr(0x50_0FFC), b"ab\0x").unwrap();
        mem.write_phys(GuestPhysAddr(0x60_0000), b"cd").unwrap();
        let pte = pt.entry_gpa(&mem, 0x40_0000, 1).unwrap();
        (pt.regs(), pte.0)
    };
    // The second data page, and the page table for 0x40_0000.
    let holes = [0x60_0000..0x60_1000, pte..pte + 8];
    let mem = IsolatedMemory::with_holes(&mut ram, &holes);
    let la = GuestLinearAddr;

    let mut buf = [0u8; 8];
    assert_eq!(
        read_linear(&mem, &regs, la(0x1FFC), &mut buf, Access::READ),
        Err(TranslateError::PhysUnreadable {
            gpa: GuestPhysAddr(0x60_0000)
        })
    );
    assert_eq!(
        write_linear(&mem, &regs, la(0x1FFC), &buf, Access::WRITE),
        Err(TranslateError::PhysUnreadable {
            gpa: GuestPhysAddr(0x60_0000)
        })
    );
    assert_eq!(&mem.snapshot()[0x60_0000..0x60_0002], b"cd");
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

/// Physical memory of the pass-through tests: 4 KiB, with RAM at
/// 0x100..0x500 and 0x600..0xF00 (an "MMIO" gap between), and the
/// hypervisor hidden at 0x300..0x340.
#[test]
fn passthrough_reaches_only_usable_ram() {
    let mut phys: Vec<u8> = (0..0x1000u32).map(|i| (i % 251) as u8 + 1).collect();
    let ram = [0x600..0xF00, 0x100..0x500];
    #[allow(clippy::single_range_in_vec_init)] // a list of one range
    let hidden = [0x300..0x340];
    // SAFETY: every RAM address is inside `phys`, which nothing else
    // touches while `mem` is used.
    let mem = unsafe { PassthroughMemory::new(phys.as_mut_ptr(), &ram, &hidden) };
    assert_eq!((mem.ram().len(), mem.hidden().len()), (2, 1));
    let mut buf = [0u8; 16];
    // Guest-physical is physical: the byte at 0x100 is phys[0x100].
    assert_eq!(mem.read_phys(GuestPhysAddr(0x100), &mut buf), Ok(()));
    assert_eq!(buf[0], (0x100 % 251) as u8 + 1);
    // Below RAM, in the gap (MMIO), past the end, the hypervisor.
    assert_eq!(mem.read_phys(GuestPhysAddr(0xF8), &mut buf), err(0xF8));
    assert_eq!(mem.read_phys(GuestPhysAddr(0x4F8), &mut buf), err(0x500));
    assert_eq!(mem.read_phys(GuestPhysAddr(0x550), &mut buf), err(0x550));
    assert_eq!(mem.read_phys(GuestPhysAddr(0xEF8), &mut buf), err(0xF00));
    assert_eq!(mem.read_phys(GuestPhysAddr(0x2F8), &mut buf), err(0x300));
    assert_eq!(mem.read_phys(GuestPhysAddr(0x33F), &mut buf), err(0x33F));
    assert_eq!(mem.read_phys(GuestPhysAddr(0x340), &mut buf), Ok(()));
    // The hypervisor comes before the gap in a range spanning both.
    assert_eq!(
        mem.map(GuestPhysAddr(0x200), 0x500).map(|w| w.len()),
        err(0x300)
    );
    // Writes, typed accesses and read-modify-writes obey the same rules,
    // and a refused one changes nothing.
    assert_eq!(mem.write_phys(GuestPhysAddr(0x2FC), &[0; 8]), err(0x300));
    assert_eq!(mem.write_u64_phys(GuestPhysAddr(0x4FC), 0), err(0x500));
    assert_eq!(mem.read_u32_phys(GuestPhysAddr(0x33C)), err(0x33C));
    assert_eq!(
        mem.compare_exchange_u64_phys(GuestPhysAddr(0x338), 0, 1),
        err(0x338)
    );
    assert_eq!(mem.fetch_add_u32_phys(GuestPhysAddr(0xF00), 1), err(0xF00));
    assert_eq!(
        mem.write_u32_phys(GuestPhysAddr(0x600), 0x1234_5678),
        Ok(())
    );
    assert_eq!(mem.read_u32_phys(GuestPhysAddr(0x600)), Ok(0x1234_5678));
    // Copies across the boundary of two RAM ranges that touch are fine.
    let ram = [0x100..0x200, 0x200..0x300];
    // SAFETY: as above.
    let mem = unsafe { PassthroughMemory::new(phys.as_mut_ptr(), &ram, &[]) };
    assert_eq!(view(&mem, 0x1F0, 0x20).map(|v| v.len()), Ok(0x20));
    assert_eq!(view(&mem, 0x2F0, 0x20), err(0x300));
    let expect: Vec<u8> = (0x2FCu32..0x300).map(|i| (i % 251) as u8 + 1).collect();
    assert_eq!(&phys[0x2FC..0x300], &expect[..]);
    assert_eq!(&phys[0x600..0x604], &[0x78, 0x56, 0x34, 0x12]);
}

#[test]
fn atomic_operations() {
    let mut ram = vec![0u8; 64];
    let mem = IsolatedMemory::new(&mut ram);
    let at = GuestPhysAddr(16);
    mem.write_u64_phys(at, 5).unwrap();
    assert_eq!(mem.compare_exchange_u64_phys(at, 5, 0x20), Ok(Ok(5)));
    assert_eq!(mem.compare_exchange_u64_phys(at, 5, 0x40), Ok(Err(0x20)));
    assert_eq!(mem.read_u64_phys(at), Ok(0x20));
    assert_eq!(mem.fetch_add_u32_phys(GuestPhysAddr(32), 3), Ok(0));
    assert_eq!(mem.fetch_add_u32_phys(GuestPhysAddr(32), u32::MAX), Ok(3));
    assert_eq!(mem.read_u32_phys(GuestPhysAddr(32)), Ok(2));
    // Misaligned read-modify-writes are refused; plain accesses are not.
    assert_eq!(
        mem.compare_exchange_u64_phys(GuestPhysAddr(20), 0, 1),
        err(20)
    );
    assert_eq!(mem.fetch_add_u32_phys(GuestPhysAddr(34), 1), err(34));
    mem.write_u64_phys(GuestPhysAddr(41), 0x0102_0304_0506_0708)
        .unwrap();
    assert_eq!(
        mem.read_u64_phys(GuestPhysAddr(41)),
        Ok(0x0102_0304_0506_0708)
    );
    assert_eq!(mem.read_u32_phys(GuestPhysAddr(43)), Ok(0x0304_0506));
    // Little-endian in memory.
    assert_eq!(&mem.snapshot()[16..24], &[0x20, 0, 0, 0, 0, 0, 0, 0]);
    // Out of RAM.
    assert_eq!(
        mem.compare_exchange_u64_phys(GuestPhysAddr(64), 0, 1),
        err(64)
    );
}

#[test]
fn read_until_nul_uses_the_readable_prefix() {
    let mut ram = *b"abc\0defghijklmnopqrstuvwxyz";
    #[allow(clippy::single_range_in_vec_init)] // a list of one range
    let holes = [20..22];
    let mem = IsolatedMemory::with_holes(&mut ram, &holes);
    let mut buf = [0xFFu8; 16];
    assert_eq!(
        mem.read_until_nul_phys(GuestPhysAddr(0), &mut buf),
        Ok(Some(3))
    );
    assert_eq!(&buf[..4], b"abc\0");
    // No NUL before the buffer is full.
    assert_eq!(
        mem.read_until_nul_phys(GuestPhysAddr(4), &mut buf[..5]),
        Ok(None)
    );
    assert_eq!(&buf[..5], b"defgh");
    // Runs into the hole before any NUL.
    assert_eq!(mem.read_until_nul_phys(GuestPhysAddr(8), &mut buf), err(20));
    // A NUL before the hole still counts.
    let mem = IsolatedMemory::with_holes(&mut ram[..], &holes);
    mem.write_phys(GuestPhysAddr(10), &[0]).unwrap();
    assert_eq!(
        mem.read_until_nul_phys(GuestPhysAddr(8), &mut buf),
        Ok(Some(2))
    );
    assert_eq!(&buf[..3], b"hi\0");
    // Starting in the hole, or past RAM.
    assert_eq!(
        mem.read_until_nul_phys(GuestPhysAddr(21), &mut buf),
        err(21)
    );
    assert_eq!(
        mem.read_until_nul_phys(GuestPhysAddr(99), &mut buf),
        err(99)
    );
    assert_eq!(
        mem.read_until_nul_phys(GuestPhysAddr(99), &mut []),
        Ok(None)
    );
}

#[test]
fn shared_between_threads() {
    const THREADS: u64 = 4;
    const ROUNDS: u64 = 2000;
    let mut ram = vec![0u8; 0x1000];
    let mem = IsolatedMemory::new(&mut ram);
    let mem = &mem;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                let mine = GuestPhysAddr(0x100 + t * 0x100);
                for i in 0..ROUNDS {
                    mem.fetch_add_u32_phys(GuestPhysAddr(0), 1).unwrap();
                    // A compare-exchange loop, as accessed/dirty bits do.
                    let at = GuestPhysAddr(8);
                    let mut old = mem.read_u64_phys(at).unwrap();
                    while let Err(actual) = mem.compare_exchange_u64_phys(at, old, old + 1).unwrap()
                    {
                        old = actual;
                    }
                    // Each thread's own bytes, unaligned, round-trip.
                    let data = [(t as u8) ^ (i as u8); 37];
                    mem.write_phys(GuestPhysAddr(mine.0 + 3), &data).unwrap();
                    let mut back = [0u8; 37];
                    mem.read_phys(GuestPhysAddr(mine.0 + 3), &mut back).unwrap();
                    assert_eq!(back, data);
                }
            });
        }
        // Whole-entry stores are never seen torn.
        s.spawn(move || {
            for i in 0..ROUNDS * 4 {
                let v = if i % 2 == 0 { 0 } else { u64::MAX };
                mem.write_u64_phys(GuestPhysAddr(0x20), v).unwrap();
            }
        });
        s.spawn(move || {
            for _ in 0..ROUNDS * 4 {
                let v = mem.read_u64_phys(GuestPhysAddr(0x20)).unwrap();
                assert!(v == 0 || v == u64::MAX, "torn entry {v:#x}");
            }
        });
    });
    assert_eq!(
        mem.read_u32_phys(GuestPhysAddr(0)),
        Ok((THREADS * ROUNDS) as u32)
    );
    assert_eq!(mem.read_u64_phys(GuestPhysAddr(8)), Ok(THREADS * ROUNDS));
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
        let mem = IsolatedMemory::with_holes(&mut ram, &holes);
        for &(gpa, len) in &accesses {
            let first_bad = (gpa..gpa + len as u64).find(|&b| !reachable(LEN, &holes, b));
            let got = view(&mem, gpa, len);
            match first_bad {
                Some(b) => prop_assert_eq!(got, err(b)),
                None => {
                    let want: Vec<u8> = (gpa..gpa + len as u64).map(|b| b as u8).collect();
                    prop_assert_eq!(got, Ok(want));
                }
            }
            let got = mem.map(GuestPhysAddr(gpa), len).map(|s| s.len());
            prop_assert_eq!(got, first_bad.map_or(Ok(len), err));
        }
    }
}

// ---- every operation against a byte model ------------------------------

/// Size of the "physical memory" buffer of the model tests.
const PHYS: usize = 512;

#[derive(Clone, Debug)]
enum Op {
    Read(u64, usize),
    Write(u64, usize, u8),
    ReadU32(u64),
    ReadU64(u64),
    WriteU32(u64, u32),
    WriteU64(u64, u64),
    /// Compare-exchange; the bool picks the current value (so it succeeds)
    /// rather than the given one.
    Cas(u64, bool, u64, u64),
    FetchAdd(u64, u32),
    UntilNul(u64, usize),
}

fn op() -> impl Strategy<Value = Op> {
    // Addresses a little beyond the buffer, so accesses run off RAM.
    let at = 0u64..(PHYS as u64 + 64);
    let aligned8 = (0u64..(PHYS as u64 / 8 + 8)).prop_map(|w| w * 8);
    let aligned4 = (0u64..(PHYS as u64 / 4 + 8)).prop_map(|w| w * 4);
    prop_oneof![
        (at.clone(), 0usize..100).prop_map(|(a, l)| Op::Read(a, l)),
        (at.clone(), 0usize..100, any::<u8>()).prop_map(|(a, l, s)| Op::Write(a, l, s)),
        prop_oneof![aligned4.clone(), at.clone()].prop_map(Op::ReadU32),
        prop_oneof![aligned8.clone(), at.clone()].prop_map(Op::ReadU64),
        (prop_oneof![aligned4.clone(), at.clone()], any::<u32>())
            .prop_map(|(a, v)| Op::WriteU32(a, v)),
        (prop_oneof![aligned8.clone(), at.clone()], any::<u64>())
            .prop_map(|(a, v)| Op::WriteU64(a, v)),
        (
            prop_oneof![aligned8, at.clone()],
            any::<bool>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(a, c, cur, new)| Op::Cas(a, c, cur, new)),
        (prop_oneof![aligned4, at.clone()], any::<u32>()).prop_map(|(a, v)| Op::FetchAdd(a, v)),
        (at, 0usize..100).prop_map(|(a, l)| Op::UntilNul(a, l)),
    ]
}

/// A random list of ranges inside (and a little beyond) the buffer.
fn ranges(max: usize) -> impl Strategy<Value = Vec<Range<u64>>> {
    prop::collection::vec((0u64..PHYS as u64 + 32, 0u64..200), 0..max)
        .prop_map(|v| v.into_iter().map(|(s, l)| s..s + l).collect())
}

/// Runs `ops` on `mem` and on `shadow` (the model of guest memory, byte
/// `x` being guest-physical `x`), and checks every result against the
/// model. `ok(b)` says whether guest-physical `b` may be reached; the
/// layout maps it to host address `base + b`.
fn run_model<M: GuestPhysMemory>(
    mem: &M,
    shadow: &mut [u8],
    ops: &[Op],
    ok: &dyn Fn(u64) -> bool,
    base: usize,
) -> Result<(), TestCaseError> {
    let host_of = |b: u64| base.wrapping_add(b as usize);
    let first_bad = |gpa: u64, len: usize| (gpa..gpa + len as u64).find(|&b| !ok(b));
    // Empty accesses may start anywhere.
    let bytes = |shadow: &[u8], gpa: u64, len: usize| {
        shadow
            .get(gpa as usize..gpa as usize + len)
            .unwrap_or_default()
            .to_vec()
    };
    for op in ops {
        let (result, touched) = touched::during(|| -> Result<(), TestCaseError> {
            match *op {
                Op::Read(gpa, len) => {
                    let mut buf = vec![0u8; len];
                    let got = mem.read_phys(GuestPhysAddr(gpa), &mut buf).map(|()| buf);
                    let want = match first_bad(gpa, len) {
                        Some(b) => err(b),
                        None => Ok(bytes(shadow, gpa, len)),
                    };
                    prop_assert_eq!(got, want, "{:?}", op);
                }
                Op::Write(gpa, len, seed) => {
                    let data: Vec<u8> = (0..len)
                        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
                        .collect();
                    let got = mem.write_phys(GuestPhysAddr(gpa), &data);
                    let want = first_bad(gpa, len).map_or(Ok(()), err);
                    if want.is_ok() && len > 0 {
                        shadow[gpa as usize..gpa as usize + len].copy_from_slice(&data);
                    }
                    prop_assert_eq!(got, want, "{:?}", op);
                }
                Op::ReadU32(gpa) => {
                    let want = first_bad(gpa, 4).map_or_else(
                        || {
                            Ok(u32::from_le_bytes(
                                bytes(shadow, gpa, 4).try_into().unwrap(),
                            ))
                        },
                        err,
                    );
                    prop_assert_eq!(mem.read_u32_phys(GuestPhysAddr(gpa)), want, "{:?}", op);
                }
                Op::ReadU64(gpa) => {
                    let want = first_bad(gpa, 8).map_or_else(
                        || {
                            Ok(u64::from_le_bytes(
                                bytes(shadow, gpa, 8).try_into().unwrap(),
                            ))
                        },
                        err,
                    );
                    prop_assert_eq!(mem.read_u64_phys(GuestPhysAddr(gpa)), want, "{:?}", op);
                }
                Op::WriteU32(gpa, v) => {
                    let want = first_bad(gpa, 4).map_or(Ok(()), err);
                    if want.is_ok() {
                        shadow[gpa as usize..gpa as usize + 4].copy_from_slice(&v.to_le_bytes());
                    }
                    prop_assert_eq!(mem.write_u32_phys(GuestPhysAddr(gpa), v), want, "{:?}", op);
                }
                Op::WriteU64(gpa, v) => {
                    let want = first_bad(gpa, 8).map_or(Ok(()), err);
                    if want.is_ok() {
                        shadow[gpa as usize..gpa as usize + 8].copy_from_slice(&v.to_le_bytes());
                    }
                    prop_assert_eq!(mem.write_u64_phys(GuestPhysAddr(gpa), v), want, "{:?}", op);
                }
                Op::Cas(gpa, use_actual, cur, new) => {
                    let want = match first_bad(gpa, 8) {
                        Some(b) => err(b),
                        None if host_of(gpa) % 8 != 0 => err(gpa),
                        None => {
                            let actual =
                                u64::from_le_bytes(bytes(shadow, gpa, 8).try_into().unwrap());
                            Ok(if use_actual || cur == actual {
                                Ok(actual)
                            } else {
                                Err(actual)
                            })
                        }
                    };
                    let cur = match want {
                        Ok(Ok(actual)) => actual,
                        _ => cur,
                    };
                    if let Ok(Ok(_)) = want {
                        shadow[gpa as usize..gpa as usize + 8].copy_from_slice(&new.to_le_bytes());
                    }
                    prop_assert_eq!(
                        mem.compare_exchange_u64_phys(GuestPhysAddr(gpa), cur, new),
                        want,
                        "{:?}",
                        op
                    );
                }
                Op::FetchAdd(gpa, v) => {
                    let want = match first_bad(gpa, 4) {
                        Some(b) => err(b),
                        None if host_of(gpa) % 4 != 0 => err(gpa),
                        None => Ok(u32::from_le_bytes(
                            bytes(shadow, gpa, 4).try_into().unwrap(),
                        )),
                    };
                    if let Ok(old) = want {
                        shadow[gpa as usize..gpa as usize + 4]
                            .copy_from_slice(&old.wrapping_add(v).to_le_bytes());
                    }
                    prop_assert_eq!(
                        mem.fetch_add_u32_phys(GuestPhysAddr(gpa), v),
                        want,
                        "{:?}",
                        op
                    );
                }
                Op::UntilNul(gpa, len) => {
                    let mut want = Ok(None);
                    for b in gpa..gpa + len as u64 {
                        if !ok(b) {
                            want = err(b);
                            break;
                        }
                        if shadow[b as usize] == 0 {
                            want = Ok(Some((b - gpa) as usize));
                            break;
                        }
                    }
                    let mut buf = vec![0xEEu8; len];
                    let got = mem.read_until_nul_phys(GuestPhysAddr(gpa), &mut buf);
                    prop_assert_eq!(got, want, "{:?}", op);
                    let n = match got {
                        Ok(Some(n)) => n + 1,
                        Ok(None) => len,
                        Err(_) => 0,
                    };
                    if n > 0 {
                        prop_assert_eq!(&buf[..n], &shadow[gpa as usize..gpa as usize + n]);
                    }
                }
            }
            Ok(())
        });
        result?;
        // No operation touched a byte it may not reach, whatever it
        // returned.
        for &(addr, len) in &touched {
            for a in addr..addr + len {
                let gpa = a.checked_sub(base).map(|g| g as u64);
                prop_assert!(
                    gpa.is_some_and(ok),
                    "{:?} touched host {:#x} (guest-physical {:?})",
                    op,
                    a,
                    gpa
                );
            }
        }
    }
    Ok(())
}

/// Initial contents: varied bytes with a NUL every so often.
fn contents() -> Vec<u8> {
    (0..PHYS)
        .map(|i| if i % 23 == 5 { 0 } else { (i * 7 + 1) as u8 })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The pass-through layout: only RAM outside the hidden ranges is
    /// ever touched, and every operation does what the byte model says.
    #[test]
    fn passthrough_matches_a_byte_model(
        ram in ranges(4),
        hidden in ranges(3),
        ops in prop::collection::vec(op(), 1..24),
    ) {
        // RAM must lie inside the buffer (the constructor's contract);
        // accesses beyond it are still tried.
        let ram: Vec<Range<u64>> = ram
            .into_iter()
            .map(|r| r.start.min(PHYS as u64)..r.end.min(PHYS as u64))
            .collect();
        let mut phys = contents();
        let mut shadow = phys.clone();
        let base = phys.as_mut_ptr();
        let ok = |b: u64| {
            ram.iter().any(|r| r.contains(&b)) && !hidden.iter().any(|h| h.contains(&b))
        };
        // SAFETY: every RAM address is inside `phys`, which is used only
        // through `mem` until `mem` is gone.
        let mem = unsafe { PassthroughMemory::new(base, &ram, &hidden) };
        run_model(&mem, &mut shadow, &ops, &ok, base as usize)?;
        // Nothing else changed either.
        prop_assert!(phys == shadow);
    }

    /// The isolated layout, with its block at every alignment.
    #[test]
    fn isolated_matches_a_byte_model(
        shift in 0usize..8,
        len in 0usize..PHYS - 8,
        holes in ranges(3),
        ops in prop::collection::vec(op(), 1..24),
    ) {
        let mut block = vec![0xA5u8; PHYS];
        let initial = contents();
        block[shift..shift + len].copy_from_slice(&initial[..len]);
        let mut shadow = block[shift..].to_vec();
        let base = block.as_mut_ptr().wrapping_add(shift);
        let ok = |b: u64| b < len as u64 && !holes.iter().any(|h| h.contains(&b));
        // SAFETY: `len` bytes at `base` lie inside `block`, used only
        // through `mem` until `mem` is gone.
        let mem = unsafe { IsolatedMemory::from_raw(base, len, &holes) };
        run_model(&mem, &mut shadow, &ops, &ok, base as usize)?;
        prop_assert!(block[..shift].iter().all(|&b| b == 0xA5));
        prop_assert!(block[shift..] == shadow[..]);
    }
}

#[test]
#[allow(clippy::single_range_in_vec_init)] // lists of one range
fn the_shared_range_check() {
    use crate::phys::first_unreachable as first;
    let ram = [0x3000..0x4000, 0x1000..0x2000, 0x2000..0x3000, 0..0];
    // Unsorted, touching ranges cover 0x1000..0x4000.
    assert_eq!(first(0x1000, 0x3000, &ram, &[]), None);
    assert_eq!(first(0xFFF, 2, &ram, &[]), Some(0xFFF));
    assert_eq!(first(0x3FFF, 2, &ram, &[]), Some(0x4000));
    assert_eq!(first(0x5000, 0, &ram, &[]), None);
    // Overlapping ranges, one reversed.
    #[allow(clippy::reversed_empty_ranges)]
    let ram = [0x100..0x300, 0x200..0x280, 0x900..0x100, 0x280..0x400];
    assert_eq!(first(0x100, 0x300, &ram, &[]), None);
    assert_eq!(first(0x100, 0x301, &ram, &[]), Some(0x400));
    // Hidden bytes win when they come first; reversed ones hide nothing.
    #[allow(clippy::reversed_empty_ranges)]
    let hidden = [0x3F0..0x500, 0x180..0x170, 0x120..0x121];
    assert_eq!(first(0x100, 0x400, &ram, &hidden), Some(0x120));
    assert_eq!(first(0x121, 0x400, &ram, &hidden), Some(0x3F0));
    // The top of the address space: byte 2^64 - 1 is never RAM, and an
    // access running past it fails there at the latest.
    let top = [u64::MAX - 0x10..u64::MAX];
    assert_eq!(first(u64::MAX - 0x10, 0x10, &top, &[]), None);
    assert_eq!(first(u64::MAX - 0x10, 0x11, &top, &[]), Some(u64::MAX));
    assert_eq!(first(u64::MAX - 4, usize::MAX, &top, &[]), Some(u64::MAX));
    assert_eq!(first(u64::MAX, 2, &top, &[]), Some(u64::MAX));
    let hidden = [u64::MAX - 2..u64::MAX];
    assert_eq!(first(u64::MAX - 4, 100, &top, &hidden), Some(u64::MAX - 2));
}

/// `read_until_nul` at every host alignment, length and NUL position: the
/// 1-, 2- and 4-byte head pieces, the words and the tail must agree with a
/// byte-by-byte scan, and copy every byte up to the NUL.
#[test]
fn read_until_nul_every_alignment() {
    let mut ram = vec![0u8; 64];
    let mem = IsolatedMemory::new(&mut ram);
    for start in 0..16u64 {
        for len in 0..40usize {
            for nul in (0..len).map(Some).chain([None]) {
                // Non-zero bytes (bit 7 set in some, to catch a borrow
                // trick that misreads them), a NUL at `nul`.
                let bytes: Vec<u8> = (0..48u8)
                    .map(|i| if Some(i as usize) == nul { 0 } else { 0x7F + i })
                    .collect();
                mem.write_phys(GuestPhysAddr(start), &bytes).unwrap();
                let mut buf = vec![0xEEu8; len];
                let w = mem.map(GuestPhysAddr(start), len).unwrap();
                let got = w.read_until_nul(&mut buf);
                assert_eq!(got, nul, "start {start} len {len}");
                let copied = nul.map_or(len, |n| n + 1);
                assert_eq!(&buf[..copied], &bytes[..copied], "start {start} len {len}");
                // A shorter window than the buffer stops at the window.
                let w = mem.map(GuestPhysAddr(start), len / 2).unwrap();
                let want = nul.filter(|&n| n < len / 2);
                assert_eq!(w.read_until_nul(&mut buf), want, "start {start} len {len}");
            }
        }
    }
}

proptest! {
    /// The clear range every fast access is checked against lies inside
    /// RAM and outside every hidden range, whatever the lists.
    #[test]
    fn clear_span_is_reachable(
        ram in proptest::collection::vec((0u64..200, 0u64..200), 0..5),
        hidden in proptest::collection::vec((0u64..200, 0u64..200), 0..5),
    ) {
        let ram: Vec<Range<u64>> = ram.into_iter().map(|(a, b)| a..b).collect();
        let hidden: Vec<Range<u64>> = hidden.into_iter().map(|(a, b)| a..b).collect();
        let clear = crate::phys::clear_span(&ram, &hidden);
        let len = (clear.end - clear.start) as usize;
        prop_assert_eq!(
            crate::phys::first_unreachable(clear.start, len, &ram, &hidden),
            None
        );
        // Some byte reachable: the clear range is not empty.
        let any = (0..200).any(|b| crate::phys::first_unreachable(b, 1, &ram, &hidden).is_none());
        prop_assert_eq!(any, len > 0);
    }
}

//! Property tests: random page-table trees in every mode, `translate`,
//! `read_linear`, `write_linear` and `read_cstr` compared with the
//! reference walker applied byte by byte.
//!
//! Guest RAM is a data region `[0, 2 MiB)` followed by 16 table pages
//! filled with random entries (pointing mostly at table pages, sometimes at
//! data pages, outside RAM or anywhere), so trees share, cycle and
//! self-reference freely.

use std::sync::OnceLock;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use crate::reference;
use crate::*;

const DATA_END: u64 = 0x20_0000;
const TABLE_PAGES: u64 = 16;
const TABLES_START: u64 = DATA_END;
const TABLES_END: u64 = TABLES_START + TABLE_PAGES * 0x1000;
const RAM_LEN: usize = TABLES_END as usize;
const CASES: u32 = 128;

/// SplitMix64: a small deterministic generator for the bulk of the tree,
/// seeded by proptest (generating 8K entries through strategies is slow).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A table page meant for `level` (pages are dealt out to levels
    /// round-robin; see [`build`]).
    fn table_at(&mut self, level: u64, levels: u64) -> u64 {
        let first = level - 1;
        let count = (TABLE_PAGES - first).div_ceil(levels);
        TABLES_START + (first + levels * self.below(count)) * 0x1000
    }

    /// Any page-aligned address: a table page of any level, a data page,
    /// something just beyond RAM, or anything at all.
    fn chaos_frame(&mut self, max_bits: u32) -> u64 {
        match self.below(100) {
            0..60 => TABLES_START + self.below(TABLE_PAGES) * 0x1000,
            60..80 => self.below(DATA_END / 0x1000) * 0x1000,
            80..90 => TABLES_END + self.below(4) * 0x1000,
            _ => self.next() & ((1u64 << max_bits) - 1) & !0xFFF,
        }
    }

    /// A random entry for a table of `level` in a walk of `levels`: mostly
    /// shaped like a real tree (pointing one level down, leaves at data or
    /// at large-page frames), sometimes anything.
    fn entry(&mut self, mode: PagingMode, level: u64, levels: u64) -> u64 {
        let narrow = mode == PagingMode::Bits32;
        let mut e = 0;
        for (bit, percent) in [(0, 90), (1, 85), (2, 85), (7, 20), (63, 8)] {
            if self.chance(percent) {
                e |= 1 << bit;
            }
        }
        let large = match (mode, level) {
            (PagingMode::Bits32, 2) => Some(1u64 << 22),
            (PagingMode::Pae | PagingMode::Level4 | PagingMode::Level5, 2) => Some(1 << 21),
            (PagingMode::Level4 | PagingMode::Level5, 3) => Some(1 << 30),
            _ => None,
        };
        e |= if self.chance(15) {
            self.chaos_frame(if narrow { 32 } else { 52 })
        } else if level == 1 {
            self.below(DATA_END / 0x1000) * 0x1000
        } else if let (Some(size), true) = (large, e & (1 << 7) != 0) {
            if self.chance(70) {
                0
            } else {
                self.next() & ((1u64 << if narrow { 32 } else { 40 }) - 1) & !(size - 1)
            }
        } else {
            self.table_at(level - 1, levels)
        };
        // PWT, PCD, A, D, G, the available bits, sometimes PAT of a large
        // page: never significant.
        e |= self.next() & 0xF78;
        if self.chance(10) {
            e |= 1 << 12;
        }
        if self.chance(5) {
            e |= 1 << self.below(64);
        }
        e
    }
}

/// Data bytes: a fixed pattern with a NUL roughly every 40 bytes, so
/// names end at varied lengths.
fn template() -> &'static [u8] {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let mut rng = Rng(0x5EED);
        (0..RAM_LEN)
            .map(|_| {
                let v = rng.next();
                if v.is_multiple_of(40) {
                    0
                } else {
                    (v >> 8) as u8 | 1
                }
            })
            .collect()
    })
}

#[derive(Clone, Debug)]
struct Case {
    seed: u64,
    wp: bool,
    nxe: bool,
    pse: bool,
    smep: bool,
    probes: Vec<(u64, u8)>,
    reads: Vec<(u64, usize)>,
    writes: Vec<(u64, usize, u8)>,
    names: Vec<u64>,
}

fn sign_extend(v: u64, bits: u32) -> u64 {
    (((v << (64 - bits)) as i64) >> (64 - bits)) as u64
}

/// Linear addresses: anything, canonical for 48 or 57 bits, 32-bit, and
/// the same near a page end or the 32-bit / canonical / 64-bit edges.
fn linear() -> impl Strategy<Value = u64> {
    let base = prop_oneof![
        1 => any::<u64>(),
        3 => any::<u64>().prop_map(|v| sign_extend(v, 48)),
        3 => any::<u64>().prop_map(|v| sign_extend(v, 57)),
        3 => any::<u32>().prop_map(u64::from),
        1 => Just(0xFFFF_FFFFu64),
        1 => Just(0x7FFF_FFFF_FFFFu64),
        1 => Just(0xFF_FFFF_FFFF_FFFFu64),
        1 => Just(u64::MAX),
    ];
    (base, any::<bool>(), 0u64..24).prop_map(|(v, near_end, back)| {
        if near_end {
            (v | 0xFFF).wrapping_sub(back)
        } else {
            v
        }
    })
}

/// Copy lengths: short ones (most likely to succeed on random trees) and
/// ones spanning up to three pages.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..16, 0usize..600, 0usize..9000]
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        any::<[bool; 4]>(),
        prop::collection::vec((linear(), 0u8..8), 48),
        prop::collection::vec((linear(), length()), 4),
        prop::collection::vec((linear(), length(), 0u8..8), 3),
        prop::collection::vec(linear(), 4),
    )
        .prop_map(
            |(seed, [wp, nxe, pse, smep], probes, reads, writes, names)| Case {
                seed,
                wp,
                nxe,
                pse,
                smep,
                probes,
                reads,
                writes,
                names,
            },
        )
}

fn access(bits: u8) -> Access {
    Access {
        write: bits & 1 != 0,
        user: bits & 2 != 0,
        fetch: bits & 4 != 0,
    }
}

/// Guest RAM with a random tree, and registers for `mode` pointing at it.
fn build(mode: PagingMode, case: &Case) -> (Vec<u8>, PagingRegs) {
    let mut rng = Rng(case.seed);
    let mut ram = template().to_vec();
    let levels: u64 = match mode {
        PagingMode::Disabled => 1,
        PagingMode::Bits32 => 2,
        PagingMode::Pae => 3,
        PagingMode::Level4 => 4,
        PagingMode::Level5 => 5,
    };
    // Table page k serves level k % levels + 1, though entries may point
    // anywhere.
    for page in 0..TABLE_PAGES {
        let level = page % levels + 1;
        let at = (TABLES_START + page * 0x1000) as usize;
        let table = &mut ram[at..at + 0x1000];
        if mode == PagingMode::Bits32 {
            for slot in table.chunks_exact_mut(4) {
                let e = rng.entry(mode, level, levels) as u32;
                slot.copy_from_slice(&e.to_le_bytes());
            }
        } else {
            for slot in table.chunks_exact_mut(8) {
                slot.copy_from_slice(&rng.entry(mode, level, levels).to_le_bytes());
            }
        }
    }

    let root = rng.table_at(levels, levels);
    let noise = rng.next();
    let cr3 = match mode {
        PagingMode::Disabled => noise,
        PagingMode::Bits32 => root | (noise & 0xFFFF_FFFF_0000_0FFF),
        PagingMode::Pae => root + rng.below(128) * 32 + (noise & 0xFFFF_FFFF_0000_001F),
        PagingMode::Level4 | PagingMode::Level5 => root | (noise & 0xFFF0_0000_0000_0FFF),
    };
    let cr3 = if rng.chance(3) {
        TABLES_END + 0x1000
    } else {
        cr3
    };
    if mode == PagingMode::Pae {
        // Mostly well-formed PDPTEs (no R/W, U/S, PS, NX there), or most
        // walks would stop at them.
        let pdpt = (cr3 & 0xFFFF_FFE0) as usize;
        for i in 0..4 {
            if rng.chance(80) {
                let e = rng.table_at(2, levels) | 1 | (rng.next() & 0xE18);
                if let Some(slot) = ram.get_mut(pdpt + i * 8..pdpt + i * 8 + 8) {
                    slot.copy_from_slice(&e.to_le_bytes());
                }
            }
        }
    }

    let mut regs = PagingRegs {
        cr0: PagingRegs::CR0_PE | PagingRegs::CR0_PG,
        cr3,
        cr4: 0,
        efer: 0,
    };
    match mode {
        PagingMode::Disabled => regs.cr0 = PagingRegs::CR0_PE,
        PagingMode::Bits32 => {}
        PagingMode::Pae => regs.cr4 |= PagingRegs::CR4_PAE,
        PagingMode::Level4 => {
            regs.cr4 |= PagingRegs::CR4_PAE;
            regs.efer |= PagingRegs::EFER_LME | PagingRegs::EFER_LMA;
        }
        PagingMode::Level5 => {
            regs.cr4 |= PagingRegs::CR4_PAE | PagingRegs::CR4_LA57;
            regs.efer |= PagingRegs::EFER_LME | PagingRegs::EFER_LMA;
        }
    }
    let flag = |on: bool, bit: u64| if on { bit } else { 0 };
    regs.cr0 |= flag(case.wp, PagingRegs::CR0_WP);
    regs.efer |= flag(case.nxe, PagingRegs::EFER_NXE);
    regs.cr4 |= flag(case.pse, PagingRegs::CR4_PSE) | flag(case.smep, PagingRegs::CR4_SMEP);
    assert_eq!(regs.mode(), mode);
    (ram, regs)
}

/// Reference translation byte by byte, with the linear address space
/// wrapping as the mode says. The last translation is remembered per 4 KiB
/// page (it cannot differ inside one) to keep the run short.
struct ByteWalker<'r> {
    regs: &'r PagingRegs,
    access: Access,
    mask: u64,
    last: Option<(u64, u64)>, // (linear page, its gpa)
}

impl<'r> ByteWalker<'r> {
    fn new(regs: &'r PagingRegs, access: Access) -> Self {
        let mask = if regs.mode().is_long() {
            u64::MAX
        } else {
            0xFFFF_FFFF
        };
        Self {
            regs,
            access,
            mask,
            last: None,
        }
    }

    /// The gpa of byte `i` of the range starting at `la`.
    fn gpa(&mut self, ram: &[u8], la: u64, i: usize) -> Result<u64, TranslateError> {
        let a = (la & self.mask).wrapping_add(i as u64) & self.mask;
        match self.last {
            Some((page, g)) if page == a >> 12 => Ok(g + (a & 0xFFF)),
            _ => {
                let t = reference::translate(ram, self.regs, a, self.access)?;
                self.last = Some((a >> 12, t.gpa.0 - (a & 0xFFF)));
                Ok(t.gpa.0)
            }
        }
    }
}

fn load(ram: &[u8], gpa: u64) -> Result<u8, TranslateError> {
    usize::try_from(gpa)
        .ok()
        .and_then(|i| ram.get(i).copied())
        .ok_or(unbacked(gpa))
}

fn unbacked(gpa: u64) -> TranslateError {
    TranslateError::PhysUnreadable {
        gpa: GuestPhysAddr(gpa),
    }
}

fn check(mode: PagingMode, case: &Case) -> Result<(), TestCaseError> {
    let (mut ram, regs) = build(mode, case);

    for &(la, bits) in &case.probes {
        let want = reference::translate(&ram, &regs, la, access(bits));
        let mem = IsolatedMemory::new(&mut ram);
        let got = translate(&mem, &regs, GuestLinearAddr(la), access(bits));
        prop_assert_eq!(got, want, "translate {:#x} {:?}", la, access(bits));
    }

    for &(la, len) in &case.reads {
        let mut walker = ByteWalker::new(&regs, Access::READ);
        let want: Result<Vec<u8>, _> = (0..len)
            .map(|i| load(&ram, walker.gpa(&ram, la, i)?))
            .collect();
        let mem = IsolatedMemory::new(&mut ram);
        let mut buf = vec![0u8; len];
        let got =
            read_linear(&mem, &regs, GuestLinearAddr(la), &mut buf, Access::READ).map(|()| buf);
        prop_assert_eq!(got, want, "read_linear {:#x}+{:#x}", la, len);
    }

    for &(la, len, bits) in &case.writes {
        let acc = access(bits);
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ 0xA5).collect();
        // write_linear translates every page before writing anything.
        let mut walker = ByteWalker::new(&regs, acc.as_write());
        let gpas: Result<Vec<u64>, _> = (0..len).map(|i| walker.gpa(&ram, la, i)).collect();
        // Writing into the tables would change the walk mid-copy; the
        // reference does not model that, so leave those ranges out.
        if let Ok(g) = &gpas {
            if g.iter().any(|&g| (TABLES_START..TABLES_END).contains(&g)) {
                continue;
            }
        }
        let mut want_ram = ram.clone();
        let want = gpas.and_then(|gpas| {
            for (&g, &b) in gpas.iter().zip(&data) {
                let slot = usize::try_from(g).ok().and_then(|i| want_ram.get_mut(i));
                *slot.ok_or(unbacked(g))? = b;
            }
            Ok(())
        });
        let mem = IsolatedMemory::new(&mut ram);
        let got = write_linear(&mem, &regs, GuestLinearAddr(la), &data, acc);
        prop_assert_eq!(got, want, "write_linear {:#x}+{:#x} {:?}", la, len, acc);
        match got {
            // On an unbacked byte the failing page's copy is all-or-nothing
            // while the reference went byte by byte: only the error counts.
            Err(TranslateError::PhysUnreadable { .. }) => {}
            // Success, or a failure before anything was written.
            _ => prop_assert!(
                ram == want_ram,
                "memory after write_linear {:#x}+{:#x}",
                la,
                len
            ),
        }
    }

    for &la in &case.names {
        let mem = IsolatedMemory::new(&mut ram);
        let mut buf = [0u8; 256];
        let got = read_cstr(&mem, &regs, GuestLinearAddr(la), &mut buf);
        // Reference: byte by byte until a NUL, an unreadable byte or the
        // limit.
        let mut want = Err(CStrError::TooLong);
        let mut name = Vec::new();
        let mut walker = ByteWalker::new(&regs, Access::READ);
        for i in 0..256 {
            let byte = walker.gpa(&ram, la, i).and_then(|g| load(&ram, g));
            match byte {
                Err(e) => {
                    want = Err(CStrError::Unreadable(e));
                    break;
                }
                Ok(0) => {
                    want = Ok(i);
                    break;
                }
                Ok(b) => name.push(b),
            }
        }
        prop_assert_eq!(got, want, "read_cstr {:#x}", la);
        if let Ok(n) = got {
            prop_assert_eq!(&buf[..n], &name[..]);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn random_trees_disabled(case in case()) {
        check(PagingMode::Disabled, &case)?;
    }

    #[test]
    fn random_trees_bits32(case in case()) {
        check(PagingMode::Bits32, &case)?;
    }

    #[test]
    fn random_trees_pae(case in case()) {
        check(PagingMode::Pae, &case)?;
    }

    #[test]
    fn random_trees_level4(case in case()) {
        check(PagingMode::Level4, &case)?;
    }

    #[test]
    fn random_trees_level5(case in case()) {
        check(PagingMode::Level5, &case)?;
    }
}

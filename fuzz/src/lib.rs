//! Shared input decoding for the fuzz targets: guest RAM, paging
//! registers, holes, a linear range and an access, all from the fuzzer's
//! bytes ([`Setup`]); memory maps and boot images ([`boot`], which reuses
//! the builders of thinvisor-boot's own tests); the VMM's log and a logger
//! that checks its locks ([`vmm`]).
//!
//! Inputs are shaped so that short ones already make real walks: RAM is
//! small (at most 64 KiB), memory is written as a list of (slot, value)
//! entries rather than byte by byte, and entries, CR3 and addresses can be
//! "folded" (their frame bits cleared above 64 KiB) so they point back
//! into RAM. Unfolded values stay fully hostile.

use std::ops::Range;

pub mod boot;
pub mod vmm;

/// thinvisor-boot's test builders (multiboot information, ELF and a.out
/// images, bzImages, sparse physical memory), shared rather than copied.
#[path = "../../crates/boot/tests/common/mod.rs"]
#[allow(clippy::new_without_default)]
pub mod common;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use thinvisor_memory::{Access, PagingMode, PagingRegs};

/// Bits 16..=51: clearing them keeps a frame inside the first 64 KiB.
const FOLD_64: u64 = 0x000F_FFFF_FFFF_0000;
/// Bits 16..=31, for the 4-byte entries of 32-bit paging.
const FOLD_32: u32 = 0xFFFF_0000;

/// One decoded input.
#[derive(Debug)]
pub struct Setup {
    /// Guest RAM at guest-physical 0.
    pub ram: Vec<u8>,
    /// Guest-physical ranges the VMM must not reach.
    pub holes: Vec<Range<u64>>,
    /// The guest's paging registers.
    pub regs: PagingRegs,
    /// A linear address.
    pub la: u64,
    /// A length for copies.
    pub len: usize,
    /// The access kind.
    pub access: Access,
}

fn mode_regs(u: &mut Unstructured<'_>) -> Result<PagingRegs> {
    let mut regs = PagingRegs {
        cr0: u.arbitrary()?,
        cr3: u.arbitrary()?,
        cr4: u.arbitrary()?,
        efer: u.arbitrary()?,
    };
    // Pick the mode evenly (raw bits would leave paging off half the time).
    let (pg, pae, lma, la57) = match u.int_in_range(0u8..=4)? {
        0 => (false, false, false, false),
        1 => (true, false, false, false),
        2 => (true, true, false, false),
        3 => (true, true, true, false),
        _ => (true, true, true, true),
    };
    let set = |v: &mut u64, bit: u64, on: bool| {
        if on {
            *v |= bit;
        } else {
            *v &= !bit;
        }
    };
    set(&mut regs.cr0, PagingRegs::CR0_PG, pg);
    set(&mut regs.cr4, PagingRegs::CR4_PAE, pae);
    set(&mut regs.efer, PagingRegs::EFER_LMA, lma);
    set(&mut regs.cr4, PagingRegs::CR4_LA57, la57);
    if u.arbitrary()? {
        regs.cr3 &= !FOLD_64;
    }
    Ok(regs)
}

impl Setup {
    /// Decodes one input; `max_len` bounds [`Setup::len`].
    pub fn new(u: &mut Unstructured<'_>, max_len: usize) -> Result<Self> {
        let regs = mode_regs(u)?;
        // 1..=16 pages, sometimes a few bytes short of a page boundary so
        // entries and copies straddle the end of RAM.
        let pages = usize::from(u.int_in_range(1u8..=16)?);
        let short = usize::from(u.int_in_range(0u8..=9)?);
        let ram_len = pages * 4096 - if short > 7 { 0 } else { short };
        let mut ram = vec![0u8; ram_len];

        let mut holes = Vec::new();
        for _ in 0..u.int_in_range(0u8..=2)? {
            let start = u.int_in_range(0..=ram_len as u64)?;
            let len = u.int_in_range(0u64..=0x2000)?;
            holes.push(start..start.saturating_add(len));
        }

        let la = match u.int_in_range(0u8..=3)? {
            0 => u.arbitrary()?,
            // Low addresses: the first entries of every table.
            1 => u.int_in_range(0u64..=0x40_0000)?,
            // Near the top of the 32-bit space or of the 64-bit space.
            2 => u64::from(u32::MAX - u.int_in_range(0u32..=0x2000)?),
            _ => u64::MAX - u.int_in_range(0u64..=0x2000)?,
        };
        // Mostly short ranges: the targets' per-byte models are slow, and
        // short copies still cross pages when `la` is near a page end.
        let len = match u.int_in_range(0u8..=3)? {
            0 | 1 => u.int_in_range(0..=max_len.min(64))?,
            2 => u.int_in_range(0..=max_len.min(600))?,
            _ => u.int_in_range(0..=max_len)?,
        };
        let bits: u8 = u.arbitrary()?;
        let access = Access {
            write: bits & 1 != 0,
            user: bits & 2 != 0,
            fetch: bits & 4 != 0,
        };

        // The rest: (slot, value) writes. The slot's top bit asks for the
        // value to be folded into RAM.
        let narrow = regs.mode() == PagingMode::Bits32;
        while !u.is_empty() {
            let slot: u16 = u.arbitrary()?;
            let value: u64 = u.arbitrary()?;
            let fold = slot & 0x8000 != 0;
            let at = usize::from(slot & 0x7FFF) * 8 % ram_len;
            let bytes = if narrow {
                let mut lo = value as u32;
                let mut hi = (value >> 32) as u32;
                if fold {
                    lo &= !FOLD_32;
                    hi &= !FOLD_32;
                }
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&lo.to_le_bytes());
                b[4..].copy_from_slice(&hi.to_le_bytes());
                b
            } else if fold {
                (value & !FOLD_64).to_le_bytes()
            } else {
                value.to_le_bytes()
            };
            // `at` < ram_len; the write may be cut at the end of RAM.
            let end = (at + 8).min(ram_len);
            ram[at..end].copy_from_slice(&bytes[..end - at]);
        }
        Ok(Self {
            ram,
            holes,
            regs,
            la,
            len,
            access,
        })
    }

    /// Bits of a linear address that count in this mode (the copies wrap
    /// at 4 GiB outside long mode).
    pub fn linear_mask(&self) -> u64 {
        if self.regs.mode().is_long() {
            u64::MAX
        } else {
            0xFFFF_FFFF
        }
    }
}

/// Split a fuzz input the way the call-driving targets do: the first two
/// bytes say where the calls end; the calls, then the bytes [`Setup`]
/// builds guest memory from. None when the input is too short.
pub fn split_calls(data: &[u8]) -> Option<(&[u8], &[u8])> {
    if data.len() < 3 {
        return None;
    }
    let split = usize::from(u16::from_le_bytes([data[0], data[1]])) % (data.len() - 1);
    Some(data[2..].split_at(split.min(data.len() - 2)))
}

//! Test support: a deliberately simple reference walker, written straight
//! from the SDM tables and independent of `paging.rs`: one branch per mode,
//! entries collected in a list, reserved bits checked bit by bit. The
//! property tests and the fuzz targets compare [`crate::translate`] with
//! it.
//!
//! Available under `cfg(test)` and the `testing` feature.

use crate::{Access, GuestLinearAddr, GuestPhysAddr, PagingRegs, TranslateError, Translation};

fn bit(v: u64, n: u32) -> bool {
    (v >> n) & 1 == 1
}

fn any_bit(v: u64, lo: u32, hi: u32) -> bool {
    (lo..=hi).any(|n| bit(v, n))
}

/// Little-endian read of `size` bytes at `addr`, if it is all in `ram`.
fn load(ram: &[u8], addr: u64, size: usize) -> Option<u64> {
    let start = usize::try_from(addr).ok()?;
    let bytes = ram.get(start..start.checked_add(size)?)?;
    Some(
        bytes
            .iter()
            .rev()
            .fold(0, |acc, &b| acc << 8 | u64::from(b)),
    )
}

const ADDR: u64 = 0x000F_FFFF_FFFF_F000; // bits 51:12

/// Entries that grant rights on one walk (at most 5 levels).
struct Path {
    entries: [u64; 5],
    len: usize,
}

impl Path {
    fn push(&mut self, e: u64) {
        // A walk has at most 5 levels; a sixth entry cannot happen.
        if let Some(slot) = self.entries.get_mut(self.len) {
            *slot = e;
            self.len += 1;
        }
    }

    fn iter(&self) -> impl Iterator<Item = &u64> {
        self.entries.iter().take(self.len)
    }
}

/// What the MMU would do for `la` with guest RAM `ram` at guest-physical
/// 0 (MAXPHYADDR 52, like [`crate::translate`]).
pub fn translate(
    ram: &[u8],
    regs: &PagingRegs,
    la: u64,
    access: Access,
) -> Result<Translation, TranslateError> {
    let pg = bit(regs.cr0, 31);
    let wp = bit(regs.cr0, 16);
    let pse = bit(regs.cr4, 4);
    let pae = bit(regs.cr4, 5);
    let la57 = bit(regs.cr4, 12);
    let smep = bit(regs.cr4, 20);
    let lma = bit(regs.efer, 10);
    let nxe = bit(regs.efer, 11);

    if !pg {
        return Ok(Translation {
            gpa: GuestPhysAddr(la % (1 << 32)),
            page_size: 4096,
            writable: true,
            user: true,
            executable: true,
        });
    }
    let long = pae && lma;
    let la = if long { la } else { la % (1 << 32) };
    let lin = GuestLinearAddr(la);

    let id = access.fetch && ((pae && nxe) || smep);
    let fault = |present: bool, rsvd: bool| TranslateError::PageFault {
        la: lin,
        error_code: u32::from(present)
            | u32::from(access.write) << 1
            | u32::from(access.user) << 2
            | u32::from(rsvd) << 3
            | u32::from(id) << 4,
    };
    let read = |addr: u64, size: usize| {
        load(ram, addr, size).ok_or(TranslateError::TableUnreadable {
            la: lin,
            table_gpa: GuestPhysAddr(addr),
        })
    };

    // Entries that grant rights, and the final page.
    let mut path = Path {
        entries: [0; 5],
        len: 0,
    };
    let base: u64;
    let size: u64;
    if !pae {
        let pde = read((regs.cr3 & 0xFFFF_F000) + (la >> 22) * 4, 4)?;
        if !bit(pde, 0) {
            return Err(fault(false, false));
        }
        if pse && bit(pde, 7) {
            if bit(pde, 21) {
                return Err(fault(true, true));
            }
            path.push(pde);
            base = (pde & 0xFFC0_0000) + ((pde >> 13) & 0xFF) * (1 << 32);
            size = 1 << 22;
        } else {
            path.push(pde);
            let pte = read((pde & 0xFFFF_F000) + ((la >> 12) % 1024) * 4, 4)?;
            if !bit(pte, 0) {
                return Err(fault(false, false));
            }
            path.push(pte);
            base = pte & 0xFFFF_F000;
            size = 4096;
        }
    } else if !lma {
        let pdpte = read((regs.cr3 & 0xFFFF_FFE0) + (la >> 30) * 8, 8)?;
        if !bit(pdpte, 0) {
            return Err(fault(false, false));
        }
        if bit(pdpte, 1) || bit(pdpte, 2) || any_bit(pdpte, 52, 63) {
            return Err(fault(true, true));
        }
        let bad = |e: u64| any_bit(e, 52, 62) || (!nxe && bit(e, 63));
        let pde = read((pdpte & ADDR) + ((la >> 21) % 512) * 8, 8)?;
        if !bit(pde, 0) {
            return Err(fault(false, false));
        }
        if bad(pde) || (bit(pde, 7) && any_bit(pde, 13, 20)) {
            return Err(fault(true, true));
        }
        path.push(pde);
        if bit(pde, 7) {
            base = pde & ADDR & !((1 << 21) - 1);
            size = 1 << 21;
        } else {
            let pte = read((pde & ADDR) + ((la >> 12) % 512) * 8, 8)?;
            if !bit(pte, 0) {
                return Err(fault(false, false));
            }
            if bad(pte) {
                return Err(fault(true, true));
            }
            path.push(pte);
            base = pte & ADDR;
            size = 4096;
        }
    } else {
        let levels: u32 = if la57 { 5 } else { 4 };
        let width = if la57 { 57 } else { 48 };
        let sign_extended = (((la << (64 - width)) as i64) >> (64 - width)) as u64;
        if sign_extended != la {
            return Err(TranslateError::NonCanonical { la: lin });
        }
        let mut table = regs.cr3 & ADDR;
        let mut level = levels;
        loop {
            let shift = 12 + 9 * (level - 1);
            let e = read(table + ((la >> shift) % 512) * 8, 8)?;
            if !bit(e, 0) {
                return Err(fault(false, false));
            }
            let ps = bit(e, 7);
            let rsvd = (!nxe && bit(e, 63))
                || (level >= 4 && ps)
                || (level == 3 && ps && any_bit(e, 13, 29))
                || (level == 2 && ps && any_bit(e, 13, 20));
            if rsvd {
                return Err(fault(true, true));
            }
            path.push(e);
            if level == 1 || ps {
                size = 1 << shift;
                base = e & ADDR & !(size - 1);
                break;
            }
            table = e & ADDR;
            level -= 1;
        }
    }

    let writable = path.iter().all(|&e| bit(e, 1));
    let user = path.iter().all(|&e| bit(e, 2));
    let executable = !(pae && nxe && path.iter().any(|&e| bit(e, 63)));
    if access.user && !user {
        return Err(fault(true, false));
    }
    if access.write && !writable && (access.user || wp) {
        return Err(fault(true, false));
    }
    if access.fetch && !executable {
        return Err(fault(true, false));
    }
    Ok(Translation {
        gpa: GuestPhysAddr(base + la % size),
        page_size: size,
        writable,
        user,
        executable,
    })
}

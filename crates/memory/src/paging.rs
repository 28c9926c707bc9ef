//! Guest page-table walks (Intel SDM vol. 3 ch. 4, AMD APM vol. 2 ch. 5).
//!
//! Every value read from the guest is treated as hostile: the walk is a
//! fixed number of steps (at most 5 levels, so self-referencing tables
//! cannot loop), arithmetic is masking only, and every failure is a
//! [`TranslateError`].
//!
//! Not modelled: SMEP/SMAP/protection keys (the VMM acts for the guest with
//! the rights the caller asks for), accessed/dirty bit updates (the
//! primitive is there, [`GuestPhysMemory::compare_exchange_u64_phys`]), the
//! PDPTE registers of PAE paging (the PDPTEs are read from memory on every
//! walk). Each entry is read with one atomic load, so an entry the guest
//! or another vCPU changes meanwhile is seen whole, old or new.

use core::fmt;

use crate::{GuestLinearAddr, GuestPhysAddr, GuestPhysMemory};

/// Physical-address width assumed for reserved-bit checks. 52 is the
/// architectural maximum, so no real address bit is ever called reserved.
pub const MAXPHYADDR: u32 = 52;

/// Bits of the #PF error code that [`TranslateError::PageFault`] carries.
pub mod pf_error {
    /// The fault was a protection or reserved-bit violation (not a
    /// not-present entry).
    pub const PRESENT: u32 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u32 = 1 << 1;
    /// The access was a user-mode access.
    pub const USER: u32 = 1 << 2;
    /// A reserved bit was set in a paging-structure entry.
    pub const RESERVED: u32 = 1 << 3;
    /// The access was an instruction fetch (only reported when NX or SMEP
    /// is in effect, as hardware does).
    pub const FETCH: u32 = 1 << 4;
}

const PAGE_4K: u64 = 1 << 12;
const PAGE_2M: u64 = 1 << 21;
const PAGE_4M: u64 = 1 << 22;
const LOW_32: u64 = 0xFFFF_FFFF;

const E_P: u64 = 1 << 0;
const E_RW: u64 = 1 << 1;
const E_US: u64 = 1 << 2;
const E_PS: u64 = 1 << 7;
const E_XD: u64 = 1 << 63;

/// Mask of bits `hi..=lo`; empty when `hi < lo` (e.g. "51:M" with M = 52).
const fn bits(hi: u32, lo: u32) -> u64 {
    if hi < lo || hi > 63 {
        0
    } else {
        (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
    }
}

/// The guest's paging-relevant control registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingRegs {
    /// CR0 (PG, WP matter here).
    pub cr0: u64,
    /// CR3 (the root of the paging structures).
    pub cr3: u64,
    /// CR4 (PSE, PAE, LA57, SMEP matter here).
    pub cr4: u64,
    /// IA32_EFER (LMA, NXE matter here).
    pub efer: u64,
}

/// Which of the five x86 paging modes the guest is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// CR0.PG = 0: linear = physical, truncated to 32 bits.
    Disabled,
    /// 32-bit paging (CR4.PAE = 0), 4 KiB and (with CR4.PSE) 4 MiB pages.
    Bits32,
    /// PAE paging outside long mode, 4 KiB and 2 MiB pages.
    Pae,
    /// 4-level paging (long mode), 48-bit linear addresses.
    Level4,
    /// 5-level paging (long mode with CR4.LA57), 57-bit linear addresses.
    Level5,
}

impl PagingMode {
    /// True for the long-mode modes, where linear addresses are 64 bits
    /// wide (canonical) rather than 32.
    pub const fn is_long(self) -> bool {
        matches!(self, Self::Level4 | Self::Level5)
    }
}

impl PagingRegs {
    /// CR0.PE: protected mode.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0.WP: supervisor writes honour read-only pages.
    pub const CR0_WP: u64 = 1 << 16;
    /// CR0.PG: paging on.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PSE: 4 MiB pages in 32-bit paging.
    pub const CR4_PSE: u64 = 1 << 4;
    /// CR4.PAE: 64-bit paging-structure entries.
    pub const CR4_PAE: u64 = 1 << 5;
    /// CR4.LA57: 5-level paging in long mode.
    pub const CR4_LA57: u64 = 1 << 12;
    /// CR4.SMEP: only affects the I/D bit of reported error codes here.
    pub const CR4_SMEP: u64 = 1 << 20;
    /// EFER.LME: long mode enable.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA: long mode active.
    pub const EFER_LMA: u64 = 1 << 10;
    /// EFER.NXE: execute-disable bit enabled.
    pub const EFER_NXE: u64 = 1 << 11;

    /// The paging mode these registers select (CR0.PG, CR4.PAE, EFER.LMA,
    /// CR4.LA57). Inconsistent combinations hardware would refuse are read
    /// as the mode the lower-level bit selects.
    pub fn mode(&self) -> PagingMode {
        if self.cr0 & Self::CR0_PG == 0 {
            PagingMode::Disabled
        } else if self.cr4 & Self::CR4_PAE == 0 {
            PagingMode::Bits32
        } else if self.efer & Self::EFER_LMA == 0 {
            PagingMode::Pae
        } else if self.cr4 & Self::CR4_LA57 == 0 {
            PagingMode::Level4
        } else {
            PagingMode::Level5
        }
    }

    /// CR0.WP.
    pub fn write_protect(&self) -> bool {
        self.cr0 & Self::CR0_WP != 0
    }

    /// EFER.NXE.
    pub fn nx_enabled(&self) -> bool {
        self.efer & Self::EFER_NXE != 0
    }
}

/// The kind of access being made through a translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// A write (needs R/W where the rules require it).
    pub write: bool,
    /// A user-mode (CPL 3) access (needs U/S at every level).
    pub user: bool,
    /// An instruction fetch (fails on NX when EFER.NXE).
    pub fetch: bool,
}

impl Access {
    /// Supervisor data read.
    pub const READ: Self = Self {
        write: false,
        user: false,
        fetch: false,
    };
    /// Supervisor data write.
    pub const WRITE: Self = Self {
        write: true,
        user: false,
        fetch: false,
    };
    /// Supervisor instruction fetch.
    pub const FETCH: Self = Self {
        write: false,
        user: false,
        fetch: true,
    };
    /// User-mode data read.
    pub const USER_READ: Self = Self::READ.as_user();
    /// User-mode data write.
    pub const USER_WRITE: Self = Self::WRITE.as_user();
    /// User-mode instruction fetch.
    pub const USER_FETCH: Self = Self::FETCH.as_user();

    /// The same access made from user mode.
    pub const fn as_user(self) -> Self {
        self.with_user(true)
    }

    /// The same access made from user mode when `user` (e.g. CPL == 3).
    pub const fn with_user(self, user: bool) -> Self {
        Self { user, ..self }
    }

    /// The same access as a write.
    pub const fn as_write(self) -> Self {
        Self {
            write: true,
            ..self
        }
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address of the translated byte.
    pub gpa: GuestPhysAddr,
    /// Size of the page that maps it: 4 KiB, 2 MiB, 4 MiB or 1 GiB (4 KiB
    /// when paging is off). Every byte of that page translates alike.
    pub page_size: u64,
    /// R/W was set at every level (the raw rights; whether a supervisor
    /// write needs them depends on CR0.WP).
    pub writable: bool,
    /// U/S was set at every level.
    pub user: bool,
    /// No level had NX set while EFER.NXE is on.
    pub executable: bool,
}

/// Why a guest-linear address could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslateError {
    /// Not canonical for the current mode (hardware raises #GP/#SS).
    NonCanonical {
        /// The first non-canonical address.
        la: GuestLinearAddr,
    },
    /// A page fault the hardware would raise: `error_code` is the #PF
    /// error code (P, W/R, U/S, RSVD, I/D bits, see [`pf_error`]) it would
    /// push.
    PageFault {
        /// The faulting address (what CR2 would hold).
        la: GuestLinearAddr,
        /// The #PF error code.
        error_code: u32,
    },
    /// A paging-structure entry lies outside guest RAM (the walk cannot
    /// read it).
    TableUnreadable {
        /// The address being translated.
        la: GuestLinearAddr,
        /// Guest-physical address of the entry that could not be read.
        table_gpa: GuestPhysAddr,
    },
    /// The translation succeeded but the data lies outside guest RAM.
    PhysUnreadable {
        /// The first byte not backed by guest RAM.
        gpa: GuestPhysAddr,
    },
}

impl fmt::Display for TranslateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NonCanonical { la } => write!(f, "non-canonical linear address {la}"),
            Self::PageFault { la, error_code } => {
                write!(f, "page fault at {la} (error code {error_code:#x})")
            }
            Self::TableUnreadable { la, table_gpa } => write!(
                f,
                "paging entry at guest-physical {table_gpa} for {la} is outside guest RAM"
            ),
            Self::PhysUnreadable { gpa } => {
                write!(f, "guest-physical {gpa} is outside guest RAM")
            }
        }
    }
}

impl core::error::Error for TranslateError {}

/// Translates `la` for `access` the way the guest's MMU would, walking the
/// guest's page tables in guest-physical memory.
///
/// Outside long mode only the low 32 bits of `la` are used. The resulting
/// `gpa` is not checked against guest RAM (it may be MMIO).
pub fn translate<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
) -> Result<Translation, TranslateError> {
    translate_with_maxphyaddr(mem, regs, la, access, MAXPHYADDR)
}

/// [`translate`] with an explicit MAXPHYADDR (clamped to 32..=52), so the
/// reserved-bit rules for narrower machines can be tested.
pub(crate) fn translate_with_maxphyaddr<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
    maxphyaddr: u32,
) -> Result<Translation, TranslateError> {
    let mode = regs.mode();
    // Outside long mode linear addresses are 32 bits; errors report the
    // truncated address, as CR2 would hold it.
    let la = if mode.is_long() {
        la
    } else {
        GuestLinearAddr(la.0 & LOW_32)
    };
    let walk = Walk {
        mem,
        regs,
        mode,
        la,
        access,
        maxphy: maxphyaddr.clamp(32, 52),
    };
    match mode {
        PagingMode::Disabled => Ok(Translation {
            gpa: GuestPhysAddr(la.0),
            page_size: PAGE_4K,
            writable: true,
            user: true,
            executable: true,
        }),
        PagingMode::Bits32 => walk.bits32(),
        PagingMode::Pae => walk.pae(),
        PagingMode::Level4 => walk.long(4),
        PagingMode::Level5 => walk.long(5),
    }
}

/// The rights accumulated over the levels walked so far.
#[derive(Clone, Copy)]
struct Rights {
    writable: bool,
    user: bool,
    executable: bool,
}

impl Rights {
    const ALL: Self = Self {
        writable: true,
        user: true,
        executable: true,
    };

    /// Folds in one entry; `xd` says whether bit 63 means execute-disable.
    fn add(&mut self, entry: u64, xd: bool) {
        self.writable &= entry & E_RW != 0;
        self.user &= entry & E_US != 0;
        if xd && entry & E_XD != 0 {
            self.executable = false;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    NotPresent,
    Protection,
    Reserved,
}

struct Walk<'a, M: ?Sized> {
    mem: &'a M,
    regs: &'a PagingRegs,
    mode: PagingMode,
    la: GuestLinearAddr,
    access: Access,
    maxphy: u32,
}

impl<M: GuestPhysMemory + ?Sized> Walk<'_, M> {
    /// The #PF hardware would raise for this access.
    fn fault(&self, kind: Fault) -> TranslateError {
        let a = self.access;
        let mut code = 0;
        if kind != Fault::NotPresent {
            code |= pf_error::PRESENT;
        }
        if kind == Fault::Reserved {
            code |= pf_error::RESERVED;
        }
        if a.write {
            code |= pf_error::WRITE;
        }
        if a.user {
            code |= pf_error::USER;
        }
        // SDM 4.7: I/D is reported only with SMEP, or NXE under PAE-style
        // paging.
        let nx_paging = self.regs.nx_enabled() && self.mode != PagingMode::Bits32;
        let smep = self.regs.cr4 & PagingRegs::CR4_SMEP != 0;
        if a.fetch && (nx_paging || smep) {
            code |= pf_error::FETCH;
        }
        TranslateError::PageFault {
            la: self.la,
            error_code: code,
        }
    }

    /// Reads the entry at `gpa`, requires it present and free of the
    /// `reserved` bits.
    fn entry(&self, gpa: u64, wide: bool, reserved: u64) -> Result<u64, TranslateError> {
        let at = GuestPhysAddr(gpa);
        let read = if wide {
            self.mem.read_u64_phys(at)
        } else {
            self.mem.read_u32_phys(at).map(u64::from)
        };
        let e = read.map_err(|_| TranslateError::TableUnreadable {
            la: self.la,
            table_gpa: at,
        })?;
        if e & E_P == 0 {
            return Err(self.fault(Fault::NotPresent));
        }
        if e & reserved != 0 {
            return Err(self.fault(Fault::Reserved));
        }
        Ok(e)
    }

    /// Applies the permission rules to the combined rights of a finished
    /// walk.
    fn finish(&self, gpa: u64, page_size: u64, r: Rights) -> Result<Translation, TranslateError> {
        let a = self.access;
        let denied = (a.user && !r.user)
            || (a.write && !r.writable && (a.user || self.regs.write_protect()))
            || (a.fetch && !r.executable);
        if denied {
            return Err(self.fault(Fault::Protection));
        }
        Ok(Translation {
            gpa: GuestPhysAddr(gpa),
            page_size,
            writable: r.writable,
            user: r.user,
            executable: r.executable,
        })
    }

    /// 32-bit paging: 10+10+12 bits, 4-byte entries, optional 4 MiB pages.
    fn bits32(&self) -> Result<Translation, TranslateError> {
        let la = self.la.0;
        let mut rights = Rights::ALL;
        let pd = self.regs.cr3 & 0xFFFF_F000;
        let pde = self.entry(pd | ((la >> 22) << 2), false, 0)?;
        if self.regs.cr4 & PagingRegs::CR4_PSE != 0 && pde & E_PS != 0 {
            // PSE-36: PDE bits 20:13 are physical bits 39:32; bit 21 and
            // anything at or above min(MAXPHYADDR, 40) are reserved.
            let frame = (pde & 0xFFC0_0000) | (((pde >> 13) & 0xFF) << 32);
            let phys_bits = if self.maxphy < 40 { self.maxphy } else { 40 };
            if pde & (1 << 21) != 0 || frame & !bits(phys_bits - 1, 0) != 0 {
                return Err(self.fault(Fault::Reserved));
            }
            rights.add(pde, false);
            return self.finish(frame | (la & (PAGE_4M - 1)), PAGE_4M, rights);
        }
        rights.add(pde, false);
        let pt = pde & 0xFFFF_F000;
        let pte = self.entry(pt | (((la >> 12) & 0x3FF) << 2), false, 0)?;
        rights.add(pte, false);
        self.finish((pte & 0xFFFF_F000) | (la & (PAGE_4K - 1)), PAGE_4K, rights)
    }

    /// PAE paging: 2+9+9+12 bits, 8-byte entries, 4 PDPTEs at CR3[31:5].
    fn pae(&self) -> Result<Translation, TranslateError> {
        let la = self.la.0;
        let m = self.maxphy;
        let nxe = self.regs.nx_enabled();
        let frame_mask = bits(m - 1, 12);
        let mut rights = Rights::ALL;

        let pdpt = self.regs.cr3 & 0xFFFF_FFE0;
        // Intel reserves PDPTE bits 8:5 as well, but AMD's legacy PAE
        // PDPE has A there and QEMU sets it while walking: the walker must
        // translate what the guest's processor translated, so only the
        // bits both vendors reserve fault.
        let pdpte_rsvd = bits(2, 1) | bits(63, m);
        let pdpte = self.entry(pdpt | ((la >> 30) << 3), true, pdpte_rsvd)?;

        let rsvd = bits(62, m) | if nxe { 0 } else { E_XD };
        let pd = pdpte & frame_mask;
        // Bits 20:13 are reserved only in a 2 MiB PDE; read the entry
        // first, then check them.
        let pde = self.entry(pd | (((la >> 21) & 0x1FF) << 3), true, rsvd)?;
        if pde & E_PS != 0 {
            if pde & bits(20, 13) != 0 {
                return Err(self.fault(Fault::Reserved));
            }
            rights.add(pde, nxe);
            let frame = pde & frame_mask & !(PAGE_2M - 1);
            return self.finish(frame | (la & (PAGE_2M - 1)), PAGE_2M, rights);
        }
        rights.add(pde, nxe);
        let pt = pde & frame_mask;
        let pte = self.entry(pt | (((la >> 12) & 0x1FF) << 3), true, rsvd)?;
        rights.add(pte, nxe);
        self.finish((pte & frame_mask) | (la & (PAGE_4K - 1)), PAGE_4K, rights)
    }

    /// 4- or 5-level paging: 9 bits per level, 1 GiB pages at the PDPTE,
    /// 2 MiB pages at the PDE.
    fn long(&self, levels: u32) -> Result<Translation, TranslateError> {
        let la = self.la.0;
        // Canonical: bits 63 down to the top implemented bit all equal.
        let top_bit = 12 + 9 * levels - 1;
        let high = la >> top_bit;
        if high != 0 && high != u64::MAX >> top_bit {
            return Err(TranslateError::NonCanonical { la: self.la });
        }
        let m = self.maxphy;
        let nxe = self.regs.nx_enabled();
        let frame_mask = bits(m - 1, 12);
        let rsvd = bits(51, m) | if nxe { 0 } else { E_XD };
        let mut rights = Rights::ALL;
        let mut table = self.regs.cr3 & frame_mask;
        // Levels `levels`..=2; level 1 (the PTE) follows the loop. The walk
        // is at most 5 reads whatever the entries say.
        for level in (2..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let index = (la >> shift) & 0x1FF;
            // PS is reserved in PML5Es and PML4Es.
            let level_rsvd = if level >= 4 { rsvd | E_PS } else { rsvd };
            let e = self.entry(table | (index << 3), true, level_rsvd)?;
            if e & E_PS != 0 {
                // 1 GiB (level 3) or 2 MiB (level 2) page: bits
                // (shift-1):13 are reserved, bit 12 is PAT.
                if e & bits(shift - 1, 13) != 0 {
                    return Err(self.fault(Fault::Reserved));
                }
                rights.add(e, nxe);
                let size = 1u64 << shift;
                let frame = e & frame_mask & !(size - 1);
                return self.finish(frame | (la & (size - 1)), size, rights);
            }
            rights.add(e, nxe);
            table = e & frame_mask;
        }
        let pte = self.entry(table | (((la >> 12) & 0x1FF) << 3), true, rsvd)?;
        rights.add(pte, nxe);
        self.finish((pte & frame_mask) | (la & (PAGE_4K - 1)), PAGE_4K, rights)
    }
}

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

use crate::{
    DirectMap, GuestLinearAddr, GuestPhysAddr, GuestPhysMemory, PhysAccessError, PhysWindow,
};

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
const PAGE_1G: u64 = 1 << 30;
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
///
/// A memory object with a [`DirectMap`](crate::DirectMap) is walked
/// through it: each entry is a range check and a load, inline.
#[inline(always)]
pub fn translate<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
) -> Result<Translation, TranslateError> {
    if regs.cr0 & PagingRegs::CR0_PG == 0 {
        // Paging off: no walk, no call (as `translate_in` answers).
        return Ok(unpaged(la));
    }
    match mem.direct_map() {
        Some(direct) => translate_direct(&direct, regs, la, access),
        None => translate_at(mem, regs, la, access),
    }
}

/// The walk through a [`DirectMap`]: entries in its clear range are read
/// inline ([`ClearEntries`]); a walk that meets an entry outside it is
/// made again through the layout, which reads any RAM (or finds the
/// entry unreadable). Both walks read guest memory the guest may change
/// in between; the result is that of the second, a walk like any other.
#[inline(always)]
fn translate_direct(
    direct: &DirectMap<'_>,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
) -> Result<Translation, TranslateError> {
    match long_clear(direct, regs, la.0, access) {
        Some(t) => Ok(t),
        None => translate_direct_walk(direct, regs, la, access),
    }
}

/// The usual translation of a 64-bit guest, inline: 4-level or 5-level
/// paging (Linux uses 5 levels wherever the processor has LA57, QEMU's
/// `-cpu max` included), every entry in the clear range, present, free of
/// reserved bits, and the rights the access needs granted. `None` for
/// anything else (another mode, a non-canonical address, a fault, an
/// entry elsewhere): the full walk then decides, reading the entries
/// again. When this answers, the full walk would answer the same (the
/// rules are those of `Walk::long` with MAXPHYADDR 52: nothing but XD
/// without EFER.NXE is reserved in bits 63:12 of the frame-holding
/// entries, and PS is reserved in PML5Es and PML4Es, SDM vol. 3A, 4.5).
///
/// Per level: an index, one compare and one load ([`DirectMap::clear_word`]),
/// one compare for present and reserved, an XOR and an AND for the rights.
#[inline(always)]
fn long_clear(
    direct: &DirectMap<'_>,
    regs: &PagingRegs,
    la: u64,
    access: Access,
) -> Option<Translation> {
    const FRAME: u64 = 0x000F_FFFF_FFFF_F000;
    let long = regs.cr0 & PagingRegs::CR0_PG != 0
        && regs.cr4 & PagingRegs::CR4_PAE != 0
        && regs.efer & PagingRegs::EFER_LMA != 0;
    let la57 = regs.cr4 & PagingRegs::CR4_LA57 != 0;
    // Canonical: bits 63:47 (63:56 with LA57) all equal.
    let canonical = if la57 {
        (la >> 56).wrapping_add(1) & 0xFF <= 1
    } else {
        (la >> 47).wrapping_add(1) & 0x1_FFFF <= 1
    };
    if !long || !canonical {
        return None;
    }
    // Reserved in every entry: XD without EFER.NXE; PS too in the PML4E.
    let rsvd = if regs.nx_enabled() { 0 } else { E_XD } | E_P;
    let entry = |table: u64, shift: u32, reserved: u64| -> Option<u64> {
        let e = direct.clear_word((table & FRAME) | ((la >> shift) & 0xFF8))?;
        (e & reserved == E_P).then_some(e)
    };
    let mut rights = Rights::ALL;
    let mut top = regs.cr3;
    if la57 {
        let pml5e = entry(top, 48 - 3, rsvd | E_PS)?;
        rights.add(pml5e);
        top = pml5e;
    }
    let pml4e = entry(top, 39 - 3, rsvd | E_PS)?;
    rights.add(pml4e);
    let pdpte = entry(pml4e, 30 - 3, rsvd)?;
    rights.add(pdpte);
    let (frame, size) = if pdpte & E_PS != 0 {
        // 1 GiB page: bits 29:13 reserved.
        let gate = reserved_gate(pdpte, bits(29, 13))?;
        (pdpte & FRAME & !(PAGE_1G - 1) | gate, PAGE_1G)
    } else {
        let pde = entry(pdpte, 21 - 3, rsvd)?;
        rights.add(pde);
        if pde & E_PS != 0 {
            // 2 MiB page: bits 20:13 reserved.
            let gate = reserved_gate(pde, bits(20, 13))?;
            (pde & FRAME & !(PAGE_2M - 1) | gate, PAGE_2M)
        } else {
            let pte = entry(pde, 12 - 3, rsvd)?;
            rights.add(pte);
            (pte & FRAME, PAGE_4K)
        }
    };
    let need = (u64::from(access.user) * E_US)
        | (u64::from(access.write && (access.user || regs.write_protect())) * E_RW)
        | (u64::from(access.fetch) * E_XD);
    if rights.0 & need != need {
        return None;
    }
    Some(Translation {
        gpa: GuestPhysAddr(frame | (la & (size - 1))),
        page_size: size,
        writable: rights.writable(),
        user: rights.user(),
        executable: rights.executable(),
    })
}

/// `Some(0)` when none of `reserved` is set in `e`: a term to OR into a
/// frame, so a large page with reserved bits leaves the inline walk.
#[inline(always)]
fn reserved_gate(e: u64, reserved: u64) -> Option<u64> {
    (e & reserved == 0).then_some(0)
}

/// The full walk through a [`DirectMap`] (see [`translate_direct`]).
#[inline(never)]
fn translate_direct_walk(
    direct: &DirectMap<'_>,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
) -> Result<Translation, TranslateError> {
    match translate_at(&ClearEntries(*direct), regs, la, access) {
        Err(TranslateError::TableUnreadable { .. }) => {
            translate_at(direct.layout(), regs, la, access)
        }
        result => result,
    }
}

/// A [`DirectMap`] whose 8-byte reads (the walk's entry reads) succeed
/// only inside its clear range: one compare and one load per level, and
/// a failure that leaves the walk at once (see [`translate_direct`]).
/// Every other access is the map's own.
struct ClearEntries<'a>(DirectMap<'a>);

impl GuestPhysMemory for ClearEntries<'_> {
    #[inline(always)]
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<PhysWindow<'_>, PhysAccessError> {
        self.0.window(gpa, len)
    }

    #[inline(always)]
    fn read_u64_phys(&self, gpa: GuestPhysAddr) -> Result<u64, PhysAccessError> {
        self.0.clear_word(gpa.0).ok_or(PhysAccessError { gpa })
    }
}

/// The walk with the architectural MAXPHYADDR, through `mem`'s own
/// methods (the linear copies call it with the
/// [`DirectMap`](crate::DirectMap) they already hold). One out-of-line
/// copy per memory type, with the masks folded to constants.
#[inline(never)]
pub(crate) fn translate_at<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
) -> Result<Translation, TranslateError> {
    translate_in(mem, regs, la, access, MAXPHYADDR)
}

/// [`translate`] with an explicit MAXPHYADDR (clamped to 32..=52), so the
/// reserved-bit rules for narrower machines can be tested.
#[cfg(test)]
pub(crate) fn translate_with_maxphyaddr<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: GuestLinearAddr,
    access: Access,
    maxphyaddr: u32,
) -> Result<Translation, TranslateError> {
    match mem.direct_map() {
        Some(direct) => match translate_in(&ClearEntries(direct), regs, la, access, maxphyaddr) {
            Err(TranslateError::TableUnreadable { .. }) => {
                translate_in(direct.layout(), regs, la, access, maxphyaddr)
            }
            result => result,
        },
        None => translate_in(mem, regs, la, access, maxphyaddr),
    }
}

/// The walk itself, through `mem`'s own methods.
#[inline(always)]
fn translate_in<M: GuestPhysMemory + ?Sized>(
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
        PagingMode::Disabled => Ok(unpaged(la)),
        PagingMode::Bits32 => walk.bits32(),
        PagingMode::Pae => walk.pae(),
        PagingMode::Level4 => walk.long(4),
        PagingMode::Level5 => walk.long(5),
    }
}

/// The translation with paging off: linear = physical, truncated to 32
/// bits (`la` already is), every right.
#[inline(always)]
fn unpaged(la: GuestLinearAddr) -> Translation {
    Translation {
        gpa: GuestPhysAddr(la.0 & LOW_32),
        page_size: PAGE_4K,
        writable: true,
        user: true,
        executable: true,
    }
}

/// The rights accumulated over the levels walked so far, as entry bits:
/// R/W and U/S must be granted at every level (SDM vol. 3A, 4.6.1; AMD
/// APM vol. 2, 5.6), and so must "not execute-disabled": each entry is
/// folded in as `entry ^ XD` with one AND, so bit 63 stays set while no
/// level had XD. Where bit 63 is not XD it is reserved (checked before
/// folding) or absent (32-bit entries), so it reads as "executable".
#[derive(Clone, Copy)]
struct Rights(u64);

impl Rights {
    const ALL: Self = Self(u64::MAX);

    /// Folds in one entry that passed its reserved-bit check.
    #[inline(always)]
    fn add(&mut self, entry: u64) {
        self.0 &= entry ^ E_XD;
    }

    fn writable(self) -> bool {
        self.0 & E_RW != 0
    }

    fn user(self) -> bool {
        self.0 & E_US != 0
    }

    fn executable(self) -> bool {
        self.0 & E_XD != 0
    }
}

/// The #PF hardware would raise for `access` at `la` (see `Walk::fault`).
#[cold]
#[inline(never)]
fn page_fault(
    regs: &PagingRegs,
    mode: PagingMode,
    la: GuestLinearAddr,
    access: Access,
    kind: Fault,
) -> TranslateError {
    let mut code = 0;
    if kind != Fault::NotPresent {
        code |= pf_error::PRESENT;
    }
    if kind == Fault::Reserved {
        code |= pf_error::RESERVED;
    }
    if access.write {
        code |= pf_error::WRITE;
    }
    if access.user {
        code |= pf_error::USER;
    }
    // SDM 4.7: I/D is reported only with SMEP, or NXE under PAE-style
    // paging.
    let nx_paging = regs.nx_enabled() && mode != PagingMode::Bits32;
    let smep = regs.cr4 & PagingRegs::CR4_SMEP != 0;
    if access.fetch && (nx_paging || smep) {
        code |= pf_error::FETCH;
    }
    TranslateError::PageFault {
        la,
        error_code: code,
    }
}

/// A paging-structure entry at `gpa` outside guest RAM.
#[cold]
#[inline(never)]
fn table_unreadable(la: GuestLinearAddr, gpa: u64) -> TranslateError {
    TranslateError::TableUnreadable {
        la,
        table_gpa: GuestPhysAddr(gpa),
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
    /// The #PF hardware would raise for this access. The work is out of
    /// line and takes plain values, so the walk keeps no copy of itself in
    /// memory for it.
    #[inline(always)]
    fn fault(&self, kind: Fault) -> TranslateError {
        page_fault(self.regs, self.mode, self.la, self.access, kind)
    }

    /// The error of an entry that is not present or has reserved bits.
    #[inline(always)]
    fn entry_fault(&self, e: u64) -> TranslateError {
        let kind = if e & E_P == 0 {
            Fault::NotPresent
        } else {
            Fault::Reserved
        };
        self.fault(kind)
    }

    /// The error of an entry that is not in guest RAM.
    #[inline(always)]
    fn unreadable(&self, gpa: u64) -> TranslateError {
        table_unreadable(self.la, gpa)
    }

    /// Reads the entry at `gpa`, requires it present and free of the
    /// `reserved` bits: one load and one compare on the way through.
    #[inline(always)]
    fn entry(&self, gpa: u64, wide: bool, reserved: u64) -> Result<u64, TranslateError> {
        let at = GuestPhysAddr(gpa);
        let read = if wide {
            self.mem.read_u64_phys(at)
        } else {
            self.mem.read_u32_phys(at).map(u64::from)
        };
        let Ok(e) = read else {
            return Err(self.unreadable(gpa));
        };
        // Present, and none of the reserved bits.
        if e & (reserved | E_P) != E_P {
            return Err(self.entry_fault(e));
        }
        Ok(e)
    }

    /// Applies the permission rules to the combined rights of a finished
    /// walk.
    #[inline(always)]
    fn finish(&self, gpa: u64, page_size: u64, r: Rights) -> Result<Translation, TranslateError> {
        let a = self.access;
        // The rights this access needs, as entry bits (see `Rights`): U/S
        // for a user access, R/W for a user write or a supervisor write
        // with CR0.WP, "no XD" for a fetch.
        let need = (u64::from(a.user) * E_US)
            | (u64::from(a.write && (a.user || self.regs.write_protect())) * E_RW)
            | (u64::from(a.fetch) * E_XD);
        if r.0 & need != need {
            return Err(self.fault(Fault::Protection));
        }
        Ok(Translation {
            gpa: GuestPhysAddr(gpa),
            page_size,
            writable: r.writable(),
            user: r.user(),
            executable: r.executable(),
        })
    }

    /// 32-bit paging: 10+10+12 bits, 4-byte entries, optional 4 MiB pages.
    #[inline(always)]
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
            rights.add(pde);
            return self.finish(frame | (la & (PAGE_4M - 1)), PAGE_4M, rights);
        }
        rights.add(pde);
        let pt = pde & 0xFFFF_F000;
        let pte = self.entry(pt | (((la >> 12) & 0x3FF) << 2), false, 0)?;
        rights.add(pte);
        self.finish((pte & 0xFFFF_F000) | (la & (PAGE_4K - 1)), PAGE_4K, rights)
    }

    /// PAE paging: 2+9+9+12 bits, 8-byte entries, 4 PDPTEs at CR3[31:5].
    #[inline(always)]
    fn pae(&self) -> Result<Translation, TranslateError> {
        let la = self.la.0;
        let m = self.maxphy;
        let xd_reserved = if self.regs.nx_enabled() { 0 } else { E_XD };
        let frame_mask = bits(m - 1, 12);
        let mut rights = Rights::ALL;

        let pdpt = self.regs.cr3 & 0xFFFF_FFE0;
        // Intel reserves PDPTE bits 8:5 as well, but AMD's legacy PAE
        // PDPE has A there and QEMU sets it while walking: the walker must
        // translate what the guest's processor translated, so only the
        // bits both vendors reserve fault.
        let pdpte_rsvd = bits(2, 1) | bits(63, m);
        let pdpte = self.entry(pdpt | ((la >> 30) << 3), true, pdpte_rsvd)?;

        let rsvd = bits(62, m) | xd_reserved;
        let pd = pdpte & frame_mask;
        // Bits 20:13 are reserved only in a 2 MiB PDE; read the entry
        // first, then check them.
        let pde = self.entry(pd | (((la >> 21) & 0x1FF) << 3), true, rsvd)?;
        if pde & E_PS != 0 {
            if pde & bits(20, 13) != 0 {
                return Err(self.fault(Fault::Reserved));
            }
            rights.add(pde);
            let frame = pde & frame_mask & !(PAGE_2M - 1);
            return self.finish(frame | (la & (PAGE_2M - 1)), PAGE_2M, rights);
        }
        rights.add(pde);
        let pt = pde & frame_mask;
        let pte = self.entry(pt | (((la >> 12) & 0x1FF) << 3), true, rsvd)?;
        rights.add(pte);
        self.finish((pte & frame_mask) | (la & (PAGE_4K - 1)), PAGE_4K, rights)
    }

    /// One level of a 4- or 5-level walk: the entry for `la`'s index at
    /// `shift` in `table`, present, without `reserved` bits, folded into
    /// `rights`. An index, one load with its range check, one compare, an
    /// XOR and an AND.
    #[inline(always)]
    fn step(
        &self,
        table: u64,
        shift: u32,
        reserved: u64,
        rights: &mut Rights,
    ) -> Result<u64, TranslateError> {
        let index = (self.la.0 >> shift) & 0x1FF;
        let e = self.entry(table | (index << 3), true, reserved)?;
        rights.add(e);
        Ok(e)
    }

    /// A 1 GiB (`shift` 30) or 2 MiB (`shift` 21) page: bits
    /// (shift-1):13 of its entry are reserved, bit 12 is PAT.
    #[inline(never)]
    fn large_page(
        &self,
        e: u64,
        shift: u32,
        frame_mask: u64,
        rights: Rights,
    ) -> Result<Translation, TranslateError> {
        if e & bits(shift - 1, 13) != 0 {
            return Err(self.fault(Fault::Reserved));
        }
        let size = 1u64 << shift;
        let frame = e & frame_mask & !(size - 1);
        self.finish(frame | (self.la.0 & (size - 1)), size, rights)
    }

    /// 4- or 5-level paging: 9 bits per level, 1 GiB pages at the PDPTE,
    /// 2 MiB pages at the PDE; at most 5 reads whatever the entries say.
    #[inline(always)]
    fn long(&self, levels: u32) -> Result<Translation, TranslateError> {
        let la = self.la.0;
        // Canonical: bits 63 down to the top implemented bit all equal.
        let top_bit = 12 + 9 * levels - 1;
        let high = la >> top_bit;
        if high != 0 && high != u64::MAX >> top_bit {
            return Err(TranslateError::NonCanonical { la: self.la });
        }
        // maxphy is 32..=52: bits maxphy-1..12 are the frame, 51..maxphy
        // reserved, and 63 (XD) reserved unless EFER.NXE.
        let below_maxphy = (1u64 << self.maxphy) - 1;
        let frame_mask = below_maxphy & !(PAGE_4K - 1);
        let xd_reserved = if self.regs.nx_enabled() { 0 } else { E_XD };
        let rsvd = (((1u64 << 52) - 1) & !below_maxphy) | xd_reserved;
        let mut rights = Rights::ALL;
        let mut table = self.regs.cr3 & frame_mask;
        // PS is reserved in PML5Es and PML4Es.
        if levels == 5 {
            table = self.step(table, 48, rsvd | E_PS, &mut rights)? & frame_mask;
        }
        table = self.step(table, 39, rsvd | E_PS, &mut rights)? & frame_mask;
        let pdpte = self.step(table, 30, rsvd, &mut rights)?;
        if pdpte & E_PS != 0 {
            return self.large_page(pdpte, 30, frame_mask, rights);
        }
        let pde = self.step(pdpte & frame_mask, 21, rsvd, &mut rights)?;
        if pde & E_PS != 0 {
            return self.large_page(pde, 21, frame_mask, rights);
        }
        let pte = self.step(pde & frame_mask, 12, rsvd, &mut rights)?;
        self.finish((pte & frame_mask) | (la & (PAGE_4K - 1)), PAGE_4K, rights)
    }
}

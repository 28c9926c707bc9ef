//! A loader's 64-bit state, resumed as the guest: what it recorded
//! ([`LoaderRegs`]), checked and completed with the hidden parts of its
//! segment registers, read from its GDT ([`ResumedState::new`]).
//!
//! A processor keeps each segment register's base, limit and access
//! rights in a hidden part loaded from the descriptor when the selector
//! was (SDM vol. 3A, 3.4.3); a loader can record only the selectors, so
//! the hidden parts are read back from the descriptor table it still
//! uses. The values come from software thinvisor does not control: every
//! one is checked, and a state VM entry or VMRUN would refuse, or that
//! thinvisor would load into the processor itself (VT-x shares STAR,
//! LSTAR, ... and the PAT with the host), is refused with a reason, never
//! a crash.

use core::fmt;

use super::{MsrState, Seg, SegmentState};

/// The bytes of the largest descriptor: a system descriptor (TSS, LDT)
/// in IA-32e mode is 16 bytes (SDM vol. 3A, 8.2.3 and 3.5).
pub const MAX_DESCRIPTOR_LEN: usize = 16;

/// What a loader recorded of itself (the resume ABI's registers, less the
/// general registers, which [`super::InitialState::resumed`] takes).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct LoaderRegs {
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub dr7: u64,
    pub gdt: (u64, u16),
    pub idt: (u64, u16),
    /// Selectors, indexed by [`Seg`].
    pub selectors: [u16; 8],
    pub fs_base: u64,
    pub gs_base: u64,
    pub msrs: MsrState,
}

/// A checked 64-bit state with every segment's hidden part: what the
/// backends load for [`super::StartMode::Long64`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ResumedState {
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub dr7: u64,
    pub gdt: (u64, u16),
    pub idt: (u64, u16),
    /// Indexed by [`Seg`].
    pub segments: [SegmentState; 8],
    pub msrs: MsrState,
}

/// Why a selector's descriptor cannot give a segment register's hidden
/// part.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SegmentError {
    /// CS with a null selector.
    Null,
    /// A selector into an LDT (TI set): loaders use the GDT only, and
    /// thinvisor does not follow LDTs.
    InLdt,
    /// The descriptor lies (partly) beyond the GDT's limit.
    BeyondGdt { limit: u16 },
    /// The GDT could not be read at this linear address.
    Unreadable { addr: u64 },
    /// The descriptor is not present.
    NotPresent,
    /// The descriptor's type does not fit the register (its access byte
    /// and flags, in [`SegmentState::access`]'s layout).
    WrongType { access: u16 },
    /// CS is not a 64-bit code segment (L set, D clear).
    Not64BitCode { access: u16 },
}

impl fmt::Display for SegmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Null => f.write_str("a null selector"),
            Self::InLdt => f.write_str("a selector into the LDT, which thinvisor does not read"),
            Self::BeyondGdt { limit } => {
                write!(f, "its descriptor lies beyond the GDT's limit {limit:#x}")
            }
            Self::Unreadable { addr } => {
                write!(f, "the GDT cannot be read at linear address {addr:#x}")
            }
            Self::NotPresent => f.write_str("its descriptor is not present"),
            Self::WrongType { access } => write!(
                f,
                "its descriptor (access rights {access:#x}) is of the wrong type for this register"
            ),
            Self::Not64BitCode { access } => write!(
                f,
                "its descriptor (access rights {access:#x}) is not 64-bit code (L set, D clear)"
            ),
        }
    }
}

/// Why a loader's state cannot be resumed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ResumeRefusal {
    /// Not 64-bit mode with paging (EFER.LMA, CR0.PE and PG, CR4.PAE).
    NotLongMode,
    /// A segment register's descriptor.
    Segment {
        which: Seg,
        selector: u16,
        error: SegmentError,
    },
    /// Not privilege level 0 (CS.RPL and SS.DPL).
    NotRing0,
    /// A field that must hold a canonical address does not.
    NonCanonical { what: &'static str, value: u64 },
    /// A field has bits set that the architecture reserves.
    Reserved { what: &'static str, value: u64 },
    /// The PAT holds a reserved memory type, or write-combining in entry
    /// 0, the type thinvisor's own mappings use (crate::guard).
    Pat(u64),
}

impl fmt::Display for ResumeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NotLongMode => f.write_str("the loader's state is not 64-bit mode with paging"),
            Self::Segment {
                which,
                selector,
                error,
            } => write!(f, "the loader's {} ({selector:#x}): {error}", which.name()),
            Self::NotRing0 => f.write_str("the loader does not run at privilege level 0"),
            Self::NonCanonical { what, value } => {
                write!(f, "the loader's {what} {value:#x} is not a canonical address")
            }
            Self::Reserved { what, value } => {
                write!(f, "the loader's {what} {value:#x} sets reserved bits")
            }
            Self::Pat(pat) => write!(
                f,
                "the loader's PAT {pat:#x} holds a reserved memory type or write-combining in entry 0"
            ),
        }
    }
}

/// Whether `value` is a canonical 48-bit address (bits 63:47 equal; SDM
/// vol. 1, 3.3.7.1). Processors with 57-bit linear addresses accept more,
/// but a firmware that runs before an OS enables LA57 uses 4-level paging.
fn canonical(value: u64) -> bool {
    let top = value >> 47;
    top == 0 || top == 0x1_FFFF
}

/// Reserved RFLAGS bits: 3, 5, 15 and 22-63 (SDM vol. 1, 3.4.3); VM (17)
/// cannot be set in 64-bit mode.
const RFLAGS_RESERVED: u64 = (1 << 3) | (1 << 5) | (1 << 15) | (1 << 17) | !0x3F_FFFF;

/// Whether `pat` holds only defined memory types (0, 1, 4-7; SDM vol.
/// 3A, table 11-10: WRMSR of another raises #GP) and no write-combining
/// (1) in entry 0.
fn pat_ok(pat: u64) -> bool {
    pat & 7 != 1
        && pat
            .to_le_bytes()
            .iter()
            .all(|&t| matches!(t, 0 | 1 | 4..=7))
}

/// Fields of a descriptor's first 8 bytes (SDM vol. 3A, 3.4.5, figure
/// 3-8): base 31:0, limit 19:0, the access byte and the flags nibble.
fn fields(lo: u64) -> (u64, u32, u16) {
    let base = ((lo >> 16) & 0xFF_FFFF) | ((lo >> 32) & 0xFF00_0000);
    let limit = ((lo & 0xFFFF) | ((lo >> 32) & 0xF_0000)) as u32;
    let access = ((lo >> 40) & 0xF0FF) as u16;
    (base, limit, access)
}

/// The hidden part that loading `selector` into `which` gives, reading
/// the descriptor from the GDT at linear `gdt.0` (limit `gdt.1`) through
/// `read` (linear address, bytes; false when it cannot be read), for a
/// processor in IA-32e mode.
///
/// - A null selector (index 0 of the GDT) gives an unusable segment, with
///   the selector's RPL as DPL (the CPL, for SS), except for CS (refused)
///   and TR, which gets [`SegmentState::no_tss`]: firmware such as OVMF
///   never loads a TSS, yet VM entry requires a usable busy one (SDM vol.
///   3C, 27.3.1.2).
/// - CS must be 64-bit code (L set, D clear; SDM vol. 3A, 5.2.1), SS
///   writable data; DS, ES, FS and GS data or readable code. Loading one
///   sets its descriptor's accessed bit (SDM vol. 3A, 3.4.5.1), so the
///   hidden part has it whatever memory says now (VT-x requires it of a
///   usable segment).
/// - TR must be a 64-bit TSS (type 9 or 11; it is busy once loaded, type
///   11), LDTR an LDT (type 2): 16-byte descriptors whose second half
///   holds base 63:32 (SDM vol. 3A, 8.2.3).
/// - Limits in 4 KiB units (G) are scaled to bytes, as the processor
///   keeps them.
pub fn decode_segment(
    which: Seg,
    selector: u16,
    gdt: (u64, u16),
    read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
) -> Result<SegmentState, SegmentError> {
    let index = u64::from(selector >> 3);
    if selector & 4 == 0 && index == 0 {
        return match which {
            Seg::Cs => Err(SegmentError::Null),
            Seg::Tr => Ok(SegmentState::no_tss()),
            _ => Ok(SegmentState::unusable(selector, (selector & 3) as u8)),
        };
    }
    if selector & 4 != 0 {
        return Err(SegmentError::InLdt);
    }
    let system = matches!(which, Seg::Tr | Seg::Ldtr);
    let len: u64 = if system { 16 } else { 8 };
    let offset = index * 8;
    if offset + len - 1 > u64::from(gdt.1) {
        return Err(SegmentError::BeyondGdt { limit: gdt.1 });
    }
    let addr = gdt.0.wrapping_add(offset);
    let mut raw = [0u8; MAX_DESCRIPTOR_LEN];
    let Some(buf) = raw.get_mut(..len as usize) else {
        return Err(SegmentError::Unreadable { addr });
    };
    if !read(addr, buf) {
        return Err(SegmentError::Unreadable { addr });
    }
    let mut lo = [0u8; 8];
    lo.copy_from_slice(&raw[..8]);
    let mut hi = [0u8; 8];
    hi.copy_from_slice(&raw[8..]);
    let (mut base, mut limit, mut access) = fields(u64::from_le_bytes(lo));
    if access & SegmentState::PRESENT == 0 {
        return Err(SegmentError::NotPresent);
    }
    if access & SegmentState::GRANULAR != 0 {
        limit = (limit << 12) | 0xFFF;
    }
    let ty = access & 0xF;
    let code_data = access & SegmentState::S != 0;
    let is_code = ty & 0x8 != 0;
    let wrong = Err(SegmentError::WrongType { access });
    match which {
        Seg::Cs => {
            if !code_data || !is_code {
                return wrong;
            }
            if access & (SegmentState::LONG | SegmentState::DB) != SegmentState::LONG {
                return Err(SegmentError::Not64BitCode { access });
            }
        }
        // Writable data: type 0010b or 0110b, accessed or not.
        Seg::Ss if !code_data || ty & 0xA != 0x2 => return wrong,
        // Data, or readable code (type bit 1).
        Seg::Ds | Seg::Es | Seg::Fs | Seg::Gs if !code_data || (is_code && ty & 0x2 == 0) => {
            return wrong
        }
        Seg::Tr => {
            if code_data || !matches!(ty, 9 | 11) {
                return wrong;
            }
            access |= 0x2; // busy: type 11
        }
        Seg::Ldtr if code_data || ty != 2 => return wrong,
        _ => {}
    }
    if system {
        base |= (u64::from_le_bytes(hi) & 0xFFFF_FFFF) << 32;
    } else {
        access |= 0x1; // accessed
    }
    Ok(SegmentState {
        selector,
        base,
        limit,
        access,
    })
}

impl ResumedState {
    /// Check the loader's registers and read its segments' hidden parts
    /// from its GDT through `read` (see [`decode_segment`]). FS and GS
    /// take the bases of their MSRs: in 64-bit mode those are the bases
    /// (SDM vol. 3A, 3.4.4). RFLAGS bit 1 is set, as the processor
    /// always has it; DR7 must fit in 32 bits (SDM vol. 3A, 18.2.4).
    pub fn new(
        regs: &LoaderRegs,
        read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
    ) -> Result<Self, ResumeRefusal> {
        const EFER_LMA: u64 = 1 << 10;
        const CR0_PE_PG: u64 = 1 | 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        if regs.efer & EFER_LMA == 0 || regs.cr0 & CR0_PE_PG != CR0_PE_PG || regs.cr4 & CR4_PAE == 0
        {
            return Err(ResumeRefusal::NotLongMode);
        }
        let m = &regs.msrs;
        for (what, value) in [
            ("RIP", regs.rip),
            ("GDT base", regs.gdt.0),
            ("IDT base", regs.idt.0),
            ("FS base", regs.fs_base),
            ("GS base", regs.gs_base),
            ("KernelGSBase", m.kernel_gs_base),
            ("LSTAR", m.lstar),
            ("CSTAR", m.cstar),
            ("SYSENTER_ESP", m.sysenter_esp),
            ("SYSENTER_EIP", m.sysenter_eip),
        ] {
            if !canonical(value) {
                return Err(ResumeRefusal::NonCanonical { what, value });
            }
        }
        for (what, value, reserved) in [
            ("RFLAGS", regs.rflags, RFLAGS_RESERVED),
            ("DR7", regs.dr7, !0xFFFF_FFFF),
            // IA32_FMASK bits 63:32 are reserved (SDM vol. 4, table
            // 2-2); VT-x keeps SYSENTER_CS in a 32-bit field.
            ("SFMASK", m.sfmask, !0xFFFF_FFFF),
            ("SYSENTER_CS", m.sysenter_cs, !0xFFFF_FFFF),
        ] {
            if value & reserved != 0 {
                return Err(ResumeRefusal::Reserved { what, value });
            }
        }
        if !pat_ok(m.pat) {
            return Err(ResumeRefusal::Pat(m.pat));
        }
        let mut segments = [SegmentState::unusable(0, 0); 8];
        for which in Seg::ALL {
            let selector = regs.selectors[which as usize];
            segments[which as usize] =
                decode_segment(which, selector, regs.gdt, read).map_err(|error| {
                    ResumeRefusal::Segment {
                        which,
                        selector,
                        error,
                    }
                })?;
        }
        segments[Seg::Fs as usize].base = regs.fs_base;
        segments[Seg::Gs as usize].base = regs.gs_base;
        // CPL 0: CS.RPL is the CPL, SS.DPL must equal it (SDM vol. 3A,
        // 5.5 and 5.7).
        let cs = segments[Seg::Cs as usize];
        if cs.selector & 3 != 0 || segments[Seg::Ss as usize].dpl() != 0 || cs.dpl() != 0 {
            return Err(ResumeRefusal::NotRing0);
        }
        Ok(Self {
            rip: regs.rip,
            rflags: regs.rflags | 0x2,
            cr0: regs.cr0,
            cr3: regs.cr3,
            cr4: regs.cr4,
            efer: regs.efer,
            dr7: regs.dr7,
            gdt: regs.gdt,
            idt: regs.idt,
            segments,
            msrs: regs.msrs,
        })
    }
}

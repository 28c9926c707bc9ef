//! How a virtual processor starts: one neutral description that every boot
//! path (a multiboot kernel, Linux's 32-bit boot protocol, a BIOS boot
//! sector, an application processor's SIPI, a loader resumed in 64-bit
//! mode) fills in and both backends turn into their VMCB or VMCS guest
//! state. The backends read it only through [`InitialState`]'s accessors,
//! which give the reset values of whatever a start mode does not set.

mod resumed;
#[cfg(test)]
mod tests;

pub use resumed::{
    decode_segment, LoaderRegs, ResumeRefusal, ResumedState, SegmentError, MAX_DESCRIPTOR_LEN,
};

use crate::vcpu::Gpr;

/// What the guest is, for the choice of intercepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKind {
    /// A guest in a block of RAM with no devices and no interrupts: HLT
    /// can never end, so it is intercepted to stop the run.
    Isolated,
    /// The machine's own OS: its interrupts, HLT, I/O and MSRs run on the
    /// hardware.
    Passthrough,
}

/// The execution mode a processor starts in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StartMode {
    /// Real mode at `cs:ip`, as after a BIOS's INT 19h (a boot sector at
    /// 0000:7C00) or a SIPI (vector VV starts at VV00:0000; Intel SDM vol.
    /// 3A, 9.4.4.1).
    Real { cs: u16, ip: u16 },
    /// 32-bit protected mode with paging off and flat 4 GiB segments, code
    /// selector `code`, every data selector `data`: the multiboot entry
    /// state (Multiboot Specification 0.6.96, 3.2) and Linux's 32-bit boot
    /// protocol (Documentation/arch/x86/boot.rst, "32-bit Boot Protocol").
    Flat32 { eip: u32, code: u16, data: u16 },
    /// 64-bit mode with paging, exactly as a loader that ran before
    /// thinvisor left the processor (the resume tag, crates/boot's
    /// `resume`): control registers, segments with their hidden parts,
    /// descriptor tables and the MSRs of [`MsrState`]. Kept by reference
    /// so that [`InitialState`] stays small and `Copy`.
    Long64(&'static ResumedState),
}

/// The segment registers, in the order of the resume ABI's selectors.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Seg {
    Cs = 0,
    Ss = 1,
    Ds = 2,
    Es = 3,
    Fs = 4,
    Gs = 5,
    Tr = 6,
    Ldtr = 7,
}

impl Seg {
    /// Every segment register, in index order.
    pub const ALL: [Seg; 8] = [
        Seg::Cs,
        Seg::Ss,
        Seg::Ds,
        Seg::Es,
        Seg::Fs,
        Seg::Gs,
        Seg::Tr,
        Seg::Ldtr,
    ];

    /// The register's name, for messages.
    pub const fn name(self) -> &'static str {
        match self {
            Seg::Cs => "CS",
            Seg::Ss => "SS",
            Seg::Ds => "DS",
            Seg::Es => "ES",
            Seg::Fs => "FS",
            Seg::Gs => "GS",
            Seg::Tr => "TR",
            Seg::Ldtr => "LDTR",
        }
    }
}

/// A segment register as the processor holds it. `access` uses the layout
/// of a descriptor's bytes 5 and 6 (type, S, DPL, P in bits 7:0; AVL, L,
/// D/B, G in bits 15:12), which is VMX's access-rights layout (SDM vol.
/// 3C, table 24-2); SVM packs the same bits into 12 (APM vol. 2, 15.5).
/// A segment whose P bit is clear is *unusable* (what a null selector
/// loads, SDM vol. 3C, 24.4.1): VMX gets its unusable bit (16) for it,
/// SVM an attribute word with P clear; only its DPL still counts (SS.DPL
/// is the CPL).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SegmentState {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub access: u16,
}

impl SegmentState {
    /// A present, accessed, read/execute code segment (type 0xB, S=1).
    const CODE: u16 = 0x9B;
    /// A present, accessed, read/write data segment (type 0x3, S=1).
    const DATA: u16 = 0x93;
    /// 4 KiB granularity and 32-bit default size (G, D/B).
    const FLAT32: u16 = 0xC000;
    /// Access-rights bits.
    pub const PRESENT: u16 = 1 << 7;
    pub const S: u16 = 1 << 4;
    pub const LONG: u16 = 1 << 13;
    pub const DB: u16 = 1 << 14;
    pub const GRANULAR: u16 = 1 << 15;
    /// Present, busy 32-bit TSS (type 11, S=0): outside IA-32e mode; the
    /// same type is a busy 64-bit TSS inside it (SDM vol. 3A, table 3-2).
    const TSS_BUSY: u16 = 0x8B;

    /// The hidden state real mode gives a segment loaded with `selector`.
    pub const fn real(selector: u16, code: bool) -> Self {
        Self {
            selector,
            base: (selector as u64) << 4,
            limit: 0xFFFF,
            access: if code { Self::CODE } else { Self::DATA },
        }
    }

    /// A flat 4 GiB 32-bit segment.
    pub const fn flat32(selector: u16, code: bool) -> Self {
        Self {
            selector,
            base: 0,
            limit: 0xFFFF_FFFF,
            access: Self::FLAT32 | if code { Self::CODE } else { Self::DATA },
        }
    }

    /// An unusable segment (a null selector), with privilege `dpl`.
    pub const fn unusable(selector: u16, dpl: u8) -> Self {
        Self {
            selector,
            base: 0,
            limit: 0,
            access: ((dpl as u16) & 3) << 5,
        }
    }

    /// The task register when no TSS was ever loaded (after INIT, or
    /// firmware such as OVMF that never executes LTR): a present busy TSS
    /// at 0 with the minimal limit. VM entry requires a usable busy TSS in
    /// TR whatever the guest did (SDM vol. 3C, 27.3.1.2), and the guest
    /// never notices one it does not use (it is consulted only by task
    /// switches, interrupt stack switches and I/O permission checks at
    /// CPL > IOPL, none of which a guest without a TSS performs).
    pub const fn no_tss() -> Self {
        Self {
            selector: 0,
            base: 0,
            limit: 0x67,
            access: Self::TSS_BUSY,
        }
    }

    /// Whether the segment is usable (present).
    pub const fn usable(&self) -> bool {
        self.access & Self::PRESENT != 0
    }

    /// The descriptor privilege level.
    pub const fn dpl(&self) -> u8 {
        ((self.access >> 5) & 3) as u8
    }

    /// SVM's 12-bit attribute field (APM vol. 2, 15.5.1, "Segment State").
    pub const fn svm_attrib(&self) -> u16 {
        (self.access & 0xFF) | ((self.access >> 4) & 0xF00)
    }

    /// VMX's access-rights field: the same bits, plus the unusable bit
    /// (16) for a segment that is not present (SDM vol. 3C, table 24-2).
    pub const fn vmx_access_rights(&self) -> u32 {
        let unusable = if self.usable() { 0 } else { 1 << 16 };
        (self.access as u32 & 0xF0FF) | unusable
    }
}

/// The MSRs a 64-bit start sets that the other starts leave at their
/// power-on values (and INIT leaves alone: SDM vol. 3A, table 9-1; AMD
/// APM vol. 2, 14.1.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MsrState {
    pub pat: u64,
    pub kernel_gs_base: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
}

impl MsrState {
    /// Power-on values: the PAT's default (WB, WT, UC-, UC twice; SDM vol.
    /// 3A, 11.12.4), everything else 0.
    pub const POWER_ON: Self = Self {
        pat: 0x0007_0406_0007_0406,
        kernel_gs_base: 0,
        star: 0,
        lstar: 0,
        cstar: 0,
        sfmask: 0,
        sysenter_cs: 0,
        sysenter_esp: 0,
        sysenter_eip: 0,
    };
}

impl Default for MsrState {
    fn default() -> Self {
        Self::POWER_ON
    }
}

/// The register state a processor starts with. Everything a mode does not
/// name has its reset value: paging off, EFER 0 (plus what the backend
/// needs), DR7 0x400, LDTR unusable, TR an unused busy TSS, the MSRs of
/// [`MsrState::POWER_ON`] (for a start that sets them, see
/// [`InitialState::sets_msrs`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct InitialState {
    pub mode: StartMode,
    /// General registers, indexed by [`Gpr`] (RSP included).
    pub gprs: [u64; 16],
    /// GDTR: base and limit (an empty table unless a boot protocol
    /// promises one, as Linux's does).
    pub gdt: (u64, u16),
    /// IDTR: base and limit (the real-mode IVT at 0 unless set).
    pub idt: (u64, u16),
}

/// EFER.LMA (AMD APM vol. 2, 3.1.7; SDM vol. 3A, 2.2.1).
const EFER_LMA: u64 = 1 << 10;

impl InitialState {
    /// A multiboot v1 kernel's entry: EAX = the loader's magic, EBX = the
    /// information structure, code selector 0x08, data 0x10.
    pub fn multiboot(entry: u32, magic: u32, info: u32) -> Self {
        let mut s = Self::new(StartMode::Flat32 {
            eip: entry,
            code: 0x08,
            data: 0x10,
        });
        s.gprs[Gpr::Rax as usize] = magic.into();
        s.gprs[Gpr::Rbx as usize] = info.into();
        s
    }

    /// Linux's 32-bit boot protocol: CS = __BOOT_CS (0x10), the data
    /// segments __BOOT_DS (0x18), ESI = the boot_params ("zero page"),
    /// EBP, EDI and EBX zero, interrupts off.
    pub fn linux32(entry: u32, boot_params: u32) -> Self {
        let mut s = Self::new(StartMode::Flat32 {
            eip: entry,
            code: 0x10,
            data: 0x18,
        });
        s.gprs[Gpr::Rsi as usize] = boot_params.into();
        s
    }

    /// A BIOS boot sector, as INT 19h starts it: 0000:7C00, DL = the
    /// drive it came from.
    pub fn boot_sector(drive: u8) -> Self {
        let mut s = Self::new(StartMode::Real { cs: 0, ip: 0x7C00 });
        s.gprs[Gpr::Rdx as usize] = drive.into();
        s
    }

    /// An application processor after INIT and a SIPI with `vector`: GDTR
    /// and IDTR base 0, limit 0xFFFF (SDM vol. 3A, table 9-1).
    pub fn sipi(vector: u8) -> Self {
        let mut s = Self::new(StartMode::Real {
            cs: u16::from(vector) << 8,
            ip: 0,
        });
        s.gdt = (0, 0xFFFF);
        s.idt = (0, 0xFFFF);
        s
    }

    /// The loader's own state, resumed: `state` as decoded from its
    /// registers and GDT, `gprs` its general registers.
    pub fn resumed(state: &'static ResumedState, gprs: [u64; 16]) -> Self {
        Self {
            mode: StartMode::Long64(state),
            gprs,
            gdt: state.gdt,
            idt: state.idt,
        }
    }

    fn new(mode: StartMode) -> Self {
        Self {
            mode,
            gprs: [0; 16],
            gdt: (0, 0),
            // The real-mode IVT at 0 (a no-op for protected-mode starts,
            // which load their own IDT before enabling interrupts).
            idt: (0, 0x3FF),
        }
    }

    /// The resumed state, for a 64-bit start.
    fn long64(&self) -> Option<&'static ResumedState> {
        match self.mode {
            StartMode::Long64(s) => Some(s),
            _ => None,
        }
    }

    /// RIP.
    pub fn rip(&self) -> u64 {
        match self.mode {
            StartMode::Real { ip, .. } => ip.into(),
            StartMode::Flat32 { eip, .. } => eip.into(),
            StartMode::Long64(s) => s.rip,
        }
    }

    /// RFLAGS of the starts thinvisor makes up: only the reserved bit 1;
    /// interrupts off.
    pub const RFLAGS: u64 = 0x2;

    /// RFLAGS: [`Self::RFLAGS`], or the loader's (its IF included).
    pub fn rflags(&self) -> u64 {
        self.long64().map_or(Self::RFLAGS, |s| s.rflags)
    }

    /// CR0: real mode has PE clear; protected mode PE. ET (bit 4) is fixed
    /// to 1 on every processor with an FPU; caches stay enabled (CD, NW
    /// clear), unlike after a real reset. A resumed start: the loader's.
    pub fn cr0(&self) -> u64 {
        match self.mode {
            StartMode::Real { .. } => 0x10,
            StartMode::Flat32 { .. } => 0x11,
            StartMode::Long64(s) => s.cr0,
        }
    }

    /// CR3: 0 with paging off.
    pub fn cr3(&self) -> u64 {
        self.long64().map_or(0, |s| s.cr3)
    }

    /// CR4: 0 with paging off.
    pub fn cr4(&self) -> u64 {
        self.long64().map_or(0, |s| s.cr4)
    }

    /// EFER as the guest sees it (a backend adds what it needs, SVM its
    /// SVME): 0 outside long mode.
    pub fn efer(&self) -> u64 {
        self.long64().map_or(0, |s| s.efer)
    }

    /// Whether the guest starts in IA-32e mode (EFER.LMA): VT-x's "IA-32e
    /// mode guest" entry control must say the same (SDM vol. 3C, 27.3.1.1).
    pub fn long_mode(&self) -> bool {
        self.efer() & EFER_LMA != 0
    }

    /// DR7: 0x400 after reset (SDM vol. 3A, table 9-1).
    pub fn dr7(&self) -> u64 {
        self.long64().map_or(0x400, |s| s.dr7)
    }

    /// GDTR (base, limit).
    pub fn gdt(&self) -> (u64, u16) {
        self.gdt
    }

    /// IDTR (base, limit).
    pub fn idt(&self) -> (u64, u16) {
        self.idt
    }

    /// One segment register with its hidden part. For the starts
    /// thinvisor makes up: CS the code segment, SS, DS, ES, FS and GS the
    /// data segment, TR an unused busy TSS ([`SegmentState::no_tss`]),
    /// LDTR unusable. A resumed start: what the loader's GDT says, FS and
    /// GS with the bases of their MSRs.
    pub fn segment(&self, which: Seg) -> SegmentState {
        match (self.mode, which) {
            (StartMode::Long64(s), _) => s.segments[which as usize],
            (_, Seg::Tr) => SegmentState::no_tss(),
            (_, Seg::Ldtr) => SegmentState::unusable(0, 0),
            (StartMode::Real { cs, .. }, Seg::Cs) => SegmentState::real(cs, true),
            (StartMode::Real { .. }, _) => SegmentState::real(0, false),
            (StartMode::Flat32 { code, .. }, Seg::Cs) => SegmentState::flat32(code, true),
            (StartMode::Flat32 { data, .. }, _) => SegmentState::flat32(data, false),
        }
    }

    /// CS.
    pub fn code_segment(&self) -> SegmentState {
        self.segment(Seg::Cs)
    }

    /// DS (for the starts thinvisor makes up, also ES, FS, GS and SS).
    pub fn data_segment(&self) -> SegmentState {
        self.segment(Seg::Ds)
    }

    /// The current privilege level: SS.DPL (SDM vol. 3C, 24.4.1; AMD APM
    /// vol. 2, 15.5.1 keeps it in its own CPL field).
    pub fn cpl(&self) -> u8 {
        self.segment(Seg::Ss).dpl()
    }

    /// The MSRs of [`MsrState`]: power-on values unless the start sets
    /// them.
    pub fn msrs(&self) -> MsrState {
        self.long64().map_or(MsrState::POWER_ON, |s| s.msrs)
    }

    /// Whether this start sets the MSRs of [`MsrState`]. INIT leaves them
    /// alone (SDM vol. 3A, table 9-1: "unchanged"), so a reset to a start
    /// that does not set them must not touch them either.
    pub fn sets_msrs(&self) -> bool {
        self.long64().is_some()
    }

    /// The value of one general register.
    pub fn gpr(&self, reg: Gpr) -> u64 {
        self.gprs[reg as usize]
    }
}

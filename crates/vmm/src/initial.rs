//! How a virtual processor starts: one neutral description that every boot
//! path (a multiboot kernel, Linux's 32-bit boot protocol, a BIOS boot
//! sector, an application processor's SIPI) fills in and both backends
//! turn into their VMCB or VMCS guest state.

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
}

/// A segment register as the processor holds it. `access` uses the layout
/// of a descriptor's bytes 5 and 6 (type, S, DPL, P in bits 7:0; AVL, L,
/// D/B, G in bits 15:12), which is VMX's access-rights layout (SDM vol.
/// 3C, table 24-2); SVM packs the same bits into 12 (APM vol. 2, 15.5).
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

    /// SVM's 12-bit attribute field (APM vol. 2, 15.5.1, "Segment State").
    pub const fn svm_attrib(&self) -> u16 {
        (self.access & 0xFF) | ((self.access >> 4) & 0xF00)
    }
}

/// The register state a processor starts with. Everything not named here
/// has its reset value: paging off, EFER 0 (plus what the backend needs),
/// DR7 0x400, an empty GDT and IDT, LDTR and TR unused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct InitialState {
    pub mode: StartMode,
    /// General registers, indexed by [`Gpr`] (RSP included).
    pub gprs: [u64; 16],
    /// GDTR: base and limit (an empty table unless a boot protocol
    /// promises one, as Linux's does).
    pub gdt: (u64, u16),
}

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

    /// An application processor after INIT and a SIPI with `vector`.
    pub fn sipi(vector: u8) -> Self {
        Self::new(StartMode::Real {
            cs: u16::from(vector) << 8,
            ip: 0,
        })
    }

    fn new(mode: StartMode) -> Self {
        Self {
            mode,
            gprs: [0; 16],
            gdt: (0, 0),
        }
    }

    /// RIP.
    pub fn rip(&self) -> u64 {
        match self.mode {
            StartMode::Real { ip, .. } => ip.into(),
            StartMode::Flat32 { eip, .. } => eip.into(),
        }
    }

    /// RFLAGS: only the reserved bit 1; interrupts off.
    pub const RFLAGS: u64 = 0x2;

    /// CR0: real mode has PE clear; protected mode PE. ET (bit 4) is fixed
    /// to 1 on every processor with an FPU; caches stay enabled (CD, NW
    /// clear), unlike after a real reset.
    pub fn cr0(&self) -> u64 {
        match self.mode {
            StartMode::Real { .. } => 0x10,
            StartMode::Flat32 { .. } => 0x11,
        }
    }

    /// CS.
    pub fn code_segment(&self) -> SegmentState {
        match self.mode {
            StartMode::Real { cs, .. } => SegmentState::real(cs, true),
            StartMode::Flat32 { code, .. } => SegmentState::flat32(code, true),
        }
    }

    /// DS, ES, FS, GS and SS.
    pub fn data_segment(&self) -> SegmentState {
        match self.mode {
            StartMode::Real { .. } => SegmentState::real(0, false),
            StartMode::Flat32 { data, .. } => SegmentState::flat32(data, false),
        }
    }

    /// The value of one general register.
    pub fn gpr(&self, reg: Gpr) -> u64 {
        self.gprs[reg as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiboot_entry() {
        let s = InitialState::multiboot(0x10_0010, 0x2BAD_B002, 0x9000);
        assert_eq!(s.rip(), 0x10_0010);
        assert_eq!(s.gpr(Gpr::Rax), 0x2BAD_B002);
        assert_eq!(s.gpr(Gpr::Rbx), 0x9000);
        assert_eq!(s.cr0(), 0x11);
        let cs = s.code_segment();
        assert_eq!((cs.selector, cs.base, cs.limit), (0x08, 0, 0xFFFF_FFFF));
        assert_eq!(cs.access, 0xC09B);
        assert_eq!(cs.svm_attrib(), 0xC9B);
        assert_eq!(s.data_segment().selector, 0x10);
        assert_eq!(s.data_segment().svm_attrib(), 0xC93);
    }

    #[test]
    fn linux_entry() {
        let s = InitialState::linux32(0x100_0000, 0x7000);
        assert_eq!(s.code_segment().selector, 0x10);
        assert_eq!(s.data_segment().selector, 0x18);
        assert_eq!(s.gpr(Gpr::Rsi), 0x7000);
        for r in [Gpr::Rbp, Gpr::Rdi, Gpr::Rbx] {
            assert_eq!(s.gpr(r), 0);
        }
    }

    #[test]
    fn real_mode_entries() {
        let s = InitialState::boot_sector(0x80);
        assert_eq!((s.rip(), s.cr0(), s.gpr(Gpr::Rdx)), (0x7C00, 0x10, 0x80));
        let cs = s.code_segment();
        assert_eq!(
            (cs.selector, cs.base, cs.limit, cs.access),
            (0, 0, 0xFFFF, 0x9B)
        );
        let s = InitialState::sipi(0x9A);
        let cs = s.code_segment();
        assert_eq!((cs.selector, cs.base, s.rip()), (0x9A00, 0x9_A000, 0));
        assert_eq!(s.data_segment().svm_attrib(), 0x93);
    }
}

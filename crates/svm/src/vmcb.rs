//! The virtual machine control block (AMD APM vol. 2, appendix B).

/// A segment register as the VMCB stores it (APM vol. 2, B.2): the
/// attribute word packs descriptor bits 40..47 and 52..55.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

impl Segment {
    /// Flat 4 GiB segment with attribute word `attrib`.
    pub const fn flat(selector: u16, attrib: u16) -> Self {
        Self {
            selector,
            attrib,
            limit: 0xFFFF_FFFF,
            base: 0,
        }
    }

    /// Descriptor privilege level (attribute bits 5..6).
    pub const fn dpl(&self) -> u8 {
        ((self.attrib >> 5) & 3) as u8
    }

    /// CS.L: 64-bit code segment (attribute bit 9).
    pub const fn long(&self) -> bool {
        self.attrib & (1 << 9) != 0
    }
}

/// Segment attribute words for the multiboot entry state.
pub mod attrib {
    /// Present, DPL 0, execute/read code, accessed, 32-bit, 4 KiB granular.
    pub const CODE32: u16 = 0xC9B;
    /// Present, DPL 0, read/write data, accessed, 32-bit, 4 KiB granular.
    pub const DATA32: u16 = 0xC93;
    /// Present, busy 32-bit TSS.
    pub const TSS_BUSY: u16 = 0x8B;
    /// Present LDT.
    pub const LDT: u16 = 0x82;
}

/// Control area, offsets 0x000..0x400 (APM vol. 2, table B-1).
#[repr(C)]
pub struct ControlArea {
    pub intercept_cr: u32,
    pub intercept_dr: u32,
    pub intercept_exceptions: u32,
    /// Intercept vector 3: INTR .. SHUTDOWN.
    pub intercept_misc1: u32,
    /// Intercept vector 4: VMRUN .. XSETBV and later.
    pub intercept_misc2: u32,
    pub intercept_misc3: u32,
    _reserved1: [u8; 0x3C - 0x18],
    pub pause_filter_threshold: u16,
    pub pause_filter_count: u16,
    pub iopm_base_pa: u64,
    pub msrpm_base_pa: u64,
    pub tsc_offset: u64,
    pub guest_asid: u32,
    pub tlb_control: u8,
    _reserved2: [u8; 3],
    pub vintr: u64,
    pub interrupt_shadow: u64,
    pub exit_code: u64,
    pub exit_info1: u64,
    pub exit_info2: u64,
    pub exit_int_info: u64,
    /// Bit 0: enable nested paging.
    pub np_enable: u64,
    pub avic_apic_bar: u64,
    pub ghcb_pa: u64,
    pub event_inj: u64,
    pub ncr3: u64,
    pub lbr_virtualization_enable: u64,
    pub vmcb_clean: u64,
    /// Next sequential RIP, when the CPU has NRIPS.
    pub nrip: u64,
    pub guest_insn_len: u8,
    pub guest_insn_bytes: [u8; 15],
    _reserved3: [u8; 0x400 - 0xE0],
}

/// State save area, offsets 0x400..0x698 of the VMCB (APM vol. 2, table B-2).
/// Copy: a failed VMRUN may leave other state in it (Bochs stores the
/// host's), so the backend keeps a copy when it expects a failure.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StateSaveArea {
    pub es: Segment,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub gdtr: Segment,
    pub ldtr: Segment,
    pub idtr: Segment,
    pub tr: Segment,
    _reserved1: [u8; 0xCB - 0xA0],
    pub cpl: u8,
    _reserved2: u32,
    pub efer: u64,
    _reserved3: [u8; 0x148 - 0xD8],
    pub cr4: u64,
    pub cr3: u64,
    pub cr0: u64,
    pub dr7: u64,
    pub dr6: u64,
    pub rflags: u64,
    pub rip: u64,
    _reserved4: [u8; 0x1D8 - 0x180],
    pub rsp: u64,
    pub s_cet: u64,
    pub ssp: u64,
    pub isst_addr: u64,
    pub rax: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub cr2: u64,
    _reserved5: [u8; 0x268 - 0x248],
    pub g_pat: u64,
    pub dbgctl: u64,
    pub br_from: u64,
    pub br_to: u64,
    pub last_excp_from: u64,
    pub last_excp_to: u64,
}

/// One 4 KiB VMCB.
#[repr(C, align(4096))]
pub struct Vmcb {
    pub control: ControlArea,
    pub save: StateSaveArea,
    _rest: [u8; 4096 - 0x400 - 0x298],
}

/// Intercept vector 3 bits (APM vol. 2, table B-1, offset 0x0C).
pub mod misc1 {
    pub const NMI: u32 = 1 << 1;
    pub const SMI: u32 = 1 << 2;
    pub const CPUID: u32 = 1 << 18;
    pub const HLT: u32 = 1 << 24;
    pub const IOIO_PROT: u32 = 1 << 27;
    pub const MSR_PROT: u32 = 1 << 28;
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Intercept vector 4 bits (APM vol. 2, table B-1, offset 0x10).
pub mod misc2 {
    /// VMRUN must always be intercepted, or VMRUN fails (APM 15.5.1).
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
}

/// #VMEXIT codes (APM vol. 2, appendix C).
pub mod exit_code {
    pub const NMI: u64 = 0x61;
    pub const SMI: u64 = 0x62;
    pub const IOIO: u64 = 0x7B;
    pub const CPUID: u64 = 0x72;
    pub const HLT: u64 = 0x78;
    pub const MSR: u64 = 0x7C;
    pub const SHUTDOWN: u64 = 0x7F;
    pub const VMRUN: u64 = 0x80;
    pub const VMMCALL: u64 = 0x81;
    pub const VMLOAD: u64 = 0x82;
    pub const VMSAVE: u64 = 0x83;
    pub const STGI: u64 = 0x84;
    pub const CLGI: u64 = 0x85;
    pub const SKINIT: u64 = 0x86;
    pub const NPF: u64 = 0x400;
    /// VMRUN found invalid guest state.
    pub const INVALID: u64 = u64::MAX;
}

/// TLB_CONTROL values (APM vol. 2, 15.16.1).
pub mod tlb_control {
    pub const DO_NOTHING: u8 = 0;
    pub const FLUSH_ALL: u8 = 1;
}

/// EVENTINJ fields (APM vol. 2, 15.20).
pub mod event_inj {
    pub const VALID: u64 = 1 << 31;
    pub const ERROR_CODE_VALID: u64 = 1 << 11;
    pub const TYPE_MASK: u64 = 7 << 8;
    pub const TYPE_INTR: u64 = 0;
    pub const TYPE_NMI: u64 = 2 << 8;
    pub const TYPE_EXCEPTION: u64 = 3 << 8;
}

/// IOIO EXITINFO1 bits (APM vol. 2, 15.10.2, figure 15-2).
pub mod ioio_info {
    pub const INPUT: u64 = 1 << 0;
    pub const STRING: u64 = 1 << 2;
    pub const SIZE8: u64 = 1 << 4;
    pub const SIZE16: u64 = 1 << 5;
}

/// NPF EXITINFO1 bits: the #PF-style error code of the nested fault.
pub mod npf_info {
    pub const WRITE: u64 = 1 << 1;
    pub const FETCH: u64 = 1 << 4;
    /// The fault hit the guest's page tables during its walk (APM vol. 2,
    /// 15.25.6).
    pub const IN_PAGE_WALK: u64 = 1 << 33;
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_the_manual() {
        assert_eq!(size_of::<Segment>(), 16);
        assert_eq!(size_of::<ControlArea>(), 0x400);
        assert_eq!(size_of::<Vmcb>(), 4096);
        assert_eq!(offset_of!(ControlArea, iopm_base_pa), 0x40);
        assert_eq!(offset_of!(ControlArea, guest_asid), 0x58);
        assert_eq!(offset_of!(ControlArea, tlb_control), 0x5C);
        assert_eq!(offset_of!(ControlArea, exit_code), 0x70);
        assert_eq!(offset_of!(ControlArea, exit_info2), 0x80);
        assert_eq!(offset_of!(ControlArea, np_enable), 0x90);
        assert_eq!(offset_of!(ControlArea, event_inj), 0xA8);
        assert_eq!(offset_of!(ControlArea, ncr3), 0xB0);
        assert_eq!(offset_of!(ControlArea, nrip), 0xC8);
        assert_eq!(offset_of!(ControlArea, guest_insn_len), 0xD0);
        assert_eq!(offset_of!(Vmcb, save), 0x400);
        assert_eq!(offset_of!(StateSaveArea, tr), 0x90);
        assert_eq!(offset_of!(StateSaveArea, cpl), 0xCB);
        assert_eq!(offset_of!(StateSaveArea, efer), 0xD0);
        assert_eq!(offset_of!(StateSaveArea, cr4), 0x148);
        assert_eq!(offset_of!(StateSaveArea, rip), 0x178);
        assert_eq!(offset_of!(StateSaveArea, rsp), 0x1D8);
        assert_eq!(offset_of!(StateSaveArea, rax), 0x1F8);
        assert_eq!(offset_of!(StateSaveArea, cr2), 0x240);
        assert_eq!(offset_of!(StateSaveArea, g_pat), 0x268);
        assert_eq!(offset_of!(StateSaveArea, last_excp_to), 0x290);
    }
}

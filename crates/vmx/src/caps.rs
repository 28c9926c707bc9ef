//! VMX capability MSRs and the negotiation of the VMCS control words from
//! them (Intel SDM vol. 3D, appendix A; vol. 3C, 25.6-25.8).
//!
//! Every control bit the hypervisor sets is checked against what the CPU
//! reports: a bit the CPU does not allow makes VM entry fail, and a bit the
//! CPU forces on must be set even when we do not want it. Nothing here
//! touches hardware; [`VmxCapabilities::read`] takes the `rdmsr` as a
//! closure so that all of it can be tested on the host.

use core::fmt;

/// Capability MSR numbers (SDM vol. 4, table 2-2; vol. 3D, appendix A).
pub mod msr {
    /// Lock bit and "VMX outside SMX" enable, set by the firmware (SDM 24.7).
    pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
    /// VMCS revision, region size, memory type, TRUE-MSR flag (A.1).
    pub const IA32_VMX_BASIC: u32 = 0x480;
    /// Pin-based controls (A.3.1).
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    /// Primary processor-based controls (A.3.2).
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    /// VM-exit controls (A.4).
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    /// VM-entry controls (A.5).
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    /// Miscellaneous data (A.6).
    pub const IA32_VMX_MISC: u32 = 0x485;
    /// CR0 bits fixed to 1 in VMX operation (A.7).
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    /// CR0 bits that may be 1 in VMX operation (A.7).
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    /// CR4 bits fixed to 1 in VMX operation (A.8).
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    /// CR4 bits that may be 1 in VMX operation (A.8).
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    /// Highest VMCS field index (A.9).
    pub const IA32_VMX_VMCS_ENUM: u32 = 0x48A;
    /// Secondary processor-based controls (A.3.3).
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
    /// EPT and VPID capabilities (A.10).
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
    /// Pin-based controls without the default1 bits forced (A.3.1).
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
    /// Primary controls without the default1 bits forced (A.3.2).
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
    /// VM-exit controls without the default1 bits forced (A.4).
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
    /// VM-entry controls without the default1 bits forced (A.5).
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
    /// VM functions (A.11).
    pub const IA32_VMX_VMFUNC: u32 = 0x491;
}

/// IA32_FEATURE_CONTROL bits (SDM 24.7): VMXON raises #GP unless the MSR is
/// locked with VMX enabled for the mode we run in.
pub mod feature_control {
    /// Locked: writes raise #GP until reset.
    pub const LOCK: u64 = 1 << 0;
    /// VMXON allowed inside SMX operation (after GETSEC[SENTER]).
    pub const VMX_INSIDE_SMX: u64 = 1 << 1;
    /// VMXON allowed outside SMX operation (the normal case).
    pub const VMX_OUTSIDE_SMX: u64 = 1 << 2;
}

/// Pin-based VM-execution controls (SDM 25.6.1).
pub mod pin {
    /// External interrupts cause VM exits.
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    /// NMIs cause VM exits.
    pub const NMI_EXITING: u32 = 1 << 3;
    /// NMI blocking is virtualized (requires NMI exiting).
    pub const VIRTUAL_NMIS: u32 = 1 << 5;
    /// The VMX-preemption timer counts down in non-root operation.
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
    /// Posted-interrupt processing.
    pub const PROCESS_POSTED_INTERRUPTS: u32 = 1 << 7;
}

/// Primary processor-based VM-execution controls (SDM 25.6.2).
pub mod proc {
    /// Exit when the guest can take interrupts.
    pub const INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
    /// Add the VMCS TSC offset to the guest's RDTSC/RDTSCP/IA32_TSC reads.
    pub const TSC_OFFSETTING: u32 = 1 << 3;
    /// HLT causes a VM exit.
    pub const HLT_EXITING: u32 = 1 << 7;
    /// INVLPG causes a VM exit.
    pub const INVLPG_EXITING: u32 = 1 << 9;
    /// MWAIT causes a VM exit.
    pub const MWAIT_EXITING: u32 = 1 << 10;
    /// RDPMC causes a VM exit.
    pub const RDPMC_EXITING: u32 = 1 << 11;
    /// RDTSC/RDTSCP cause VM exits.
    pub const RDTSC_EXITING: u32 = 1 << 12;
    /// MOV to CR3 causes a VM exit (unless the target-value list matches).
    pub const CR3_LOAD_EXITING: u32 = 1 << 15;
    /// MOV from CR3 causes a VM exit.
    pub const CR3_STORE_EXITING: u32 = 1 << 16;
    /// Tertiary controls are used.
    pub const ACTIVATE_TERTIARY: u32 = 1 << 17;
    /// MOV to CR8 causes a VM exit.
    pub const CR8_LOAD_EXITING: u32 = 1 << 19;
    /// MOV from CR8 causes a VM exit.
    pub const CR8_STORE_EXITING: u32 = 1 << 20;
    /// TPR virtualization through the virtual-APIC page.
    pub const USE_TPR_SHADOW: u32 = 1 << 21;
    /// Exit when NMIs are no longer blocked.
    pub const NMI_WINDOW_EXITING: u32 = 1 << 22;
    /// MOV DR causes a VM exit.
    pub const MOV_DR_EXITING: u32 = 1 << 23;
    /// Every I/O instruction exits (ignored when I/O bitmaps are used).
    pub const UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
    /// I/O instructions exit according to the I/O bitmaps.
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    /// Single-step the guest with monitor-trap-flag exits.
    pub const MONITOR_TRAP_FLAG: u32 = 1 << 27;
    /// RDMSR/WRMSR exit according to the MSR bitmaps (else every one exits).
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    /// MONITOR causes a VM exit.
    pub const MONITOR_EXITING: u32 = 1 << 29;
    /// PAUSE causes a VM exit.
    pub const PAUSE_EXITING: u32 = 1 << 30;
    /// The secondary controls are used.
    pub const ACTIVATE_SECONDARY: u32 = 1 << 31;
}

/// Secondary processor-based VM-execution controls (SDM 25.6.2).
pub mod proc2 {
    /// Accesses to the APIC-access page exit or are virtualized.
    pub const VIRTUALIZE_APIC_ACCESSES: u32 = 1 << 0;
    /// Guest-physical addresses are translated through EPT.
    pub const ENABLE_EPT: u32 = 1 << 1;
    /// LGDT/LIDT/LLDT/LTR/SGDT/SIDT/SLDT/STR exit.
    pub const DESCRIPTOR_TABLE_EXITING: u32 = 1 << 2;
    /// RDTSCP is available to the guest (else #UD).
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    /// x2APIC MSR accesses to the TPR are virtualized.
    pub const VIRTUALIZE_X2APIC_MODE: u32 = 1 << 4;
    /// The guest's TLB entries are tagged with the VMCS VPID.
    pub const ENABLE_VPID: u32 = 1 << 5;
    /// WBINVD causes a VM exit.
    pub const WBINVD_EXITING: u32 = 1 << 6;
    /// The guest may run with CR0.PE or CR0.PG clear (requires EPT).
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
    /// APIC-register virtualization.
    pub const APIC_REGISTER_VIRTUALIZATION: u32 = 1 << 8;
    /// Virtual-interrupt delivery.
    pub const VIRTUAL_INTERRUPT_DELIVERY: u32 = 1 << 9;
    /// PAUSE loops cause VM exits.
    pub const PAUSE_LOOP_EXITING: u32 = 1 << 10;
    /// RDRAND causes a VM exit.
    pub const RDRAND_EXITING: u32 = 1 << 11;
    /// INVPCID is available to the guest (else #UD).
    pub const ENABLE_INVPCID: u32 = 1 << 12;
    /// VMFUNC is available to the guest.
    pub const ENABLE_VM_FUNCTIONS: u32 = 1 << 13;
    /// VMREAD/VMWRITE in the guest use a shadow VMCS.
    pub const VMCS_SHADOWING: u32 = 1 << 14;
    /// ENCLS exits according to the ENCLS-exiting bitmap.
    pub const ENABLE_ENCLS_EXITING: u32 = 1 << 15;
    /// RDSEED causes a VM exit.
    pub const RDSEED_EXITING: u32 = 1 << 16;
    /// Page-modification logging.
    pub const ENABLE_PML: u32 = 1 << 17;
    /// Some EPT violations become #VE in the guest.
    pub const EPT_VIOLATION_VE: u32 = 1 << 18;
    /// Intel PT hides that it runs in non-root operation.
    pub const CONCEAL_VMX_FROM_PT: u32 = 1 << 19;
    /// XSAVES/XRSTORS are available to the guest (else #UD).
    pub const ENABLE_XSAVES: u32 = 1 << 20;
    /// EPT execute permission separately for user and supervisor.
    pub const MODE_BASED_EPT_EXECUTE: u32 = 1 << 22;
    /// Sub-page write permissions for EPT.
    pub const SUB_PAGE_WRITE_PERMISSIONS: u32 = 1 << 23;
    /// Intel PT output addresses are guest-physical.
    pub const PT_USES_GUEST_PHYSICAL: u32 = 1 << 24;
    /// TSC scaling.
    pub const USE_TSC_SCALING: u32 = 1 << 25;
    /// TPAUSE/UMONITOR/UMWAIT are available to the guest (else #UD).
    pub const ENABLE_USER_WAIT_PAUSE: u32 = 1 << 26;
    /// PCONFIG is available to the guest (else #UD).
    pub const ENABLE_PCONFIG: u32 = 1 << 27;
    /// ENCLV exits according to the ENCLV-exiting bitmap.
    pub const ENABLE_ENCLV_EXITING: u32 = 1 << 28;
}

/// VM-exit controls (SDM 25.7.1).
pub mod exit {
    /// DR7 and IA32_DEBUGCTL are saved into the guest-state area on exit
    /// (the exit itself sets DR7 to 0x400 and clears IA32_DEBUGCTL).
    pub const SAVE_DEBUG_CONTROLS: u32 = 1 << 2;
    /// The host runs in 64-bit mode after the exit.
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    /// IA32_PERF_GLOBAL_CTRL is loaded from the host-state area.
    pub const LOAD_IA32_PERF_GLOBAL_CTRL: u32 = 1 << 12;
    /// An exit for an external interrupt acknowledges it and stores the vector.
    pub const ACK_INTERRUPT_ON_EXIT: u32 = 1 << 15;
    /// IA32_PAT is saved into the guest-state area.
    pub const SAVE_IA32_PAT: u32 = 1 << 18;
    /// IA32_PAT is loaded from the host-state area.
    pub const LOAD_IA32_PAT: u32 = 1 << 19;
    /// IA32_EFER is saved into the guest-state area.
    pub const SAVE_IA32_EFER: u32 = 1 << 20;
    /// IA32_EFER is loaded from the host-state area.
    pub const LOAD_IA32_EFER: u32 = 1 << 21;
    /// The preemption timer's value is saved on exit.
    pub const SAVE_PREEMPTION_TIMER: u32 = 1 << 22;
    /// IA32_BNDCFGS is cleared on exit.
    pub const CLEAR_IA32_BNDCFGS: u32 = 1 << 23;
    /// Intel PT hides the VM exit.
    pub const CONCEAL_VMX_FROM_PT: u32 = 1 << 24;
    /// IA32_RTIT_CTL is cleared on exit.
    pub const CLEAR_IA32_RTIT_CTL: u32 = 1 << 25;
    /// IA32_LBR_CTL is cleared on exit.
    pub const CLEAR_IA32_LBR_CTL: u32 = 1 << 26;
    /// CET state is loaded from the host-state area.
    pub const LOAD_CET_STATE: u32 = 1 << 28;
    /// IA32_PKRS is loaded from the host-state area.
    pub const LOAD_PKRS: u32 = 1 << 29;
    /// IA32_PERF_GLOBAL_CTRL is saved into the guest-state area.
    pub const SAVE_IA32_PERF_GLOBAL_CTRL: u32 = 1 << 30;
    /// The secondary VM-exit controls are used.
    pub const ACTIVATE_SECONDARY: u32 = 1 << 31;
}

/// VM-entry controls (SDM 25.8.1).
pub mod entry {
    /// DR7 and IA32_DEBUGCTL are loaded from the guest-state area.
    pub const LOAD_DEBUG_CONTROLS: u32 = 1 << 2;
    /// The guest runs in IA-32e mode after entry (must match guest EFER.LMA).
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    /// Entry to system-management mode.
    pub const ENTRY_TO_SMM: u32 = 1 << 10;
    /// Deactivate the dual-monitor treatment of SMM.
    pub const DEACTIVATE_DUAL_MONITOR: u32 = 1 << 11;
    /// IA32_PERF_GLOBAL_CTRL is loaded from the guest-state area.
    pub const LOAD_IA32_PERF_GLOBAL_CTRL: u32 = 1 << 13;
    /// IA32_PAT is loaded from the guest-state area.
    pub const LOAD_IA32_PAT: u32 = 1 << 14;
    /// IA32_EFER is loaded from the guest-state area.
    pub const LOAD_IA32_EFER: u32 = 1 << 15;
    /// IA32_BNDCFGS is loaded from the guest-state area.
    pub const LOAD_IA32_BNDCFGS: u32 = 1 << 16;
    /// Intel PT hides the VM entry.
    pub const CONCEAL_VMX_FROM_PT: u32 = 1 << 17;
    /// IA32_RTIT_CTL is loaded from the guest-state area.
    pub const LOAD_IA32_RTIT_CTL: u32 = 1 << 18;
    /// CET state is loaded from the guest-state area.
    pub const LOAD_CET_STATE: u32 = 1 << 20;
    /// IA32_LBR_CTL is loaded from the guest-state area.
    pub const LOAD_IA32_LBR_CTL: u32 = 1 << 21;
    /// IA32_PKRS is loaded from the guest-state area.
    pub const LOAD_PKRS: u32 = 1 << 22;
}

/// IA32_VMX_EPT_VPID_CAP bits (SDM A.10).
pub mod ept_vpid {
    /// EPT entries may be execute-only.
    pub const EXECUTE_ONLY: u64 = 1 << 0;
    /// 4-level EPT page walks.
    pub const PAGE_WALK_4: u64 = 1 << 6;
    /// 5-level EPT page walks.
    pub const PAGE_WALK_5: u64 = 1 << 7;
    /// The EPT paging structures may be uncacheable.
    pub const MEMORY_TYPE_UC: u64 = 1 << 8;
    /// The EPT paging structures may be write-back.
    pub const MEMORY_TYPE_WB: u64 = 1 << 14;
    /// EPT PDEs may map 2-MiB pages.
    pub const PAGES_2M: u64 = 1 << 16;
    /// EPT PDPTEs may map 1-GiB pages.
    pub const PAGES_1G: u64 = 1 << 17;
    /// INVEPT is supported.
    pub const INVEPT: u64 = 1 << 20;
    /// EPT accessed and dirty flags.
    pub const ACCESSED_DIRTY: u64 = 1 << 21;
    /// Advanced VM-exit information for EPT violations.
    pub const ADVANCED_EXIT_INFO: u64 = 1 << 22;
    /// Supervisor shadow-stack control.
    pub const SUPERVISOR_SHADOW_STACK: u64 = 1 << 23;
    /// Single-context INVEPT.
    pub const INVEPT_SINGLE: u64 = 1 << 25;
    /// All-context INVEPT.
    pub const INVEPT_ALL: u64 = 1 << 26;
    /// INVVPID is supported.
    pub const INVVPID: u64 = 1 << 32;
    /// Individual-address INVVPID.
    pub const INVVPID_ADDRESS: u64 = 1 << 40;
    /// Single-context INVVPID.
    pub const INVVPID_SINGLE: u64 = 1 << 41;
    /// All-context INVVPID.
    pub const INVVPID_ALL: u64 = 1 << 42;
    /// Single-context INVVPID that keeps global translations.
    pub const INVVPID_SINGLE_RETAINING_GLOBALS: u64 = 1 << 43;
}

/// IA32_VMX_BASIC bit 55 (SDM A.1): the TRUE_* control MSRs exist and report
/// which default1 controls may in fact be 0.
const BASIC_TRUE_MSRS: u64 = 1 << 55;
/// CR0.PE and CR0.PG, which an unrestricted guest may clear (SDM 27.3.1.1).
const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;

/// The VMX capability MSRs. The optional ones exist only when another MSR
/// says so (SDM A.1, A.3.3, A.10); `None` means absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxCapabilities {
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub exit: u64,
    pub entry: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub procbased2: Option<u64>,
    pub ept_vpid: Option<u64>,
    pub true_pinbased: Option<u64>,
    pub true_procbased: Option<u64>,
    pub true_exit: Option<u64>,
    pub true_entry: Option<u64>,
}

impl VmxCapabilities {
    /// Read the capability MSRs with `rdmsr(msr) -> Option<u64>` (`None` for
    /// an MSR that faulted). Only MSRs whose existence the SDM guarantees are
    /// read, so a plain `rdmsr` is safe on a CPU with VMX (CPUID.1:ECX.VMX):
    /// PROCBASED_CTLS2 only if "activate secondary controls" may be 1
    /// (A.3.3), EPT_VPID_CAP only if "enable EPT" or "enable VPID" may be 1
    /// (A.10), the TRUE_* MSRs only if IA32_VMX_BASIC bit 55 is set (A.1).
    /// A mandatory MSR that fails reads as 0, which allows no control and so
    /// makes [`negotiate`] fail rather than guess.
    pub fn read(mut rdmsr: impl FnMut(u32) -> Option<u64>) -> Self {
        let mut must = |m: u32| rdmsr(m).unwrap_or(0);
        let basic = must(msr::IA32_VMX_BASIC);
        let pinbased = must(msr::IA32_VMX_PINBASED_CTLS);
        let procbased = must(msr::IA32_VMX_PROCBASED_CTLS);
        let exit = must(msr::IA32_VMX_EXIT_CTLS);
        let entry = must(msr::IA32_VMX_ENTRY_CTLS);
        let misc = must(msr::IA32_VMX_MISC);
        let cr0_fixed0 = must(msr::IA32_VMX_CR0_FIXED0);
        let cr0_fixed1 = must(msr::IA32_VMX_CR0_FIXED1);
        let cr4_fixed0 = must(msr::IA32_VMX_CR4_FIXED0);
        let cr4_fixed1 = must(msr::IA32_VMX_CR4_FIXED1);

        let procbased2 = if allowed1(procbased) & proc::ACTIVATE_SECONDARY != 0 {
            rdmsr(msr::IA32_VMX_PROCBASED_CTLS2)
        } else {
            None
        };
        let ept_vpid = match procbased2 {
            Some(c) if allowed1(c) & (proc2::ENABLE_EPT | proc2::ENABLE_VPID) != 0 => {
                rdmsr(msr::IA32_VMX_EPT_VPID_CAP)
            }
            _ => None,
        };
        let has_true = basic & BASIC_TRUE_MSRS != 0;
        let mut optional = |m: u32| if has_true { rdmsr(m) } else { None };
        let true_pinbased = optional(msr::IA32_VMX_TRUE_PINBASED_CTLS);
        let true_procbased = optional(msr::IA32_VMX_TRUE_PROCBASED_CTLS);
        let true_exit = optional(msr::IA32_VMX_TRUE_EXIT_CTLS);
        let true_entry = optional(msr::IA32_VMX_TRUE_ENTRY_CTLS);

        Self {
            basic,
            pinbased,
            procbased,
            exit,
            entry,
            misc,
            cr0_fixed0,
            cr0_fixed1,
            cr4_fixed0,
            cr4_fixed1,
            procbased2,
            ept_vpid,
            true_pinbased,
            true_procbased,
            true_exit,
            true_entry,
        }
    }

    /// VMCS revision identifier, written to the first 31 bits of the VMXON
    /// region and of every VMCS (SDM A.1, 25.2).
    pub fn revision_id(&self) -> u32 {
        (self.basic & 0x7FFF_FFFF) as u32
    }

    /// Bytes to allocate for the VMXON region and each VMCS (at most 4096;
    /// SDM A.1, bits 44:32).
    pub fn vmcs_size(&self) -> u32 {
        ((self.basic >> 32) & 0x1FFF) as u32
    }

    /// Memory type the VMCS should be mapped with (6 = write-back; SDM A.1,
    /// bits 53:50).
    pub fn vmcs_memory_type(&self) -> u8 {
        ((self.basic >> 50) & 0xF) as u8
    }

    /// Whether the TRUE_* control MSRs exist and should be used (SDM A.1,
    /// A.2): without them, the "default1" controls cannot be cleared.
    pub fn uses_true_msrs(&self) -> bool {
        self.basic & BASIC_TRUE_MSRS != 0
    }

    /// The capability word that governs each control word: the TRUE_* MSR
    /// when bit 55 says to use them and it could be read, else the plain one
    /// (always valid, only stricter; SDM A.2).
    pub(crate) fn control_caps(&self) -> [u64; 4] {
        let pick = |true_msr: Option<u64>, plain: u64| match true_msr {
            Some(v) if self.uses_true_msrs() => v,
            _ => plain,
        };
        [
            pick(self.true_pinbased, self.pinbased),
            pick(self.true_procbased, self.procbased),
            pick(self.true_exit, self.exit),
            pick(self.true_entry, self.entry),
        ]
    }

    /// CR0 bits the guest must keep set: CR0_FIXED0 without PE and PG when
    /// the guest is unrestricted (SDM 27.3.1.1).
    pub fn guest_cr0_fixed0(&self, unrestricted: bool) -> u64 {
        if unrestricted {
            self.cr0_fixed0 & !(CR0_PE | CR0_PG)
        } else {
            self.cr0_fixed0
        }
    }
}

/// Allowed-1 settings: the high half of a control capability MSR (SDM A.3).
fn allowed1(cap: u64) -> u32 {
    (cap >> 32) as u32
}

/// Allowed-0 settings: the low half of a control capability MSR (SDM A.3).
fn allowed0(cap: u64) -> u32 {
    cap as u32
}

/// Bits that a control word needs set but the CPU does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Missing(pub u32);

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bits")?;
        let mut sep = " ";
        for bit in (0..32).filter(|b| self.0 & (1 << b) != 0) {
            write!(f, "{sep}{bit}")?;
            sep = ", ";
        }
        Ok(())
    }
}

/// One control word from its capability MSR (SDM A.3-A.5): the allowed-0
/// settings are the low 32 bits (a 1 there means the bit must be 1), the
/// allowed-1 settings the high 32 bits (a 0 means the bit must be 0).
/// Returns `desired | required` with the forced-1 bits added and the
/// forbidden bits dropped, or the bits that must be 1 but may not be: the
/// missing `required` bits, plus any bit the MSR itself forces to 1 while
/// forbidding it (a word no real CPU reports, and which no value satisfies).
pub fn adjust(cap: u64, desired: u32, required: u32) -> Result<u32, Missing> {
    let (must_be_1, may_be_1) = (allowed0(cap), allowed1(cap));
    let missing = (required | must_be_1) & !may_be_1;
    if missing != 0 {
        return Err(Missing(missing));
    }
    Ok((desired | required | must_be_1) & may_be_1)
}

/// `value` with the bits fixed to 1 set and the bits fixed to 0 cleared
/// (CR0/CR4 in VMX operation, SDM A.7, A.8).
pub fn cr_fixed(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

/// How the guest's IA32_EFER is switched on entry and exit
/// (docs/architecture.md, VT-x specifics; `efer=` on the command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EferPath {
    /// VM-entry "load IA32_EFER", VM-exit "save/load IA32_EFER" with the
    /// guest/host IA32_EFER VMCS fields.
    VmcsControls,
    /// The VM-exit MSR-store / MSR-load and VM-entry MSR-load areas.
    MsrAreas,
}

/// The `efer=auto|msr-area` command-line option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EferPreference {
    /// The dedicated controls when the CPU has all three, else MSR areas.
    Auto,
    /// Always the MSR areas (for testing that path on any CPU).
    MsrArea,
}

/// The negotiated VMCS control words and the features they enable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Controls {
    pub pinbased: u32,
    pub procbased: u32,
    pub procbased2: u32,
    pub exit: u32,
    /// Without "IA-32e mode guest", which follows the guest's EFER.LMA and
    /// is set per entry.
    pub entry: u32,
    pub efer: EferPath,
    /// "enable VPID" is set: give the guest a non-zero VPID.
    pub vpid: bool,
    /// EPT PDEs may map 2-MiB pages.
    pub ept_2m: bool,
    /// EPT PDPTEs may map 1-GiB pages.
    pub ept_1g: bool,
    /// EPT accessed/dirty flags may be enabled in the EPTP.
    pub ept_ad: bool,
    pub invept_single: bool,
    pub invept_all: bool,
    /// INVVPID types; false whenever `vpid` is false.
    pub invvpid_single: bool,
    pub invvpid_all: bool,
}

/// A control word (or the EPT/VPID capability word) named in an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlWord {
    Pinbased,
    Primary,
    Secondary,
    Exit,
    Entry,
    EptVpid,
}

impl ControlWord {
    fn title(self) -> &'static str {
        match self {
            Self::Pinbased => "pin-based controls",
            Self::Primary => "primary processor-based controls",
            Self::Secondary => "secondary controls",
            Self::Exit => "VM-exit controls",
            Self::Entry => "VM-entry controls",
            Self::EptVpid => "EPT capabilities",
        }
    }

    /// Name of a bit, for the bits this module asks for or mentions.
    fn bit_name(self, bit: u32) -> Option<&'static str> {
        Some(match (self, bit) {
            (Self::Pinbased, 0) => "external-interrupt exiting",
            (Self::Pinbased, 3) => "NMI exiting",
            (Self::Pinbased, 5) => "virtual NMIs",
            (Self::Pinbased, 6) => "VMX-preemption timer",
            (Self::Primary, 3) => "TSC offsetting",
            (Self::Primary, 7) => "HLT exiting",
            (Self::Primary, 24) => "unconditional I/O exiting",
            (Self::Primary, 25) => "I/O bitmaps",
            (Self::Primary, 28) => "MSR bitmaps",
            (Self::Primary, 31) => "activate secondary controls",
            (Self::Secondary, 1) => "EPT",
            (Self::Secondary, 3) => "RDTSCP",
            (Self::Secondary, 5) => "VPID",
            (Self::Secondary, 7) => "unrestricted guest",
            (Self::Secondary, 12) => "INVPCID",
            (Self::Secondary, 20) => "XSAVES/XRSTORS",
            (Self::Secondary, 26) => "user wait and pause",
            (Self::Exit, 2) => "save debug controls",
            (Self::Exit, 9) => "64-bit host (host address-space size)",
            (Self::Exit, 15) => "acknowledge interrupt on exit",
            (Self::Exit, 18) => "save IA32_PAT",
            (Self::Exit, 19) => "load IA32_PAT",
            (Self::Exit, 20) => "save IA32_EFER",
            (Self::Exit, 21) => "load IA32_EFER",
            (Self::Entry, 2) => "load debug controls",
            (Self::Entry, 9) => "IA-32e mode guest",
            (Self::Entry, 14) => "load IA32_PAT",
            (Self::Entry, 15) => "load IA32_EFER",
            (Self::EptVpid, 6) => "4-level page walk",
            (Self::EptVpid, 14) => "write-back paging structures",
            (Self::EptVpid, 16) => "2-MiB pages",
            (Self::EptVpid, 17) => "1-GiB pages",
            (Self::EptVpid, 20) => "INVEPT",
            (Self::EptVpid, 21) => "accessed/dirty flags",
            (Self::EptVpid, 25) => "single-context INVEPT",
            (Self::EptVpid, 26) => "all-context INVEPT",
            (Self::EptVpid, 32) => "INVVPID",
            (Self::EptVpid, 41) => "single-context INVVPID",
            (Self::EptVpid, 42) => "all-context INVVPID",
            _ => return None,
        })
    }
}

/// A control the hypervisor cannot run without is not supported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NegotiationError {
    /// The word that lacks them.
    pub word: ControlWord,
    /// The required bits (of that word) that the CPU does not allow. For
    /// [`ControlWord::EptVpid`], bits 25 and 26 together mean "neither
    /// INVEPT type".
    pub missing: u64,
}

impl fmt::Display for NegotiationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VT-x {}: ", self.word.title())?;
        let mut missing = self.missing;
        let either = ept_vpid::INVEPT_SINGLE | ept_vpid::INVEPT_ALL;
        let mut sep = "";
        if self.word == ControlWord::EptVpid && missing & either == either {
            f.write_str("single-context or all-context INVEPT (bit 25 or 26)")?;
            missing &= !either;
            sep = ", ";
        }
        for bit in (0..64).filter(|b| missing & (1 << b) != 0) {
            match self.word.bit_name(bit) {
                Some(name) => write!(f, "{sep}{name} (bit {bit})")?,
                None => write!(f, "{sep}bit {bit}")?,
            }
            sep = ", ";
        }
        if sep.is_empty() {
            f.write_str("(nothing)")?;
        }
        f.write_str(" not supported")
    }
}

impl core::error::Error for NegotiationError {}

/// The hypervisor's policy, as (desired, required) per word.
mod policy {
    use super::{entry, exit, pin, proc, proc2};

    /// External interrupts are not intercepted: the guest owns the
    /// hardware. NMIs exit, so that another processor can stop this one
    /// with an NMI when the guest sends it INIT (thinvisor_vmm::HostSignals
    /// says why INIT is emulated); virtual NMIs then let the hypervisor
    /// give the guest its own NMIs with the blocking the guest expects
    /// and wait for an NMI window (SDM vol. 3C, 25.3, 26.7.1).
    pub const PIN: (u32, u32) = (pin::VIRTUAL_NMIS, pin::NMI_EXITING);
    /// HLT is the idle point; MSR bitmaps keep all but protected MSRs at
    /// full speed; I/O bitmaps let only the few ports thinvisor watches
    /// exit; EPT and friends live in the secondary word.
    pub const PRIMARY: (u32, u32) = (
        0,
        proc::HLT_EXITING | proc::USE_MSR_BITMAPS | proc::USE_IO_BITMAPS | proc::ACTIVATE_SECONDARY,
    );
    /// EPT protects the hypervisor's memory; unrestricted guest lets the
    /// guest start in protected mode with paging off (or in real mode). The
    /// desired ones keep instructions a guest may use from raising #UD
    /// (SDM 26.3), and VPID keeps the TLB across exits (SDM 29.1).
    pub const SECONDARY: (u32, u32) = (
        proc2::ENABLE_VPID
            | proc2::ENABLE_RDTSCP
            | proc2::ENABLE_INVPCID
            | proc2::ENABLE_XSAVES
            | proc2::ENABLE_USER_WAIT_PAUSE,
        proc2::ENABLE_EPT | proc2::UNRESTRICTED_GUEST,
    );
    /// A VM exit sets DR7 to 0x400 and clears IA32_DEBUGCTL (SDM 28.5.1):
    /// save them so the guest's hardware breakpoints survive. These are
    /// default1 bits, forced on anyway without the TRUE_* MSRs.
    pub const EXIT: (u32, u32) = (exit::SAVE_DEBUG_CONTROLS, exit::HOST_ADDRESS_SPACE_SIZE);
    /// ...and load them back on entry.
    pub const ENTRY: (u32, u32) = (entry::LOAD_DEBUG_CONTROLS, 0);
    /// The dedicated EFER switch (docs/architecture.md, VT-x
    /// specifics; SDM 27.3.2.1, 28.3.1, 28.5.1).
    pub const EFER_EXIT: u32 = exit::SAVE_IA32_EFER | exit::LOAD_IA32_EFER;
    pub const EFER_ENTRY: u32 = entry::LOAD_IA32_EFER;
    /// EPT as the hypervisor builds it (SDM 29.3, A.10): 4-level tables in
    /// write-back memory, and INVEPT of some type to flush after changes.
    pub const EPT_REQUIRED: u64 =
        super::ept_vpid::PAGE_WALK_4 | super::ept_vpid::MEMORY_TYPE_WB | super::ept_vpid::INVEPT;
}

/// Negotiate every control word from the capabilities (policy in
/// docs/architecture.md, VT-x specifics; SDM A.2-A.5, A.10). Fails when
/// a control the hypervisor cannot run without is missing; desired
/// controls the CPU lacks are just left out.
pub fn negotiate(
    caps: &VmxCapabilities,
    efer: EferPreference,
) -> Result<Controls, NegotiationError> {
    let [pin_cap, proc_cap, exit_cap, entry_cap] = caps.control_caps();
    let word = |word: ControlWord, cap: u64, (desired, required): (u32, u32)| {
        adjust(cap, desired, required).map_err(|Missing(m)| NegotiationError {
            word,
            missing: u64::from(m),
        })
    };

    let pinbased = word(ControlWord::Pinbased, pin_cap, policy::PIN)?;
    let procbased = word(ControlWord::Primary, proc_cap, policy::PRIMARY)?;
    // Absent PROCBASED_CTLS2 allows no secondary control (A.3.3).
    let proc2_cap = caps.procbased2.unwrap_or(0);
    let mut procbased2 = word(ControlWord::Secondary, proc2_cap, policy::SECONDARY)?;

    // EPT_VPID_CAP exists whenever EPT may be enabled (A.10); treat a
    // failed read as "no EPT features".
    let cap = caps.ept_vpid.unwrap_or(0);
    let has = |bits: u64| cap & bits == bits;
    let invept_types = ept_vpid::INVEPT_SINGLE | ept_vpid::INVEPT_ALL;
    let mut missing = policy::EPT_REQUIRED & !cap;
    if cap & invept_types == 0 {
        missing |= invept_types;
    }
    if missing != 0 {
        return Err(NegotiationError {
            word: ControlWord::EptVpid,
            missing,
        });
    }

    // VPID is only useful if stale translations of a VPID can be flushed
    // with INVVPID (SDM 29.4.3); otherwise leave it off (VPID 0: every
    // entry and exit flushes).
    let invvpid =
        has(ept_vpid::INVVPID) && cap & (ept_vpid::INVVPID_SINGLE | ept_vpid::INVVPID_ALL) != 0;
    if !invvpid && allowed0(proc2_cap) & proc2::ENABLE_VPID == 0 {
        procbased2 &= !proc2::ENABLE_VPID;
    }
    let vpid = procbased2 & proc2::ENABLE_VPID != 0;

    // The dedicated EFER controls only as a set: half of them would leave
    // EFER switched in one direction only.
    let efer_ok = allowed1(exit_cap) & policy::EFER_EXIT == policy::EFER_EXIT
        && allowed1(entry_cap) & policy::EFER_ENTRY == policy::EFER_ENTRY;
    let use_controls = efer_ok && efer == EferPreference::Auto;
    let (mut exit_want, mut entry_want) = (policy::EXIT, policy::ENTRY);
    if use_controls {
        exit_want.0 |= policy::EFER_EXIT;
        entry_want.0 |= policy::EFER_ENTRY;
    }
    let exit = word(ControlWord::Exit, exit_cap, exit_want)?;
    let entry = word(ControlWord::Entry, entry_cap, entry_want)?;
    // A CPU that forced the controls on would have them on regardless.
    let efer = if exit & policy::EFER_EXIT == policy::EFER_EXIT
        && entry & policy::EFER_ENTRY == policy::EFER_ENTRY
    {
        EferPath::VmcsControls
    } else {
        EferPath::MsrAreas
    };

    Ok(Controls {
        pinbased,
        procbased,
        procbased2,
        exit,
        entry,
        efer,
        vpid,
        ept_2m: has(ept_vpid::PAGES_2M),
        ept_1g: has(ept_vpid::PAGES_1G),
        ept_ad: has(ept_vpid::ACCESSED_DIRTY),
        invept_single: has(ept_vpid::INVEPT_SINGLE),
        invept_all: has(ept_vpid::INVEPT_ALL),
        invvpid_single: vpid && invvpid && has(ept_vpid::INVVPID_SINGLE),
        invvpid_all: vpid && invvpid && has(ept_vpid::INVVPID_ALL),
    })
}

/// A one-line summary of the negotiated controls for the boot log.
pub fn describe(controls: &Controls) -> impl fmt::Display + '_ {
    Description(controls)
}

struct Description<'a>(&'a Controls);

impl fmt::Display for Description<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let efer = match c.efer {
            EferPath::VmcsControls => "VMCS controls",
            EferPath::MsrAreas => "MSR areas",
        };
        write!(f, "VT-x: EFER via {efer}; VPID ")?;
        if c.vpid {
            write!(
                f,
                "on (INVVPID single {}, all {})",
                yes_no(c.invvpid_single),
                yes_no(c.invvpid_all)
            )?;
        } else {
            f.write_str("off")?;
        }
        write!(
            f,
            "; EPT 2M pages {}, 1G pages {}, A/D {}, INVEPT single {}, all {}",
            yes_no(c.ept_2m),
            yes_no(c.ept_1g),
            yes_no(c.ept_ad),
            yes_no(c.invept_single),
            yes_no(c.invept_all)
        )?;
        write!(
            f,
            "; controls pin {:#x} proc {:#x} proc2 {:#x} exit {:#x} entry {:#x}",
            c.pinbased, c.procbased, c.procbased2, c.exit, c.entry
        )
    }
}

//! thinvisor's Intel VT-x backend (Intel SDM vol. 3C, chapters 24-28).
//!
//! Bring-up ([`probe`], [`enable`]), one VMCS per guest ([`setup_vmcs`]),
//! and [`VmxVcpu`], which turns VM exits into the core's neutral exits.
#![no_std]

pub mod caps;
pub mod cr_write;
pub mod guest_check;
pub mod initial;
pub mod msr_bitmap;
pub mod vcpu;
pub mod vmcs;
pub mod xcr0;

use caps::{cr_fixed, Controls, EferPath, VmxCapabilities};
use core::fmt;
use thinvisor_vmm::{GuestKind, InitialState};
pub use vcpu::{CrPolicy, EferAreas, GuestEfer, MsrEntry, VmxVcpu};
use vmcs::{vmclear, vmptrld, vmwrite, vmxon, VmFail, VmcsField as F};
use x86_64::registers::control::{Cr0, Cr3, Cr4};
use x86_64::registers::model_specific::Msr;

/// IA32_FEATURE_CONTROL (SDM vol. 4, table 2-2): lock, VMX outside SMX.
const IA32_FEATURE_CONTROL: u32 = 0x3A;
const FEATURE_CONTROL_LOCKED: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
/// CPUID.1:ECX.VMX.
const CPUID_1_ECX_VMX: u32 = 1 << 5;
const IA32_EFER: u32 = 0xC000_0080;
const CR4_VMXE: u64 = 1 << 13;
const CR4_OSXSAVE: u64 = 1 << 18;
/// CPUID.1:ECX.XSAVE.
const CPUID_1_ECX_XSAVE: u32 = 1 << 26;

/// The guest's VPID. 0 is the host's; any other tags the guest's TLB
/// entries so VM entries and exits need not flush (SDM vol. 3C, 29.1).
pub const GUEST_VPID: u16 = 1;

/// Why VT-x cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// CPUID.1:ECX.VMX is clear.
    NotSupported,
    /// IA32_FEATURE_CONTROL is locked with VMX outside SMX disabled.
    DisabledByFirmware,
    /// The CPU's capabilities lack a control thinvisor requires.
    Negotiation(caps::NegotiationError),
    /// A VMX instruction failed.
    Instruction(&'static str, VmFail),
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmxError::NotSupported => f.write_str("the processor has no Intel VT-x (CPUID.1:ECX.VMX clear)"),
            VmxError::DisabledByFirmware => f.write_str(
                "VT-x is disabled by the firmware (IA32_FEATURE_CONTROL locked without VMX outside SMX)",
            ),
            VmxError::Negotiation(e) => write!(f, "{e}"),
            VmxError::Instruction(what, e) => write!(f, "{what} failed: {e}"),
        }
    }
}

/// Look for VT-x and read its capability MSRs.
pub fn probe() -> Result<VmxCapabilities, VmxError> {
    if core::arch::x86_64::__cpuid(1).ecx & CPUID_1_ECX_VMX == 0 {
        return Err(VmxError::NotSupported);
    }
    // SAFETY: IA32_FEATURE_CONTROL exists on every CPU that reports VMX.
    let fc = unsafe { Msr::new(IA32_FEATURE_CONTROL).read() };
    if fc & FEATURE_CONTROL_LOCKED != 0 && fc & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return Err(VmxError::DisabledByFirmware);
    }
    Ok(VmxCapabilities::read(|msr| {
        // SAFETY: the capability MSRs exist when VMX does; the optional
        // ones are only read when IA32_VMX_BASIC/PROCBASED say they exist
        // (VmxCapabilities::read decides).
        Some(unsafe { Msr::new(msr).read() })
    }))
}

/// Enter VMX root operation: lock IA32_FEATURE_CONTROL if the firmware
/// left it open, apply the CR0/CR4 fixed bits (SDM vol. 3C, 24.8), set
/// CR4.VMXE, VMXON.
///
/// # Safety
/// `vmxon_region` must be a zeroed 4 KiB page at physical `vmxon_pa`, used
/// by nothing else while VMX operation lasts; [`probe`] must have succeeded.
pub unsafe fn enable(
    caps: &VmxCapabilities,
    vmxon_region: &mut [u8; 4096],
    vmxon_pa: u64,
) -> Result<(), VmxError> {
    let mut fc = Msr::new(IA32_FEATURE_CONTROL);
    // SAFETY: probe() found the MSR; setting lock + enable is what the
    // firmware would have done.
    unsafe {
        let value = fc.read();
        if value & FEATURE_CONTROL_LOCKED == 0 {
            fc.write(value | FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMX_OUTSIDE_SMX);
        }
    }
    let cr0 = cr_fixed(Cr0::read_raw(), caps.cr0_fixed0, caps.cr0_fixed1);
    // OSXSAVE lets the hypervisor execute XSETBV for its guests (XSETBV
    // exits unconditionally, SDM vol. 3C, 26.1.2).
    let osxsave = if core::arch::x86_64::__cpuid(1).ecx & CPUID_1_ECX_XSAVE != 0 {
        CR4_OSXSAVE
    } else {
        0
    };
    let cr4 = cr_fixed(
        Cr4::read_raw() | CR4_VMXE | osxsave,
        caps.cr4_fixed0,
        caps.cr4_fixed1,
    );
    // SAFETY: the fixed bits only force NE (CR0) and VMXE (CR4) on this
    // hypervisor, which runs with PE, PG and PAE already set.
    unsafe {
        Cr0::write_raw(cr0);
        Cr4::write_raw(cr4);
    }
    vmxon_region[..4].copy_from_slice(&caps.revision_id().to_le_bytes());
    // SAFETY: CR4.VMXE and the fixed bits are set; the region carries the
    // revision identifier (SDM vol. 3C, 25.11.5).
    unsafe { vmxon(vmxon_pa) }.map_err(|e| VmxError::Instruction("VMXON", e))
}

/// The host state a VM exit returns to.
#[derive(Clone, Copy, Debug)]
pub struct HostState {
    pub cs: u16,
    pub ds: u16,
    pub tr: u16,
    pub tr_base: u64,
    pub gdtr_base: u64,
    pub idtr_base: u64,
    /// The processor's own area (the host finds it through GS).
    pub gs_base: u64,
}

/// Everything [`setup_vmcs`] needs.
pub struct VmcsSetup<'a> {
    pub caps: &'a VmxCapabilities,
    pub controls: &'a Controls,
    pub vmcs_region: &'a mut [u8; 4096],
    pub vmcs_pa: u64,
    /// The EPT root table.
    pub ept_root: u64,
    /// A zeroed 4 KiB MSR bitmap, filled by [`msr_bitmap::init`].
    pub msr_bitmap_pa: u64,
    /// 8 KiB of I/O bitmaps A and B, contiguous (see thinvisor_vmm::iomap).
    pub io_bitmap_pa: u64,
    /// The MSR areas for the EFER fallback (used when
    /// `controls.efer == EferPath::MsrAreas`), with their physical address.
    pub efer_areas: Option<(&'static mut EferAreas, u64)>,
    pub host: HostState,
    /// How the guest starts.
    pub initial: &'a InitialState,
    /// Which exits the guest needs.
    pub kind: GuestKind,
    /// Start in the wait-for-SIPI activity state (an application processor
    /// the guest has not started yet): INIT and SIPI then exit.
    pub wait_for_sipi: bool,
}

/// Build the VMCS for a guest that starts in `s.initial` and make it
/// current.
/// Returns how the guest's CR0/CR4 and EFER are kept.
///
/// # Safety
/// VMX operation must be on; the VMCS region, MSR bitmap and EFER areas
/// must be this guest's own; the EPT must map only guest memory.
pub unsafe fn setup_vmcs(s: VmcsSetup<'_>) -> Result<(CrPolicy, GuestEfer), VmxError> {
    let fail = |what| move |e| VmxError::Instruction(what, e);
    s.vmcs_region[..4].copy_from_slice(&s.caps.revision_id().to_le_bytes());
    // SAFETY: VMX is on and the region is this guest's VMCS.
    unsafe {
        vmclear(s.vmcs_pa).map_err(fail("VMCLEAR"))?;
        vmptrld(s.vmcs_pa).map_err(fail("VMPTRLD"))?;
    }
    let c = s.controls;
    let policy = CrPolicy {
        cr0_must1: s.caps.cr0_fixed0 & s.caps.cr0_fixed1,
        cr0_may1: s.caps.cr0_fixed1,
        cr4_must1: s.caps.cr4_fixed0 & s.caps.cr4_fixed1,
        cr4_may1: s.caps.cr4_fixed1,
    };
    // SAFETY: EFER exists on every VMX processor.
    let host_efer = unsafe { Msr::new(IA32_EFER).read() };
    let (host_cr3, _) = Cr3::read_raw();

    let entry = c.entry;
    let eptp = s.ept_root | (3 << 3) | 6;
    let procbased = match s.kind {
        GuestKind::Isolated => c.procbased,
        // The machine's own OS halts until its interrupts wake it, natively;
        // keep HLT exiting only where the processor cannot clear it (its
        // allowed-0 settings, SDM vol. 3D, A.3.2).
        GuestKind::Passthrough => {
            let [_, proc_cap, _, _] = s.caps.control_caps();
            (c.procbased & !caps::proc::HLT_EXITING) | (proc_cap as u32)
        }
    };
    let writes: &[(F, u64)] = &[
        (F::PIN_BASED_VM_EXEC_CONTROL, c.pinbased.into()),
        (F::CPU_BASED_VM_EXEC_CONTROL, procbased.into()),
        (F::SECONDARY_VM_EXEC_CONTROL, c.procbased2.into()),
        (F::VM_EXIT_CONTROLS, c.exit.into()),
        // #UD only, to accept AMD's VMMCALL as a VMM call too.
        (F::EXCEPTION_BITMAP, 1 << 6),
        (F::PAGE_FAULT_ERROR_CODE_MASK, 0),
        (F::PAGE_FAULT_ERROR_CODE_MATCH, 0),
        (F::CR3_TARGET_COUNT, 0),
        (F::MSR_BITMAP, s.msr_bitmap_pa),
        (F::IO_BITMAP_A, s.io_bitmap_pa),
        (F::IO_BITMAP_B, s.io_bitmap_pa + 4096),
        (F::EPT_POINTER, eptp),
        (F::CR0_GUEST_HOST_MASK, policy.cr0_mask()),
        (F::CR4_GUEST_HOST_MASK, policy.cr4_mask()),
        (F::VM_ENTRY_INTR_INFO, 0),
        (F::VMCS_LINK_POINTER, u64::MAX),
        // Host state (SDM vol. 3C, 26.2.2-26.2.4).
        (F::HOST_CR0, Cr0::read_raw()),
        (F::HOST_CR3, host_cr3.start_address().as_u64()),
        (F::HOST_CR4, Cr4::read_raw()),
        (F::HOST_CS_SELECTOR, s.host.cs.into()),
        (F::HOST_SS_SELECTOR, s.host.ds.into()),
        (F::HOST_DS_SELECTOR, s.host.ds.into()),
        (F::HOST_ES_SELECTOR, s.host.ds.into()),
        (F::HOST_FS_SELECTOR, 0),
        (F::HOST_GS_SELECTOR, 0),
        (F::HOST_TR_SELECTOR, s.host.tr.into()),
        (F::HOST_FS_BASE, 0),
        (F::HOST_GS_BASE, s.host.gs_base),
        (F::HOST_TR_BASE, s.host.tr_base),
        (F::HOST_GDTR_BASE, s.host.gdtr_base),
        (F::HOST_IDTR_BASE, s.host.idtr_base),
        (F::HOST_IA32_SYSENTER_CS, 0),
        (F::HOST_IA32_SYSENTER_ESP, 0),
        (F::HOST_IA32_SYSENTER_EIP, 0),
        // HOST_RSP and HOST_RIP: written by the world switch at each entry.
        // Guest state beyond initial::guest_fields (below).
        (F::GUEST_IA32_DEBUGCTL, 0),
        (F::GUEST_ACTIVITY_STATE, 0),
    ];
    let vmw = |field: F, value: u64| {
        // SAFETY: the VMCS made current above is this guest's; the values
        // are the host's own state and a guest state confined by EPT.
        unsafe { vmwrite(field, value) }.map_err(|e| VmxError::Instruction("VMWRITE", e))
    };
    // The guest's state (SDM vol. 3C, 26.3.1): the initial state, its
    // CR0.CD and NW in the processor itself (no VM entry loads them).
    let guest = initial::guest_fields(s.initial, &policy);
    policy.load_cache_bits(s.initial.cr0());
    let sysenter = initial::sysenter_fields(s.initial);
    for &(field, value) in writes.iter().chain(&guest).chain(&sysenter) {
        vmw(field, value).map_err(|e| match e {
            VmxError::Instruction(_, f) => VmxError::Instruction(field_name(field), f),
            e => e,
        })?;
    }
    if c.vpid {
        vmw(F::VIRTUAL_PROCESSOR_ID, GUEST_VPID.into())?;
    }
    if c.procbased2 & caps::proc2::ENABLE_XSAVES != 0 {
        // XSAVES/XRSTORS of any component must not exit (SDM 25.6.20).
        vmw(F::XSS_EXITING_BITMAP, 0)?;
    }
    let efer = match (c.efer, s.efer_areas) {
        (EferPath::VmcsControls, _) => {
            vmw(F::GUEST_IA32_EFER, s.initial.efer())?;
            vmw(F::HOST_IA32_EFER, host_efer)?;
            vmw(F::VM_EXIT_MSR_STORE_COUNT, 0)?;
            vmw(F::VM_EXIT_MSR_LOAD_COUNT, 0)?;
            vmw(F::VM_ENTRY_MSR_LOAD_COUNT, 0)?;
            GuestEfer::Field
        }
        (EferPath::MsrAreas, Some((areas, pa))) => {
            areas.guest = MsrEntry {
                index: IA32_EFER,
                reserved: 0,
                value: s.initial.efer(),
            };
            areas.host = MsrEntry {
                index: IA32_EFER,
                reserved: 0,
                value: host_efer,
            };
            // The guest entry is stored on exit and loaded on entry; the
            // host entry follows it and is loaded on exit (SDM 25.7.2, 25.8.2).
            let host_pa = pa + core::mem::size_of::<MsrEntry>() as u64;
            vmw(F::VM_EXIT_MSR_STORE_ADDR, pa)?;
            vmw(F::VM_EXIT_MSR_STORE_COUNT, 1)?;
            vmw(F::VM_ENTRY_MSR_LOAD_ADDR, pa)?;
            vmw(F::VM_ENTRY_MSR_LOAD_COUNT, 1)?;
            vmw(F::VM_EXIT_MSR_LOAD_ADDR, host_pa)?;
            vmw(F::VM_EXIT_MSR_LOAD_COUNT, 1)?;
            GuestEfer::Area(areas)
        }
        (EferPath::MsrAreas, None) => {
            return Err(VmxError::Instruction("EFER MSR areas", VmFail::Invalid));
        }
    };
    // IA-32e mode exactly when the guest's EFER.LMA says so.
    let entry = initial::ia32e_entry(entry.into(), s.initial);
    vmw(F::VM_ENTRY_CONTROLS, entry)?;
    let pat_in_vmcs = entry & u64::from(caps::entry::LOAD_IA32_PAT) != 0;
    if pat_in_vmcs {
        vmw(F::GUEST_IA32_PAT, s.initial.msrs().pat)?;
    }
    // SAFETY: a start that sets MSRs carries values ResumedState::new
    // checked (canonical, no reserved bits, a PAT of defined types and
    // no write-combining in entry 0); this is the processor that runs
    // the guest.
    unsafe { initial::load_shared_msrs(s.initial, pat_in_vmcs) };
    if s.wait_for_sipi {
        // Halted with interrupts off rather than in wait-for-SIPI: in
        // wait-for-SIPI an INIT is blocked and stays pending (SDM vol. 3C,
        // 26.4.2), so the guest's INIT would arrive after the SIPI it
        // precedes; from HLT it exits at once, and the INIT exit puts the
        // processor in wait-for-SIPI for the SIPI that follows.
        vmw(F::GUEST_ACTIVITY_STATE, vcpu::ACTIVITY_HLT)?;
    }
    Ok((policy, efer))
}

/// Invalidate what the EPT and VPID may have cached before the first
/// entry: the TLBs may hold translations from an earlier user.
///
/// # Safety
/// VMX operation must be on.
pub unsafe fn flush_guest_tlb(controls: &Controls, ept_root: u64) -> Result<(), VmxError> {
    let eptp = ept_root | (3 << 3) | 6;
    // SAFETY: the types passed are the ones the capabilities allow.
    unsafe {
        if controls.invept_single {
            vmcs::invept(1, eptp).map_err(|e| VmxError::Instruction("INVEPT", e))?;
        } else {
            vmcs::invept(2, 0).map_err(|e| VmxError::Instruction("INVEPT", e))?;
        }
        if controls.vpid {
            if controls.invvpid_single {
                vmcs::invvpid(1, GUEST_VPID).map_err(|e| VmxError::Instruction("INVVPID", e))?;
            } else {
                vmcs::invvpid(2, 0).map_err(|e| VmxError::Instruction("INVVPID", e))?;
            }
        }
    }
    Ok(())
}

/// A VMCS field's name for error messages.
fn field_name(field: F) -> &'static str {
    match field {
        F::PIN_BASED_VM_EXEC_CONTROL => "VMWRITE of the pin-based controls",
        F::CPU_BASED_VM_EXEC_CONTROL => "VMWRITE of the primary processor-based controls",
        F::SECONDARY_VM_EXEC_CONTROL => "VMWRITE of the secondary processor-based controls",
        F::VM_EXIT_CONTROLS => "VMWRITE of the VM-exit controls",
        F::EPT_POINTER => "VMWRITE of the EPT pointer",
        _ => "VMWRITE of a VMCS field",
    }
}

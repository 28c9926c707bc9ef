//! The VMCS: field encodings (Intel SDM vol. 3D, appendix B) and the VMX
//! instructions that reach it, with their failures decoded.

use core::arch::asm;
use core::fmt;

/// A VMCS field encoding.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(transparent)]
pub struct VmcsField(pub u32);

#[allow(missing_docs)]
impl VmcsField {
    // 16-bit control (B.1.1)
    pub const VIRTUAL_PROCESSOR_ID: Self = Self(0x0000);
    // 16-bit guest state (B.1.2)
    pub const GUEST_ES_SELECTOR: Self = Self(0x0800);
    pub const GUEST_CS_SELECTOR: Self = Self(0x0802);
    pub const GUEST_SS_SELECTOR: Self = Self(0x0804);
    pub const GUEST_DS_SELECTOR: Self = Self(0x0806);
    pub const GUEST_FS_SELECTOR: Self = Self(0x0808);
    pub const GUEST_GS_SELECTOR: Self = Self(0x080A);
    pub const GUEST_LDTR_SELECTOR: Self = Self(0x080C);
    pub const GUEST_TR_SELECTOR: Self = Self(0x080E);
    // 16-bit host state (B.1.3)
    pub const HOST_ES_SELECTOR: Self = Self(0x0C00);
    pub const HOST_CS_SELECTOR: Self = Self(0x0C02);
    pub const HOST_SS_SELECTOR: Self = Self(0x0C04);
    pub const HOST_DS_SELECTOR: Self = Self(0x0C06);
    pub const HOST_FS_SELECTOR: Self = Self(0x0C08);
    pub const HOST_GS_SELECTOR: Self = Self(0x0C0A);
    pub const HOST_TR_SELECTOR: Self = Self(0x0C0C);
    // 64-bit control (B.2.1)
    pub const IO_BITMAP_A: Self = Self(0x2000);
    pub const IO_BITMAP_B: Self = Self(0x2002);
    pub const MSR_BITMAP: Self = Self(0x2004);
    pub const VM_EXIT_MSR_STORE_ADDR: Self = Self(0x2006);
    pub const VM_EXIT_MSR_LOAD_ADDR: Self = Self(0x2008);
    pub const VM_ENTRY_MSR_LOAD_ADDR: Self = Self(0x200A);
    pub const TSC_OFFSET: Self = Self(0x2010);
    pub const EPT_POINTER: Self = Self(0x201A);
    pub const XSS_EXITING_BITMAP: Self = Self(0x202C);
    // 64-bit read-only data (B.2.2)
    pub const GUEST_PHYSICAL_ADDRESS: Self = Self(0x2400);
    // 64-bit guest state (B.2.3)
    pub const VMCS_LINK_POINTER: Self = Self(0x2800);
    pub const GUEST_IA32_DEBUGCTL: Self = Self(0x2802);
    pub const GUEST_IA32_PAT: Self = Self(0x2804);
    pub const GUEST_IA32_EFER: Self = Self(0x2806);
    pub const GUEST_PDPTE0: Self = Self(0x280A);
    pub const GUEST_PDPTE1: Self = Self(0x280C);
    pub const GUEST_PDPTE2: Self = Self(0x280E);
    pub const GUEST_PDPTE3: Self = Self(0x2810);
    // 64-bit host state (B.2.4)
    pub const HOST_IA32_PAT: Self = Self(0x2C00);
    pub const HOST_IA32_EFER: Self = Self(0x2C02);
    // 32-bit control (B.3.1)
    pub const PIN_BASED_VM_EXEC_CONTROL: Self = Self(0x4000);
    pub const CPU_BASED_VM_EXEC_CONTROL: Self = Self(0x4002);
    pub const EXCEPTION_BITMAP: Self = Self(0x4004);
    pub const PAGE_FAULT_ERROR_CODE_MASK: Self = Self(0x4006);
    pub const PAGE_FAULT_ERROR_CODE_MATCH: Self = Self(0x4008);
    pub const CR3_TARGET_COUNT: Self = Self(0x400A);
    pub const VM_EXIT_CONTROLS: Self = Self(0x400C);
    pub const VM_EXIT_MSR_STORE_COUNT: Self = Self(0x400E);
    pub const VM_EXIT_MSR_LOAD_COUNT: Self = Self(0x4010);
    pub const VM_ENTRY_CONTROLS: Self = Self(0x4012);
    pub const VM_ENTRY_MSR_LOAD_COUNT: Self = Self(0x4014);
    pub const VM_ENTRY_INTR_INFO: Self = Self(0x4016);
    pub const VM_ENTRY_EXCEPTION_ERROR_CODE: Self = Self(0x4018);
    pub const VM_ENTRY_INSTRUCTION_LEN: Self = Self(0x401A);
    pub const SECONDARY_VM_EXEC_CONTROL: Self = Self(0x401E);
    // 32-bit read-only data (B.3.2)
    pub const VM_INSTRUCTION_ERROR: Self = Self(0x4400);
    pub const VM_EXIT_REASON: Self = Self(0x4402);
    pub const VM_EXIT_INTR_INFO: Self = Self(0x4404);
    pub const VM_EXIT_INTR_ERROR_CODE: Self = Self(0x4406);
    pub const IDT_VECTORING_INFO: Self = Self(0x4408);
    pub const IDT_VECTORING_ERROR_CODE: Self = Self(0x440A);
    pub const VM_EXIT_INSTRUCTION_LEN: Self = Self(0x440C);
    pub const VM_EXIT_INSTRUCTION_INFO: Self = Self(0x440E);
    // 32-bit guest state (B.3.3)
    pub const GUEST_ES_LIMIT: Self = Self(0x4800);
    pub const GUEST_CS_LIMIT: Self = Self(0x4802);
    pub const GUEST_SS_LIMIT: Self = Self(0x4804);
    pub const GUEST_DS_LIMIT: Self = Self(0x4806);
    pub const GUEST_FS_LIMIT: Self = Self(0x4808);
    pub const GUEST_GS_LIMIT: Self = Self(0x480A);
    pub const GUEST_LDTR_LIMIT: Self = Self(0x480C);
    pub const GUEST_TR_LIMIT: Self = Self(0x480E);
    pub const GUEST_GDTR_LIMIT: Self = Self(0x4810);
    pub const GUEST_IDTR_LIMIT: Self = Self(0x4812);
    pub const GUEST_ES_AR_BYTES: Self = Self(0x4814);
    pub const GUEST_CS_AR_BYTES: Self = Self(0x4816);
    pub const GUEST_SS_AR_BYTES: Self = Self(0x4818);
    pub const GUEST_DS_AR_BYTES: Self = Self(0x481A);
    pub const GUEST_FS_AR_BYTES: Self = Self(0x481C);
    pub const GUEST_GS_AR_BYTES: Self = Self(0x481E);
    pub const GUEST_LDTR_AR_BYTES: Self = Self(0x4820);
    pub const GUEST_TR_AR_BYTES: Self = Self(0x4822);
    pub const GUEST_INTERRUPTIBILITY_INFO: Self = Self(0x4824);
    pub const GUEST_ACTIVITY_STATE: Self = Self(0x4826);
    pub const GUEST_SYSENTER_CS: Self = Self(0x482A);
    // 32-bit host state (B.3.4)
    pub const HOST_IA32_SYSENTER_CS: Self = Self(0x4C00);
    // Natural-width control (B.4.1)
    pub const CR0_GUEST_HOST_MASK: Self = Self(0x6000);
    pub const CR4_GUEST_HOST_MASK: Self = Self(0x6002);
    pub const CR0_READ_SHADOW: Self = Self(0x6004);
    pub const CR4_READ_SHADOW: Self = Self(0x6006);
    // Natural-width read-only data (B.4.2)
    pub const EXIT_QUALIFICATION: Self = Self(0x6400);
    pub const GUEST_LINEAR_ADDRESS: Self = Self(0x640A);
    // Natural-width guest state (B.4.3)
    pub const GUEST_CR0: Self = Self(0x6800);
    pub const GUEST_CR3: Self = Self(0x6802);
    pub const GUEST_CR4: Self = Self(0x6804);
    pub const GUEST_ES_BASE: Self = Self(0x6806);
    pub const GUEST_CS_BASE: Self = Self(0x6808);
    pub const GUEST_SS_BASE: Self = Self(0x680A);
    pub const GUEST_DS_BASE: Self = Self(0x680C);
    pub const GUEST_FS_BASE: Self = Self(0x680E);
    pub const GUEST_GS_BASE: Self = Self(0x6810);
    pub const GUEST_LDTR_BASE: Self = Self(0x6812);
    pub const GUEST_TR_BASE: Self = Self(0x6814);
    pub const GUEST_GDTR_BASE: Self = Self(0x6816);
    pub const GUEST_IDTR_BASE: Self = Self(0x6818);
    pub const GUEST_DR7: Self = Self(0x681A);
    pub const GUEST_RSP: Self = Self(0x681C);
    pub const GUEST_RIP: Self = Self(0x681E);
    pub const GUEST_RFLAGS: Self = Self(0x6820);
    pub const GUEST_PENDING_DBG_EXCEPTIONS: Self = Self(0x6822);
    pub const GUEST_SYSENTER_ESP: Self = Self(0x6824);
    pub const GUEST_SYSENTER_EIP: Self = Self(0x6826);
    // Natural-width host state (B.4.4)
    pub const HOST_CR0: Self = Self(0x6C00);
    pub const HOST_CR3: Self = Self(0x6C02);
    pub const HOST_CR4: Self = Self(0x6C04);
    pub const HOST_FS_BASE: Self = Self(0x6C06);
    pub const HOST_GS_BASE: Self = Self(0x6C08);
    pub const HOST_TR_BASE: Self = Self(0x6C0A);
    pub const HOST_GDTR_BASE: Self = Self(0x6C0C);
    pub const HOST_IDTR_BASE: Self = Self(0x6C0E);
    pub const HOST_IA32_SYSENTER_ESP: Self = Self(0x6C10);
    pub const HOST_IA32_SYSENTER_EIP: Self = Self(0x6C12);
    pub const HOST_RSP: Self = Self(0x6C14);
    pub const HOST_RIP: Self = Self(0x6C16);
}

/// The VM-instruction error numbers (Intel SDM vol. 3C, 31.4, table 31-1).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct VmInstructionError(pub u32);

impl VmInstructionError {
    /// The manual's description of this error number.
    pub fn description(self) -> &'static str {
        match self.0 {
            1 => "VMCALL executed in VMX root operation",
            2 => "VMCLEAR with invalid physical address",
            3 => "VMCLEAR with VMXON pointer",
            4 => "VMLAUNCH with non-clear VMCS",
            5 => "VMRESUME with non-launched VMCS",
            6 => "VMRESUME after VMXOFF",
            7 => "VM entry with invalid control field(s)",
            8 => "VM entry with invalid host-state field(s)",
            9 => "VMPTRLD with invalid physical address",
            10 => "VMPTRLD with VMXON pointer",
            11 => "VMPTRLD with incorrect VMCS revision identifier",
            12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
            13 => "VMWRITE to read-only VMCS component",
            15 => "VMXON executed in VMX root operation",
            16 => "VM entry with invalid executive-VMCS pointer",
            17 => "VM entry with non-launched executive VMCS",
            18 => "VM entry with executive-VMCS pointer not VMXON pointer",
            19 => "VMCALL with non-clear VMCS",
            20 => "VMCALL with invalid VM-exit control fields",
            22 => "VMCALL with incorrect MSEG revision identifier",
            23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
            24 => "VMCALL with invalid SMM-monitor features",
            25 => "VM entry with invalid VM-execution control fields in executive VMCS",
            26 => "VM entry with events blocked by MOV SS",
            28 => "invalid operand to INVEPT/INVVPID",
            _ => "unknown VM-instruction error",
        }
    }
}

/// How a VMX instruction failed (Intel SDM vol. 3C, 31.2).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum VmFail {
    /// VMfailInvalid: no current VMCS to hold an error number.
    Invalid,
    /// VMfailValid: the current VMCS's VM-instruction error field.
    Valid(VmInstructionError),
}

impl fmt::Display for VmFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmFail::Invalid => f.write_str("VMfailInvalid (no current VMCS)"),
            VmFail::Valid(e) => write!(f, "VMfailValid, error {}: {}", e.0, e.description()),
        }
    }
}

/// Decode RFLAGS after a VMX instruction: CF = VMfailInvalid, ZF =
/// VMfailValid.
#[inline(always)]
fn check(rflags: u64) -> Result<(), VmFail> {
    if rflags & 0x41 == 0 {
        Ok(())
    } else {
        failure(rflags)
    }
}

#[cold]
#[inline(never)]
fn failure(rflags: u64) -> Result<(), VmFail> {
    const CF: u64 = 1 << 0;
    const ZF: u64 = 1 << 6;
    if rflags & CF != 0 {
        Err(VmFail::Invalid)
    } else if rflags & ZF != 0 {
        // SAFETY: VMfailValid means a current VMCS exists, and the error
        // field is always readable.
        let error = unsafe { vmread_raw(VmcsField::VM_INSTRUCTION_ERROR) }.unwrap_or(0);
        Err(VmFail::Valid(VmInstructionError(error as u32)))
    } else {
        Ok(())
    }
}

/// VMREAD of a field that must exist, of the VMCS that must be current:
/// a failure is a broken invariant of the caller, and traps (UD2: the
/// host's exception handler reports the address, which names the field).
/// Three instructions where [`vmread`]'s checked form takes five, on an
/// exit path that reads several fields (docs/performance.md).
///
/// # Safety
/// VMX operation must be on and a VMCS current.
#[inline(always)]
pub unsafe fn vmread_or_trap(field: VmcsField) -> u64 {
    let value: u64;
    // SAFETY: the caller guarantees a current VMCS; VMREAD only reads.
    // JBE: CF (VMfailInvalid) or ZF (VMfailValid).
    unsafe {
        asm!(
            "vmread {v}, {f}",
            "jbe 3f",
            ".pushsection .text.unlikely.thinvisor_vmx_trap, \"ax\"",
            "3:",
            "ud2",
            ".popsection",
            v = out(reg) value,
            f = in(reg) u64::from(field.0),
            options(nostack, nomem),
        );
    }
    value
}

/// VMWRITE that traps on failure, as [`vmread_or_trap`].
///
/// # Safety
/// VMX operation must be on and a VMCS current; the value must not make
/// the host state point anywhere unsafe.
#[inline(always)]
pub unsafe fn vmwrite_or_trap(field: VmcsField, value: u64) {
    // SAFETY: the caller guarantees a current VMCS and a sound value.
    unsafe {
        asm!(
            "vmwrite {f}, {v}",
            "jbe 3f",
            ".pushsection .text.unlikely.thinvisor_vmx_trap, \"ax\"",
            "3:",
            "ud2",
            ".popsection",
            f = in(reg) u64::from(field.0),
            v = in(reg) value,
            options(nostack),
        );
    }
}

/// Which failure a VMREAD or VMWRITE had, after the fact: with a current
/// VMCS (VMfailValid) the error field says why; without one
/// (VMfailInvalid) reading it fails too.
#[cold]
#[inline(never)]
fn failure_after_setbe() -> VmFail {
    // SAFETY: VMX operation is on (the failed instruction required it).
    match unsafe { vmread_raw(VmcsField::VM_INSTRUCTION_ERROR) } {
        Ok(error) => VmFail::Valid(VmInstructionError(error as u32)),
        Err(()) => VmFail::Invalid,
    }
}

/// VMREAD without decoding the error number (used by [`check`] itself).
///
/// # Safety
/// VMX operation must be on.
unsafe fn vmread_raw(field: VmcsField) -> Result<u64, ()> {
    let value: u64;
    let rflags: u64;
    // SAFETY: the caller guarantees VMX operation; VMREAD only reads.
    unsafe {
        asm!("vmread {v}, {f}", "pushfq", "pop {r}", v = out(reg) value, f = in(reg) u64::from(field.0), r = out(reg) rflags);
    }
    if rflags & 0x41 != 0 {
        Err(())
    } else {
        Ok(value)
    }
}

/// Read a field of the current VMCS.
///
/// # Safety
/// VMX operation must be on and a VMCS current.
#[inline(always)]
pub unsafe fn vmread(field: VmcsField) -> Result<u64, VmFail> {
    let value: u64;
    let failed: u8;
    // SAFETY: the caller guarantees a current VMCS; VMREAD only reads.
    // SETBE: CF (VMfailInvalid) or ZF (VMfailValid), without the two
    // instructions that would copy RFLAGS out (the exit path reads
    // several fields).
    unsafe {
        asm!("vmread {v}, {f}", "setbe {e}", v = out(reg) value, f = in(reg) u64::from(field.0), e = out(reg_byte) failed, options(nostack));
    }
    if failed != 0 {
        return Err(failure_after_setbe());
    }
    Ok(value)
}

/// Write a field of the current VMCS.
///
/// # Safety
/// VMX operation must be on and a VMCS current; the value must not make
/// the host state point anywhere unsafe.
#[inline(always)]
pub unsafe fn vmwrite(field: VmcsField, value: u64) -> Result<(), VmFail> {
    let failed: u8;
    // SAFETY: the caller guarantees a current VMCS and a sound value.
    unsafe {
        asm!("vmwrite {f}, {v}", "setbe {e}", f = in(reg) u64::from(field.0), v = in(reg) value, e = out(reg_byte) failed, options(nostack));
    }
    if failed != 0 {
        return Err(failure_after_setbe());
    }
    Ok(())
}

/// Enter VMX operation with the VMXON region at `pa`.
///
/// # Safety
/// CR4.VMXE must be set, CR0/CR4 must satisfy the fixed bits, and `pa` must
/// be a 4 KiB region holding the VMCS revision identifier, used by nothing
/// else.
pub unsafe fn vmxon(pa: u64) -> Result<(), VmFail> {
    let rflags: u64;
    // SAFETY: the caller guarantees the preconditions above.
    unsafe {
        asm!("vmxon [{p}]", "pushfq", "pop {r}", p = in(reg) &pa, r = out(reg) rflags);
    }
    check(rflags)
}

/// Make the VMCS at `pa` inactive and clear (its launch state).
///
/// # Safety
/// VMX operation must be on; `pa` must be a VMCS region.
pub unsafe fn vmclear(pa: u64) -> Result<(), VmFail> {
    let rflags: u64;
    // SAFETY: the caller guarantees VMX operation and a VMCS region.
    unsafe {
        asm!("vmclear [{p}]", "pushfq", "pop {r}", p = in(reg) &pa, r = out(reg) rflags);
    }
    check(rflags)
}

/// Make the VMCS at `pa` current.
///
/// # Safety
/// VMX operation must be on; `pa` must be a VMCS region with the right
/// revision identifier.
pub unsafe fn vmptrld(pa: u64) -> Result<(), VmFail> {
    let rflags: u64;
    // SAFETY: the caller guarantees VMX operation and a VMCS region.
    unsafe {
        asm!("vmptrld [{p}]", "pushfq", "pop {r}", p = in(reg) &pa, r = out(reg) rflags);
    }
    check(rflags)
}

/// INVEPT type 1 (single context) or 2 (all contexts), SDM vol. 3C, 30.3.
///
/// # Safety
/// VMX operation must be on and the type supported.
pub unsafe fn invept(kind: u64, eptp: u64) -> Result<(), VmFail> {
    let descriptor: [u64; 2] = [eptp, 0];
    let rflags: u64;
    // SAFETY: the caller guarantees VMX operation and a supported type.
    unsafe {
        asm!("invept {k}, [{d}]", "pushfq", "pop {r}", k = in(reg) kind, d = in(reg) &descriptor, r = out(reg) rflags);
    }
    check(rflags)
}

/// INVVPID type 1 (single context) or 2 (all contexts), SDM vol. 3C, 30.3.
///
/// # Safety
/// VMX operation must be on and the type supported.
pub unsafe fn invvpid(kind: u64, vpid: u16) -> Result<(), VmFail> {
    let descriptor: [u64; 2] = [u64::from(vpid), 0];
    let rflags: u64;
    // SAFETY: the caller guarantees VMX operation and a supported type.
    unsafe {
        asm!("invvpid {k}, [{d}]", "pushfq", "pop {r}", k = in(reg) kind, d = in(reg) &descriptor, r = out(reg) rflags);
    }
    check(rflags)
}

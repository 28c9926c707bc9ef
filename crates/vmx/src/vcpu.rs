//! One virtual processor on VT-x: the world switch, exit decoding, and the
//! exits the backend settles itself (control-register writes).

use crate::cr_write::{mov_to_cr, CrLimits, GuestCrs};
use crate::vmcs::{vmread, vmwrite, VmInstructionError, VmcsField as F};
use core::sync::atomic::{AtomicU32, Ordering};
use thinvisor_memory::{GuestLinearAddr, GuestPhysAddr, GuestPhysMemory, PagingRegs};
use thinvisor_vmm::events::{combine, Combined};
use thinvisor_vmm::stats::ExitStats;
use thinvisor_vmm::vmmcall::is_vmm_call_at_rip;
use thinvisor_vmm::{CpuMode, Event, Exit, Gpr, HostSignals, InitialState, NestedFault, Vcpu};
use x86_64::registers::control::Cr0;

/// An IRET to the next instruction, on the host's own stack: a VM exit
/// caused by an NMI leaves NMIs blocked until an IRET (SDM vol. 3A, 6.7.1,
/// and vol. 3C, chapter "VM Exits"), and the host took no NMI through its
/// IDT that would end with one.
fn unblock_nmis() {
    // SAFETY: builds a 64-bit IRET frame of the current SS, RSP, RFLAGS
    // and CS that returns to the next instruction; nothing but RFLAGS'
    // NMI-blocking side effect changes. The target has no red zone.
    unsafe {
        core::arch::asm!(
            "mov {ss:e}, ss",
            "mov {rsp}, rsp",
            "push {ss}",
            "push {rsp}",
            "pushfq",
            "mov {ss:e}, cs",
            "push {ss}",
            "lea {rsp}, [rip + 2f]",
            "push {rsp}",
            "iretq",
            "2:",
            ss = out(reg) _,
            rsp = out(reg) _,
        );
    }
}

/// Basic exit reasons (Intel SDM vol. 3D, appendix C).
pub mod exit_reason {
    pub const EXCEPTION_OR_NMI: u32 = 0;
    pub const TRIPLE_FAULT: u32 = 2;
    pub const INIT_SIGNAL: u32 = 3;
    pub const SIPI: u32 = 4;
    pub const INTERRUPT_WINDOW: u32 = 7;
    pub const NMI_WINDOW: u32 = 8;
    pub const CPUID: u32 = 10;
    pub const IO_INSTRUCTION: u32 = 30;
    pub const HLT: u32 = 12;
    pub const VMCALL: u32 = 18;
    pub const VMCLEAR: u32 = 19;
    pub const VMLAUNCH: u32 = 20;
    pub const VMPTRLD: u32 = 21;
    pub const VMPTRST: u32 = 22;
    pub const VMREAD: u32 = 23;
    pub const VMRESUME: u32 = 24;
    pub const VMWRITE: u32 = 25;
    pub const VMXOFF: u32 = 26;
    pub const VMXON: u32 = 27;
    pub const CR_ACCESS: u32 = 28;
    pub const RDMSR: u32 = 31;
    pub const WRMSR: u32 = 32;
    pub const INVALID_GUEST_STATE: u32 = 33;
    pub const MSR_LOADING: u32 = 34;
    pub const MACHINE_CHECK: u32 = 41;
    pub const EPT_VIOLATION: u32 = 48;
    pub const INVEPT: u32 = 50;
    pub const INVVPID: u32 = 53;
    pub const XSETBV: u32 = 55;
    pub const VMFUNC: u32 = 59;
}

/// Exit reason bit 31: the VM entry failed (SDM vol. 3C, 27.8).
const ENTRY_FAILURE: u32 = 1 << 31;
/// VM-entry interruption information: valid bit and event types (SDM 24.8.3).
const INTR_INFO_VALID: u32 = 1 << 31;
const INTR_TYPE_MASK: u32 = 7 << 8;
const INTR_TYPE_EXTERNAL: u32 = 0;
const INTR_TYPE_NMI: u32 = 2 << 8;
const INTR_TYPE_HW_EXCEPTION: u32 = 3 << 8;
const INTR_DELIVER_ERROR_CODE: u32 = 1 << 11;
/// Guest activity states (SDM vol. 3C, 24.4.2).
const ACTIVITY_ACTIVE: u64 = 0;
pub const ACTIVITY_HLT: u64 = 1;
pub const ACTIVITY_WAIT_FOR_SIPI: u64 = 3;
/// Guest interruptibility state bits (SDM vol. 3C, table 24-3).
const BLOCKING_BY_STI: u64 = 1 << 0;
const BLOCKING_BY_MOV_SS: u64 = 1 << 1;
const BLOCKING_BY_NMI: u64 = 1 << 3;
const RFLAGS_IF: u64 = 1 << 9;

/// VM-entry interruption information and error code for `event`.
fn encode_event(event: Event) -> (u32, Option<u32>) {
    let (vector, kind, error_code) = match event {
        Event::Exception { vector, error_code } => (vector, INTR_TYPE_HW_EXCEPTION, error_code),
        Event::PageFault { error_code, .. } => (14, INTR_TYPE_HW_EXCEPTION, Some(error_code)),
        Event::Nmi => (2, INTR_TYPE_NMI, None),
        Event::ExternalInterrupt { vector } => (vector, INTR_TYPE_EXTERNAL, None),
    };
    let mut info = u32::from(vector) | kind | INTR_INFO_VALID;
    if error_code.is_some() {
        info |= INTR_DELIVER_ERROR_CODE;
    }
    (info, error_code)
}

/// The neutral event behind interruption information; None for software
/// interrupts and exceptions, which the processor re-delivers by running
/// the instruction again.
fn decode_event(info: u32, error_code: u32, cr2: u64) -> Option<Event> {
    let vector = info as u8;
    let error_code = (info & INTR_DELIVER_ERROR_CODE != 0).then_some(error_code);
    match info & INTR_TYPE_MASK {
        INTR_TYPE_EXTERNAL => Some(Event::ExternalInterrupt { vector }),
        INTR_TYPE_NMI => Some(Event::Nmi),
        INTR_TYPE_HW_EXCEPTION if vector == 14 => Some(Event::PageFault {
            error_code: error_code.unwrap_or(0),
            address: cr2,
        }),
        INTR_TYPE_HW_EXCEPTION => Some(Event::Exception { vector, error_code }),
        _ => None,
    }
}
/// An EPT-violation exit qualification (SDM vol. 3C, table 28-7).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EptViolation(pub u64);

impl EptViolation {
    pub fn read(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn write(self) -> bool {
        self.0 & (1 << 1) != 0
    }
    pub fn fetch(self) -> bool {
        self.0 & (1 << 2) != 0
    }
    /// Bits 5:3: what the EPT entries allowed (R, W, X); 0 = not mapped.
    pub fn allowed(self) -> u64 {
        (self.0 >> 3) & 7
    }
    /// Bit 7: GUEST_LINEAR_ADDRESS holds the linear address.
    pub fn linear_valid(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// Bit 8 (with bit 7): the access was to the final page, not to a
    /// guest paging structure during the walk.
    pub fn final_translation(self) -> bool {
        self.0 & (1 << 8) != 0
    }
}

impl core::fmt::Display for EptViolation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let access = if self.fetch() {
            "fetch"
        } else if self.write() {
            "write"
        } else {
            "read"
        };
        write!(f, "qualification {:#x}: {access}", self.0)?;
        match self.allowed() {
            0 => f.write_str(", not mapped")?,
            a => write!(
                f,
                ", entry allows{}{}{}",
                if a & 1 != 0 { " R" } else { "" },
                if a & 2 != 0 { " W" } else { "" },
                if a & 4 != 0 { " X" } else { "" }
            )?,
        }
        if self.linear_valid() {
            f.write_str(if self.final_translation() {
                ", of a guest-linear address"
            } else {
                ", of a guest page-table entry"
            })?;
        }
        Ok(())
    }
}
/// The VM-entry control "IA-32e mode guest" (SDM 24.8.1).
const ENTRY_IA32E_MODE_GUEST: u64 = 1 << 9;

const CR0_PE: u64 = 1 << 0;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_VMXE: u64 = 1 << 13;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// IA32_EFER's MSR number, for the MSR-load/store areas.
pub const IA32_EFER: u32 = 0xC000_0080;

/// One entry of a VM-entry/VM-exit MSR area (SDM vol. 3C, table 24-15).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default)]
pub struct MsrEntry {
    pub index: u32,
    pub reserved: u32,
    pub value: u64,
}

/// The MSR areas of the EFER fallback: the guest's EFER, stored on exit
/// and loaded on entry from the same entry, and the host's, loaded on exit.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct EferAreas {
    pub guest: MsrEntry,
    pub host: MsrEntry,
}

/// Fixed CR0/CR4 bits (IA32_VMX_CR*_FIXED*), as the guest may not change
/// them: what they must be forced to, and which are hidden from the guest.
#[derive(Clone, Copy, Debug)]
pub struct CrPolicy {
    pub cr0_must1: u64,
    pub cr0_may1: u64,
    pub cr4_must1: u64,
    pub cr4_may1: u64,
}

impl CrPolicy {
    /// The real CR0 for a value the guest wants. With unrestricted guest,
    /// PE and PG may be 0 (SDM vol. 3C, 26.3.1.1).
    pub fn real_cr0(&self, wanted: u64) -> u64 {
        (wanted | (self.cr0_must1 & !(CR0_PE | CR0_PG))) & self.cr0_may1
    }

    /// The real CR4: VMXE stays set while the guest thinks it is clear.
    pub fn real_cr4(&self, wanted: u64) -> u64 {
        (wanted | self.cr4_must1) & self.cr4_may1
    }

    /// Give the processor the CR0.CD and CR0.NW of `wanted` (the guest's
    /// CR0, already checked: no NW without CD), which no VM entry loads
    /// (see [`CrPolicy::root_cr0`]).
    pub fn load_cache_bits(&self, wanted: u64) {
        let root = Cr0::read_raw();
        let new = self.root_cr0(root, wanted);
        if new != root {
            // SAFETY: only CD and NW change, to bits VMX operation does
            // not fix (`root_cr0`): what the guest's MOV does when it does
            // not exit. They govern caching, not memory contents or
            // translation.
            unsafe { Cr0::write_raw(new) };
        }
    }

    /// The CR0 the logical processor must hold in root operation (`root`
    /// being what it holds) for an emulated guest write of `wanted` to
    /// take effect. VM entries never load CR0.CD and CR0.NW from the
    /// guest's CR0 field, nor VM exits from the host's (SDM vol. 3C,
    /// 26.3.2.1 and 27.5.1): guest and host share them, a guest MOV that
    /// does not exit changes them, and an emulated one must change them
    /// itself. Bits VMX operation fixes (IA32_VMX_CR0_FIXED0/1) stay.
    pub fn root_cr0(&self, root: u64, wanted: u64) -> u64 {
        let shared = (CR0_CD | CR0_NW) & self.cr0_may1 & !self.cr0_must1;
        (root & !shared) | (wanted & shared)
    }

    /// CR0 bits owned by the hypervisor: a guest write that changes one
    /// exits (SDM vol. 3C, 25.6.6).
    pub fn cr0_mask(&self) -> u64 {
        self.cr0_must1 & !(CR0_PE | CR0_PG)
    }

    pub fn cr4_mask(&self) -> u64 {
        self.cr4_must1
    }
}

/// Guest general registers in encoding order ([`Gpr`] as index); RSP's
/// slot is unused (it lives in the VMCS). The world-switch stub relies on
/// this layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestRegs(pub [u64; 16]);

/// The world switch, inlined into the exit loop so that the compiler
/// keeps only what it needs across it (no call, no callee-saved registers
/// pushed per exit: they are declared clobbered). VM exits do not save
/// the guest's general registers (SDM vol. 3C, 28.1): the switch does.
/// HOST_RSP and HOST_RIP are written on each entry: the stack slot that
/// holds `regs`' address, and the exit label inside this asm (which has
/// an address of its own wherever the function is inlined). RBX and RBP
/// cannot be named as operands (LLVM uses them): saved here.
///
/// Returns 0 when the guest ran and exited, 1 for VMfailInvalid, 2 for
/// VMfailValid.
///
/// # Safety
/// This vCPU's VMCS is current with the rest of its host state valid, and
/// the stack has no red zone (the target has none).
#[inline(always)]
unsafe fn world_switch(area: &mut SwitchArea) -> u32 {
    let status: u32;
    // SAFETY: per the function's contract; the asm restores RBX, RBP and
    // RSP and declares every other register it changes.
    unsafe {
        core::arch::asm!(
            "push rbp",
            "push rbx",
            "push rdi",
            "mov rax, {host_rsp}",
            "vmwrite rax, rsp",
            "lea rdx, [rip + 2f]",
            "mov rax, {host_rip}",
            "vmwrite rax, rdx",
            "cmp qword ptr [rdi + {launched}], 0",
            "mov rax, [rdi + {g_rax}]",
            "mov rcx, [rdi + {g_rcx}]",
            "mov rdx, [rdi + {g_rdx}]",
            "mov rbx, [rdi + {g_rbx}]",
            "mov rbp, [rdi + {g_rbp}]",
            "mov rsi, [rdi + {g_rsi}]",
            "mov r8, [rdi + {g_r8}]",
            "mov r9, [rdi + {g_r9}]",
            "mov r10, [rdi + {g_r10}]",
            "mov r11, [rdi + {g_r11}]",
            "mov r12, [rdi + {g_r12}]",
            "mov r13, [rdi + {g_r13}]",
            "mov r14, [rdi + {g_r14}]",
            "mov r15, [rdi + {g_r15}]",
            "mov rdi, [rdi + {g_rdi}]",
            "jz 3f",
            "vmresume",
            "jmp 4f",
            "3:",
            "vmlaunch",
            "4:",
            // Only reached when the entry failed: CF = invalid, ZF = valid.
            "mov eax, 1",
            "jc 5f",
            "mov eax, 2",
            "jmp 5f",
            // The VM exit: RSP is HOST_RSP, the slot with `regs`' address.
            "2:",
            "push rdi",
            "mov rdi, [rsp + 8]",
            "mov [rdi + {g_rax}], rax",
            "mov [rdi + {g_rcx}], rcx",
            "mov [rdi + {g_rdx}], rdx",
            "mov [rdi + {g_rbx}], rbx",
            "mov [rdi + {g_rbp}], rbp",
            "mov [rdi + {g_rsi}], rsi",
            "mov [rdi + {g_r8}], r8",
            "mov [rdi + {g_r9}], r9",
            "mov [rdi + {g_r10}], r10",
            "mov [rdi + {g_r11}], r11",
            "mov [rdi + {g_r12}], r12",
            "mov [rdi + {g_r13}], r13",
            "mov [rdi + {g_r14}], r14",
            "mov [rdi + {g_r15}], r15",
            "pop qword ptr [rdi + {g_rdi}]",
            "xor eax, eax",
            "5:",
            "pop rdi",
            "pop rbx",
            "pop rbp",
            g_rax = const 8 * Gpr::Rax as usize,
            g_rcx = const 8 * Gpr::Rcx as usize,
            g_rdx = const 8 * Gpr::Rdx as usize,
            g_rbx = const 8 * Gpr::Rbx as usize,
            g_rbp = const 8 * Gpr::Rbp as usize,
            g_rsi = const 8 * Gpr::Rsi as usize,
            g_rdi = const 8 * Gpr::Rdi as usize,
            g_r8 = const 8 * Gpr::R8 as usize,
            g_r9 = const 8 * Gpr::R9 as usize,
            g_r10 = const 8 * Gpr::R10 as usize,
            g_r11 = const 8 * Gpr::R11 as usize,
            g_r12 = const 8 * Gpr::R12 as usize,
            g_r13 = const 8 * Gpr::R13 as usize,
            g_r14 = const 8 * Gpr::R14 as usize,
            g_r15 = const 8 * Gpr::R15 as usize,
            host_rsp = const F::HOST_RSP.0,
            host_rip = const F::HOST_RIP.0,
            launched = const core::mem::offset_of!(SwitchArea, launched),
            inout("rdi") core::ptr::from_mut(area) => _,
            out("rsi") _,
            out("eax") status,
            out("rcx") _,
            out("rdx") _,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
            out("r12") _,
            out("r13") _,
            out("r14") _,
            out("r15") _,
        );
    }
    status
}

/// Where the guest's EFER lives while it runs.
pub enum GuestEfer {
    /// The GUEST_IA32_EFER field (VM-entry/exit EFER controls).
    Field,
    /// The shared store/load MSR-area entry.
    Area(&'static mut EferAreas),
}

/// One virtual processor on VT-x. Its VMCS must be current on this CPU
/// whenever a method is called.
pub struct VmxVcpu<M: GuestPhysMemory + 'static> {
    /// The guest's general registers and whether VMLAUNCH has run.
    switch: SwitchArea,
    /// The VM's memory, shared with its other vCPUs.
    memory: &'static M,
    efer: GuestEfer,
    cr: CrPolicy,
    /// CR2 for an injected page fault, loaded before the next entry.
    pending_cr2: Option<u64>,
    /// What the current exit knows beyond the VMCS.
    this_exit: ExitNotes,
    /// Exits by basic exit reason; failed entries in [`ENTRY_FAILED_SLOT`].
    stats: ExitStats,
    /// An event to deliver at the first entry that has no other one and
    /// whose guest state accepts it.
    deferred: Option<Event>,
    /// NMIs the host caught on this processor (or that exited), for the
    /// guest, and an INIT another processor sent it.
    signals: Option<&'static HostSignals>,
    /// A fault arose while a double fault was delivered.
    shutdown: bool,
    /// Set with any of `shutdown`, `deferred`, `pending_cr2`: the entry
    /// path looks at them only then (or when an NMI waits).
    entry_work: bool,
    /// The state the last SIPI (or reset) started the guest in.
    started_at: Option<InitialState>,
    /// The EPT's generation, and the one this vCPU last saw: a change (a
    /// permission the hypervisor gave back) invalidates its EPT TLB.
    nested_gen: (&'static AtomicU32, u32),
    /// The NMI count of `signals`, or [`NO_COUNT`]: the entry path's one
    /// load (no Option to test first).
    nmis: &'static AtomicU32,
}

/// What the world switch works on, from one pointer: the guest's general
/// registers and whether this VMCS has been launched (VMLAUNCH the first
/// time, VMRESUME after, SDM vol. 3C, 25.1.3).
#[repr(C)]
struct SwitchArea {
    regs: GuestRegs,
    launched: u64,
}

/// What an exit knows that its VMCS fields do not say; cleared (one store)
/// at every exit.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct ExitNotes {
    /// Length of the exit's instruction when the VMCS has none (exception
    /// exits, SDM vol. 3C, 28.2.5); 0: read VM_EXIT_INSTRUCTION_LEN.
    insn_len: u8,
    /// The last exit was a SIPI and the guest has not run since.
    just_started: bool,
}

/// What [`VmxVcpu`]'s counters point at until they are given real ones:
/// a zero nobody changes.
static NO_COUNT: AtomicU32 = AtomicU32::new(0);

/// The statistics slot of failed VM entries.
const ENTRY_FAILED_SLOT: usize = 90;

/// The name of a statistics slot: the basic exit reasons of the Intel SDM
/// vol. 3D, appendix C.
pub fn exit_name(slot: usize) -> &'static str {
    const NAMES: [&str; 78] = [
        "EXCEPTION_OR_NMI",
        "EXTERNAL_INTERRUPT",
        "TRIPLE_FAULT",
        "INIT",
        "SIPI",
        "IO_SMI",
        "OTHER_SMI",
        "INTERRUPT_WINDOW",
        "NMI_WINDOW",
        "TASK_SWITCH",
        "CPUID",
        "GETSEC",
        "HLT",
        "INVD",
        "INVLPG",
        "RDPMC",
        "RDTSC",
        "RSM",
        "VMCALL",
        "VMCLEAR",
        "VMLAUNCH",
        "VMPTRLD",
        "VMPTRST",
        "VMREAD",
        "VMRESUME",
        "VMWRITE",
        "VMXOFF",
        "VMXON",
        "CR_ACCESS",
        "DR_ACCESS",
        "IO_INSTRUCTION",
        "RDMSR",
        "WRMSR",
        "INVALID_GUEST_STATE",
        "MSR_LOADING",
        "35",
        "MWAIT",
        "MONITOR_TRAP_FLAG",
        "38",
        "MONITOR",
        "PAUSE",
        "MACHINE_CHECK",
        "42",
        "TPR_BELOW_THRESHOLD",
        "APIC_ACCESS",
        "VIRTUALIZED_EOI",
        "GDTR_IDTR",
        "LDTR_TR",
        "EPT_VIOLATION",
        "EPT_MISCONFIG",
        "INVEPT",
        "RDTSCP",
        "VMX_PREEMPTION_TIMER",
        "INVVPID",
        "WBINVD",
        "XSETBV",
        "APIC_WRITE",
        "RDRAND",
        "INVPCID",
        "VMFUNC",
        "ENCLS",
        "RDSEED",
        "PML_FULL",
        "XSAVES",
        "XRSTORS",
        "65",
        "SPP",
        "UMWAIT",
        "TPAUSE",
        "LOADIWKEY",
        "70",
        "71",
        "ENQCMD",
        "ENQCMDS",
        "BUS_LOCK",
        "NOTIFY",
        "76",
        "77",
    ];
    match slot {
        ENTRY_FAILED_SLOT => "ENTRY_FAILED",
        s => NAMES.get(s).copied().unwrap_or("other"),
    }
}

/// Log the fields a failed VM entry is checked against (SDM vol. 3C,
/// 27.2-27.3), so the failing one can be found from the log.
fn dump_vmcs() {
    const FIELDS: [(&str, F); 24] = [
        ("pin-based controls", F::PIN_BASED_VM_EXEC_CONTROL),
        ("primary controls", F::CPU_BASED_VM_EXEC_CONTROL),
        ("secondary controls", F::SECONDARY_VM_EXEC_CONTROL),
        ("exit controls", F::VM_EXIT_CONTROLS),
        ("entry controls", F::VM_ENTRY_CONTROLS),
        ("entry interruption info", F::VM_ENTRY_INTR_INFO),
        ("guest CR0", F::GUEST_CR0),
        ("guest CR3", F::GUEST_CR3),
        ("guest CR4", F::GUEST_CR4),
        ("guest IA32_EFER", F::GUEST_IA32_EFER),
        ("guest RIP", F::GUEST_RIP),
        ("guest RSP", F::GUEST_RSP),
        ("guest RFLAGS", F::GUEST_RFLAGS),
        ("guest CS selector", F::GUEST_CS_SELECTOR),
        ("guest CS access rights", F::GUEST_CS_AR_BYTES),
        ("guest SS access rights", F::GUEST_SS_AR_BYTES),
        ("guest DS access rights", F::GUEST_DS_AR_BYTES),
        ("guest TR access rights", F::GUEST_TR_AR_BYTES),
        ("guest LDTR access rights", F::GUEST_LDTR_AR_BYTES),
        ("guest interruptibility", F::GUEST_INTERRUPTIBILITY_INFO),
        ("guest activity state", F::GUEST_ACTIVITY_STATE),
        ("VMCS link pointer", F::VMCS_LINK_POINTER),
        ("host CR4", F::HOST_CR4),
        ("host IA32_EFER", F::HOST_IA32_EFER),
    ];
    for (name, field) in FIELDS {
        // SAFETY: called with the failing vCPU's VMCS current.
        match unsafe { vmread(field) } {
            Ok(v) => log::error!("  {name} ({:#06x}) = {v:#x}", field.0),
            Err(e) => log::error!("  {name} ({:#06x}): {e}", field.0),
        }
    }
}

/// Read a field that is valid whenever a VMCS is current. A failure here
/// means the VMCS is not current, a broken invariant of this type. Inline:
/// every exit does several of these.
#[inline(always)]
fn read(field: F) -> u64 {
    // SAFETY: VmxVcpu's methods run with its VMCS current (type invariant).
    match unsafe { vmread(field) } {
        Ok(value) => value,
        Err(e) => broken("VMREAD", field, e),
    }
}

#[inline(always)]
fn write(field: F, value: u64) {
    // SAFETY: as for `read`; the fields written here are guest state and
    // entry controls, which cannot reach host memory (EPT bounds the guest).
    if let Err(e) = unsafe { vmwrite(field, value) } {
        broken("VMWRITE", field, e)
    }
}

/// [`read`] for the exit path's fields (exit reason, IDT-vectoring
/// information, instruction length, and guest state every VMCS has: RIP,
/// RSP, RFLAGS, CR0/3/4, CS base, CS/SS access rights, interruptibility): a failure traps instead of naming the field
/// ([`crate::vmcs::vmread_or_trap`]), two instructions fewer per read.
#[inline(always)]
fn read_hot(field: F) -> u64 {
    // SAFETY: VmxVcpu's methods run with its VMCS current (type invariant).
    unsafe { crate::vmcs::vmread_or_trap(field) }
}

/// [`write`] for the exit path's guest-state fields, as [`read_hot`].
#[inline(always)]
fn write_hot(field: F, value: u64) {
    // SAFETY: as for `read_hot`; RIP and interruptibility are guest state,
    // which cannot reach host memory.
    unsafe { crate::vmcs::vmwrite_or_trap(field, value) }
}

#[cold]
#[inline(never)]
fn broken(what: &str, field: F, e: crate::vmcs::VmFail) -> ! {
    panic!("{what} {:#x}: {e}", field.0)
}

impl<M: GuestPhysMemory> VmxVcpu<M> {
    /// Wrap a VMCS that [`crate::setup_vmcs`] prepared.
    ///
    /// # Safety
    /// That VMCS must be current and stay current while this vCPU is used.
    pub unsafe fn new(
        memory: &'static M,
        efer: GuestEfer,
        cr: CrPolicy,
        initial: &InitialState,
    ) -> Self {
        // RSP lives in the VMCS; its slot here is unused.
        let regs = GuestRegs(initial.gprs);
        Self {
            switch: SwitchArea { regs, launched: 0 },

            memory,
            efer,
            cr,
            pending_cr2: None,
            this_exit: ExitNotes::default(),
            stats: ExitStats::default(),
            deferred: None,
            signals: None,
            shutdown: false,
            entry_work: false,
            started_at: None,
            nested_gen: (&NO_COUNT, 0),
            nmis: &NO_COUNT,
        }
    }

    /// Invalidate this guest's EPT translations before the next entry
    /// whenever `generation` changes (the EPT gained a permission).
    pub fn watch_nested_generation(&mut self, generation: &'static AtomicU32) {
        self.nested_gen = (generation, generation.load(Ordering::Acquire));
    }

    /// Deliver the NMIs the host counts in `signals` (its NMI handler's,
    /// and the ones that exited) to this guest, and stop it when `signals`
    /// says INIT.
    pub fn take_host_signals_from(&mut self, signals: &'static HostSignals) {
        self.signals = Some(signals);
        self.nmis = &signals.nmis;
    }

    /// Whether the guest can take `event` now: VM entry refuses an external
    /// interrupt with RFLAGS.IF clear or under STI/MOV SS blocking, and an
    /// NMI under NMI or MOV SS blocking (SDM vol. 3C, 27.3.1.5).
    fn can_take(event: Event) -> bool {
        let blocking = read(F::GUEST_INTERRUPTIBILITY_INFO);
        match event {
            Event::ExternalInterrupt { .. } => {
                read(F::GUEST_RFLAGS) & RFLAGS_IF != 0
                    && blocking & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) == 0
            }
            // Some processors also refuse an NMI under STI blocking (the
            // entry fails), so wait for that too.
            Event::Nmi => blocking & (BLOCKING_BY_NMI | BLOCKING_BY_MOV_SS | BLOCKING_BY_STI) == 0,
            _ => true,
        }
    }

    fn write_event(&mut self, event: Event) {
        if let Event::PageFault { address, .. } = event {
            // VMX neither saves nor loads CR2 (SDM vol. 3C, 27.3): the
            // guest's CR2 is the processor's while the hypervisor runs,
            // so it is written just before the entry that injects.
            self.pending_cr2 = Some(address);
            self.entry_work = true;
        }
        let (info, error_code) = encode_event(event);
        if let Some(code) = error_code {
            write(F::VM_ENTRY_EXCEPTION_ERROR_CODE, u64::from(code));
        }
        write(F::VM_ENTRY_INTR_INFO, info.into());
    }

    /// Fill an empty VM-entry event with a deferred event or an NMI the
    /// host caught, when the guest can take it; an event that must wait
    /// asks for an interrupt- or NMI-window exit (SDM vol. 3C, 25.7.5).
    /// `Exit::Init` instead of an entry when another processor sent this
    /// one INIT (looked at only when NMIs wait: the sender's kick is one,
    /// see [`HostSignals`]).
    #[cold]
    fn pick_waiting_event(&mut self) -> Option<Exit> {
        if self.signals.is_some_and(|s| s.init_posted()) {
            return Some(Exit::Init);
        }
        if read(F::VM_ENTRY_INTR_INFO) & u64::from(INTR_INFO_VALID) != 0 {
            return None;
        }
        if let Some(event) = self.deferred {
            if Self::can_take(event) {
                self.deferred = None;
                self.write_event(event);
            } else if matches!(event, Event::ExternalInterrupt { .. }) {
                self.ask_for_window(crate::caps::proc::INTERRUPT_WINDOW_EXITING);
            }
            return None;
        }
        if let Some(signals) = self.signals {
            if !Self::can_take(Event::Nmi) {
                // The guest is in its NMI handler (or under MOV SS): exit
                // as soon as it can take the next one.
                self.ask_for_window(crate::caps::proc::NMI_WINDOW_EXITING);
            } else if signals.take_nmi() {
                self.write_event(Event::Nmi);
            }
        }
        None
    }

    /// Turn on an interrupt- or NMI-window exit (the latter exists only
    /// with virtual NMIs; without, the NMI waits for the next exit).
    fn ask_for_window(&mut self, control: u32) {
        if control == crate::caps::proc::NMI_WINDOW_EXITING
            && read(F::PIN_BASED_VM_EXEC_CONTROL) & u64::from(crate::caps::pin::VIRTUAL_NMIS) == 0
        {
            return;
        }
        let controls = read(F::CPU_BASED_VM_EXEC_CONTROL);
        write(F::CPU_BASED_VM_EXEC_CONTROL, controls | u64::from(control));
    }

    /// Exit reason 0: #UD (the only exception in the bitmap) or an NMI
    /// (NMI exiting: the INIT kick, or the guest's own); anything else is
    /// unexpected, read from what the processor says (SDM vol. 3C, 25.9.2)
    /// rather than assumed.
    fn on_exception_or_nmi(&mut self) -> Option<Exit> {
        let info = read(F::VM_EXIT_INTR_INFO) as u32;
        let vector = info as u8;
        match info & INTR_TYPE_MASK {
            INTR_TYPE_HW_EXCEPTION if vector == 6 => {
                if is_vmm_call_at_rip(self) {
                    self.this_exit.insn_len = 3;
                    Some(Exit::VmmCall)
                } else {
                    Some(Exit::InvalidOpcode)
                }
            }
            INTR_TYPE_NMI => {
                // The exit leaves NMIs blocked until the next IRET, as
                // delivery through the IDT would (SDM vol. 3C, chapter
                // "VM Exits", updating non-register state): end that, or
                // no later NMI could wake this processor in the host.
                unblock_nmis();
                match self.signals {
                    // Counted like the ones the host's handler takes: the
                    // next entry injects it, or finds the INIT it announced.
                    Some(signals) => {
                        signals.nmis.fetch_add(1, Ordering::AcqRel);
                    }
                    None => self.inject(Event::Nmi),
                }
                None
            }
            _ => {
                // Not intercepted, so not expected: give it back.
                let code = read(F::VM_EXIT_INTR_ERROR_CODE) as u32;
                if let Some(event) = decode_event(info, code, 0) {
                    log::warn!("unexpected exception exit {info:#x}: re-injected");
                    self.inject(event);
                }
                None
            }
        }
    }

    fn guest_efer(&self) -> u64 {
        match &self.efer {
            GuestEfer::Field => read(F::GUEST_IA32_EFER),
            GuestEfer::Area(a) => a.guest.value,
        }
    }

    fn set_guest_efer(&mut self, value: u64) {
        match &mut self.efer {
            GuestEfer::Field => write(F::GUEST_IA32_EFER, value),
            GuestEfer::Area(a) => a.guest.value = value,
        }
    }

    /// MOV to CR0/CR3/CR4 that exited because it touched a bit the
    /// hypervisor owns (or CR3-load exiting is forced on). Emulated as the
    /// processor would: first its #GP(0) checks ([`crate::cr_write`]; the
    /// exit came before them), then the real register keeps the fixed
    /// bits, the read shadow shows the guest's value, and turning paging
    /// on or off with EFER.LME set switches IA-32e mode (SDM vol. 3A,
    /// 10.8.5).
    fn on_cr_access(&mut self) -> Result<(), ()> {
        let q = read(F::EXIT_QUALIFICATION);
        let cr = q & 0xF;
        let access = (q >> 4) & 3;
        let gpr = Gpr::ALL[((q >> 8) & 0xF) as usize];
        if access != 0 || !matches!(cr, 0 | 3 | 4) {
            // MOV from CR, CLTS and LMSW only exit for bits we do not mask.
            return Err(());
        }
        let paging = self.paging();
        let cur = GuestCrs {
            cr0: paging.cr0,
            cr3: paging.cr3,
            cr4: paging.cr4,
            efer: paging.efer,
            long64: self.mode().long64,
        };
        let value = match mov_to_cr(cr as u8, self.gpr(gpr), &cur, &self.cr_limits()) {
            Ok(value) => value,
            Err(fault) => {
                log::debug!("guest MOV to CR{cr}: {fault}: #GP(0)");
                self.inject(Event::GP0);
                return Ok(());
            }
        };
        match cr {
            0 => {
                let old = read(F::GUEST_CR0);
                write(F::GUEST_CR0, self.cr.real_cr0(value));
                write(F::CR0_READ_SHADOW, value);
                // VM entry ignores the CR0 field's CD and NW: set them
                // here, in root operation (see `CrPolicy::root_cr0`).
                self.cr.load_cache_bits(value);
                let efer = self.guest_efer();
                let paging_on = value & CR0_PG != 0;
                if paging_on != (old & CR0_PG != 0) && efer & EFER_LME != 0 {
                    let entry = read(F::VM_ENTRY_CONTROLS);
                    let (efer, entry) = if paging_on {
                        (efer | EFER_LMA, entry | ENTRY_IA32E_MODE_GUEST)
                    } else {
                        (efer & !EFER_LMA, entry & !ENTRY_IA32E_MODE_GUEST)
                    };
                    self.set_guest_efer(efer);
                    write(F::VM_ENTRY_CONTROLS, entry);
                }
            }
            3 => write(F::GUEST_CR3, value),
            4 => {
                write(F::GUEST_CR4, self.cr.real_cr4(value));
                write(F::CR4_READ_SHADOW, value);
            }
            _ => return Err(()),
        }
        self.load_pdptes_if_pae();
        self.skip_instruction();
        Ok(())
    }

    /// What this processor allows in CR3 and CR4. Asked at each CR exit
    /// (they are rare: only writes of the bits the hypervisor owns exit).
    fn cr_limits(&self) -> CrLimits {
        // Leaf 0x80000008 exists on every processor with VMX and IA-32e
        // mode; EAX[7:0] is MAXPHYADDR.
        let maxphyaddr = core::arch::x86_64::__cpuid(0x8000_0008).eax as u8;
        CrLimits::new(self.cr.cr4_may1, maxphyaddr)
    }

    /// The fields [`crate::guest_check`] looks at.
    fn guest_state(&self) -> crate::guest_check::GuestState {
        crate::guest_check::GuestState {
            cr0: read(F::GUEST_CR0),
            cr4: read(F::GUEST_CR4),
            efer: read(F::GUEST_IA32_EFER),
            rflags: read(F::GUEST_RFLAGS),
            entry_controls: read(F::VM_ENTRY_CONTROLS),
            secondary_controls: read(F::SECONDARY_VM_EXEC_CONTROL),
            cs_ar: read(F::GUEST_CS_AR_BYTES),
            ss_ar: read(F::GUEST_SS_AR_BYTES),
            data_ar: [
                read(F::GUEST_DS_AR_BYTES),
                read(F::GUEST_ES_AR_BYTES),
                read(F::GUEST_FS_AR_BYTES),
                read(F::GUEST_GS_AR_BYTES),
            ],
            tr_ar: read(F::GUEST_TR_AR_BYTES),
            tr_limit: read(F::GUEST_TR_LIMIT),
            ldtr_ar: read(F::GUEST_LDTR_AR_BYTES),
            activity_state: read(F::GUEST_ACTIVITY_STATE),
            interruptibility: read(F::GUEST_INTERRUPTIBILITY_INFO),
            link_pointer: read(F::VMCS_LINK_POINTER),
            cr0_fixed: (self.cr.cr0_must1, self.cr.cr0_may1),
            cr4_fixed: (self.cr.cr4_must1, self.cr.cr4_may1),
        }
    }

    /// XSETBV exits unconditionally. VM entries and exits leave XCR0 alone,
    /// so the guest's XCR0 is simply the processor's: check the value as
    /// the instruction would (#GP otherwise) and execute it (CPL > 0 and
    /// CR4.OSXSAVE = 0 fault before the exit, SDM vol. 2D, XSETBV).
    #[cold]
    fn on_xsetbv(&mut self) {
        let index = self.switch.regs.0[Gpr::Rcx as usize] as u32;
        let value = (self.switch.regs.0[Gpr::Rdx as usize] << 32)
            | (self.switch.regs.0[Gpr::Rax as usize] & 0xFFFF_FFFF);
        let supported = {
            let leaf = core::arch::x86_64::__cpuid_count(0xD, 0);
            (u64::from(leaf.edx) << 32) | u64::from(leaf.eax)
        };
        if index != 0 || !crate::xcr0::valid(value, supported) {
            return self.inject(Event::GP0);
        }
        // SAFETY: the value passed the architectural checks against what
        // the processor supports; the hypervisor itself uses no state
        // that XCR0 enables (it is built without SSE/AVX).
        unsafe {
            core::arch::asm!("xsetbv", in("ecx") 0, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack))
        };
        self.skip_instruction();
    }

    /// With EPT, PAE paging's four PDPTEs come from the VMCS on entry
    /// (SDM vol. 3C, 26.3.2.4): after an emulated write that enters or
    /// changes PAE paging, load them from guest memory as MOV CR3 would.
    fn load_pdptes_if_pae(&mut self) {
        let p = self.paging();
        if p.cr0 & CR0_PG == 0 || p.cr4 & CR4_PAE == 0 || p.efer & EFER_LMA != 0 {
            return;
        }
        let base = p.cr3 & 0xFFFF_FFE0;
        for (i, field) in [
            F::GUEST_PDPTE0,
            F::GUEST_PDPTE1,
            F::GUEST_PDPTE2,
            F::GUEST_PDPTE3,
        ]
        .into_iter()
        .enumerate()
        {
            let mut b = [0u8; 8];
            let _ = self
                .memory
                .read_phys(GuestPhysAddr::new(base + 8 * i as u64), &mut b);
            write(field, u64::from_le_bytes(b));
        }
    }

    /// Turn the current exit into a neutral one, or None when the backend
    /// settled it itself.
    fn decode_exit(&mut self, raw_reason: u32) -> Option<Exit> {
        use exit_reason as r;
        if raw_reason & ENTRY_FAILURE != 0 {
            // SDM vol. 3C, 27.8: the qualification says which check failed
            // (invalid guest state: 2 = PDPTE loading, 3 = NMI injection,
            // 4 = VMCS link pointer; MSR loading: the failing entry, from 1).
            let why = match raw_reason & 0xFFFF {
                exit_reason::INVALID_GUEST_STATE => "invalid guest state",
                exit_reason::MSR_LOADING => "MSR loading",
                exit_reason::MACHINE_CHECK => "machine-check event",
                _ => "unknown reason",
            };
            log::error!(
                "VM entry failed: exit reason {raw_reason:#x} ({why}), qualification {:#x}",
                read(F::EXIT_QUALIFICATION)
            );
            if raw_reason & 0xFFFF == exit_reason::INVALID_GUEST_STATE {
                match crate::guest_check::first_violation(&self.guest_state()) {
                    Some(rule) => log::error!("  failing field: {rule}"),
                    None => {
                        log::error!("  (no modelled guest-state check fails; see the fields below)")
                    }
                }
            }
            dump_vmcs();
            return Some(Exit::EntryFailed {
                code: u64::from(raw_reason),
            });
        }
        let reason = raw_reason & 0xFFFF;
        let just_started = self.this_exit.just_started;
        self.this_exit = ExitNotes {
            just_started: just_started && reason == exit_reason::INIT_SIGNAL,
            ..ExitNotes::default()
        };
        Some(match reason {
            // Only #UD is intercepted (exception bitmap), to accept AMD's
            // VMMCALL as a VMM call too; it is three bytes long.
            r::EXCEPTION_OR_NMI => return self.on_exception_or_nmi(),
            // The window the entry path asked for is open: close it; the
            // next entry delivers what waited.
            r::INTERRUPT_WINDOW | r::NMI_WINDOW => {
                let control = if reason == r::NMI_WINDOW {
                    crate::caps::proc::NMI_WINDOW_EXITING
                } else {
                    crate::caps::proc::INTERRUPT_WINDOW_EXITING
                };
                let controls = read(F::CPU_BASED_VM_EXEC_CONTROL);
                write(F::CPU_BASED_VM_EXEC_CONTROL, controls & !u64::from(control));
                return None;
            }
            r::VMCALL => Exit::VmmCall,
            // Exit qualification for I/O (SDM vol. 3C, table 28-5).
            r::IO_INSTRUCTION => {
                let q = read(F::EXIT_QUALIFICATION);
                Exit::Io {
                    port: (q >> 16) as u16,
                    size: (q & 7) as u8 + 1,
                    input: q & (1 << 3) != 0,
                    string: q & (1 << 4) != 0,
                }
            }
            // In the wait-for-SIPI state INIT is blocked, not dropped (SDM
            // vol. 3C, 26.4.2): an INIT the guest sent to a processor that
            // was already waiting (as thinvisor leaves application
            // processors) is delivered right after the SIPI that follows
            // it, before the processor runs an instruction. It belongs to
            // the start-up sequence the SIPI completed: ignore it.
            r::INIT_SIGNAL if self.this_exit.just_started => {
                log::debug!(
                    "INIT held back by wait-for-SIPI: part of the start-up sequence, ignored"
                );
                // The exit saved the state of an INIT (Bochs even blocks SMIs
                // and NMIs): put back the start the SIPI gave.
                if let Some(start) = self.started_at {
                    self.reset(&start);
                }
                return None;
            }
            r::INIT_SIGNAL => Exit::Init,
            // The qualification's low byte is the SIPI's vector (SDM vol.
            // 3C, table 28-1).
            r::SIPI => Exit::Sipi {
                vector: read(F::EXIT_QUALIFICATION) as u8,
            },
            r::CPUID => Exit::Cpuid,
            r::HLT => Exit::Hlt,
            r::TRIPLE_FAULT => Exit::Shutdown,
            r::EPT_VIOLATION => {
                let q = EptViolation(read(F::EXIT_QUALIFICATION));
                let gpa = read(F::GUEST_PHYSICAL_ADDRESS);
                log::debug!("EPT violation at guest-physical {gpa:#x}: {q}");
                Exit::NestedPageFault(NestedFault {
                    gpa: GuestPhysAddr::new(gpa),
                    write: q.write(),
                    fetch: q.fetch(),
                    linear: q
                        .linear_valid()
                        .then(|| GuestLinearAddr::new(read(F::GUEST_LINEAR_ADDRESS))),
                    in_page_walk: q.linear_valid() && !q.final_translation(),
                })
            }
            r::RDMSR | r::WRMSR => Exit::Msr {
                msr: self.switch.regs.0[Gpr::Rcx as usize] as u32,
                write: reason == r::WRMSR,
            },
            r::XSETBV => {
                self.on_xsetbv();
                return None;
            }
            r::CR_ACCESS => {
                return match self.on_cr_access() {
                    Ok(()) => None,
                    Err(()) => Some(Exit::Unknown {
                        code: u64::from(raw_reason),
                    }),
                }
            }
            r::VMCLEAR
            | r::VMLAUNCH
            | r::VMPTRLD
            | r::VMPTRST
            | r::VMREAD
            | r::VMRESUME
            | r::VMWRITE
            | r::VMXOFF
            | r::VMXON
            | r::INVEPT
            | r::INVVPID
            | r::VMFUNC => Exit::VirtualizationInstruction,
            _ => Exit::Unknown {
                code: u64::from(raw_reason),
            },
        })
    }
}

impl<M: GuestPhysMemory> Vcpu for VmxVcpu<M> {
    fn exit_stats(&self) -> Option<&ExitStats> {
        Some(&self.stats)
    }

    fn exit_names(&self) -> fn(usize) -> &'static str {
        exit_name
    }

    fn gpr(&self, reg: Gpr) -> u64 {
        match reg {
            Gpr::Rsp => read_hot(F::GUEST_RSP),
            _ => self.switch.regs.0[reg as usize],
        }
    }

    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        match reg {
            Gpr::Rsp => write(F::GUEST_RSP, value),
            _ => self.switch.regs.0[reg as usize] = value,
        }
    }

    fn rip(&self) -> u64 {
        read_hot(F::GUEST_RIP)
    }

    fn rip_linear(&self) -> u64 {
        read_hot(F::GUEST_CS_BASE).wrapping_add(read_hot(F::GUEST_RIP))
    }

    fn paging(&self) -> PagingRegs {
        PagingRegs {
            cr0: read_hot(F::GUEST_CR0),
            cr3: read_hot(F::GUEST_CR3),
            // VMXE is the hypervisor's; translation ignores it anyway.
            cr4: read_hot(F::GUEST_CR4) & !CR4_VMXE,
            efer: self.guest_efer(),
        }
    }

    fn cr3(&self) -> u64 {
        read_hot(F::GUEST_CR3)
    }

    #[inline(always)]
    fn cr4(&self) -> u64 {
        read_hot(F::GUEST_CR4) & !CR4_VMXE
    }

    fn mode(&self) -> CpuMode {
        // CPL is SS.DPL (SDM vol. 3C, 26.3.1.2); CS.L is bit 13 of its
        // access rights.
        let ss = read_hot(F::GUEST_SS_AR_BYTES);
        let cs = read_hot(F::GUEST_CS_AR_BYTES);
        CpuMode {
            cpl: ((ss >> 5) & 3) as u8,
            long64: self.guest_efer() & EFER_LMA != 0 && cs & (1 << 13) != 0,
        }
    }

    fn memory(&self) -> &dyn GuestPhysMemory {
        self.memory
    }

    /// INIT and SIPI (SDM vol. 3A, 9.1.1 and table 9-1), or any other
    /// start: the guest-state fields of `initial` (crate::initial), its
    /// EFER and IA-32e mode, nothing to deliver, active. The MSRs INIT
    /// keeps (SYSENTER, SYSCALL, PAT) change only when `initial` sets
    /// them.
    fn reset(&mut self, initial: &InitialState) {
        for (field, value) in crate::initial::guest_fields(initial, &self.cr) {
            write(field, value);
        }
        // The start's CD and NW, which the entry will not load.
        self.cr.load_cache_bits(initial.cr0());
        self.set_guest_efer(initial.efer());
        let entry = crate::initial::ia32e_entry(read(F::VM_ENTRY_CONTROLS), initial);
        write(F::VM_ENTRY_CONTROLS, entry);
        if initial.sets_msrs() {
            for (field, value) in crate::initial::sysenter_fields(initial) {
                write(field, value);
            }
            let pat_in_vmcs = entry & u64::from(crate::caps::entry::LOAD_IA32_PAT) != 0;
            if pat_in_vmcs {
                write(F::GUEST_IA32_PAT, initial.msrs().pat);
            }
            // SAFETY: a start that sets MSRs carries values
            // ResumedState::new checked; this vCPU runs on this processor
            // (its VMCS is current here).
            unsafe { crate::initial::load_shared_msrs(initial, pat_in_vmcs) };
        }
        write(F::VM_ENTRY_INTR_INFO, 0);
        self.deferred = None;
        // RSP lives in the VMCS; its slot here is unused.
        self.switch.regs = GuestRegs(initial.gprs);
        write(F::GUEST_ACTIVITY_STATE, ACTIVITY_ACTIVE);
        self.this_exit.just_started = true;
        self.started_at = Some(*initial);
    }

    fn wait_for_sipi(&mut self) {
        write(F::VM_ENTRY_INTR_INFO, 0);
        self.deferred = None;
        // INIT leaves no blocking behind; blocking by SMI outside SMM would
        // fail the entry (SDM vol. 3C, 27.3.1.5).
        write(F::GUEST_INTERRUPTIBILITY_INFO, 0);
        write(F::GUEST_ACTIVITY_STATE, ACTIVITY_WAIT_FOR_SIPI);
    }

    fn cs_access(&self) -> u16 {
        read_hot(F::GUEST_CS_AR_BYTES) as u16
    }

    fn rflags(&self) -> u64 {
        read_hot(F::GUEST_RFLAGS)
    }

    fn complete_instruction(&mut self, next_rip: u64) {
        write(F::GUEST_RIP, next_rip);
        let blocking = read(F::GUEST_INTERRUPTIBILITY_INFO);
        if blocking & 3 != 0 {
            write(F::GUEST_INTERRUPTIBILITY_INFO, blocking & !3);
        }
    }

    #[inline(always)]
    fn skip_instruction(&mut self) {
        let len = match core::mem::take(&mut self.this_exit.insn_len) {
            0 => read_hot(F::VM_EXIT_INSTRUCTION_LEN),
            len => u64::from(len),
        };
        let rip = read_hot(F::GUEST_RIP).wrapping_add(len);
        write_hot(F::GUEST_RIP, rip);
        // Stepping over the instruction ends any STI/MOV SS blocking.
        let blocking = read_hot(F::GUEST_INTERRUPTIBILITY_INFO);
        if blocking & 3 != 0 {
            write_hot(F::GUEST_INTERRUPTIBILITY_INFO, blocking & !3);
        }
    }

    fn inject(&mut self, event: Event) {
        let pending = read(F::VM_ENTRY_INTR_INFO) as u32;
        let event = if pending & INTR_INFO_VALID == 0 {
            event
        } else {
            // The exit interrupted the delivery of `pending`: do what the
            // processor would have done with both.
            let code = read(F::VM_ENTRY_EXCEPTION_ERROR_CODE) as u32;
            let cr2 = x86_64::registers::control::Cr2::read_raw();
            match decode_event(pending, code, cr2).map(|first| combine(first, event)) {
                Some(Combined::Serial { now, later }) => {
                    if later.is_some() {
                        self.deferred = later;
                        self.entry_work = true;
                    }
                    now
                }
                Some(Combined::DoubleFault) => Event::Exception {
                    vector: 8,
                    error_code: Some(0),
                },
                Some(Combined::Shutdown) => {
                    self.shutdown = true;
                    self.entry_work = true;
                    event
                }
                // A software event: the processor re-delivers it by running
                // the instruction again; the new event first.
                None => event,
            }
        };
        self.write_event(event);
    }

    fn run(&mut self) -> Exit {
        self.run_then(|_, exit| exit)
    }

    /// The exit path (docs/performance.md): inlined into the core's exit
    /// loop, with the world switch; CPUID and VMCALL reach their handlers
    /// without a neutral exit being assembled.
    #[inline(always)]
    fn run_then<R>(&mut self, handle: impl FnOnce(&mut Self, Exit) -> R) -> R {
        loop {
            if let Some(exit) = self.before_entry() {
                return handle(self, exit);
            }
            // SAFETY: the VMCS is current with this vCPU's host state
            // (type invariant); the switch writes HOST_RSP and HOST_RIP.
            let status = unsafe { world_switch(&mut self.switch) };
            if status != 0 {
                return handle(self, self.entry_failed());
            }
            self.switch.launched = 1;
            let raw = self.after_exit();
            match raw {
                exit_reason::CPUID => {
                    self.this_exit = ExitNotes::default();
                    return handle(self, Exit::Cpuid);
                }
                exit_reason::VMCALL => {
                    self.this_exit = ExitNotes::default();
                    return handle(self, Exit::VmmCall);
                }
                _ => {
                    if let Some(exit) = self.decode_exit(raw) {
                        return handle(self, exit);
                    }
                }
            }
        }
    }
}

impl<M: GuestPhysMemory> VmxVcpu<M> {
    /// What must happen before the entry: the next event, an EPT flush,
    /// CR2 for an injected #PF.
    #[inline(always)]
    fn before_entry(&mut self) -> Option<Exit> {
        // The common case costs no VMREAD: nothing waits.
        let nmi_waiting = self.nmis.load(Ordering::Relaxed) != 0;
        if self.entry_work || nmi_waiting {
            if let Some(exit) = self.entry_work() {
                return Some(exit);
            }
        }
        let (generation, seen) = &mut self.nested_gen;
        let now = generation.load(Ordering::Acquire);
        if now != *seen {
            *seen = now;
            Self::flush_ept();
        }
        None
    }

    /// The entry path's rare work ([`VmxVcpu::entry_work`], a waiting NMI).
    #[cold]
    #[inline(never)]
    fn entry_work(&mut self) -> Option<Exit> {
        if self.shutdown {
            return Some(Exit::Shutdown);
        }
        if let Some(cr2) = self.pending_cr2.take() {
            // SAFETY: CR2 only records page-fault addresses; the
            // hypervisor takes no page faults before the entry.
            unsafe {
                core::arch::asm!("mov cr2, {}", in(reg) cr2, options(nostack, preserves_flags))
            };
        }
        let nmi_waiting = self
            .signals
            .is_some_and(|s| s.nmis.load(Ordering::Relaxed) != 0);
        let exit = if self.deferred.is_some() || nmi_waiting {
            self.pick_waiting_event()
        } else {
            None
        };
        self.entry_work = self.deferred.is_some();
        exit
    }

    /// The EPT gained a permission: drop this guest's cached translations.
    #[cold]
    fn flush_ept() {
        // SAFETY: VMX is on (this vCPU's VMCS is current); single-context
        // INVEPT of this guest's own EPT pointer, or all contexts, as the
        // processor allows.
        unsafe {
            let eptp = read(F::EPT_POINTER);
            if crate::vmcs::invept(1, eptp).is_err() {
                let _ = crate::vmcs::invept(2, 0);
            }
        }
    }

    /// VMLAUNCH/VMRESUME itself failed: the error number says why.
    #[cold]
    fn entry_failed(&self) -> Exit {
        let error = read(F::VM_INSTRUCTION_ERROR);
        log::error!(
            "{} failed: VM-instruction error {error}: {}",
            if self.switch.launched != 0 {
                "VMRESUME"
            } else {
                "VMLAUNCH"
            },
            VmInstructionError(error as u32).description()
        );
        dump_vmcs();
        Exit::EntryFailed {
            code: (1 << 32) | error,
        }
    }

    /// What a VM exit leaves to do before it is handled: the event it
    /// interrupted, the count. Returns the raw exit reason.
    #[inline(always)]
    fn after_exit(&mut self) -> u32 {
        // An event whose delivery the exit interrupted is delivered
        // again on the next entry (SDM vol. 3C, 28.2.4).
        let vectoring = read_hot(F::IDT_VECTORING_INFO);
        if vectoring & u64::from(INTR_INFO_VALID) != 0 {
            Self::redeliver(vectoring);
        }
        let raw = read_hot(F::VM_EXIT_REASON) as u32;
        self.stats.record_reason(raw, |raw| {
            if raw & ENTRY_FAILURE != 0 {
                ENTRY_FAILED_SLOT
            } else {
                (raw & 0xFFFF) as usize
            }
        });
        raw
    }

    #[cold]
    fn redeliver(vectoring: u64) {
        write(F::VM_ENTRY_INTR_INFO, vectoring & !(1 << 12));
        if vectoring & u64::from(INTR_DELIVER_ERROR_CODE) != 0 {
            write(
                F::VM_ENTRY_EXCEPTION_ERROR_CODE,
                read(F::IDT_VECTORING_ERROR_CODE),
            );
        }
        write(
            F::VM_ENTRY_INSTRUCTION_LEN,
            read(F::VM_EXIT_INSTRUCTION_LEN),
        );
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;

    #[test]
    fn ept_violation_qualification_decodes() {
        // A read of an unmapped page through a guest-linear address.
        let q = EptViolation(0x181);
        assert!(q.read() && !q.write() && !q.fetch());
        assert_eq!(q.allowed(), 0);
        assert!(q.linear_valid() && q.final_translation());
        assert_eq!(
            q.to_string(),
            "qualification 0x181: read, not mapped, of a guest-linear address"
        );
        // A write to a read/execute page during a guest page walk.
        let q = EptViolation(0x02 | (5 << 3) | (1 << 7));
        assert!(q.write());
        assert_eq!(
            q.to_string(),
            "qualification 0xaa: write, entry allows R X, of a guest page-table entry"
        );
    }

    #[test]
    fn cr_policy_keeps_fixed_bits_and_lets_unrestricted_guests_page_off() {
        // Bochs' CR0/CR4 fixed values (IA32_VMX_CR0_FIXED0/1, CR4_FIXED0/1).
        let p = CrPolicy {
            cr0_must1: 0x8000_0021,
            cr0_may1: 0xFFFF_FFFF,
            cr4_must1: 0x2000,
            cr4_may1: 0x0037_27FF,
        };
        assert_eq!(p.real_cr0(0x11), 0x31);
        assert_eq!(p.real_cr0(0x8000_0011), 0x8000_0031);
        assert_eq!(p.cr0_mask(), 0x20);
        assert_eq!(p.real_cr4(0x20), 0x2020);
        assert_eq!(p.cr4_mask(), 0x2000);
        // Bits the processor does not allow stay clear.
        assert_eq!(p.real_cr4(1 << 23), 0x2000);
    }

    /// Bochs' CR0 fixed values, as in the test above.
    const BOCHS_CR: CrPolicy = CrPolicy {
        cr0_must1: 0x8000_0021,
        cr0_may1: 0xFFFF_FFFF,
        cr4_must1: 0x2000,
        cr4_may1: 0x0037_27FF,
    };

    #[test]
    fn emulated_cr0_writes_carry_cd_and_nw_to_the_processor() {
        let p = BOCHS_CR;
        // The hostile guest on Bochs (whose firmware leaves CD and NW
        // set): it clears NW and NE in one write, which exits; NE stays
        // set in the processor, NW must clear there.
        assert_eq!(p.root_cr0(0xE001_0031, 0xC001_0011), 0xC001_0031);
        // Setting CD with caches on, and both back.
        assert_eq!(p.root_cr0(0x8001_0031, 0xC001_0011), 0xC001_0031);
        assert_eq!(p.root_cr0(0xE001_0031, 0x8001_0011), 0x8001_0031);
        // Nothing else of the guest's value reaches the processor.
        assert_eq!(p.root_cr0(0x8001_0031, 0x0000_000E), 0x8001_0031);
        // A processor that fixed CD or NW in VMX operation keeps them.
        let fixed = CrPolicy {
            cr0_must1: 0xC000_0021,
            cr0_may1: 0xDFFF_FFFF,
            ..p
        };
        assert_eq!(fixed.root_cr0(0xC001_0031, 0xE001_0011), 0xC001_0031);
        assert_eq!(fixed.root_cr0(0xC001_0031, 0x8001_0011), 0xC001_0031);
    }

    proptest::proptest! {
        #[test]
        fn root_cr0_changes_only_cd_and_nw(root: u32, wanted: u64) {
            let (root, cache) = (u64::from(root) | 0x8000_0021, CR0_CD | CR0_NW);
            let got = BOCHS_CR.root_cr0(root, wanted);
            proptest::prop_assert_eq!(got & !cache, root & !cache);
            proptest::prop_assert_eq!(got & cache, wanted & cache);
        }
    }
}

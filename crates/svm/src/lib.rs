//! thinvisor's AMD SVM backend (AMD64 APM vol. 2, chapter 15).
//!
//! It owns the VMCB and the world switch and translates #VMEXIT codes into
//! the core's neutral [`Exit`]; every decision about what an exit means is
//! made by the core.
#![no_std]

pub mod efer;
pub mod msrpm;
pub mod vmcb;

use core::sync::atomic::{AtomicU32, Ordering};
use thinvisor_memory::{GuestPhysAddr, GuestPhysMemory, HostPhysAddr, PagingRegs};
use thinvisor_vmm::events::{combine, Combined};
use thinvisor_vmm::stats::ExitStats;
use thinvisor_vmm::vmmcall::is_vmm_call_at_rip;
use thinvisor_vmm::{
    CpuMode, Event, Exit, Gpr, GuestKind, HostSignals, InitialState, NestedFault, Seg,
    SegmentState, Vcpu,
};
use vmcb::{event_inj, exit_code, ioio_info, misc1, misc2, npf_info, tlb_control, Segment, Vmcb};
use x86_64::registers::model_specific::Msr;

/// EFER MSR and its SVME bit (APM vol. 2, 3.1.7).
const IA32_EFER: u32 = 0xC000_0080;
const EFER_SVME: u64 = 1 << 12;
/// VM_CR MSR; SVMDIS (bit 4) set means the firmware disabled SVM (APM 15.30.1).
const VM_CR: u32 = 0xC001_0114;
const VM_CR_SVMDIS: u64 = 1 << 4;
/// Physical address of the host state-save area VMRUN uses (APM 15.30.4).
const VM_HSAVE_PA: u32 = 0xC001_0117;

/// CPUID Fn8000_0001 ECX bit 2: SVM.
const CPUID_EXT1_ECX_SVM: u32 = 1 << 2;
/// CPUID Fn8000_000A EDX feature bits (APM vol. 3, E.4.9).
const SVM_FEATURE_NP: u32 = 1 << 0;
const SVM_FEATURE_NRIPS: u32 = 1 << 3;
const SVM_FEATURE_VMCB_CLEAN: u32 = 1 << 5;
const SVM_FEATURE_DECODE_ASSISTS: u32 = 1 << 7;

/// What [`SvmVcpu`]'s counters point at until they are given real ones:
/// a zero nobody changes.
static NO_COUNT: AtomicU32 = AtomicU32::new(0);

/// The guest's ASID. 0 belongs to the host; any other tags guest TLB
/// entries so VMRUN/#VMEXIT need not flush (APM 15.16).
pub const GUEST_ASID: u32 = 1;

/// Invalid opcode, the exception VMCALL raises on AMD processors.
const UD_VECTOR: u64 = 6;
/// #VMEXIT code of an intercepted #UD (VMEXIT_EXCP_BASE + vector).
const EXIT_UD: u64 = 0x40 + UD_VECTOR;

/// Instruction lengths for CPUs without NRIPS (QEMU's TCG has none).
const VMMCALL_LEN: u64 = 3;
const MSR_INSN_LEN: u64 = 2;
const CPUID_LEN: u64 = 2;

/// What the processor offers (CPUID Fn8000_000A).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvmFeatures {
    pub revision: u8,
    pub asids: u32,
    pub nested_paging: bool,
    pub nrips: bool,
    pub vmcb_clean: bool,
    pub decode_assists: bool,
}

/// Why SVM cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmError {
    /// CPUID does not report SVM.
    NotSupported,
    /// VM_CR.SVMDIS: disabled by the firmware.
    DisabledByFirmware,
    /// No nested paging: thinvisor needs it to isolate guest memory.
    NoNestedPaging,
}

impl core::fmt::Display for SvmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SvmError::NotSupported => {
                "the processor has no AMD SVM (CPUID 8000_0001h:ECX.SVM clear)"
            }
            SvmError::DisabledByFirmware => "SVM is disabled by the firmware (VM_CR.SVMDIS set)",
            SvmError::NoNestedPaging => "the processor has SVM but no nested paging",
        })
    }
}

/// Look for SVM. QEMU performs nested paging even where CPUID hides it,
/// but only what CPUID reports is relied upon.
pub fn probe() -> Result<SvmFeatures, SvmError> {
    let ext = core::arch::x86_64::__cpuid(0x8000_0000);
    if ext.eax < 0x8000_000A
        || core::arch::x86_64::__cpuid(0x8000_0001).ecx & CPUID_EXT1_ECX_SVM == 0
    {
        return Err(SvmError::NotSupported);
    }
    // SAFETY: VM_CR exists on every processor that reports SVM.
    if unsafe { Msr::new(VM_CR).read() } & VM_CR_SVMDIS != 0 {
        return Err(SvmError::DisabledByFirmware);
    }
    let f = core::arch::x86_64::__cpuid(0x8000_000A);
    let features = SvmFeatures {
        revision: f.eax as u8,
        asids: f.ebx,
        nested_paging: f.edx & SVM_FEATURE_NP != 0,
        nrips: f.edx & SVM_FEATURE_NRIPS != 0,
        vmcb_clean: f.edx & SVM_FEATURE_VMCB_CLEAN != 0,
        decode_assists: f.edx & SVM_FEATURE_DECODE_ASSISTS != 0,
    };
    if !features.nested_paging {
        return Err(SvmError::NoNestedPaging);
    }
    Ok(features)
}

/// Turn SVM on for this processor: EFER.SVME, then the host save area.
///
/// # Safety
/// `hsave` must be a 4 KiB page that nothing else uses for as long as SVM
/// stays enabled; [`probe`] must have succeeded.
pub unsafe fn enable(hsave: HostPhysAddr) {
    let mut efer = Msr::new(IA32_EFER);
    let mut hsave_msr = Msr::new(VM_HSAVE_PA);
    // SAFETY: the caller guarantees SVM exists; setting SVME changes no
    // state the hypervisor relies on, and hsave is reserved for the CPU.
    unsafe {
        efer.write(efer.read() | EFER_SVME);
        hsave_msr.write(hsave.as_u64());
    }
}

/// Set EFER.SVME again if something (SMM) cleared it.
#[cold]
fn ensure_svme() {
    let mut efer = Msr::new(IA32_EFER);
    // SAFETY: SVM was enabled at start-up on this processor; setting SVME
    // again restores that state and changes nothing else.
    unsafe {
        let value = efer.read();
        if value & EFER_SVME == 0 {
            log::warn!("EFER.SVME was cleared (by SMM?); setting it again");
            efer.write(value | EFER_SVME);
        }
    }
}

/// The guest's general registers that VMRUN neither saves nor loads
/// (RAX and RSP live in the VMCB). The world-switch stub uses these
/// offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestRegs {
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

/// What the world switch works on: the guest's registers that VMRUN
/// does not keep in the VMCB, and the two pages it loads and saves state
/// through. One block, so the switch finds everything from one pointer
/// after #VMEXIT, when every other register is the guest's.
#[repr(C)]
struct SwitchArea {
    regs: GuestRegs,
    vmcb_pa: u64,
    host_save_pa: u64,
}

/// The world switch, inlined into the exit loop so that the compiler
/// keeps only what it needs across it (no call, and no callee-saved
/// registers pushed per exit: they are declared clobbered). CLGI holds off
/// NMIs and SMIs while host and guest state are half swapped; VMSAVE and
/// VMLOAD move the state VMRUN leaves alone (FS, GS, TR, LDTR hidden
/// parts, KernelGsBase, the SYSCALL and SYSENTER MSRs; APM vol. 2,
/// 15.5.2) — the host's GS base and TR are its per-processor data and
/// interrupt stacks. The host's side of that state never changes after
/// the vCPU is made, so [`SvmVcpu::new`] saves it once and each exit only
/// loads it. RBX and RBP cannot be named as operands (LLVM uses
/// them), so the stub saves them itself.
///
/// # Safety
/// `area`'s VMCB and host save area are this vCPU's own pages, SVM is
/// enabled on this processor, and the stack has no red zone (the target
/// has none).
#[inline(always)]
unsafe fn world_switch(area: &mut SwitchArea) {
    // SAFETY: per the function's contract; the asm restores RBX, RBP and
    // RSP and declares every other register it changes.
    unsafe {
        core::arch::asm!(
            "push rbp",
            "push rbx",
            "push rsi",
            "clgi",
            "mov rax, [rsi + {vmcb}]",
            "vmload rax",
            "mov rbx, [rsi + {g_rbx}]",
            "mov rcx, [rsi + {g_rcx}]",
            "mov rdx, [rsi + {g_rdx}]",
            "mov rdi, [rsi + {g_rdi}]",
            "mov rbp, [rsi + {g_rbp}]",
            "mov r8, [rsi + {g_r8}]",
            "mov r9, [rsi + {g_r9}]",
            "mov r10, [rsi + {g_r10}]",
            "mov r11, [rsi + {g_r11}]",
            "mov r12, [rsi + {g_r12}]",
            "mov r13, [rsi + {g_r13}]",
            "mov r14, [rsi + {g_r14}]",
            "mov r15, [rsi + {g_r15}]",
            "mov rsi, [rsi + {g_rsi}]",
            "vmrun rax",
            // #VMEXIT: RAX and RSP are the host's again, the rest is the
            // guest's; the area's address is on the stack.
            "push rsi",
            "mov rsi, [rsp + 8]",
            "mov [rsi + {g_rbx}], rbx",
            "mov [rsi + {g_rcx}], rcx",
            "mov [rsi + {g_rdx}], rdx",
            "mov [rsi + {g_rdi}], rdi",
            "mov [rsi + {g_rbp}], rbp",
            "mov [rsi + {g_r8}], r8",
            "mov [rsi + {g_r9}], r9",
            "mov [rsi + {g_r10}], r10",
            "mov [rsi + {g_r11}], r11",
            "mov [rsi + {g_r12}], r12",
            "mov [rsi + {g_r13}], r13",
            "mov [rsi + {g_r14}], r14",
            "mov [rsi + {g_r15}], r15",
            "pop qword ptr [rsi + {g_rsi}]",
            "mov rax, [rsi + {vmcb}]",
            "vmsave rax",
            "mov rax, [rsi + {host}]",
            "vmload rax",
            "stgi",
            "pop rsi",
            "pop rbx",
            "pop rbp",
            host = const core::mem::offset_of!(SwitchArea, host_save_pa),
            vmcb = const core::mem::offset_of!(SwitchArea, vmcb_pa),
            g_rbx = const core::mem::offset_of!(GuestRegs, rbx),
            g_rcx = const core::mem::offset_of!(GuestRegs, rcx),
            g_rdx = const core::mem::offset_of!(GuestRegs, rdx),
            g_rsi = const core::mem::offset_of!(GuestRegs, rsi),
            g_rdi = const core::mem::offset_of!(GuestRegs, rdi),
            g_rbp = const core::mem::offset_of!(GuestRegs, rbp),
            g_r8 = const core::mem::offset_of!(GuestRegs, r8),
            g_r9 = const core::mem::offset_of!(GuestRegs, r9),
            g_r10 = const core::mem::offset_of!(GuestRegs, r10),
            g_r11 = const core::mem::offset_of!(GuestRegs, r11),
            g_r12 = const core::mem::offset_of!(GuestRegs, r12),
            g_r13 = const core::mem::offset_of!(GuestRegs, r13),
            g_r14 = const core::mem::offset_of!(GuestRegs, r14),
            g_r15 = const core::mem::offset_of!(GuestRegs, r15),
            inout("rsi") core::ptr::from_mut(area) => _,
            out("rax") _,
            out("rcx") _,
            out("rdx") _,
            out("rdi") _,
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
}

impl Segment {
    fn from_state(s: SegmentState) -> Self {
        Segment {
            selector: s.selector,
            attrib: s.svm_attrib(),
            limit: s.limit,
            base: s.base,
        }
    }
}

/// One virtual processor on SVM.
pub struct SvmVcpu<M: GuestPhysMemory + 'static> {
    vmcb: &'static mut Vmcb,
    /// The guest's other registers and the switch's two pages.
    switch: SwitchArea,
    /// The VM's memory, shared with its other vCPUs.
    memory: &'static M,
    nrips: bool,
    /// Length of the instruction behind the current exit, for CPUs
    /// without NRIPS; 0 when unknown.
    exit_insn_len: u64,
    /// CR2 for an injected page fault, written to the processor too.
    pending_cr2: Option<u64>,
    /// EFER bits the guest may write ([`efer::writable_bits`], less any
    /// that VMRUN refused since).
    efer_writable: u64,
    /// The EFER and RIP from before the last emulated EFER write, until
    /// the next VMRUN accepts the new value ([`efer::refused_by_vmrun`]).
    efer_undo: Option<(u64, u64)>,
    /// The guest state before the entry that tries an emulated EFER write.
    before_efer_write: Option<vmcb::StateSaveArea>,
    /// Exits by [`exit_slot`].
    stats: ExitStats,
    /// An event to deliver at the first entry that has no other one.
    deferred: Option<Event>,
    /// NMIs the host caught on this processor, for the guest, and an
    /// INIT another processor sent it.
    signals: Option<&'static HostSignals>,
    /// A fault arose while a double fault was delivered.
    shutdown: bool,
    /// Set with any of `shutdown`, `deferred`, `pending_cr2`, `efer_undo`:
    /// the entry path looks at them only then.
    entry_work: bool,
    /// The nested tables' generation, and the one this vCPU last saw: a
    /// change (a permission the hypervisor gave back) flushes its TLB.
    nested_gen: (&'static AtomicU32, u32),
    /// The NMI count of `signals`, or [`NO_COUNT`]: the entry path's one
    /// load (no Option to test first).
    nmis: &'static AtomicU32,
}

/// EVENTINJ for `event` (APM vol. 2, 15.20).
fn encode_event(event: Event) -> u64 {
    let (vector, kind, error_code) = match event {
        Event::Exception { vector, error_code } => (vector, event_inj::TYPE_EXCEPTION, error_code),
        Event::PageFault { error_code, .. } => (14, event_inj::TYPE_EXCEPTION, Some(error_code)),
        Event::Nmi => (2, event_inj::TYPE_NMI, None),
        Event::ExternalInterrupt { vector } => (vector, event_inj::TYPE_INTR, None),
    };
    let mut value = u64::from(vector) | kind | event_inj::VALID;
    if let Some(code) = error_code {
        value |= event_inj::ERROR_CODE_VALID | (u64::from(code) << 32);
    }
    value
}

/// The neutral event behind an EXITINTINFO/EVENTINJ value; None for
/// software interrupts, which only the processor re-delivers.
fn decode_event(raw: u64, cr2: u64) -> Option<Event> {
    let vector = raw as u8;
    let error_code = (raw & event_inj::ERROR_CODE_VALID != 0).then_some((raw >> 32) as u32);
    match raw & event_inj::TYPE_MASK {
        event_inj::TYPE_INTR => Some(Event::ExternalInterrupt { vector }),
        event_inj::TYPE_NMI => Some(Event::Nmi),
        event_inj::TYPE_EXCEPTION if vector == 14 => Some(Event::PageFault {
            error_code: error_code.unwrap_or(0),
            address: cr2,
        }),
        event_inj::TYPE_EXCEPTION => Some(Event::Exception { vector, error_code }),
        _ => None,
    }
}

/// The statistics slot of an exit code: codes below 0x90 as they are
/// (APM vol. 2, appendix C), then NPF, VMEXIT_INVALID, anything else.
fn exit_slot(code: u64) -> usize {
    match code {
        c if c < 0x90 => c as usize,
        exit_code::NPF => 0x90,
        c if c == exit_code::INVALID || c == u64::from(u32::MAX) => 0x91,
        _ => 0x92,
    }
}

/// The name of a statistics slot (APM vol. 2, appendix C, "SVM Intercept
/// Exit Codes").
pub fn exit_name(slot: usize) -> &'static str {
    const MISC: [&str; 32] = [
        "INTR",
        "NMI",
        "SMI",
        "INIT",
        "VINTR",
        "CR0_SEL_WRITE",
        "IDTR_READ",
        "GDTR_READ",
        "LDTR_READ",
        "TR_READ",
        "IDTR_WRITE",
        "GDTR_WRITE",
        "LDTR_WRITE",
        "TR_WRITE",
        "RDTSC",
        "RDPMC",
        "PUSHF",
        "POPF",
        "CPUID",
        "RSM",
        "IRET",
        "SWINT",
        "INVD",
        "PAUSE",
        "HLT",
        "INVLPG",
        "INVLPGA",
        "IOIO",
        "MSR",
        "TASK_SWITCH",
        "FERR_FREEZE",
        "SHUTDOWN",
    ];
    const SVM: [&str; 16] = [
        "VMRUN",
        "VMMCALL",
        "VMLOAD",
        "VMSAVE",
        "STGI",
        "CLGI",
        "SKINIT",
        "RDTSCP",
        "ICEBP",
        "WBINVD",
        "MONITOR",
        "MWAIT",
        "MWAIT_CONDITIONAL",
        "XSETBV",
        "RDPRU",
        "EFER_WRITE_TRAP",
    ];
    const EXCEPTIONS: [&str; 32] = [
        "EXCP #DE", "EXCP #DB", "EXCP NMI", "EXCP #BP", "EXCP #OF", "EXCP #BR", "EXCP #UD",
        "EXCP #NM", "EXCP #DF", "EXCP 9", "EXCP #TS", "EXCP #NP", "EXCP #SS", "EXCP #GP",
        "EXCP #PF", "EXCP 15", "EXCP #MF", "EXCP #AC", "EXCP #MC", "EXCP #XF", "EXCP 20",
        "EXCP #CP", "EXCP 22", "EXCP 23", "EXCP 24", "EXCP 25", "EXCP 26", "EXCP 27", "EXCP #HV",
        "EXCP #VC", "EXCP #SX", "EXCP 31",
    ];
    match slot {
        0x00..=0x0F => "CR_READ",
        0x10..=0x1F => "CR_WRITE",
        0x20..=0x2F => "DR_READ",
        0x30..=0x3F => "DR_WRITE",
        0x40..=0x5F => EXCEPTIONS[slot - 0x40],
        0x60..=0x7F => MISC[slot - 0x60],
        0x80..=0x8F => SVM[slot - 0x80],
        0x90 => "NPF",
        0x91 => "INVALID",
        _ => "other",
    }
}

/// The save area of a guest that starts in `initial`: at power-on (the
/// constructor) or after INIT and SIPI ([`SvmVcpu::reset`]; the values
/// of Intel SDM vol. 3A, table 9-1, which AMD APM vol. 2, 14.1.3 matches),
/// or in the 64-bit state a loader left ([`InitialState::resumed`]).
/// VMRUN loads CS, SS, DS, ES, the descriptor tables, the control
/// registers, EFER, RFLAGS, RIP, RSP, RAX, DR6/DR7 and CPL; the
/// world switch's VMLOAD the rest (FS, GS, TR, LDTR with their hidden
/// parts, KernelGsBase, the SYSCALL and SYSENTER MSRs; APM vol. 2, 15.5.2
/// and 15.5.1, VMLOAD). The MSRs of [`thinvisor_vmm::MsrState`] are
/// written only when `msrs` (power-on) or the start sets them: INIT leaves
/// them as they are.
fn load_initial(s: &mut vmcb::StateSaveArea, initial: &InitialState, msrs: bool) {
    let seg = |which| Segment::from_state(initial.segment(which));
    s.cs = seg(Seg::Cs);
    s.ss = seg(Seg::Ss);
    s.ds = seg(Seg::Ds);
    s.es = seg(Seg::Es);
    s.fs = seg(Seg::Fs);
    s.gs = seg(Seg::Gs);
    s.tr = seg(Seg::Tr);
    s.ldtr = seg(Seg::Ldtr);
    let (gdt_base, gdt_limit) = initial.gdt();
    s.gdtr = Segment {
        base: gdt_base,
        limit: gdt_limit.into(),
        ..Segment::default()
    };
    let (idt_base, idt_limit) = initial.idt();
    s.idtr = Segment {
        base: idt_base,
        limit: idt_limit.into(),
        ..Segment::default()
    };
    // CPL is SS.DPL (APM vol. 2, 15.5.1: VMRUN takes it from the CPL
    // field, which must agree with the segments).
    s.cpl = initial.cpl();
    s.cr0 = initial.cr0();
    s.cr3 = initial.cr3();
    s.cr4 = initial.cr4();
    // The guest's EFER must keep SVME (VMRUN consistency check, APM
    // 15.5.1); the guest never sees it (module `efer`).
    s.efer = initial.efer() | EFER_SVME;
    s.rflags = initial.rflags();
    s.rip = initial.rip();
    s.rax = initial.gpr(Gpr::Rax);
    s.rsp = initial.gpr(Gpr::Rsp);
    s.dr6 = 0xFFFF_0FF0;
    s.dr7 = initial.dr7();
    s.cr2 = 0;
    if msrs || initial.sets_msrs() {
        let m = initial.msrs();
        // G_PAT: the guest's own PAT under nested paging (APM vol. 2,
        // 15.25.8).
        s.g_pat = m.pat;
        s.kernel_gs_base = m.kernel_gs_base;
        s.star = m.star;
        s.lstar = m.lstar;
        s.cstar = m.cstar;
        s.sfmask = m.sfmask;
        s.sysenter_cs = m.sysenter_cs;
        s.sysenter_esp = m.sysenter_esp;
        s.sysenter_eip = m.sysenter_eip;
    }
}

/// The general registers of a guest that starts in `initial` (RAX and RSP
/// live in the save area).
fn regs_from(initial: &InitialState) -> GuestRegs {
    let g = |r| initial.gpr(r);
    GuestRegs {
        rbx: g(Gpr::Rbx),
        rcx: g(Gpr::Rcx),
        rdx: g(Gpr::Rdx),
        rsi: g(Gpr::Rsi),
        rdi: g(Gpr::Rdi),
        rbp: g(Gpr::Rbp),
        r8: g(Gpr::R8),
        r9: g(Gpr::R9),
        r10: g(Gpr::R10),
        r11: g(Gpr::R11),
        r12: g(Gpr::R12),
        r13: g(Gpr::R13),
        r14: g(Gpr::R14),
        r15: g(Gpr::R15),
    }
}

impl<M: GuestPhysMemory> SvmVcpu<M> {
    /// Set up a VMCB for a guest that starts in `initial`.
    ///
    /// # Safety
    /// `vmcb` and `host_save` are distinct zeroed 4 KiB pages used by
    /// nothing else, `vmcb_virt` maps `vmcb`, `ncr3` is the root of
    /// nested page tables that map only memory the guest may use, and
    /// `msrpm` is an MSR permission map (see [`msrpm`]) that intercepts at
    /// least [`msrpm::PROTECTED_MSRS`]. It is called on the processor that
    /// will run the vCPU, with SVM enabled ([`enable`]) and the host's GS
    /// base, TR and the rest of its VMSAVE state as they will stay.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn new(
        features: &SvmFeatures,
        vmcb_virt: &'static mut Vmcb,
        vmcb: HostPhysAddr,
        host_save: HostPhysAddr,
        ncr3: HostPhysAddr,
        msrpm: HostPhysAddr,
        iopm: HostPhysAddr,
        memory: &'static M,
        initial: &InitialState,
        kind: GuestKind,
    ) -> Self {
        let c = &mut vmcb_virt.control;
        // Exits the core handles; everything else, I/O and all MSRs but
        // the virtualization extension's own, runs on the real hardware.
        // An isolated guest's SMIs exit too, so the firmware's SMM handler
        // runs in the host's context once STGI opens the gate, not inside
        // a guest whose nested paging moves memory (APM 15.13.3). The
        // machine's own OS takes its SMIs itself, with nested paging the
        // identity: SeaBIOS's 16-bit disk services switch modes through
        // SMM (its call32_smm rewrites the interrupted context's saved
        // state), and that context must be the guest's, not the host's.
        // NMIs exit so that another processor can stop this one with an
        // NMI when the guest sends it INIT (crate::HostSignals explains
        // why INIT is emulated); the host's handler takes the NMI and the
        // next entry gives it to the guest.
        c.intercept_misc1 = misc1::CPUID | misc1::SHUTDOWN | misc1::MSR_PROT | misc1::NMI;
        if kind == GuestKind::Isolated {
            c.intercept_misc1 |= misc1::HLT | misc1::SMI;
        }
        c.msrpm_base_pa = msrpm.as_u64();
        // The I/O permission map intercepts only the ports of
        // thinvisor_vmm::POWER_PORTS (APM vol. 2, 15.10).
        c.iopm_base_pa = iopm.as_u64();
        c.intercept_misc1 |= misc1::IOIO_PROT;
        c.intercept_misc2 = misc2::VMRUN
            | misc2::VMMCALL
            | misc2::VMLOAD
            | misc2::VMSAVE
            | misc2::STGI
            | misc2::CLGI
            | misc2::SKINIT;
        // #UD, to accept Intel's VMCALL as a VMM call too.
        c.intercept_exceptions = 1 << UD_VECTOR;
        c.guest_asid = GUEST_ASID;
        // Entries from an earlier user of this ASID must not survive.
        c.tlb_control = tlb_control::FLUSH_ALL;
        c.np_enable = 1;
        c.ncr3 = ncr3.as_u64();
        c.vmcb_clean = 0;

        // Power-on MSRs (the PAT write-back for index 0, as firmware
        // leaves it) unless the start sets its own.
        load_initial(&mut vmcb_virt.save, initial, true);
        // The host's VMSAVE state, once (see `world_switch`): this runs on
        // the processor that will run the guest, with its GS base and TR
        // in place.
        // SAFETY: SVM is enabled here (caller), `host_save` is a page of
        // this vCPU's that nothing else uses; VMSAVE only writes it.
        unsafe {
            core::arch::asm!("vmsave rax", in("rax") host_save.as_u64(), options(nostack, preserves_flags));
        }
        let regs = regs_from(initial);
        Self {
            vmcb: vmcb_virt,
            switch: SwitchArea {
                regs,
                vmcb_pa: vmcb.as_u64(),
                host_save_pa: host_save.as_u64(),
            },
            memory,
            nrips: features.nrips,
            exit_insn_len: 0,
            pending_cr2: None,
            efer_writable: {
                let ext1 = core::arch::x86_64::__cpuid(0x8000_0001);
                efer::writable_bits(ext1.ecx, ext1.edx)
            },
            efer_undo: None,
            before_efer_write: None,
            stats: ExitStats::default(),
            deferred: None,
            signals: None,
            shutdown: false,
            entry_work: false,
            nested_gen: (&NO_COUNT, 0),
            nmis: &NO_COUNT,
        }
    }

    /// Deliver the NMIs the host counts in `signals` (its NMI handler's)
    /// to this guest, and stop it when `signals` says INIT.
    pub fn take_host_signals_from(&mut self, signals: &'static HostSignals) {
        self.signals = Some(signals);
        self.nmis = &signals.nmis;
    }

    /// Flush this guest's TLB before the next entry whenever `generation`
    /// changes (the nested tables gained a permission).
    pub fn watch_nested_generation(&mut self, generation: &'static AtomicU32) {
        self.nested_gen = (generation, generation.load(Ordering::Acquire));
    }

    /// Fill an empty EVENTINJ with a deferred event or an NMI the host
    /// caught, just before VMRUN; `Exit::Init` instead of an entry when
    /// another processor sent this one INIT (looked at only when NMIs
    /// wait: the sender's kick is one, see [`HostSignals`]).
    #[inline(always)]
    fn pick_next_event(&mut self) -> Option<Exit> {
        // A plain load first: the rest only when an NMI waits.
        if self.nmis.load(Ordering::Relaxed) != 0 {
            return self.nmi_waits();
        }
        None
    }

    #[cold]
    #[inline(never)]
    fn nmi_waits(&mut self) -> Option<Exit> {
        let signals = self.signals?;
        if signals.init_posted() {
            return Some(Exit::Init);
        }
        if self.vmcb.control.event_inj & event_inj::VALID == 0
            && self.deferred.is_none()
            && signals.take_nmi()
        {
            self.vmcb.control.event_inj = encode_event(Event::Nmi);
        }
        None
    }

    /// The raw VMCB, for diagnostics.
    pub fn vmcb(&self) -> &Vmcb {
        self.vmcb
    }

    /// VMRUN refused the guest state (APM vol. 2, 15.5.1 lists the
    /// checks): log what those checks look at.
    #[cold]
    fn log_invalid_state(&self) {
        let s = &self.vmcb.save;
        let c = &self.vmcb.control;
        log::error!("VMRUN failed: VMEXIT_INVALID (the guest state fails a consistency check of APM vol. 2, 15.5.1)");
        log::error!(
            "  EFER {:#x} CR0 {:#x} CR3 {:#x} CR4 {:#x} DR6 {:#x} DR7 {:#x} RFLAGS {:#x} RIP {:#x}",
            s.efer,
            s.cr0,
            s.cr3,
            s.cr4,
            s.dr6,
            s.dr7,
            s.rflags,
            s.rip
        );
        log::error!(
            "  CS {:#x}/attrib {:#x} SS attrib {:#x} CPL {} ASID {} intercepts {:#x} {:#x} nCR3 {:#x} EVENTINJ {:#x}",
            s.cs.selector, s.cs.attrib, s.ss.attrib, s.cpl, c.guest_asid, c.intercept_misc1, c.intercept_misc2, c.ncr3, c.event_inj
        );
    }

    /// RDMSR/WRMSR of EFER: the guest's view without SVME (module
    /// [`efer`]). A refused write raises #GP and does not step.
    #[cold]
    fn on_efer(&mut self, write: bool) {
        let s = &mut self.vmcb.save;
        if !write {
            let value = efer::guest_view(s.efer);
            s.rax = value & 0xFFFF_FFFF;
            self.switch.regs.rdx = value >> 32;
        } else {
            let value = (self.switch.regs.rdx << 32) | (s.rax & 0xFFFF_FFFF);
            let paging = s.cr0 & (1 << 31) != 0;
            match efer::after_write(s.efer, value, self.efer_writable, paging) {
                Some(new) => {
                    self.efer_undo = Some((s.efer, s.rip));
                    self.entry_work = true;
                    s.efer = new;
                }
                None => return self.inject(Event::GP0),
            }
        }
        self.exit_insn_len = MSR_INSN_LEN;
        self.skip_instruction();
    }

    /// Turn the exit the VMCB describes into a neutral one, or None when
    /// it is the backend's own business (EFER accesses, NMIs, SMIs) and
    /// settled: the guest can simply be entered again. (CPUID and VMMCALL
    /// take the short way, in `run_then`.)
    fn decode_exit(&mut self) -> Option<Exit> {
        let c = &self.vmcb.control;
        self.exit_insn_len = 0;
        Some(match c.exit_code {
            exit_code::VMMCALL => {
                self.exit_insn_len = VMMCALL_LEN;
                Exit::VmmCall
            }
            exit_code::CPUID => {
                self.exit_insn_len = CPUID_LEN;
                Exit::Cpuid
            }
            exit_code::HLT => Exit::Hlt,
            exit_code::IOIO => {
                // EXITINFO2 is the next RIP for I/O intercepts, with or
                // without NRIPS (APM vol. 2, 15.10.2).
                self.exit_insn_len = c.exit_info2.wrapping_sub(self.vmcb.save.rip);
                self.vmcb.control.nrip = 0;
                let c = &self.vmcb.control;
                let info = c.exit_info1;
                Exit::Io {
                    port: (info >> 16) as u16,
                    size: if info & ioio_info::SIZE8 != 0 {
                        1
                    } else if info & ioio_info::SIZE16 != 0 {
                        2
                    } else {
                        4
                    },
                    input: info & ioio_info::INPUT != 0,
                    string: info & ioio_info::STRING != 0,
                }
            }
            // nRIP is zero for exception intercepts (APM 15.7.1): the
            // length of VMCALL is known.
            EXIT_UD if is_vmm_call_at_rip(self) => {
                self.exit_insn_len = VMMCALL_LEN;
                self.vmcb.control.nrip = 0;
                Exit::VmmCall
            }
            EXIT_UD => Exit::InvalidOpcode,
            // EXITINFO1 is 0 for RDMSR, 1 for WRMSR; ECX names the MSR (APM 15.11).
            exit_code::MSR if self.switch.regs.rcx as u32 == efer::MSR_EFER => {
                self.on_efer(c.exit_info1 & 1 != 0);
                return None;
            }
            // The NMI stays pending through #VMEXIT (GIF is 0, APM vol. 2,
            // 15.17); the world switch's STGI has let the host's NMI handler
            // take it since, which counted it for the guest: the entry path
            // injects it, or finds the INIT it announced.
            exit_code::NMI => return None,
            exit_code::SMI => {
                // STGI in the world switch has let the SMI in by now; the
                // firmware may have returned with EFER.SVME clear (QEMU's
                // SMM does), which the next VMRUN needs.
                ensure_svme();
                return None;
            }
            exit_code::MSR => {
                // Without NRIPS the step over RDMSR/WRMSR is their length.
                self.exit_insn_len = MSR_INSN_LEN;
                Exit::Msr {
                    msr: self.switch.regs.rcx as u32,
                    write: c.exit_info1 & 1 != 0,
                }
            }
            exit_code::SHUTDOWN => Exit::Shutdown,
            exit_code::NPF => Exit::NestedPageFault(NestedFault {
                gpa: GuestPhysAddr::new(c.exit_info2),
                write: c.exit_info1 & npf_info::WRITE != 0,
                fetch: c.exit_info1 & npf_info::FETCH != 0,
                linear: None,
                in_page_walk: c.exit_info1 & npf_info::IN_PAGE_WALK != 0,
            }),
            exit_code::VMRUN
            | exit_code::VMLOAD
            | exit_code::VMSAVE
            | exit_code::STGI
            | exit_code::CLGI
            | exit_code::SKINIT => Exit::VirtualizationInstruction,
            // VMEXIT_INVALID is -1; some emulators store only 32 bits of it.
            code if code == exit_code::INVALID || code == u64::from(u32::MAX) => {
                self.log_invalid_state();
                Exit::EntryFailed { code }
            }
            code => Exit::Unknown { code },
        })
    }
}

impl<M: GuestPhysMemory> Vcpu for SvmVcpu<M> {
    fn exit_stats(&self) -> Option<&ExitStats> {
        Some(&self.stats)
    }

    fn exit_names(&self) -> fn(usize) -> &'static str {
        exit_name
    }

    fn gpr(&self, reg: Gpr) -> u64 {
        let r = &self.switch.regs;
        match reg {
            Gpr::Rax => self.vmcb.save.rax,
            Gpr::Rsp => self.vmcb.save.rsp,
            Gpr::Rbx => r.rbx,
            Gpr::Rcx => r.rcx,
            Gpr::Rdx => r.rdx,
            Gpr::Rsi => r.rsi,
            Gpr::Rdi => r.rdi,
            Gpr::Rbp => r.rbp,
            Gpr::R8 => r.r8,
            Gpr::R9 => r.r9,
            Gpr::R10 => r.r10,
            Gpr::R11 => r.r11,
            Gpr::R12 => r.r12,
            Gpr::R13 => r.r13,
            Gpr::R14 => r.r14,
            Gpr::R15 => r.r15,
        }
    }

    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        let r = &mut self.switch.regs;
        let slot = match reg {
            Gpr::Rax => &mut self.vmcb.save.rax,
            Gpr::Rsp => &mut self.vmcb.save.rsp,
            Gpr::Rbx => &mut r.rbx,
            Gpr::Rcx => &mut r.rcx,
            Gpr::Rdx => &mut r.rdx,
            Gpr::Rsi => &mut r.rsi,
            Gpr::Rdi => &mut r.rdi,
            Gpr::Rbp => &mut r.rbp,
            Gpr::R8 => &mut r.r8,
            Gpr::R9 => &mut r.r9,
            Gpr::R10 => &mut r.r10,
            Gpr::R11 => &mut r.r11,
            Gpr::R12 => &mut r.r12,
            Gpr::R13 => &mut r.r13,
            Gpr::R14 => &mut r.r14,
            Gpr::R15 => &mut r.r15,
        };
        *slot = value;
    }

    fn rip(&self) -> u64 {
        self.vmcb.save.rip
    }

    fn rip_linear(&self) -> u64 {
        self.vmcb.save.cs.base.wrapping_add(self.vmcb.save.rip)
    }

    fn paging(&self) -> PagingRegs {
        let s = &self.vmcb.save;
        PagingRegs {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        }
    }

    fn cr4(&self) -> u64 {
        self.vmcb.save.cr4
    }

    fn mode(&self) -> CpuMode {
        const EFER_LMA: u64 = 1 << 10;
        let s = &self.vmcb.save;
        CpuMode {
            cpl: s.cpl & 3,
            long64: s.efer & EFER_LMA != 0 && s.cs.long(),
        }
    }

    fn memory(&self) -> &dyn GuestPhysMemory {
        self.memory
    }

    fn cs_access(&self) -> u16 {
        // SVM packs bits 15:12 of the access rights into 11:8.
        let a = self.vmcb.save.cs.attrib;
        (a & 0xFF) | ((a & 0xF00) << 4)
    }

    fn rflags(&self) -> u64 {
        self.vmcb.save.rflags
    }

    fn complete_instruction(&mut self, next_rip: u64) {
        self.vmcb.save.rip = next_rip;
        self.vmcb.control.interrupt_shadow = 0;
    }

    fn skip_instruction(&mut self) {
        let s = &mut self.vmcb.save;
        // (I/O and #UD exits clear nRIP: their length is known.)
        s.rip = if self.nrips && self.vmcb.control.nrip != 0 {
            self.vmcb.control.nrip
        } else {
            s.rip.wrapping_add(self.exit_insn_len)
        };
        // Stepping over the instruction ends an STI/MOV SS shadow.
        self.vmcb.control.interrupt_shadow = 0;
    }

    /// INIT and SIPI (Intel SDM vol. 3A, 9.1.1 and table 9-1; APM vol. 2,
    /// 14.1.3): the registers of `initial`, nothing to deliver, no
    /// interrupt shadow, and a fresh TLB (the guest's paging is off now).
    /// MSRs the save area holds (STAR, LSTAR, KernelGSBase, G_PAT, ...)
    /// keep their values, as INIT leaves them, unless `initial` sets them.
    fn reset(&mut self, initial: &InitialState) {
        load_initial(&mut self.vmcb.save, initial, false);
        self.switch.regs = regs_from(initial);
        let c = &mut self.vmcb.control;
        c.event_inj = 0;
        c.interrupt_shadow = 0;
        c.tlb_control = tlb_control::FLUSH_ALL;
        c.vmcb_clean = 0;
        self.deferred = None;
        self.pending_cr2 = None;
        self.efer_undo = None;
        self.before_efer_write = None;
        self.shutdown = false;
        self.entry_work = false;
    }

    fn inject(&mut self, event: Event) {
        let pending = self.vmcb.control.event_inj;
        let event = if pending & event_inj::VALID == 0 {
            event
        } else {
            // The exit interrupted the delivery of `pending`: do what the
            // processor would have done with both.
            match decode_event(pending, self.vmcb.save.cr2) {
                Some(first) => match combine(first, event) {
                    Combined::Serial { now, later } => {
                        if later.is_some() {
                            self.deferred = later;
                            self.entry_work = true;
                        }
                        now
                    }
                    Combined::DoubleFault => Event::Exception {
                        vector: 8,
                        error_code: Some(0),
                    },
                    Combined::Shutdown => {
                        // What the processor does: the next run reports a
                        // shutdown instead of entering.
                        self.shutdown = true;
                        self.entry_work = true;
                        event
                    }
                },
                None => {
                    // A software interrupt: the processor re-delivers it by
                    // running the instruction again; the new event first.
                    event
                }
            }
        };
        if let Event::PageFault { address, .. } = event {
            // An injected #PF does not set CR2: the VMM does (APM 15.20).
            // VMRUN loads CR2 from the VMCB; Bochs 2.7 does not, so the
            // processor's CR2 is set too before that entry.
            self.vmcb.save.cr2 = address;
            self.pending_cr2 = Some(address);
            self.entry_work = true;
        }
        self.vmcb.control.event_inj = encode_event(event);
    }

    fn run(&mut self) -> Exit {
        self.run_then(|_, exit| exit)
    }

    /// The exit path (docs/performance.md): inlined into the core's exit
    /// loop, with the world switch; CPUID and VMMCALL reach their handlers
    /// without a neutral exit being assembled.
    #[inline(always)]
    fn run_then<R>(&mut self, handle: impl FnOnce(&mut Self, Exit) -> R) -> R {
        loop {
            if let Some(exit) = self.before_entry() {
                return handle(self, exit);
            }
            // SAFETY: the VMCB and host save area are this vCPU's own pages
            // (constructor contract) and SVM is enabled on this processor.
            unsafe { world_switch(&mut self.switch) };
            if !self.after_exit() {
                continue;
            }
            match self.vmcb.control.exit_code {
                exit_code::CPUID => {
                    self.exit_insn_len = CPUID_LEN;
                    return handle(self, Exit::Cpuid);
                }
                exit_code::VMMCALL => {
                    self.exit_insn_len = VMMCALL_LEN;
                    return handle(self, Exit::VmmCall);
                }
                _ => {
                    if let Some(exit) = self.decode_exit() {
                        return handle(self, exit);
                    }
                }
            }
        }
    }
}

impl<M: GuestPhysMemory> SvmVcpu<M> {
    /// What must happen before VMRUN: the next event, a TLB flush the
    /// nested tables need, CR2 for an injected #PF. Everything but the
    /// loads of two counters other processors change is behind one test
    /// of state only this vCPU sets.
    #[inline(always)]
    fn before_entry(&mut self) -> Option<Exit> {
        if self.entry_work {
            if let Some(exit) = self.entry_work() {
                return Some(exit);
            }
        }
        if let Some(exit) = self.pick_next_event() {
            return Some(exit);
        }
        let (generation, seen) = &mut self.nested_gen;
        let now = generation.load(Ordering::Acquire);
        if now != *seen {
            *seen = now;
            self.vmcb.control.tlb_control = tlb_control::FLUSH_ALL;
        }
        None
    }

    /// The entry path's rare work ([`SvmVcpu::entry_work`]).
    #[cold]
    #[inline(never)]
    fn entry_work(&mut self) -> Option<Exit> {
        if self.shutdown {
            return Some(Exit::Shutdown);
        }
        // An NMI the host caught waits behind a deferred event; the one in
        // EVENTINJ (an interrupted delivery) goes first.
        if self.deferred.is_some() && self.vmcb.control.event_inj & event_inj::VALID == 0 {
            if let Some(event) = self.deferred.take() {
                self.vmcb.control.event_inj = encode_event(event);
            }
        }
        if let Some(cr2) = self.pending_cr2.take() {
            // SAFETY: CR2 only records page-fault addresses; the
            // hypervisor takes no page faults before VMRUN.
            unsafe {
                core::arch::asm!("mov cr2, {}", in(reg) cr2, options(nostack, preserves_flags))
            };
        }
        if self.efer_undo.is_some() {
            // After an emulated EFER write the entry may fail: keep the
            // guest state to go back to (after_exit).
            self.before_efer_write = Some(self.vmcb.save);
        }
        self.entry_work = self.deferred.is_some() || self.efer_undo.is_some();
        None
    }

    /// What #VMEXIT leaves to do before the exit is handled; false when
    /// the entry failed in a way the backend settled (a refused EFER) and
    /// the guest can be entered again.
    #[inline(always)]
    fn after_exit(&mut self) -> bool {
        // SMM inside the guest may have returned with the firmware's
        // EFER, SVME clear (SeaBIOS loads its saved 32-bit context);
        // the next VMRUN needs it set, and the guest never sees it.
        self.vmcb.save.efer |= EFER_SVME;
        if self.efer_undo.is_some() && self.undo_refused_efer().is_none() {
            return false;
        }
        let c = &mut self.vmcb.control;
        self.stats.record(exit_slot(c.exit_code));
        c.tlb_control = tlb_control::DO_NOTHING;
        // An event whose delivery the exit interrupted is delivered again
        // on the next entry (APM 15.7.2); anything injected is consumed.
        let interrupted = c.exit_int_info;
        c.event_inj = if interrupted & event_inj::VALID != 0 {
            interrupted
        } else {
            0
        };
        true
    }

    /// The entry after an emulated EFER write: None when VMRUN refused the
    /// new EFER and the guest must be entered again (with #GP).
    #[cold]
    #[inline(never)]
    fn undo_refused_efer(&mut self) -> Option<()> {
        let (Some((old, rip)), Some(before)) =
            (self.efer_undo.take(), self.before_efer_write.take())
        else {
            return Some(());
        };
        let code = self.vmcb.control.exit_code;
        if code != exit_code::INVALID && code != u64::from(u32::MAX) {
            return Some(());
        }
        // The guest's EFER write set a bit CPUID offers but this
        // processor refuses (Bochs' ryzen model reports TCE yet rejects
        // EFER.TCE): the write raises #GP, as on that processor, and the
        // bit stays refused. The hostile test guest found that VMRUN
        // failed instead and took the whole machine down. (Bochs then
        // leaves the host's state in the save area: restore ours.)
        self.vmcb.save = before;
        let s = &mut self.vmcb.save;
        let refused = efer::refused_by_vmrun(old, s.efer);
        log::warn!(
            "VMRUN refused the guest's EFER {:#x}: bits {refused:#x} raise #GP from now on",
            s.efer
        );
        self.efer_writable &= !refused;
        s.efer = old;
        s.rip = rip;
        self.vmcb.control.event_inj = 0;
        self.inject(Event::GP0);
        None
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::boxed::Box;
    use thinvisor_vmm::{MsrState, ResumedState};

    fn zeroed_save_area() -> vmcb::StateSaveArea {
        // SAFETY: the save area is integers only; all zeros is a valid
        // (if empty) value, as in a fresh VMCB page.
        unsafe { core::mem::zeroed() }
    }

    /// The state thinvisor.efi hands over under OVMF: CS 0x38 64-bit
    /// code, SS and DS 0x30, no TSS, no LDT.
    fn uefi() -> InitialState {
        let data = SegmentState {
            selector: 0x30,
            base: 0,
            limit: 0xFFFF_FFFF,
            access: 0xC093,
        };
        let mut segments = [data; 8];
        segments[Seg::Cs as usize] = SegmentState {
            selector: 0x38,
            access: 0xA09B,
            ..data
        };
        segments[Seg::Tr as usize] = SegmentState::no_tss();
        segments[Seg::Ldtr as usize] = SegmentState::unusable(0, 0);
        segments[Seg::Gs as usize].base = 0xFFFF_8000_1234_0000;
        let state = ResumedState {
            rip: 0x7E5A_1234,
            rflags: 0x246,
            cr0: 0x8001_0033,
            cr3: 0x7FC0_1000,
            cr4: 0x668,
            efer: 0xD00,
            dr7: 0x400,
            gdt: (0x7F9D_C000, 0x47),
            idt: (0x7F1A_0018, 0xFFF),
            segments,
            msrs: MsrState {
                pat: 0x0007_0406_0007_0406,
                kernel_gs_base: 0xFFFF_8000_0000_2000,
                star: 0x0023_0010_0000_0000,
                lstar: 0xFFFF_FFFF_8100_0000,
                cstar: 0xFFFF_FFFF_8100_0100,
                sfmask: 0x4_7700,
                sysenter_cs: 0x10,
                sysenter_esp: 0xFFFF_8000_0000_3000,
                sysenter_eip: 0xFFFF_FFFF_8100_0200,
            },
        };
        let mut gprs = [0; 16];
        gprs[Gpr::Rax as usize] = 0xAA;
        gprs[Gpr::Rsp as usize] = 0x7FF8_0F28;
        InitialState::resumed(Box::leak(Box::new(state)), gprs)
    }

    #[test]
    fn a_resumed_state_fills_the_whole_save_area() {
        let mut s = zeroed_save_area();
        load_initial(&mut s, &uefi(), false);
        assert_eq!(s.efer, 0xD00 | EFER_SVME);
        assert_eq!((s.cr0, s.cr3, s.cr4), (0x8001_0033, 0x7FC0_1000, 0x668));
        assert_eq!(
            (s.rip, s.rsp, s.rax, s.rflags),
            (0x7E5A_1234, 0x7FF8_0F28, 0xAA, 0x246)
        );
        assert_eq!((s.cs.selector, s.cs.attrib), (0x38, 0xA9B));
        assert!(s.cs.long());
        assert_eq!((s.ss.selector, s.ss.attrib, s.cpl), (0x30, 0xC93, 0));
        assert_eq!(s.gs.base, 0xFFFF_8000_1234_0000);
        assert_eq!((s.tr.attrib, s.tr.limit), (0x8B, 0x67));
        assert_eq!(s.ldtr.attrib & 0x80, 0);
        assert_eq!((s.gdtr.base, s.gdtr.limit), (0x7F9D_C000, 0x47));
        assert_eq!((s.idtr.base, s.idtr.limit), (0x7F1A_0018, 0xFFF));
        assert_eq!(s.lstar, 0xFFFF_FFFF_8100_0000);
        assert_eq!(s.kernel_gs_base, 0xFFFF_8000_0000_2000);
        assert_eq!(
            (s.star, s.cstar, s.sfmask),
            (0x0023_0010_0000_0000, 0xFFFF_FFFF_8100_0100, 0x4_7700)
        );
        assert_eq!(
            (s.sysenter_cs, s.sysenter_eip),
            (0x10, 0xFFFF_FFFF_8100_0200)
        );
        assert_eq!(s.g_pat, 0x0007_0406_0007_0406);
    }

    #[test]
    fn init_keeps_the_msrs_power_on_sets_them() {
        let mut s = zeroed_save_area();
        s.lstar = 0x1234;
        s.g_pat = 0x0606_0606_0606_0606;
        load_initial(&mut s, &InitialState::sipi(0x10), false);
        assert_eq!((s.lstar, s.g_pat), (0x1234, 0x0606_0606_0606_0606));
        assert_eq!((s.cs.selector, s.cs.base, s.rip), (0x1000, 0x1_0000, 0));
        assert_eq!((s.efer, s.cr3, s.cpl, s.dr7), (EFER_SVME, 0, 0, 0x400));
        assert_eq!(s.tr.attrib, 0x8B);
        load_initial(&mut s, &InitialState::multiboot(0x10_0000, 0, 0), true);
        assert_eq!((s.lstar, s.g_pat), (0, 0x0007_0406_0007_0406));
        assert_eq!(s.cs.attrib, 0xC9B);
        assert_eq!(s.idtr.limit, 0x3FF);
    }
}

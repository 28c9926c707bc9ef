//! The seam between the core and a vendor backend.

use thinvisor_memory::{GuestLinearAddr, GuestPhysAddr, GuestPhysMemory, PagingRegs};

/// A general-purpose register of the guest, numbered as in instruction
/// encodings (Intel SDM vol. 2, table 2-2).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Gpr {
    Rax,
    Rcx,
    Rdx,
    Rbx,
    Rsp,
    Rbp,
    Rsi,
    Rdi,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
}

impl Gpr {
    /// Every register, in encoding order.
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];
}

/// The parts of the guest's execution mode that the core's decisions depend on.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CpuMode {
    /// Current privilege level, 0..=3.
    pub cpl: u8,
    /// 64-bit mode (EFER.LMA and CS.L): only then are all 64 bits of a
    /// register meaningful; elsewhere the ABI uses the low 32.
    pub long64: bool,
}

/// An event to deliver to the guest on the next entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Event {
    /// A hardware exception, with its error code when the vector has one.
    Exception { vector: u8, error_code: Option<u32> },
    /// A page fault (vector 14): the backend sets the guest's CR2 to
    /// `address` as the processor would (Intel SDM vol. 3A, 6.15).
    PageFault { error_code: u32, address: u64 },
    /// A non-maskable interrupt (vector 2), e.g. one the host caught while
    /// it ran on the guest's behalf.
    Nmi,
    /// An external interrupt with this vector.
    ExternalInterrupt { vector: u8 },
}

impl Event {
    /// Invalid opcode, #UD (vector 6).
    pub const UD: Event = Event::Exception {
        vector: 6,
        error_code: None,
    };
    /// General protection with error code 0, #GP(0) (vector 13).
    pub const GP0: Event = Event::Exception {
        vector: 13,
        error_code: Some(0),
    };
}

/// Why the guest exited, in vendor-neutral terms.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Exit {
    /// VMCALL or VMMCALL: a call into the VMM (docs/vmm-call.md).
    VmmCall,
    /// CPUID.
    Cpuid,
    /// HLT.
    Hlt,
    /// The guest shut down (triple fault).
    Shutdown,
    /// A guest-physical access the nested/extended page tables do not allow.
    NestedPageFault(NestedFault),
    /// RDMSR or WRMSR of an MSR the backend intercepts: only MSRs the
    /// guest must not reach (the virtualization extension's own) are.
    Msr { msr: u32, write: bool },
    /// #UD that is not the other vendor's VMM-call instruction (the
    /// backend checks that first): the guest gets its #UD back.
    InvalidOpcode,
    /// The guest executed a virtualization instruction (VMRUN, VMLOAD, ...)
    /// that it must not use: it sees #UD, as on a CPU without the feature.
    VirtualizationInstruction,
    /// IN or OUT to one of the few ports thinvisor intercepts (those that
    /// end or reset the machine, so it can report before they act).
    Io {
        port: u16,
        size: u8,
        input: bool,
        string: bool,
    },
    /// An INIT signal reached the processor (VT-x exits on it; SVM's
    /// backend learns of it from the sender's ICR write).
    Init,
    /// A startup IPI with this vector reached a processor waiting for one.
    Sipi { vector: u8 },
    /// The processor refused to enter the guest; `code` is the backend's raw
    /// reason.
    EntryFailed { code: u64 },
    /// An exit the backend cannot translate; `code` is its raw exit code.
    Unknown { code: u64 },
}

/// A guest-physical access that the nested/extended page tables refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct NestedFault {
    pub gpa: GuestPhysAddr,
    pub write: bool,
    pub fetch: bool,
    /// The guest-linear address being translated, when the processor
    /// reports it (VT-x does, SVM does not).
    pub linear: Option<GuestLinearAddr>,
    /// The access was to the guest's own paging structures during its page
    /// walk, not to the final page (SVM EXITINFO1 bit 33, APM vol. 2,
    /// 15.25.6; VT-x exit qualification bits 7 and 8, SDM vol. 3C, table
    /// 28-7): no instruction's store to emulate.
    pub in_page_walk: bool,
}

/// One virtual processor, as the core sees it.
///
/// Every method is cheap: backends keep the guest's registers in memory
/// (their world-switch area or VMCB/VMCS) and answer from there.
pub trait Vcpu {
    /// Read a general-purpose register.
    fn gpr(&self, reg: Gpr) -> u64;
    /// Write a general-purpose register.
    fn set_gpr(&mut self, reg: Gpr, value: u64);
    /// The guest's instruction pointer.
    fn rip(&self) -> u64;
    /// The linear address of the current instruction: CS.base + RIP.
    fn rip_linear(&self) -> u64;
    /// CR0, CR3, CR4 and EFER: what guest-linear translation needs.
    fn paging(&self) -> PagingRegs;
    /// CR3 alone (a backend whose fields cost a read each answers it with
    /// one).
    fn cr3(&self) -> u64 {
        self.paging().cr3
    }
    /// CR4 alone (for CPUID's OS bits), as [`cr3`](Self::cr3).
    fn cr4(&self) -> u64 {
        self.paging().cr4
    }
    /// Privilege and operating mode.
    fn mode(&self) -> CpuMode;
    /// The guest's physical memory: the VM's one memory object, shared
    /// with its other vCPUs, so reads and writes both go through `&self`
    /// (see [`GuestPhysMemory`]).
    fn memory(&self) -> &dyn GuestPhysMemory;
    /// Advance RIP past the instruction that caused the current exit.
    fn skip_instruction(&mut self);
    /// The code segment's access rights in [`crate::SegmentState`]'s layout
    /// (L is bit 13, D/B bit 14): which size instructions decode in.
    fn cs_access(&self) -> u16;
    /// The guest's RFLAGS.
    fn rflags(&self) -> u64;
    /// Set RIP to `next_rip` after an instruction the core emulated,
    /// ending an STI/MOV SS interrupt shadow as its retirement would.
    fn complete_instruction(&mut self, next_rip: u64);
    /// Deliver `event` to the guest on the next entry. An event the
    /// processor was delivering when the exit happened is never lost: the
    /// backend combines the two as the processor would
    /// ([`crate::events::combine`]) or delivers the other one later.
    fn inject(&mut self, event: Event);
    /// Enter the guest and run it until the next exit.
    fn run(&mut self) -> Exit;
    /// [`run`](Self::run), then `handle` the exit. Backends override it to
    /// call `handle` where they recognise each frequent kind of exit, with
    /// that kind as a constant: the core's dispatch then folds to one
    /// handler there, and no exit value is assembled on the hot path
    /// (docs/performance.md, "The exit path").
    #[inline(always)]
    fn run_then<R>(&mut self, handle: impl FnOnce(&mut Self, Exit) -> R) -> R
    where
        Self: Sized,
    {
        let exit = self.run();
        handle(self, exit)
    }
    /// Put the processor in `initial`, as a SIPI does after INIT (Intel SDM
    /// vol. 3A, 9.1.1 and 9.4.4.1). Backends that cannot are left as they
    /// are.
    fn reset(&mut self, _initial: &crate::InitialState) {}
    /// INIT: stop executing and wait for a SIPI.
    fn wait_for_sipi(&mut self) {}
    /// Exits counted so far, by the backend's own reasons (None: the
    /// backend does not count).
    fn exit_stats(&self) -> Option<&crate::stats::ExitStats> {
        None
    }
    /// Names the [`exit_stats`](Self::exit_stats) slots.
    fn exit_names(&self) -> fn(usize) -> &'static str {
        |_| "?"
    }
}

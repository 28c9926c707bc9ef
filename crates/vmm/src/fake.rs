//! A [`Vcpu`] with no processor behind it, for tests and fuzzing of the
//! core (feature `test-util`): every register, the CPU mode, the paging
//! registers and the guest memory are plain fields the harness sets, and
//! what the core did (events injected, instructions skipped) is recorded
//! for it to check. The fuzz targets in `fuzz/` drive the VMM-call
//! dispatcher and the services through it with hostile values in all of
//! these.

use crate::stats::ExitStats;
use crate::vcpu::{CpuMode, Event, Exit, Gpr, Vcpu};
use thinvisor_memory::{GuestPhysMemory, PagingRegs};

/// A vCPU made of fields. The instruction skipped is always 3 bytes long,
/// the length of VMCALL and VMMCALL.
pub struct FakeVcpu<'m> {
    /// RAX..R15, in encoding order.
    pub regs: [u64; 16],
    pub rip: u64,
    /// CS.base: `rip_linear` is `cs_base + rip`.
    pub cs_base: u64,
    pub mode: CpuMode,
    pub paging: PagingRegs,
    pub cs_access: u16,
    pub rflags: u64,
    /// The guest's memory, shared like the VM's.
    pub memory: &'m dyn GuestPhysMemory,
    /// The exit and call counts `exit_stats` reports, if any.
    pub stats: Option<&'m ExitStats>,
    /// Events injected since the harness last cleared this, in order
    /// (the last few; older ones are dropped).
    pub injected: [Option<Event>; 4],
    /// Instructions skipped (by `skip_instruction`).
    pub skipped: u32,
    /// Times `run` was called; it returns HLT.
    pub runs: u32,
}

impl<'m> FakeVcpu<'m> {
    /// A vCPU in 64-bit mode at CPL 0 with paging off, every register 0,
    /// RIP 0x1000, over `memory`.
    pub fn new(memory: &'m dyn GuestPhysMemory) -> Self {
        Self {
            regs: [0; 16],
            rip: 0x1000,
            cs_base: 0,
            mode: CpuMode {
                cpl: 0,
                long64: true,
            },
            paging: PagingRegs::default(),
            // 64-bit code (L), present, DPL 0.
            cs_access: 0xA09B,
            rflags: 0x2,
            memory,
            stats: None,
            injected: [None; 4],
            skipped: 0,
            runs: 0,
        }
    }

    /// The last event injected, if any.
    pub fn last_injected(&self) -> Option<Event> {
        self.injected.iter().rev().find_map(|e| *e)
    }

    /// Forgets the events injected and the instructions skipped.
    pub fn clear_record(&mut self) {
        self.injected = [None; 4];
        self.skipped = 0;
    }
}

impl Vcpu for FakeVcpu<'_> {
    fn gpr(&self, reg: Gpr) -> u64 {
        self.regs[reg as usize]
    }
    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        self.regs[reg as usize] = value;
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn rip_linear(&self) -> u64 {
        self.cs_base.wrapping_add(self.rip)
    }
    fn paging(&self) -> PagingRegs {
        self.paging
    }
    fn mode(&self) -> CpuMode {
        self.mode
    }
    fn memory(&self) -> &dyn GuestPhysMemory {
        self.memory
    }
    fn skip_instruction(&mut self) {
        self.skipped += 1;
        self.rip = self.rip.wrapping_add(3);
    }
    fn cs_access(&self) -> u16 {
        self.cs_access
    }
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn complete_instruction(&mut self, next_rip: u64) {
        self.rip = next_rip;
    }
    fn inject(&mut self, event: Event) {
        self.injected.rotate_left(1);
        self.injected[3] = Some(event);
    }
    fn run(&mut self) -> Exit {
        self.runs += 1;
        Exit::Hlt
    }
    fn exit_stats(&self) -> Option<&ExitStats> {
        self.stats
    }
}

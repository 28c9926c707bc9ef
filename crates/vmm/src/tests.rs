//! Host tests of the core against a fake vCPU.

extern crate std;
use std::vec;

use crate::cpuid::{CpuidPolicy, CpuidResult};
use crate::vcpu::{CpuMode, Event, Exit, Gpr, NestedFault, Vcpu};
use crate::{handle_exit, Action, StopReason, Vmm};
use thinvisor_abi::{dbgsh, names, NO_FUNCTION};
use thinvisor_memory::{GuestPhysAddr, GuestPhysMemory, PagingRegs, SliceMemory};

/// A vCPU with 1 MiB of guest RAM, paging off, in 64-bit mode unless told.
struct FakeVcpu {
    regs: [u64; 16],
    rip: u64,
    mode: CpuMode,
    paging: PagingRegs,
    mem: SliceMemory<'static>,
    injected: Option<Event>,
    skipped: u32,
}

const RAM: usize = 1 << 20;

impl FakeVcpu {
    fn new() -> Self {
        Self {
            regs: [0; 16],
            rip: 0x1000,
            mode: CpuMode {
                cpl: 0,
                long64: true,
            },
            paging: PagingRegs::default(),
            mem: SliceMemory::new(vec![0u8; RAM].leak()),
            injected: None,
            skipped: 0,
        }
    }

    fn put(&mut self, gpa: u64, bytes: &[u8]) {
        self.mem.write_phys(GuestPhysAddr::new(gpa), bytes).unwrap();
    }
}

impl Vcpu for FakeVcpu {
    fn gpr(&self, reg: Gpr) -> u64 {
        self.regs[reg as usize]
    }
    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        self.regs[reg as usize] = value;
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn paging(&self) -> PagingRegs {
        self.paging
    }
    fn mode(&self) -> CpuMode {
        self.mode
    }
    fn memory(&self) -> &dyn GuestPhysMemory {
        &self.mem
    }
    fn memory_mut(&mut self) -> &mut dyn GuestPhysMemory {
        &mut self.mem
    }
    fn skip_instruction(&mut self) {
        self.skipped += 1;
        self.rip += 3;
    }
    fn inject(&mut self, event: Event) {
        self.injected = Some(event);
    }
    fn run(&mut self) -> Exit {
        Exit::Hlt
    }
}

fn fake_cpuid(leaf: u32, _: u32) -> CpuidResult {
    CpuidResult {
        eax: leaf,
        ebx: 0x11,
        ecx: 0x22,
        edx: 0x33,
    }
}

fn vmm() -> Vmm {
    Vmm::new(CpuidPolicy::new(fake_cpuid))
}

/// Make a VMM call with `rax`/`rbx` and return the vCPU after it.
fn call(vmm: &mut Vmm, vcpu: &mut FakeVcpu, rax: u64, rbx: u64) -> u64 {
    vcpu.set_gpr(Gpr::Rax, rax);
    vcpu.set_gpr(Gpr::Rbx, rbx);
    assert_eq!(handle_exit(vmm, vcpu, Exit::VmmCall), Action::Resume);
    vcpu.gpr(Gpr::Rax)
}

fn lookup(vmm: &mut Vmm, vcpu: &mut FakeVcpu, name: &[u8]) -> u64 {
    vcpu.put(0x8000, name);
    call(vmm, vcpu, 0, 0x8000)
}

#[test]
fn standard_names_have_fixed_numbers() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    assert_eq!(lookup(&mut vmm, &mut vcpu, b"dbgsh\0"), 1);
    assert_eq!(lookup(&mut vmm, &mut vcpu, b"log_set_buf\0"), 2);
    assert_eq!(vmm.registry.name(1), Some(names::DBGSH));
}

#[test]
fn unknown_empty_and_bitvisor_only_names_give_zero() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    for name in [
        &b"nosuch\0"[..],
        b"\0",
        b"get_vmmcall_number\0",
        b"boot\0",
        b"DBGSH\0",
        b"dbgsh \0",
    ] {
        assert_eq!(lookup(&mut vmm, &mut vcpu, name), NO_FUNCTION, "{name:?}");
    }
}

#[test]
fn overlong_names_give_zero() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    let mut long = vec![b'a'; 300];
    long.push(0);
    assert_eq!(lookup(&mut vmm, &mut vcpu, &long), NO_FUNCTION);
    let mut prefixed = b"dbgsh".to_vec();
    prefixed.extend_from_slice(&[b'x'; 300]);
    prefixed.push(0);
    assert_eq!(lookup(&mut vmm, &mut vcpu, &prefixed), NO_FUNCTION);
}

#[test]
fn unreadable_name_gives_zero() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    assert_eq!(
        call(&mut vmm, &mut vcpu, 0, RAM as u64 + 0x1000),
        NO_FUNCTION
    );
    // The last bytes of RAM without a NUL: the read runs off the end.
    vcpu.put(RAM as u64 - 3, b"dbg");
    assert_eq!(call(&mut vmm, &mut vcpu, 0, RAM as u64 - 3), NO_FUNCTION);
    // A name ending exactly at the end of RAM is fine.
    vcpu.put(RAM as u64 - 6, b"dbgsh\0");
    assert_eq!(call(&mut vmm, &mut vcpu, 0, RAM as u64 - 6), 1);
}

#[test]
fn function_number_uses_all_64_bits_only_in_64_bit_mode() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    vcpu.put(0x8000, b"dbgsh\0");
    assert_eq!(call(&mut vmm, &mut vcpu, 1 << 32, 0x8000), NO_FUNCTION);
    vcpu.mode.long64 = false;
    assert_eq!(call(&mut vmm, &mut vcpu, 1 << 32, 0x8000), 1);
    // Outside 64-bit mode the name's address is 32 bits, too.
    assert_eq!(call(&mut vmm, &mut vcpu, 0, 0xFFFF_FFFF_0000_8000), 1);
}

#[test]
fn unregistered_numbers_give_zero() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    for n in [3, 31, 32, 33, 0x7FFF_FFFF, u64::MAX] {
        assert_eq!(call(&mut vmm, &mut vcpu, n, 0), NO_FUNCTION, "{n:#x}");
    }
}

#[test]
fn calls_preserve_other_registers_and_step_over_the_instruction() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    vcpu.put(0x8000, b"dbgsh\0");
    for (i, r) in vcpu.regs.iter_mut().enumerate() {
        *r = 0x1111_0000 + i as u64;
    }
    vcpu.set_gpr(Gpr::Rbx, 0x8000);
    let before = vcpu.regs;
    let rip = vcpu.rip;
    let n = call(&mut vmm, &mut vcpu, 0, 0x8000);
    assert_eq!(n, 1);
    assert_eq!(vcpu.rip, rip + 3);
    assert_eq!(vcpu.regs[1..], before[1..]);
    vcpu.set_gpr(Gpr::Rbx, dbgsh::NOTHING);
    let before = vcpu.regs;
    assert_eq!(call(&mut vmm, &mut vcpu, n, dbgsh::NOTHING), dbgsh::NOTHING);
    assert_eq!(vcpu.regs[1..], before[1..]);
}

#[test]
fn log_set_buf_is_cpl0_only() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    vcpu.set_gpr(Gpr::Rcx, 4096);
    vcpu.mode.cpl = 3;
    call(&mut vmm, &mut vcpu, 2, 0x5000);
    assert_eq!(vmm.services.log_buf, None);
    vcpu.mode.cpl = 0;
    call(&mut vmm, &mut vcpu, 2, 0x5000);
    assert_eq!(vmm.services.log_buf, Some((0x5000, 4096)));
    call(&mut vmm, &mut vcpu, 2, 0);
    assert_eq!(vmm.services.log_buf, None);
}

#[test]
fn registry_refuses_bad_registrations() {
    use crate::vmmcall::{RegisterError, Registry, MAX_FUNCTIONS};
    fn nop(_: &mut crate::CallContext<'_>) {}
    let mut r = Registry::new();
    assert_eq!(r.register("", nop), Err(RegisterError::BadName));
    assert_eq!(r.register("a\0b", nop), Err(RegisterError::BadName));
    assert_eq!(r.register("a", nop), Ok(1));
    assert_eq!(r.register("a", nop), Err(RegisterError::Duplicate));
    const NAMES: [&str; 40] = [
        "n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9", "n10", "n11", "n12", "n13",
        "n14", "n15", "n16", "n17", "n18", "n19", "n20", "n21", "n22", "n23", "n24", "n25", "n26",
        "n27", "n28", "n29", "n30", "n31", "n32", "n33", "n34", "n35", "n36", "n37", "n38", "n39",
    ];
    let ok = NAMES.iter().filter(|n| r.register(n, nop).is_ok()).count();
    assert_eq!(ok, MAX_FUNCTIONS - 1);
    assert_eq!(r.iter().count(), MAX_FUNCTIONS);
}

#[test]
fn cpuid_exit_writes_zero_extended_results() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    vcpu.set_gpr(Gpr::Rax, 0xFFFF_FFFF_0000_0007);
    vcpu.set_gpr(Gpr::Rbx, u64::MAX);
    assert_eq!(
        handle_exit(&mut vmm, &mut vcpu, Exit::Cpuid),
        Action::Resume
    );
    assert_eq!(vcpu.gpr(Gpr::Rax), 7);
    assert_eq!(vcpu.gpr(Gpr::Rbx), 0x11);
    assert_eq!(vcpu.skipped, 1);
}

#[test]
fn terminal_exits_stop_the_guest() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    assert_eq!(
        handle_exit(&mut vmm, &mut vcpu, Exit::Hlt),
        Action::Stop(StopReason::Halted { rip: 0x1000 })
    );
    assert_eq!(
        handle_exit(&mut vmm, &mut vcpu, Exit::Shutdown),
        Action::Stop(StopReason::Shutdown { rip: 0x1000 })
    );
    let fault = NestedFault {
        gpa: GuestPhysAddr::new(0xE000_0000),
        write: false,
        fetch: false,
        linear: None,
    };
    assert_eq!(
        handle_exit(&mut vmm, &mut vcpu, Exit::NestedPageFault(fault)),
        Action::Stop(StopReason::BadMemory { fault, rip: 0x1000 })
    );
    assert_eq!(
        crate::run_guest(&mut vmm, &mut vcpu),
        StopReason::Halted { rip: 0x1000 }
    );
}

#[test]
fn protected_msrs_raise_gp_without_stepping() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    let exit = Exit::Msr {
        msr: 0xC001_0117,
        write: true,
    };
    assert_eq!(handle_exit(&mut vmm, &mut vcpu, exit), Action::Resume);
    assert_eq!(vcpu.injected, Some(Event::GP0));
    assert_eq!(vcpu.skipped, 0);
}

#[test]
fn virtualization_instructions_raise_ud() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    assert_eq!(
        handle_exit(&mut vmm, &mut vcpu, Exit::VirtualizationInstruction),
        Action::Resume
    );
    assert_eq!(vcpu.injected, Some(Event::UD));
    assert_eq!(vcpu.skipped, 0);
}

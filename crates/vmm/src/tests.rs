//! Host tests of the core against a fake vCPU.

extern crate std;
use std::vec;

use crate::cpuid::{CpuidPolicy, CpuidResult};
use crate::guest_log::{Registered, MAX_SIZE, MIN_SIZE};
use crate::log_ring::LogRing;
use crate::services::{VmmLog, LOG_READ_REFUSED, LOG_SET_BUF_REFUSED};
use crate::vcpu::{CpuMode, Event, Exit, Gpr, NestedFault, Vcpu};
use crate::vmmcall::{FAULTS_UNRESOLVED, MAX_FAULTS_PER_PAGE};
use crate::{handle_exit, Action, StopReason, Vm, Vmm};
use thinvisor_abi::{dbgsh, names, NO_FUNCTION};
use thinvisor_memory::{GuestPhysAddr, GuestPhysMemory, IsolatedMemory, PagingRegs};

/// A vCPU with 1 MiB of guest RAM, paging off, in 64-bit mode unless told.
struct FakeVcpu {
    regs: [u64; 16],
    rip: u64,
    mode: CpuMode,
    paging: PagingRegs,
    /// Shared, as the VM's memory is between its vCPUs.
    mem: &'static IsolatedMemory<'static>,
    injected: Option<Event>,
    skipped: u32,
    /// A log that every guest-memory access writes a line of this many
    /// bytes to, as a log message on the walk would; the access panics
    /// if the lock is held (with a spin lock that is a deadlock).
    log_on_access: Option<(&'static VmmLog, usize)>,
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
            mem: std::boxed::Box::leak(std::boxed::Box::new(IsolatedMemory::new(
                vec![0u8; RAM].leak(),
            ))),
            injected: None,
            skipped: 0,
            log_on_access: None,
        }
    }

    /// Writes the line `log_on_access` asks for.
    fn log_access(&self) {
        if let Some((log, len)) = self.log_on_access {
            let Some(mut ring) = log.try_lock() else {
                panic!("guest memory accessed with the log locked: a log line here deadlocks");
            };
            ring.push(&std::vec![b'-'; len]);
        }
    }

    fn put(&self, gpa: u64, bytes: &[u8]) {
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
    fn rip_linear(&self) -> u64 {
        self.rip
    }
    fn paging(&self) -> PagingRegs {
        self.paging
    }
    fn mode(&self) -> CpuMode {
        self.mode
    }
    fn memory(&self) -> &dyn GuestPhysMemory {
        self.log_access();
        self.mem
    }
    fn skip_instruction(&mut self) {
        self.skipped += 1;
        self.rip += 3;
    }
    fn cs_access(&self) -> u16 {
        // 64-bit code (L).
        0xA09B
    }
    fn rflags(&self) -> u64 {
        0x2
    }
    fn complete_instruction(&mut self, next_rip: u64) {
        self.rip = next_rip;
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

fn vmm() -> Vmm<'static> {
    let vm = std::boxed::Box::leak(std::boxed::Box::new(Vm::new(
        CpuidPolicy::new(fake_cpuid),
        new_log(),
    )));
    Vmm::new(vm)
}

fn new_log() -> &'static VmmLog {
    std::boxed::Box::leak(std::boxed::Box::new(spin::Mutex::new(LogRing::new())))
}

/// Make a VMM call with `rax`/`rbx` and return the vCPU after it.
fn call(vmm: &mut Vmm<'_>, vcpu: &mut FakeVcpu, rax: u64, rbx: u64) -> u64 {
    vcpu.set_gpr(Gpr::Rax, rax);
    vcpu.set_gpr(Gpr::Rbx, rbx);
    assert_eq!(handle_exit(vmm, vcpu, Exit::VmmCall), Action::Resume);
    vcpu.gpr(Gpr::Rax)
}

fn lookup(vmm: &mut Vmm<'_>, vcpu: &mut FakeVcpu, name: &[u8]) -> u64 {
    vcpu.put(0x8000, name);
    call(vmm, vcpu, 0, 0x8000)
}

#[test]
fn standard_names_have_fixed_numbers() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    assert_eq!(lookup(&mut vmm, &mut vcpu, b"dbgsh\0"), 1);
    assert_eq!(lookup(&mut vmm, &mut vcpu, b"log_set_buf\0"), 2);
    assert_eq!(vmm.vm.registry.name(1), Some(names::DBGSH));
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
    // The shell's banner is pending from the first poll on.
    let banner = u64::from(crate::dbgsh::BANNER.as_bytes()[0]);
    assert_eq!(call(&mut vmm, &mut vcpu, n, dbgsh::NOTHING), banner);
    assert_eq!(vcpu.regs[1..], before[1..]);
}

#[test]
fn log_set_buf_is_cpl0_only() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    vcpu.set_gpr(Gpr::Rcx, 4096);
    vcpu.mode.cpl = 3;
    vcpu.set_gpr(Gpr::Rbx, 0x5000);
    let before = vcpu.regs;
    call(&mut vmm, &mut vcpu, 2, 0x5000);
    assert_eq!(vcpu.regs[1..], before[1..]);
    assert_eq!(vcpu.gpr(Gpr::Rax), 2, "RAX changed at CPL 3");
    assert_eq!(vmm.vm.services.guest_log.lock().status().buffer, None);
    vcpu.mode.cpl = 0;
    vcpu.put(0x5000, &[0xFF; 4]);
    assert_eq!(call(&mut vmm, &mut vcpu, 2, 0x5000), 0);
    assert_eq!(
        vmm.vm.services.guest_log.lock().status().buffer,
        Some(Registered {
            gpa: 0x5000,
            size: 4096
        })
    );
    // The counter starts at 0.
    assert_eq!(guest_bytes(&vcpu, 0x5000, 4), [0; 4]);
    // CPL 3 cannot unregister either.
    vcpu.mode.cpl = 3;
    call(&mut vmm, &mut vcpu, 2, 0);
    assert!(vmm.vm.services.guest_log.lock().status().buffer.is_some());
    vcpu.mode.cpl = 0;
    assert_eq!(call(&mut vmm, &mut vcpu, 2, 0), 0);
    assert_eq!(vmm.vm.services.guest_log.lock().status().buffer, None);
}

#[test]
fn log_set_buf_refuses_bad_buffers_and_keeps_the_registration() {
    let mut vmm = vmm();
    let vm = vmm.vm;
    let mut vcpu = FakeVcpu::new();
    let mut set = |vcpu: &mut FakeVcpu, gpa: u64, size: u64| {
        vcpu.set_gpr(Gpr::Rcx, size);
        vcpu.set_gpr(Gpr::Rbx, gpa);
        let before = vcpu.regs;
        let rax = call(&mut vmm, vcpu, 2, gpa);
        assert_eq!(vcpu.regs[1..], before[1..], "log_set_buf({gpa:#x}, {size})");
        rax
    };
    assert_eq!(set(&mut vcpu, 0x5000, 0x1000), 0);
    for (gpa, size) in [
        (0x6000, 0),
        (0x6000, 7),
        (0x6000, MIN_SIZE - 1),
        (0x6000, MAX_SIZE + 1),
        (0x6000, u64::MAX),
        (0x6002, 0x1000),
        (0x6001, 0x1000),
        (RAM as u64 - 0x80, 0x100),
        (RAM as u64, 0x100),
        (!3, 0x100),
    ] {
        assert_eq!(
            set(&mut vcpu, gpa, size),
            LOG_SET_BUF_REFUSED,
            "{gpa:#x} {size}"
        );
    }
    assert_eq!(
        vm.services.guest_log.lock().status().buffer,
        Some(Registered {
            gpa: 0x5000,
            size: 0x1000
        })
    );
    // Outside 64-bit mode only the low 32 bits count.
    vcpu.mode.long64 = false;
    assert_eq!(set(&mut vcpu, 0xFFFF_FFFF_0000_7000, 0x1_0000_0100), 0);
    assert_eq!(
        vm.services.guest_log.lock().status().buffer,
        Some(Registered {
            gpa: 0x7000,
            size: 0x100
        })
    );
}

#[test]
fn log_set_buf_buffer_receives_the_log() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    vcpu.set_gpr(Gpr::Rcx, 0x100);
    assert_eq!(call(&mut vmm, &mut vcpu, 2, 0x5000), 0);
    // What the hypervisor's logging path does with every line.
    vmm.vm
        .services
        .guest_log
        .lock()
        .write(vcpu.mem, b"thinvisor: [INFO ] hello\n");
    assert_eq!(guest_bytes(&vcpu, 0x5000, 4), 25u32.to_le_bytes());
    assert_eq!(
        guest_bytes(&vcpu, 0x5004, 25),
        b"thinvisor: [INFO ] hello\n"
    );
}

#[test]
fn registry_refuses_bad_registrations() {
    use crate::vmmcall::{RegisterError, Registry, MAX_FUNCTIONS};
    fn nop(_: &mut crate::CallContext<'_>) -> crate::CallOutcome {
        crate::CallOutcome::Return
    }
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
fn registry_lookup_finds_exactly_the_registered_names() {
    use crate::vmmcall::{Registry, MAX_FUNCTIONS};
    fn nop(_: &mut crate::CallContext<'_>) -> crate::CallOutcome {
        crate::CallOutcome::Return
    }
    // Names sharing lengths, first and last bytes, prefixes; 1 to 255
    // bytes (every comparison size).
    let long = |n: usize, c: u8| -> &'static str {
        std::boxed::Box::leak(
            std::string::String::from_utf8(std::vec![c; n])
                .unwrap()
                .into_boxed_str(),
        )
    };
    let mut names: std::vec::Vec<&'static str> = std::vec![
        "dbgsh",
        "log_set_buf",
        "log_read",
        "d",
        "ab",
        "abc",
        "abcd",
        "abcdefg",
        "abcdefgh",
        "abcdefghi",
        "abcdefghijklmnop",
        "abcdefghijklmnopq",
        "dbgsi",
        "ebgsh",
    ];
    names.push(long(255, b'x'));
    names.push(long(17, b'y'));
    let mut r = Registry::new();
    for (i, name) in names.iter().enumerate() {
        assert_eq!(r.register(name, nop), Ok(i as u64 + 1), "{name}");
    }
    for (i, name) in names.iter().enumerate() {
        assert_eq!(r.lookup(name.as_bytes()), i as u64 + 1, "{name}");
    }
    // Near misses: one byte changed anywhere, one byte more or less.
    for name in &names {
        let b = name.as_bytes();
        for at in 0..b.len() {
            let mut other = b.to_vec();
            other[at] ^= 0x20;
            let want = names
                .iter()
                .position(|n| n.as_bytes() == other)
                .map_or(0, |i| i as u64 + 1);
            assert_eq!(r.lookup(&other), want, "{name} changed at {at}");
        }
        let shorter = &b[..b.len() - 1];
        let want = names
            .iter()
            .position(|n| n.as_bytes() == shorter)
            .map_or(0, |i| i as u64 + 1);
        assert_eq!(r.lookup(shorter), want);
        let mut longer = b.to_vec();
        longer.push(b'z');
        assert_eq!(r.lookup(&longer), 0);
    }
    assert_eq!(r.lookup(b""), 0);
    assert_eq!(r.lookup(&[0u8; 300]), 0);
    // A full registry still answers, found or not.
    let mut i = 0;
    while r.iter().count() < MAX_FUNCTIONS {
        let _ = r.register(long(3 + i, b'a' + (i % 26) as u8), nop);
        i += 1;
    }
    for (number, name) in r.iter() {
        assert_eq!(r.lookup(name.as_bytes()), number);
    }
    assert_eq!(r.lookup(b"missing"), 0);
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
fn cpuid_exit_reports_the_guests_osxsave() {
    // A host with XSAVE and CR4.OSXSAVE set (as thinvisor sets it on VT-x).
    fn host(leaf: u32, _: u32) -> CpuidResult {
        CpuidResult {
            ecx: if leaf == 1 { (1 << 26) | (1 << 27) } else { 0 },
            ..CpuidResult::default()
        }
    }
    let vm = std::boxed::Box::leak(std::boxed::Box::new(Vm::new(
        CpuidPolicy::new(host),
        new_log(),
    )));
    let mut vmm = Vmm::new(vm);
    let mut vcpu = FakeVcpu::new();
    for (cr4, osxsave) in [(0, 0), (1 << 18, 1 << 27), (!(1u64 << 18), 0)] {
        vcpu.paging.cr4 = cr4;
        vcpu.set_gpr(Gpr::Rax, 1);
        handle_exit(&mut vmm, &mut vcpu, Exit::Cpuid);
        assert_eq!(vcpu.gpr(Gpr::Rcx) & (1 << 27), osxsave, "CR4 {cr4:#x}");
    }
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
        in_page_walk: false,
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

/// A platform whose APIC is in x2APIC mode or not, recording the ICR
/// writes it was asked to make.
struct FakeIcrPlatform {
    x2apic: bool,
    sent: spin::Mutex<vec::Vec<u64>>,
}

impl crate::Platform for FakeIcrPlatform {
    fn io_write(&self, _: u16, _: u8, _: u32) {}
    fn io_read(&self, _: u16, _: u8) -> u32 {
        0
    }
    fn x2apic_icr_write(&self, value: u64) -> bool {
        if self.x2apic {
            self.sent.lock().push(value);
        }
        self.x2apic
    }
    fn msr_read(&self, _: u32) -> Option<u64> {
        None
    }
    fn msr_write(&self, _: u32, _: u64) -> bool {
        false
    }
    fn max_phys_addr(&self) -> u8 {
        36
    }
}

fn icr_write(x2apic: bool, value: u64) -> (FakeVcpu, vec::Vec<u64>) {
    let platform: &'static FakeIcrPlatform =
        std::boxed::Box::leak(std::boxed::Box::new(FakeIcrPlatform {
            x2apic,
            sent: spin::Mutex::new(vec::Vec::new()),
        }));
    let mut vm = Vm::new(CpuidPolicy::new(fake_cpuid), new_log());
    vm.platform = Some(platform);
    let mut vmm = Vmm::new(std::boxed::Box::leak(std::boxed::Box::new(vm)));
    let mut vcpu = FakeVcpu::new();
    vcpu.set_gpr(Gpr::Rcx, 0x830);
    vcpu.set_gpr(Gpr::Rax, value & 0xFFFF_FFFF);
    vcpu.set_gpr(Gpr::Rdx, value >> 32);
    let exit = Exit::Msr {
        msr: 0x830,
        write: true,
    };
    assert_eq!(handle_exit(&mut vmm, &mut vcpu, exit), Action::Resume);
    let sent = platform.sent.lock().clone();
    (vcpu, sent)
}

#[test]
fn x2apic_icr_writes_are_sent_in_x2apic_mode() {
    // Fixed IPI, vector 0x40, to APIC ID 1.
    let (vcpu, sent) = icr_write(true, 1 << 32 | 0x40);
    assert_eq!(sent, [1 << 32 | 0x40]);
    assert_eq!(vcpu.injected, None);
    assert_eq!(vcpu.skipped, 1);
}

#[test]
fn x2apic_icr_writes_raise_gp_in_xapic_mode_or_with_reserved_bits() {
    // Found by the hostile test guest: WRMSR 0x830 in xAPIC mode exits
    // (the intercept does not look at the mode), and thinvisor made the
    // write itself, in the host, where it raised #GP.
    let (vcpu, sent) = icr_write(false, 0x4004B);
    assert_eq!(sent, []);
    assert_eq!(vcpu.injected, Some(Event::GP0));
    assert_eq!(vcpu.skipped, 0);
    // Reserved bits (12, 13, 16, 17, 20-31) in x2APIC mode: #GP, not sent.
    for bit in [12, 13, 16, 17, 20, 31] {
        let (vcpu, sent) = icr_write(true, 0x40 | 1 << bit);
        assert_eq!(sent, [], "bit {bit}");
        assert_eq!(vcpu.injected, Some(Event::GP0), "bit {bit}");
        assert_eq!(vcpu.skipped, 0);
    }
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

// ---- log_read -------------------------------------------------------------

use thinvisor_memory::pagetable::{PageTables, RW, SIZE_4K, US};
use thinvisor_memory::PagingMode;

const LOG_READ: u64 = 3;
/// Where the tests' page tables live in the fake guest's RAM.
const TABLES: (u64, u64) = (0xC0000, 0x100000);
/// A user-writable buffer of three pages at a high address, backed by
/// physical 0x10000.. (the middle page is mapped only by some tests).
const BUF: u64 = 0xFFFF_8000_0010_0000;

fn paged_vcpu(map_middle: bool, flags: u64) -> (FakeVcpu, PageTables) {
    let mut vcpu = FakeVcpu::new();
    let mut pt = PageTables::new(vcpu.mem, PagingMode::Level4, TABLES.0, TABLES.1).unwrap();
    for i in 0..3u64 {
        if i != 1 || map_middle {
            pt.map(
                vcpu.mem,
                BUF + i * SIZE_4K,
                0x10000 + i * SIZE_4K,
                SIZE_4K,
                flags,
            )
            .unwrap();
        }
    }
    vcpu.paging = pt.regs();
    (vcpu, pt)
}

fn log_read(vmm: &mut Vmm<'_>, vcpu: &mut FakeVcpu, buf: u64, len: u64, from: u64) -> (u64, u64) {
    vcpu.set_gpr(Gpr::Rax, LOG_READ);
    vcpu.set_gpr(Gpr::Rbx, buf);
    vcpu.set_gpr(Gpr::Rcx, len);
    vcpu.set_gpr(Gpr::Rdx, from);
    assert_eq!(handle_exit(vmm, vcpu, Exit::VmmCall), Action::Resume);
    (vcpu.gpr(Gpr::Rax), vcpu.gpr(Gpr::Rbx))
}

fn guest_bytes(vcpu: &FakeVcpu, gpa: u64, len: usize) -> std::vec::Vec<u8> {
    let mut out = std::vec![0u8; len];
    vcpu.mem
        .read_phys(GuestPhysAddr::new(gpa), &mut out)
        .unwrap();
    out
}

#[test]
fn log_read_is_registered() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    assert_eq!(lookup(&mut vmm, &mut vcpu, b"log_read\0"), LOG_READ);
}

#[test]
fn log_read_copies_across_pages_and_reports_the_stream_offset() {
    let mut vmm = vmm();
    let text: std::vec::Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    vmm.vm.services.log.lock().push(&text);
    let (mut vcpu, _) = paged_vcpu(true, RW | US);
    let rip = vcpu.rip;
    // 8000 bytes from offset 100, starting 0x10 into the first page.
    let (n, first) = log_read(&mut vmm, &mut vcpu, BUF + 0x10, 8000, 100);
    assert_eq!((n, first), (8000, 100));
    assert_eq!(vcpu.rip, rip + 3);
    assert_eq!(guest_bytes(&vcpu, 0x10010, 8000), &text[100..8100]);
    // Nothing newer than the end.
    assert_eq!(log_read(&mut vmm, &mut vcpu, BUF, 100, 10_000), (0, 10_000));
    assert_eq!(log_read(&mut vmm, &mut vcpu, BUF, 100, 99_999), (0, 10_000));
    // A short buffer gets what fits.
    assert_eq!(log_read(&mut vmm, &mut vcpu, BUF, 5, 9_998), (2, 9_998));
}

#[test]
fn log_read_does_not_hold_the_log_across_guest_memory_accesses() {
    let mut vmm = vmm();
    let text: std::vec::Vec<u8> = (0..9000u32).map(|i| b'a' + (i % 26) as u8).collect();
    vmm.vm.services.log.lock().push(&text);
    let (mut vcpu, _) = paged_vcpu(true, RW | US);
    vcpu.log_on_access = Some((vmm.vm.services.log, 20));
    assert_eq!(log_read(&mut vmm, &mut vcpu, BUF, 9000, 0), (9000, 0));
    assert_eq!(guest_bytes(&vcpu, 0x10000, 9000), text);
}

#[test]
fn log_read_ends_short_when_logging_during_the_call_overwrites_its_bytes() {
    let mut vmm = vmm();
    let size = crate::services::LOG_RING_SIZE;
    let text: std::vec::Vec<u8> = (0..size + 500).map(|i| b'a' + (i % 26) as u8).collect();
    vmm.vm.services.log.lock().push(&text);
    let (mut vcpu, _) = paged_vcpu(true, RW | US);
    // Each access logs 5000 bytes: by the time the second page is copied
    // its bytes (stream offsets 4596..) have left the ring.
    vcpu.log_on_access = Some((vmm.vm.services.log, 5000));
    assert_eq!(log_read(&mut vmm, &mut vcpu, BUF, 9000, 0), (4096, 500));
    assert_eq!(guest_bytes(&vcpu, 0x10000, 4096), &text[500..4596]);
    assert_eq!(guest_bytes(&vcpu, 0x11000, 16), [0u8; 16]);
}

#[test]
fn log_read_reports_what_the_ring_lost() {
    let mut vmm = vmm();
    let big = std::vec![b'x'; crate::services::LOG_RING_SIZE + 500];
    vmm.vm.services.log.lock().push(&big);
    let (mut vcpu, _) = paged_vcpu(true, RW | US);
    let (n, first) = log_read(&mut vmm, &mut vcpu, BUF, 100, 0);
    assert_eq!((n, first), (100, 500));
}

#[test]
fn log_read_faults_not_present_pages_in_through_the_guest() {
    let mut vmm = vmm();
    vmm.vm.services.log.lock().push(&[b'q'; 9000]);
    let (mut vcpu, mut pt) = paged_vcpu(false, RW | US);
    vcpu.mode.cpl = 3;
    let rip = vcpu.rip;
    let (rax, _) = log_read(&mut vmm, &mut vcpu, BUF, 9000, 0);
    // The call did not complete: a #PF for the missing page, RIP unchanged,
    // RAX still the function number, nothing written.
    assert_eq!(rax, LOG_READ);
    assert_eq!(vcpu.rip, rip);
    assert_eq!(
        vcpu.injected,
        Some(Event::PageFault {
            error_code: 0b110, // not present, write, user
            address: BUF + SIZE_4K,
        })
    );
    assert_eq!(guest_bytes(&vcpu, 0x10000, 16), [0u8; 16]);
    // The guest OS maps the page and the instruction runs again.
    pt.map(vcpu.mem, BUF + SIZE_4K, 0x11000, SIZE_4K, RW | US)
        .unwrap();
    vcpu.injected = None;
    assert_eq!(log_read(&mut vmm, &mut vcpu, BUF, 9000, 0), (9000, 0));
    assert_eq!(vcpu.rip, rip + 3);
    assert_eq!(guest_bytes(&vcpu, 0x10000, 9000), std::vec![b'q'; 9000]);
}

#[test]
fn log_read_gives_up_when_the_guest_never_maps_the_page() {
    let mut vmm = vmm();
    vmm.vm.services.log.lock().push(&[b'q'; 9000]);
    let (mut vcpu, _) = paged_vcpu(false, RW | US);
    let rip = vcpu.rip;
    for _ in 0..MAX_FAULTS_PER_PAGE {
        vcpu.injected = None;
        log_read(&mut vmm, &mut vcpu, BUF, 9000, 0);
        assert!(matches!(vcpu.injected, Some(Event::PageFault { .. })));
        assert_eq!(vcpu.rip, rip);
    }
    vcpu.injected = None;
    let (rax, _) = log_read(&mut vmm, &mut vcpu, BUF, 9000, 0);
    assert_eq!(rax, FAULTS_UNRESOLVED);
    assert_eq!(vcpu.injected, None);
    assert_eq!(vcpu.rip, rip + 3);
}

#[test]
fn log_read_refuses_buffers_the_caller_may_not_write() {
    let mut vmm = vmm();
    vmm.vm.services.log.lock().push(b"secret log");
    // Supervisor page from CPL 3.
    let (mut vcpu, _) = paged_vcpu(true, RW);
    vcpu.mode.cpl = 3;
    assert_eq!(
        log_read(&mut vmm, &mut vcpu, BUF, 10, 0).0,
        LOG_READ_REFUSED
    );
    // ... but fine from CPL 0.
    vcpu.mode.cpl = 0;
    assert_eq!(log_read(&mut vmm, &mut vcpu, BUF, 10, 0), (10, 0));
    // Read-only page (CR0.WP is on in these tables), from either level.
    let (mut vcpu, _) = paged_vcpu(true, US);
    for cpl in [0, 3] {
        vcpu.mode.cpl = cpl;
        assert_eq!(
            log_read(&mut vmm, &mut vcpu, BUF, 10, 0).0,
            LOG_READ_REFUSED
        );
        assert_eq!(vcpu.injected, None);
    }
    assert_eq!(guest_bytes(&vcpu, 0x10000, 10), [0u8; 10]);
    // Non-canonical, and a range running past 2^64.
    let (mut vcpu, _) = paged_vcpu(true, RW | US);
    assert_eq!(
        log_read(&mut vmm, &mut vcpu, 0x0000_8000_0000_0000, 10, 0).0,
        LOG_READ_REFUSED
    );
    assert_eq!(
        log_read(&mut vmm, &mut vcpu, u64::MAX - 4, 10, 0).0,
        LOG_READ_REFUSED
    );
    // Identity-mapped guest-physical memory beyond guest RAM.
    let mut vcpu = FakeVcpu::new();
    assert_eq!(
        log_read(&mut vmm, &mut vcpu, RAM as u64 - 4, 10, 0).0,
        LOG_READ_REFUSED
    );
    assert_eq!(vcpu.injected, None);
}

#[test]
fn log_read_writes_nothing_when_a_later_page_is_not_guest_ram() {
    // Found by the hostile test guest: the first page translated to RAM,
    // the second to a device (beyond RAM here); every page translated, so
    // the first was written before the second failed.
    let mut vmm = vmm();
    vmm.vm.services.log.lock().push(&[b'x'; 600]);
    let mut vcpu = FakeVcpu::new();
    let mut pt = PageTables::new(vcpu.mem, PagingMode::Level4, TABLES.0, TABLES.1).unwrap();
    pt.map(vcpu.mem, BUF, 0x10000, SIZE_4K, RW).unwrap();
    pt.map(vcpu.mem, BUF + SIZE_4K, RAM as u64 + 0x1000, SIZE_4K, RW)
        .unwrap();
    vcpu.paging = pt.regs();
    assert_eq!(
        log_read(&mut vmm, &mut vcpu, BUF + 0xF00, 0x200, 0).0,
        LOG_READ_REFUSED
    );
    assert_eq!(vcpu.injected, None);
    assert_eq!(guest_bytes(&vcpu, 0x10F00, 0x100), [0u8; 0x100]);
    // The same buffer ending at the good page's end is written.
    assert_eq!(
        log_read(&mut vmm, &mut vcpu, BUF + 0xF00, 0x100, 0),
        (0x100, 0)
    );
    assert_eq!(guest_bytes(&vcpu, 0x10F00, 0x100), [b'x'; 0x100]);
}

#[test]
fn log_read_uses_32_bit_registers_outside_64_bit_mode() {
    let mut vmm = vmm();
    vmm.vm.services.log.lock().push(b"0123456789");
    let mut vcpu = FakeVcpu::new();
    vcpu.mode.long64 = false;
    vcpu.set_gpr(Gpr::Rax, (7 << 32) | LOG_READ);
    vcpu.set_gpr(Gpr::Rbx, (1 << 40) | 0x8000);
    vcpu.set_gpr(Gpr::Rcx, (1 << 40) | 4);
    vcpu.set_gpr(Gpr::Rdx, (1 << 40) | 2);
    assert_eq!(
        handle_exit(&mut vmm, &mut vcpu, Exit::VmmCall),
        Action::Resume
    );
    assert_eq!((vcpu.gpr(Gpr::Rax), vcpu.gpr(Gpr::Rbx)), (4, 2));
    assert_eq!(guest_bytes(&vcpu, 0x8000, 4), b"2345");
}

#[test]
fn either_vendors_call_instruction_is_recognised() {
    use crate::vmmcall::is_vmm_call_at_rip;
    let mut vcpu = FakeVcpu::new();
    for (bytes, expect) in [
        ([0x0F, 0x01, 0xC1], true),
        ([0x0F, 0x01, 0xD9], true),
        ([0x0F, 0x0B, 0x90], false),
        ([0x0F, 0x01, 0xD8], false),
    ] {
        vcpu.put(0x1000, &bytes);
        assert_eq!(is_vmm_call_at_rip(&vcpu), expect, "{bytes:x?}");
    }
    // An instruction pointer outside guest RAM is simply not a call.
    vcpu.rip = RAM as u64 - 1;
    assert!(!is_vmm_call_at_rip(&vcpu));
    // A non-executable page (NX) is not fetched.
    let (mut vcpu, _) = paged_vcpu(true, RW | thinvisor_memory::pagetable::NX);
    vcpu.put(0x10000, &[0x0F, 0x01, 0xC1]);
    vcpu.rip = BUF;
    assert!(!is_vmm_call_at_rip(&vcpu));
    let (mut vcpu, _) = paged_vcpu(true, RW);
    vcpu.put(0x10000, &[0x0F, 0x01, 0xC1]);
    vcpu.rip = BUF;
    assert!(is_vmm_call_at_rip(&vcpu));
    // ... but not from CPL 3 on a supervisor page.
    vcpu.mode.cpl = 3;
    assert!(!is_vmm_call_at_rip(&vcpu));
}

#[test]
fn invalid_opcodes_go_back_to_the_guest() {
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    assert_eq!(
        handle_exit(&mut vmm, &mut vcpu, Exit::InvalidOpcode),
        Action::Resume
    );
    assert_eq!(vcpu.injected, Some(Event::UD));
    assert_eq!(vcpu.skipped, 0);
}

// ---- hostile input ---------------------------------------------------------

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Whatever the registers, paging state and memory say, a VMM call
    /// returns to the guest or asks for a page fault: it never panics, and
    /// only RAX (and RBX for log_read) may change.
    #[test]
    fn any_vmm_call_is_answered(
        regs in proptest::array::uniform16(proptest::prelude::any::<u64>()),
        small in proptest::array::uniform4(0u64..8),
        cr in proptest::array::uniform4(proptest::prelude::any::<u64>()),
        cpl in 0u8..4,
        long64 in proptest::prelude::any::<bool>(),
        fill in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
    ) {
        let mut vmm = vmm();
        vmm.vm.services.log.lock().push(b"thinvisor log line\n");
        let mut vcpu = FakeVcpu::new();
        vcpu.regs = regs;
        // Often a real function number, sometimes anything.
        if small[0] < 6 {
            vcpu.regs[Gpr::Rax as usize] = small[0];
        }
        // Page tables made of random bytes in the first pages of RAM.
        vcpu.put(0, &fill);
        vcpu.paging = PagingRegs {
            cr0: cr[0] | if small[1] < 4 { 1 << 31 } else { 0 },
            cr3: cr[1] & 0xF_F000,
            cr4: cr[2],
            efer: cr[3],
        };
        vcpu.mode = CpuMode { cpl, long64 };
        let before = vcpu.regs;
        let rip = vcpu.rip;
        proptest::prop_assert_eq!(handle_exit(&mut vmm, &mut vcpu, Exit::VmmCall), Action::Resume);
        for (i, (a, b)) in before.iter().zip(vcpu.regs.iter()).enumerate() {
            if i != Gpr::Rax as usize && i != Gpr::Rbx as usize {
                proptest::prop_assert_eq!(a, b, "register {} changed", i);
            }
        }
        match vcpu.injected {
            None => proptest::prop_assert_eq!(vcpu.rip, rip + 3),
            Some(Event::PageFault { .. }) => proptest::prop_assert_eq!(vcpu.rip, rip),
            Some(other) => proptest::prop_assert!(false, "unexpected event {:?}", other),
        }
        // The other exits that read guest state must not panic either.
        proptest::prop_assert_eq!(handle_exit(&mut vmm, &mut vcpu, Exit::InvalidOpcode), Action::Resume);
        proptest::prop_assert_eq!(handle_exit(&mut vmm, &mut vcpu, Exit::Cpuid), Action::Resume);
        // Fetching the instruction at a random RIP must not panic.
        let _ = crate::vmmcall::is_vmm_call_at_rip(&vcpu);
    }
}

#[test]
fn lookup_reads_the_name_with_the_callers_privilege() {
    let mut vmm = vmm();
    // "dbgsh" on a supervisor-only page at a high address.
    let (mut vcpu, _) = paged_vcpu(true, RW);
    vcpu.put(0x10000, b"dbgsh\0");
    assert_eq!(call(&mut vmm, &mut vcpu, 0, BUF), 1);
    vcpu.mode.cpl = 3;
    assert_eq!(call(&mut vmm, &mut vcpu, 0, BUF), NO_FUNCTION);
    // A user page is fine from CPL 3, also when the name crosses pages.
    let (mut vcpu, _) = paged_vcpu(true, RW | US);
    vcpu.mode.cpl = 3;
    vcpu.put(0x10000 + SIZE_4K - 3, b"dbgsh\0");
    assert_eq!(call(&mut vmm, &mut vcpu, 0, BUF + SIZE_4K - 3), 1);
}

#[test]
fn vcpus_share_one_memory() {
    // Two vCPUs of one VM (one Vm, one memory object), each on its own
    // thread: log_read from both at once, into different buffers, then a
    // lookup on one of a name the other wrote.
    let first = FakeVcpu::new();
    let mut second = FakeVcpu::new();
    second.mem = first.mem;
    let vm = vmm().vm;
    let text: std::vec::Vec<u8> = (0..3000u32).map(|i| b'A' + (i % 26) as u8).collect();
    vm.services.log.lock().push(&text);
    let (mut first, second) = std::thread::scope(|s| {
        let run = |mut vcpu: FakeVcpu, buf: u64| {
            move || {
                let mut vmm = Vmm::new(vm);
                for _ in 0..50 {
                    assert_eq!(log_read(&mut vmm, &mut vcpu, buf, 3000, 0), (3000, 0));
                }
                vcpu
            }
        };
        let a = s.spawn(run(first, 0x20000));
        let b = s.spawn(run(second, 0x30000));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(guest_bytes(&first, 0x20000, 3000), text);
    assert_eq!(guest_bytes(&second, 0x30000, 3000), text);
    second.put(0x8000, b"log_read\0");
    let mut vmm = Vmm::new(vm);
    assert_eq!(call(&mut vmm, &mut first, 0, 0x8000), LOG_READ);
}

/// dbgsh through the VMM call: the banner is pending from the first poll
/// on, and only RAX changes. A mem command dumps the caller's memory. The
/// call is counted per function.
#[test]
fn dbgsh_session_through_the_call() {
    use crate::dbgsh::{BANNER, PROMPT};
    let mut vmm = vmm();
    let mut vcpu = FakeVcpu::new();
    vcpu.put(0x20, b"ABCD");
    let n = lookup(&mut vmm, &mut vcpu, b"dbgsh\0");
    vcpu.set_gpr(Gpr::Rcx, 0x1234);
    vcpu.set_gpr(Gpr::Rbx, dbgsh::NOTHING);
    let before = vcpu.regs;
    let first = u64::from(BANNER.as_bytes()[0]);
    assert_eq!(call(&mut vmm, &mut vcpu, n, dbgsh::NOTHING), first);
    assert_eq!(vcpu.regs[1..], before[1..]);
    // 32-bit callers poll with 0xFFFF_FFFF.
    vcpu.mode.long64 = false;
    assert_eq!(call(&mut vmm, &mut vcpu, n, 0xFFFF_FFFF), first);
    vcpu.mode.long64 = true;
    // Drain the banner and the prompt, type the command, read the dump.
    let mut out = std::vec::Vec::new();
    let mut keys = b"mem 20 4\n".iter();
    let mut answer = dbgsh::ACK;
    out.push(first as u8);
    loop {
        let r = call(&mut vmm, &mut vcpu, n, answer);
        if r == dbgsh::WANT_INPUT {
            match keys.next() {
                Some(&k) => answer = u64::from(k),
                None => break,
            }
        } else {
            out.push(r as u8);
            answer = dbgsh::ACK;
        }
    }
    let text = std::string::String::from_utf8(out).unwrap();
    assert_eq!(
        text,
        std::format!(
            "{BANNER}{PROMPT}mem 20 4\n0000000000000020: 41 42 43 44{}  ABCD\n{PROMPT}",
            " ".repeat(36)
        )
    );
}

/// A machine whose MSRs are a table: APIC base at 0xFEE00000, MTRRs on
/// with default WB and one spare variable pair; writes are recorded, and
/// MSR 0x201 (a mask) raises #GP for a value with bit 63 set.
struct FakeMsrs {
    writes: spin::Mutex<std::vec::Vec<(u32, u64)>>,
}

impl crate::Platform for FakeMsrs {
    fn io_write(&self, _: u16, _: u8, _: u32) {}
    fn io_read(&self, _: u16, _: u8) -> u32 {
        0
    }
    fn x2apic_icr_write(&self, _: u64) -> bool {
        false
    }
    fn msr_read(&self, msr: u32) -> Option<u64> {
        let written = self
            .writes
            .lock()
            .iter()
            .rev()
            .find(|w| w.0 == msr)
            .map(|w| w.1);
        if written.is_some() {
            return written;
        }
        match msr {
            0x1B => Some(0xFEE0_0900),
            0xFE => Some(1),
            0x2FF => Some((1 << 11) | 6),
            0x200 | 0x201 => Some(0),
            _ => None,
        }
    }
    fn msr_write(&self, msr: u32, value: u64) -> bool {
        if msr == 0x201 && value >> 63 != 0 {
            return false;
        }
        self.writes.lock().push((msr, value));
        true
    }
    fn max_phys_addr(&self) -> u8 {
        36
    }
}

/// Guarded MSR writes: done for the guest when they leave thinvisor's
/// block alone, #GP when they would not, and #GP when the processor
/// refuses the value itself.
#[test]
fn guarded_msr_writes() {
    let platform: &'static FakeMsrs = std::boxed::Box::leak(std::boxed::Box::new(FakeMsrs {
        writes: spin::Mutex::new(std::vec::Vec::new()),
    }));
    let mut vm = Vm::new(CpuidPolicy::new(fake_cpuid), new_log());
    vm.platform = Some(platform);
    vm.reserved = Some((0x1FC0_0000, 0x2000_0000));
    let vm: &'static Vm = std::boxed::Box::leak(std::boxed::Box::new(vm));
    let mut vmm = Vmm::new(vm);
    let mut vcpu = FakeVcpu::new();
    let mut wrmsr = |vcpu: &mut FakeVcpu, msr: u32, value: u64| {
        vcpu.injected = None;
        vcpu.set_gpr(Gpr::Rax, value & 0xFFFF_FFFF);
        vcpu.set_gpr(Gpr::Rdx, value >> 32);
        let rip = vcpu.rip;
        assert_eq!(
            handle_exit(&mut vmm, vcpu, Exit::Msr { msr, write: true }),
            Action::Resume
        );
        (vcpu.injected, vcpu.rip - rip)
    };
    // The APIC window elsewhere: written, the instruction skipped.
    assert_eq!(wrmsr(&mut vcpu, 0x1B, 0xFEC0_0900), (None, 3));
    // Over thinvisor's block: #GP, nothing written.
    assert_eq!(wrmsr(&mut vcpu, 0x1B, 0x1FC0_0900), (Some(Event::GP0), 0));
    // An MTRR pair making the block write-combining: the base passes (the
    // mask is not valid yet), the mask does not.
    assert_eq!(wrmsr(&mut vcpu, 0x200, 0x1FC0_0001), (None, 3));
    assert_eq!(
        wrmsr(&mut vcpu, 0x201, 0xF_FFC0_0000 | (1 << 11)),
        (Some(Event::GP0), 0)
    );
    // Default write-combining: refused; MTRRs off for an update (all
    // uncached): done.
    assert_eq!(
        wrmsr(&mut vcpu, 0x2FF, (1 << 11) | 1),
        (Some(Event::GP0), 0)
    );
    assert_eq!(wrmsr(&mut vcpu, 0x2FF, 6), (None, 3));
    // A value the processor refuses: its #GP is the guest's.
    assert_eq!(wrmsr(&mut vcpu, 0x201, 1 << 63), (Some(Event::GP0), 0));
    assert_eq!(
        *platform.writes.lock(),
        [(0x1B, 0xFEC0_0900), (0x200, 0x1FC0_0001), (0x2FF, 6)]
    );
}

/// The reusable fake of `crate::fake` (feature `test-util`, used by the
/// fuzz targets) drives the dispatcher like the one above.
#[test]
fn the_shared_fake_vcpu_dispatches_calls() {
    let mem = IsolatedMemory::new(vec![0u8; 0x10000].leak());
    mem.write_phys(GuestPhysAddr::new(0x2000), b"log_read\0")
        .unwrap();
    let mut vcpu = crate::fake::FakeVcpu::new(&mem);
    let mut vmm = vmm();
    vcpu.regs[Gpr::Rbx as usize] = 0x2000;
    assert_eq!(
        handle_exit(&mut vmm, &mut vcpu, Exit::VmmCall),
        Action::Resume
    );
    assert_eq!(vcpu.regs[Gpr::Rax as usize], 3);
    assert_eq!((vcpu.skipped, vcpu.rip), (1, 0x1003));
    // 32-bit mode: the upper half of RAX does not pick a function.
    vcpu.mode.long64 = false;
    vcpu.regs[Gpr::Rax as usize] = 0xFFFF_FFFF_0000_0000;
    assert_eq!(
        handle_exit(&mut vmm, &mut vcpu, Exit::VmmCall),
        Action::Resume
    );
    assert_eq!(vcpu.regs[Gpr::Rax as usize], 3);
    assert_eq!(vcpu.last_injected(), None);
}

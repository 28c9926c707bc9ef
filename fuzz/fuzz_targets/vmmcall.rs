//! The VMM-call dispatcher (`handle_exit(.., Exit::VmmCall)`) and every
//! registered service (function 0's lookup, `dbgsh`, `log_set_buf`,
//! `log_read`, numbers of no function) on a fake vCPU with hostile
//! registers, CPU mode, paging registers and guest memory (holes
//! included), interleaved with log lines (reaching the `log_set_buf`
//! buffer), raw writes into the guest buffer, guest writes to its
//! counter and clock and address-space changes.
//!
//! Per call: the call returns to the guest; it either steps over the call
//! instruction or injects a not-present #PF (log_read only) and leaves
//! RIP alone, and the same fault is injected at most 3 times in a row;
//! only RAX (and RBX for log_read) change; every function's result is one
//! it may return; with paging off, no guest byte changes outside the
//! `log_set_buf` buffers registered before and after and `log_read`'s
//! buffer. No log line is written under the log's or the buffer's lock
//! (see `thinvisor_memory_fuzz::vmm`).

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use thinvisor_memory::{GuestPhysAddr, GuestPhysMemory, IsolatedMemory, PagingMode};
use thinvisor_memory_fuzz::vmm::{flush_guest_log, fresh_vm, LOG, NOW};
use thinvisor_memory_fuzz::Setup;
use thinvisor_vmm::fake::FakeVcpu;
use thinvisor_vmm::stats::ExitStats;
use thinvisor_vmm::vmmcall::{FAULTS_UNRESOLVED, MAX_FAULTS_PER_PAGE};
use thinvisor_vmm::{handle_exit, Action, CpuMode, Event, Exit, Gpr, Vm, Vmm};

const NAMES: &[&[u8]] = &[
    b"dbgsh",
    b"log_set_buf",
    b"log_read",
    b"DBGSH",
    b"get_vmmcall_number",
    b"",
];

/// Shell input worth typing.
const TYPED: &[u8] = b"help\nlog 3\nstat\ncpu\nmem 0 40\nexit\n\x08\x7f\r";

struct Harness<'m> {
    vm: &'static Vm,
    vcpu: FakeVcpu<'m>,
    mem: &'m IsolatedMemory<'m>,
    ram_len: u64,
    /// The buffer `log_set_buf` holds, as its answers said.
    registered: Option<(u64, u64)>,
}

impl Harness<'_> {
    /// Guest RAM as the VMM sees it (bytes in holes read as 0xEE).
    fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0xEEu8; self.ram_len as usize];
        for (p, chunk) in out.chunks_mut(4096).enumerate() {
            let at = p as u64 * 4096;
            if self.mem.read_phys(GuestPhysAddr::new(at), chunk).is_err() {
                for (i, b) in chunk.iter_mut().enumerate() {
                    let mut one = [0u8; 1];
                    if self
                        .mem
                        .read_phys(GuestPhysAddr::new(at + i as u64), &mut one)
                        .is_ok()
                    {
                        *b = one[0];
                    }
                }
            }
        }
        out
    }

    fn width(&self) -> u64 {
        if self.vcpu.mode.long64 {
            u64::MAX
        } else {
            0xFFFF_FFFF
        }
    }

    /// One VMM call with the registers as they are; the checks above.
    fn call(&mut self, vmm: &mut Vmm<'_>) {
        let before = self.vcpu.regs;
        let rip = self.vcpu.rip;
        let width = self.width();
        let number = before[Gpr::Rax as usize] & width;
        let paging_off = self.vcpu.paging.mode() == PagingMode::Disabled;
        let old_buffer = self.registered;
        let image = paging_off.then(|| self.snapshot());

        let mut faults = 0;
        loop {
            self.vcpu.clear_record();
            assert_eq!(
                handle_exit(vmm, &mut self.vcpu, Exit::VmmCall),
                Action::Resume
            );
            flush_guest_log(self.mem);
            match (self.vcpu.skipped, self.vcpu.last_injected()) {
                (1, None) => {
                    assert_eq!(self.vcpu.rip, rip.wrapping_add(3));
                    break;
                }
                (0, Some(Event::PageFault { error_code, .. })) => {
                    assert_eq!(number, 3, "a #PF from function {number}");
                    assert_eq!(error_code & 1, 0, "a #PF for a present page");
                    assert_eq!(self.vcpu.rip, rip);
                    assert_eq!(
                        self.vcpu.regs, before,
                        "registers changed by a faulting call"
                    );
                    faults += 1;
                    assert!(faults <= MAX_FAULTS_PER_PAGE, "{faults} faults in a row");
                }
                other => panic!("neither a return nor a #PF: {other:?}"),
            }
        }

        let after = self.vcpu.regs;
        for r in 0..16 {
            if r == Gpr::Rax as usize || (number == 3 && r == Gpr::Rbx as usize) {
                continue;
            }
            assert_eq!(
                after[r], before[r],
                "function {number} changed register {r}"
            );
        }
        let rax = after[Gpr::Rax as usize];
        let rbx = before[Gpr::Rbx as usize] & width;
        let rcx = before[Gpr::Rcx as usize] & width;
        match number {
            0 => assert!(rax <= 3, "lookup gave {rax:#x}"),
            1 => assert!(
                rax <= 0x100 || rax == 0x10A || rax == u64::MAX,
                "dbgsh gave {rax:#x}"
            ),
            2 if self.vcpu.mode.cpl != 0 => assert_eq!(rax, before[0], "log_set_buf from CPL > 0"),
            2 => {
                assert!(rax == 0 || rax == u64::MAX, "log_set_buf gave {rax:#x}");
                if rax == 0 {
                    self.registered = (rbx != 0).then_some((rbx, rcx));
                }
            }
            3 => {
                if faults == MAX_FAULTS_PER_PAGE {
                    assert_eq!(rax, FAULTS_UNRESOLVED);
                }
                assert!(
                    rax == u64::MAX || rax <= rcx,
                    "log_read gave {rax:#x} for {rcx:#x}"
                );
            }
            _ => assert_eq!(rax, 0, "function {number} does not exist"),
        }

        // With paging off, linear is physical: nothing outside the
        // buffers the call may write changes.
        // (Whole-image comparisons first: memcmp is not instrumented, a
        // loop over every byte would cost most of the target's time.)
        if let Some(image) = image.filter(|image| *image != self.snapshot()) {
            let mut may = vec![false; image.len()];
            let mut allow = |start: u64, len: u64, wrap: u64| {
                for i in 0..len.min(1 << 17) {
                    let a = start.wrapping_add(i) & wrap;
                    if let Some(m) = usize::try_from(a).ok().and_then(|a| may.get_mut(a)) {
                        *m = true;
                    }
                }
            };
            for (start, len) in [old_buffer, self.registered].into_iter().flatten() {
                allow(start, len, u64::MAX);
            }
            if number == 3 {
                // Paging off, linear addresses are 32 bits (also in the
                // impossible "64-bit mode without paging" the harness
                // allows: the walker truncates them).
                allow(rbx, rcx, 0xFFFF_FFFF);
            }
            let now = self.snapshot();
            for (i, (a, b)) in image.iter().zip(&now).enumerate() {
                assert!(
                    a == b || may[i],
                    "function {number} wrote guest byte {i:#x}"
                );
            }
        }
    }

    fn step(&mut self, vmm: &mut Vmm<'_>, u: &mut Unstructured<'_>) -> Result<()> {
        let regs = &mut self.vcpu.regs;
        let in_ram = |u: &mut Unstructured<'_>, len: u64| -> Result<u64> {
            Ok(if u.ratio(7u8, 8u8)? {
                u.int_in_range(0..=len + 16)?
            } else {
                u.arbitrary()?
            })
        };
        // Stale upper halves of RAX, which 32-bit callers may leave.
        let junk = if u.arbitrary()? {
            u64::from(u.arbitrary::<u32>()?) << 32
        } else {
            0
        };
        match u.int_in_range(0u8..=11)? {
            0 => {
                let name = *u.choose(NAMES)?;
                let at = in_ram(u, self.ram_len)?;
                let mut bytes = name.to_vec();
                if u.ratio(7u8, 8u8)? {
                    bytes.push(0);
                }
                let _ = self.mem.write_phys(GuestPhysAddr::new(at), &bytes);
                regs[Gpr::Rax as usize] = junk;
                regs[Gpr::Rbx as usize] = at;
                self.call(vmm);
            }
            1 | 2 => {
                let answer = match u.int_in_range(0u8..=4)? {
                    0 => u64::MAX,
                    1 => 0,
                    2 | 3 => u64::from(*u.choose(TYPED)?),
                    _ => u.arbitrary()?,
                };
                regs[Gpr::Rax as usize] = 1 | junk;
                regs[Gpr::Rbx as usize] = answer;
                self.call(vmm);
            }
            3 => {
                let at = match u.int_in_range(0u8..=3)? {
                    0 => 0,
                    1 | 2 => in_ram(u, self.ram_len)? & !3,
                    _ => u.arbitrary()?,
                };
                let size = match u.int_in_range(0u8..=3)? {
                    0 | 1 => u.int_in_range(100..=4096)?,
                    2 => u.int_in_range(0..=self.ram_len)?,
                    _ => u.arbitrary()?,
                };
                regs[Gpr::Rax as usize] = 2 | junk;
                regs[Gpr::Rbx as usize] = at;
                regs[Gpr::Rcx as usize] = size;
                self.call(vmm);
            }
            4 | 5 => {
                regs[Gpr::Rax as usize] = 3 | junk;
                regs[Gpr::Rbx as usize] = in_ram(u, self.ram_len)?;
                regs[Gpr::Rcx as usize] = match u.int_in_range(0u8..=3)? {
                    0 | 1 => u.int_in_range(0..=300)?,
                    2 => u.int_in_range(0..=0x2_0000)?,
                    _ => u.arbitrary()?,
                };
                regs[Gpr::Rdx as usize] = match u.int_in_range(0u8..=2)? {
                    0 => 0,
                    1 => u.int_in_range(0..=0x2_0000)?,
                    _ => u.arbitrary()?,
                };
                self.call(vmm);
            }
            6 => {
                regs[Gpr::Rax as usize] = u.arbitrary()?;
                self.call(vmm);
            }
            7 => {
                self.vcpu.mode = CpuMode {
                    cpl: u.int_in_range(0..=3)?,
                    long64: u.arbitrary()?,
                };
                for r in [Gpr::Rsi, Gpr::Rdi, Gpr::R8] {
                    regs[r as usize] = u.arbitrary()?;
                }
            }
            8 => {
                // A log line, which also reaches the guest's buffer.
                let len = u.int_in_range(0..=200)?;
                let text = String::from_utf8_lossy(u.bytes(len)?).into_owned();
                log::info!("{text}");
                flush_guest_log(self.mem);
            }
            9 => {
                // Raw pieces of lines, as the hypervisor's writer sees
                // them (a line may arrive in several writes).
                let len = u.int_in_range(0..=300)?;
                let bytes = u.bytes(len)?;
                let image = self.snapshot();
                self.vm.services.guest_log.lock().write(self.mem, bytes);
                let now = self.snapshot();
                if now == image {
                    return Ok(());
                }
                for (i, (a, b)) in image.iter().zip(&now).enumerate() {
                    let i = i as u64;
                    let inside = self.registered.is_some_and(|(s, n)| s <= i && i - s < n);
                    assert!(a == b || inside, "the guest log writer wrote byte {i:#x}");
                }
            }
            10 => {
                // The guest consumes from (or scribbles over) the counter.
                if let Some((at, _)) = self.registered {
                    let v: u32 = u.arbitrary()?;
                    let _ = self
                        .mem
                        .write_phys(GuestPhysAddr::new(at), &v.to_le_bytes());
                }
            }
            _ => {
                // Time passes; another address space calls next.
                let dt: u64 = if u.arbitrary()? {
                    u.int_in_range(0..=100)?
                } else {
                    u.arbitrary()?
                };
                NOW.fetch_add(dt, std::sync::atomic::Ordering::Relaxed);
                self.vcpu.paging.cr3 =
                    (self.vcpu.paging.cr3 & 0xFFF) | (u64::from(u.int_in_range(0u8..=3)?) << 12);
            }
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((calls, rest)) = thinvisor_memory_fuzz::split_calls(data) else {
        return;
    };
    let mut u = Unstructured::new(rest);
    let Ok(mut s) = Setup::new(&mut u, 4096) else {
        return;
    };
    let mut ram = std::mem::take(&mut s.ram);
    let ram_len = ram.len() as u64;
    let holes = s.holes.clone();
    let mem = IsolatedMemory::with_holes(&mut ram, &holes);

    let mut u = Unstructured::new(calls);
    let enabled = u.ratio(7u8, 8u8).unwrap_or(true);
    let takeover = if u.arbitrary().unwrap_or(false) {
        u.int_in_range(0..=50).unwrap_or(0)
    } else {
        u64::MAX
    };
    let vm = fresh_vm(enabled, takeover);
    for _ in 0..u.int_in_range(0u8..=6).unwrap_or(0) {
        let len = u.int_in_range(0..=120).unwrap_or(0);
        let line = u.bytes(len).unwrap_or(&[]);
        LOG.lock().push(line);
        LOG.lock().push(b"\n");
    }
    let stats = ExitStats::default();
    let mut vcpu = FakeVcpu::new(&mem);
    vcpu.paging = s.regs;
    vcpu.stats = Some(&stats);
    vcpu.mode = CpuMode {
        cpl: u.int_in_range(0..=3).unwrap_or(0),
        long64: u.arbitrary().unwrap_or(true),
    };
    let mut h = Harness {
        vm,
        vcpu,
        mem: &mem,
        ram_len,
        registered: None,
    };
    let mut vmm = Vmm::new(vm);
    for _ in 0..64 {
        if u.is_empty() || h.step(&mut vmm, &mut u).is_err() {
            break;
        }
    }
});

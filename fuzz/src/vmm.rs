//! The VMM side of the `vmmcall` and `dbgsh` targets: the VMM's log (a
//! static, like the hypervisor's), one VM per fuzzing thread, reset for
//! every input, and a logger that checks what would deadlock in the
//! hypervisor.
//!
//! The hypervisor's logger takes the log's spin lock and then the
//! `log_set_buf` buffer's (`hypervisor/src/serial.rs`); a log line
//! written while either is held spins forever. This logger try-locks both
//! and panics instead, so a fuzz input that logs under one of those locks
//! is a crash. It pushes every line into [`LOG`] at once, as the
//! hypervisor does, and queues it for the guest's buffer, which the
//! harness writes after each call with the input's guest memory
//! ([`flush_guest_log`]).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use thinvisor_memory::GuestPhysMemory;
use thinvisor_vmm::cpuid::{CpuidPolicy, CpuidResult};
use thinvisor_vmm::dbgsh::{Dbgsh, NoInfo};
use thinvisor_vmm::guest_log::GuestLogBuffer;
use thinvisor_vmm::log_ring::LogRing;
use thinvisor_vmm::services::{Services, VmmLog};
use thinvisor_vmm::Vm;

/// The VMM's log, as `log_read` and the shell's `log` see it.
pub static LOG: VmmLog = spin::Mutex::new(LogRing::new());

/// The clock of the shell's takeover rule; the harness moves it.
pub static NOW: AtomicU64 = AtomicU64::new(0);

fn clock() -> u64 {
    NOW.load(Ordering::Relaxed)
}

fn fake_cpuid(leaf: u32, _: u32) -> CpuidResult {
    CpuidResult {
        eax: leaf,
        ebx: 0x11,
        ecx: 0x22,
        edx: 0x33,
    }
}

thread_local! {
    /// The VM of this thread (leaked once: `Vm` borrows `'static` state).
    static VM: &'static Vm = Box::leak(Box::new({
        let mut vm = Vm::new(CpuidPolicy::new(fake_cpuid), &LOG);
        vm.services = Services::new(&LOG).with_shell(&NoInfo, true, clock, u64::MAX);
        vm
    }));
    /// Lines logged since the last [`flush_guest_log`].
    static PENDING: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

struct CheckingLogger;

impl log::Log for CheckingLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!("thinvisor: [{:<5}] {}\n", record.level(), record.args());
        match LOG.try_lock() {
            Some(mut ring) => ring.push(line.as_bytes()),
            None => panic!("logged with the log's lock held (a deadlock in thinvisor): {line}"),
        }
        VM.with(|vm| {
            if vm.services.guest_log.try_lock().is_none() {
                panic!("logged with the log_set_buf buffer's lock held (a deadlock in thinvisor): {line}");
            }
        });
        PENDING.with(|p| p.borrow_mut().push(line));
    }

    fn flush(&self) {}
}

static LOGGER: CheckingLogger = CheckingLogger;

/// This thread's VM, its state back to that of a fresh boot: an empty
/// log, no `log_set_buf` buffer, a shell (`enabled`, owner replaced after
/// `takeover_after` ticks of [`NOW`], which starts at 0).
pub fn fresh_vm(enabled: bool, takeover_after: u64) -> &'static Vm {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Trace);
    });
    *LOG.lock() = LogRing::new();
    NOW.store(0, Ordering::Relaxed);
    PENDING.with(|p| p.borrow_mut().clear());
    VM.with(|vm| {
        *vm.services.guest_log.lock() = GuestLogBuffer::new();
        *vm.services.dbgsh.lock() = Dbgsh::new(enabled, takeover_after);
        *vm
    })
}

/// Writes the lines logged since the last call into the guest's
/// `log_set_buf` buffer, as the hypervisor's logger does.
pub fn flush_guest_log(memory: &dyn GuestPhysMemory) {
    let lines = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    VM.with(|vm| {
        for line in lines {
            vm.services.guest_log.lock().write(memory, line.as_bytes());
        }
    });
}

//! The console: COM1 and the 0xE9 debug port, behind the `log` crate.

use core::fmt::{self, Write};
use spin::Mutex;
use thinvisor_vmm::log_ring::LogRing;
use thinvisor_vmm::services::VmmLog;
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3F8;
/// Bochs' and QEMU's debug console port.
const DEBUG_PORT: u16 = 0xE9;
/// Line status register bits (16550 UART).
const LSR_THR_EMPTY: u8 = 1 << 5;
const LSR_IDLE: u8 = 1 << 6;

/// The console's output side.
pub struct Console;

impl Console {
    /// Program COM1 for 115200 baud, 8N1, FIFOs on.
    pub fn init() {
        for (offset, value) in [
            (1, 0x00),
            (3, 0x80),
            (0, 0x01),
            (1, 0x00),
            (3, 0x03),
            (2, 0xC7),
            (4, 0x0B),
        ] {
            // SAFETY: COM1's registers; programming them has no effect on memory.
            unsafe { Port::<u8>::new(COM1 + offset).write(value) };
        }
    }

    fn put(byte: u8) {
        let mut lsr = Port::<u8>::new(COM1 + 5);
        // Bounded: a missing UART must not hang the hypervisor.
        for _ in 0..100_000 {
            // SAFETY: reading the line status register has no side effect.
            if unsafe { lsr.read() } & LSR_THR_EMPTY != 0 {
                break;
            }
        }
        // SAFETY: the transmit register of COM1 and the debug port: output only.
        unsafe {
            Port::<u8>::new(COM1).write(byte);
            Port::<u8>::new(DEBUG_PORT).write(byte);
        }
    }

    /// Wait until the UART has sent everything (Bochs loses the tail of
    /// its COM1 file otherwise).
    pub fn drain() {
        let mut lsr = Port::<u8>::new(COM1 + 5);
        for _ in 0..1_000_000 {
            // SAFETY: reading the line status register has no side effect.
            if unsafe { lsr.read() } & LSR_IDLE != 0 {
                break;
            }
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                Self::put(b'\r');
            }
            Self::put(b);
        }
        Ok(())
    }
}

/// The log kept in memory from boot on, for `log_read`.
pub static LOG: VmmLog = spin::Mutex::new(LogRing::new());

/// Writes to the console, to [`LOG`] and to the guest's `log_set_buf`
/// buffer, if one is registered.
///
/// Lock order: the caller holds [`CONSOLE_LOCK`]; [`LOG`]'s lock is
/// released before the guest buffer's lock is taken, and neither path
/// logs (the guest buffer's writer reaches guest memory only through
/// `GuestPhysMemory`, whose accesses fail instead of faulting).
struct Tee;

impl Write for Tee {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        LOG.lock().push(s.as_bytes());
        // Before the VM and its memory exist nothing can be registered.
        if let (Some(vm), Some(memory)) = (crate::VM.get(), crate::shared_guest_memory()) {
            vm.services.guest_log.lock().write(memory, s.as_bytes());
        }
        Console.write_str(s)
    }
}

/// Serialises whole log lines.
static CONSOLE_LOCK: Mutex<()> = Mutex::new(());

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let _guard = CONSOLE_LOCK.lock();
        let _ = writeln!(Tee, "thinvisor: [{:5}] {}", record.level(), record.args());
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Start logging at `level`.
pub fn init_logging(level: log::LevelFilter) {
    Console::init();
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

//! Output: COM1 (0x3F8, 115200 8N1) and, byte for byte, port 0xE9 (QEMU
//! `-debugcon`, Bochs `port_e9_hack`); and the end of the run through the
//! emulators' exit ports.

use crate::cpu::{inb, outb, outl};
use core::fmt;

const COM1: u16 = 0x3F8;
const LSR: u16 = COM1 + 5;
/// LSR bit 5: the transmit holding register can take a byte.
const LSR_THR_EMPTY: u8 = 1 << 5;
/// LSR bit 6: transmitter completely idle (everything sent).
const LSR_IDLE: u8 = 1 << 6;
const DEBUGCON: u16 = 0xE9;
/// Bound on every UART wait, so a missing or stuck UART cannot hang the run.
const SPIN_LIMIT: u32 = 1_000_000;

/// Programs COM1 for 115200 8N1 without interrupts.
pub fn init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB to reach the divisor
    outb(COM1, 0x01); // divisor 1 = 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8 data bits, no parity, 1 stop bit
    outb(COM1 + 2, 0xC7); // FIFO on and cleared
    outb(COM1 + 4, 0x03); // DTR, RTS; OUT2 off: no IRQ line
}

fn wait_lsr(bit: u8) {
    for _ in 0..SPIN_LIMIT {
        if inb(LSR) & bit != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// Sends one byte to COM1 and port 0xE9.
pub fn put_byte(b: u8) {
    wait_lsr(LSR_THR_EMPTY);
    outb(COM1, b);
    outb(DEBUGCON, b);
}

/// Waits until COM1 has sent everything (Bochs loses the tail otherwise).
pub fn drain() {
    wait_lsr(LSR_IDLE);
}

/// `fmt::Write` sink for the console.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(put_byte);
        Ok(())
    }
}

/// Prints one line on the console.
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}

/// Ends the run: exit status to QEMU's isa-debug-exit (a 32-bit `out`),
/// "Shutdown" to Bochs' power-off port, then halt for good.
pub fn end_run(all_passed: bool) -> ! {
    use thinvisor_abi::exit_code::{GUEST_FAILED, GUEST_PASSED};
    drain();
    let code = if all_passed {
        GUEST_PASSED
    } else {
        GUEST_FAILED
    };
    outl(thinvisor_abi::QEMU_EXIT_PORT, u32::from(code));
    for &b in b"Shutdown" {
        outb(thinvisor_abi::BOCHS_SHUTDOWN_PORT, b);
    }
    crate::cpu::halt_forever()
}

//! Ending the run: the emulators' exit devices, then a halt loop.

use crate::serial::Console;
use thinvisor_abi::{BOCHS_SHUTDOWN_PORT, QEMU_EXIT_PORT};
use x86_64::instructions::port::Port;

/// Stop the machine with `code` (see `thinvisor_abi::exit_code`). Under
/// QEMU the `isa-debug-exit` device ends the process with status
/// `(code << 1) | 1`; under Bochs, `Shutdown` on port 0x8900 powers off;
/// on real hardware the processor halts.
pub fn end_run(code: u8) -> ! {
    Console::drain();
    // SAFETY: both ports belong to emulator exit devices; on a machine
    // without them the writes go nowhere.
    unsafe {
        Port::<u32>::new(QEMU_EXIT_PORT).write(u32::from(code));
        let mut bochs = Port::<u8>::new(BOCHS_SHUTDOWN_PORT);
        for b in *b"Shutdown" {
            bochs.write(b);
        }
    }
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

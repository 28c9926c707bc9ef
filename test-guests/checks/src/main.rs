//! thinvisor's test guest: a small bare-metal kernel, booted like a
//! multiboot v1 kernel, that exercises the VMM-call interface
//! (docs/vmm-call.md) and reports one `PASS`/`FAIL` line per check on COM1 and
//! port 0xE9, then ends the run through QEMU's and Bochs' exit ports.
//!
//! The real guest only exists for `x86_64-unknown-none`; on any other target
//! this crate is a stub so that host-side workspace commands still build.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
#[macro_use]
mod console;
#[cfg(target_os = "none")]
mod bench;
#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod checks;
#[cfg(target_os = "none")]
mod cpu;
#[cfg(target_os = "none")]
mod demand;
#[cfg(target_os = "none")]
mod dma;
#[cfg(target_os = "none")]
mod entry;
#[cfg(target_os = "none")]
mod global;
mod guarded;
#[cfg(target_os = "none")]
mod hostile;
#[cfg(target_os = "none")]
mod interrupts;
#[cfg(target_os = "none")]
mod loader;
#[cfg(target_os = "none")]
mod logbuf;
#[cfg(target_os = "none")]
mod modes;
#[cfg(target_os = "none")]
mod paging;
#[cfg(target_os = "none")]
mod passthrough;
#[cfg(target_os = "none")]
mod pci;
#[cfg(target_os = "none")]
mod recover;
#[cfg(target_os = "none")]
mod smp;
#[cfg(target_os = "none")]
mod timer;
#[cfg(target_os = "none")]
mod user;

/// Host builds: the guest cannot run as a process.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("test-guest runs only as a bare-metal x86_64-unknown-none guest");
    std::process::exit(2);
}

/// Entered from the 64-bit part of the entry trampoline (`entry.rs`) on the
/// boot stack, with paging on and interrupts off.
#[cfg(target_os = "none")]
extern "sysv64" fn guest_main() -> ! {
    console::init();
    interrupts::init();
    let boot = boot::BootInfo::read();
    let mode = modes::Mode::from_cmdline(boot.cmdline());
    say!("test-guest: mode {}", mode.name());
    cpu::detect_vendor();
    boot.describe();
    paging::map_test_pages();
    mode.run(&boot)
}

/// A panic is a failed run: say where, then end it like an exception does.
#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    interrupts::fatal(format_args!(
        "FAIL panic: {} (during {})",
        info.message(),
        global::current_check()
    ))
}

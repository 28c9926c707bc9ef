//! The run modes chosen on the command line.

use crate::boot::BootInfo;
use crate::console::end_run;
use crate::{checks, cpu, global, interrupts, paging};

/// What the run does.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run every check and report.
    Checks,
    /// Touch memory outside guest RAM (the VMM should stop the run).
    Npf,
    /// `cli; hlt` (the VMM should stop the run).
    Halt,
    /// Triple fault (the VMM should stop the run).
    Triple,
    /// Measure the exit path (for `cargo xtask bench` under `-icount`).
    Bench,
    /// The pass-through layout's checks (`passthrough.rs`).
    Passthrough,
    /// Reset the machine through the keyboard controller (0xFE to port
    /// 0x64), as an OS reboot does: thinvisor reports and lets it act.
    Reboot,
    /// Only the disabled shell's check (thinvisor runs with `dbgsh=off`).
    DbgshOff,
    /// Random hostile operations on every CPU at once (`hostile.rs`).
    Hostile,
    /// Device DMA against thinvisor's IOMMU protection (`dma.rs`).
    Dma,
    /// Booted bare: start thinvisor from the module and go on as its
    /// guest (`loader.rs`).
    Loader,
}

impl Mode {
    const ALL: [Mode; 11] = [
        Mode::Checks,
        Mode::Npf,
        Mode::Halt,
        Mode::Triple,
        Mode::Bench,
        Mode::Passthrough,
        Mode::Reboot,
        Mode::DbgshOff,
        Mode::Hostile,
        Mode::Dma,
        Mode::Loader,
    ];

    /// The name used on the command line and in the mode line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Checks => "checks",
            Mode::Npf => "npf",
            Mode::Halt => "halt",
            Mode::Triple => "triple",
            Mode::Bench => "bench",
            Mode::Passthrough => "passthrough",
            Mode::Reboot => "reboot",
            Mode::DbgshOff => "dbgsh-off",
            Mode::Hostile => "hostile",
            Mode::Dma => "dma",
            Mode::Loader => "loader",
        }
    }

    /// The first token naming a mode wins; other tokens (the image path,
    /// anything else) are ignored. Default: `checks`.
    pub fn from_cmdline(cmdline: &str) -> Mode {
        cmdline
            .split_ascii_whitespace()
            .find_map(|tok| Mode::ALL.into_iter().find(|m| m.name() == tok))
            .unwrap_or(Mode::Checks)
    }

    /// Runs the mode; never returns.
    pub fn run(self, boot: &BootInfo) -> ! {
        global::set_current_check(self.name());
        match self {
            Mode::Checks => checks::run_all(boot),
            Mode::Passthrough => crate::passthrough::run_all(boot),
            Mode::Hostile => crate::hostile::run(boot),
            Mode::Dma => crate::dma::run_all(),
            Mode::Loader => crate::loader::run(boot),
            Mode::DbgshOff => {
                checks::run_one("dbgsh_disabled", || checks::dbgsh_disabled(boot));
                checks::finish()
            }
            Mode::Npf => {
                say!(
                    "test-guest: touching guest-physical {:#X} (outside guest RAM)",
                    paging::OUTSIDE_RAM
                );
                // SAFETY: the 2 MiB page at OUTSIDE_RAM is identity-mapped by
                // the entry code; the read is meant to leave guest RAM.
                let value = unsafe { (paging::OUTSIDE_RAM as *const u32).read_volatile() };
                say!("FAIL npf: read outside guest RAM returned");
                say!("test-guest: it read {:#x}", value);
                global::record(false);
                say!("SUMMARY: 0 passed, 1 failed");
                end_run(false)
            }
            Mode::Halt => {
                say!("test-guest: halting with interrupts off (cli; hlt)");
                crate::console::drain();
                cpu::halt_forever()
            }
            Mode::Bench => {
                crate::bench::run();
                end_run(true)
            }
            Mode::Reboot => {
                say!("test-guest: resetting the machine (0xFE to port 0x64)");
                crate::console::drain();
                // The keyboard controller's command port; 0xFE pulses the
                // reset line (the machine restarts).
                cpu::outb(0x64, 0xFE);
                cpu::halt_forever()
            }
            Mode::Triple => {
                say!("test-guest: triple fault (int3 with a zero-limit IDT)");
                crate::console::drain();
                interrupts::triple_fault();
                say!("FAIL triple: int3 with a zero-limit IDT returned");
                say!("SUMMARY: 0 passed, 1 failed");
                end_run(false)
            }
        }
    }
}

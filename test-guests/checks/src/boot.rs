//! What the loader told the guest, from the copy the entry code made.

use crate::cpu;
use crate::entry::{self, BootCopy};

/// The multiboot v1 magic a loader leaves in EAX.
pub const MULTIBOOT_MAGIC: u32 = 0x2BAD_B002;
/// Multiboot info flag: mem_lower/mem_upper are valid.
const FLAG_MEM: u32 = 1 << 0;
/// Multiboot info flag: cmdline is valid.
const FLAG_CMDLINE: u32 = 1 << 2;
/// Guest RAM assumed when the loader gives no memory information.
const DEFAULT_RAM: u64 = 64 << 20;

/// The boot facts the guest uses.
pub struct BootInfo {
    copy: BootCopy,
}

impl BootInfo {
    /// Reads the entry code's copy.
    pub fn read() -> Self {
        BootInfo {
            copy: entry::boot_copy(),
        }
    }

    fn multiboot(&self) -> bool {
        self.copy.magic == MULTIBOOT_MAGIC && self.copy.info != 0
    }

    /// The command line, or "" when there is none.
    pub fn cmdline(&self) -> &str {
        if !self.multiboot() || self.copy.flags & FLAG_CMDLINE == 0 {
            return "";
        }
        let len = (self.copy.cmdline_len as usize).min(255);
        core::str::from_utf8(&self.copy.cmdline[..len]).unwrap_or("")
    }

    /// Bytes of guest RAM (from mem_upper), or `None` when not given.
    pub fn ram_bytes(&self) -> Option<u64> {
        (self.multiboot() && self.copy.flags & FLAG_MEM != 0)
            .then(|| (u64::from(self.copy.mem_upper) + 1024) * 1024)
    }

    /// Guest RAM, assuming the default 64 MiB when unknown.
    pub fn ram_or_default(&self) -> u64 {
        self.ram_bytes().unwrap_or(DEFAULT_RAM)
    }

    /// One informational line for people reading the log.
    pub fn describe(&self) {
        let vendor = cpu::vendor();
        let vendor = core::str::from_utf8(&vendor).unwrap_or("?");
        if !self.multiboot() {
            say!(
                "test-guest: not entered by a multiboot loader (EAX {:#x}, EBX {:#x})",
                self.copy.magic,
                self.copy.info
            );
        }
        match self.ram_bytes() {
            Some(ram) => say!(
                "test-guest: vendor {} ({}), {} KiB RAM, cmdline \"{}\"",
                vendor,
                cpu::call_insn_name(),
                ram >> 10,
                self.cmdline()
            ),
            None => say!(
                "test-guest: vendor {} ({}), RAM size not given, cmdline \"{}\"",
                vendor,
                cpu::call_insn_name(),
                self.cmdline()
            ),
        }
    }
}

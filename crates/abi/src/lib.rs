//! The guest-visible ABI of thinvisor (docs/vmm-call.md), byte-compatible
//! with BitVisor's VMM calls.
//!
//! A guest executes VMCALL (`0F 01 C1`, Intel) or VMMCALL (`0F 01 D9`, AMD)
//! with the function number in RAX and arguments in RBX, RCX, RDX, RSI, RDI.
//! Results come back in RAX (and, per function, other registers); every
//! register a function does not return in is preserved.
#![no_std]

/// Function 0: look a function up by name. RBX = guest-linear address of a
/// NUL-terminated US-ASCII name. Returns its number in RAX, or 0.
pub const FN_LOOKUP: u64 = 0;

/// At most this many bytes of a name are read, NUL included (BitVisor's
/// limit). A name without a NUL in its first 256 bytes is unknown.
pub const NAME_MAX_BYTES: usize = 256;

/// The value RAX gets for an unknown name or an unregistered number.
pub const NO_FUNCTION: u64 = 0;

/// Names of the services thinvisor registers at start-up.
pub mod names {
    /// Mailbox to the VMM's debug shell.
    pub const DBGSH: &str = "dbgsh";
    /// Register a guest-physical log buffer (CPL 0 only).
    pub const LOG_SET_BUF: &str = "log_set_buf";
    /// Read the VMM log into a guest-linear buffer (any privilege).
    pub const LOG_READ: &str = "log_read";
    /// BitVisor registers its lookup under this name; looking it up yields 0.
    pub const GET_VMMCALL_NUMBER: &str = "get_vmmcall_number";
}

/// Values of the dbgsh mailbox (docs/vmm-call.md, Functions).
pub mod dbgsh {
    /// Returned when the VMM has nothing pending; also the "no answer" input.
    pub const NOTHING: u64 = u64::MAX;
    /// The shell wants one byte of input.
    pub const WANT_INPUT: u64 = 0;
    /// A NUL byte to print, or a NUL typed by the user.
    pub const NUL_BYTE: u64 = 0x100;
    /// The shell session ended (0x100 | '\n').
    pub const SESSION_END: u64 = 0x10A;
    /// The client's answer after printing a byte.
    pub const ACK: u64 = 0;
    /// What thinvisor's shell prints when a session starts, before the
    /// first prompt.
    pub const BANNER: &str = "thinvisor dbgsh; type help for the commands\n";
    /// thinvisor's shell prompt.
    pub const PROMPT: &str = "dbgsh> ";
    /// What the call streams (then 0x10A) when the shell is disabled
    /// (`dbgsh=off`).
    pub const DISABLED: &str = "dbgsh is disabled\n";
}

/// The instruction bytes of the two vendors' VMM-call instructions.
pub mod insn {
    /// Intel VMCALL.
    pub const VMCALL: [u8; 3] = [0x0F, 0x01, 0xC1];
    /// AMD VMMCALL.
    pub const VMMCALL: [u8; 3] = [0x0F, 0x01, 0xD9];
}

/// CPUID leaf 0x40000000: the hypervisor vendor leaf. EBX, ECX, EDX hold
/// this 12-byte signature; EAX the highest hypervisor leaf.
pub const CPUID_SIGNATURE: [u8; 12] = *b"thinvisor\0\0\0";
/// CPUID.1:ECX bit 31, "hypervisor present".
pub const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;

/// Status codes written to the emulator's exit port (QEMU's
/// `isa-debug-exit`, which ends QEMU with `(code << 1) | 1`). Bochs always
/// exits 1, so the serial log's lines are the authority there.
pub mod exit_code {
    /// The test guest: every check passed.
    pub const GUEST_PASSED: u8 = 0x10;
    /// The test guest: at least one check failed.
    pub const GUEST_FAILED: u8 = 0x11;
    /// thinvisor: the guest executed HLT (nothing else would wake it).
    pub const GUEST_HALTED: u8 = 0x20;
    /// thinvisor: the guest shut down (triple fault).
    pub const GUEST_SHUTDOWN: u8 = 0x21;
    /// thinvisor: the guest touched guest-physical memory it does not have.
    pub const GUEST_BAD_MEMORY: u8 = 0x22;
    /// thinvisor: an exit it cannot handle, or a failed VM entry.
    pub const VMM_UNHANDLED: u8 = 0x23;
    /// thinvisor: the boot input was unusable (no guest, bad module, ...).
    pub const BOOT_ERROR: u8 = 0x30;
    /// thinvisor: an internal error (panic or CPU exception in the VMM).
    pub const VMM_PANIC: u8 = 0x31;

    /// The process status QEMU exits with for `code`.
    pub const fn qemu_status(code: u8) -> i32 {
        ((code as i32) << 1) | 1
    }
}

/// I/O port of QEMU's `isa-debug-exit` device as the tests configure it.
pub const QEMU_EXIT_PORT: u16 = 0xF4;
/// I/O port where writing the string `Shutdown` powers Bochs off.
pub const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

//! The guest side of thinvisor's VMM-call interface (docs/vmm-call.md):
//! the pieces of the guest programs that are plain logic, kept here so the
//! host unit tests cover them, and, on x86-64 Linux, [`vmm`]: detecting
//! thinvisor and calling it from user space.
//!
//! The programs built on it (`dbgsh`, `vmmlog`, `vmmcall`, the C library of
//! `capi/`) share the exit statuses of [`status`].

pub mod cli;
pub mod client;
pub mod memscan;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod vmm;

/// The 12 bytes of a CPUID vendor-style signature (EBX, ECX, EDX, each
/// little-endian), the layout of leaf 0 and of the hypervisor leaf
/// 0x40000000.
pub fn signature_bytes(ebx: u32, ecx: u32, edx: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..4].copy_from_slice(&ebx.to_le_bytes());
    out[4..8].copy_from_slice(&ecx.to_le_bytes());
    out[8..12].copy_from_slice(&edx.to_le_bytes());
    out
}

/// `bytes` as printable ASCII, anything else as `\xNN`, so that a signature
/// padded with NULs (thinvisor's) or garbage shows unambiguously on one line
/// of a serial log.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'\\' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Which VMM-call instruction the processor's own vendor defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallInsn {
    /// Intel's VMCALL (`0F 01 C1`).
    Vmcall,
    /// AMD's VMMCALL (`0F 01 D9`).
    Vmmcall,
}

/// The instruction for the vendor string of CPUID leaf 0: VMMCALL for AMD
/// (and Hygon, AMD's licensee), VMCALL for everyone else. thinvisor takes
/// either on either vendor, but BitVisor, and real hardware without a
/// hypervisor, only know the vendor's own.
pub fn call_insn(vendor: &[u8; 12]) -> CallInsn {
    match vendor {
        b"AuthenticAMD" | b"HygonGenuine" => CallInsn::Vmmcall,
        _ => CallInsn::Vmcall,
    }
}

impl CallInsn {
    /// The other vendor's instruction (the second one to try).
    pub fn other(self) -> CallInsn {
        match self {
            CallInsn::Vmcall => CallInsn::Vmmcall,
            CallInsn::Vmmcall => CallInsn::Vmcall,
        }
    }

    /// The instruction's three bytes.
    pub fn bytes(self) -> [u8; 3] {
        match self {
            CallInsn::Vmcall => thinvisor_abi::insn::VMCALL,
            CallInsn::Vmmcall => thinvisor_abi::insn::VMMCALL,
        }
    }

    /// Its mnemonic, for messages.
    pub fn name(self) -> &'static str {
        match self {
            CallInsn::Vmcall => "vmcall",
            CallInsn::Vmmcall => "vmmcall",
        }
    }
}

/// Exit statuses shared by the guest programs (documented in README.md,
/// "From inside the guest"), distinct so a script can tell "no thinvisor
/// here" from "this thinvisor lacks the function" from a plain failure.
pub mod status {
    /// Done.
    pub const OK: i32 = 0;
    /// A runtime failure (an I/O error, the VMM refused the call).
    pub const FAILED: i32 = 1;
    /// No thinvisor: CPUID leaf 0x40000000 does not say thinvisor, or
    /// neither call instruction works. No VMM call was made.
    pub const NO_VMM: i32 = 2;
    /// thinvisor is there but does not know the function's name.
    pub const UNKNOWN_FUNCTION: i32 = 3;
    /// Bad command line (BSD's EX_USAGE).
    pub const USAGE: i32 = 64;
    /// Interrupted by Ctrl-C (128 + SIGINT, as a shell reports it).
    pub const INTERRUPTED: i32 = 130;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_layout() {
        // "TCGTCGTCGTCG" as QEMU TCG reports it.
        let tcg = u32::from_le_bytes(*b"TCGT");
        let b = u32::from_le_bytes(*b"CGTC");
        let c = u32::from_le_bytes(*b"GTCG");
        assert_eq!(&signature_bytes(tcg, b, c), b"TCGTCGTCGTCG");
    }

    #[test]
    fn escapes_non_printables() {
        assert_eq!(escape(b"thinvisor\0\0\0"), r"thinvisor\x00\x00\x00");
        assert_eq!(escape(b"a b\\\xff"), r"a\x20b\x5c\xff");
        assert_eq!(escape(b"TCGTCGTCGTCG"), "TCGTCGTCGTCG");
    }

    #[test]
    fn vendors() {
        assert_eq!(call_insn(b"AuthenticAMD"), CallInsn::Vmmcall);
        assert_eq!(call_insn(b"HygonGenuine"), CallInsn::Vmmcall);
        assert_eq!(call_insn(b"GenuineIntel"), CallInsn::Vmcall);
    }

    #[test]
    fn instructions() {
        assert_eq!(CallInsn::Vmcall.other(), CallInsn::Vmmcall);
        assert_eq!(CallInsn::Vmmcall.other(), CallInsn::Vmcall);
        assert_eq!(CallInsn::Vmcall.bytes(), [0x0f, 0x01, 0xc1]);
        assert_eq!(CallInsn::Vmmcall.bytes(), [0x0f, 0x01, 0xd9]);
        assert_eq!(CallInsn::Vmmcall.name(), "vmmcall");
    }
}

//! Plain logic of the command-line programs: argument parsing, output
//! formats, and the bookkeeping of `log_read`'s stream offsets.

use std::fmt::Write as _;

/// A number on a command line: decimal, hex with `0x`/`0X`, or a negative
/// decimal taken as its 64-bit two's complement (`-1` is all ones, the
/// dbgsh mailbox's "no answer"). None for anything else, or when it does
/// not fit in 64 bits.
pub fn parse_u64(text: &str) -> Option<u64> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    if let Some(negative) = text.strip_prefix('-') {
        if negative.is_empty() || !negative.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let magnitude: u64 = negative.parse().ok()?;
        // -2^63 is the smallest value a 64-bit register means as signed.
        if magnitude > 1 << 63 {
            return None;
        }
        return Some(magnitude.wrapping_neg());
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The six registers a VMM call returns, in the order of the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
}

/// `rax=0x... rbx=0x... rcx=0x... rdx=0x... rsi=0x... rdi=0x...`: one line,
/// fixed width (16 hex digits), so scripts can cut it up.
pub fn format_regs(r: &Regs) -> String {
    let mut out = String::new();
    for (name, value) in [
        ("rax", r.rax),
        ("rbx", r.rbx),
        ("rcx", r.rcx),
        ("rdx", r.rdx),
        ("rsi", r.rsi),
        ("rdi", r.rdi),
    ] {
        if !out.is_empty() {
            out.push(' ');
        }
        let _ = write!(out, "{name}={value:#018x}");
    }
    out
}

/// The NUL-terminated bytes function 0 is given for `name`, or None when
/// the name cannot be looked up: a NUL inside it, or more than
/// [`thinvisor_abi::NAME_MAX_BYTES`] bytes with its NUL (the VMM reads no
/// further and answers 0 for it, so asking is pointless).
pub fn lookup_name(name: &[u8]) -> Option<Vec<u8>> {
    if name.contains(&0) || name.len() >= thinvisor_abi::NAME_MAX_BYTES {
        return None;
    }
    let mut bytes = name.to_vec();
    bytes.push(0);
    Some(bytes)
}

/// What one `log_read` answer means for a reader that asked from offset
/// `requested`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStep {
    /// Bytes the reader never saw: they left the VMM's ring before it
    /// asked (RBX beyond the offset asked for).
    pub missed: u64,
    /// Bytes copied into the buffer.
    pub copied: usize,
    /// Where the next read starts (RBX + RAX).
    pub next: u64,
}

/// Interprets `log_read`'s RAX (`copied`) and RBX (`first`) for a read of at
/// most `len` bytes from `requested`. None when the VMM refused the
/// buffer (RAX all ones) or answered something impossible (more bytes
/// than asked for, a start before the offset asked for, an offset past
/// 2^64): the reader then stops instead of printing garbage.
pub fn log_step(requested: u64, len: usize, copied: u64, first: u64) -> Option<LogStep> {
    if copied == u64::MAX || copied > len as u64 || first < requested {
        return None;
    }
    Some(LogStep {
        missed: first - requested,
        copied: usize::try_from(copied).ok()?,
        next: first.checked_add(copied)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("4096"), Some(4096));
        assert_eq!(parse_u64("0x1000"), Some(0x1000));
        assert_eq!(parse_u64("0XfF"), Some(0xff));
        assert_eq!(parse_u64("-1"), Some(u64::MAX));
        assert_eq!(parse_u64("-2"), Some(u64::MAX - 1));
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64("-9223372036854775808"), Some(1 << 63));
        for bad in [
            "",
            "0x",
            "-",
            "+1",
            "1a",
            "0x1g",
            "18446744073709551616",
            "0x10000000000000000",
            "-9223372036854775809",
            " 1",
            "--1",
        ] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn register_line() {
        let r = Regs {
            rax: 3,
            rbx: u64::MAX,
            rcx: 0x10,
            ..Regs::default()
        };
        assert_eq!(
            format_regs(&r),
            "rax=0x0000000000000003 rbx=0xffffffffffffffff rcx=0x0000000000000010 \
             rdx=0x0000000000000000 rsi=0x0000000000000000 rdi=0x0000000000000000"
        );
    }

    #[test]
    fn names() {
        assert_eq!(lookup_name(b"dbgsh").unwrap(), b"dbgsh\0");
        assert_eq!(lookup_name(b"").unwrap(), b"\0");
        assert_eq!(lookup_name(b"a\0b"), None);
        assert_eq!(lookup_name(&[b'x'; 255]).unwrap().len(), 256);
        assert_eq!(lookup_name(&[b'x'; 256]), None);
    }

    #[test]
    fn log_steps() {
        // Everything there: no loss, the next read follows on.
        assert_eq!(
            log_step(100, 4096, 50, 100),
            Some(LogStep {
                missed: 0,
                copied: 50,
                next: 150
            })
        );
        // The ring overran: 900 bytes gone.
        assert_eq!(
            log_step(100, 4096, 10, 1000),
            Some(LogStep {
                missed: 900,
                copied: 10,
                next: 1010
            })
        );
        // Nothing new.
        assert_eq!(log_step(7, 16, 0, 7).unwrap().next, 7);
        // Refused, or nonsense.
        assert_eq!(log_step(0, 16, u64::MAX, 0), None);
        assert_eq!(log_step(0, 16, 17, 0), None);
        assert_eq!(log_step(10, 16, 1, 9), None);
        assert_eq!(log_step(0, 16, 2, u64::MAX), None);
    }
}

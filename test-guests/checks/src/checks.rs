//! The checks of `checks` mode. Each returns `Ok(())` or a short reason,
//! printed as `PASS <name>` / `FAIL <name>: <why>`.

use crate::boot::BootInfo;
use crate::console::end_run;
use crate::cpu::{self, vmm_call, Regs};
use crate::entry::{self, LOG32_BUF, LOG32_VA};
use crate::global;
use crate::paging::{self, HIGH_2M, HIGH_4K, NON_CANONICAL, OUTSIDE_RAM, UNMAPPED};
use crate::{demand, demand::WINDOW};
use crate::{logbuf, recover, user};
use core::cell::UnsafeCell;
use core::fmt;
use thinvisor_abi as abi;

/// Longest reason kept; kept under clippy's 128-byte `Result` error limit.
const WHY_MAX: usize = 120;

/// A failure reason: a fixed-size, truncating text buffer (no allocator).
pub struct Why {
    buf: [u8; WHY_MAX],
    len: u8,
}

impl Why {
    fn new() -> Self {
        Why {
            buf: [0; WHY_MAX],
            len: 0,
        }
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("(unprintable reason)")
    }
}

impl fmt::Write for Why {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            let len = usize::from(self.len);
            if len == WHY_MAX {
                break;
            }
            // Only ASCII goes in, so truncation never splits a character.
            self.buf[len] = if b.is_ascii() { b } else { b'?' };
            self.len += 1;
        }
        Ok(())
    }
}

/// Formats a reason.
pub fn why(args: fmt::Arguments<'_>) -> Why {
    let mut w = Why::new();
    let _ = fmt::write(&mut w, args);
    w
}

pub type CheckResult = Result<(), Why>;

/// One check: its reported name and its body.
type Check = (&'static str, fn(&BootInfo) -> CheckResult);

/// Returns from the check with a formatted reason.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err(why(format_args!($($arg)*)))
    };
}

/// Fails the check unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            fail!($($arg)*);
        }
    };
}

mod shell;
pub use shell::dbgsh_disabled;

/// Printable form of a name for reasons: at most 24 bytes, then "...".
struct Shown<'a>(&'a [u8]);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for &b in self.0.iter().take(24) {
            if b.is_ascii_graphic() || b == b' ' {
                fmt::Write::write_char(f, char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        if self.0.len() > 24 {
            write!(f, "...({} bytes)", self.0.len())?;
        }
        f.write_str("\"")
    }
}

// ---------------------------------------------------------------- helpers

/// A VMM call with RAX and RBX set, everything else zero.
fn call2(rax: u64, rbx: u64) -> Regs {
    let mut r = Regs {
        rax,
        rbx,
        ..Regs::default()
    };
    vmm_call(&mut r);
    r
}

/// Function 0 on the NUL-terminated name at linear address `addr`.
fn lookup_at(addr: u64) -> u64 {
    call2(abi::FN_LOOKUP, addr).rax
}

/// Function 0 on `name`, copied with its NUL into a stack buffer.
fn lookup(name: &[u8]) -> u64 {
    let mut buf = [0u8; abi::NAME_MAX_BYTES + 8];
    assert!(name.len() < buf.len());
    buf[..name.len()].copy_from_slice(name);
    lookup_at(buf.as_ptr() as u64)
}

/// The number of "dbgsh", which several checks need.
fn dbgsh_number() -> Result<u64, Why> {
    match lookup(abi::names::DBGSH.as_bytes()) {
        0 => Err(why(format_args!("lookup of \"dbgsh\" returned 0"))),
        n => Ok(n),
    }
}

/// Distinct 64-bit patterns for the registers that are not arguments;
/// their high halves are set so that 32-bit truncation shows too.
fn patterned(rax: u64, rbx: u64) -> Regs {
    let p = |i: u64| 0xDEC0_DE00_0000_0000 | (i << 32) | (0x0101_0101 * i);
    Regs {
        rax,
        rbx,
        rcx: p(1),
        rdx: p(2),
        rsi: p(3),
        rdi: p(4),
        rbp: p(5),
        r8: p(6),
        r9: p(7),
        r10: p(8),
        r11: p(9),
        r12: p(10),
        r13: p(11),
        r14: p(12),
        r15: p(13),
    }
}

/// Fails unless every register but RAX came back as it went in.
fn ensure_preserved(before: &Regs, after: &Regs, what: &str) -> CheckResult {
    for ((name, b), (_, a)) in before.all_but_rax().into_iter().zip(after.all_but_rax()) {
        ensure!(a == b, "{name} changed from {b:#x} to {a:#x} by {what}");
    }
    Ok(())
}

// ----------------------------------------------------------------- checks

/// `lookup_paging_off`: the entry code's lookups with paging off.
fn lookup_paging_off(_: &BootInfo) -> CheckResult {
    let r = entry::paging_off_result();
    match r.status {
        1 => {}
        2 => {
            let name = match r.vector {
                6 => "#UD",
                13 => "#GP",
                14 => "#PF",
                _ => "an exception",
            };
            fail!(
                "{name} (vector {}) on the VMM call in 32-bit mode with paging off",
                r.vector
            )
        }
        _ => fail!("the 32-bit entry code did not run the lookups"),
    }
    ensure!(
        r.dbgsh != 0,
        "\"dbgsh\" looked up with paging off returned 0"
    );
    ensure!(
        r.nosuch == 0,
        "\"nosuch\" looked up with paging off returned {:#x}",
        r.nosuch
    );
    let n64 = dbgsh_number()?;
    ensure!(
        u64::from(r.dbgsh) == n64,
        "\"dbgsh\" is {:#x} with paging off but {n64:#x} in 64-bit mode",
        r.dbgsh
    );
    Ok(())
}

/// `cpuid_signature`: the hypervisor bit and vendor leaf.
fn cpuid_signature(_: &BootInfo) -> CheckResult {
    let [_, _, ecx, _] = cpu::cpuid(1, 0);
    ensure!(
        ecx & abi::CPUID_HYPERVISOR_BIT != 0,
        "CPUID.1:ECX bit 31 (hypervisor) is clear"
    );
    let [eax, ebx, ecx, edx] = cpu::cpuid(0x4000_0000, 0);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&ecx.to_le_bytes());
    sig[8..].copy_from_slice(&edx.to_le_bytes());
    ensure!(
        sig == abi::CPUID_SIGNATURE,
        "leaf 0x40000000 signature is {} (EBX {ebx:#x} ECX {ecx:#x} EDX {edx:#x})",
        Shown(&sig)
    );
    ensure!(
        eax >= 0x4000_0000,
        "leaf 0x40000000 EAX is {eax:#x}, below 0x40000000"
    );
    Ok(())
}

/// `lookup_known`: the two always-registered names.
fn lookup_known(_: &BootInfo) -> CheckResult {
    let dbgsh = lookup(abi::names::DBGSH.as_bytes());
    let log = lookup(abi::names::LOG_SET_BUF.as_bytes());
    ensure!(dbgsh != 0, "\"dbgsh\" returned 0");
    ensure!(log != 0, "\"log_set_buf\" returned 0");
    ensure!(
        dbgsh != log,
        "\"dbgsh\" and \"log_set_buf\" both returned {dbgsh:#x}"
    );
    Ok(())
}

/// `lookup_unknown`: names that are not registered, or nearly registered.
fn lookup_unknown(_: &BootInfo) -> CheckResult {
    let names: [&[u8]; 5] = [
        b"nosuch",
        abi::names::GET_VMMCALL_NUMBER.as_bytes(),
        b"boot",
        b"DBGSH",
        b"dbgsh ",
    ];
    for name in names {
        let n = lookup(name);
        ensure!(n == 0, "{} returned {n:#x}", Shown(name));
    }
    Ok(())
}

/// `lookup_empty`: "" is no name.
fn lookup_empty(_: &BootInfo) -> CheckResult {
    let n = lookup(b"");
    ensure!(n == 0, "\"\" returned {n:#x}");
    Ok(())
}

/// `lookup_overlong`: the 256-byte limit, NUL included.
fn lookup_overlong(_: &BootInfo) -> CheckResult {
    let mut buf = [0u8; 320];

    // 300 'a', NUL only at byte 300.
    buf[..300].fill(b'a');
    buf[300] = 0;
    let n = lookup_at(buf.as_ptr() as u64);
    ensure!(n == 0, "300 'a' without a NUL in 256 bytes returned {n:#x}");

    // "dbgsh", 300 'x', NUL: a known prefix must not match.
    buf.fill(0);
    buf[..5].copy_from_slice(b"dbgsh");
    buf[5..305].fill(b'x');
    let n = lookup_at(buf.as_ptr() as u64);
    ensure!(n == 0, "\"dbgsh\" + 300 'x' returned {n:#x}");

    // 255 characters + NUL: exactly 256 bytes, readable, unknown.
    buf.fill(0);
    buf[..255].fill(b'q');
    let n = lookup_at(buf.as_ptr() as u64);
    ensure!(n == 0, "a 255-character unknown name returned {n:#x}");
    Ok(())
}

/// `lookup_bad_pointer`: names the VMM cannot (fully) read give 0; the VMM
/// must not fault, stop the run, or need bytes past the NUL.
fn lookup_bad_pointer(_: &BootInfo) -> CheckResult {
    let n = lookup_at(UNMAPPED);
    ensure!(n == 0, "unmapped {UNMAPPED:#x} returned {n:#x}");
    let n = lookup_at(NON_CANONICAL);
    ensure!(n == 0, "non-canonical {NON_CANONICAL:#x} returned {n:#x}");
    let n = lookup_at(OUTSIDE_RAM);
    ensure!(
        n == 0,
        "{OUTSIDE_RAM:#x} (outside guest RAM) returned {n:#x}"
    );

    // HIGH_4K + 0x2000 is a hole: "abc" runs into it without a NUL.
    let hole = HIGH_4K + 0x2000;
    // SAFETY: HIGH_4K + 0x1000 .. + 0x2000 is this guest's data page 2.
    unsafe { paging::write_linear(hole - 3, b"abc") };
    let n = lookup_at(hole - 3);
    ensure!(
        n == 0,
        "\"abc\" running into an unmapped page at {hole:#x} returned {n:#x}"
    );

    // "dbgsh\0" whose NUL is the last mapped byte.
    let dbgsh = dbgsh_number()?;
    // SAFETY: as above.
    unsafe { paging::write_linear(hole - 6, b"dbgsh\0") };
    let n = lookup_at(hole - 6);
    ensure!(
        n == dbgsh,
        "\"dbgsh\" ending 1 byte before an unmapped page returned {n:#x}, not {dbgsh:#x}"
    );
    Ok(())
}

/// `lookup_paged_high`: names crossing page boundaries at high addresses,
/// where linear and physical addresses differ.
fn lookup_paged_high(boot: &BootInfo) -> CheckResult {
    let dbgsh = dbgsh_number()?;

    // 4 KiB pages: "dbg" at the end of frame 0, "sh\0" at the start of the
    // non-adjacent frame 2.
    let va = HIGH_4K + 0xFFD;
    // SAFETY: HIGH_4K .. + 0x2000 is mapped to this guest's data pages.
    unsafe { paging::write_linear(va, b"dbgsh\0") };
    let (p0, p2) = (paging::data_page_phys(0), paging::data_page_phys(2));
    ensure!(
        paging::read_phys(p0 + 0xFFD) == b'd' && paging::read_phys(p2) == b's',
        "the guest's own 4 KiB mapping at {HIGH_4K:#x} is broken"
    );
    let n = lookup_at(va);
    ensure!(
        n == dbgsh,
        "\"dbgsh\" at {va:#x} (4 KiB pages) returned {n:#x}, not {dbgsh:#x}"
    );

    // 2 MiB pages: "db" at the end of frame A, "gsh\0" at the start of B.
    let ram = boot.ram_or_default();
    let needed = paging::PHYS_2M_A.max(paging::PHYS_2M_B) + 0x20_0000;
    ensure!(
        ram >= needed,
        "guest RAM ({} KiB) too small for the 2 MiB-page test (needs {} KiB)",
        ram >> 10,
        needed >> 10
    );
    let va = HIGH_2M + 0x1F_FFFE;
    // SAFETY: HIGH_2M .. + 4 MiB is mapped to frames A and B, which lie in
    // guest RAM (checked above) above this image and are otherwise unused.
    unsafe { paging::write_linear(va, b"dbgsh\0") };
    ensure!(
        paging::read_phys(paging::PHYS_2M_A + 0x1F_FFFE) == b'd'
            && paging::read_phys(paging::PHYS_2M_B) == b'g',
        "the guest's own 2 MiB mapping at {HIGH_2M:#x} is broken"
    );
    let n = lookup_at(va);
    ensure!(
        n == dbgsh,
        "\"dbgsh\" at {va:#x} (2 MiB pages) returned {n:#x}, not {dbgsh:#x}"
    );
    Ok(())
}

/// `invalid_function`: unregistered numbers, all 64 bits of RAX counting.
fn invalid_function(_: &BootInfo) -> CheckResult {
    for rax in [0x7FFF_FFFF, u64::MAX] {
        let n = call2(rax, 0).rax;
        ensure!(n == 0, "function {rax:#x} returned RAX {n:#x}");
    }
    let name = b"dbgsh\0";
    let rax = 0x1_0000_0000;
    let n = call2(rax, name.as_ptr() as u64).rax;
    ensure!(
        n == 0,
        "function {rax:#x} with RBX = \"dbgsh\" returned {n:#x} (taken as function 0?)"
    );
    Ok(())
}

/// `register_preservation`: a lookup and a dbgsh poll keep every register
/// but RAX.
fn register_preservation(_: &BootInfo) -> CheckResult {
    let name = b"dbgsh\0";
    let before = patterned(abi::FN_LOOKUP, name.as_ptr() as u64);
    let mut after = before;
    vmm_call(&mut after);
    ensure!(
        after.rax != 0,
        "\"dbgsh\" looked up with patterned registers returned 0"
    );
    ensure_preserved(&before, &after, "a lookup")?;

    let before = patterned(after.rax, abi::dbgsh::NOTHING);
    let mut after = before;
    vmm_call(&mut after);
    ensure_preserved(&before, &after, "a dbgsh poll")
}

/// `log_set_buf_accepted`: unregistering returns RAX = 0 and keeps the
/// other registers.
fn log_set_buf_accepted(_: &BootInfo) -> CheckResult {
    let f = lookup(abi::names::LOG_SET_BUF.as_bytes());
    ensure!(f != 0, "\"log_set_buf\" returned 0");
    let mut before = patterned(f, 0);
    before.rcx = 0;
    let mut after = before;
    vmm_call(&mut after);
    ensure!(
        after.rax == 0,
        "log_set_buf(0, 0) returned {:#x}, not 0",
        after.rax
    );
    ensure_preserved(&before, &after, "log_set_buf(0, 0)")
}

// ------------------------------------------------------------- log_read

/// How the VMM's log starts (its first line is
/// `thinvisor: [INFO ] thinvisor 0.1.0 starting`).
const LOG_PREFIX: &[u8] = b"thinvisor: [INFO ] thinvisor ";
/// `log_read`'s answer when the caller may not write the buffer (all ones
/// of the 64-bit mode's width).
const REFUSED: u64 = u64::MAX;
/// The page-fault error code of a write to a not-present page at CPL 0.
const PF_WRITE_NOT_PRESENT: u64 = 0x2;
/// CR0.WP, CR0.PG, CR4.PSE, CR4.PAE.
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u32 = 1 << 31;
const CR4_PSE: u32 = 1 << 4;
const CR4_PAE: u32 = 1 << 5;

/// A present, writable buffer for reference reads of the log.
const SCRATCH_LEN: usize = 16 * 1024;
#[repr(C, align(4096))]
struct Scratch(UnsafeCell<[u8; SCRATCH_LEN]>);
// SAFETY: one CPU; only the checks (and the VMM, during their calls) touch
// it.
unsafe impl Sync for Scratch {}
static SCRATCH: Scratch = Scratch(UnsafeCell::new([0; SCRATCH_LEN]));

fn scratch() -> u64 {
    SCRATCH.0.get() as u64
}

/// Reads a byte the VMM may have written, at a mapped linear address.
///
/// # Safety
/// `va` must be mapped and readable.
unsafe fn peek(va: u64) -> u8 {
    // SAFETY: passed on from the caller; volatile because the VMM, not
    // this program, wrote it.
    unsafe { (va as *const u8).read_volatile() }
}

/// The number of "log_read".
fn log_read_number() -> Result<u64, Why> {
    match lookup(abi::names::LOG_READ.as_bytes()) {
        0 => Err(why(format_args!("lookup of \"log_read\" returned 0"))),
        n => Ok(n),
    }
}

/// `log_read(buf, len, from)` from CPL 0: (RAX, RBX). A page fault the
/// demand pager does not handle fails the check instead of the run.
fn log_read(number: u64, buf: u64, len: u64, from: u64) -> Result<(u64, u64), Why> {
    recover::vmm_call4(cpu::uses_vmcall(), number, buf, len, from, recover::PF).map_err(|c| {
        why(format_args!(
            "#PF error {:#x} cr2 {:#x} at rip {:#x} not for the demand pager (buffer {buf:#x})",
            c.error, c.cr2, c.rip
        ))
    })
}

/// Fails unless `got` (the bytes of stream offsets 0.. that a check
/// received, one by one) starts with the log's first line, is printable
/// text, and equals what a fresh read from offset 0 into a present
/// buffer gives now.
fn ensure_log_text(number: u64, n: u64, got: impl Fn(u64) -> u8) -> CheckResult {
    ensure!(
        n as usize <= SCRATCH_LEN,
        "{n} bytes are more than the reference buffer holds"
    );
    let (m, first) = log_read(number, scratch(), n, 0)?;
    ensure!(
        (m, first) == (n, 0),
        "the reference read of {n} bytes from 0 returned RAX {m:#x} RBX {first:#x}"
    );
    let prefix_len = LOG_PREFIX.len().min(n as usize) as u64;
    let mut head = [0u8; 32];
    for i in 0..prefix_len {
        head[i as usize] = got(i);
    }
    ensure!(
        &head[..prefix_len as usize] == LOG_PREFIX,
        "the buffer starts {}, not {}",
        Shown(&head[..prefix_len as usize]),
        Shown(LOG_PREFIX)
    );
    for i in 0..n {
        let b = got(i);
        ensure!(
            b.is_ascii_graphic() || b == b' ' || b == b'\n' || b == b'\r' || b == b'\t',
            "byte {i} of the log is {b:#04x}, not printable text"
        );
        // SAFETY: the scratch buffer is present and n <= SCRATCH_LEN.
        let want = unsafe { peek(scratch() + i) };
        ensure!(
            b == want,
            "byte {i} is {b:#04x} but a read from offset 0 now gives {want:#04x}"
        );
    }
    Ok(())
}

/// `log_read_32bit` / `log_read_pae`: the trampoline's demand-paging read
/// with 32-bit or PAE paging (`entry.rs`), checked from its record.
fn log_read_legacy(pae: bool) -> CheckResult {
    let r = entry::log32_result(pae);
    let mode = if pae { "PAE" } else { "32-bit" };
    match r.status {
        1 => {}
        2 if r.vector == 14 => fail!(
            "#PF error {:#x} at eip {:#x} cr2 {:#x} not for the demand pager, stage {} with {mode} paging ({} mapped before)",
            r.frame[0],
            r.frame[1],
            r.cr2,
            r.stage,
            r.faults
        ),
        2 => fail!(
            "vector {} at stage {} with {mode} paging (frame {:#x} {:#x}, cr2 {:#x}, {} faults mapped)",
            r.vector,
            r.stage,
            r.frame[0],
            r.frame[1],
            r.cr2,
            r.faults
        ),
        s => fail!("the 32-bit entry code did not run it (status {s})"),
    }
    ensure!(
        r.cr0 & CR0_PG != 0
            && r.cr4 & CR4_PAE == if pae { CR4_PAE } else { 0 }
            && (pae || r.cr4 & CR4_PSE != 0),
        "paging was not as set up: CR0 {:#x} CR4 {:#x}",
        r.cr0,
        r.cr4
    );
    let number = log_read_number()?;
    ensure!(
        u64::from(r.number) == number,
        "\"log_read\" looked up with {mode} paging returned {:#x}, in 64-bit mode {number:#x}",
        r.number
    );
    ensure!(r.stage == 4, "stopped at stage {}", r.stage);
    let (rax, rbx, buf, len) = (r.rax, r.rbx, r.buf, r.len);
    ensure!(
        rax != u32::MAX,
        "log_read({buf:#x}, {len:#x}, 0) was refused (EAX all ones) after {} faults",
        r.faults
    );
    let into_second = (LOG32_VA + 0x1000) - LOG32_BUF;
    ensure!(
        rax > into_second && rax <= len,
        "log_read({buf:#x}, {len:#x}, 0) returned EAX {rax:#x}: not into the second page"
    );
    ensure!(rbx == 0, "log_read from 0 returned EBX {rbx:#x}");
    ensure!(
        r.faults == 1
            && r.first_cr2 == LOG32_VA + 0x1000
            && u64::from(r.first_error) == PF_WRITE_NOT_PRESENT
            && u64::from(r.errors_or) == PF_WRITE_NOT_PRESENT,
        "{} page faults, first cr2 {:#x} error {:#x} (all: {:#x}); want 1 at {:#x} error 0x2",
        r.faults,
        r.first_cr2,
        r.first_error,
        r.errors_or,
        LOG32_VA + 0x1000
    );
    ensure!(
        (r.rax2, r.rbx2) == (0, rax),
        "log_read from the end ({rax:#x}) returned EAX {:#x} EBX {:#x}",
        r.rax2,
        r.rbx2
    );
    let first_frame = entry::log32_frame(usize::from(pae));
    let second_frame = entry::log32_frame(2 + usize::from(pae));
    ensure!(
        u64::from(r.mapped) & !0xFFF == second_frame,
        "the #PF handler mapped {:#x}, not frame {second_frame:#x}",
        r.mapped
    );
    let in_first = u64::from(into_second);
    let offset = u64::from(LOG32_BUF & 0xFFF);
    ensure_log_text(number, u64::from(rax), |i| {
        if i < in_first {
            paging::read_phys(first_frame + offset + i)
        } else {
            paging::read_phys(second_frame + i - in_first)
        }
    })?;
    say!(
        "test-guest: log_read with {mode} paging: {rax} bytes from {buf:#x}, {} page fault",
        r.faults
    );
    Ok(())
}

/// `log_read_32bit`: see `log_read_legacy`.
fn log_read_32bit(_: &BootInfo) -> CheckResult {
    log_read_legacy(false)
}

/// `log_read_pae`: see `log_read_legacy`.
fn log_read_pae(_: &BootInfo) -> CheckResult {
    log_read_legacy(true)
}

/// What `log_read_4level` asks for.
const LOG_4LEVEL_WANT: u64 = 10_000;

/// `log_read_4level`: a 3-page buffer at `demand::WINDOW` whose second and
/// third pages are not present; the #PF handler maps them as the VMM
/// injects the faults; the log from offset 0 arrives; a read from its end
/// returns nothing.
fn log_read_4level(_: &BootInfo) -> CheckResult {
    let number = log_read_number()?;
    let (have, first) = log_read(number, scratch(), SCRATCH_LEN as u64, 0)?;
    ensure!(
        have != REFUSED && have > 0 && first == 0,
        "reading the log into a present buffer returned RAX {have:#x} RBX {first:#x}"
    );
    // Start so that the copy crosses into the second page even when the
    // log is short, and the whole request fits in the three pages.
    let buf_bytes = demand::BUF_PAGES * 4096;
    let expect = have.min(LOG_4LEVEL_WANT);
    let start = 4096u64.saturating_sub(expect / 2) & !0xF;
    let len = LOG_4LEVEL_WANT.min(buf_bytes - start);
    let buf = WINDOW + start;

    demand::reset(0xCC);
    demand::arm(WINDOW, WINDOW + buf_bytes);
    let result = log_read(number, buf, len, 0);
    demand::disarm();
    let st = demand::stats();
    let (rax, rbx) =
        result.map_err(|w| why(format_args!("{} ({} mapped before)", w.as_str(), st.faults)))?;

    ensure!(
        rax != REFUSED,
        "log_read({buf:#x}, {len}, 0) was refused after {} faults (first cr2 {:#x})",
        st.faults,
        st.first_cr2
    );
    ensure!(
        rax >= expect.min(len) && rax <= len,
        "log_read({buf:#x}, {len}, 0) returned {rax} bytes; {have} were there before"
    );
    ensure!(
        start + rax > 4096,
        "{rax} bytes from {buf:#x} do not reach the second page"
    );
    ensure!(
        have <= 4096 || rax > 4096,
        "only {rax} of {have} bytes copied"
    );
    ensure!(rbx == 0, "log_read from 0 returned RBX {rbx:#x}");
    let pages_after_first = (start + rax - 1) / 4096;
    ensure!(
        st.faults == pages_after_first
            && st.first_cr2 == WINDOW + 0x1000
            && st.first_error == PF_WRITE_NOT_PRESENT
            && st.errors_or == PF_WRITE_NOT_PRESENT,
        "{} page faults, first cr2 {:#x} error {:#x} (all: {:#x}); want {pages_after_first} from {:#x}, error 0x2",
        st.faults,
        st.first_cr2,
        st.first_error,
        st.errors_or,
        WINDOW + 0x1000
    );
    ensure_log_text(number, rax, |i| {
        // SAFETY: the buffer's pages that the copy reached are mapped now.
        unsafe { peek(buf + i) }
    })?;
    if start > 0 {
        // SAFETY: the first page is present.
        let before = unsafe { peek(buf - 1) };
        ensure!(
            before == 0xCC,
            "the byte before the buffer became {before:#04x}"
        );
    }
    let end = buf + rax;
    if (end & 0xFFF) != 0 {
        // SAFETY: the page holding the last byte copied is mapped.
        let after = unsafe { peek(end) };
        ensure!(
            after == 0xCC,
            "the byte after the {rax} copied became {after:#04x}"
        );
    }

    let (rax2, rbx2) = log_read(number, buf, 0x100, rax)?;
    ensure!(
        (rax2, rbx2) == (0, rax),
        "log_read from the end ({rax:#x}) returned RAX {rax2:#x} RBX {rbx2:#x}"
    );
    say!(
        "test-guest: log_read with 4-level paging: {rax} bytes from {buf:#x}, {} page faults",
        st.faults
    );
    Ok(())
}

/// Fails unless the 4 KiB frame at `pa` still holds only `fill`.
fn ensure_untouched(pa: u64, fill: u8, what: &str) -> CheckResult {
    for i in 0..4096 {
        let b = paging::read_phys(pa + i);
        ensure!(
            b == fill,
            "byte {i} of the {what} page became {b:#04x} (was {fill:#04x})"
        );
    }
    Ok(())
}

/// `log_read_refused`: buffers the caller may not write give all ones and
/// stay unwritten; a user buffer from CPL 3 works.
fn log_read_refused(_: &BootInfo) -> CheckResult {
    let number = log_read_number()?;
    let (rax, _) = log_read(number, NON_CANONICAL, 64, 0)?;
    ensure!(
        rax == REFUSED,
        "non-canonical {NON_CANONICAL:#x} returned RAX {rax:#x}"
    );

    const FILL: u8 = 0x5A;
    demand::reset(FILL);
    let cr0 = cpu::read_cr0();
    if cr0 & CR0_WP == 0 {
        // SAFETY: WP only makes read-only pages read-only for CPL 0 too;
        // nothing of this guest writes to one.
        unsafe { cpu::write_cr0(cr0 | CR0_WP) };
    }
    let result = log_read(number, demand::READ_ONLY, 64, 0);
    if cr0 & CR0_WP == 0 {
        // SAFETY: puts CR0 back as it was.
        unsafe { cpu::write_cr0(cr0) };
    }
    let (rax, _) = result?;
    ensure!(
        rax == REFUSED,
        "a read-only page ({:#x}, CR0.WP set) returned RAX {rax:#x}",
        demand::READ_ONLY
    );
    ensure_untouched(demand::fixed_frame(demand::READ_ONLY), FILL, "read-only")?;

    let (rax, _) = log_read(number, OUTSIDE_RAM, 64, 0)?;
    ensure!(
        rax == REFUSED,
        "{OUTSIDE_RAM:#x} (outside guest RAM) returned RAX {rax:#x}"
    );

    let call = user::UserCall {
        rax: number,
        rbx: demand::SUPERVISOR,
        rcx: 64,
        rdx: 0,
        ..user::UserCall::default()
    };
    let (rax, _) = user::call_ring3(cpu::uses_vmcall(), call);
    ensure!(
        rax == REFUSED,
        "a supervisor page ({:#x}) from CPL 3 returned RAX {rax:#x}",
        demand::SUPERVISOR
    );
    ensure_untouched(demand::fixed_frame(demand::SUPERVISOR), FILL, "supervisor")?;

    let ubuf = user::data_page() + user::USER_BUF_OFFSET;
    // SAFETY: this part of the user data page is the ring-3 buffer, unused
    // while ring 3 is not running.
    unsafe { paging::write_linear(ubuf, &[0u8; user::USER_BUF_LEN as usize]) };
    let call = user::UserCall {
        rax: number,
        rbx: ubuf,
        rcx: user::USER_BUF_LEN,
        rdx: 0,
        ..user::UserCall::default()
    };
    let (rax, rbx) = user::call_ring3(cpu::uses_vmcall(), call);
    ensure!(
        rax != REFUSED && rax > 0 && rax <= user::USER_BUF_LEN && rbx == 0,
        "a user page ({ubuf:#x}, {} bytes) from CPL 3 returned RAX {rax:#x} RBX {rbx:#x}",
        user::USER_BUF_LEN
    );
    ensure_log_text(number, rax, |i| {
        // SAFETY: the user data page is mapped.
        unsafe { peek(ubuf + i) }
    })
}

// ------------------------------------------- MSRs, rings, exit stress

const MSR_EFER: u32 = 0xC000_0080;
const MSR_STAR: u32 = 0xC000_0081;
const MSR_LSTAR: u32 = 0xC000_0082;
const MSR_SFMASK: u32 = 0xC000_0084;
/// AMD VM_HSAVE_PA: thinvisor's own (intercepted on AMD, absent on Intel).
const MSR_VM_HSAVE_PA: u32 = 0xC001_0117;
/// IA32_VMX_BASIC: thinvisor hides VMX.
const MSR_VMX_BASIC: u32 = 0x480;

const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_DF: u64 = 1 << 10;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_AC: u64 = 1 << 18;
/// SFMASK: what SYSCALL clears (DF is what the check watches).
const SFMASK: u64 = RFLAGS_TF | RFLAGS_IF | RFLAGS_DF | RFLAGS_NT | RFLAGS_AC;

/// Page-fault error code bits.
const PF_PRESENT: u64 = 1 << 0;
const PF_USER: u64 = 1 << 2;
const PF_FETCH: u64 = 1 << 4;

/// RDMSR that must not fault.
fn rdmsr(msr: u32) -> Result<u64, Why> {
    recover::rdmsr(msr, recover::GP).map_err(|c| {
        why(format_args!(
            "RDMSR {msr:#x} raised vector {} (error {:#x})",
            c.vector, c.error
        ))
    })
}

/// WRMSR that must not fault.
///
/// # Safety
/// As for `recover::wrmsr`.
unsafe fn wrmsr(msr: u32, value: u64) -> CheckResult {
    // SAFETY: passed on from the caller.
    unsafe { recover::wrmsr(msr, value, recover::GP) }.map_err(|c| {
        why(format_args!(
            "WRMSR {msr:#x} <- {value:#x} raised vector {} (error {:#x})",
            c.vector, c.error
        ))
    })
}

/// Writes an MSR and fails unless it reads back as written.
///
/// # Safety
/// As for `recover::wrmsr`.
unsafe fn wrmsr_checked(msr: u32, value: u64) -> CheckResult {
    // SAFETY: passed on from the caller.
    unsafe { wrmsr(msr, value) }?;
    let back = rdmsr(msr)?;
    ensure!(
        back == value,
        "MSR {msr:#x} reads {back:#x} after writing {value:#x}"
    );
    Ok(())
}

/// `efer_is_guests`: EFER.SCE and NXE set by the guest survive 2000 exits,
/// and NX is honoured.
fn efer_is_guests(_: &BootInfo) -> CheckResult {
    let [_, _, _, edx] = cpu::cpuid(0x8000_0001, 0);
    ensure!(
        edx & (1 << 20) != 0,
        "CPUID 0x80000001:EDX bit 20 (NX) is clear"
    );
    let efer = rdmsr(MSR_EFER)?;
    ensure!(
        efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA,
        "EFER is {efer:#x} in long mode (LME and LMA not both set)"
    );
    // Every other bit kept: LME/LMA, and SVME on AMD.
    let wanted = efer | EFER_SCE | EFER_NXE;
    // SAFETY: SCE and NXE only enable SYSCALL and the NX bit, which no
    // mapping uses yet.
    unsafe { wrmsr_checked(MSR_EFER, wanted) }?;

    let dbgsh = dbgsh_number()?;
    // Polls of the shell's pending value: the same value every time.
    let pending = call2(dbgsh, abi::dbgsh::NOTHING).rax;
    for i in 0..1000 {
        let rax = call2(dbgsh, abi::dbgsh::NOTHING).rax;
        ensure!(
            rax == pending,
            "dbgsh poll {i} returned {rax:#x}, the first {pending:#x}"
        );
    }
    let after_calls = rdmsr(MSR_EFER)?;
    let first = cpu::cpuid(0, 0);
    for i in 0..1000 {
        let r = cpu::cpuid(0, 0);
        ensure!(
            r == first,
            "CPUID 0 result {i} was {r:x?}, first {first:x?}"
        );
    }
    let after = rdmsr(MSR_EFER)?;
    ensure!(
        after_calls == wanted,
        "EFER {after_calls:#x} after 1000 VMM calls, {wanted:#x} written"
    );
    ensure!(
        after == wanted,
        "EFER {after:#x} after 1000 CPUIDs, {wanted:#x} written"
    );
    let needed = EFER_SCE | EFER_NXE | EFER_LMA;
    ensure!(
        after & needed == needed,
        "EFER {after:#x} lacks SCE, NXE or LMA"
    );

    // NX honoured: the same `ret` runs from an executable mapping and
    // faults (instruction fetch, protection) from the NX one.
    paging::map_nx_test_pages();
    // SAFETY: data page 1 holds a lone `ret`.
    if let Err(c) = unsafe { recover::call_at(paging::HIGH_EXEC, recover::PF) } {
        fail!(
            "calling a `ret` at {:#x} (executable) raised #PF error {:#x} cr2 {:#x}",
            paging::HIGH_EXEC,
            c.error,
            c.cr2
        );
    }
    // SAFETY: as above; the fetch is expected to fault.
    match unsafe { recover::call_at(paging::HIGH_NX, recover::PF) } {
        Ok(()) => fail!(
            "a `ret` on a page mapped NX ({:#x}) ran, with EFER.NXE set",
            paging::HIGH_NX
        ),
        Err(c) => {
            ensure!(
                c.error & (PF_FETCH | PF_PRESENT | PF_USER) == PF_FETCH | PF_PRESENT
                    && c.cr2 == paging::HIGH_NX
                    && c.rip == paging::HIGH_NX,
                "NX fetch: #PF error {:#x} (want I/D and P set, U clear) cr2 {:#x} rip {:#x}",
                c.error,
                c.cr2,
                c.rip
            );
        }
    }
    Ok(())
}

/// `syscall_sysret`: SYSCALL from ring 3, SYSRET back, `int 0x80` home;
/// and a VMM call from ring 3.
fn syscall_sysret(_: &BootInfo) -> CheckResult {
    let [_, _, _, edx] = cpu::cpuid(0x8000_0001, 0);
    ensure!(
        edx & (1 << 11) != 0,
        "CPUID 0x80000001:EDX bit 11 (SYSCALL) is clear"
    );
    let efer = rdmsr(MSR_EFER)?;
    if efer & EFER_SCE == 0 {
        // Normally left set by efer_is_guests.
        // SAFETY: SCE only enables SYSCALL/SYSRET.
        unsafe { wrmsr_checked(MSR_EFER, efer | EFER_SCE) }?;
    }
    let star = (u64::from(user::USER_BASE_SEL) << 48) | (u64::from(user::KERNEL_BASE_SEL) << 32);
    // SAFETY: the SYSCALL MSRs only matter to SYSCALL, which only the ring-3
    // code below executes; the entry point and selectors are valid.
    unsafe {
        wrmsr_checked(MSR_STAR, star)?;
        wrmsr_checked(MSR_LSTAR, user::syscall_entry())?;
        wrmsr_checked(MSR_SFMASK, SFMASK)?;
    }
    let dbgsh = dbgsh_number()?;

    let (u, k) = user::run_ring3(cpu::uses_vmcall());

    let user_cs = u64::from(user::USER_CODE64_SEL);
    ensure!(
        u.cs_start == user_cs,
        "CS in ring 3 was {:#x}, not {user_cs:#x}",
        u.cs_start
    );
    ensure!(
        u.lookup == dbgsh,
        "\"dbgsh\" looked up from ring 3 returned {:#x}, from ring 0 {dbgsh:#x}",
        u.lookup
    );
    ensure!(k.count == 1, "{} SYSCALLs arrived, not 1", k.count);
    ensure!(
        k.cs & 3 == 0 && k.cs == u64::from(user::KERNEL_BASE_SEL),
        "CS in the SYSCALL handler was {:#x} (CPL {}), not 0x8",
        k.cs,
        k.cs & 3
    );
    ensure!(
        k.rcx == user::after_syscall(),
        "RCX in the SYSCALL handler was {:#x}, not the return address {:#x}",
        k.rcx,
        user::after_syscall()
    );
    ensure!(
        u.rflags_before & RFLAGS_DF != 0 && k.r11 == u.rflags_before,
        "R11 in the SYSCALL handler was {:#x}, RFLAGS before SYSCALL {:#x}",
        k.r11,
        u.rflags_before
    );
    ensure!(
        k.rflags & SFMASK == 0,
        "RFLAGS in the SYSCALL handler was {:#x} (SFMASK {SFMASK:#x} not applied)",
        k.rflags
    );
    let (data_lo, data_hi) = (user::data_page(), user::data_page() + 4096);
    ensure!(
        // The stack is empty at SYSCALL: RSP may be the page's end.
        (data_lo + 8..=data_hi).contains(&k.rsp),
        "RSP in the SYSCALL handler was {:#x}, not the user stack",
        k.rsp
    );
    ensure!(
        u.reached_after == 1,
        "ring 3 did not run after SYSRET (marker {:#x})",
        u.reached_after
    );
    ensure!(
        u.cs_after == user_cs,
        "CS after SYSRET was {:#x}, not {user_cs:#x}",
        u.cs_after
    );
    ensure!(
        u.rflags_after & RFLAGS_DF != 0,
        "RFLAGS after SYSRET was {:#x}: DF not restored from R11",
        u.rflags_after
    );
    ensure!(
        k.int_count == 1 && k.int_cs == user_cs,
        "int 0x80: {} arrived, from CS {:#x}",
        k.int_count,
        k.int_cs
    );
    // The SYSCALL MSRs are the guest's across all those exits.
    for (msr, value) in [
        (MSR_STAR, star),
        (MSR_LSTAR, user::syscall_entry()),
        (MSR_SFMASK, SFMASK),
    ] {
        let now = rdmsr(msr)?;
        ensure!(
            now == value,
            "MSR {msr:#x} is {now:#x} after ring 3, {value:#x} written"
        );
    }
    Ok(())
}

/// Fails unless `result` is a #GP.
fn ensure_gp<T: fmt::LowerHex>(result: Result<T, recover::Caught>, what: &str) -> CheckResult {
    match result {
        Ok(v) => fail!("{what} did not fault (value {v:#x})"),
        Err(c) => ensure!(
            c.vector == u64::from(recover::GP),
            "{what} raised vector {}, not #GP",
            c.vector
        ),
    }
    Ok(())
}

/// `protected_msr`: the hypervisor's MSRs and the virtualization CPUID
/// bits are hidden from the guest.
fn protected_msr(_: &BootInfo) -> CheckResult {
    ensure_gp(
        recover::rdmsr(MSR_VM_HSAVE_PA, recover::GP),
        "RDMSR 0xc0010117 (VM_HSAVE_PA)",
    )?;
    // SAFETY: expected to fault; a VMM that let it through is broken anyway.
    let w = unsafe { recover::wrmsr(MSR_VM_HSAVE_PA, 0, recover::GP) };
    ensure_gp(w.map(|()| 0u64), "WRMSR 0xc0010117 (VM_HSAVE_PA) <- 0")?;
    if cpu::uses_vmcall() {
        ensure_gp(
            recover::rdmsr(MSR_VMX_BASIC, recover::GP),
            "RDMSR 0x480 (IA32_VMX_BASIC)",
        )?;
        let [_, _, ecx, _] = cpu::cpuid(1, 0);
        ensure!(
            ecx & (1 << 5) == 0,
            "CPUID.1:ECX bit 5 (VMX) is set (ECX {ecx:#x})"
        );
    } else {
        let [_, _, ecx, _] = cpu::cpuid(0x8000_0001, 0);
        ensure!(
            ecx & (1 << 2) == 0,
            "CPUID 0x80000001:ECX bit 2 (SVM) is set (ECX {ecx:#x})"
        );
        // EFER.SVME is the VMM's: hidden from reads, refused on writes.
        const EFER: u32 = 0xC000_0080;
        const SVME: u64 = 1 << 12;
        let efer = match recover::rdmsr(EFER, recover::GP) {
            Ok(v) => v,
            Err(c) => fail!("RDMSR EFER raised vector {}", c.vector),
        };
        ensure!(
            efer & SVME == 0,
            "EFER reads {efer:#x}: SVME (bit 12) is visible"
        );
        // SAFETY: expected to fault; without the fault SVME would just be set.
        let w = unsafe { recover::wrmsr(EFER, efer | SVME, recover::GP) };
        ensure_gp(w.map(|()| 0u64), "WRMSR EFER with SVME set")?;
        // SAFETY: writes back the value just read.
        let same = unsafe { recover::wrmsr(EFER, efer, recover::GP) };
        ensure!(same.is_ok(), "WRMSR EFER of its own value raised #GP");
    }
    Ok(())
}

/// `cross_vendor_call`: the other vendor's call instruction (VMMCALL on
/// Intel, VMCALL on AMD) raises #UD in hardware; thinvisor takes it as a
/// call all the same (docs/vmm-call.md, Calling), while a genuine #UD
/// (UD2) still reaches the guest.
fn cross_vendor_call(_: &BootInfo) -> CheckResult {
    let own = dbgsh_number()?;
    let name = b"dbgsh\0";
    let other = !cpu::uses_vmcall();
    let insn = if other { "VMCALL" } else { "VMMCALL" };
    match recover::vmm_call4(
        other,
        abi::FN_LOOKUP,
        name.as_ptr() as u64,
        0,
        0,
        recover::UD,
    ) {
        Ok((rax, _)) if rax == own => {}
        Ok((rax, _)) => fail!("lookup of \"dbgsh\" with {insn} returned {rax:#x}, not {own:#x}"),
        Err(c) => fail!(
            "{insn} raised vector {} at {:#x} instead of calling the VMM",
            c.vector,
            c.rip
        ),
    }
    match recover::ud2() {
        Err(c) if c.vector == u64::from(recover::UD) => Ok(()),
        Err(c) => fail!("UD2 raised vector {} instead of #UD", c.vector),
        Ok(()) => fail!("UD2 did not fault"),
    }
}

/// `xsetbv`: the guest programs its own XCR0 (on VT-x XSETBV always exits
/// and the VMM executes it after XSETBV's own checks; on SVM it runs in
/// the guest). Valid values read back with XGETBV, invalid ones raise #GP.
/// First, CPUID.1:ECX.OSXSAVE (bit 27) must follow the guest's own
/// CR4.OSXSAVE, clear and set, not the hypervisor's (on VT-x thinvisor
/// runs with CR4.OSXSAVE set to execute XSETBV).
fn xsetbv(_: &BootInfo) -> CheckResult {
    const CR4_OSXSAVE: u64 = 1 << 18;
    const X87_SSE: u64 = 0b11;
    const AVX: u64 = 1 << 2;
    let [_, _, ecx, _] = cpu::cpuid(1, 0);
    ensure!(
        ecx & (1 << 26) != 0,
        "CPUID.1:ECX.XSAVE is clear: nothing to check here"
    );
    let cr4: u64;
    // SAFETY: reading CR4 has no side effects at CPL 0.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack)) };
    const OSXSAVE: u32 = 1 << 27;
    for (value, shown) in [(cr4 & !CR4_OSXSAVE, 0), (cr4 | CR4_OSXSAVE, OSXSAVE)] {
        // SAFETY: OSXSAVE only enables XGETBV/XSETBV/XSAVE; the processor
        // has XSAVE (checked above), and this guest does not use them
        // before setting it again.
        unsafe { core::arch::asm!("mov cr4, {}", in(reg) value, options(nostack)) };
        let [_, _, ecx, _] = cpu::cpuid(1, 0);
        ensure!(
            ecx & OSXSAVE == shown,
            "CR4 {value:#x}: CPUID.1:ECX.OSXSAVE is {} (ECX {ecx:#x})",
            u32::from(ecx & OSXSAVE != 0)
        );
    }
    let [eax, _, _, edx] = cpu::cpuid(0xD, 0);
    let supported = (u64::from(edx) << 32) | u64::from(eax);
    let xgetbv = || {
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV of XCR0 with CR4.OSXSAVE set only reads.
        unsafe {
            core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack))
        };
        (u64::from(hi) << 32) | u64::from(lo)
    };
    let mut values = [X87_SSE, 1, X87_SSE];
    if supported & AVX != 0 {
        values[2] = X87_SSE | AVX;
    }
    for value in values {
        // SAFETY: this guest keeps no x87/SSE/AVX state across the change.
        if let Err(c) = unsafe { recover::xsetbv(value, recover::GP) } {
            fail!("XSETBV {value:#x} raised vector {}", c.vector);
        }
        let back = xgetbv();
        ensure!(back == value, "XSETBV {value:#x}, XGETBV read {back:#x}");
    }
    // SSE without x87, and AVX without SSE, are refused.
    for value in [0b10, 0b101] {
        // SAFETY: expected to fault; XCR0 stays as it was otherwise.
        let r = unsafe { recover::xsetbv(value, recover::GP) };
        ensure!(
            matches!(r, Err(c) if c.vector == u64::from(recover::GP)),
            "XSETBV {value:#x} did not raise #GP ({r:?})"
        );
    }
    Ok(())
}

/// `cr0_writes`: the guest owns its CR0 as far as it can see. Clearing and
/// setting NE (bit 5) reads back as written on both vendors; on VT-x NE is
/// fixed to 1 in the real register, so each write exits and the VMM keeps
/// the read shadow (SDM vol. 3C, 25.6.6) while paging stays on.
fn cr0_writes(_: &BootInfo) -> CheckResult {
    const NE: u64 = 1 << 5;
    let cr0 = cpu::read_cr0();
    for value in [cr0 & !NE, cr0 | NE, cr0 & !NE, cr0] {
        // SAFETY: only NE changes; paging and protection stay as they are,
        // and the x87 error-reporting mode is not used by this guest.
        unsafe { cpu::write_cr0(value) };
        let back = cpu::read_cr0();
        ensure!(back == value, "wrote CR0 {value:#x}, read back {back:#x}");
        ensure!(
            dbgsh_number().is_ok(),
            "lookups broke after CR0 = {value:#x}"
        );
    }
    Ok(())
}

/// `cr_writes_gp`: MOV to CR0/CR4 of values the processor refuses raises
/// #GP(0) and changes nothing; the guest sees a processor without VMX, so
/// CR4.VMXE is one of them (Intel SDM vol. 2B, MOV to CR, and vol. 3A,
/// 2.5; AMD APM vol. 2, 3.1). Each value is tried with CR0.NE (CR4.VMXE)
/// as the guest reads it and flipped: on VT-x the first runs in the
/// processor, the second exits to thinvisor, which must make the checks
/// itself because the exit comes before them (SDM vol. 3C, 26.1.1). On
/// SVM thinvisor intercepts no CR writes and the processor checks, except
/// that a guest may set CR0.PG with PE clear there ("paged real mode",
/// AMD APM vol. 2, 15.19; Bochs allows it), so that one is tried on VT-x
/// only. QEMU's TCG makes none of these checks (7.2: it writes such
/// values, and a reserved CR4 bit in a guest ends it with VMEXIT_INVALID),
/// so on QEMU the check only says so.
fn cr_writes_gp(_: &BootInfo) -> CheckResult {
    const PE: u64 = 1 << 0;
    const NE: u64 = 1 << 5;
    const NW: u64 = 1 << 29;
    const CD: u64 = 1 << 30;
    const PG: u64 = 1 << 31;
    const PAE: u64 = 1 << 5;
    const VMXE: u64 = 1 << 13;
    const CR4_RESERVED_15: u64 = 1 << 15;
    if cpu::brand().windows(4).any(|w| w == b"QEMU") {
        say!("NOTE cr_writes_gp: QEMU's TCG does not check MOV to CR; nothing tested");
        return Ok(());
    }
    let (cr0, cr4) = (cpu::read_cr0(), cpu::read_cr4());
    ensure!(
        cr0 & (PE | PG) == PE | PG && cr4 & PAE != 0,
        "unexpected CR0 {cr0:#x} / CR4 {cr4:#x} for this check"
    );
    let mut refused = [(0u8, 0u64); 16];
    let mut n = 0;
    for ne in [0, NE] {
        let base = cr0 ^ ne;
        for bad in [
            base | 1 << 32,    // reserved bits 63:32
            (base | NW) & !CD, // NW without CD
            base & !PG,        // leaving paging in 64-bit mode
        ] {
            refused[n] = (0, bad);
            n += 1;
        }
        if cpu::uses_vmcall() {
            refused[n] = (0, base & !PE); // PG without PE
            n += 1;
        }
    }
    for vmxe in [0, VMXE] {
        for bad in [
            cr4 | VMXE,
            cr4 | vmxe | CR4_RESERVED_15,
            cr4 | vmxe | 1 << 32,
            (cr4 | vmxe) & !PAE, // leaving PAE in IA-32e mode
        ] {
            refused[n] = (4, bad);
            n += 1;
        }
    }
    for &(cr, value) in &refused[..n] {
        // SAFETY: every value is one the processor refuses with #GP; if
        // one is taken all the same the check fails (or the guest dies,
        // which fails the run).
        let r = unsafe {
            if cr == 0 {
                recover::write_cr::<0>(value, recover::GP)
            } else {
                recover::write_cr::<4>(value, recover::GP)
            }
        };
        match r {
            Ok(()) => fail!("MOV CR{cr}, {value:#x} did not raise #GP"),
            Err(c) => ensure!(
                c.vector == u64::from(recover::GP) && c.error == 0,
                "MOV CR{cr}, {value:#x} raised vector {} error {:#x}, not #GP(0)",
                c.vector,
                c.error
            ),
        }
        let now = (cpu::read_cr0(), cpu::read_cr4());
        ensure!(
            now == (cr0, cr4),
            "MOV CR{cr}, {value:#x} faulted but left CR0 {:#x} CR4 {:#x}",
            now.0,
            now.1
        );
    }
    Ok(())
}

/// APM control port: a write raises an SMI when the firmware enabled that
/// (PIIX4 DEVACTB.APMC_EN), as SeaBIOS on QEMU's `pc` machine and Bochs'
/// BIOS both do; their SMM handlers then run (docs/architecture.md, SMIs).
const APM_CONTROL: u16 = 0xB2;
/// APM status port: a scratch register of the same device; a write raises
/// no SMI, so it is the baseline the SMIs are timed against.
const APM_STATUS: u16 = 0xB3;
/// MSR_SMI_COUNT: SMIs taken since reset (Intel SDM vol. 4, table 2-3,
/// from Nehalem on; QEMU's TCG counts every SMM entry in it whatever the
/// vendor).
const MSR_SMI_COUNT: u32 = 0x34;
/// SMIs `smi_storm` raises.
const SMIS: u64 = 100;
/// The least each SMI must add to the TSC where that is the only evidence
/// (Bochs): its BIOS's handler alone is six instructions, RSM included.
const SMI_MIN_TICKS: u64 = 4;

/// Writes `port` `SMIS` times, each followed by a CPUID exit that must
/// answer as `first` did; returns the TSC ticks the loop took.
fn out_loop(port: u16, first: [u32; 4]) -> Result<u64, Why> {
    let start = crate::bench::rdtsc();
    for i in 0..SMIS {
        cpu::outb(port, 0);
        let again = cpu::cpuid(0, 0);
        ensure!(
            again == first,
            "CPUID 0 changed after write {i} to port {port:#x}: {again:x?}"
        );
    }
    Ok(crate::bench::rdtsc().wrapping_sub(start))
}

/// `smi_storm`: 100 SMIs raised from inside the guest, each followed by an
/// exit; the VMM must keep running the guest and answering calls, and the
/// check must see that the SMIs really happened:
///
/// - Where MSR_SMI_COUNT reads nonzero (QEMU, Intel processors), it must
///   have grown by at least 100.
/// - Bochs has no SMI counter (it reads 0), and its BIOS's SMM handler
///   changes nothing a guest can see: the ACPI enable/disable it does,
///   Bochs' chipset has already done. What remains is time: Bochs' TSC
///   counts executed instructions, the handler's (and, on SVM, those of
///   the SMI exit and thinvisor's handling) included. There the 100 writes
///   to port 0xB2 must take at least 4 ticks per SMI more than 100 writes
///   to port 0xB3, which raise none. On a processor with a wall-clock TSC
///   and no counter (AMD hardware) this is evidence, not proof: an SMI
///   costs microseconds there, far above the margin.
fn smi_storm(_: &BootInfo) -> CheckResult {
    let own = dbgsh_number()?;
    let first = cpu::cpuid(0, 0);
    let count = || recover::rdmsr(MSR_SMI_COUNT, recover::GP).unwrap_or(0);
    let baseline = out_loop(APM_STATUS, first)?;
    let before = count();
    let storm = out_loop(APM_CONTROL, first)?;
    let after = count();
    ensure!(dbgsh_number()? == own, "lookups broke after the SMIs");
    if after != 0 {
        let taken = after.wrapping_sub(before);
        ensure!(
            taken >= SMIS,
            "MSR_SMI_COUNT went from {before} to {after}: {taken} SMIs taken, not {SMIS}"
        );
        say!("NOTE smi_storm: MSR_SMI_COUNT counted {taken} SMIs");
    } else {
        let extra = storm.saturating_sub(baseline);
        ensure!(
            extra >= SMIS * SMI_MIN_TICKS,
            "no SMI counter, and {SMIS} writes to port 0xb2 took {storm} TSC ticks against {baseline} for port 0xb3: no SMIs"
        );
        say!(
            "NOTE smi_storm: no SMI counter; {SMIS} SMIs took {extra} TSC ticks more than the baseline ({} each)",
            extra / SMIS
        );
    }
    Ok(())
}

/// Scratch memory `hostile_calls` lets the VMM write into: room for the
/// whole 64 KiB log from either target offset, then a guard that must
/// stay untouched.
#[repr(C, align(4096))]
struct HostileScratch {
    buf: [u8; 72 * 1024],
    guard: [u8; 4096],
}

static mut HOSTILE_SCRATCH: HostileScratch = HostileScratch {
    buf: [0; 72 * 1024],
    guard: [0xA5; 4096],
};

/// `hostile_calls`: 20 000 VMM calls with random function numbers and
/// arguments (pointers into unmapped, non-canonical, outside-RAM and
/// scratch memory, random lengths and offsets, both call instructions).
/// The VMM must answer every one (or inject the #PF a not-present buffer
/// asks for) and still work afterwards; nothing outside the scratch
/// buffer may change.
fn hostile_calls(_: &BootInfo) -> CheckResult {
    let own = dbgsh_number()?;
    let scratch = core::ptr::addr_of_mut!(HOSTILE_SCRATCH) as u64;
    let targets = [
        scratch,
        scratch + 4090,
        paging::UNMAPPED,
        paging::UNMAPPED + 0xFFD,
        NON_CANONICAL,
        paging::OUTSIDE_RAM,
        paging::OUTSIDE_RAM - 3,
        0xFFFF_FFFF_FFFF_F000,
        u64::MAX,
        0,
    ];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut page_faults = 0u32;
    for _ in 0..20_000 {
        let pick = next();
        // Mostly the registered functions and function 0, sometimes any number.
        let rax = match pick % 8 {
            0 => next(),
            n => n % 5,
        };
        let target = targets[(next() % targets.len() as u64) as usize];
        let rbx = if rax == abi::FN_LOOKUP && pick & 0x100 != 0 {
            // Function 0 only reads: any address at all.
            next()
        } else {
            target
        };
        let rcx = match next() % 4 {
            0 => next(),
            1 => 0,
            _ => next() % 6000,
        };
        let rdx = if next() % 2 == 0 {
            next()
        } else {
            next() % 4096
        };
        let vmcall = next() % 2 == 0;
        match recover::vmm_call4(vmcall, rax, rbx, rcx, rdx, recover::PF) {
            Ok(_) => {}
            Err(c) if c.vector == u64::from(recover::PF) => page_faults += 1,
            Err(c) => fail!(
                "a VMM call raised vector {} (RAX {rax:#x} RBX {rbx:#x})",
                c.vector
            ),
        }
    }
    ensure!(
        page_faults > 0,
        "no call asked for a page fault (unmapped buffers)"
    );
    // SAFETY: only this check uses the scratch memory; the VMM is done.
    let guard = unsafe { (*core::ptr::addr_of!(HOSTILE_SCRATCH)).guard };
    ensure!(
        guard.iter().all(|&b| b == 0xA5),
        "the VMM wrote past the buffers it was given"
    );
    ensure!(
        dbgsh_number()? == own,
        "dbgsh's number changed after the hostile calls"
    );
    // A random call may have registered part of the scratch memory as the
    // log buffer: unregister it.
    let set_buf = lookup(abi::names::LOG_SET_BUF.as_bytes());
    let mut r = Regs {
        rax: set_buf,
        ..Regs::default()
    };
    vmm_call(&mut r);
    ensure!(r.rax == 0, "log_set_buf(0, 0) returned {:#x}", r.rax);
    Ok(())
}

/// CPUID exits in `many_exits`: about 1 s of the run on Bochs (both models)
/// and on QEMU TCG, so the full 100 000 are kept.
const MANY_EXITS: u64 = 100_000;

/// `many_exits`: 100 000 CPUID exits keep RAX..RDX equal to the first
/// result and every other register unchanged.
fn many_exits(_: &BootInfo) -> CheckResult {
    const LEAF: u32 = 1;
    let first = cpu::cpuid(LEAF, 0).map(u64::from);
    let mut io = cpu::CpuidLoop {
        leaf: u64::from(LEAF),
        iterations: MANY_EXITS,
        ..cpu::CpuidLoop::default()
    };
    cpu::cpuid_loop(&mut io);
    let names = ["RBP", "RSI", "RDI", "R11", "R12", "R13", "R14", "R15"];
    for ((name, want), got) in names.iter().zip(cpu::LOOP_PATTERNS).zip(io.kept) {
        ensure!(
            got == want,
            "{name} changed from {want:#x} to {got:#x} across {MANY_EXITS} CPUIDs"
        );
    }
    let expected = (0..MANY_EXITS).fold(0, |s, _| cpu::cpuid_checksum_step(s, first));
    if io.checksum != expected {
        // Find the first differing result for the report.
        for i in 0..MANY_EXITS {
            let r = cpu::cpuid(LEAF, 0).map(u64::from);
            ensure!(
                r == first,
                "checksum {:#x}, expected {expected:#x}; re-run: CPUID {i} gave {r:x?}, first {first:x?}",
                io.checksum
            );
        }
        fail!(
            "checksum {:#x} over {MANY_EXITS} CPUID.{LEAF:#x}, expected {expected:#x} from {first:x?}",
            io.checksum
        );
    }
    Ok(())
}

/// The checks, in report order.
const CHECKS: [Check; 30] = [
    ("lookup_paging_off", lookup_paging_off),
    ("cpuid_signature", cpuid_signature),
    ("lookup_known", lookup_known),
    ("lookup_unknown", lookup_unknown),
    ("lookup_empty", lookup_empty),
    ("lookup_overlong", lookup_overlong),
    ("lookup_bad_pointer", lookup_bad_pointer),
    ("lookup_paged_high", lookup_paged_high),
    ("invalid_function", invalid_function),
    ("register_preservation", register_preservation),
    ("dbgsh_session", shell::dbgsh_session),
    ("log_set_buf_accepted", log_set_buf_accepted),
    ("log_read_32bit", log_read_32bit),
    ("log_read_pae", log_read_pae),
    ("log_read_4level", log_read_4level),
    ("log_read_refused", log_read_refused),
    ("log_set_buf_refused", |_| logbuf::refused_around_block()),
    ("log_set_buf_cpl3_ignored", |_| logbuf::cpl3_ignored()),
    ("log_set_buf_dropped", |_| logbuf::dropped()),
    ("log_set_buf_stream", |boot| logbuf::stream(boot.cmdline())),
    ("efer_is_guests", efer_is_guests),
    ("syscall_sysret", syscall_sysret),
    ("protected_msr", protected_msr),
    ("many_exits", many_exits),
    ("cross_vendor_call", cross_vendor_call),
    ("hostile_calls", hostile_calls),
    ("smi_storm", smi_storm),
    ("cr0_writes", cr0_writes),
    ("xsetbv", xsetbv),
    ("cr_writes_gp", cr_writes_gp),
];

/// Runs every check, prints the summary and ends the run.
pub fn run_all(boot: &BootInfo) -> ! {
    for (name, check) in CHECKS {
        run_one(name, || check(boot));
    }
    finish()
}

/// Runs one check and prints `PASS name` or `FAIL name: why` (every mode
/// reports this way).
pub fn run_one(name: &'static str, check: impl FnOnce() -> CheckResult) {
    global::set_current_check(name);
    match check() {
        Ok(()) => {
            say!("PASS {name}");
            global::record(true);
        }
        Err(w) => {
            say!("FAIL {name}: {}", w.as_str());
            global::record(false);
        }
    }
}

/// Prints the summary and ends the run with its verdict.
pub fn finish() -> ! {
    global::set_current_check("summary");
    let (passed, failed) = global::tally();
    say!("SUMMARY: {passed} passed, {failed} failed");
    end_run(failed == 0)
}

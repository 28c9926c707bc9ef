//! The dbgsh mailbox, byte by byte, as BitVisor's client drives it
//! (docs/vmm-call.md, dbgsh): the banner and prompt, a pending value
//! repeated under polls, line editing, an unknown command, `stat`, `cpu`
//! and `mem` answers, `exit` and a second session.

use super::{call2, dbgsh_number, why, CheckResult, Why};
use crate::boot::BootInfo;
use thinvisor_abi::dbgsh::{
    ACK, BANNER, DISABLED, NOTHING, NUL_BYTE, PROMPT, SESSION_END, WANT_INPUT,
};

/// What one command printed.
struct Transcript {
    buf: [u8; 4096],
    len: usize,
}

impl Transcript {
    const fn new() -> Self {
        Self {
            buf: [0; 4096],
            len: 0,
        }
    }

    fn push(&mut self, b: u8) -> CheckResult {
        ensure!(self.len < self.buf.len(), "more than 4 KiB of output");
        self.buf[self.len] = b;
        self.len += 1;
        Ok(())
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn text(&self) -> &str {
        core::str::from_utf8(self.bytes()).unwrap_or("(not UTF-8)")
    }

    /// The line that starts with `prefix`, if any.
    fn line(&self, prefix: &str) -> Option<&str> {
        self.text().lines().find(|l| l.starts_with(prefix))
    }
}

/// A client: the function number and the answer its next call carries.
struct Client {
    f: u64,
    answer: u64,
    /// Calls made.
    calls: u64,
}

impl Client {
    fn new() -> Result<Self, Why> {
        Ok(Self {
            f: dbgsh_number()?,
            answer: NOTHING,
            calls: 0,
        })
    }

    fn call(&mut self) -> u64 {
        let r = call2(self.f, self.answer).rax;
        self.answer = NOTHING;
        self.calls += 1;
        r
    }

    /// Print (into `out`) until the shell asks for input or ends the
    /// session; returns that value, still pending.
    fn read(&mut self, out: &mut Transcript) -> Result<u64, Why> {
        for _ in 0..100_000 {
            match self.call() {
                r @ (WANT_INPUT | SESSION_END) => return Ok(r),
                NOTHING => fail!("\"nothing pending\" in a session, after {:?}", out.text()),
                NUL_BYTE => out.push(0)?,
                b if b < 0x100 => out.push(b as u8)?,
                b => fail!("dbgsh returned {b:#x}"),
            }
            self.answer = ACK;
        }
        fail!("no end to the output: {:?}", out.text())
    }

    /// Type `keys` (the shell is asking for input) and read the output
    /// up to the next input request or the end.
    fn command(&mut self, keys: &[u8], out: &mut Transcript) -> Result<u64, Why> {
        out.len = 0;
        let mut r = WANT_INPUT;
        for &k in keys {
            ensure!(
                r == WANT_INPUT,
                "the shell stopped asking for input at {k:#x}"
            );
            self.answer = u64::from(k);
            r = self.read(out)?;
        }
        Ok(r)
    }
}

/// Expect `out` to be exactly the pieces in order.
fn expect(out: &Transcript, pieces: &[&str], what: &str) -> CheckResult {
    let mut at = 0;
    for p in pieces {
        let b = p.as_bytes();
        let end = at + b.len();
        ensure!(
            out.bytes().get(at..end) == Some(b),
            "{what}: got {:?}",
            out.text()
        );
        at = end;
    }
    ensure!(
        at == out.len,
        "{what}: more than expected: {:?}",
        out.text()
    );
    Ok(())
}

/// `dbgsh_session`: a whole session and the next one, byte by byte.
pub fn dbgsh_session(_: &BootInfo) -> CheckResult {
    let mut c = Client::new()?;
    let mut out = Transcript::new();
    // The session's first byte is pending, and every poll repeats it.
    let first = c.call();
    ensure!(
        first == u64::from(BANNER.as_bytes()[0]),
        "the first poll returned {first:#x}, not the banner's first byte"
    );
    for i in 0..3 {
        let again = c.call();
        ensure!(again == first, "poll {i} after it returned {again:#x}");
    }
    out.push(first as u8)?;
    c.answer = ACK;
    ensure!(
        c.read(&mut out)? == WANT_INPUT,
        "no input request after the banner"
    );
    expect(&out, &[BANNER, PROMPT], "the banner and prompt")?;
    // An input request is pending too, and 0 ("no key yet") keeps it.
    for i in 0..3 {
        let again = c.call();
        ensure!(
            again == WANT_INPUT,
            "poll {i} of an input request returned {again:#x}"
        );
    }
    c.answer = 0;
    ensure!(
        c.call() == WANT_INPUT,
        "answering 0 to an input request ended it"
    );

    // Line editing: "hx", backspace, "elp".
    ensure!(
        c.command(b"hx\x08elp\n", &mut out)? == WANT_INPUT,
        "help did not end at a prompt"
    );
    let text = out.text();
    ensure!(
        text.starts_with("hx\x08 \x08elp\nhelp ") && text.ends_with(PROMPT),
        "help after a backspace printed {text:?}"
    );
    ensure!(
        out.line("exit ").is_some(),
        "help has no exit line: {text:?}"
    );

    c.command(b"bogus\n", &mut out)?;
    expect(
        &out,
        &["bogus\n", "unknown command; try help\n", PROMPT],
        "an unknown command",
    )?;

    // `stat` counts this session's calls of dbgsh (function 1), made on
    // this processor, up to the call that typed the Enter.
    let before = c.calls;
    c.command(b"stat\n", &mut out)?;
    let line = out
        .line("   1 dbgsh ")
        .ok_or_else(|| why(format_args!("stat has no dbgsh line: {:?}", out.text())))?;
    let counted: u64 = line
        .split_ascii_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| why(format_args!("stat line {line:?}")))?;
    ensure!(
        counted >= before + 5,
        "stat counts {counted} dbgsh calls; this session alone made more than {before}"
    );
    ensure!(
        out.line("CPU 0: ").is_some() && out.line("VMM calls since boot").is_some(),
        "stat printed {:?}",
        out.text()
    );

    c.command(b"cpu\n", &mut out)?;
    for want in [
        "processor: ",
        "backend: ",
        "CPUs under thinvisor: ",
        "thinvisor's memory: ",
    ] {
        ensure!(
            out.line(want).is_some(),
            "cpu has no {want:?} line: {:?}",
            out.text()
        );
    }

    // `mem` of a buffer the guest fills (identity-mapped: its address is
    // guest-physical).
    let page = crate::paging::data_page_phys(2);
    // SAFETY: data page 2 belongs to the checks, identity-mapped, and no
    // other check uses it while this one runs.
    unsafe {
        core::ptr::copy_nonoverlapping(b"dbgsh mem check!".as_ptr(), page as *mut u8, 16);
    }
    let mut cmd = Transcript::new();
    for b in "mem ".bytes() {
        cmd.push(b)?;
    }
    for shift in (0..16).rev() {
        cmd.push(b"0123456789abcdef"[((page >> (shift * 4)) & 0xF) as usize])?;
    }
    for b in " 16\n".bytes() {
        cmd.push(b)?;
    }
    c.command(cmd.bytes(), &mut out)?;
    let mut want = Transcript::new();
    for &b in cmd.bytes() {
        want.push(b)?;
    }
    for &b in &cmd.bytes()[4..20] {
        want.push(b)?;
    }
    for b in ": 64 62 67 73 68 20 6d 65 6d 20 63 68 65 63 6b 21  dbgsh mem check!\n".bytes() {
        want.push(b)?;
    }
    expect(&out, &[want.text(), PROMPT], "mem of a guest page")?;

    // `exit`: the end is pending until answered, then a new session.
    ensure!(
        c.command(b"exit\n", &mut out)? == SESSION_END,
        "exit did not end the session"
    );
    expect(&out, &["exit\n"], "exit")?;
    for i in 0..3 {
        let again = c.call();
        ensure!(
            again == SESSION_END,
            "poll {i} of the end returned {again:#x}"
        );
    }
    c.answer = ACK;
    c.call();
    // The second session: a fresh banner and prompt.
    out.len = 0;
    ensure!(
        c.read(&mut out)? == WANT_INPUT,
        "no prompt in the second session"
    );
    expect(&out, &[BANNER, PROMPT], "the second session's start")?;
    ensure!(
        c.command(b"exit\r", &mut out)? == SESSION_END,
        "the second exit did not end it"
    );
    expect(&out, &["exit\n"], "the second exit")?;
    c.answer = ACK;
    c.call();
    Ok(())
}

/// `dbgsh_disabled` (`dbgsh=off`): every session is the one-line message,
/// one byte per answered call, then 0x10A; each value repeats until
/// answered.
pub fn dbgsh_disabled(_: &BootInfo) -> CheckResult {
    let mut c = Client::new()?;
    for round in 0..2 {
        let mut out = Transcript::new();
        let first = c.call();
        ensure!(
            c.call() == first,
            "round {round}: a poll did not repeat {first:#x}"
        );
        out.push(first as u8)?;
        c.answer = ACK;
        let end = c.read(&mut out)?;
        ensure!(end == SESSION_END, "round {round}: ended with {end:#x}");
        expect(&out, &[DISABLED], "the disabled message")?;
        c.answer = ACK;
    }
    Ok(())
}

//! The debug shell behind the `dbgsh` VMM call (docs/vmm-call.md, dbgsh).
//!
//! A mailbox: every call carries the client's answer to the value it last
//! received (or -1, no answer) and returns the shell's pending value: a
//! byte to print (NUL as 0x100), 0 (the shell wants a byte of input),
//! 0x10A (the session ended) or -1 (nothing pending). A pending value is
//! returned again by every call until it is answered.
//!
//! One session is shared by every caller: the state lives behind one lock
//! in `Services`, each answer is applied to the one pending value, and the
//! value is consumed exactly once. Two clients that interleave therefore
//! see one stream between them: no byte is lost or sent twice, and each
//! typed byte goes to the one line editor, in the order the calls reach
//! the lock.
//!
//! Output goes through a bounded queue ([`QUEUE_SIZE`] bytes). A command
//! never writes more than fits: it produces its output a line at a time
//! and stops while the queue lacks room for a line, so long output (a
//! large `log` or `mem`) is never truncated; it goes on as the client
//! drains the queue.

use crate::services::VmmLog;
use core::fmt::Write;
use thinvisor_abi::dbgsh::{NOTHING, NUL_BYTE, SESSION_END, WANT_INPUT};
use thinvisor_memory::{GuestPhysAddr, GuestPhysMemory};

/// Bytes of output the shell holds before the client has read them.
pub const QUEUE_SIZE: usize = 4096;
/// The longest line a command produces at once (a `mem` line is 84).
pub const LINE_MAX: usize = 128;
/// The longest command line; further bytes are ignored.
pub const INPUT_MAX: usize = 80;
/// The prompt.
pub const PROMPT: &str = "dbgsh> ";
/// What a new session prints before its first prompt.
pub const BANNER: &str = "thinvisor dbgsh; type help for the commands\n";
/// What the disabled shell streams before ending the session.
pub const DISABLED: &str = "dbgsh is disabled\n";
/// Calls that return NOTHING before the first session's banner is
/// pending, the first call included (see [`Dbgsh::call`]).
pub const STARTUP_CALLS: u32 = 4096;
/// Lines `log` prints without an argument.
pub const LOG_DEFAULT_LINES: u64 = 10;
/// Bytes `mem` dumps without a length.
pub const MEM_DEFAULT_LEN: u64 = 64;
/// The most bytes one `mem` dumps.
pub const MEM_MAX_LEN: u64 = 64 * 1024;

/// The help text, one line per command.
pub const HELP: &[&str] = &[
    "help          this list",
    "log [N]       the last N lines of the VMM log (default 10)",
    "stat          VM exits per reason and per CPU",
    "cpu           the CPUs",
    "mem ADDR [N]  hex dump of N bytes (default 64) at guest-physical ADDR (hex)",
    "exit          end the session",
];

/// One line of text, formatted without allocating.
pub struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    pub const fn new() -> Self {
        Self {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for Line {
    /// Keeps what fits in [`LINE_MAX`] bytes (a line longer than that is
    /// cut, never spilled into the next).
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(LINE_MAX - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// What the hypervisor tells the shell about itself. Each method writes
/// line `index` (without its newline) and returns true, or returns false
/// when there is no such line; the shell asks for lines 0, 1, 2, ... as
/// its queue has room.
pub trait ShellInfo: Sync {
    /// `stat`: VM exits per reason and per CPU.
    fn stat_line(&self, index: usize, out: &mut Line) -> bool {
        not_available("stat", index, out)
    }
    /// `cpu`: the CPUs.
    fn cpu_line(&self, index: usize, out: &mut Line) -> bool {
        not_available("cpu", index, out)
    }
}

fn not_available(what: &str, index: usize, out: &mut Line) -> bool {
    if index == 0 {
        let _ = write!(out, "{what}: not available");
    }
    index == 0
}

/// A `ShellInfo` that knows nothing.
pub struct NoInfo;
impl ShellInfo for NoInfo {}

/// What a call lends the shell to run commands with.
pub struct ShellEnv<'a> {
    /// The VMM's log (`log`).
    pub log: &'a VmmLog,
    /// The calling vCPU's guest-physical memory (`mem`).
    pub memory: &'a dyn GuestPhysMemory,
    /// The hypervisor's own lines (`stat`, `cpu`).
    pub info: &'a dyn ShellInfo,
}

/// The output a command still has to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    /// Nothing: the shell reads input.
    Idle,
    /// The prompt, then input.
    Prompt,
    /// Help line `i`, then the prompt.
    Help(usize),
    /// Log bytes from stream offset `from` up to `end`; with `end` =
    /// u64::MAX, `from` is the number of lines still to be located.
    Log { from: u64, end: u64 },
    /// Line `i` of `stat` or `cpu`.
    Info { stat: bool, i: usize },
    /// `left` bytes of guest memory at `at`.
    Mem { at: u64, left: u64 },
    /// One error line, then the prompt.
    Error(Line2),
    /// The session ends once the queue is drained.
    End,
}

/// The error lines, kept as values so a `Job` stays `Copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line2 {
    Unknown,
    BadArgs(&'static str),
}

/// The shell's state: one session at a time.
pub struct Dbgsh {
    enabled: bool,
    /// Calls still to answer NOTHING before the first session shows.
    starting: u32,
    /// The value the client has been given and not answered (NOTHING
    /// when none).
    pending: u64,
    queue: [u8; QUEUE_SIZE],
    head: usize,
    len: usize,
    job: Job,
    input: [u8; INPUT_MAX],
    input_len: usize,
    /// The last byte typed was CR (a following LF is the same Enter).
    after_cr: bool,
    /// The disabled shell's position in [`DISABLED`].
    disabled_at: usize,
}

impl Dbgsh {
    /// A shell; `enabled` false is `dbgsh=off`, which streams
    /// [`DISABLED`] and ends every session at once.
    pub const fn new(enabled: bool) -> Self {
        Self {
            enabled,
            starting: STARTUP_CALLS,
            pending: NOTHING,
            queue: [0; QUEUE_SIZE],
            head: 0,
            len: 0,
            job: Job::Idle,
            input: [0; INPUT_MAX],
            input_len: 0,
            after_cr: false,
            disabled_at: 0,
        }
    }

    /// One call: `answer` is RBX, the result is RAX.
    ///
    /// The first session starts with the first call but shows only after
    /// [`STARTUP_CALLS`] calls (answers ignored), which all return
    /// NOTHING. BitVisor's first call starts the shell's thread, which
    /// runs some time later: its client polls with -1 until it sees a
    /// value, so it works here unchanged after a few milliseconds of
    /// polls, while a guest that only probes the call with a few polls
    /// sees "nothing pending" (thinvisor's test guest checks exactly
    /// that). Later sessions (after an `exit`) show at once.
    pub fn call(&mut self, answer: u64, env: &ShellEnv<'_>) -> u64 {
        if !self.enabled {
            return self.call_disabled(answer);
        }
        if self.starting > 0 {
            self.starting -= 1;
            if self.starting == 0 {
                self.begin();
            }
            return NOTHING;
        }
        if answer != NOTHING && self.pending != NOTHING {
            self.answer(answer);
        }
        if self.pending == NOTHING {
            self.fill(env);
            self.pending = if self.len > 0 {
                match self.queue[self.head] {
                    0 => NUL_BYTE,
                    b => u64::from(b),
                }
            } else if self.job == Job::End {
                SESSION_END
            } else {
                WANT_INPUT
            };
        }
        self.pending
    }

    /// `dbgsh=off`: the message, a byte per answered call, then
    /// SESSION_END; answering that starts the message again.
    fn call_disabled(&mut self, answer: u64) -> u64 {
        let msg = DISABLED.as_bytes();
        if answer != NOTHING {
            self.disabled_at += 1;
            if self.disabled_at > msg.len() {
                self.disabled_at = 0;
            }
        }
        msg.get(self.disabled_at)
            .map_or(SESSION_END, |&b| u64::from(b))
    }

    /// A new session: the banner and the prompt.
    fn begin(&mut self) {
        self.head = 0;
        self.len = 0;
        self.input_len = 0;
        self.after_cr = false;
        self.pending = NOTHING;
        self.push(BANNER.as_bytes());
        self.job = Job::Prompt;
    }

    /// Apply the client's answer to the pending value.
    fn answer(&mut self, answer: u64) {
        match self.pending {
            SESSION_END => {
                // The shell restarts for the next client.
                self.begin();
                return;
            }
            WANT_INPUT => {
                // 0 = no key yet: the shell asks again (as BitVisor's).
                if answer == 0 {
                    return;
                }
                // 0x100 (NUL) and anything wider: the low byte.
                self.key(answer as u8);
            }
            _ => {
                // Any answer acknowledges a printed byte.
                self.head = (self.head + 1) % QUEUE_SIZE;
                self.len -= 1;
            }
        }
        self.pending = NOTHING;
    }

    /// The line editor: one typed byte.
    fn key(&mut self, b: u8) {
        let after_cr = core::mem::replace(&mut self.after_cr, false);
        match b {
            b'\n' if after_cr => {}
            b'\r' | b'\n' => {
                self.after_cr = b == b'\r';
                self.push(b"\n");
                self.run();
            }
            0x08 | 0x7F if self.input_len > 0 => {
                self.input_len -= 1;
                self.push(b"\x08 \x08");
            }
            0x20..=0x7E if self.input_len < INPUT_MAX => {
                self.input[self.input_len] = b;
                self.input_len += 1;
                self.push(&[b]);
            }
            // Other control bytes, and bytes past the end of the line.
            _ => {}
        }
    }

    /// Run the command line typed.
    fn run(&mut self) {
        let mut line = [0u8; INPUT_MAX];
        let n = self.input_len;
        line[..n].copy_from_slice(&self.input[..n]);
        self.input_len = 0;
        // Only printable ASCII is stored, so this is UTF-8.
        let text = core::str::from_utf8(&line[..n]).unwrap_or("");
        let mut words = text.split_ascii_whitespace();
        let command = words.next();
        let a = words.next();
        let b = words.next();
        let extra = words.next().is_some();
        self.job = match (command, a, b, extra) {
            (None, ..) => Job::Prompt,
            (Some("help"), None, ..) => Job::Help(0),
            (Some("log"), None, ..) => Job::Log {
                from: LOG_DEFAULT_LINES,
                end: u64::MAX,
            },
            (Some("log"), Some(n), None, _) => match n.parse::<u64>() {
                Ok(n) => Job::Log {
                    from: n,
                    end: u64::MAX,
                },
                Err(_) => Job::Error(Line2::BadArgs("usage: log [N]")),
            },
            (Some("stat"), None, ..) => Job::Info { stat: true, i: 0 },
            (Some("cpu"), None, ..) => Job::Info { stat: false, i: 0 },
            (Some("mem"), Some(at), len, false) => match (parse_hex(at), len.map(parse_len)) {
                (Some(at), None) => Job::Mem {
                    at,
                    left: MEM_DEFAULT_LEN,
                },
                (Some(at), Some(Some(left))) if left <= MEM_MAX_LEN => Job::Mem { at, left },
                _ => Job::Error(Line2::BadArgs("usage: mem ADDR [N], N at most 65536")),
            },
            (Some("exit"), None, ..) => Job::End,
            (Some("help" | "stat" | "cpu" | "exit" | "log" | "mem"), ..) => {
                Job::Error(Line2::BadArgs("wrong arguments; try help"))
            }
            _ => Job::Error(Line2::Unknown),
        };
    }

    /// Produce output while the queue has room.
    fn fill(&mut self, env: &ShellEnv<'_>) {
        loop {
            let room = QUEUE_SIZE - self.len;
            match self.job {
                Job::Idle | Job::End => return,
                Job::Prompt => {
                    if room < PROMPT.len() {
                        return;
                    }
                    self.push(PROMPT.as_bytes());
                    self.job = Job::Idle;
                }
                Job::Help(i) => {
                    if room < LINE_MAX + 1 {
                        return;
                    }
                    match HELP.get(i) {
                        Some(l) => {
                            self.push(l.as_bytes());
                            self.push(b"\n");
                            self.job = Job::Help(i + 1);
                        }
                        None => self.job = Job::Prompt,
                    }
                }
                Job::Error(e) => {
                    if room < LINE_MAX + 1 {
                        return;
                    }
                    let text = match e {
                        Line2::Unknown => "unknown command; try help",
                        Line2::BadArgs(s) => s,
                    };
                    self.push(text.as_bytes());
                    self.push(b"\n");
                    self.job = Job::Prompt;
                }
                Job::Info { stat, i } => {
                    if room < LINE_MAX + 1 {
                        return;
                    }
                    let mut line = Line::new();
                    let more = if stat {
                        env.info.stat_line(i, &mut line)
                    } else {
                        env.info.cpu_line(i, &mut line)
                    };
                    if more {
                        self.push(line.as_bytes());
                        self.push(b"\n");
                        self.job = Job::Info { stat, i: i + 1 };
                    } else {
                        self.job = Job::Prompt;
                    }
                }
                Job::Mem { at, left } => {
                    if left == 0 {
                        self.job = Job::Prompt;
                        continue;
                    }
                    if room < LINE_MAX + 1 {
                        return;
                    }
                    let mut line = Line::new();
                    let n = left.min(16) as usize;
                    let mut bytes = [0u8; 16];
                    match env
                        .memory
                        .read_phys(GuestPhysAddr::new(at), &mut bytes[..n])
                    {
                        Ok(()) => {
                            mem_line(&mut line, at, &bytes[..n]);
                            self.job = match at.checked_add(n as u64) {
                                Some(next) => Job::Mem {
                                    at: next,
                                    left: left - n as u64,
                                },
                                None => Job::Prompt,
                            };
                        }
                        Err(e) => {
                            let _ = write!(line, "mem: {:#x} is not guest RAM", e.gpa.as_u64());
                            self.job = Job::Prompt;
                        }
                    }
                    self.push(line.as_bytes());
                    self.push(b"\n");
                }
                Job::Log { from, end } => {
                    let log = env.log.lock();
                    let (from, end) = if end == u64::MAX {
                        // `from` is still the line count: find where the
                        // last `from` lines begin, and stop at today's end.
                        (last_lines_start(&log, from), log.end())
                    } else {
                        (from.max(log.start()), end)
                    };
                    let n = (end.saturating_sub(from)).min(room as u64) as usize;
                    let mut chunk = [0u8; 256];
                    let n = n.min(chunk.len());
                    let (got_at, got) = log.read(from, &mut chunk[..n]);
                    drop(log);
                    self.push(&chunk[..got]);
                    let next = got_at + got as u64;
                    self.job = if next >= end {
                        Job::Prompt
                    } else {
                        Job::Log { from: next, end }
                    };
                    if got == 0 && next < end {
                        // The queue is full: wait for the client.
                        return;
                    }
                }
            }
        }
    }

    /// Queue bytes; callers check the room first.
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            debug_assert!(self.len < QUEUE_SIZE);
            if self.len == QUEUE_SIZE {
                return;
            }
            self.queue[(self.head + self.len) % QUEUE_SIZE] = b;
            self.len += 1;
        }
    }
}

/// Stream offset where the last `lines` lines of the log begin (a final
/// line without its newline counts as a line).
fn last_lines_start<const N: usize>(log: &crate::log_ring::LogRing<N>, lines: u64) -> u64 {
    let (start, end) = (log.start(), log.end());
    if lines == 0 {
        return end;
    }
    let mut seen = 0;
    let mut at = end;
    while at > start {
        let mut b = [0u8; 1];
        log.read(at - 1, &mut b);
        if b[0] == b'\n' && at != end {
            seen += 1;
            if seen == lines {
                return at;
            }
        }
        at -= 1;
    }
    start
}

/// `ADDR`: hex, with or without 0x.
fn parse_hex(s: &str) -> Option<u64> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(digits, 16).ok()
}

/// `N` of `mem`: decimal, or hex with 0x.
fn parse_len(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// One line of a hex dump: the address, up to 16 bytes in hex, then the
/// bytes as ASCII.
fn mem_line(line: &mut Line, at: u64, bytes: &[u8]) {
    let _ = write!(line, "{at:016x}:");
    for b in bytes {
        let _ = write!(line, " {b:02x}");
    }
    for _ in bytes.len()..16 {
        let _ = line.write_str("   ");
    }
    let _ = line.write_str("  ");
    for &b in bytes {
        let c = if (0x20..0x7F).contains(&b) {
            b as char
        } else {
            '.'
        };
        let _ = line.write_char(c);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::log_ring::LogRing;
    use std::string::String;
    use std::vec::Vec;
    use thinvisor_abi::dbgsh::ACK;
    use thinvisor_memory::IsolatedMemory;

    struct Env {
        log: &'static VmmLog,
        mem: IsolatedMemory<'static>,
    }

    impl Env {
        fn new() -> Self {
            let ram = std::boxed::Box::leak(std::vec![0u8; 4096].into_boxed_slice());
            for (i, b) in ram.iter_mut().enumerate() {
                *b = i as u8;
            }
            ram[0x10..0x15].copy_from_slice(b"hello");
            let log = std::boxed::Box::leak(std::boxed::Box::new(spin::Mutex::new(LogRing::new())));
            log.lock().push(b"one\ntwo\nthree\n");
            Self {
                log,
                mem: IsolatedMemory::new(ram),
            }
        }
        fn shell(&self) -> ShellEnv<'_> {
            ShellEnv {
                log: self.log,
                memory: &self.mem,
                info: &NoInfo,
            }
        }
    }

    /// BitVisor's client: one call of -1, then the loop; `keys` are typed
    /// one per input request. Returns what it printed and whether the
    /// session ended (false: it ran out of keys).
    fn client(sh: &mut Dbgsh, env: &ShellEnv<'_>, keys: &[u64]) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut keys = keys.iter();
        sh.call(NOTHING, env);
        let mut s = NOTHING;
        for _ in 0..1_000_000 {
            let r = sh.call(s, env);
            s = NOTHING;
            match r {
                SESSION_END => {
                    sh.call(ACK, env);
                    return (out, true);
                }
                WANT_INPUT => match keys.next() {
                    Some(&k) => s = k,
                    None => return (out, false),
                },
                NOTHING => {}
                NUL_BYTE => {
                    out.push(0);
                    s = ACK;
                }
                b => {
                    assert!(b < 0x100, "{b:#x}");
                    out.push(b as u8);
                    s = ACK;
                }
            }
        }
        panic!("the client never finished");
    }

    fn typed(s: &str) -> Vec<u64> {
        s.bytes().map(u64::from).collect()
    }

    fn session_text(keys: &str) -> String {
        let env = Env::new();
        let mut sh = Dbgsh::new(true);
        let (out, ended) = client(&mut sh, &env.shell(), &typed(keys));
        assert!(ended);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_whole_session_byte_for_byte() {
        let text = session_text("help\nlog 2\nmem 0 16\nbogus\nexit\n");
        let mut want = String::new();
        want += BANNER;
        want += "dbgsh> help\n";
        for l in HELP {
            want += l;
            want += "\n";
        }
        want += "dbgsh> log 2\ntwo\nthree\n";
        want += "dbgsh> mem 0 16\n";
        want +=
            "0000000000000000: 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  ................\n";
        want += "dbgsh> bogus\nunknown command; try help\n";
        want += "dbgsh> exit\n";
        assert_eq!(text, want);
    }

    #[test]
    fn first_session_shows_after_the_startup_calls() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true);
        // The test guest polls 1 + 1 + 1000 times (register_preservation,
        // dbgsh_nothing_pending, efer_is_guests) and expects NOTHING each
        // time.
        const _: () = assert!(STARTUP_CALLS > 1002);
        for i in 0..STARTUP_CALLS {
            // Answers are ignored meanwhile.
            let answer = if i % 2 == 0 { NOTHING } else { u64::from(b'x') };
            assert_eq!(sh.call(answer, &env.shell()), NOTHING, "call {i}");
        }
        // The banner's first byte is pending from then on, whatever the
        // number of polls.
        for _ in 0..5 {
            assert_eq!(
                sh.call(NOTHING, &env.shell()),
                u64::from(BANNER.as_bytes()[0])
            );
        }
        // An answer consumes it; the next byte is pending.
        assert_eq!(sh.call(ACK, &env.shell()), u64::from(BANNER.as_bytes()[1]));
        assert_eq!(
            sh.call(NOTHING, &env.shell()),
            u64::from(BANNER.as_bytes()[1])
        );
    }

    #[test]
    fn input_request_stays_pending_and_zero_asks_again() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true);
        let (_, ended) = client(&mut sh, &env.shell(), &[]);
        assert!(!ended);
        for _ in 0..3 {
            assert_eq!(sh.call(NOTHING, &env.shell()), WANT_INPUT);
        }
        // 0 = no key: still asking.
        assert_eq!(sh.call(0, &env.shell()), WANT_INPUT);
        assert_eq!(sh.call(u64::from(b'x'), &env.shell()), u64::from(b'x'));
    }

    #[test]
    fn nul_goes_both_ways_as_0x100() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true);
        // Memory byte 0 is NUL; the log holds a NUL too.
        env.log.lock().push(b"a\0b\n");
        let (out, _) = client(&mut sh, &env.shell(), &typed("log 1\n"));
        let text = out.split(|&b| b == b'\n').nth(2).unwrap();
        assert_eq!(text, b"a\0b");
        // A NUL typed is ignored by the line editor (a control byte).
        let (out, ended) = client(
            &mut Dbgsh::new(true),
            &env.shell(),
            &[
                NUL_BYTE,
                u64::from(b'e'),
                u64::from(b'x'),
                u64::from(b'i'),
                u64::from(b't'),
                13,
            ],
        );
        assert!(ended);
        assert!(out.ends_with(b"dbgsh> exit\n"));
    }

    #[test]
    fn a_pending_nul_is_0x100() {
        let env = Env::new();
        env.log.lock().push(b"\0\n");
        let mut sh = Dbgsh::new(true);
        let (_, _) = client(&mut sh, &env.shell(), &typed("log 1"));
        // Enter, then the echo "\n", then the NUL.
        assert_eq!(sh.call(u64::from(b'\n'), &env.shell()), u64::from(b'\n'));
        assert_eq!(sh.call(ACK, &env.shell()), NUL_BYTE);
        assert_eq!(sh.call(NOTHING, &env.shell()), NUL_BYTE);
        assert_eq!(sh.call(ACK, &env.shell()), u64::from(b'\n'));
    }

    #[test]
    fn backspace_edits_the_line() {
        let text = session_text("hx\x08elp\nexiq\x7ft\r\n");
        assert!(text.contains("dbgsh> hx\x08 \x08elp\nhelp "), "{text:?}");
        assert!(text.ends_with("dbgsh> exiq\x08 \x08t\n"), "{text:?}");
        // CR LF is one Enter: no empty command between.
        assert_eq!(text.matches(PROMPT).count(), 2);
    }

    #[test]
    fn backspace_on_an_empty_line_does_nothing() {
        let text = session_text("\x08\x7fexit\n");
        assert!(text.ends_with("dbgsh> exit\n"));
    }

    #[test]
    fn errors_and_the_prompt() {
        let text = session_text(
            "\nlog x\nmem\nmem zz\nmem 0 99999999\nmem fff0 32\nhelp me\nstat\ncpu\nexit\n",
        );
        let want = [
            "dbgsh> ",
            "dbgsh> log x",
            "usage: log [N]",
            "dbgsh> mem",
            "wrong arguments; try help",
            "dbgsh> mem zz",
            "usage: mem ADDR [N], N at most 65536",
            "dbgsh> mem 0 99999999",
            "usage: mem ADDR [N], N at most 65536",
            "dbgsh> mem fff0 32",
            "mem: 0xfff0 is not guest RAM",
            "dbgsh> help me",
            "wrong arguments; try help",
            "dbgsh> stat",
            "stat: not available",
            "dbgsh> cpu",
            "cpu: not available",
            "dbgsh> exit",
        ];
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(lines, want);
    }

    #[test]
    fn mem_stops_at_the_end_of_ram() {
        let text = session_text("mem ff8 16\nexit\n");
        // The line would cross the end: an error names the first byte.
        assert!(
            text.contains("dbgsh> mem ff8 16\nmem: 0x1000 is not guest RAM\ndbgsh> "),
            "{text:?}"
        );
        let text = session_text("mem ff0 20\nexit\n");
        assert!(text.contains(
            "dbgsh> mem ff0 20\n0000000000000ff0: f0 f1 f2 f3 f4 f5 f6 f7 f8 f9 fa fb fc fd fe ff  ................\nmem: 0x1000 is not guest RAM\n"
        ), "{text:?}");
    }

    #[test]
    fn long_output_is_never_dropped() {
        let env = Env::new();
        let mut all = String::new();
        for i in 0..3000 {
            let l = std::format!("line {i} of the log, long enough to fill the queue\n");
            env.log.lock().push(l.as_bytes());
            all += &l;
        }
        let mut sh = Dbgsh::new(true);
        let (out, ended) = client(
            &mut sh,
            &env.shell(),
            &typed("log 3000\nmem 0 4096\nexit\n"),
        );
        assert!(ended);
        let text = String::from_utf8(out).unwrap();
        // The ring holds the last 64 KiB: everything it still had.
        let held = {
            let log = env.log.lock();
            let mut b = std::vec![0u8; (log.end() - log.start()) as usize];
            log.read(log.start(), &mut b);
            String::from_utf8(b).unwrap()
        };
        let first_line = held.find('\n').unwrap() + 1;
        assert!(text.contains(&held[first_line..]));
        assert!(all.ends_with(&held[first_line..]));
        let dump: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("0000000000000"))
            .collect();
        assert_eq!(dump.len(), 256);
        assert!(sh.len <= QUEUE_SIZE);
    }

    #[test]
    fn the_queue_holds_only_what_fits_until_drained() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true);
        client(&mut sh, &env.shell(), &typed("mem 0 4096"));
        sh.call(u64::from(b'\n'), &env.shell());
        assert!(sh.len <= QUEUE_SIZE && sh.len > QUEUE_SIZE - LINE_MAX - 1);
        assert!(matches!(sh.job, Job::Mem { .. }));
    }

    #[test]
    fn restart_after_exit() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true);
        let (first, ended) = client(&mut sh, &env.shell(), &typed("exit\n"));
        assert!(ended);
        // The end stays pending until answered: a second client's polls
        // would see it again (the first client answered it already here).
        let (second, ended) = client(&mut sh, &env.shell(), &typed("exit\n"));
        assert!(ended);
        // The new session begins with the banner right away; the first
        // -1 of the second client sees its first byte (printed by it).
        assert_eq!(first, second);
    }

    #[test]
    fn session_end_is_repeated_until_answered() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true);
        client(&mut sh, &env.shell(), &typed("exit"));
        let mut r = sh.call(u64::from(b'\n'), &env.shell());
        while r != SESSION_END {
            r = sh.call(ACK, &env.shell());
        }
        assert_eq!(sh.call(NOTHING, &env.shell()), SESSION_END);
        assert_eq!(sh.call(NOTHING, &env.shell()), SESSION_END);
        assert_eq!(sh.call(ACK, &env.shell()), u64::from(BANNER.as_bytes()[0]));
    }

    #[test]
    fn two_interleaved_clients_share_one_stream() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true);
        let mut got = Vec::new();
        // Two clients take turns; each prints what it receives and acks.
        let mut answers = [NOTHING, NOTHING];
        for turn in 0..2 * BANNER.len() + 40 + STARTUP_CALLS as usize {
            let who = turn % 2;
            let r = sh.call(answers[who], &env.shell());
            answers[who] = NOTHING;
            if r == WANT_INPUT {
                break;
            }
            if r != NOTHING && answers[1 - who] == NOTHING {
                // Only one of them may answer a value: the other saw it
                // pending too but answers first only if it got it first.
                got.push(r as u8);
                answers[who] = ACK;
            }
        }
        let text = String::from_utf8(got).unwrap();
        assert_eq!(text, std::format!("{BANNER}{PROMPT}"));
    }

    #[test]
    fn disabled_streams_the_message_then_ends() {
        let env = Env::new();
        let mut sh = Dbgsh::new(false);
        for round in 0..2 {
            let (out, ended) = client(&mut sh, &env.shell(), &[]);
            assert!(ended, "round {round}");
            assert_eq!(out, DISABLED.as_bytes(), "round {round}");
        }
        // Polls repeat the pending byte.
        assert_eq!(sh.call(NOTHING, &env.shell()), u64::from(b'd'));
        assert_eq!(sh.call(NOTHING, &env.shell()), u64::from(b'd'));
    }

    proptest::proptest! {
        #[test]
        fn random_answers_never_panic(answers in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::prelude::any::<u64>(),
                0u64..0x200,
                proptest::strategy::Just(NOTHING),
                proptest::strategy::Just(ACK),
                proptest::sample::select(std::vec![10u64, 13, 8, 0x7F, 0x100, 0x10A]),
            ], 0..2000), enabled in proptest::prelude::any::<bool>()) {
            let env = Env::new();
            let mut sh = Dbgsh::new(enabled);
            if enabled {
                for _ in 0..STARTUP_CALLS {
                    proptest::prop_assert_eq!(sh.call(NOTHING, &env.shell()), NOTHING);
                }
            }
            for a in answers {
                let r = sh.call(a, &env.shell());
                proptest::prop_assert!(r < 0x100 || r == NUL_BYTE || r == SESSION_END || r == NOTHING, "{:#x}", r);
                proptest::prop_assert!(sh.len <= QUEUE_SIZE);
            }
        }
    }
}

//! The debug shell behind the `dbgsh` VMM call (docs/vmm-call.md, dbgsh).
//!
//! A mailbox: every call carries the client's answer to the value it last
//! received (or -1, no answer) and returns the shell's pending value: a
//! byte to print (NUL as 0x100), 0 (the shell wants a byte of input),
//! 0x10A (the session ended) or -1 (nothing pending). A pending value is
//! returned again by every call until it is answered.
//!
//! One session at a time, owned by one client: the guest address space
//! that made the session's first call (CR3 without its flag and PCID
//! bits, so every thread of a process, on any CPU, is the same client).
//! Another client that calls meanwhile waits: it gets -1, "nothing
//! pending", which BitVisor's client answers by polling again, and its
//! answers are ignored, so two sessions never mix. The session passes on
//! when its client answers the 0x10A that ends it, or when the owner has
//! made no call for [`Dbgsh::new`]'s `takeover_after` ticks (a client
//! killed mid-session must not lock the shell up for good; thinvisor's
//! own client answers "no key yet" while it waits for one, so only a dead
//! or blocked client goes quiet that long).
//!
//! Output goes through a bounded queue ([`QUEUE_SIZE`] bytes). A command
//! never writes more than fits: it produces its output a line at a time
//! and stops while the queue lacks room for a line, so long output (a
//! large `log` or `mem`) is never truncated; it goes on as the client
//! drains the queue.

use crate::services::VmmLog;
use crate::stats::{ExitStats, CALL_SLOTS, CALL_SLOT_UNKNOWN};
use crate::vmmcall::Registry;
use core::fmt::Write;
use thinvisor_abi::dbgsh::{NOTHING, NUL_BYTE, SESSION_END, WANT_INPUT};
use thinvisor_memory::{GuestPhysAddr, GuestPhysMemory};

/// Bytes of output the shell holds before the client has read them.
pub const QUEUE_SIZE: usize = 4096;
/// The longest line a command produces at once (a `mem` line is 84).
pub const LINE_MAX: usize = 128;
/// The longest command line; further bytes are ignored.
pub const INPUT_MAX: usize = 80;
pub use thinvisor_abi::dbgsh::{BANNER, DISABLED, PROMPT};
/// Lines `log` prints without an argument.
pub const LOG_DEFAULT_LINES: u64 = 10;
/// Bytes `mem` dumps without a length.
pub const MEM_DEFAULT_LEN: u64 = 64;
/// The most bytes one `mem` dumps.
pub const MEM_MAX_LEN: u64 = 64 * 1024;
/// `takeover_after` for a shell whose owner is never replaced.
pub const NEVER: u64 = u64::MAX;

/// The help text, one line per command.
pub const HELP: &[&str] = &[
    "help          this list",
    "log [N]       the last N lines of the VMM log (default 10)",
    "stat          VM exits per reason and per CPU, VMM calls per function",
    "cpu           the processor, the backend and the features in use",
    "mem ADDR [N]  hex dump of N bytes (default 64) at guest-physical ADDR (hex)",
    "exit          end the session",
];

/// Who makes a call, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The calling address space (CR3 without bits 11:0).
    pub client: u64,
    /// The VMM's clock, in the ticks of `takeover_after`.
    pub now: u64,
}

/// The client a session belongs to and its last call.
#[derive(Clone, Copy, Debug)]
struct Owner {
    client: u64,
    last: u64,
}

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

/// What the hypervisor tells the shell about itself.
pub trait ShellInfo: Sync {
    /// How many processors may have exit counts (`stat` asks for
    /// 0..cpus()).
    fn cpus(&self) -> usize {
        0
    }
    /// Processor `cpu`'s exit and call counts, if it runs a guest.
    fn exit_stats(&self, _cpu: usize) -> Option<&ExitStats> {
        None
    }
    /// The name of exit slot `slot` (the backend's own reason names).
    fn exit_name(&self, _slot: usize) -> &'static str {
        "?"
    }
    /// `cpu`: writes line `index` (without its newline) and returns true,
    /// or returns false when there is no such line; the shell asks for
    /// lines 0, 1, 2, ... as its queue has room.
    fn cpu_line(&self, index: usize, out: &mut Line) -> bool {
        if index == 0 {
            let _ = out.write_str("cpu: not available");
        }
        index == 0
    }
    /// thinvisor's own memory [start, end), which `mem` refuses by name.
    fn reserved(&self) -> Option<(u64, u64)> {
        None
    }
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
    /// The VMM-call functions, for `stat`'s names.
    pub registry: &'a Registry,
    /// `stat`'s last line (the log_set_buf buffer's state), if any.
    pub extra_stat: Option<&'a dyn Fn(&mut Line)>,
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
    /// The next line of `stat`.
    Stat(StatPos),
    /// Line `i` of `cpu`.
    Cpu(usize),
    /// `left` bytes of guest memory at `at`.
    Mem { at: u64, left: u64 },
    /// One error line, then the prompt.
    Error(Line2),
    /// The session ends once the queue is drained.
    End,
}

/// Where `stat` is: it walks the processors' exit counts in slot order
/// (so counts that change meanwhile never repeat or skip a reason), then
/// the VMM calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StatPos {
    /// The heading line.
    Heading,
    /// Processor `cpu`: its total line (`slot` None), then its nonzero
    /// exit slots from `slot` on.
    Exits { cpu: usize, slot: Option<usize> },
    /// The VMM calls' heading.
    CallsHeading,
    /// The calls of function number `slot` (and on).
    Calls(usize),
    /// The line from `ShellEnv::extra_stat`.
    Extra,
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
    /// Ticks of silence after which another client may take the session.
    takeover_after: u64,
    /// The session's client (None: the next caller takes it).
    owner: Option<Owner>,
    /// Sessions started since boot.
    sessions: u64,
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
    /// [`DISABLED`] and ends every session at once. A session whose
    /// client has not called for `takeover_after` ticks of [`Caller::now`]
    /// may be taken by another client ([`NEVER`]: it may not).
    pub fn new(enabled: bool, takeover_after: u64) -> Self {
        let mut shell = Self {
            enabled,
            takeover_after,
            owner: None,
            sessions: 0,
            pending: NOTHING,
            queue: [0; QUEUE_SIZE],
            head: 0,
            len: 0,
            job: Job::Idle,
            input: [0; INPUT_MAX],
            input_len: 0,
            after_cr: false,
            disabled_at: 0,
        };
        shell.begin();
        shell
    }

    /// One call: `answer` is RBX, the result is RAX.
    pub fn call(&mut self, answer: u64, caller: Caller, env: &ShellEnv<'_>) -> u64 {
        if !self.enabled {
            return self.call_disabled(answer);
        }
        match &mut self.owner {
            Some(owner) if owner.client == caller.client => owner.last = caller.now,
            Some(owner) => {
                // A clock that reads earlier on this CPU counts as no
                // time at all.
                let idle = caller.now.saturating_sub(owner.last);
                if idle < self.takeover_after {
                    // Busy: this client waits, its answers unheard.
                    return NOTHING;
                }
                log::info!(
                    "dbgsh: client {:#x} made no call for {idle} ticks; client {:#x} takes the shell",
                    owner.client,
                    caller.client
                );
                // A fresh session; the caller's answer was to a value of
                // the old one.
                self.begin();
                self.claim(caller);
                return self.poll(env);
            }
            None => {
                // A free shell: its pending value is the first byte of the
                // next session's banner, which the caller has not seen.
                // Its answer was to a value of its own earlier session
                // (e.g. "no key yet" from a client that waited), and must
                // not acknowledge that byte.
                self.claim(caller);
                return self.poll(env);
            }
        }
        if answer != NOTHING && self.pending != NOTHING {
            self.answer(answer);
        }
        self.poll(env)
    }

    /// [`call`](Self::call) when it needs no environment: the shell is
    /// enabled, the caller owns the session, answers nothing and a value
    /// is pending (a client's polling loop waiting for it to be read).
    /// Does what `call` would (the owner's clock is updated) and returns
    /// the pending value; `None` when the full call is needed.
    #[inline]
    pub fn call_quick(&mut self, answer: u64, caller: Caller) -> Option<u64> {
        if !self.enabled || answer != NOTHING || self.pending == NOTHING {
            return None;
        }
        match &mut self.owner {
            Some(owner) if owner.client == caller.client => {
                owner.last = caller.now;
                Some(self.pending)
            }
            _ => None,
        }
    }

    /// The caller owns the session from now on.
    fn claim(&mut self, caller: Caller) {
        self.sessions += 1;
        self.owner = Some(Owner {
            client: caller.client,
            last: caller.now,
        });
        log::info!(
            "dbgsh: session {} started (client {:#x})",
            self.sessions,
            caller.client
        );
    }

    /// The pending value, producing output first if there is none.
    fn poll(&mut self, env: &ShellEnv<'_>) -> u64 {
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
                // The shell restarts for the next client, whoever calls
                // first.
                log::info!("dbgsh: session {} ended", self.sessions);
                self.begin();
                self.owner = None;
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
            (Some("stat"), None, ..) => Job::Stat(StatPos::Heading),
            (Some("cpu"), None, ..) => Job::Cpu(0),
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
                Job::Stat(pos) => {
                    if room < LINE_MAX + 1 {
                        return;
                    }
                    let mut line = Line::new();
                    let (wrote, next) = stat_step(pos, env, &mut line);
                    if wrote {
                        self.push(line.as_bytes());
                        self.push(b"\n");
                    }
                    self.job = next.map_or(Job::Prompt, Job::Stat);
                }
                Job::Cpu(i) => {
                    if room < LINE_MAX + 1 {
                        return;
                    }
                    let mut line = Line::new();
                    if env.info.cpu_line(i, &mut line) {
                        self.push(line.as_bytes());
                        self.push(b"\n");
                        self.job = Job::Cpu(i + 1);
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
                    let own = env.info.reserved().and_then(|(start, end)| {
                        let last = at.saturating_add(n as u64 - 1);
                        (at < end && last >= start).then_some(at.max(start))
                    });
                    if let Some(first) = own {
                        let _ = write!(line, "mem: {first:#x} is thinvisor's own memory: refused");
                        self.job = Job::Prompt;
                        self.push(line.as_bytes());
                        self.push(b"\n");
                        continue;
                    }
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

/// One step of `stat`: writes at most one line into `out` (says whether
/// it did) and returns where to go on (None: done).
fn stat_step(pos: StatPos, env: &ShellEnv<'_>, out: &mut Line) -> (bool, Option<StatPos>) {
    let info = env.info;
    // The first processor at or after `cpu` that has counts.
    let next_cpu = |cpu: usize| (cpu..info.cpus()).find(|&c| info.exit_stats(c).is_some());
    match pos {
        StatPos::Heading => {
            let _ = out.write_str("VM exits since boot, per CPU and reason:");
            let next = match next_cpu(0) {
                Some(cpu) => StatPos::Exits { cpu, slot: None },
                None => StatPos::CallsHeading,
            };
            (true, Some(next))
        }
        StatPos::Exits { cpu, slot } => {
            let Some(stats) = info.exit_stats(cpu) else {
                return (false, Some(StatPos::CallsHeading));
            };
            let from = match slot {
                None => {
                    let _ = write!(out, "CPU {cpu}: {} exits", stats.total());
                    return (true, Some(StatPos::Exits { cpu, slot: Some(0) }));
                }
                Some(from) => from,
            };
            match stats.next_nonzero(from) {
                Some((slot, count)) => {
                    let _ = write!(out, "  {:<28} {count:>12}", info.exit_name(slot));
                    (
                        true,
                        Some(StatPos::Exits {
                            cpu,
                            slot: Some(slot + 1),
                        }),
                    )
                }
                None => {
                    let next = match next_cpu(cpu + 1) {
                        Some(cpu) => StatPos::Exits { cpu, slot: None },
                        None => StatPos::CallsHeading,
                    };
                    (false, Some(next))
                }
            }
        }
        StatPos::CallsHeading => {
            let _ = out.write_str("VMM calls since boot, all CPUs:");
            (true, Some(StatPos::Calls(0)))
        }
        StatPos::Calls(slot) if slot < CALL_SLOT_UNKNOWN => {
            // Numbers no function has are counted with the unknown ones.
            let name = match slot {
                0 => Some("(look up a name)"),
                n => env.registry.name(n as u64),
            };
            if let Some(name) = name {
                let _ = write!(
                    out,
                    "  {slot:>2} {name:<25} {:>12}",
                    call_count(info, |s| s.calls(slot))
                );
            }
            (name.is_some(), Some(StatPos::Calls(slot + 1)))
        }
        StatPos::Calls(_) => {
            let unknown = call_count(info, |s| {
                (1..CALL_SLOTS)
                    .filter(|&n| n == CALL_SLOT_UNKNOWN || env.registry.name(n as u64).is_none())
                    .map(|n| s.calls(n))
                    .sum()
            });
            let _ = write!(out, "  {:<28} {unknown:>12}", "numbers of no function");
            (true, Some(StatPos::Extra))
        }
        StatPos::Extra => match env.extra_stat {
            Some(line) => {
                line(out);
                (true, None)
            }
            None => (false, None),
        },
    }
}

/// `count` of every processor's counts, added up.
fn call_count(info: &dyn ShellInfo, count: impl Fn(&ExitStats) -> u64) -> u64 {
    (0..info.cpus())
        .filter_map(|c| info.exit_stats(c))
        .map(count)
        .fold(0, u64::wrapping_add)
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
        registry: Registry,
    }

    /// The one client of most tests.
    const ME: Caller = Caller {
        client: 0x1000,
        now: 0,
    };
    /// Another address space.
    const OTHER: u64 = 0x2000;

    impl Env {
        fn new() -> Self {
            let ram = std::boxed::Box::leak(std::vec![0u8; 4096].into_boxed_slice());
            for (i, b) in ram.iter_mut().enumerate() {
                *b = i as u8;
            }
            ram[0x10..0x15].copy_from_slice(b"hello");
            let log = std::boxed::Box::leak(std::boxed::Box::new(spin::Mutex::new(LogRing::new())));
            log.lock().push(b"one\ntwo\nthree\n");
            let mut registry = Registry::new();
            crate::services::register_all(&mut registry);
            Self {
                log,
                mem: IsolatedMemory::new(ram),
                registry,
            }
        }
        fn shell(&self) -> ShellEnv<'_> {
            self.shell_with(&NoInfo)
        }
        fn shell_with<'a>(&'a self, info: &'a dyn ShellInfo) -> ShellEnv<'a> {
            ShellEnv {
                log: self.log,
                memory: &self.mem,
                info,
                registry: &self.registry,
                extra_stat: None,
            }
        }
    }

    /// `call_quick` answers exactly when the full call would only return
    /// the pending value, and answers the same; otherwise it leaves the
    /// shell alone.
    #[test]
    fn quick_call_is_the_full_call_when_it_answers() {
        let env = Env::new();
        let sh_env = env.shell();
        let mut quick = Dbgsh::new(true, 100);
        let mut full = Dbgsh::new(true, 100);
        // No session yet: the full call is needed (it claims the shell).
        assert_eq!(quick.call_quick(NOTHING, ME), None);
        let first = quick.call(NOTHING, ME, &sh_env);
        assert_eq!(full.call(NOTHING, ME, &sh_env), first);
        // Polling without answering: the pending value, as the full call
        // gives it, and the owner's clock moves in both.
        for now in 1..5 {
            let me = Caller { now, ..ME };
            assert_eq!(quick.call_quick(NOTHING, me), Some(first));
            assert_eq!(full.call(NOTHING, me, &sh_env), first);
        }
        // Another client, an answer, or a disabled shell: the full call.
        let other = Caller {
            client: OTHER,
            now: 5,
        };
        assert_eq!(quick.call_quick(NOTHING, other), None);
        assert_eq!(quick.call_quick(ACK, ME), None);
        assert_eq!(Dbgsh::new(false, NEVER).call_quick(NOTHING, ME), None);
        // The other client waits in both: the owner's clock was updated.
        assert_eq!(
            quick.call(NOTHING, other, &sh_env),
            full.call(NOTHING, other, &sh_env)
        );
        // The same session continues alike.
        assert_eq!(
            client(&mut quick, &sh_env, &[]),
            client(&mut full, &sh_env, &[])
        );
    }

    /// BitVisor's client: one call of -1, then the loop; `keys` are typed
    /// one per input request. Returns what it printed and whether the
    /// session ended (false: it ran out of keys).
    fn client(sh: &mut Dbgsh, env: &ShellEnv<'_>, keys: &[u64]) -> (Vec<u8>, bool) {
        client_as(sh, env, ME, keys)
    }

    /// The same as client `who`.
    fn client_as(sh: &mut Dbgsh, env: &ShellEnv<'_>, who: Caller, keys: &[u64]) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut keys = keys.iter();
        sh.call(NOTHING, who, env);
        let mut s = NOTHING;
        for _ in 0..1_000_000 {
            let r = sh.call(s, who, env);
            s = NOTHING;
            match r {
                SESSION_END => {
                    sh.call(ACK, who, env);
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
        let mut sh = Dbgsh::new(true, NEVER);
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
    fn the_first_poll_sees_the_banner_and_repeats_it() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true, NEVER);
        // The banner's first byte is pending from the first call on,
        // whatever the number of polls.
        for _ in 0..5 {
            assert_eq!(
                sh.call(NOTHING, ME, &env.shell()),
                u64::from(BANNER.as_bytes()[0])
            );
        }
        // An answer consumes it; the next byte is pending.
        assert_eq!(
            sh.call(ACK, ME, &env.shell()),
            u64::from(BANNER.as_bytes()[1])
        );
        assert_eq!(
            sh.call(NOTHING, ME, &env.shell()),
            u64::from(BANNER.as_bytes()[1])
        );
    }

    #[test]
    fn input_request_stays_pending_and_zero_asks_again() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true, NEVER);
        let (_, ended) = client(&mut sh, &env.shell(), &[]);
        assert!(!ended);
        for _ in 0..3 {
            assert_eq!(sh.call(NOTHING, ME, &env.shell()), WANT_INPUT);
        }
        // 0 = no key: still asking.
        assert_eq!(sh.call(0, ME, &env.shell()), WANT_INPUT);
        assert_eq!(sh.call(u64::from(b'x'), ME, &env.shell()), u64::from(b'x'));
    }

    #[test]
    fn nul_goes_both_ways_as_0x100() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true, NEVER);
        // Memory byte 0 is NUL; the log holds a NUL too.
        env.log.lock().push(b"a\0b\n");
        let (out, _) = client(&mut sh, &env.shell(), &typed("log 1\n"));
        let text = out.split(|&b| b == b'\n').nth(2).unwrap();
        assert_eq!(text, b"a\0b");
        // A NUL typed is ignored by the line editor (a control byte).
        let (out, ended) = client(
            &mut Dbgsh::new(true, NEVER),
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
        let mut sh = Dbgsh::new(true, NEVER);
        let (_, _) = client(&mut sh, &env.shell(), &typed("log 1"));
        // Enter, then the echo "\n", then the NUL.
        assert_eq!(
            sh.call(u64::from(b'\n'), ME, &env.shell()),
            u64::from(b'\n')
        );
        assert_eq!(sh.call(ACK, ME, &env.shell()), NUL_BYTE);
        assert_eq!(sh.call(NOTHING, ME, &env.shell()), NUL_BYTE);
        assert_eq!(sh.call(ACK, ME, &env.shell()), u64::from(b'\n'));
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
            "VM exits since boot, per CPU and reason:",
            "VMM calls since boot, all CPUs:",
            "   0 (look up a name)                     0",
            "   1 dbgsh                                0",
            "   2 log_set_buf                          0",
            "   3 log_read                             0",
            "  numbers of no function                  0",
            "dbgsh> cpu",
            "cpu: not available",
            "dbgsh> exit",
        ];
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(lines, want);
    }

    /// Two processors' counts, a CPU report and a reserved range.
    struct TwoCpus {
        stats: [ExitStats; 2],
    }

    impl ShellInfo for TwoCpus {
        fn cpus(&self) -> usize {
            4
        }
        fn exit_stats(&self, cpu: usize) -> Option<&ExitStats> {
            // CPU 1 runs no guest.
            [Some(&self.stats[0]), None, Some(&self.stats[1])]
                .get(cpu)
                .copied()
                .flatten()
        }
        fn exit_name(&self, slot: usize) -> &'static str {
            ["ZERO", "CPUID", "VMMCALL"]
                .get(slot)
                .copied()
                .unwrap_or("?")
        }
        fn cpu_line(&self, index: usize, out: &mut Line) -> bool {
            match index {
                0 => out.write_str("vendor AuthenticAMD, backend SVM").is_ok(),
                1 => out.write_str("2 CPUs under thinvisor").is_ok(),
                _ => false,
            }
        }
        fn reserved(&self) -> Option<(u64, u64)> {
            Some((0x800, 0x900))
        }
    }

    #[test]
    fn stat_cpu_and_reserved_memory() {
        let env = Env::new();
        let info = TwoCpus {
            stats: Default::default(),
        };
        for _ in 0..3 {
            info.stats[0].record(1);
        }
        info.stats[0].record(2);
        info.stats[1].record(2);
        info.stats[0].record_call(0);
        info.stats[1].record_call(1);
        info.stats[1].record_call(1);
        info.stats[1].record_call(7);
        info.stats[1].record_call(999);
        let extra = |out: &mut Line| {
            let _ = out.write_str("log_set_buf: none");
        };
        let mut shell = env.shell_with(&info);
        shell.extra_stat = Some(&extra);
        let mut sh = Dbgsh::new(true, NEVER);
        let (out, ended) = client(
            &mut sh,
            &shell,
            &typed("stat\ncpu\nmem 7f0 32\nmem 8ff\nexit\n"),
        );
        assert!(ended);
        let text = String::from_utf8(out).unwrap();
        let want = "dbgsh> stat
VM exits since boot, per CPU and reason:
CPU 0: 4 exits
  CPUID                                   3
  VMMCALL                                 1
CPU 2: 1 exits
  VMMCALL                                 1
VMM calls since boot, all CPUs:
   0 (look up a name)                     1
   1 dbgsh                                2
   2 log_set_buf                          0
   3 log_read                             0
  numbers of no function                  2
log_set_buf: none
dbgsh> cpu
vendor AuthenticAMD, backend SVM
2 CPUs under thinvisor
dbgsh> mem 7f0 32
00000000000007f0: f0 f1 f2 f3 f4 f5 f6 f7 f8 f9 fa fb fc fd fe ff  ................
mem: 0x800 is thinvisor's own memory: refused
dbgsh> mem 8ff
mem: 0x8ff is thinvisor's own memory: refused
dbgsh> exit
";
        assert_eq!(&text[BANNER.len() + PROMPT.len() - "dbgsh> ".len()..], want);
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
        let mut sh = Dbgsh::new(true, NEVER);
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
        let mut sh = Dbgsh::new(true, NEVER);
        client(&mut sh, &env.shell(), &typed("mem 0 4096"));
        sh.call(u64::from(b'\n'), ME, &env.shell());
        assert!(sh.len <= QUEUE_SIZE && sh.len > QUEUE_SIZE - LINE_MAX - 1);
        assert!(matches!(sh.job, Job::Mem { .. }));
    }

    #[test]
    fn restart_after_exit() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true, NEVER);
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
        let mut sh = Dbgsh::new(true, NEVER);
        client(&mut sh, &env.shell(), &typed("exit"));
        let mut r = sh.call(u64::from(b'\n'), ME, &env.shell());
        while r != SESSION_END {
            r = sh.call(ACK, ME, &env.shell());
        }
        assert_eq!(sh.call(NOTHING, ME, &env.shell()), SESSION_END);
        assert_eq!(sh.call(NOTHING, ME, &env.shell()), SESSION_END);
        assert_eq!(
            sh.call(ACK, ME, &env.shell()),
            u64::from(BANNER.as_bytes()[0])
        );
    }

    #[test]
    fn a_second_client_waits_until_the_session_ends() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true, 100);
        let other = Caller {
            client: OTHER,
            now: 50,
        };
        // The first client takes the shell and reads to the prompt.
        let (first, ended) = client(&mut sh, &env.shell(), &[]);
        assert!(!ended);
        assert_eq!(first, std::format!("{BANNER}{PROMPT}").as_bytes());
        // The other's polls and answers go unheard: it waits.
        for answer in [NOTHING, ACK, u64::from(b'x'), u64::from(b'\n')] {
            assert_eq!(sh.call(answer, other, &env.shell()), NOTHING);
        }
        // The first client's session is untouched by them: it types on.
        let (_, ended) = client_as(&mut sh, &env.shell(), ME, &typed("help\nexit\n"));
        assert!(ended);
        // Ended: the other client now gets a session of its own.
        let (second, ended) = client_as(&mut sh, &env.shell(), other, &typed("exit\n"));
        assert!(ended);
        assert_eq!(second, std::format!("{BANNER}{PROMPT}exit\n").as_bytes());
    }

    /// Regression (found by the `dbgsh` fuzz target, and seen in
    /// `bochs-skylake-x-linux` as "hinvisor dbgsh"): a client that waited
    /// answering "no key yet" (0) got the free shell with that answer,
    /// which acknowledged the first byte of the new session's banner.
    #[test]
    fn a_new_owner_sees_the_whole_banner_whatever_it_answers() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true, NEVER);
        let other = Caller {
            client: OTHER,
            now: 0,
        };
        let (_, ended) = client_as(&mut sh, &env.shell(), other, &typed("exit\n"));
        assert!(ended);
        for first_answer in [ACK, u64::from(b'x'), NOTHING] {
            let mut out = Vec::new();
            let mut r = sh.call(first_answer, ME, &env.shell());
            while r != WANT_INPUT {
                assert!(r < 0x100, "{r:#x}");
                out.push(r as u8);
                r = sh.call(ACK, ME, &env.shell());
            }
            assert_eq!(out, std::format!("{BANNER}{PROMPT}").as_bytes());
            // End this session for the next round.
            assert_eq!(
                sh.call(u64::from(b'\n'), ME, &env.shell()),
                u64::from(b'\n')
            );
            let (_, ended) = client_as(&mut sh, &env.shell(), ME, &typed("exit\n"));
            assert!(ended);
        }
    }

    #[test]
    fn interleaved_clients_never_mix_sessions() {
        // Two clients take turns call by call, each typing its own
        // command; whoever holds the shell finishes before the other
        // starts, and each sees exactly one whole session.
        let env = Env::new();
        let mut sh = Dbgsh::new(true, NEVER);
        let who = [
            Caller {
                client: 0x1000,
                now: 0,
            },
            Caller {
                client: OTHER,
                now: 0,
            },
        ];
        let keys = [typed("help\nexit\n"), typed("log 1\nexit\n")];
        let mut next_key = [0usize; 2];
        let mut answer = [NOTHING; 2];
        let mut out = [Vec::new(), Vec::new()];
        let mut done = [false; 2];
        for turn in 0..200_000 {
            let c = turn % 2;
            if done[c] {
                if done[1 - c] {
                    break;
                }
                continue;
            }
            let r = sh.call(answer[c], who[c], &env.shell());
            answer[c] = NOTHING;
            match r {
                SESSION_END => {
                    sh.call(ACK, who[c], &env.shell());
                    done[c] = true;
                }
                WANT_INPUT => {
                    answer[c] = keys[c][next_key[c]];
                    next_key[c] += 1;
                }
                NOTHING => {}
                b => {
                    out[c].push(b as u8);
                    answer[c] = ACK;
                }
            }
        }
        assert!(done[0] && done[1]);
        let a = String::from_utf8(out[0].clone()).unwrap();
        let b = String::from_utf8(out[1].clone()).unwrap();
        assert!(
            a.starts_with(BANNER) && a.ends_with("dbgsh> exit\n"),
            "{a:?}"
        );
        assert!(a.contains("dbgsh> help\nhelp "), "{a:?}");
        assert!(!a.contains("log 1"), "{a:?}");
        assert!(
            b.starts_with(BANNER) && b.ends_with("dbgsh> exit\n"),
            "{b:?}"
        );
        assert!(b.contains("dbgsh> log 1\n"), "{b:?}");
        assert!(!b.contains("dbgsh> help"), "{b:?}");
    }

    #[test]
    fn a_waiting_clients_stale_answer_is_not_applied() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true, NEVER);
        let other = Caller {
            client: OTHER,
            now: 0,
        };
        let (_, ended) = client(&mut sh, &env.shell(), &typed("exit\n"));
        assert!(ended);
        // The first client's last call (ACK to the end) left the next
        // session's first byte pending and nobody owning it. The other
        // client, which was answering a byte of its own when it was
        // told to wait, claims it with that answer: the byte stays.
        let first = u64::from(BANNER.as_bytes()[0]);
        assert_eq!(sh.call(ACK, other, &env.shell()), first);
        assert_eq!(sh.call(NOTHING, other, &env.shell()), first);
        let (out, ended) = client_as(&mut sh, &env.shell(), other, &typed("exit\n"));
        assert!(ended);
        assert_eq!(out, std::format!("{BANNER}{PROMPT}exit\n").as_bytes());
    }

    #[test]
    fn an_idle_session_is_taken_over() {
        let env = Env::new();
        let mut sh = Dbgsh::new(true, 100);
        let at = |client, now| Caller { client, now };
        // The owner reads half the banner, then goes quiet at time 10.
        let mut r = sh.call(NOTHING, at(0x1000, 0), &env.shell());
        for _ in 0..5 {
            r = sh.call(ACK, at(0x1000, 10), &env.shell());
        }
        assert_eq!(r, u64::from(BANNER.as_bytes()[5]));
        // Within the limit the other waits; a clock that went backwards
        // (another CPU's) is no time at all.
        assert_eq!(sh.call(NOTHING, at(OTHER, 109), &env.shell()), NOTHING);
        assert_eq!(sh.call(NOTHING, at(OTHER, 3), &env.shell()), NOTHING);
        // At the limit it gets a fresh session, from the banner's start,
        // and its stray answer is not taken as one.
        assert_eq!(
            sh.call(ACK, at(OTHER, 110), &env.shell()),
            u64::from(BANNER.as_bytes()[0])
        );
        // The old owner now waits in turn.
        assert_eq!(sh.call(ACK, at(0x1000, 111), &env.shell()), NOTHING);
        let (out, ended) = client_as(&mut sh, &env.shell(), at(OTHER, 112), &typed("exit\n"));
        assert!(ended);
        assert_eq!(out, std::format!("{BANNER}{PROMPT}exit\n").as_bytes());
    }

    #[test]
    fn disabled_streams_the_message_then_ends() {
        let env = Env::new();
        let mut sh = Dbgsh::new(false, NEVER);
        for round in 0..2 {
            let (out, ended) = client(&mut sh, &env.shell(), &[]);
            assert!(ended, "round {round}");
            assert_eq!(out, DISABLED.as_bytes(), "round {round}");
        }
        // Polls repeat the pending byte.
        assert_eq!(sh.call(NOTHING, ME, &env.shell()), u64::from(b'd'));
        assert_eq!(sh.call(NOTHING, ME, &env.shell()), u64::from(b'd'));
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
            let mut sh = Dbgsh::new(enabled, 3);
            for (i, a) in answers.into_iter().enumerate() {
                // Three clients and a clock that jumps about.
                let who = Caller { client: (a % 3) << 12, now: (i as u64 * 7) % 13 };
                let r = sh.call(a, who, &env.shell());
                proptest::prop_assert!(r < 0x100 || r == NUL_BYTE || r == SESSION_END || r == NOTHING, "{:#x}", r);
                proptest::prop_assert!(sh.len <= QUEUE_SIZE);
            }
        }
    }
}

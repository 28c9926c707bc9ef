//! The `log_set_buf` checks (docs/vmm-call.md): a buffer in this guest's
//! memory that receives thinvisor's log, read the way a guest kernel
//! would: copy what the counter says is unread, then a locked decrement.
//!
//! The guest makes thinvisor log by calling `log_set_buf` itself: every
//! call at CPL 0 logs one line (registered, unregistered, or refused with
//! the reason). What the buffer received is compared with `log_read`,
//! which reads the same log by stream offset (bytes since boot).

use crate::cpu::{self, vmm_call, Regs};
use crate::passthrough::{ensure, fail, lookup, why, CheckResult, Why};
use crate::{recover, user};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};
use thinvisor_abi as abi;

/// `log_set_buf`'s answer to a refused buffer.
const REFUSED: u64 = u64::MAX;
/// The smallest buffer thinvisor accepts (counter included).
const MIN_SIZE: u64 = 128;
/// The largest.
const MAX_SIZE: u64 = 16 << 20;
/// Bytes of the counter.
const COUNTER: u64 = 4;
/// KiB of log the stream check moves through the buffer unless the
/// command line says `stream_kib=N`: every byte also goes to thinvisor's
/// console (COM1 and port 0xE9), which is slow in emulators, so the 1 MiB
/// stream runs in one case per vendor (xtask/src/cases.rs).
const STREAM_KIB: u64 = 128;

/// Ring bytes of [`RING`]: not a multiple of any line length, so lines
/// wrap around its end at every position.
const RING_LEN: usize = 8192 - 4;

/// The buffer registered with `log_set_buf`: the counter, then the ring.
#[repr(C, align(4096))]
struct Ring {
    counter: AtomicU32,
    bytes: UnsafeCell<[u8; RING_LEN]>,
}
// SAFETY: one CPU; the VMM writes the bytes only during this guest's VMM
// calls, and the counter is atomic.
unsafe impl Sync for Ring {}
static RING: Ring = Ring {
    counter: AtomicU32::new(0),
    bytes: UnsafeCell::new([0; RING_LEN]),
};

/// Where `log_read` copies the reference bytes, and where the reader
/// collects what it consumed.
const CHUNK: usize = 8192;
#[repr(C, align(4096))]
struct Chunk(UnsafeCell<[u8; CHUNK]>);
// SAFETY: one CPU; only these checks (and the VMM, during `log_read`)
// touch them.
unsafe impl Sync for Chunk {}
static REFERENCE: Chunk = Chunk(UnsafeCell::new([0; CHUNK]));
static CONSUMED: Chunk = Chunk(UnsafeCell::new([0; CHUNK]));

/// Guest-physical (= linear: identity-mapped) address of the ring buffer.
fn ring_gpa() -> u64 {
    core::ptr::addr_of!(RING) as u64
}

fn set_buf_number() -> Result<u64, Why> {
    match lookup(abi::names::LOG_SET_BUF) {
        0 => Err(why(format_args!("lookup of \"log_set_buf\" returned 0"))),
        n => Ok(n),
    }
}

fn log_read_number() -> Result<u64, Why> {
    match lookup(abi::names::LOG_READ) {
        0 => Err(why(format_args!("lookup of \"log_read\" returned 0"))),
        n => Ok(n),
    }
}

/// `log_set_buf(gpa, size)` from CPL 0: RAX; fails unless every other
/// register came back unchanged.
fn set_buf(number: u64, gpa: u64, size: u64) -> Result<u64, Why> {
    let before = Regs {
        rax: number,
        rbx: gpa,
        rcx: size,
        rdx: 0x1234_5678_9ABC_DEF0,
        rsi: 0x5151,
        rdi: 0xD1D1,
        ..Regs::default()
    };
    let mut after = before;
    vmm_call(&mut after);
    for ((name, b), (_, a)) in before.all_but_rax().into_iter().zip(after.all_but_rax()) {
        ensure!(
            a == b,
            "{name} changed from {b:#x} to {a:#x} by log_set_buf({gpa:#x}, {size})"
        );
    }
    Ok(after.rax)
}

/// `log_read(buf, len, from)`: (bytes copied, stream offset of the first).
fn log_read(number: u64, buf: u64, len: u64, from: u64) -> Result<(u64, u64), Why> {
    recover::vmm_call4(cpu::uses_vmcall(), number, buf, len, from, recover::PF)
        .map_err(|c| why(format_args!("log_read raised vector {}", c.vector)))
}

/// The stream offset of the log's end (the next byte thinvisor logs).
fn log_end(number: u64) -> Result<u64, Why> {
    Ok(log_read(number, REFERENCE.0.get() as u64, 0, u64::MAX)?.1)
}

/// The guest's reader of [`RING`]: its read position and what it read.
struct Reader {
    /// Bytes of the ring as registered (at most `RING_LEN`).
    ring: usize,
    tail: usize,
    /// Bytes consumed since registration.
    total: u64,
}

impl Reader {
    fn new(size: u64) -> Self {
        Self {
            ring: (size - COUNTER) as usize,
            tail: 0,
            total: 0,
        }
    }

    /// Copies up to `out.len()` unread bytes into `out`, then gives them
    /// back with a locked subtraction from the counter; returns how many.
    fn consume(&mut self, out: &mut [u8]) -> usize {
        let unread = RING.counter.load(Ordering::Acquire) as usize;
        let n = unread.min(out.len());
        let ring = RING.bytes.get().cast::<u8>();
        for b in out.iter_mut().take(n) {
            // SAFETY: tail < self.ring <= RING_LEN: inside the ring;
            // volatile because the VMM, not this program, wrote it.
            *b = unsafe { ring.add(self.tail).read_volatile() };
            self.tail = (self.tail + 1) % self.ring;
        }
        // `lock xadd`: the VMM adds concurrently in general.
        RING.counter.fetch_sub(n as u32, Ordering::Release);
        self.total += n as u64;
        n
    }
}

/// Fails unless `got` equals the log's bytes at stream offset `from`.
fn ensure_stream(read: u64, got: &[u8], from: u64) -> CheckResult {
    let (n, first) = log_read(read, REFERENCE.0.get() as u64, got.len() as u64, from)?;
    ensure!(
        (n, first) == (got.len() as u64, from),
        "log_read of {} bytes at {from} returned RAX {n:#x} RBX {first:#x}",
        got.len()
    );
    // SAFETY: log_read wrote n <= CHUNK bytes there and is done; nothing
    // else refers to the buffer while this shared reference lives.
    let want = unsafe { &(&*REFERENCE.0.get())[..got.len()] };
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        fail!(
            "byte {} of the buffer's stream is {:#04x}, log_read says {:#04x}",
            from + i as u64,
            got[i],
            want[i]
        );
    }
    Ok(())
}

/// Makes thinvisor log one line: a refused `log_set_buf` (too small).
fn log_one_line(number: u64) -> CheckResult {
    let rax = set_buf(number, ring_gpa(), 7)?;
    ensure!(rax == REFUSED, "log_set_buf(ring, 7) returned {rax:#x}");
    Ok(())
}

/// `log_set_buf_refused`: buffers outside RAM, too small, too large and
/// not aligned give all ones and leave the registered buffer (and the
/// refused buffer's memory) alone; `extra` adds more refused buffers
/// (thinvisor's own block in the pass-through mode).
pub fn refused(extra: &[(u64, u64, &str)]) -> CheckResult {
    let number = set_buf_number()?;
    let ring = ring_gpa();
    let common = [
        (crate::paging::OUTSIDE_RAM, 4096, "outside guest RAM"),
        (ring, 4, "4 bytes"),
        (ring, 7, "7 bytes"),
        (ring, MIN_SIZE - 1, "smaller than the minimum"),
        (ring, MAX_SIZE + 1, "larger than the maximum"),
        (ring, u64::MAX, "all ones in size"),
        (ring + 2, 4096, "not 4-byte aligned"),
        (ring + 1, 4096, "not 4-byte aligned"),
        (!3, 4096, "at the top of the address space"),
    ];
    // A registered buffer that must stay registered through the refusals.
    RING.counter.store(0xFFFF_FFFF, Ordering::Relaxed);
    let rax = set_buf(number, ring, 4 + RING_LEN as u64)?;
    ensure!(
        rax == 0,
        "log_set_buf(ring, {}) returned {rax:#x}",
        4 + RING_LEN
    );
    let mut unread = RING.counter.load(Ordering::Acquire);
    for &(gpa, size, what) in common.iter().chain(extra) {
        let rax = set_buf(number, gpa, size)?;
        ensure!(
            rax == REFUSED,
            "log_set_buf({gpa:#x}, {size:#x}) ({what}) returned {rax:#x}, not all ones"
        );
        // The refusal's own log line went into the registered buffer.
        let now = RING.counter.load(Ordering::Acquire);
        ensure!(
            now > unread,
            "after refusing {gpa:#x} ({what}) the registered buffer's counter stayed {now}"
        );
        unread = now;
    }
    let rax = set_buf(number, 0, 0)?;
    ensure!(rax == 0, "log_set_buf(0, 0) returned {rax:#x}");
    Ok(())
}

/// `log_set_buf_refused` with thinvisor's block (from its log line
/// `thinvisor reserves N KiB at 0xSTART..0xEND`): when the guest's memory
/// map offers no byte of it as RAM (the pass-through layout, where it lies
/// inside the machine's RAM and is hidden; or an isolated guest whose RAM
/// ends below it), buffers over its start, inside it, over its end and
/// around it are refused too; a buffer ending right below it is accepted
/// when that memory is available RAM.
pub fn refused_around_block() -> CheckResult {
    let (start, end) = crate::passthrough::thinvisor_block()?;
    let (entries, n) = crate::passthrough::memory_map()?;
    let available = |from: u64, to: u64| {
        entries[..n]
            .iter()
            .any(|e| e.2 == crate::passthrough::MMAP_AVAILABLE && e.0 <= from && to <= e.0 + e.1)
    };
    let offered = entries[..n]
        .iter()
        .any(|e| e.2 == crate::passthrough::MMAP_AVAILABLE && e.0 < end && start < e.0 + e.1);
    if offered {
        say!("NOTE log_set_buf_refused: thinvisor's block {start:#x}..{end:#x} is guest RAM here (isolated layout); not tried");
        return refused(&[]);
    }
    refused(&[
        (start - 0x100, 0x1000, "over the start of thinvisor's block"),
        (start, 0x1000, "inside thinvisor's block"),
        (start + 0x2000, MIN_SIZE, "inside thinvisor's block"),
        (end - 0x100, 0x1000, "over the end of thinvisor's block"),
        (
            start - 0x1000,
            end - start + 0x2000,
            "around thinvisor's block",
        ),
    ])?;
    if available(start - 0x1000, start) {
        let number = set_buf_number()?;
        let rax = set_buf(number, start - 0x1000, 0x1000)?;
        ensure!(
            rax == 0,
            "log_set_buf({:#x}, 0x1000), right below thinvisor's block, returned {rax:#x}",
            start - 0x1000
        );
        let rax = set_buf(number, 0, 0)?;
        ensure!(rax == 0, "log_set_buf(0, 0) returned {rax:#x}");
        say!("NOTE log_set_buf_refused: buffers over thinvisor's block {start:#x}..{end:#x} refused, the page below it accepted");
    } else {
        say!(
            "NOTE log_set_buf_refused: buffers over thinvisor's block {start:#x}..{end:#x} refused"
        );
    }
    Ok(())
}

/// `log_set_buf_cpl3_ignored`: from CPL 3 neither a registration nor an
/// unregistration happens, and RAX and RBX come back unchanged.
pub fn cpl3_ignored() -> CheckResult {
    let number = set_buf_number()?;
    let ubuf = user::data_page() + user::USER_BUF_OFFSET;
    const SENTINEL: u32 = 0xC3C3_C3C3;
    let ucounter = ubuf as *mut u32;
    // SAFETY: this part of the user data page is the ring-3 buffer, unused
    // while ring 3 is not running; 4-byte aligned.
    unsafe { ucounter.write_volatile(SENTINEL) };
    let call = user::UserCall {
        rax: number,
        rbx: ubuf,
        rcx: user::USER_BUF_LEN,
        ..user::UserCall::default()
    };
    let (rax, rbx) = user::call_ring3(cpu::uses_vmcall(), call);
    ensure!(
        (rax, rbx) == (number, ubuf),
        "log_set_buf from CPL 3 returned RAX {rax:#x} RBX {rbx:#x}"
    );
    log_one_line(number)?;
    // SAFETY: as above.
    let c = unsafe { ucounter.read_volatile() };
    ensure!(
        c == SENTINEL,
        "the buffer a CPL-3 log_set_buf named was registered: its counter became {c:#x}"
    );

    // Registered from CPL 0, a CPL-3 unregistration changes nothing.
    let rax = set_buf(number, ring_gpa(), 4 + RING_LEN as u64)?;
    ensure!(rax == 0, "log_set_buf(ring) returned {rax:#x}");
    let call = user::UserCall {
        rax: number,
        rbx: 0,
        ..user::UserCall::default()
    };
    let (rax, _) = user::call_ring3(cpu::uses_vmcall(), call);
    ensure!(
        rax == number,
        "log_set_buf(0) from CPL 3 returned RAX {rax:#x}"
    );
    let before = RING.counter.load(Ordering::Acquire);
    log_one_line(number)?;
    let after = RING.counter.load(Ordering::Acquire);
    let rax = set_buf(number, 0, 0)?;
    ensure!(rax == 0, "log_set_buf(0, 0) returned {rax:#x}");
    ensure!(
        after > before,
        "after a CPL-3 log_set_buf(0) the buffer received nothing (counter {before} -> {after})"
    );
    Ok(())
}

/// The stream's goal in bytes: `stream_kib=N` on the command line, or
/// [`STREAM_KIB`].
fn stream_goal(cmdline: &str) -> u64 {
    cmdline
        .split_ascii_whitespace()
        .find_map(|t| t.strip_prefix("stream_kib=")?.parse::<u64>().ok())
        .unwrap_or(STREAM_KIB)
        << 10
}

/// `log_set_buf_stream`: the goal's worth of thinvisor's log (1 MiB in
/// the cases that ask for it) through the 8 KiB ring, read as it arrives:
/// every byte is the log's (as `log_read` reads it), none is lost, and
/// the counter always equals what is unread. After unregistering nothing
/// more arrives.
pub fn stream(cmdline: &str) -> CheckResult {
    let goal = stream_goal(cmdline);
    let number = set_buf_number()?;
    let read = log_read_number()?;
    RING.counter.store(0x5555_5555, Ordering::Relaxed);
    let start = log_end(read)?;
    let rax = set_buf(number, ring_gpa(), 4 + RING_LEN as u64)?;
    ensure!(rax == 0, "log_set_buf(ring) returned {rax:#x}");
    let mut reader = Reader::new(4 + RING_LEN as u64);
    // SAFETY: only this check uses the consumed buffer.
    let consumed = unsafe { &mut *CONSUMED.0.get() };
    let mut have = 0;
    let mut calls = 0u64;
    while reader.total < goal {
        // A few lines per round, so the reader is sometimes a line or more
        // behind.
        for _ in 0..1 + calls % 3 {
            log_one_line(number)?;
            calls += 1;
        }
        let room = (CHUNK / 2).min(consumed.len() - have);
        have += reader.consume(&mut consumed[have..have + room]);
        if have >= CHUNK / 2 {
            ensure_stream(read, &consumed[..have], start + reader.total - have as u64)?;
            have = 0;
        }
    }
    have += reader.consume(&mut consumed[have..]);
    ensure_stream(read, &consumed[..have], start + reader.total - have as u64)?;
    let end = log_end(read)?;
    ensure!(
        start + reader.total == end,
        "read {} bytes from the buffer; the log grew by {} meanwhile",
        reader.total,
        end - start
    );
    ensure!(
        RING.counter.load(Ordering::Acquire) == 0,
        "the counter is {} after everything was read",
        RING.counter.load(Ordering::Acquire)
    );
    let rax = set_buf(number, 0, 0)?;
    ensure!(rax == 0, "log_set_buf(0, 0) returned {rax:#x}");
    log_one_line(number)?;
    let c = RING.counter.load(Ordering::Acquire);
    ensure!(c == 0, "{c} bytes arrived after unregistering");
    say!(
        "NOTE log_set_buf_stream: goal {goal} bytes, {} bytes in {calls} lines through an {RING_LEN}-byte ring, none lost",
        reader.total
    );
    Ok(())
}

/// The drop line's text around the count.
const DROP_PREFIX: &[u8] = b"thinvisor: log_set_buf: ";
const DROP_SUFFIX: &[u8] = b" bytes dropped while the reader was behind\n";

/// `log_set_buf_dropped`: a reader that stalls makes thinvisor drop whole
/// lines; once it has read everything, the next line is preceded by the
/// drop line, whose count is exactly the bytes the log grew by that the
/// buffer did not receive.
pub fn dropped() -> CheckResult {
    let number = set_buf_number()?;
    let read = log_read_number()?;
    const SIZE: u64 = 1024;
    let start = log_end(read)?;
    let rax = set_buf(number, ring_gpa(), SIZE)?;
    ensure!(rax == 0, "log_set_buf(ring, {SIZE}) returned {rax:#x}");
    // Stalled: four times the ring's worth of lines.
    let mut calls = 0;
    while log_end(read)? - start < 4 * SIZE {
        log_one_line(number)?;
        calls += 1;
    }
    let stalled_end = log_end(read)?;
    let mut reader = Reader::new(SIZE);
    // SAFETY: only this check uses the consumed buffer.
    let consumed = unsafe { &mut *CONSUMED.0.get() };
    let kept = reader.consume(&mut consumed[..]);
    ensure!(
        kept as u64 <= SIZE - COUNTER && kept > 0,
        "{kept} bytes unread in a {SIZE}-byte buffer after {calls} lines"
    );
    ensure!(
        consumed[kept - 1] == b'\n',
        "the buffer's bytes do not end with a whole line"
    );
    ensure_stream(read, &consumed[..kept], start)?;
    let missed = stalled_end - start - kept as u64;
    ensure!(missed > 0, "nothing was dropped after {calls} lines");

    // The reader has caught up: the next line comes after the drop line.
    log_one_line(number)?;
    let next_end = log_end(read)?;
    let n = reader.consume(&mut consumed[..]);
    let got = &consumed[..n];
    ensure!(
        got.starts_with(DROP_PREFIX),
        "after catching up the buffer received no drop line ({n} bytes)"
    );
    let digits = got[DROP_PREFIX.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let count: u64 = core::str::from_utf8(&got[DROP_PREFIX.len()..DROP_PREFIX.len() + digits])
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(u64::MAX);
    let line_len = DROP_PREFIX.len() + digits + DROP_SUFFIX.len();
    ensure!(
        got.len() >= line_len && &got[DROP_PREFIX.len() + digits..line_len] == DROP_SUFFIX,
        "the drop line is malformed ({} bytes): ...{:?}",
        got.len(),
        core::str::from_utf8(&got[DROP_PREFIX.len() + digits..got.len().min(line_len + 8)])
            .unwrap_or("(not UTF-8)")
    );
    ensure!(
        count == missed,
        "the drop line says {count} bytes dropped; the log grew by {missed} bytes the buffer missed"
    );
    ensure_stream(read, &got[line_len..], stalled_end)?;
    ensure!(
        stalled_end + (n - line_len) as u64 == next_end,
        "after the drop line {} bytes of the next line, which had {}",
        n - line_len,
        next_end - stalled_end
    );
    let rax = set_buf(number, 0, 0)?;
    ensure!(rax == 0, "log_set_buf(0, 0) returned {rax:#x}");
    say!("NOTE log_set_buf_dropped: {missed} bytes dropped after {kept} kept, reported as such");
    Ok(())
}

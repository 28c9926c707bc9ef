//! The guest's log buffer (`log_set_buf`, docs/vmm-call.md): the VMM's log
//! copied into a ring in guest memory that a guest kernel registered.
//!
//! Layout of the buffer (guest-physical, `size` bytes):
//!
//! | offset | what |
//! |---|---|
//! | 0 | `u32`, little-endian: bytes written and not yet consumed (the counter) |
//! | 4 .. size | the ring of characters (`size - 4` bytes) |
//!
//! The VMM keeps its own write position (`head`, modulo the ring size);
//! the guest keeps its read position, which is always `head - counter`
//! (mod the ring size). The VMM writes the bytes of a whole line into the
//! free part of the ring first, then publishes them with one atomic
//! fetch-add on the counter (BitVisor's current code does an atomic AND
//! there, so its reader never sees new bytes). The guest consumes with a
//! locked decrement of what it read. The counter only grows by the VMM's
//! adds, and only shrinks by the guest's decrements, so the free space the
//! VMM sees (`ring - counter`) can only grow behind its back: bytes it
//! wrote there and has not published yet stay unseen and untouched.
//!
//! Lines are written whole or not at all. A line that does not fit the
//! free space (the reader is behind) is dropped whole and counted; the
//! next line that starts when enough space is free is preceded by the
//! drop line ([`drop_line`]) that says how many bytes were dropped at that
//! place, so the reader sees the log stream with each gap marked and
//! sized. While dropped bytes are unreported, every further line is
//! dropped too unless the drop line fits first: nothing ever appears
//! after a gap without its notice.
//!
//! Guest memory is only reached through [`GuestPhysMemory`] (atomic copies
//! over a checked range, never a Rust slice), and a failed access is
//! counted as dropped bytes, never a fault. Nothing here logs: this is
//! the logging path itself.

use core::fmt::{self, Write};

use thinvisor_memory::{GuestPhysAddr, GuestPhysMemory};

/// Bytes of the counter in front of the ring.
pub const COUNTER_LEN: u64 = 4;

/// The smallest buffer `log_set_buf` accepts: the counter and a ring of
/// 124 bytes, so that the longest drop line ([`DROP_LINE_MAX`]) always
/// fits an empty ring.
pub const MIN_SIZE: u64 = 128;

/// The largest buffer `log_set_buf` accepts: 16 MiB, so the counter
/// (32 bits) can never overflow and a registration cannot make the VMM
/// validate and clear an unbounded range. A kernel wanting more log than
/// that reads it with `log_read` instead.
pub const MAX_SIZE: u64 = 16 << 20;

/// Bytes of the longest drop line (a 20-digit count).
pub const DROP_LINE_MAX: usize = DROP_PREFIX.len() + 20 + DROP_SUFFIX.len();

// The longest drop line fits the smallest ring.
const _: () = assert!(DROP_LINE_MAX as u64 <= MIN_SIZE - COUNTER_LEN);

const DROP_PREFIX: &str = "thinvisor: log_set_buf: ";
const DROP_SUFFIX: &str = " bytes dropped while the reader was behind\n";

/// Why `log_set_buf` refused a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Smaller than [`MIN_SIZE`].
    TooSmall,
    /// Larger than [`MAX_SIZE`].
    TooLarge,
    /// The counter (the buffer's address) is not 4-byte aligned.
    Misaligned,
    /// This byte of the buffer is not guest RAM the VMM may reach (outside
    /// RAM, MMIO, or thinvisor's own memory in the pass-through layout).
    NotRam(GuestPhysAddr),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooSmall => write!(f, "smaller than {MIN_SIZE} bytes"),
            Self::TooLarge => write!(f, "larger than {} MiB", MAX_SIZE >> 20),
            Self::Misaligned => f.write_str("not 4-byte aligned"),
            Self::NotRam(gpa) => write!(f, "{gpa} is not guest RAM"),
        }
    }
}

/// What happens to the bytes of the line being logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineState {
    /// Between lines: the next byte starts one.
    Start,
    /// Written into the free part of the ring, `len` bytes so far, not yet
    /// published.
    Writing { len: u64 },
    /// Being dropped (counted).
    Dropping,
    /// A line that began before the buffer was registered: not part of
    /// this buffer's stream, neither written nor counted.
    Skipping,
}

/// The registered buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registered {
    /// Guest-physical address of the counter.
    pub gpa: u64,
    /// Size in bytes, counter included.
    pub size: u64,
}

impl Registered {
    fn ring(&self) -> u64 {
        self.size - COUNTER_LEN
    }
}

/// A snapshot for the debug shell's `stat` and for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// The registered buffer, if any.
    pub buffer: Option<Registered>,
    /// Bytes published into the buffer since it was registered (drop lines
    /// included).
    pub written: u64,
    /// Bytes of log dropped since it was registered.
    pub dropped: u64,
    /// Of those, the bytes no drop line has reported yet.
    pub unreported: u64,
    /// Drop lines written.
    pub drop_lines: u64,
}

/// The guest's log buffer and the VMM's side of its ring: registration,
/// write position and drop accounting. Kept behind one lock (the
/// [`GuestLog`] in `Services`), taken by the logging path for every piece
/// of a line and by `log_set_buf`.
#[derive(Debug)]
pub struct GuestLogBuffer {
    buffer: Option<Registered>,
    /// Ring offset of the next byte to publish.
    head: u64,
    line: LineState,
    written: u64,
    dropped: u64,
    unreported: u64,
    drop_lines: u64,
    /// False while a line of the log is half written (tracked with or
    /// without a buffer, so a registration knows where lines begin).
    at_line_start: bool,
}

/// The lock the logging path and `log_set_buf` share. Lock order: the
/// logging path holds the console's line lock and takes this one (never
/// the log ring's lock inside it); nothing logs while holding it.
pub type GuestLog = spin::Mutex<GuestLogBuffer>;

impl Default for GuestLogBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestLogBuffer {
    pub const fn new() -> Self {
        Self {
            buffer: None,
            head: 0,
            line: LineState::Start,
            written: 0,
            dropped: 0,
            unreported: 0,
            drop_lines: 0,
            at_line_start: true,
        }
    }

    /// Checks a buffer without registering it: size within
    /// [`MIN_SIZE`]..=[`MAX_SIZE`], the counter 4-byte aligned, every byte
    /// reachable guest RAM in `memory`.
    pub fn validate(memory: &dyn GuestPhysMemory, gpa: u64, size: u64) -> Result<(), Refusal> {
        if size < MIN_SIZE {
            return Err(Refusal::TooSmall);
        }
        if size > MAX_SIZE {
            return Err(Refusal::TooLarge);
        }
        if !gpa.is_multiple_of(4) {
            return Err(Refusal::Misaligned);
        }
        // size <= 16 MiB, so the conversion is exact.
        memory
            .map(GuestPhysAddr::new(gpa), size as usize)
            .map(drop)
            .map_err(|e| Refusal::NotRam(e.gpa))
    }

    /// Registers the buffer of `size` bytes at `gpa` (replacing any other):
    /// validates it, sets its counter to 0 and starts writing at the ring's
    /// first byte with the next line that begins. The accounting starts
    /// afresh. On refusal nothing changes, not even the registered buffer.
    pub fn register(
        &mut self,
        memory: &dyn GuestPhysMemory,
        gpa: u64,
        size: u64,
    ) -> Result<(), Refusal> {
        Self::validate(memory, gpa, size)?;
        memory
            .write_u32_phys(GuestPhysAddr::new(gpa), 0)
            .map_err(|e| Refusal::NotRam(e.gpa))?;
        *self = Self {
            buffer: Some(Registered { gpa, size }),
            line: self.between_lines(),
            at_line_start: self.at_line_start,
            ..Self::new()
        };
        Ok(())
    }

    /// Stops writing into the guest's buffer (the line being written, if
    /// any, is abandoned unpublished). The counts stay for `stat`.
    pub fn unregister(&mut self) {
        self.buffer = None;
        self.line = self.between_lines();
    }

    /// `Start` at a line boundary, else `Skipping` to the next one.
    fn between_lines(&self) -> LineState {
        if self.at_line_start {
            LineState::Start
        } else {
            LineState::Skipping
        }
    }

    /// The registered buffer and the accounting.
    pub fn status(&self) -> Status {
        Status {
            buffer: self.buffer,
            written: self.written,
            dropped: self.dropped,
            unreported: self.unreported,
            drop_lines: self.drop_lines,
        }
    }

    /// One line for the debug shell's `stat`, e.g. `log_set_buf: 0x1000,
    /// 4100 bytes: written 123, dropped 0 (unreported 0), drop lines 0`,
    /// or `log_set_buf: none; the last buffer had written ...` (all 0
    /// before the first registration). Byte counts since the buffer's
    /// registration; realistic values fit the shell's 128-byte line.
    pub fn stat_line(&self, out: &mut crate::dbgsh::Line) {
        let s = self.status();
        let _ = match s.buffer {
            Some(b) => write!(out, "log_set_buf: {:#x}, {} bytes:", b.gpa, b.size),
            None => write!(out, "log_set_buf: none; the last buffer had"),
        };
        let _ = write!(
            out,
            " written {}, dropped {} (unreported {}), drop lines {}",
            s.written, s.dropped, s.unreported, s.drop_lines
        );
    }

    /// Writes log bytes (any pieces of lines; a `\n` ends a line) into the
    /// registered buffer, if any. Never fails and never logs.
    pub fn write(&mut self, memory: &dyn GuestPhysMemory, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (piece, ends_line) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..=i], true),
                None => (bytes, false),
            };
            bytes = &bytes[piece.len()..];
            self.write_piece(memory, piece);
            self.at_line_start = ends_line;
            if ends_line {
                self.end_line(memory);
            }
        }
    }

    /// A piece of one line (its `\n` included, if it has it).
    fn write_piece(&mut self, memory: &dyn GuestPhysMemory, piece: &[u8]) {
        let Some(buffer) = self.buffer else {
            return;
        };
        if self.line == LineState::Start {
            self.line = if self.unreported == 0 || self.report_drops(memory, buffer) {
                LineState::Writing { len: 0 }
            } else {
                LineState::Dropping
            };
        }
        match self.line {
            LineState::Writing { len } => {
                let end = len + piece.len() as u64;
                let fits = end <= free(memory, buffer)
                    && put(memory, buffer, self.head + len, piece).is_some();
                if fits {
                    self.line = LineState::Writing { len: end };
                } else {
                    // The line's earlier pieces count as dropped too.
                    self.drop_bytes(end);
                    self.line = LineState::Dropping;
                }
            }
            LineState::Dropping => self.drop_bytes(piece.len() as u64),
            LineState::Start | LineState::Skipping => {}
        }
    }

    /// The end of a line: publish it if it was written.
    fn end_line(&mut self, memory: &dyn GuestPhysMemory) {
        if let (Some(buffer), LineState::Writing { len }) = (self.buffer, self.line) {
            if publish(memory, buffer, len) {
                self.head = (self.head + len) % buffer.ring();
                self.written += len;
            } else {
                self.drop_bytes(len);
            }
        }
        self.line = LineState::Start;
    }

    fn drop_bytes(&mut self, n: u64) {
        self.dropped += n;
        self.unreported += n;
    }

    /// Writes and publishes the drop line if it fits; true when it did
    /// (the unreported count is then 0).
    fn report_drops(&mut self, memory: &dyn GuestPhysMemory, buffer: Registered) -> bool {
        let mut line = DropLine::default();
        let _ = write!(line, "{DROP_PREFIX}{}{DROP_SUFFIX}", self.unreported);
        let text = line.as_bytes();
        let len = text.len() as u64;
        if len > free(memory, buffer)
            || put(memory, buffer, self.head, text).is_none()
            || !publish(memory, buffer, len)
        {
            return false;
        }
        self.head = (self.head + len) % buffer.ring();
        self.written += len;
        self.unreported = 0;
        self.drop_lines += 1;
        true
    }
}

/// The ring's free bytes as the counter says now (0 when the counter is
/// unreadable or larger than the ring: a guest that wrote nonsense there
/// gets nothing more until it fixes it).
fn free(memory: &dyn GuestPhysMemory, buffer: Registered) -> u64 {
    match memory.read_u32_phys(GuestPhysAddr::new(buffer.gpa)) {
        Ok(unread) => buffer.ring().saturating_sub(u64::from(unread)),
        Err(_) => 0,
    }
}

/// Copies `bytes` into the ring from ring offset `at` (mod the ring size,
/// in at most two runs). `bytes` is never longer than the ring (callers
/// check the free space first).
fn put(memory: &dyn GuestPhysMemory, buffer: Registered, at: u64, bytes: &[u8]) -> Option<()> {
    let ring = buffer.ring();
    let at = at % ring;
    let first = (bytes.len() as u64).min(ring - at) as usize;
    let base = buffer.gpa + COUNTER_LEN;
    let (a, b) = bytes.split_at(first);
    memory.write_phys(GuestPhysAddr::new(base + at), a).ok()?;
    memory.write_phys(GuestPhysAddr::new(base), b).ok()
}

/// Makes `len` more bytes visible to the reader: one atomic fetch-add on
/// the counter, after the bytes (release ordering).
fn publish(memory: &dyn GuestPhysMemory, buffer: Registered, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    // len <= ring < 16 MiB.
    memory
        .fetch_add_u32_phys(GuestPhysAddr::new(buffer.gpa), len as u32)
        .is_ok()
}

/// A drop line, formatted on the stack.
struct DropLine {
    buf: [u8; DROP_LINE_MAX],
    len: usize,
}

impl Default for DropLine {
    fn default() -> Self {
        Self {
            buf: [0; DROP_LINE_MAX],
            len: 0,
        }
    }
}

impl DropLine {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for DropLine {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(DROP_LINE_MAX - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The drop line for `n` bytes, as the buffer receives it (for readers'
/// tests).
pub fn drop_line(n: u64, out: &mut [u8; DROP_LINE_MAX]) -> usize {
    let mut line = DropLine::default();
    let _ = write!(line, "{DROP_PREFIX}{n}{DROP_SUFFIX}");
    out[..line.len].copy_from_slice(line.as_bytes());
    line.len
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;
    use thinvisor_memory::IsolatedMemory;

    const RAM: usize = 64 * 1024;
    const BUF: u64 = 0x1000;

    fn memory() -> &'static IsolatedMemory<'static> {
        std::boxed::Box::leak(std::boxed::Box::new(IsolatedMemory::new(
            std::vec![0u8; RAM].leak(),
        )))
    }

    /// The guest's side: its read position, what it consumed so far.
    struct Reader {
        gpa: u64,
        ring: u64,
        tail: u64,
        got: Vec<u8>,
    }

    impl Reader {
        fn new(gpa: u64, size: u64) -> Self {
            Self {
                gpa,
                ring: size - COUNTER_LEN,
                tail: 0,
                got: Vec::new(),
            }
        }

        fn counter(&self, m: &dyn GuestPhysMemory) -> u32 {
            m.read_u32_phys(GuestPhysAddr::new(self.gpa)).unwrap()
        }

        /// Consumes up to `max` of the unread bytes: copies them, then a
        /// locked decrement of the counter.
        fn consume(&mut self, m: &dyn GuestPhysMemory, max: u64) -> u64 {
            let n = u64::from(self.counter(m)).min(max);
            for _ in 0..n {
                let mut b = [0u8];
                let at = self.gpa + COUNTER_LEN + self.tail;
                m.read_phys(GuestPhysAddr::new(at), &mut b).unwrap();
                self.got.push(b[0]);
                self.tail = (self.tail + 1) % self.ring;
            }
            m.fetch_add_u32_phys(GuestPhysAddr::new(self.gpa), (n as u32).wrapping_neg())
                .unwrap();
            n
        }
    }

    fn drop_text(n: u64) -> Vec<u8> {
        let mut out = [0u8; DROP_LINE_MAX];
        let len = drop_line(n, &mut out);
        out[..len].to_vec()
    }

    /// Checks that `got` is `lines` with every gap (a run of dropped
    /// lines) replaced by its drop line, and returns the bytes dropped
    /// at the end that no drop line reported yet and all bytes dropped.
    fn check_stream(got: &[u8], lines: &[Vec<u8>]) -> (u64, u64) {
        let mut pos = 0;
        let mut pending = 0u64;
        let mut dropped = 0u64;
        for line in lines {
            if got[pos..].starts_with(DROP_PREFIX.as_bytes()) {
                // The count it reports; more than `pending` when this line
                // is one of the dropped too.
                let digits = &got[pos + DROP_PREFIX.len()..];
                let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap();
                let n: u64 = std::str::from_utf8(&digits[..end])
                    .unwrap()
                    .parse()
                    .unwrap();
                if n == pending {
                    let want = drop_text(pending);
                    assert_eq!(
                        &got[pos..pos + want.len()],
                        &want[..],
                        "the drop line at {pos}"
                    );
                    pos += want.len();
                    pending = 0;
                } else {
                    assert!(n > pending, "drop line for {n} at {pos}, {pending} dropped");
                }
            }
            if pending == 0 && got[pos..].starts_with(line) {
                pos += line.len();
            } else {
                pending += line.len() as u64;
                dropped += line.len() as u64;
            }
        }
        assert_eq!(pos, got.len(), "bytes after the last line");
        (pending, dropped)
    }

    #[test]
    fn validation() {
        let m = memory();
        let mut g = GuestLogBuffer::new();
        assert_eq!(g.register(m, BUF, MIN_SIZE - 1), Err(Refusal::TooSmall));
        assert_eq!(g.register(m, BUF, 4), Err(Refusal::TooSmall));
        assert_eq!(g.register(m, BUF, MAX_SIZE + 1), Err(Refusal::TooLarge));
        assert_eq!(g.register(m, BUF + 2, 4096), Err(Refusal::Misaligned));
        assert_eq!(
            g.register(m, RAM as u64 - 0x100, 0x200),
            Err(Refusal::NotRam(GuestPhysAddr::new(RAM as u64)))
        );
        assert_eq!(
            g.register(m, u64::MAX - 0xFF, 0x100).map_err(|_| ()),
            Err(())
        );
        assert_eq!(g.status().buffer, None);
        // Holes (thinvisor's block in the pass-through layout) too.
        let holes = std::vec![0x8000u64..0x9000].leak();
        let holed = IsolatedMemory::with_holes(std::vec![0u8; RAM].leak(), holes);
        assert_eq!(
            g.register(&holed, 0x7F00, 0x200),
            Err(Refusal::NotRam(GuestPhysAddr::new(0x8000)))
        );
        assert_eq!(g.register(&holed, 0x9000, MIN_SIZE), Ok(()));
        // A refusal keeps the registered buffer.
        assert_eq!(
            g.register(&holed, 0x8000, MIN_SIZE),
            Err(Refusal::NotRam(GuestPhysAddr::new(0x8000)))
        );
        assert_eq!(
            g.status().buffer,
            Some(Registered {
                gpa: 0x9000,
                size: MIN_SIZE
            })
        );
    }

    #[test]
    fn registration_resets_the_counter_and_unregister_stops_writing() {
        let m = memory();
        m.write_u32_phys(GuestPhysAddr::new(BUF), 0xDEAD).unwrap();
        let mut g = GuestLogBuffer::new();
        g.register(m, BUF, 256).unwrap();
        let mut r = Reader::new(BUF, 256);
        assert_eq!(r.counter(m), 0);
        g.write(m, b"one\n");
        assert_eq!(r.counter(m), 4);
        g.unregister();
        g.write(m, b"two\n");
        assert_eq!(r.consume(m, 100), 4);
        assert_eq!(r.got, b"one\n");
        assert_eq!(g.status().buffer, None);
        assert_eq!(g.status().written, 4);
        let mut stat = crate::dbgsh::Line::new();
        g.stat_line(&mut stat);
        assert_eq!(
            stat.as_bytes(),
            b"log_set_buf: none; the last buffer had written 4, dropped 0 (unreported 0), drop lines 0"
        );
    }

    #[test]
    fn a_line_in_progress_at_registration_is_skipped() {
        let m = memory();
        let mut g = GuestLogBuffer::new();
        g.write(m, b"begun before ");
        g.register(m, BUF, 256).unwrap();
        g.write(m, b"the buffer\nnext ");
        g.write(m, b"line\n");
        let mut r = Reader::new(BUF, 256);
        r.consume(m, 1000);
        assert_eq!(r.got, b"next line\n");
        assert_eq!(g.status().dropped, 0);
    }

    #[test]
    fn wraps_around() {
        let m = memory();
        let mut g = GuestLogBuffer::new();
        g.register(m, BUF, MIN_SIZE).unwrap();
        let mut r = Reader::new(BUF, MIN_SIZE);
        let mut lines = Vec::new();
        for i in 0..100 {
            let line = std::format!("line {i} {}\n", "x".repeat(i % 50)).into_bytes();
            // Written in two pieces, as the logger's formatting does.
            g.write(m, &line[..3]);
            g.write(m, &line[3..]);
            lines.push(line);
            r.consume(m, 1000);
        }
        assert_eq!(r.got, lines.concat());
        assert_eq!(g.status().dropped, 0);
    }

    #[test]
    fn drops_whole_lines_and_reports_them_once_there_is_room() {
        let m = memory();
        let mut g = GuestLogBuffer::new();
        let size = 4 + 200;
        g.register(m, BUF, size).unwrap();
        let mut r = Reader::new(BUF, size);
        let line = |i: u32| std::format!("line {i:03} {}\n", "y".repeat(30)).into_bytes();
        // 40 bytes a line: 5 fit, the next 3 are dropped whole.
        let lines: Vec<_> = (0..8).map(line).collect();
        for l in &lines {
            g.write(m, l);
        }
        assert_eq!(r.counter(m), 200);
        let s = g.status();
        assert_eq!((s.written, s.dropped, s.unreported), (200, 120, 120));
        // Room for the drop line but not for it and the next line: the
        // next line is dropped too, and the report grows.
        assert_eq!(drop_text(120).len(), 70);
        r.consume(m, 60);
        g.write(m, &line(8));
        assert_eq!(g.status().unreported, 160);
        assert_eq!(r.counter(m), 140);
        // Room for both.
        r.consume(m, 200);
        g.write(m, &line(9));
        let s = g.status();
        assert_eq!((s.dropped, s.unreported, s.drop_lines), (160, 0, 1));
        r.consume(m, 1000);
        let mut want = lines[..5].concat();
        want.extend(drop_text(160));
        want.extend(line(9));
        assert_eq!(r.got, want);
        // A line longer than the ring never fits.
        g.write(m, &[b'z'; 300]);
        g.write(m, b"\n");
        assert_eq!(g.status().unreported, 301);
        let mut stat = crate::dbgsh::Line::new();
        g.stat_line(&mut stat);
        assert_eq!(
            stat.as_bytes(),
            std::format!(
                "log_set_buf: {BUF:#x}, {size} bytes: written {}, dropped 461 (unreported 301), drop lines 1",
                200 + 40 + drop_text(160).len()
            )
            .as_bytes()
        );
    }

    #[test]
    fn a_counter_the_guest_spoiled_stops_the_writes_safely() {
        let m = memory();
        let mut g = GuestLogBuffer::new();
        g.register(m, BUF, 256).unwrap();
        m.write_u32_phys(GuestPhysAddr::new(BUF), u32::MAX).unwrap();
        g.write(m, b"lost\n");
        assert_eq!(g.status().dropped, 5);
        assert_eq!(m.read_u32_phys(GuestPhysAddr::new(BUF)).unwrap(), u32::MAX);
    }

    #[test]
    fn a_reader_on_another_thread_loses_nothing_it_was_not_told_about() {
        let m = memory();
        let size = 4 + 1000;
        let g = spin::Mutex::new(GuestLogBuffer::new());
        g.lock().register(m, BUF, size).unwrap();
        let lines: Vec<Vec<u8>> = (0..20_000)
            .map(|i| std::format!("line {i} {}\n", "z".repeat(i % 70)).into_bytes())
            .collect();
        let done = core::sync::atomic::AtomicBool::new(false);
        let got = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut r = Reader::new(BUF, size);
                let mut k = 1;
                loop {
                    let finished = done.load(core::sync::atomic::Ordering::Acquire);
                    k = k % 97 + 13;
                    if r.consume(m, k) == 0 && finished {
                        break r.got;
                    }
                }
            });
            for l in &lines {
                let (a, b) = l.split_at(l.len() / 2);
                let mut g = g.lock();
                g.write(m, a);
                g.write(m, b);
            }
            done.store(true, core::sync::atomic::Ordering::Release);
            reader.join().unwrap()
        });
        let (unreported, dropped) = check_stream(&got, &lines);
        let s = g.lock().status();
        assert_eq!((unreported, dropped), (s.unreported, s.dropped));
        assert_eq!(got.len() as u64, s.written);
    }

    #[test]
    fn registrations_racing_with_the_log_keep_the_counter_right() {
        // One thread logs lines in pieces; another registers the buffer
        // again and again (resetting it), reads a little, and unregisters
        // at the end. Every time, the counter must be what the VMM
        // published since the registration minus what was read.
        let m = memory();
        let size = 4 + 300;
        let g = spin::Mutex::new(GuestLogBuffer::new());
        let done = core::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = 0u64;
                while !done.load(core::sync::atomic::Ordering::Acquire) {
                    let line = std::format!("line {i} {}\n", "w".repeat((i % 90) as usize));
                    let (a, b) = line.as_bytes().split_at(line.len() / 3);
                    g.lock().write(m, a);
                    g.lock().write(m, b);
                    i += 1;
                }
            });
            for round in 0..2000u64 {
                let mut r = Reader::new(BUF, size);
                {
                    let mut g = g.lock();
                    g.register(m, BUF, size).unwrap();
                    assert_eq!(r.counter(m), 0);
                }
                r.consume(m, round % 200);
                let g = g.lock();
                assert_eq!(
                    u64::from(r.counter(m)),
                    g.status().written - r.got.len() as u64
                );
                // Whatever was read starts at a line's beginning.
                assert!(
                    r.got.is_empty()
                        || r.got.starts_with(b"line ")
                        || r.got.starts_with(DROP_PREFIX.as_bytes())
                );
            }
            g.lock().unregister();
            done.store(true, core::sync::atomic::Ordering::Release);
        });
        assert_eq!(g.lock().status().buffer, None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any interleaving of lines logged (in pieces, some longer than
        /// the ring) and consumption of any size: the counter always equals
        /// the bytes written and not consumed, and the reader gets the
        /// stream with every gap marked by a drop line giving its size.
        #[test]
        fn any_interleaving_keeps_the_counter_and_the_stream(
            size in MIN_SIZE..600,
            ops in proptest::collection::vec((0usize..260, 1usize..4, 0u64..700), 1..200),
        ) {
            let m = memory();
            let mut g = GuestLogBuffer::new();
            g.register(m, BUF, size).unwrap();
            let mut r = Reader::new(BUF, size);
            let mut lines = Vec::new();
            for (i, &(len, pieces, consume)) in ops.iter().enumerate() {
                if consume % 3 == 0 {
                    r.consume(m, consume);
                } else {
                    let mut line = std::format!("L{i}:").into_bytes();
                    line.extend((0..len).map(|j| b'a' + (j % 26) as u8));
                    line.push(b'\n');
                    let step = line.len().div_ceil(pieces);
                    for piece in line.chunks(step) {
                        g.write(m, piece);
                    }
                    lines.push(line);
                }
                let s = g.status();
                proptest::prop_assert_eq!(
                    u64::from(r.counter(m)),
                    s.written - r.got.len() as u64
                );
            }
            r.consume(m, u64::MAX);
            let (unreported, dropped) = check_stream(&r.got, &lines);
            let s = g.status();
            proptest::prop_assert_eq!(unreported, s.unreported);
            proptest::prop_assert_eq!(dropped, s.dropped);
            proptest::prop_assert_eq!(r.got.len() as u64, s.written);
        }
    }
}

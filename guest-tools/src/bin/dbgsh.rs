//! `dbgsh`: the client of thinvisor's debug shell (the `dbgsh` VMM call),
//! interactive on a terminal and scriptable from a pipe:
//!
//! ```sh
//! printf 'stat\nexit\n' | dbgsh
//! ```
//!
//! The loop is `guest_tools::client::run`; this file adds the terminal: a
//! raw mode (no echo: the shell echoes; no line buffering; Ctrl-C arrives
//! as a byte and ends the session cleanly) that is restored on every way
//! out, and a key source that never waits more than 500 ms, so the session
//! stays alive (thinvisor hands a session whose owner has not called for
//! 10 s to another client).

use std::collections::VecDeque;
use std::io::{self, Write};

use guest_tools::client::{self, Ended, Key, Timing};
use guest_tools::status;

const USAGE: &str = "\
usage: dbgsh
Connects to thinvisor's debug shell (help, log [N], stat, cpu, mem ADDR [N],
exit). On a terminal it is interactive (Ctrl-C leaves the shell); from a pipe
it types the input, e.g.  printf 'stat\\nexit\\n' | dbgsh , and at the end of
the input types `exit` itself if the input did not.
While another client has the shell, dbgsh waits (and says so on stderr).
Exit status: 0 the session ended, 130 ended by Ctrl-C, 2 no thinvisor here,
3 thinvisor has no dbgsh function, 1 other failure, 64 usage error.";

/// How long the key source waits for a key before answering "no key yet".
const KEY_WAIT_MS: libc::c_int = 500;
/// Ctrl-C on a raw terminal.
const CTRL_C: u8 = 0x03;

fn main() {
    if let Some(arg) = std::env::args().nth(1) {
        if arg == "-h" || arg == "--help" {
            println!("{USAGE}");
            return;
        }
        eprintln!("dbgsh: unknown argument `{arg}`\n{USAGE}");
        std::process::exit(status::USAGE);
    }
    let (vmm, number) = guest_tools::vmm::function_or_exit("dbgsh", "dbgsh");
    let code = {
        // Dropped (the terminal restored) before the process exits.
        let raw = RawTerminal::enter();
        let mut keys = Keys::new(raw.is_some());
        let mut out = io::BufWriter::new(io::stdout().lock());
        let mut err = io::stderr().lock();
        let result = client::run(
            |answer| vmm.call(number, [answer, 0, 0, 0, 0]).rax,
            || keys.next(),
            &mut out,
            &mut err,
            &Timing::default(),
        );
        let _ = out.flush();
        drop(raw);
        match result {
            Ok(Ended::Session) => status::OK,
            Ok(Ended::Interrupted) => {
                eprintln!();
                status::INTERRUPTED
            }
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => status::OK,
            Err(e) => {
                eprintln!("dbgsh: {e}");
                status::FAILED
            }
        }
    };
    std::process::exit(code);
}

/// Standard input, one byte at a time, waiting at most `KEY_WAIT_MS`.
struct Keys {
    buf: VecDeque<u8>,
    eof: bool,
    /// A raw terminal: Ctrl-C is a byte, and means "leave".
    raw: bool,
}

impl Keys {
    fn new(raw: bool) -> Keys {
        Keys {
            buf: VecDeque::new(),
            eof: false,
            raw,
        }
    }

    fn next(&mut self) -> io::Result<Key> {
        if self.buf.is_empty() && !self.eof {
            self.fill()?;
        }
        Ok(match self.buf.pop_front() {
            Some(CTRL_C) if self.raw => Key::Interrupt,
            Some(b) => Key::Byte(b),
            None if self.eof => Key::Eof,
            None => Key::NotYet,
        })
    }

    /// Waits for input a bounded time and reads what is there.
    fn fill(&mut self) -> io::Result<()> {
        let mut fds = libc::pollfd {
            fd: libc::STDIN_FILENO,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&mut fds, 1, KEY_WAIT_MS) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(());
        }
        let mut chunk = [0u8; 256];
        // SAFETY: reads at most chunk.len() bytes into chunk.
        let got = unsafe { libc::read(libc::STDIN_FILENO, chunk.as_mut_ptr().cast(), chunk.len()) };
        match got {
            0 => self.eof = true,
            n if n > 0 => self.buf.extend(&chunk[..n as usize]),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted && e.kind() != io::ErrorKind::WouldBlock {
                    // An unreadable stdin ends the input, like EOF.
                    self.eof = true;
                }
            }
        }
        Ok(())
    }
}

/// The terminal in raw mode while this lives (when stdin is one).
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode: no echo (the shell echoes), no line buffering, no signal
    /// keys (Ctrl-C comes as a byte, so the session is left cleanly);
    /// output processing stays on so "\n" still starts a new line. None
    /// when stdin is no terminal.
    fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a termios we own.
        unsafe {
            if libc::isatty(libc::STDIN_FILENO) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
            raw.c_iflag &= !(libc::IXON);
            raw.c_cc[libc::VMIN] = 1;
            raw.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawTerminal { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: puts back the settings read in `enter`.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved);
        }
    }
}

//! The dbgsh client loop (docs/vmm-call.md, `dbgsh`), independent of the
//! VMM call and of the terminal so that the host tests drive it with a
//! simulated shell.
//!
//! BitVisor's loop: one call of -1, then call with the answer; on 0x10A
//! answer 0 and stop; on 0 read a key and answer it; on a byte print it and
//! answer 0; on -1 poll again with -1. On top of that, for thinvisor:
//!
//! - thinvisor gives a session whose owner has not called for 10 s to
//!   another client, so the client never blocks on the keyboard: the key
//!   source waits a bounded time and answers "no key yet" (0, the shell
//!   asks again), which keeps the session alive;
//! - while another client holds the shell every call answers -1: after a
//!   while of that the client says so once, and polls more slowly;
//! - at the end of its input (a pipe), the client types `exit` itself, so
//!   the shell is released instead of waiting for a key that never comes;
//! - on Ctrl-C it erases the line it typed, types `exit`, discards the
//!   rest of the output and stops at the end of the session.

use std::io::{self, Write};
use std::thread;
use std::time::{Duration, Instant};

use thinvisor_abi::dbgsh::{ACK, NOTHING, NUL_BYTE, SESSION_END, WANT_INPUT};

/// What the key source has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// A byte typed.
    Byte(u8),
    /// Nothing yet (the bounded wait ended).
    NotYet,
    /// The input ended.
    Eof,
    /// The user asked to quit (Ctrl-C on a raw terminal).
    Interrupt,
}

/// How the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The shell ended it (0x10A) after the user's or the input's `exit`.
    Session,
    /// After a Ctrl-C.
    Interrupted,
}

/// Timing of the polling.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Consecutive "nothing pending" answers polled back to back before
    /// the client sleeps between polls (a shell another client holds may
    /// stay busy for long).
    pub spin_polls: u64,
    /// The sleep between polls after that.
    pub poll_sleep: Duration,
    /// "Nothing pending" for this long prints the waiting note, once.
    pub note_after: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            spin_polls: 8192,
            poll_sleep: Duration::from_millis(2),
            note_after: Duration::from_secs(1),
        }
    }
}

/// The note printed (to the error stream) when the shell stays silent.
pub const WAITING_NOTE: &str = "dbgsh: waiting: another client has the shell\n";

/// Erases one typed byte in the shell's line editor.
const DEL: u8 = 0x7f;

/// Runs one session: `call(answer)` makes the VMM call and returns RAX;
/// `key()` gives the next key; the shell's bytes go to `out` (flushed
/// whenever the client is about to wait), the note to `err`.
///
/// Errors: those of `key`, `out` and `err`, and an unexpected value from
/// the VMM (the session is then left as it is).
pub fn run<C, K, O, E>(
    mut call: C,
    mut key: K,
    out: &mut O,
    err: &mut E,
    timing: &Timing,
) -> io::Result<Ended>
where
    C: FnMut(u64) -> u64,
    K: FnMut() -> io::Result<Key>,
    O: Write,
    E: Write,
{
    let mut answer = NOTHING;
    // Bytes the client types itself (at the end of input, after Ctrl-C).
    let mut own: Vec<u8> = Vec::new();
    let mut own_at = 0;
    let mut input_done = false;
    let mut interrupted = false;
    // Bytes typed on the current line, to erase after a Ctrl-C.
    let mut line_len = 0usize;
    let mut silent_since: Option<Instant> = None;
    let mut silent_polls = 0u64;
    let mut noted = false;
    loop {
        let value = call(answer);
        if value != NOTHING {
            silent_since = None;
            silent_polls = 0;
        }
        match value {
            SESSION_END => {
                call(ACK);
                out.flush()?;
                return Ok(if interrupted {
                    Ended::Interrupted
                } else {
                    Ended::Session
                });
            }
            NOTHING => {
                out.flush()?;
                let since = *silent_since.get_or_insert_with(Instant::now);
                silent_polls += 1;
                if !noted && since.elapsed() >= timing.note_after {
                    err.write_all(WAITING_NOTE.as_bytes())?;
                    err.flush()?;
                    noted = true;
                }
                if silent_polls > timing.spin_polls {
                    thread::sleep(timing.poll_sleep);
                }
                answer = NOTHING;
            }
            WANT_INPUT => {
                out.flush()?;
                if own_at < own.len() {
                    answer = u64::from(own[own_at]);
                    own_at += 1;
                    continue;
                }
                if input_done {
                    return Err(io::Error::other("the shell still wants input after `exit`"));
                }
                let typed = match key()? {
                    Key::Byte(b) => b,
                    Key::NotYet => {
                        answer = WANT_INPUT;
                        continue;
                    }
                    end @ (Key::Eof | Key::Interrupt) => {
                        input_done = true;
                        if end == Key::Interrupt {
                            interrupted = true;
                            own.extend(std::iter::repeat_n(DEL, line_len));
                        } else if line_len > 0 {
                            // The unfinished last line runs first.
                            own.push(b'\n');
                        }
                        own.extend_from_slice(b"exit\n");
                        answer = u64::from(own[0]);
                        own_at = 1;
                        continue;
                    }
                };
                line_len = match typed {
                    b'\n' | b'\r' => 0,
                    0x08 | DEL => line_len.saturating_sub(1),
                    _ => line_len + 1,
                };
                answer = if typed == 0 {
                    NUL_BYTE
                } else {
                    u64::from(typed)
                };
            }
            byte @ 1..=NUL_BYTE => {
                if !interrupted {
                    // 0x100 is a NUL byte; the others fit in a byte.
                    out.write_all(&[u8::try_from(byte).unwrap_or(0)])?;
                }
                answer = ACK;
            }
            other => {
                out.flush()?;
                return Err(io::Error::other(format!(
                    "unexpected value {other:#x} from the VMM's dbgsh"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A shell that follows the mailbox rules: one pending value at a
    /// time, kept until answered; `startup` polls of "nothing pending"
    /// first; echo of typed bytes; commands `help` and `exit`.
    struct Shell {
        startup: u32,
        queue: VecDeque<u64>,
        pending: Option<u64>,
        line: Vec<u8>,
        /// Every byte the shell received, in order.
        typed: Vec<u8>,
        /// Commands run.
        commands: Vec<String>,
        /// "No key yet" answers seen.
        no_key: u32,
        end_acked: bool,
        calls: u32,
    }

    impl Shell {
        fn new(startup: u32) -> Shell {
            let mut queue: VecDeque<u64> = b"banner\n> ".iter().map(|&b| u64::from(b)).collect();
            queue.push_back(WANT_INPUT);
            Shell {
                startup,
                queue,
                pending: None,
                line: Vec::new(),
                typed: Vec::new(),
                commands: Vec::new(),
                no_key: 0,
                end_acked: false,
                calls: 0,
            }
        }

        fn say(&mut self, text: &[u8]) {
            self.queue.extend(text.iter().map(|&b| u64::from(b)));
        }

        fn key(&mut self, b: u8) {
            self.typed.push(b);
            match b {
                b'\n' => {
                    self.say(b"\n");
                    let cmd = String::from_utf8_lossy(&self.line).into_owned();
                    self.line.clear();
                    match cmd.as_str() {
                        "exit" => self.queue.push_back(SESSION_END),
                        "help" => self.say(b"HELP\n> "),
                        "nul" => {
                            self.queue.push_back(NUL_BYTE);
                            self.say(b"\n> ");
                        }
                        "weird" => self.queue.push_back(0x2000),
                        _ => self.say(b"unknown\n> "),
                    }
                    self.commands.push(cmd);
                    if !self.queue.contains(&SESSION_END) {
                        self.queue.push_back(WANT_INPUT);
                    }
                }
                DEL => {
                    self.line.pop();
                    self.say(b"\x08 \x08");
                    self.queue.push_back(WANT_INPUT);
                }
                b => {
                    self.line.push(b);
                    self.say(&[b]);
                    self.queue.push_back(WANT_INPUT);
                }
            }
        }

        fn call(&mut self, answer: u64) -> u64 {
            self.calls += 1;
            assert!(!self.end_acked, "a call after the session ended");
            if self.startup > 0 {
                self.startup -= 1;
                return NOTHING;
            }
            if answer != NOTHING {
                match self.pending.take() {
                    Some(WANT_INPUT) if answer == 0 => {
                        self.no_key += 1;
                        self.queue.push_front(WANT_INPUT);
                    }
                    Some(WANT_INPUT) => {
                        let b = if answer == NUL_BYTE { 0 } else { answer as u8 };
                        self.key(b);
                    }
                    Some(SESSION_END) => {
                        self.end_acked = true;
                        return NOTHING;
                    }
                    Some(_) | None => {}
                }
            }
            if self.pending.is_none() {
                self.pending = self.queue.pop_front();
            }
            self.pending.unwrap_or(NOTHING)
        }
    }

    fn fast() -> Timing {
        Timing {
            spin_polls: 3,
            poll_sleep: Duration::ZERO,
            note_after: Duration::from_secs(3600),
        }
    }

    /// Runs the client against `shell` with these keys (then end of input).
    fn session(
        shell: &mut Shell,
        keys: &[Key],
        timing: &Timing,
    ) -> (io::Result<Ended>, String, String) {
        let mut keys: VecDeque<Key> = keys.iter().copied().collect();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let result = run(
            |a| shell.call(a),
            || Ok(keys.pop_front().unwrap_or(Key::Eof)),
            &mut out,
            &mut err,
            timing,
        );
        (
            result,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    }

    fn bytes(text: &str) -> Vec<Key> {
        text.bytes().map(Key::Byte).collect()
    }

    #[test]
    fn scripted_session() {
        let mut shell = Shell::new(100);
        let (result, out, err) = session(&mut shell, &bytes("help\nexit\n"), &fast());
        assert_eq!(result.unwrap(), Ended::Session);
        assert_eq!(out, "banner\n> help\nHELP\n> exit\n");
        assert_eq!(err, "");
        assert_eq!(shell.commands, ["help", "exit"]);
        assert!(shell.end_acked);
    }

    #[test]
    fn end_of_input_types_exit() {
        let mut shell = Shell::new(0);
        let (result, out, _) = session(&mut shell, &bytes("help\n"), &fast());
        assert_eq!(result.unwrap(), Ended::Session);
        assert!(out.ends_with("HELP\n> exit\n"), "{out:?}");
        assert!(shell.end_acked);
        // An unfinished last line runs before the exit.
        let mut shell = Shell::new(0);
        let (result, _, _) = session(&mut shell, &bytes("hel"), &fast());
        assert_eq!(result.unwrap(), Ended::Session);
        assert_eq!(shell.commands, ["hel", "exit"]);
        // No input at all.
        let mut shell = Shell::new(0);
        let (result, out, _) = session(&mut shell, &[], &fast());
        assert_eq!(result.unwrap(), Ended::Session);
        assert_eq!(out, "banner\n> exit\n");
    }

    #[test]
    fn ctrl_c_erases_the_line_and_leaves_quietly() {
        let mut shell = Shell::new(0);
        let mut keys = bytes("help\nhe");
        keys.push(Key::Interrupt);
        let (result, out, _) = session(&mut shell, &keys, &fast());
        assert_eq!(result.unwrap(), Ended::Interrupted);
        assert_eq!(shell.commands, ["help", "exit"]);
        assert_eq!(shell.typed, b"help\nhe\x7f\x7fexit\n");
        // Nothing after the Ctrl-C is printed.
        assert_eq!(out, "banner\n> help\nHELP\n> he");
        assert!(shell.end_acked);
    }

    #[test]
    fn no_key_yet_keeps_asking() {
        let mut shell = Shell::new(0);
        let mut keys = vec![Key::NotYet, Key::NotYet];
        keys.extend(bytes("ex"));
        keys.push(Key::NotYet);
        keys.extend(bytes("it\n"));
        let (result, out, _) = session(&mut shell, &keys, &fast());
        assert_eq!(result.unwrap(), Ended::Session);
        assert_eq!(shell.no_key, 3);
        assert_eq!(out, "banner\n> exit\n");
    }

    #[test]
    fn nul_bytes_both_ways() {
        let mut shell = Shell::new(0);
        let mut keys = bytes("nul\n");
        keys.push(Key::Byte(0));
        keys.extend(bytes("\nexit\n"));
        let (result, out, _) = session(&mut shell, &keys, &fast());
        assert_eq!(result.unwrap(), Ended::Session);
        assert!(out.contains("nul\n\0\n> "), "{out:?}");
        assert_eq!(shell.typed[4], 0);
        assert_eq!(shell.commands[1], "\0");
    }

    #[test]
    fn a_silent_shell_is_noted_once() {
        let mut shell = Shell::new(500);
        let timing = Timing {
            note_after: Duration::ZERO,
            ..fast()
        };
        let (result, _, err) = session(&mut shell, &bytes("exit\n"), &timing);
        assert_eq!(result.unwrap(), Ended::Session);
        assert_eq!(err, WAITING_NOTE);
        // The first call is the -1 poll, then the 499 others.
        assert!(shell.calls > 500);
    }

    #[test]
    fn disabled_shell_streams_and_ends() {
        // dbgsh=off: a message and the end, never a request for input.
        let mut values: VecDeque<u64> = b"dbgsh is disabled\n"
            .iter()
            .map(|&b| u64::from(b))
            .collect();
        values.push_back(SESSION_END);
        let mut answers = Vec::new();
        let mut pending = None;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let result = run(
            |a| {
                answers.push(a);
                if a != NOTHING {
                    pending = None;
                }
                *pending.get_or_insert_with(|| values.pop_front().unwrap_or(NOTHING))
            },
            || panic!("no key is asked for"),
            &mut out,
            &mut err,
            &fast(),
        );
        assert_eq!(result.unwrap(), Ended::Session);
        assert_eq!(out, b"dbgsh is disabled\n");
        assert_eq!(answers.first(), Some(&NOTHING));
        assert_eq!(answers.last(), Some(&ACK));
    }

    #[test]
    fn unexpected_values_stop_the_client() {
        let mut shell = Shell::new(0);
        let (result, _, _) = session(&mut shell, &bytes("weird\n"), &fast());
        assert!(result.unwrap_err().to_string().contains("0x2000"));
    }

    #[test]
    fn a_shell_that_ignores_exit_is_an_error_not_a_hang() {
        let mut calls = 0;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let result = run(
            |_| {
                calls += 1;
                assert!(calls < 100, "the client did not give up");
                WANT_INPUT
            },
            || Ok(Key::Eof),
            &mut out,
            &mut err,
            &fast(),
        );
        assert!(result.is_err());
    }
}

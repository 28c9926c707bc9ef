//! Paths of the workspace, and small helpers for running processes.

use std::env;
use std::ffi::OsStr;
use std::fmt::Display;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::thread;
use std::time::{Duration, Instant};

/// Errors are messages for the user: there is nothing to recover.
pub type Result<T = ()> = std::result::Result<T, String>;

/// Adds what was being done to an error.
pub trait Context<T> {
    fn context(self, what: impl Display) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl Display) -> Result<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// Where things are.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The workspace root (the directory of the top `Cargo.toml`).
    pub root: PathBuf,
}

impl Ctx {
    pub fn new() -> Ctx {
        // `cargo run` sets CARGO_MANIFEST_DIR for the program it runs; the
        // compile-time value is the fallback for a directly started binary.
        let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        let root = manifest_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or(manifest_dir);
        Ctx { root }
    }

    /// The workspace's own `target/`: everything xtask writes goes below
    /// it, whatever CARGO_TARGET_DIR says about cargo's artifacts.
    pub fn out(&self) -> PathBuf {
        self.root.join("target")
    }

    /// `target/images`: the bootable images.
    pub fn images(&self) -> PathBuf {
        self.out().join("images")
    }

    /// `target/xtask`: generated inputs and one directory per run.
    pub fn work(&self) -> PathBuf {
        self.out().join("xtask")
    }

    /// A fresh (emptied) directory `target/xtask/<name>`.
    pub fn fresh_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.work().join(name);
        if dir.exists() {
            fs::remove_dir_all(&dir).context(format_args!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).context(format_args!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// A `cargo` command run in the workspace root.
    pub fn cargo(&self) -> Command {
        let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&self.root);
        cmd
    }

    /// A path relative to the workspace root when it is inside it (for
    /// messages).
    pub fn show(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

/// The command line of `cmd`, shell-quoted where needed, for messages.
pub fn describe(cmd: &Command) -> String {
    // The program by its file name: CARGO is an absolute toolchain path.
    let program = Path::new(cmd.get_program());
    let mut words = vec![quote(program.file_name().unwrap_or(program.as_os_str()))];
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

fn quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio (after echoing it); fails unless it
/// exits with status 0.
pub fn run(cmd: &mut Command) -> Result {
    eprintln!("$ {}", describe(cmd));
    let status = cmd
        .status()
        .context(format_args!("cannot run `{}`", describe(cmd)))?;
    check_status(cmd, status)
}

/// Runs `cmd` with its output captured; fails unless it exits with status
/// 0, and then the error carries its output.
pub fn run_captured(cmd: &mut Command) -> Result<Output> {
    let output = cmd
        .output()
        .context(format_args!("cannot run `{}`", describe(cmd)))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "`{}` failed ({}):\n{}{}",
            describe(cmd),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn check_status(cmd: &Command, status: ExitStatus) -> Result {
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", describe(cmd)))
    }
}

/// Finds an executable on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

mod sys {
    extern "C" {
        pub fn kill(pid: i32, sig: i32) -> i32;
        pub fn getuid() -> u32;
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { sys::getuid() == 0 }
}

const SIGTERM: i32 = 15;

/// Ends `child`: SIGTERM first (QEMU then restores the terminal it may have
/// put in raw mode), SIGKILL if it is still there after two seconds.
pub fn terminate(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill() only sends a signal; `pid` is our own child, not
        // yet waited for, so the id cannot have been reused.
        unsafe {
            sys::kill(pid, SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// How a supervised process ended.
#[derive(Debug)]
pub enum Ended {
    /// It exited (or died of a signal) by itself.
    Exited(ExitStatus),
    /// The time limit passed and it was terminated.
    TimedOut,
    /// `poll` asked to stop it, with this reason.
    Stopped(String),
}

/// Waits for `child` for at most `timeout`, calling `poll` about every
/// 100 ms meanwhile (it may ask to stop the child early by returning a
/// reason). Terminates the child on time-out or stop.
pub fn supervise(
    child: &mut Child,
    timeout: Duration,
    mut poll: impl FnMut() -> Option<String>,
) -> io::Result<Ended> {
    let start = Instant::now();
    let mut last_poll = start;
    loop {
        if let Some(status) = child.try_wait()? {
            poll();
            return Ok(Ended::Exited(status));
        }
        if start.elapsed() >= timeout {
            terminate(child);
            poll();
            return Ok(Ended::TimedOut);
        }
        if last_poll.elapsed() >= Duration::from_millis(100) {
            last_poll = Instant::now();
            if let Some(reason) = poll() {
                terminate(child);
                return Ok(Ended::Stopped(reason));
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Seconds with one decimal, for messages.
pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Copies `from` to `to`, replacing `to`.
pub fn copy(from: &Path, to: &Path) -> Result {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).context(format_args!("creating {}", parent.display()))?;
    }
    // Remove first: a hard link or a running reader keeps the old file.
    let _ = fs::remove_file(to);
    fs::copy(from, to).map(|_| ()).context(format_args!(
        "copying {} to {}",
        from.display(),
        to.display()
    ))
}

/// The last `n` lines of `text`, with terminal escape sequences and
/// carriage returns removed.
pub fn tail(text: &str, n: usize) -> Vec<String> {
    let clean = strip_escapes(text);
    let lines: Vec<&str> = clean.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].iter().map(|l| l.to_string()).collect()
}

/// Removes ANSI escape sequences (GRUB's terminal output on the serial
/// port) and carriage returns.
pub fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters, then one final byte in @..~.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_grub_escapes() {
        let s = "\x1b[H\x1b[J\x1b[1;1H  Booting `x'\n\r\nhello\r\n";
        assert_eq!(strip_escapes(s), "  Booting `x'\n\nhello\n");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), vec!["b", "c"]);
        assert_eq!(tail("a", 5), vec!["a"]);
    }

    #[test]
    fn supervise_times_out_and_polls() {
        let mut child = Command::new("sleep").arg("10").spawn().unwrap();
        let start = Instant::now();
        let ended = supervise(&mut child, Duration::from_millis(300), || None).unwrap();
        assert!(matches!(ended, Ended::TimedOut));
        assert!(start.elapsed() < Duration::from_secs(3));

        let mut child = Command::new("sleep").arg("10").spawn().unwrap();
        let ended = supervise(&mut child, Duration::from_secs(10), || Some("stop".into())).unwrap();
        assert!(matches!(ended, Ended::Stopped(ref r) if r == "stop"));

        let mut child = Command::new("true").spawn().unwrap();
        let ended = supervise(&mut child, Duration::from_secs(10), || None).unwrap();
        assert!(matches!(ended, Ended::Exited(s) if s.success()));
    }

    #[test]
    fn quotes_words() {
        let mut cmd = Command::new("qemu");
        cmd.args(["-append", "log=info x", "it's"]);
        assert_eq!(describe(&cmd), r"qemu -append 'log=info x' 'it'\''s'");
    }
}

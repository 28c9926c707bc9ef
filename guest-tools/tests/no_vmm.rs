//! The programs on this host, which is no thinvisor (CI and development
//! machines are KVM guests, whose VMCALL from user mode returns an error
//! instead of faulting, so only the CPUID check tells): each must say so
//! and end with the documented status, quickly. A hang fails the test
//! instead of blocking the suite.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_tools::status;

/// Runs `bin` with `args` and stdin from /dev/null; its status and stderr.
/// Killed and failed after 10 s.
fn run(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{bin} {args:?} did not end within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), err)
}

#[test]
fn every_program_says_no_thinvisor() {
    for (bin, args) in [
        (env!("CARGO_BIN_EXE_dbgsh"), &[][..]),
        (env!("CARGO_BIN_EXE_vmmlog"), &[][..]),
        (env!("CARGO_BIN_EXE_vmmlog"), &["-f"][..]),
        (
            env!("CARGO_BIN_EXE_vmmcall"),
            &["log_read", "0", "0", "0"][..],
        ),
        (env!("CARGO_BIN_EXE_vmmcall"), &["no_such_function"][..]),
        (env!("CARGO_BIN_EXE_vmmbench"), &["loops"][..]),
    ] {
        let (code, err) = run(bin, args);
        assert_eq!(code, Some(status::NO_VMM), "{bin} {args:?}: {err}");
        assert!(err.contains("no thinvisor here"), "{bin} {args:?}: {err}");
    }
}

#[test]
fn usage_errors() {
    for (bin, args) in [
        (env!("CARGO_BIN_EXE_dbgsh"), &["--bogus"][..]),
        (env!("CARGO_BIN_EXE_vmmlog"), &["-x"][..]),
        (env!("CARGO_BIN_EXE_vmmcall"), &[][..]),
        (
            env!("CARGO_BIN_EXE_vmmcall"),
            &["f", "1", "2", "3", "4", "5", "6"][..],
        ),
        (env!("CARGO_BIN_EXE_vmmcall"), &["f", "0x"][..]),
        (env!("CARGO_BIN_EXE_vmmbench"), &[][..]),
        (env!("CARGO_BIN_EXE_vmmbench"), &["loops", "x"][..]),
    ] {
        let (code, err) = run(bin, args);
        assert_eq!(code, Some(status::USAGE), "{bin} {args:?}: {err}");
        assert!(err.contains("usage:") || err.contains("vmmcall:"), "{err}");
    }
    for bin in [
        env!("CARGO_BIN_EXE_dbgsh"),
        env!("CARGO_BIN_EXE_vmmlog"),
        env!("CARGO_BIN_EXE_vmmcall"),
        env!("CARGO_BIN_EXE_vmmbench"),
    ] {
        assert_eq!(run(bin, &["--help"]).0, Some(status::OK), "{bin}");
    }
}

/// The TSC needs no thinvisor: the boot benchmark reads it with and
/// without one.
#[test]
fn vmmbench_reads_the_tsc_anywhere() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmbench"))
        .arg("tsc")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let tsc = text
        .trim()
        .strip_prefix("vmmbench: tsc ")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(tsc.parse::<u64>().unwrap() > 0, "{text}");
}

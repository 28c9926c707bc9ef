//! `cargo xtask run`: build, then boot the demo with its output live on the
//! terminal and a verdict at the end. By default the guest is Debian's
//! Linux (`boot=linux`, the assets of `cargo xtask linux`), which powers the
//! machine off when its init is done; `--guest checks` boots the test guest
//! instead.

use std::fs;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use thinvisor_abi::exit_code;

use crate::emu::{self, BochsOpts, Boot, QemuOpts};
use crate::images::{self, Images, Kernel, Module};
use crate::linux;
use crate::setup;
use crate::util::{self, Context, Ctx, Result};

const USAGE: &str = "\
usage: cargo xtask run [--guest linux|checks] [--bochs MODEL] [--smp N] [--timeout SECS]
                       [--module \"FILE ARGS\"]... [-- HV_ARGS...]
  Builds thinvisor and the guest, boots them with the serial console here, and ends
  with a verdict line once the guest has ended the run.
  --guest linux    (default) Debian's kernel and an initramfs with busybox and
                   thinvisor-probe (the assets of `cargo xtask linux`, fetched from
                   Debian's packages into a cache); thinvisor loads it itself
                   (boot=linux); the run ends when Linux's init powers off
  --guest checks   the test guest (module \"test-guest.elf checks\") and its PASS/FAIL lines
  --bochs MODEL    boot a GRUB ISO in Bochs with this CPU model (ryzen, corei7_skylake_x,
                   ...) instead of QEMU TCG (-cpu max, -kernel)
  --smp N          processors (default 2 with Linux, 1 with the test guest)
  --module STRING  test guest only: a module, FILE (in target/images) and its arguments;
                   repeatable; default \"test-guest.elf checks\"
  --timeout SECS   wall-clock limit (default: Linux 120 on QEMU, 900 on Bochs; test
                   guest 60 on QEMU, 180 on Bochs)
  HV_ARGS          the hypervisor's command line (default `boot=linux log=info` with
                   Linux, `log=info` with the test guest)
Exits 0 when Linux reached its init, reported as many CPUs as --smp and got an answer to
a VMM call (`probe: lookup log_read = 3`), and the emulator then ended by itself; with
the test guest, when it reports that all its checks passed.";

/// Which guest thinvisor boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guest {
    /// Debian's Linux with the project's initramfs (`boot=linux`).
    Linux,
    /// The test guest (`test-guest.elf checks` unless `--module`).
    Checks,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    /// `--guest`, when given.
    guest: Option<Guest>,
    bochs: Option<String>,
    modules: Vec<String>,
    smp: Option<u32>,
    timeout: Option<u64>,
    hv_args: Vec<String>,
}

impl Options {
    /// The guest: `--guest`, else the test guest when `--module` names its
    /// modules, else Linux.
    fn guest(&self) -> Guest {
        match self.guest {
            Some(guest) => guest,
            None if !self.modules.is_empty() => Guest::Checks,
            None => Guest::Linux,
        }
    }

    /// Processors: 0 leaves QEMU's default (one).
    fn smp(&self) -> u32 {
        match (self.smp, self.guest()) {
            (Some(n), _) => n,
            (None, Guest::Linux) => 2,
            (None, Guest::Checks) => 0,
        }
    }

    fn timeout(&self) -> Duration {
        let default = match (self.guest(), self.bochs.is_some()) {
            (Guest::Linux, false) => 120,
            // Bochs emulates some 5-6 G instructions for Linux's boot.
            (Guest::Linux, true) => 900,
            (Guest::Checks, false) => 60,
            (Guest::Checks, true) => 180,
        };
        Duration::from_secs(self.timeout.unwrap_or(default))
    }

    fn hv_args(&self) -> String {
        match (self.hv_args.is_empty(), self.guest()) {
            (false, _) => self.hv_args.join(" "),
            (true, Guest::Linux) => linux::LINUX_HV_ARGS.to_string(),
            (true, Guest::Checks) => "log=info".to_string(),
        }
    }
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--guest" => {
                opts.guest = Some(match value("--guest")?.as_str() {
                    "linux" => Guest::Linux,
                    "checks" => Guest::Checks,
                    other => return Err(format!("--guest `{other}`: linux or checks")),
                })
            }
            "--bochs" => opts.bochs = Some(value("--bochs")?),
            "--module" => opts.modules.push(value("--module")?),
            "--smp" => {
                let v = value("--smp")?;
                let n = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=255).contains(n))
                    .ok_or_else(|| format!("bad --smp `{v}`: 1 to 255"))?;
                opts.smp = Some(n);
            }
            "--timeout" => {
                let v = value("--timeout")?;
                opts.timeout = Some(v.parse().map_err(|_| format!("bad --timeout `{v}`"))?);
            }
            "--" => {
                opts.hv_args = args.cloned().collect();
                break;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown option `{other}`\n{USAGE}")),
        }
    }
    if opts.guest == Some(Guest::Linux) && !opts.modules.is_empty() {
        return Err("--module names the test guest's modules: not with --guest linux".into());
    }
    Ok(opts)
}

pub fn main(ctx: &Ctx, args: &[String]) -> Result<ExitCode> {
    let opts = parse(args)?;
    setup::ensure(ctx)?;
    let images = images::build(ctx)?;
    match opts.guest() {
        Guest::Linux => run_linux(ctx, &opts, &images),
        Guest::Checks => run_checks(ctx, &opts, &images),
    }
}

/// Linux under thinvisor: the serial console live, then the verdict.
fn run_linux(ctx: &Ctx, opts: &Options, images: &Images) -> Result<ExitCode> {
    let assets = linux::build(ctx, false)?;
    let smp = opts.smp();
    let boot = Boot {
        kernel: Kernel::Thinvisor,
        kernel32: images.hv32.clone(),
        kernel64: images.hv.clone(),
        args: opts.hv_args(),
        modules: vec![
            Module::new(&assets.kernel, linux::KERNEL_MODULE),
            Module::new(&assets.initrd, linux::INITRD_MODULE),
        ],
    };
    let timeout = opts.timeout();
    let on = match &opts.bochs {
        None => "QEMU TCG -cpu max".to_string(),
        Some(model) => format!("Bochs {model}"),
    };
    eprintln!(
        "run: Linux ({package}) under thinvisor `{args}` on {on}, {smp} CPU{s}, 512 MiB; \
         the run ends when Linux powers off (limit {limit})",
        package = assets.kernel_package,
        args = boot.args,
        s = if smp == 1 { "" } else { "s" },
        limit = util::secs(timeout),
    );
    let (ran, serial, log) = match &opts.bochs {
        None => {
            let dir = ctx.fresh_dir("run")?;
            let qemu = QemuOpts {
                timeout,
                interactive: true,
                smp,
                ..QemuOpts::default()
            };
            let cmd = emu::qemu_command(&dir, &boot, &qemu)?;
            fs::write(dir.join("command.txt"), util::describe(&cmd) + "\n")
                .context("writing command.txt")?;
            eprintln!("$ {}", util::describe(&cmd));
            let watched = linux::watch(cmd, timeout)?;
            let log = dir.join("serial.log");
            fs::write(&log, &watched.serial).context("writing serial.log")?;
            let end = qemu_end(watched.status.as_ref(), watched.stopped.as_deref());
            let ran = Ran {
                emulator: "QEMU",
                smp,
                marker_at: watched.marker_at,
                elapsed: watched.elapsed,
                end,
            };
            (ran, watched.serial, log)
        }
        Some(model) => {
            let bochs = BochsOpts {
                timeout,
                follow: true,
                cpus: smp,
                time_line: Some(linux::MARKER.to_string()),
                ..BochsOpts::new(model)
            };
            let outcome = emu::run_bochs(ctx, "run-bochs", &boot, &bochs)?;
            let end = bochs_end(
                outcome.stopped.as_deref(),
                outcome.bochs_exit_message().as_deref(),
            );
            let ran = Ran {
                emulator: "Bochs",
                smp,
                marker_at: outcome.line_at,
                elapsed: outcome.elapsed,
                end,
            };
            (ran, outcome.serial, outcome.dir.join("serial.log"))
        }
    };
    let verdict = linux_verdict(&serial, &ran);
    println!();
    println!("run: the serial log is in {}", ctx.show(&log));
    println!("verdict: {}", verdict.line);
    Ok(if verdict.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// How the emulator ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// By itself, the way a guest's power-off ends it (QEMU's status 0,
    /// Bochs' "shutdown requested").
    Clean,
    /// By itself, otherwise (thinvisor's exit code, an emulator error).
    Odd(String),
    /// Stopped by the runner (time-out, reset).
    Stopped(String),
}

/// How QEMU ended: a guest's power-off ends it with status 0 (thinvisor
/// writes no exit code then).
fn qemu_end(status: Option<&ExitStatus>, stopped: Option<&str>) -> End {
    match (status, stopped) {
        (_, Some(reason)) => End::Stopped(reason.to_string()),
        (Some(status), None) if status.code() == Some(0) => End::Clean,
        (Some(status), None) => End::Odd(emu::describe_qemu_status(status)),
        (None, None) => End::Odd("no exit status".into()),
    }
}

/// How Bochs ended, from its farewell message: an ACPI power-off ("ACPI
/// control: soft power off") or the shutdown port ("shutdown requested")
/// is the guest's own end.
fn bochs_end(stopped: Option<&str>, message: Option<&str>) -> End {
    match (stopped, message) {
        (Some(reason), _) => End::Stopped(reason.to_string()),
        (None, Some(message))
            if !message.contains("soft power off") && !message.contains("shutdown requested") =>
        {
            End::Odd(format!("Bochs said `{message}`"))
        }
        (None, _) => End::Clean,
    }
}

/// What the verdict needs besides the serial log.
#[derive(Debug, Clone)]
struct Ran {
    /// `QEMU` or `Bochs`.
    emulator: &'static str,
    /// The processors the machine had.
    smp: u32,
    /// When the marker line appeared, from the emulator's start.
    marker_at: Option<Duration>,
    elapsed: Duration,
    end: End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    line: String,
    ok: bool,
}

/// What the Linux guest's serial log says (see `linux::INIT_SCRIPT`).
#[derive(Debug, Default, PartialEq, Eq)]
struct LinuxSeen {
    marker: bool,
    /// `thinvisor-init: cpus N`.
    cpus: Option<u32>,
    /// `probe: lookup log_read = N`: the VMM call's answer (3 is the
    /// function number of `log_read`).
    log_read: Option<String>,
    /// `probe: no thinvisor`: the probe found no VMM-call interface.
    no_thinvisor: bool,
    panic: bool,
}

const CPUS: &str = "thinvisor-init: cpus ";
const LOOKUP: &str = "probe: lookup log_read = ";
/// `log_read`'s number in thinvisor's VMM-call table.
const LOG_READ: &str = "3";

/// The word after the first `prefix` in `serial`.
fn word_after<'a>(serial: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = &serial[serial.find(prefix)? + prefix.len()..];
    rest.split_whitespace().next()
}

fn linux_seen(serial: &str) -> LinuxSeen {
    LinuxSeen {
        marker: serial.contains(linux::MARKER),
        cpus: word_after(serial, CPUS).and_then(|n| n.parse().ok()),
        log_read: word_after(serial, LOOKUP).map(str::to_string),
        no_thinvisor: serial.contains("probe: no thinvisor"),
        panic: serial.contains("Kernel panic"),
    }
}

/// The verdict on a Linux run: it passed when the serial log has the
/// marker, the CPU count the machine has, the answer to the probe's VMM
/// call, and the emulator ended by itself (the guest powered off).
fn linux_verdict(serial: &str, ran: &Ran) -> Verdict {
    let seen = linux_seen(serial);
    let mut parts = Vec::new();
    let mut ok = true;
    if seen.marker {
        parts.push(match ran.marker_at {
            Some(t) => format!(
                "Linux reached its init under thinvisor (marker after {})",
                util::secs(t)
            ),
            None => "Linux reached its init under thinvisor".to_string(),
        });
        let plural = |n: u32| if n == 1 { "CPU" } else { "CPUs" };
        match seen.cpus {
            Some(n) if n == ran.smp => parts.push(format!("{n} {}", plural(n))),
            Some(n) => {
                ok = false;
                parts.push(format!("{n} {} of {} (`{CPUS}{n}`)", plural(n), ran.smp));
            }
            None => {
                ok = false;
                parts.push(format!("no `{CPUS}N` line"));
            }
        }
        match (&seen.log_read, seen.no_thinvisor) {
            (Some(answer), _) if answer == LOG_READ => {
                parts.push("VMM call answered".to_string());
            }
            (Some(answer), _) => {
                ok = false;
                parts.push(format!(
                    "VMM call answered wrongly (`{LOOKUP}{answer}`, expected {LOG_READ})"
                ));
            }
            (None, true) => {
                ok = false;
                parts.push("VMM call not answered (`probe: no thinvisor`)".to_string());
            }
            (None, false) => {
                ok = false;
                parts.push(format!("no `{LOOKUP}N` line"));
            }
        }
    } else {
        ok = false;
        parts.push(format!(
            "Linux did not reach its init (no `{}` line{})",
            linux::MARKER,
            if seen.panic { "; kernel panic" } else { "" }
        ));
    }
    let took = util::secs(ran.elapsed);
    let end = match &ran.end {
        End::Clean => format!("{} ended after {took}", ran.emulator),
        End::Odd(how) => {
            ok = false;
            format!("{} ended after {took}: {how}", ran.emulator)
        }
        End::Stopped(reason) => {
            ok = false;
            format!("{} was stopped: {reason}", ran.emulator)
        }
    };
    Verdict {
        line: format!("{}; {end}", parts.join(", ")),
        ok,
    }
}

/// The test guest (today's demo before Linux): its PASS/FAIL lines, then
/// how the run ended.
fn run_checks(ctx: &Ctx, opts: &Options, images: &Images) -> Result<ExitCode> {
    let module_strings = if opts.modules.is_empty() {
        vec!["test-guest.elf checks".to_string()]
    } else {
        opts.modules.clone()
    };
    let mut modules = Vec::new();
    for cmdline in module_strings {
        let probe = Module::new("", cmdline.as_str());
        let path = ctx.images().join(probe.file_name()?);
        if !path.exists() {
            return Err(format!("module file {} does not exist", ctx.show(&path)));
        }
        modules.push(Module::new(path, cmdline));
    }
    let boot = Boot {
        kernel: Kernel::Thinvisor,
        kernel32: images.hv32.clone(),
        kernel64: images.hv.clone(),
        args: opts.hv_args(),
        modules,
    };

    match &opts.bochs {
        None => {
            let dir = ctx.fresh_dir("run")?;
            let qemu = QemuOpts {
                timeout: opts.timeout(),
                interactive: true,
                smp: opts.smp(),
                ..QemuOpts::default()
            };
            let outcome = emu::run_qemu(&dir, &boot, &qemu)?;
            println!();
            match (&outcome.status, &outcome.stopped) {
                (_, Some(reason)) => {
                    println!("verdict: {reason}: QEMU was killed");
                    Ok(ExitCode::FAILURE)
                }
                (Some(status), None) => {
                    println!(
                        "verdict: {} after {}",
                        emu::describe_qemu_status(status),
                        util::secs(outcome.elapsed)
                    );
                    let passed = exit_code::qemu_status(exit_code::GUEST_PASSED);
                    Ok(if status.code() == Some(passed) {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                (None, None) => Ok(ExitCode::FAILURE),
            }
        }
        Some(model) => {
            let bochs = BochsOpts {
                timeout: opts.timeout(),
                follow: true,
                cpus: opts.smp().max(1),
                ..BochsOpts::new(model)
            };
            let outcome = emu::run_bochs(ctx, "run-bochs", &boot, &bochs)?;
            println!();
            let serial = util::strip_escapes(&outcome.serial);
            let summary = serial
                .lines()
                .rev()
                .find(|l| l.contains("SUMMARY:"))
                .or_else(|| serial.lines().rev().find(|l| !l.trim().is_empty()))
                .unwrap_or("(serial log empty)");
            let ended = match (&outcome.stopped, outcome.bochs_exit_message()) {
                (Some(reason), _) => format!("{reason}: Bochs was killed"),
                (None, Some(message)) => format!("Bochs: {message}"),
                (None, None) => "Bochs ended".to_string(),
            };
            println!(
                "verdict: {} after {} -- serial: {}",
                ended,
                util::secs(outcome.elapsed),
                summary.trim()
            );
            let passed = serial.contains("SUMMARY:")
                && serial.contains(" 0 failed")
                && !serial.contains("FAIL");
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn defaults_boot_linux() {
        let o = parse(&[]).unwrap();
        assert_eq!(o, Options::default());
        assert_eq!(o.guest(), Guest::Linux);
        assert_eq!(o.smp(), 2);
        assert_eq!(o.timeout(), Duration::from_secs(120));
        assert_eq!(o.hv_args(), "boot=linux log=info");
        assert_eq!(o.hv_args(), linux::LINUX_HV_ARGS);
        let bochs = parse(&args("--bochs corei7_skylake_x")).unwrap();
        assert_eq!(bochs.bochs.as_deref(), Some("corei7_skylake_x"));
        assert_eq!(bochs.guest(), Guest::Linux);
        assert_eq!(bochs.timeout(), Duration::from_secs(900));
    }

    #[test]
    fn checks_keeps_the_old_demo() {
        let o = parse(&args("--guest checks")).unwrap();
        assert_eq!(o.guest(), Guest::Checks);
        assert_eq!(o.smp(), 0, "QEMU's default, as before");
        assert_eq!(o.timeout(), Duration::from_secs(60));
        assert_eq!(o.hv_args(), "log=info");
        let o = parse(&args("--guest checks --bochs ryzen")).unwrap();
        assert_eq!(o.timeout(), Duration::from_secs(180));
        // --module alone means the test guest.
        let o = parse(&["--module".to_string(), "test-guest.elf bench".to_string()]).unwrap();
        assert_eq!(o.guest(), Guest::Checks);
        assert_eq!(o.modules, ["test-guest.elf bench"]);
        assert!(parse(&args("--guest linux --module x.elf")).is_err());
    }

    #[test]
    fn options() {
        let o = parse(&args(
            "--guest linux --bochs ryzen --smp 4 --timeout 9 -- log=debug boot=linux",
        ))
        .unwrap();
        assert_eq!(o.guest, Some(Guest::Linux));
        assert_eq!(o.bochs.as_deref(), Some("ryzen"));
        assert_eq!((o.smp(), o.timeout()), (4, Duration::from_secs(9)));
        assert_eq!(o.hv_args(), "log=debug boot=linux");
        // Everything after `--` belongs to the hypervisor.
        let o = parse(&args("-- --smp 3")).unwrap();
        assert_eq!((o.smp, o.hv_args()), (None, "--smp 3".to_string()));
        let o = parse(&args("--guest checks --smp 2")).unwrap();
        assert_eq!(o.smp(), 2);
        for bad in [
            "--guest",
            "--guest windows",
            "--smp 0",
            "--smp 256",
            "--smp two",
            "--timeout",
            "--timeout soon",
            "--bochs",
            "--what",
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad}");
        }
        assert!(parse(&args("--help")).unwrap_err().starts_with("usage:"));
    }

    #[test]
    fn how_the_emulator_ended() {
        use std::os::unix::process::ExitStatusExt;
        let zero = ExitStatus::from_raw(0);
        assert_eq!(qemu_end(Some(&zero), None), End::Clean);
        let panic = ExitStatus::from_raw(exit_code::qemu_status(exit_code::VMM_PANIC) << 8);
        assert!(matches!(qemu_end(Some(&panic), None), End::Odd(s) if s.contains("panic")));
        assert_eq!(
            qemu_end(None, Some("timeout after 1.0 s")),
            End::Stopped("timeout after 1.0 s".into())
        );
        assert_eq!(
            bochs_end(None, Some("[ACPI  ] ACPI control: soft power off")),
            End::Clean
        );
        assert_eq!(
            bochs_end(None, Some("[UNMAP ] Shutdown port: shutdown requested")),
            End::Clean
        );
        assert_eq!(bochs_end(None, None), End::Clean);
        assert!(matches!(
            bochs_end(None, Some("[CPU0  ] exception(): 3rd (13) exception with no resolution")),
            End::Odd(s) if s.contains("3rd (13)")
        ));
        assert!(matches!(bochs_end(Some("timeout"), None), End::Stopped(_)));
    }

    /// The end of a Linux boot under thinvisor, as the console writes it.
    const SERIAL: &str = concat!(
        "thinvisor: [INFO ] entering the guest at 0x1400000\r\n",
        "[    3.155069] Run /init as init process\r\n",
        "thinvisor-init: marker\r\n",
        "thinvisor-init: kernel 6.1.0-57-amd64\r\n",
        "thinvisor-init: cpus 2\r\n",
        "thinvisor-init: hypervisor-flag yes\r\n",
        r"probe: cpuid-signature thinvisor\x00\x00\x00",
        "\r\n",
        "probe: lookup log_read = 3\r\n",
        "thinvisor-init: done\r\n",
        "[    3.423399] reboot: Power down\r\n",
        "thinvisor: [INFO ] VM exits on CPU 0: 19480 in all\r\n",
    );

    fn qemu(end: End) -> Ran {
        Ran {
            emulator: "QEMU",
            smp: 2,
            marker_at: Some(Duration::from_millis(12_340)),
            elapsed: Duration::from_millis(14_060),
            end,
        }
    }

    #[test]
    fn seen_in_the_serial_log() {
        assert_eq!(
            linux_seen(SERIAL),
            LinuxSeen {
                marker: true,
                cpus: Some(2),
                log_read: Some("3".into()),
                no_thinvisor: false,
                panic: false,
            }
        );
        assert_eq!(linux_seen(""), LinuxSeen::default());
    }

    #[test]
    fn a_good_run() {
        let v = linux_verdict(SERIAL, &qemu(End::Clean));
        assert_eq!(
            v.line,
            "Linux reached its init under thinvisor (marker after 12.3 s), 2 CPUs, \
             VMM call answered; QEMU ended after 14.1 s"
        );
        assert!(v.ok);
        let bochs = Ran {
            emulator: "Bochs",
            smp: 1,
            marker_at: None,
            ..qemu(End::Clean)
        };
        let one = SERIAL.replace("cpus 2", "cpus 1");
        let v = linux_verdict(&one, &bochs);
        assert_eq!(
            v.line,
            "Linux reached its init under thinvisor, 1 CPU, VMM call answered; \
             Bochs ended after 14.1 s"
        );
        assert!(v.ok);
    }

    #[test]
    fn bad_runs() {
        // Each of these fails the run, and the line says why.
        let cases: &[(String, End, &str)] = &[
            (
                SERIAL.to_string(),
                End::Odd("status 3".into()),
                "QEMU ended after 14.1 s: status 3",
            ),
            (
                SERIAL.to_string(),
                End::Stopped("timeout after 120.0 s".into()),
                "; QEMU was stopped: timeout after 120.0 s",
            ),
            (
                SERIAL.replace("cpus 2", "cpus 1"),
                End::Clean,
                ", 1 CPU of 2 (",
            ),
            (
                SERIAL.replace("cpus 2", "cpus ?"),
                End::Clean,
                ", no `thinvisor-init: cpus N` line,",
            ),
            (
                SERIAL.replace("log_read = 3", "log_read = 0"),
                End::Clean,
                "VMM call answered wrongly (`probe: lookup log_read = 0`, expected 3)",
            ),
            (
                SERIAL.replace("probe: lookup log_read = 3", "probe: no thinvisor"),
                End::Clean,
                "VMM call not answered (`probe: no thinvisor`)",
            ),
            (
                SERIAL.replace("probe: lookup log_read = 3", ""),
                End::Clean,
                "no `probe: lookup log_read = N` line",
            ),
            (
                "[ 1.0] Kernel panic - not syncing: VFS\r\n".to_string(),
                End::Stopped("timeout after 120.0 s".into()),
                "Linux did not reach its init (no `thinvisor-init: marker` line; kernel panic); \
                 QEMU was stopped",
            ),
            (
                String::new(),
                End::Clean,
                "Linux did not reach its init (no `thinvisor-init: marker` line); QEMU ended",
            ),
        ];
        for (serial, end, expected) in cases {
            let v = linux_verdict(serial, &qemu(end.clone()));
            assert!(!v.ok, "{}", v.line);
            assert!(v.line.contains(expected), "{} lacks {expected}", v.line);
        }
    }
}

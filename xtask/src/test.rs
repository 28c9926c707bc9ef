//! `cargo xtask test`: formatting, host unit tests, clippy, images, and the
//! integration cases, ending with the line `N passed, M failed`.

use std::io::{self, BufRead, BufReader, Write};
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use crate::cases::{self, Case, Disk, Emulator};
use crate::emu::{self, BochsOpts, Boot, Outcome, QemuOpts};
use crate::esp::{self, EspInputs};
use crate::images::{self, Images, Kernel, Module};
use crate::linux::{self, LinuxAssets};
use crate::setup::{self, TARGET};
use crate::util::{self, Context, Ctx, Result};

const USAGE: &str =
    "usage: cargo xtask test [--filter SUBSTR] [--no-host] [--no-bench] [--keep-going] [--pending] [--list]\n\
     --pending also selects the pending cases (cases.rs PENDING_CASES: features not there yet)\n\
     --no-bench skips the regression gate (`cargo xtask bench --quick`, run unless --filter is given)";

/// How many lines of a failed case's serial log to show.
const TAIL_LINES: usize = 40;

#[derive(Debug, Default)]
struct Options {
    filter: Option<String>,
    host: bool,
    list: bool,
    /// Also the cases of `PENDING_CASES`.
    pending: bool,
    /// The regression gate (`cargo xtask bench --quick`); off with
    /// `--filter` or `--no-bench`.
    bench: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        host: true,
        bench: true,
        ..Options::default()
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--filter" => {
                let value = args.next().ok_or("--filter needs a value")?;
                opts.filter = Some(value.clone());
            }
            s if s.starts_with("--filter=") => opts.filter = Some(s["--filter=".len()..].into()),
            "--no-host" => opts.host = false,
            "--no-bench" => opts.bench = false,
            // Never stopping at the first failure is the only behaviour.
            "--keep-going" => {}
            "--list" => opts.list = true,
            "--pending" => opts.pending = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown option `{other}`\n{USAGE}")),
        }
    }
    if opts.filter.is_some() {
        opts.bench = false;
    }
    Ok(opts)
}

#[derive(Debug, Default)]
struct Tally {
    passed: u64,
    failed: u64,
    failures: Vec<String>,
}

impl Tally {
    fn pass(&mut self) {
        self.passed += 1;
    }

    fn fail(&mut self, what: impl Into<String>) {
        self.failed += 1;
        self.failures.push(what.into());
    }
}

fn step(title: &str) {
    println!("\n==> {title}");
    let _ = io::stdout().flush();
}

pub fn main(ctx: &Ctx, args: &[String]) -> ExitCode {
    let start = Instant::now();
    let opts = match parse(args) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let selected: Vec<&Case> = cases::all_cases()
        .filter(|c| opts.pending || !c.is_pending())
        .filter(|c| {
            opts.filter
                .as_ref()
                .is_none_or(|f| c.name.contains(f.as_str()))
        })
        .collect();
    if opts.list {
        for case in &selected {
            let pending = if case.is_pending() { " (pending)" } else { "" };
            println!("{}{pending}", case.name);
        }
        return ExitCode::SUCCESS;
    }

    let mut tally = Tally::default();
    step("setup");
    if let Err(e) = setup::ensure(ctx) {
        println!("setup FAILED: {e}");
        tally.fail("setup");
    }
    if opts.host {
        host_checks(ctx, &mut tally);
    }
    if !selected.is_empty() {
        step("build images");
        match images::build(ctx) {
            Ok(images) => {
                let linux = linux_assets(ctx, &selected, &mut tally);
                step("integration tests");
                for case in selected {
                    match (&linux, case.needs_linux()) {
                        (Some(Err(e)), true) => {
                            println!(
                                "integration {} ... FAILED: not run (no Linux assets: {e})",
                                case.name
                            );
                            tally.fail(format!("integration {}", case.name));
                        }
                        (linux, _) => {
                            let linux = linux.as_ref().and_then(|l| l.as_ref().ok());
                            integration(ctx, &images, linux, case, &mut tally);
                        }
                    }
                }
                if opts.bench {
                    bench_gate(ctx, &images, &mut tally);
                }
            }
            Err(e) => {
                println!("build FAILED: {e}");
                tally.fail("build");
                for case in selected {
                    println!(
                        "integration {} ... FAILED: not run (the build failed)",
                        case.name
                    );
                    tally.fail(format!("integration {}", case.name));
                }
            }
        }
    } else if opts.filter.is_some() {
        println!("\nno integration case matches the filter");
    }

    println!();
    if !tally.failures.is_empty() {
        println!("failed: {}", tally.failures.join(", "));
    }
    println!("wall time: {}", util::secs(start.elapsed()));
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The regression gate: `cargo xtask bench --quick` on the images just
/// built, failing when a per-exit instruction count grew by more than 10%
/// over bench/baseline.json.
fn bench_gate(ctx: &Ctx, images: &Images, tally: &mut Tally) {
    step("cargo xtask bench --quick (regression gate against bench/baseline.json)");
    match crate::bench::quick(ctx, images) {
        Ok(true) => {
            println!("bench gate ... ok");
            tally.pass();
        }
        Ok(false) => {
            println!("bench gate ... FAILED: a per-exit figure regressed (see above)");
            tally.fail("bench gate");
        }
        Err(e) => {
            println!("bench gate ... FAILED: {e}");
            tally.fail("bench gate");
        }
    }
}

/// The Linux assets when a selected case boots them (the disk only when
/// one needs it): None when none does.
fn linux_assets(
    ctx: &Ctx,
    selected: &[&Case],
    tally: &mut Tally,
) -> Option<std::result::Result<LinuxAssets, String>> {
    if !selected.iter().any(|c| c.needs_linux()) {
        return None;
    }
    let with_disk = selected.iter().any(|c| c.needs_linux_disk());
    step("Linux assets (Debian kernel, busybox, initramfs, boot disk)");
    let built = linux::build(ctx, with_disk);
    match &built {
        Ok(assets) => println!("Linux assets: {}", assets.kernel_package),
        Err(e) => {
            println!("Linux assets FAILED: {e}");
            tally.fail("Linux assets");
        }
    }
    Some(built)
}

/// The crates host tests and host clippy cover: every workspace member but
/// the bare-metal binaries and the UEFI loader (the default members, plus
/// guest-tools, which is no default member because its programs are built
/// for musl).
const HOST_CRATES: &[&str] = &[
    "--workspace",
    "--exclude",
    images::HV_BIN,
    "--exclude",
    images::GUEST_BIN,
    "--exclude",
    images::EFI_PKG,
];

/// Formatting, host unit tests, clippy, the fuzz targets' build.
fn host_checks(ctx: &Ctx, tally: &mut Tally) {
    step("cargo fmt --all -- --check");
    match util::run(ctx.cargo().args(["fmt", "--all", "--", "--check"])) {
        Ok(()) => tally.pass(),
        Err(e) => {
            println!("fmt FAILED: {e}");
            tally.fail("fmt");
        }
    }

    step("cargo test (host crates)");
    if let Err(e) = host_tests(ctx, tally) {
        println!("host tests FAILED: {e}");
        tally.fail("host tests");
    }

    step("cargo clippy (host crates)");
    match util::run(ctx.cargo().arg("clippy").args(HOST_CRATES).args([
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])) {
        Ok(()) => tally.pass(),
        Err(e) => {
            println!("clippy FAILED: {e}");
            tally.fail("clippy (host)");
        }
    }

    step(&format!(
        "fuzz targets: build, {} s of each (`cargo xtask fuzz` runs them longer)",
        crate::fuzz::SMOKE_SECONDS
    ));
    match crate::fuzz::build(ctx).and_then(|bins| crate::fuzz::smoke(ctx, &bins)) {
        Ok(done) => {
            for (target, runs) in done {
                println!("fuzz {target}: {runs} runs ... ok");
            }
            tally.pass();
        }
        Err(e) => {
            println!("fuzz FAILED: {e}");
            tally.fail("fuzz targets");
        }
    }

    clippy_for(
        ctx,
        tally,
        linux::MUSL_TARGET,
        &["guest-tools"],
        &format!("guest tools, {}", linux::MUSL_TARGET),
    );

    step("guest tools on this host (no thinvisor: status 2, no hang)");
    match linux::build_tools(ctx) {
        Ok(programs) => {
            for (name, path) in &programs {
                match no_vmm_here(name, path) {
                    Ok(status) => {
                        println!("{name}: no thinvisor, status {status} ... ok");
                        tally.pass();
                    }
                    Err(e) => {
                        println!("{name} FAILED: {e}");
                        tally.fail(format!("guest tool {name} on the host"));
                    }
                }
            }
        }
        Err(e) => {
            println!("guest tools build FAILED: {e}");
            tally.fail("guest tools build");
        }
    }

    clippy_for(
        ctx,
        tally,
        TARGET,
        &[images::HV_BIN, images::GUEST_BIN],
        TARGET,
    );
    clippy_for(
        ctx,
        tally,
        images::EFI_TARGET,
        &[images::EFI_PKG],
        images::EFI_TARGET,
    );
}

/// `cargo clippy --release --target TARGET -p ... -- -D warnings`, the
/// target installed first, as one counted step named `what`.
fn clippy_for(ctx: &Ctx, tally: &mut Tally, target: &str, packages: &[&str], what: &str) {
    step(&format!("cargo clippy ({what})"));
    let run = setup::ensure_target(ctx, target).and_then(|()| {
        let mut cmd = ctx.cargo();
        cmd.args(["clippy", "--release", "--target", target]);
        for p in packages {
            cmd.args(["-p", p]);
        }
        util::run(cmd.args(["--", "-D", "warnings"]))
    });
    match run {
        Ok(()) => tally.pass(),
        Err(e) => {
            println!("clippy FAILED: {e}");
            tally.fail(format!("clippy ({what})"));
        }
    }
}

/// Runs a built guest program on this host, which is not thinvisor (CI and
/// development machines are KVM guests, where a VMM call from user mode
/// returns an error instead of faulting, so only the CPUID check saves
/// the tools from being fooled): it must end within 10 s with the "no
/// thinvisor" status 2 and say so. The probe has no such status: it
/// prints `probe: no thinvisor` and ends with 0.
fn no_vmm_here(name: &str, path: &std::path::Path) -> Result<i32> {
    let (args, status): (&[&str], i32) = match name {
        "thinvisor-probe" => (&[], 0),
        "vmmcall" => (&["log_read", "0", "0", "0"], 2),
        "vmmbench" => (&["loops"], 2),
        _ => (&[], 2),
    };
    let mut child = std::process::Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context(format_args!("cannot run {}", path.display()))?;
    let ended = util::supervise(&mut child, std::time::Duration::from_secs(10), || None)
        .context("waiting for it")?;
    let output = child.wait_with_output().context("reading its output")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    match ended {
        util::Ended::Exited(s) if s.code() == Some(status) => {}
        util::Ended::Exited(s) => return Err(format!("{s}, expected status {status}: {text}")),
        _ => return Err("it did not end within 10 s".into()),
    }
    let said = ["no thinvisor", "no VMM"].iter().any(|m| text.contains(m));
    if said {
        Ok(status)
    } else {
        Err(format!("it did not say there is no thinvisor: {text}"))
    }
}

/// Runs `cargo test`, streaming its output and adding up its
/// `test result:` lines. Fails when cargo fails without a failing test to
/// show for it (a build error, a crashed test binary).
fn host_tests(ctx: &Ctx, tally: &mut Tally) -> Result {
    let mut cmd = ctx.cargo();
    cmd.arg("test")
        .args(HOST_CRATES)
        .arg("--no-fail-fast")
        .stdout(Stdio::piped());
    println!("$ {}", util::describe(&cmd));
    let mut child = cmd.spawn().context("cannot run cargo test")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (mut passed, mut failed, mut results) = (0, 0, 0);
    for line in BufReader::new(stdout).split(b'\n') {
        let line = line.context("reading cargo test's output")?;
        let line = String::from_utf8_lossy(&line);
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
            results += 1;
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    tally.passed += passed;
    tally.failed += failed;
    if failed > 0 {
        tally.failures.push(format!("host tests ({failed})"));
    }
    if !status.success() && failed == 0 {
        return Err(format!(
            "cargo test failed ({status}) after {results} test binaries"
        ));
    }
    Ok(())
}

/// `test result: ok. 3 passed; 0 failed; ...` (or `FAILED.`) -> (3, 0).
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, counts) = rest.split_once(". ")?;
    let mut passed = None;
    let mut failed = None;
    for part in counts.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        match what {
            "passed" => passed = n.parse().ok(),
            "failed" => failed = n.parse().ok(),
            _ => {}
        }
    }
    Some((passed?, failed?))
}

/// The run of one case, and what was wrong with it.
fn run_case(
    ctx: &Ctx,
    images: &Images,
    linux: Option<&LinuxAssets>,
    case: &Case,
) -> Result<(Outcome, Vec<String>)> {
    let modules = case
        .modules
        .iter()
        .map(|(image, cmdline)| Ok(Module::new(image.path(ctx, images, linux)?, *cmdline)))
        .collect::<Result<Vec<_>>>()?;
    let disk = case.disk.map(|d| d.path(ctx, linux)).transpose()?;
    let (kernel32, kernel64) = match case.kernel {
        Kernel::Thinvisor => (images.hv32.clone(), images.hv.clone()),
        Kernel::TestGuest => (images.guest32.clone(), images.guest.clone()),
    };
    let boot = Boot {
        kernel: case.kernel,
        kernel32,
        kernel64,
        args: case.hv_args.to_string(),
        modules,
    };
    let mut problems = Vec::new();
    let outcome = match case.emulator {
        Emulator::Qemu | Emulator::Ovmf(_) => {
            let dir = ctx.fresh_dir(case.name)?;
            let uefi = match case.emulator {
                Emulator::Ovmf(esp) => {
                    let linux = linux.ok_or("the Linux assets were not built")?;
                    let inputs = EspInputs {
                        efi: images.efi.clone(),
                        kernel: linux.kernel.clone(),
                        initrd: linux.initrd.clone(),
                    };
                    Some(esp::build(&dir.join("esp"), esp, case.hv_args, &inputs)?)
                }
                _ => None,
            };
            let opts = QemuOpts {
                mem_mb: case.mem_mb,
                timeout: case.timeout(),
                smp: case.smp,
                machine: Some(case.machine.to_string()),
                drives: match case.disk {
                    Some(Disk::BootSectorVirtio) => Vec::new(),
                    _ => disk.iter().cloned().collect(),
                },
                // virtio-blk rather than IDE: SeaBIOS reaches it from
                // INT 13h only through SMM.
                extra: match (case.disk, &disk) {
                    (Some(Disk::BootSectorVirtio), Some(path)) => vec![
                        "-drive".to_string(),
                        format!("{},if=virtio", emu::raw_drive(path)),
                    ],
                    _ => Vec::new(),
                }
                .into_iter()
                .chain(case.qemu_args.iter().map(|a| a.to_string()))
                .collect(),
                // Linux's boot time to its init, for comparison with bare
                // QEMU (`cargo xtask linux --bare`).
                time_line: case.needs_linux().then(|| linux::MARKER.to_string()),
                uefi,
                ..QemuOpts::default()
            };
            let outcome = emu::run_qemu(&dir, &boot, &opts)?;
            if let Some(reason) = &outcome.stopped {
                problems.push(reason.clone());
            } else if let (Some(status), Some(code)) = (&outcome.status, case.exit) {
                if status.code() != Some(thinvisor_abi::exit_code::qemu_status(code)) {
                    problems.push(format!(
                        "{}; expected {}",
                        emu::describe_qemu_status(status),
                        emu::describe_exit_code(code)
                    ));
                }
            }
            outcome
        }
        Emulator::Bochs { model } => {
            if !matches!(case.disk, None | Some(Disk::BootSector)) {
                return Err(format!(
                    "{}: Bochs cases take only the boot-sector disk (the runner boots a GRUB \
                     CD, the disk as ata0-master)",
                    case.name
                ));
            }
            let opts = BochsOpts {
                mem_mb: case.mem_mb,
                timeout: case.timeout(),
                disk,
                cpus: case.smp,
                ..BochsOpts::new(model)
            };
            let outcome = emu::run_bochs(ctx, case.name, &boot, &opts)?;
            if let Some(reason) = &outcome.stopped {
                problems.push(reason.clone());
            }
            outcome
        }
    };
    problems.extend(case.check_serial(&outcome.serial));
    if !problems.is_empty() && outcome.stopped.is_none() {
        if let Some(message) = outcome.bochs_exit_message() {
            if !message.contains("shutdown requested") {
                problems.push(format!("Bochs said: {message}"));
            }
        }
    }
    Ok((outcome, problems))
}

fn integration(
    ctx: &Ctx,
    images: &Images,
    linux: Option<&LinuxAssets>,
    case: &Case,
    tally: &mut Tally,
) {
    print!("integration {} ... ", case.name);
    let _ = io::stdout().flush();
    let start = Instant::now();
    match run_case(ctx, images, linux, case) {
        Ok((outcome, problems)) if problems.is_empty() => {
            println!(
                "ok ({}{})",
                util::secs(start.elapsed()),
                line_time(&outcome)
            );
            tally.pass();
        }
        Ok((outcome, problems)) => {
            println!(
                "FAILED: {} ({}{})",
                problems.join("; "),
                util::secs(start.elapsed()),
                line_time(&outcome)
            );
            show_logs(ctx, &outcome);
            tally.fail(format!("integration {}", case.name));
        }
        Err(e) => {
            println!("FAILED: could not run: {e}");
            tally.fail(format!("integration {}", case.name));
        }
    }
}

/// `; marker line after N s` when the run timed a line and saw it.
fn line_time(outcome: &Outcome) -> String {
    outcome
        .line_at
        .map(|t| format!("; marker line after {}", util::secs(t)))
        .unwrap_or_default()
}

fn show_logs(ctx: &Ctx, outcome: &Outcome) {
    let serial = outcome.dir.join("serial.log");
    let lines = util::tail(&outcome.serial, TAIL_LINES);
    if lines.iter().all(|l| l.trim().is_empty()) {
        println!("    ({} is empty)", ctx.show(&serial));
        let output = outcome.emulator_text();
        let lines = util::tail(&output, 15);
        if !lines.is_empty() {
            println!(
                "    --- last lines of {} ---",
                ctx.show(&outcome.emulator_output)
            );
            for line in lines {
                println!("    | {line}");
            }
        }
    } else {
        println!(
            "    --- last {TAIL_LINES} lines of {} ---",
            ctx.show(&serial)
        );
        for line in lines {
            println!("    | {line}");
        }
    }
    println!("    (logs in {})", ctx.show(&outcome.dir));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_test_results() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            ),
            Some((12, 0))
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured"),
            Some((3, 2))
        );
        assert_eq!(parse_test_result("test foo ... ok"), None);
    }

    #[test]
    fn parses_options() {
        let args: Vec<String> = ["--filter", "qemu", "--no-host", "--keep-going", "--pending"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let opts = parse(&args).unwrap();
        assert_eq!(opts.filter.as_deref(), Some("qemu"));
        assert!(!opts.host && opts.pending);
        assert!(parse(&["--bogus".to_string()]).is_err());
    }
}

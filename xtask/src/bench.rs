//! `cargo xtask bench`: the exit round trips (below, `exits`), the Linux
//! figures (bench_linux.rs), and the guest-memory copy benchmark of issue 4, bulk
//! copies of 4 KiB, 64 KiB and 1 MiB out of guest-linear memory (4-level
//! paging, scattered 4 KiB pages) by three methods: page by page
//! (`read_linear`), per byte (a walk per byte, BitVisor's method) and
//! plain memcpy of contiguous host memory.
//!
//! Two figures per copy, from the same build and run: wall time (the bench
//! binary's own harness, crates/memory/benches/copy.rs: calibration,
//! warm-up, 31 samples, median and range) and, when valgrind is there,
//! instructions counted by callgrind in just the measured copy. The
//! instruction count is the repeatable one: this machine is shared and
//! has two cores, so wall times move from run to run.

use std::fs;
use std::process::{Command, ExitCode, Stdio};

use crate::util::{self, Context, Ctx, Result};

const USAGE: &str =
    "usage: cargo xtask bench [--quick | --exits-only | --copy-only | --linux-only] \
[--no-valgrind] [--write-baseline WHY]
  --quick           only the exit round trips on both vendors (no copy bench, no Linux),
                    then the regression gate against bench/baseline.json
  --linux-only      only the Linux figures (boots of Debian's kernel on QEMU, about 2 min)
  --write-baseline  write this run's per-exit figures to bench/baseline.json, with WHY
Writes target/bench/{results.json,report.md,exits.svg,linux-exits.svg}; fails when a
per-exit figure regresses by more than 10% against bench/baseline.json.";

use crate::report::{self, BITVISOR_CPUID_EXIT, BITVISOR_LOOKUP};

/// One `BENCH name iterations=N ticks=T baseline=B` line of the test
/// guest's bench mode.
#[derive(Debug, Clone, PartialEq)]
struct ExitBench {
    name: String,
    iterations: u64,
    ticks: u64,
    baseline: u64,
}

impl ExitBench {
    /// Instructions per round trip: the loop with the exiting instruction
    /// minus the same loop with a NOP in its place.
    fn per_op(&self) -> f64 {
        (self.ticks as f64 - self.baseline as f64) / self.iterations as f64
    }
}

fn parse_exit_bench(line: &str) -> Option<ExitBench> {
    let mut w = line.split_whitespace();
    if w.next()? != "BENCH" {
        return None;
    }
    let name = w.next()?.to_string();
    let mut field = |key: &str| -> Option<u64> {
        let (k, v) = w.next()?.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    };
    let iterations = field("iterations")?;
    let ticks = field("ticks")?;
    let baseline = field("baseline").unwrap_or(0);
    Some(ExitBench {
        name,
        iterations,
        ticks,
        baseline,
    })
}

/// thinvisor with the test guest in bench mode (also what `cargo xtask
/// profile` traces).
pub fn bench_boot(images: &crate::images::Images) -> crate::emu::Boot {
    crate::emu::Boot {
        kernel: crate::images::Kernel::Thinvisor,
        kernel32: images.hv32.clone(),
        kernel64: images.hv.clone(),
        args: "log=warn".into(),
        modules: vec![crate::images::Module::new(
            images.guest.clone(),
            "test-guest.elf bench",
        )],
    }
}

/// Boots thinvisor with the test guest in bench mode on both vendors and
/// prints the instructions per exit round trip, against BitVisor's
/// figures. Both emulators advance the guest's TSC by one per executed
/// instruction here: QEMU under `-icount shift=0`, Bochs with
/// `clock: sync=none`; the guest's calibration loop checks it.
fn exits(ctx: &Ctx, images: &crate::images::Images) -> Result<Exits> {
    let boot = bench_boot(images);
    println!("measuring exit round trips on AMD SVM (QEMU -icount shift=0) ...");
    let dir = ctx.fresh_dir("bench-exits-svm")?;
    let opts = crate::emu::QemuOpts {
        extra: vec!["-icount".into(), "shift=0".into()],
        timeout: std::time::Duration::from_secs(120),
        ..crate::emu::QemuOpts::default()
    };
    let svm = crate::emu::run_qemu(&dir, &boot, &opts)?;
    println!("measuring exit round trips on Intel VT-x (Bochs corei7_skylake_x) ...");
    let bochs = crate::emu::BochsOpts::new("corei7_skylake_x");
    let vmx = crate::emu::run_bochs(ctx, "bench-exits-vmx", &boot, &bochs)?;
    let bochs_version =
        report::bochs_version(&fs::read_to_string(vmx.dir.join("bochs.log")).unwrap_or_default());
    let svm = exit_benches(&svm.serial, "QEMU")?;
    let vmx = exit_benches(&vmx.serial, "Bochs")?;
    println!(
        "\ninstructions per round trip (loop minus the same loop with a NOP; \
         calibration 1.000 tick/instruction):"
    );
    println!("  {:<24} {:>9} {:>9}", "", "SVM", "VT-x");
    for b in &svm {
        let intel = vmx
            .iter()
            .find(|v| v.name == b.name)
            .map_or("-".into(), |v| format!("{:.1}", v.per_op()));
        let anchor = match b.name.as_str() {
            "cpuid_exit" => Some(BITVISOR_CPUID_EXIT),
            "lookup_dbgsh" => Some(BITVISOR_LOOKUP),
            _ => None,
        };
        let vs = anchor.map_or(String::new(), |a| {
            format!("  (BitVisor on SVM {a:.0}: {:.1}x fewer)", a / b.per_op())
        });
        println!("  {:<24} {:>9.1} {intel:>9}{vs}", b.name, b.per_op());
    }
    let per_op = |list: &[ExitBench]| list.iter().map(|b| (b.name.clone(), b.per_op())).collect();
    Ok(Exits {
        svm: per_op(&svm),
        vmx: per_op(&vmx),
        bochs: bochs_version,
    })
}

/// What [`exits`] measured: instructions per round trip by loop name.
struct Exits {
    svm: Vec<(String, f64)>,
    vmx: Vec<(String, f64)>,
    bochs: Option<String>,
}

/// The measurements in a bench run's serial log, after checking that its
/// TSC counted instructions.
fn exit_benches(serial: &str, what: &str) -> Result<Vec<ExitBench>> {
    let lines: Vec<ExitBench> = serial.lines().filter_map(parse_exit_bench).collect();
    let calibration = lines
        .iter()
        .find(|b| b.name == "calibration")
        .ok_or_else(|| format!("{what}: the bench guest printed no calibration"))?;
    // The calibration loop runs 2 instructions per iteration.
    let per_instruction = calibration.ticks as f64 / (2 * calibration.iterations) as f64;
    if (per_instruction - 1.0).abs() > 0.01 {
        return Err(format!(
            "{what}: {per_instruction:.3} TSC ticks per instruction: the TSC does not count instructions"
        ));
    }
    Ok(lines
        .into_iter()
        .filter(|b| b.name != "calibration")
        .collect())
}

/// Methods, as the bench binary names them, and how to show them.
const METHODS: [(&str, &str); 3] = [
    ("page", "page-by-page"),
    ("byte", "per-byte walk"),
    ("memcpy", "memcpy"),
];

/// valgrind counts every iteration of `rep movsb` as one instruction, so
/// glibc's ERMS path for large memcpys would read as one instruction per
/// byte. Under callgrind, copies of any size therefore use glibc's vector
/// loop, the same one the page-by-page method uses for each page.
const NO_REP_MOVSB: &str = "glibc.cpu.x86_rep_movsb_threshold=1073741824";

/// One `time` line of the bench binary.
#[derive(Debug, Clone, PartialEq)]
struct Timing {
    method: String,
    size: u64,
    median_ns: f64,
    min_ns: f64,
    max_ns: f64,
}

/// `time METHOD SIZE MEDIAN MIN MAX SAMPLES ITERS`.
fn parse_timing(line: &str) -> Option<Timing> {
    let mut w = line.split_whitespace();
    if w.next()? != "time" {
        return None;
    }
    Some(Timing {
        method: w.next()?.to_string(),
        size: w.next()?.parse().ok()?,
        median_ns: w.next()?.parse().ok()?,
        min_ns: w.next()?.parse().ok()?,
        max_ns: w.next()?.parse().ok()?,
    })
}

/// The `executable` of the bench target `copy` in cargo's JSON messages.
fn find_executable(json: &str) -> Option<String> {
    json.lines()
        .filter(|l| {
            l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"name\":\"copy\"")
        })
        .find_map(|l| {
            let rest = &l[l.find("\"executable\":\"")? + "\"executable\":\"".len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
}

/// Builds the bench binary (release profile) and returns its path.
fn build(ctx: &Ctx) -> Result<String> {
    let mut cmd = ctx.cargo();
    cmd.args([
        "bench",
        "-p",
        "thinvisor-memory",
        "--features",
        "testing",
        "--bench",
        "copy",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .stderr(Stdio::inherit());
    eprintln!("$ {}", util::describe(&cmd));
    let out = cmd.output().context("cannot run cargo bench")?;
    if !out.status.success() {
        return Err(format!("building the benchmark failed ({})", out.status));
    }
    find_executable(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| "cargo did not name the benchmark's executable".into())
}

/// Instructions callgrind counted in `bench_measured_copy` for one copy.
fn instructions(ctx: &Ctx, exe: &str, method: &str, size: u64) -> Result<u64> {
    let dir = ctx.work().join("bench");
    fs::create_dir_all(&dir).context(format_args!("creating {}", dir.display()))?;
    let out_file = dir.join(format!("callgrind.{method}.{size}.out"));
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg("--toggle-collect=bench_measured_copy")
        .args([exe, "once", method, &size.to_string()])
        .env("GLIBC_TUNABLES", NO_REP_MOVSB);
    util::run_captured(&mut cmd)?;
    let text =
        fs::read_to_string(&out_file).context(format_args!("reading {}", out_file.display()))?;
    parse_totals(&text).ok_or_else(|| format!("no totals in {}", ctx.show(&out_file)))
}

/// The `totals:` (or `summary:`) line of a callgrind output file.
fn parse_totals(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l
            .strip_prefix("totals:")
            .or_else(|| l.strip_prefix("summary:"))?;
        v.split_whitespace().next()?.parse().ok()
    })
}

fn show_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

fn show_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// 1234567 -> "1,234,567".
fn show_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.1}x", a / b)
    } else {
        "-".into()
    }
}

/// What to run, from the command line.
#[derive(Debug, Clone, PartialEq, Default)]
struct Opts {
    exits: bool,
    copy: bool,
    /// The Linux boots (bench_linux.rs).
    linux: bool,
    valgrind: bool,
    quick: bool,
    write_baseline: Option<String>,
}

fn parse_args(args: &[String]) -> Result<Option<Opts>> {
    let mut o = Opts {
        exits: true,
        copy: true,
        linux: true,
        valgrind: true,
        ..Opts::default()
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--no-valgrind" => o.valgrind = false,
            "--exits-only" => {
                o.copy = false;
                o.linux = false;
            }
            "--copy-only" => {
                o.exits = false;
                o.linux = false;
            }
            "--linux-only" => {
                o.exits = false;
                o.copy = false;
            }
            "--quick" => {
                o.quick = true;
                o.copy = false;
                o.linux = false;
            }
            "--write-baseline" => {
                let why = args
                    .next()
                    .filter(|w| !w.trim().is_empty())
                    .ok_or("--write-baseline needs the reason (WHY)")?;
                o.write_baseline = Some(why.clone());
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown option `{other}`\n{USAGE}")),
        }
    }
    if !o.exits && !o.copy && !o.linux || o.quick && !o.exits {
        return Err(format!(
            "--quick, --exits-only, --copy-only and --linux-only exclude each other\n{USAGE}"
        ));
    }
    if o.write_baseline.is_some() && !o.exits {
        return Err("--write-baseline needs the exit round trips (not --copy-only)".into());
    }
    Ok(Some(o))
}

/// The command line that reproduces a run of these options.
fn command_line(o: &Opts) -> String {
    let mut c = String::from("cargo xtask bench");
    if o.quick {
        c += " --quick";
    } else {
        match (o.exits, o.copy, o.linux) {
            (true, false, false) => c += " --exits-only",
            (false, true, false) => c += " --copy-only",
            (false, false, true) => c += " --linux-only",
            _ => {}
        }
    }
    if o.copy && !o.valgrind {
        c += " --no-valgrind";
    }
    c
}

pub fn main(ctx: &Ctx, args: &[String]) -> Result<ExitCode> {
    let Some(opts) = parse_args(args)? else {
        println!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    };
    let images = if opts.exits || opts.linux {
        crate::setup::ensure(ctx)?;
        Some(crate::images::build(ctx)?)
    } else {
        None
    };
    let passed = run(ctx, &opts, images.as_ref())?;
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `cargo xtask bench --quick` on images already built, for `cargo xtask
/// test`: Ok(false) when the regression gate fails.
pub fn quick(ctx: &Ctx, images: &crate::images::Images) -> Result<bool> {
    let opts = parse_args(&["--quick".to_string()])?.ok_or("no options")?;
    run(ctx, &opts, Some(images))
}

/// Measures, writes target/bench/*, checks the gate: Ok(false) when a
/// per-exit figure regressed (or was not measured).
fn run(ctx: &Ctx, opts: &Opts, images: Option<&crate::images::Images>) -> Result<bool> {
    let mut measured = report::Measured::default();
    let mut info = report::RunInfo {
        command: command_line(opts),
        commit: commit(ctx),
        ..report::RunInfo::default()
    };
    if let (true, Some(images)) = (opts.exits, images) {
        let e = exits(ctx, images)?;
        measured.svm = Some(e.svm);
        measured.vmx = Some(e.vmx);
        info.bochs = e.bochs;
        info.qemu = qemu_version();
    }
    measured.linux = match (opts.linux, images) {
        (true, Some(images)) => Ok(crate::bench_linux::measure(ctx, images)?),
        _ => Err(format!(
            "not measured in this run (`{}`; `cargo xtask bench` measures it)",
            info.command
        )),
    };
    if opts.linux && info.qemu.is_none() {
        info.qemu = qemu_version();
    }
    measured.copy = if opts.copy {
        copy(ctx, opts.valgrind)?
    } else {
        Err(format!(
            "not measured in this run (`{}`; `cargo xtask bench` measures it)",
            info.command
        ))
    };
    let figures = report::figures(&measured);
    let gate = opts.exits.then(|| {
        let path = ctx.root.join(report::BASELINE);
        fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", report::BASELINE))
            .and_then(|text| {
                report::parse_baseline(&text).map_err(|e| format!("{}: {e}", report::BASELINE))
            })
            .map(|b| {
                let rows = report::gate(&b, &figures);
                (b, rows)
            })
    });

    let dir = ctx.out().join("bench");
    fs::create_dir_all(&dir).context(format_args!("creating {}", dir.display()))?;
    let json = dir.join("results.json");
    let linux = measured.linux.as_ref().ok();
    fs::write(&json, report::results_json(&info, &figures, linux))
        .context(format_args!("writing {}", json.display()))?;
    let md = dir.join("report.md");
    fs::write(
        &md,
        report::report_md(&info, &figures, linux, gate.as_ref()),
    )
    .context(format_args!("writing {}", md.display()))?;
    let svg = dir.join("exits.svg");
    let mut chart = if opts.exits {
        report::draw_exits_chart(&svg, &figures)?;
        format!(", {}", ctx.show(&svg))
    } else {
        String::new()
    };
    let linux_svg = dir.join("linux-exits.svg");
    if let Some(l) = linux {
        report::draw_linux_exits_chart(&linux_svg, &l.exits)?;
        chart += &format!(", {}", ctx.show(&linux_svg));
    } else {
        // An earlier run's chart would sit beside a report without its
        // figures.
        let _ = fs::remove_file(&linux_svg);
    }
    println!("\nwrote {}, {}{chart}", ctx.show(&json), ctx.show(&md));

    if let Some(why) = &opts.write_baseline {
        let path = ctx.root.join(report::BASELINE);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).context(format_args!("creating {}", parent.display()))?;
        }
        fs::write(&path, report::baseline_json(why, &info, &figures))
            .context(format_args!("writing {}", path.display()))?;
        println!("wrote {} (commit it, saying why)", report::BASELINE);
        return Ok(true);
    }
    match gate {
        None => Ok(true),
        Some(Err(e)) => {
            println!("regression gate: {e}");
            Ok(false)
        }
        Some(Ok((_, rows))) => {
            print!("\n{}", report::gate_text(&rows));
            let passed = report::gate_passed(&rows);
            println!(
                "regression gate {}",
                if passed { "passed" } else { "FAILED" }
            );
            Ok(passed)
        }
    }
}

/// The tree's revision, `-dirty` when it has uncommitted changes.
fn commit(ctx: &Ctx) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(&ctx.root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(rev) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(s) if !s.is_empty() => format!("{rev}-dirty"),
        _ => rev,
    }
}

/// The first line of `qemu-system-x86_64 --version`.
fn qemu_version() -> Option<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

/// The copy bench: prints its tables and returns the 64 KiB instruction
/// ratios (per-byte / page-by-page, page-by-page / memcpy), or why there
/// are none.
fn copy(ctx: &Ctx, mut valgrind: bool) -> Result<std::result::Result<(f64, f64), String>> {
    let exe = build(ctx)?;
    println!("timing every method and size (about 10 s) ...");
    let out = util::run_captured(&mut Command::new(&exe))?;
    let timings: Vec<Timing> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(parse_timing)
        .collect();
    let mut sizes: Vec<u64> = timings.iter().map(|t| t.size).collect();
    sizes.dedup();
    if sizes.is_empty() {
        return Err("the benchmark printed no timings".into());
    }

    if valgrind && util::which("valgrind").is_none() {
        println!("valgrind not found: no instruction counts (apt-get install valgrind)");
        valgrind = false;
    }
    let mut counts = Vec::new();
    if valgrind {
        println!("counting instructions with callgrind (about 10 s) ...");
        for &size in &sizes {
            for (method, _) in METHODS {
                counts.push(((method, size), instructions(ctx, &exe, method, size)?));
            }
        }
    }

    let time = |method: &str, size| {
        timings
            .iter()
            .find(|t| t.method == method && t.size == size)
    };
    let count = |method: &str, size| {
        counts
            .iter()
            .find(|((m, s), _)| *m == method && *s == size)
            .map(|(_, n)| *n)
    };
    println!(
        "\nbulk copy out of guest-linear memory (4-level paging, scattered 4 KiB pages)\n\
         time per copy: median of 31 samples [min .. max]; instructions per copy: callgrind"
    );
    for &size in &sizes {
        println!("\n{}:", show_size(size));
        for (method, label) in METHODS {
            let t = time(method, size).map_or("-".into(), |t| {
                format!(
                    "{:>10} [{} .. {}]",
                    show_ns(t.median_ns),
                    show_ns(t.min_ns),
                    show_ns(t.max_ns)
                )
            });
            let n = count(method, size).map_or("-".into(), show_count);
            println!("  {label:<14} {t:<36} {n:>14} instructions");
        }
        let median = |m| time(m, size).map_or(0.0, |t| t.median_ns);
        let ins = |m| count(m, size).map_or(0.0, |n| n as f64);
        let mut line = format!(
            "  per-byte / page-by-page: {} time",
            ratio(median("byte"), median("page"))
        );
        if valgrind {
            line += &format!(", {} instructions", ratio(ins("byte"), ins("page")));
        }
        line += &format!(
            "; page-by-page / memcpy: {} time",
            ratio(median("page"), median("memcpy"))
        );
        if valgrind {
            line += &format!(", {} instructions", ratio(ins("page"), ins("memcpy")));
        }
        println!("{line}");
    }
    if !valgrind {
        return Ok(Err(
            "no instruction counts (`--no-valgrind` or no valgrind)".into(),
        ));
    }
    let size = 64 << 10;
    let ins = |m| count(m, size).map_or(0.0, |n| n as f64);
    if ins("page") == 0.0 || ins("memcpy") == 0.0 {
        return Ok(Err("the copy bench measured no 64 KiB copy".into()));
    }
    Ok(Ok((ins("byte") / ins("page"), ins("page") / ins("memcpy"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exit_bench_lines() {
        let b = parse_exit_bench("BENCH cpuid_exit iterations=10000 ticks=1580010 baseline=50012")
            .unwrap();
        assert_eq!(b.name, "cpuid_exit");
        assert!((b.per_op() - 152.9998).abs() < 1e-3);
        assert_eq!(
            parse_exit_bench(
                "BENCH calibration iterations=100000 ticks=200006 instructions=200000"
            )
            .map(|b| b.baseline),
            Some(0)
        );
        assert_eq!(parse_exit_bench("PASS x"), None);
        assert_eq!(parse_exit_bench("BENCH x iterations=zz ticks=1"), None);
    }

    #[test]
    fn parses_options() {
        let parse = |a: &[&str]| {
            let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            parse_args(&a)
        };
        let quick = parse(&["--quick"]).unwrap().unwrap();
        assert!(quick.quick && quick.exits && !quick.copy);
        assert_eq!(command_line(&quick), "cargo xtask bench --quick");
        let all = parse(&[]).unwrap().unwrap();
        assert!(all.exits && all.copy);
        assert_eq!(command_line(&all), "cargo xtask bench");
        let copy = parse(&["--copy-only", "--no-valgrind"]).unwrap().unwrap();
        assert_eq!(
            command_line(&copy),
            "cargo xtask bench --copy-only --no-valgrind"
        );
        let exits = parse(&["--exits-only"]).unwrap().unwrap();
        assert_eq!(command_line(&exits), "cargo xtask bench --exits-only");
        let write = parse(&["--quick", "--write-baseline", "faster CPUID"]).unwrap();
        assert_eq!(
            write.unwrap().write_baseline.as_deref(),
            Some("faster CPUID")
        );
        assert!(parse(&["--write-baseline"]).is_err());
        assert!(parse(&["--write-baseline", " "]).is_err());
        assert!(parse(&["--copy-only", "--write-baseline", "x"]).is_err());
        assert!(parse(&["--copy-only", "--quick"]).is_err());
        assert!(parse(&["--linux-only", "--quick"]).is_err());
        assert!(parse(&["--linux-only", "--copy-only"]).is_err());
        assert!(!quick.linux && !exits.linux && !copy.linux && all.linux);
        let linux = parse(&["--linux-only"]).unwrap().unwrap();
        assert!(linux.linux && !linux.exits && !linux.copy);
        assert_eq!(command_line(&linux), "cargo xtask bench --linux-only");
        assert!(parse(&["--fast"]).is_err());
        assert_eq!(parse(&["--help"]).unwrap(), None);
    }

    #[test]
    fn parses_bench_output() {
        assert_eq!(
            parse_timing("time page 4096 63.6 63.2 64.5 31 131072"),
            Some(Timing {
                method: "page".into(),
                size: 4096,
                median_ns: 63.6,
                min_ns: 63.2,
                max_ns: 64.5,
            })
        );
        assert_eq!(parse_timing("Running benches/copy.rs"), None);
        assert_eq!(
            parse_totals("events: Ir\nsummary: 1087\ntotals: 1087\n"),
            Some(1087)
        );
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["bench"],"name":"copy"},"executable":"/t/release/deps/copy-abc"}"#;
        assert_eq!(
            find_executable(json).as_deref(),
            Some("/t/release/deps/copy-abc")
        );
        assert_eq!(show_count(1234567), "1,234,567");
        assert_eq!(show_count(457), "457");
        assert_eq!(show_size(65536), "64 KiB");
        assert_eq!(ratio(3.0, 2.0), "1.5x");
    }
}

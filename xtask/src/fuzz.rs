//! `cargo xtask fuzz`: builds and runs the libFuzzer targets in `fuzz/`:
//! thinvisor-memory's page-table walker and copies, the VMM-call
//! dispatcher and its services on a fake vCPU, the debug shell, every
//! parser of boot input (bzImage, multiboot kernels and information, the
//! command line, the E820 map, ACPI) and thinvisor-iommu's DMAR and IVRS
//! parsers. `cargo xtask test` builds them and runs each for a few seconds
//! ([`smoke`]).
//!
//! The targets are built with plain `cargo build` and the instrumentation
//! flags cargo-fuzz passes for `--sanitizer none`, all of which stable
//! rustc accepts: only AddressSanitizer (`-Zsanitizer`) needs nightly, and
//! the code under test is safe Rust, so it adds little. CI machines have
//! one stable toolchain and no cargo-fuzz, so this needs neither; `fuzz/`
//! keeps the cargo-fuzz layout, so `cargo +nightly fuzz run walker` works
//! too where both are installed.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use crate::util::{self, Context, Ctx, Result};

/// The targets, as named in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "walker",
    "copy",
    "vmmcall",
    "dbgsh",
    "bzimage",
    "multiboot",
    "bootinfo",
    "cmdline",
    "e820",
    "acpi",
    "dmar",
    "ivrs",
];

/// Seconds `cargo xtask test` runs each target (all of them in about 50 s).
pub const SMOKE_SECONDS: u64 = 4;

const DEFAULT_SECONDS: u64 = 60;

const USAGE: &str = "\
usage: cargo xtask fuzz [TARGET] [--seconds N] [-- LIBFUZZER_ARGS...]

Runs TARGET (walker, copy, vmmcall, dbgsh, bzimage, multiboot, bootinfo,
cmdline, e820, acpi, dmar or ivrs; default: each in turn) for N seconds
(default 60) with the corpus in fuzz/corpus/TARGET; crashes are written to
fuzz/artifacts/TARGET/. The last line of each run is libFuzzer's final
statistics (`Done N runs in S second(s)`).";

/// cargo-fuzz's coverage flags (`cargo fuzz build --sanitizer none`), with
/// debug assertions and overflow checks on, as it does.
const RUSTFLAGS: &[&str] = &[
    "--cfg",
    "fuzzing",
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

fn fuzz_dir(ctx: &Ctx) -> PathBuf {
    ctx.root.join("fuzz")
}

/// Where cargo puts the fuzz crate's artifacts: beside the workspace's
/// (CARGO_TARGET_DIR or target/), in `fuzz/`, since the fuzz crate is a
/// workspace of its own and must not share a lock file or flags with it.
fn target_dir(ctx: &Ctx) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ctx.out())
        .join("fuzz")
}

/// The host triple. Building for an explicit `--target` keeps RUSTFLAGS
/// away from build scripts (libfuzzer-sys has one), as cargo-fuzz does.
fn host_triple(ctx: &Ctx) -> Result<String> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = util::run_captured(Command::new(rustc).current_dir(&ctx.root).arg("-vV"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_string())
        .ok_or_else(|| "`rustc -vV` printed no host line".to_string())
}

/// Builds every fuzz target; returns the directory holding the binaries.
pub fn build(ctx: &Ctx) -> Result<PathBuf> {
    let host = host_triple(ctx)?;
    let target_dir = target_dir(ctx);
    let mut cmd = ctx.cargo();
    cmd.args(["build", "--release", "--bins", "--manifest-path"])
        .arg(fuzz_dir(ctx).join("Cargo.toml"))
        .args(["--target", &host, "--target-dir"])
        .arg(&target_dir)
        .env("RUSTFLAGS", RUSTFLAGS.join(" "))
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        // Symbols and lines in crash backtraces.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "true");
    util::run(&mut cmd)?;
    Ok(target_dir.join(host).join("release"))
}

#[derive(Debug, PartialEq)]
struct Options {
    targets: Vec<String>,
    seconds: u64,
    extra: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        targets: Vec::new(),
        seconds: DEFAULT_SECONDS,
        extra: Vec::new(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args.next().ok_or("--seconds needs a value")?;
                opts.seconds = value
                    .parse()
                    .map_err(|_| format!("--seconds: `{value}` is not a number"))?;
            }
            s if s.starts_with("--seconds=") => {
                let value = &s["--seconds=".len()..];
                opts.seconds = value
                    .parse()
                    .map_err(|_| format!("--seconds: `{value}` is not a number"))?;
            }
            "--" => opts.extra.extend(args.by_ref().cloned()),
            "-h" | "--help" => return Err(USAGE.into()),
            t if TARGETS.contains(&t) => opts.targets.push(t.to_string()),
            other => return Err(format!("unknown target or option `{other}`\n\n{USAGE}")),
        }
    }
    if opts.targets.is_empty() {
        opts.targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    Ok(opts)
}

/// Runs every target for [`SMOKE_SECONDS`] from its corpus (grown in
/// `fuzz/corpus/`, which git ignores): the smoke test of `cargo xtask
/// test`. Ok(names and executions) or the first failure.
pub fn smoke(ctx: &Ctx, bins: &std::path::Path) -> Result<Vec<(String, u64)>> {
    let dir = fuzz_dir(ctx);
    let mut done = Vec::new();
    for target in TARGETS {
        let corpus = dir.join("corpus").join(target);
        let artifacts = dir.join("artifacts").join(target);
        for d in [&corpus, &artifacts] {
            fs::create_dir_all(d).context(format_args!("creating {}", d.display()))?;
        }
        let out = util::run_captured(
            Command::new(bins.join(target))
                .current_dir(&ctx.root)
                .arg(&corpus)
                .arg(format!("-max_total_time={SMOKE_SECONDS}"))
                // A fixed seed: on a fresh machine (empty corpus) the smoke
                // replays the same inputs everywhere, as many as its time
                // allows, so CI fails only on what a longer run with this
                // seed (`cargo xtask fuzz T -- -seed=1`) finds first.
                .arg("-seed=1")
                .arg(format!("-artifact_prefix={}/", artifacts.display())),
        )
        .map_err(|e| {
            format!(
                "fuzz target {target}: {e}\nthe failing input is in {}",
                ctx.show(&artifacts)
            )
        })?;
        let text = String::from_utf8_lossy(&out.stderr);
        let runs = executions(&text)
            .ok_or_else(|| format!("fuzz target {target}: no final statistics line"))?;
        done.push((target.to_string(), runs));
    }
    Ok(done)
}

/// The executions of libFuzzer's final line, `Done N runs in S second(s)`.
pub fn executions(stderr: &str) -> Option<u64> {
    stderr.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix("Done ")?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

pub fn main(ctx: &Ctx, args: &[String]) -> Result<ExitCode> {
    let opts = parse(args)?;
    let bins = build(ctx)?;
    let dir = fuzz_dir(ctx);
    for target in &opts.targets {
        let corpus = dir.join("corpus").join(target);
        let artifacts = dir.join("artifacts").join(target);
        for d in [&corpus, &artifacts] {
            fs::create_dir_all(d).context(format_args!("creating {}", d.display()))?;
        }
        println!("\n==> fuzz {target} for {} s", opts.seconds);
        let mut cmd = Command::new(bins.join(target));
        cmd.current_dir(&ctx.root)
            .arg(&corpus)
            .arg(format!("-max_total_time={}", opts.seconds))
            // libFuzzer wants a prefix, not a directory: keep the slash.
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args(&opts.extra);
        util::run(&mut cmd).map_err(|e| {
            format!(
                "{e}\nthe failing input is in {}; rerun it with `{} <file>`",
                ctx.show(&artifacts),
                ctx.show(&bins.join(target))
            )
        })?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_options() {
        let o = parse(&args(&[])).unwrap();
        assert_eq!(o.targets, args(TARGETS));
        assert_eq!(o.seconds, DEFAULT_SECONDS);
        let o = parse(&args(&["copy", "--seconds", "5", "--", "-jobs=2"])).unwrap();
        assert_eq!(o.targets, args(&["copy"]));
        assert_eq!(o.seconds, 5);
        assert_eq!(o.extra, args(&["-jobs=2"]));
        assert_eq!(parse(&args(&["--seconds=7"])).unwrap().seconds, 7);
        assert!(parse(&args(&["nosuch"])).is_err());
        for t in TARGETS {
            assert_eq!(parse(&args(&[t])).unwrap().targets, args(&[t]));
        }
        assert!(parse(&args(&["--seconds", "x"])).is_err());
    }

    #[test]
    fn final_statistics() {
        let log = "#1024\tpulse  cov: 10\nDone 123456 runs in 4 second(s)\nstat::number_of_executed_units: 123456\n";
        assert_eq!(executions(log), Some(123456));
        assert_eq!(executions("no stats"), None);
    }

    #[test]
    fn every_target_is_a_bin() {
        let manifest = include_str!("../../fuzz/Cargo.toml");
        for t in TARGETS {
            assert!(manifest.contains(&format!("name = \"{t}\"")), "{t}");
        }
    }
}

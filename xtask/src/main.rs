//! `cargo xtask`: the one driver for building, running and testing
//! thinvisor. See `cargo xtask help`.

mod bench;
mod bench_linux;
mod bootsector;
mod cases;
mod cpio;
mod debian;
mod disk;
mod emu;
mod esp;
mod fuzz;
mod images;
mod linux;
mod profile;
mod report;
mod run;
mod selftest;
mod setup;
mod test;
mod util;

use std::env;
use std::process::ExitCode;

use util::Ctx;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  build      install missing host tools (apt, as root), build the hypervisor and the
             test guest, write target/images/{thinvisor,thinvisor32,test-guest,
             test-guest32}.elf and thinvisor.iso
  run        build, then boot the demo in QEMU (or Bochs) with its output on the
             terminal; `cargo xtask run --help` for options
  test       everything: fmt, host unit tests, clippy, images, integration cases in
             QEMU and Bochs, the bench regression gate; ends with `N passed, M failed`
             options: --filter SUBSTR (integration cases; no gate), --no-host (skip fmt,
             unit tests, clippy), --no-bench (skip the gate), --list (print the
             integration cases), --pending (also the cases waiting for unfinished
             features, e.g. booting Linux)
  fuzz       run the fuzz targets of thinvisor-memory (fuzz/) for a while:
             cargo xtask fuzz [walker|copy] [--seconds N] (default 60 s each)
  bench      exit round trips in instructions (SVM under QEMU -icount, VT-x under
             Bochs), the guest-memory copy benchmark and the Linux figures (boot ratio
             and user-program exit loops in instructions, exit table, memory reserved);
             writes target/bench/{results.json,report.md,exits.svg,linux-exits.svg};
             fails when a per-exit figure regresses by more than 10% against
             bench/baseline.json. --quick: exits only (~10 s);
             `cargo xtask bench --help` for options
  profile    one exit round trip of a bench loop, instruction by instruction, on SVM
             (QEMU -singlestep -d exec over thinvisor's code): cargo xtask profile
             [LOOP] [--listing]; default loop lookup_dbgsh
  linux      fetch Debian's kernel and busybox, build the initramfs (and a SYSLINUX boot
             disk), boot them on bare QEMU or under thinvisor and time the boot:
             cargo xtask linux [--bare] [--disk] [--smp N]; `--help` for options
  selftest   check the emulator runners with a tiny multiboot kernel (no hypervisor)
  setup      only install/check the host tools and the Rust target

Everything is written below target/ (images in target/images, runs and logs in
target/xtask/<case>/).";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let ctx = Ctx::new();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match command {
        "build" => setup::ensure(&ctx)
            .and_then(|()| images::build(&ctx))
            .map(|_| ExitCode::SUCCESS),
        "run" => run::main(&ctx, rest),
        "test" => return test::main(&ctx, rest),
        "selftest" => selftest::main(&ctx),
        "linux" => linux::main(&ctx, rest),
        "fuzz" => fuzz::main(&ctx, rest),
        "bench" => bench::main(&ctx, rest),
        "profile" => profile::main(&ctx, rest),
        "setup" => setup::ensure(&ctx).map(|()| ExitCode::SUCCESS),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

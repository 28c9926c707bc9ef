//! `cargo xtask run`: build, then boot the demo (the hypervisor with the
//! test guest) with its output live on the terminal.

use std::process::ExitCode;
use std::time::Duration;

use thinvisor_abi::exit_code;

use crate::emu::{self, BochsOpts, Boot, QemuOpts};
use crate::images::{self, Module};
use crate::setup;
use crate::util::{self, Ctx, Result};

const USAGE: &str = "\
usage: cargo xtask run [--bochs MODEL] [--module \"FILE ARGS\"]... [--timeout SECS] [-- HV_ARGS...]
  --bochs MODEL    boot a GRUB ISO in Bochs with this CPU model (ryzen, corei7_skylake_x, ...)
                   instead of QEMU -kernel
  --module STRING  a module: FILE (in target/images) and its arguments; repeatable;
                   default \"test-guest.elf checks\"
  --timeout SECS   wall-clock limit (default 60 for QEMU, 180 for Bochs)
  HV_ARGS          the hypervisor's command line (default log=info)
Exits 0 when the test guest reports that all its checks passed.";

#[derive(Debug, Default)]
struct Options {
    bochs: Option<String>,
    modules: Vec<String>,
    timeout: Option<u64>,
    hv_args: Vec<String>,
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
            "--bochs" => opts.bochs = Some(value("--bochs")?),
            "--module" => opts.modules.push(value("--module")?),
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
    Ok(opts)
}

pub fn main(ctx: &Ctx, args: &[String]) -> Result<ExitCode> {
    let opts = parse(args)?;
    setup::ensure(ctx)?;
    let images = images::build(ctx)?;
    let hv_args = if opts.hv_args.is_empty() {
        "log=info".to_string()
    } else {
        opts.hv_args.join(" ")
    };
    let module_strings = if opts.modules.is_empty() {
        vec!["test-guest.elf checks".to_string()]
    } else {
        opts.modules
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
        kernel32: images.hv32.clone(),
        kernel64: images.hv.clone(),
        args: hv_args,
        modules,
    };

    match opts.bochs {
        None => {
            let dir = ctx.fresh_dir("run")?;
            let timeout = Duration::from_secs(opts.timeout.unwrap_or(60));
            let qemu = QemuOpts {
                timeout,
                interactive: true,
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
                timeout: Duration::from_secs(opts.timeout.unwrap_or(180)),
                follow: true,
                ..BochsOpts::new(&model)
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

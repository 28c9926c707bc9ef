//! `cargo xtask selftest`: checks the emulator runners themselves, without
//! the hypervisor, by booting a tiny multiboot1+2 kernel (`probe.S`) in
//! QEMU (`-kernel`) and in Bochs (GRUB ISO). When the integration tests
//! fail to boot anything, this tells whether the machinery works.

use std::fs;
use std::process::{Command, ExitCode};

use thinvisor_abi::exit_code;

use crate::emu::{self, BochsOpts, Boot, QemuOpts};
use crate::images::{Kernel, Module};
use crate::setup;
use crate::util::{self, Context, Ctx, Result};

const PROBE_SOURCE: &str = include_str!("probe.S");

/// Assembles and links the probe kernel (binutils `as` and `ld`).
fn build_probe(ctx: &Ctx) -> Result<Boot> {
    let dir = ctx.fresh_dir("selftest")?;
    let source = dir.join("probe.S");
    let object = dir.join("probe.o");
    let elf = dir.join("probe.elf");
    fs::write(&source, PROBE_SOURCE).context("writing probe.S")?;
    util::run_captured(
        Command::new("as")
            .arg("--32")
            .arg("-o")
            .arg(&object)
            .arg(&source),
    )?;
    util::run_captured(
        Command::new("ld")
            .args(["-m", "elf_i386", "-Ttext=0x100000", "-e", "_start"])
            .args(["-z", "max-page-size=0x1000", "-o"])
            .arg(&elf)
            .arg(&object),
    )?;
    let module = dir.join("probe-mod.txt");
    fs::write(&module, "hello\n").context("writing the probe module")?;
    Ok(Boot {
        kernel: Kernel::Thinvisor,
        kernel32: elf.clone(),
        kernel64: elf,
        args: "log=info probe=1".into(),
        modules: vec![
            Module::new(&module, "probe-mod.txt first a,b"),
            Module::new(&module, "second.txt"),
        ],
    })
}

fn expect(what: &str, serial: &str, needles: &[&str]) -> bool {
    let serial = util::strip_escapes(serial);
    let missing: Vec<&&str> = needles.iter().filter(|n| !serial.contains(**n)).collect();
    if missing.is_empty() {
        true
    } else {
        println!("{what}: FAILED: serial log lacks {missing:?}");
        for line in util::tail(&serial, 20) {
            println!("    | {line}");
        }
        false
    }
}

pub fn main(ctx: &Ctx) -> Result<ExitCode> {
    setup::ensure(ctx)?;
    let boot = build_probe(ctx)?;
    let mut ok = true;

    let dir = ctx.fresh_dir("selftest-qemu")?;
    let outcome = emu::run_qemu(&dir, &boot, &QemuOpts::default())?;
    let status = outcome.status.as_ref().map(emu::describe_qemu_status);
    println!(
        "qemu -kernel: {} in {}",
        status
            .as_deref()
            .or(outcome.stopped.as_deref())
            .unwrap_or("?"),
        util::secs(outcome.elapsed)
    );
    let passed = exit_code::qemu_status(exit_code::GUEST_PASSED);
    if outcome.status.and_then(|s| s.code()) != Some(passed) {
        println!("qemu -kernel: FAILED: expected status {passed}");
        ok = false;
    }
    ok &= expect(
        "qemu -kernel",
        &outcome.serial,
        &[
            "probe: multiboot1",
            "log=info probe=1",
            "module: probe-mod.txt first a,b\n",
            "module: second.txt\n",
            "probe: done",
        ],
    );

    for model in ["ryzen", "corei7_skylake_x"] {
        let outcome = emu::run_bochs(
            ctx,
            &format!("selftest-bochs-{model}"),
            &boot,
            &BochsOpts::new(model),
        )?;
        let what = format!("bochs {model} (GRUB ISO)");
        println!(
            "{what}: {} in {}",
            outcome
                .stopped
                .clone()
                .or_else(|| outcome.bochs_exit_message())
                .unwrap_or_else(|| "ended".into()),
            util::secs(outcome.elapsed)
        );
        ok &= expect(
            &what,
            &outcome.serial,
            &[
                "probe: multiboot2",
                "cmdline: log=info probe=1\n",
                "module: probe-mod.txt first a,b\n",
                "module: second.txt\n",
                "probe: done",
            ],
        );
    }
    println!("selftest {}", if ok { "passed" } else { "FAILED" });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

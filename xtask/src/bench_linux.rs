//! The Linux figures of `cargo xtask bench` (issue 11): Debian's kernel
//! and the test initramfs (`linux::build`) booted on QEMU, bare and under
//! thinvisor, with `thinvisor.bench=...` on the kernel's command line,
//! which makes `/init` a benchmark boot (see `linux::INIT_SCRIPT`):
//!
//! - the boot to the init marker in instructions: the guest's TSC right
//!   after the marker (`vmmbench: tsc T`) under `-icount shift=0`, where it
//!   counts one per executed instruction, bare and under thinvisor, the
//!   runs alternated, twice each (the second pair shows how reproducible
//!   the counts are);
//! - the user-program exit loops (`vmmbench: loop ...` lines) from the
//!   boots under thinvisor;
//! - thinvisor's block and its exit tables (its log: `thinvisor reserves N
//!   KiB at ...`, and `VM exits on CPU N: T in all` with a line per reason
//!   at the power-off) from a boot with 2 processors.
//!
//! QEMU 7.2's icount mode does not get Linux's second processor going
//! (the boot stops at `x86: Booting SMP configuration:`, bare or not, with
//! the second processor spinning in `cpu_init`, waiting for the boot
//! processor's go-ahead; `tsc=reliable` and `sleep=on` change nothing), so
//! the boots that count instructions run one processor and the 2-CPU boot
//! runs without icount; its figures are counts, not times.

use std::time::Duration;

use crate::emu::{self, Boot, QemuOpts};
use crate::images::{Images, Kernel, Module};
use crate::linux::{self, LinuxAssets};
use crate::report::{CpuExits, LinuxMeasured};
use crate::util::{Ctx, Result};

/// Runs of each icount boot (bare and under thinvisor, alternated).
const ROUNDS: usize = 2;
/// Processors of the icount boots (see the module's comment).
const ICOUNT_CPUS: u32 = 1;
/// QEMU's instruction counting: the guest's TSC (and every clock) advances
/// by one per instruction; `sleep=off` makes an idle processor jump to the
/// next timer instead of waiting in real time, so the count does not
/// depend on the host's speed (QEMU's documentation of `-icount`).
const ICOUNT: &str = "shift=0,sleep=off";

/// One `vmmbench: loop NAME iterations=N ticks=T nop_ticks=B batches=K`.
#[derive(Debug, Clone, PartialEq)]
pub struct UserLoop {
    pub name: String,
    pub iterations: u64,
    pub ticks: u64,
    pub nop_ticks: u64,
}

impl UserLoop {
    /// Ticks per whole loop iteration.
    pub fn per_iteration(&self) -> f64 {
        self.ticks as f64 / self.iterations as f64
    }

    /// Ticks per iteration of the NOP loop.
    pub fn nop_per_iteration(&self) -> f64 {
        self.nop_ticks as f64 / self.iterations as f64
    }
}

/// `key=value` fields of a line, in order.
fn field(words: &mut std::str::SplitWhitespace<'_>, key: &str) -> Option<u64> {
    let (k, v) = words.next()?.split_once('=')?;
    (k == key).then(|| v.parse().ok()).flatten()
}

/// The text of a serial line after `prefix`, wherever the line has it (a
/// line may begin with another writer's unfinished output).
fn after<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let at = line.find(prefix)?;
    Some(line[at + prefix.len()..].trim())
}

/// The TSC `vmmbench tsc` printed (at the init marker).
pub fn parse_tsc(serial: &str) -> Option<u64> {
    serial
        .lines()
        .find_map(|l| after(l, "vmmbench: tsc ")?.parse().ok())
}

/// The `vmmbench: loop` lines.
pub fn parse_loops(serial: &str) -> Vec<UserLoop> {
    serial
        .lines()
        .filter_map(|l| {
            let mut w = after(l, "vmmbench: loop ")?.split_whitespace();
            let name = w.next()?.to_string();
            let iterations = field(&mut w, "iterations").filter(|&n| n > 0)?;
            let ticks = field(&mut w, "ticks")?;
            let nop_ticks = field(&mut w, "nop_ticks")?;
            Some(UserLoop {
                name,
                iterations,
                ticks,
                nop_ticks,
            })
        })
        .collect()
}

/// TSC ticks per instruction of `vmmbench`'s calibration loop (2
/// instructions per iteration).
pub fn parse_calibration(serial: &str) -> Option<f64> {
    serial.lines().find_map(|l| {
        let mut w = after(l, "vmmbench: calibration ")?.split_whitespace();
        let iterations = field(&mut w, "iterations")?;
        let ticks = field(&mut w, "ticks")?;
        let instructions = field(&mut w, "instructions").filter(|&n| n > 0)?;
        (iterations > 0).then(|| ticks as f64 / instructions as f64)
    })
}

/// The exit tables thinvisor logs when the run ends:
///
/// ```text
/// thinvisor: [INFO ] VM exits on CPU 0: 19480 in all
/// thinvisor: [INFO ]   IOIO                         12000
/// thinvisor: [INFO ]   EXCP #UD                     3
/// ```
///
/// (crates/vmm/src/stats.rs, `log_table`). A reason's name may hold
/// spaces; its count is the last word.
pub fn parse_exit_tables(serial: &str) -> Vec<CpuExits> {
    let mut tables: Vec<CpuExits> = Vec::new();
    let mut open = false;
    for line in serial.lines() {
        let text = line
            .find("thinvisor: [")
            .and_then(|at| line[at..].split_once("] "))
            .map(|(_, rest)| rest.trim_end());
        let Some(text) = text else {
            open = false;
            continue;
        };
        if let Some(rest) = text.strip_prefix("VM exits on CPU ") {
            let table = rest.split_once(": ").and_then(|(cpu, total)| {
                Some(CpuExits {
                    cpu: cpu.parse().ok()?,
                    total: total.strip_suffix(" in all")?.parse().ok()?,
                    reasons: Vec::new(),
                })
            });
            open = table.is_some();
            tables.extend(table);
            continue;
        }
        let reason = text
            .strip_prefix("  ")
            .and_then(|r| r.trim().rsplit_once(' '))
            .and_then(|(name, n)| Some((name.trim().to_string(), n.parse::<u64>().ok()?)));
        match (open, reason, tables.last_mut()) {
            (true, Some(reason), Some(table)) if !reason.0.is_empty() => table.reasons.push(reason),
            _ => open = false,
        }
    }
    tables
}

/// `thinvisor's heap: N KiB used, M KiB free`: N.
pub fn parse_heap_used(serial: &str) -> Option<u64> {
    serial.lines().find_map(|l| {
        after(l, "thinvisor's heap: ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// One benchmark boot.
struct Run<'a> {
    /// Its directory's name under the xtask's work directory.
    name: &'a str,
    under_thinvisor: bool,
    /// `thinvisor.bench=` (`boot` or `loops`).
    mode: &'a str,
    icount: bool,
    smp: u32,
}

/// Boots the assets once: bare (QEMU loads the bzImage itself, `-kernel`
/// with `-append` and `-initrd`) or under thinvisor (`boot=linux`, the
/// kernel's command line in its module string), to the end of `/init`.
fn boot(ctx: &Ctx, images: &Images, assets: &LinuxAssets, r: &Run) -> Result<String> {
    let Run {
        name: run,
        under_thinvisor,
        mode,
        icount,
        smp,
    } = *r;
    let kernel_args = linux::bench_kernel_args(mode);
    let boot = if under_thinvisor {
        Boot {
            kernel: Kernel::Thinvisor,
            kernel32: images.hv32.clone(),
            kernel64: images.hv.clone(),
            args: linux::LINUX_HV_ARGS.into(),
            modules: vec![
                Module::new(
                    &assets.kernel,
                    format!("{} {kernel_args}", linux::KERNEL_FILE),
                ),
                Module::new(&assets.initrd, linux::INITRD_MODULE),
            ],
        }
    } else {
        Boot {
            kernel: Kernel::Thinvisor,
            kernel32: assets.kernel.clone(),
            kernel64: assets.kernel.clone(),
            args: kernel_args,
            modules: vec![Module::new(&assets.initrd, linux::INITRD_MODULE)],
        }
    };
    let opts = QemuOpts {
        smp,
        machine: Some("pc".into()),
        timeout: Duration::from_secs(240),
        extra: if icount {
            vec!["-icount".into(), ICOUNT.into()]
        } else {
            Vec::new()
        },
        time_line: Some(linux::MARKER.into()),
        ..QemuOpts::default()
    };
    let dir = ctx.fresh_dir(run)?;
    let outcome = emu::run_qemu(&dir, &boot, &opts)?;
    let problem = if let Some(why) = &outcome.stopped {
        Some(format!("QEMU was stopped: {why}"))
    } else if !outcome.serial.contains(linux::DONE) {
        Some(format!("no `{}` line", linux::DONE))
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(format!(
            "the Linux bench boot {run} failed: {problem} (see {})",
            ctx.show(&dir.join("serial.log"))
        ));
    }
    println!(
        "  {run}: marker after {}, QEMU ended after {}",
        outcome.line_at.map_or("-".into(), crate::util::secs),
        crate::util::secs(outcome.elapsed)
    );
    Ok(outcome.serial)
}

/// The figures of a serial log that must hold one.
fn need<T>(value: Option<T>, what: &str, run: &str) -> Result<T> {
    value.ok_or_else(|| format!("the Linux bench boot {run} printed no {what}"))
}

/// Boots Linux `2 * ROUNDS + 1` times and collects the figures.
pub fn measure(ctx: &Ctx, images: &Images) -> Result<LinuxMeasured> {
    let assets = linux::build(ctx, false)?;
    println!(
        "measuring Linux ({}) on QEMU: boots to the init marker with -icount {ICOUNT} \
         ({ICOUNT_CPUS} CPU), bare and under thinvisor alternated, {ROUNDS} rounds; \
         then a 2-CPU boot under thinvisor ...",
        assets.kernel_package
    );
    let mut m = LinuxMeasured {
        boot_cpus: ICOUNT_CPUS,
        ..LinuxMeasured::default()
    };
    let mut loops = Vec::new();
    for round in 1..=ROUNDS {
        for under in [false, true] {
            let run = format!(
                "bench-linux-{}-{round}",
                if under { "thinvisor" } else { "bare" }
            );
            let serial = boot(
                ctx,
                images,
                &assets,
                &Run {
                    name: &run,
                    under_thinvisor: under,
                    mode: "loops",
                    icount: true,
                    smp: ICOUNT_CPUS,
                },
            )?;
            let tsc = need(parse_tsc(&serial), "`vmmbench: tsc` line", &run)?;
            if !under {
                m.boot_bare.push(tsc);
                continue;
            }
            m.boot_thinvisor.push(tsc);
            let calibration = need(parse_calibration(&serial), "calibration", &run)?;
            if (calibration - 1.0).abs() > 0.01 {
                return Err(format!(
                    "{run}: {calibration:.3} TSC ticks per instruction: the TSC does not \
                     count instructions"
                ));
            }
            if loops.is_empty() {
                loops = parse_loops(&serial);
            }
        }
    }
    let find = |name: &str| {
        loops
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| format!("vmmbench printed no `{name}` loop"))
    };
    let lookup = find("lookup_dbgsh")?;
    let cpuid = find("cpuid")?;
    m.lookup_loop = lookup.per_iteration();
    m.lookup_nop_loop = lookup.nop_per_iteration();
    m.cpuid_loop = cpuid.per_iteration();
    m.cpuid_nop_loop = cpuid.nop_per_iteration();

    let run = "bench-linux-2cpus";
    let serial = boot(
        ctx,
        images,
        &assets,
        &Run {
            name: run,
            under_thinvisor: true,
            mode: "boot",
            icount: false,
            smp: 2,
        },
    )?;
    let (start, end) = need(crate::cases::reserved_block(&serial), "reserve line", run)?;
    m.reserved_kib = (end - start) >> 10;
    m.heap_used_kib = parse_heap_used(&serial);
    m.exits = parse_exit_tables(&serial);
    if m.exits.len() != 2 {
        return Err(format!(
            "{run}: {} exit tables in the log, expected one per CPU (2)",
            m.exits.len()
        ));
    }

    println!("\nLinux under thinvisor:");
    for (i, (b, t)) in m.boot_bare.iter().zip(&m.boot_thinvisor).enumerate() {
        println!(
            "  boot to the marker, run {}: {b} instructions bare, {t} under thinvisor ({:.4}x)",
            i + 1,
            *t as f64 / *b as f64
        );
    }
    if let (Some(r), Some(s)) = (m.boot_ratio(), m.boot_spread()) {
        println!(
            "  ratio {r:.4}x (target <= 1.03x); runs of a boot differ by {:.3}%",
            s * 100.0
        );
    }
    for l in [lookup, cpuid] {
        println!(
            "  user loop {}: {:.1} instructions per whole iteration ({:.1} with a NOP)",
            l.name,
            l.per_iteration(),
            l.nop_per_iteration()
        );
    }
    println!(
        "  thinvisor reserves {} KiB with 2 CPUs; exits: {}",
        m.reserved_kib,
        m.exits
            .iter()
            .map(|c| format!("CPU {} {}", c.cpu, c.total))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
thinvisor: [INFO ] thinvisor reserves 4096 KiB at 0x1fa00000..0x1fe00000 (image 676 KiB, heap 3420 KiB); 492 MiB free for the guest\r
thinvisor: [INFO ] thinvisor's heap: 648 KiB used, 2752 KiB free\r
thinvisor-init: marker\r
vmmbench: tsc 1834123456\r
vmmbench: calibration iterations=100000 ticks=200004 instructions=200000\r
vmmbench: loop lookup_dbgsh iterations=1000 ticks=1085012 nop_ticks=5003 batches=16\r
vmmbench: loop cpuid iterations=2000 ticks=458000 nop_ticks=10002 batches=16\r
[    2.000000] reboot: Power down\r
thinvisor: [INFO ] VM exits on CPU 0: 19480 in all\r
thinvisor: [INFO ]   IOIO                         12000\r
thinvisor: [INFO ]   EXCP #UD                     3\r
thinvisor: [INFO ] VM exits on CPU 1: 2455 in all\r
thinvisor: [INFO ]   CPUID                        2400\r
thinvisor: [INFO ]   IOIO                         55\r
thinvisor: [INFO ] canary in thinvisor's memory at 0x1fb00000: intact\r
thinvisor: [INFO ]   not a reason 5\r
";

    #[test]
    fn parses_the_tsc_and_the_loops() {
        assert_eq!(parse_tsc(LOG), Some(1_834_123_456));
        assert_eq!(parse_tsc("vmmbench: tsc x\n"), None);
        assert!((parse_calibration(LOG).unwrap() - 1.00002).abs() < 1e-9);
        let loops = parse_loops(LOG);
        assert_eq!(loops.len(), 2);
        assert_eq!(loops[0].name, "lookup_dbgsh");
        assert!((loops[0].per_iteration() - 1085.012).abs() < 1e-9);
        assert!((loops[0].nop_per_iteration() - 5.003).abs() < 1e-9);
        assert!((loops[1].per_iteration() - 229.0).abs() < 1e-9);
        // Malformed lines are skipped, not misread.
        assert!(parse_loops("vmmbench: loop x iterations=0 ticks=1 nop_ticks=1\n").is_empty());
        assert!(parse_loops("vmmbench: loop x ticks=1 iterations=1 nop_ticks=1\n").is_empty());
        assert_eq!(parse_heap_used(LOG), Some(648));
    }

    #[test]
    fn parses_exit_tables() {
        let t = parse_exit_tables(LOG);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].cpu, t[0].total), (0, 19480));
        assert_eq!(
            t[0].reasons,
            vec![("IOIO".to_string(), 12000), ("EXCP #UD".to_string(), 3)]
        );
        // The table ends at the first line that is not one of its reasons.
        assert_eq!(
            t[1].reasons,
            vec![("CPUID".to_string(), 2400), ("IOIO".to_string(), 55)]
        );
        assert!(parse_exit_tables("VM exits on CPU x: 1 in all\n").is_empty());
        // A reason line of a table cut off by other output is not taken.
        let cut = "thinvisor: [INFO ] VM exits on CPU 0: 5 in all\n\
                   [    1.0] Linux\n\
                   thinvisor: [INFO ]   IOIO 5\n";
        let t = parse_exit_tables(cut);
        assert_eq!(t.len(), 1);
        assert!(t[0].reasons.is_empty());
    }
}

//! `cargo xtask profile`: where thinvisor's instructions go in one exit
//! round trip of a bench loop, on AMD SVM under QEMU.
//!
//! The bench guest (test-guests/checks/src/bench.rs) runs its loops one
//! after the other and prints `BENCH <loop> ...` after each. QEMU runs it
//! under `-icount shift=0 -singlestep` with `-dfilter` set to thinvisor's
//! code, logging nothing at first; when the serial log shows the line two
//! loops before the chosen one, `log exec,nochain` through the QEMU
//! monitor starts a trace of every hypervisor instruction executed, and the
//! chosen loop's own line stops it (`log none`). The trace is cut into
//! round trips at the instruction after VMRUN in the exit loop; the
//! most common sequence among the last round trips (the chosen loop has at
//! least 1000 of them in a row, against the few of the next loop caught
//! before the trace stopped) is printed function by function with its
//! instruction counts, and with `--listing` instruction by instruction
//! (objdump). Symbols come from `nm`, the code range from `readelf`.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Context, Ctx, Result};

const USAGE: &str = "usage: cargo xtask profile [LOOP] [--listing]
  LOOP       one of the bench guest's loops (default lookup_dbgsh): {LOOPS}
  --listing  also print every instruction of the round trip
Traces one exit round trip of LOOP on AMD SVM (QEMU -icount shift=0 -singlestep,
-d exec,nochain over thinvisor's code) and prints its instructions by function.
The trace is in target/xtask/profile/trace.log.";

/// The bench guest's lines in the order it prints them, and the loop each
/// one ends (the paging-off loop runs at entry, before the calibration
/// line, and is printed after `cpuid_exit`).
const LINES: &[(&str, &str)] = &[
    ("lookup_dbgsh_paging_off", "BENCH calibration "),
    ("cpuid_exit", "BENCH cpuid_exit "),
    ("lookup_dbgsh", "BENCH lookup_dbgsh "),
    ("lookup_255_chars", "BENCH lookup_255_chars "),
    ("dbgsh_poll", "BENCH dbgsh_poll "),
    ("lookup_dbgsh_other_insn", "BENCH lookup_dbgsh_other_insn "),
];

/// Round trips, counted back from the end of the trace, among which the
/// most common sequence is taken (every loop has at least this many).
const WINDOW: usize = 1000;

pub fn main(ctx: &Ctx, args: &[String]) -> Result<ExitCode> {
    let loops: Vec<&str> = LINES.iter().map(|(l, _)| *l).collect();
    let usage = USAGE.replace("{LOOPS}", &loops.join(", "));
    let mut chosen = "lookup_dbgsh".to_string();
    let mut listing = false;
    for a in args {
        match a.as_str() {
            "--listing" => listing = true,
            "-h" | "--help" => {
                println!("{usage}");
                return Ok(ExitCode::SUCCESS);
            }
            name if loops.contains(&name) => chosen = name.into(),
            other => return Err(format!("unknown argument {other}\n{usage}")),
        }
    }
    let at = LINES
        .iter()
        .position(|(l, _)| *l == chosen)
        .ok_or("no such loop")?;
    // Start two lines earlier (or at once): a fast loop is over before a
    // monitor command sent at its own start would arrive.
    let start = at.checked_sub(2).map(|i| LINES[i].1);
    let stop = LINES[at].1;

    crate::setup::ensure(ctx)?;
    let images = crate::images::build(ctx)?;
    let elf = images.hv.as_path();
    let text = text_range(&run_tool("readelf", &["-lW"], elf)?)
        .ok_or("no executable segment in thinvisor.elf")?;
    let after_vmrun = after_vmrun(&run_tool("objdump", &["-d", "--no-show-raw-insn"], elf)?)
        .ok_or("no VMRUN in the exit loop (a function named *run_guest*)")?;
    let dir = ctx.fresh_dir("profile")?;
    trace(&dir, &images, text, start, stop)?;
    let trace_text = fs::read_to_string(dir.join("trace.log")).context("reading trace.log")?;
    let pcs = trace_pcs(&trace_text);
    let Some((count, seq)) = most_common(&round_trips(&pcs, after_vmrun), WINDOW) else {
        return Err(format!(
            "the trace holds no round trip (see {}); the loop may have ended before \
             the monitor turned the log on",
            dir.display()
        ));
    };
    let symbols = Symbols::new(&run_tool("nm", &["-n", "-C"], elf)?);
    println!(
        "\n{chosen} on AMD SVM: {count} of the last {WINDOW} round trips ran these {} \
         instructions of thinvisor (from the one after VMRUN):",
        seq.len()
    );
    for (name, n) in runs(&seq, &symbols) {
        println!("  {n:5} {name}");
    }
    if listing {
        let dis = disassembly(&run_tool(
            "objdump",
            &["-d", "--no-show-raw-insn", "-C"],
            elf,
        )?);
        let mut last = "";
        for pc in &seq {
            let name = symbols.name(*pc);
            if name != last {
                println!("-- {name}");
                last = name;
            }
            println!("  {pc:x} {}", dis.get(pc).map_or("?", String::as_str));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `tool ARGS elf` and returns its standard output.
fn run_tool(tool: &str, args: &[&str], elf: &Path) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .arg(elf)
        .stderr(Stdio::inherit())
        .output()
        .context(format_args!("running {tool}"))?;
    if !out.status.success() {
        return Err(format!("{tool} failed on {}", elf.display()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// QEMU with the bench guest, logging thinvisor's instructions from the
/// `start` line (or at once) to the `stop` line into `dir/trace.log`.
fn trace(
    dir: &Path,
    images: &crate::images::Images,
    text: (u64, u64),
    start: Option<&str>,
    stop: &str,
) -> Result {
    let boot = crate::bench::bench_boot(images);
    let opts = crate::emu::QemuOpts {
        extra: [
            "-icount",
            "shift=0",
            "-singlestep",
            "-dfilter",
            &format!("{:#x}..{:#x}", text.0, text.1),
            "-D",
            "trace.log",
            "-monitor",
            "unix:monitor.sock,server,nowait",
        ]
        .map(String::from)
        .to_vec(),
        ..crate::emu::QemuOpts::default()
    };
    let mut cmd = crate::emu::qemu_command(dir, &boot, &opts)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    println!("tracing on AMD SVM (QEMU) until {stop:?} ...");
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
    let began = Instant::now();
    let serial = dir.join("serial.log");
    let mut monitor: Option<UnixStream> = None;
    let mut logging = false;
    let result = loop {
        if began.elapsed() > Duration::from_secs(300) {
            break Err("timeout after 300 s".to_string());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("QEMU ended ({status}) before {stop:?}"));
        }
        if monitor.is_none() {
            monitor = UnixStream::connect(dir.join("monitor.sock")).ok();
        }
        let text = fs::read(&serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if let Some(m) = monitor.as_mut() {
            if !logging && start.is_none_or(|s| text.contains(s)) {
                m.write_all(b"log exec,nochain\n")
                    .context("writing to the QEMU monitor")?;
                logging = true;
            }
            if logging && text.contains(stop) {
                m.write_all(b"log none\n")
                    .context("writing to the QEMU monitor")?;
                std::thread::sleep(Duration::from_millis(300));
                break Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The executable segment's virtual address range from `readelf -lW`:
/// `(first, last)` byte, the form of QEMU's `-dfilter`.
fn text_range(readelf: &str) -> Option<(u64, u64)> {
    readelf.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        // LOAD offset vaddr paddr filesz memsz flags... align
        if w.first() != Some(&"LOAD") || !w.contains(&"E") {
            return None;
        }
        let vaddr = u64::from_str_radix(w.get(2)?.trim_start_matches("0x"), 16).ok()?;
        let memsz = u64::from_str_radix(w.get(5)?.trim_start_matches("0x"), 16).ok()?;
        (vaddr >= 0xFFFF_0000_0000_0000 && memsz > 0).then(|| (vaddr, vaddr + memsz - 1))
    })
}

/// The address of the instruction after VMRUN in `objdump -d` output, in
/// the exit loop: the world switch is inlined into the core's `run_guest`
/// (docs/performance.md), and into `run` for callers that want one exit.
fn after_vmrun(objdump: &str) -> Option<u64> {
    let mut in_loop = false;
    let mut after = false;
    for line in objdump.lines() {
        if line.ends_with(">:") {
            in_loop = line.contains("run_guest");
            continue;
        }
        let Some((pc, insn)) = instruction(line) else {
            continue;
        };
        if after {
            return Some(pc);
        }
        after = in_loop && insn.trim() == "vmrun";
    }
    None
}

/// `(address, instruction)` of an objdump instruction line.
fn instruction(line: &str) -> Option<(u64, &str)> {
    let (addr, insn) = line.split_once(":\t")?;
    let pc = u64::from_str_radix(addr.trim(), 16).ok()?;
    Some((pc, insn))
}

/// Every instruction of `objdump -d`, by address.
fn disassembly(objdump: &str) -> HashMap<u64, String> {
    objdump
        .lines()
        .filter_map(instruction)
        .map(|(pc, insn)| (pc, insn.trim().to_string()))
        .collect()
}

/// The program counters of a QEMU `-d exec` trace, in order (`Trace
/// ...: [.../PC/...]` lines).
fn trace_pcs(trace: &str) -> Vec<u64> {
    trace
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once('[')?;
            let pc = rest.split('/').nth(1)?;
            u64::from_str_radix(pc, 16).ok()
        })
        .collect()
}

/// The trace cut into round trips, each starting at `after_vmrun`
/// (whatever precedes the first is dropped, and the last, cut short by the
/// end of the trace, too).
fn round_trips(pcs: &[u64], after_vmrun: u64) -> Vec<&[u64]> {
    let starts: Vec<usize> = pcs
        .iter()
        .enumerate()
        .filter(|(_, &pc)| pc == after_vmrun)
        .map(|(i, _)| i)
        .collect();
    starts.windows(2).map(|w| &pcs[w[0]..w[1]]).collect()
}

/// The most common sequence among the last `window` round trips, with how
/// often it occurs there.
fn most_common(trips: &[&[u64]], window: usize) -> Option<(usize, Vec<u64>)> {
    let mut counts: HashMap<&[u64], usize> = HashMap::new();
    for t in &trips[trips.len().saturating_sub(window)..] {
        *counts.entry(t).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(seq, n)| (n, seq.len()))
        .map(|(seq, n)| (n, seq.to_vec()))
}

/// `nm -n` text symbols, for naming addresses.
struct Symbols {
    sorted: Vec<(u64, String)>,
}

impl Symbols {
    fn new(nm: &str) -> Symbols {
        let mut sorted: Vec<(u64, String)> = nm
            .lines()
            .filter_map(|l| {
                let mut w = l.splitn(3, ' ');
                let addr = u64::from_str_radix(w.next()?, 16).ok()?;
                let kind = w.next()?;
                let name = w.next()?;
                matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_string()))
            })
            .collect();
        sorted.sort();
        Symbols { sorted }
    }

    /// The symbol containing `pc` (the last one at or below it).
    fn name(&self, pc: u64) -> &str {
        let i = self.sorted.partition_point(|(a, _)| *a <= pc);
        i.checked_sub(1).map_or("?", |i| self.sorted[i].1.as_str())
    }
}

/// The sequence as runs of consecutive instructions in one function.
fn runs<'a>(seq: &[u64], symbols: &'a Symbols) -> Vec<(&'a str, usize)> {
    let mut out: Vec<(&str, usize)> = Vec::new();
    for pc in seq {
        let name = symbols.name(*pc);
        match out.last_mut() {
            Some((last, n)) if *last == name => *n += 1,
            _ => out.push((name, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_tools_output() {
        let readelf = "  LOAD           0x001000 0x0000000000200000 0x0000000000200000 0x0001b6 0x0001b6 R E 0x1000
  LOAD           0x002000 0xffffffff80209000 0x0000000000209000 0x061c8f 0x061c8f R E 0x1000
  LOAD           0x064000 0xffffffff8026b000 0x000000000026b000 0x01a160 0x01a160 R   0x1000";
        assert_eq!(
            text_range(readelf),
            Some((0xffff_ffff_8020_9000, 0xffff_ffff_8026_ac8e))
        );
        let objdump = "ffffffff80236400 <other>:
ffffffff80236400:\tvmrun
ffffffff80236403:\tret
ffffffff80236510 <thinvisor_vmm::exit::run_guest>:
ffffffff80236510:\tmov    %rdi,%rax
ffffffff80236514:\tvmrun
ffffffff80236517:\tpush   %rsi";
        assert_eq!(after_vmrun(objdump), Some(0xffff_ffff_8023_6517));
        assert_eq!(disassembly(objdump).len(), 5);
        let trace =
            "Trace 0: 0x7f [00000000/ffffffff80236517/0000c0b0/ff000000] thinvisor_svm_run\n\
                     noise\n\
                     Trace 0: 0x7f [00000000/ffffffff80236518/0000c0b0/ff000000] \n";
        assert_eq!(
            trace_pcs(trace),
            vec![0xffff_ffff_8023_6517, 0xffff_ffff_8023_6518]
        );
        let nm = "ffffffff80236510 T thinvisor_svm_run\nffffffff80236600 t other\n0000000000000001 a abs";
        let s = Symbols::new(nm);
        assert_eq!(s.name(0xffff_ffff_8023_6517), "thinvisor_svm_run");
        assert_eq!(s.name(0xffff_ffff_8023_6600), "other");
        assert_eq!(s.name(0x10), "?");
        assert_eq!(
            runs(
                &[
                    0xffff_ffff_8023_6517,
                    0xffff_ffff_8023_6518,
                    0xffff_ffff_8023_6600
                ],
                &s
            ),
            vec![("thinvisor_svm_run", 2), ("other", 1)]
        );
    }

    #[test]
    fn finds_the_loops_round_trip() {
        // Before the first VMRUN return (dropped), two trips of one shape,
        // one of another, and a last one cut short (dropped).
        let pcs = [9, 1, 2, 3, 1, 2, 3, 1, 4, 1, 2];
        let trips = round_trips(&pcs, 1);
        assert_eq!(trips, vec![&[1, 2, 3][..], &[1, 2, 3], &[1, 4]]);
        assert_eq!(most_common(&trips, 10), Some((2, vec![1, 2, 3])));
        // Only the last round trips count.
        assert_eq!(most_common(&trips, 1), Some((1, vec![1, 4])));
        assert_eq!(most_common(&[], 10), None);
    }
}

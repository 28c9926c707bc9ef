//! What the debug shell's `stat`, `cpu` and `mem` learn from the
//! hypervisor (docs/vmm-call.md, dbgsh): each processor's exit counts, the
//! features the backend uses, and thinvisor's own memory. Also the clock
//! of the shell's takeover rule.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;
use thinvisor_vmm::dbgsh::{Line, ShellInfo};
use thinvisor_vmm::stats::ExitStats;

use crate::platform;

/// Feature lines the backend notes at start-up.
const MAX_LINES: usize = 8;

/// The backend's lines for `cpu`, in the order noted.
static LINES: Mutex<([Line; MAX_LINES], usize)> =
    Mutex::new(([const { Line::new() }; MAX_LINES], 0));

/// thinvisor's block [start, end) (for `cpu`), and whether the guest's
/// physical addresses include it (the pass-through layout: `mem` refuses
/// it by name there; in the isolated layout the same numbers are ordinary
/// guest RAM).
static RESERVED_START: AtomicU64 = AtomicU64::new(0);
static RESERVED_END: AtomicU64 = AtomicU64::new(0);
static RESERVED_VISIBLE: AtomicU64 = AtomicU64::new(0);

/// TSC ticks per second, measured at boot (0: not measured).
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Seconds a dbgsh session may go without a call before another client
/// may take it (crate `thinvisor_vmm::dbgsh`).
pub const TAKEOVER_SECONDS: u64 = 10;

/// Add a line to `cpu`'s report (lines past [`MAX_LINES`] are dropped:
/// the backends note fewer).
pub fn note(args: fmt::Arguments<'_>) {
    let mut lines = LINES.lock();
    let (all, n) = &mut *lines;
    if let Some(line) = all.get_mut(*n) {
        let _ = line.write_fmt(args);
        *n += 1;
    }
}

/// Note the processor's vendor and brand string (CPUID 0 and
/// 0x8000_0002..4).
pub fn note_processor() {
    use core::arch::x86_64::__cpuid;
    let leaf0 = __cpuid(0);
    let mut vendor = [0u8; 12];
    for (i, r) in [leaf0.ebx, leaf0.edx, leaf0.ecx].into_iter().enumerate() {
        vendor[i * 4..i * 4 + 4].copy_from_slice(&r.to_le_bytes());
    }
    let mut brand = [0u8; 48];
    if __cpuid(0x8000_0000).eax >= 0x8000_0004 {
        for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
            let r = __cpuid(leaf);
            for (j, v) in [r.eax, r.ebx, r.ecx, r.edx].into_iter().enumerate() {
                let at = i * 16 + j * 4;
                brand[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    note(format_args!(
        "processor: {} {}",
        ascii(&vendor),
        ascii(&brand).trim()
    ));
}

/// Printable ASCII up to the first NUL ("?" for anything else).
fn ascii(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    match core::str::from_utf8(&bytes[..end]) {
        Ok(s) if s.bytes().all(|b| (0x20..0x7F).contains(&b)) => s,
        _ => "?",
    }
}

/// Record thinvisor's block; `in_guest_space`: the guest's physical
/// addresses reach it (pass-through layout).
pub fn set_reserved(start: u64, end: u64, in_guest_space: bool) {
    RESERVED_START.store(start, Ordering::Relaxed);
    RESERVED_END.store(end, Ordering::Relaxed);
    RESERVED_VISIBLE.store(u64::from(in_guest_space), Ordering::Release);
}

/// The TSC's frequency for the shell's clock: the one the processor
/// reports (CPUID), else measured against the PIT (10 ms). Boot processor
/// only, before the guest runs (the PIT is still thinvisor's).
///
/// The reported frequency comes first because it is what the guest OS
/// goes by (Linux takes it from CPUID leaves 0x15/0x16 when they have
/// it), so the shell's 10 s of silence are the guest's 10 s. Where the
/// two disagree, a client's half-second polls must not look like 10 s:
/// Bochs's PIT runs at its emulated instructions per second (2 million in
/// the tests) while its Intel models report a TSC of several GHz, so,
/// measured against the PIT, a waiting client lost the shell at once
/// (`dbgsh-busy` in `bochs-skylake-x-linux`).
pub fn calibrate_clock() {
    let hz = match reported_tsc_hz() {
        Some(hz) => hz,
        None => {
            let t0 = rdtsc();
            crate::smp::delay_us(10_000);
            rdtsc().wrapping_sub(t0).saturating_mul(100)
        }
    };
    TSC_HZ.store(hz, Ordering::Relaxed);
}

/// The TSC frequency CPUID reports: leaf 0x15 (the crystal's frequency
/// times the TSC/crystal ratio), else leaf 0x16 (the base frequency, in
/// MHz, which is the TSC's on the processors that have the leaf). Intel
/// defines both; elsewhere they are absent or zero.
fn reported_tsc_hz() -> Option<u64> {
    use core::arch::x86_64::__cpuid;
    let max = __cpuid(0).eax;
    if max >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return Some(u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax));
        }
    }
    if max >= 0x16 {
        let mhz = u64::from(__cpuid(0x16).eax & 0xFFFF);
        if mhz != 0 {
            return Some(mhz * 1_000_000);
        }
    }
    None
}

/// The shell's clock: the time-stamp counter.
pub fn clock() -> u64 {
    rdtsc()
}

/// [`TAKEOVER_SECONDS`] in clock ticks (never, when the TSC was not
/// measured).
pub fn takeover_ticks() -> u64 {
    match TSC_HZ.load(Ordering::Relaxed) {
        0 => thinvisor_vmm::dbgsh::NEVER,
        hz => hz.saturating_mul(TAKEOVER_SECONDS),
    }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter (CR4.TSD is clear
    // in thinvisor's own mode).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The hypervisor's answers to the shell.
pub struct Info;

/// The one instance `Services` is given.
pub static INFO: Info = Info;

impl ShellInfo for Info {
    fn cpus(&self) -> usize {
        platform::MAX_CPUS
    }

    fn exit_stats(&self, cpu: usize) -> Option<&ExitStats> {
        platform::exit_stats(cpu)
    }

    fn exit_name(&self, slot: usize) -> &'static str {
        platform::exit_names().map_or("?", |names| names(slot))
    }

    fn cpu_line(&self, index: usize, out: &mut Line) -> bool {
        let noted = {
            let lines = LINES.lock();
            if let Some(line) = lines.0[..lines.1].get(index) {
                // Lines are ASCII text written through `fmt`.
                let _ = out.write_str(core::str::from_utf8(line.as_bytes()).unwrap_or("?"));
                return true;
            }
            lines.1
        };
        match index - noted {
            0 => {
                let running = (0..platform::MAX_CPUS)
                    .filter(|&c| platform::exit_stats(c).is_some())
                    .count();
                let _ = write!(out, "CPUs under thinvisor: {running}");
                true
            }
            1 => {
                let (start, end) = (
                    RESERVED_START.load(Ordering::Relaxed),
                    RESERVED_END.load(Ordering::Relaxed),
                );
                let _ = write!(
                    out,
                    "thinvisor's memory: {} KiB at {start:#x}..{end:#x}",
                    (end - start) >> 10
                );
                true
            }
            _ => false,
        }
    }

    fn reserved(&self) -> Option<(u64, u64)> {
        (RESERVED_VISIBLE.load(Ordering::Acquire) != 0).then(|| {
            (
                RESERVED_START.load(Ordering::Relaxed),
                RESERVED_END.load(Ordering::Relaxed),
            )
        })
    }
}

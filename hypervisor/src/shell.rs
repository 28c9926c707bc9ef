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

/// The TSC's frequency for the shell's clock: what CPUID says (leaf 0x15,
/// the TSC/crystal ratio times the crystal, or leaf 0x16's base
/// frequency; SDM vol. 2A, CPUID), which is also what the OS goes by, or
/// else measured against the PIT (10 ms). Emulators show why the OS's
/// value comes first: Bochs' TSC runs at its instructions-per-second
/// setting against its PIT while its CPUID (and so Linux) says 3.5 GHz,
/// and a guest's "half a second" would be hundreds of PIT seconds. Boot
/// processor only, before the guest runs (the PIT is still thinvisor's).
pub fn calibrate_clock() {
    use core::arch::x86_64::__cpuid;
    let max_leaf = __cpuid(0).eax;
    let from_cpuid = if max_leaf >= 0x15 {
        let l = __cpuid(0x15);
        (l.eax != 0 && l.ecx != 0)
            .then(|| u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax))
            .filter(|&hz| hz != 0)
    } else {
        None
    }
    .or_else(|| {
        (max_leaf >= 0x16)
            .then(|| u64::from(__cpuid(0x16).eax & 0xFFFF) * 1_000_000)
            .filter(|&hz| hz != 0)
    });
    let (hz, source) = match from_cpuid {
        Some(hz) => (hz, "CPUID"),
        None => {
            let t0 = rdtsc();
            crate::smp::delay_us(10_000);
            (rdtsc().wrapping_sub(t0).saturating_mul(100), "the PIT")
        }
    };
    TSC_HZ.store(hz, Ordering::Relaxed);
    log::debug!("TSC: {} MHz ({source})", hz / 1_000_000);
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

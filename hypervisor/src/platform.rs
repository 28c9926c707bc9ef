//! The machine around the guest, as thinvisor's exit handlers see it: the
//! few I/O ports it intercepts (those that end or reset the run, and PCI's
//! CONFIG_DATA, crate::pci), the exit
//! tables of every processor, and a canary in thinvisor's own memory that
//! proves at the end of a run that the guest never wrote there.

use core::sync::atomic::{AtomicPtr, AtomicU16, AtomicU64, Ordering};

use log::{error, info};
use thinvisor_vmm::stats::ExitStats;
use thinvisor_vmm::Platform;
use x86_64::instructions::port::Port;

use crate::mem;

/// Processors whose exit tables are reported.
pub const MAX_CPUS: usize = 64;

/// Each processor's exit counts and their names, registered when its vCPU
/// starts; the vCPU lives as long as the run.
static STATS: [AtomicPtr<ExitStats>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];
static NAMES: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

/// The guest's ACPI PM1a control port (from the FADT), 0 when unknown.
pub static PM1A_CONTROL: AtomicU16 = AtomicU16::new(0);

/// A page of thinvisor's heap filled with a pattern at boot: word i is
/// `CANARY_VALUE ^ i`.
static CANARY: AtomicU64 = AtomicU64::new(0);
/// The canary's 64-bit value, random for each boot, so that no copy of it
/// can exist in the guest's memory by chance or from an earlier run: a
/// guest that finds it (the `memscan` guest tool) has read thinvisor's
/// memory.
static CANARY_VALUE: AtomicU64 = AtomicU64::new(0);

/// Register processor `cpu`'s exit counts for the end-of-run report.
pub fn register_stats(cpu: u32, stats: &ExitStats, names: fn(usize) -> &'static str) {
    if let Some(slot) = STATS.get(cpu as usize) {
        slot.store(
            stats as *const ExitStats as *mut ExitStats,
            Ordering::Release,
        );
    }
    NAMES.store(names as *mut (), Ordering::Release);
}

/// Processor `cpu`'s exit counts, once its vCPU runs.
pub fn exit_stats(cpu: usize) -> Option<&'static ExitStats> {
    let p = STATS.get(cpu)?.load(Ordering::Acquire);
    // SAFETY: registered from a vCPU that lives until the run ends (see
    // `log_exit_tables`); the counts are atomics.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// The names of the exit slots, once a vCPU registered them.
pub fn exit_names() -> Option<fn(usize) -> &'static str> {
    let names = NAMES.load(Ordering::Acquire);
    // SAFETY: only ever stored from a `fn(usize) -> &'static str`.
    (!names.is_null())
        .then(|| unsafe { core::mem::transmute::<*mut (), fn(usize) -> &'static str>(names) })
}

/// Log every registered processor's exit table.
pub fn log_exit_tables() {
    let names = NAMES.load(Ordering::Acquire);
    if names.is_null() {
        return;
    }
    // SAFETY: only ever stored from a `fn(usize) -> &'static str`.
    let names: fn(usize) -> &'static str = unsafe { core::mem::transmute(names) };
    for (cpu, slot) in STATS.iter().enumerate() {
        let p = slot.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: registered from a vCPU that lives until the run ends
            // (its processor never returns from running the guest but to
            // end the run); the counts are atomics.
            thinvisor_vmm::stats::log_table(cpu as u32, unsafe { &*p }, names);
        }
    }
}

/// Fill a heap page with the canary pattern and log the canary's value.
///
/// The value goes into the log, which the guest can read (`log_read`):
/// the canary is no secret. It proves that the guest cannot *read*
/// thinvisor's memory (the guest finds its 8 bytes in no page it can
/// read), and that it did not write there (the page is intact at the end
/// of the run); the guest learning the value as text changes neither.
/// Logging it is what lets the in-guest scanner know what to look for
/// without a side channel.
pub fn plant_canary() {
    let Some(page) = mem::alloc_zeroed(crate::PAGE, crate::PAGE) else {
        return;
    };
    let (value, source) = random_canary(page);
    let words = mem::phys_to_virt(page) as *mut u64;
    for i in 0..512 {
        // SAFETY: a fresh heap page, used only as the canary.
        unsafe { words.add(i).write_volatile(value ^ i as u64) };
    }
    CANARY_VALUE.store(value, Ordering::Relaxed);
    CANARY.store(page, Ordering::Release);
    // Tests aim device DMA at the page (test-guests/checks/src/dma.rs) and
    // scan the guest's memory for its words (guest-tools memscan).
    info!(
        "canary planted in thinvisor's memory at {page:#x}: words {value:#018x} ^ i, i = 0..512 ({source})"
    );
}

/// A fresh 64-bit canary for this boot and where its randomness came
/// from: RDRAND when CPUID says the processor has it (leaf 1, ECX bit 30)
/// and it delivers, else the TSC mixed with the page's address (unique per
/// boot in practice; the canary needs to be unpredictable to nothing but
/// chance). The value is kept far from the words memory is full of (0,
/// all ones, small numbers): its high and low halves both have bits set,
/// so `value ^ i` never equals such a word.
fn random_canary(page: u64) -> (u64, &'static str) {
    let has_rdrand = core::arch::x86_64::__cpuid(1).ecx & (1 << 30) != 0;
    let mut state = page;
    for attempt in 0..64u64 {
        let (raw, source) = match has_rdrand.then(rdrand).flatten() {
            Some(v) => (v, "rdrand"),
            None => {
                // SAFETY: RDTSC is available on every x86-64 processor
                // and has no side effects.
                let tsc = unsafe { core::arch::x86_64::_rdtsc() };
                state = splitmix64(state ^ tsc ^ attempt);
                (state, "rdtsc")
            }
        };
        let plausible = |half: u64| half.count_ones() >= 4 && half.count_ones() <= 28;
        if plausible(raw >> 32) && plausible(raw & 0xFFFF_FFFF) {
            return (raw, source);
        }
    }
    // Unreachable in practice (64 draws without one of ~99.99%).
    (0x7468_696E_7669_736F ^ page, "fixed")
}

/// One RDRAND, retried as Intel recommends (10 times) when it reports no
/// value.
fn rdrand() -> Option<u64> {
    for _ in 0..10 {
        let value: u64;
        let ok: u8;
        // SAFETY: only called when CPUID reports RDRAND; it writes the
        // two registers named and the flags.
        unsafe {
            core::arch::asm!(
                "rdrand {v}",
                "setc {ok}",
                v = out(reg) value,
                ok = out(reg_byte) ok,
                options(nomem, nostack),
            );
        }
        if ok != 0 {
            return Some(value);
        }
    }
    None
}

/// splitmix64's finaliser: spreads every input bit over the output.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Check the canary and say so.
pub fn check_canary() {
    let page = CANARY.load(Ordering::Acquire);
    if page == 0 {
        return;
    }
    let value = CANARY_VALUE.load(Ordering::Relaxed);
    let words = mem::phys_to_virt(page) as *const u64;
    // SAFETY: the canary page planted above, never freed.
    let intact = (0..512).all(|i| unsafe { words.add(i).read_volatile() } == value ^ i as u64);
    if intact {
        info!("canary in thinvisor's memory at {page:#x}: intact");
    } else {
        error!("canary in thinvisor's memory at {page:#x}: OVERWRITTEN");
    }
}

/// What a write to an intercepted port means for the run, if anything.
fn power_event(port: u16, value: u32) -> Option<&'static str> {
    match port {
        thinvisor_abi::QEMU_EXIT_PORT => Some("ends the run through QEMU's exit device"),
        // "Shutdown" arrives one byte at a time; report on its first.
        thinvisor_abi::BOCHS_SHUTDOWN_PORT if value == u32::from(b'S') => {
            Some("ends the run through Bochs' shutdown port")
        }
        0xCF9 if value & 0x4 != 0 => Some("resets the machine (port 0xCF9)"),
        0x64 if value == 0xFE => Some("resets the machine (keyboard controller)"),
        p if p != 0 && p == PM1A_CONTROL.load(Ordering::Relaxed) && value & (1 << 13) != 0 => {
            Some("enters an ACPI sleep state (powers off)")
        }
        _ => None,
    }
}

/// The platform thinvisor's exit handlers use.
pub struct Machine;

impl Platform for Machine {
    fn io_write(&self, port: u16, size: u8, value: u32) {
        if thinvisor_vmm::pci::is_config_data(port) {
            return crate::pci::config_data_write(port, size, value);
        }
        if let Some(what) = power_event(port, value) {
            info!("the guest {what} (port {port:#x}, value {value:#x})");
            crate::iommu::final_report();
            log_exit_tables();
            check_canary();
            crate::serial::Console::drain();
        }
        // SAFETY: a port the guest owns, written as the guest asked.
        unsafe {
            match size {
                1 => Port::<u8>::new(port).write(value as u8),
                2 => Port::<u16>::new(port).write(value as u16),
                _ => Port::<u32>::new(port).write(value),
            }
        }
    }

    fn x2apic_icr_write(&self, value: u64) -> bool {
        crate::apic::x2apic_icr_write(value)
    }

    fn msr_read(&self, msr: u32) -> Option<u64> {
        crate::msr::read(msr)
    }

    fn msr_write(&self, msr: u32, value: u64) -> bool {
        if msr == thinvisor_vmm::guard::IA32_APIC_BASE {
            return crate::apic::write_apic_base(value);
        }
        // SAFETY: only guarded MSRs come here (the APIC base, handled
        // above, and the MTRRs), with values `thinvisor_vmm::guard` let
        // through.
        unsafe { crate::msr::write(msr, value) }
    }

    fn wait_for_sipi(&self) -> Option<u8> {
        crate::apic::wait_for_sipi()
    }

    fn max_phys_addr(&self) -> u8 {
        let leaf = core::arch::x86_64::__cpuid(0x8000_0000).eax;
        if leaf >= 0x8000_0008 {
            core::arch::x86_64::__cpuid(0x8000_0008).eax as u8
        } else {
            36
        }
    }

    fn poll_devices(&self) {
        crate::iommu::poll();
    }

    fn io_read(&self, port: u16, size: u8) -> u32 {
        if thinvisor_vmm::pci::is_config_data(port) {
            return crate::pci::config_data_read(port, size);
        }
        // SAFETY: a port the guest owns, read as the guest asked.
        unsafe {
            match size {
                1 => u32::from(Port::<u8>::new(port).read()),
                2 => u32::from(Port::<u16>::new(port).read()),
                _ => Port::<u32>::new(port).read(),
            }
        }
    }
}

/// An I/O bitmap (8 KiB, or 12 KiB for SVM) intercepting the power ports.
pub fn io_bitmap(bytes: u64) -> u64 {
    let Some(map) = mem::alloc_zeroed(bytes, crate::PAGE) else {
        boot_error!("out of memory for the I/O bitmap")
    };
    // SAFETY: a fresh heap block of `bytes` bytes used only as this map.
    let bits = unsafe { core::slice::from_raw_parts_mut(mem::phys_to_virt(map), bytes as usize) };
    for port in thinvisor_vmm::POWER_PORTS {
        thinvisor_vmm::iomap::intercept_port(bits, port);
    }
    // PCI CONFIG_DATA: configuration writes are judged (crate::pci).
    for port in thinvisor_vmm::pci::CONFIG_DATA..=thinvisor_vmm::pci::CONFIG_DATA + 3 {
        thinvisor_vmm::iomap::intercept_port(bits, port);
    }
    let pm1a = PM1A_CONTROL.load(Ordering::Relaxed);
    if pm1a != 0 {
        thinvisor_vmm::iomap::intercept_port(bits, pm1a);
    }
    map
}

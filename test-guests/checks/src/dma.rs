//! The `dma` mode: device DMA under thinvisor's IOMMU protection, with
//! QEMU's `edu` device (PCI 1234:11e8; QEMU docs/specs/edu.rst). Run in
//! the pass-through layout on a machine with an IOMMU (`-machine q35
//! -device intel-iommu` or `-device amd-iommu`, then `-device
//! edu,dma_mask=...`, whose default mask of 28 bits would clamp addresses
//! above 256 MiB).
//!
//! edu's DMA engine: 0x80 source address, 0x88 destination, 0x90 count,
//! 0x98 command (bit 0 start / still running, bit 1 direction: 0 = RAM to
//! the device's buffer, 1 = the buffer to RAM, bit 2 interrupt when
//! done); its buffer is device address 0x40000, 4096 bytes. A range
//! outside the buffer makes QEMU abort, and QEMU 7.2's bounds check
//! refuses a range that ends exactly at the buffer's end, so every
//! transfer here is [`COUNT`] bytes, half the buffer.
//!
//! The checks: DMA into ordinary guest memory works both ways (the guest
//! sees the bytes); the IOMMU's registers read as zeros and the guest's
//! attempt to switch translation off is dropped; DMA into thinvisor's memory (its canary page, learnt
//! from thinvisor's log, or the block's first page) does not land (the
//! run's end says the canary is intact) and thinvisor logs the fault with
//! edu's bus:device.function; a DMA read of thinvisor's memory brings none
//! of it into the guest.

use crate::cpu::{inl, outl};
use crate::passthrough::{self, ensure, fail, map_identity_2m, CheckResult, Why};
use crate::timer::pit_delay_ms;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

const EDU_VENDOR_DEVICE: u32 = 0x11e8_1234;
const EDU_BUF: u64 = 0x40000;
const LEN: usize = 4096;
/// Bytes per transfer.
const COUNT: usize = 2048;
/// Where SeaBIOS would not put anything, for an unassigned BAR0 (1 MiB).
const BAR_FALLBACK: u32 = 0xE000_0000;

const DMA_SRC: u64 = 0x80;
const DMA_DST: u64 = 0x88;
const DMA_CNT: u64 = 0x90;
const DMA_CMD: u64 = 0x98;
const CMD_START: u64 = 1;
const CMD_TO_RAM: u64 = 2;

/// edu's requester ID (bus << 8 | dev << 3 | fn) and BAR0, once found.
static EDU_BDF: AtomicU64 = AtomicU64::new(u64::MAX);
static EDU_BAR: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(4096))]
struct Page(UnsafeCell<[u8; LEN]>);
// SAFETY: one CPU runs this mode; the device writes these pages only
// while the guest waits for it.
unsafe impl Sync for Page {}
static SOURCE: Page = Page(UnsafeCell::new([0; LEN]));
static TARGET: Page = Page(UnsafeCell::new([0; LEN]));

fn config_read(bdf: u32, offset: u32) -> u32 {
    outl(0xCF8, 0x8000_0000 | bdf << 8 | (offset & 0xFC));
    inl(0xCFC)
}

fn config_write(bdf: u32, offset: u32, value: u32) {
    outl(0xCF8, 0x8000_0000 | bdf << 8 | (offset & 0xFC));
    outl(0xCFC, value);
}

fn reg_read(offset: u64) -> u64 {
    let bar = EDU_BAR.load(Relaxed);
    // SAFETY: edu's BAR0, identity-mapped uncached by `dma_finds_edu`.
    unsafe { ((bar + offset) as *const u64).read_volatile() }
}

fn reg_write(offset: u64, value: u64) {
    let bar = EDU_BAR.load(Relaxed);
    // SAFETY: as in `reg_read`.
    unsafe { ((bar + offset) as *mut u64).write_volatile(value) }
}

/// One edu transfer; waits (at most 3 s) for it to finish.
fn transfer(src: u64, dst: u64, to_ram: bool) -> CheckResult {
    reg_write(DMA_SRC, src);
    reg_write(DMA_DST, dst);
    reg_write(DMA_CNT, COUNT as u64);
    reg_write(DMA_CMD, CMD_START | if to_ram { CMD_TO_RAM } else { 0 });
    for _ in 0..3000 {
        if reg_read(DMA_CMD) & CMD_START == 0 {
            return Ok(());
        }
        pit_delay_ms(1);
    }
    fail!("edu's DMA {src:#x} -> {dst:#x} did not finish within 3 s")
}

fn pattern(i: usize) -> u8 {
    (i * 7 + 3) as u8
}

/// `dma_finds_edu`: edu on some bus, its BAR0 assigned (by the firmware,
/// or here), memory decoding and bus mastering on, its identification
/// register 0x010000ed.
fn dma_finds_edu() -> CheckResult {
    let Some(bdf) = (0..256 * 32)
        .map(|d| d << 3)
        .find(|&bdf| config_read(bdf, 0) == EDU_VENDOR_DEVICE)
    else {
        fail!("no edu device (1234:11e8) on any bus (function 0)")
    };
    let mut bar = config_read(bdf, 0x10) & !0xF;
    if bar == 0 {
        config_write(bdf, 0x10, BAR_FALLBACK);
        bar = config_read(bdf, 0x10) & !0xF;
    }
    ensure!(bar != 0, "edu's BAR0 stays 0");
    // Command: memory space (bit 1), bus master (bit 2).
    let command = config_read(bdf, 4) & 0xFFFF;
    config_write(bdf, 4, command | 0x6);
    let bar = u64::from(bar);
    map_identity_2m(bar, true);
    EDU_BDF.store(u64::from(bdf), Relaxed);
    EDU_BAR.store(bar, Relaxed);
    // SAFETY: identity-mapped uncached just above.
    let id = unsafe { (bar as *const u32).read_volatile() };
    ensure!(id == 0x0100_00ed, "edu's identification reads {id:#x}");
    say!(
        "test-guest: edu at {:02x}:{:02x}.{}, BAR0 {bar:#x}",
        bdf >> 8,
        (bdf >> 3) & 0x1F,
        bdf & 7
    );
    Ok(())
}

/// `dma_to_guest_memory`: a page of the guest's goes to edu's buffer and
/// back into another page: the guest sees every byte.
fn dma_to_guest_memory() -> CheckResult {
    ensure!(EDU_BAR.load(Relaxed) != 0, "no edu (see dma_finds_edu)");
    let (src, dst) = (SOURCE.0.get(), TARGET.0.get());
    // SAFETY: the guest's own static pages; the device is idle.
    unsafe {
        for i in 0..COUNT {
            (*src)[i] = pattern(i);
        }
        (*dst).fill(0);
    }
    transfer(src as u64, EDU_BUF, false)?;
    transfer(EDU_BUF, dst as u64, true)?;
    // SAFETY: the device is done with the page.
    let got = unsafe { &*dst };
    if let Some(i) = (0..COUNT).find(|&i| got[i] != pattern(i)) {
        fail!(
            "byte {i} of the page edu wrote at {:#x} is {:#x}, not {:#x}",
            dst as u64,
            got[i],
            pattern(i)
        )
    }
    say!(
        "test-guest: edu copied {COUNT} bytes into guest memory at {:#x}",
        dst as u64
    );
    Ok(())
}

/// `dma_iommu_registers_hidden`: the IOMMU's register window (from
/// thinvisor's line `iommu: ..., N unit(s) at 0xBASE: DMA remapping on`)
/// reads as zeros, and a write of 0 to offset 0x18 (VT-d GCMD: TE clear;
/// AMD-Vi Control: IommuEn clear, both "translation off") is dropped:
/// the checks after this one prove DMA is still blocked.
fn dma_iommu_registers_hidden() -> CheckResult {
    const KEY: &[u8] = b" unit(s) at ";
    let log = passthrough::read_log()?;
    let Some(at) = log.windows(KEY.len()).position(|w| w == KEY) else {
        fail!("no \"unit(s) at\" line in thinvisor's log: no IOMMU in use")
    };
    let Some((base, _)) = passthrough::hex(&log[at + KEY.len()..]) else {
        fail!("cannot parse the IOMMU's base in thinvisor's log")
    };
    map_identity_2m(base, true);
    for off in (0..0x40).step_by(8) {
        // SAFETY: the IOMMU's register window, identity-mapped uncached;
        // thinvisor shows the guest a zero page there.
        let v = unsafe { ((base + off) as *const u64).read_volatile() };
        ensure!(
            v == 0,
            "the IOMMU's register at {:#x} reads {v:#x}",
            base + off
        );
    }
    // SAFETY: as above; the write is meant to be dropped.
    unsafe { ((base + 0x18) as *mut u32).write_volatile(0) };
    say!(
        "test-guest: the IOMMU's registers at {base:#x} read as zeros; translation-off write sent"
    );
    Ok(())
}

/// thinvisor's canary page (from `canary planted in thinvisor's memory at
/// 0x...` in its log), or the first page of its block.
fn thinvisor_target() -> Result<u64, Why> {
    const KEY: &[u8] = b"canary planted in thinvisor's memory at ";
    let (start, end) = passthrough::thinvisor_block()?;
    let log = passthrough::read_log()?;
    let canary = log
        .windows(KEY.len())
        .position(|w| w == KEY)
        .and_then(|at| passthrough::hex(&log[at + KEY.len()..]))
        .map(|(pa, _)| pa)
        .filter(|&pa| start <= pa && pa + LEN as u64 <= end);
    Ok(canary.unwrap_or(start))
}

/// Lines of thinvisor's log saying an AMD-Vi unit aborted a request
/// without an event (QEMU 7.2's AMD-Vi model writes no event log; see
/// hypervisor/src/iommu/amdvi.rs).
const ABORT_LINE: &[u8] = b"iommu: DMA fault: the AMD-Vi unit ";

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// Whether thinvisor logged the fault of the transfer just made: a line
/// naming edu and `page`, or, only on a unit that can say no more, one
/// more aborted-request line than the `aborts_before` seen before it.
fn fault_logged(page: u64, aborts_before: usize) -> Result<bool, Why> {
    if fault_line(page)? {
        say!("test-guest: thinvisor's log names edu and {page:#x}");
        return Ok(true);
    }
    let aborts = count(passthrough::read_log()?, ABORT_LINE);
    if aborts > aborts_before {
        say!("test-guest: thinvisor's log has the IOMMU's aborted-request line");
        return Ok(true);
    }
    Ok(false)
}

/// The log line thinvisor writes for a fault of edu's at `page`.
fn fault_line(page: u64) -> Result<bool, Why> {
    let bdf = EDU_BDF.load(Relaxed);
    let mut key = [0u8; 64];
    let mut w = Writer {
        buf: &mut key,
        len: 0,
    };
    let _ = core::fmt::write(
        &mut w,
        format_args!(
            "iommu: DMA fault: device {:02x}:{:02x}.{} ",
            bdf >> 8,
            (bdf >> 3) & 0x1F,
            bdf & 7
        ),
    );
    let len = w.len;
    let key = &key[..len];
    let log = passthrough::read_log()?;
    let mut at = 0;
    while let Some(p) = log[at..].windows(key.len()).position(|w| w == key) {
        let line = &log[at + p..];
        let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
        // "... write at 0x1fb28000 blocked ..." or "read at".
        if let Some(a) = line.windows(5).position(|w| w == b" at 0") {
            if let Some((addr, _)) = passthrough::hex(&line[a + 4..]) {
                if addr & !0xFFF == page {
                    return Ok(true);
                }
            }
        }
        at += p + key.len();
    }
    Ok(false)
}

struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl core::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = (self.len + s.len()).min(self.buf.len());
        self.buf[self.len..end].copy_from_slice(&s.as_bytes()[..end - self.len]);
        self.len = end;
        Ok(())
    }
}

/// `dma_into_thinvisor_blocked`: edu writes its buffer (the pattern) over
/// thinvisor's canary page; thinvisor logs the fault with edu's source
/// ID and that page (the run's end checks the canary is intact).
fn dma_into_thinvisor_blocked() -> CheckResult {
    ensure!(EDU_BAR.load(Relaxed) != 0, "no edu (see dma_finds_edu)");
    let page = thinvisor_target()?;
    say!("test-guest: edu writes {COUNT} bytes at {page:#x} (thinvisor's memory)");
    let aborts = count(passthrough::read_log()?, ABORT_LINE);
    transfer(EDU_BUF, page, true)?;
    // The VMM call of log_read polls the IOMMU first.
    ensure!(
        fault_logged(page, aborts)?,
        "thinvisor logged no DMA fault of edu's at {page:#x}"
    );
    Ok(())
}

/// `dma_read_of_thinvisor_blocked`: edu reads thinvisor's canary page into
/// its buffer, then writes the buffer into guest memory: none of the
/// canary shows (its words are "thinviso" XOR their index below 512, so
/// their top 48 bits are "thinvi"), and the fault is logged.
fn dma_read_of_thinvisor_blocked() -> CheckResult {
    ensure!(EDU_BAR.load(Relaxed) != 0, "no edu (see dma_finds_edu)");
    let page = thinvisor_target()?;
    let dst = TARGET.0.get();
    // SAFETY: the guest's own page; the device is idle.
    unsafe { (*dst).fill(0) };
    let aborts = count(passthrough::read_log()?, ABORT_LINE);
    transfer(page, EDU_BUF, false)?;
    transfer(EDU_BUF, dst as u64, true)?;
    // SAFETY: the device is done.
    let got = unsafe { &*dst };
    let leaked = got
        .chunks_exact(8)
        .any(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])) >> 16 == 0x7468_696E_7669);
    ensure!(!leaked, "thinvisor's canary words reached guest memory");
    ensure!(
        fault_logged(page, aborts)?,
        "thinvisor logged no DMA fault of edu's at {page:#x}"
    );
    Ok(())
}

/// One check: its name and body.
type Check = (&'static str, fn() -> CheckResult);

const CHECKS: [Check; 7] = [
    ("dma_finds_edu", dma_finds_edu),
    ("dma_to_guest_memory", dma_to_guest_memory),
    ("dma_iommu_registers_hidden", dma_iommu_registers_hidden),
    ("pci_bar_guarded", crate::pci::pci_bar_guarded),
    (
        "pci_iommu_function_guarded",
        crate::pci::pci_iommu_function_guarded,
    ),
    ("dma_into_thinvisor_blocked", dma_into_thinvisor_blocked),
    (
        "dma_read_of_thinvisor_blocked",
        dma_read_of_thinvisor_blocked,
    ),
];

/// Runs every check, prints the summary and ends the run.
pub fn run_all() -> ! {
    for (name, check) in CHECKS {
        crate::checks::run_one(name, check);
    }
    crate::checks::finish()
}

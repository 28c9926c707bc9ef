//! DMA remapping: thinvisor programs the machine's IOMMUs so that no
//! device can read or write thinvisor's own memory, whatever the guest
//! tells it to do (docs/architecture.md, "IOMMU"; docs/security.md,
//! "DMA").
//!
//! The steps, all before the guest's first instruction:
//!
//! 1. [`discover`] (before thinvisor relocates itself, so the AMD-Vi
//!    device table can be counted into thinvisor's block): the ACPI
//!    tables are found with the `acpi` crate (RSDP, RSDT/XSDT, headers,
//!    checksums); the DMAR (Intel VT-d) or IVRS (AMD-Vi) body is parsed
//!    by `thinvisor_iommu`.
//! 2. [`protect`]: the identity tables (all memory up to `top` 1:1,
//!    thinvisor's block and the IOMMUs' own registers not mapped) are
//!    built in thinvisor's block, every unit is pointed at them and
//!    switched on ([`vtd`], [`amdvi`]); then the DMAR/IVRS table is
//!    hidden from the guest (its signature renamed, its checksum fixed),
//!    and the units' register pages join the pages the nested tables hide
//!    ([`mmio_ranges`]), so the guest can neither find nor reprogram them.
//! 3. [`poll`]: faults the units recorded are logged, rate-limited.
//!    thinvisor takes no interrupts, so this runs from the exit path
//!    (every VMM call, every few thousand exits) and at the end of the run.
//!
//! `iommu=required|auto|off` (crates/boot/src/cmdline.rs) decides what a
//! machine without a usable IOMMU gets: a boot error, one warning line, or
//! no attempt at all.

mod amdvi;
mod vtd;

use core::ops::Range;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use acpi::{AcpiHandler, AcpiTable, AcpiTables, PhysicalMapping};
use log::{info, warn};
use spin::{Mutex, Once};
use thinvisor_boot::cmdline::IommuMode;
use thinvisor_iommu::{dmar, ivrs, DmaFault};

use crate::mem;

/// Register windows hidden from the guest, at most.
const MAX_MMIO: usize = dmar::MAX_UNITS;

/// What [`discover`] found.
enum Found {
    VtD {
        dmar: dmar::Dmar,
        table: u64,
    },
    AmdVi {
        ivrs: ivrs::Ivrs,
        table: u64,
        ecam: Option<Ecam>,
    },
}

/// PCI Express configuration space of segment 0 (from the MCFG, ACPI's
/// "PCI Express memory mapped configuration space base address
/// description table": base u64, segment u16, start bus, end bus, in
/// 16-byte entries from byte 44).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ecam {
    base: u64,
    start_bus: u8,
    end_bus: u8,
}

impl Ecam {
    /// The physical range the window covers: 1 MiB per bus (PCI Express
    /// Base 4.0, 7.2.2).
    pub fn range(&self) -> Range<u64> {
        let len = (u64::from(self.end_bus.saturating_sub(self.start_bus)) + 1) << 20;
        self.base..self.base.saturating_add(len)
    }

    /// The function (requester ID) and configuration offset that the
    /// physical address `pa` in the window names.
    pub fn locate(&self, pa: u64) -> Option<(u16, u16)> {
        if !self.range().contains(&pa) {
            return None;
        }
        let rel = pa - self.base;
        let id = (u16::from(self.start_bus) << 8).wrapping_add((rel >> 12) as u16);
        Some((id, (rel & 0xFFF) as u16))
    }

    /// The configuration space of requester `id` (bus << 8 | devfn).
    pub fn config(&self, id: u16) -> Option<u64> {
        let bus = (id >> 8) as u8;
        if !(self.start_bus..=self.end_bus).contains(&bus) {
            return None;
        }
        let at = self
            .base
            .checked_add((u64::from(bus - self.start_bus) << 20) | (u64::from(id & 0xFF) << 12))?;
        mem::is_mapped(at, 4096).then_some(at)
    }

    /// Segment 0's entry of an MCFG table.
    fn from_mcfg(table: &[u8]) -> Option<Ecam> {
        let (base, start_bus, end_bus) = thinvisor_iommu::acpi::mcfg_segment0(table)?;
        Some(Ecam {
            base,
            start_bus,
            end_bus,
        })
    }
}

/// What discovery decided, for the rest of the boot.
struct Plan {
    mode: IommuMode,
    found: Option<Found>,
}

static PLAN: Once<Plan> = Once::new();

/// Segment 0's ECAM window, from the MCFG (found whatever `iommu=` says:
/// the PCI configuration guard watches it, hypervisor/src/pci.rs).
static ECAM: Once<Option<Ecam>> = Once::new();

/// The PCI functions of the IOMMUs thinvisor enabled (AMD-Vi units are
/// PCI functions; VT-d units are not).
static FUNCTIONS: Once<([u16; MAX_MMIO], usize)> = Once::new();

/// Segment 0's ECAM window, once [`discover`] ran.
pub(crate) fn ecam() -> Option<Ecam> {
    ECAM.get().copied().flatten()
}

/// The requester IDs of the IOMMUs in use that are PCI functions.
pub(crate) fn pci_functions() -> &'static [u16] {
    FUNCTIONS.get().map_or(&[], |(f, n)| &f[..*n])
}

/// The register windows of the units in use: hidden from the guest.
static MMIO: Once<([Range<u64>; MAX_MMIO], usize)> = Once::new();

/// The units being polled for faults, once protection is on.
// One instance, in a static, never moved: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Active {
    VtD(vtd::Units),
    AmdVi(amdvi::Units),
}

static ACTIVE: Once<Mutex<Active>> = Once::new();
/// Set once [`ACTIVE`] is, so [`poll`] costs one load without an IOMMU.
static POLLING: AtomicBool = AtomicBool::new(false);

/// The ACPI crate's view of physical memory: the direct map. A region
/// outside it (a hostile pointer in the RSDT, say) maps to a page of
/// zeros instead, which no table validates against (its signature is
/// zero), so the crate skips it rather than thinvisor faulting.
#[derive(Clone, Copy, Debug)]
struct DirectMapAcpi;

#[repr(C, align(4096))]
struct ZeroPage([u8; 4096]);
static ZERO_PAGE: ZeroPage = ZeroPage([0; 4096]);

impl AcpiHandler for DirectMapAcpi {
    unsafe fn map_physical_region<T>(&self, pa: usize, size: usize) -> PhysicalMapping<Self, T> {
        let (virt, len) = if mem::is_mapped(pa as u64, size as u64) {
            (mem::phys_to_virt(pa as u64), size)
        } else {
            (ZERO_PAGE.0.as_ptr().cast_mut(), size.min(ZERO_PAGE.0.len()))
        };
        // SAFETY: `virt` is either the direct-map address of `size` mapped
        // bytes or the zero page, `len` bytes of it; neither is null. The
        // crate only reads through the mapping.
        unsafe { PhysicalMapping::new(pa, NonNull::new_unchecked(virt.cast()), len, len, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// Which table [`Sdt`] stands for.
const DMAR: u8 = 0;
const IVRS: u8 = 1;
const MCFG: u8 = 2;

/// A table found by signature: only its header is typed; the body is
/// read as bytes (the crate's own MCFG type trusts the header's length).
#[repr(transparent)]
struct Sdt<const KIND: u8>(acpi::sdt::SdtHeader);

// SAFETY: `Sdt` is exactly an SDT header (repr(transparent)), which is
// what the trait requires; the signature is the table's own.
unsafe impl<const KIND: u8> AcpiTable for Sdt<KIND> {
    const SIGNATURE: acpi::sdt::Signature = match KIND {
        DMAR => acpi::sdt::Signature::DMAR,
        IVRS => acpi::sdt::Signature::IVRS,
        _ => acpi::sdt::Signature::MCFG,
    };

    fn header(&self) -> &acpi::sdt::SdtHeader {
        &self.0
    }
}

/// Longest DMAR/IVRS accepted (real ones are a few KiB).
const MAX_TABLE_LEN: usize = 64 * 1024;

/// The table `T` (checksum verified by the crate): its address and bytes.
fn find<const KIND: u8>(tables: &AcpiTables<DirectMapAcpi>) -> Option<(u64, &'static [u8])> {
    let mapping = tables.find_table::<Sdt<KIND>>().ok()?;
    let (pa, len) = (mapping.physical_start() as u64, mapping.region_length());
    if !(thinvisor_iommu::SDT_HEADER_LEN..=MAX_TABLE_LEN).contains(&len)
        || !mem::is_mapped(pa, len as u64)
    {
        return None;
    }
    // SAFETY: mapped (checked); firmware tables are not written while
    // thinvisor reads them (the guest does not run yet).
    Some((pa, unsafe {
        core::slice::from_raw_parts(mem::phys_to_virt(pa), len)
    }))
}

/// Finds the IOMMUs in the ACPI tables and decides; returns the bytes
/// thinvisor's block needs on top of its heap for the AMD-Vi device
/// table. With `iommu=required` a machine without a usable IOMMU is a
/// boot error. `rsdp`: the RSDP the loader gave (a UEFI loader's), else
/// the BIOS areas are searched.
pub fn discover(mode: IommuMode, rsdp: Option<u64>) -> u64 {
    let tables = acpi_tables(rsdp).ok();
    ECAM.call_once(|| {
        tables
            .as_ref()
            .and_then(find::<MCFG>)
            .and_then(|(_, t)| Ecam::from_mcfg(t))
    });
    if mode == IommuMode::Off {
        info!("iommu: off (iommu=off): DMA protection off, the IOMMU is left to the guest");
        PLAN.call_once(|| Plan { mode, found: None });
        return 0;
    }
    let found = find_units(tables.as_ref());
    let extra = match &found {
        Ok(Found::AmdVi { ivrs, .. }) => ivrs
            .units()
            .iter()
            .map(|u| thinvisor_iommu::amdvi::device_table_bytes(u.max_device_id))
            .max()
            .unwrap_or(0) as u64,
        _ => 0,
    };
    let found = match found {
        Ok(f) => Some(f),
        Err(why) => {
            unprotected(mode, why);
            None
        }
    };
    PLAN.call_once(|| Plan { mode, found });
    extra
}

/// The one line for a machine whose DMA thinvisor cannot protect: a boot
/// error under `iommu=required`, a warning otherwise.
fn unprotected(mode: IommuMode, why: impl core::fmt::Display) {
    if mode == IommuMode::Required {
        boot_error!(
            "iommu: {why}; iommu=required: refusing to start the guest without DMA protection"
        );
    }
    warn!("iommu: {why}, DMA protection off (iommu=auto)");
}

/// Why no IOMMU can be used: the one line's reason.
enum NotFound {
    NoAcpi,
    NoTable,
    TooManyUnits(&'static str),
    BadDmar(u64, dmar::DmarError),
    BadIvrs(u64, ivrs::IvrsError),
}

impl core::fmt::Display for NotFound {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoAcpi => write!(f, "none found (no ACPI tables)"),
            Self::NoTable => write!(f, "none found (no DMAR or IVRS table)"),
            Self::TooManyUnits(t) => write!(
                f,
                "the {t} table lists more than {MAX_MMIO} units, more than thinvisor handles"
            ),
            Self::BadDmar(pa, e) => write!(f, "the DMAR table at {pa:#x} is unusable: {e}"),
            Self::BadIvrs(pa, e) => write!(f, "the IVRS table at {pa:#x} is unusable: {e}"),
        }
    }
}

/// The ACPI tables from the loader's RSDP, or the one in the BIOS areas.
fn acpi_tables(rsdp: Option<u64>) -> acpi::AcpiResult<AcpiTables<DirectMapAcpi>> {
    match rsdp.and_then(|pa| usize::try_from(pa).ok()) {
        // SAFETY: the handler maps only what the direct map holds (a zero
        // page otherwise) and the crate only reads; the crate checks the
        // RSDP's signature and checksum before it follows it.
        Some(pa) => unsafe { AcpiTables::from_rsdp(DirectMapAcpi, pa) },
        // SAFETY: thinvisor boots from a BIOS loader (multiboot): the BIOS
        // areas the search reads are identity-mapped memory, read only.
        None => unsafe { AcpiTables::search_for_rsdp_bios(DirectMapAcpi) },
    }
}

fn find_units(tables: Option<&AcpiTables<DirectMapAcpi>>) -> Result<Found, NotFound> {
    let Some(tables) = tables else {
        return Err(NotFound::NoAcpi);
    };
    if let Some((pa, bytes)) = find::<DMAR>(tables) {
        return match dmar::parse(bytes) {
            Ok(d) if d.units_dropped > 0 => Err(NotFound::TooManyUnits("DMAR")),
            Ok(dmar) => Ok(Found::VtD { dmar, table: pa }),
            Err(e) => Err(NotFound::BadDmar(pa, e)),
        };
    }
    if let Some((pa, bytes)) = find::<IVRS>(tables) {
        return match ivrs::parse(bytes) {
            Ok(i) if i.units_dropped > 0 => Err(NotFound::TooManyUnits("IVRS")),
            Ok(ivrs) => Ok(Found::AmdVi {
                ivrs,
                table: pa,
                ecam: ecam(),
            }),
            Err(e) => Err(NotFound::BadIvrs(pa, e)),
        };
    }
    Err(NotFound::NoTable)
}

/// Switches DMA remapping on: every device reaches [0, `top`) 1:1 except
/// `hidden` (thinvisor's block) and the units' registers. Under
/// `iommu=required` any failure is a boot error; under `auto` it leaves
/// the machine unprotected with one warning line.
pub fn protect(top: u64, hidden: mem::Reserved) {
    let Some(plan) = PLAN.get() else {
        return;
    };
    let Some(found) = &plan.found else {
        return;
    };
    let (names, table, sig): (&str, u64, &[u8; 4]) = match found {
        Found::VtD { table, .. } => ("Intel VT-d", *table, b"DMAR"),
        Found::AmdVi { table, .. } => ("AMD-Vi", *table, b"IVRS"),
    };
    let mut mmio = [const { 0..0 }; MAX_MMIO];
    let mut n = 0;
    match found {
        Found::VtD { dmar, .. } => {
            for u in dmar.units() {
                mmio[n] = u.register_base..u.register_base.saturating_add(u.register_len);
                n += 1;
            }
        }
        Found::AmdVi { ivrs, .. } => {
            for u in ivrs.units() {
                mmio[n] = u.base..u.base.saturating_add(amdvi::mmio_len(u));
                n += 1;
            }
        }
    }
    let mut no_dma = [const { 0..0 }; MAX_MMIO + 1];
    no_dma[0] = hidden.start..hidden.end;
    no_dma[1..=n].clone_from_slice(&mmio[..n]);
    let no_dma = &no_dma[..=n];
    if let Some(r) = mmio[..n]
        .iter()
        .find(|r| !mem::is_mapped(r.start, r.end - r.start))
    {
        unprotected(
            plan.mode,
            format_args!(
                "{names} registers at {:#x} lie outside the memory thinvisor maps",
                r.start
            ),
        );
        return;
    }
    let result = match found {
        Found::VtD { dmar, .. } => {
            for r in dmar.rmrrs() {
                if r.base < hidden.end && hidden.start <= r.limit {
                    warn!(
                        "iommu: the firmware reserves {:#x}..={:#x} for device DMA inside thinvisor's block; those devices will fault",
                        r.base, r.limit
                    );
                }
            }
            vtd::enable(dmar.units(), top, no_dma).map(Active::VtD)
        }
        Found::AmdVi { ivrs, ecam, .. } => {
            amdvi::enable(ivrs.units(), top, no_dma, *ecam).map(Active::AmdVi)
        }
    };
    let active = match result {
        Ok(a) => a,
        Err(e) => {
            unprotected(plan.mode, format_args!("{names} unusable: {e}"));
            return;
        }
    };
    let first = mmio[0].start;
    if let Found::AmdVi { ivrs, .. } = found {
        let mut ids = [0u16; MAX_MMIO];
        let mut k = 0;
        for u in ivrs.units().iter().filter(|u| u.segment == 0) {
            ids[k] = u.device_id;
            k += 1;
        }
        FUNCTIONS.call_once(|| (ids, k));
    }
    MMIO.call_once(|| (mmio, n));
    ACTIVE.call_once(|| Mutex::new(active));
    POLLING.store(true, Ordering::Release);
    hide_table(table, sig);
    info!(
        "iommu: {names}, {n} unit(s) at {:#x}: DMA remapping on, devices reach {:#x}..{top:#x} 1:1 except thinvisor's {:#x}..{:#x}; the {} table and the registers hidden from the guest",
        first,
        0,
        hidden.start,
        hidden.end,
        core::str::from_utf8(sig).unwrap_or("?"),
    );
}

/// The units' register windows, for the nested tables to hide.
pub fn mmio_ranges() -> &'static [Range<u64>] {
    MMIO.get().map_or(&[], |(r, n)| &r[..*n])
}

/// Renames the table's signature (first letter to 'X': "XMAR", "XVRS")
/// and fixes its checksum (`thinvisor_iommu::acpi::hide_table`), as
/// BitVisor does: an OS looking for a DMAR or IVRS finds none and never
/// tries to drive the IOMMU thinvisor owns.
fn hide_table(pa: u64, sig: &[u8; 4]) {
    // SAFETY: the table was found, checksum-verified and bounds-checked
    // (mapped, at most 64 KiB) by `find`; the guest does not run yet, so
    // nothing else reads or writes it now.
    let header = unsafe { mem::phys_slice_mut(pa, 8) };
    let len = u64::from(u32::from_le_bytes([
        header[4], header[5], header[6], header[7],
    ]));
    if !mem::is_mapped(pa, len) || len > MAX_TABLE_LEN as u64 {
        return;
    }
    // SAFETY: as above, `len` checked.
    let table = unsafe { mem::phys_slice_mut(pa, len) };
    if !thinvisor_iommu::acpi::hide_table(table, sig) {
        warn!(
            "iommu: could not hide the {} table from the guest",
            core::str::from_utf8(sig).unwrap_or("?")
        );
    }
}

/// Device faults seen so far.
static FAULTS: AtomicU64 = AtomicU64::new(0);
/// Faults logged one line each; after them one line every
/// [`SUMMARY_EVERY`].
const LOGGED_FAULTS: u64 = 32;
const SUMMARY_EVERY: u64 = 1024;

/// Logs one fault, rate-limited: the first [`LOGGED_FAULTS`] in full,
/// then a count every [`SUMMARY_EVERY`].
fn report(fault: &DmaFault) {
    let n = FAULTS.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= LOGGED_FAULTS {
        warn!("iommu: DMA fault: {fault}");
        if n == LOGGED_FAULTS {
            warn!("iommu: further DMA faults are counted, one line every {SUMMARY_EVERY}");
        }
    } else if n.is_multiple_of(SUMMARY_EVERY) {
        warn!("iommu: {n} DMA faults so far; the latest: {fault}");
    }
}

/// Logs a request an AMD-Vi unit aborted without an event (see
/// `amdvi::Unit::poll_pci_status`), counted and rate-limited like the
/// others.
fn report_abort(unit: thinvisor_iommu::SourceId) {
    let n = FAULTS.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= LOGGED_FAULTS || n.is_multiple_of(SUMMARY_EVERY) {
        warn!(
            "iommu: DMA fault: the AMD-Vi unit {unit} aborted a device's request (Signaled Target Abort; its event log names no device)"
        );
    }
}

/// Reads and clears what the units recorded; never blocks (another
/// processor already polling is enough).
pub fn poll() {
    if !POLLING.load(Ordering::Acquire) {
        return;
    }
    let Some(active) = ACTIVE.get() else {
        return;
    };
    let Some(mut active) = active.try_lock() else {
        return;
    };
    match &mut *active {
        Active::VtD(units) => units.poll(&mut report),
        Active::AmdVi(units) => units.poll(&mut report),
    }
}

/// The end of the run: the last faults and the count.
pub fn final_report() {
    poll();
    let n = FAULTS.load(Ordering::Relaxed);
    if POLLING.load(Ordering::Acquire) {
        info!("iommu: {n} DMA fault(s) blocked during the run");
    }
}

/// Bounded wait for a unit's register to reach a state; false on timeout
/// (never a hang on broken hardware).
pub(crate) fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..50_000_000u32 {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// 32/64-bit register access at a unit's mapped MMIO window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Regs {
    pub base: u64,
}

impl Regs {
    pub fn read32(&self, off: usize) -> u32 {
        // SAFETY: `base` is a unit's register window, checked to be in
        // the direct map (`protect`); MMIO is read with one volatile
        // access of the register's width. The MTRRs keep the window
        // uncached.
        unsafe { (mem::phys_to_virt(self.base + off as u64) as *const u32).read_volatile() }
    }
    pub fn write32(&self, off: usize, v: u32) {
        // SAFETY: as in `read32`.
        unsafe { (mem::phys_to_virt(self.base + off as u64) as *mut u32).write_volatile(v) }
    }
    pub fn read64(&self, off: usize) -> u64 {
        // SAFETY: as in `read32`.
        unsafe { (mem::phys_to_virt(self.base + off as u64) as *const u64).read_volatile() }
    }
    pub fn write64(&self, off: usize, v: u64) {
        // SAFETY: as in `read32`.
        unsafe { (mem::phys_to_virt(self.base + off as u64) as *mut u64).write_volatile(v) }
    }
}

/// Writes back and invalidates the caches, for units that do not snoop
/// their table reads.
pub(crate) fn flush_caches() {
    // SAFETY: WBINVD only writes back and drops cache lines; ring 0.
    unsafe { core::arch::asm!("wbinvd", options(nostack, preserves_flags)) };
}

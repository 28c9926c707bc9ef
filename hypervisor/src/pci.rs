//! The PCI configuration-space guard on the real machine
//! (`thinvisor_vmm::pci` decides; docs/security.md, "Guest-controlled
//! state").
//!
//! Two ways reach configuration space, and both are watched for writes:
//!
//! - Configuration mechanism #1 (PCI 3.0, 3.2.2.3.2): ports 0xCFC-0xCFF
//!   are intercepted in the I/O bitmaps; port 0xCF8 is not (OSes write it
//!   before every access). The handler reads the address the guest
//!   latched from port 0xCF8 itself. The bitmaps cannot tell IN from OUT,
//!   so reads of 0xCFC exit too; they are done at once.
//! - The ECAM window of segment 0 (the MCFG's; PCI Express Base 4.0,
//!   7.2.2) is read-only to the guest in the nested tables, whole (2 MiB
//!   and 1 GiB entries, so it costs a table or two): its writes are
//!   decoded and judged like the port's. Reads run on the hardware.
//!
//! One lock serialises every intercepted access with thinvisor's own use
//! of the ports (sizing a BAR), and the guest's CONFIG_ADDRESS is written
//! back before the lock is dropped, so a well-behaved guest (one that
//! holds its own lock from its port 0xCF8 write to its port 0xCFC access,
//! as every OS does) never notices thinvisor. thinvisor's own accesses and
//! the guest's judged write go through ECAM when the function lies in it:
//! then a hostile guest that rewrites port 0xCF8 from another processor
//! while thinvisor judges cannot redirect the write. Without ECAM (i440FX,
//! Bochs) they go through the ports, and such a guest can race thinvisor
//! (docs/security.md says so).

use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};

use log::{info, warn};
use spin::{Mutex, Once};
use thinvisor_memory::GuestPhysAddr;
use thinvisor_vmm::pci::{self, Bdf, ConfigOffset, ConfigSpace, Guard, Refusal};
use thinvisor_vmm::DeviceWrite;
use x86_64::instructions::port::Port;

use crate::iommu::{self, Ecam};
use crate::mem;

/// thinvisor's block, the IOMMUs' windows (at most 8) and ECAM.
const MAX_PROTECTED: usize = 2 + thinvisor_iommu::dmar::MAX_UNITS;

struct Setup {
    protected: [Range<u64>; MAX_PROTECTED],
    n_protected: usize,
    iommus: [Bdf; thinvisor_iommu::dmar::MAX_UNITS],
    n_iommus: usize,
    ecam: Option<Ecam>,
}

static SETUP: Once<Setup> = Once::new();
/// Serialises intercepted configuration accesses and thinvisor's own.
static LOCK: Mutex<()> = Mutex::new(());
/// The ECAM window, when it is write-protected (0..0 otherwise).
static ECAM_START: AtomicU64 = AtomicU64::new(0);
static ECAM_END: AtomicU64 = AtomicU64::new(0);

/// Decides what the guard protects: thinvisor's block, the IOMMUs'
/// registers and functions, the ECAM window. After `iommu::protect`.
pub fn init(reserved: mem::Reserved) {
    let setup = SETUP.call_once(|| {
        let mut s = Setup {
            protected: [const { 0..0 }; MAX_PROTECTED],
            n_protected: 0,
            iommus: [Bdf(0); thinvisor_iommu::dmar::MAX_UNITS],
            n_iommus: 0,
            ecam: iommu::ecam(),
        };
        let ecam = s.ecam.map(|e| e.range());
        let all = core::iter::once(reserved.start..reserved.end)
            .chain(iommu::mmio_ranges().iter().cloned())
            .chain(ecam);
        for (slot, r) in s.protected.iter_mut().zip(all) {
            *slot = r;
            s.n_protected += 1;
        }
        for (slot, &id) in s.iommus.iter_mut().zip(iommu::pci_functions()) {
            *slot = Bdf(id);
            s.n_iommus += 1;
        }
        s
    });
    let ecam = setup.ecam.map_or(0..0, |e| e.range());
    info!(
        "pci: configuration writes guarded (ports 0xcfc-0xcff, ECAM {:#x}..{:#x}): no BAR or bridge window over thinvisor's block, the IOMMUs' registers or ECAM; writes to the IOMMU's function dropped: {}",
        ecam.start,
        ecam.end,
        Functions(&setup.iommus[..setup.n_iommus]),
    );
}

/// The IOMMU functions, for the log line.
struct Functions<'a>(&'a [Bdf]);

impl core::fmt::Display for Functions<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0.is_empty() {
            return write!(f, "none");
        }
        for (i, b) in self.0.iter().enumerate() {
            write!(f, "{}{b}", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}

/// Makes the ECAM window read-only to the guest (the pass-through nested
/// tables exist). A failure leaves ECAM unwatched, which is logged.
pub fn watch_ecam() {
    let Some(range) = SETUP.get().and_then(|s| s.ecam).map(|e| e.range()) else {
        return;
    };
    match crate::passthrough::write_protect_range(range.clone()) {
        Ok(()) => {
            ECAM_START.store(range.start, Ordering::Relaxed);
            ECAM_END.store(range.end, Ordering::Release);
            info!(
                "pci: ECAM {:#x}..{:#x} read-only to the guest: its configuration writes are judged",
                range.start, range.end
            );
        }
        Err(e) => warn!(
            "pci: cannot watch ECAM {:#x}..{:#x}: {e}; its writes are not guarded",
            range.start, range.end
        ),
    }
}

/// Whether `gpa` lies in the watched ECAM window.
pub fn is_ecam(gpa: GuestPhysAddr) -> bool {
    let end = ECAM_END.load(Ordering::Acquire);
    let g = gpa.as_u64();
    end != 0 && (ECAM_START.load(Ordering::Relaxed)..end).contains(&g)
}

/// The machine's configuration space for the guard: ECAM where it covers
/// the function, else the ports.
struct Hardware {
    ecam: Option<Ecam>,
}

impl Hardware {
    fn ecam_at(&self, f: Bdf, offset: ConfigOffset) -> Option<u64> {
        self.ecam
            .and_then(|e| e.config(f.0))
            .map(|page| page + u64::from(offset.0 & 0xFFF))
    }
}

fn cf8_address(f: Bdf, offset: ConfigOffset) -> u32 {
    0x8000_0000 | (u32::from(f.0) << 8) | u32::from(offset.0 & 0xFC)
}

impl ConfigSpace for Hardware {
    fn read32(&mut self, f: Bdf, offset: ConfigOffset) -> u32 {
        if let Some(pa) = self.ecam_at(f, ConfigOffset(offset.dword())) {
            // SAFETY: ECAM (mapped, checked by `Ecam::config`), one
            // aligned dword read: configuration reads have no side
            // effects (PCI 3.0, 6.1).
            return unsafe { (mem::phys_to_virt(pa) as *const u32).read_volatile() };
        }
        if offset.0 >= 0x100 {
            return u32::MAX;
        }
        // SAFETY: configuration mechanism #1 under LOCK; the caller puts
        // the guest's CONFIG_ADDRESS back.
        unsafe {
            Port::<u32>::new(pci::CONFIG_ADDRESS).write(cf8_address(f, offset));
            Port::<u32>::new(pci::CONFIG_DATA).read()
        }
    }

    fn write(&mut self, f: Bdf, offset: ConfigOffset, size: u8, value: u32) {
        if let Some(pa) = self.ecam_at(f, offset) {
            let p = mem::phys_to_virt(pa);
            // SAFETY: ECAM, as in `read32`; a write of the guest's width
            // judged by the guard, or thinvisor's own sizing.
            unsafe {
                match size {
                    1 => p.write_volatile(value as u8),
                    2 => (p as *mut u16).write_volatile(value as u16),
                    _ => (p as *mut u32).write_volatile(value),
                }
            }
            return;
        }
        if offset.0 >= 0x100 {
            return;
        }
        let port = pci::CONFIG_DATA + (offset.0 & 3);
        // SAFETY: as in `read32`.
        unsafe {
            Port::<u32>::new(pci::CONFIG_ADDRESS).write(cf8_address(f, offset));
            match size {
                1 => Port::<u8>::new(port).write(value as u8),
                2 => Port::<u16>::new(port).write(value as u16),
                _ => Port::<u32>::new(port).write(value),
            }
        }
    }
}

/// Refusals logged: the first 8, then at powers of two.
static REFUSED: AtomicU64 = AtomicU64::new(0);

fn refused(f: Bdf, offset: ConfigOffset, size: u8, value: u32, via: &str, why: &Refusal) {
    let n = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= 8 || n.is_power_of_two() {
        warn!(
            "pci: guest write of {value:#x} ({size} bytes) to {f} offset {:#x} via {via} dropped ({n} so far): {why}",
            offset.0
        );
    }
}

fn guard(setup: &Setup) -> Guard<'_> {
    Guard {
        protected: &setup.protected[..setup.n_protected],
        iommu_functions: &setup.iommus[..setup.n_iommus],
    }
}

/// The guest's OUT to CONFIG_DATA byte `port`.
pub fn config_data_write(port: u16, size: u8, value: u32) {
    let _lock = LOCK.lock();
    // SAFETY: reading CONFIG_ADDRESS has no side effect; it is what the
    // guest latched (or what thinvisor restored after its own use).
    let cf8 = unsafe { Port::<u32>::new(pci::CONFIG_ADDRESS).read() };
    let access = pci::decode_cf8(cf8, port);
    let (Some(setup), Some(a)) = (SETUP.get(), access) else {
        // Not a configuration cycle (enable bit clear), or no guard yet.
        raw_out(port, size, value);
        return;
    };
    let mut hw = Hardware { ecam: setup.ecam };
    match guard(setup).check(&mut hw, a.function, a.offset, size, value) {
        Ok(()) if !a.extended && hw.ecam_at(a.function, a.offset).is_some() => {
            hw.write(a.function, a.offset, size, value)
        }
        Ok(()) => {
            // SAFETY: the guest's own address back in the latch.
            unsafe { Port::<u32>::new(pci::CONFIG_ADDRESS).write(cf8) };
            raw_out(port, size, value);
        }
        Err(why) => refused(a.function, a.offset, size, value, "port 0xcfc", &why),
    }
    // SAFETY: as above.
    unsafe { Port::<u32>::new(pci::CONFIG_ADDRESS).write(cf8) };
}

/// The guest's IN from CONFIG_DATA byte `port`: done as asked, under the
/// lock (thinvisor may be using the latch on another processor).
pub fn config_data_read(port: u16, size: u8) -> u32 {
    let _lock = LOCK.lock();
    // SAFETY: the guest's own configuration read.
    unsafe {
        match size {
            1 => u32::from(Port::<u8>::new(port).read()),
            2 => u32::from(Port::<u16>::new(port).read()),
            _ => Port::<u32>::new(port).read(),
        }
    }
}

fn raw_out(port: u16, size: u8, value: u32) {
    // SAFETY: the guest's own write to the data port, as it asked.
    unsafe {
        match size {
            1 => Port::<u8>::new(port).write(value as u8),
            2 => Port::<u16>::new(port).write(value as u16),
            _ => Port::<u32>::new(port).write(value),
        }
    }
}

/// The ECAM window's writes.
pub struct EcamWrites;
pub static ECAM_WRITES: EcamWrites = EcamWrites;

impl DeviceWrite for EcamWrites {
    fn write(&self, gpa: GuestPhysAddr, size: u8, value: u64) -> u64 {
        let Some(setup) = SETUP.get() else {
            return 0;
        };
        let Some(ecam) = setup.ecam else {
            return 0;
        };
        let Some((id, offset)) = ecam.locate(gpa.as_u64()) else {
            return 0;
        };
        let f = Bdf(id);
        let mut hw = Hardware { ecam: Some(ecam) };
        let _lock = LOCK.lock();
        // The old value, for XCHG: what the dword(s) held.
        let dword = ConfigOffset(offset & !3);
        let mut old = u64::from(hw.read32(f, dword)) >> (8 * (offset & 3));
        // An aligned quadword is two dwords (ECAM takes accesses up to
        // DWORD, PCI Express Base 4.0, 7.2.2.2); anything else must fit in
        // one.
        let pieces: &[(u16, u8, u32)] = match size {
            8 if offset & 7 == 0 => &[
                (offset, 4, value as u32),
                (offset + 4, 4, (value >> 32) as u32),
            ],
            _ => &[(offset, size, value as u32)],
        };
        if size == 8 && offset & 7 == 0 {
            old |= u64::from(hw.read32(f, ConfigOffset(offset + 4))) << 32;
        }
        for &(at, n, v) in pieces {
            let at = ConfigOffset(at);
            match guard(setup).write(&mut hw, f, at, n, v) {
                Ok(()) => {}
                Err(why) => refused(f, at, n, v, "ECAM", &why),
            }
        }
        old
    }
}

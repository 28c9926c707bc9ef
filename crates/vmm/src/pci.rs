//! Guest writes to PCI configuration space that would reach thinvisor
//! (docs/security.md, "Guest-controlled state"): what is refused, and
//! why.
//!
//! A pass-through guest owns every PCI function, but a few configuration
//! registers decide what answers at a physical address, thinvisor's own
//! included:
//!
//! - **Memory BARs** (PCI Local Bus 3.0, 6.2.5.1; PCI Express Base 4.0,
//!   7.5.1.2.1) and the **expansion ROM BAR** (PCI 3.0, 6.2.5.2) place a
//!   device's memory window. A window over thinvisor's block, an IOMMU's
//!   registers or the ECAM window is refused: the write is dropped and
//!   the BAR keeps its old value. Real chipsets decode DRAM below the top
//!   of low memory before PCI, so such a window would usually be dead;
//!   the guard does not rely on that.
//! - **Bridge windows** (PCI-to-PCI Bridge 1.2, 3.2.5.8-3.2.5.10; CardBus
//!   windows, PC Card 8.0 CardBus bridge): the range a bridge forwards
//!   downstream. Same rule.
//! - **The IOMMU's own function** (AMD-Vi: the function the IVRS names;
//!   AMD I/O Virtualization Technology spec 48882, 3.2: its capability
//!   block holds the IOMMU's register base): every write is dropped, so
//!   the guest can neither move the registers to a page it reaches nor
//!   switch the function off.
//! - **PCIEXBAR** of an Intel host bridge (00:00.0, offset 0x60-0x67;
//!   q35's MCH and Intel's desktop chipsets): it moves (or switches off)
//!   the ECAM window, which the guard watches. Writes are dropped.
//!
//! Sizing (writing all ones to a BAR's address bits and reading back,
//! PCI 3.0, 6.2.5.1) and every other placement pass unchanged. To know a
//! BAR's window the guard needs its size, so before a placement it sizes
//! the BAR itself, as an OS does: memory decoding off (except on host
//! bridges, which may not survive it), all ones, read back, the old value
//! back, decoding as it was.
//!
//! The hypervisor feeds writes from two paths: port 0xCFC-0xCFF with the
//! address latched in port 0xCF8 ([`decode_cf8`]), and the memory-mapped
//! ECAM window. Both end in [`Guard::write`] with a [`ConfigSpace`] that
//! reaches the real hardware.

use core::fmt;
use core::ops::Range;

/// CONFIG_ADDRESS, the address latch of configuration mechanism #1 (PCI
/// 3.0, 3.2.2.3.2).
pub const CONFIG_ADDRESS: u16 = 0xCF8;
/// CONFIG_DATA: its four bytes are ports 0xCFC-0xCFF.
pub const CONFIG_DATA: u16 = 0xCFC;

/// Whether `port` is one of CONFIG_DATA's bytes.
pub const fn is_config_data(port: u16) -> bool {
    port >= CONFIG_DATA && port <= CONFIG_DATA + 3
}

/// One PCI function: bus << 8 | device << 3 | function, the layout of a
/// requester ID (PCI Express Base 4.0, 2.2.6.2) and of the IVRS's
/// DeviceIDs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord, Hash)]
pub struct Bdf(pub u16);

impl Bdf {
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self(((bus as u16) << 8) | (((device & 0x1F) as u16) << 3) | (function & 7) as u16)
    }
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub const fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1F) as u8
    }
    pub const fn function(self) -> u8 {
        (self.0 & 7) as u8
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

/// A byte offset in a function's configuration space (0..0x1000; the
/// first 0x100 bytes are reachable through port 0xCF8).
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
pub struct ConfigOffset(pub u16);

impl ConfigOffset {
    /// The dword holding this byte.
    pub const fn dword(self) -> u16 {
        self.0 & !3
    }
}

/// One configuration access through CONFIG_DATA, decoded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Cf8Access {
    pub function: Bdf,
    /// The offset bits 7:2 of CONFIG_ADDRESS plus the data port's byte.
    pub offset: ConfigOffset,
    /// CONFIG_ADDRESS bits 27:24 were set: AMD processors with
    /// NB_CFG.EnableCf8ExtCfg take them as offset bits 11:8 (BKDG for
    /// family 10h, 2.11.1), others ignore them. The guard judges the
    /// access at `offset` (the low 256 bytes), which is where it lands
    /// when they are ignored; in the extended space above there is no
    /// register it guards but the IOMMU function, which it guards whole.
    pub extended: bool,
}

/// Decodes an access to CONFIG_DATA byte `port` (0xCFC-0xCFF) with
/// `cf8` latched in CONFIG_ADDRESS. None when its enable bit (31) is
/// clear: no configuration cycle happens then (PCI 3.0, 3.2.2.3.2).
pub const fn decode_cf8(cf8: u32, port: u16) -> Option<Cf8Access> {
    if cf8 & (1 << 31) == 0 || !is_config_data(port) {
        return None;
    }
    Some(Cf8Access {
        function: Bdf(((cf8 >> 8) & 0xFFFF) as u16),
        offset: ConfigOffset((cf8 & 0xFC) as u16 | (port & 3)),
        extended: cf8 & 0x0F00_0000 != 0,
    })
}

/// The configuration space of the real machine, as the guard reaches it.
pub trait ConfigSpace {
    /// Reads the dword at `offset` (dword-aligned) of `f`.
    fn read32(&mut self, f: Bdf, offset: ConfigOffset) -> u32;
    /// Writes `size` bytes (1, 2 or 4, within one dword) at `offset`.
    fn write(&mut self, f: Bdf, offset: ConfigOffset, size: u8, value: u32);
}

/// What a guarded register places.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WindowKind {
    /// Memory BAR `n` (0-5).
    Bar(u8),
    /// The expansion ROM BAR.
    Rom,
    /// A bridge's memory window (non-prefetchable, prefetchable, or
    /// CardBus window 0/1).
    BridgeMemory,
    BridgePrefetchable,
    CardBus(u8),
}

/// Why a configuration write was dropped.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Refusal {
    /// The write would place a window over a protected range.
    Window {
        kind: WindowKind,
        window: Range<u64>,
        protected: Range<u64>,
    },
    /// A write to an IOMMU's own function.
    IommuFunction,
    /// A write to a chipset decoder register that moves what the guard
    /// watches.
    Decoder(&'static str),
    /// A write that straddles two dwords (not a configuration access the
    /// guard can judge; hardware splits it in ways it cannot know).
    Straddles,
    /// An MSI message data value with delivery mode INIT: the device would
    /// send a processor a real INIT (docs/security.md, "INIT and SIPI").
    MsiInit,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Window {
                kind,
                window,
                protected,
            } => {
                match kind {
                    WindowKind::Bar(n) => write!(f, "BAR{n}")?,
                    WindowKind::Rom => write!(f, "expansion ROM BAR")?,
                    WindowKind::BridgeMemory => write!(f, "bridge memory window")?,
                    WindowKind::BridgePrefetchable => write!(f, "bridge prefetchable window")?,
                    WindowKind::CardBus(n) => write!(f, "CardBus memory window {n}")?,
                }
                write!(
                    f,
                    " at {:#x}..{:#x} would overlap {:#x}..{:#x}",
                    window.start, window.end, protected.start, protected.end
                )
            }
            Self::IommuFunction => write!(f, "the IOMMU's own function"),
            Self::Decoder(what) => write!(f, "the chipset's {what}"),
            Self::Straddles => write!(f, "the access straddles two dwords"),
            Self::MsiInit => write!(f, "an MSI message with delivery mode INIT"),
        }
    }
}

/// PCIEXBAR of Intel host bridges (q35: QEMU's hw/pci-host/q35.c; Intel
/// 6th-generation Core datasheet vol. 2, "PCIEXBAR", offset 0x60, 64 bits).
pub const PCIEXBAR: Range<u16> = 0x60..0x68;

const COMMAND: ConfigOffset = ConfigOffset(0x04);
const CLASS: ConfigOffset = ConfigOffset(0x08);
const HEADER: ConfigOffset = ConfigOffset(0x0C);
const COMMAND_MEMORY: u32 = 1 << 1;
const INTEL: u32 = 0x8086;
/// Base class 06 (bridge), subclass 00 (host bridge).
const HOST_BRIDGE: u32 = 0x0600;

/// The guard's view of the machine: what no window may overlap and which
/// functions belong to thinvisor.
#[derive(Clone, Copy, Debug)]
pub struct Guard<'a> {
    /// thinvisor's block, the IOMMUs' register windows, the ECAM window.
    pub protected: &'a [Range<u64>],
    /// The IOMMUs' own functions.
    pub iommu_functions: &'a [Bdf],
}

impl Guard<'_> {
    /// Judges the guest's write of `size` bytes at `offset` of `f` and,
    /// unless refused, carries it out.
    pub fn write<C: ConfigSpace>(
        &self,
        cfg: &mut C,
        f: Bdf,
        offset: ConfigOffset,
        size: u8,
        value: u32,
    ) -> Result<(), Refusal> {
        self.check(cfg, f, offset, size, value)?;
        cfg.write(f, offset, size, value);
        Ok(())
    }

    /// Judges the write without doing it. May size a BAR (which leaves
    /// it as it was).
    pub fn check<C: ConfigSpace>(
        &self,
        cfg: &mut C,
        f: Bdf,
        offset: ConfigOffset,
        size: u8,
        value: u32,
    ) -> Result<(), Refusal> {
        let byte = offset.0 & 3;
        if !matches!(size, 1 | 2 | 4) || byte + u16::from(size) > 4 || offset.0 >= 0x1000 {
            return Err(Refusal::Straddles);
        }
        if self.iommu_functions.contains(&f) {
            return Err(Refusal::IommuFunction);
        }
        let dw = offset.dword();
        if f == Bdf(0) && PCIEXBAR.contains(&dw) && is_intel_host_bridge(cfg) {
            return Err(Refusal::Decoder("PCIEXBAR (the ECAM window's base)"));
        }
        if (0x40..0x100).contains(&dw) {
            return self.msi(cfg, f, dw, byte, size, value);
        }
        if !(0x10..0x40).contains(&dw) {
            return Ok(());
        }
        let old = cfg.read32(f, ConfigOffset(dw));
        let new = merge(old, byte, size, value);
        if new == old {
            return Ok(());
        }
        let header = (cfg.read32(f, HEADER) >> 16) & 0x7F;
        match (header, dw) {
            (0, 0x10..=0x24) => self.bar(cfg, f, 6, dw, new),
            (0, 0x30) => self.rom(cfg, f, dw, new),
            (1, 0x10..=0x14) => self.bar(cfg, f, 2, dw, new),
            (1, 0x20..=0x2C) => self.bridge(cfg, f, dw, new),
            (1, 0x38) => self.rom(cfg, f, dw, new),
            (2, 0x10) => self.bar(cfg, f, 1, dw, new),
            (2, 0x1C..=0x28) => self.cardbus(cfg, f, dw, new),
            _ => Ok(()),
        }
    }

    /// A write into the capabilities: refused when it would leave the MSI
    /// capability's message data (PCI 3.0, 6.8.1: at +8, or +0xC with
    /// 64-bit addresses; bits 10:8 the delivery mode, as the local APIC's
    /// ICR, SDM vol. 3A, 11.11.2) set to deliver INIT.
    fn msi<C: ConfigSpace>(
        &self,
        cfg: &mut C,
        f: Bdf,
        dw: u16,
        byte: u16,
        size: u8,
        value: u32,
    ) -> Result<(), Refusal> {
        const STATUS_CAPABILITIES: u32 = 1 << 20;
        const CAP_MSI: u32 = 0x05;
        const MSI_64BIT: u32 = 1 << 23;
        const MODE_INIT: u32 = 5;
        if cfg.read32(f, COMMAND) & STATUS_CAPABILITIES == 0 {
            return Ok(());
        }
        // The capability list, at most 48 entries (it may loop).
        let mut at = (cfg.read32(f, ConfigOffset(0x34)) & 0xFC) as u16;
        for _ in 0..48 {
            if at < 0x40 {
                return Ok(());
            }
            let head = cfg.read32(f, ConfigOffset(at));
            if head & 0xFF == CAP_MSI {
                let data = at + if head & MSI_64BIT != 0 { 0xC } else { 0x8 };
                if dw != data {
                    return Ok(());
                }
                let new = merge(cfg.read32(f, ConfigOffset(dw)), byte, size, value);
                return if (new >> 8) & 7 == MODE_INIT {
                    Err(Refusal::MsiInit)
                } else {
                    Ok(())
                };
            }
            at = ((head >> 8) & 0xFC) as u16;
        }
        Ok(())
    }

    /// The first protected range `window` overlaps.
    fn clear_of(&self, kind: WindowKind, window: Range<u64>) -> Result<(), Refusal> {
        match self
            .protected
            .iter()
            .find(|p| p.start < window.end && window.start < p.end)
        {
            Some(p) => Err(Refusal::Window {
                kind,
                window,
                protected: p.clone(),
            }),
            None => Ok(()),
        }
    }

    /// A write of `new` to dword `dw` among a function's `count` BARs from
    /// 0x10: finds the BAR it belongs to (a 64-bit BAR takes two slots).
    fn bar<C: ConfigSpace>(
        &self,
        cfg: &mut C,
        f: Bdf,
        count: u16,
        dw: u16,
        new: u32,
    ) -> Result<(), Refusal> {
        let end = 0x10 + 4 * count;
        let mut at = 0x10;
        while at < end && at <= dw {
            let v = cfg.read32(f, ConfigOffset(at));
            if v & 1 != 0 {
                // An I/O BAR: I/O space never reaches memory.
                at += 4;
                continue;
            }
            let is64 = (v >> 1) & 3 == 2 && at + 4 < end;
            if at == dw || (is64 && at + 4 == dw) {
                return self.memory_bar(cfg, f, at, is64, dw, new);
            }
            at += if is64 { 8 } else { 4 };
        }
        Ok(())
    }

    fn memory_bar<C: ConfigSpace>(
        &self,
        cfg: &mut C,
        f: Bdf,
        lo_at: u16,
        is64: bool,
        dw: u16,
        new: u32,
    ) -> Result<(), Refusal> {
        let sizing = if dw == lo_at {
            new | 0xF == u32::MAX
        } else {
            new == u32::MAX
        };
        if sizing {
            return Ok(());
        }
        let lo = ConfigOffset(lo_at);
        let hi = ConfigOffset(lo_at + 4);
        let lo_old = cfg.read32(f, lo);
        let hi_old = if is64 { cfg.read32(f, hi) } else { 0 };
        let (lo_new, hi_new) = if dw == lo_at {
            (new, hi_old)
        } else {
            (lo_old, new)
        };
        let masks = size(
            cfg,
            f,
            &[(lo, lo_old), (hi, hi_old)][..if is64 { 2 } else { 1 }],
        );
        let mask = if is64 {
            (u64::from(masks[1]) << 32) | u64::from(masks[0] & !0xF)
        } else {
            u64::from(masks[0] & !0xF)
        };
        if mask == 0 {
            // Not implemented (reads as zero): no window.
            return Ok(());
        }
        let base = ((u64::from(hi_new) << 32) | u64::from(lo_new & !0xF)) & mask;
        let len = 1u64 << mask.trailing_zeros();
        let index = ((lo_at - 0x10) / 4) as u8;
        self.clear_of(WindowKind::Bar(index), base..base.saturating_add(len))
    }

    fn rom<C: ConfigSpace>(&self, cfg: &mut C, f: Bdf, dw: u16, new: u32) -> Result<(), Refusal> {
        const ADDRESS: u32 = 0xFFFF_F800;
        if new & ADDRESS == ADDRESS {
            return Ok(());
        }
        let at = ConfigOffset(dw);
        let old = cfg.read32(f, at);
        // Sized with the enable bit clear (PCI 3.0, 6.2.5.2).
        let mask = size(cfg, f, &[(at, old & !1)])[0] & ADDRESS;
        if old & 1 != 0 {
            cfg.write(f, at, 4, old);
        }
        if mask == 0 {
            return Ok(());
        }
        let base = u64::from(new & mask);
        let len = 1u64 << mask.trailing_zeros();
        self.clear_of(WindowKind::Rom, base..base + len)
    }

    /// A type 1 header's memory window (0x20) or prefetchable window
    /// (0x24, upper halves 0x28 and 0x2C): 1 MiB granular, base and
    /// limit inclusive; empty when the base lies above the limit.
    fn bridge<C: ConfigSpace>(
        &self,
        cfg: &mut C,
        f: Bdf,
        dw: u16,
        new: u32,
    ) -> Result<(), Refusal> {
        // The window's capability bits (64-bit or not) are read-only: the
        // register's, whatever the guest wrote there.
        let wide = cfg.read32(f, ConfigOffset(0x24)) & 0xF == 1;
        let mut read = |at: u16| {
            if at == dw {
                new
            } else {
                cfg.read32(f, ConfigOffset(at))
            }
        };
        let (kind, base, limit) = if dw == 0x20 {
            let v = read(0x20);
            (
                WindowKind::BridgeMemory,
                u64::from(v & 0xFFF0) << 16,
                (u64::from((v >> 16) & 0xFFF0) << 16) | 0xF_FFFF,
            )
        } else {
            let v = read(0x24);
            let (bu, lu) = if wide {
                (u64::from(read(0x28)), u64::from(read(0x2C)))
            } else {
                (0, 0)
            };
            (
                WindowKind::BridgePrefetchable,
                (bu << 32) | (u64::from(v & 0xFFF0) << 16),
                (lu << 32) | (u64::from((v >> 16) & 0xFFF0) << 16) | 0xF_FFFF,
            )
        };
        if base > limit {
            return Ok(());
        }
        self.clear_of(kind, base..limit.saturating_add(1))
    }

    /// A CardBus bridge's memory windows: base 0x1C/0x24, limit
    /// 0x20/0x28, 4 KiB granular, inclusive.
    fn cardbus<C: ConfigSpace>(
        &self,
        cfg: &mut C,
        f: Bdf,
        dw: u16,
        new: u32,
    ) -> Result<(), Refusal> {
        let first = if dw < 0x24 { 0x1C } else { 0x24 };
        let mut read = |at: u16| {
            if at == dw {
                new
            } else {
                cfg.read32(f, ConfigOffset(at))
            }
        };
        let base = u64::from(read(first) & !0xFFF);
        let limit = u64::from(read(first + 4) | 0xFFF);
        if base > limit {
            return Ok(());
        }
        let n = u8::from(first == 0x24);
        self.clear_of(WindowKind::CardBus(n), base..limit + 1)
    }
}

/// Whether 00:00.0 is an Intel host bridge (its PCIEXBAR at 0x60).
fn is_intel_host_bridge<C: ConfigSpace>(cfg: &mut C) -> bool {
    cfg.read32(Bdf(0), ConfigOffset(0)) & 0xFFFF == INTEL
        && cfg.read32(Bdf(0), CLASS) >> 16 == HOST_BRIDGE
}

/// The size masks of the given BAR dwords (each with the value it holds):
/// memory decoding off unless `f` is a host bridge, all ones into each,
/// read back, the old values back, decoding as it was.
fn size<C: ConfigSpace>(cfg: &mut C, f: Bdf, dwords: &[(ConfigOffset, u32)]) -> [u32; 2] {
    let command = cfg.read32(f, COMMAND) & 0xFFFF;
    let host_bridge = cfg.read32(f, CLASS) >> 16 == HOST_BRIDGE;
    let off = command & COMMAND_MEMORY != 0 && !host_bridge;
    if off {
        // The Status half written as zeros: its bits are write-1-to-clear.
        cfg.write(f, COMMAND, 2, command & !COMMAND_MEMORY);
    }
    let mut masks = [0; 2];
    for (mask, &(at, _)) in masks.iter_mut().zip(dwords) {
        cfg.write(f, at, 4, u32::MAX);
        *mask = cfg.read32(f, at);
    }
    for &(at, old) in dwords {
        cfg.write(f, at, 4, old);
    }
    if off {
        cfg.write(f, COMMAND, 2, command);
    }
    masks
}

/// `old` with `size` bytes of `value` at byte `byte`.
const fn merge(old: u32, byte: u16, size: u8, value: u32) -> u32 {
    let mask = match size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => u32::MAX,
    } << (8 * byte);
    (old & !mask) | ((value << (8 * byte)) & mask)
}

#[cfg(test)]
mod tests;

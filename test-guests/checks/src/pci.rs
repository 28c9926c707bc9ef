//! PCI configuration writes that would reach thinvisor (docs/security.md,
//! "Guest-controlled state"): a memory BAR moved over thinvisor's block is
//! dropped (the BAR reads back unchanged) and logged; an ordinary
//! placement and sizing work; on AMD-Vi the IOMMU's own function ignores
//! the guest's writes. Through ports 0xCF8/0xCFC and, where the machine
//! has one (q35), through ECAM.

use crate::cpu::{inl, outl};
use crate::passthrough::{self, ensure, fail, map_identity_2m, thinvisor_block, CheckResult, Why};

fn port_read(bdf: u32, offset: u32) -> u32 {
    outl(0xCF8, 0x8000_0000 | bdf << 8 | (offset & 0xFC));
    inl(0xCFC)
}

fn port_write(bdf: u32, offset: u32, value: u32) {
    outl(0xCF8, 0x8000_0000 | bdf << 8 | (offset & 0xFC));
    outl(0xCFC, value);
}

/// How configuration space is reached.
#[derive(Clone, Copy)]
enum Via {
    Ports,
    /// ECAM at this base (bus 0).
    Ecam(u64),
}

impl Via {
    fn read(self, bdf: u32, offset: u32) -> u32 {
        match self {
            Via::Ports => port_read(bdf, offset),
            // SAFETY: ECAM, identity-mapped uncached by `ecam_base`.
            Via::Ecam(base) => unsafe {
                ((base + (u64::from(bdf) << 12) + u64::from(offset)) as *const u32).read_volatile()
            },
        }
    }

    fn write(self, bdf: u32, offset: u32, value: u32) {
        match self {
            Via::Ports => port_write(bdf, offset, value),
            // SAFETY: as in `read`; thinvisor judges the store.
            Via::Ecam(base) => unsafe {
                ((base + (u64::from(bdf) << 12) + u64::from(offset)) as *mut u32)
                    .write_volatile(value)
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Via::Ports => "port 0xcfc",
            Via::Ecam(_) => "ECAM",
        }
    }
}

/// The ECAM window thinvisor watches (its line `pci: configuration writes
/// guarded (ports 0xcfc-0xcff, ECAM 0xSTART..0xEND)`), mapped; None
/// without one.
fn ecam_base() -> Result<Option<u64>, Why> {
    const KEY: &[u8] = b"pci: configuration writes guarded (ports 0xcfc-0xcff, ECAM ";
    let log = passthrough::read_log()?;
    let Some(at) = log.windows(KEY.len()).position(|w| w == KEY) else {
        fail!("no \"pci: configuration writes guarded\" line in thinvisor's log")
    };
    let Some((start, rest)) = passthrough::hex(&log[at + KEY.len()..]) else {
        fail!("cannot parse the ECAM window in thinvisor's log")
    };
    let end = rest
        .strip_prefix(b"..")
        .and_then(passthrough::hex)
        .map_or(0, |(e, _)| e);
    if start == end {
        return Ok(None);
    }
    // Bus 0's 1 MiB.
    map_identity_2m(start, true);
    Ok(Some(start))
}

/// Lines of thinvisor's log that say a configuration write was dropped.
fn dropped_lines() -> Result<usize, Why> {
    const KEY: &[u8] = b"pci: guest write of ";
    let log = passthrough::read_log()?;
    Ok(log.windows(KEY.len()).filter(|w| *w == KEY).count())
}

/// A memory BAR of at most 256 MiB on bus 0 to play with: (bdf, BAR
/// offset, size mask), not of a host bridge or an IOMMU (class 08/06).
fn find_memory_bar() -> Option<(u32, u32, u32)> {
    for bdf in 0..256u32 {
        if port_read(bdf, 0) & 0xFFFF == 0xFFFF {
            continue;
        }
        let class = port_read(bdf, 8) >> 16;
        if (port_read(bdf, 0xC) >> 16) & 0x7F != 0 || class == 0x0600 || class == 0x0806 {
            continue;
        }
        for bar in (0x10..0x28).step_by(4) {
            let v = port_read(bdf, bar);
            if v & 1 != 0 || (v >> 1) & 3 == 2 && port_read(bdf, bar + 4) != 0 {
                continue;
            }
            // Size it as an OS does: memory decoding off meanwhile.
            let command = port_read(bdf, 4) & 0xFFFF;
            port_write(bdf, 4, command & !2);
            port_write(bdf, bar, u32::MAX);
            let mask = port_read(bdf, bar) & !0xF;
            port_write(bdf, bar, v);
            port_write(bdf, 4, command);
            if mask >= 0xF000_0000 {
                return Some((bdf, bar, mask));
            }
        }
    }
    None
}

/// A thinvisor VMM call still answers.
fn thinvisor_answers(what: &str) -> CheckResult {
    ensure!(
        passthrough::lookup("dbgsh") != 0,
        "{what}: thinvisor's lookup of dbgsh returned 0"
    );
    Ok(())
}

/// The moves of one BAR through `via`: over thinvisor's block (dropped,
/// logged), to a free address and back (done), sizing (done).
fn move_bar(via: Via, bdf: u32, bar: u32, mask: u32) -> CheckResult {
    let (start, end) = thinvisor_block()?;
    ensure!(end <= 1 << 32, "thinvisor's block lies above 4 GiB");
    let old = via.read(bdf, bar);
    let command = via.read(bdf, 4) & 0xFFFF;
    via.write(bdf, 4, command & !2);
    let result = (|| {
        let before = dropped_lines()?;
        for target in [start as u32, (end - 0x1000) as u32] {
            via.write(bdf, bar, target & mask);
            let now = via.read(bdf, bar);
            ensure!(
                now == old,
                "{}: BAR {bar:#x} of {bdf:#x} moved over thinvisor's block: reads {now:#x}, was {old:#x}",
                via.name()
            );
        }
        let after = dropped_lines()?;
        ensure!(
            after >= before + 2,
            "{}: thinvisor logged {} dropped writes for 2 refused moves",
            via.name(),
            after - before
        );
        // A free address: 0xC000_0000 or 0x9000_0000, aligned to the
        // BAR's size, clear of the block.
        let size = u64::from(!mask) + 1;
        let free = [0xC000_0000u64, 0x9000_0000]
            .into_iter()
            .map(|a| a.next_multiple_of(size))
            .find(|&a| a + size <= start || a >= end)
            .unwrap_or(0xC000_0000);
        via.write(bdf, bar, free as u32);
        let now = via.read(bdf, bar) & !0xF;
        ensure!(
            u64::from(now) == free,
            "{}: BAR {bar:#x} placed at {free:#x} reads {now:#x}",
            via.name()
        );
        via.write(bdf, bar, u32::MAX);
        let sized = via.read(bdf, bar) & !0xF;
        ensure!(
            sized == mask,
            "{}: sizing read {sized:#x}, not {mask:#x}",
            via.name()
        );
        via.write(bdf, bar, old);
        ensure!(
            via.read(bdf, bar) == old,
            "{}: BAR not back at {old:#x}",
            via.name()
        );
        Ok(())
    })();
    via.write(bdf, bar, old);
    via.write(bdf, 4, command);
    result?;
    thinvisor_answers(via.name())?;
    say!(
        "test-guest: {}: BAR {bar:#x} of {:02x}:{:02x}.{} (mask {mask:#x}) refused over thinvisor, moved and sized",
        via.name(),
        bdf >> 8,
        (bdf >> 3) & 0x1F,
        bdf & 7
    );
    Ok(())
}

/// `pci_bar_guarded`: a memory BAR on bus 0, moved over thinvisor's block
/// through the ports (and ECAM where there is one), reads back unchanged
/// and thinvisor logs the dropped write; moved to a free address and back,
/// and sized, it works; thinvisor answers afterwards.
pub fn pci_bar_guarded() -> CheckResult {
    let Some((bdf, bar, mask)) = find_memory_bar() else {
        fail!("no PCI function on bus 0 with a 32-bit memory BAR")
    };
    move_bar(Via::Ports, bdf, bar, mask)?;
    if let Some(base) = ecam_base()? {
        move_bar(Via::Ecam(base), bdf, bar, mask)?;
    }
    Ok(())
}

/// `pci_iommu_function_guarded`: the IOMMU's own function (thinvisor's
/// line `writes to the IOMMU's function dropped: BB:DD.F`): a new value
/// for the base-address register of its IOMMU capability (ID 0x0F, AMD
/// I/O Virtualization Technology spec 48882, 3.2.1) reads back
/// unchanged, through the ports and ECAM; the checks after this one show
/// DMA is still blocked. On a machine whose IOMMU is no PCI function
/// (VT-d) there is nothing to do.
pub fn pci_iommu_function_guarded() -> CheckResult {
    const KEY: &[u8] = b"writes to the IOMMU's function dropped: ";
    let log = passthrough::read_log()?;
    let Some(at) = log.windows(KEY.len()).position(|w| w == KEY) else {
        fail!("no \"writes to the IOMMU's function dropped\" in thinvisor's log")
    };
    let rest = &log[at + KEY.len()..];
    if rest.starts_with(b"none") {
        say!("NOTE pci_iommu_function_guarded: the IOMMU is no PCI function");
        return Ok(());
    }
    let field = |s: &[u8]| {
        core::str::from_utf8(s)
            .ok()
            .and_then(|t| u32::from_str_radix(t, 16).ok())
    };
    let (Some(bus), Some(dev), Some(func)) = (
        rest.get(0..2).and_then(field),
        rest.get(3..5).and_then(field),
        rest.get(6..7).and_then(field),
    ) else {
        fail!("cannot parse the IOMMU's function in thinvisor's log")
    };
    let bdf = bus << 8 | dev << 3 | func;
    // The capability list (status bit 4, pointer at 0x34).
    ensure!(
        port_read(bdf, 4) & (1 << 20) != 0,
        "the IOMMU function has no capability list"
    );
    let mut cap = port_read(bdf, 0x34) & 0xFC;
    let mut found = None;
    for _ in 0..48 {
        if cap < 0x40 {
            break;
        }
        let header = port_read(bdf, cap);
        if header & 0xFF == 0x0F {
            found = Some(cap);
            break;
        }
        cap = (header >> 8) & 0xFC;
    }
    let Some(cap) = found else {
        fail!("no IOMMU capability (ID 0x0f) in {bdf:#x}'s list")
    };
    let before = dropped_lines()?;
    let mut vias = [Some(Via::Ports), None];
    if let Some(base) = ecam_base()? {
        vias[1] = Some(Via::Ecam(base));
    }
    for via in vias.into_iter().flatten() {
        let old = via.read(bdf, cap + 4);
        // Base low: bit 0 Enable, address bits 31:14; somewhere else.
        via.write(bdf, cap + 4, (old ^ 0x0010_0000) | 1);
        let now = via.read(bdf, cap + 4);
        ensure!(
            now == old,
            "{}: the IOMMU's base register reads {now:#x}, was {old:#x}",
            via.name()
        );
        let command = via.read(bdf, 4) & 0xFFFF;
        via.write(bdf, 4, command ^ 0x2);
        let now = via.read(bdf, 4) & 0xFFFF;
        ensure!(
            now == command,
            "{}: command register {command:#x} became {now:#x}",
            via.name()
        );
    }
    ensure!(
        dropped_lines()? > before,
        "thinvisor logged no dropped write to the IOMMU function"
    );
    thinvisor_answers("after the IOMMU function writes")?;
    say!("test-guest: writes to the IOMMU function {bdf:#x} (capability at {cap:#x}) dropped");
    Ok(())
}

//! Intel VT-d: programming the remapping units (VT-d spec rev. 4.1,
//! 6.5 "Invalidation", 10.4 "Register Descriptions"), with
//! register-based invalidation (the units are left in the state the
//! spec's reset describes: no queued invalidation, no interrupt
//! remapping, so the Context Command and IOTLB registers work).
//!
//! Caching mode (CAP.CM, set by virtual IOMMUs) lets a unit cache
//! not-present entries, which software must then invalidate when it makes
//! them present; thinvisor never changes the tables once translation is
//! on, and the global invalidations before TE cover the rest.

use core::ops::Range;

use thinvisor_iommu::dmar::Drhd;
use thinvisor_iommu::tables::{self, Format, Identity};
use thinvisor_iommu::vtd::{self as spec, Caps};
use thinvisor_iommu::DmaFault;

use super::{flush_caches, wait_for, Regs};
use crate::mem;

/// The remapping units, once translation is on.
pub struct Units {
    units: [Option<(Regs, Caps)>; thinvisor_iommu::dmar::MAX_UNITS],
}

/// Issues the one-shot GCMD `command` and waits for GSTS to report `done`
/// (`set`: the bit set, else clear).
fn command(r: Regs, command: u32, status: u32, set: bool) -> Result<(), &'static str> {
    let gsts = r.read32(spec::GSTS);
    r.write32(spec::GCMD, spec::gcmd(gsts, command));
    if wait_for(|| (r.read32(spec::GSTS) & status != 0) == set) {
        Ok(())
    } else {
        Err("a remapping unit did not complete a global command")
    }
}

/// Turns a persistent GCMD state (TE, QIE, IRE) off, if on.
fn turn_off(r: Regs, bit: u32) -> Result<(), &'static str> {
    let gsts = r.read32(spec::GSTS);
    if gsts & bit == 0 {
        return Ok(());
    }
    r.write32(spec::GCMD, spec::gcmd(gsts, 0) & !bit);
    if wait_for(|| r.read32(spec::GSTS) & bit == 0) {
        Ok(())
    } else {
        Err("a remapping unit did not turn a feature off")
    }
}

/// Builds the tables and switches every unit on.
pub fn enable(units: &[Drhd], top: u64, hidden: &[Range<u64>]) -> Result<Units, &'static str> {
    let mut all = Units {
        units: [None; thinvisor_iommu::dmar::MAX_UNITS],
    };
    let mut levels = None;
    let (mut huge_2m, mut huge_1g, mut coherent) = (true, true, true);
    for (slot, u) in all.units.iter_mut().zip(units) {
        let r = Regs {
            base: u.register_base,
        };
        let caps = Caps {
            cap: r.read64(spec::CAP),
            ecap: r.read64(spec::ECAP),
        };
        if caps.cap == u64::MAX || caps.cap == 0 {
            return Err("a remapping unit's registers read as all ones or zeros");
        }
        let l = caps
            .levels_for(top)
            .ok_or("no common address width covers the machine's memory")?;
        // A 3-level unit beside a 4-level one: no common table.
        match levels {
            Some(prev) if prev != l => return Err("the units support different table depths"),
            _ => levels = Some(l),
        }
        huge_2m &= caps.large_2m();
        huge_1g &= caps.large_1g() && caps.large_2m();
        coherent &= caps.coherent();
        log::debug!(
            "iommu: VT-d unit at {:#x}: version {:#x}, CAP {:#x}, ECAP {:#x}",
            u.register_base,
            r.read32(spec::VER),
            caps.cap,
            caps.ecap
        );
        *slot = Some((r, caps));
    }
    let levels = levels.ok_or("no remapping unit")?;
    let built = tables::build(
        &mut mem::HeapTables,
        Format::VtdSecondLevel,
        &Identity {
            top,
            hidden,
            levels,
            huge_2m,
            huge_1g,
        },
    )
    .map_err(|_| "out of memory for the DMA remapping tables")?;
    let root = spec::root_and_context(&mut mem::HeapTables, built.root, levels)
        .ok_or("out of memory for the root and context tables")?;
    log::debug!(
        "iommu: VT-d tables: {levels} levels, {} second-level tables, root table at {:#x}",
        built.tables,
        root.as_u64()
    );
    if !coherent {
        flush_caches();
    }
    for (r, caps) in all.units.iter().flatten() {
        enable_unit(*r, caps, root.as_u64())?;
    }
    Ok(all)
}

/// One unit: faults masked and cleared (they are polled), queued
/// invalidation and interrupt remapping off (register-based invalidation
/// needs QIE clear, 6.5.1; remapped interrupts would need a table thinvisor
/// does not build), root table set, context cache and IOTLB invalidated
/// globally, translation on (10.4.4's sequence).
fn enable_unit(r: Regs, caps: &Caps, root: u64) -> Result<(), &'static str> {
    turn_off(r, spec::GCMD_TE)?;
    turn_off(r, spec::GCMD_IRE)?;
    turn_off(r, spec::GCMD_QIE)?;
    r.write32(spec::FECTL, spec::FECTL_IM);
    clear_faults(r, caps, &mut |_| {});
    r.write64(spec::RTADDR, root);
    command(r, spec::GCMD_SRTP, spec::GCMD_SRTP, true)?;
    if caps.rwbf() {
        command(r, spec::GCMD_WBF, spec::GCMD_WBF, false)?;
    }
    r.write64(spec::CCMD, spec::CCMD_ICC | spec::CCMD_CIRG_GLOBAL);
    if !wait_for(|| r.read64(spec::CCMD) & spec::CCMD_ICC == 0) {
        return Err("the context-cache invalidation did not complete");
    }
    let iotlb = caps.iotlb_offset() + 8;
    r.write64(
        iotlb,
        spec::IOTLB_IVT | spec::IOTLB_IIRG_GLOBAL | spec::IOTLB_DR_DW,
    );
    if !wait_for(|| r.read64(iotlb) & spec::IOTLB_IVT == 0) {
        return Err("the IOTLB invalidation did not complete");
    }
    command(r, spec::GCMD_TE, spec::GCMD_TE, true)
}

/// Reads every fault recording register that holds a fault, reports it
/// and clears it (F is write-1-to-clear, in the register's last dword),
/// then clears the overflow status (10.4.9, 10.4.14).
fn clear_faults(r: Regs, caps: &Caps, report: &mut dyn FnMut(&DmaFault)) {
    let fsts = r.read32(spec::FSTS);
    if fsts & (spec::FSTS_PPF | spec::FSTS_PFO) == 0 {
        return;
    }
    let first = caps.fault_recording_offset();
    for i in 0..caps.fault_records() {
        let at = first + 16 * i;
        let (low, high) = (r.read64(at), r.read64(at + 8));
        if let Some(fault) = spec::decode_fault(low, high) {
            report(&fault);
            r.write32(at + 12, 1 << 31);
        }
    }
    if fsts & spec::FSTS_PFO != 0 {
        log::warn!("iommu: a VT-d unit's fault records overflowed; some faults were not recorded");
    }
    r.write32(spec::FSTS, fsts & spec::FSTS_CLEAR);
}

impl Units {
    /// Logs and clears the faults of every unit.
    pub fn poll(&mut self, report: &mut dyn FnMut(&DmaFault)) {
        for (r, caps) in self.units.iter().flatten() {
            clear_faults(*r, caps, report);
        }
    }
}

//! The MSR writes that reach thinvisor's memory through the processor
//! (docs/security.md): the local APIC's window moved over thinvisor's
//! block, and MTRRs that would make the block uncached, are refused with
//! #GP and change nothing; the same MSRs written harmlessly still work.

use crate::cpu;
use crate::passthrough::{ensure, fail, thinvisor_block, why, CheckResult, Why};
use crate::recover::{self, Caught, GP};

const IA32_APIC_BASE: u32 = 0x1B;
const IA32_MTRRCAP: u32 = 0xFE;
const IA32_MTRR_DEF_TYPE: u32 = 0x2FF;
const IA32_MTRR_PHYSBASE0: u32 = 0x200;
/// PHYSMASKn.V and MTRRdefType.E.
const MTRR_VALID: u64 = 1 << 11;

fn rdmsr(msr: u32) -> Result<u64, Why> {
    recover::rdmsr(msr, GP)
        .map_err(|c| why(format_args!("RDMSR {msr:#x} raised vector {}", c.vector)))
}

/// WRMSR that thinvisor must refuse with #GP, leaving the MSR as it was.
///
/// # Safety
/// If thinvisor let the write through, the value must not break the guest
/// before it is put back (the caller passes what to restore).
unsafe fn expect_refused(msr: u32, value: u64, restore: u64, what: &str) -> CheckResult {
    // SAFETY: passed on from the caller.
    match unsafe { recover::wrmsr(msr, value, GP) } {
        Err(Caught { vector, .. }) if vector == u64::from(GP) => {}
        Ok(()) => {
            // SAFETY: the value the MSR held before.
            let _ = unsafe { recover::wrmsr(msr, restore, GP) };
            fail!("{what}: WRMSR {msr:#x} = {value:#x} was accepted")
        }
        Err(c) => fail!("{what}: WRMSR {msr:#x} raised vector {}", c.vector),
    }
    let now = rdmsr(msr)?;
    ensure!(
        now == restore,
        "{what}: MSR {msr:#x} is {now:#x} after the refused write, was {restore:#x}"
    );
    Ok(())
}

/// `apic_base_guarded`: IA32_APIC_BASE over thinvisor's first and last
/// page raises #GP; rewriting its own value works.
pub fn apic_base_guarded() -> CheckResult {
    let (start, end) = thinvisor_block()?;
    let base = rdmsr(IA32_APIC_BASE)?;
    let flags = base & 0xFFF;
    for page in [start, end - 0x1000] {
        // SAFETY: refused by thinvisor; if not, put back at once (nothing
        // touches the APIC in between).
        unsafe {
            expect_refused(
                IA32_APIC_BASE,
                page | flags,
                base,
                "the APIC over thinvisor",
            )
        }?;
    }
    // SAFETY: the value it holds.
    unsafe { recover::wrmsr(IA32_APIC_BASE, base, GP) }.map_err(|c| {
        why(format_args!(
            "rewriting IA32_APIC_BASE raised vector {}",
            c.vector
        ))
    })?;
    ensure!(
        rdmsr(IA32_APIC_BASE)? == base,
        "IA32_APIC_BASE changed by rewriting it"
    );
    Ok(())
}

/// A VMM call thinvisor must answer (a lookup of "dbgsh"): proof it runs
/// on, whatever the memory type of its block.
fn thinvisor_answers(what: &str) -> CheckResult {
    let name = b"dbgsh\0";
    let mut r = cpu::Regs {
        rax: thinvisor_abi::FN_LOOKUP,
        rbx: name.as_ptr() as u64,
        ..cpu::Regs::default()
    };
    cpu::vmm_call(&mut r);
    ensure!(r.rax != 0, "{what}: thinvisor's lookup of dbgsh returned 0");
    Ok(())
}

/// `mtrr_guarded`: a variable MTRR making thinvisor's first 2 MiB
/// write-combining, and a write-combining default, raise #GP and change
/// nothing; the same range uncached, and the MTRRs switched off for an
/// update (all memory uncached, as an OS does), are done and harmless:
/// thinvisor answers meanwhile.
pub fn mtrr_guarded() -> CheckResult {
    if cpu::cpuid(1, 0)[3] & (1 << 12) == 0 {
        say!("NOTE mtrr_guarded: no MTRRs on this processor");
        return Ok(());
    }
    let (start, _) = thinvisor_block()?;
    let max_phys = if cpu::cpuid(0x8000_0000, 0)[0] >= 0x8000_0008 {
        cpu::cpuid(0x8000_0008, 0)[0] & 0xFF
    } else {
        36
    };
    let phys_mask = (1u64 << max_phys) - 1;
    let vcnt = (rdmsr(IA32_MTRRCAP)? & 0xFF) as u32;
    let Some(n) = (0..vcnt.min(16))
        .find(|&n| rdmsr(IA32_MTRR_PHYSBASE0 + 2 * n + 1).is_ok_and(|m| m & MTRR_VALID == 0))
    else {
        say!("NOTE mtrr_guarded: no free variable MTRR");
        return Ok(());
    };
    let (base_msr, mask_msr) = (IA32_MTRR_PHYSBASE0 + 2 * n, IA32_MTRR_PHYSBASE0 + 2 * n + 1);
    let old_base = rdmsr(base_msr)?;
    let old_mask = rdmsr(mask_msr)?;
    let block_2m = start & phys_mask & !0x1F_FFFF;
    let mask = (!((2u64 << 20) - 1) & phys_mask) | MTRR_VALID;
    let result = (|| {
        // WC (type 1) while the mask is not valid: no type changes yet.
        // SAFETY: an invalid pair has no effect.
        unsafe { recover::wrmsr(base_msr, block_2m | 1, GP) }
            .map_err(|c| why(format_args!("PHYSBASE{n} raised vector {}", c.vector)))?;
        // Valid over 2 MiB of thinvisor's block: refused.
        // SAFETY: refused by thinvisor; if not, the old mask goes back at
        // once.
        unsafe { expect_refused(mask_msr, mask, old_mask, "WC over thinvisor") }?;
        // The same range uncached: done, and thinvisor runs on.
        // SAFETY: an invalid pair has no effect; then 2 MiB of thinvisor's
        // memory uncached, which the guest does not use.
        unsafe {
            recover::wrmsr(base_msr, block_2m, GP).and_then(|()| recover::wrmsr(mask_msr, mask, GP))
        }
        .map_err(|c| why(format_args!("UC over thinvisor raised vector {}", c.vector)))?;
        thinvisor_answers("its block uncached")
    })();
    // SAFETY: the pair's own old values, mask first (invalid again).
    unsafe {
        let _ = recover::wrmsr(mask_msr, old_mask, GP);
        let _ = recover::wrmsr(base_msr, old_base, GP);
    }
    result?;
    let def = rdmsr(IA32_MTRR_DEF_TYPE)?;
    if def & MTRR_VALID != 0 {
        // A write-combining default: refused.
        // SAFETY: refused by thinvisor; if not, put back at once.
        unsafe { expect_refused(IA32_MTRR_DEF_TYPE, (def & !0xFF) | 1, def, "default WC") }?;
        // MTRRs off and on again, as an OS's MTRR update does.
        // SAFETY: all memory uncached for a moment, then as it was.
        let off = unsafe { recover::wrmsr(IA32_MTRR_DEF_TYPE, def & !MTRR_VALID, GP) };
        let answered = thinvisor_answers("MTRRs off");
        // SAFETY: the value it held.
        let on = unsafe { recover::wrmsr(IA32_MTRR_DEF_TYPE, def, GP) };
        off.map_err(|c| why(format_args!("MTRRs off raised vector {}", c.vector)))?;
        on.map_err(|c| why(format_args!("MTRRs back on raised vector {}", c.vector)))?;
        answered?;
    }
    Ok(())
}

const IA32_PAT: u32 = 0x277;

/// `pat_guarded`: PAT entry 0 (the type of every mapping with PAT, PCD
/// and PWT clear, thinvisor's own under VT-x) set to write-combining.
/// Under VT-x the processor's PAT is thinvisor's too: refused with #GP.
/// Under SVM the guest has its own (G_PAT): accepted, and thinvisor runs
/// on. Either way the PAT is put back.
pub fn pat_guarded() -> CheckResult {
    let pat = rdmsr(IA32_PAT)?;
    let wc0 = (pat & !0x7) | 1;
    let [_, b, c, d] = cpu::cpuid(0, 0);
    let intel = [b, d, c] == [0x756E_6547, 0x4965_6E69, 0x6C65_746E]; // "GenuineIntel"
    if intel {
        // SAFETY: refused by thinvisor; if not, put back at once.
        unsafe { expect_refused(IA32_PAT, wc0, pat, "PAT entry 0 WC under VT-x") }?;
    } else {
        // SAFETY: the guest's own PAT: its memory is write-combining for
        // a moment (this processor only, nothing shared is written).
        let set = unsafe { recover::wrmsr(IA32_PAT, wc0, GP) };
        let answered = thinvisor_answers("PAT entry 0 WC under SVM");
        // SAFETY: the value it held.
        let back = unsafe { recover::wrmsr(IA32_PAT, pat, GP) };
        set.map_err(|c| why(format_args!("PAT entry 0 WC raised vector {}", c.vector)))?;
        back.map_err(|c| why(format_args!("restoring the PAT raised vector {}", c.vector)))?;
        answered?;
    }
    ensure!(rdmsr(IA32_PAT)? == pat, "the PAT is not as it was");
    Ok(())
}

/// `lvt_init_dropped`: a local vector table entry set to deliver INIT
/// (LINT1 here) would send the processor a real INIT, resetting it out of
/// thinvisor on SVM: thinvisor drops the write (the entry keeps its
/// value); the same entry set to a masked NMI is written as asked.
pub fn lvt_init_dropped() -> CheckResult {
    const LVT_LINT1: u64 = 0x360;
    const MASKED: u32 = 1 << 16;
    let base = rdmsr(IA32_APIC_BASE)?;
    if base & (1 << 10) != 0 {
        say!("NOTE lvt_init_dropped: x2APIC mode; the MSR path is host-tested (guard)");
        return Ok(());
    }
    let page = base & 0xF_FFFF_F000;
    crate::passthrough::map_identity_2m(page, true);
    let reg = (page + LVT_LINT1) as *mut u32;
    // SAFETY: the local APIC's LINT1 register, identity-mapped uncached
    // just above, 32-bit access.
    let read = || unsafe { reg.read_volatile() };
    // SAFETY: as above; a masked entry delivers nothing.
    let write = |v: u32| unsafe { reg.write_volatile(v) };
    let old = read();
    write((old & !0x700) | 0x500 | MASKED);
    let after_init = read();
    write(0x400 | MASKED);
    let after_nmi = read();
    write(old);
    ensure!(
        after_init == old,
        "LINT1 reads {after_init:#x} after a write of delivery mode INIT, was {old:#x}"
    );
    ensure!(
        after_nmi & 0x1_07FF == 0x1_0400,
        "LINT1 reads {after_nmi:#x} after a write of a masked NMI"
    );
    thinvisor_answers("after the LVT writes")
}

//! The boot loader's information, parsed into `BootInfo`: multiboot v1
//! (`multiboot1::parse` over fuzzed physical memory, with an information
//! structure whose flags and pointers are fuzzed, mostly into that
//! memory) and multiboot2 (`multiboot2::parse` over fuzzed tags, with
//! sizes wrong now and then and a total size never past the buffer).
//!
//! Checked: no panic; what is kept fits the caps (128 regions, 16
//! modules, the command line and module strings), the information's own
//! range is ordered, and a module's length never underflows.

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use thinvisor_boot::{
    multiboot1, multiboot2, BootInfo, CMDLINE_CAP, MAX_MODULES, MAX_REGIONS, MODULE_STRING_CAP,
};
use thinvisor_memory_fuzz::boot::{patch32, Mb2, Mem};

fn check(bi: &BootInfo) {
    assert!(bi.memory_map().len() <= MAX_REGIONS);
    assert!(bi.modules().len() <= MAX_MODULES);
    assert!(bi.cmdline().len() <= CMDLINE_CAP);
    for m in bi.modules() {
        assert!(m.string().len() <= MODULE_STRING_CAP);
        assert!(m.len() <= m.end);
        let _ = format!("{m:?}");
    }
    let (lo, hi) = bi.info_range();
    assert!(lo <= hi);
    let _ = format!("{bi:?}");
}

fn mb1(u: &mut Unstructured<'_>) -> Result<()> {
    // 8 KiB at 0x1000: mostly printable text and NULs.
    let mut bytes = vec![0u8; 0x2000];
    for b in bytes.iter_mut() {
        if u.is_empty() {
            break;
        }
        *b = match u.arbitrary::<u8>()? {
            x @ 0..=159 => 0x20 + x % 0x5f,
            160..=199 => 0,
            x => x,
        };
        if u.ratio(1u8, 4u8)? {
            break;
        }
    }
    let mut mem = Mem {
        chunks: vec![(0x1000, bytes)],
    };
    let off = u.int_in_range(0u64..=0x2000 - 52)?;
    let info = 0x1000 + off;
    mem.w32(info, u.arbitrary()?);
    for i in 0..12u64 {
        let v = match u.int_in_range(0u8..=2)? {
            0 => u.int_in_range(0x1000u32..=0x3000)?,
            1 => u.int_in_range(0u32..=20)?,
            _ => u.arbitrary()?,
        };
        mem.w32(info + 4 + 4 * i, v);
    }
    if let Ok(bi) = multiboot1::parse(info, &mem) {
        check(&bi);
    }
    Ok(())
}

fn mb2(u: &mut Unstructured<'_>) -> Result<()> {
    let mut mb = Mb2::default();
    for _ in 0..u.int_in_range(0u8..=8)? {
        let other: u32 = u.arbitrary()?;
        let resume = thinvisor_boot::resume::TAG_RESUME;
        let ty = *u.choose(&[1u32, 3, 6, 6, 2, 4, 5, 8, 14, 15, 21, resume, other])?;
        // thinvisor's resume tag holds 344 bytes: let it be whole at times.
        let len = u.int_in_range(0..=if ty == resume { 400 } else { 120 })?;
        let mut body = u.bytes(len)?.to_vec();
        if ty == 6 && body.len() >= 8 && u.ratio(3u8, 4u8)? {
            // A memory map with its usual entry size.
            body[..4].copy_from_slice(&24u32.to_ne_bytes());
        }
        let size = if u.ratio(7u8, 8u8)? {
            8 + body.len() as u32
        } else {
            u.arbitrary()?
        };
        mb.raw_tag(ty, size, &body);
    }
    if u.ratio(4u8, 5u8)? {
        mb.end();
    }
    let mut words = mb.build();
    let total = words.len() as u32 * 8;
    // Claim the real size or less, never more than the buffer.
    let claim = total.saturating_sub(if u.ratio(7u8, 8u8)? {
        0
    } else {
        u.int_in_range(0..=64)?
    });
    patch32(&mut words, 0, claim);
    // SAFETY: an 8-aligned live buffer that nothing else touches; the
    // total size it claims never exceeds it.
    if let Ok(bi) = unsafe { multiboot2::parse(words.as_ptr() as u64) } {
        check(&bi);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut u = Unstructured::new(rest);
    let _ = if mode & 1 == 0 {
        mb1(&mut u)
    } else {
        mb2(&mut u)
    };
});

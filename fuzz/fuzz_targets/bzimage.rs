//! The Linux loader: `BzImage::parse` on raw bytes, and `load_linux` on
//! bzImages whose setup-header fields are fuzzed (mostly plausible, now
//! and then anything; the builder of thinvisor-boot's tests), then
//! mutated and cut, with a fuzzed firmware map, hidden ranges (thinvisor's
//! block), avoided ranges (the boot modules), initrd and command line.
//!
//! Checked: no panic; a failed load wrote nothing; every write lies in
//! usable RAM, never in a hidden or avoided range; the plan honours the
//! header (runtime area below 4 GiB and at least `init_size`, the
//! command line within `cmdline_size`, a relocatable kernel aligned at or
//! above `pref_address`, a fixed one at 1 MiB, the initrd below
//! `initrd_addr_max` or above 4 GiB only when the kernel allows it, no
//! two pieces overlapping); the entry registers point at the kernel and
//! the boot parameters.

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use thinvisor_boot::e820::GuestMap;
use thinvisor_boot::linux::{load_linux, BzImage};
use thinvisor_memory_fuzz::boot::{
    assert_writes_allowed, avoid_ranges, hidden_ranges, memory_map, Bz, Sparse,
};

/// The usual value 7 times in 8, else the other.
fn pick<T: Copy>(u: &mut Unstructured<'_>, usual: T, other: T) -> Result<T> {
    Ok(if u.ratio(7u8, 8u8)? { usual } else { other })
}

/// One of `values` (evaluated before the choice).
fn one_of<T: Copy>(u: &mut Unstructured<'_>, values: &[T]) -> Result<T> {
    Ok(*u.choose(values)?)
}

fn spec(u: &mut Unstructured<'_>) -> Result<Bz> {
    let d = Bz::default();
    let setup_sects = u.arbitrary()?;
    let boot_flag = u.arbitrary()?;
    let magic = u.arbitrary()?;
    let version = u.arbitrary()?;
    let jump_len = u.arbitrary()?;
    let loadflags = u.arbitrary()?;
    let initrd_low = u.int_in_range(0..=64 << 20)?;
    let initrd_any = u.arbitrary()?;
    let align_log = u.int_in_range(12..=27)?;
    let align_any = u.arbitrary()?;
    let min_log = u.int_in_range(12..=24)?;
    let min_any = u.arbitrary()?;
    let xl_any = u.arbitrary()?;
    let cmd_small = u.int_in_range(0..=300)?;
    let cmd_any = u.arbitrary()?;
    let pref_mib = u.int_in_range(0u64..=63)?;
    let pref_any = u.arbitrary()?;
    let init_small = u.int_in_range(0..=48 << 20)?;
    let init_any = u.arbitrary()?;
    Ok(Bz {
        setup_sects: pick(u, d.setup_sects, setup_sects)?,
        boot_flag: pick(u, d.boot_flag, boot_flag)?,
        magic: pick(u, d.magic, magic)?,
        version: one_of(u, &[0x020F, 0x020F, 0x0206, 0x020A, 0x020C, version])?,
        jump_len: pick(u, d.jump_len, jump_len)?,
        loadflags: pick(u, d.loadflags, loadflags)?,
        initrd_addr_max: one_of(u, &[0x7FFF_FFFF, initrd_low, initrd_any])?,
        kernel_alignment: pick(u, 1 << align_log, align_any)?,
        relocatable: u.ratio(3u8, 4u8)?,
        min_alignment: pick(u, min_log, min_any)?,
        xloadflags: one_of(u, &[3, 1, 0, xl_any])?,
        cmdline_size: one_of(u, &[2047, cmd_small, cmd_any])?,
        pref_address: one_of(u, &[16 << 20, pref_mib << 20, pref_any])?,
        init_size: pick(u, init_small, init_any)?,
        kernel_len: u.int_in_range(1..=0x2000)?,
        syssize: if u.ratio(1u8, 5u8)? {
            Some(u.arbitrary()?)
        } else {
            None
        },
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut image = spec(u)?.build();
    for _ in 0..u.int_in_range(0u8..=3)? {
        let at = u.int_in_range(0x1F0..=0x270)?;
        if let Some(b) = image.get_mut(at) {
            *b = u.arbitrary()?;
        }
    }
    if u.ratio(1u8, 8u8)? {
        let cut = u.int_in_range(0..=image.len())?;
        image.truncate(cut);
    }
    let map = memory_map(u, 8)?;
    let hidden = hidden_ranges(u)?;
    let avoid = avoid_ranges(u)?;
    let initrd = vec![0x11u8; u.int_in_range(0..=0x3000)?];
    let cmdline_len = u.int_in_range(0..=300)?;
    let cmdline: Vec<u8> = u.bytes(cmdline_len)?.to_vec();
    let Ok(gm) = GuestMap::new(&map, &hidden) else {
        return Ok(());
    };
    let initrd = (!initrd.is_empty() || u.arbitrary()?).then_some(&initrd[..]);
    let mut mem = Sparse::default();
    let r = load_linux(&image, initrd, &cmdline, &gm, &avoid, &mut mem);
    let Ok(boot) = r else {
        assert!(mem.writes.is_empty(), "wrote before failing: {r:?}");
        return Ok(());
    };
    assert_writes_allowed(&mem, &gm, &avoid);
    let bz = BzImage::parse(&image).expect("loaded, yet does not parse");
    let h = bz.header();
    let p = boot.plan;
    assert!(p.runtime.1 <= 1 << 32);
    assert!(p.runtime.1 - p.runtime.0 >= bz.init_size());
    assert!(p.cmdline_len <= u64::from(h.cmdline_size));
    assert!(p.cmdline + p.cmdline_len < 1 << 32);
    assert_eq!(u64::from(boot.entry.eip), p.kernel);
    assert_eq!(u64::from(boot.entry.esi), p.boot_params);
    assert_eq!(
        gm.check_usable(p.runtime.0, p.runtime.1 - p.runtime.0),
        Ok(())
    );
    if h.relocatable {
        assert!(p.kernel >= h.pref_address);
        assert_eq!(p.kernel % u64::from(p.kernel_alignment.max(1)), 0);
    } else {
        assert_eq!(p.kernel, 0x10_0000);
    }
    let initrd_len = initrd.map_or(0, |i| i.len() as u64);
    if let Some((s, e)) = p.initrd {
        assert_eq!(e - s, initrd_len);
        assert!(e <= p.runtime.0 || p.runtime.1 <= s);
        assert!(e <= p.kernel || p.kernel + p.kernel_len <= s);
        if e <= 1 << 32 {
            assert!(e - 1 <= u64::from(h.initrd_addr_max));
        } else {
            assert!(bz.can_load_above_4g());
        }
    }
    let low = (p.boot_params, p.cmdline + p.cmdline_len + 1);
    assert!(low.1 <= p.runtime.0 || p.runtime.1 <= low.0);
    assert!(low.1 <= p.kernel || p.kernel + p.kernel_len <= low.0);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    // Raw bytes for the header parser, then a structured load.
    if data.first().is_some_and(|b| b & 1 == 0) {
        let _ = BzImage::parse(&data[1..]);
        return;
    }
    let _ = run(&mut Unstructured::new(data));
});

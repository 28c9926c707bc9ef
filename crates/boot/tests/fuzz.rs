//! Property tests: the allocator's invariants, and no input panics a parser.

mod common;

use common::*;
use proptest::prelude::*;
use thinvisor_boot::alloc::FrameAllocator;
use thinvisor_boot::e820::GuestMap;
use thinvisor_boot::guest::{
    load_multiboot_kernel, load_multiboot_passthrough, write_multiboot1_info,
};
use thinvisor_boot::linux::{load_linux, BzImage};
use thinvisor_boot::{cmdline, multiboot1, multiboot2, MemKind, MemRegion};

const PAGE: u64 = 4096;

fn kind() -> impl Strategy<Value = MemKind> {
    prop_oneof![
        3 => Just(MemKind::Available),
        1 => Just(MemKind::Reserved),
        1 => Just(MemKind::AcpiReclaimable),
        1 => Just(MemKind::AcpiNvs),
        1 => Just(MemKind::Bad),
    ]
}

/// An address: mostly in the first 64 MiB (so ranges collide), sometimes
/// unaligned, sometimes near the top of the address space.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0u64..64 << 20,
        2 => (0u64..16384).prop_map(|p| p * PAGE),
        1 => (0u64..0x10000).prop_map(|x| u64::MAX - x),
    ]
}

fn region() -> impl Strategy<Value = MemRegion> {
    (
        addr(),
        prop_oneof![(0u64..16 << 20), Just(0), any::<u64>()],
        kind(),
    )
        .prop_map(|(start, len, kind)| MemRegion { start, len, kind })
}

/// Merged, sorted [start, end) of the available regions.
fn available(map: &[MemRegion]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = map
        .iter()
        .filter(|r| r.kind == MemKind::Available && r.len > 0)
        .map(|r| (r.start, r.end()))
        .collect();
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// a.out-kludge addresses that are often consistent:
/// [header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr].
fn kludge_addresses() -> impl Strategy<Value = Vec<u32>> {
    (
        0u32..3 << 19,
        0u32..300,
        prop_oneof![Just(0u32), 0u32..4000],
        prop_oneof![Just(0u32), 0u32..0x10000],
        0u32..0x1000,
    )
        .prop_map(|(load, before, len, bss, entry)| {
            let load_end = if len == 0 { 0 } else { load + len };
            let bss_end = if bss == 0 { 0 } else { load + len + bss };
            vec![load + before, load, load_end, bss_end, load + entry]
        })
}

/// `len` bytes, mostly printable ASCII and NULs (cheap to generate).
fn text_like(len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), len).prop_map(|v| {
        v.into_iter()
            .map(|b| match b {
                0..=159 => 0x20 + b % 0x5f,
                160..=199 => 0,
                _ => b,
            })
            .collect()
    })
}

fn text_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![6 => 0x20u8..0x7f, 1 => Just(0u8), 1 => any::<u8>()],
        0..max,
    )
}

/// A multiboot2 tag (type, size field, body): mostly well-formed tags of the
/// kinds this crate reads, sometimes with a wrong size or a foreign type.
fn mb2_tag() -> impl Strategy<Value = (u32, u32, Vec<u8>)> {
    let mmap_body = (
        prop_oneof![4 => Just(24u32), 1 => any::<u32>()],
        0usize..4,
        prop::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(entry_size, n, noise)| {
            let mut b = entry_size.to_ne_bytes().to_vec();
            b.extend_from_slice(&[0; 4]);
            for i in 0..n as u64 {
                b.extend_from_slice(&(i * 0x100000).to_ne_bytes());
                b.extend_from_slice(&0x100000u64.to_ne_bytes());
                b.extend_from_slice(&(1 + i as u32 % 3).to_ne_bytes());
                b.extend_from_slice(&[0; 4]);
            }
            if noise.len() < 3 {
                b.extend_from_slice(&noise);
            }
            b
        });
    let module_body = (any::<u32>(), 0u32..0x10000, text_bytes(40)).prop_map(|(start, len, s)| {
        let mut b = start.to_ne_bytes().to_vec();
        b.extend_from_slice(&start.wrapping_add(len).to_ne_bytes());
        b.extend_from_slice(&s);
        b.push(0);
        b
    });
    let tag = prop_oneof![
        text_bytes(48).prop_map(|mut b| {
            b.push(0);
            (1u32, b)
        }),
        module_body.prop_map(|b| (3u32, b)),
        prop::collection::vec(any::<u8>(), 8).prop_map(|b| (4u32, b)),
        mmap_body.prop_map(|b| (6u32, b)),
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..48)),
        Just((0u32, Vec::new())),
    ];
    (
        tag,
        prop_oneof![8 => Just(None), 1 => prop_oneof![0u32..64, any::<u32>()].prop_map(Some)],
    )
        .prop_map(|((ty, body), size)| (ty, size.unwrap_or(8 + body.len() as u32), body))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn alloc_never_overlaps_or_touches_unavailable_memory(
        map in prop::collection::vec(region(), 0..40),
        reserved in prop::collection::vec((addr(), 0u64..4 << 20), 0..10),
        requests in prop::collection::vec((1u64..4 << 20, 12u32..23), 1..60),
    ) {
        let reserved: Vec<(u64, u64)> = reserved.iter().map(|&(s, l)| (s, s.saturating_add(l))).collect();
        let mut a = FrameAllocator::new(&map, &reserved);
        let avail = available(&map);
        let mut got: Vec<(u64, u64)> = Vec::new();
        for (size, align_log) in requests {
            let align = 1u64 << align_log;
            let before = a.free_bytes();
            let Some(p) = a.alloc(size, align) else { continue };
            let end = p + size.div_ceil(PAGE) * PAGE;
            prop_assert_eq!(p % align, 0);
            prop_assert!(p >= 0x100000, "below 1 MiB: {:#x}", p);
            prop_assert_eq!(a.free_bytes(), before - (end - p));
            // Inside one stretch of available memory.
            prop_assert!(avail.iter().any(|&(s, e)| s <= p && end <= e), "{:#x}..{:#x} not available", p, end);
            // Not touching any other kind of region, or a reserved range's pages.
            for r in map.iter().filter(|r| r.kind != MemKind::Available && r.len > 0) {
                let widened = (r.start & !(PAGE - 1), r.end().checked_add(PAGE - 1).map_or(u64::MAX, |x| x & !(PAGE - 1)));
                prop_assert!(!overlaps((p, end), widened), "{:#x}..{:#x} overlaps {:?}", p, end, r);
            }
            for &(s, e) in reserved.iter().filter(|(s, e)| s < e) {
                let widened = (s & !(PAGE - 1), e.checked_add(PAGE - 1).map_or(u64::MAX, |x| x & !(PAGE - 1)));
                prop_assert!(!overlaps((p, end), widened), "{:#x}..{:#x} overlaps reserved {:#x}..{:#x}", p, end, s, e);
            }
            for &g in &got {
                prop_assert!(!overlaps((p, end), g), "{:#x}..{:#x} overlaps earlier {:x?}", p, end, g);
            }
            got.push((p, end));
        }
        // The free list stays sorted, disjoint and page-aligned.
        let free = a.free_ranges();
        for w in free.windows(2) {
            prop_assert!(w[0].1 < w[1].0);
        }
        for &(s, e) in free {
            prop_assert!(s < e && s % PAGE == 0 && e % PAGE == 0);
        }
    }

    #[test]
    fn loader_survives_random_bytes(
        mut image in prop::collection::vec(any::<u8>(), 0..3000),
        slot in 0usize..700,
        flags in any::<u32>(),
        (consistent, mut addrs) in prop_oneof![
            prop::collection::vec(any::<u32>(), 5).prop_map(|a| (false, a)),
            kludge_addresses().prop_map(|a| (true, a)),
        ],
    ) {
        // Plant a valid header with random flags and kludge addresses.
        if image.len() >= 32 {
            let at = ((slot * 4) % (image.len() - 31)) & !3;
            if consistent {
                // header_addr - load_addr may not exceed the header's offset.
                addrs[0] = addrs[1] + (addrs[0] - addrs[1]).min(at as u32);
            }
            let mut h = mb_header(flags & 0x0001_0007 | flags & 0xfff0_0000);
            for a in addrs {
                h.extend_from_slice(&a.to_le_bytes());
            }
            image[at..at + h.len()].copy_from_slice(&h);
        }
        let mut ram = vec![0u8; 2 << 20];
        if let Ok(k) = load_multiboot_kernel(&image, &mut ram) {
            prop_assert!(u64::from(k.entry) < k.load_end);
            prop_assert!(k.load_end <= ram.len() as u64);
        }
    }

    #[test]
    fn loader_survives_mutated_elf(
        class64 in any::<bool>(),
        mutations in prop::collection::vec((0usize..300, any::<u8>()), 0..4),
        tail_cut in prop_oneof![3 => Just(0usize), 1 => 0usize..64],
    ) {
        let segs = vec![
            Seg::load(0x100000, &[0x90; 100], 0x200),
            Seg::load(0x180000, &[0x55; 40], 40),
        ];
        let mut image = build_elf(&Elf::new(class64, 0x100004, segs));
        for (at, byte) in mutations {
            if let Some(b) = image.get_mut(at) {
                *b = byte;
            }
        }
        image.truncate(image.len().saturating_sub(tail_cut));
        let mut ram = vec![0u8; 2 << 20];
        if let Ok(k) = load_multiboot_kernel(&image, &mut ram) {
            prop_assert!(k.load_end <= ram.len() as u64);
        }
    }

    #[test]
    fn multiboot1_survives_random_memory(
        bytes in text_like(0x2000),
        info_off in 0u64..0x2000,
        flags in any::<u32>(),
        fields in prop::collection::vec(prop_oneof![0x1000u32..0x3000, 0u32..20, any::<u32>()], 12),
    ) {
        let mut mem = Mem { chunks: vec![(0x1000, bytes)] };
        let info = 0x1000 + info_off;
        if info_off + 52 <= 0x2000 {
            mem.w32(info, flags);
            for (i, f) in fields.iter().enumerate() {
                mem.w32(info + 4 + 4 * i as u64, *f);
            }
        }
        if let Ok(bi) = multiboot1::parse(info, &mem) {
            prop_assert!(bi.memory_map().len() <= 128);
            prop_assert!(bi.modules().len() <= 16);
            let (lo, hi) = bi.info_range();
            prop_assert!(lo <= hi);
        }
    }

    #[test]
    fn multiboot2_survives_random_tags(
        tags in prop::collection::vec(mb2_tag(), 0..8),
        end in prop_oneof![4 => Just(true), 1 => Just(false)],
        size_delta in prop_oneof![8 => Just(0u32), 1 => (0u32..8).prop_map(|d| d * 8), 1 => 0u32..64],
    ) {
        let mut mb = Mb2::default();
        for (ty, size, body) in &tags {
            mb.raw_tag(*ty, *size, body);
        }
        if end {
            mb.end();
        }
        let mut words = mb.build();
        let total = words.len() as u32 * 8;
        // Claim the real size or less, never more than the buffer.
        patch32(&mut words, 0, total.saturating_sub(size_delta));
        // SAFETY: 8-aligned live buffer; total_size never exceeds it.
        let r = unsafe { multiboot2::parse(words.as_ptr() as u64) };
        if let Ok(bi) = r {
            prop_assert!(bi.memory_map().len() <= 128);
            prop_assert!(bi.modules().len() <= 16);
        }
    }

    #[test]
    fn cmdline_never_panics(s in "\\PC{0,80}", t in "[a-z_=0-9xXkKmMgG ]{0,40}") {
        let _ = cmdline::parse(&s, &mut |_, _| {});
        if let Ok(o) = cmdline::parse(&t, &mut |_, _| {}) {
            prop_assert!(o.guest_mem >= 2 << 20 && o.guest_mem <= 4 << 30);
            prop_assert_eq!(o.guest_mem % (2 << 20), 0);
        }
    }

    #[test]
    fn info_writer_round_trips(
        ram_mib in 1u64..16,
        at_page in prop_oneof![0u64..4096, any::<u64>()],
        cmd in prop::collection::vec(1u8..128, 0..300),
    ) {
        let mut ram = vec![0u8; (ram_mib << 20) as usize];
        let at = at_page.wrapping_mul(PAGE);
        if let Ok(pa) = write_multiboot1_info(&mut ram, at, &cmd) {
            prop_assert_eq!(u64::from(pa), at);
            let mem = Mem { chunks: vec![(0, ram)] };
            let bi = multiboot1::parse(at, &mem).unwrap();
            prop_assert_eq!(bi.cmdline().as_bytes(), &cmd[..]);
            prop_assert_eq!(bi.memory_map().len(), 2);
        }
    }
}

/// A bzImage with every header field drawn from a hostile but often
/// plausible range.
fn bz_spec() -> impl Strategy<Value = Bz> {
    let fields1 = (
        prop_oneof![Just(4u8), 0u8..8, any::<u8>()],
        prop_oneof![8 => Just(0xAA55u16), 1 => any::<u16>()],
        prop_oneof![8 => Just(0x5372_6448u32), 1 => any::<u32>()],
        prop_oneof![6 => Just(0x020Fu16), 1 => Just(0x0206), 1 => Just(0x020A), 1 => Just(0x020C), 1 => any::<u16>()],
        prop_oneof![6 => Just(0x6Au8), 1 => Just(0x3A), 1 => any::<u8>()],
        prop_oneof![6 => Just(1u8), 1 => any::<u8>()],
        prop_oneof![Just(0x7FFF_FFFFu32), 0u32..64 << 20, any::<u32>()],
    );
    let fields2 = (
        prop_oneof![6 => (12u32..28).prop_map(|s| 1 << s), 1 => any::<u32>()],
        any::<bool>(),
        prop_oneof![12u8..25, any::<u8>()],
        any::<u16>(),
        prop_oneof![Just(2047u32), 0u32..300, any::<u32>()],
        prop_oneof![4 => Just(16u64 << 20), 4 => (0u64..64).prop_map(|m| m << 20), 1 => any::<u64>()],
        prop_oneof![6 => 0u32..48 << 20, 1 => any::<u32>()],
        0usize..0x2000,
        prop_oneof![4 => Just(None), 1 => any::<u32>().prop_map(Some)],
    );
    (fields1, fields2).prop_map(
        |(
            (setup_sects, boot_flag, magic, version, jump_len, loadflags, initrd_addr_max),
            (
                kernel_alignment,
                relocatable,
                min_alignment,
                xloadflags,
                cmdline_size,
                pref_address,
                init_size,
                kernel_len,
                syssize,
            ),
        )| Bz {
            setup_sects,
            boot_flag,
            magic,
            version,
            jump_len,
            loadflags,
            initrd_addr_max,
            kernel_alignment,
            relocatable,
            min_alignment,
            xloadflags,
            cmdline_size,
            pref_address,
            init_size,
            kernel_len,
            syssize,
        },
    )
}

/// A well-formed bzImage whose placement fields vary: what the planner sees.
fn valid_bz_spec() -> impl Strategy<Value = Bz> {
    (
        prop_oneof![3 => Just(true), 1 => Just(false)],
        (12u32..26).prop_map(|s| 1 << s),
        prop_oneof![12u8..25, any::<u8>()],
        prop_oneof![Just(3u16), Just(1), any::<u16>()],
        prop_oneof![
            Just(16u64 << 20),
            (0u64..64).prop_map(|m| m << 20),
            any::<u64>()
        ],
        prop_oneof![4 => 0u32..48 << 20, 1 => any::<u32>()],
        prop_oneof![Just(0x7FFF_FFFFu32), 0u32..64 << 20, any::<u32>()],
        0usize..0x2000,
        prop_oneof![3 => Just(2047u32), 1 => 0u32..300],
    )
        .prop_map(
            |(
                relocatable,
                kernel_alignment,
                min_alignment,
                xloadflags,
                pref_address,
                init_size,
                initrd_addr_max,
                kernel_len,
                cmdline_size,
            )| Bz {
                relocatable,
                kernel_alignment,
                min_alignment,
                xloadflags,
                pref_address,
                init_size,
                initrd_addr_max,
                kernel_len: kernel_len.max(1),
                cmdline_size,
                ..Bz::default()
            },
        )
}

/// Page-aligned hidden ranges, mostly in the first 64 MiB.
fn hidden_ranges() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec(
        (0u64..16384, 0u64..1024).prop_map(|(p, n)| (p * PAGE, (p + n) * PAGE)),
        0..4,
    )
}

fn avoid_ranges() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec(
        (addr(), 0u64..8 << 20).prop_map(|(s, l)| (s, s.saturating_add(l))),
        0..4,
    )
}

/// Checks what every pass-through load must satisfy: each write lies in
/// usable RAM and outside every avoid range.
fn writes_are_allowed(
    mem: &Sparse,
    map: &GuestMap,
    avoid: &[(u64, u64)],
) -> Result<(), TestCaseError> {
    for &(s, e) in &mem.writes {
        prop_assert_eq!(
            map.check_usable(s, e - s),
            Ok(()),
            "write {:#x}..{:#x}",
            s,
            e
        );
        for &(a, b) in avoid {
            prop_assert!(
                e <= a || b <= s,
                "write {:#x}..{:#x} hits {:#x}..{:#x}",
                s,
                e,
                a,
                b
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn bzimage_parser_survives_random_bytes(image in prop::collection::vec(any::<u8>(), 0..0x1400)) {
        let _ = BzImage::parse(&image);
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn linux_loader_survives_hostile_images(
        spec in prop_oneof![bz_spec(), valid_bz_spec()],
        mutations in prop_oneof![
            3 => Just(Vec::new()),
            1 => prop::collection::vec((0x1F0usize..0x270, any::<u8>()), 1..4),
        ],
        cut in prop_oneof![8 => Just(0usize), 1 => 0usize..0x3000],
        map in prop::collection::vec(region(), 0..8),
        with_qemu in prop_oneof![3 => Just(true), 1 => Just(false)],
        hidden in hidden_ranges(),
        avoid in avoid_ranges(),
        initrd_len in prop_oneof![Just(0usize), 1usize..0x3000],
        cmdline in prop::collection::vec(1u8..=255, 0..300),
    ) {
        let mut image = spec.build();
        for (at, b) in mutations {
            if let Some(x) = image.get_mut(at) {
                *x = b;
            }
        }
        image.truncate(image.len().saturating_sub(cut));
        let mut regions = map;
        if with_qemu {
            regions.extend(qemu_map());
        }
        let Ok(gm) = GuestMap::new(&regions, &hidden) else { return Ok(()) };
        let initrd = vec![0x11u8; initrd_len];
        let mut mem = Sparse::default();
        let r = load_linux(&image, Some(&initrd), &cmdline, &gm, &avoid, &mut mem);
        let Ok(boot) = r else {
            prop_assert!(mem.writes.is_empty(), "wrote before failing: {:?}", r);
            return Ok(());
        };
        writes_are_allowed(&mem, &gm, &avoid)?;
        let bz = BzImage::parse(&image).unwrap();
        let h = bz.header();
        let p = boot.plan;
        prop_assert!(p.runtime.1 <= 1 << 32);
        prop_assert!(p.runtime.1 - p.runtime.0 >= bz.init_size());
        prop_assert!(p.cmdline_len <= u64::from(h.cmdline_size));
        prop_assert!(p.cmdline + p.cmdline_len < 1 << 32);
        prop_assert_eq!(u64::from(boot.entry.eip), p.kernel);
        prop_assert_eq!(u64::from(boot.entry.esi), p.boot_params);
        prop_assert_eq!(gm.check_usable(p.runtime.0, p.runtime.1 - p.runtime.0), Ok(()));
        if h.relocatable {
            prop_assert!(p.kernel >= h.pref_address);
            prop_assert_eq!(p.kernel % u64::from(p.kernel_alignment.max(1)), 0);
        } else {
            prop_assert_eq!(p.kernel, 0x10_0000);
        }
        if let Some((s, e)) = p.initrd {
            prop_assert_eq!(e - s, initrd_len as u64);
            prop_assert!(e <= p.runtime.0 || p.runtime.1 <= s);
            prop_assert!(e <= p.kernel || p.kernel + p.kernel_len <= s);
            if e <= 1 << 32 {
                prop_assert!(e - 1 <= u64::from(h.initrd_addr_max));
            } else {
                prop_assert!(bz.can_load_above_4g());
            }
        }
        let low = (p.boot_params, p.cmdline + p.cmdline_len + 1);
        prop_assert!(low.1 <= p.runtime.0 || p.runtime.1 <= low.0);
        prop_assert!(low.1 <= p.kernel || p.kernel + p.kernel_len <= low.0);
    }

    #[test]
    fn multiboot_passthrough_survives_mutated_elf(
        class64 in any::<bool>(),
        mutations in prop::collection::vec((0usize..300, any::<u8>()), 0..4),
        map in prop::collection::vec(region(), 0..16),
        hidden in hidden_ranges(),
        avoid in avoid_ranges(),
        cmdline in prop::collection::vec(1u8..128, 0..100),
    ) {
        let segs = vec![
            Seg::load(0x100000, &[0x90; 100], 0x200),
            Seg::load(0x180000, &[0x55; 40], 40),
        ];
        let mut image = build_elf(&Elf::new(class64, 0x100004, segs));
        for (at, byte) in mutations {
            if let Some(b) = image.get_mut(at) {
                *b = byte;
            }
        }
        let mut regions = map;
        regions.extend(qemu_map());
        let Ok(gm) = GuestMap::new(&regions, &hidden) else { return Ok(()) };
        let mut mem = Sparse::default();
        if let Ok(boot) = load_multiboot_passthrough(&image, &cmdline, &gm, &avoid, &mut mem) {
            writes_are_allowed(&mem, &gm, &avoid)?;
            let k = boot.kernel;
            prop_assert!(k.start <= u64::from(k.entry) && u64::from(k.entry) < k.end);
            let info = multiboot1::parse(boot.info.into(), &mem).unwrap();
            prop_assert_eq!(info.memory_map().len(), gm.e820().len());
            let (lo, hi) = info.info_range();
            prop_assert!(hi <= k.start || k.end <= lo);
        }
    }
}

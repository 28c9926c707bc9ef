mod common;

use common::*;
use thinvisor_boot::{multiboot1, multiboot2, BootInfo, BootInfoError, MemKind, MemRegion};

fn region(start: u64, len: u64, kind: MemKind) -> MemRegion {
    MemRegion { start, len, kind }
}

fn qemu_regions() -> Vec<MemRegion> {
    QEMU_E820
        .iter()
        .map(|&(s, l, t)| region(s, l, MemKind::from_multiboot(t)))
        .collect()
}

// ---------------------------------------------------------------- multiboot v1

#[test]
fn mb1_qemu_like() {
    let mut mb = Mb1::new();
    mb.cmdline(b"/thinvisor.elf log=debug guest=1");
    mb.modules(&[
        (0x200000, 0x212345, "/guest.elf arg"),
        (0x213000, 0x213000, "/empty"),
    ]);
    mb.mmap(&QEMU_E820);
    let info = multiboot1::parse(mb.info, &mb.mem).unwrap();
    assert_eq!(info.cmdline(), "/thinvisor.elf log=debug guest=1");
    assert_eq!(info.modules().len(), 2);
    let m = &info.modules()[0];
    assert_eq!(
        (m.start, m.end, m.string()),
        (0x200000, 0x212345, "/guest.elf arg")
    );
    assert_eq!(m.len(), 0x12345);
    assert!(info.modules()[1].is_empty());
    assert_eq!(info.memory_map(), qemu_regions().as_slice());
    assert!(!info.truncated());
    let (lo, hi) = info.info_range();
    assert_eq!(lo, MB1_INFO);
    assert_eq!(hi, MB1_MMAP + 6 * 24);
}

#[test]
fn mb1_mem_sizes_without_map() {
    let mut mb = Mb1::new();
    mb.mem_sizes(639, 0x1f000);
    let info = multiboot1::parse(mb.info, &mb.mem).unwrap();
    assert_eq!(
        info.memory_map(),
        [
            region(0, 639 * 1024, MemKind::Available),
            region(0x100000, 0x1f000 * 1024, MemKind::Available)
        ]
    );
    assert_eq!(info.cmdline(), "");
    assert!(info.modules().is_empty());
}

#[test]
fn mb1_map_wins_over_sizes() {
    let mut mb = Mb1::new();
    mb.mem_sizes(1, 1);
    mb.mmap(&QEMU_E820);
    let info = multiboot1::parse(mb.info, &mb.mem).unwrap();
    assert_eq!(info.memory_map(), qemu_regions().as_slice());
}

#[test]
fn mb1_no_memory_information() {
    let mut mb = Mb1::new();
    mb.cmdline(b"x");
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::NoMemoryMap
    );
}

#[test]
fn mb1_unreadable_info() {
    let mb = Mb1::new();
    let e = multiboot1::parse(0x500, &mb.mem).unwrap_err();
    assert_eq!(
        e,
        BootInfoError::Unreadable {
            what: "multiboot information",
            addr: 0x500
        }
    );
    assert!(e.to_string().contains("0x500"));
    // The structure's last bytes past the end of memory.
    let end = MB1_BASE + 0x8000 - 40;
    assert!(matches!(
        multiboot1::parse(end, &mb.mem),
        Err(BootInfoError::Unreadable { .. })
    ));
    assert!(matches!(
        multiboot1::parse(u64::MAX - 3, &mb.mem),
        Err(BootInfoError::Unreadable { .. })
    ));
}

#[test]
fn mb1_bad_cmdline_pointer() {
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    mb.or_flags(1 << 2);
    mb.mem.w32(mb.info + 16, 0xdead_0000);
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::Unreadable {
            what: "command line",
            addr: 0xdead_0000
        }
    );
}

#[test]
fn mb1_unterminated_cmdline_at_end_of_memory() {
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    mb.or_flags(1 << 2);
    let pa = MB1_BASE + 0x8000 - 8;
    mb.mem.write(pa, b"abcdefgh");
    mb.mem.w32(mb.info + 16, pa as u32);
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::Unreadable {
            what: "command line",
            addr: pa + 8
        }
    );
}

#[test]
fn mb1_long_cmdline_is_truncated() {
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    let long = "x".repeat(1500);
    mb.cmdline(long.as_bytes());
    let info = multiboot1::parse(mb.info, &mb.mem).unwrap();
    assert_eq!(info.cmdline(), &long[..1024]);
    assert!(info.truncated());

    // A cut through a multi-byte character drops the character.
    let mut s = "y".repeat(1023);
    s.push('é');
    mb.cmdline(s.as_bytes());
    let info = multiboot1::parse(mb.info, &mb.mem).unwrap();
    assert_eq!(info.cmdline(), &s[..1023]);
    assert!(info.truncated());
}

#[test]
fn mb1_invalid_utf8() {
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    mb.cmdline(b"log=\xff");
    let e = multiboot1::parse(mb.info, &mb.mem).unwrap_err();
    assert_eq!(e, BootInfoError::NotUtf8("command line"));
    assert_eq!(e.to_string(), "the command line is not valid UTF-8");
}

#[test]
fn mb1_utf8_cmdline() {
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    mb.cmdline("name=ゲスト".as_bytes());
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap().cmdline(),
        "name=ゲスト"
    );
}

#[test]
fn mb1_huge_mods_count() {
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    mb.modules(&[]);
    for count in [17u32, 0xffff_ffff] {
        mb.mem.w32(mb.info + 20, count);
        let e = multiboot1::parse(mb.info, &mb.mem).unwrap_err();
        assert_eq!(e, BootInfoError::TooManyModules(count.into()));
        assert!(e.to_string().contains("at most 16"));
    }
}

#[test]
fn mb1_sixteen_modules() {
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    let names: Vec<String> = (0..16).map(|i| format!("m{i}")).collect();
    let mods: Vec<(u32, u32, &str)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u32 * 0x1000, i as u32 * 0x1000 + 1, n.as_str()))
        .collect();
    mb.modules(&mods);
    let info = multiboot1::parse(mb.info, &mb.mem).unwrap();
    assert_eq!(info.modules().len(), 16);
    assert_eq!(info.modules()[15].string(), "m15");
}

#[test]
fn mb1_module_errors() {
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    mb.modules(&[(0x3000, 0x1000, "backwards")]);
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::BadModule {
            index: 0,
            start: 0x3000,
            end: 0x1000
        }
    );
    mb.modules(&[(0x1000, 0x3000, "ok")]);
    mb.mem.w32(mb.info + 24, 0x7fff_fff0);
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::Unreadable {
            what: "module list",
            addr: 0x7fff_fff0
        }
    );
    // A module without a string.
    mb.modules(&[(0x1000, 0x3000, "ok")]);
    mb.mem.w32(MB1_MODS + 8, 0);
    let info = multiboot1::parse(mb.info, &mb.mem).unwrap();
    assert_eq!(info.modules()[0].string(), "");
    // A module string that cannot be read.
    mb.mem.w32(MB1_MODS + 8, 0x10);
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::Unreadable {
            what: "module string",
            addr: 0x10
        }
    );
}

#[test]
fn mb1_long_module_string() {
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    let long = "m".repeat(300);
    mb.modules(&[(0x1000, 0x2000, &long)]);
    let info = multiboot1::parse(mb.info, &mb.mem).unwrap();
    assert_eq!(info.modules()[0].string(), &long[..256]);
    assert!(info.truncated());
}

#[test]
fn mb1_mmap_entry_sizes() {
    // Entry `size` of 0 would loop forever without a check.
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    mb.mem.w32(MB1_MMAP + 24, 0);
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::BadMmapEntry {
            offset: 24,
            size: 0
        }
    );
    // An entry running past mmap_length.
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    mb.mem.w32(mb.info + 44, 6 * 24 - 4);
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::BadMmapEntry {
            offset: 5 * 24,
            size: 20
        }
    );
    // Larger entries (size 28) are stepped over by their size.
    let mut mb = Mb1::new();
    mb.mmap(&[]);
    mb.mem.w32(mb.info + 44, 2 * 32);
    for (i, (base, len, ty)) in [(0x100000u64, 0x100000u64, 1u32), (0x300000, 0x1000, 2)]
        .into_iter()
        .enumerate()
    {
        let e = MB1_MMAP + i as u64 * 32;
        mb.mem.w32(e, 28);
        mb.mem.w64(e + 4, base);
        mb.mem.w64(e + 12, len);
        mb.mem.w32(e + 20, ty);
    }
    let info = multiboot1::parse(mb.info, &mb.mem).unwrap();
    assert_eq!(
        info.memory_map(),
        [
            region(0x100000, 0x100000, MemKind::Available),
            region(0x300000, 0x1000, MemKind::Reserved)
        ]
    );
}

#[test]
fn mb1_huge_mmap_length() {
    let mut mb = Mb1::new();
    mb.mmap(&QEMU_E820);
    mb.mem.w32(mb.info + 44, 0xffff_fff0);
    // The parser walks the valid entries, then meets zeroed memory.
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::BadMmapEntry {
            offset: 6 * 24,
            size: 0
        }
    );
    // Valid-looking entries up to the end of readable memory.
    let mut mb = Mb1::new();
    mb.mmap(&[]);
    mb.mem.w32(mb.info + 44, 0xffff_fff0);
    let mut e = MB1_MMAP;
    while e + 24 <= MB1_BASE + 0x8000 {
        mb.mem.w32(e, 20);
        mb.mem.w64(e + 4, 0x100000 + (e - MB1_MMAP) / 24 * 0x1000);
        mb.mem.w64(e + 12, 0x1000);
        mb.mem.w32(e + 20, 2);
        e += 24;
    }
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::Unreadable {
            what: "memory map",
            addr: e
        }
    );
    // More than 4096 raw entries, even if they would merge, are refused.
    let mut mb = Mb1 {
        mem: Mem::new(MB1_BASE, 0x30000),
        info: MB1_INFO,
    };
    let entries: Vec<(u64, u64, u32)> = (0..4097u64).map(|i| (i * 0x1000, 0x1000, 1)).collect();
    mb.mmap(&entries);
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::TooManyRegions
    );
    // Many distinct entries: more than 128 regions.
    let entries: Vec<(u64, u64, u32)> = (0..200u64).map(|i| (i * 0x2000, 0x1000, 1)).collect();
    let mut mb = Mb1::new();
    mb.mmap(&entries);
    assert_eq!(
        multiboot1::parse(mb.info, &mb.mem).unwrap_err(),
        BootInfoError::TooManyRegions
    );
}

#[test]
fn mb1_many_adjacent_entries_merge() {
    // 300 adjacent available pages merge into one region.
    let entries: Vec<(u64, u64, u32)> = (0..300u64)
        .map(|i| (0x100000 + i * 0x1000, 0x1000, 1))
        .collect();
    let mut mb = Mb1::new();
    mb.mmap(&entries);
    let info = multiboot1::parse(mb.info, &mb.mem).unwrap();
    assert_eq!(
        info.memory_map(),
        [region(0x100000, 300 * 0x1000, MemKind::Available)]
    );
}

#[test]
fn mb1_odd_regions() {
    let mut mb = Mb1::new();
    mb.mmap(&[
        (0x1000, 0, 1),                 // empty: dropped
        (0x2000, 0x1000, 7),            // unknown type: reserved
        (u64::MAX - 0xfff, 0x10000, 1), // runs past 2^64: cut
        (0x5000, 0x1000, 3),
        (0x6000, 0x1000, 4),
        (0x7000, 0x1000, 5),
    ]);
    let info = multiboot1::parse(mb.info, &mb.mem).unwrap();
    assert_eq!(
        info.memory_map(),
        [
            region(0x2000, 0x1000, MemKind::Reserved),
            region(u64::MAX - 0xfff, 0xfff, MemKind::Available),
            region(0x5000, 0x1000, MemKind::AcpiReclaimable),
            region(0x6000, 0x1000, MemKind::AcpiNvs),
            region(0x7000, 0x1000, MemKind::Bad),
        ]
    );
}

#[test]
fn error_messages_are_sentences() {
    let errors = [
        BootInfoError::NullPointer,
        BootInfoError::Misaligned(4),
        BootInfoError::BadTotalSize(3),
        BootInfoError::BadTag {
            offset: 8,
            ty: 6,
            size: 4,
        },
        BootInfoError::NoEndTag,
        BootInfoError::BadMmapEntry { offset: 0, size: 0 },
        BootInfoError::UnsupportedMmapEntrySize(20),
        BootInfoError::TooManyRegions,
        BootInfoError::UnterminatedString("command line"),
    ];
    for e in errors {
        let s = e.to_string();
        assert!(s.len() > 10 && !s.ends_with('.'), "{s}");
    }
}

// ---------------------------------------------------------------- multiboot2

fn mb2_parse(words: &[u64]) -> Result<BootInfo, BootInfoError> {
    // SAFETY: the buffer is live, 8-aligned and as long as its total_size
    // (tests that lie about total_size only make it shorter or rejectable
    // from the first word).
    unsafe { multiboot2::parse(words.as_ptr() as u64) }
}

#[test]
fn mb2_grub_like() {
    let words = Mb2::default()
        .cmdline("/boot/thinvisor log=trace")
        .tag(2, b"GRUB 2.06\0") // boot loader name: skipped
        .module(0x400000, 0x410000, "/boot/guest.elf")
        .module(0x410000, 0x420000, "/boot/initrd")
        .tag(4, &[0x7f, 2, 0, 0, 0, 0xfc, 7, 0]) // basic meminfo: map wins
        .mmap(&QEMU_E820)
        .end()
        .build();
    let info = mb2_parse(&words).unwrap();
    assert_eq!(info.cmdline(), "/boot/thinvisor log=trace");
    let mods: Vec<_> = info
        .modules()
        .iter()
        .map(|m| (m.start, m.end, m.string()))
        .collect();
    assert_eq!(
        mods,
        [
            (0x400000, 0x410000, "/boot/guest.elf"),
            (0x410000, 0x420000, "/boot/initrd")
        ]
    );
    assert_eq!(info.memory_map(), qemu_regions().as_slice());
    let pa = words.as_ptr() as u64;
    assert_eq!(info.info_range(), (pa, pa + words.len() as u64 * 8));
}

#[test]
fn mb2_basic_meminfo_fallback() {
    let mut body = Vec::new();
    body.extend_from_slice(&639u32.to_ne_bytes());
    body.extend_from_slice(&0x7fc00u32.to_ne_bytes());
    let words = Mb2::default().tag(4, &body).end().build();
    let info = mb2_parse(&words).unwrap();
    assert_eq!(
        info.memory_map(),
        [
            region(0, 639 * 1024, MemKind::Available),
            region(0x100000, 0x7fc00 * 1024, MemKind::Available)
        ]
    );
}

#[test]
fn mb2_no_memory_information() {
    let words = Mb2::default().cmdline("x").end().build();
    assert_eq!(mb2_parse(&words).unwrap_err(), BootInfoError::NoMemoryMap);
}

#[test]
fn mb2_bad_pointers() {
    // SAFETY: a null pointer is rejected before anything is read.
    let e = unsafe { multiboot2::parse(0) }.unwrap_err();
    assert_eq!(e, BootInfoError::NullPointer);
    let words = Mb2::default().mmap(&QEMU_E820).end().build();
    let pa = words.as_ptr() as u64 + 4;
    // SAFETY: a misaligned pointer is rejected before anything is read.
    let e = unsafe { multiboot2::parse(pa) }.unwrap_err();
    assert_eq!(e, BootInfoError::Misaligned(pa));
}

#[test]
fn mb2_bad_total_size() {
    let good = Mb2::default().mmap(&QEMU_E820).end().build();
    for size in [
        0u32,
        8,
        15,
        17,
        good.len() as u32 * 8 - 4,
        (1 << 20) + 8,
        u32::MAX,
    ] {
        let mut w = good.clone();
        patch32(&mut w, 0, size);
        // Sizes below the buffer are read only within it; larger ones are
        // rejected from the first word (not a multiple of 8 or above 1 MiB).
        assert_eq!(
            mb2_parse(&w).unwrap_err(),
            BootInfoError::BadTotalSize(size),
            "{size}"
        );
    }
}

#[test]
fn mb2_missing_end_tag() {
    let words = Mb2::default().mmap(&QEMU_E820).build();
    assert_eq!(mb2_parse(&words).unwrap_err(), BootInfoError::NoEndTag);
    // Truncated: total_size stops before the end tag.
    let mut words = Mb2::default().mmap(&QEMU_E820).end().build();
    let len = words.len() as u32 * 8;
    patch32(&mut words, 0, len - 8);
    assert_eq!(mb2_parse(&words).unwrap_err(), BootInfoError::NoEndTag);
    // An end tag with a wrong size.
    let words = Mb2::default()
        .mmap(&QEMU_E820)
        .raw_tag(0, 16, &[0; 8])
        .build();
    assert!(matches!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::BadTag {
            ty: 0,
            size: 16,
            ..
        }
    ));
}

#[test]
fn mb2_bad_tag_sizes() {
    // A tag smaller than its header.
    let words = Mb2::default().raw_tag(1, 4, &[0; 8]).end().build();
    assert_eq!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::BadTag {
            offset: 8,
            ty: 1,
            size: 4
        }
    );
    // A tag running past the end of the structure.
    let words = Mb2::default()
        .mmap(&QEMU_E820)
        .raw_tag(1, 0x1000, b"abc\0")
        .end()
        .build();
    assert!(matches!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::BadTag {
            ty: 1,
            size: 0x1000,
            ..
        }
    ));
    // A size so large that rounding it up overflows.
    let words = Mb2::default().raw_tag(9, u32::MAX, &[]).end().build();
    assert!(matches!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::BadTag { ty: 9, .. }
    ));
    // A module tag too short for its addresses.
    let words = Mb2::default()
        .raw_tag(3, 12, &[0; 8])
        .mmap(&QEMU_E820)
        .end()
        .build();
    assert!(matches!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::BadTag {
            ty: 3,
            size: 12,
            ..
        }
    ));
    // A basic meminfo tag of the wrong size.
    let words = Mb2::default().raw_tag(4, 12, &[0; 8]).end().build();
    assert!(matches!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::BadTag { ty: 4, .. }
    ));
}

#[test]
fn mb2_bad_mmap_tags() {
    // Entry size other than 24.
    let mut body = Vec::new();
    body.extend_from_slice(&20u32.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    body.extend_from_slice(&[0; 40]);
    let words = Mb2::default().tag(6, &body).end().build();
    let e = mb2_parse(&words).unwrap_err();
    assert_eq!(e, BootInfoError::UnsupportedMmapEntrySize(20));
    assert!(e.to_string().contains("expected 24"));
    // Size not a whole number of entries.
    let mut body = Vec::new();
    body.extend_from_slice(&24u32.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    body.extend_from_slice(&[0; 30]);
    let words = Mb2::default().tag(6, &body).end().build();
    assert!(matches!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::BadTag {
            ty: 6,
            size: 46,
            ..
        }
    ));
    // Shorter than its fixed part.
    let words = Mb2::default()
        .raw_tag(6, 12, &[24, 0, 0, 0, 0, 0, 0, 0])
        .end()
        .build();
    assert!(matches!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::BadTag {
            ty: 6,
            size: 12,
            ..
        }
    ));
    // Too many regions.
    let entries: Vec<(u64, u64, u32)> = (0..129u64).map(|i| (i * 0x2000, 0x1000, 1)).collect();
    let words = Mb2::default().mmap(&entries).end().build();
    assert_eq!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::TooManyRegions
    );
}

#[test]
fn mb2_strings() {
    let words = Mb2::default()
        .tag(1, b"no nul")
        .mmap(&QEMU_E820)
        .end()
        .build();
    assert_eq!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::UnterminatedString("command line")
    );
    let words = Mb2::default()
        .tag(1, b"bad \xc3\0")
        .mmap(&QEMU_E820)
        .end()
        .build();
    assert_eq!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::NotUtf8("command line")
    );
    let mut body = vec![0u8; 8];
    body.extend_from_slice(b"\xff\0");
    let words = Mb2::default().tag(3, &body).mmap(&QEMU_E820).end().build();
    assert_eq!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::NotUtf8("module string")
    );
    let long = "z".repeat(2000);
    let words = Mb2::default().cmdline(&long).mmap(&QEMU_E820).end().build();
    let info = mb2_parse(&words).unwrap();
    assert_eq!(info.cmdline(), &long[..1024]);
    assert!(info.truncated());
}

#[test]
fn mb2_modules() {
    let mut mb = Mb2::default();
    for i in 0..17 {
        mb.module(i * 0x1000, i * 0x1000 + 0x10, "m");
    }
    let words = mb.mmap(&QEMU_E820).end().build();
    assert_eq!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::TooManyModules(17)
    );
    let words = Mb2::default()
        .module(0x2000, 0x1000, "back")
        .mmap(&QEMU_E820)
        .end()
        .build();
    assert_eq!(
        mb2_parse(&words).unwrap_err(),
        BootInfoError::BadModule {
            index: 0,
            start: 0x2000,
            end: 0x1000
        }
    );
}

#[test]
fn boot_info_by_hand() {
    let mut info = BootInfo::new();
    info.set_cmdline("a b");
    info.push_region(region(0x100000, 0x1000, MemKind::Available))
        .unwrap();
    info.push_region(region(0x101000, 0x1000, MemKind::Available))
        .unwrap();
    info.push_region(region(0x102000, 0x1000, MemKind::Reserved))
        .unwrap();
    info.push_module(1, 2, "m").unwrap();
    assert_eq!(info.cmdline(), "a b");
    assert_eq!(info.memory_map().len(), 2);
    assert_eq!(info.memory_map()[0].len, 0x2000);
    assert_eq!(info.modules().len(), 1);
    let dbg = format!("{info:?}");
    assert!(dbg.contains("a b"));
}

// ---------------------------------------------------------------- resume

/// What thinvisor.efi hands over under OVMF (crates/boot's `resume`).
fn uefi_resume() -> thinvisor_boot::resume::ResumeState {
    use thinvisor_boot::resume::{ResumeState, RESUME_VERSION};
    let mut gprs = [0u64; 16];
    gprs[4] = 0x7FF8_0F28; // RSP
    gprs[1] = 0x1234; // RCX
    ResumeState {
        version: RESUME_VERSION,
        size: core::mem::size_of::<ResumeState>() as u32,
        gprs,
        rip: 0x7E5A_1234,
        rflags: 0x246,
        cr0: 0x8001_0033,
        cr3: 0x7FC0_1000,
        cr4: 0x668,
        efer: 0xD00,
        gdt_base: 0x7F9D_C000,
        idt_base: 0x7F1A_0018,
        gdt_limit: 0x47,
        idt_limit: 0xFFF,
        selectors: [0x38, 0x30, 0x30, 0x30, 0x30, 0x30, 0, 0],
        pat: 0x0007_0406_0007_0406,
        dr7: 0x400,
        block_start: 0x7E00_0000,
        block_end: 0x7E80_0000,
        rsdp: 0x7FB7_E014,
        ..ResumeState::default()
    }
}

#[test]
fn mb2_resume_tag_and_acpi_rsdp() {
    use thinvisor_boot::resume::TAG_RESUME;
    let state = uefi_resume();
    let mut rsdp = [0u8; 36];
    rsdp[..8].copy_from_slice(b"RSD PTR ");
    rsdp[15] = 2;
    let words = Mb2::default()
        .cmdline("log=debug")
        .mmap(&QEMU_E820)
        .tag(14, &rsdp[..20]) // ACPI 1.0 RSDP copy
        .tag(15, &rsdp) // ACPI 2.0+: preferred
        .tag(TAG_RESUME, &state.to_bytes())
        .end()
        .build();
    let info = mb2_parse(&words).unwrap();
    assert_eq!(info.resume(), Some(&state));
    // The RSDP is the copy inside the information: the new tag's payload,
    // after the header (8), the command line (8 + 10, padded to 24), the
    // map (16 + 6 * 24) and the old tag (8 + 20, padded to 32).
    let pa = words.as_ptr() as u64;
    assert_eq!(info.rsdp(), Some(pa + 8 + 24 + 160 + 32 + 8));
    assert_eq!(info.memory_map(), qemu_regions().as_slice());
    // Without the tag: no resume, and no RSDP.
    let plain = Mb2::default().mmap(&QEMU_E820).end().build();
    let info = mb2_parse(&plain).unwrap();
    assert!(info.resume().is_none() && info.rsdp().is_none());
}

#[test]
fn mb2_bad_resume_tags_are_boot_errors() {
    use thinvisor_boot::resume::{ResumeError, ResumeState, TAG_RESUME};
    let state = uefi_resume();
    let bytes = state.to_bytes();
    let parse = |payload: &[u8]| {
        let words = Mb2::default()
            .mmap(&QEMU_E820)
            .tag(TAG_RESUME, payload)
            .end()
            .build();
        mb2_parse(&words).map(|i| i.resume().copied())
    };
    assert_eq!(
        parse(&bytes[..100]),
        Err(BootInfoError::Resume(ResumeError::TooShort(100)))
    );
    let v2 = ResumeState {
        version: 2,
        ..state
    };
    assert_eq!(
        parse(&v2.to_bytes()),
        Err(BootInfoError::Resume(ResumeError::Version(2)))
    );
    let real = ResumeState { cr0: 0x11, ..state };
    assert_eq!(
        parse(&real.to_bytes()),
        Err(BootInfoError::Resume(ResumeError::NotLongMode))
    );
    let empty = ResumeState {
        block_end: state.block_start,
        ..state
    };
    assert!(matches!(
        parse(&empty.to_bytes()),
        Err(BootInfoError::Resume(ResumeError::BadBlock { .. }))
    ));
    // A tag whose size runs past the structure: refused before the payload.
    let words = Mb2::default()
        .mmap(&QEMU_E820)
        .raw_tag(TAG_RESUME, 4096, &bytes)
        .end()
        .build();
    assert!(matches!(
        mb2_parse(&words),
        Err(BootInfoError::BadTag { .. })
    ));
    assert!(BootInfoError::Resume(ResumeError::NotLongMode)
        .to_string()
        .contains("64-bit"));
}

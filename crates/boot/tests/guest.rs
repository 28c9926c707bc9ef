mod common;

use common::*;
use thinvisor_boot::guest::{
    load_multiboot_kernel, write_multiboot1_info, LoadError, LoadedKernel, Segment,
};
use thinvisor_boot::multiboot1::{self, PhysRead};
use thinvisor_boot::{MemKind, MemRegion};

const MIB: u64 = 1 << 20;
const RAM: usize = 4 << 20;

/// Guest RAM filled with a pattern, so zeroing (bss) is visible.
fn fresh_ram() -> Vec<u8> {
    vec![0xAA; RAM]
}

fn text(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1)
        .collect()
}

fn load(image: &[u8]) -> Result<LoadedKernel, LoadError> {
    load_multiboot_kernel(image, &mut fresh_ram())
}

/// ELF with a text segment at 1 MiB and a data+bss segment at 1 MiB + 64 KiB.
fn two_segments(class64: bool) -> (Elf, Vec<u8>, Vec<u8>) {
    let t = text(0x1234, 1);
    let d = text(0x100, 9);
    let spec = Elf::new(
        class64,
        0x100010,
        vec![
            Seg::load(0x100000, &t, 0x1234),
            Seg::load(0x110000, &d, 0x3000),
        ],
    );
    (spec, t, d)
}

fn check_two_segments(class64: bool) {
    let (spec, t, d) = two_segments(class64);
    let image = build_elf(&spec);
    let mut ram = fresh_ram();
    let k = load_multiboot_kernel(&image, &mut ram).unwrap();
    assert_eq!(
        k,
        LoadedKernel {
            entry: 0x100010,
            load_end: 0x113000
        }
    );
    assert_eq!(&ram[0x100000..0x101234], &t[..]);
    assert_eq!(ram[0x101234], 0xAA); // untouched between segments
    assert_eq!(&ram[0x110000..0x110100], &d[..]);
    assert!(ram[0x110100..0x113000].iter().all(|&b| b == 0)); // bss
    assert_eq!(ram[0x113000], 0xAA);
    assert_eq!(ram[0xfffff], 0xAA);
}

#[test]
fn elf32_loads() {
    check_two_segments(false);
}

#[test]
fn elf64_loads() {
    check_two_segments(true);
}

#[test]
fn higher_half_entry_is_translated() {
    for class64 in [false, true] {
        let mut seg = Seg::load(0x200000, &text(0x100, 3), 0x100);
        seg.vaddr = 0xC020_0000;
        let image = build_elf(&Elf::new(class64, 0xC020_0040, vec![seg.clone()]));
        assert_eq!(load(&image).unwrap().entry, 0x200040);
        // A physical e_entry is accepted as well.
        let image = build_elf(&Elf::new(class64, 0x200040, vec![seg]));
        assert_eq!(load(&image).unwrap().entry, 0x200040);
    }
}

#[test]
fn other_segment_types_are_ignored() {
    let mut note = Seg::load(0, &[], 0);
    note.p_type = 4; // PT_NOTE with nonsense fields
    note.offset = Some(u64::MAX);
    note.paddr = u64::MAX;
    note.filesz = Some(u64::MAX);
    let empty = Seg::load(0x300000, &[], 0); // PT_LOAD of zero size
    let spec = Elf::new(
        true,
        0x100000,
        vec![note, Seg::load(0x100000, &[0x90; 16], 16), empty],
    );
    assert_eq!(load(&build_elf(&spec)).unwrap().load_end, 0x100010);
}

#[test]
fn flags() {
    let (mut spec, ..) = two_segments(false);
    for ok_flags in [0, 1, 2, 3, 4, 7, 0xfffe_0007] {
        spec.mb_flags = Some(ok_flags);
        assert!(load(&build_elf(&spec)).is_ok(), "{ok_flags:#x}");
    }
    for (flags, unknown) in [(1 << 3, 8), (0x8003, 0x8000), (0xffff, 0xfff8)] {
        spec.mb_flags = Some(flags);
        let e = load(&build_elf(&spec)).unwrap_err();
        assert_eq!(e, LoadError::UnsupportedFlags(unknown));
        assert!(e.to_string().contains("requires features"));
    }
}

#[test]
fn header_search() {
    let (mut spec, ..) = two_segments(false);
    spec.mb_flags = None;
    let plain = build_elf(&spec);
    assert_eq!(load(&plain).unwrap_err(), LoadError::NoMultibootHeader);
    // Neither ELF nor a header: the message says both.
    assert_eq!(load(&[]).unwrap_err(), LoadError::NotElf);
    assert_eq!(load(&mb_header(0)[..11]).unwrap_err(), LoadError::NotElf);

    // Beyond the first 8192 bytes, or crossing that limit, or unaligned
    // (in files that start like ELF, so only the header search decides).
    let elf_start = |len: usize| {
        let mut v = vec![0u8; len];
        v[..4].copy_from_slice(b"\x7fELF");
        v
    };
    let mut late = elf_start(9000);
    late[8192..8204].copy_from_slice(&mb_header(0));
    assert_eq!(load(&late).unwrap_err(), LoadError::NoMultibootHeader);
    let mut crossing = elf_start(9000);
    crossing[8184..8196].copy_from_slice(&mb_header(0));
    assert_eq!(load(&crossing).unwrap_err(), LoadError::NoMultibootHeader);
    let mut unaligned = elf_start(100);
    unaligned[6..18].copy_from_slice(&mb_header(0));
    assert_eq!(load(&unaligned).unwrap_err(), LoadError::NoMultibootHeader);

    // A header ending exactly at 8192 is found.
    let mut last = vec![0u8; 8192];
    last[8180..8192].copy_from_slice(&mb_header(0));
    assert_eq!(load(&last).unwrap_err(), LoadError::NotElf);
}

#[test]
fn bad_checksum() {
    let mut image = vec![0u8; 64];
    let mut h = mb_header(3);
    h[8] ^= 1;
    image[16..28].copy_from_slice(&h);
    let e = load(&image).unwrap_err();
    assert_eq!(e, LoadError::BadChecksum { offset: 16 });
    assert!(e.to_string().contains("checksum"));
    // A valid header after a broken one wins.
    image[32..44].copy_from_slice(&mb_header(3));
    assert_eq!(load(&image).unwrap_err(), LoadError::NotElf);
}

#[test]
fn not_elf() {
    let mut image = text(256, 5);
    image[0..12].copy_from_slice(&mb_header(0));
    let e = load(&image).unwrap_err();
    assert_eq!(e, LoadError::NotElf);
    assert_eq!(
        e.to_string(),
        "guest module is not an ELF file and has no multiboot header with the a.out kludge either"
    );
}

#[test]
fn bad_class_machine_type() {
    let (spec, ..) = two_segments(false);
    let good = build_elf(&spec);

    let mut bad_class = good.clone();
    bad_class[4] = 3;
    assert_eq!(load(&bad_class).unwrap_err(), LoadError::BadElfClass(3));

    let mut big = good.clone();
    big[5] = 2;
    assert_eq!(load(&big).unwrap_err(), LoadError::BigEndianElf);

    let mut bad_data = good.clone();
    bad_data[5] = 7;
    assert!(matches!(
        load(&bad_data).unwrap_err(),
        LoadError::MalformedElf(_)
    ));

    let mut bad_version = good.clone();
    bad_version[6] = 2;
    put32(&mut bad_version, 20, 2);
    assert!(matches!(
        load(&bad_version).unwrap_err(),
        LoadError::MalformedElf(_)
    ));

    for (class64, machine) in [(false, 62u16), (true, 3), (false, 40), (true, 183)] {
        let (mut s, ..) = two_segments(class64);
        s.machine = machine;
        let e = load(&build_elf(&s)).unwrap_err();
        let bits = if class64 { 64 } else { 32 };
        assert_eq!(e, LoadError::BadMachine { bits, machine });
        assert!(e.to_string().contains("not x86"));
    }

    let (mut s, ..) = two_segments(true);
    s.e_type = 3; // ET_DYN
    let e = load(&build_elf(&s)).unwrap_err();
    assert_eq!(e, LoadError::NotExecutable(3));
    assert!(e.to_string().contains("relocation-model=static"));
}

#[test]
fn truncated_elf() {
    let (spec, ..) = two_segments(true);
    let image = build_elf(&spec);
    // Cut inside the ELF header, the program headers, and the segment data.
    for (cut, want) in [
        (
            40,
            LoadError::MalformedElf("the file is truncated or a header table lies outside it"),
        ),
        (
            64 + 56 + 8,
            LoadError::MalformedElf("the file is truncated or a header table lies outside it"),
        ),
    ] {
        // Keep a multiboot header in the cut image.
        let mut short = image[..cut].to_vec();
        short.extend_from_slice(&mb_header(3));
        assert_eq!(load(&short).unwrap_err(), want, "cut at {cut}");
    }
    let cut = image.len() - 0x80;
    let e = load(&image[..cut]).unwrap_err();
    assert_eq!(
        e,
        LoadError::SegmentOutsideImage {
            segment: Segment::ElfProgramHeader(1),
            offset: (image.len() - 0x100) as u64,
            size: 0x100,
            image_len: cut as u64
        }
    );
    assert!(e.to_string().contains("ELF program header 1"));
}

#[test]
fn bad_phdr_table() {
    let (spec, ..) = two_segments(false);
    let mut image = build_elf(&spec);
    put16(&mut image, 42, 31); // e_phentsize
    assert!(matches!(
        load(&image).unwrap_err(),
        LoadError::MalformedElf(_)
    ));
    let mut image = build_elf(&spec);
    put32(&mut image, 28, 0xffff_fff0); // e_phoff
    assert!(matches!(
        load(&image).unwrap_err(),
        LoadError::MalformedElf(_)
    ));
    let mut image = build_elf(&spec);
    put16(&mut image, 44, 0xfffe); // e_phnum
    assert!(matches!(
        load(&image).unwrap_err(),
        LoadError::MalformedElf(_)
    ));
    let mut image = build_elf(&spec);
    put32(&mut image, 28, 0); // no program headers
    assert_eq!(load(&image).unwrap_err(), LoadError::NoLoadableSegments);
    let spec = Elf::new(false, 0x100000, vec![]);
    assert_eq!(
        load(&build_elf(&spec)).unwrap_err(),
        LoadError::NoLoadableSegments
    );
}

#[test]
fn overflowing_segment_fields() {
    let mut seg = Seg::load(0x100000, &[1; 16], 16);
    seg.offset = Some(u64::MAX - 4);
    let e = load(&build_elf(&Elf::new(true, 0x100000, vec![seg]))).unwrap_err();
    assert!(matches!(
        e,
        LoadError::SegmentOutsideImage {
            segment: Segment::ElfProgramHeader(0),
            offset: 0xffff_ffff_ffff_fffb,
            size: 16,
            ..
        }
    ));

    let mut seg = Seg::load(u64::MAX - 4, &[1; 16], 16);
    seg.vaddr = 0x100000;
    let e = load(&build_elf(&Elf::new(true, 0x100000, vec![seg]))).unwrap_err();
    assert!(matches!(
        e,
        LoadError::SegmentOutsideRam {
            addr: 0xffff_ffff_ffff_fffb,
            ..
        }
    ));

    let mut seg = Seg::load(0x100000, &[1; 16], 16);
    seg.filesz = Some(32);
    let e = load(&build_elf(&Elf::new(false, 0x100000, vec![seg]))).unwrap_err();
    assert_eq!(
        e,
        LoadError::FileLargerThanMemory {
            segment: Segment::ElfProgramHeader(0),
            filesz: 32,
            memsz: 16
        }
    );
}

#[test]
fn segment_outside_ram_loads_nothing() {
    let spec = Elf::new(
        false,
        0x100000,
        vec![
            Seg::load(0x100000, &[0x90; 64], 64),
            Seg::load(RAM as u64 - 0x100, &[1; 0x80], 0x200),
        ],
    );
    let mut ram = fresh_ram();
    let e = load_multiboot_kernel(&build_elf(&spec), &mut ram).unwrap_err();
    assert_eq!(
        e,
        LoadError::SegmentOutsideRam {
            segment: Segment::ElfProgramHeader(1),
            addr: RAM as u64 - 0x100,
            size: 0x200,
            ram_len: RAM as u64
        }
    );
    assert!(e.to_string().contains("guest_mem="));
    assert!(
        ram.iter().all(|&b| b == 0xAA),
        "nothing may be written on error"
    );
    // The same image fits in RAM that ends exactly at the segment's end.
    let mut bigger = vec![0u8; RAM + 0x100];
    assert!(load_multiboot_kernel(&build_elf(&spec), &mut bigger).is_ok());
}

#[test]
fn bad_entry() {
    for entry in [0x0fffff, 0x100040, 0x1_0010_0000] {
        let spec = Elf::new(true, entry, vec![Seg::load(0x100000, &[0x90; 64], 64)]);
        let e = load(&build_elf(&spec)).unwrap_err();
        assert_eq!(e, LoadError::BadEntry(entry));
    }
    // Entry in a segment that translates to an address above 4 GiB.
    let mut seg = Seg::load(0x1_0000_0000, &[0x90; 64], 64);
    seg.vaddr = 0x100000;
    let spec = Elf::new(true, 0x100000, vec![seg]);
    let mut big = vec![0u8; (4 << 30) + 0x1000];
    let e = load_multiboot_kernel(&build_elf(&spec), &mut big).unwrap_err();
    assert_eq!(e, LoadError::BadEntry(0x100000));
}

// ------------------------------------------------------------------ a.out kludge

#[test]
fn aout_kludge_loads() {
    // File: 0x40 bytes before the header; load 0x800 bytes at 2 MiB; bss to 2 MiB + 0x2000.
    let image = build_aout(
        0x1000,
        0x40,
        [0x200040, 0x200000, 0x200800, 0x202000, 0x200100],
        0,
    );
    let mut ram = fresh_ram();
    let k = load_multiboot_kernel(&image, &mut ram).unwrap();
    assert_eq!(
        k,
        LoadedKernel {
            entry: 0x200100,
            load_end: 0x202000
        }
    );
    assert_eq!(&ram[0x200000..0x200800], &image[..0x800]);
    assert!(ram[0x200800..0x202000].iter().all(|&b| b == 0));
    assert_eq!(ram[0x202000], 0xAA);

    // load_end_addr = 0: the rest of the file; bss_end_addr = 0: no bss.
    let image = build_aout(0x1000, 0x40, [0x200040, 0x200000, 0, 0, 0x200100], 4);
    let mut ram = fresh_ram();
    let k = load_multiboot_kernel(&image, &mut ram).unwrap();
    assert_eq!(k.load_end, 0x201000);
    assert_eq!(&ram[0x200000..0x201000], &image[..]);

    // Loading may start after the file's beginning (header_addr - load_addr < offset).
    let image = build_aout(
        0x1000,
        0x200,
        [0x300100, 0x300000, 0x300400, 0, 0x300000],
        0,
    );
    let mut ram = fresh_ram();
    let k = load_multiboot_kernel(&image, &mut ram).unwrap();
    assert_eq!(k.load_end, 0x300400);
    assert_eq!(&ram[0x300000..0x300400], &image[0x100..0x500]);
}

#[test]
fn aout_kludge_in_elf_wins() {
    // An ELF64 whose multiboot header uses the a.out kludge (QEMU-style):
    // the header's addresses are used, not the program headers.
    let mut spec = Elf::new(true, 0xdead_0000, vec![Seg::load(0x900_0000, &[1; 16], 16)]);
    spec.mb_flags = None;
    let mut image = build_elf(&spec);
    let off = image.len().next_multiple_of(4);
    image.resize(off, 0);
    image.extend_from_slice(&mb_header(1 << 16));
    for a in [0x100000 + off as u32, 0x100000, 0, 0x104000, 0x100000] {
        image.extend_from_slice(&a.to_le_bytes());
    }
    let k = load(&image).unwrap();
    assert_eq!(
        k,
        LoadedKernel {
            entry: 0x100000,
            load_end: 0x104000
        }
    );
}

#[test]
fn aout_kludge_errors() {
    let cases: [([u32; 5], LoadError); 7] = [
        (
            [0x200040, 0x200080, 0, 0, 0x200080],
            LoadError::BadAoutAddresses("load_addr lies above header_addr"),
        ),
        (
            [0x200040, 0x100000, 0, 0, 0x100000],
            LoadError::BadAoutAddresses("load_addr lies before the start of the file"),
        ),
        (
            [0x200040, 0x200000, 0x100000, 0, 0x200000],
            LoadError::BadAoutAddresses("load_end_addr lies below load_addr"),
        ),
        (
            [0x200040, 0x200000, 0x200800, 0x200400, 0x200000],
            LoadError::BadAoutAddresses("bss_end_addr lies below the end of the loaded data"),
        ),
        (
            [0x200040, 0x200000, 0x202000, 0, 0x200000],
            LoadError::SegmentOutsideImage {
                segment: Segment::AoutImage,
                offset: 0,
                size: 0x2000,
                image_len: 0x1000,
            },
        ),
        (
            [0x3ff040, 0x3ff000, 0, 0x401000, 0x3ff000],
            LoadError::SegmentOutsideRam {
                segment: Segment::AoutImage,
                addr: 0x3ff000,
                size: 0x2000,
                ram_len: RAM as u64,
            },
        ),
        (
            [0x200040, 0x200000, 0, 0x202000, 0x202000],
            LoadError::BadEntry(0x202000),
        ),
    ];
    for (addrs, want) in cases {
        let image = build_aout(0x1000, 0x40, addrs, 0);
        let mut ram = fresh_ram();
        assert_eq!(
            load_multiboot_kernel(&image, &mut ram).unwrap_err(),
            want,
            "{addrs:x?}"
        );
        assert!(ram.iter().all(|&b| b == 0xAA));
        assert!(!want.to_string().is_empty());
    }
    // Header cut off after its checksum.
    let mut image = vec![0u8; 8];
    image.extend_from_slice(&mb_header(1 << 16));
    image.extend_from_slice(&[0; 8]);
    assert_eq!(load(&image).unwrap_err(), LoadError::HeaderTruncated);
}

// ---------------------------------------------------------- information structure

struct Ram<'a>(&'a [u8]);

impl PhysRead for Ram<'_> {
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
        let Ok(start) = usize::try_from(pa) else {
            return false;
        };
        match start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

#[test]
fn info_round_trip() {
    let mut ram = vec![0xAAu8; 32 << 20];
    let at = write_multiboot1_info(&mut ram, 0x113000, b"console=ttyS0 quiet").unwrap();
    assert_eq!(at, 0x113000);
    assert_eq!(get32(&ram, 0x113000), 0x45); // MEM | CMDLINE | MMAP
    assert_eq!(get32(&ram, 0x113004), 640);
    assert_eq!(get32(&ram, 0x113008), (32 * 1024) - 1024);
    let info = multiboot1::parse(at.into(), &Ram(&ram)).unwrap();
    assert_eq!(info.cmdline(), "console=ttyS0 quiet");
    assert_eq!(
        info.memory_map(),
        [
            MemRegion {
                start: 0,
                len: 0x9fc00,
                kind: MemKind::Available
            },
            MemRegion {
                start: MIB,
                len: 31 * MIB,
                kind: MemKind::Available
            }
        ]
    );
    // The structure and everything it points to lie just after `at`.
    let (lo, hi) = info.info_range();
    assert_eq!(lo, 0x113000);
    assert!(hi < 0x114000);
    assert_eq!(ram[hi as usize], 0xAA);
}

#[test]
fn info_in_low_memory_and_cmdline_nul() {
    let mut ram = vec![0u8; 2 << 20];
    let at = write_multiboot1_info(&mut ram, 0x8000, b"a\0b").unwrap();
    let info = multiboot1::parse(at.into(), &Ram(&ram)).unwrap();
    assert_eq!(info.cmdline(), "a");
    assert_eq!(info.memory_map()[1].len, MIB);
    // Up to 4 GiB of RAM has a mem_upper that fits.
    let mut ram = vec![0u8; 4 << 30];
    write_multiboot1_info(&mut ram, 0x100000, b"").unwrap();
    assert_eq!(get32(&ram, 0x100008), (4 << 20) - 1024);
}

#[test]
fn info_errors() {
    let mut ram = vec![0u8; 8 << 20];
    assert_eq!(
        write_multiboot1_info(&mut ram, 0x100800, b"").unwrap_err(),
        LoadError::InfoMisaligned(0x100800)
    );
    let long = vec![b'x'; 0x2000];
    let e = write_multiboot1_info(&mut ram, (8 << 20) - 0x1000, &long).unwrap_err();
    assert_eq!(
        e,
        LoadError::InfoOutsideRam {
            at: (8 << 20) - 0x1000,
            size: 136 + 0x2001
        }
    );
    // The legacy hole between 640 KiB and 1 MiB is not RAM for the guest.
    assert!(matches!(
        write_multiboot1_info(&mut ram, 0xA0000, b"").unwrap_err(),
        LoadError::InfoOutsideRam { .. }
    ));
    assert!(matches!(
        write_multiboot1_info(&mut ram, 0x9F000, &long).unwrap_err(),
        LoadError::InfoOutsideRam { .. }
    ));
    assert!(matches!(
        write_multiboot1_info(&mut ram, !0xfff, b"").unwrap_err(),
        LoadError::InfoOutsideRam { .. }
    ));
    let mut small = vec![0u8; MIB as usize];
    assert_eq!(
        write_multiboot1_info(&mut small, 0x1000, b"").unwrap_err(),
        LoadError::BadRamSize(MIB)
    );
    assert!(ram.iter().all(|&b| b == 0));
}

//! The multiboot v1 loader in the pass-through layout.

mod common;

use common::*;
use thinvisor_boot::e820::{GuestMap, Unusable};
use thinvisor_boot::guest::{
    load_multiboot_kernel_passthrough, load_multiboot_passthrough,
    write_multiboot1_info_passthrough, LoadError, PlacedKernel, Segment,
};
use thinvisor_boot::multiboot1;
use thinvisor_boot::MemRegion;

/// thinvisor's image at 2 MiB and a block at 32 MiB.
const HIDDEN: [(u64, u64); 2] = [(0x20_0000, 0x60_0000), (0x200_0000, 0x240_0000)];

fn map() -> GuestMap {
    GuestMap::new(&qemu_map(), &HIDDEN).unwrap()
}

fn text(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 1) as u8).collect()
}

/// Text at 1 MiB, data + bss at 8 MiB.
fn kernel(class64: bool) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let t = text(0x1234);
    let d = text(0x100);
    let image = build_elf(&Elf::new(
        class64,
        0x10_0010,
        vec![
            Seg::load(0x10_0000, &t, 0x1234),
            Seg::load(0x80_0000, &d, 0x3000),
        ],
    ));
    (image, t, d)
}

#[test]
fn loads_and_describes_the_real_map() {
    for class64 in [false, true] {
        let (image, t, d) = kernel(class64);
        let map = map();
        let mut mem = Sparse::default();
        let avoid = [(0x1000_0000, 0x1010_0000)];
        let boot =
            load_multiboot_passthrough(&image, b"guest.elf checks\0junk", &map, &avoid, &mut mem)
                .unwrap();
        assert_eq!(
            boot.kernel,
            PlacedKernel {
                entry: 0x10_0010,
                start: 0x10_0000,
                end: 0x80_3000
            }
        );
        assert_eq!(mem.bytes(0x10_0000, t.len()), t);
        assert_eq!(mem.bytes(0x80_0000, d.len()), d);
        assert!(mem.bytes(0x80_0100, 0x2F00).iter().all(|&b| b == 0));
        // The information sits at the bottom of the low window.
        assert_eq!(boot.info, 0x1_0000);
        let e = boot.entry;
        assert_eq!((e.eip, e.eax, e.ebx), (0x10_0010, 0x2BAD_B002, 0x1_0000));
        assert_eq!(
            (e.code_selector, e.data_selector, e.gdtr),
            (0x08, 0x10, None)
        );
        assert_eq!(e.eflags & (1 << 9), 0);

        // Read back with the crate's own multiboot parser.
        let info = multiboot1::parse(boot.info.into(), &mem).unwrap();
        assert_eq!(info.cmdline(), "guest.elf checks");
        let want: Vec<MemRegion> = map
            .e820()
            .iter()
            .map(|e| MemRegion {
                start: e.addr,
                len: e.size,
                kind: e.kind,
            })
            .collect();
        assert_eq!(info.memory_map(), &want[..]);
        // mem_lower: 0x9fc00 bytes from 0; mem_upper: 1 MiB up to the
        // hidden image at 2 MiB.
        assert_eq!(mem.r32(0x1_0004), 0x9_FC00 / 1024);
        assert_eq!(mem.r32(0x1_0008), 1024);
        assert_eq!(mem.r32(0x1_0000), 0x45);
        // Nothing written outside usable RAM or into the avoid range.
        for &(s, e) in &mem.writes {
            assert_eq!(map.check_usable(s, e - s), Ok(()));
            assert!(e <= avoid[0].0 || avoid[0].1 <= s);
        }
    }
}

#[test]
fn segments_in_hidden_memory_are_refused() {
    // The data segment runs into thinvisor's block at 32 MiB.
    let image = build_elf(&Elf::new(
        false,
        0x10_0000,
        vec![
            Seg::load(0x10_0000, &[0x90; 64], 64),
            Seg::load(0x1FF_F000, &[1; 0x800], 0x2000),
        ],
    ));
    let mut mem = Sparse::default();
    let e = load_multiboot_kernel_passthrough(&image, &map(), &[], &mut mem).unwrap_err();
    assert_eq!(
        e,
        LoadError::SegmentNotUsable {
            segment: Segment::ElfProgramHeader(1),
            addr: 0x1FF_F000,
            size: 0x2000,
            at: 0x200_0000,
            why: Unusable::Hypervisor
        }
    );
    assert_eq!(
        e.to_string(),
        "guest kernel's ELF program header 1 (0x1fff000+0x2000) cannot be loaded: 0x2000000 is thinvisor's own memory"
    );
    assert!(mem.writes.is_empty(), "nothing written on error");

    // Entirely inside the hidden image.
    let image = build_elf(&Elf::new(
        true,
        0x30_0000,
        vec![Seg::load(0x30_0000, &[0x90; 64], 64)],
    ));
    assert!(matches!(
        load_multiboot_kernel_passthrough(&image, &map(), &[], &mut mem).unwrap_err(),
        LoadError::SegmentNotUsable {
            at: 0x30_0000,
            why: Unusable::Hypervisor,
            ..
        }
    ));
}

#[test]
fn segments_outside_ram_or_on_modules_are_refused() {
    let mut mem = Sparse::default();
    // The BIOS area.
    let image = build_elf(&Elf::new(
        false,
        0xF_0000,
        vec![Seg::load(0xF_0000, &[0x90; 64], 64)],
    ));
    let e = load_multiboot_kernel_passthrough(&image, &map(), &[], &mut mem).unwrap_err();
    assert!(matches!(
        e,
        LoadError::SegmentNotUsable {
            at: 0xF_0000,
            why: Unusable::NotRam,
            ..
        }
    ));
    assert!(e.to_string().contains("not usable RAM"));
    // Past the end of RAM.
    let image = build_elf(&Elf::new(
        false,
        0x1FFD_0000,
        vec![Seg::load(0x1FFD_0000, &[0x90; 64], 0x2_0000)],
    ));
    assert!(matches!(
        load_multiboot_kernel_passthrough(&image, &map(), &[], &mut mem).unwrap_err(),
        LoadError::SegmentNotUsable {
            at: 0x1FFE_0000,
            why: Unusable::NotRam,
            ..
        }
    ));
    // On the module the image is read from.
    let image = build_elf(&Elf::new(
        false,
        0x10_0000,
        vec![Seg::load(0x10_0000, &[0x90; 64], 0x1_0000)],
    ));
    let e = load_multiboot_kernel_passthrough(&image, &map(), &[(0x10_8000, 0x11_0000)], &mut mem)
        .unwrap_err();
    assert!(matches!(
        e,
        LoadError::SegmentNotUsable {
            at: 0x10_8000,
            why: Unusable::Source,
            ..
        }
    ));
    // Overflowing addresses.
    let mut seg = Seg::load(u64::MAX - 4, &[1; 16], 16);
    seg.vaddr = 0x10_0000;
    let image = build_elf(&Elf::new(true, 0x10_0000, vec![seg]));
    assert!(matches!(
        load_multiboot_kernel_passthrough(&image, &map(), &[], &mut mem).unwrap_err(),
        LoadError::SegmentNotUsable {
            why: Unusable::NotRam,
            ..
        }
    ));
    assert!(mem.writes.is_empty());
    let many = vec![(0, 0); 17];
    assert_eq!(
        load_multiboot_kernel_passthrough(&image, &map(), &many, &mut mem).unwrap_err(),
        LoadError::TooManyAvoidRanges(17)
    );
}

#[test]
fn aout_kludge_passthrough() {
    let image = build_aout(
        0x1000,
        0x40,
        [0x70_0040, 0x70_0000, 0x70_0800, 0x70_2000, 0x70_0100],
        0,
    );
    let mut mem = Sparse::default();
    let k = load_multiboot_kernel_passthrough(&image, &map(), &[], &mut mem).unwrap();
    assert_eq!(
        k,
        PlacedKernel {
            entry: 0x70_0100,
            start: 0x70_0000,
            end: 0x70_2000
        }
    );
    assert_eq!(mem.bytes(0x70_0000, 0x800), &image[..0x800]);
    // Into the hidden image.
    let image = build_aout(
        0x1000,
        0x40,
        [0x5F_F040, 0x5F_F000, 0, 0x60_2000, 0x5F_F000],
        0,
    );
    assert!(matches!(
        load_multiboot_kernel_passthrough(&image, &map(), &[], &mut mem).unwrap_err(),
        LoadError::SegmentNotUsable {
            segment: Segment::AoutImage,
            at: 0x5F_F000,
            why: Unusable::Hypervisor,
            ..
        }
    ));
}

#[test]
fn info_placement() {
    let map = map();
    // The kernel occupies the whole low window: the information goes to the
    // first free page above 1 MiB.
    let mut mem = Sparse::default();
    let at = write_multiboot1_info_passthrough(&map, &[(0, 0x9_0000)], b"x", &mut mem).unwrap();
    assert_eq!(at, 0x10_0000);
    let at = write_multiboot1_info_passthrough(
        &map,
        &[(0, 0x9_0000), (0x10_0000, 0x10_0001)],
        b"x",
        &mut mem,
    )
    .unwrap();
    assert_eq!(at, 0x10_1000);
    // No room anywhere below 4 GiB.
    let tiny = GuestMap::new(&[region(0x1_0000, 0x50, 1)], &[]).unwrap();
    let e = write_multiboot1_info_passthrough(&tiny, &[], b"", &mut mem).unwrap_err();
    assert_eq!(e, LoadError::NoRoomForInfo { size: 88 + 24 + 1 });
    assert!(!e.to_string().is_empty());
    // A refused write surfaces.
    let mut holey = Sparse {
        refuse: vec![(0x1_0000, 0x1_0001)],
        ..Sparse::default()
    };
    assert!(matches!(
        write_multiboot1_info_passthrough(&map, &[], b"", &mut holey).unwrap_err(),
        LoadError::Write(_)
    ));
}

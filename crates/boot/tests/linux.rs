//! The Linux 32-bit boot protocol loader, with synthetic bzImages.

mod common;

use common::*;
use thinvisor_boot::e820::{GuestMap, Unusable};
use thinvisor_boot::entry::Gdtr;
use thinvisor_boot::linux::{load_linux, plan_linux, BzImage, LinuxBoot, LinuxError};
use thinvisor_boot::phys::PhysWriteError;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// thinvisor's image at 2 MiB.
const IMAGE: (u64, u64) = (0x20_0000, 0x60_0000);

fn map_with(hidden: &[(u64, u64)]) -> GuestMap {
    GuestMap::new(&qemu_map(), hidden).unwrap()
}

fn initrd(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 256) as u8).collect()
}

fn load(
    image: &[u8],
    rd: Option<&[u8]>,
    cmdline: &[u8],
    map: &GuestMap,
    avoid: &[(u64, u64)],
) -> (Result<LinuxBoot, LinuxError>, Sparse) {
    let mut mem = Sparse::default();
    let r = load_linux(image, rd, cmdline, map, avoid, &mut mem);
    (r, mem)
}

/// The zero page as boot.rst describes it, built independently.
fn expected_zero_page(image: &[u8], boot: &LinuxBoot, map: &GuestMap) -> Vec<u8> {
    let mut bp = vec![0u8; 4096];
    let end = 0x202 + image[0x201] as usize;
    bp[0x1F1..end].copy_from_slice(&image[0x1F1..end]);
    let p = &boot.plan;
    bp[0x210] = 0xFF;
    bp[0x211] = 0x81;
    put32(&mut bp, 0x214, p.kernel as u32);
    put16(&mut bp, 0x224, 0xDE00);
    put32(&mut bp, 0x228, p.cmdline as u32);
    put32(&mut bp, 0x0C8, (p.cmdline >> 32) as u32);
    put32(&mut bp, 0x230, p.kernel_alignment);
    if let Some((s, e)) = p.initrd {
        put32(&mut bp, 0x218, s as u32);
        put32(&mut bp, 0x21C, (e - s) as u32);
        put32(&mut bp, 0x0C0, (s >> 32) as u32);
        put32(&mut bp, 0x0C4, ((e - s) >> 32) as u32);
    }
    bp[0x1E8] = map.e820().len() as u8;
    for (i, e) in map.e820().iter().enumerate() {
        let at = 0x2D0 + 20 * i;
        put64(&mut bp, at, e.addr);
        put64(&mut bp, at + 8, e.size);
        put32(&mut bp, at + 16, e.type_number());
    }
    bp
}

/// Everything a successful load must satisfy.
fn check_load(
    image: &[u8],
    rd: Option<&[u8]>,
    cmdline: &[u8],
    map: &GuestMap,
    avoid: &[(u64, u64)],
    boot: &LinuxBoot,
    mem: &Sparse,
) {
    let p = &boot.plan;
    let bz = BzImage::parse(image).unwrap();
    // The kernel's bytes.
    assert_eq!(p.kernel_len, bz.kernel().len() as u64);
    assert_eq!(mem.bytes(p.kernel, bz.kernel().len()), bz.kernel());
    // The initrd's.
    if let (Some(rd), Some((s, e))) = (rd, p.initrd) {
        assert_eq!(e - s, rd.len() as u64);
        assert_eq!(s % PAGE, 0);
        assert_eq!(mem.bytes(s, rd.len()), rd);
    }
    // boot_params and the command line.
    assert_eq!(
        mem.bytes(p.boot_params, 4096),
        expected_zero_page(image, boot, map)
    );
    let text = cmdline.split(|&b| b == 0).next().unwrap();
    assert_eq!(p.cmdline_len, text.len() as u64);
    assert_eq!(mem.bytes(p.cmdline, text.len() + 1), [text, &[0]].concat());
    // The GDT: __BOOT_CS at 0x10 and __BOOT_DS at 0x18, flat 4 GiB.
    assert_eq!(
        mem.bytes(p.gdt, 32),
        [
            [0u8; 16].as_slice(),
            &0x00CF_9B00_0000_FFFFu64.to_le_bytes(),
            &0x00CF_9300_0000_FFFFu64.to_le_bytes()
        ]
        .concat()
    );
    // Everything written lies in usable RAM, outside every avoid range.
    for &(s, e) in &mem.writes {
        assert_eq!(map.check_usable(s, e - s), Ok(()), "write {s:#x}..{e:#x}");
        for &(a, b) in avoid {
            assert!(
                e <= a || b <= s,
                "write {s:#x}..{e:#x} hits avoid {a:#x}..{b:#x}"
            );
        }
    }
    // The pieces do not overlap one another (the kernel's whole init_size
    // counts).
    let mut pieces = vec![
        (p.kernel, p.kernel + p.kernel_len),
        p.runtime,
        (p.boot_params, p.cmdline + p.cmdline_len + 1),
    ];
    if let Some(r) = p.initrd {
        pieces.push(r);
    }
    for (i, a) in pieces.iter().enumerate() {
        for b in &pieces[i + 1..] {
            let same_kernel = i == 0 && *b == p.runtime;
            assert!(
                same_kernel || a.1 <= b.0 || b.1 <= a.0,
                "{a:x?} overlaps {b:x?}"
            );
        }
    }
    assert!(p.runtime.1 <= 1 << 32);
    assert!(p.boot_params >= 0x1_0000);
    // The entry state of the 32-bit boot protocol.
    let e = boot.entry;
    assert_eq!(e.eip as u64, p.kernel);
    assert_eq!(e.esi as u64, p.boot_params);
    assert_eq!((e.ebp, e.edi, e.ebx), (0, 0, 0));
    assert_eq!((e.code_selector, e.data_selector), (0x10, 0x18));
    assert_eq!(
        e.gdtr,
        Some(Gdtr {
            base: p.gdt as u32,
            limit: 31
        })
    );
    assert_eq!(e.eflags & (1 << 9), 0, "interrupts off");
    assert_eq!(e.cr0 & 0x8000_0001, 1, "protected mode, paging off");
}

#[test]
fn loads_at_pref_address() {
    let image = Bz::default().build();
    let rd = initrd(0x4321);
    let map = map_with(&[IMAGE]);
    let cmd = b"console=ttyS0 root=/dev/vda";
    let (r, mem) = load(&image, Some(&rd), cmd, &map, &[]);
    let boot = r.unwrap();
    check_load(&image, Some(&rd), cmd, &map, &[], &boot, &mem);
    let p = boot.plan;
    assert_eq!(boot.protocol, 0x020F);
    assert_eq!(p.kernel, 0x100_0000);
    assert_eq!(p.runtime, (0x100_0000, 0x300_0000));
    assert_eq!(p.kernel_alignment, 0x20_0000);
    // As high as possible: QEMU's RAM ends at 0x1ffe0000.
    assert_eq!(p.initrd, Some((0x1FFD_B000, 0x1FFD_B000 + 0x4321)));
    assert_eq!(
        (p.boot_params, p.gdt, p.cmdline),
        (0x1_0000, 0x1_1000, 0x1_1020)
    );
    // What the hypervisor hid is reserved in the guest's table.
    let bp = mem.bytes(p.boot_params, 4096);
    let hidden = (0..bp[0x1E8] as usize)
        .map(|i| 0x2D0 + 20 * i)
        .find(|&at| get64(&bp, at) == IMAGE.0)
        .unwrap();
    assert_eq!(get64(&bp, hidden + 8), IMAGE.1 - IMAGE.0);
    assert_eq!(get32(&bp, hidden + 16), 2);
    // Fields copied from the image as they were.
    assert_eq!(get16(&bp, 0x20E), 0x1234);
    assert_eq!(get32(&bp, 0x264), 0x4242);
    assert_eq!(get16(&bp, 0x1FA), 0xFFFF);
    assert_eq!(bp[0x1EF], 0, "sentinel stays zero");
}

#[test]
fn hidden_pref_address_moves_a_relocatable_kernel_up() {
    // thinvisor owns 16..20 MiB, where the kernel would like to go.
    let image = Bz::default().build();
    let map = map_with(&[IMAGE, (0x100_0000, 0x140_0000)]);
    let (r, mem) = load(&image, None, b"", &map, &[]);
    let boot = r.unwrap();
    check_load(&image, None, b"", &map, &[], &boot, &mem);
    assert_eq!(boot.plan.kernel, 0x140_0000);
    assert_eq!(boot.plan.initrd, None);
    let bp = mem.bytes(boot.plan.boot_params, 4096);
    assert_eq!((get32(&bp, 0x218), get32(&bp, 0x21C)), (0, 0));
}

#[test]
fn never_below_pref_address() {
    // Free RAM only below pref_address (16 MiB): the kernel would move itself
    // up to pref_address anyway, so there is no room.
    let map = GuestMap::new(&[region(0, 0x9_FC00, 1), region(MIB, 15 * MIB, 1)], &[]).unwrap();
    let image = Bz {
        init_size: 0x10_0000,
        ..Bz::default()
    }
    .build();
    let (r, mem) = load(&image, None, b"", &map, &[]);
    let e = r.unwrap_err();
    assert_eq!(
        e,
        LinuxError::NoRoomForKernel {
            size: 0x10_0000,
            from: 0x100_0000,
            align: 0x20_0000
        }
    );
    assert!(e.to_string().contains("0x1000000"));
    assert!(mem.writes.is_empty());
}

#[test]
fn falls_back_to_min_alignment() {
    // 16 MiB preferred alignment, 2 MiB minimum. thinvisor owns 16..18 MiB;
    // RAM ends at 47 MiB, so the next 16 MiB boundary (32 MiB) is too high.
    let map = GuestMap::new(
        &[region(0, 0x9_FC00, 1), region(MIB, 46 * MIB, 1)],
        &[(16 * MIB, 18 * MIB)],
    )
    .unwrap();
    let image = Bz {
        kernel_alignment: 0x100_0000,
        min_alignment: 21,
        init_size: 0x100_0000,
        ..Bz::default()
    }
    .build();
    let (r, mem) = load(&image, None, b"quiet", &map, &[]);
    let boot = r.unwrap();
    check_load(&image, None, b"quiet", &map, &[], &boot, &mem);
    assert_eq!(boot.plan.kernel, 18 * MIB);
    assert_eq!(boot.plan.kernel_alignment, 0x20_0000);
    let bp = mem.bytes(boot.plan.boot_params, 4096);
    assert_eq!(get32(&bp, 0x230), 0x20_0000);

    // Without a usable min_alignment there is no room.
    let image = Bz {
        kernel_alignment: 0x100_0000,
        min_alignment: 24,
        init_size: 0x100_0000,
        ..Bz::default()
    }
    .build();
    let (r, _) = load(&image, None, b"", &map, &[]);
    assert!(matches!(r, Err(LinuxError::NoRoomForKernel { .. })));
}

#[test]
fn non_relocatable_goes_to_1mib_and_needs_pref_address() {
    let image = Bz {
        relocatable: false,
        ..Bz::default()
    }
    .build();
    let map = GuestMap::new(&qemu_map(), &[(0x4000_0000, 0x4010_0000)]).unwrap();
    let (r, mem) = load(&image, None, b"x", &map, &[]);
    let boot = r.unwrap();
    check_load(&image, None, b"x", &map, &[], &boot, &mem);
    assert_eq!(boot.plan.kernel, 0x10_0000);
    assert_eq!(boot.plan.runtime, (0x100_0000, 0x300_0000));
    assert_eq!(boot.entry.eip, 0x10_0000);

    // thinvisor at 2 MiB overlaps the kernel's fixed range at 1 MiB.
    let image = Bz {
        relocatable: false,
        kernel_len: 0x20_0000,
        ..Bz::default()
    }
    .build();
    let (r, mem) = load(&image, None, b"", &map_with(&[IMAGE]), &[]);
    let e = r.unwrap_err();
    assert_eq!(
        e,
        LinuxError::KernelNotUsable {
            start: 0x10_0000,
            end: 0x30_0000,
            at: 0x20_0000,
            why: Unusable::Hypervisor
        }
    );
    assert!(e.to_string().contains("thinvisor's own memory"));
    assert!(mem.writes.is_empty());

    // ... or its init_size at pref_address.
    let image = Bz {
        relocatable: false,
        ..Bz::default()
    }
    .build();
    let (r, _) = load(
        &image,
        None,
        b"",
        &map_with(&[(0x200_0000, 0x201_0000)]),
        &[],
    );
    assert_eq!(
        r.unwrap_err(),
        LinuxError::KernelNotUsable {
            start: 0x100_0000,
            end: 0x300_0000,
            at: 0x200_0000,
            why: Unusable::Hypervisor
        }
    );
    // pref_address 0 states no preference: 1 MiB.
    let image = Bz {
        relocatable: false,
        pref_address: 0,
        ..Bz::default()
    }
    .build();
    let (r, _) = load(&image, None, b"", &map_with(&[]), &[]);
    assert_eq!(r.unwrap().plan.runtime, (0x10_0000, 0x210_0000));
    // ... or a boot module that is still needed.
    let (r, _) = load(
        &image,
        None,
        b"",
        &map_with(&[]),
        &[(0x180_0000, 0x190_0000)],
    );
    assert!(matches!(
        r.unwrap_err(),
        LinuxError::KernelNotUsable {
            at: 0x180_0000,
            why: Unusable::Source,
            ..
        }
    ));
}

#[test]
fn protocol_2_06_defaults() {
    // No pref_address, init_size, min_alignment, xloadflags before 2.10/2.12:
    // the kernel goes at 1 MiB (aligned) and needs 3x its size.
    let image = Bz {
        version: 0x0206,
        jump_len: 0x3A, // header ends at 0x23c
        kernel_len: 0x2_1000,
        ..Bz::default()
    }
    .build();
    let bz = BzImage::parse(&image).unwrap();
    assert_eq!(bz.init_size(), 3 * 0x2_1000);
    assert_eq!(bz.header().pref_address, 0x10_0000);
    assert_eq!(bz.header().xloadflags, 0);
    assert!(!bz.can_load_above_4g());
    let map = map_with(&[]);
    let (r, mem) = load(&image, Some(&initrd(100)), b"", &map, &[]);
    let boot = r.unwrap();
    check_load(&image, Some(&initrd(100)), b"", &map, &[], &boot, &mem);
    // 2 MiB alignment from 1 MiB: 2 MiB.
    assert_eq!(boot.plan.kernel, 0x20_0000);
    assert_eq!(boot.plan.runtime.1 - boot.plan.runtime.0, 3 * 0x2_1000);
}

#[test]
fn initrd_below_initrd_addr_max() {
    let image = Bz {
        initrd_addr_max: 0x0FFF_FFFF,
        ..Bz::default()
    }
    .build();
    let map = map_with(&[IMAGE]);
    let rd = initrd(0x1234);
    let (r, mem) = load(&image, Some(&rd), b"", &map, &[]);
    let boot = r.unwrap();
    check_load(&image, Some(&rd), b"", &map, &[], &boot, &mem);
    // The highest page-aligned start whose last byte is <= 0x0fffffff.
    assert_eq!(boot.plan.initrd, Some((0x0FFF_E000, 0x0FFF_E000 + 0x1234)));

    // An initrd_addr_max below the kernel leaves room only below it.
    let image = Bz {
        initrd_addr_max: 0x00FF_FFFF,
        ..Bz::default()
    }
    .build();
    let (r, _) = load(&image, Some(&rd), b"", &map, &[]);
    assert_eq!(
        r.unwrap().plan.initrd,
        Some((0x00FF_E000, 0x00FF_E000 + 0x1234))
    );

    // No room under the limit at all.
    let image = Bz {
        initrd_addr_max: 0x000F_FFFF,
        xloadflags: 1,
        ..Bz::default()
    }
    .build();
    let (r, mem) = load(&image, Some(&rd), b"", &map, &[]);
    let e = r.unwrap_err();
    assert_eq!(
        e,
        LinuxError::NoRoomForInitrd {
            size: 0x1234,
            max: 0x000F_FFFF
        }
    );
    assert!(!e.to_string().is_empty());
    assert!(mem.writes.is_empty());
}

#[test]
fn initrd_above_4g_only_when_the_kernel_allows_it() {
    // 48 MiB below 4 GiB (the kernel takes 16..48 MiB), 1 GiB above; a
    // 16 MiB initrd.
    let map = GuestMap::new(
        &[
            region(0, 0x9_FC00, 1),
            region(MIB, 47 * MIB, 1),
            region(1 << 32, 1 << 30, 1),
        ],
        &[],
    )
    .unwrap();
    let len = 16 << 20;
    let image = Bz::default().build();
    let mut mem = Sparse::default();
    let bz = BzImage::parse(&image).unwrap();
    let plan = plan_linux(&bz, len, 0, &map, &[]).unwrap();
    let top = (1u64 << 32) + (1 << 30);
    let start = (top - len) & !0xFFF;
    assert_eq!(plan.initrd, Some((start, start + len)));
    let rd = vec![7u8; len as usize];
    let boot = load_linux(&image, Some(&rd), b"", &map, &[], &mut mem).unwrap();
    let bp = mem.bytes(boot.plan.boot_params, 4096);
    assert_eq!(get32(&bp, 0x218), start as u32);
    assert_eq!(get32(&bp, 0x0C0), (start >> 32) as u32);
    assert_eq!(get32(&bp, 0x21C), len as u32);
    assert_eq!(get32(&bp, 0x0C4), 0);
    assert_eq!(mem.byte(start + len - 1), 7);

    let image = Bz {
        xloadflags: 1,
        ..Bz::default()
    }
    .build();
    let bz = BzImage::parse(&image).unwrap();
    assert_eq!(
        plan_linux(&bz, len, 0, &map, &[]).unwrap_err(),
        LinuxError::NoRoomForInitrd {
            size: len,
            max: 0x7FFF_FFFF
        }
    );
}

#[test]
fn keeps_clear_of_the_boot_modules() {
    // The boot loader put the kernel module at 16 MiB and the initrd module
    // at the top of RAM: both must survive the copy.
    let image = Bz::default().build();
    let rd = initrd(0x3000);
    let avoid = [(0x100_0000, 0x100_8000), (0x1FF0_0000, 0x1FFE_0000)];
    let map = map_with(&[IMAGE]);
    let (r, mem) = load(&image, Some(&rd), b"a b c", &map, &avoid);
    let boot = r.unwrap();
    check_load(&image, Some(&rd), b"a b c", &map, &avoid, &boot, &mem);
    assert_eq!(boot.plan.kernel, 0x120_0000);
    assert_eq!(boot.plan.initrd, Some((0x1FEF_D000, 0x1FF0_0000)));

    let many = vec![(0, 0); 17];
    let (r, _) = load(&image, None, b"", &map, &many);
    assert_eq!(r.unwrap_err(), LinuxError::TooManyAvoidRanges(17));
}

#[test]
fn low_window_full_goes_above_1mib() {
    // thinvisor also owns 64 KiB..576 KiB: boot_params goes above 1 MiB,
    // clear of the kernel.
    let map = map_with(&[(0x1_0000, 0x9_0000), IMAGE]);
    let image = Bz::default().build();
    let (r, mem) = load(&image, None, b"console=ttyS0", &map, &[]);
    let boot = r.unwrap();
    check_load(&image, None, b"console=ttyS0", &map, &[], &boot, &mem);
    assert_eq!(boot.plan.boot_params, 0x10_0000);

    // Nothing below 4 GiB is free at all.
    let map = GuestMap::new(&[region(MIB, 63 * MIB, 1)], &[(MIB, 64 * MIB)]).unwrap();
    let bz = BzImage::parse(&image).unwrap();
    assert!(matches!(
        plan_linux(&bz, 0, 0, &map, &[]).unwrap_err(),
        LinuxError::NoRoomForKernel { .. }
    ));
    let map = GuestMap::new(
        &[region(0, 0x1_0000, 1), region(16 * MIB, 32 * MIB, 1)],
        &[],
    )
    .unwrap();
    assert_eq!(
        plan_linux(&bz, 0, 0, &map, &[]).unwrap_err(),
        LinuxError::NoRoomForBootParams { size: 0x1021 }
    );
}

#[test]
fn cmdline_is_bounded_and_cut_at_nul() {
    let image = Bz {
        cmdline_size: 8,
        ..Bz::default()
    }
    .build();
    let map = map_with(&[]);
    let (r, _) = load(&image, None, b"12345678", &map, &[]);
    assert_eq!(r.unwrap().plan.cmdline_len, 8);
    let (r, mem) = load(&image, None, b"123456789", &map, &[]);
    let e = r.unwrap_err();
    assert_eq!(e, LinuxError::CmdlineTooLong { len: 9, max: 8 });
    assert!(e.to_string().contains("cmdline_size"));
    assert!(mem.writes.is_empty());
    let (r, mem) = load(&image, None, b"abc\0defghijkl", &map, &[]);
    let boot = r.unwrap();
    check_load(&image, None, b"abc\0defghijkl", &map, &[], &boot, &mem);
    assert_eq!(boot.plan.cmdline_len, 3);
}

#[test]
fn header_errors() {
    let good = Bz::default();
    let cases: Vec<(Vec<u8>, LinuxError)> = vec![
        (vec![0; 0x23B], LinuxError::TooShort(0x23B)),
        (
            Bz {
                boot_flag: 0x55AA,
                ..good.clone()
            }
            .build(),
            LinuxError::NoBootFlag(0x55AA),
        ),
        (
            Bz {
                magic: 0x1234_5678,
                ..good.clone()
            }
            .build(),
            LinuxError::NoHeaderMagic(0x1234_5678),
        ),
        (
            Bz {
                version: 0x0205,
                ..good.clone()
            }
            .build(),
            LinuxError::ProtocolTooOld(0x0205),
        ),
        (
            Bz {
                loadflags: 0x80,
                ..good.clone()
            }
            .build(),
            LinuxError::NotBzImage,
        ),
        (
            Bz {
                jump_len: 0x61,
                ..good.clone()
            }
            .build(),
            LinuxError::HeaderTooShort {
                end: 0x263,
                needed: 0x264,
            },
        ),
        (
            Bz {
                version: 0x0209,
                jump_len: 0x39,
                ..good.clone()
            }
            .build(),
            LinuxError::HeaderTooShort {
                end: 0x23B,
                needed: 0x23C,
            },
        ),
        (
            Bz {
                jump_len: 0x8F,
                ..good.clone()
            }
            .build(),
            LinuxError::HeaderTooLong(0x291),
        ),
        (
            Bz {
                kernel_len: 0,
                ..good.clone()
            }
            .build(),
            LinuxError::NoKernel {
                offset: 0xA00,
                image_len: 0xA00,
            },
        ),
        (
            Bz {
                syssize: Some(0x301),
                ..good.clone()
            }
            .build(),
            LinuxError::KernelTruncated {
                syssize_bytes: 0x3010,
                available: 0x3000,
            },
        ),
        (
            Bz {
                kernel_alignment: 0x30_0000,
                ..good.clone()
            }
            .build(),
            LinuxError::BadKernelAlignment(0x30_0000),
        ),
    ];
    let map = map_with(&[]);
    for (image, want) in cases {
        let (r, mem) = load(&image, Some(&[1, 2, 3]), b"", &map, &[]);
        assert_eq!(r.unwrap_err(), want);
        assert!(mem.writes.is_empty());
        let text = want.to_string();
        assert!(!text.is_empty());
    }
    assert!(LinuxError::ProtocolTooOld(0x0205)
        .to_string()
        .contains("2.05"));
    // A header that is exactly as long as 2.06 needs, and the longest allowed.
    for (version, jump_len) in [(0x0206, 0x3A), (0x020F, 0x8E)] {
        let image = Bz {
            version,
            jump_len,
            ..good.clone()
        }
        .build();
        assert!(BzImage::parse(&image).is_ok());
    }
    // setup_sects 0 means 4; other values move the kernel.
    for (sects, offset) in [(0u8, 0xA00usize), (1, 0x400), (30, 0x3E00)] {
        let image = Bz {
            setup_sects: sects,
            ..good.clone()
        }
        .build();
        let bz = BzImage::parse(&image).unwrap();
        assert_eq!(bz.header().setup_sects, if sects == 0 { 4 } else { sects });
        assert_eq!(bz.kernel(), &image[offset..]);
    }
    // A non-relocatable kernel's alignment is not its concern.
    let image = Bz {
        relocatable: false,
        kernel_alignment: 3,
        ..good.clone()
    }
    .build();
    assert!(BzImage::parse(&image).is_ok());
}

#[test]
fn write_errors_are_reported() {
    let image = Bz::default().build();
    let map = map_with(&[]);
    let mut mem = Sparse {
        refuse: vec![(0x1_0000, 0x1_1000)],
        ..Sparse::default()
    };
    let e = load_linux(&image, None, b"", &map, &[], &mut mem).unwrap_err();
    assert_eq!(
        e,
        LinuxError::Write(PhysWriteError {
            addr: 0x1_0000,
            len: 4096
        })
    );
    assert!(e.to_string().contains("0x10000"));
}

/// Files under `dir` (at most `depth` levels down) whose name starts with
/// `prefix`.
fn find_files(dir: &std::path::Path, prefix: &str, depth: u32, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && depth > 0 {
            find_files(&path, prefix, depth - 1, out);
        } else if entry.file_name().to_string_lossy().starts_with(prefix) {
            out.push(path);
        }
    }
}

/// A real kernel, when one has been fetched (a Debian vmlinuz anywhere
/// under `~/.cache/thinvisor/debian`):
/// `cargo test -p thinvisor-boot --test linux -- --ignored --nocapture`.
#[test]
#[ignore]
fn debian_vmlinuz() {
    let home = std::env::var("HOME").unwrap_or_default();
    let dir = std::path::Path::new(&home).join(".cache/thinvisor/debian");
    let mut kernels = Vec::new();
    find_files(&dir, "vmlinuz", 5, &mut kernels);
    if kernels.is_empty() {
        println!("no vmlinuz under {} (nothing to test)", dir.display());
        return;
    }
    for path in &kernels {
        let image = std::fs::read(path).unwrap();
        let bz = BzImage::parse(&image).unwrap();
        println!("{}: {:#x?}", path.display(), bz.header());
        println!(
            "init_size {:#x}, protected-mode kernel {:#x} bytes",
            bz.init_size(),
            bz.kernel().len()
        );
        // Its own initrd if one lies next to it, else 3 MiB of stand-in.
        let mut initrds = Vec::new();
        find_files(path.parent().unwrap(), "initrd.img", 0, &mut initrds);
        let initrd = match initrds.first() {
            Some(p) => std::fs::read(p).unwrap(),
            None => initrd(3 << 20),
        };
        let cmdline = b"console=ttyS0 earlyprintk=serial rdinit=/bin/sh";
        // QEMU's 512 MiB map, thinvisor at 2 MiB and at 16 MiB (where the
        // kernel would like to go).
        let map = map_with(&[IMAGE, (0x100_0000, 0x140_0000)]);
        let mut mem = Sparse::default();
        let boot = load_linux(&image, Some(&initrd), cmdline, &map, &[], &mut mem).unwrap();
        println!("{boot:#x?}");
        check_load(&image, Some(&initrd), cmdline, &map, &[], &boot, &mem);
        assert!(boot.protocol >= 0x020C);
        assert!(bz.header().relocatable);
        assert_eq!(boot.plan.kernel, 0x140_0000);
    }
    println!("{} kernel(s) checked", kernels.len());
}

//! The multiboot v1 kernel loaders (ELF32, ELF64 and the a.out kludge):
//! `load_multiboot_kernel` into the isolated layout's guest RAM and
//! `load_multiboot_passthrough` into the machine's memory map, on raw
//! bytes with a planted multiboot header, on mutated and cut ELF images
//! and on a.out-kludge images with fuzzed addresses (builders of
//! thinvisor-boot's tests); and the multiboot information writer.
//!
//! Checked: no panic; an isolated load stays inside guest RAM with its
//! entry below the end of what it loaded; a pass-through load writes
//! only usable RAM outside hidden and avoided ranges, its entry lies in
//! the kernel, and the multiboot information it wrote parses back (map
//! as given, away from the kernel); the information writer round-trips
//! the command line.

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use thinvisor_boot::e820::GuestMap;
use thinvisor_boot::guest::{
    load_multiboot_kernel, load_multiboot_passthrough, write_multiboot1_info,
};
use thinvisor_boot::multiboot1;
use thinvisor_memory_fuzz::boot::{
    assert_writes_allowed, avoid_ranges, build_aout, build_elf, hidden_ranges, mb_header,
    memory_map, Elf, Mem, Seg, Sparse,
};

fn image(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    Ok(match u.int_in_range(0u8..=2)? {
        0 => {
            // Raw bytes with a header planted at a 4-byte boundary.
            let len = u.int_in_range(0..=3000)?;
            let mut image = u.bytes(len)?.to_vec();
            if image.len() >= 48 {
                let at = u.int_in_range(0..=(image.len() - 48).min(8192) / 4)? * 4;
                let flags: u32 = u.arbitrary()?;
                let mut h = mb_header(flags & 0x0001_0007 | flags & 0xfff0_0000);
                for _ in 0..5 {
                    h.extend_from_slice(&u.arbitrary::<u32>()?.to_le_bytes());
                }
                image[at..at + h.len()].copy_from_slice(&h);
            }
            image
        }
        1 => {
            let class64 = u.arbitrary()?;
            let mut segs = vec![Seg::load(0x100000, &[0x90; 100], 0x200)];
            for _ in 0..u.int_in_range(0u8..=2)? {
                let paddr = u.int_in_range(0u64..=3 << 20)?;
                let len = u.int_in_range(0..=64)?;
                let memsz = if u.arbitrary()? {
                    len as u64
                } else {
                    u.arbitrary()?
                };
                segs.push(Seg::load(paddr, &vec![0x55; len], memsz));
            }
            let entry = if u.ratio(7u8, 8u8)? {
                0x100004
            } else {
                u.arbitrary()?
            };
            let mut image = build_elf(&Elf::new(class64, entry, segs));
            for _ in 0..u.int_in_range(0u8..=4)? {
                let at = u.int_in_range(0..=300)?;
                if let Some(b) = image.get_mut(at) {
                    *b = u.arbitrary()?;
                }
            }
            if u.ratio(1u8, 4u8)? {
                let cut = u.int_in_range(0..=64)?;
                image.truncate(image.len().saturating_sub(cut));
            }
            image
        }
        _ => {
            // a.out kludge, addresses mostly consistent.
            let len = u.int_in_range(48..=4000)?;
            let header_off = u.int_in_range(0..=(len - 48).min(8000) / 4)? * 4;
            let load = u.int_in_range(0u32..=3 << 19)?;
            let addrs = if u.ratio(3u8, 4u8)? {
                let before = u.int_in_range(0..=header_off as u32)?;
                let size = u.int_in_range(0u32..=4000)?;
                let bss = u.int_in_range(0u32..=0x10000)?;
                let entry = u.int_in_range(0u32..=0x1000)?;
                [
                    load + before,
                    load,
                    if size == 0 { 0 } else { load + size },
                    if bss == 0 { 0 } else { load + size + bss },
                    load + entry,
                ]
            } else {
                [
                    u.arbitrary()?,
                    u.arbitrary()?,
                    u.arbitrary()?,
                    u.arbitrary()?,
                    u.arbitrary()?,
                ]
            };
            build_aout(len, header_off, addrs, u.arbitrary::<u32>()? & 0x7)
        }
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let image = image(u)?;
    if u.arbitrary()? {
        let mut ram = vec![0u8; 2 << 20];
        if let Ok(k) = load_multiboot_kernel(&image, &mut ram) {
            assert!(u64::from(k.entry) < k.load_end);
            assert!(k.load_end <= ram.len() as u64);
        }
    } else {
        let map = memory_map(u, 12)?;
        let hidden = hidden_ranges(u)?;
        let avoid = avoid_ranges(u)?;
        let cmdline_len = u.int_in_range(0..=100)?;
        let cmdline: Vec<u8> = u.bytes(cmdline_len)?.iter().map(|&b| b % 127 + 1).collect();
        let Ok(gm) = GuestMap::new(&map, &hidden) else {
            return Ok(());
        };
        let mut mem = Sparse::default();
        if let Ok(boot) = load_multiboot_passthrough(&image, &cmdline, &gm, &avoid, &mut mem) {
            assert_writes_allowed(&mem, &gm, &avoid);
            let k = boot.kernel;
            assert!(k.start <= u64::from(k.entry) && u64::from(k.entry) < k.end);
            let info = multiboot1::parse(boot.info.into(), &mem).expect("own info unreadable");
            assert_eq!(info.memory_map().len(), gm.e820().len());
            assert_eq!(info.cmdline().as_bytes(), &cmdline[..]);
            let (lo, hi) = info.info_range();
            assert!(hi <= k.start || k.end <= lo);
        }
    }
    // The isolated layout's information writer.
    let ram_mib = u.int_in_range(1u64..=4)?;
    let at = if u.arbitrary()? {
        u.int_in_range(0u64..=1024)? * 4096
    } else {
        u.arbitrary()?
    };
    let cmd_len = u.int_in_range(0..=300)?;
    let cmd: Vec<u8> = u.bytes(cmd_len)?.iter().map(|&b| b % 127 + 1).collect();
    let mut ram = vec![0u8; (ram_mib << 20) as usize];
    if let Ok(pa) = write_multiboot1_info(&mut ram, at, &cmd) {
        assert_eq!(u64::from(pa), at);
        let mem = Mem {
            chunks: vec![(0, ram)],
        };
        let bi = multiboot1::parse(at, &mem).expect("written info does not parse");
        assert_eq!(bi.cmdline().as_bytes(), &cmd[..]);
        assert_eq!(bi.memory_map().len(), 2);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

//! Builders for test inputs: physical memory for the multiboot v1 parser,
//! multiboot2 information blocks, and ELF / a.out-kludge guest images.
#![allow(dead_code)]

use thinvisor_boot::multiboot1::PhysRead;

/// Physical memory made of a few buffers; everything else is unreadable.
#[derive(Default, Clone, Debug)]
pub struct Mem {
    pub chunks: Vec<(u64, Vec<u8>)>,
}

impl Mem {
    pub fn new(base: u64, len: usize) -> Self {
        Mem {
            chunks: vec![(base, vec![0; len])],
        }
    }

    pub fn write(&mut self, pa: u64, bytes: &[u8]) {
        for (base, buf) in &mut self.chunks {
            if pa >= *base && pa + bytes.len() as u64 <= *base + buf.len() as u64 {
                let off = (pa - *base) as usize;
                buf[off..off + bytes.len()].copy_from_slice(bytes);
                return;
            }
        }
        panic!("test bug: write outside test memory at {pa:#x}");
    }

    pub fn w32(&mut self, pa: u64, v: u32) {
        self.write(pa, &v.to_le_bytes());
    }

    pub fn w64(&mut self, pa: u64, v: u64) {
        self.write(pa, &v.to_le_bytes());
    }
}

impl PhysRead for Mem {
    fn read(&self, pa: u64, out: &mut [u8]) -> bool {
        for (base, buf) in &self.chunks {
            let Some(off) = pa.checked_sub(*base) else {
                continue;
            };
            let Some(end) = off.checked_add(out.len() as u64) else {
                continue;
            };
            if end <= buf.len() as u64 {
                out.copy_from_slice(&buf[off as usize..end as usize]);
                return true;
            }
        }
        false
    }
}

/// A multiboot v1 information structure laid out in [`Mem`].
pub struct Mb1 {
    pub mem: Mem,
    pub info: u64,
}

pub const MB1_BASE: u64 = 0x1_0000;
pub const MB1_INFO: u64 = MB1_BASE;
pub const MB1_CMDLINE: u64 = MB1_BASE + 0x100;
pub const MB1_MODS: u64 = MB1_BASE + 0x600;
pub const MB1_MODSTR: u64 = MB1_BASE + 0x800;
pub const MB1_MMAP: u64 = MB1_BASE + 0x2000;

impl Mb1 {
    pub fn new() -> Self {
        Mb1 {
            mem: Mem::new(MB1_BASE, 0x8000),
            info: MB1_INFO,
        }
    }

    pub fn flags(&mut self, flags: u32) {
        self.mem.w32(self.info, flags);
    }

    pub fn or_flags(&mut self, bits: u32) {
        let mut b = [0; 4];
        self.mem.read(self.info, &mut b);
        self.flags(u32::from_le_bytes(b) | bits);
    }

    pub fn mem_sizes(&mut self, lower_kib: u32, upper_kib: u32) {
        self.or_flags(1);
        self.mem.w32(self.info + 4, lower_kib);
        self.mem.w32(self.info + 8, upper_kib);
    }

    pub fn cmdline(&mut self, s: &[u8]) {
        self.or_flags(1 << 2);
        self.mem.w32(self.info + 16, MB1_CMDLINE as u32);
        self.mem.write(MB1_CMDLINE, s);
        self.mem.write(MB1_CMDLINE + s.len() as u64, &[0]);
    }

    pub fn modules(&mut self, mods: &[(u32, u32, &str)]) {
        self.or_flags(1 << 3);
        self.mem.w32(self.info + 20, mods.len() as u32);
        self.mem.w32(self.info + 24, MB1_MODS as u32);
        let mut s = MB1_MODSTR;
        for (i, &(start, end, string)) in mods.iter().enumerate() {
            let e = MB1_MODS + i as u64 * 16;
            self.mem.w32(e, start);
            self.mem.w32(e + 4, end);
            self.mem.w32(e + 8, s as u32);
            self.mem.write(s, string.as_bytes());
            self.mem.write(s + string.len() as u64, &[0]);
            s += string.len() as u64 + 1;
        }
    }

    /// Memory map entries (base, len, type) with the standard size of 20.
    pub fn mmap(&mut self, entries: &[(u64, u64, u32)]) {
        self.or_flags(1 << 6);
        self.mem.w32(self.info + 44, entries.len() as u32 * 24);
        self.mem.w32(self.info + 48, MB1_MMAP as u32);
        for (i, &(base, len, ty)) in entries.iter().enumerate() {
            let e = MB1_MMAP + i as u64 * 24;
            self.mem.w32(e, 20);
            self.mem.w64(e + 4, base);
            self.mem.w64(e + 12, len);
            self.mem.w32(e + 20, ty);
        }
    }
}

/// QEMU's e820 map for `-m 512` on `pc`.
pub const QEMU_E820: [(u64, u64, u32); 6] = [
    (0, 0x9fc00, 1),
    (0x9fc00, 0x400, 2),
    (0xf0000, 0x10000, 2),
    (0x100000, 0x1fee0000, 1),
    (0x1ffe0000, 0x20000, 2),
    (0xfffc0000, 0x40000, 2),
];

/// Multiboot2 information, built tag by tag, in an 8-aligned buffer.
#[derive(Default)]
pub struct Mb2 {
    pub tags: Vec<u8>,
}

impl Mb2 {
    pub fn tag(&mut self, ty: u32, body: &[u8]) -> &mut Self {
        self.raw_tag(ty, 8 + body.len() as u32, body)
    }

    /// A tag whose size field says `size`, whatever the body's length.
    pub fn raw_tag(&mut self, ty: u32, size: u32, body: &[u8]) -> &mut Self {
        self.tags.extend_from_slice(&ty.to_ne_bytes());
        self.tags.extend_from_slice(&size.to_ne_bytes());
        self.tags.extend_from_slice(body);
        while !self.tags.len().is_multiple_of(8) {
            self.tags.push(0);
        }
        self
    }

    pub fn cmdline(&mut self, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.tag(1, &b)
    }

    pub fn module(&mut self, start: u32, end: u32, s: &str) -> &mut Self {
        let mut b = Vec::new();
        b.extend_from_slice(&start.to_ne_bytes());
        b.extend_from_slice(&end.to_ne_bytes());
        b.extend_from_slice(s.as_bytes());
        b.push(0);
        self.tag(3, &b)
    }

    pub fn mmap(&mut self, entries: &[(u64, u64, u32)]) -> &mut Self {
        let mut b = Vec::new();
        b.extend_from_slice(&24u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        for &(base, len, ty) in entries {
            b.extend_from_slice(&base.to_ne_bytes());
            b.extend_from_slice(&len.to_ne_bytes());
            b.extend_from_slice(&ty.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
        }
        self.tag(6, &b)
    }

    pub fn end(&mut self) -> &mut Self {
        self.tag(0, &[])
    }

    /// The whole structure (header + tags) as 8-aligned words.
    pub fn build(&self) -> Vec<u64> {
        let total = 8 + self.tags.len();
        let mut bytes = Vec::with_capacity(total);
        bytes.extend_from_slice(&(total as u32).to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&self.tags);
        words(&bytes)
    }
}

/// Copies bytes into an 8-aligned buffer (padded with zeros).
pub fn words(bytes: &[u8]) -> Vec<u64> {
    let mut w = vec![0u64; bytes.len().div_ceil(8)];
    for (i, chunk) in bytes.chunks(8).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        w[i] = u64::from_ne_bytes(b);
    }
    w
}

/// Overwrites a u32 at byte offset `at` in an 8-aligned buffer.
pub fn patch32(w: &mut [u64], at: usize, v: u32) {
    let mut bytes: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
    bytes[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    w.copy_from_slice(&words(&bytes));
}

/// Multiboot v1 header magic and a header with a valid checksum.
pub const MB_MAGIC: u32 = 0x1BADB002;

pub fn mb_header(flags: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&MB_MAGIC.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&MB_MAGIC.wrapping_add(flags).wrapping_neg().to_le_bytes());
    h
}

/// One program header for [`build_elf`].
#[derive(Clone, Debug)]
pub struct Seg {
    pub p_type: u32,
    pub paddr: u64,
    pub vaddr: u64,
    pub data: Vec<u8>,
    pub memsz: u64,
    /// Overrides for malformed files.
    pub offset: Option<u64>,
    pub filesz: Option<u64>,
}

impl Seg {
    pub fn load(paddr: u64, data: &[u8], memsz: u64) -> Self {
        Seg {
            p_type: 1,
            paddr,
            vaddr: paddr,
            data: data.to_vec(),
            memsz,
            offset: None,
            filesz: None,
        }
    }
}

/// What [`build_elf`] writes.
#[derive(Clone, Debug)]
pub struct Elf {
    pub class64: bool,
    pub machine: u16,
    pub e_type: u16,
    pub entry: u64,
    pub segs: Vec<Seg>,
    /// Multiboot header flags, or no header.
    pub mb_flags: Option<u32>,
}

impl Elf {
    pub fn new(class64: bool, entry: u64, segs: Vec<Seg>) -> Self {
        Elf {
            class64,
            machine: if class64 { 62 } else { 3 },
            e_type: 2,
            entry,
            segs,
            mb_flags: Some(0x3),
        }
    }
}

/// Emits a little-endian ELF32 or ELF64 executable: header, program headers,
/// the multiboot header, then each segment's bytes (16-aligned).
pub fn build_elf(spec: &Elf) -> Vec<u8> {
    let (ehsize, phentsize) = if spec.class64 { (64, 56) } else { (52, 32) };
    let phoff = ehsize;
    let mut out = vec![0u8; phoff + phentsize * spec.segs.len()];
    if let Some(flags) = spec.mb_flags {
        out.extend_from_slice(&mb_header(flags));
    }
    let mut offsets = Vec::new();
    for seg in &spec.segs {
        while !out.len().is_multiple_of(16) {
            out.push(0);
        }
        offsets.push(out.len() as u64);
        out.extend_from_slice(&seg.data);
    }

    out[0..4].copy_from_slice(b"\x7fELF");
    out[4] = if spec.class64 { 2 } else { 1 };
    out[5] = 1; // little-endian
    out[6] = 1; // version
    put16(&mut out, 16, spec.e_type);
    put16(&mut out, 18, spec.machine);
    put32(&mut out, 20, 1);
    if spec.class64 {
        put64(&mut out, 24, spec.entry);
        put64(&mut out, 32, phoff as u64);
        put16(&mut out, 52, ehsize as u16);
        put16(&mut out, 54, phentsize as u16);
        put16(&mut out, 56, spec.segs.len() as u16);
        put16(&mut out, 58, 64);
    } else {
        put32(&mut out, 24, spec.entry as u32);
        put32(&mut out, 28, phoff as u32);
        put16(&mut out, 40, ehsize as u16);
        put16(&mut out, 42, phentsize as u16);
        put16(&mut out, 44, spec.segs.len() as u16);
        put16(&mut out, 46, 40);
    }
    for (i, seg) in spec.segs.iter().enumerate() {
        let p = phoff + i * phentsize;
        let offset = seg.offset.unwrap_or(offsets[i]);
        let filesz = seg.filesz.unwrap_or(seg.data.len() as u64);
        if spec.class64 {
            put32(&mut out, p, seg.p_type);
            put32(&mut out, p + 4, 7);
            put64(&mut out, p + 8, offset);
            put64(&mut out, p + 16, seg.vaddr);
            put64(&mut out, p + 24, seg.paddr);
            put64(&mut out, p + 32, filesz);
            put64(&mut out, p + 40, seg.memsz);
            put64(&mut out, p + 48, 0x1000);
        } else {
            put32(&mut out, p, seg.p_type);
            put32(&mut out, p + 4, offset as u32);
            put32(&mut out, p + 8, seg.vaddr as u32);
            put32(&mut out, p + 12, seg.paddr as u32);
            put32(&mut out, p + 16, filesz as u32);
            put32(&mut out, p + 20, seg.memsz as u32);
            put32(&mut out, p + 24, 7);
            put32(&mut out, p + 28, 0x1000);
        }
    }
    out
}

/// A flat binary with an a.out-kludge header at `header_off`:
/// (header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr).
pub fn build_aout(
    image_len: usize,
    header_off: usize,
    addrs: [u32; 5],
    extra_flags: u32,
) -> Vec<u8> {
    let mut out: Vec<u8> = (0..image_len).map(|i| (i % 251) as u8 | 1).collect();
    let mut h = mb_header((1 << 16) | extra_flags);
    for a in addrs {
        h.extend_from_slice(&a.to_le_bytes());
    }
    out[header_off..header_off + h.len()].copy_from_slice(&h);
    out
}

pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

pub fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

// ------------------------------------------------------------ pass-through

use std::collections::BTreeMap;
use thinvisor_boot::phys::{PhysWrite, PhysWriteError};

/// Sparse physical memory for the pass-through loaders: every address is
/// writable (reads of unwritten bytes give zero) unless it is in `refuse`;
/// every write is recorded.
#[derive(Default, Clone, Debug)]
pub struct Sparse {
    pub pages: BTreeMap<u64, Vec<u8>>,
    /// `[start, end)` of every write and zeroing, in order.
    pub writes: Vec<(u64, u64)>,
    /// Ranges whose writes fail (an unmapped hole in the direct map).
    pub refuse: Vec<(u64, u64)>,
}

impl Sparse {
    pub fn byte(&self, pa: u64) -> u8 {
        self.pages
            .get(&(pa & !0xfff))
            .map_or(0, |p| p[(pa & 0xfff) as usize])
    }

    pub fn bytes(&self, pa: u64, len: usize) -> Vec<u8> {
        (0..len as u64).map(|i| self.byte(pa + i)).collect()
    }

    pub fn r32(&self, pa: u64) -> u32 {
        u32::from_le_bytes(self.bytes(pa, 4).try_into().unwrap())
    }

    fn store(
        &mut self,
        pa: u64,
        len: u64,
        mut f: impl FnMut(u64) -> u8,
    ) -> Result<(), PhysWriteError> {
        let end = pa
            .checked_add(len)
            .ok_or(PhysWriteError { addr: pa, len })?;
        if self.refuse.iter().any(|&(s, e)| s < end && pa < e) {
            return Err(PhysWriteError { addr: pa, len });
        }
        let mut a = pa;
        while a < end {
            let page = a & !0xfff;
            let chunk = page.saturating_add(0x1000).min(end) - a;
            let p = self.pages.entry(page).or_insert_with(|| vec![0; 4096]);
            for i in 0..chunk {
                p[((a & 0xfff) + i) as usize] = f(a - pa + i);
            }
            a += chunk;
        }
        if len > 0 {
            self.writes.push((pa, end));
        }
        Ok(())
    }
}

impl PhysWrite for Sparse {
    fn write(&mut self, pa: u64, bytes: &[u8]) -> Result<(), PhysWriteError> {
        self.store(pa, bytes.len() as u64, |i| bytes[i as usize])
    }

    /// Unwritten bytes read as zero already, so only pages that exist are
    /// cleared (a hostile bss of hundreds of MiB stays cheap).
    fn zero(&mut self, pa: u64, len: u64) -> Result<(), PhysWriteError> {
        let end = pa
            .checked_add(len)
            .ok_or(PhysWriteError { addr: pa, len })?;
        if self.refuse.iter().any(|&(s, e)| s < end && pa < e) {
            return Err(PhysWriteError { addr: pa, len });
        }
        for (&page, bytes) in self.pages.range_mut(pa & !0xfff..end) {
            for (i, b) in bytes.iter_mut().enumerate() {
                let a = page + i as u64;
                if pa <= a && a < end {
                    *b = 0;
                }
            }
        }
        if len > 0 {
            self.writes.push((pa, end));
        }
        Ok(())
    }
}

impl PhysRead for Sparse {
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.byte(pa + i as u64);
        }
        true
    }
}

/// The fields of a synthetic bzImage.
#[derive(Clone, Debug)]
pub struct Bz {
    pub setup_sects: u8,
    pub boot_flag: u16,
    pub magic: u32,
    pub version: u16,
    pub jump_len: u8,
    pub loadflags: u8,
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub relocatable: bool,
    pub min_alignment: u8,
    pub xloadflags: u16,
    pub cmdline_size: u32,
    pub pref_address: u64,
    pub init_size: u32,
    pub kernel_len: usize,
    /// `None`: the kernel's length in paragraphs.
    pub syssize: Option<u32>,
}

impl Default for Bz {
    /// Like a current x86-64 distribution kernel, small.
    fn default() -> Self {
        Bz {
            setup_sects: 4,
            boot_flag: 0xAA55,
            magic: 0x5372_6448,
            version: 0x020F,
            jump_len: 0x6A,
            loadflags: 0x01,
            initrd_addr_max: 0x7FFF_FFFF,
            kernel_alignment: 0x20_0000,
            relocatable: true,
            min_alignment: 21,
            xloadflags: 0x03,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size: 0x200_0000,
            kernel_len: 0x3000,
            syssize: None,
        }
    }
}

/// The byte at offset `i` of a synthetic protected-mode kernel.
pub fn kernel_byte(i: usize) -> u8 {
    (i % 251) as u8 ^ 0x5A
}

impl Bz {
    pub fn build(&self) -> Vec<u8> {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            self.setup_sects
        };
        let setup = (usize::from(sects) + 1) * 512;
        let mut b: Vec<u8> = (0..setup).map(|i| (i % 7) as u8 + 0xC0).collect();
        b.extend((0..self.kernel_len).map(kernel_byte));
        b[0x1F1] = self.setup_sects;
        let syssize = self.syssize.unwrap_or((self.kernel_len / 16) as u32);
        put32(&mut b, 0x1F4, syssize);
        put16(&mut b, 0x1FA, 0xFFFF); // vid_mode
        put16(&mut b, 0x1FE, self.boot_flag);
        b[0x200] = 0xEB;
        b[0x201] = self.jump_len;
        put32(&mut b, 0x202, self.magic);
        put16(&mut b, 0x206, self.version);
        put16(&mut b, 0x20E, 0x1234); // kernel_version: copied as is
        b[0x210] = 0;
        b[0x211] = self.loadflags;
        put32(&mut b, 0x214, 0x10_0000);
        put32(&mut b, 0x218, 0);
        put32(&mut b, 0x21C, 0);
        put16(&mut b, 0x224, 0);
        put32(&mut b, 0x228, 0);
        put32(&mut b, 0x22C, self.initrd_addr_max);
        put32(&mut b, 0x230, self.kernel_alignment);
        b[0x234] = u8::from(self.relocatable);
        b[0x235] = self.min_alignment;
        put16(&mut b, 0x236, self.xloadflags);
        put32(&mut b, 0x238, self.cmdline_size);
        put32(&mut b, 0x23C, 0); // hardware_subarch
        put64(&mut b, 0x250, 0); // setup_data
        put64(&mut b, 0x258, self.pref_address);
        put32(&mut b, 0x260, self.init_size);
        put32(&mut b, 0x264, 0x4242); // handover_offset: copied as is
        b
    }
}

/// QEMU's map for `-m 512` as `MemRegion`s.
pub fn qemu_map() -> Vec<thinvisor_boot::MemRegion> {
    QEMU_E820
        .iter()
        .map(|&(start, len, ty)| thinvisor_boot::MemRegion {
            start,
            len,
            kind: thinvisor_boot::MemKind::from_multiboot(ty),
        })
        .collect()
}

pub fn region(start: u64, len: u64, ty: u32) -> thinvisor_boot::MemRegion {
    thinvisor_boot::MemRegion {
        start,
        len,
        kind: thinvisor_boot::MemKind::from_multiboot(ty),
    }
}

pub fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

//! The guard against a model of PCI functions whose BARs, windows and
//! command register behave as PCI 3.0 says (writable bits per register,
//! read-only type bits).

extern crate std;
use std::vec::Vec;

use super::*;
use proptest::prelude::*;

/// How a fake function's BAR slot is built.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Io(u32),
    Mem32(u32),
    /// Takes two slots.
    Mem64(u64),
}

/// One function: 64 dwords and which bits of each are writable.
#[derive(Clone, Debug)]
struct FakeFn {
    bdf: Bdf,
    regs: [u32; 64],
    writable: [u32; 64],
    /// Memory decoding was on while some BAR held all ones.
    sized_while_decoding: bool,
}

impl FakeFn {
    fn new(bdf: Bdf, header: u32, class: u32, slots: &[Slot]) -> Self {
        let mut f = FakeFn {
            bdf,
            regs: [0; 64],
            writable: [0; 64],
            sized_while_decoding: false,
        };
        f.regs[0] = 0x1234_5678;
        f.regs[1] = 0x0010_0006; // status: capabilities list; memory and bus master on
        f.writable[1] = 0x0000_0507;
        f.regs[2] = class << 16;
        f.regs[3] = header << 16;
        let mut i = 4;
        for s in slots {
            match *s {
                Slot::Io(size) => {
                    f.regs[i] = 1;
                    f.writable[i] = !(size - 1) & !3;
                    i += 1;
                }
                Slot::Mem32(size) => {
                    f.writable[i] = !(size - 1) & !0xF;
                    i += 1;
                }
                Slot::Mem64(size) => {
                    let m = !(size - 1);
                    f.regs[i] = 4;
                    f.writable[i] = m as u32 & !0xF;
                    f.writable[i + 1] = (m >> 32) as u32;
                    i += 2;
                }
            }
        }
        if header == 0 {
            f.writable[12] = 0xFFFF_F801; // ROM: 2 KiB
        } else if header == 1 {
            f.writable[8] = 0xFFF0_FFF0;
            f.regs[9] = 0x0001_0001; // 64-bit prefetchable
            f.writable[9] = 0xFFF0_FFF0;
            f.writable[10] = u32::MAX;
            f.writable[11] = u32::MAX;
        }
        f
    }
}

#[derive(Clone, Debug, Default)]
struct FakeBus {
    fns: Vec<FakeFn>,
    writes: usize,
}

impl FakeBus {
    fn get(&mut self, f: Bdf) -> Option<&mut FakeFn> {
        self.fns.iter_mut().find(|x| x.bdf == f)
    }
    fn reg(&mut self, f: Bdf, at: u16) -> u32 {
        self.read32(f, ConfigOffset(at))
    }
}

impl ConfigSpace for FakeBus {
    fn read32(&mut self, f: Bdf, offset: ConfigOffset) -> u32 {
        match self.get(f) {
            Some(x) => x.regs.get(usize::from(offset.0 / 4)).copied().unwrap_or(0),
            None => u32::MAX,
        }
    }
    fn write(&mut self, f: Bdf, offset: ConfigOffset, size: u8, value: u32) {
        self.writes += 1;
        let Some(x) = self.get(f) else { return };
        let i = usize::from(offset.0 / 4);
        if i >= 64 {
            return;
        }
        let merged = merge(x.regs[i], offset.0 & 3, size, value);
        x.regs[i] = (x.regs[i] & !x.writable[i]) | (merged & x.writable[i]);
        let decoding = x.regs[1] & 2 != 0;
        if decoding
            && (4..10).contains(&i)
            && x.writable[i] != 0
            && x.regs[i] | x.writable[i] == x.regs[i]
            && x.regs[i] & 1 == 0
            && merged == u32::MAX
        {
            x.sized_while_decoding = true;
        }
    }
}

const BLOCK: Range<u64> = 0x1FC0_0000..0x2000_0000;
const IOMMU_MMIO: Range<u64> = 0xFED8_0000..0xFED8_4000;
const PROTECTED: [Range<u64>; 2] = [BLOCK, IOMMU_MMIO];
const IOMMU: Bdf = Bdf::new(0, 3, 0);
const DEV: Bdf = Bdf::new(0, 4, 0);
const BRIDGE: Bdf = Bdf::new(0, 0x1C, 0);

fn guard() -> Guard<'static> {
    Guard {
        protected: &PROTECTED,
        iommu_functions: &[IOMMU],
    }
}

fn machine() -> FakeBus {
    let mut host = FakeFn::new(Bdf(0), 0, 0x0600, &[]);
    host.regs[0] = 0x29C0_8086;
    host.writable[0x60 / 4] = 0xF000_0007;
    host.writable[0x64 / 4] = 0xF;
    let dev = FakeFn::new(
        DEV,
        0,
        0x0200,
        &[
            Slot::Mem32(0x1000),
            Slot::Io(0x20),
            Slot::Mem64(0x4000),
            Slot::Mem32(0x100_0000),
        ],
    );
    let iommu = FakeFn::new(IOMMU, 0, 0x0806, &[]);
    let bridge = FakeFn::new(BRIDGE, 1, 0x0604, &[Slot::Mem32(0x1000)]);
    FakeBus {
        fns: std::vec![host, dev, iommu, bridge],
        writes: 0,
    }
}

fn w(bus: &mut FakeBus, f: Bdf, at: u16, value: u32) -> Result<(), Refusal> {
    guard().write(bus, f, ConfigOffset(at), 4, value)
}

#[test]
fn decodes_config_address() {
    let a = decode_cf8(0x8000_2810, 0xCFE).unwrap();
    assert_eq!(a.function, Bdf::new(0, 5, 0));
    assert_eq!(a.offset, ConfigOffset(0x12));
    assert!(!a.extended);
    assert_eq!(decode_cf8(0x0000_2810, 0xCFC), None);
    assert_eq!(decode_cf8(0x8000_2810, 0xCF8), None);
    let e = decode_cf8(0x8100_0313, 0xCFD).unwrap();
    assert_eq!(
        (e.function, e.offset, e.extended),
        (Bdf::new(0, 0, 3), ConfigOffset(0x11), true)
    );
    assert_eq!(Bdf::new(0x12, 0x1F, 7).to_string_for_test(), "12:1f.7");
}

trait ToStringForTest {
    fn to_string_for_test(&self) -> std::string::String;
}
impl ToStringForTest for Bdf {
    fn to_string_for_test(&self) -> std::string::String {
        std::format!("{self}")
    }
}

#[test]
fn bar_over_the_block_is_refused_and_kept() {
    let mut bus = machine();
    w(&mut bus, DEV, 0x10, 0xFEB0_0000).unwrap();
    assert_eq!(bus.reg(DEV, 0x10), 0xFEB0_0000);
    let r = w(&mut bus, DEV, 0x10, BLOCK.start as u32 + 0x1000);
    assert!(
        matches!(
            r,
            Err(Refusal::Window {
                kind: WindowKind::Bar(0),
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(bus.reg(DEV, 0x10), 0xFEB0_0000);
    // The command register is as it was (the sizing put it back).
    assert_eq!(bus.reg(DEV, 0x04) & 0xFFFF, 0x0006);
    // Just below and just above: fine.
    w(&mut bus, DEV, 0x10, BLOCK.start as u32 - 0x1000).unwrap();
    w(&mut bus, DEV, 0x10, BLOCK.end as u32).unwrap();
    assert_eq!(bus.reg(DEV, 0x10), BLOCK.end as u32);
    // A 16 MiB BAR whose 16 MiB alignment swallows the block.
    let r = w(&mut bus, DEV, 0x20, 0x1F10_0000);
    assert!(
        matches!(
            r,
            Err(Refusal::Window {
                kind: WindowKind::Bar(4),
                ..
            })
        ),
        "{r:?}"
    );
    // Over the IOMMU's registers.
    assert!(w(&mut bus, DEV, 0x10, 0xFED8_1000).is_err());
    assert!(!bus.get(DEV).unwrap().sized_while_decoding);
}

#[test]
fn sizing_and_io_pass() {
    let mut bus = machine();
    w(&mut bus, DEV, 0x10, u32::MAX).unwrap();
    assert_eq!(bus.reg(DEV, 0x10), 0xFFFF_F000);
    w(&mut bus, DEV, 0x10, 0xFEB0_0000).unwrap();
    // I/O BAR at 0x14: any value.
    w(&mut bus, DEV, 0x14, BLOCK.start as u32 | 1).unwrap();
    assert_eq!(bus.reg(DEV, 0x14), BLOCK.start as u32 | 1);
    // 64-bit sizing, both halves.
    w(&mut bus, DEV, 0x18, u32::MAX).unwrap();
    w(&mut bus, DEV, 0x1C, u32::MAX).unwrap();
    assert_eq!(
        (bus.reg(DEV, 0x18), bus.reg(DEV, 0x1C)),
        (0xFFFF_C004, u32::MAX)
    );
}

#[test]
fn sixty_four_bit_bar_halves() {
    let mut bus = machine();
    // High first, then low: the low write lands the window over the block.
    w(&mut bus, DEV, 0x1C, 0x8).unwrap();
    w(&mut bus, DEV, 0x18, BLOCK.start as u32).unwrap();
    assert_eq!(bus.reg(DEV, 0x18), BLOCK.start as u32 | 4);
    let r = w(&mut bus, DEV, 0x1C, 0);
    assert!(
        matches!(
            r,
            Err(Refusal::Window {
                kind: WindowKind::Bar(2),
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(bus.reg(DEV, 0x1C), 0x8);
    // Elsewhere below 4 GiB: fine.
    w(&mut bus, DEV, 0x18, 0xFEB1_0000).unwrap();
    w(&mut bus, DEV, 0x1C, 0).unwrap();
    assert_eq!((bus.reg(DEV, 0x18), bus.reg(DEV, 0x1C)), (0xFEB1_0004, 0));
}

#[test]
fn byte_writes_merge() {
    let mut bus = machine();
    w(&mut bus, DEV, 0x10, 0xFEB0_0000).unwrap();
    // The top byte 0x1F: 0x1FB0_0000, clear of the block; then 0x1FC...
    guard()
        .write(&mut bus, DEV, ConfigOffset(0x13), 1, 0x1F)
        .unwrap();
    assert_eq!(bus.reg(DEV, 0x10), 0x1FB0_0000);
    let r = guard().write(&mut bus, DEV, ConfigOffset(0x12), 1, 0xC0);
    assert!(r.is_err());
    assert_eq!(bus.reg(DEV, 0x10), 0x1FB0_0000);
    assert_eq!(
        guard().write(&mut bus, DEV, ConfigOffset(0x13), 2, 0),
        Err(Refusal::Straddles)
    );
}

#[test]
fn rom_and_bridge_windows() {
    let mut bus = machine();
    assert!(matches!(
        w(&mut bus, DEV, 0x30, BLOCK.start as u32 | 1),
        Err(Refusal::Window {
            kind: WindowKind::Rom,
            ..
        })
    ));
    w(&mut bus, DEV, 0x30, 0xFEC0_0001).unwrap();
    w(&mut bus, DEV, 0x30, 0xFFFF_F800).unwrap();
    // Memory window 0x1F00_0000..=0x1FFF_FFFF covers the block.
    assert!(matches!(
        w(&mut bus, BRIDGE, 0x20, 0x1FF0_1F00),
        Err(Refusal::Window {
            kind: WindowKind::BridgeMemory,
            ..
        })
    ));
    w(&mut bus, BRIDGE, 0x20, 0xFE10_FE00).unwrap();
    // Base above limit: empty, whatever it says.
    w(&mut bus, BRIDGE, 0x20, 0x0000_FFF0).unwrap();
    // Prefetchable: the upper halves move it.
    w(&mut bus, BRIDGE, 0x28, 1).unwrap();
    w(&mut bus, BRIDGE, 0x2C, 1).unwrap();
    w(&mut bus, BRIDGE, 0x24, 0x2000_1F00).unwrap();
    // Upper base to 0 with the upper limit still 1: a window 0x1F00_0000..
    // 0x1_2000_0000 over the block.
    assert!(w(&mut bus, BRIDGE, 0x28, 0).is_err());
    // Linux's order: upper limit 0 first (empty meanwhile), then the rest.
    w(&mut bus, BRIDGE, 0x2C, 0).unwrap();
    w(&mut bus, BRIDGE, 0x24, 0xE000_D000).unwrap();
    w(&mut bus, BRIDGE, 0x28, 0).unwrap();
}

#[test]
fn iommu_function_and_pciexbar() {
    let mut bus = machine();
    let before = bus.clone();
    assert_eq!(w(&mut bus, IOMMU, 0x44, 0), Err(Refusal::IommuFunction));
    assert_eq!(
        guard().write(&mut bus, IOMMU, ConfigOffset(0x4), 2, 0),
        Err(Refusal::IommuFunction)
    );
    assert!(matches!(
        w(&mut bus, Bdf(0), 0x60, 0xE000_0001),
        Err(Refusal::Decoder(_))
    ));
    assert!(matches!(
        w(&mut bus, Bdf(0), 0x64, 0),
        Err(Refusal::Decoder(_))
    ));
    assert_eq!(bus.writes, before.writes);
    // Other host bridge registers pass (PAM, say).
    w(&mut bus, Bdf(0), 0x90, 0x3030_3030).unwrap();
    // A non-Intel host bridge has no PCIEXBAR there.
    bus.get(Bdf(0)).unwrap().regs[0] = 0x1450_1022;
    w(&mut bus, Bdf(0), 0x60, 0x1).unwrap();
}

#[test]
fn host_bridge_decoding_stays_on_while_sized() {
    let mut bus = machine();
    let host = bus.get(Bdf(0)).unwrap();
    host.writable[4] = 0xFFFF_0000;
    let before = bus.writes;
    w(&mut bus, Bdf(0), 0x10, 0xFE00_0000).unwrap();
    // Sized (2 writes) and written, command never touched.
    assert_eq!(bus.writes - before, 3);
    assert_eq!(bus.reg(Bdf(0), 0x10), 0xFE00_0000);
}

#[test]
fn other_registers_cost_no_reads() {
    struct Counting(usize);
    impl ConfigSpace for Counting {
        fn read32(&mut self, _: Bdf, _: ConfigOffset) -> u32 {
            self.0 += 1;
            0
        }
        fn write(&mut self, _: Bdf, _: ConfigOffset, _: u8, _: u32) {}
    }
    let mut c = Counting(0);
    for at in [0x04, 0x0C, 0x104] {
        guard()
            .write(&mut c, DEV, ConfigOffset(at), 4, 0x1234)
            .unwrap();
    }
    assert_eq!(c.0, 0);
    // The capabilities (where MSI lives) cost the status register's read
    // when the function has no capability list.
    for at in [0x40, 0x44, 0xFC] {
        guard()
            .write(&mut c, DEV, ConfigOffset(at), 4, 0x1234)
            .unwrap();
    }
    assert_eq!(c.0, 3);
}

/// The window of the memory BAR at `lo` of DEV, from the model's own
/// writable bits.
fn window(bus: &mut FakeBus, lo: u16, is64: bool) -> Range<u64> {
    let f = bus.get(DEV).unwrap().clone();
    let i = usize::from(lo / 4);
    let (base, mask) = if is64 {
        (
            (u64::from(f.regs[i + 1]) << 32) | u64::from(f.regs[i] & !0xF),
            (u64::from(f.writable[i + 1]) << 32) | u64::from(f.writable[i]),
        )
    } else {
        (u64::from(f.regs[i] & !0xF), u64::from(f.writable[i]))
    };
    let len = 1u64 << mask.trailing_zeros();
    base..base.saturating_add(len)
}

proptest! {
    /// Whatever the guest writes to DEV's BARs, a write either changes
    /// exactly what it wrote or nothing; the command register ends as it
    /// was; and after an accepted write that is not a sizing write, the
    /// BAR's window is clear of every protected range.
    #[test]
    fn no_window_over_protected(
        writes in proptest::collection::vec(
            (0u16..6, 0u16..4, prop_oneof![Just(1u8), Just(2), Just(4)], any::<u32>(),
             prop_oneof![Just(0u32), Just(u32::MAX), 0x1F00_0000u32..0x2100_0000, any::<u32>()]),
            1..40),
    ) {
        let mut bus = machine();
        for (slot, byte, size, junk, near) in writes {
            let at = 0x10 + slot * 4 + if size == 4 { 0 } else { byte & (4 - u16::from(size)) };
            let value = if junk & 1 == 0 { near >> (8 * (at & 3)) } else { junk };
            bus.get(DEV).unwrap().sized_while_decoding = false;
            let before = bus.clone();
            let guest_sizes = merge(before.clone().reg(DEV, at & !3), at & 3, size, value) == u32::MAX;
            let mut expected = bus.clone();
            expected.write(DEV, ConfigOffset(at), size, value);
            let r = guard().write(&mut bus, DEV, ConfigOffset(at), size, value);
            let mut want = if r.is_ok() { expected } else { before.clone() };
            let want = want.get(DEV).unwrap().regs;
            let after = bus.get(DEV).unwrap().regs;
            prop_assert_eq!(&after[..], &want[..]);
            prop_assert!(guest_sizes || !bus.get(DEV).unwrap().sized_while_decoding);
            let dw = at & !3;
            let written = bus.reg(DEV, dw);
            let sizing = |v: u32, lo: bool| if lo { v | 0xF == u32::MAX } else { v == u32::MAX };
            if r.is_ok() {
                let bar = match dw {
                    0x10 => Some((0x10, false, true)),
                    0x18 | 0x1C => Some((0x18, true, dw == 0x18)),
                    0x20 => Some((0x20, false, true)),
                    _ => None,
                };
                if let Some((lo, is64, low_half)) = bar {
                    let merged = merge(before.clone().reg(DEV, dw), at & 3, size, value);
                    if !sizing(merged, low_half) && merged != before.clone().reg(DEV, dw) {
                        let win = window(&mut bus, lo, is64);
                        for p in &PROTECTED {
                            prop_assert!(win.end <= p.start || p.end <= win.start,
                                "{win:x?} over {p:x?} after {value:#x} at {at:#x} (reads {written:#x})");
                        }
                    }
                }
            }
        }
    }
}

/// A function with an MSI capability (64-bit addresses) at 0x50 behind a
/// power-management one at 0x40.
fn with_msi() -> FakeBus {
    let mut f = FakeFn::new(DEV, 0, 0x0200, &[Slot::Mem32(0x1000)]);
    f.regs[0x34 / 4] = 0x40;
    f.regs[0x40 / 4] = 0x0000_5001; // PM, next 0x50
    f.regs[0x50 / 4] = 0x0080_0005; // MSI, 64-bit, last
    for i in [0x54 / 4, 0x58 / 4, 0x5C / 4] {
        f.writable[i] = u32::MAX;
    }
    FakeBus {
        fns: std::vec![f],
        writes: 0,
    }
}

#[test]
fn msi_init_refused() {
    let g = guard();
    let mut bus = with_msi();
    // Fixed delivery, vector 0x41: written.
    assert_eq!(
        g.write(&mut bus, DEV, ConfigOffset(0x5C), 2, 0x0041),
        Ok(())
    );
    assert_eq!(bus.reg(DEV, 0x5C) & 0xFFFF, 0x0041);
    // INIT, as a word or a dword: dropped, the register unchanged.
    assert_eq!(
        g.write(&mut bus, DEV, ConfigOffset(0x5C), 2, 0x0500),
        Err(Refusal::MsiInit)
    );
    assert_eq!(
        g.write(&mut bus, DEV, ConfigOffset(0x5C), 4, 0x0000_0500),
        Err(Refusal::MsiInit)
    );
    // The byte holding the mode alone.
    assert_eq!(
        g.write(&mut bus, DEV, ConfigOffset(0x5D), 1, 0x05),
        Err(Refusal::MsiInit)
    );
    assert_eq!(bus.reg(DEV, 0x5C) & 0xFFFF, 0x0041);
    // The address registers are not the data: written.
    assert_eq!(
        g.write(&mut bus, DEV, ConfigOffset(0x58), 4, 0x0500),
        Ok(())
    );
    // A 32-bit MSI has its data at +8.
    bus.get(DEV).unwrap().regs[0x50 / 4] = 0x0000_0005;
    assert_eq!(
        g.write(&mut bus, DEV, ConfigOffset(0x58), 4, 0x0500),
        Err(Refusal::MsiInit)
    );
}

#[test]
fn looping_capability_list_ends() {
    let g = guard();
    let mut bus = with_msi();
    bus.get(DEV).unwrap().regs[0x40 / 4] = 0x0000_4001; // PM pointing at itself
    assert_eq!(
        g.write(&mut bus, DEV, ConfigOffset(0x5C), 2, 0x0500),
        Ok(())
    );
}

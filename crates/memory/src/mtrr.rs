//! Memory types from the MTRRs (Intel SDM vol. 3A, 11.11), for EPT.
//!
//! Why this exists: under EPT the processor does not consult the MTRRs
//! for the guest's accesses; the EPT leaf's memory type (bits 5:3) takes
//! their place and is combined with the guest's PAT (SDM vol. 3C, 29.3.7).
//! A pass-through guest must see the memory types the firmware set up
//! (uncacheable MMIO, write-combining frame buffers, write-back RAM), so
//! the hypervisor reads the MTRRs once at boot, before the guest can
//! change them, and [`Mtrrs`] answers "what is the type of this range"
//! for the EPT builder ([`crate::passthrough`]).
//!
//! AMD's nested paging needs none of this: its leaves are written
//! write-back with PAT/PCD/PWT = 0, which lets the guest's own PAT and the
//! real MTRRs (which the guest programs natively) decide (AMD APM vol. 2,
//! 15.25.8).
//!
//! Everything here is pure: the inputs are raw MSR values
//! ([`MtrrMsrs`]), any of them may be hostile (reserved bits set,
//! undefined type encodings, absurd counts or MAXPHYADDR), and nothing
//! panics. Undefined encodings are read as uncacheable, the type that is
//! never wrong for MMIO.

/// IA32_MTRRCAP: VCNT in bits 7:0, FIX in bit 8, WC in bit 10.
pub const IA32_MTRRCAP: u32 = 0xFE;
/// IA32_MTRR_DEF_TYPE: default type in bits 7:0, FE in bit 10, E in bit 11.
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2FF;
/// IA32_MTRR_PHYSBASE0; PHYSBASEn is at `IA32_MTRR_PHYSBASE0 + 2n` and
/// PHYSMASKn right after it (SDM vol. 3A, 11.11.2.3).
pub const IA32_MTRR_PHYSBASE0: u32 = 0x200;
/// The eleven fixed-range MTRRs in address order: FIX64K_00000,
/// FIX16K_80000, FIX16K_A0000, FIX4K_C0000 .. FIX4K_F8000 (SDM vol. 3A,
/// 11.11.2.2). [`MtrrMsrs::fixed`] holds their values in this order.
pub const FIXED_MTRR_MSRS: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26A, 0x26B, 0x26C, 0x26D, 0x26E, 0x26F,
];
/// How many variable-range pairs [`MtrrMsrs`] holds. Processors have 8 or
/// 10 (VCNT); the architectural MSR range ends at PHYSMASK9 (0x213) well
/// before 16. Pairs beyond this are not read and not decoded.
pub const MAX_VARIABLE_MTRRS: usize = 16;

const CAP_FIX: u64 = 1 << 8;
const DEF_FE: u64 = 1 << 10;
const DEF_E: u64 = 1 << 11;
const MASK_VALID: u64 = 1 << 11;
const ONE_MIB: u64 = 1 << 20;
/// Fixed-range subranges: 8 of 64 KiB, 16 of 16 KiB, 64 of 4 KiB.
const FIXED_COUNT: usize = 88;
/// Recursion steps one aligned block may spend proving itself uniform
/// (see [`Mtrrs::uniform_type`]): enough for a 2 MiB block split all the
/// way down to 4 KiB pages (511 steps).
const BLOCK_BUDGET: u32 = 1024;

/// A memory type (SDM vol. 3A, table 11-8): the encodings are shared by
/// MTRRs, the PAT and EPT leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum MemoryType {
    /// UC (0).
    Uncacheable = 0,
    /// WC (1).
    WriteCombining = 1,
    /// WT (4).
    WriteThrough = 4,
    /// WP (5).
    WriteProtected = 5,
    /// WB (6).
    WriteBack = 6,
}

impl MemoryType {
    /// The type encoded in the low 8 bits of `bits`; `None` for the
    /// reserved encodings (2, 3, 7..=255), which the MSRs refuse to hold.
    pub const fn from_bits(bits: u64) -> Option<Self> {
        match bits & 0xFF {
            0 => Some(Self::Uncacheable),
            1 => Some(Self::WriteCombining),
            4 => Some(Self::WriteThrough),
            5 => Some(Self::WriteProtected),
            6 => Some(Self::WriteBack),
            _ => None,
        }
    }

    /// The encoding, e.g. for EPT bits 5:3.
    pub const fn bits(self) -> u64 {
        self as u64
    }

    /// As [`Self::from_bits`], with the reserved encodings read as UC.
    const fn decode(bits: u64) -> Self {
        match Self::from_bits(bits) {
            Some(t) => t,
            None => Self::Uncacheable,
        }
    }
}

/// One variable-range pair, raw: IA32_MTRR_PHYSBASEn (type in bits 7:0,
/// base in bits MAXPHYADDR-1:12) and IA32_MTRR_PHYSMASKn (valid in bit 11,
/// mask in bits MAXPHYADDR-1:12).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VariableMtrr {
    pub base: u64,
    pub mask: u64,
}

/// The raw MTRR MSR values, as the hypervisor reads them.
///
/// A plain struct so a test or the hypervisor can fill it in directly;
/// [`MtrrMsrs::read`] reads exactly the MSRs that exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MtrrMsrs {
    /// IA32_MTRRCAP (0xFE).
    pub cap: u64,
    /// IA32_MTRR_DEF_TYPE (0x2FF).
    pub def_type: u64,
    /// The fixed-range MTRRs in the order of [`FIXED_MTRR_MSRS`].
    pub fixed: [u64; 11],
    /// PHYSBASEn/PHYSMASKn for n < min(VCNT, [`MAX_VARIABLE_MTRRS`]).
    pub variable: [VariableMtrr; MAX_VARIABLE_MTRRS],
    /// CPUID 0x8000_0008 EAX bits 7:0 (36 when that leaf is missing): the
    /// width of the base and mask fields.
    pub max_phys_addr: u8,
}

impl MtrrMsrs {
    /// Reads the MTRRs with `rdmsr`: MTRRCAP and DEF_TYPE, the fixed
    /// ranges only when MTRRCAP.FIX says they exist, and the first
    /// min(VCNT, [`MAX_VARIABLE_MTRRS`]) variable pairs, so no
    /// non-existent MSR is touched.
    ///
    /// The caller checks CPUID.1:EDX.MTRR (bit 12) first: without it
    /// MTRRCAP itself does not exist. Read them before the guest first
    /// runs: a guest that writes the MTRRs later changes nothing under EPT.
    pub fn read(mut rdmsr: impl FnMut(u32) -> u64, max_phys_addr: u8) -> Self {
        let cap = rdmsr(IA32_MTRRCAP);
        let mut msrs = Self {
            cap,
            def_type: rdmsr(IA32_MTRR_DEF_TYPE),
            max_phys_addr,
            ..Self::default()
        };
        if cap & CAP_FIX != 0 {
            for (value, msr) in msrs.fixed.iter_mut().zip(FIXED_MTRR_MSRS) {
                *value = rdmsr(msr);
            }
        }
        for (n, pair) in (0u32..).zip(msrs.variable.iter_mut()).take(vcnt(cap)) {
            pair.base = rdmsr(IA32_MTRR_PHYSBASE0 + 2 * n);
            pair.mask = rdmsr(IA32_MTRR_PHYSBASE0 + 2 * n + 1);
        }
        msrs
    }
}

/// VCNT, capped to what [`MtrrMsrs`] holds.
fn vcnt(cap: u64) -> usize {
    ((cap & 0xFF) as usize).min(MAX_VARIABLE_MTRRS)
}

/// One enabled variable range, with base and mask cut to the physical
/// address bits 12..MAXPHYADDR: it covers `x` when `x & mask == base`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Variable {
    base: u64,
    mask: u64,
    ty: u8,
}

/// The decoded MTRRs: the effective memory type of any physical range
/// under the precedence rules of SDM vol. 3A, 11.11.4.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mtrrs {
    /// IA32_MTRR_DEF_TYPE.E: when clear, everything is UC.
    enabled: bool,
    /// E, FE and MTRRCAP.FIX all set: the first MiB uses `fixed`.
    fixed_enabled: bool,
    default: MemoryType,
    /// The type of each fixed subrange, encoded ([`fixed_index`]).
    fixed: [u8; FIXED_COUNT],
    variable: [Variable; MAX_VARIABLE_MTRRS],
    /// Enabled entries at the start of `variable`.
    count: usize,
}

/// A set of memory types, one bit per encoding.
type TypeSet = u8;

const fn bit(t: MemoryType) -> TypeSet {
    1 << t as u8
}

/// The type an address gets when the variable ranges in `set` all cover
/// it (SDM vol. 3A, 11.11.4.1): none, the default; UC among them, UC; all
/// the same, that one; WT and WB, WT; any other mix is undefined, and UC
/// is the choice that never caches what must not be cached.
fn combine(set: TypeSet, default: MemoryType) -> MemoryType {
    const UC: TypeSet = bit(MemoryType::Uncacheable);
    const WT_WB: TypeSet = bit(MemoryType::WriteThrough) | bit(MemoryType::WriteBack);
    if set == 0 {
        default
    } else if set & UC != 0 {
        MemoryType::Uncacheable
    } else if set.is_power_of_two() {
        MemoryType::decode(u64::from(set.trailing_zeros()))
    } else if set == WT_WB {
        MemoryType::WriteThrough
    } else {
        MemoryType::Uncacheable
    }
}

/// The fixed subrange holding `pa` (< 1 MiB) and where it ends.
fn fixed_index(pa: u64) -> (usize, u64) {
    if pa < 0x8_0000 {
        let i = pa >> 16;
        (i as usize, (i + 1) << 16)
    } else if pa < 0xC_0000 {
        let i = (pa - 0x8_0000) >> 14;
        (8 + i as usize, 0x8_0000 + ((i + 1) << 14))
    } else {
        let i = (pa.min(ONE_MIB - 1) - 0xC_0000) >> 12;
        (24 + i as usize, 0xC_0000 + ((i + 1) << 12))
    }
}

impl Mtrrs {
    /// Decodes raw MSR values. Variable pairs beyond VCNT and pairs whose
    /// PHYSMASK.V is clear are ignored; reserved bits are ignored;
    /// reserved type encodings read as UC; MAXPHYADDR is taken as 12..=52.
    pub fn new(msrs: &MtrrMsrs) -> Self {
        let enabled = msrs.def_type & DEF_E != 0;
        let width = msrs.max_phys_addr.clamp(12, 52);
        let phys = ((1u64 << width) - 1) & !0xFFF;
        let mut fixed = [0u8; FIXED_COUNT];
        for (i, t) in fixed.iter_mut().enumerate() {
            *t = MemoryType::decode(msrs.fixed[i / 8] >> (8 * (i % 8))) as u8;
        }
        let mut variable = [Variable::default(); MAX_VARIABLE_MTRRS];
        let mut count = 0;
        for pair in &msrs.variable[..vcnt(msrs.cap)] {
            if pair.mask & MASK_VALID == 0 {
                continue;
            }
            let mask = pair.mask & phys;
            variable[count] = Variable {
                base: pair.base & mask,
                mask,
                ty: MemoryType::decode(pair.base) as u8,
            };
            count += 1;
        }
        Self {
            enabled,
            fixed_enabled: enabled && msrs.def_type & DEF_FE != 0 && msrs.cap & CAP_FIX != 0,
            default: MemoryType::decode(msrs.def_type),
            fixed,
            variable,
            count,
        }
    }

    /// MTRRs that give every address type `ty`: for a processor without
    /// MTRRs, where the hypervisor picks the type itself, and for tests.
    pub fn uniform(ty: MemoryType) -> Self {
        Self::new(&MtrrMsrs {
            def_type: DEF_E | ty.bits(),
            ..MtrrMsrs::default()
        })
    }

    /// The effective memory type of physical address `pa`.
    pub fn type_of(&self, pa: u64) -> MemoryType {
        if !self.enabled {
            return MemoryType::Uncacheable;
        }
        if self.fixed_enabled && pa < ONE_MIB {
            return MemoryType::decode(self.fixed[fixed_index(pa).0].into());
        }
        let mut budget = BLOCK_BUDGET;
        // A 4 KiB block is always uniform: masks have no bits below 12.
        self.block_type(pa & !0xFFF, 12, &mut budget)
            .unwrap_or(MemoryType::Uncacheable)
    }

    /// The type of every byte of [`start`, `end`) when they all have the
    /// same one; `None` when they differ or the range is empty.
    ///
    /// The page-table builder asks this for each page it could use, so it
    /// is cheap: the range is cut into aligned power-of-two blocks (at
    /// most about a hundred), and within a block each variable range
    /// either covers all of it, none of it, or part of it. Only parts
    /// decide anything, and only when their type could change the
    /// outcome; then the block is halved. Firmware writes masks of
    /// contiguous ones (power-of-two ranges), for which this is exact.
    /// With hostile non-contiguous masks a block may need more halving
    /// than [`BLOCK_BUDGET`] allows (blocks over 2 MiB only); the answer
    /// is then `None`, so a caller splits into smaller pages and stays
    /// correct.
    pub fn uniform_type(&self, start: u64, end: u64) -> Option<MemoryType> {
        if start >= end {
            return None;
        }
        if !self.enabled {
            return Some(MemoryType::Uncacheable);
        }
        let mut found: Option<MemoryType> = None;
        let mut same = |t: MemoryType| match found {
            None => {
                found = Some(t);
                true
            }
            Some(f) => f == t,
        };
        // Pages [s, last], inclusive so that the end of the address space
        // does not overflow.
        let mut s = start & !0xFFF;
        let last = (end - 1) & !0xFFF;
        if self.fixed_enabled {
            while s < ONE_MIB && s <= last {
                let (i, next) = fixed_index(s);
                if !same(MemoryType::decode(self.fixed[i].into())) {
                    return None;
                }
                s = next;
            }
        }
        while s <= last {
            let align = s.trailing_zeros().min(64);
            let span = u128::from(last - s) + 0x1000;
            let fit = 127 - span.leading_zeros();
            let k = align.min(fit);
            let mut budget = BLOCK_BUDGET;
            if !same(self.block_type(s, k, &mut budget)?) {
                return None;
            }
            match 1u64.checked_shl(k).and_then(|size| s.checked_add(size)) {
                Some(next) => s = next,
                None => break,
            }
        }
        found
    }

    /// Whether [`start`, `end`) has one memory type (see
    /// [`Self::uniform_type`]).
    pub fn is_uniform(&self, start: u64, end: u64) -> bool {
        self.uniform_type(start, end).is_some()
    }

    /// The variable-range type of the aligned block [p, p + 2^k) (k >= 12)
    /// when uniform, ignoring fixed ranges.
    fn block_type(&self, p: u64, k: u32, budget: &mut u32) -> Option<MemoryType> {
        let low = 1u64.checked_shl(k).map_or(u64::MAX, |size| size - 1);
        let mut full: TypeSet = 0;
        let mut partial: TypeSet = 0;
        for v in &self.variable[..self.count] {
            if (p ^ v.base) & v.mask & !low != 0 {
                continue;
            }
            if v.mask & low == 0 {
                full |= 1 << v.ty;
            } else {
                partial |= 1 << v.ty;
            }
        }
        let t = combine(full, self.default);
        // Does any choice of the partly-covering types change the answer?
        // (At most 32 subsets: five types.)
        let mut subset = partial;
        loop {
            if combine(full | subset, self.default) != t {
                break;
            }
            if subset == 0 {
                return Some(t);
            }
            subset = (subset - 1) & partial;
        }
        // Some do: look closer. A partial range has a mask bit below k, and
        // masks have no bits below 12, so k > 12 here.
        if k <= 12 || *budget == 0 {
            return None;
        }
        *budget -= 1;
        let half = k - 1;
        let a = self.block_type(p, half, budget)?;
        let b = self.block_type(p | (1u64 << half), half, budget)?;
        (a == b).then_some(a)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use MemoryType::*;

    const GIB: u64 = 1 << 30;

    /// A mask register for a power-of-two range of `size` bytes.
    fn mask(size: u64, width: u8) -> u64 {
        (((1u64 << width) - 1) & !(size - 1)) | MASK_VALID
    }

    fn msrs(default: MemoryType, fixed: [u64; 11], ranges: &[(u64, u64, MemoryType)]) -> MtrrMsrs {
        let mut m = MtrrMsrs {
            cap: 8 | CAP_FIX | (1 << 10),
            def_type: DEF_E | DEF_FE | default.bits(),
            fixed,
            max_phys_addr: 40,
            ..MtrrMsrs::default()
        };
        for (pair, &(base, size, ty)) in m.variable.iter_mut().zip(ranges) {
            pair.base = base | ty.bits();
            pair.mask = mask(size, 40);
        }
        m
    }

    /// Fixed ranges as SeaBIOS (and most firmware) set them: WB, except
    /// the legacy VGA window 0xA0000-0xBFFFF UC.
    fn seabios_fixed() -> [u64; 11] {
        let wb = 0x0606_0606_0606_0606;
        let mut f = [wb; 11];
        f[2] = 0; // FIX16K_A0000: 0xA0000-0xBFFFF.
        f
    }

    /// SeaBIOS on QEMU with 4 GiB or more: default WB, the PCI hole
    /// 0xC0000000-0xFFFFFFFF UC through one variable range.
    fn seabios() -> Mtrrs {
        Mtrrs::new(&msrs(
            WriteBack,
            seabios_fixed(),
            &[(0xC000_0000, GIB, Uncacheable)],
        ))
    }

    #[test]
    fn seabios_layout() {
        let m = seabios();
        assert_eq!(m.type_of(0), WriteBack);
        assert_eq!(m.type_of(0x9_FFFF), WriteBack);
        assert_eq!(m.type_of(0xA_0000), Uncacheable);
        assert_eq!(m.type_of(0xB_FFFF), Uncacheable);
        assert_eq!(m.type_of(0xC_0000), WriteBack);
        assert_eq!(m.type_of(0x10_0000), WriteBack);
        assert_eq!(m.type_of(0xBFFF_FFFF), WriteBack);
        assert_eq!(m.type_of(0xC000_0000), Uncacheable);
        assert_eq!(m.type_of(0xFEE0_0000), Uncacheable);
        assert_eq!(m.type_of(0xFFFF_FFFF), Uncacheable);
        assert_eq!(m.type_of(0x1_0000_0000), WriteBack);
        // Above MAXPHYADDR the mask bits alias: 0x100_C000_0000 matches.
        assert_eq!(m.type_of(0x100_C000_0000), Uncacheable);

        assert_eq!(m.uniform_type(0, 0xA_0000), Some(WriteBack));
        assert_eq!(m.uniform_type(0, 0xA_0001), None);
        assert_eq!(m.uniform_type(0xA_0000, 0xC_0000), Some(Uncacheable));
        assert_eq!(m.uniform_type(0xC_0000, 0xC000_0000), Some(WriteBack));
        assert_eq!(m.uniform_type(0, 2 << 20), None);
        assert_eq!(m.uniform_type(2 << 20, 3 * GIB), Some(WriteBack));
        assert_eq!(m.uniform_type(3 * GIB, 4 * GIB), Some(Uncacheable));
        assert_eq!(m.uniform_type(3 * GIB - 4096, 3 * GIB + 1), None);
        assert_eq!(m.uniform_type(4 * GIB, 64 * GIB), Some(WriteBack));
        assert_eq!(m.uniform_type(5, 5), None);
        assert!(m.is_uniform(GIB, 2 * GIB));
        assert!(!m.is_uniform(0, GIB));
    }

    /// OVMF-like: default UC, RAM below 2 GiB WB through two ranges, WB
    /// above 4 GiB through one large range.
    #[test]
    fn default_uncacheable_with_write_back_ranges() {
        let m = Mtrrs::new(&msrs(
            Uncacheable,
            seabios_fixed(),
            &[
                (0, 2 * GIB, WriteBack),
                (2 * GIB, 512 << 20, WriteBack),
                (4 * GIB, 4 * GIB, WriteBack),
            ],
        ));
        assert_eq!(
            m.uniform_type(1 << 20, 2 * GIB + (512 << 20)),
            Some(WriteBack)
        );
        assert_eq!(m.type_of(2 * GIB + (512 << 20)), Uncacheable);
        assert_eq!(m.uniform_type(2 * GIB, 3 * GIB), None);
        assert_eq!(m.uniform_type(3 * GIB, 4 * GIB), Some(Uncacheable));
        assert_eq!(m.uniform_type(4 * GIB, 8 * GIB), Some(WriteBack));
        assert_eq!(m.type_of(8 * GIB), Uncacheable);
    }

    #[test]
    fn overlaps() {
        let m = Mtrrs::new(&msrs(
            WriteBack,
            [0; 11],
            &[
                // UC inside WB: UC wins.
                (0x1000_0000, 0x1000_0000, WriteBack),
                (0x1800_0000, 0x10_0000, Uncacheable),
                // WT over WB: WT.
                (0x4000_0000, 0x4000_0000, WriteThrough),
                (0x4000_0000, 0x1000_0000, WriteBack),
                // WC over WB: undefined, UC.
                (0x8000_0000, 0x1000_0000, WriteCombining),
                (0x8000_0000, 0x1_0000, WriteBack),
                // WP over WP: WP.
                (0x9000_0000, 0x1000_0000, WriteProtected),
                (0x9000_0000, 0x1000_0000, WriteProtected),
            ],
        ));
        assert_eq!(m.type_of(0x1000_0000), WriteBack);
        assert_eq!(m.type_of(0x1800_0000), Uncacheable);
        assert_eq!(m.type_of(0x180F_FFFF), Uncacheable);
        assert_eq!(m.type_of(0x1810_0000), WriteBack);
        assert_eq!(m.type_of(0x4000_0000), WriteThrough);
        assert_eq!(m.type_of(0x5000_0000), WriteThrough);
        assert_eq!(m.uniform_type(0x4000_0000, 0x8000_0000), Some(WriteThrough));
        assert_eq!(m.type_of(0x8000_0000), Uncacheable);
        assert_eq!(m.type_of(0x8001_0000), WriteCombining);
        assert_eq!(m.type_of(0x9000_0000), WriteProtected);
        // A partial WB range inside a block of WB is still uniform.
        let wb = [0x0606_0606_0606_0606; 11];
        let m = Mtrrs::new(&msrs(WriteBack, wb, &[(0x20_0000, 0x1000, WriteBack)]));
        assert_eq!(m.uniform_type(0, GIB), Some(WriteBack));
        // And WB in WT stays WT.
        let m = Mtrrs::new(&msrs(
            WriteBack,
            [0x0404_0404_0404_0404; 11],
            &[(0, GIB, WriteThrough), (0x20_0000, 0x1000, WriteBack)],
        ));
        assert_eq!(m.uniform_type(0, GIB), Some(WriteThrough));
    }

    #[test]
    fn disabled_and_fixed_disabled() {
        let mut raw = msrs(
            WriteBack,
            seabios_fixed(),
            &[(0xC000_0000, GIB, Uncacheable)],
        );
        // FE clear: the first MiB follows the variable ranges and default.
        raw.def_type &= !DEF_FE;
        let m = Mtrrs::new(&raw);
        assert_eq!(m.type_of(0xA_0000), WriteBack);
        assert_eq!(m.uniform_type(0, GIB), Some(WriteBack));
        // FIX clear in MTRRCAP: the same, whatever FE says.
        let mut raw2 = msrs(WriteBack, seabios_fixed(), &[]);
        raw2.cap &= !CAP_FIX;
        assert_eq!(Mtrrs::new(&raw2).type_of(0xA_0000), WriteBack);
        // E clear: UC everywhere, whatever the rest says.
        raw.def_type &= !DEF_E;
        let m = Mtrrs::new(&raw);
        for pa in [0, 0xA_0000, GIB, 0xC000_0000, u64::MAX] {
            assert_eq!(m.type_of(pa), Uncacheable);
        }
        assert_eq!(m.uniform_type(0, u64::MAX), Some(Uncacheable));
        // All zero (as read on a machine without MTRRs): disabled.
        assert_eq!(Mtrrs::new(&MtrrMsrs::default()).type_of(0), Uncacheable);
        assert_eq!(
            Mtrrs::uniform(WriteBack).uniform_type(0, u64::MAX),
            Some(WriteBack)
        );
    }

    #[test]
    fn fixed_subranges() {
        // Every subrange a different valid type, in a repeating pattern.
        let types = [0u64, 1, 4, 5, 6];
        let mut fixed = [0u64; 11];
        for i in 0..FIXED_COUNT {
            fixed[i / 8] |= types[i % 5] << (8 * (i % 8));
        }
        let m = Mtrrs::new(&msrs(WriteBack, fixed, &[]));
        let mut starts = std::vec::Vec::new();
        starts.extend((0..8).map(|i| i << 16));
        starts.extend((0..16).map(|i| 0x8_0000 + (i << 14)));
        starts.extend((0..64).map(|i| 0xC_0000 + (i << 12)));
        for (i, &s) in starts.iter().enumerate() {
            let want = MemoryType::from_bits(types[i % 5]).unwrap();
            assert_eq!(m.type_of(s), want, "{s:#x}");
            let end = starts.get(i + 1).copied().unwrap_or(ONE_MIB);
            assert_eq!(m.type_of(end - 1), want);
            assert_eq!(m.uniform_type(s, end), Some(want));
            assert_eq!(m.uniform_type(s, end + 1), None);
        }
    }

    #[test]
    fn hostile_values() {
        let mut raw = msrs(WriteBack, [u64::MAX; 11], &[]);
        raw.cap = u64::MAX;
        raw.def_type = u64::MAX; // E, FE, type 0xFF: reserved, so UC.
        raw.max_phys_addr = 255;
        raw.variable = [VariableMtrr {
            base: u64::MAX,
            mask: u64::MAX,
        }; MAX_VARIABLE_MTRRS];
        let m = Mtrrs::new(&raw);
        assert_eq!(m.type_of(0), Uncacheable);
        assert_eq!(m.type_of(u64::MAX), Uncacheable);
        assert_eq!(m.uniform_type(0, u64::MAX), Some(Uncacheable));
        raw.max_phys_addr = 0;
        let m = Mtrrs::new(&raw);
        assert_eq!(m.uniform_type(u64::MAX - 1, u64::MAX), Some(Uncacheable));
        // Reserved encodings 2, 3, 7 in a range read as UC.
        for ty in [2, 3, 7, 0x46] {
            let mut raw = msrs(WriteBack, [0; 11], &[]);
            raw.variable[0] = VariableMtrr {
                base: 0x4000_0000 | ty,
                mask: mask(GIB, 40),
            };
            let m = Mtrrs::new(&raw);
            assert_eq!(m.type_of(0x4000_0000), Uncacheable);
            assert_eq!(m.type_of(0x8000_0000), WriteBack);
        }
        // A range with V clear, or beyond VCNT, does nothing.
        let mut raw = msrs(WriteBack, [0; 11], &[(0, GIB, Uncacheable)]);
        raw.variable[0].mask &= !MASK_VALID;
        assert_eq!(Mtrrs::new(&raw).type_of(0x1000_0000), WriteBack);
        let mut raw = msrs(WriteBack, [0; 11], &[(0, GIB, Uncacheable)]);
        raw.cap &= !0xFF;
        assert_eq!(Mtrrs::new(&raw).type_of(0x1000_0000), WriteBack);
    }

    #[test]
    fn non_contiguous_masks() {
        // Matches every other 4 KiB page: nothing above 4 KiB is uniform.
        // (Fixed ranges off, so the first MiB follows the same rule.)
        let mut raw = msrs(WriteBack, [0; 11], &[]);
        raw.def_type &= !DEF_FE;
        raw.variable[0] = VariableMtrr {
            base: 0x1000 | Uncacheable.bits(),
            mask: 0x1000 | MASK_VALID,
        };
        let m = Mtrrs::new(&raw);
        assert_eq!(m.type_of(0x1000), Uncacheable);
        assert_eq!(m.type_of(0x2000), WriteBack);
        assert_eq!(m.uniform_type(0x2000, 0x3000), Some(WriteBack));
        assert_eq!(m.uniform_type(0x2000, 0x4000), None);
        assert_eq!(m.uniform_type(0, 1 << 40), None);
        // Two of them covering complementary pages with the same type: a
        // uniform block the fast path cannot see. Exact up to 2 MiB...
        raw.variable[1] = VariableMtrr {
            base: Uncacheable.bits(),
            mask: 0x1000 | MASK_VALID,
        };
        let m = Mtrrs::new(&raw);
        assert_eq!(m.uniform_type(0, 2 << 20), Some(Uncacheable));
        // ... and conservative beyond.
        assert_eq!(m.uniform_type(0, GIB), None);
        assert_eq!(m.type_of(0x7654_3000), Uncacheable);
    }

    #[test]
    fn read_touches_only_existing_msrs() {
        let mut seen = std::vec::Vec::new();
        let raw = MtrrMsrs::read(
            |msr| {
                seen.push(msr);
                match msr {
                    IA32_MTRRCAP => 2 | CAP_FIX,
                    IA32_MTRR_DEF_TYPE => DEF_E | 6,
                    m => u64::from(m),
                }
            },
            39,
        );
        let mut want = std::vec![IA32_MTRRCAP, IA32_MTRR_DEF_TYPE];
        want.extend(FIXED_MTRR_MSRS);
        want.extend([0x200, 0x201, 0x202, 0x203]);
        assert_eq!(seen, want);
        assert_eq!(raw.fixed[10], 0x26F);
        assert_eq!(
            raw.variable[1],
            VariableMtrr {
                base: 0x202,
                mask: 0x203
            }
        );
        assert_eq!(raw.variable[2], VariableMtrr::default());
        assert_eq!(raw.max_phys_addr, 39);
        // No FIX, VCNT 255: no fixed ranges, 16 pairs.
        let mut n = 0;
        let raw = MtrrMsrs::read(
            |msr| {
                n += 1;
                assert!(!FIXED_MTRR_MSRS.contains(&msr));
                if msr == IA32_MTRRCAP {
                    0xFF
                } else {
                    1
                }
            },
            36,
        );
        assert_eq!(n, 2 + 2 * MAX_VARIABLE_MTRRS);
        assert_eq!(raw.fixed, [0; 11]);
    }

    /// The SDM's rules for one address, written out plainly.
    fn reference(raw: &MtrrMsrs, pa: u64) -> MemoryType {
        if raw.def_type & DEF_E == 0 {
            return Uncacheable;
        }
        if pa < ONE_MIB && raw.def_type & DEF_FE != 0 && raw.cap & CAP_FIX != 0 {
            let (msr, shift, size) = if pa < 0x8_0000 {
                (0, 0, 1 << 16)
            } else if pa < 0xC_0000 {
                (1, 0x8_0000, 1 << 14)
            } else {
                (3, 0xC_0000, 1 << 12)
            };
            let sub = (pa - shift) / size;
            let reg = raw.fixed[(msr + sub / 8) as usize];
            return MemoryType::from_bits(reg >> (8 * (sub % 8))).unwrap_or(Uncacheable);
        }
        let width = raw.max_phys_addr.clamp(12, 52);
        let phys = ((1u64 << width) - 1) & !0xFFF;
        let mut types = std::vec::Vec::new();
        for pair in raw.variable.iter().take((raw.cap & 0xFF) as usize) {
            if pair.mask & MASK_VALID != 0
                && (pa & pair.mask & phys) == (pair.base & pair.mask & phys)
            {
                types.push(MemoryType::from_bits(pair.base).unwrap_or(Uncacheable));
            }
        }
        if types.is_empty() {
            return MemoryType::from_bits(raw.def_type).unwrap_or(Uncacheable);
        }
        if types.contains(&Uncacheable) {
            return Uncacheable;
        }
        if types.iter().all(|&t| t == types[0]) {
            return types[0];
        }
        if types.iter().all(|&t| t == WriteThrough || t == WriteBack) {
            return WriteThrough;
        }
        Uncacheable
    }

    fn any_type() -> impl Strategy<Value = u64> {
        // Mostly valid encodings, sometimes a reserved one.
        prop_oneof![
            8 => prop::sample::select(std::vec![0u64, 1, 4, 5, 6]),
            1 => any::<u8>().prop_map(u64::from),
        ]
    }

    /// A variable pair: usually a power-of-two range in the low 64 GiB,
    /// sometimes raw hostile bits.
    fn any_pair() -> impl Strategy<Value = VariableMtrr> {
        prop_oneof![
            4 => (12u32..36, 0u64..(1 << 24), any_type(), any::<bool>()).prop_map(
                |(log, slot, ty, valid)| {
                    let size = 1u64 << log;
                    let base = (slot << log) & ((1 << 36) - 1);
                    VariableMtrr {
                        base: base | ty,
                        mask: (((1u64 << 40) - 1) & !(size - 1)) | if valid { MASK_VALID } else { 0 },
                    }
                }
            ),
            1 => (any::<u64>(), any::<u64>()).prop_map(|(base, mask)| VariableMtrr { base, mask }),
        ]
    }

    prop_compose! {
        /// Any MTRR values, hostile ones included.
        pub(crate) fn any_msrs()(
            cap in prop_oneof![Just(8 | CAP_FIX), any::<u64>()],
            def in any_type(),
            flags in prop_oneof![3 => Just(DEF_E | DEF_FE), 1 => Just(DEF_E), 1 => any::<u64>()],
            fixed in prop::array::uniform11(
                prop_oneof![Just(0x0606_0606_0606_0606u64), Just(0), any::<u64>()]),
            pairs in prop::collection::vec(any_pair(), 0..=MAX_VARIABLE_MTRRS),
            width in prop_oneof![Just(40u8), any::<u8>()],
        ) -> MtrrMsrs {
            let mut variable = [VariableMtrr::default(); MAX_VARIABLE_MTRRS];
            variable[..pairs.len()].copy_from_slice(&pairs);
            MtrrMsrs {
                cap,
                def_type: (flags & !0xFF) | def,
                fixed,
                variable,
                max_phys_addr: width,
            }
        }
    }

    prop_compose! {
        /// MTRRs as firmware writes them: valid types, up to ten
        /// power-of-two ranges below 64 GiB (masks of contiguous ones).
        fn firmware_msrs()(
            def in prop::sample::select(std::vec![0u64, 1, 4, 5, 6]),
            fixed_enabled in any::<bool>(),
            fixed in prop::array::uniform11(prop::sample::select(std::vec![
                0x0606_0606_0606_0606u64, 0, 0x0000_0606_0404_0101])),
            pairs in prop::collection::vec(
                (12u32..36, 0u64..(1 << 24), prop::sample::select(std::vec![0u64, 1, 4, 5, 6])),
                0..=10),
        ) -> MtrrMsrs {
            let mut raw = msrs(MemoryType::decode(def), fixed, &[]);
            raw.cap = 10 | CAP_FIX;
            if !fixed_enabled {
                raw.def_type &= !DEF_FE;
            }
            for (pair, (log, slot, ty)) in raw.variable.iter_mut().zip(pairs) {
                let size = 1u64 << log;
                pair.base = ((slot << log) & ((1 << 36) - 1)) | ty;
                pair.mask = mask(size, 40);
            }
            raw
        }
    }

    proptest! {
        /// With contiguous masks the type only changes at a range's start
        /// or end or a fixed subrange's boundary, so the reference for
        /// "uniform over [start, end)" is the type at `start` and at every
        /// such point inside: exact, even over GiBs (no budget cut).
        #[test]
        fn uniform_type_is_exact_for_firmware_layouts(
            raw in firmware_msrs(),
            start in prop_oneof![0u64..(4 << 20), 0u64..(1 << 37),
                (0u64..64).prop_map(|g| g * GIB)],
            len in prop_oneof![1u64..(8 << 20), 1u64..(1 << 36),
                (1u64..4).prop_map(|g| g * GIB), (1u64..64).prop_map(|m| m << 21)],
        ) {
            let m = Mtrrs::new(&raw);
            let end = start + len;
            let mut cuts: std::vec::Vec<u64> = (0..8).map(|i| i << 16)
                .chain((0..16).map(|i| 0x8_0000 + (i << 14)))
                .chain((0..=64).map(|i| 0xC_0000 + (i << 12)))
                .collect();
            for v in raw.variable.iter().filter(|v| v.mask & MASK_VALID != 0) {
                let size = (!(v.mask | 0xFFF) & ((1 << 40) - 1)) + 0x1000;
                cuts.extend([v.base & !0xFFF, (v.base & !0xFFF) + size]);
            }
            let first = reference(&raw, start);
            let same = cuts
                .iter()
                .filter(|&&c| start < c && c < end)
                .all(|&c| reference(&raw, c) == first);
            prop_assert_eq!(m.uniform_type(start, end), same.then_some(first));
        }

        #[test]
        fn type_of_follows_the_sdm(raw in any_msrs(), pas in prop::collection::vec(
            prop_oneof![0u64..ONE_MIB, 0u64..(1 << 37), any::<u64>()], 32)) {
            let m = Mtrrs::new(&raw);
            // Random addresses, and each range's first and last page.
            let edges = raw.variable.iter().flat_map(|v| {
                let size = (!(v.mask | 0xFFF) & ((1 << 40) - 1)) + 0x1000;
                [v.base & !0xFFF, (v.base & !0xFFF).wrapping_add(size - 1)]
            });
            for pa in pas.into_iter().chain(edges) {
                prop_assert_eq!(m.type_of(pa), reference(&raw, pa), "{:#x}", pa);
            }
        }

        /// Exact over small ranges (checked page by page), and never wrong
        /// about a uniform type over large ones.
        #[test]
        fn uniform_type_is_exact_for_small_ranges(
            raw in any_msrs(),
            start in prop_oneof![0u64..(2 << 20), 0u64..(1 << 37), any::<u64>()],
            pages in 1u64..600,
        ) {
            let m = Mtrrs::new(&raw);
            let start = start & !0xFFF;
            let end = start.saturating_add(pages << 12);
            let mut types = (0..pages)
                .filter_map(|i| start.checked_add(i << 12))
                .filter(|&pa| pa < end)
                .map(|pa| reference(&raw, pa));
            let first = types.next();
            let want = first.filter(|&f| types.all(|t| t == f));
            prop_assert_eq!(m.uniform_type(start, end), want);
            // Unaligned ends: same pages, same answer.
            if end > start + 1 {
                prop_assert_eq!(m.uniform_type(start + 1, end - 1), want);
            }
        }

        #[test]
        fn uniform_type_is_never_wrong(
            raw in any_msrs(),
            start in prop_oneof![0u64..(1 << 36), any::<u64>()],
            len in prop_oneof![1u64..(1 << 36), any::<u64>()],
            probes in prop::collection::vec(any::<u64>(), 16),
        ) {
            let m = Mtrrs::new(&raw);
            let end = start.saturating_add(len);
            if let Some(t) = m.uniform_type(start, end) {
                let span = end - start;
                for p in probes.iter().map(|p| start + p % span).chain([start, end - 1]) {
                    prop_assert_eq!(reference(&raw, p), t, "{:#x}", p);
                }
            }
        }
    }
}

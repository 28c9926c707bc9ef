//! The local APIC's interrupt command register, decoded.
//!
//! In the pass-through layout thinvisor starts the application processors
//! itself, so it must see the INIT and STARTUP IPIs the guest sends: on
//! SVM the xAPIC page is write-protected in the nested page tables (the
//! write is then emulated, see `crate::emulate`), on x2APIC the ICR is an
//! MSR write. Either way the value lands here, is decoded into an [`Icr`],
//! and the caller decides whether to forward it to the real APIC or start
//! a vCPU instead.
//!
//! Pure decoding: no hardware access, nothing here can fail or panic on
//! any value.
//!
//! References: Intel SDM vol. 3A, 11.6.1 "Interrupt Command Register
//! (ICR)" (figure 11-12) and 11.12.9 "ICR Operation in x2APIC Mode"; AMD
//! APM vol. 2, 16.5 "Interprocessor Interrupts".

/// Offset of the ICR's low half in the xAPIC page: writing it sends the
/// IPI (SDM vol. 3A, table 11-1).
pub const XAPIC_ICR_LOW: u64 = 0x300;
/// Offset of the ICR's high half (the destination) in the xAPIC page:
/// writing it sends nothing.
pub const XAPIC_ICR_HIGH: u64 = 0x310;
/// Offset of the logical destination register (SDM vol. 3A, table 11-1).
pub const XAPIC_LDR: u64 = 0xD0;
/// Offset of the destination format register.
pub const XAPIC_DFR: u64 = 0xE0;
/// The x2APIC ICR MSR: one 64-bit write sends the IPI (SDM vol. 3A,
/// 11.12.9).
pub const X2APIC_ICR_MSR: u32 = 0x830;

/// Bits of the x2APIC ICR's low dword that are reserved (SDM vol. 3A,
/// 11.12.9: bit 12, delivery status, is gone in x2APIC mode; 13, 16-17 and
/// 20-31 are reserved as in the xAPIC). WRMSR with any of them set raises
/// #GP(0), so thinvisor must not make that write itself (it would fault in
/// the host).
pub const X2APIC_ICR_RESERVED: u64 = 0xFFF3_3000;
/// The local APIC's default physical base (IA32_APIC_BASE after reset).
pub const DEFAULT_APIC_BASE: u64 = 0xFEE0_0000;

/// How the IPI is delivered (ICR bits 10:8).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DeliveryMode {
    /// 000: the vector to the destinations.
    Fixed,
    /// 001: the vector to the lowest-priority processor among them.
    LowestPriority,
    /// 010: an SMI (vector must be 0).
    Smi,
    /// 100: an NMI (vector ignored).
    Nmi,
    /// 101 with level = assert (or edge-triggered): INIT, the first step
    /// of starting an application processor.
    Init,
    /// 101 with level = de-assert and trigger = level: the "INIT level
    /// de-assert" synchronisation message. Pentium 4 and later processors
    /// ignore it (SDM 11.6.1) but Linux still sends it after the INIT
    /// (`0x0000_8500`), so a VMM starting processors must ignore it too.
    InitDeassert,
    /// 110: STARTUP (SIPI): start at real-mode address `vector << 12`.
    Startup,
    /// 011 or 111: reserved encodings (the raw 3 bits).
    Reserved(u8),
}

/// How the destination field is interpreted (ICR bit 11).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DestinationMode {
    /// The destination is an APIC ID.
    Physical,
    /// The destination is matched against each APIC's logical destination
    /// register (and, on xAPIC, its destination format register).
    Logical,
}

/// Destination shorthand (ICR bits 19:18): when not `None`, the
/// destination field is ignored.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Shorthand {
    /// 00: use the destination field.
    None,
    /// 01: the sending processor only.
    ToSelf,
    /// 10: every processor, the sender included.
    AllIncludingSelf,
    /// 11: every processor but the sender (how Linux broadcasts INIT and
    /// SIPI when it boots all processors at once).
    AllExcludingSelf,
}

/// Which flavour of APIC the value came from: it decides where the
/// destination field is and which ID means "broadcast".
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ApicKind {
    /// Memory-mapped xAPIC: 8-bit destination in ICR bits 63:56 (the high
    /// register's bits 31:24), broadcast ID 0xFF.
    XApic,
    /// x2APIC: 32-bit destination in ICR bits 63:32, broadcast ID
    /// 0xFFFF_FFFF.
    X2Apic,
}

/// A receiver's xAPIC logical destination: what the guest wrote to its
/// LDR (offset 0xD0) and DFR (offset 0xE0).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LogicalId {
    pub ldr: u32,
    pub dfr: u32,
}

impl LogicalId {
    /// After reset: logical ID 0, flat model (SDM vol. 3A, 11.4.7.1).
    pub const RESET: Self = Self {
        ldr: 0,
        dfr: u32::MAX,
    };
}

/// A decoded interrupt command, as the guest wrote it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Icr {
    /// The 64-bit value (xAPIC: high register in bits 63:32).
    pub raw: u64,
    /// Where it came from.
    pub kind: ApicKind,
}

impl Icr {
    /// The ICR as an xAPIC sends it: the guest's write of `low` to offset
    /// 0x300, with `high` the value at 0x310 at that moment (read it from
    /// the APIC or remember the guest's last write there).
    pub const fn xapic(low: u32, high: u32) -> Self {
        Self {
            raw: ((high as u64) << 32) | low as u64,
            kind: ApicKind::XApic,
        }
    }

    /// The ICR as an x2APIC sends it: one WRMSR of `value` to MSR 0x830.
    pub const fn x2apic(value: u64) -> Self {
        Self {
            raw: value,
            kind: ApicKind::X2Apic,
        }
    }

    /// Bits 7:0: the vector (for STARTUP, the page number of the start
    /// address: the processor starts at `vector << 12` in real mode).
    pub const fn vector(&self) -> u8 {
        self.raw as u8
    }

    /// Bits 10:8, with bit 14 (level) and bit 15 (trigger) telling INIT
    /// from INIT level de-assert.
    pub const fn delivery_mode(&self) -> DeliveryMode {
        match (self.raw >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 if !self.level_assert() && self.level_triggered() => DeliveryMode::InitDeassert,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::Startup,
            other => DeliveryMode::Reserved(other as u8),
        }
    }

    /// Bit 11.
    pub const fn destination_mode(&self) -> DestinationMode {
        if self.raw & (1 << 11) != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        }
    }

    /// Bit 14: level assert (1) or de-assert (0).
    pub const fn level_assert(&self) -> bool {
        self.raw & (1 << 14) != 0
    }

    /// Bit 15: level-triggered (1) or edge-triggered (0).
    pub const fn level_triggered(&self) -> bool {
        self.raw & (1 << 15) != 0
    }

    /// Bits 19:18.
    pub const fn shorthand(&self) -> Shorthand {
        match (self.raw >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::ToSelf,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        }
    }

    /// The destination field: bits 63:56 on xAPIC, 63:32 on x2APIC.
    pub const fn destination(&self) -> u32 {
        match self.kind {
            ApicKind::XApic => (self.raw >> 56) as u32,
            ApicKind::X2Apic => (self.raw >> 32) as u32,
        }
    }

    /// The destination ID meaning "every processor" in physical mode.
    pub const fn broadcast_id(&self) -> u32 {
        match self.kind {
            ApicKind::XApic => 0xFF,
            ApicKind::X2Apic => u32::MAX,
        }
    }

    /// Whether the processor with APIC ID `apic_id` receives this IPI when
    /// the processor with APIC ID `self_id` sends it: the shorthand first,
    /// then, in physical mode, the destination field (the broadcast ID
    /// reaches everyone, the sender included, SDM 11.6.2.1).
    ///
    /// Logical-mode destinations need the receivers' logical destination
    /// registers, which this neutral helper does not know: they give
    /// `false` unless a shorthand applies, and the caller must resolve
    /// them itself (or forward such IPIs to the real APIC).
    pub const fn targets(&self, apic_id: u32, self_id: u32) -> bool {
        match self.shorthand() {
            Shorthand::ToSelf => apic_id == self_id,
            Shorthand::AllIncludingSelf => true,
            Shorthand::AllExcludingSelf => apic_id != self_id,
            Shorthand::None => match self.destination_mode() {
                DestinationMode::Physical => {
                    let dest = self.destination();
                    dest == self.broadcast_id() || dest == apic_id
                }
                DestinationMode::Logical => false,
            },
        }
    }

    /// [`targets`](Self::targets), with logical destinations resolved
    /// against the receiver's logical ID: `logical` is its xAPIC logical
    /// destination and destination format registers as the guest last
    /// wrote them (LDR bits 31:24, DFR model bits 31:28), ignored on
    /// x2APIC, where the logical ID follows from the APIC ID (SDM vol. 3A,
    /// 11.6.2.2 flat and cluster models; 11.12.10 x2APIC logical IDs).
    pub const fn reaches(&self, apic_id: u32, self_id: u32, logical: LogicalId) -> bool {
        if !matches!(self.shorthand(), Shorthand::None)
            || matches!(self.destination_mode(), DestinationMode::Physical)
        {
            return self.targets(apic_id, self_id);
        }
        let dest = self.destination();
        match self.kind {
            ApicKind::X2Apic => {
                // Cluster in bits 31:16, one bit per member in 15:0.
                let cluster = apic_id >> 4;
                let member = 1u32 << (apic_id & 0xF);
                dest == u32::MAX || (dest >> 16 == cluster && dest & member != 0)
            }
            ApicKind::XApic => {
                let id = logical.ldr >> 24;
                if dest == 0xFF {
                    true
                } else if logical.dfr >> 28 == 0xF {
                    // Flat: one bit per processor.
                    id & dest != 0
                } else {
                    // Cluster: the high nibble names the cluster, the low
                    // one its members.
                    id >> 4 == dest >> 4 && id & dest & 0xF != 0
                }
            }
        }
    }

    /// Whether this is one of the IPIs that start a processor (INIT,
    /// STARTUP) rather than an interrupt the real APIC should deliver.
    pub const fn is_startup_sequence(&self) -> bool {
        matches!(
            self.delivery_mode(),
            DeliveryMode::Init | DeliveryMode::InitDeassert | DeliveryMode::Startup
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logical_destinations() {
        let flat = |id: u32| LogicalId {
            ldr: id << 24,
            dfr: u32::MAX,
        };
        let cluster = |id: u32| LogicalId {
            ldr: id << 24,
            dfr: 0x0FFF_FFFF,
        };
        // xAPIC flat: INIT to logical 0b0110.
        let icr = Icr::xapic(0x4D00, 0x06 << 24);
        assert!(!icr.targets(1, 0), "logical needs the receiver's LDR");
        assert!(icr.reaches(1, 0, flat(0x02)));
        assert!(icr.reaches(2, 0, flat(0x04)));
        assert!(!icr.reaches(3, 0, flat(0x08)));
        assert!(!icr.reaches(3, 0, LogicalId::RESET));
        // xAPIC cluster: cluster 2, members 0b0011.
        let icr = Icr::xapic(0x4D00, 0x23 << 24);
        assert!(icr.reaches(5, 0, cluster(0x21)));
        assert!(icr.reaches(5, 0, cluster(0x22)));
        assert!(!icr.reaches(5, 0, cluster(0x24)));
        assert!(!icr.reaches(5, 0, cluster(0x11)));
        // Broadcast reaches everyone, in either model.
        let icr = Icr::xapic(0x4D00, 0xFF << 24);
        assert!(icr.reaches(9, 0, LogicalId::RESET));
        // x2APIC: cluster 0, members 1 and 2 (APIC IDs 1 and 2); cluster 1
        // member 0 is APIC ID 16.
        let icr = Icr::x2apic(0x4D00 | (0x0000_0006 << 32));
        assert!(icr.reaches(1, 0, LogicalId::RESET));
        assert!(icr.reaches(2, 0, LogicalId::RESET));
        assert!(!icr.reaches(3, 0, LogicalId::RESET));
        assert!(!icr.reaches(17, 0, LogicalId::RESET));
        let icr = Icr::x2apic(0x4D00 | (0x0001_0001 << 32));
        assert!(icr.reaches(16, 0, LogicalId::RESET));
        assert!(!icr.reaches(0, 0, LogicalId::RESET));
        // Physical and shorthands are as `targets` says, whatever the LDR.
        let icr = Icr::xapic(0x000C_4500, 0);
        assert!(icr.reaches(1, 0, flat(0)));
        assert!(!icr.reaches(0, 0, flat(0xFF)));
    }

    /// Linux's INIT to all but itself (`APIC_DEST_ALLBUT | APIC_INT_ASSERT
    /// | APIC_DM_INIT`).
    #[test]
    fn linux_broadcast_init() {
        let icr = Icr::xapic(0x000C_4500, 0);
        assert_eq!(icr.delivery_mode(), DeliveryMode::Init);
        assert_eq!(icr.shorthand(), Shorthand::AllExcludingSelf);
        assert_eq!(icr.destination_mode(), DestinationMode::Physical);
        assert!(icr.level_assert());
        assert!(!icr.level_triggered());
        assert_eq!(icr.vector(), 0);
        assert!(icr.targets(1, 0));
        assert!(icr.targets(7, 0));
        assert!(!icr.targets(0, 0));
        assert!(icr.is_startup_sequence());
    }

    /// Linux's INIT level de-assert (`APIC_INT_LEVELTRIG | APIC_DM_INIT`),
    /// sent to one processor after the INIT.
    #[test]
    fn linux_init_deassert() {
        let icr = Icr::xapic(0x0000_8500, 3 << 24);
        assert_eq!(icr.delivery_mode(), DeliveryMode::InitDeassert);
        assert_eq!(icr.shorthand(), Shorthand::None);
        assert!(!icr.level_assert());
        assert!(icr.level_triggered());
        assert_eq!(icr.destination(), 3);
        assert!(icr.targets(3, 0));
        assert!(!icr.targets(2, 0));
        // The asserting INIT to one processor (0xC500): INIT, not de-assert.
        let icr = Icr::xapic(0x0000_C500, 3 << 24);
        assert_eq!(icr.delivery_mode(), DeliveryMode::Init);
        // Edge-triggered INIT without the level bit is still INIT.
        assert_eq!(Icr::xapic(0x500, 0).delivery_mode(), DeliveryMode::Init);
    }

    #[test]
    fn linux_sipi_broadcast_and_targeted() {
        for vv in [0x00u8, 0x08, 0x9A, 0xFF] {
            let icr = Icr::xapic(0x000C_4600 | u32::from(vv), 0);
            assert_eq!(icr.delivery_mode(), DeliveryMode::Startup);
            assert_eq!(icr.vector(), vv);
            assert_eq!(icr.shorthand(), Shorthand::AllExcludingSelf);
            assert!(icr.targets(2, 0) && !icr.targets(0, 0));

            // Linux's targeted SIPI: APIC_DM_STARTUP | vector, destination
            // in the high register.
            let icr = Icr::xapic(0x0000_0600 | u32::from(vv), 5 << 24);
            assert_eq!(icr.delivery_mode(), DeliveryMode::Startup);
            assert_eq!(icr.vector(), vv);
            assert_eq!(icr.shorthand(), Shorthand::None);
            assert_eq!(icr.destination(), 5);
            assert!(icr.targets(5, 0));
            assert!(!icr.targets(4, 0));
            assert!(!icr.targets(0, 0));
        }
    }

    #[test]
    fn x2apic_destination_is_32_bits() {
        let icr = Icr::x2apic(0x0000_0123_0000_0608);
        assert_eq!(icr.kind, ApicKind::X2Apic);
        assert_eq!(icr.delivery_mode(), DeliveryMode::Startup);
        assert_eq!(icr.vector(), 8);
        assert_eq!(icr.destination(), 0x123);
        assert!(icr.targets(0x123, 0));
        assert!(!icr.targets(0x23, 0));
        // 0xFF is an ordinary ID on x2APIC, 0xFFFF_FFFF the broadcast.
        let icr = Icr::x2apic(0x0000_00FF_0000_4500);
        assert!(!icr.targets(1, 0));
        assert!(icr.targets(0xFF, 0));
        let icr = Icr::x2apic(0xFFFF_FFFF_0000_4500);
        assert!(icr.targets(1, 0) && icr.targets(0, 0));
    }

    #[test]
    fn xapic_destination_is_the_high_byte() {
        // Bits 55:32 of the 64-bit view are reserved and ignored.
        let icr = Icr::xapic(0x4000, 0x02FF_FFFF);
        assert_eq!(icr.destination(), 2);
        assert_eq!(icr.delivery_mode(), DeliveryMode::Fixed);
        // Physical broadcast reaches the sender too.
        let icr = Icr::xapic(0x4000 | 0x30, 0xFF00_0000);
        assert!(icr.targets(0, 0) && icr.targets(9, 0));
        assert_eq!(icr.vector(), 0x30);
    }

    #[test]
    fn every_delivery_mode_and_shorthand() {
        let modes = [
            (0, DeliveryMode::Fixed),
            (1, DeliveryMode::LowestPriority),
            (2, DeliveryMode::Smi),
            (3, DeliveryMode::Reserved(3)),
            (4, DeliveryMode::Nmi),
            (5, DeliveryMode::Init),
            (6, DeliveryMode::Startup),
            (7, DeliveryMode::Reserved(7)),
        ];
        for (bits, mode) in modes {
            assert_eq!(Icr::xapic(0x4000 | (bits << 8), 0).delivery_mode(), mode);
        }
        assert!(!Icr::xapic(0x4400, 0).is_startup_sequence());
        let shorthands = [
            Shorthand::None,
            Shorthand::ToSelf,
            Shorthand::AllIncludingSelf,
            Shorthand::AllExcludingSelf,
        ];
        for (bits, sh) in shorthands.into_iter().enumerate() {
            assert_eq!(Icr::xapic((bits as u32) << 18, 0).shorthand(), sh);
        }
        let to_self = Icr::xapic(1 << 18, 0);
        assert!(to_self.targets(4, 4) && !to_self.targets(0, 4));
        let all = Icr::xapic(2 << 18, 0);
        assert!(all.targets(4, 4) && all.targets(0, 4));
    }

    #[test]
    fn logical_destinations_are_left_to_the_caller() {
        let icr = Icr::xapic(0x0800 | 0x4000 | 0x40, 0x0100_0000);
        assert_eq!(icr.destination_mode(), DestinationMode::Logical);
        assert!(!icr.targets(1, 0));
        assert!(!icr.targets(0, 0));
        // ... unless a shorthand makes the field irrelevant.
        let icr = Icr::xapic(0x0800 | (3 << 18), 0);
        assert!(icr.targets(1, 0));
    }

    proptest::proptest! {
        /// Any value decodes, and the accessors agree with the raw bits.
        #[test]
        fn any_value_decodes(raw in proptest::prelude::any::<u64>(), id in 0u32..300, me in 0u32..300) {
            for icr in [Icr::x2apic(raw), Icr::xapic(raw as u32, (raw >> 32) as u32)] {
                proptest::prop_assert_eq!(icr.raw, raw);
                proptest::prop_assert_eq!(u64::from(icr.vector()), raw & 0xFF);
                let _ = icr.delivery_mode();
                let _ = icr.targets(id, me);
                if icr.shorthand() == Shorthand::AllExcludingSelf {
                    proptest::prop_assert!(!icr.targets(me, me));
                }
            }
        }
    }
}

//! The memory map a pass-through guest is given: the firmware's map with
//! thinvisor's own memory hidden.
//!
//! In the pass-through layout guest-physical addresses are host-physical
//! addresses, so the only thing that keeps the guest out of thinvisor's
//! memory (besides the nested page tables, which fault on it) is that its OS
//! never believes that memory is RAM. [`GuestMap::new`] turns the boot
//! loader's map (overlapping, unsorted, possibly hostile entries) and the
//! list of hidden ranges into
//!
//! - an E820 table (ACPI Specification 6.5, section 15 "System Address Map
//!   Interfaces"; types 1 usable, 2 reserved, 3 ACPI reclaimable, 4 ACPI
//!   NVS, 5 unusable), sorted and non-overlapping, of at most
//!   [`MAX_E820_ENTRIES`] entries, the capacity of `boot_params.e820_table`
//!   (Documentation/arch/x86/zero-page.rst), with every hidden byte
//!   reserved (type 2);
//! - the usable RAM (the type 1 entries of that table): where the loaders
//!   may place the guest's kernel and boot information.
//!
//! Overlapping firmware entries are resolved byte by byte in favour of the
//! most restrictive kind: usable < ACPI reclaimable < reserved < ACPI NVS <
//! unusable. This is Linux's `e820__update_table()` rule (the higher type
//! wins) except that reserved beats ACPI reclaimable: an OS reclaims type 3
//! memory as RAM once it has read the tables, so a byte that any entry calls
//! reserved must not be handed out that way.

use crate::{MemKind, MemRegion, PAGE_SIZE};
use core::fmt;

/// Entries the table holds: `boot_params.e820_table` has 128 slots
/// (`E820_MAX_ENTRIES_ZEROPAGE`).
pub const MAX_E820_ENTRIES: usize = 128;
/// Firmware map entries accepted (the sweep is quadratic in the number of
/// inputs, so their number is bounded; [`crate::BootInfo`] keeps 128).
pub const MAX_MAP_INPUT: usize = 512;
/// Hidden ranges accepted.
pub const MAX_HIDDEN: usize = 64;
/// Ranges the loaders keep clear of (the boot modules they read from).
pub const MAX_AVOID: usize = 16;

/// One entry of the guest's E820 table: `size` bytes from `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First physical address.
    pub addr: u64,
    /// Length in bytes (never zero).
    pub size: u64,
    /// What the range is; [`MemKind::e820_type`] gives the type number.
    pub kind: MemKind,
}

impl E820Entry {
    /// One past the last byte (saturating: an entry may run to the top of
    /// the address space, whose last byte is then left out).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }

    /// The E820 type number (1 usable, 2 reserved, 3 ACPI, 4 NVS, 5 bad).
    pub fn type_number(&self) -> u32 {
        self.kind.e820_type()
    }
}

/// Why the guest's memory map could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Error {
    /// More firmware map entries than [`MAX_MAP_INPUT`].
    TooManyRegions(usize),
    /// More hidden ranges than [`MAX_HIDDEN`].
    TooManyHidden(usize),
    /// A hidden range ends before it starts.
    HiddenBackwards { start: u64, end: u64 },
    /// A hidden range is not 4 KiB granular (hiding is exact, so a partial
    /// page would leave part of thinvisor's page usable or hide more than
    /// asked).
    HiddenMisaligned { start: u64, end: u64 },
    /// Even with every usable entry that breaks a run dropped, the map
    /// needs more than [`MAX_E820_ENTRIES`] entries.
    TooManyEntries,
}

impl core::error::Error for E820Error {}

impl fmt::Display for E820Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            E820Error::TooManyRegions(n) => write!(
                f,
                "memory map has {n} entries, at most {MAX_MAP_INPUT} are supported"
            ),
            E820Error::TooManyHidden(n) => write!(
                f,
                "{n} ranges to hide from the guest, at most {MAX_HIDDEN} are supported"
            ),
            E820Error::HiddenBackwards { start, end } => write!(
                f,
                "range to hide from the guest ends ({end:#x}) before it starts ({start:#x})"
            ),
            E820Error::HiddenMisaligned { start, end } => write!(
                f,
                "range to hide from the guest {start:#x}..{end:#x} is not 4 KiB aligned"
            ),
            E820Error::TooManyEntries => write!(
                f,
                "the guest's memory map needs more than {MAX_E820_ENTRIES} non-RAM entries"
            ),
        }
    }
}

/// Why a range is not usable RAM for the guest (for error messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// It is thinvisor's own memory (a hidden range).
    Hypervisor,
    /// The firmware does not call it usable RAM (reserved, ACPI, a hole...).
    NotRam,
    /// It holds a boot module that is still being read (the image being
    /// loaded, an initrd): usable by the guest later, not as a destination.
    Source,
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unusable::Hypervisor => "thinvisor's own memory",
            Unusable::NotRam => "not usable RAM in the firmware's memory map",
            Unusable::Source => "a boot module that is still needed",
        })
    }
}

/// The guest's view of physical memory in the pass-through layout.
#[derive(Clone)]
pub struct GuestMap {
    entries: [E820Entry; MAX_E820_ENTRIES],
    len: usize,
    usable: [(u64, u64); MAX_E820_ENTRIES],
    usable_len: usize,
    hidden: [(u64, u64); MAX_HIDDEN],
    hidden_len: usize,
    dropped: u64,
}

impl fmt::Debug for GuestMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestMap")
            .field("e820", &self.e820())
            .field("hidden", &self.hidden())
            .field("dropped", &self.dropped)
            .finish()
    }
}

const EMPTY_ENTRY: E820Entry = E820Entry {
    addr: 0,
    size: 0,
    kind: MemKind::Reserved,
};

/// Strength of a kind when entries overlap (see the module documentation).
fn rank(kind: MemKind) -> u8 {
    match kind {
        MemKind::Available => 0,
        MemKind::AcpiReclaimable => 1,
        MemKind::Reserved => 2,
        MemKind::AcpiNvs => 3,
        MemKind::Bad => 4,
    }
}

impl GuestMap {
    /// Builds the guest's map from the firmware's `map` with every
    /// `[start, end)` of `hidden` (4 KiB aligned) reserved.
    ///
    /// Hidden bytes are reserved whatever the firmware says about them
    /// (even ACPI NVS, which an OS writes on resume). When more than
    /// [`MAX_E820_ENTRIES`] entries would result, the smallest usable
    /// entries are left out (the guest loses that RAM; leaving out anything
    /// else could let it use memory that is not RAM);
    /// [`dropped_bytes`](Self::dropped_bytes) says how much.
    pub fn new(map: &[MemRegion], hidden: &[(u64, u64)]) -> Result<Self, E820Error> {
        if map.len() > MAX_MAP_INPUT {
            return Err(E820Error::TooManyRegions(map.len()));
        }
        if hidden.len() > MAX_HIDDEN {
            return Err(E820Error::TooManyHidden(hidden.len()));
        }
        let mut this = GuestMap {
            entries: [EMPTY_ENTRY; MAX_E820_ENTRIES],
            len: 0,
            usable: [(0, 0); MAX_E820_ENTRIES],
            usable_len: 0,
            hidden: [(0, 0); MAX_HIDDEN],
            hidden_len: 0,
            dropped: 0,
        };
        for &(start, end) in hidden {
            if end < start {
                return Err(E820Error::HiddenBackwards { start, end });
            }
            if start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 {
                return Err(E820Error::HiddenMisaligned { start, end });
            }
            if start == end {
                continue;
            }
            if let Some(slot) = this.hidden.get_mut(this.hidden_len) {
                *slot = (start, end);
                this.hidden_len += 1;
            }
        }

        let regions = || map.iter().filter(|r| r.len != 0);
        let hidden = this.hidden;
        let hidden = hidden.get(..this.hidden_len).unwrap_or(&[]);
        let points = || {
            regions()
                .flat_map(|r| [r.start, r.end()])
                .chain(hidden.iter().flat_map(|&(s, e)| [s, e]))
        };

        // Sweep the elementary intervals between consecutive boundary
        // points, from the lowest up. Each step advances `cur` to a larger
        // point, so there are at most 2 * (map + hidden) steps.
        let mut cur = points().min();
        let mut run: Option<E820Entry> = None;
        while let Some(at) = cur {
            let Some(next) = points().filter(|&p| p > at).min() else {
                break;
            };
            let kind = if hidden.iter().any(|&(s, e)| s <= at && at < e) {
                Some(MemKind::Reserved)
            } else {
                regions()
                    .filter(|r| r.start <= at && at < r.end())
                    .map(|r| r.kind)
                    .max_by_key(|&k| rank(k))
            };
            match (kind, run.as_mut()) {
                (Some(k), Some(r)) if r.kind == k && r.end() == at => r.size = next - r.addr,
                (kind, _) => {
                    if let Some(r) = run.take() {
                        this.push(r)?;
                    }
                    run = kind.map(|kind| E820Entry {
                        addr: at,
                        size: next - at,
                        kind,
                    });
                }
            }
            cur = Some(next);
        }
        if let Some(r) = run {
            this.push(r)?;
        }

        for e in this.entries.get(..this.len).unwrap_or(&[]) {
            if e.kind == MemKind::Available {
                if let Some(slot) = this.usable.get_mut(this.usable_len) {
                    *slot = (e.addr, e.end());
                    this.usable_len += 1;
                }
            }
        }
        Ok(this)
    }

    /// Appends a maximal run (sorted input: it starts after the last entry).
    fn push(&mut self, entry: E820Entry) -> Result<(), E820Error> {
        if let Some(slot) = self.entries.get_mut(self.len) {
            *slot = entry;
            self.len += 1;
            return Ok(());
        }
        // Full: forget the smallest usable entry (possibly the new one).
        let smallest = self
            .e820()
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == MemKind::Available)
            .min_by_key(|(_, e)| e.size)
            .map(|(i, e)| (i, e.size));
        match smallest {
            _ if entry.kind == MemKind::Available
                && smallest.is_none_or(|(_, size)| entry.size <= size) =>
            {
                self.dropped = self.dropped.saturating_add(entry.size);
                Ok(())
            }
            Some((i, size)) => {
                self.dropped = self.dropped.saturating_add(size);
                self.entries.copy_within(i + 1..self.len, i);
                if let Some(last) = self.entries.last_mut() {
                    *last = entry;
                }
                Ok(())
            }
            None => Err(E820Error::TooManyEntries),
        }
    }

    /// The E820 table: sorted, non-overlapping, no empty entries, adjacent
    /// entries of one kind merged.
    pub fn e820(&self) -> &[E820Entry] {
        self.entries.get(..self.len).unwrap_or(&[])
    }

    /// Usable RAM `[start, end)`, sorted and disjoint, hidden ranges
    /// excluded: where loaders may place things.
    pub fn usable(&self) -> &[(u64, u64)] {
        self.usable.get(..self.usable_len).unwrap_or(&[])
    }

    /// The hidden ranges `[start, end)` (empty ones left out).
    pub fn hidden(&self) -> &[(u64, u64)] {
        self.hidden.get(..self.hidden_len).unwrap_or(&[])
    }

    /// Bytes of usable RAM left out to fit [`MAX_E820_ENTRIES`].
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped
    }

    /// Whether `[addr, addr + size)` lies entirely in usable RAM; otherwise
    /// the first offending address and why (a hidden range is reported in
    /// preference to any other reason, wherever in the range it lies).
    pub fn check_usable(&self, addr: u64, size: u64) -> Result<(), (u64, Unusable)> {
        let Some(end) = addr.checked_add(size) else {
            return Err((addr, Unusable::NotRam));
        };
        if size == 0 {
            return Ok(());
        }
        if let Some(&(s, _)) = self
            .hidden()
            .iter()
            .filter(|&&(s, e)| s < end && addr < e)
            .min_by_key(|&&(s, _)| s)
        {
            return Err((s.max(addr), Unusable::Hypervisor));
        }
        let mut pos = addr;
        for &(s, e) in self.usable() {
            if e <= pos {
                continue;
            }
            if s > pos {
                break;
            }
            pos = e;
            if pos >= end {
                return Ok(());
            }
        }
        Err((pos, Unusable::NotRam))
    }
}

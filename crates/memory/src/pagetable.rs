//! Test support: builds guest page tables into guest-physical memory, so
//! tests can say "map this linear page there" instead of poking entries.
//!
//! Available under `cfg(test)` and the `testing` feature. Levels are
//! numbered like the walk: 1 = PTE, 2 = PDE, 3 = PDPTE, 4 = PML4E,
//! 5 = PML5E.

use crate::{GuestPhysAddr, GuestPhysMemory, PagingMode, PagingRegs, PhysAccessError};

/// Present.
pub const P: u64 = 1 << 0;
/// Read/write.
pub const RW: u64 = 1 << 1;
/// User/supervisor.
pub const US: u64 = 1 << 2;
/// Accessed.
pub const A: u64 = 1 << 5;
/// Dirty.
pub const D: u64 = 1 << 6;
/// Page size (large page at this level).
pub const PS: u64 = 1 << 7;
/// Execute-disable (PAE and long-mode entries only).
pub const NX: u64 = 1 << 63;

/// 4 KiB.
pub const SIZE_4K: u64 = 1 << 12;
/// 2 MiB.
pub const SIZE_2M: u64 = 1 << 21;
/// 4 MiB.
pub const SIZE_4M: u64 = 1 << 22;
/// 1 GiB.
pub const SIZE_1G: u64 = 1 << 30;

/// Why building a table failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// The area given for page-table pages is used up.
    OutOfTables,
    /// A table lies outside guest memory.
    Memory(PhysAccessError),
    /// The page size does not exist in this mode, or an address is not
    /// aligned to it.
    BadPage,
    /// A large page or a missing entry is in the way.
    Conflict,
}

impl From<PhysAccessError> for BuildError {
    fn from(e: PhysAccessError) -> Self {
        Self::Memory(e)
    }
}

/// A page-table tree under construction for one paging mode.
#[derive(Clone, Debug)]
pub struct PageTables {
    mode: PagingMode,
    root: u64,
    next: u64,
    end: u64,
}

impl PageTables {
    /// Starts an empty tree whose table pages come from
    /// `area_start..area_end` (4 KiB aligned) of `mem`.
    pub fn new<M: GuestPhysMemory + ?Sized>(
        mem: &M,
        mode: PagingMode,
        area_start: u64,
        area_end: u64,
    ) -> Result<Self, BuildError> {
        if !area_start.is_multiple_of(SIZE_4K) {
            return Err(BuildError::BadPage);
        }
        let mut t = Self {
            mode,
            root: 0,
            next: area_start,
            end: area_end,
        };
        if mode != PagingMode::Disabled {
            t.root = t.alloc(mem)?;
        }
        Ok(t)
    }

    /// The paging mode.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// Guest-physical address of the root table (what CR3 points at).
    pub fn root(&self) -> GuestPhysAddr {
        GuestPhysAddr(self.root)
    }

    /// Registers selecting this mode with CR3 at the root: CR0.WP on,
    /// CR4.PSE on for 32-bit paging, EFER.NXE on where NX exists.
    pub fn regs(&self) -> PagingRegs {
        let cr0 = PagingRegs::CR0_PE | PagingRegs::CR0_PG | PagingRegs::CR0_WP;
        let long = PagingRegs::EFER_LME | PagingRegs::EFER_LMA | PagingRegs::EFER_NXE;
        let (cr0, cr4, efer) = match self.mode {
            PagingMode::Disabled => (PagingRegs::CR0_PE, 0, 0),
            PagingMode::Bits32 => (cr0, PagingRegs::CR4_PSE, 0),
            PagingMode::Pae => (cr0, PagingRegs::CR4_PAE, PagingRegs::EFER_NXE),
            PagingMode::Level4 => (cr0, PagingRegs::CR4_PAE, long),
            PagingMode::Level5 => (cr0, PagingRegs::CR4_PAE | PagingRegs::CR4_LA57, long),
        };
        PagingRegs {
            cr0,
            cr3: self.root,
            cr4,
            efer,
        }
    }

    /// Number of levels of the walk (0 with paging off).
    pub fn levels(&self) -> u32 {
        match self.mode {
            PagingMode::Disabled => 0,
            PagingMode::Bits32 => 2,
            PagingMode::Pae => 3,
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        }
    }

    fn entry_bytes(&self) -> u64 {
        if self.mode == PagingMode::Bits32 {
            4
        } else {
            8
        }
    }

    fn frame_mask(&self) -> u64 {
        if self.mode == PagingMode::Bits32 {
            0xFFFF_F000
        } else {
            0x000F_FFFF_FFFF_F000
        }
    }

    /// Index of `la` in a table of `level`.
    fn index(&self, la: u64, level: u32) -> u64 {
        match self.mode {
            PagingMode::Bits32 => (la >> (12 + 10 * (level - 1))) & 0x3FF,
            PagingMode::Pae if level == 3 => (la >> 30) & 3,
            _ => (la >> (12 + 9 * (level - 1))) & 0x1FF,
        }
    }

    /// The level at which a page of `size` is a leaf.
    fn leaf_level(&self, size: u64) -> Option<u32> {
        match (self.mode, size) {
            (PagingMode::Disabled, _) => None,
            (_, SIZE_4K) => Some(1),
            (PagingMode::Bits32, SIZE_4M) => Some(2),
            (PagingMode::Pae | PagingMode::Level4 | PagingMode::Level5, SIZE_2M) => Some(2),
            (PagingMode::Level4 | PagingMode::Level5, SIZE_1G) => Some(3),
            _ => None,
        }
    }

    fn alloc<M: GuestPhysMemory + ?Sized>(&mut self, mem: &M) -> Result<u64, BuildError> {
        let page = self.next;
        let next = page.checked_add(SIZE_4K).ok_or(BuildError::OutOfTables)?;
        if next > self.end {
            return Err(BuildError::OutOfTables);
        }
        mem.write_phys(GuestPhysAddr(page), &[0u8; SIZE_4K as usize])?;
        self.next = next;
        Ok(page)
    }

    fn read<M: GuestPhysMemory + ?Sized>(&self, mem: &M, at: u64) -> Result<u64, BuildError> {
        let at = GuestPhysAddr(at);
        Ok(if self.entry_bytes() == 4 {
            u64::from(mem.read_u32_phys(at)?)
        } else {
            mem.read_u64_phys(at)?
        })
    }

    fn write<M: GuestPhysMemory + ?Sized>(
        &self,
        mem: &M,
        at: u64,
        value: u64,
    ) -> Result<(), BuildError> {
        let at = GuestPhysAddr(at);
        if self.entry_bytes() == 4 {
            mem.write_u32_phys(at, value as u32)?;
        } else {
            mem.write_u64_phys(at, value)?;
        }
        Ok(())
    }

    /// Entry flags for a newly created non-leaf entry at `level`: as
    /// permissive as the mode allows (PAE PDPTEs have only P).
    fn table_flags(&self, level: u32) -> u64 {
        if self.mode == PagingMode::Pae && level == 3 {
            P
        } else {
            P | RW | US
        }
    }

    /// Maps the page of `size` at linear `la` to physical `pa` with
    /// `flags` (P is added, and PS for large pages; PSE-36 encoding for
    /// 4 MiB pages above 4 GiB). Missing tables are created permissive.
    pub fn map<M: GuestPhysMemory + ?Sized>(
        &mut self,
        mem: &M,
        la: u64,
        pa: u64,
        size: u64,
        flags: u64,
    ) -> Result<(), BuildError> {
        let leaf = self.leaf_level(size).ok_or(BuildError::BadPage)?;
        if !la.is_multiple_of(size) || !pa.is_multiple_of(size) {
            return Err(BuildError::BadPage);
        }
        let mut table = self.root;
        for level in (leaf + 1..=self.levels()).rev() {
            let at = table + self.index(la, level) * self.entry_bytes();
            let mut e = self.read(mem, at)?;
            if e & P == 0 {
                let new = self.alloc(mem)?;
                e = new | self.table_flags(level);
                self.write(mem, at, e)?;
            } else if e & PS != 0 && level <= 3 && !(self.mode == PagingMode::Pae && level == 3) {
                return Err(BuildError::Conflict);
            }
            table = e & self.frame_mask();
        }
        let mut entry = flags | P;
        if leaf > 1 {
            entry |= PS;
        }
        entry |= if self.mode == PagingMode::Bits32 && leaf == 2 {
            (pa & 0xFFC0_0000) | (((pa >> 32) & 0xFF) << 13)
        } else {
            pa
        };
        let at = table + self.index(la, leaf) * self.entry_bytes();
        self.write(mem, at, entry)
    }

    /// Maps `len` bytes (rounded up to pages) at `la` to `pa` with 4 KiB
    /// pages.
    pub fn map_range<M: GuestPhysMemory + ?Sized>(
        &mut self,
        mem: &M,
        la: u64,
        pa: u64,
        len: u64,
        flags: u64,
    ) -> Result<(), BuildError> {
        let mut off = 0;
        while off < len {
            let (Some(l), Some(p)) = (la.checked_add(off), pa.checked_add(off)) else {
                return Err(BuildError::BadPage);
            };
            self.map(mem, l, p, SIZE_4K, flags)?;
            off += SIZE_4K;
        }
        Ok(())
    }

    /// Guest-physical address of the entry at `level` that the walk for
    /// `la` uses (the levels above must be present).
    pub fn entry_gpa<M: GuestPhysMemory + ?Sized>(
        &self,
        mem: &M,
        la: u64,
        level: u32,
    ) -> Result<GuestPhysAddr, BuildError> {
        if level == 0 || level > self.levels() {
            return Err(BuildError::BadPage);
        }
        let mut table = self.root;
        for l in (level + 1..=self.levels()).rev() {
            let e = self.read(mem, table + self.index(la, l) * self.entry_bytes())?;
            if e & P == 0 {
                return Err(BuildError::Conflict);
            }
            table = e & self.frame_mask();
        }
        Ok(GuestPhysAddr(
            table + self.index(la, level) * self.entry_bytes(),
        ))
    }

    /// The entry at `level` for `la`.
    pub fn read_entry<M: GuestPhysMemory + ?Sized>(
        &self,
        mem: &M,
        la: u64,
        level: u32,
    ) -> Result<u64, BuildError> {
        let at = self.entry_gpa(mem, la, level)?;
        self.read(mem, at.0)
    }

    /// Overwrites the entry at `level` for `la`.
    pub fn write_entry<M: GuestPhysMemory + ?Sized>(
        &self,
        mem: &M,
        la: u64,
        level: u32,
        value: u64,
    ) -> Result<(), BuildError> {
        let at = self.entry_gpa(mem, la, level)?;
        self.write(mem, at.0, value)
    }

    /// Rewrites the entry at `level` for `la` through `f`.
    pub fn update_entry<M: GuestPhysMemory + ?Sized>(
        &self,
        mem: &M,
        la: u64,
        level: u32,
        f: impl FnOnce(u64) -> u64,
    ) -> Result<(), BuildError> {
        let at = self.entry_gpa(mem, la, level)?;
        let old = self.read(mem, at.0)?;
        self.write(mem, at.0, f(old))
    }
}

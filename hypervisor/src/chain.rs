//! `boot=chain`: the machine's BIOS boots the first hard disk inside the
//! guest, with thinvisor hidden (docs/architecture.md, "Chain boot").
//!
//! thinvisor was itself loaded by a BIOS boot loader (QEMU's multiboot
//! option ROM, GRUB), so the BIOS is still in memory, its interrupt vectors
//! and data area intact. Before the guest starts, thinvisor
//!
//! 1. takes a few KiB from the top of conventional memory by lowering the
//!    BIOS data area's base-memory size (the word at 0x413, in KiB), the
//!    way boot-time resident code has always reserved memory;
//! 2. copies a 16-bit stub there: an INT 15h handler, whose header and
//!    E820 table it fills in from the boot loader's memory map with its own
//!    block and the stub's memory reserved (`thinvisor_boot::e820`, laid
//!    out by `thinvisor_vmm::bios`), and a
//!    boot loader of a dozen instructions;
//! 3. points IVT entry 0x15 at the handler (the BIOS's vector is kept in
//!    the header: every other INT 15h function goes there);
//! 4. starts the guest in real mode at the stub's boot loader, which reads
//!    sector 0 of BIOS drive 80h to 0000:7C00 with INT 13h and jumps there
//!    with DL = 80h, as the BIOS's INT 19h would.
//!
//! The boot loader reads the disk itself instead of executing INT 19h:
//! INT 19h boots the BIOS's first boot device, which is whatever booted
//! thinvisor (QEMU's `-kernel` option ROM, Bochs' CD-ROM with GRUB), so it
//! would start thinvisor again inside its own guest.

use core::arch::global_asm;
use core::ptr;

use crate::GuestMemory;
use log::info;
use thinvisor_boot::e820::GuestMap;
use thinvisor_boot::BootInfo;
use thinvisor_vmm::bios::{self, stub, E820Entry, E820Table};
use thinvisor_vmm::{InitialState, StartMode};

use crate::{mem, passthrough, GuestLayout, GuestSetup, PAGE};

/// The BIOS data area's word "memory size in KiB" (segment 40h, offset
/// 13h; RBIL MEMORY.LST, and the value INT 12h returns).
const BDA_BASE_MEMORY: u64 = 0x413;
/// IVT entry 0x15 (offset, then segment).
const IVT_INT15: u64 = 0x15 * 4;
/// Conventional memory ends at 640 KiB (the VGA window follows).
const CONVENTIONAL_END: u64 = 0xA_0000;
/// Below this, a base-memory size is not believable (a boot sector at
/// 0x7C00, its stack below, and the loaders after it need the first
/// 64 KiB at least), and the stub would land in the way.
const CONVENTIONAL_MIN: u64 = 0x1_0000;
/// The BIOS drive number of the first hard disk.
const FIRST_HARD_DISK: u8 = 0x80;

// The 16-bit stub. It runs at offset 0 of its own segment (CS = its
// address / 16), so every reference to its data is a CS-relative offset
// from `thinvisor_chain_stub_start`; the header's layout is
// `thinvisor_vmm::bios::stub`. Assembled into .rodata: it only ever runs
// as the copy in conventional memory.
global_asm!(
    ".pushsection .rodata.thinvisor_chain_stub, \"a\"",
    ".code16",
    ".balign 16",
    ".global thinvisor_chain_stub_start",
    "thinvisor_chain_stub_start:",
    // The header: the BIOS's INT 15h vector, the E820 entry count and
    // table offset, the E801h and 88h answers. Filled in by chain.rs.
    ".skip {header}",
    "",
    // ---- INT 15h handler -------------------------------------------------
    ".global thinvisor_chain_int15",
    "thinvisor_chain_int15:",
    // Pick the three memory functions; AX alone decides, as in SeaBIOS
    // (callers do not all clear EAX's upper half).
    "cmp ax, 0xE820",
    "je 20f",
    "cmp ax, 0xE801",
    "je 30f",
    "cmp ah, 0x88",
    "je 40f",
    // Anything else: the BIOS's own handler, with the registers and the
    // stack (FLAGS, CS, IP of the INT) exactly as the caller left them.
    // `jmp far cs:[OLD_INT15]` (FF /5, CS override), as bytes: the
    // assembler's far-indirect syntax differs between dialects.
    ".byte 0x2E, 0xFF, 0x2E",
    ".word {old_int15}",
    "",
    // E820h (ACPI 6.5, 15.1): EDX = 'SMAP', EBX = continuation value
    // (entry index), ECX = buffer size, ES:DI = buffer. EAX is left alone
    // until every check has passed (an error changes only AH and CF).
    "20:",
    "cmp edx, 0x534D4150",
    "jne 90f",
    "cmp ecx, 20",
    "jb 90f",
    "cmp ebx, dword ptr cs:[{e820_count}]",
    "jae 90f",
    // DS:SI = the entry: table + EBX * 20 (EBX < count <= 128, so BX is
    // the whole index and the product fits 16 bits).
    "push ds",
    "push si",
    "push cs",
    "pop ds",
    "imul si, bx, 20",
    "add si, word ptr [{table_offset}]",
    // Copy its 20 bytes to ES:DI one dword at a time (no string
    // instruction, so the caller's DF does not matter).
    "mov eax, dword ptr [si]",
    "mov dword ptr es:[di], eax",
    "mov eax, dword ptr [si + 4]",
    "mov dword ptr es:[di + 4], eax",
    "mov eax, dword ptr [si + 8]",
    "mov dword ptr es:[di + 8], eax",
    "mov eax, dword ptr [si + 12]",
    "mov dword ptr es:[di + 12], eax",
    "mov eax, dword ptr [si + 16]",
    "mov dword ptr es:[di + 16], eax",
    // A 24-byte buffer gets the ACPI 3.0 extended attributes: bit 0,
    // "enabled". ECX = bytes written.
    "cmp ecx, 24",
    "jb 21f",
    "mov dword ptr es:[di + 20], 1",
    "mov ecx, 24",
    "jmp 22f",
    "21:",
    "mov ecx, 20",
    // EBX = the next entry, or 0 after the last one.
    "22:",
    "inc ebx",
    "cmp ebx, dword ptr [{e820_count}]",
    "jb 23f",
    "xor ebx, ebx",
    "23:",
    "pop si",
    "pop ds",
    "mov eax, 0x534D4150",
    "jmp 80f",
    "",
    // E801h (RBIL INT 15/AX=E801h): AX = CX = KiB between 1 and 16 MiB,
    // BX = DX = 64 KiB blocks above 16 MiB; the upper halves stay.
    "30:",
    "mov ax, word ptr cs:[{e801_ax}]",
    "mov bx, word ptr cs:[{e801_bx}]",
    "mov cx, ax",
    "mov dx, bx",
    "jmp 80f",
    "",
    // AH=88h (RBIL INT 15/AH=88h): AX = KiB of extended memory.
    "40:",
    "mov ax, word ptr cs:[{ah88_ax}]",
    "",
    // Success: clear CF in the FLAGS the INT pushed (SS:[BP + 6] once BP
    // is saved: BP, IP, CS, FLAGS), so IRET returns it with the caller's
    // IF and DF.
    "80:",
    "push bp",
    "mov bp, sp",
    "and byte ptr [bp + 6], 0xFE",
    "pop bp",
    "iret",
    "",
    // Failure: AH = 86h (function not supported), CF set.
    "90:",
    "mov ah, 0x86",
    "push bp",
    "mov bp, sp",
    "or byte ptr [bp + 6], 1",
    "pop bp",
    "iret",
    "",
    // ---- Boot loader: the guest's first instruction -------------------------
    ".global thinvisor_chain_boot",
    "thinvisor_chain_boot:",
    // The state a boot sector expects: DS = ES = SS = 0, a stack below
    // 0x7C00, interrupts on (the BIOS's disk services and timer need them).
    "cli",
    "xor ax, ax",
    "mov ss, ax",
    "mov sp, 0x7C00",
    "mov ds, ax",
    "mov es, ax",
    "sti",
    "cld",
    // Three tries (RBIL: retry after a reset, a disk may need to spin up).
    "mov bp, 3",
    // INT 13h AH=02h: read AL = 1 sector from cylinder 0, head 0, sector 1
    // (LBA 0) of drive DL = 80h to ES:BX = 0000:7C00.
    "50:",
    "mov ax, 0x0201",
    "mov cx, 0x0001",
    "mov dx, 0x0080",
    "mov bx, 0x7C00",
    "int 0x13",
    "jnc 52f",
    // Failed: AH=00h resets the drive, then the next try.
    "xor ax, ax",
    "mov dl, 0x80",
    "int 0x13",
    "dec bp",
    "jnz 50b",
    // `mov si, offset` of the message (BE iw): the assembler takes the
    // difference of two labels only in data.
    ".byte 0xBE",
    ".word .Lchain_msg_read - thinvisor_chain_stub_start",
    "jmp 60f",
    // A boot sector ends in 55h AAh (BIOS Boot Specification 1.01, 6.5.1).
    "52:",
    "cmp word ptr [0x7DFE], 0xAA55",
    "je 55f",
    // `mov si, offset` of the message (BE iw): the assembler takes the
    // difference of two labels only in data.
    ".byte 0xBE",
    ".word .Lchain_msg_signature - thinvisor_chain_stub_start",
    "jmp 60f",
    // Start it as INT 19h does: 0000:7C00, DL = the drive.
    "55:",
    "mov dx, 0x0080",
    "xor ax, ax",
    "xor bx, bx",
    "xor cx, cx",
    "xor si, si",
    "xor di, di",
    "xor bp, bp",
    // `jmp far 0000:7C00` (EA ptr16:16), as bytes like the one above.
    ".byte 0xEA",
    ".word 0x7C00, 0x0000",
    // No boot sector: say why on COM1 (thinvisor's log port, already set
    // up), then INT 18h, the BIOS's "boot failed" (BIOS Boot
    // Specification 1.01, 6.5.2); should that return, stop here.
    "60:",
    "mov al, byte ptr cs:[si]",
    "test al, al",
    "jz 65f",
    "mov dx, 0x3FD",
    "61:",
    "mov ah, al",
    "in al, dx",
    "test al, 0x20",
    "mov al, ah",
    "jz 61b",
    "mov dx, 0x3F8",
    "out dx, al",
    "inc si",
    "jmp 60b",
    "65:",
    "int 0x18",
    "66:",
    "cli",
    "hlt",
    "jmp 66b",
    ".Lchain_msg_read:",
    ".asciz \"thinvisor: chain: INT 13h cannot read sector 0 of BIOS drive 80h\\r\\n\"",
    ".Lchain_msg_signature:",
    ".asciz \"thinvisor: chain: sector 0 of BIOS drive 80h has no 55AA boot signature\\r\\n\"",
    ".global thinvisor_chain_stub_end",
    "thinvisor_chain_stub_end:",
    ".code64",
    ".popsection",
    header = const stub::HEADER_BYTES,
    old_int15 = const stub::OLD_INT15,
    e820_count = const stub::E820_COUNT,
    table_offset = const stub::TABLE_OFFSET,
    e801_ax = const stub::E801_AX,
    e801_bx = const stub::E801_BX,
    ah88_ax = const stub::AH88_AX,
);

extern "C" {
    static thinvisor_chain_stub_start: u8;
    static thinvisor_chain_int15: u8;
    static thinvisor_chain_boot: u8;
    static thinvisor_chain_stub_end: u8;
}

/// The stub's bytes (header room and code) and the offsets of its two
/// entry points.
fn stub_code() -> (&'static [u8], u16, u16) {
    // Only the symbols' addresses are used; they delimit bytes in .rodata.
    let start = ptr::addr_of!(thinvisor_chain_stub_start);
    let at = |p: *const u8| (p as usize - start as usize) as u16;
    let len = ptr::addr_of!(thinvisor_chain_stub_end) as usize - start as usize;
    // SAFETY: [start, end) is the stub as assembled above, read-only data
    // of the image.
    let code = unsafe { core::slice::from_raw_parts(start, len) };
    (
        code,
        at(ptr::addr_of!(thinvisor_chain_int15)),
        at(ptr::addr_of!(thinvisor_chain_boot)),
    )
}

fn read_u16(pa: u64) -> u16 {
    // SAFETY: pa is in the first MiB, inside the direct map; the BIOS's
    // data there is plain memory no one else accesses while thinvisor
    // boots.
    unsafe { ptr::read_unaligned(mem::phys_to_virt(pa) as *const u16) }
}

fn read_u32(pa: u64) -> u32 {
    // SAFETY: as in read_u16.
    unsafe { ptr::read_unaligned(mem::phys_to_virt(pa) as *const u32) }
}

fn write_u16(pa: u64, value: u16) {
    // SAFETY: as in read_u16; the guest has not started.
    unsafe { ptr::write_unaligned(mem::phys_to_virt(pa) as *mut u16, value) }
}

fn write_u32(pa: u64, value: u32) {
    // SAFETY: as in write_u16.
    unsafe { ptr::write_unaligned(mem::phys_to_virt(pa) as *mut u32, value) }
}

/// The chain-boot guest: the BIOS's memory answers patched to hide
/// `hidden`, and the guest starting in real mode at the stub's boot loader.
pub fn bios_guest(boot: &BootInfo, hidden: mem::Reserved) -> (GuestSetup, &'static GuestMemory) {
    let (code, int15_at, boot_at) = stub_code();

    // Where the stub goes: whole pages below the BIOS's top of base memory,
    // enough for the code and the largest table.
    let base_kib = read_u16(BDA_BASE_MEMORY);
    let old_top = u64::from(base_kib) * 1024;
    let need = stub::area_bytes(code.len(), bios::MAX_ENTRIES) as u64;
    let new_top = old_top.saturating_sub(need) & !(PAGE - 1);
    if old_top > CONVENTIONAL_END || new_top < CONVENTIONAL_MIN {
        boot_error!(
            "boot=chain: the BIOS reports {base_kib} KiB of base memory (0x413); \
             no room for the INT 15h handler below it"
        );
    }

    // The guest's map: the firmware's with the stub's pages (up to the
    // page holding the BIOS's old top; the rest of that page is the EBDA,
    // reserved already) and thinvisor's block reserved (thinvisor_boot's
    // GuestMap, the map every pass-through boot path gives its guest).
    let stub_pages = (new_top, old_top.next_multiple_of(PAGE));
    let guest_map =
        match GuestMap::new(boot.memory_map(), &[stub_pages, (hidden.start, hidden.end)]) {
            Ok(m) => m,
            Err(e) => boot_error!("boot=chain: {e}"),
        };
    if guest_map.dropped_bytes() > 0 {
        log::warn!(
            "boot=chain: {} KiB of RAM left out of the guest's E820 table (too many entries)",
            guest_map.dropped_bytes() >> 10
        );
    }
    let mut entries = [E820Entry {
        base: 0,
        len: 0,
        kind: 0,
    }; bios::MAX_INPUT];
    for (slot, e) in entries.iter_mut().zip(guest_map.e820()) {
        *slot = E820Entry {
            base: e.addr,
            len: e.size,
            kind: e.type_number(),
        };
    }
    let n = guest_map.e820().len().min(entries.len());
    // Sorted and disjoint already: this only lays it out for the handler.
    let table = match E820Table::build(&entries[..n], &[]) {
        Ok(t) => t,
        Err(e) => boot_error!("boot=chain: {e}"),
    };

    // SAFETY: [new_top, old_top) is conventional memory below the BIOS's
    // top (checked above), inside the direct map, used by no one: the
    // guest has not started and thinvisor keeps no data there.
    let area = unsafe { mem::phys_slice_mut(new_top, old_top - new_top) };
    area[..code.len()].copy_from_slice(code);
    let old_int15 = read_u32(IVT_INT15);
    let Some(used) = stub::write_data(area, code.len(), old_int15, &table) else {
        boot_error!("boot=chain: the INT 15h handler does not fit below the BIOS's base memory");
    };
    let segment = (new_top >> 4) as u16;
    write_u32(IVT_INT15, u32::from(segment) << 16 | u32::from(int15_at));
    write_u16(BDA_BASE_MEMORY, (new_top / 1024) as u16);

    info!(
        "chain: INT 15h handler at {segment:04x}:{int15_at:04x} ({used} bytes; the BIOS's at {:04x}:{:04x}); base memory {} -> {} KiB",
        old_int15 >> 16,
        old_int15 & 0xFFFF,
        base_kib,
        new_top / 1024
    );
    for e in table.entries() {
        info!(
            "chain: guest E820 {:#012x}..{:#012x} type {}",
            e.base,
            e.end(),
            e.kind
        );
    }
    let sizes = table.legacy_sizes();
    info!(
        "chain: E801h AX {:#x} BX {:#x}, 88h AX {:#x}; booting BIOS drive {FIRST_HARD_DISK:#x} from {segment:04x}:{boot_at:04x}",
        sizes.e801_ax, sizes.e801_bx, sizes.ah88_ax
    );

    let (top, memory) = passthrough::guest_memory(boot, hidden);
    let mut initial = InitialState::boot_sector(FIRST_HARD_DISK);
    initial.mode = StartMode::Real {
        cs: segment,
        ip: boot_at,
    };
    let guest = GuestSetup {
        memory: GuestLayout::Passthrough { top, hidden },
        initial,
    };
    (guest, memory)
}

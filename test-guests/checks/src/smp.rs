//! `aps_start`: the guest starts the machine's other processors itself, as
//! an OS does, and each must find thinvisor there.
//!
//! The BSP copies a real-mode trampoline to `TRAMPOLINE` (below 1 MiB,
//! page-aligned: a SIPI starts a processor at `vector << 12` in real mode,
//! Intel SDM vol. 3A, 9.4.4.1 / 11.6.1) and sends INIT, then two SIPIs,
//! to all processors but itself (SDM vol. 3A, 9.4.4.1, "Typical BSP
//! Initialization Sequence": INIT, 10 ms, SIPI, 200 us, SIPI). Each AP
//! 1. loads the entry code's GDT, enters 32-bit protected mode (paging
//!    off) and jumps into this image (`tg_ap_entry32`),
//! 2. takes a slot with `lock xadd` (its record and a 4 KiB stack whose
//!    lowest dword points at the record), loads its own IDT,
//! 3. records its initial APIC ID (CPUID.1:EBX[31:24]) and CPUID leaf
//!    0x40000000, then looks up "log_read" with the VMM call of the
//!    vendor (VMCALL on Intel, VMMCALL otherwise) and records EAX,
//! 4. halts for good (`cli; hlt`).
//!
//! An exception (#UD on the VMM call when the AP runs natively, without
//! thinvisor) is recorded by the AP's own handler, which then halts: the
//! BSP reports it, nothing hangs.

use crate::cpu;
use crate::passthrough::{self, ensure, fail, CheckResult};
use crate::timer::{pit_delay_ms, pit_delay_us, Lapic};
use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::mem::{offset_of, size_of};
use core::ptr::addr_of;
use core::sync::atomic::{fence, AtomicU32, Ordering::Relaxed, Ordering::SeqCst};
use thinvisor_abi as abi;

/// Where the trampoline runs: SIPI vector 0x08. Below the BIOS's EBDA and
/// above the real-mode IVT and BIOS data area; ordinary RAM the memory
/// map lists as available.
const TRAMPOLINE: u64 = 0x8000;
/// APs this check keeps records for; more are counted and halted.
const MAX_APS: usize = 15;
/// Each AP's stack; stacks are aligned to it (the exception handler finds
/// the record from ESP).
const AP_STACK: usize = 4096;
/// How long the BSP waits for the APs: until every AP that took a slot
/// has finished and no new one came for `SETTLE_MS`, at most `WAIT_MS`.
const WAIT_MS: u32 = 200;
const SETTLE_MS: u32 = 20;

/// ICR values (SDM vol. 3A, 11.6.1): destination shorthand "all excluding
/// self" (bits 19:18 = 11), level assert (bit 14), delivery mode INIT
/// (101b) or start-up (110b) with the vector in bits 7:0.
const ICR_INIT_ALL_BUT_SELF: u32 = 0x000C_4500;
const ICR_SIPI_ALL_BUT_SELF: u32 = 0x000C_4600;

/// What one AP recorded. `status`: 1 started, 2 CPUID done, 3 VMM call
/// returned, 4 an exception stopped it.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ApRecord {
    status: u32,
    apic_id: u32,
    /// CPUID 0x40000000: EAX, EBX, ECX, EDX.
    sig: [u32; 4],
    /// EAX after the lookup of "log_read".
    lookup: u32,
    /// The exception, and the first two dwords of its frame (error code
    /// and EIP, or EIP and CS).
    vector: u32,
    frame: [u32; 2],
}

const CALLED: u32 = 3;
const EXCEPTION: u32 = 4;

/// Memory the APs write without synchronization beyond `lock xadd`: each
/// only its own record and stack.
#[repr(C, align(4096))]
struct ApShared {
    stacks: [[u8; AP_STACK]; MAX_APS],
    records: [ApRecord; MAX_APS],
    /// The APs' 32-bit IDT: 32 interrupt gates to `tg_ap_exc_stubs`.
    idt: [u64; 32],
}

struct Shared(UnsafeCell<ApShared>);
// SAFETY: the BSP writes it only before the SIPIs and reads it after the
// APs halted or with volatile reads; each AP writes its own slot only.
unsafe impl Sync for Shared {}

#[no_mangle]
static TG_AP_SHARED: Shared = Shared(UnsafeCell::new(ApShared {
    stacks: [[0; AP_STACK]; MAX_APS],
    records: [ApRecord {
        status: 0,
        apic_id: 0,
        sig: [0; 4],
        lookup: 0,
        vector: 0,
        frame: [0; 2],
    }; MAX_APS],
    idt: [0; 32],
}));
/// The next free slot (APs beyond `MAX_APS` take one too: the count).
#[no_mangle]
static TG_AP_NEXT: AtomicU32 = AtomicU32::new(0);
/// 1 on Intel: the APs use VMCALL.
#[no_mangle]
static TG_AP_USE_VMCALL: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" {
    /// The real-mode trampoline, copied to `TRAMPOLINE`.
    static tg_ap_trampoline: u8;
    static tg_ap_trampoline_end: u8;
    /// 32 exception stubs, 8 bytes apart.
    static tg_ap_exc_stubs: u8;
}

// The trampoline, in 16-bit code: linked in this image, executed only as
// the copy at TRAMPOLINE (CS = 0x0800, IP = 0), so it addresses its data
// relative to its start. The GDT is the entry code's (0x18 flat 32-bit
// code, 0x10 flat data); LGDT with a 32-bit operand takes all of its base.
global_asm!(
    r#"
.section .rodata.tg_ap_trampoline, "a"
.code16
.global tg_ap_trampoline
tg_ap_trampoline:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl tg_ap_gdtr - tg_ap_trampoline
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $tg_ap_entry32
.balign 8
tg_ap_gdtr:
    .word 9 * 8 - 1
    .long TG_GDT
.global tg_ap_trampoline_end
tg_ap_trampoline_end:
.code64
.text
"#,
    options(att_syntax)
);

global_asm!(
    r#"
.section .rodata.tg_ap_data, "a"
tg_ap_name_log_read:
    .asciz "log_read"
.balign 8
    .word 0
tg_ap_idtr:
    .word 32 * 8 - 1
    .long TG_AP_SHARED + {idt}

.section .text.tg_ap, "ax"
.code32
.global tg_ap_entry32
tg_ap_entry32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov eax, 1
    lock xadd dword ptr [TG_AP_NEXT], eax
    cmp eax, {max}
    jae tg_ap_park
    /* stack: the top of slot EAX; its lowest dword: the record */
    mov esp, eax
    shl esp, 12
    add esp, offset TG_AP_SHARED + {stack_size}
    mov esi, eax
    imul esi, esi, {rec_size}
    add esi, offset TG_AP_SHARED + {records}
    mov dword ptr [esp - {stack_size}], esi
    lidt [tg_ap_idtr]
    mov dword ptr [esi + {status}], 1
    mov eax, 1
    cpuid
    shr ebx, 24
    mov dword ptr [esi + {apic_id}], ebx
    mov eax, 0x40000000
    xor ecx, ecx
    cpuid
    mov dword ptr [esi + {sig}], eax
    mov dword ptr [esi + {sig} + 4], ebx
    mov dword ptr [esi + {sig} + 8], ecx
    mov dword ptr [esi + {sig} + 12], edx
    mov dword ptr [esi + {status}], 2
    xor eax, eax
    mov ebx, offset tg_ap_name_log_read
    cmp dword ptr [TG_AP_USE_VMCALL], 0
    je 1f
    vmcall
    jmp 2f
1:
    vmmcall
2:
    /* the record again, from the stack (ESP is the top: step below it) */
    lea esi, [esp - 1]
    and esi, -{stack_size}
    mov esi, dword ptr [esi]
    mov dword ptr [esi + {lookup}], eax
    mov dword ptr [esi + {status}], 3
tg_ap_park:
    cli
    hlt
    jmp tg_ap_park

.balign 8
.global tg_ap_exc_stubs
tg_ap_exc_stubs:
.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .org tg_ap_exc_stubs + \vec * 8
    push \vec
    jmp tg_ap_exc_common
.endr

/* vector, then the CPU's frame: record both, mark the record, halt */
tg_ap_exc_common:
    pop eax
    mov ebx, esp
    and ebx, -{stack_size}
    mov ebx, dword ptr [ebx]
    mov dword ptr [ebx + {vector}], eax
    mov ecx, dword ptr [esp]
    mov dword ptr [ebx + {frame}], ecx
    mov ecx, dword ptr [esp + 4]
    mov dword ptr [ebx + {frame} + 4], ecx
    mov dword ptr [ebx + {status}], 4
    jmp tg_ap_park
.code64
.text
"#,
    idt = const offset_of!(ApShared, idt),
    records = const offset_of!(ApShared, records),
    max = const MAX_APS,
    stack_size = const AP_STACK,
    rec_size = const size_of::<ApRecord>(),
    status = const offset_of!(ApRecord, status),
    apic_id = const offset_of!(ApRecord, apic_id),
    sig = const offset_of!(ApRecord, sig),
    lookup = const offset_of!(ApRecord, lookup),
    vector = const offset_of!(ApRecord, vector),
    frame = const offset_of!(ApRecord, frame),
);

const _: () = assert!(offset_of!(ApShared, stacks) == 0 && AP_STACK == 4096);

/// A 32-bit interrupt gate (SDM vol. 3A, 6.11): selector 0x18, DPL 0.
fn gate32(handler: u64) -> u64 {
    (handler & 0xFFFF) | (0x18 << 16) | (0x8E00 << 32) | (((handler >> 16) & 0xFFFF) << 48)
}

/// Resets the records, builds the APs' IDT and copies the trampoline.
fn prepare() -> CheckResult {
    let start = addr_of!(tg_ap_trampoline) as u64;
    let len = addr_of!(tg_ap_trampoline_end) as u64 - start;
    ensure!(len <= 4096, "the trampoline is {len} bytes");
    let stubs = addr_of!(tg_ap_exc_stubs) as u64;
    ensure!(
        stubs < 1 << 32,
        "the AP code at {stubs:#x} is not below 4 GiB"
    );
    let shared = TG_AP_SHARED.0.get();
    // SAFETY: no AP runs yet (they are started below, or were halted by an
    // earlier INIT); the trampoline page is ordinary low RAM the guest
    // owns, identity-mapped by the entry code.
    unsafe {
        for (v, g) in (*shared).idt.iter_mut().enumerate() {
            *g = gate32(stubs + 8 * v as u64);
        }
        for r in (*shared).records.iter_mut() {
            *r = ApRecord::default();
        }
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len as usize);
    }
    TG_AP_NEXT.store(0, Relaxed);
    TG_AP_USE_VMCALL.store(u32::from(cpu::uses_vmcall()), Relaxed);
    fence(SeqCst);
    Ok(())
}

fn record(i: usize) -> ApRecord {
    // SAFETY: in range; volatile because the APs write it.
    unsafe { addr_of!((*TG_AP_SHARED.0.get()).records[i]).read_volatile() }
}

/// Whether every AP that took a slot so far has finished (or it took no
/// slot and is not counted).
fn all_finished(n: usize) -> bool {
    (0..n.min(MAX_APS)).all(|i| record(i).status >= CALLED)
}

/// `aps_start`: INIT-SIPI-SIPI to all other processors; each must answer
/// CPUID 0x40000000 with thinvisor's signature and look "log_read" up to
/// the same number as the BSP. Passes when at least one AP answered and
/// none answered wrongly (an AP that raised an exception, stopped half
/// way, or gave another answer). Prints `test-guest: N APs answered`.
pub fn aps_start() -> CheckResult {
    let lapic = Lapic::find()?;
    ensure!(lapic.bsp, "IA32_APIC_BASE says this is not the BSP");
    let want = passthrough::lookup(abi::names::LOG_READ);
    ensure!(want != 0, "lookup of \"log_read\" on the BSP returned 0");
    let (map, entries) = passthrough::memory_map()?;
    ensure!(
        map[..entries]
            .iter()
            .any(|&(base, len, kind)| kind == passthrough::MMAP_AVAILABLE
                && base <= TRAMPOLINE
                && base + len >= TRAMPOLINE + 4096),
        "the memory map does not offer the trampoline's page {TRAMPOLINE:#x}"
    );
    prepare()?;
    lapic.enable();
    let bsp_id = lapic.id();
    let vector = (TRAMPOLINE >> 12) as u32;
    ensure!(
        lapic.send_ipi(ICR_INIT_ALL_BUT_SELF, 0),
        "the INIT IPI stayed pending"
    );
    ensure!(pit_delay_ms(10), "PIT channel 2 never reached 0");
    for _ in 0..2 {
        ensure!(
            lapic.send_ipi(ICR_SIPI_ALL_BUT_SELF | vector, 0),
            "a SIPI stayed pending"
        );
        pit_delay_us(200);
    }
    let mut settled = 0;
    for _ in 0..WAIT_MS {
        pit_delay_us(1000);
        let n = TG_AP_NEXT.load(SeqCst) as usize;
        settled = if n > 0 && all_finished(n) {
            settled + 1
        } else {
            0
        };
        if settled >= SETTLE_MS {
            break;
        }
    }
    let n = TG_AP_NEXT.load(SeqCst) as usize;
    let (mut good, mut bad) = (0, 0);
    let mut ids = [u32::MAX; MAX_APS];
    for i in 0..n.min(MAX_APS) {
        let r = record(i);
        ids[i] = r.apic_id;
        let mut sig = [0u8; 12];
        for (k, w) in r.sig[1..].iter().enumerate() {
            sig[4 * k..4 * k + 4].copy_from_slice(&w.to_le_bytes());
        }
        let shown = Signature(sig);
        let right = match r.status {
            CALLED => {
                say!(
                    "test-guest: AP {i}: APIC ID {}, CPUID 0x40000000 {shown}, \"log_read\" = {}",
                    r.apic_id,
                    r.lookup
                );
                sig == abi::CPUID_SIGNATURE && u64::from(r.lookup) == want
            }
            EXCEPTION => {
                say!(
                    "test-guest: AP {i}: APIC ID {}, CPUID 0x40000000 {shown}, exception vector {} (frame {:#x} {:#x}){}",
                    r.apic_id,
                    r.vector,
                    r.frame[0],
                    r.frame[1],
                    if r.vector == 6 { ": #UD on the VMM call, no VMM there" } else { "" }
                );
                false
            }
            s => {
                say!(
                    "test-guest: AP {i}: APIC ID {}, did not finish in {WAIT_MS} ms (stage {s})",
                    r.apic_id
                );
                false
            }
        };
        let unique = r.apic_id != bsp_id && !ids[..i].contains(&r.apic_id);
        if right && unique {
            good += 1;
        } else {
            bad += 1;
        }
    }
    say!("test-guest: {good} APs answered");
    if n > MAX_APS {
        say!(
            "test-guest: {} more APs started and halted unrecorded",
            n - MAX_APS
        );
    }
    if n == 0 {
        fail!("no AP started within {WAIT_MS} ms of INIT-SIPI-SIPI (one processor?)");
    }
    ensure!(
        bad == 0,
        "{bad} of {} APs answered wrongly (first: {})",
        n.min(MAX_APS),
        first_wrong(n, want, bsp_id)
    );
    ensure!(good > 0, "no AP answered");
    Ok(())
}

/// CPUID 0x40000000's EBX, ECX, EDX: quoted text when printable (NULs
/// at the end dropped), else hex bytes.
struct Signature([u8; 12]);

impl core::fmt::Display for Signature {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let text = self.0.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if self.0[..text]
            .iter()
            .all(|b| b.is_ascii_graphic() || *b == b' ')
        {
            let s = core::str::from_utf8(&self.0[..text]).unwrap_or("");
            write!(f, "\"{s}\"")
        } else {
            self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
        }
    }
}

/// A short description of the first wrong answer.
struct FirstWrong(ApRecord, usize);

impl core::fmt::Display for FirstWrong {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (r, i) = (self.0, self.1);
        match r.status {
            EXCEPTION => write!(f, "AP {i} exception vector {}", r.vector),
            CALLED => write!(
                f,
                "AP {i} APIC ID {} signature {:#x} {:#x} {:#x}, lookup {}",
                r.apic_id, r.sig[1], r.sig[2], r.sig[3], r.lookup
            ),
            s => write!(f, "AP {i} stopped at stage {s}"),
        }
    }
}

fn first_wrong(n: usize, want: u64, bsp_id: u32) -> FirstWrong {
    for i in 0..n.min(MAX_APS) {
        let r = record(i);
        let sig_ok = r.sig[1..]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .eq(abi::CPUID_SIGNATURE);
        let ok = r.status == CALLED && sig_ok && u64::from(r.lookup) == want;
        let dup = r.apic_id == bsp_id || (0..i).any(|k| record(k).apic_id == r.apic_id);
        if !ok || dup {
            return FirstWrong(r, i);
        }
    }
    FirstWrong(ApRecord::default(), 0)
}

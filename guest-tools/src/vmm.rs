//! Detecting thinvisor and calling it from a Linux user program.
//!
//! Detection is BitVisor's (try the vendor's call instruction, catch
//! SIGILL/SIGSEGV, try the other), made safe: no call instruction runs
//! unless CPUID leaf 0x40000000 carries thinvisor's signature first. KVM,
//! for one, answers VMCALL from user mode with an error value instead of
//! #UD, so a program that judged by the instruction alone would take KVM
//! for a VMM that knows its functions, and other hypervisors may do
//! anything with a call they do not expect.
//!
//! Function 0 (look up a name) runs from a page of its own that holds both
//! the name and the code: thinvisor reads the name through the guest's page
//! tables and answers 0 for a page that is not present rather than faulting
//! it in, and the page holding the instruction being executed is present.

use std::arch::asm;
use std::arch::x86_64::__cpuid;
use std::cell::UnsafeCell;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use thinvisor_abi::CPUID_SIGNATURE;

use crate::cli::{lookup_name, Regs};
use crate::{call_insn, escape, signature_bytes, CallInsn};

/// CPUID leaf of the hypervisor vendor signature.
const HYPERVISOR_LEAF: u32 = 0x4000_0000;

/// CPUID leaf 0x40000000's 12-byte signature (EBX, ECX, EDX). On a
/// processor without a hypervisor leaf the bytes are whatever the highest
/// basic leaf holds, which is never thinvisor's signature.
pub fn hypervisor_signature() -> [u8; 12] {
    let hv = __cpuid(HYPERVISOR_LEAF);
    signature_bytes(hv.ebx, hv.ecx, hv.edx)
}

/// The processor vendor of CPUID leaf 0 (EBX, EDX, ECX order).
pub fn vendor() -> [u8; 12] {
    let leaf0 = __cpuid(0);
    signature_bytes(leaf0.ebx, leaf0.edx, leaf0.ecx)
}

/// Why there is no thinvisor to call.
#[derive(Debug)]
pub enum NoVmm {
    /// CPUID leaf 0x40000000 holds another signature (no call was made).
    Signature([u8; 12]),
    /// The signature is thinvisor's, but both instructions faulted.
    Instruction,
    /// The page for the trial call could not be set up.
    Os(io::Error),
}

impl fmt::Display for NoVmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoVmm::Signature(sig) => write!(
                f,
                "no thinvisor here (CPUID 0x40000000 signature \"{}\")",
                escape(sig)
            ),
            NoVmm::Instruction => write!(
                f,
                "no thinvisor here (its CPUID signature is present, but neither VMCALL nor \
                 VMMCALL works)"
            ),
            NoVmm::Os(e) => write!(f, "cannot try the VMM call: {e}"),
        }
    }
}

/// A thinvisor that answered a call, and the instruction it answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vmm {
    insn: CallInsn,
}

impl Vmm {
    /// Detects thinvisor once per process (later calls give the first
    /// answer again; a VMM does not come and go under a running program).
    pub fn get() -> Result<Vmm, &'static NoVmm> {
        static DETECTED: OnceLock<Result<Vmm, NoVmm>> = OnceLock::new();
        DETECTED.get_or_init(Vmm::detect).as_ref().map(|v| *v)
    }

    /// Checks the CPUID signature, then tries a harmless call (looking up
    /// the empty name, which no function has) with the vendor's instruction
    /// and then with the other, under a SIGILL/SIGSEGV handler.
    pub fn detect() -> Result<Vmm, NoVmm> {
        let signature = hypervisor_signature();
        if signature != CPUID_SIGNATURE {
            return Err(NoVmm::Signature(signature));
        }
        let first = call_insn(&vendor());
        for insn in [first, first.other()] {
            match lookup_with(insn, b"\0") {
                Ok(_) => return Ok(Vmm { insn }),
                Err(Trial::Faulted) => {}
                Err(Trial::Os(e)) => return Err(NoVmm::Os(e)),
            }
        }
        Err(NoVmm::Instruction)
    }

    /// The instruction thinvisor answered.
    pub fn insn(&self) -> CallInsn {
        self.insn
    }

    /// Function 0: the number of `name`, or None when thinvisor does not
    /// know it (or it cannot be a name: a NUL inside, 256 bytes or more).
    pub fn lookup(&self, name: &[u8]) -> io::Result<Option<u64>> {
        let Some(name) = lookup_name(name) else {
            return Ok(None);
        };
        match lookup_with(self.insn, &name) {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(Trial::Faulted) => Err(io::Error::other(format!(
                "{} faulted, though it worked before",
                self.insn.name()
            ))),
            Err(Trial::Os(e)) => Err(e),
        }
    }

    /// Calls function `number` with RBX, RCX, RDX, RSI, RDI = `args`;
    /// returns RAX..RDI. The caller answers for what the function does
    /// with the arguments: `log_read`, for one, writes to the address in
    /// RBX (thinvisor checks it is writable by this program first).
    pub fn call(&self, number: u64, args: [u64; 5]) -> Regs {
        let [mut rbx, mut rcx, mut rdx, mut rsi, mut rdi] = args;
        let mut rax = number;
        match self.insn {
            // SAFETY: thinvisor answered this instruction in `detect`, so it
            // is a VMM call here, not a fault. It changes registers only as
            // declared (RBX is swapped in and out through a scratch register
            // since LLVM reserves it) and memory only as the function
            // defines, at addresses the caller passed (the asm is not
            // `nomem`, so the compiler assumes memory may change). No stack
            // use.
            CallInsn::Vmcall => unsafe {
                asm!(
                    "xchg {b}, rbx",
                    "vmcall",
                    "xchg {b}, rbx",
                    b = inout(reg) rbx,
                    inout("rax") rax,
                    inout("rcx") rcx,
                    inout("rdx") rdx,
                    inout("rsi") rsi,
                    inout("rdi") rdi,
                    options(nostack),
                )
            },
            // SAFETY: as above, with VMMCALL.
            CallInsn::Vmmcall => unsafe {
                asm!(
                    "xchg {b}, rbx",
                    "vmmcall",
                    "xchg {b}, rbx",
                    b = inout(reg) rbx,
                    inout("rax") rax,
                    inout("rcx") rcx,
                    inout("rdx") rdx,
                    inout("rsi") rsi,
                    inout("rdi") rdi,
                    options(nostack),
                )
            },
        }
        Regs {
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
        }
    }
}

/// For the programs: thinvisor and the number of `name`, or a message on
/// stderr (prefixed with `program`) and the documented exit status
/// ([`crate::status`]): no thinvisor, unknown function, or a failure.
pub fn function_or_exit(program: &str, name: &str) -> (Vmm, u64) {
    let vmm = match Vmm::get() {
        Ok(vmm) => vmm,
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::exit(match e {
                NoVmm::Os(_) => crate::status::FAILED,
                _ => crate::status::NO_VMM,
            });
        }
    };
    match vmm.lookup(name.as_bytes()) {
        Ok(Some(number)) => (vmm, number),
        Ok(None) => {
            eprintln!("{program}: thinvisor has no function named `{name}`");
            std::process::exit(crate::status::UNKNOWN_FUNCTION);
        }
        Err(e) => {
            eprintln!("{program}: looking up `{name}`: {e}");
            std::process::exit(crate::status::FAILED);
        }
    }
}

/// How a trial of function 0 went wrong.
#[derive(Debug)]
enum Trial {
    /// The instruction raised SIGILL or SIGSEGV.
    Faulted,
    /// mmap, mprotect or sigaction failed.
    Os(io::Error),
}

/// Where the code starts in the stub page, after the longest name.
pub const STUB_CODE: usize = thinvisor_abi::NAME_MAX_BYTES;

/// The code of the stub page (see [`lookup_stub`]).
fn stub_code(insn: CallInsn) -> [u8; 17] {
    // lea rbx, [rip + disp32] ends 1 + 7 bytes into the code; the name is
    // at the page's start.
    let disp = -((STUB_CODE + 8) as i32);
    let d = disp.to_le_bytes();
    let i = insn.bytes();
    [
        0x53, // push rbx (callee-saved in the C ABI)
        0x48, 0x8d, 0x1d, d[0], d[1], d[2], d[3], // lea rbx, [name]
        0x31, 0xc0, // xor eax, eax (function 0)
        i[0], i[1], i[2], // vmcall / vmmcall
        0x5b, // pop rbx
        0xc3, // ret
        0xcc, 0xcc, // int3 padding
    ]
}

/// Offset of the call instruction in the stub page: the signal handler
/// recognises a fault there, and only there, as the trial's.
pub const STUB_INSN: usize = STUB_CODE + 10;

/// The stub page's first bytes: `name` (NUL-terminated, at most 256 bytes)
/// at offset 0, then at [`STUB_CODE`] a function `extern "C" fn() -> u64`
/// that makes function 0 with RBX = the name and returns RAX. None for a
/// name that is not NUL-terminated or too long.
pub fn lookup_stub(name: &[u8], insn: CallInsn) -> Option<Vec<u8>> {
    if name.len() > STUB_CODE || name.last() != Some(&0) {
        return None;
    }
    let mut page = vec![0u8; STUB_CODE];
    page[..name.len()].copy_from_slice(name);
    page.extend_from_slice(&stub_code(insn));
    Some(page)
}

/// Serialises the trials: the signal handlers are process-wide.
static TRIAL: Mutex<()> = Mutex::new(());
/// The address of the trial's call instruction (0: no trial running).
static TRIAL_RIP: AtomicUsize = AtomicUsize::new(0);
/// Set by the handler when the trial's instruction faulted.
static FAULTED: AtomicBool = AtomicBool::new(false);

/// The actions of SIGILL and SIGSEGV before the trial's handler, for the
/// handler to hand foreign signals back to. Written only by `lookup_with`
/// under `TRIAL`, before the handler is installed (the sigaction system
/// call orders the write before any delivery), read by the handler.
struct Saved(UnsafeCell<[MaybeUninit<libc::sigaction>; 2]>);

// SAFETY: see the type's comment: one writer under the TRIAL lock while no
// handler can read, readers only while it is installed.
unsafe impl Sync for Saved {}

static SAVED: Saved = Saved(UnsafeCell::new([
    MaybeUninit::uninit(),
    MaybeUninit::uninit(),
]));

/// The slot of `sig` in `SAVED`.
fn saved_slot(sig: libc::c_int) -> usize {
    usize::from(sig == libc::SIGSEGV)
}

/// The SIGILL/SIGSEGV handler of a trial: a fault at the trial's call
/// instruction is skipped (RIP += 3, RAX = 0) and noted. Any other signal
/// is not ours: the program's own action is put back, and the faulting
/// instruction faults again into it (a signal sent by a process rather
/// than by a fault is raised again instead), so the program fares as it
/// would have without the trial.
extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let uc = context.cast::<libc::ucontext_t>();
    // SAFETY: with SA_SIGINFO the kernel passes a valid ucontext_t for the
    // interrupted thread as the third argument; it is ours to change until
    // the handler returns.
    let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as usize;
    let expected = TRIAL_RIP.load(Ordering::SeqCst);
    // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO.
    let sent = unsafe { (*info).si_code } <= 0;
    if expected != 0 && rip == expected && !sent {
        gregs[libc::REG_RIP as usize] += 3;
        gregs[libc::REG_RAX as usize] = 0;
        FAULTED.store(true, Ordering::SeqCst);
        return;
    }
    // SAFETY: SAVED holds the action sigaction returned for this signal
    // before this handler was installed (see `Saved`); sigaction and raise
    // are async-signal-safe.
    unsafe {
        let old = (*SAVED.0.get())[saved_slot(sig)].as_ptr();
        libc::sigaction(sig, old, ptr::null_mut());
        if sent {
            libc::raise(sig);
        }
    }
}

/// An anonymous page, unmapped on drop.
struct Page(*mut libc::c_void);

impl Page {
    fn new() -> io::Result<Page> {
        // SAFETY: an anonymous private mapping at an address the kernel
        // chooses touches no existing memory.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                page_size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(Page(p))
        }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `Page::new` and nothing refers to
        // it any more (the stub has returned).
        unsafe {
            libc::munmap(self.0, page_size());
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n)
        .ok()
        .filter(|&n| n >= 4096)
        .unwrap_or(4096)
}

/// Installs `on_fault` for `sig`, returning the old action (also kept in
/// `SAVED`). Called only under the TRIAL lock.
fn install(sig: libc::c_int) -> io::Result<libc::sigaction> {
    // SAFETY: zeroed is a valid sigaction (no flags, empty mask); the
    // handler has the SA_SIGINFO signature. SAVED is written before the
    // handler that reads it is installed, under the TRIAL lock.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_fault as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, ptr::null(), &mut old) != 0 {
            return Err(io::Error::last_os_error());
        }
        (*SAVED.0.get())[saved_slot(sig)] = MaybeUninit::new(old);
        if libc::sigaction(sig, &action, ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(old)
    }
}

/// Puts the old action back.
fn restore(sig: libc::c_int, old: &libc::sigaction) {
    // SAFETY: `old` came from sigaction for the same signal.
    unsafe {
        libc::sigaction(sig, old, ptr::null_mut());
    }
}

/// Function 0 for the NUL-terminated `name` with `insn`, run from a fresh
/// page holding the name and the code, under the trial's signal handlers.
fn lookup_with(insn: CallInsn, name: &[u8]) -> Result<u64, Trial> {
    #[allow(unused_mut)]
    let mut stub = lookup_stub(name, insn)
        .ok_or_else(|| Trial::Os(io::Error::new(io::ErrorKind::InvalidInput, "bad name")))?;
    // The tests put other instructions in the call's place.
    #[cfg(test)]
    if let Some(bytes) = tests::PATCH.with(|p| p.get()) {
        stub[STUB_INSN..STUB_INSN + 3].copy_from_slice(&bytes);
    }
    let _serial = TRIAL.lock().unwrap_or_else(|e| e.into_inner());
    let page = Page::new().map_err(Trial::Os)?;
    // SAFETY: the page is fresh, writable and at least 4096 bytes; the stub
    // is shorter.
    unsafe {
        ptr::copy_nonoverlapping(stub.as_ptr(), page.0.cast::<u8>(), stub.len());
    }
    // SAFETY: the page is ours; read and execute, no longer writable.
    if unsafe { libc::mprotect(page.0, page_size(), libc::PROT_READ | libc::PROT_EXEC) } != 0 {
        return Err(Trial::Os(io::Error::last_os_error()));
    }
    let old_ill = install(libc::SIGILL).map_err(Trial::Os)?;
    let old_segv = match install(libc::SIGSEGV) {
        Ok(old) => old,
        Err(e) => {
            restore(libc::SIGILL, &old_ill);
            return Err(Trial::Os(e));
        }
    };
    FAULTED.store(false, Ordering::SeqCst);
    TRIAL_RIP.store(page.0 as usize + STUB_INSN, Ordering::SeqCst);
    // SAFETY: the page holds, at STUB_CODE, a complete function of the C
    // ABI taking nothing and returning RAX (see `stub_code`): it saves and
    // restores RBX, uses 8 bytes of stack, and its only other effect is
    // the VMM call (function 0 only reads the name) or, without a VMM, a
    // fault that `on_fault` skips.
    let rax = unsafe {
        let f: extern "C" fn() -> u64 = std::mem::transmute(page.0.cast::<u8>().add(STUB_CODE));
        f()
    };
    TRIAL_RIP.store(0, Ordering::SeqCst);
    restore(libc::SIGSEGV, &old_segv);
    restore(libc::SIGILL, &old_ill);
    drop(page);
    if FAULTED.load(Ordering::SeqCst) {
        Err(Trial::Faulted)
    } else {
        Ok(rax)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_layout() {
        let page = lookup_stub(b"log_read\0", CallInsn::Vmmcall).unwrap();
        assert_eq!(&page[..9], b"log_read\0");
        assert_eq!(page[STUB_CODE], 0x53);
        // lea rbx, [rip + disp]: RIP after it is STUB_CODE + 8, and the
        // target is offset 0.
        let disp = i32::from_le_bytes(page[STUB_CODE + 4..STUB_CODE + 8].try_into().unwrap());
        assert_eq!((STUB_CODE + 8) as i64 + i64::from(disp), 0);
        assert_eq!(&page[STUB_INSN..STUB_INSN + 3], &[0x0f, 0x01, 0xd9]);
        assert_eq!(&page[STUB_INSN + 3..STUB_INSN + 5], &[0x5b, 0xc3]);
        let intel = lookup_stub(b"x\0", CallInsn::Vmcall).unwrap();
        assert_eq!(&intel[STUB_INSN..STUB_INSN + 3], &[0x0f, 0x01, 0xc1]);
        // The longest name fits before the code; longer or unterminated
        // ones are refused.
        let mut long = vec![b'a'; 255];
        long.push(0);
        assert!(lookup_stub(&long, CallInsn::Vmcall).is_some());
        long.insert(0, b'a');
        assert!(lookup_stub(&long, CallInsn::Vmcall).is_none());
        assert!(lookup_stub(b"abc", CallInsn::Vmcall).is_none());
    }

    /// This host is no thinvisor (CI runs in KVM guests): detection must
    /// say so from CPUID alone, quickly, without a VMM call.
    #[test]
    fn no_thinvisor_on_this_host() {
        let start = std::time::Instant::now();
        match Vmm::detect() {
            Err(NoVmm::Signature(sig)) => assert_ne!(sig, CPUID_SIGNATURE),
            other => panic!("expected no thinvisor, got {other:?}"),
        }
        assert!(Vmm::get().is_err());
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    /// The trial machinery itself: an instruction that raises #UD on every
    /// processor (UD2, 0F 0B, padded to 3 bytes with a NOP) in the stub's
    /// place is caught, skipped, and reported as a fault; the program goes
    /// on, and the handlers are put back.
    #[test]
    fn a_faulting_trial_is_caught() {
        let _one = SIGNAL_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let result = lookup_raw(&[0x0f, 0x0b, 0x90]);
        assert!(matches!(result, Err(Trial::Faulted)), "{result:?}");
        // A stub whose "instruction" is harmless runs to its end.
        let result = lookup_raw(&[0x90, 0x90, 0x90]);
        assert!(matches!(result, Ok(0)), "{result:?}");
        // SAFETY: querying the current action changes nothing.
        let current = unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGILL, ptr::null(), &mut old);
            old.sa_sigaction
        };
        assert_ne!(current, on_fault as *const () as usize);
    }

    /// The signal tests change process-wide actions: one at a time.
    static SIGNAL_TESTS: Mutex<()> = Mutex::new(());
    static OWN_HANDLER_RAN: AtomicBool = AtomicBool::new(false);

    /// The program's own SIGILL handler in the next test: skips a UD2.
    extern "C" fn own_handler(_: libc::c_int, _: *mut libc::siginfo_t, context: *mut libc::c_void) {
        // SAFETY: as in `on_fault`.
        let gregs = unsafe { &mut (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        gregs[libc::REG_RIP as usize] += 2;
        OWN_HANDLER_RAN.store(true, Ordering::SeqCst);
    }

    /// A fault that is not the trial's instruction reaches the program's
    /// own handler, and the program's action is in place afterwards.
    #[test]
    fn foreign_faults_reach_the_programs_handler() {
        let _one = SIGNAL_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: installs a valid SA_SIGINFO handler, and later puts the
        // previous action back.
        let previous = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = own_handler as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            let mut previous: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(libc::SIGILL, &action, &mut previous), 0);
            previous
        };
        OWN_HANDLER_RAN.store(false, Ordering::SeqCst);
        // NOP, then UD2 one byte after the place of the call instruction.
        let result = lookup_raw(&[0x90, 0x0f, 0x0b]);
        assert!(result.is_ok(), "{result:?}");
        assert!(OWN_HANDLER_RAN.load(Ordering::SeqCst));
        // SAFETY: reads the current action, then restores the previous one.
        unsafe {
            let mut now: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGILL, ptr::null(), &mut now);
            assert_eq!(now.sa_sigaction, own_handler as *const () as usize);
            libc::sigaction(libc::SIGILL, &previous, ptr::null_mut());
        }
    }

    /// `lookup_with` with `insn` replaced by three other bytes.
    fn lookup_raw(insn: &[u8; 3]) -> Result<u64, Trial> {
        // Build the stub for VMCALL, then patch the instruction. The test
        // goes through the same page, handler and bookkeeping.
        PATCH.with(|p| p.set(Some(*insn)));
        let r = lookup_with(CallInsn::Vmcall, b"\0");
        PATCH.with(|p| p.set(None));
        r
    }

    thread_local! {
        pub(super) static PATCH: std::cell::Cell<Option<[u8; 3]>> = const { std::cell::Cell::new(None) };
    }
}

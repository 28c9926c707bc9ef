//! The services behind the standard VMM calls (docs/vmm-call.md, Functions).

use crate::dbgsh::{Caller, Dbgsh, NoInfo, ShellEnv, ShellInfo, NEVER};
use crate::guest_log::{GuestLog, GuestLogBuffer};
use crate::log_ring::LogRing;
use crate::vcpu::Gpr;
use crate::vmmcall::{CallContext, CallOutcome, Registry};
use spin::Mutex;
use thinvisor_abi::{dbgsh, names};
use thinvisor_memory::{
    pf_error, translate, write_linear, Access, GuestLinearAddr, TranslateError,
};

/// Bytes of log the VMM keeps for `log_read`.
pub const LOG_RING_SIZE: usize = 64 * 1024;

/// The VMM's log.
pub type VmmLog = Mutex<LogRing<LOG_RING_SIZE>>;

/// State shared by the services of one VMM.
pub struct Services {
    /// The buffer `log_set_buf` registered, its write position and drop
    /// accounting. The hypervisor's logging path writes every log line
    /// into it (`GuestLogBuffer::write`) with the VM's guest memory.
    pub guest_log: GuestLog,
    /// The log `log_read` reads.
    pub log: &'static VmmLog,
    /// The debug shell: one session, shared by every caller.
    pub dbgsh: Mutex<Dbgsh>,
    /// What the shell's `stat` and `cpu` print.
    pub shell_info: &'static dyn ShellInfo,
    /// The clock of the shell's takeover rule (crate::dbgsh).
    pub clock: fn() -> u64,
}

/// A clock that never moves (no takeovers).
fn no_clock() -> u64 {
    0
}

impl Services {
    pub fn new(log: &'static VmmLog) -> Self {
        Self {
            guest_log: Mutex::new(GuestLogBuffer::new()),
            log,
            dbgsh: Mutex::new(Dbgsh::new(true, NEVER)),
            shell_info: &NoInfo,
            clock: no_clock,
        }
    }

    /// The same with the shell's `stat`/`cpu` lines from `info`, the
    /// shell disabled (`dbgsh=off`) unless `enabled`, and a session left
    /// without calls for `takeover_after` ticks of `clock` open to
    /// another client.
    pub fn with_shell(
        mut self,
        info: &'static dyn ShellInfo,
        enabled: bool,
        clock: fn() -> u64,
        takeover_after: u64,
    ) -> Self {
        self.shell_info = info;
        self.clock = clock;
        self.dbgsh = Mutex::new(Dbgsh::new(enabled, takeover_after));
        self
    }
}

/// Register every standard service. Called once at start-up; the order
/// fixes the numbers (dbgsh = 1, log_set_buf = 2, log_read = 3).
pub fn register_all(registry: &mut Registry) {
    for (name, function) in [
        (names::DBGSH, dbgsh_call as crate::VmmCallFn),
        (names::LOG_SET_BUF, log_set_buf_call),
        (names::LOG_READ, log_read_call),
    ] {
        // The registry starts empty and holds more than these few names.
        let _ = registry.register(name, function);
    }
}

/// dbgsh: RBX = the client's answer (-1 = none), RAX = the shell's
/// pending value (crate::dbgsh). The client is the caller's address space
/// (CR3 without the PCID and cache-control bits). Every register but RAX
/// is kept. The shell's lock is held for the call; it takes the log's
/// lock (`log`), the log_set_buf buffer's (`stat`, and logging a session's
/// start) and reads guest memory (`mem`) under it, and nothing takes them
/// the other way round.
fn dbgsh_call(ctx: &mut CallContext<'_>) -> CallOutcome {
    let answer = ctx.vcpu.gpr(Gpr::Rbx);
    // Outside 64-bit mode RBX is 32 bits: -1 is 0xFFFF_FFFF there.
    let answer = match ctx.vcpu.mode().long64 {
        true => answer,
        false if answer as u32 == u32::MAX => dbgsh::NOTHING,
        false => answer & 0xFFFF_FFFF,
    };
    let caller = Caller {
        client: ctx.vcpu.cr3() & !0xFFF,
        now: (ctx.services.clock)(),
    };
    let mut shell = ctx.services.dbgsh.lock();
    // A polling client with a value still pending: no environment to make.
    if let Some(rax) = shell.call_quick(answer, caller) {
        drop(shell);
        ctx.vcpu.set_gpr(Gpr::Rax, rax);
        return CallOutcome::Return;
    }
    let guest_log = &ctx.services.guest_log;
    let log_buffer_line = |out: &mut crate::dbgsh::Line| guest_log.lock().stat_line(out);
    let env = ShellEnv {
        log: ctx.services.log,
        memory: ctx.vcpu.memory(),
        info: ctx.services.shell_info,
        registry: ctx.registry,
        extra_stat: Some(&log_buffer_line),
    };
    let rax = shell.call(answer, caller, &env);
    drop(shell);
    ctx.vcpu.set_gpr(Gpr::Rax, rax);
    CallOutcome::Return
}

/// What `log_set_buf` returns when it refuses a buffer (all ones; the
/// registration stays as it was).
pub const LOG_SET_BUF_REFUSED: u64 = u64::MAX;

/// log_set_buf: CPL 0 only (ignored otherwise: no register changes, no
/// log line); RBX = guest-physical address of the buffer (0 unregisters),
/// RCX = its size (32-bit registers outside 64-bit mode). RAX = 0 when the
/// buffer is registered (its counter set to 0) or unregistered,
/// [`LOG_SET_BUF_REFUSED`] when it is refused (crate::guest_log::Refusal).
/// Every call at CPL 0 logs one info line saying what happened; it is
/// logged after the lock is released (logging takes it), so a newly
/// registered buffer receives it as its first line.
fn log_set_buf_call(ctx: &mut CallContext<'_>) -> CallOutcome {
    let mode = ctx.vcpu.mode();
    if mode.cpl != 0 {
        return CallOutcome::Return;
    }
    let width = if mode.long64 { u64::MAX } else { 0xFFFF_FFFF };
    let address = ctx.vcpu.gpr(Gpr::Rbx) & width;
    let size = ctx.vcpu.gpr(Gpr::Rcx) & width;
    if address == 0 {
        ctx.services.guest_log.lock().unregister();
        ctx.vcpu.set_gpr(Gpr::Rax, 0);
        log::info!("log_set_buf: unregistered");
        return CallOutcome::Return;
    }
    let memory = ctx.vcpu.memory();
    let result = ctx
        .services
        .guest_log
        .lock()
        .register(memory, address, size);
    match result {
        Ok(()) => {
            ctx.vcpu.set_gpr(Gpr::Rax, 0);
            log::info!("log_set_buf: registered {address:#x}, {size} bytes");
        }
        Err(why) => {
            ctx.vcpu.set_gpr(Gpr::Rax, LOG_SET_BUF_REFUSED);
            log::info!("log_set_buf: refused {address:#x}, {size} bytes: {why}");
        }
    }
    CallOutcome::Return
}

/// What `log_read` returns when the caller may not write its buffer.
pub const LOG_READ_REFUSED: u64 = u64::MAX;

/// log_read: RBX = guest-linear buffer, RCX = its length, RDX = stream
/// offset to read from. Returns RAX = bytes copied, RBX = stream offset of
/// the first byte copied; RAX = all ones when the caller may not write the
/// buffer. A not-present page is faulted in through the guest: the call
/// asks the core to inject the #PF and run the VMCALL again.
///
/// The log's lock is never held while guest memory is walked: logging
/// takes the same (spin) lock, so a log line written on that path (by the
/// walker, the backend, a debug message) would deadlock. The bytes are
/// copied out of the ring under the lock one guest page at a time into a
/// buffer on the stack, and written to the guest without it. Lines logged
/// during the call may push the next page's bytes out of the ring; the
/// call then ends short, after the bytes it copied, and the reader's next
/// call (from RBX + RAX) learns what it missed as usual.
fn log_read_call(ctx: &mut CallContext<'_>) -> CallOutcome {
    let mode = ctx.vcpu.mode();
    let width = if mode.long64 { u64::MAX } else { 0xFFFF_FFFF };
    // Each argument is read once, before any decision (no double fetch).
    let buffer = ctx.vcpu.gpr(Gpr::Rbx) & width;
    let len = ctx.vcpu.gpr(Gpr::Rcx) & width;
    let from = ctx.vcpu.gpr(Gpr::Rdx) & width;
    let access = Access {
        write: true,
        user: mode.cpl == 3,
        fetch: false,
    };
    let mut page = [0u8; PAGE_SIZE];
    // Where the stream starts for this reader, how much it gets, and the
    // first piece (up to the end of the buffer's first page), decided
    // under one lock so that the piece is the bytes at `first`.
    let (first, n, mut piece) = {
        let log = ctx.services.log.lock();
        let first = from.max(log.start()).min(log.end());
        let n = (log.end() - first).min(len);
        let piece = piece_len(buffer, n);
        let (_, got) = log.read(first, &mut page[..piece]);
        (first, n, got)
    };
    let mut done = 0;
    if n > 0 {
        // Every page is checked before any byte is written, so a fault
        // part-way leaves the buffer untouched and the retry starts afresh.
        if let Err(e) = check_writable(ctx, buffer, n, access, width) {
            return match e {
                TranslateError::PageFault { la, error_code }
                    if error_code & pf_error::PRESENT == 0 =>
                {
                    CallOutcome::PageFault { la, error_code }
                }
                _ => refuse(ctx),
            };
        }
        let paging = ctx.vcpu.paging();
        loop {
            let at = GuestLinearAddr::new(buffer.wrapping_add(done) & width);
            let memory = ctx.vcpu.memory();
            if write_linear(memory, &paging, at, &page[..piece], access).is_err() {
                return refuse(ctx);
            }
            done += piece as u64;
            if done == n {
                break;
            }
            piece = piece_len(buffer.wrapping_add(done), n - done);
            let log = ctx.services.log.lock();
            if log.read(first + done, &mut page[..piece]) != (first + done, piece) {
                // Overwritten since the call began: end short.
                break;
            }
        }
    }
    ctx.vcpu.set_gpr(Gpr::Rax, done);
    ctx.vcpu.set_gpr(Gpr::Rbx, first);
    CallOutcome::Return
}

/// Bytes `log_read` copies at a time: one guest page.
const PAGE_SIZE: usize = 4096;

/// How many of the `left` bytes still to copy go to the guest page that
/// holds linear address `at`.
fn piece_len(at: u64, left: u64) -> usize {
    let to_page_end = PAGE_SIZE as u64 - (at & (PAGE_SIZE as u64 - 1));
    // At most PAGE_SIZE, so the conversion is exact.
    left.min(to_page_end) as usize
}

/// `log_read`'s answer for a buffer the caller may not write.
fn refuse(ctx: &mut CallContext<'_>) -> CallOutcome {
    ctx.vcpu.set_gpr(Gpr::Rax, LOG_READ_REFUSED);
    CallOutcome::Return
}

/// Translate every page of [la, la + len) for `access` and check that
/// the guest-physical bytes behind it are memory the VMM may write (not
/// MMIO, a hole, or thinvisor's own block); the first failure. A page that
/// translates but lies outside guest RAM must fail here, before any byte
/// of an earlier page is written (the hostile test guest found buffers
/// running from a good page into the local APIC half-written).
fn check_writable(
    ctx: &CallContext<'_>,
    la: u64,
    len: u64,
    access: Access,
    width: u64,
) -> Result<(), TranslateError> {
    if width == u64::MAX && la.checked_add(len).is_none() {
        // 64-bit linear addresses do not wrap around 2^64.
        return Err(TranslateError::NonCanonical {
            la: GuestLinearAddr::new(la),
        });
    }
    let paging = ctx.vcpu.paging();
    let memory = ctx.vcpu.memory();
    let first_page = la & !0xFFF;
    let pages = ((la & 0xFFF) + len).div_ceil(4096);
    for i in 0..pages {
        let page = first_page.wrapping_add(i * 4096) & width;
        // The first page is checked at the buffer's own address so a
        // fault reports it as CR2.
        let at = if i == 0 { la } else { page };
        let t = translate(memory, &paging, GuestLinearAddr::new(at), access)?;
        // The bytes of the buffer in this page (at most to the page's end).
        let in_page = (4096 - (at & 0xFFF)).min(la.wrapping_add(len).wrapping_sub(at));
        memory
            .map(t.gpa, in_page as usize)
            .map_err(|e| TranslateError::PhysUnreadable { gpa: e.gpa })?;
    }
    Ok(())
}

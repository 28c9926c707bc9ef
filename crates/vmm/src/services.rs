//! The services behind the standard VMM calls.
//!
//! This issue gives them their minimal behaviour; dbgsh's shell and the
//! log buffers come with the issues that build them.

use crate::vcpu::Gpr;
use crate::vmmcall::{CallContext, Registry};
use thinvisor_abi::{dbgsh, names};

/// State shared by the services of one VMM.
#[derive(Default)]
pub struct Services {
    /// Guest-physical address and size of the buffer `log_set_buf`
    /// registered (0 = none).
    pub log_buf: Option<(u64, u64)>,
}

/// Register every standard service. Called once at start-up; the order
/// fixes the numbers (dbgsh = 1, log_set_buf = 2).
pub fn register_all(registry: &mut Registry) {
    for (name, function) in [
        (names::DBGSH, dbgsh_call as crate::VmmCallFn),
        (names::LOG_SET_BUF, log_set_buf_call),
    ] {
        // The registry starts empty and holds more than these few names.
        let _ = registry.register(name, function);
    }
}

/// dbgsh: the shell has nothing to say yet, whatever the client answers.
fn dbgsh_call(ctx: &mut CallContext<'_>) {
    ctx.vcpu.set_gpr(Gpr::Rax, dbgsh::NOTHING);
}

/// log_set_buf: CPL 0 only (ignored otherwise); RBX = guest-physical
/// address (0 unregisters), RCX = size. Recorded; the log does not write
/// to it yet.
fn log_set_buf_call(ctx: &mut CallContext<'_>) {
    if ctx.vcpu.mode().cpl != 0 {
        return;
    }
    let address = ctx.vcpu.gpr(Gpr::Rbx);
    let size = ctx.vcpu.gpr(Gpr::Rcx);
    ctx.services.log_buf = (address != 0).then_some((address, size));
}

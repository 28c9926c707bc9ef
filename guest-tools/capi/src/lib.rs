//! BitVisor's `call_vmm` C API (its `tools/common/call_vmm.h`) for
//! thinvisor, as a static library: `libthinvisor_call_vmm.a` with the header
//! `guest-tools/include/call_vmm.h`. Written from the ABI
//! (docs/vmm-call.md), on top of `guest_tools::vmm`, so C programs get the
//! same safe detection as the Rust tools: no call instruction runs unless
//! CPUID leaf 0x40000000 says thinvisor, then the vendor's instruction is
//! tried under a SIGILL/SIGSEGV handler, then the other.
//!
//! The structures and names are BitVisor's, so its tools build and link
//! unchanged:
//!
//! ```c
//! call_vmm_function_t f; call_vmm_arg_t a; call_vmm_ret_t r;
//! CALL_VMM_GET_FUNCTION ("dbgsh", &f);
//! if (!call_vmm_function_callable (&f)) { ... }
//! a.rbx = (long)-1; call_vmm_call_function (&f, &a, &r);
//! ```

use std::ffi::{c_char, c_int, CStr};

use guest_tools::vmm::Vmm;
use guest_tools::CallInsn;

/// `vmmcall_type` when there is no VMM (BitVisor's meaning of 0).
pub const CALL_VMM_TYPE_NONE: c_int = 0;
/// `vmmcall_type` when thinvisor answers Intel's VMCALL.
pub const CALL_VMM_TYPE_VMCALL: c_int = 1;
/// `vmmcall_type` when thinvisor answers AMD's VMMCALL.
pub const CALL_VMM_TYPE_VMMCALL: c_int = 2;

/// A function found by name: its number (0: none) and how to call it
/// (0: no VMM at all).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct call_vmm_function_t {
    pub vmmcall_number: c_int,
    pub vmmcall_type: c_int,
}

/// The arguments: RBX, RCX, RDX, RSI, RDI.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct call_vmm_arg_t {
    pub rbx: isize,
    pub rcx: isize,
    pub rdx: isize,
    pub rsi: isize,
    pub rdi: isize,
}

/// The results: RAX, RBX, RCX, RDX, RSI, RDI.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct call_vmm_ret_t {
    pub rax: isize,
    pub rbx: isize,
    pub rcx: isize,
    pub rdx: isize,
    pub rsi: isize,
    pub rdi: isize,
}

/// What `call_vmm_get_function` stores for `name` (a C string's bytes,
/// without the NUL): the pure part, shared with the tests.
fn function_for(name: &[u8]) -> call_vmm_function_t {
    let Ok(vmm) = Vmm::get() else {
        return call_vmm_function_t::default();
    };
    let vmmcall_type = match vmm.insn() {
        CallInsn::Vmcall => CALL_VMM_TYPE_VMCALL,
        CallInsn::Vmmcall => CALL_VMM_TYPE_VMMCALL,
    };
    // An unknown name, a failed lookup, or a number a C int cannot hold
    // (thinvisor's are small) all mean "not callable".
    let vmmcall_number = vmm
        .lookup(name)
        .ok()
        .flatten()
        .and_then(|n| c_int::try_from(n).ok())
        .unwrap_or(0);
    call_vmm_function_t {
        vmmcall_number,
        vmmcall_type,
    }
}

/// Fills `*function` for the function named `name` (what the header's
/// `CALL_VMM_GET_FUNCTION` expands to). Without thinvisor it stores
/// {0, 0} and makes no VMM call; for an unknown name {0, type}. A null
/// pointer is ignored (name) or leaves nothing to fill (function).
///
/// # Safety
///
/// `name` is null or a NUL-terminated string; `function` is null or points
/// to a writable `call_vmm_function_t`.
#[no_mangle]
pub unsafe extern "C" fn call_vmm_get_function(
    name: *const c_char,
    function: *mut call_vmm_function_t,
) {
    if function.is_null() {
        return;
    }
    let found = if name.is_null() {
        call_vmm_function_t {
            vmmcall_number: 0,
            vmmcall_type: function_for(b"").vmmcall_type,
        }
    } else {
        // SAFETY: the caller passes a NUL-terminated string.
        function_for(unsafe { CStr::from_ptr(name) }.to_bytes())
    };
    // SAFETY: the caller passes a writable structure.
    unsafe { function.write(found) };
}

/// Calls `*function` with `*arg` and stores the six registers in `*ret`.
/// When the function is not callable (no VMM, unknown name, null
/// pointers) no call is made and `*ret` (if any) is all zeros: RAX = 0 is
/// what thinvisor answers for a number that names no function.
///
/// # Safety
///
/// Each pointer is null or points to a valid structure of its type (`ret`
/// writable). Whatever the called function does with the arguments (a
/// buffer address, say) is the caller's to make valid, as in C.
#[no_mangle]
pub unsafe extern "C" fn call_vmm_call_function(
    function: *const call_vmm_function_t,
    arg: *const call_vmm_arg_t,
    ret: *mut call_vmm_ret_t,
) {
    if ret.is_null() {
        return;
    }
    let mut out = call_vmm_ret_t::default();
    if !function.is_null() && !arg.is_null() {
        // SAFETY: the caller passes valid structures.
        let (f, a) = unsafe { (*function, *arg) };
        let callable = f.vmmcall_type != CALL_VMM_TYPE_NONE && f.vmmcall_number > 0;
        if let (true, Ok(vmm)) = (callable, Vmm::get()) {
            let r = vmm.call(
                f.vmmcall_number as u64,
                [a.rbx, a.rcx, a.rdx, a.rsi, a.rdi].map(|v| v as u64),
            );
            out = call_vmm_ret_t {
                rax: r.rax as isize,
                rbx: r.rbx as isize,
                rcx: r.rcx as isize,
                rdx: r.rdx as isize,
                rsi: r.rsi as isize,
                rdi: r.rdi as isize,
            };
        }
    }
    // SAFETY: the caller passes a writable structure.
    unsafe { ret.write(out) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The C layout the header declares.
    #[test]
    fn layouts() {
        assert_eq!(size_of::<call_vmm_function_t>(), 8);
        assert_eq!(offset_of!(call_vmm_function_t, vmmcall_type), 4);
        assert_eq!(size_of::<call_vmm_arg_t>(), 40);
        assert_eq!(offset_of!(call_vmm_arg_t, rdi), 32);
        assert_eq!(size_of::<call_vmm_ret_t>(), 48);
        assert_eq!(offset_of!(call_vmm_ret_t, rdi), 40);
    }

    /// This host is no thinvisor: the lookup says "no VMM" and a call of
    /// it makes no VMM call and answers zeros.
    #[test]
    fn no_vmm_here() {
        let mut f = call_vmm_function_t {
            vmmcall_number: 7,
            vmmcall_type: 7,
        };
        // SAFETY: a C string and a valid structure.
        unsafe { call_vmm_get_function(c"dbgsh".as_ptr(), &mut f) };
        assert_eq!((f.vmmcall_number, f.vmmcall_type), (0, 0));
        let a = call_vmm_arg_t {
            rbx: -1,
            ..Default::default()
        };
        let mut r = call_vmm_ret_t {
            rax: 5,
            ..Default::default()
        };
        // A forged "callable" function is still not called without a VMM.
        let forged = call_vmm_function_t {
            vmmcall_number: 1,
            vmmcall_type: CALL_VMM_TYPE_VMCALL,
        };
        // SAFETY: valid structures.
        unsafe { call_vmm_call_function(&forged, &a, &mut r) };
        assert_eq!(r.rax, 0);
        // Null pointers are ignored.
        // SAFETY: null is allowed.
        unsafe {
            call_vmm_get_function(std::ptr::null(), std::ptr::null_mut());
            call_vmm_call_function(std::ptr::null(), std::ptr::null(), std::ptr::null_mut());
            call_vmm_get_function(std::ptr::null(), &mut f);
        }
        assert_eq!((f.vmmcall_number, f.vmmcall_type), (0, 0));
    }
}

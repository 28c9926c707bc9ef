//! Run-wide state: which check is running and the tally so far, so that an
//! exception or panic handler can name the check and still print a summary.

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering::Relaxed};

/// The name of the running check (a `&'static str` split in two atomics).
static CURRENT_PTR: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);
static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

/// Records the phase of the run that exception reports should name.
pub fn set_current_check(name: &'static str) {
    CURRENT_PTR.store(name.as_ptr().cast_mut(), Relaxed);
    CURRENT_LEN.store(name.len(), Relaxed);
}

/// The name last given to `set_current_check`, or "start-up".
pub fn current_check() -> &'static str {
    let ptr = CURRENT_PTR.load(Relaxed);
    if ptr.is_null() {
        return "start-up";
    }
    let len = CURRENT_LEN.load(Relaxed);
    // SAFETY: ptr and len were taken together from a `&'static str` (one
    // CPU, no interrupts: the two stores cannot interleave with this read).
    unsafe { core::str::from_utf8_unchecked(core::slice::from_raw_parts(ptr, len)) }
}

/// Counts one check's outcome.
pub fn record(passed: bool) {
    if passed {
        PASSED.fetch_add(1, Relaxed);
    } else {
        FAILED.fetch_add(1, Relaxed);
    }
}

/// (passed, failed) so far.
pub fn tally() -> (u32, u32) {
    (PASSED.load(Relaxed), FAILED.load(Relaxed))
}

/*
 * call_vmm.h: BitVisor's call_vmm API (tools/common) for thinvisor.
 *
 * Written from the VMM-call ABI (docs/vmm-call.md); the implementation is
 * libthinvisor_call_vmm.a (guest-tools/capi). Programs written for
 * BitVisor's header build and link unchanged:
 *
 *     call_vmm_function_t f; call_vmm_arg_t a; call_vmm_ret_t r;
 *     CALL_VMM_GET_FUNCTION ("dbgsh", &f);
 *     if (!call_vmm_function_callable (&f)) { ... }
 *     a.rbx = (long)-1; call_vmm_call_function (&f, &a, &r); ... r.rax ...
 *
 * Detection is safe: no call instruction runs unless CPUID leaf 0x40000000
 * carries thinvisor's signature; then the vendor's instruction (VMCALL on
 * Intel, VMMCALL on AMD) is tried under a SIGILL/SIGSEGV handler, then the
 * other. Names are looked up from a page that holds both the name and the
 * call instruction, so thinvisor can always read the name.
 *
 * Build (x86-64 Linux, glibc, static):
 *     cc -static -I guest-tools/include prog.c libthinvisor_call_vmm.a \
 *        -lpthread -lm -ldl -lrt -lutil -o prog
 */
#ifndef THINVISOR_CALL_VMM_H
#define THINVISOR_CALL_VMM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A function found by name. vmmcall_number: its number, 0 when the VMM
 * does not know the name. vmmcall_type: 0 when there is no VMM at all,
 * 1 when the VMM answers VMCALL, 2 when it answers VMMCALL. */
typedef struct {
	int vmmcall_number;
	int vmmcall_type;
} call_vmm_function_t;

/* Arguments, in RBX, RCX, RDX, RSI, RDI. */
typedef struct {
	intptr_t rbx, rcx, rdx, rsi, rdi;
} call_vmm_arg_t;

/* Results, from RAX, RBX, RCX, RDX, RSI, RDI. */
typedef struct {
	intptr_t rax, rbx, rcx, rdx, rsi, rdi;
} call_vmm_ret_t;

/* Fills *function for the function called name (a NUL-terminated string
 * of at most 255 bytes). Without thinvisor: {0, 0}, and no VMM call is
 * made. Prefer the macro below, BitVisor's spelling. */
void call_vmm_get_function (const char *name, call_vmm_function_t *function);

/* Calls *function with *arg; the six registers it returns go to *ret.
 * Nothing is called when the function is not callable; *ret is then all
 * zeros. */
void call_vmm_call_function (call_vmm_function_t *function,
			     call_vmm_arg_t *arg, call_vmm_ret_t *ret);

#define CALL_VMM_GET_FUNCTION(name, function) \
	call_vmm_get_function ((name), (function))

/* Non-zero when the VMM is there and knows the function. */
static inline int
call_vmm_function_callable (call_vmm_function_t *function)
{
	return function->vmmcall_type && function->vmmcall_number;
}

/* Non-zero when there is no VMM at all (as opposed to an unknown name). */
static inline int
call_vmm_function_no_vmm (call_vmm_function_t *function)
{
	return !function->vmmcall_type;
}

#ifdef __cplusplus
}
#endif

#endif /* THINVISOR_CALL_VMM_H */

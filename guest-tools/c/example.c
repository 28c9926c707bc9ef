/*
 * call-vmm-example: a C program on thinvisor's build of BitVisor's
 * call_vmm API (include/call_vmm.h, libthinvisor_call_vmm.a). It looks up
 * dbgsh and log_read by name, holds a short dbgsh session (reads the
 * banner up to the prompt, types "exit", reads to the end of the session)
 * and reads the start of the VMM log, printing lines the Linux test cases
 * check:
 *
 *   c-example: dbgsh = N, log_read = M
 *   c-example: dbgsh banner ok
 *   c-example: dbgsh session ended
 *   c-example: log_read ok (N bytes from offset M)
 *   c-example: done
 *
 * Exit status: 0 all went well, 2 no VMM (no call made), 3 a function is
 * unknown, 1 anything else.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "call_vmm.h"

#define DBGSH_NOTHING ((intptr_t)-1)
#define DBGSH_WANT_INPUT 0
#define DBGSH_NUL 0x100
#define DBGSH_END 0x10a
/* Give up on a shell that does not end within this many seconds. */
#define DBGSH_LIMIT_S 60

static int
dbgsh_session (call_vmm_function_t *f)
{
	static char out[8192];
	size_t len = 0;
	const char *typed = "exit\n";
	size_t typed_at = 0;
	call_vmm_arg_t a;
	call_vmm_ret_t r;
	time_t start = time (NULL);

	memset (&a, 0, sizeof a);
	a.rbx = DBGSH_NOTHING;
	for (;;) {
		call_vmm_call_function (f, &a, &r);
		if (r.rax == DBGSH_END) {
			a.rbx = 0;
			call_vmm_call_function (f, &a, &r);
			break;
		} else if (r.rax == DBGSH_NOTHING) {
			a.rbx = DBGSH_NOTHING;
			if (time (NULL) - start > DBGSH_LIMIT_S) {
				printf ("c-example: dbgsh FAILED (no answer)\n");
				return 1;
			}
		} else if (r.rax == DBGSH_WANT_INPUT) {
			if (!typed[typed_at]) {
				printf ("c-example: dbgsh FAILED (input after exit)\n");
				return 1;
			}
			/* Type only once the prompt is there. */
			a.rbx = (unsigned char)typed[typed_at++];
		} else if (r.rax > 0 && r.rax <= DBGSH_NUL) {
			if (len < sizeof out - 1)
				out[len++] = r.rax == DBGSH_NUL ? '\0' : (char)r.rax;
			a.rbx = 0;
		} else {
			printf ("c-example: dbgsh FAILED (value %#lx)\n",
				(unsigned long)r.rax);
			return 1;
		}
	}
	out[len] = '\0';
	if (strstr (out, "dbgsh> "))
		printf ("c-example: dbgsh banner ok\n");
	else
		printf ("c-example: dbgsh FAILED (no prompt in \"%s\")\n", out);
	printf ("c-example: dbgsh session ended\n");
	return strstr (out, "dbgsh> exit") ? 0 : 1;
}

static int
read_log (call_vmm_function_t *f)
{
	static char buf[4096];
	call_vmm_arg_t a;
	call_vmm_ret_t r;

	memset (&a, 0, sizeof a);
	a.rbx = (intptr_t)buf;
	a.rcx = sizeof buf - 1;
	a.rdx = 0;
	call_vmm_call_function (f, &a, &r);
	if (r.rax == (intptr_t)-1 || r.rax < 0 || r.rax > a.rcx) {
		printf ("c-example: log_read FAILED (rax %#lx)\n",
			(unsigned long)r.rax);
		return 1;
	}
	buf[r.rax] = '\0';
	if (!strstr (buf, "thinvisor")) {
		printf ("c-example: log_read FAILED (%ld bytes without \"thinvisor\")\n",
			(long)r.rax);
		return 1;
	}
	printf ("c-example: log_read ok (%ld bytes from offset %ld)\n",
		(long)r.rax, (long)r.rbx);
	return 0;
}

int
main (void)
{
	call_vmm_function_t dbgsh, log_read;
	int failed = 0;

	CALL_VMM_GET_FUNCTION ("dbgsh", &dbgsh);
	if (call_vmm_function_no_vmm (&dbgsh)) {
		printf ("c-example: no VMM\n");
		return 2;
	}
	CALL_VMM_GET_FUNCTION ("log_read", &log_read);
	printf ("c-example: dbgsh = %d, log_read = %d\n",
		dbgsh.vmmcall_number, log_read.vmmcall_number);
	if (!call_vmm_function_callable (&dbgsh) ||
	    !call_vmm_function_callable (&log_read)) {
		printf ("c-example: a function is unknown\n");
		return 3;
	}
	fflush (stdout);
	failed |= dbgsh_session (&dbgsh);
	failed |= read_log (&log_read);
	printf ("c-example: %s\n", failed ? "FAILED" : "done");
	return failed;
}

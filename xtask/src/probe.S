# A tiny multiboot1+2 kernel for `cargo xtask selftest`: prints the loader,
# its command line and module strings to COM1 (and port 0xE9), then ends the
# run (QEMU: exit code 0x10 on port 0xF4; Bochs: "Shutdown" on port 0x8900).
    .code32
    .section .text
    .globl _start
    .align 8
mb1:
    .long 0x1BADB002
    .long 0
    .long -(0x1BADB002)
    .align 8
mb2:
    .long 0xE85250D6
    .long 0
    .long mb2_end - mb2
    .long -(0xE85250D6 + (mb2_end - mb2))
    .word 0, 0
    .long 8
mb2_end:
_start:
    cli
    mov $stack_top, %esp
    mov %eax, %edi          # magic
    mov %ebx, %ebp          # info
    mov $0x3f9, %dx
    xor %al, %al
    outb %al, %dx
    mov $0x3fb, %dx
    mov $0x80, %al
    outb %al, %dx
    mov $0x3f8, %dx
    mov $1, %al
    outb %al, %dx
    mov $0x3f9, %dx
    xor %al, %al
    outb %al, %dx
    mov $0x3fb, %dx
    mov $3, %al
    outb %al, %dx
    mov $0x3fa, %dx
    mov $0xc7, %al
    outb %al, %dx
    mov $0x3fc, %dx
    mov $3, %al
    outb %al, %dx
    cmp $0x2BADB002, %edi
    je  1f
    cmp $0x36d76289, %edi
    je  2f
    mov $s_unknown, %esi
    call puts
    jmp done
1:  mov $s_mb1, %esi
    call puts
    testl $4, (%ebp)
    jz  11f
    mov $s_cmd, %esi
    call puts
    mov 16(%ebp), %esi
    call puts
    call nl
11: testl $8, (%ebp)
    jz  done
    mov 20(%ebp), %ecx
    mov 24(%ebp), %ebx
12: test %ecx, %ecx
    jz done
    mov $s_mod, %esi
    call puts
    mov 8(%ebx), %esi
    call puts
    call nl
    add $16, %ebx
    dec %ecx
    jmp 12b
2:  mov $s_mb2, %esi
    call puts
    lea 8(%ebp), %ebx
21: mov (%ebx), %eax
    test %eax, %eax
    jz done
    cmp $1, %eax
    jne 22f
    mov $s_cmd, %esi
    call puts
    lea 8(%ebx), %esi
    call puts
    call nl
    jmp 23f
22: cmp $3, %eax
    jne 23f
    mov $s_mod, %esi
    call puts
    lea 16(%ebx), %esi
    call puts
    call nl
23: mov 4(%ebx), %eax
    add $7, %eax
    and $~7, %eax
    add %eax, %ebx
    jmp 21b
done:
    mov $s_done, %esi
    call puts
    # wait for UART to drain (LSR bit 6)
    mov $0x3fd, %dx
3:  inb %dx, %al
    test $0x40, %al
    jz 3b
    mov $0xf4, %dx
    mov $0x10, %eax
    outl %eax, %dx
    mov $0x8900, %dx
    mov $s_shutdown, %esi
4:  lodsb
    test %al, %al
    jz 5f
    outb %al, %dx
    jmp 4b
5:  cli
    hlt
    jmp 5b

putc:   # al
    push %edx
    push %eax
    mov $0x3fd, %dx
6:  inb %dx, %al
    test $0x20, %al
    jz 6b
    pop %eax
    mov $0x3f8, %dx
    outb %al, %dx
    mov $0xe9, %dx
    outb %al, %dx
    pop %edx
    ret
puts:   # esi
    push %eax
7:  lodsb
    test %al, %al
    jz 8f
    call putc
    jmp 7b
8:  pop %eax
    ret
nl: push %eax
    mov $'\n', %al
    call putc
    pop %eax
    ret

    .section .rodata
s_mb1: .asciz "probe: multiboot1\n"
s_mb2: .asciz "probe: multiboot2\n"
s_unknown: .asciz "probe: unknown loader\n"
s_cmd: .asciz "cmdline: "
s_mod: .asciz "module: "
s_done: .asciz "probe: done\n"
s_shutdown: .asciz "Shutdown"
    .section .bss
    .align 16
    .space 4096
stack_top:

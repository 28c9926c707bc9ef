/*
 * The boot-sector test disk for `boot=chain` (cases *-chain-bootsector).
 *
 * thinvisor's chain-boot stub loads sector 0 of BIOS drive 80h to
 * 0000:7C00 and jumps here with DL = 80h. This disk then asks the BIOS
 * everything a real OS loader asks, prints the answers on COM1 and ends
 * the run itself:
 *
 *   - sector 0 (the MBR): a marker, then INT 13h AH=02h reads the
 *     sectors after it to 0000:7E00 and checks the signature that opens
 *     sector 1; the rest of the test is the code after that signature;
 *   - every INT 15h E820h entry as `e820: BASE LEN TYPE` (hex; 24-byte
 *     buffer), then a 20-byte call and two that must fail (CF): a wrong
 *     signature, a continuation value past the table; E801h,
 *     AH=88h, INT 12h and the BIOS data area's 0x413 (the xtask compares
 *     them with thinvisor's reserved block, which it reads from
 *     thinvisor's own log: see xtask/src/bootsector.rs);
 *   - INT 15h AH=C0h, a function thinvisor's handler passes on to the
 *     BIOS: it must still succeed;
 *   - CPUID leaf 40000000h (thinvisor's signature) and a VMM call from
 *     real mode: function 0 looks up "log_read" (RBX = its linear
 *     address), with VMMCALL on AMD and VMCALL on Intel (CPUID vendor);
 *     the answer must be 3;
 *   - `bootsector: PASS`, then QEMU's isa-debug-exit (port F4h, 10h =
 *     passed, 11h = failed) and Bochs' shutdown port (8900h).
 *
 * Assembled by the xtask: as --32, ld -m elf_i386 --oformat binary
 * -Ttext 0x7c00.
 */
    .code16
    .intel_syntax noprefix
    .text
    .globl _start

    .set COM1, 0x3F8
    .set QEMU_EXIT, 0xF4
    .set BOCHS_SHUTDOWN, 0x8900
    .set PASSED, 0x10
    .set FAILED, 0x11
    .set SMAP, 0x534D4150
    .set STAGE2_SECTORS, 8
    .set E820_BUF, 0x9000

_start:
    /* A known state: segments 0, stack below us, interrupts on. */
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7C00
    sti
    cld
    mov [boot_drive], dl
    mov si, offset msg_mbr
    call puts
    mov al, dl
    call puthex8
    call newline

    /* INT 13h AH=02h: sectors 2.. (CHS, 1-based; LBA 1..) of the boot
       drive, cylinder 0, head 0, to 0000:7E00. */
    mov ax, 0x0200 + STAGE2_SECTORS
    mov cx, 0x0002
    xor dh, dh
    mov dl, [boot_drive]
    mov bx, 0x7E00
    int 0x13
    jc fail_read
    /* Sector 1 must open with its signature. */
    mov si, offset sector1_signature
    mov di, offset expected_signature
    mov cx, 16
    repe cmpsb
    jne fail_signature
    mov si, offset msg_sector1
    call puts
    jmp stage2

fail_read:
    mov si, offset msg_fail_read
    jmp fail
fail_signature:
    mov si, offset msg_fail_signature
    /* Print "bootsector: FAIL <SI>" and end the run as failed. */
fail:
    push si
    mov si, offset msg_fail
    call puts
    pop si
    call puts
    mov al, FAILED
    jmp finish

/* Print the NUL-terminated string at DS:SI. */
puts:
    lodsb
    test al, al
    jz 1f
    call putc
    jmp puts
1:  ret

/* Print AL on COM1 once its transmitter holds nothing (LSR bit 5). */
putc:
    push dx
    push ax
    mov dx, COM1 + 5
1:  in al, dx
    test al, 0x20
    jz 1b
    pop ax
    mov dx, COM1
    out dx, al
    pop dx
    ret

newline:
    mov al, 13
    call putc
    mov al, 10
    jmp putc

/* Print EAX as 8 hex digits; AX as 4; AL as 2. */
puthex32:
    ror eax, 16
    call puthex16
    ror eax, 16
puthex16:
    xchg al, ah
    call puthex8
    xchg al, ah
puthex8:
    push ax
    shr al, 4
    call 1f
    pop ax
    push ax
    and al, 0x0F
    call 1f
    pop ax
    ret
1:  add al, '0'
    cmp al, '9'
    jbe putc
    add al, 'a' - '9' - 1
    jmp putc

/* Let COM1 drain (LSR bit 6), then write AL to QEMU's exit port and
   "Shutdown" to Bochs' (whichever emulator this is ends the run). */
finish:
    mov bl, al
    mov dx, COM1 + 5
1:  in al, dx
    test al, 0x40
    jz 1b
    mov al, bl
    out QEMU_EXIT, al
    mov si, offset shutdown
    mov dx, BOCHS_SHUTDOWN
2:  lodsb
    test al, al
    jz 3f
    out dx, al
    jmp 2b
3:  cli
    hlt
    jmp 3b

boot_drive:         .byte 0
msg_mbr:            .asciz "bootsector: MBR running, DL="
msg_sector1:        .asciz "bootsector: sector 1 read, signature ok\r\n"
msg_fail:           .asciz "bootsector: FAIL "
msg_fail_read:      .asciz "INT 13h read\r\n"
msg_fail_signature: .asciz "sector 1 signature\r\n"
shutdown:           .asciz "Shutdown"
expected_signature: .ascii "THINVISOR-CHAIN1"

    .org 510
    .word 0xAA55

/* ---- Sector 1: the signature, then the rest of the test ------------- */
sector1_signature:
    .ascii "THINVISOR-CHAIN1"

stage2:
    /* INT 15h E820h from continuation 0 until EBX comes back 0, with a
       24-byte buffer. Any CF, a wrong signature or size fails. */
    xor ebx, ebx
    xor bp, bp
e820_next:
    mov di, E820_BUF
    mov eax, 0xE820
    mov ecx, 24
    mov edx, SMAP
    int 0x15
    mov si, offset msg_e820_cf
    jc fail
    mov si, offset msg_e820_smap
    cmp eax, SMAP
    jne fail
    mov si, offset msg_e820_size
    cmp ecx, 20
    jb fail
    cmp ecx, 24
    ja fail
    inc bp
    /* e820: BASE LEN TYPE */
    mov si, offset msg_e820
    call puts
    mov eax, [E820_BUF + 4]
    call puthex32
    mov eax, [E820_BUF]
    call puthex32
    mov al, ' '
    call putc
    mov eax, [E820_BUF + 12]
    call puthex32
    mov eax, [E820_BUF + 8]
    call puthex32
    mov al, ' '
    call putc
    mov eax, [E820_BUF + 16]
    call puthex32
    call newline
    mov si, offset msg_e820_loop
    cmp bp, 200
    ja fail
    test ebx, ebx
    jnz e820_next
    mov si, offset msg_e820_cf
    test bp, bp
    jz fail

    /* The E820h edges: a 20-byte buffer gets 20 bytes; a wrong
       signature and a continuation value past the table get CF set. */
    mov di, E820_BUF
    xor ebx, ebx
    mov eax, 0xE820
    mov ecx, 20
    mov edx, SMAP
    int 0x15
    mov si, offset msg_e820_20
    jc fail
    cmp ecx, 20
    jne fail
    mov eax, 0xE820
    xor ebx, ebx
    mov ecx, 20
    mov edx, 0x12345678
    int 0x15
    mov si, offset msg_e820_badsig
    jnc fail
    mov eax, 0xE820
    mov ebx, 0xFFFF
    mov ecx, 20
    mov edx, SMAP
    int 0x15
    mov si, offset msg_e820_badebx
    jnc fail
    mov si, offset msg_e820_edges
    call puts

    /* E801h: AX, BX, CX, DX. */
    mov ax, 0xE801
    xor bx, bx
    xor cx, cx
    xor dx, dx
    int 0x15
    mov si, offset msg_e801_cf
    jc fail
    push ax                     /* puts clobbers AL */
    mov si, offset msg_e801
    call puts
    pop ax
    call puthex16
    mov al, ' '
    call putc
    mov ax, bx
    call puthex16
    mov al, ' '
    call putc
    mov ax, cx
    call puthex16
    mov al, ' '
    call putc
    mov ax, dx
    call puthex16
    call newline

    /* AH=88h: AX. */
    mov ah, 0x88
    int 0x15
    mov si, offset msg_88_cf
    jc fail
    push ax
    mov si, offset msg_88
    call puts
    pop ax
    call puthex16
    call newline

    /* INT 12h and the BIOS data area's word at 0x413: KiB of base memory. */
    int 0x12
    push ax
    mov si, offset msg_int12
    call puts
    pop ax
    call puthex16
    mov si, offset msg_bda
    call puts
    mov ax, [0x413]
    call puthex16
    call newline

    /* AH=C0h (system configuration): not a memory function, so the
       handler must pass it to the BIOS, which answers CF clear, AH 0. */
    mov ah, 0xC0
    int 0x15
    mov si, offset msg_c0
    jc fail
    test ah, ah
    jnz fail
    xor ax, ax
    mov es, ax
    mov si, offset msg_c0_ok
    call puts

    /* thinvisor's CPUID signature (leaf 40000000h, EBX = "thin"). */
    mov eax, 0x40000000
    cpuid
    mov si, offset msg_cpuid
    cmp ebx, 0x6E696874
    jne fail
    mov si, offset msg_cpuid_ok
    call puts

    /* The vendor picks the VMM-call instruction: "AuthenticAMD" (EBX =
       "Auth") uses VMMCALL, anything else VMCALL. */
    xor eax, eax
    cpuid
    mov dl, 1
    cmp ebx, 0x68747541
    je 1f
    xor dl, dl
1:  xor eax, eax
    mov ebx, offset name_log_read
    test dl, dl
    jz 2f
    .byte 0x0F, 0x01, 0xD9      /* VMMCALL */
    jmp 3f
2:  .byte 0x0F, 0x01, 0xC1      /* VMCALL */
3:  push eax
    mov si, offset msg_lookup
    call puts
    pop eax
    push eax
    call puthex32
    call newline
    pop eax
    mov si, offset msg_lookup_bad
    cmp eax, 3
    jne fail

    mov si, offset msg_pass
    call puts
    mov al, PASSED
    jmp finish

msg_e820:       .asciz "e820: "
msg_e820_cf:    .asciz "E820 returned CF or nothing\r\n"
msg_e820_smap:  .asciz "E820 returned no SMAP in EAX\r\n"
msg_e820_size:  .asciz "E820 returned a bad entry size in ECX\r\n"
msg_e820_loop:  .asciz "E820 never ends\r\n"
msg_e820_20:    .asciz "E820 with a 20-byte buffer did not return 20 bytes\r\n"
msg_e820_badsig: .asciz "E820 accepted a wrong signature\r\n"
msg_e820_badebx: .asciz "E820 accepted a continuation value past the table\r\n"
msg_e820_edges: .asciz "e820 edges: ok (20-byte entry; CF on bad signature, bad continuation)\r\n"
msg_e801:       .asciz "e801: "
msg_e801_cf:    .asciz "E801 returned CF\r\n"
msg_88:         .asciz "int15 88: "
msg_88_cf:      .asciz "AH=88h returned CF\r\n"
msg_int12:      .asciz "base memory: int12 "
msg_bda:        .asciz " bda "
msg_c0:         .asciz "INT 15h AH=C0h (passed on to the BIOS) returned an error\r\n"
msg_c0_ok:      .asciz "int15 c0: ok (passed on to the BIOS)\r\n"
msg_cpuid:      .asciz "no thinvisor CPUID signature\r\n"
msg_cpuid_ok:   .asciz "cpuid: thinvisor\r\n"
msg_lookup:     .asciz "vmm: lookup log_read = "
msg_lookup_bad: .asciz "log_read is not function 3\r\n"
msg_pass:       .asciz "bootsector: PASS\r\n"
name_log_read:  .asciz "log_read"

    /* The stage the MBR reads is exactly STAGE2_SECTORS long. */
    .org 512 * (1 + STAGE2_SECTORS)

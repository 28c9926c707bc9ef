//! `translate` on hostile registers, tables and addresses: it must not
//! panic, must agree exactly with the reference walker, and a successful
//! translation must be usable (offset kept, the page translating alike,
//! the byte readable exactly when it is RAM).

#![no_main]

use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use thinvisor_memory::{
    read_linear, reference, translate, GuestLinearAddr, GuestPhysAddr, GuestPhysMemory,
    IsolatedMemory, PagingMode, TranslateError,
};
use thinvisor_memory_fuzz::Setup;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(mut s) = Setup::new(&mut u, 4095) else {
        return;
    };
    let (regs, access) = (s.regs, s.access);
    let la = s.la & s.linear_mask();
    let want = reference::translate(&s.ram, &regs, s.la, access);
    let ram_len = s.ram.len() as u64;
    let mem = IsolatedMemory::new(&mut s.ram);
    let got = translate(&mem, &regs, GuestLinearAddr(s.la), access);
    assert_eq!(got, want, "translate {:#x} {:?} {:?}", s.la, regs, access);
    let Ok(t) = got else {
        return;
    };

    let sizes: &[u64] = match regs.mode() {
        PagingMode::Disabled => &[1 << 12],
        PagingMode::Bits32 => &[1 << 12, 1 << 22],
        PagingMode::Pae => &[1 << 12, 1 << 21],
        PagingMode::Level4 | PagingMode::Level5 => &[1 << 12, 1 << 21, 1 << 30],
    };
    assert!(sizes.contains(&t.page_size), "page size {:#x}", t.page_size);
    let in_page = t.page_size - 1;
    assert_eq!(t.gpa.0 & in_page, la & in_page, "offset not kept");
    assert!(t.gpa.0 < 1 << 52, "gpa beyond MAXPHYADDR");
    if access.user {
        assert!(t.user);
    }
    if access.write && access.user {
        assert!(t.writable);
    }

    // Another byte of the same page maps into the same frame.
    let other = (la & !in_page) | ((s.len as u64 * 0x9E37) & in_page);
    if let Ok(o) = translate(&mem, &regs, GuestLinearAddr(other), access) {
        assert_eq!(o.gpa.0 & !in_page, t.gpa.0 & !in_page);
        assert_eq!(o.page_size, t.page_size);
    } else {
        panic!("{other:#x} in the page of {la:#x} does not translate");
    }

    // translate does not check RAM; the copy does, at exactly that byte.
    let mut byte = [0u8; 1];
    let read = read_linear(&mem, &regs, GuestLinearAddr(s.la), &mut byte, access);
    if t.gpa.0 < ram_len {
        assert_eq!(read, Ok(()));
        let mut direct = [0u8; 1];
        mem.read_phys(t.gpa, &mut direct).unwrap();
        assert_eq!(byte[0], direct[0]);
    } else {
        assert_eq!(
            read,
            Err(TranslateError::PhysUnreadable {
                gpa: GuestPhysAddr(t.gpa.0)
            })
        );
    }
});

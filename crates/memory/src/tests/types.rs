//! Address types, `IsolatedMemory`, mode selection.

use std::format;
use std::string::ToString;

use crate::*;

#[test]
fn address_formatting_and_arithmetic() {
    let a = GuestPhysAddr::new(0x1234_5678);
    assert_eq!(a.as_u64(), 0x1234_5678);
    assert_eq!(a.to_string(), "0x12345678");
    assert_eq!(format!("{a:x}"), "12345678");
    assert_eq!(format!("{a:#x}"), "0x12345678");
    assert_eq!(
        format!("{:#018x}", HostPhysAddr(0x1000)),
        "0x0000000000001000"
    );
    assert_eq!(GuestLinearAddr(0).to_string(), "0x0");
    assert_eq!(a.page_offset(), 0x678);
    assert_eq!(a.checked_add(8), Some(GuestPhysAddr(0x1234_5680)));
    assert_eq!(GuestLinearAddr(u64::MAX).checked_add(1), None);
    assert_eq!(
        HostPhysAddr(u64::MAX - 1).checked_add(1),
        Some(HostPhysAddr(u64::MAX))
    );
    assert_eq!(GuestPhysAddr::default(), GuestPhysAddr(0));
    assert!(GuestPhysAddr(1) < GuestPhysAddr(2));
}

#[test]
fn slice_memory_bounds() {
    let mut ram = [0u8; 16];
    let mem = IsolatedMemory::new(&mut ram);
    assert_eq!(mem.len(), 16);
    assert!(!mem.is_empty());
    mem.write_phys(GuestPhysAddr(4), &[1, 2, 3, 4]).unwrap();
    assert_eq!(mem.read_u32_phys(GuestPhysAddr(4)), Ok(0x0403_0201));
    mem.write_u64_phys(GuestPhysAddr(8), 0x1122_3344_5566_7788)
        .unwrap();
    assert_eq!(
        mem.read_u64_phys(GuestPhysAddr(8)),
        Ok(0x1122_3344_5566_7788)
    );
    assert_eq!(mem.snapshot()[8], 0x88);
    mem.write_phys(GuestPhysAddr(0), &[9]).unwrap();

    let mut buf = [0u8; 4];
    // Straddling the end: the first unbacked byte is the end of RAM.
    let err = |gpa| {
        Err(PhysAccessError {
            gpa: GuestPhysAddr(gpa),
        })
    };
    assert_eq!(mem.read_phys(GuestPhysAddr(14), &mut buf), err(16));
    assert_eq!(mem.read_phys(GuestPhysAddr(16), &mut buf), err(16));
    assert_eq!(mem.read_phys(GuestPhysAddr(100), &mut buf), err(100));
    assert_eq!(
        mem.read_phys(GuestPhysAddr(u64::MAX), &mut buf),
        err(u64::MAX)
    );
    assert_eq!(mem.write_phys(GuestPhysAddr(13), &buf), err(16));
    assert_eq!(
        mem.write_phys(GuestPhysAddr(u64::MAX - 1), &buf),
        err(u64::MAX - 1)
    );
    // Nothing was written by the failed write.
    assert_eq!(&mem.snapshot()[12..], &[0x44, 0x33, 0x22, 0x11]);
    // Empty accesses touch nothing.
    assert_eq!(mem.read_phys(GuestPhysAddr(u64::MAX), &mut []), Ok(()));
    assert_eq!(mem.read_phys(GuestPhysAddr(0), &mut buf), Ok(()));
    assert_eq!(buf, [9, 0, 0, 0]);

    let mut none: [u8; 0] = [];
    let empty = IsolatedMemory::new(&mut none);
    assert!(empty.is_empty());
    assert_eq!(
        empty.read_u32_phys(GuestPhysAddr(0)),
        Err(PhysAccessError {
            gpa: GuestPhysAddr(0)
        })
    );
}

#[test]
fn mode_selection() {
    let pg = PagingRegs::CR0_PG | PagingRegs::CR0_PE;
    let pae = PagingRegs::CR4_PAE;
    let lma = PagingRegs::EFER_LMA | PagingRegs::EFER_LME;
    let mode = |cr0, cr4, efer| {
        PagingRegs {
            cr0,
            cr3: 0,
            cr4,
            efer,
        }
        .mode()
    };
    assert_eq!(mode(0, 0, 0), PagingMode::Disabled);
    assert_eq!(mode(PagingRegs::CR0_PE, pae, 0), PagingMode::Disabled);
    assert_eq!(mode(pg, 0, 0), PagingMode::Bits32);
    assert_eq!(mode(pg, PagingRegs::CR4_PSE, 0), PagingMode::Bits32);
    assert_eq!(mode(pg, pae, PagingRegs::EFER_NXE), PagingMode::Pae);
    // LME alone (before paging is on) is not long mode.
    assert_eq!(mode(pg, pae, PagingRegs::EFER_LME), PagingMode::Pae);
    assert_eq!(mode(pg, pae, lma), PagingMode::Level4);
    assert_eq!(
        mode(pg, pae | PagingRegs::CR4_LA57, lma),
        PagingMode::Level5
    );
    // LA57 means nothing outside long mode.
    assert_eq!(mode(pg, pae | PagingRegs::CR4_LA57, 0), PagingMode::Pae);
    assert!(PagingMode::Level5.is_long() && !PagingMode::Pae.is_long());
}

#[test]
fn access_helpers() {
    assert_eq!(Access::default(), Access::READ);
    assert_eq!(
        Access::USER_WRITE,
        Access {
            write: true,
            user: true,
            fetch: false
        }
    );
    assert_eq!(Access::FETCH.with_user(true), Access::USER_FETCH);
    assert_eq!(Access::USER_READ.with_user(false), Access::READ);
    assert_eq!(Access::READ.as_write(), Access::WRITE);
}

#[test]
fn errors_display() {
    let e = TranslateError::PageFault {
        la: GuestLinearAddr(0x1000),
        error_code: 5,
    };
    assert_eq!(e.to_string(), "page fault at 0x1000 (error code 0x5)");
    assert!(CStrError::Unreadable(e).to_string().contains("0x1000"));
    assert!(!CStrError::TooLong.to_string().is_empty());
}

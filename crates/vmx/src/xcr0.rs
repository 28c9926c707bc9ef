//! The rules XSETBV applies to a new XCR0 (Intel SDM vol. 1, 13.3, and
//! vol. 2D, XSETBV), checked before executing a guest's XSETBV for it.

const X87: u64 = 1 << 0;
const SSE: u64 = 1 << 1;
const AVX: u64 = 1 << 2;
const BNDREGS: u64 = 1 << 3;
const BNDCSR: u64 = 1 << 4;
/// opmask, ZMM_Hi256, Hi16_ZMM: AVX-512's three components.
const AVX512: u64 = 0b111 << 5;
const XTILECFG: u64 = 1 << 17;
const XTILEDATA: u64 = 1 << 18;

/// Whether XSETBV would accept `value` for XCR0 on a processor supporting
/// the components in `supported` (CPUID.(EAX=0DH,ECX=0):EDX:EAX).
pub fn valid(value: u64, supported: u64) -> bool {
    value & X87 != 0
        && value & !supported == 0
        && (value & AVX == 0 || value & SSE != 0)
        && (value & BNDREGS != 0) == (value & BNDCSR != 0)
        && (value & AVX512 == 0 || (value & AVX512 == AVX512 && value & AVX != 0))
        && (value & XTILECFG != 0) == (value & XTILEDATA != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = X87 | SSE | AVX | BNDREGS | BNDCSR | AVX512 | XTILECFG | XTILEDATA;

    #[test]
    fn accepts_what_processors_accept() {
        assert!(valid(X87, ALL));
        assert!(valid(X87 | SSE, ALL));
        assert!(valid(X87 | SSE | AVX, ALL));
        assert!(valid(X87 | SSE | AVX | AVX512, ALL));
        assert!(valid(X87 | BNDREGS | BNDCSR, ALL));
        assert!(valid(ALL, ALL));
    }

    #[test]
    fn refuses_what_xsetbv_refuses() {
        assert!(!valid(0, ALL), "x87 must be set");
        assert!(!valid(SSE, ALL));
        assert!(!valid(X87 | AVX, ALL), "AVX without SSE");
        assert!(!valid(X87 | SSE | AVX, X87 | SSE), "unsupported component");
        assert!(!valid(X87 | BNDREGS, ALL), "MPX components go together");
        assert!(
            !valid(X87 | SSE | AVX | (1 << 5), ALL),
            "AVX-512 components go together"
        );
        assert!(!valid(X87 | SSE | AVX512, ALL), "AVX-512 needs AVX");
        assert!(!valid(X87 | XTILECFG, ALL), "AMX components go together");
        assert!(!valid(X87 | (1 << 63), ALL));
    }
}

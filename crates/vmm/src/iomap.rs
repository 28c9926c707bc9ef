//! I/O permission bitmaps: one bit per port, set = intercept. AMD's IOPM
//! (APM vol. 2, 15.10.1: 12 KiB, the last page for accesses that run past
//! port 0xFFFF) and Intel's I/O bitmaps A and B (SDM vol. 3C, 25.6.4: two
//! 4 KiB pages, 0x0000-0x7FFF then 0x8000-0xFFFF) share the layout of the
//! first 8 KiB, so one writer serves both.

/// Bytes of an I/O bitmap that covers every port (both vendors' first 8
/// KiB).
pub const PORT_BITS_BYTES: usize = 8192;

/// Intercept every access that touches `port`. Bytes past the map are
/// ignored.
pub fn intercept_port(map: &mut [u8], port: u16) {
    if let Some(byte) = map.get_mut(usize::from(port) / 8) {
        *byte |= 1 << (port % 8);
    }
}

/// Whether `port` is intercepted.
pub fn is_intercepted(map: &[u8], port: u16) -> bool {
    map.get(usize::from(port) / 8)
        .is_some_and(|b| b & (1 << (port % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_per_port() {
        let mut map = [0u8; PORT_BITS_BYTES];
        intercept_port(&mut map, 0xCF9);
        intercept_port(&mut map, 0x8900);
        intercept_port(&mut map, 0xFFFF);
        assert_eq!(map[0xCF9 / 8], 1 << 1);
        // Port 0x8900 is the first byte of the second page (Intel's bitmap B).
        assert_eq!(map[0x8900 / 8], 1);
        // (0x8900 / 8 = 4384: past the first 4 KiB page.)
        assert!(is_intercepted(&map, 0xFFFF));
        assert!(!is_intercepted(&map, 0xCF8));
        intercept_port(&mut [0u8; 2], 0x100);
    }
}

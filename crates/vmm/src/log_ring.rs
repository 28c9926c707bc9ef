//! The VMM's log, kept in memory from boot on so guests can read it
//! (`log_read`, docs/vmm-call.md).
//!
//! A ring of the last `N` bytes of an endless byte stream: every byte has
//! a stream offset (bytes since boot), so a reader that asks for an offset
//! whose bytes have already been overwritten learns exactly what it missed.

/// The last `N` bytes of the log stream.
pub struct LogRing<const N: usize> {
    buf: [u8; N],
    /// Bytes written since boot; the next byte's stream offset.
    total: u64,
}

impl<const N: usize> Default for LogRing<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> LogRing<N> {
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            total: 0,
        }
    }

    /// Append bytes, overwriting the oldest when full.
    pub fn push(&mut self, bytes: &[u8]) {
        // Only the last N bytes of a long write can survive.
        let skip = bytes.len().saturating_sub(N);
        self.total += skip as u64;
        for &b in &bytes[skip..] {
            self.buf[(self.total % N as u64) as usize] = b;
            self.total += 1;
        }
    }

    /// Stream offset of the next byte to be written.
    pub fn end(&self) -> u64 {
        self.total
    }

    /// Stream offset of the oldest byte still held.
    pub fn start(&self) -> u64 {
        self.total.saturating_sub(N as u64)
    }

    /// The bytes [first, first + n) as at most two runs (the ring may wrap),
    /// or None unless all of them are still held.
    pub fn runs(&self, first: u64, n: u64) -> Option<(&[u8], &[u8])> {
        let end = first.checked_add(n)?;
        if first < self.start() || end > self.total {
            return None;
        }
        let at = (first % N as u64) as usize;
        let n = n as usize;
        let head = n.min(N - at);
        Some((&self.buf[at..at + head], &self.buf[..n - head]))
    }

    /// Copy bytes from stream offset `from` (or the oldest held, if those
    /// are gone) into `out`. Returns the stream offset of the first byte
    /// copied and how many were copied.
    pub fn read(&self, from: u64, out: &mut [u8]) -> (u64, usize) {
        let first = from.max(self.start());
        if first >= self.total {
            return (first.min(self.total), 0);
        }
        let available = (self.total - first).min(out.len() as u64) as usize;
        let n = N as u64;
        let mut at = (first % n) as usize;
        let mut done = 0;
        while done < available {
            let run = (available - done).min(N - at);
            out[done..done + run].copy_from_slice(&self.buf[at..at + run]);
            done += run;
            at = 0;
        }
        (first, available)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn reads_what_was_written() {
        let mut r = LogRing::<16>::new();
        r.push(b"hello ");
        r.push(b"world");
        let mut out = [0u8; 32];
        assert_eq!(r.read(0, &mut out), (0, 11));
        assert_eq!(&out[..11], b"hello world");
        assert_eq!(r.read(6, &mut out[..3]), (6, 3));
        assert_eq!(&out[..3], b"wor");
        assert_eq!(r.read(11, &mut out), (11, 0));
        // Beyond the end: nothing, at the end.
        assert_eq!(r.read(500, &mut out), (11, 0));
    }

    #[test]
    fn overwritten_bytes_are_skipped_and_reported() {
        let mut r = LogRing::<8>::new();
        r.push(b"0123456789");
        let mut out = [0u8; 8];
        // Bytes 0 and 1 are gone: the read starts at 2.
        assert_eq!(r.read(0, &mut out), (2, 8));
        assert_eq!(&out, b"23456789");
        r.push(b"ab");
        assert_eq!(r.read(5, &mut out), (5, 7));
        assert_eq!(&out[..7], b"56789ab");
        assert_eq!(r.start(), 4);
        assert_eq!(r.end(), 12);
    }

    #[test]
    fn runs_split_where_the_ring_wraps() {
        let mut r = LogRing::<8>::new();
        r.push(b"0123456789");
        assert_eq!(r.runs(2, 8), Some((&b"234567"[..], &b"89"[..])));
        assert_eq!(r.runs(8, 2), Some((&b"89"[..], &b""[..])));
        assert_eq!(r.runs(1, 2), None);
        assert_eq!(r.runs(9, 2), None);
        assert_eq!(r.runs(u64::MAX, 2), None);
    }

    #[test]
    fn a_write_longer_than_the_ring_keeps_its_tail() {
        let mut r = LogRing::<4>::new();
        r.push(b"abcdefghij");
        let mut out = [0u8; 4];
        assert_eq!(r.read(0, &mut out), (6, 4));
        assert_eq!(&out, b"ghij");
    }

    proptest::proptest! {
        #[test]
        fn matches_a_plain_vector(writes in proptest::collection::vec(proptest::collection::vec(0u8..255, 0..40), 0..20), from in 0u64..400, len in 0usize..64) {
            let mut r = LogRing::<32>::new();
            let mut all = std::vec::Vec::new();
            for w in &writes {
                r.push(w);
                all.extend_from_slice(w);
            }
            let mut out = [0u8; 64];
            let (first, n) = r.read(from, &mut out[..len]);
            let oldest = all.len().saturating_sub(32) as u64;
            let expect_first = from.max(oldest).min(all.len() as u64);
            proptest::prop_assert_eq!(first, expect_first);
            let expect_n = (all.len() as u64 - expect_first).min(len as u64) as usize;
            proptest::prop_assert_eq!(n, expect_n);
            proptest::prop_assert_eq!(&out[..n], &all[first as usize..first as usize + n]);
        }
    }
}

//! A writer of "newc" cpio archives, the format Linux unpacks as an
//! initramfs (uncompressed is accepted, so no compressor is needed).
//!
//! Writing the archive ourselves lets it hold device nodes and root-owned
//! files without running as root, and makes it reproducible: every entry
//! has mtime 0 and owner 0:0, and inode numbers count up from 1.

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// The magic of a newc header (no checksum).
const MAGIC: &str = "070701";
/// The name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";

/// An archive being written.
#[derive(Debug, Default)]
pub struct Cpio {
    data: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    pub fn new() -> Cpio {
        Cpio::default()
    }

    /// A directory, e.g. `dir("usr/bin", 0o755)`. Paths are relative (no
    /// leading `/`); parents must come first.
    pub fn dir(&mut self, path: &str, perm: u32) {
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[]);
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, perm: u32, contents: &[u8]) {
        self.entry(path, S_IFREG | perm, 1, (0, 0), contents);
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    /// A character device node (e.g. `/dev/console` = 5:1, which the
    /// kernel opens as init's stdin, stdout and stderr before devtmpfs is
    /// mounted).
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[]);
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.header(TRAILER, 0, 0, 1, (0, 0), 0);
        self.data
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: (u32, u32), contents: &[u8]) {
        let path = path.trim_start_matches('/');
        assert!(!path.is_empty(), "cpio entry without a name");
        self.next_ino += 1;
        let size = u32::try_from(contents.len()).expect("cpio entries are below 4 GiB");
        self.header(path, self.next_ino, mode, nlink, rdev, size);
        self.data.extend_from_slice(contents);
        self.pad();
    }

    fn header(&mut self, name: &str, ino: u32, mode: u32, nlink: u32, rdev: (u32, u32), size: u32) {
        let name_size = u32::try_from(name.len() + 1).expect("short name");
        let fields = [
            ino, mode, 0, // uid
            0, // gid
            nlink, 0, // mtime
            size, 0, // devmajor
            0, // devminor
            rdev.0, rdev.1, name_size, 0, // check
        ];
        self.data.extend_from_slice(MAGIC.as_bytes());
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
    }

    /// Header+name and data are each padded to a multiple of 4 bytes.
    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }
}

#[cfg(test)]
pub mod read {
    //! A reader for the tests: the entries of a newc archive.

    /// One entry: name, mode, rdev (major, minor), contents.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Entry {
        pub name: String,
        pub mode: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
    }

    fn hex(bytes: &[u8]) -> u32 {
        u32::from_str_radix(std::str::from_utf8(bytes).unwrap(), 16).unwrap()
    }

    fn align4(n: usize) -> usize {
        (n + 3) & !3
    }

    /// The entries up to the trailer (panics on a malformed archive).
    pub fn entries(archive: &[u8]) -> Vec<Entry> {
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            let h = &archive[at..at + 110];
            assert_eq!(&h[..6], b"070701", "bad magic at {at}");
            let field = |i: usize| hex(&h[6 + 8 * i..14 + 8 * i]);
            let (mode, size, rdev, name_size) =
                (field(1), field(6), (field(9), field(10)), field(11));
            let name_start = at + 110;
            let name_end = name_start + name_size as usize;
            assert_eq!(archive[name_end - 1], 0, "name without NUL");
            let name = String::from_utf8(archive[name_start..name_end - 1].to_vec()).unwrap();
            let data_start = align4(name_end);
            let data_end = data_start + size as usize;
            let data = archive[data_start..data_end].to_vec();
            at = align4(data_end);
            if name == super::TRAILER {
                assert_eq!(at, archive.len(), "bytes after the trailer");
                return out;
            }
            out.push(Entry {
                name,
                mode,
                rdev,
                data,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::read::{entries, Entry};
    use super::*;

    #[test]
    fn header_layout() {
        let mut cpio = Cpio::new();
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let data = cpio.finish();
        // magic, ino 1, mode 0100755, uid, gid, nlink 1, mtime, size 10,
        // dev 0:0, rdev 0:0, namesize 5 ("init\0"), check.
        let expected = concat!(
            "070701", "00000001", "000081ED", "00000000", "00000000", "00000001", "00000000",
            "0000000A", "00000000", "00000000", "00000000", "00000000", "00000005", "00000000",
        );
        assert_eq!(&data[..110], expected.as_bytes());
        assert_eq!(&data[110..115], b"init\0");
        // 110 + 5 = 115, padded to 116; data at 116.
        assert_eq!(&data[115..116], b"\0");
        assert_eq!(&data[116..126], b"#!/bin/sh\n");
        assert_eq!(data.len() % 4, 0);
    }

    #[test]
    fn round_trip() {
        let mut cpio = Cpio::new();
        cpio.dir("dev", 0o755);
        cpio.char_dev("/dev/console", 0o600, 5, 1);
        cpio.file("bin/busybox", 0o755, &[1, 2, 3]);
        cpio.symlink("bin/sh", "busybox");
        cpio.file("empty", 0o644, &[]);
        let all = entries(&cpio.finish());
        assert_eq!(
            all,
            vec![
                Entry {
                    name: "dev".into(),
                    mode: 0o040_755,
                    rdev: (0, 0),
                    data: vec![]
                },
                Entry {
                    name: "dev/console".into(),
                    mode: 0o020_600,
                    rdev: (5, 1),
                    data: vec![]
                },
                Entry {
                    name: "bin/busybox".into(),
                    mode: 0o100_755,
                    rdev: (0, 0),
                    data: vec![1, 2, 3]
                },
                Entry {
                    name: "bin/sh".into(),
                    mode: 0o120_777,
                    rdev: (0, 0),
                    data: b"busybox".to_vec()
                },
                Entry {
                    name: "empty".into(),
                    mode: 0o100_644,
                    rdev: (0, 0),
                    data: vec![]
                },
            ]
        );
    }

    #[test]
    fn empty_archive_is_a_trailer() {
        let data = Cpio::new().finish();
        assert!(entries(&data).is_empty());
        assert_eq!(data.len(), 124); // 110 + "TRAILER!!!\0" (11) = 121 -> 124
    }
}

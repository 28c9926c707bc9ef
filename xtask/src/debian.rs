//! Files out of Debian's binary packages, without installing anything.
//!
//! `apt-get download` fetches a package's `.deb` and `dpkg-deb
//! --fsys-tarfile | tar -x` unpacks the members we need into a cache
//! directory, `$THINVISOR_CACHE` or `~/.cache/thinvisor/debian`, shared by
//! every clone and run: a package is downloaded and unpacked once per
//! version. The versions are the ones apt would install (the candidates of
//! the host's package lists), so the tests follow Debian's security updates
//! of the kernel without an edit here.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::{self, Context, Result};

/// The metapackage whose dependency names Debian's current stock kernel
/// package (`linux-image-6.1.0-NN-amd64`).
pub const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// The cache directory: `$THINVISOR_CACHE`, else
/// `$HOME/.cache/thinvisor/debian`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("THINVISOR_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or("neither THINVISOR_CACHE nor HOME is set: no place for the Debian package cache")?;
    Ok(PathBuf::from(home).join(".cache/thinvisor/debian"))
}

/// A package unpacked in the cache.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub package: String,
    pub version: String,
    /// The directory the package's members were unpacked into (its `/`).
    pub root: PathBuf,
}

impl Unpacked {
    /// A member's path, e.g. `bin/busybox`; an error naming the package
    /// when it is not there.
    pub fn file(&self, member: &str) -> Result<PathBuf> {
        let path = self.root.join(member);
        if path.exists() {
            Ok(path)
        } else {
            Err(format!(
                "{} {} has no {member} (looked in {})",
                self.package,
                self.version,
                self.root.display()
            ))
        }
    }

    /// The unpacked members below `dir` whose file name starts with
    /// `prefix`, sorted.
    pub fn files_starting(&self, dir: &str, prefix: &str) -> Result<Vec<PathBuf>> {
        let dir = self.root.join(dir);
        let mut found: Vec<PathBuf> = fs::read_dir(&dir)
            .context(format_args!("listing {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .collect();
        found.sort();
        Ok(found)
    }
}

/// The name of Debian's stock kernel package: the `linux-image-*`
/// dependency of `linux-image-amd64`'s candidate version. When apt cannot
/// say (no package lists), a kernel package unpacked earlier with the same
/// `members` serves, as in `fetch`.
pub fn kernel_package(members: &[&str]) -> Result<String> {
    let control = match show(KERNEL_METAPACKAGE) {
        Ok(control) => control,
        Err(e) => {
            let cache = cache_dir()?;
            let cached = cached(&cache, members)
                .into_iter()
                .rfind(|c| c.package.starts_with("linux-image-"));
            return match cached {
                Some(c) => {
                    eprintln!(
                        "debian: apt cannot resolve {KERNEL_METAPACKAGE}; using the cached {}",
                        c.package
                    );
                    Ok(c.package)
                }
                None => Err(e),
            };
        }
    };
    let depends = control_field(&control, "Depends")
        .ok_or_else(|| format!("`apt-cache show {KERNEL_METAPACKAGE}` has no Depends field"))?;
    depends_names(&depends)
        .into_iter()
        .find(|name| name.starts_with("linux-image-"))
        .ok_or_else(|| {
            format!("{KERNEL_METAPACKAGE} depends on no linux-image-* package: `{depends}`")
        })
}

/// Downloads `package` (the candidate version) unless the cache has it, and
/// unpacks the members matching `members` (tar wildcards such as
/// `./boot/vmlinuz-*`; only these, so the kernel's 400 MB of modules stay
/// packed).
///
/// A failed download usually means stale package lists (Debian's security
/// archive keeps only the newest kernel): as root, the lists are updated
/// and the candidate resolved and downloaded again.
pub fn fetch(package: &str, members: &[&str]) -> Result<Unpacked> {
    match fetch_candidate(package, members) {
        Err(Fetch::Download(e)) if util::is_root() => {
            eprintln!("debian: {e}\ndebian: updating the package lists and trying again");
            apt_update()?;
            fetch_candidate(package, members).map_err(Fetch::into_message)
        }
        Err(Fetch::Download(e)) => Err(format!(
            "{e}\nThe package lists are probably stale. Run as root:\n    apt-get update"
        )),
        other => other.map_err(Fetch::into_message),
    }
}

/// Why `fetch_candidate` failed.
enum Fetch {
    /// `apt-get download` failed.
    Download(String),
    /// Anything else.
    Other(String),
}

impl Fetch {
    fn into_message(self) -> String {
        match self {
            Fetch::Download(e) | Fetch::Other(e) => e,
        }
    }
}

impl From<String> for Fetch {
    fn from(e: String) -> Fetch {
        Fetch::Other(e)
    }
}

fn fetch_candidate(package: &str, members: &[&str]) -> std::result::Result<Unpacked, Fetch> {
    let cache = cache_dir()?;
    let version = match show(package) {
        Ok(control) => control_field(&control, "Version")
            .ok_or_else(|| format!("`apt-cache show {package}` has no Version field"))?,
        Err(e) => {
            // Without package lists (offline, or a fresh container as
            // non-root), an earlier download still serves.
            return cached_any_version(&cache, package, members).ok_or(Fetch::Other(e));
        }
    };
    let name = format!("{package}_{}", file_safe(&version));
    let roots = cache.join("root");
    let root = roots.join(&name);
    let unpacked = Unpacked {
        package: package.to_string(),
        version: version.clone(),
        root: root.clone(),
    };
    let wanted = members.join("\n");
    if fs::read_to_string(root.join(STAMP)).is_ok_and(|s| s == wanted) {
        return Ok(unpacked);
    }
    let deb = download(&cache.join("debs"), package, &version).map_err(Fetch::Download)?;
    eprintln!(
        "debian: unpacking {} from {package} {version}",
        members.join(" ")
    );
    // Unpack beside the final directory under a name of this process, then
    // rename: a concurrent run (another clone sharing the cache) never sees
    // half a package.
    let partial = roots.join(format!(".{name}.partial-{}", std::process::id()));
    if partial.exists() {
        fs::remove_dir_all(&partial).context(format_args!("removing {}", partial.display()))?;
    }
    fs::create_dir_all(&partial).context(format_args!("creating {}", partial.display()))?;
    extract(&deb, &partial, members)?;
    fs::write(partial.join(STAMP), &wanted).context("writing the unpack stamp")?;
    if root.exists() {
        fs::remove_dir_all(&root).context(format_args!("removing {}", root.display()))?;
    }
    if let Err(e) = fs::rename(&partial, &root) {
        let _ = fs::remove_dir_all(&partial);
        // Another run may have finished the same package meanwhile.
        if !fs::read_to_string(root.join(STAMP)).is_ok_and(|s| s == wanted) {
            return Err(format!("renaming to {}: {e}", root.display()).into());
        }
    }
    Ok(unpacked)
}

fn apt_update() -> Result {
    require_tool("apt-get", "apt")?;
    util::run(Command::new("apt-get").arg("update"))
}

/// Marks a completely unpacked package; holds the member patterns.
const STAMP: &str = ".thinvisor-unpacked";

/// A version of `package` unpacked earlier with the same members, the
/// last by name (not necessarily by Debian's version order: this is only
/// the fallback when apt cannot say which version is current).
fn cached_any_version(cache: &Path, package: &str, members: &[&str]) -> Option<Unpacked> {
    let found = cached(cache, members)
        .into_iter()
        .rfind(|c| c.package == package)?;
    eprintln!(
        "debian: apt cannot resolve {package}; using the cached {}",
        found.version
    );
    Some(found)
}

/// The packages completely unpacked in `cache` with exactly `members`,
/// sorted by directory name (`PACKAGE_VERSION`; package names have no
/// `_`).
fn cached(cache: &Path, members: &[&str]) -> Vec<Unpacked> {
    let wanted = members.join("\n");
    let Ok(dir) = fs::read_dir(cache.join("root")) else {
        return Vec::new();
    };
    let mut found: Vec<(String, Unpacked)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (package, version) = name.split_once('_')?;
            let root = e.path();
            let stamp = fs::read_to_string(root.join(STAMP)).ok()?;
            let unpacked = Unpacked {
                package: package.to_string(),
                version: version.replace("%3a", ":"),
                root,
            };
            (stamp == wanted && !name.starts_with('.')).then_some((name, unpacked))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found.into_iter().map(|(_, u)| u).collect()
}

/// `apt-cache show --no-all-versions PACKAGE` (the candidate's control
/// paragraph). Runs `apt-get update` first when the package lists lack the
/// package and we are root; otherwise says what to run.
fn show(package: &str) -> Result<String> {
    require_tool("apt-cache", "apt")?;
    let attempt = || {
        Command::new("apt-cache")
            .env("LC_ALL", "C")
            .args(["show", "--no-all-versions", package])
            .output()
            .context("cannot run apt-cache")
    };
    let output = attempt()?;
    if output.status.success() && !output.stdout.is_empty() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let why = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if !util::is_root() {
        return Err(format!(
            "apt does not know the package {package} ({why}); the package lists are \
             probably missing or stale. Run as root:\n    apt-get update\n\
             (or set THINVISOR_CACHE to a cache that already holds it)"
        ));
    }
    eprintln!("debian: apt does not know {package} ({why}); running apt-get update");
    apt_update()?;
    let output = attempt()?;
    if output.status.success() && !output.stdout.is_empty() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "apt does not know the package {package} even after apt-get update: {}\n\
             (is deb.debian.org bookworm main in /etc/apt/sources.list?)",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The `.deb` of `package` `version` in `debs`, downloaded when missing
/// (into a directory of this process first, then moved: runs sharing the
/// cache never see a partial file).
fn download(debs: &Path, package: &str, version: &str) -> Result<PathBuf> {
    fs::create_dir_all(debs).context(format_args!("creating {}", debs.display()))?;
    if let Some(deb) = find_deb(debs, package, version)? {
        return Ok(deb);
    }
    require_tool("apt-get", "apt")?;
    eprintln!("debian: downloading {package} {version}");
    let tmp = debs.join(format!(".download-{}", std::process::id()));
    fs::create_dir_all(&tmp).context(format_args!("creating {}", tmp.display()))?;
    let result = util::run_captured(
        Command::new("apt-get")
            .current_dir(&tmp)
            .env("LC_ALL", "C")
            // As root, apt drops to the `_apt` user for downloads, who
            // cannot write into a private cache: download as ourselves.
            .args(["-o", "APT::Sandbox::User=root"])
            .args(["download", &format!("{package}={version}")]),
    )
    .map_err(|e| format!("downloading {package} {version} failed: {e}"))
    .and_then(|_| {
        let deb = find_deb(&tmp, package, version)?.ok_or_else(|| {
            format!(
                "apt-get download {package}={version} ran but left no {}*.deb",
                deb_prefix(package, version)
            )
        })?;
        let name = deb.file_name().ok_or("a .deb without a name")?;
        let dest = debs.join(name);
        fs::rename(&deb, &dest).context(format_args!("moving {}", deb.display()))?;
        Ok(dest)
    });
    let _ = fs::remove_dir_all(&tmp);
    result
}

fn find_deb(debs: &Path, package: &str, version: &str) -> Result<Option<PathBuf>> {
    let prefix = deb_prefix(package, version);
    Ok(fs::read_dir(debs)
        .context(format_args!("listing {}", debs.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&prefix) && n.ends_with(".deb")
            })
        }))
}

/// The start of the file name apt gives a downloaded package:
/// `NAME_VERSION_` with the epoch's colon written `%3a`.
fn deb_prefix(package: &str, version: &str) -> String {
    format!("{package}_{}_", version.replace(':', "%3a"))
}

/// A version as a directory name (no colon: it means something to some
/// tools, e.g. in PATH-like lists).
fn file_safe(version: &str) -> String {
    version.replace(':', "%3a")
}

/// `dpkg-deb --fsys-tarfile DEB | tar -x -C DIR --wildcards MEMBERS...`.
fn extract(deb: &Path, dir: &Path, members: &[&str]) -> Result {
    require_tool("dpkg-deb", "dpkg")?;
    require_tool("tar", "tar")?;
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run dpkg-deb")?;
    let tar_input = dpkg.stdout.take().ok_or("no stdout from dpkg-deb")?;
    let mut tar = Command::new("tar");
    tar.arg("-x")
        .arg("-C")
        .arg(dir)
        .arg("--wildcards")
        .args(members)
        .stdin(tar_input);
    let tar_result = util::run_captured(&mut tar);
    let dpkg_status = dpkg.wait().context("waiting for dpkg-deb")?;
    tar_result.map_err(|e| format!("unpacking {}: {e}", deb.display()))?;
    if !dpkg_status.success() {
        return Err(format!(
            "dpkg-deb --fsys-tarfile {} failed ({dpkg_status}); a damaged download? \
             Delete it and run again",
            deb.display()
        ));
    }
    Ok(())
}

/// An error naming the Debian package to install when `tool` is missing.
pub fn require_tool(tool: &str, package: &str) -> Result {
    if util::which(tool).is_some() {
        Ok(())
    } else {
        Err(format!(
            "`{tool}` not found: the Linux test assets come from Debian packages and need \
             a Debian-based host with `{tool}` (package {package})"
        ))
    }
}

/// A field of the first paragraph of Debian control text (`apt-cache
/// show`), continuation lines joined with single spaces.
pub fn control_field(control: &str, key: &str) -> Option<String> {
    let mut value: Option<String> = None;
    for line in control.lines() {
        if line.trim().is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(v) = value.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if value.is_some() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case(key) {
                value = Some(v.trim().to_string());
            }
        }
    }
    value
}

/// The package names of a Depends field, first alternative of each entry,
/// without version constraints or architecture qualifiers:
/// `a (>= 1), b:any | c` -> `[a, b]`.
pub fn depends_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|entry| {
            let first = entry.split('|').next()?;
            let name = first.split(['(', '[', '<']).next()?.trim();
            let name = name.split(':').next()?.trim();
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = "Package: linux-image-amd64\n\
                        Source: linux-signed-amd64 (6.1.192+3)\n\
                        Version: 6.1.192-3\n\
                        Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)\n\
                        Description: Linux for 64-bit PCs (meta-package)\n \
                        This package depends on the latest Linux kernel\n \
                        and modules.\n\
                        \n\
                        Package: linux-image-amd64\n\
                        Version: 6.1.176-1\n";

    #[test]
    fn control_fields() {
        assert_eq!(control_field(SHOW, "Version").as_deref(), Some("6.1.192-3"));
        assert_eq!(
            control_field(SHOW, "depends").as_deref(),
            Some("linux-image-6.1.0-57-amd64 (= 6.1.192-3)")
        );
        assert_eq!(
            control_field(SHOW, "Description").as_deref(),
            Some(
                "Linux for 64-bit PCs (meta-package) This package depends on the latest \
                 Linux kernel and modules."
            )
        );
        assert_eq!(control_field(SHOW, "Pre-Depends"), None);
        assert_eq!(control_field("", "Version"), None);
    }

    #[test]
    fn depends_parsing() {
        assert_eq!(
            depends_names("linux-image-6.1.0-57-amd64 (= 6.1.192-3)"),
            vec!["linux-image-6.1.0-57-amd64"]
        );
        assert_eq!(
            depends_names("libc6 (>= 2.34), perl:any | perl-base, foo [amd64], bar <!nocheck>"),
            vec!["libc6", "perl", "foo", "bar"]
        );
        assert!(depends_names("").is_empty());
    }

    #[test]
    fn cached_versions_serve_offline() {
        let cache = std::env::temp_dir().join(format!("xtask-debian-{}", std::process::id()));
        let root = cache.join("root");
        let members = ["./bin/busybox"];
        for (dir, stamp) in [
            ("busybox-static_1%3a1.35.0-4", Some("./bin/busybox")),
            ("busybox-static_1%3a1.36.1-1", Some("./bin/busybox")),
            // Unpacked with other members, or not completely: no use.
            ("busybox-static_1%3a1.37.0-1", Some("./usr/bin/other")),
            ("busybox-static_1%3a1.38.0-1", None),
            ("busybox_1%3a9.9-9", Some("./bin/busybox")),
        ] {
            fs::create_dir_all(root.join(dir)).unwrap();
            if let Some(stamp) = stamp {
                fs::write(root.join(dir).join(STAMP), stamp).unwrap();
            }
        }
        let found = cached_any_version(&cache, "busybox-static", &members).unwrap();
        assert_eq!(found.version, "1:1.36.1-1");
        assert_eq!(found.root, root.join("busybox-static_1%3a1.36.1-1"));
        assert!(cached_any_version(&cache, "syslinux", &members).is_none());
        let all: Vec<String> = cached(&cache, &members)
            .into_iter()
            .map(|u| format!("{} {}", u.package, u.version))
            .collect();
        assert_eq!(
            all,
            [
                "busybox-static 1:1.35.0-4",
                "busybox-static 1:1.36.1-1",
                "busybox 1:9.9-9"
            ]
        );
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn deb_file_names() {
        assert_eq!(
            deb_prefix("busybox-static", "1:1.35.0-4+deb12u1+b1"),
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_"
        );
        assert_eq!(file_safe("3:6.04~git"), "3%3a6.04~git");
    }
}

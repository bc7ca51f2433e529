//! The package download cache shared by all builds on the machine: .deb files that
//! debootstrap, mmdebstrap and apt downloaded, so that a later build of any spec
//! downloads none of them again.
//!
//! Nothing is trusted by its name or size. A package enters the cache only after its
//! content matched the SHA-256 that the archive's index gives for it (`apt-get
//! --print-uris`, or the image's apt lists after a bootstrap); that checksum is kept
//! with the file (extended attribute `user.vmdb.sha256`). A package leaves the cache
//! only after its content matched again: for apt, the archive's checksum of the moment;
//! for a bootstrap, whose package list is not known beforehand, the one kept with the
//! file. A damaged package is removed from the cache and downloaded again.
//!
//! Packages are written to the cache under unique temporary names and renamed into
//! place (see cachefile), so builds running at once never see half a file; a cache
//! that cannot take more (a full disk) only means packages are not cached: a warning,
//! never a failed build. The tools get copies in the image, never the cache itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::digest::sha256_of_stream;
use crate::engine::build::Options;
use crate::host::cachefile::Temp;
use crate::host::image_root::ImageRoot;

/// apt's package directory in the image.
const ARCHIVES: &str = "/var/cache/apt/archives";

/// Where a cached package's archive checksum is kept.
const SUM_ATTR: &str = "user.vmdb.sha256";

/// Package file names (as apt names them) and their SHA-256 (hex) from the archive.
pub type Sums = BTreeMap<String, String>;

/// The cache directory, created if needed; None when caching is off.
pub fn dir(opts: &Options) -> Option<PathBuf> {
    let d = opts.cache_dir.as_ref()?.join("debs");
    match std::fs::create_dir_all(&d) {
        Ok(()) => Some(d),
        Err(e) => {
            crate::log::warn(&format!("no package cache at {}: {e}", d.display()));
            None
        }
    }
}

/// The host path of the image's apt archive directory, resolved inside the image (its
/// links never lead to the host); None when the image has none.
pub fn archives(root: &Path) -> Option<PathBuf> {
    let img = ImageRoot::open(root).ok()?;
    if !img.is_dir(ARCHIVES).ok()? {
        return None;
    }
    img.host_path(ARCHIVES).ok()
}

/// The checksum kept with a cached package, if any.
fn recorded_sum(f: &File) -> Option<String> {
    let mut buf = [0u8; 64];
    let n = rustix::fs::fgetxattr(f, SUM_ATTR, &mut buf[..]).ok()?;
    String::from_utf8(buf[..n].to_vec()).ok()
}

/// Copy what is left to read of `src` into `dest`, returning its SHA-256.
fn copy_hashing(src: &mut File, dest: &mut File) -> std::io::Result<String> {
    sha256_of_stream(src, |b| dest.write_all(b))
}

/// Remove a cached package found damaged (unless another build replaced it meanwhile)
/// and say so.
fn drop_damaged(cache: &Path, name: &str, f: &File, got: &str, expected: &str) {
    use std::os::unix::fs::MetadataExt;
    let path = cache.join(name);
    let same = match (f.metadata(), std::fs::metadata(&path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    };
    if same {
        let _ = std::fs::remove_file(&path);
    }
    crate::log::info(&format!(
        "vmdb: package cache: {name} is damaged (checksum {got}, expected {expected}): removed; it is downloaded again"
    ));
}

/// Copy the cached package `name` into `dest_dir` if its content has the checksum
/// `expected`; a damaged one is removed from the cache. The copy appears under its
/// name only when complete and checked.
fn copy_checked(cache: &Path, name: &str, expected: &str, dest_dir: &Path) -> Result<bool> {
    let Ok(mut src) = File::open(cache.join(name)) else {
        return Ok(false);
    };
    let mut tmp = Temp::new(dest_dir, name)?;
    let got = copy_hashing(&mut src, tmp.file())
        .with_context(|| format!("copying {name} from the package cache"))?;
    if got != expected {
        drop_damaged(cache, name, &src, &got, expected);
        return Ok(false);
    }
    tmp.persist(&dest_dir.join(name))?;
    Ok(true)
}

/// Before `apt-get install`: copy the cached packages named in `wanted` that the
/// image's archive directory lacks into it, each checked against the archive's
/// checksum on the way. Only those: the cache holds every suite's and architecture's
/// packages, and what is copied is written into the image. A package that is not
/// copied is downloaded by apt, so this never fails the build.
pub fn seed(cache: &Path, root: &Path, wanted: &Sums) -> usize {
    let Some(dest) = archives(root) else {
        return 0;
    };
    let mut n = 0;
    for (name, sum) in wanted {
        if dest.join(name).exists() {
            continue;
        }
        match copy_checked(cache, name, sum, &dest) {
            Ok(true) => n += 1,
            Ok(false) => {}
            Err(e) => {
                crate::log::warn(&format!("package cache: {e:#}: apt downloads it"));
                break;
            }
        }
    }
    n
}

/// The cached packages a bootstrap for `arch` may use (`all` ones too) and the
/// checksums kept with them; packages cached without one are left out.
fn bootstrap_candidates(cache: &Path, arch: &str) -> Vec<(String, String)> {
    let suffixes = [format!("_{arch}.deb"), "_all.deb".to_string()];
    let mut v: Vec<(String, String)> = std::fs::read_dir(cache)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if crate::host::cachefile::is_temporary(&name)
                || !suffixes.iter().any(|s| name.ends_with(s))
            {
                return None;
            }
            let sum = recorded_sum(&File::open(e.path()).ok()?)?;
            Some((name, sum))
        })
        .collect();
    v.sort();
    v
}

/// Whether `bytes` more fit easily in the filesystem of `dir`: the bootstrap's own
/// downloads and the system itself need room too.
fn fits(dir: &Path, bytes: u64) -> bool {
    rustix::fs::statvfs(dir).is_ok_and(|s| bytes <= s.f_bavail.saturating_mul(s.f_frsize) / 2)
}

fn total_size(cache: &Path, names: &[(String, String)]) -> u64 {
    names
        .iter()
        .filter_map(|(n, _)| std::fs::metadata(cache.join(n)).ok())
        .map(|m| m.len())
        .sum()
}

/// Before debootstrap (which is given no cache directory: it finds the packages in the
/// image's archive directory, checks each against the archive's checksums itself and
/// downloads what is missing or wrong): copy the sound cached packages for `arch` in.
/// Returns the names copied, for `unseed`.
pub fn seed_bootstrap(cache: &Path, root: &Path, arch: &str) -> Vec<String> {
    let candidates = bootstrap_candidates(cache, arch);
    if candidates.is_empty() {
        return Vec::new();
    }
    if !fits(root, total_size(cache, &candidates)) {
        crate::log::info(
            "  package cache: its packages would crowd the image's filesystem: not copied in",
        );
        return Vec::new();
    }
    let made = ImageRoot::open(root).and_then(|img| img.create_dir_all(ARCHIVES, 0o755));
    let dest = match (made, archives(root)) {
        (Ok(_), Some(dest)) => dest,
        (Err(e), _) => {
            crate::log::warn(&format!("package cache: {e:#}"));
            return Vec::new();
        }
        (Ok(_), None) => return Vec::new(),
    };
    let mut seeded = Vec::new();
    for (name, sum) in candidates {
        match copy_checked(cache, &name, &sum, &dest) {
            Ok(true) => seeded.push(name),
            Ok(false) => {}
            Err(e) => {
                crate::log::warn(&format!(
                    "package cache: {e:#}: the bootstrap downloads its packages"
                ));
                break;
            }
        }
    }
    seeded
}

/// After debootstrap: remove the copied-in packages it did not install, so that the
/// image holds what it would hold without the cache.
pub fn unseed(root: &Path, seeded: &[String]) -> Result<()> {
    let installed = installed_files(root);
    let Some(dest) = archives(root) else {
        return Ok(());
    };
    for name in seeded {
        if !installed.contains(name) {
            let p = dest.join(name);
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", p.display()));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Before mmdebstrap (which runs apt, and apt takes a package in its archive
/// directory on its size alone): the cached packages for `arch` whose content still
/// has the checksum kept with them, written NUL-separated to `list` for the setup hook
/// to copy in. A damaged one is removed from the cache. Returns how many.
pub fn list_for_bootstrap(cache: &Path, root: &Path, arch: &str, list: &Path) -> Result<usize> {
    let candidates = bootstrap_candidates(cache, arch);
    let mut good = Vec::new();
    if fits(root, total_size(cache, &candidates)) {
        for (name, sum) in candidates {
            let Ok(mut f) = File::open(cache.join(&name)) else {
                continue;
            };
            let got = crate::digest::sha256_reader(&mut f)
                .with_context(|| format!("reading {name} in the package cache"))?;
            if got == sum {
                good.push(cache.join(&name));
            } else {
                drop_damaged(cache, &name, &f, &got, &sum);
            }
        }
    } else {
        crate::log::info(
            "  package cache: its packages would crowd the image's filesystem: not copied in",
        );
    }
    let mut text = Vec::new();
    for p in &good {
        text.extend_from_slice(p.as_os_str().as_encoded_bytes());
        text.push(0);
    }
    std::fs::write(list, text).with_context(|| format!("writing {}", list.display()))?;
    Ok(good.len())
}

/// After a download: copy the packages in `dir` that the cache lacks (or holds
/// without a checksum, or with another one) into it, each checked against `sums` on
/// the way; packages `sums` does not name are not cached. What the cache cannot take
/// (a full disk) is not cached, with a warning; this never fails the build.
pub fn collect(cache: &Path, dir: &Path, sums: &Sums) -> usize {
    let mut n = 0;
    let mut failed: Option<anyhow::Error> = None;
    for (name, sum) in sums {
        let src = dir.join(name);
        // Not through a link: a "package" in the image may point at any host file.
        let regular = std::fs::symlink_metadata(&src).is_ok_and(|m| m.file_type().is_file());
        if !regular || cached_with(cache, name, sum) {
            continue;
        }
        match store(cache, &src, name, sum) {
            Ok(true) => n += 1,
            Ok(false) => {}
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failed {
        crate::log::warn(&format!(
            "package cache {}: {e:#}: packages not cached",
            cache.display()
        ));
    }
    n
}

/// Whether the cache holds `name` recorded with checksum `sum`.
fn cached_with(cache: &Path, name: &str, sum: &str) -> bool {
    File::open(cache.join(name))
        .ok()
        .and_then(|f| recorded_sum(&f))
        .is_some_and(|s| s == sum)
}

/// Copy `src` into the cache as `name` if its content has checksum `sum`, with the
/// checksum kept beside it. False if it does not match.
fn store(cache: &Path, src: &Path, name: &str, sum: &str) -> Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(src)
        .with_context(|| format!("reading {}", src.display()))?;
    let mut tmp = Temp::new(cache, name)?;
    let got = copy_hashing(&mut f, tmp.file()).with_context(|| format!("caching {name}"))?;
    if got != sum {
        crate::log::info(&format!(
            "vmdb: package cache: {name} does not match the archive's checksum (checksum {got}, expected {sum}): not cached"
        ));
        return Ok(false);
    }
    // Without it (a filesystem with no extended attributes) the package still serves
    // apt, which is given the archive's checksum, but no bootstrap.
    let _ = rustix::fs::fsetxattr(
        &*tmp.file(),
        SUM_ATTR,
        sum.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    );
    tmp.persist(&cache.join(name))?;
    Ok(true)
}

/// The SHA-256 sums in `apt-get --print-uris` output: `'URI' FILE SIZE SHA256:HEX`
/// lines. Packages with no SHA-256 there are left out (never cached).
pub fn sums_from_print_uris(print_uris: &str) -> Sums {
    print_uris
        .lines()
        .filter(|l| l.starts_with('\''))
        .filter_map(|l| {
            let mut f = l.split_whitespace().skip(1);
            let (name, _size, hash) = (f.next()?, f.next()?, f.next()?);
            let sum = hash.strip_prefix("SHA256:")?;
            (is_package_file(name) && is_sha256(sum))
                .then(|| (name.to_string(), sum.to_ascii_lowercase()))
        })
        .collect()
}

/// A plain .deb file name: the cache is never written or read outside its directory.
fn is_package_file(name: &str) -> bool {
    name.ends_with(".deb") && !name.contains('/') && !crate::host::cachefile::is_temporary(name)
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The names of the .deb files in `dir`.
pub fn debs_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_package_file(n))
        .collect()
}

/// The archive's SHA-256 of the package files `names`, from the apt lists in the image
/// at `root` (uncompressed `*_Packages` files, as debootstrap and mmdebstrap leave
/// them). Names not found there are left out.
pub fn sums_from_lists(root: &Path, names: &BTreeSet<String>) -> Sums {
    let mut sums = Sums::new();
    // Read as the image sees them: a link there never leads to the host's lists.
    let Ok(lists) = ImageRoot::open(root).and_then(|img| img.host_path("/var/lib/apt/lists"))
    else {
        return sums;
    };
    for e in std::fs::read_dir(&lists).into_iter().flatten().flatten() {
        if !e.file_name().to_string_lossy().ends_with("_Packages") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        for s in stanzas(&text) {
            let (Some(p), Some(v), Some(a), Some(sum)) = (
                s.get("Package"),
                s.get("Version"),
                s.get("Architecture"),
                s.get("SHA256"),
            ) else {
                continue;
            };
            let name = apt_file_name(p, v, a);
            if is_package_file(&name) && names.contains(&name) && is_sha256(sum) {
                sums.insert(name, sum.to_ascii_lowercase());
            }
        }
    }
    sums
}

/// The file names of the packages installed in the image at `root`.
fn installed_files(root: &Path) -> BTreeSet<String> {
    let text = ImageRoot::open(root)
        .and_then(|img| img.read("/var/lib/dpkg/status"))
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    stanzas(&text)
        .filter(|s| s.get("Status").is_some_and(|st| st.ends_with(" installed")))
        .filter_map(|s| {
            Some(apt_file_name(
                s.get("Package")?,
                s.get("Version")?,
                s.get("Architecture")?,
            ))
        })
        .collect()
}

/// The single-line fields of each paragraph of a Debian control file.
fn stanzas(text: &str) -> impl Iterator<Item = BTreeMap<&str, &str>> {
    text.split("\n\n").map(|para| {
        para.lines()
            .filter(|l| !l.starts_with([' ', '\t']))
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k, v.trim()))
            .collect()
    })
}

/// The name apt gives a package's file: PACKAGE_VERSION_ARCH.deb, with `_`, `:`, `%`
/// and unprintable characters written as %xx (an epoch's colon becomes %3a).
pub fn apt_file_name(package: &str, version: &str, arch: &str) -> String {
    let quote = |s: &str, bad: &str| -> String {
        s.bytes()
            .map(|b| {
                if bad.as_bytes().contains(&b) || b == b'%' || b <= 0x20 || b >= 0x7f {
                    format!("%{b:02x}")
                } else {
                    (b as char).to_string()
                }
            })
            .collect()
    };
    format!(
        "{}_{}_{}.deb",
        quote(package, "_:"),
        quote(version, "_:"),
        quote(arch, "_:.")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        crate::digest::sha256(data)
    }

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("debs");
        let root = d.path().join("root");
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::create_dir_all(root.join(&ARCHIVES[1..])).unwrap();
        (d, cache, root)
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn seed_and_collect_check_every_package_against_the_archive() {
        let (_d, cache, root) = setup();
        let arch = root.join(&ARCHIVES[1..]);
        std::fs::write(cache.join("a_1_amd64.deb"), "a").unwrap();
        std::fs::write(cache.join("c_1_i386.deb"), "c").unwrap();
        // Damaged: same size as the real thing, other content.
        std::fs::write(cache.join("e_1_all.deb"), "X").unwrap();
        std::fs::write(arch.join("b_1_amd64.deb"), "b").unwrap();
        std::fs::write(arch.join("lock"), "").unwrap();
        let wanted: Sums = [
            ("a_1_amd64.deb", sha(b"a")),
            ("d_1_all.deb", sha(b"d")),
            ("e_1_all.deb", sha(b"e")),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
        assert_eq!(seed(&cache, &root, &wanted), 1);
        assert!(!arch.join("c_1_i386.deb").exists());
        assert_eq!(std::fs::read(arch.join("a_1_amd64.deb")).unwrap(), b"a");
        // The damaged one went into neither the image nor stayed in the cache.
        assert!(!arch.join("e_1_all.deb").exists());
        assert!(!cache.join("e_1_all.deb").exists());

        // apt downloaded e and b; what sums do not name is not cached.
        std::fs::write(arch.join("e_1_all.deb"), "e").unwrap();
        let mut sums = wanted.clone();
        sums.insert("b_1_amd64.deb".into(), sha(b"b"));
        assert_eq!(collect(&cache, &arch, &sums), 3);
        assert_eq!(std::fs::read(cache.join("e_1_all.deb")).unwrap(), b"e");
        assert_eq!(std::fs::read(cache.join("b_1_amd64.deb")).unwrap(), b"b");
        assert!(!cache.join("lock").exists());
        assert_eq!(
            recorded_sum(&File::open(cache.join("b_1_amd64.deb")).unwrap()),
            Some(sha(b"b"))
        );
        // Nothing new either way the second time.
        assert_eq!(seed(&cache, &root, &wanted), 0);
        assert_eq!(collect(&cache, &arch, &sums), 0);
        // A download that does not match its checksum is not cached.
        std::fs::write(arch.join("f_1_all.deb"), "wrong").unwrap();
        let f: Sums = [("f_1_all.deb".to_string(), sha(b"f"))].into();
        assert_eq!(collect(&cache, &arch, &f), 0);
        assert!(!cache.join("f_1_all.deb").exists());
        assert_eq!(leftovers(&cache), Vec::<String>::new());
        assert_eq!(leftovers(&arch), Vec::<String>::new());
    }

    #[test]
    fn bootstrap_packages_are_checked_against_the_kept_checksum() {
        let (d, cache, root) = setup();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let mut sums = Sums::new();
        for (n, c) in [
            ("a_1_amd64.deb", "a"),
            ("b_1_all.deb", "b"),
            ("c_1_i386.deb", "c"),
        ] {
            std::fs::write(src.join(n), c).unwrap();
            sums.insert(n.into(), sha(c.as_bytes()));
        }
        assert_eq!(collect(&cache, &src, &sums), 3);
        // Cached without a checksum (an older vmdb): never given to a bootstrap.
        std::fs::write(cache.join("old_1_amd64.deb"), "o").unwrap();
        // Damaged in place.
        std::fs::write(cache.join("b_1_all.deb"), "B").unwrap();

        let list = d.path().join("list");
        assert_eq!(
            list_for_bootstrap(&cache, &root, "amd64", &list).unwrap(),
            1
        );
        assert_eq!(
            std::fs::read(&list).unwrap(),
            format!("{}\0", cache.join("a_1_amd64.deb").display()).as_bytes()
        );
        assert!(!cache.join("b_1_all.deb").exists());

        std::fs::write(src.join("b_1_all.deb"), "b").unwrap();
        assert_eq!(collect(&cache, &src, &sums), 1);
        std::fs::write(cache.join("a_1_amd64.deb"), "A").unwrap();
        let seeded = seed_bootstrap(&cache, &root, "amd64");
        assert_eq!(seeded, ["b_1_all.deb"]);
        assert!(!cache.join("a_1_amd64.deb").exists());
        assert_eq!(
            std::fs::read(root.join(&ARCHIVES[1..]).join("b_1_all.deb")).unwrap(),
            b"b"
        );

        // Only what dpkg installed stays in the image.
        std::fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
        std::fs::write(
            root.join("var/lib/dpkg/status"),
            "Package: z\nStatus: install ok installed\nArchitecture: all\nVersion: 1\n",
        )
        .unwrap();
        unseed(&root, &seeded).unwrap();
        assert!(!root.join(&ARCHIVES[1..]).join("b_1_all.deb").exists());
    }

    #[test]
    fn sums_from_apt_and_its_lists() {
        let out = "'http://m.example.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb' hello_2.10-3_amd64.deb 56024 SHA256:ABababababababababababababababababababababababababababababababab\n\
                   'http://m.example.org/debian/pool/main/s/sed/sed_1%3a4.9_amd64.deb' sed_1%3a4.9_amd64.deb 1 MD5Sum:cd\n";
        assert_eq!(
            sums_from_print_uris(out),
            Sums::from([("hello_2.10-3_amd64.deb".into(), "ab".repeat(32))])
        );
        assert!(sums_from_print_uris("").is_empty());

        let d = tempfile::tempdir().unwrap();
        let lists = d.path().join("var/lib/apt/lists");
        std::fs::create_dir_all(&lists).unwrap();
        std::fs::write(
            lists.join("m_debian_dists_trixie_main_binary-amd64_Packages"),
            format!(
                "Package: sed\nVersion: 1:4.9-2\nArchitecture: amd64\nDescription: x\n more\nSHA256: {}\n\n\
                 Package: hello\nVersion: 2.10-3\nArchitecture: amd64\nSHA256: {}\n",
                "1".repeat(64),
                "2".repeat(64)
            ),
        )
        .unwrap();
        let names: BTreeSet<String> = ["sed_1%3a4.9-2_amd64.deb".to_string()].into();
        assert_eq!(
            sums_from_lists(d.path(), &names),
            Sums::from([("sed_1%3a4.9-2_amd64.deb".into(), "1".repeat(64))])
        );
        assert_eq!(
            apt_file_name("libc6", "2.36-9", "amd64"),
            "libc6_2.36-9_amd64.deb"
        );
        assert_eq!(apt_file_name("a", "1:2%x", "all"), "a_1%3a2%25x_all.deb");
    }
}

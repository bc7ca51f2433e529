//! The package cache with real Debian builds: a cached package damaged in place (same
//! size) is found, removed and downloaded again, whichever tool bootstraps; a cache on
//! a full filesystem only means packages are not cached. Needs root and the Debian
//! archive: run with `cargo test -- --include-ignored` (scripts/test does).

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn spec(tool: &str) -> String {
    format!(
        r#"steps:
  - mkimg: "{{{{ output }}}}"
    size: 2G
  - mklabel: gpt
    device: "{{{{ output }}}}"
  - mkpart: root
    device: "{{{{ output }}}}"
    start: 0%
    end: 100%
    tag: /
  - mkfs: ext4
    partition: /
  - mount: /
  - debootstrap: bookworm
    target: /
    variant: minbase
    tool: {tool}
  - apt: install
    packages: [hello]
    tag: /
    recommends: false
    clean: false
"#
    )
}

fn build(dir: &Path, tool: &str, cache: &Path, img: &str) -> Run {
    let spec_file = write(dir, &format!("{tool}.vmdb"), &spec(tool));
    let r = to_run(
        vmdb()
            .args([
                spec_file.display().to_string(),
                "--output".into(),
                dir.join(img).display().to_string(),
                "--cache-dir".into(),
                cache.display().to_string(),
            ])
            .output()
            .unwrap(),
    );
    wait_clean(dir, 5).unwrap();
    r
}

fn sha256(p: &Path) -> String {
    tool("sha256sum", &[&p.to_string_lossy()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The one package for the host's architecture in `dir` whose name starts with
/// `prefix` (the shared test cache holds other architectures' too).
fn find(dir: &Path, prefix: &str) -> PathBuf {
    let arch = tool("dpkg", &["--print-architecture"]);
    let suffix = format!("_{}.deb", arch.trim());
    let found: Vec<String> = listing(dir)
        .into_iter()
        .filter(|n| n.starts_with(prefix) && n.ends_with(&suffix))
        .collect();
    assert_eq!(found.len(), 1, "{prefix}* in {}: {found:?}", dir.display());
    dir.join(&found[0])
}

const SUM_ATTR: &str = "user.vmdb.sha256";

/// Give `p` an inode of its own (it may be a hard link to the shared test cache),
/// with the checksum recorded with it or (as an older vmdb cached it) without.
fn unshare(p: &Path, keep_sum: bool) {
    let data = std::fs::read(p).unwrap();
    let mut buf = [0u8; 64];
    let sum = rustix::fs::getxattr(p, SUM_ATTR, &mut buf[..]).map(|n| buf[..n].to_vec());
    let tmp = p.with_extension("new");
    std::fs::write(&tmp, &data).unwrap();
    if let (Ok(sum), true) = (sum, keep_sum) {
        rustix::fs::setxattr(&tmp, SUM_ATTR, &sum, rustix::fs::XattrFlags::empty()).unwrap();
    }
    std::fs::rename(&tmp, p).unwrap();
}

/// Flip bytes in the middle of `p`, in place: same size, same inode.
fn damage(p: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut b = [0u8; 16];
    f.seek(SeekFrom::Start(len / 2)).unwrap();
    f.read_exact(&mut b).unwrap();
    for x in b.iter_mut() {
        *x ^= 0xa5;
    }
    f.seek(SeekFrom::Start(len / 2)).unwrap();
    f.write_all(&b).unwrap();
    assert_eq!(f.metadata().unwrap().len(), len);
}

/// Hard links from `from` to `to` of the .deb files `to` lacks.
fn link_debs(from: &Path, to: &Path) {
    if !from.is_dir() {
        return;
    }
    std::fs::create_dir_all(to).unwrap();
    for n in listing(from) {
        if n.ends_with(".deb") && !n.starts_with('.') && !to.join(&n).exists() {
            let _ = std::fs::hard_link(from.join(&n), to.join(&n));
        }
    }
}

/// The packages dpkg lists as installed in the image's root, as apt names their files.
fn installed_debs(root: &Path) -> Vec<String> {
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    let mut v: Vec<String> = status
        .split("\n\n")
        .filter(|p| p.contains("\nStatus: install ok installed"))
        .map(|p| {
            let field = |k: &str| {
                p.lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}: ")))
                    .unwrap()
                    .replace(':', "%3a")
            };
            format!(
                "{}_{}_{}.deb",
                field("Package"),
                field("Version"),
                field("Architecture")
            )
        })
        .collect();
    v.sort();
    v
}

/// The .deb files in the image's apt archive, and the packages installed.
fn image_debs(img: &Path) -> (Vec<String>, Vec<String>) {
    let j: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["-J", &img.to_string_lossy()])).unwrap();
    let start = j["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let dev = tool(
        "losetup",
        &[
            "-f",
            "--show",
            "-r",
            "-o",
            &(start * 512).to_string(),
            &img.to_string_lossy(),
        ],
    )
    .trim()
    .to_string();
    let ok = std::process::Command::new("mount")
        .args(["-o", "ro", &dev, &mnt.path().to_string_lossy()])
        .status()
        .unwrap()
        .success();
    let got = ok.then(|| {
        let debs: Vec<String> = listing(&mnt.path().join("var/cache/apt/archives"))
            .into_iter()
            .filter(|n| n.ends_with(".deb"))
            .collect();
        (debs, installed_debs(mnt.path()))
    });
    let _ = std::process::Command::new("umount")
        .arg(mnt.path())
        .status();
    let _ = std::process::Command::new("losetup")
        .args(["-d", &dev])
        .status();
    got.expect("mounting the image's root filesystem")
}

fn damaged_packages_are_downloaded_again(tool_name: &str) {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let debs = cache.join("debs");
    // What earlier test builds downloaded, as links: only what this test damages gets
    // an inode of its own.
    link_debs(&test_cache_dir().join("debs"), &debs);

    let first = build(d.path(), tool_name, &cache, "first.img");
    assert_eq!(first.code, 0, "{}", first.stderr);
    // A package of the bootstrap and the one apt installs, damaged in place. The
    // second has no checksum recorded with it: the bootstrap leaves it alone, and apt's
    // step checks it against the archive's checksum.
    let victims = [find(&debs, "base-files_"), find(&debs, "hello_")];
    let good: Vec<String> = victims.iter().map(|p| sha256(p)).collect();
    for (i, v) in victims.iter().enumerate() {
        unshare(v, i == 0);
        damage(v);
        assert_ne!(sha256(v), good[i]);
    }
    // Let the steps run again rather than restore their trees.
    std::fs::remove_dir_all(cache.join("steps")).unwrap();
    // A package the bootstrap does not install, recorded as sound: copied into the
    // image for it, and gone from there after.
    let extra = debs.join("vmdb-unused_1.0_all.deb");
    std::fs::write(&extra, "not a real package\n").unwrap();
    let sum = sha256(&extra);
    rustix::fs::setxattr(
        &extra,
        SUM_ATTR,
        sum.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();

    let second = build(d.path(), tool_name, &cache, "second.img");
    assert_eq!(second.code, 0, "{}", second.stderr);
    for (v, sum) in victims.iter().zip(&good) {
        let name = v.file_name().unwrap().to_string_lossy();
        assert!(
            second.stderr.contains(&format!(
                "vmdb: package cache: {name} is damaged (checksum "
            )),
            "{}",
            second.stderr
        );
        assert_eq!(&sha256(v), sum, "{name} in the cache after the build");
    }
    assert_eq!(
        listing(&debs)
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect::<Vec<_>>(),
        Vec::<String>::new()
    );
    // The image's apt archive holds what the tools downloaded for it: for debootstrap
    // (mmdebstrap's are removed) the packages installed, nothing else.
    let (in_image, installed) = image_debs(&d.path().join("second.img"));
    let expected: Vec<String> = if tool_name == "debootstrap" {
        installed
    } else {
        vec![v_name(&victims[1])]
    };
    assert_eq!(in_image, expected);
    link_debs(&debs, &test_cache_dir().join("debs"));
}

fn v_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
#[ignore = "builds Debian images twice: minutes, needs the Debian archive"]
fn a_damaged_cached_package_is_downloaded_again_with_mmdebstrap() {
    need_root!();
    damaged_packages_are_downloaded_again("mmdebstrap");
}

#[test]
#[ignore = "builds Debian images twice: minutes, needs the Debian archive"]
fn a_damaged_cached_package_is_downloaded_again_with_debootstrap() {
    need_root!();
    damaged_packages_are_downloaded_again("debootstrap");
}

/// Unmounts its directory when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
#[ignore = "builds a Debian image: a minute, needs the Debian archive"]
fn a_full_cache_filesystem_means_not_cached_never_a_failed_build() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    // Not below the build's directory, whose mounts must all be gone after the build.
    let cache_mnt = tempfile::tempdir().unwrap();
    let cache = cache_mnt.path().to_path_buf();
    tool(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=3m",
            "tmpfs",
            &cache.to_string_lossy(),
        ],
    );
    let _mounted = Mounted(cache.clone());
    let r = build(d.path(), "mmdebstrap", &cache, "full.img");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let warnings: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("vmdb: warning: "))
        .collect();
    assert!(
        warnings.iter().any(|l| l.starts_with(&format!(
            "vmdb: warning: package cache {}: ",
            cache.join("debs").display()
        )) && l
            .ends_with("No space left on device (os error 28): packages not cached")),
        "{}",
        r.stderr
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.starts_with("vmdb: warning: could not save to the step cache: ")),
        "{}",
        r.stderr
    );
    // Nothing half-written is left.
    for sub in ["debs", "steps"] {
        let left: Vec<String> = listing(&cache.join(sub))
            .into_iter()
            .filter(|n| n.starts_with('.') || n.ends_with(".tar.zst"))
            .collect();
        assert_eq!(left, Vec::<String>::new(), "{sub}");
    }
}

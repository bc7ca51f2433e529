//! tar command lines for image trees: packing a tree into a (compressed) tarball and
//! unpacking one, keeping owners by number, extended attributes and ACLs, and leaving
//! alone the virtual filesystems mounted in the tree. The rootfs tarball steps and the
//! step cache use them.

use std::path::Path;

/// How a tarball is compressed, chosen by its file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
    /// A name tar does not know: written uncompressed, read by tar's own detection.
    Unknown,
}

impl Compression {
    pub fn for_path(p: &Path) -> Compression {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let ends = |sfx: &[&str]| sfx.iter().any(|s| name.ends_with(s));
        if ends(&[".tar.gz", ".tgz"]) {
            Compression::Gzip
        } else if ends(&[".tar.zst", ".tzst", ".tar.zstd"]) {
            Compression::Zstd
        } else if ends(&[".tar.xz", ".txz"]) {
            Compression::Xz
        } else if ends(&[".tar"]) {
            Compression::None
        } else {
            Compression::Unknown
        }
    }

    /// The programs that (de)compress it, any one of which will do, with their Debian
    /// packages: what `program` (and unpack-rootfs) may pick.
    pub fn programs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Compression::None | Compression::Unknown => &[],
            Compression::Gzip => &[("pigz", "pigz"), ("gzip", "gzip")],
            Compression::Zstd => &[("zstd", "zstd")],
            Compression::Xz => &[("xz", "xz-utils")],
        }
    }

    /// The program tar pipes through (`--use-compress-program`) to pack, if any; `pigz`
    /// says whether pigz is installed. Fixed strings: nothing from the spec goes in here.
    pub fn program(self, pigz: bool) -> Option<&'static str> {
        match self {
            Compression::None | Compression::Unknown => None,
            Compression::Gzip if pigz => Some("pigz"),
            Compression::Gzip => Some("gzip"),
            Compression::Zstd => Some("zstd -T0"),
            Compression::Xz => Some("xz -T0"),
        }
    }

    /// The program tar pipes through to unpack; xz and zstd decompress on one thread
    /// only anyway.
    pub fn unpack_program(self, pigz: bool) -> Option<&'static str> {
        match self {
            Compression::Gzip if pigz => Some("pigz -d"),
            Compression::Gzip => Some("gzip -d"),
            Compression::Zstd => Some("zstd -d"),
            Compression::Xz => Some("xz -d"),
            Compression::None | Compression::Unknown => None,
        }
    }
}

/// Whether pigz (a parallel gzip) is installed.
pub fn have_pigz() -> bool {
    super::cmd::in_path("pigz")
}

/// Options both packing and unpacking use: owners by number, extended attributes
/// (file capabilities, SELinux labels) and ACLs.
pub const TAR_KEEP: &[&str] = &[
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
];

/// tar's arguments to pack `root` into `file`, leaving out the contents of the
/// virtual filesystems mounted in `mounted` (paths relative to root, e.g. "proc").
pub fn pack_argv(root: &Path, file: &Path, prog: Option<&str>, mounted: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["--create".into(), format!("--file={}", file.display())];
    if let Some(p) = prog {
        v.push(format!("--use-compress-program={p}"));
    }
    v.extend(TAR_KEEP.iter().map(|s| s.to_string()));
    for m in mounted {
        v.push(format!("--exclude=./{m}/*"));
    }
    v.extend([format!("--directory={}", root.display()), ".".to_string()]);
    v
}

/// tar's arguments to unpack `file` into `root`, leaving alone the virtual filesystems
/// mounted in `mounted` (e.g. "dev": the host's device nodes).
pub fn unpack_argv(root: &Path, file: &Path, prog: Option<&str>, mounted: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["--extract".into(), format!("--file={}", file.display())];
    if let Some(p) = prog {
        v.push(format!("--use-compress-program={p}"));
    }
    v.push("--preserve-permissions".into());
    v.extend(TAR_KEEP.iter().map(|s| s.to_string()));
    for m in mounted {
        v.push(format!("--exclude=./{m}/*"));
    }
    v.push(format!("--directory={}", root.display()));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_by_file_name() {
        let c = |n: &str| Compression::for_path(Path::new(n));
        assert_eq!(c("/x/root.tar.gz"), Compression::Gzip);
        assert_eq!(c("root.TGZ"), Compression::Gzip);
        assert_eq!(c("root.tar.zst"), Compression::Zstd);
        assert_eq!(c("root.tzst"), Compression::Zstd);
        assert_eq!(c("root.tar.xz"), Compression::Xz);
        assert_eq!(c("root.txz"), Compression::Xz);
        assert_eq!(c("root.tar"), Compression::None);
        assert_eq!(c("root.cache"), Compression::Unknown);
        assert_eq!(Compression::Gzip.program(true), Some("pigz"));
        assert_eq!(Compression::Gzip.program(false), Some("gzip"));
        assert_eq!(Compression::Zstd.program(false), Some("zstd -T0"));
        assert_eq!(Compression::Xz.program(false), Some("xz -T0"));
        assert_eq!(Compression::None.program(true), None);
        assert_eq!(Compression::Unknown.program(true), None);
    }

    #[test]
    fn pack_command_line() {
        assert_eq!(
            pack_argv(
                Path::new("/mnt"),
                Path::new("/c/.r.tar.zst.x.partial"),
                Some("zstd -T0"),
                &["proc", "dev"]
            ),
            [
                "--create",
                "--file=/c/.r.tar.zst.x.partial",
                "--use-compress-program=zstd -T0",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "--acls",
                "--exclude=./proc/*",
                "--exclude=./dev/*",
                "--directory=/mnt",
                "."
            ]
        );
    }

    #[test]
    fn unpack_command_line() {
        assert_eq!(
            unpack_argv(
                Path::new("/mnt"),
                Path::new("/c/r.tar.gz"),
                Some("gzip -d"),
                &["dev"]
            ),
            [
                "--extract",
                "--file=/c/r.tar.gz",
                "--use-compress-program=gzip -d",
                "--preserve-permissions",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "--acls",
                "--exclude=./dev/*",
                "--directory=/mnt"
            ]
        );
    }
}

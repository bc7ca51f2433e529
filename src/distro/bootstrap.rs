//! Bootstrapping a Debian system: debootstrap's and mmdebstrap's command lines.
//!
//! mmdebstrap is the faster engine of a `debootstrap` step: the same system as
//! debootstrap's in about a third of the time (apt resolves and downloads in parallel, dpkg unpacks
//! everything in one run, without an fsync per file).
//!
//! What is made matches debootstrap's: the same packages (merged /usr through
//! mmdebstrap's own merged-usr hook, which installs usr-is-merged as debootstrap does),
//! every package marked as installed by hand, and no dpkg setting left behind.
//! The known difference (docs/vmdb2-differences.md): /etc/machine-id is left empty (set
//! on first boot).

use std::path::Path;

use anyhow::Result;

use crate::host::image_root::ImageRoot;

/// The values debootstrap is run with.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    pub suite: String,
    pub target: String,
    pub mirror: String,
    pub arch: String,
    pub variant: String,
    pub components: Vec<String>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub keyring: Option<String>,
}

/// debootstrap's command line.
pub fn debootstrap_argv(a: &Args) -> Vec<String> {
    let mut v = vec!["debootstrap".to_string(), format!("--arch={}", a.arch)];
    if a.variant != "-" && !a.variant.is_empty() {
        v.push(format!("--variant={}", a.variant));
    }
    if !a.components.is_empty() {
        v.push(format!("--components={}", a.components.join(",")));
    }
    if !a.include.is_empty() {
        v.push(format!("--include={}", a.include.join(",")));
    }
    if !a.exclude.is_empty() {
        v.push(format!("--exclude={}", a.exclude.join(",")));
    }
    if let Some(k) = &a.keyring {
        v.push(format!("--keyring={k}"));
    }
    v.extend([a.suite.clone(), a.target.clone(), a.mirror.clone()]);
    v
}

/// The installed versions of debootstrap and mmdebstrap, looked up once:
/// "debootstrap 1.0.128+nmu2, mmdebstrap 1.3.5-2" (a version is empty when the tool is
/// not installed).
pub fn tool_versions() -> &'static str {
    static VERSIONS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSIONS.get_or_init(|| {
        ["debootstrap", "mmdebstrap"]
            .map(|p| {
                let v = crate::host::cmd::Cmd::new("dpkg-query")
                    .args(["-W", "-f", "${Version}", p])
                    .run()
                    .unwrap_or_default();
                format!("{p} {v}")
            })
            .join(", ")
    })
}

/// The hook directory that merges /usr where the suite has usr-is-merged, as
/// debootstrap does for such suites.
const MERGED_USR_HOOKS: &str = "/usr/share/mmdebstrap/hooks/maybe-merged-usr";

/// The environment variable naming the file that lists (NUL-separated) the cached
/// packages the setup hook copies in: checked by vmdb just before.
pub const DEBS_ENV: &str = "VMDB_PACKAGE_LIST";

/// Whether this host has mmdebstrap with the hooks vmdb relies on, and, for an
/// architecture other than the host's own (i386 on amd64), the arch-test program
/// mmdebstrap insists on for it.
pub fn available(other_arch: bool) -> bool {
    use crate::host::cmd::in_path;
    Path::new(MERGED_USR_HOOKS).is_dir()
        && in_path("mmdebstrap")
        && (!other_arch || in_path("arch-test"))
}

/// mmdebstrap's variant for a debootstrap variant; None for one it has no match for.
pub fn variant(debootstrap_variant: &str) -> Option<&'static str> {
    match debootstrap_variant {
        "-" | "" => Some("debootstrap"),
        "minbase" => Some("minbase"),
        "buildd" => Some("buildd"),
        _ => None,
    }
}

/// Why mmdebstrap cannot do what this debootstrap step asks; None when it can.
pub fn unsupported(variant_name: &str, exclude: bool, tls_ca_certs: bool) -> Option<String> {
    if variant(variant_name).is_none() {
        return Some(format!("mmdebstrap has no variant like '{variant_name}'"));
    }
    if exclude {
        return Some("mmdebstrap has no 'exclude'".into());
    }
    if tls_ca_certs {
        return Some("vmdb passes 'tls_ca_certs' to debootstrap only".into());
    }
    None
}

/// mmdebstrap's command line (for the same `Args`). With a package cache, the setup hook copies the cached
/// packages of the architecture that vmdb checked (apt would take them on their size
/// alone) into the new tree's apt archive, and the downloaded ones are left there for
/// vmdb to collect. A package that cannot be copied is downloaded instead.
pub fn mmdebstrap_argv(a: &Args, cache: bool) -> Vec<String> {
    let mut v = vec![
        "mmdebstrap".to_string(),
        "--mode=root".into(),
        format!("--arch={}", a.arch),
        format!("--variant={}", variant(&a.variant).unwrap_or("debootstrap")),
        "--dpkgopt=force-unsafe-io".into(),
        format!("--hook-dir={MERGED_USR_HOOKS}"),
    ];
    if !a.components.is_empty() {
        v.push(format!("--components={}", a.components.join(",")));
    }
    if !a.include.is_empty() {
        v.push(format!("--include={}", a.include.join(",")));
    }
    if let Some(k) = &a.keyring {
        v.push(format!("--keyring={k}"));
    }
    // apt's lists stay, as debootstrap's do: the next apt step's update then only
    // checks that they are current. The target's emptiness is vmdb's to judge
    // (require_empty_target): mmdebstrap refuses even the empty mount point of an ESP
    // mounted at /boot/efi, which debootstrap accepts.
    let mut skip = vec!["check/empty", "cleanup/apt/lists"];
    if cache {
        skip.extend(["essential/unlink", "cleanup/apt/cache", "download/empty"]);
    }
    v.push(format!("--skip={}", skip.join(",")));
    if cache {
        v.push(format!(
            "--setup-hook=mkdir -p \"$1/var/cache/apt/archives\" && \
             {{ xargs -r -0 -a \"${DEBS_ENV}\" cp -t \"$1/var/cache/apt/archives\" -- || :; }}"
        ));
    }
    v.extend([a.suite.clone(), a.target.clone(), a.mirror.clone()]);
    v
}

/// Remove what mmdebstrap leaves that debootstrap does not: the dpkg option vmdb gave
/// it (later steps get their own, removed at the end of the build), the
/// automatically-installed marks, and (when vmdb kept them for its cache) the packages
/// and apt's binary caches.
pub fn tidy(root: &Path) -> Result<()> {
    let img = ImageRoot::open(root)?;
    let opt = "/etc/dpkg/dpkg.cfg.d/99mmdebstrap";
    if img
        .read(opt)?
        .is_some_and(|t| String::from_utf8_lossy(&t).trim() == "force-unsafe-io")
    {
        img.remove_file(opt)?;
    }
    img.remove_file("/var/lib/apt/extended_states")?;
    img.remove_file("/var/cache/apt/pkgcache.bin")?;
    img.remove_file("/var/cache/apt/srcpkgcache.bin")?;
    let archives = Path::new("/var/cache/apt/archives");
    for e in img.read_dir(archives)?.unwrap_or_default() {
        if e.name.to_string_lossy().ends_with(".deb") {
            img.remove_file(archives.join(&e.name))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            suite: "bookworm".into(),
            target: "/mnt".into(),
            mirror: "http://mirror.example.org/debian".into(),
            arch: "amd64".into(),
            variant: "-".into(),
            components: vec!["main".into(), "contrib".into()],
            include: vec!["less".into()],
            exclude: vec![],
            keyring: Some("/k.gpg".into()),
        }
    }

    /// What a step with only a suite and a target asks for.
    fn plain_args() -> Args {
        Args {
            components: vec!["main".into()],
            include: vec![],
            keyring: None,
            ..args()
        }
    }

    #[test]
    fn default_command_line() {
        assert_eq!(
            debootstrap_argv(&plain_args()),
            [
                "debootstrap",
                "--arch=amd64",
                "--components=main",
                "bookworm",
                "/mnt",
                "http://mirror.example.org/debian"
            ]
        );
    }

    #[test]
    fn every_option_on_the_command_line() {
        let a = Args {
            variant: "minbase".into(),
            components: vec!["main".into(), "contrib".into()],
            include: vec!["less".into(), "vim".into()],
            exclude: vec!["nano".into()],
            keyring: Some("/k.gpg".into()),
            ..plain_args()
        };
        assert_eq!(
            debootstrap_argv(&a),
            [
                "debootstrap",
                "--arch=amd64",
                "--variant=minbase",
                "--components=main,contrib",
                "--include=less,vim",
                "--exclude=nano",
                "--keyring=/k.gpg",
                "bookworm",
                "/mnt",
                "http://mirror.example.org/debian"
            ]
        );
    }

    #[test]
    fn command_line_without_and_with_the_cache() {
        let plain = mmdebstrap_argv(&args(), false);
        assert_eq!(
            plain,
            [
                "mmdebstrap",
                "--mode=root",
                "--arch=amd64",
                "--variant=debootstrap",
                "--dpkgopt=force-unsafe-io",
                "--hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr",
                "--components=main,contrib",
                "--include=less",
                "--keyring=/k.gpg",
                "--skip=check/empty,cleanup/apt/lists",
                "bookworm",
                "/mnt",
                "http://mirror.example.org/debian"
            ]
        );
        let cached = mmdebstrap_argv(&args(), true);
        assert_eq!(cached.len(), plain.len() + 1);
        assert_eq!(
            cached[9],
            "--skip=check/empty,cleanup/apt/lists,essential/unlink,cleanup/apt/cache,download/empty"
        );
        assert!(cached[10].starts_with("--setup-hook=mkdir -p \"$1/var/cache/apt/archives\""));
        assert_eq!(
            cached[10],
            "--setup-hook=mkdir -p \"$1/var/cache/apt/archives\" && \
             { xargs -r -0 -a \"$VMDB_PACKAGE_LIST\" cp -t \"$1/var/cache/apt/archives\" -- || :; }"
        );
    }

    #[test]
    fn variants_and_what_only_debootstrap_does() {
        assert_eq!(variant("-"), Some("debootstrap"));
        assert_eq!(variant("minbase"), Some("minbase"));
        assert_eq!(variant("fakechroot"), None);
        assert_eq!(unsupported("-", false, false), None);
        assert_eq!(
            unsupported("fakechroot", false, false).unwrap(),
            "mmdebstrap has no variant like 'fakechroot'"
        );
        assert_eq!(
            unsupported("-", true, false).unwrap(),
            "mmdebstrap has no 'exclude'"
        );
        assert!(unsupported("minbase", false, true).is_some());
    }

    #[test]
    fn tidy_leaves_what_debootstrap_would() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for dir in [
            "etc/dpkg/dpkg.cfg.d",
            "var/lib/apt",
            "var/cache/apt/archives/partial",
        ] {
            std::fs::create_dir_all(r.join(dir)).unwrap();
        }
        std::fs::write(
            r.join("etc/dpkg/dpkg.cfg.d/99mmdebstrap"),
            "force-unsafe-io\n",
        )
        .unwrap();
        std::fs::write(r.join("var/lib/apt/extended_states"), "Package: a\n").unwrap();
        std::fs::write(r.join("var/cache/apt/pkgcache.bin"), "").unwrap();
        std::fs::write(r.join("var/cache/apt/archives/a_1_amd64.deb"), "").unwrap();
        std::fs::write(r.join("var/cache/apt/archives/lock"), "").unwrap();
        tidy(r).unwrap();
        assert!(!r.join("etc/dpkg/dpkg.cfg.d/99mmdebstrap").exists());
        assert!(!r.join("var/lib/apt/extended_states").exists());
        assert!(!r.join("var/cache/apt/pkgcache.bin").exists());
        assert!(!r.join("var/cache/apt/archives/a_1_amd64.deb").exists());
        assert!(r.join("var/cache/apt/archives/lock").exists());
        // A dpkg option file with more in it is someone else's: it stays.
        std::fs::write(
            r.join("etc/dpkg/dpkg.cfg.d/99mmdebstrap"),
            "path-exclude=/x\n",
        )
        .unwrap();
        tidy(r).unwrap();
        assert!(r.join("etc/dpkg/dpkg.cfg.d/99mmdebstrap").exists());
    }
}

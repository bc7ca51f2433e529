//! `apt: install`: install packages into the image with apt-get, in a chroot.

use std::path::Path;

use anyhow::Result;

use crate::distro::chroot;
use crate::engine::build::Build;
use crate::engine::cachekey::CacheInputs;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};

pub struct Apt;

static SPEC: StepSpec = StepSpec {
    name: "apt",
    value: Kind::Str,
    value_doc: "`install`, the only operation; or, as in vmdb2's first releases and \
        accepted for compatibility, the name of one package to install (`apt: \
        linux-image-amd64`, without `packages`)",
    keys: &[
        Key::opt(
            "packages",
            Kind::List,
            "the packages to install (a list, or one name); required with `apt: install`",
        ),
        Key::req(
            "tag",
            Kind::Str,
            "tag of the image's root filesystem; an earlier step must mount it",
        )
        .aliases(&["fs-tag"]),
        Key::opt(
            "recommends",
            Kind::Bool,
            "`false` adds `--no-install-recommends`",
        )
        .default("true"),
        Key::opt("clean", Kind::Bool, "run `apt-get clean` afterwards").default("true"),
    ],
    summary: "Installs packages into the image with `apt-get`, run in a chroot of the image.",
    cache: CacheRole::Tree,
    always_saved: true,
};

/// Owner of the virtual filesystems mounted for the step's duration.
const OWNER: &str = "apt";
/// apt-get update ran in the image at `root` with the sources of this fingerprint.
#[derive(Debug, PartialEq)]
pub struct Updated {
    pub root: std::path::PathBuf,
    pub sources: String,
}

/// apt-get's command line (inside the chroot) to install the packages.
pub fn install_argv(packages: &[String], recommends: bool) -> Vec<String> {
    let mut v: Vec<String> = ["apt-get", "-y", "-o", "Dpkg::Use-Pty=0", "install"]
        .map(String::from)
        .to_vec();
    if !recommends {
        v.push("--no-install-recommends".into());
    }
    v.extend(packages.iter().cloned());
    v
}

/// The image's apt sources and architectures, to notice when a step changed them since
/// the last update.
fn sources_fingerprint(root: &Path) -> String {
    use crate::digest::{Digest, Sha256, hex};
    let mut h = Sha256::new();
    let etc = root.join("etc/apt");
    // dpkg's foreign architectures count too: adding one needs a new apt-get update.
    let mut files = vec![root.join("var/lib/dpkg/arch"), etc.join("sources.list")];
    if let Ok(d) = std::fs::read_dir(etc.join("sources.list.d")) {
        let mut more: Vec<_> = d.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let data = std::fs::read(&f).unwrap_or_default();
        h.update(f.as_os_str().as_encoded_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    hex(&h.finalize()[..8])
}

/// Whether apt has package lists at all (an image may have had them removed).
fn has_lists(root: &Path) -> bool {
    std::fs::read_dir(root.join("var/lib/apt/lists"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false)
}

/// apt-get in the image (the image's environment is non-interactive for debconf).
fn apt_get(root: &Path, argv: &[String]) -> Result<String> {
    chroot::command(root, argv).run()
}

/// Install `packages` in the image at `root` (apt-get update first unless done already
/// with the same sources), with what a chroot needs mounted under `owner` for the
/// duration. A caller's teardown undoes a failed half-way run with
/// `chroot::leave(b, owner)`.
pub fn install(
    b: &mut Build,
    root: &Path,
    packages: &[String],
    recommends: bool,
    clean: bool,
    owner: &str,
) -> Result<()> {
    chroot::enter(b, root, owner)?;
    let updated = Updated {
        root: root.to_path_buf(),
        sources: sources_fingerprint(root),
    };
    if !b.state.notes.contains(&updated) || !has_lists(root) {
        apt_get(root, &["apt-get".into(), "update".into()])?;
        b.state.notes.insert(updated);
    }
    let cache = crate::distro::debcache::dir(&b.opts);
    let mut wanted = crate::distro::debcache::Sums::new();
    if let Some(c) = &cache {
        // The packages apt will fetch, with the archive's checksums (SHA-256: apt shows
        // MD5 unless asked): cached ones are checked against them on the way in and out.
        let mut ask = install_argv(packages, recommends);
        ask.splice(
            1..1,
            ["-qq", "--print-uris", "-o", "Acquire::ForceHash=SHA256"].map(String::from),
        );
        wanted = crate::distro::debcache::sums_from_print_uris(&apt_get(root, &ask)?);
        let n = crate::distro::debcache::seed(c, root, &wanted);
        crate::log::verbose(&format!("  {n} packages from the package cache"));
    }
    apt_get(root, &install_argv(packages, recommends))?;
    if let Some(c) = &cache {
        if let Some(archives) = crate::distro::debcache::archives(root) {
            let n = crate::distro::debcache::collect(c, &archives, &wanted);
            crate::log::verbose(&format!("  {n} new packages into the package cache"));
        }
    }
    if clean {
        apt_get(root, &["apt-get".into(), "clean".into()])?;
    }
    chroot::finish(b, root, owner)
}

impl Plugin for Apt {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let step = c.step;
        let value = step.arg();
        if value == "install" {
            if !step.has("packages") {
                c.err(
                    "packages",
                    "missing required key: expected a list of strings",
                );
            }
        } else if step.has("packages") {
            c.err(
                "apt",
                format!(
                    "unknown apt operation '{value}': the operation is 'install' (with \
                     'packages'); a package name as the value (vmdb2's early form) comes \
                     without 'packages'"
                ),
            );
        } else if !is_package_name(value) {
            c.err(
                "apt",
                format!(
                    "'{value}' is neither 'install' (with 'packages') nor a package name \
                     (vmdb2's early form 'apt: PACKAGE')"
                ),
            );
        }
        if step.has("packages") && step.list("packages").is_empty() {
            c.err("packages", "no packages to install");
        }
        if let Ok(tag) = step.str("tag") {
            chroot::check_mounted_tag(c, "tag", tag);
        }
        chroot::needs_chroot(c);
    }

    /// It installs packages from the archives of the image's sources.
    fn cache_inputs(&self, _step: &Step, inputs: &mut CacheInputs) -> Result<()> {
        inputs.fetches_from_sources();
        Ok(())
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let root = chroot::tag_dir(b, step.str("tag")?)?;
        install(
            b,
            &root,
            &packages(step),
            step.bool("recommends"),
            step.bool("clean"),
            OWNER,
        )
    }

    fn teardown(&self, _step: &Step, b: &mut Build) -> Result<()> {
        // Only what a run that failed half-way left behind.
        chroot::leave(b, OWNER)
    }
}

/// What the step installs: its `packages`, or the package its value names (vmdb2's
/// early `apt: PACKAGE`).
fn packages(step: &Step) -> Vec<String> {
    if step.arg() == "install" {
        step.list("packages")
    } else {
        vec![step.arg().to_string()]
    }
}

/// A Debian package name (Debian policy 5.6.7): lower-case letters, digits, `+`, `-`
/// and `.`, at least two, starting with a letter or digit. An architecture qualifier
/// (`:i386`) is allowed, as apt-get takes it.
fn is_package_name(s: &str) -> bool {
    let name = s.split_once(':').map_or(s, |(n, _)| n);
    let arch_ok = s
        .split_once(':')
        .is_none_or(|(_, a)| !a.is_empty() && a.bytes().all(|c| c.is_ascii_alphanumeric()));
    name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(&c))
        && arch_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::specs as testing;

    #[test]
    fn a_package_as_the_value_is_vmdb2s_early_form() {
        let s = testing::step("steps:\n  - apt: linux-image-amd64\n    fs-tag: /\n");
        assert_eq!(packages(&s), ["linux-image-amd64"]);
        let s = testing::step("steps:\n  - apt: install\n    packages: [a, b]\n    tag: /\n");
        assert_eq!(packages(&s), ["a", "b"]);
        assert_eq!(
            testing::errors("steps:\n  - apt: Linux Image\n    tag: /\n"),
            [
                "'Linux Image' is neither 'install' (with 'packages') nor a package name (vmdb2's early form 'apt: PACKAGE')"
            ]
        );
        for good in ["g++", "libc6:i386", "0ad", "linux-image-6.1.0-9-amd64"] {
            assert!(is_package_name(good), "{good}");
        }
        for bad in ["x", "-x", "Foo", "a b", "a:", "a:b-c", ""] {
            assert!(!is_package_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_new_source_or_architecture_changes_the_fingerprint() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("etc/apt/sources.list.d")).unwrap();
        std::fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
        std::fs::write(
            root.join("etc/apt/sources.list"),
            "deb http://m/debian trixie main\n",
        )
        .unwrap();
        let first = sources_fingerprint(root);
        assert_eq!(sources_fingerprint(root), first);
        std::fs::write(root.join("var/lib/dpkg/arch"), "i386\namd64\n").unwrap();
        let with_arch = sources_fingerprint(root);
        assert_ne!(with_arch, first);
        std::fs::write(
            root.join("etc/apt/sources.list.d/x.list"),
            "deb http://m/x trixie main\n",
        )
        .unwrap();
        assert_ne!(sources_fingerprint(root), with_arch);
    }

    #[test]
    fn install_command_line() {
        let pkgs = vec!["hello".to_string(), "less".to_string()];
        assert_eq!(
            install_argv(&pkgs, true),
            [
                "apt-get",
                "-y",
                "-o",
                "Dpkg::Use-Pty=0",
                "install",
                "hello",
                "less"
            ]
        );
        assert_eq!(
            install_argv(&pkgs, false),
            [
                "apt-get",
                "-y",
                "-o",
                "Dpkg::Use-Pty=0",
                "install",
                "--no-install-recommends",
                "hello",
                "less"
            ]
        );
    }

    #[test]
    fn keys_defaults_and_alias() {
        let s = testing::step("steps:\n  - apt: install\n    packages: hello\n    fs-tag: /\n");
        assert_eq!(s.list("packages"), ["hello"]);
        assert_eq!(s.opt_str("tag"), Some("/"));
        assert!(s.bool("recommends"));
        assert!(s.bool("clean"));
        let s = testing::step(
            "steps:\n  - apt: install\n    packages: [a, b]\n    tag: /\n    recommends: false\n    clean: false\n",
        );
        assert!(!s.bool("recommends") && !s.bool("clean"));
    }

    #[test]
    fn packages_are_required() {
        assert_eq!(
            testing::errors("steps:\n  - apt: install\n    tag: /\n"),
            ["missing required key: expected a list of strings"]
        );
        assert_eq!(
            testing::errors("steps:\n  - apt: install\n    packages: []\n    tag: /\n"),
            ["no packages to install"]
        );
    }

    #[test]
    fn only_install_is_supported() {
        assert_eq!(
            testing::errors("steps:\n  - apt: remove\n    packages: hello\n    tag: /\n"),
            [
                "unknown apt operation 'remove': the operation is 'install' (with 'packages'); a package name as the value (vmdb2's early form) comes without 'packages'"
            ]
        );
    }

    #[test]
    fn unknown_or_unmounted_tag() {
        assert_eq!(
            testing::errors("steps:\n  - apt: install\n    packages: hello\n    tag: /boot\n"),
            ["tag '/boot' is not defined by an earlier step (defined so far: '/', 'unmounted')"]
        );
        assert_eq!(
            testing::errors("steps:\n  - apt: install\n    packages: hello\n    tag: unmounted\n"),
            [
                "tag 'unmounted' is not mounted at this point: add a 'mount: unmounted' step before this one"
            ]
        );
    }

    #[test]
    fn fingerprint_follows_the_sources() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc/apt/sources.list.d")).unwrap();
        let a = sources_fingerprint(d.path());
        std::fs::write(
            d.path().join("etc/apt/sources.list.d/x.sources"),
            "Types: deb\n",
        )
        .unwrap();
        let b = sources_fingerprint(d.path());
        assert_ne!(a, b);
        assert_eq!(b, sources_fingerprint(d.path()));
    }
}

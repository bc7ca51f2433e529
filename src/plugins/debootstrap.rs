//! `debootstrap: SUITE`: install a minimal Debian system into a mounted filesystem.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::distro::binfmt;
use crate::distro::bootstrap;
use crate::distro::chroot;
use crate::distro::mirror;
use crate::engine::build::Build;
use crate::engine::cachekey::CacheInputs;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::cmd::Cmd;
use crate::host::image_root::ImageRoot;

pub struct Debootstrap;

const TARGET: Key = Key::req(
    "target",
    Kind::Str,
    "tag of the filesystem to install into; an earlier step must mount it",
);
const MIRROR: Key = Key::opt(
    "mirror",
    Kind::Str,
    "Debian mirror URL. Without it, vmdb takes the first `deb` source serving \
                a Debian suite (not a security suite) from the host's \
                `/etc/apt/sources.list.d/*.sources`, `*.list` and \
                `/etc/apt/sources.list`; when there is none, validation fails and \
                asks for `mirror:`",
);
const VARIANT: Key = Key::opt(
    "variant",
    Kind::Str,
    "debootstrap variant (`--variant`), e.g. `minbase`; `-` means \
                debootstrap's default",
)
.default("-");
const COMPONENTS: Key = Key::opt(
    "components",
    Kind::List,
    "archive components (`--components=a,b`)",
)
.default("main");
const INCLUDE: Key = Key::opt("include", Kind::List, "more packages (`--include=a,b`)");
const EXCLUDE: Key = Key::opt(
    "exclude",
    Kind::List,
    "packages to leave out (`--exclude=a,b`)",
);
const KEYRING: Key = Key::opt(
    "keyring",
    Kind::Str,
    "keyring file to check the archive with (`--keyring`), relative to the \
                spec file; by default debootstrap's",
);
const INSTALL_KEYRING: Key = Key::opt(
    "install_keyring",
    Kind::Bool,
    "also install `keyring` in the image, as \
                `/etc/apt/trusted.gpg.d/NAME.gpg` (`NAME.asc` for an ASCII-armoured one), so \
                that apt in the image trusts the archive the system came from (vmdb2 adds \
                it with `apt-key`, which newer Debian releases no longer have)",
)
.default("false");
const REQUIRE_EMPTY: Key = Key::opt(
    "require_empty_target",
    Kind::Bool,
    "fail when the target has anything but `lost+found` and empty directories \
                (the mount points of filesystems mounted below it, such as an ESP at \
                `/boot/efi`)",
)
.default("true");
const TLS_CA_CERTS: Key = Key::opt(
    "tls_ca_certs",
    Kind::Str,
    "PEM file of CA certificates (relative to the spec file) to trust when the \
     mirror is an `https://` one signed by a private authority (see its notes on the debootstrap page)",
);

const TOOL: Key = Key::opt(
    "tool",
    Kind::Str,
    "`auto` (mmdebstrap when it can, else debootstrap), `debootstrap`, or \
                `mmdebstrap` (an error where it cannot be used, or is not installed)",
)
.default("auto");

/// The keys of debootstrap and of qemu-debootstrap, which differ only in `arch`.
pub const fn keys(arch: Key) -> [Key; 12] {
    [
        TARGET,
        MIRROR,
        arch,
        VARIANT,
        COMPONENTS,
        INCLUDE,
        EXCLUDE,
        KEYRING,
        INSTALL_KEYRING,
        REQUIRE_EMPTY,
        TLS_CA_CERTS,
        TOOL,
    ]
}

static KEYS: [Key; 12] = keys(Key::opt(
    "arch",
    Kind::Str,
    "Debian architecture (`--arch`), by default the host's (`dpkg \
                --print-architecture`); a foreign one needs qemu-user-static on the \
                host (see below)",
));

static SPEC: StepSpec = StepSpec {
    name: "debootstrap",
    value: Kind::Str,
    value_doc: "the suite to install (`bookworm`, `stable`, ...)",
    keys: &KEYS,
    summary: "Installs a basic Debian system into a mounted filesystem with `debootstrap`, or \
        with `mmdebstrap`, which makes the same system in about a third of the time.",
    cache: CacheRole::Tree,
    always_saved: true,
};

/// Noted while debootstrap runs in the directory: its teardown then unmounts what it
/// may have left.
#[derive(Debug, PartialEq)]
struct Running(std::path::PathBuf);

/// Anything in `dir` but lost+found and trees of empty directories: those are the
/// mount points of filesystems mounted below the target (an ESP at /boot/efi).
fn non_empty(dir: &Path) -> Result<Vec<String>> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "lost+found" && !only_dirs(&e.path()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    Ok(found)
}

/// `p` is a directory (not a symbolic link) holding nothing but such directories.
fn only_dirs(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
        && std::fs::read_dir(p).is_ok_and(|rd| rd.flatten().all(|e| only_dirs(&e.path())))
}

impl Plugin for Debootstrap {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        check_step(c);
    }

    fn cache_inputs(&self, step: &Step, inputs: &mut CacheInputs) -> Result<()> {
        cache_inputs_of(step, inputs)
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        run_step(step, b)
    }

    fn teardown(&self, step: &Step, b: &mut Build) -> Result<()> {
        teardown_step(step, b)
    }
}

/// The cache inputs of debootstrap and qemu-debootstrap: the versions of both tools
/// (either may do the step, by its `tool: auto`), the host's mirror when the step names
/// none, and the suite it installs, which the image's apt sources then name.
pub fn cache_inputs_of(step: &Step, inputs: &mut CacheInputs) -> Result<()> {
    inputs.value("bootstrap tools", bootstrap::tool_versions());
    let m = match step.opt_str("mirror") {
        Some(m) => m.to_string(),
        None => {
            let m = mirror::host_default().unwrap_or_default();
            inputs.value("mirror", m.clone());
            m
        }
    };
    let mut a = mirror::archive(&m, step.arg());
    a.ca = step
        .opt_str("tls_ca_certs")
        .map(|p| inputs.opts().spec_dir.path(p));
    inputs.fetches(a);
    match step.opt_str("keyring") {
        // Then it is copied into the image.
        Some(k) if step.bool("install_keyring") => inputs.file(k),
        _ => Ok(()),
    }
}

/// Validation shared by debootstrap and qemu-debootstrap (the suite is the step's value).
pub fn check_step(c: &mut Check) {
    let step = c.step;
    let kind = step.kind;
    if let Ok(tag) = step.str("target") {
        chroot::check_mounted_tag(c, "target", tag);
    }
    if step.arg().trim().is_empty() || step.arg().contains(['/', ' ']) {
        c.err(kind, format!("'{}' is not a suite name", step.arg()));
    }
    if let Some(arch) = step.opt_str("arch") {
        match binfmt::host_arch() {
            Ok(host) => {
                if let Some(p) = binfmt::problem(&host, arch) {
                    c.err("arch", p);
                }
            }
            Err(e) => c.err("arch", format!("{e:#}")),
        }
    }
    if step.opt_str("mirror").is_some_and(|m| m.trim().is_empty()) {
        c.err(
            "mirror",
            "the mirror is empty: give a URL, or leave the key out for the host's mirror",
        );
    }
    if step.opt_str("mirror").is_none() && mirror::host_default().is_none() {
        c.err(
            kind,
            "no Debian mirror found in this host's apt configuration: say which with 'mirror: URL'",
        );
    }
    match step.opt_str("tool").unwrap_or("auto") {
        "auto" | "debootstrap" => {}
        "mmdebstrap" => {
            if let Some(why) = mmdebstrap_cannot(step) {
                c.err("tool", format!("cannot use mmdebstrap here: {why}"));
            } else if !bootstrap::available(other_arch(step)) {
                c.err(
                    "tool",
                    "mmdebstrap is not installed on this host (apt-get install mmdebstrap arch-test)",
                );
            }
        }
        other => c.err(
            "tool",
            format!("unknown tool '{other}': use 'auto', 'debootstrap' or 'mmdebstrap'"),
        ),
    }
    if uses_mmdebstrap(step) {
        c.needs(kind, "mmdebstrap", "mmdebstrap");
    } else {
        c.needs(kind, "debootstrap", "debootstrap");
    }
    if step.bool("install_keyring") {
        match step.opt_str("keyring") {
            None => c.err(
                "install_keyring",
                "there is no keyring to install: give it with 'keyring: FILE'",
            ),
            Some(k) => {
                if let Err(e) = keyring_name(&c.plan.spec_dir.path(k)) {
                    c.err("keyring", format!("{e:#}"));
                }
            }
        }
    }
    if let Some(ca) = step.opt_str("tls_ca_certs") {
        let p = c.plan.spec_dir.path(ca);
        if !p.is_file() {
            c.err(
                "tls_ca_certs",
                format!("'{ca}' is not a file (relative paths are relative to the spec file)"),
            );
        }
    }
}

/// Why mmdebstrap cannot install what this step asks for; None when it can.
fn mmdebstrap_cannot(step: &Step) -> Option<String> {
    if let Some(arch) = step.opt_str("arch") {
        if let Ok(host) = binfmt::host_arch() {
            if !binfmt::native(&host, arch) {
                return Some(format!(
                    "vmdb runs it only for architectures this {host} host runs itself, not {arch}"
                ));
            }
        }
    }
    bootstrap::unsupported(
        step.opt_str("variant").unwrap_or("-"),
        !step.list("exclude").is_empty(),
        step.has("tls_ca_certs"),
    )
}

/// Whether the step asks for an architecture other than the host's.
fn other_arch(step: &Step) -> bool {
    step.opt_str("arch")
        .is_some_and(|a| binfmt::host_arch().map_or(true, |h| h != a))
}

/// Whether the step runs mmdebstrap rather than debootstrap.
fn uses_mmdebstrap(step: &Step) -> bool {
    match step.opt_str("tool").unwrap_or("auto") {
        "mmdebstrap" => true,
        "auto" => mmdebstrap_cannot(step).is_none() && bootstrap::available(other_arch(step)),
        _ => false,
    }
}

/// The wgetrc that makes debootstrap's downloads (wget) trust the CA certificates.
pub fn wgetrc(ca: &Path) -> String {
    format!("ca_certificate = {}\n", ca.display())
}

/// Run debootstrap for a debootstrap or qemu-debootstrap step.
pub fn run_step(step: &Step, b: &mut Build) -> Result<()> {
    let tag = step.str("target")?;
    let dir = chroot::tag_dir(b, tag)?;
    if step.bool("require_empty_target") {
        let found = non_empty(&dir)?;
        if !found.is_empty() {
            bail!(
                "target '{tag}' ({}) is not empty: it has {}; use an empty filesystem or set require_empty_target: false",
                dir.display(),
                found.join(", ")
            );
        }
    }
    let mirror = match step.opt_str("mirror") {
        Some(m) => m.to_string(),
        None => mirror::host_default().context(
            "no Debian mirror found in this host's apt configuration: say which with 'mirror: URL'",
        )?,
    };
    let arch = match step.opt_str("arch") {
        Some(a) => a.to_string(),
        None => binfmt::host_arch()?,
    };
    // debootstrap's second stage runs the image's programs in a chroot.
    binfmt::ensure(&arch)?;
    let args = bootstrap::Args {
        suite: step.arg().to_string(),
        target: dir.display().to_string(),
        mirror,
        arch,
        variant: step.opt_str("variant").unwrap_or("-").to_string(),
        components: step.list("components"),
        include: step.list("include"),
        exclude: step.list("exclude"),
        keyring: step
            .opt_str("keyring")
            .map(|k| b.opts.spec_dir.path(k).display().to_string()),
    };
    let ca = step
        .opt_str("tls_ca_certs")
        .map(|p| b.opts.spec_dir.path(p));
    mirror::check_suite_with(&args.mirror, &args.suite, ca.as_deref())?;
    b.state.notes.insert(Running(dir.clone()));
    let cache = crate::distro::debcache::dir(&b.opts);
    if uses_mmdebstrap(step) {
        // Its second stage runs the image's programs with its environment.
        let mut cmd = chroot::with_image_env(
            Cmd::new("mmdebstrap").args(&bootstrap::mmdebstrap_argv(&args, cache.is_some())[1..]),
            &dir,
        );
        if let Some(c) = &cache {
            let list = b.scratch_dir("debs-")?.join("list");
            let n = crate::distro::debcache::list_for_bootstrap(c, &dir, &args.arch, &list)?;
            crate::log::verbose(&format!("  {n} packages from the package cache"));
            cmd = cmd.env(bootstrap::DEBS_ENV, &list);
        }
        cmd.run()?;
        if let Some(c) = &cache {
            collect(c, &dir);
        }
        bootstrap::tidy(&dir)?;
        b.state.notes.remove(&Running(dir.clone()));
        return install_keyring(step, b, &dir);
    }
    // debootstrap gets no --cache-dir: it would download into the shared cache under
    // the final names, in place. It finds the cached packages in the image instead,
    // checks each against the archive's checksums and downloads what is missing or bad.
    let seeded = match &cache {
        Some(c) => crate::distro::debcache::seed_bootstrap(c, &dir, &args.arch),
        None => Vec::new(),
    };
    if !seeded.is_empty() {
        crate::log::verbose(&format!(
            "  {} packages from the package cache",
            seeded.len()
        ));
    }
    let argv = bootstrap::debootstrap_argv(&args);
    let mut cmd = chroot::with_image_env(Cmd::new(&argv[0]).args(&argv[1..]), &dir);
    if let Some(ca) = &ca {
        let rc = b.scratch_dir("wgetrc-")?.join("wgetrc");
        std::fs::write(&rc, wgetrc(ca)).with_context(|| format!("writing {}", rc.display()))?;
        cmd = cmd.env("WGETRC", &rc).env("CURL_CA_BUNDLE", ca);
    }
    cmd.run()?;
    if let Some(c) = &cache {
        collect(c, &dir);
        crate::distro::debcache::unseed(&dir, &seeded)?;
    }
    b.state.notes.remove(&Running(dir.clone()));
    install_keyring(step, b, &dir)
}

/// Where in /etc/apt/trusted.gpg.d a keyring goes: apt reads OpenPGP keyrings there
/// named `*.gpg` and ASCII-armoured keys named `*.asc`, and nothing else (no GnuPG
/// keybox).
fn keyring_name(path: &Path) -> Result<String> {
    let data =
        std::fs::read(path).with_context(|| format!("cannot read keyring {}", path.display()))?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if data.starts_with(b"-----BEGIN PGP PUBLIC KEY BLOCK-----") {
        return Ok(format!("{stem}.asc"));
    }
    if data.get(8..12) == Some(b"KBXf") {
        bail!(
            "{} is a GnuPG keybox, which apt cannot read: export its keys with \
             'gpg --no-default-keyring --keyring {0} --export > KEYRING.gpg'",
            path.display()
        );
    }
    // An OpenPGP packet: the tag byte has its top bit set.
    if data.first().is_some_and(|b| b & 0x80 != 0) {
        return Ok(format!("{stem}.gpg"));
    }
    bail!(
        "{} is neither an OpenPGP keyring nor an ASCII-armoured key",
        path.display()
    )
}

/// With `install_keyring`: the keyring debootstrap checked the archive with goes into
/// the image, for its apt.
fn install_keyring(step: &Step, b: &Build, root: &Path) -> Result<()> {
    let Some(keyring) = step
        .opt_str("keyring")
        .filter(|_| step.bool("install_keyring"))
    else {
        return Ok(());
    };
    let src = b.opts.spec_dir.path(keyring);
    let dest = format!("/etc/apt/trusted.gpg.d/{}", keyring_name(&src)?);
    let img = ImageRoot::open(root)?;
    img.create_dir_all("/etc/apt/trusted.gpg.d", 0o755)?;
    let mut f = std::fs::File::open(&src)
        .with_context(|| format!("cannot read keyring {}", src.display()))?;
    crate::log::verbose(&format!("  installing {} as {dest}", src.display()));
    img.write_file(&dest, &mut f, 0o644, Some((0, 0)))
}

/// Cache the packages a bootstrap left in the image's apt archive, checked against the
/// checksums in the apt lists it left.
fn collect(cache: &Path, root: &Path) {
    let Some(archives) = crate::distro::debcache::archives(root) else {
        return;
    };
    let sums = crate::distro::debcache::sums_from_lists(
        root,
        &crate::distro::debcache::debs_in(&archives),
    );
    let n = crate::distro::debcache::collect(cache, &archives, &sums);
    crate::log::verbose(&format!("  {n} new packages into the package cache"));
}

/// Only after a debootstrap that did not finish: it may have left its own mounts.
pub fn teardown_step(step: &Step, b: &mut Build) -> Result<()> {
    let Ok(dir) = chroot::tag_dir(b, step.str("target")?) else {
        return Ok(());
    };
    if !b.state.notes.remove(&Running(dir.clone())) {
        return Ok(());
    }
    for p in crate::host::mount::VIRTUAL_PATHS {
        crate::host::mount::unmount_below(&dir.join(p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::specs as testing;

    #[test]
    fn defaults_from_the_schema() {
        let s = testing::step(
            "steps:\n  - debootstrap: bookworm\n    target: /\n    mirror: http://m.example.org/debian\n",
        );
        assert_eq!(s.opt_str("variant"), Some("-"));
        assert_eq!(s.list("components"), ["main"]);
        assert!(s.bool("require_empty_target"));
        assert!(s.list("include").is_empty());
    }

    #[test]
    fn install_keyring_copies_the_keyring_for_apt_in_the_image() {
        let d = tempfile::tempdir().unwrap();
        // An OpenPGP public key packet starts 0x99 (old format, tag 6).
        let binary = d.path().join("archive-keyring.gpg");
        std::fs::write(&binary, [0x99u8, 0x01, 0x0d, 0x04]).unwrap();
        let armored = d.path().join("local.key");
        std::fs::write(&armored, "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nxyz\n").unwrap();
        let keybox = d.path().join("pubring.kbx");
        std::fs::write(&keybox, b"\0\0\0\x20\x01\x01\0\0KBXf\0\0").unwrap();
        let text = d.path().join("notes.txt");
        std::fs::write(&text, "hello\n").unwrap();
        assert_eq!(keyring_name(&binary).unwrap(), "archive-keyring.gpg");
        assert_eq!(keyring_name(&armored).unwrap(), "local.asc");
        assert!(
            format!("{:#}", keyring_name(&keybox).unwrap_err())
                .contains("is a GnuPG keybox, which apt cannot read")
        );
        assert_eq!(
            format!("{:#}", keyring_name(&text).unwrap_err()),
            format!(
                "{} is neither an OpenPGP keyring nor an ASCII-armoured key",
                text.display()
            )
        );

        let yaml = |k: &Path, install: bool| {
            format!(
                "steps:\n  - debootstrap: bookworm\n    target: /\n    mirror: http://m.example.org/debian\n    keyring: {}\n    install_keyring: {install}\n",
                k.display()
            )
        };
        let root = tempfile::tempdir().unwrap();
        let b = testing::build(root.path(), None);
        install_keyring(&testing::step(&yaml(&armored, true)), &b, root.path()).unwrap();
        let m = std::fs::metadata(root.path().join("etc/apt/trusted.gpg.d/local.asc")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.mode() & 0o7777, 0o644);
        assert_eq!(
            std::fs::read(root.path().join("etc/apt/trusted.gpg.d/local.asc")).unwrap(),
            std::fs::read(&armored).unwrap()
        );
        // Without install_keyring the keyring only checks the archive.
        install_keyring(&testing::step(&yaml(&binary, false)), &b, root.path()).unwrap();
        assert!(
            !root
                .path()
                .join("etc/apt/trusted.gpg.d/archive-keyring.gpg")
                .exists()
        );
        install_keyring(&testing::step(&yaml(&binary, true)), &b, root.path()).unwrap();
        assert_eq!(
            std::fs::read(
                root.path()
                    .join("etc/apt/trusted.gpg.d/archive-keyring.gpg")
            )
            .unwrap(),
            [0x99u8, 0x01, 0x0d, 0x04]
        );

        // Found by validation: no keyring to install, or one apt cannot read.
        assert_eq!(
            testing::errors(
                "steps:\n  - debootstrap: bookworm\n    target: /\n    mirror: http://m.example.org/debian\n    install_keyring: true\n"
            ),
            ["there is no keyring to install: give it with 'keyring: FILE'"]
        );
        assert_eq!(
            testing::errors(&yaml(&text, true)),
            [format!(
                "{} is neither an OpenPGP keyring nor an ASCII-armoured key",
                text.display()
            )]
        );
        assert!(testing::validate(&yaml(&text, false)).is_ok());
    }

    #[test]
    fn target_must_be_a_mounted_tag() {
        assert_eq!(
            testing::errors(
                "steps:\n  - debootstrap: bookworm\n    target: nope\n    mirror: http://m.example.org/debian\n"
            ),
            ["tag 'nope' is not defined by an earlier step (defined so far: '/', 'unmounted')"]
        );
        assert_eq!(
            testing::errors(
                "steps:\n  - debootstrap: bookworm\n    target: unmounted\n    mirror: http://m.example.org/debian\n"
            ),
            [
                "tag 'unmounted' is not mounted at this point: add a 'mount: unmounted' step before this one"
            ]
        );
    }

    #[test]
    fn tls_ca_certs_must_exist_and_go_to_wget() {
        assert_eq!(
            testing::errors(
                "steps:\n  - debootstrap: bookworm\n    target: /\n    mirror: https://m.example.org/debian\n    tls_ca_certs: no-such-ca.pem\n"
            ),
            ["'no-such-ca.pem' is not a file (relative paths are relative to the spec file)"]
        );
        assert_eq!(
            wgetrc(Path::new("/spec/dir/ca.pem")),
            "ca_certificate = /spec/dir/ca.pem\n"
        );
    }

    #[test]
    fn empty_mirror_and_unknown_arch() {
        assert_eq!(
            testing::errors(
                "steps:\n  - debootstrap: bookworm\n    target: /\n    mirror: \"\"\n    arch: vax\n"
            ),
            [
                "the mirror is empty: give a URL, or leave the key out for the host's mirror"
                    .to_string(),
                format!(
                    "vmdb does not know how to run 'vax' programs on this {} host",
                    binfmt::host_arch().unwrap()
                )
            ]
        );
    }

    #[test]
    fn empty_target_allows_lost_and_found_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("lost+found")).unwrap();
        assert!(non_empty(d.path()).unwrap().is_empty());
        // The mount point of an ESP mounted at /boot/efi before debootstrap runs.
        std::fs::create_dir_all(d.path().join("boot/efi")).unwrap();
        assert!(non_empty(d.path()).unwrap().is_empty());
        std::fs::write(d.path().join("etc"), "").unwrap();
        assert_eq!(non_empty(d.path()).unwrap(), ["etc"]);
        std::fs::write(d.path().join("boot/efi/x"), "").unwrap();
        assert_eq!(non_empty(d.path()).unwrap(), ["boot", "etc"]);
    }

    #[test]
    fn refuses_a_non_empty_target() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("x"), "").unwrap();
        let s = testing::step(
            "steps:\n  - debootstrap: bookworm\n    target: /\n    mirror: http://m.example.org/debian\n",
        );
        let mut b = testing::build(d.path(), None);
        let e = Debootstrap.run(&s, &mut b).unwrap_err().to_string();
        assert!(
            e.starts_with("target '/' (") && e.contains("is not empty: it has x;"),
            "{e}"
        );
    }
}

/// The whole way with a real mirror (the host's): run with `cargo test -- --ignored`.
#[cfg(test)]
mod root_tests {
    use std::time::Instant;

    use super::*;
    use crate::plugins::testing::specs as testing;
    use crate::plugins::unpack_rootfs::UnpackRootfs;

    fn listing(dir: &Path) -> String {
        Cmd::new("sh")
            .args([
                "-c",
                // Directory sizes depend on their history, not their contents.
                "cd \"$1\" && { find . -type d -printf '%p d %m %U:%G\\n'; \
                 find . ! -type d -printf '%p %y %m %U:%G %s %l\\n'; \
                 find . -type c -exec stat -c '%n %t:%T' {} +; } | sort",
                "-",
            ])
            .arg(dir)
            .run()
            .unwrap()
    }

    #[test]
    #[ignore = "downloads a Debian system (about a minute)"]
    fn bootstrap_install_chroot_cache_unpack() {
        if !testing::is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap().join("root");
        std::fs::create_dir(&root).unwrap();
        let _guard = testing::Unmounter(root.clone());
        let tarball = d.path().join("rootfs.tar.zst");
        let steps = testing::validate(
            r#"steps:
  - debootstrap: bookworm
    target: /
    variant: minbase
  - apt: install
    packages: [hello]
    tag: /
    recommends: false
  - chroot: /
    shell: |
      test -x /usr/bin/hello
      test -e /proc/self/status
      test -c /dev/null
      test -x /usr/sbin/policy-rc.d
      grep -qx force-unsafe-io /etc/dpkg/dpkg.cfg.d/vmdb-unsafe-io
      test -x /usr/local/sbin/update-initramfs
      apt-config dump | grep -qx 'DPkg::Path "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin";'
      hello > /hello.out
  - cache-rootfs: /
"#,
        )
        .unwrap();
        let mut b = testing::build(&root, Some(&tarball));
        for s in &steps {
            let t = Instant::now();
            let p = crate::engine::step::find(crate::plugins::ALL, s.kind).unwrap();
            p.run(s, &mut b).unwrap();
            eprintln!("TIMING {}: {:.1}s", s.describe(), t.elapsed().as_secs_f64());
        }
        for s in steps.iter().rev() {
            let p = crate::engine::step::find(crate::plugins::ALL, s.kind).unwrap();
            p.teardown(s, &mut b).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(root.join("hello.out")).unwrap(),
            "Hello, world!\n"
        );
        assert!(!root.join("usr/sbin/policy-rc.d").exists());
        assert!(!root.join("etc/dpkg/dpkg.cfg.d/vmdb-unsafe-io").exists());
        assert!(!root.join("usr/local/sbin/update-initramfs").exists());
        assert!(!root.join("etc/apt/apt.conf.d/00vmdb-dpkg-path").exists());
        assert!(crate::host::mount::mounts_below(&root).unwrap().is_empty());
        // apt ran its update once and remembers it; nothing else is left in the state.
        assert_eq!(b.state.notes.len(), 1, "{:?}", b.state.notes);
        let updated: Vec<_> = b.state.notes.of::<crate::plugins::apt::Updated>().collect();
        assert_eq!(updated.len(), 1);
        eprintln!(
            "TIMING tarball {:.0} MB",
            std::fs::metadata(&tarball).unwrap().len() as f64 / 1e6
        );

        // Unpacked into a fresh directory, the tree is the same.
        let fresh = d.path().join("fresh");
        std::fs::create_dir(&fresh).unwrap();
        let mut b2 = testing::build(&fresh, Some(&tarball));
        let unpack = testing::step("steps:\n  - unpack-rootfs: /\n");
        let t = Instant::now();
        UnpackRootfs.run(&unpack, &mut b2).unwrap();
        eprintln!("TIMING unpack-rootfs: {:.1}s", t.elapsed().as_secs_f64());
        assert!(b2.state.flags.contains("rootfs_unpacked"));
        std::fs::remove_file(root.join("hello.out")).unwrap();
        std::fs::remove_file(fresh.join("hello.out")).unwrap();
        let (l1, l2) = (listing(&root), listing(&fresh));
        if l1 != l2 {
            std::fs::write(d.path().join("l1"), &l1).unwrap();
            std::fs::write(d.path().join("l2"), &l2).unwrap();
            let diff = Cmd::new("diff")
                .arg(d.path().join("l1"))
                .arg(d.path().join("l2"))
                .run();
            panic!("trees differ: {diff:?}");
        }
        Cmd::new("diff")
            // Device nodes are compared by the listing (diff cannot read them).
            .args(["-r", "--no-dereference", "-q", "--exclude=dev"])
            .arg(&root)
            .arg(&fresh)
            .run()
            .unwrap();

        // A second apt step with the same sources skips apt-get update.
        let again = testing::step("steps:\n  - apt: install\n    packages: [hello]\n    tag: /\n");
        let t = Instant::now();
        crate::plugins::apt::Apt.run(&again, &mut b).unwrap();
        eprintln!("TIMING apt again: {:.1}s", t.elapsed().as_secs_f64());

        // A chroot step that fails half-way: its teardown unmounts and cleans up.
        let fail = testing::step("steps:\n  - chroot: /\n    shell: exit 3\n");
        let e = crate::plugins::chroot::Chroot
            .run(&fail, &mut b)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("command failed with exit status 3: chroot "),
            "{e}"
        );
        assert_eq!(crate::host::mount::mounts_below(&root).unwrap().len(), 4);
        assert!(root.join("usr/sbin/policy-rc.d").exists());
        crate::plugins::chroot::Chroot
            .teardown(&fail, &mut b)
            .unwrap();
        assert!(crate::host::mount::mounts_below(&root).unwrap().is_empty());
        assert!(!root.join("usr/sbin/policy-rc.d").exists());
    }

    /// What `dpkg-query` says is installed in `root`, with versions.
    fn packages(root: &Path) -> Vec<String> {
        let out = Cmd::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                root.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f", "${db:Status-Status} ${Package} ${Version}\n"])
            .run()
            .unwrap();
        let mut v: Vec<String> = out.lines().map(String::from).collect();
        v.sort();
        v
    }

    #[test]
    #[ignore = "downloads a Debian system twice (about a minute and a half)"]
    fn mmdebstrap_makes_the_system_debootstrap_makes() {
        if !testing::is_root() {
            return;
        }
        assert!(
            bootstrap::available(false),
            "mmdebstrap is not installed: run scripts/install-deps"
        );
        let d = tempfile::tempdir().unwrap();
        let mut trees = vec![];
        for tool in ["debootstrap", "mmdebstrap"] {
            let root = std::fs::canonicalize(d.path()).unwrap().join(tool);
            std::fs::create_dir(&root).unwrap();
            let _guard = testing::Unmounter(root.clone());
            let step = testing::step(&format!(
                "steps:\n  - debootstrap: bookworm\n    target: /\n    tool: {tool}\n"
            ));
            let mut b = testing::build(&root, None);
            let t = Instant::now();
            Debootstrap.run(&step, &mut b).unwrap();
            eprintln!("TIMING {tool}: {:.1}s", t.elapsed().as_secs_f64());
            Debootstrap.teardown(&step, &mut b).unwrap();
            assert!(crate::host::mount::mounts_below(&root).unwrap().is_empty());
            trees.push(root);
        }
        let (deb, mm) = (&trees[0], &trees[1]);
        let (p1, p2) = (packages(deb), packages(mm));
        assert!(p1.len() > 100 && p1.iter().all(|p| p.starts_with("installed ")));
        assert_eq!(p1, p2, "the two tools installed different packages");
        for link in ["bin", "sbin", "lib", "lib64"] {
            assert_eq!(
                std::fs::read_link(deb.join(link)).unwrap(),
                std::fs::read_link(mm.join(link)).unwrap(),
                "/{link}"
            );
        }
        for f in [
            "etc/apt/sources.list",
            "etc/passwd",
            "etc/shadow",
            "etc/fstab",
        ] {
            assert_eq!(
                std::fs::read(deb.join(f)).unwrap(),
                std::fs::read(mm.join(f)).unwrap(),
                "/{f}"
            );
        }
        // Nothing of mmdebstrap's own is left, and every package counts as asked for.
        assert!(!mm.join("etc/dpkg/dpkg.cfg.d/99mmdebstrap").exists());
        assert!(!mm.join("var/lib/apt/extended_states").exists());
        let debs = std::fs::read_dir(mm.join("var/cache/apt/archives"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
            .count();
        assert_eq!(debs, 0);
        assert_eq!(std::fs::read(mm.join("etc/machine-id")).unwrap(), b"");
        // Both keep apt's lists of the suite's packages, under the same names.
        let lists = |root: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(root.join("var/lib/apt/lists"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with("_Packages"))
                .collect();
            v.sort();
            v
        };
        assert!(!lists(mm).is_empty());
        assert_eq!(lists(deb), lists(mm));
    }

    #[test]
    #[ignore = "needs the network"]
    fn bad_suite_and_unreachable_mirror_fail_fast() {
        let m = mirror::host_default().expect("a Debian mirror in the host's apt sources");
        let t = Instant::now();
        let e = mirror::check_suite(&m, "bookwrm").unwrap_err().to_string();
        eprintln!("TIMING bad suite: {:.2}s: {e}", t.elapsed().as_secs_f64());
        assert_eq!(
            e,
            format!("suite 'bookwrm' not found at {m} (no dists/bookwrm/InRelease or Release)")
        );
        let bad = "http://no-such-host.invalid/debian";
        let t = Instant::now();
        let e = mirror::check_suite(bad, "bookworm")
            .unwrap_err()
            .to_string();
        eprintln!("TIMING bad host: {:.2}s: {e}", t.elapsed().as_secs_f64());
        assert!(
            e.starts_with(&format!("cannot reach {bad}: curl: (6)")),
            "{e}"
        );
        assert!(t.elapsed().as_secs() < 25);
        mirror::check_suite(&m, "bookworm").unwrap();
    }
}

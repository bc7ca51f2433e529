//! Running programs inside the image: the virtual filesystems a chroot needs, a
//! policy-rc.d that keeps services from starting, and the command itself.
//!
//! Everything mounted or written here is recorded in the build state's notes
//! (`Mounted`, `Written`), so that a teardown after a step that failed half-way
//! undoes exactly that and nothing else.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::MsFlags;

use crate::engine::build::Build;
use crate::engine::plan::PlanTag;
use crate::engine::step::Check;
use crate::host::cmd::Cmd;
use crate::host::image_root::ImageRoot;
use crate::host::mount;

/// PATH inside the image: the host's may lack the sbin directories.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One virtual filesystem: its path in the image, type and options.
pub struct Vfs {
    pub path: &'static str,
    pub fstype: &'static str,
    pub data: Option<&'static str>,
}

const PROC: Vfs = Vfs {
    path: "proc",
    fstype: "proc",
    data: None,
};
const SYS: Vfs = Vfs {
    path: "sys",
    fstype: "sysfs",
    data: None,
};
const DEV: Vfs = Vfs {
    path: "dev",
    fstype: "devtmpfs",
    data: None,
};
const DEVPTS: Vfs = Vfs {
    path: "dev/pts",
    fstype: "devpts",
    data: Some("gid=5,mode=620,ptmxmode=666"),
};
const RUN: Vfs = Vfs {
    path: "run",
    fstype: "tmpfs",
    data: Some("mode=755"),
};

/// What a chroot or apt step mounts for its own duration.
pub const FOR_CHROOT: &[Vfs] = &[PROC, SYS, DEV, DEVPTS];
/// What the virtual-filesystems step mounts for the rest of the build.
pub const FOR_BUILD: &[Vfs] = &[PROC, SYS, DEV, DEVPTS, RUN];

/// A virtual filesystem mounted at `path` (on the host) for `owner` (a step type).
#[derive(Debug, PartialEq)]
struct Mounted {
    owner: String,
    path: PathBuf,
}

/// A file vmdb wrote at `path` in the image whose root is `root` (on the host), for
/// as long as it runs programs there.
#[derive(Debug, PartialEq)]
struct Written {
    root: PathBuf,
    path: String,
}

/// The host directory of a mounted tag, canonical (mountinfo has canonical paths).
pub fn tag_dir(b: &Build, tag: &str) -> Result<PathBuf> {
    let mp = b.state.mount_point(tag)?;
    std::fs::canonicalize(mp).with_context(|| format!("mount point {}", mp.display()))
}

/// Validation: the step's `key` names a tag that an earlier step mounts.
pub fn check_mounted_tag(c: &mut Check, key: &str, tag: &str) {
    if !c.use_tag(key, tag) {
        return;
    }
    if !c.plan.tags.get(tag).is_some_and(|t: &PlanTag| t.mounted) {
        c.err(
            key,
            format!("tag '{tag}' is not mounted at this point: add a 'mount: {tag}' step before this one"),
        );
    }
}

/// Mount those of `set` that are not mounted already below `root`, recording each
/// under `owner`. Something already there (mounted by the virtual-filesystems step or
/// by hand) is used as it is and left alone.
pub fn mount_vfs(b: &mut Build, root: &Path, set: &[Vfs], owner: &str) -> Result<()> {
    let img = ImageRoot::open(root)?;
    for v in set {
        // Where the image's own links lead, inside it (mount(2) would follow them on
        // the host).
        let target = img.mount_point(v.path)?;
        let present = mount::mounts_below(root)?;
        if present.contains(&target) {
            continue;
        }
        let src = Path::new(v.fstype);
        let flags = MsFlags::MS_NOSUID
            | if v.fstype == "devtmpfs" {
                MsFlags::empty()
            } else {
                MsFlags::MS_NODEV
            };
        let r = mount::mount(src, &target, Some(v.fstype), flags, v.data);
        if let Err(e) = r {
            if v.fstype != "devtmpfs" {
                return Err(e);
            }
            // Where devtmpfs cannot be mounted (some containers), the host's /dev will do.
            mount::mount(Path::new("/dev"), &target, None, MsFlags::MS_BIND, None)
                .context("binding /dev into the image")?;
        }
        b.state.notes.insert(Mounted {
            owner: owner.to_string(),
            path: target,
        });
    }
    Ok(())
}

/// Unmount what `mount_vfs` mounted for `owner`, deepest first (with anything mounted
/// below them since), and forget it.
pub fn unmount_vfs(b: &mut Build, owner: &str) -> Result<()> {
    let mut paths: Vec<PathBuf> = b
        .state
        .notes
        .of::<Mounted>()
        .filter(|m| m.owner == owner)
        .map(|m| m.path.clone())
        .collect();
    paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let mut errors = Vec::new();
    for path in paths {
        match mount::unmount_below(&path) {
            Ok(()) => {
                b.state.notes.remove(&Mounted {
                    owner: owner.to_string(),
                    path,
                });
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(errors.join("; "))
    }
}

const POLICY_RC_D: &str = "#!/bin/sh\n# Written by vmdb while it runs programs in the image: start no services.\nexit 101\n";

/// Write usr/sbin/policy-rc.d (exit 101) unless the image has one already, tell dpkg
/// not to fsync, and put vmdb's update-initramfs stand-in in usr/local/sbin, while vmdb
/// runs programs in the image. Each file is noted (with the image's root) for
/// `allow_services` to remove.
pub fn forbid_services(b: &mut Build, root: &Path) -> Result<()> {
    let img = ImageRoot::open(root)?;
    if !img.is_dir("usr/sbin")? {
        return Ok(());
    }
    let notes = &mut b.state.notes;
    let mut add = |dir: &str, file: &str, text: &str, mode: u32| -> Result<bool> {
        // Only where the directory is there and the file is not (the image's own stays).
        let path = format!("{dir}/{file}");
        if !img.is_dir(dir)? || img.kind_nofollow(&path)?.is_some() {
            return Ok(false);
        }
        notes.insert(written(&img, &path));
        img.write_file(&path, &mut text.as_bytes(), mode, None)?;
        Ok(true)
    };
    add("usr/sbin", "policy-rc.d", POLICY_RC_D, 0o755)?;
    // The image is a throw-away tree until the build ends (unmounting flushes it), so
    // dpkg need not fsync every file it unpacks: a kernel package installs much faster.
    add("etc/dpkg/dpkg.cfg.d", "vmdb-unsafe-io", UNSAFE_IO, 0o644)?;
    // The kernel's initramfs is made once per apt run instead of twice (see the file).
    if add(
        "usr/local/sbin",
        "update-initramfs",
        UPDATE_INITRAMFS,
        0o755,
    )? {
        // apt runs dpkg, and so the maintainer scripts, with a PATH of its own.
        add("etc/apt/apt.conf.d", "00vmdb-dpkg-path", DPKG_PATH, 0o644)?;
        b.state.notes.insert(written(&img, INITRAMFS_PENDING));
    }
    Ok(())
}

/// The note of a file vmdb wrote in the image.
fn written(img: &ImageRoot, path: &str) -> Written {
    Written {
        root: img.host_root().to_path_buf(),
        path: path.to_string(),
    }
}

const DPKG_PATH: &str = "// Written by vmdb for the duration of the build.\nDPkg::Path \"/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin\";\n";

const UPDATE_INITRAMFS: &str = include_str!("image-files/update-initramfs");
const INITRAMFS_PENDING: &str = "var/tmp/vmdb-initramfs-pending";

const UNSAFE_IO: &str = "# Written by vmdb for the duration of the build.\nforce-unsafe-io\n";

/// Remove the files vmdb wrote to keep services from starting and dpkg fast.
pub fn allow_services(b: &mut Build) -> Result<()> {
    let ours: Vec<(PathBuf, String)> = b
        .state
        .notes
        .of::<Written>()
        .map(|w| (w.root.clone(), w.path.clone()))
        .collect();
    for (root, path) in ours {
        match ImageRoot::open(&root) {
            Ok(img) => {
                img.remove_file(&path)?;
            }
            // The image is not there any more: nothing left to remove.
            Err(_) if !root.exists() => {}
            Err(e) => return Err(e),
        }
        b.state.notes.remove(&Written { root, path });
    }
    Ok(())
}

/// Get the image ready to run programs in: virtual filesystems and no services.
pub fn enter(b: &mut Build, root: &Path, owner: &str) -> Result<()> {
    // An image of a foreign architecture (from a rootfs tarball, without a debootstrap
    // step in this build) needs its interpreter registered.
    crate::distro::binfmt::ensure_for_image(root)?;
    forbid_services(b, root)?;
    mount_vfs(b, root, FOR_CHROOT, owner)
}

/// End a step's programs in the image that all went well: make the initramfs the
/// stand-in deferred and no trigger made, then `leave`.
pub fn finish(b: &mut Build, root: &Path, owner: &str) -> Result<()> {
    if ImageRoot::open(root)?.exists(INITRAMFS_PENDING)? {
        command(root, &["/usr/local/sbin/update-initramfs", "--vmdb-finish"])
            .run()
            .context("making the initramfs deferred by vmdb")?;
    }
    leave(b, owner)
}

/// Undo `enter` (also the teardown of a step that failed between the two).
pub fn leave(b: &mut Build, owner: &str) -> Result<()> {
    let a = unmount_vfs(b, owner);
    let p = allow_services(b);
    a.and(p)
}

/// The host program that runs commands inside the image, and its Debian package.
const CHROOT: (&str, &str) = ("chroot", "coreutils");

/// Validation: the step runs commands inside the image (`command`).
pub fn needs_chroot(c: &mut Check) {
    let key = c.step.kind;
    c.needs(key, CHROOT.0, CHROOT.1);
}

/// A command run inside the image, in the image's environment (`environment`).
pub fn command<S: AsRef<std::ffi::OsStr>>(root: &Path, argv: &[S]) -> Cmd {
    with_image_env(Cmd::new(CHROOT.0).arg(root).args(argv), root)
}

/// The host's variables passed on to programs in the image, so that they download
/// through the same proxy as the host.
pub const PASSED_ON: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];

/// The whole environment of a program vmdb runs in the image at `root` (and of the
/// bootstrappers, whose second stage runs there). Nothing else of the host's reaches
/// the image: its TMPDIR, locale or HOME name things the image does not have (a
/// package's postinst ran `mktemp` in the host's TMPDIR and failed).
pub fn environment(root: &Path) -> Vec<(&'static str, std::ffi::OsString)> {
    let locale = if has_c_utf8(root) { "C.UTF-8" } else { "C" };
    let mut env: Vec<(&'static str, std::ffi::OsString)> = [
        ("PATH", PATH),
        ("HOME", "/root"),
        ("LANG", locale),
        ("LC_ALL", locale),
        ("DEBIAN_FRONTEND", "noninteractive"),
        ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.into()))
    .collect();
    for name in PASSED_ON {
        if let Some(v) = std::env::var_os(name) {
            env.push((name, v));
        }
    }
    env
}

/// `cmd` with the image's environment instead of the host's.
pub fn with_image_env(cmd: Cmd, root: &Path) -> Cmd {
    environment(root)
        .into_iter()
        .fold(cmd.env_clear(), |c, (k, v)| c.env(k, v))
}

/// Whether the image has the C.UTF-8 locale (Debian's libc-bin ships it, as C.utf8
/// since bookworm and C.UTF-8 before; a tree being bootstrapped does not have it yet).
/// Not through a symbolic link, which could lead out of the image.
fn has_c_utf8(root: &Path) -> bool {
    let real_dirs = |names: &[&str]| {
        let mut p = root.to_path_buf();
        names.iter().all(|c| {
            p.push(c);
            std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir())
        })
    };
    ["C.utf8", "C.UTF-8"]
        .iter()
        .any(|l| real_dirs(&["usr", "lib", "locale", l]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_part(root: &Path) -> Vec<(String, String)> {
        environment(root)
            .into_iter()
            .filter(|(k, _)| !PASSED_ON.contains(k))
            .map(|(k, v)| (k.to_string(), v.to_string_lossy().into_owned()))
            .collect()
    }

    #[test]
    fn image_environment_and_its_locale() {
        let d = tempfile::tempdir().unwrap();
        let expected = |locale: &str| -> Vec<(String, String)> {
            [
                ("PATH", PATH),
                ("HOME", "/root"),
                ("LANG", locale),
                ("LC_ALL", locale),
                ("DEBIAN_FRONTEND", "noninteractive"),
                ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .to_vec()
        };
        // An empty tree (being bootstrapped) has no C.UTF-8 yet.
        assert_eq!(fixed_part(d.path()), expected("C"));
        // Nor through a symbolic link (which could name a host directory).
        std::fs::create_dir_all(d.path().join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib/locale", d.path().join("usr/lib/locale")).unwrap();
        assert_eq!(fixed_part(d.path()), expected("C"));
        std::fs::remove_file(d.path().join("usr/lib/locale")).unwrap();
        std::fs::create_dir_all(d.path().join("usr/lib/locale/C.utf8")).unwrap();
        assert_eq!(fixed_part(d.path()), expected("C.UTF-8"));
        let old = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(old.path().join("usr/lib/locale/C.UTF-8")).unwrap();
        assert_eq!(fixed_part(old.path()), expected("C.UTF-8"));
    }

    #[test]
    fn a_program_gets_that_environment_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        // env itself, on the host, with what a program in the image would get.
        let out = with_image_env(Cmd::new("/usr/bin/env"), d.path())
            .run()
            .unwrap();
        let mut expected: Vec<String> = environment(d.path())
            .into_iter()
            .map(|(k, v)| format!("{k}={}\n", v.to_string_lossy()))
            .collect();
        expected.sort();
        let mut got: Vec<String> = out.split_inclusive('\n').map(String::from).collect();
        got.sort();
        assert_eq!(got, expected);
    }
}

//! `grub`: install GRUB for BIOS or UEFI from the host's GRUB files, with a grub.cfg
//! vmdb writes itself.
//!
//! grub-mkconfig cannot be used: run in the image's chroot on partition-offset loop
//! devices it silently writes a menu without kernels. grub-install for EFI refuses an
//! ESP that is not a mounted FAT filesystem, and the kernel here cannot mount FAT. So:
//! BIOS uses host `grub-install --target=i386-pc` on the whole disk; UEFI builds the
//! removable-path loader (EFI/BOOT/BOOTX64.EFI) with grub-mkimage and an early config
//! that finds the boot filesystem by UUID. Neither needs the network, nor GRUB
//! packages in the image, except where the host cannot have GRUB's modules for the
//! image's platform (arm64-efi on an amd64 host): then they come from the image.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::engine::build::Build;
use crate::engine::plan::Filesystem;
use crate::engine::state::Tag;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::blockdev::table;
use crate::host::cmd::Cmd;
use crate::host::image_root::ImageRoot;

pub struct Grub;

/// Owner of what a chroot needs while the grub step installs GRUB's modules in the image.
const APT_OWNER: &str = "grub";

static SPEC: StepSpec = StepSpec {
    name: "grub",
    value: Kind::Str,
    value_doc: "`bios` or `uefi`. vmdb2's `ieee1275` (PowerPC, with `prep`) is refused by \
        validation: it needs GRUB's powerpc-ieee1275 modules, which Debian builds for \
        ppc64el and powerpc hosts only.",
    keys: &[
        Key::req("tag", Kind::Str, "tag of the root filesystem.").aliases(&["root-fs"]),
        Key::opt(
            "efi",
            Kind::Str,
            "tag of the EFI system partition (vfat); required for `uefi`.",
        )
        .aliases(&["efi-part"]),
        Key::opt(
            "prep",
            Kind::Str,
            "tag of the PowerPC PReP boot partition, for vmdb2's `grub: ieee1275`, \
                which vmdb refuses (see below).",
        ),
        Key::opt(
            "console",
            Kind::Str,
            "`serial` for a GRUB menu and kernel console on the serial port at 115200 \
                baud, as well as the screen: ttyS0 on PCs, ttyAMA0 on ARM (arm64, \
                armhf, armel), hvc0 on POWER.",
        ),
        Key::opt(
            "quiet",
            Kind::Bool,
            "add `quiet` to the kernel command line.",
        )
        .default("false"),
        Key::opt("timeout", Kind::Int, "seconds the menu waits.").default("0"),
        Key::opt(
            "kernel-params",
            Kind::List,
            "kernel parameters, instead of the default `net.ifnames=0 consoleblank=0`.",
        ),
        Key::opt(
            "image-dev",
            Kind::Str,
            "the disk to put the BIOS boot code on, instead of the disk holding the \
                root partition (a block device in use is refused, see \
                [mklabel](mklabel.md)). `device` is its name in vmdb2's first \
                releases, accepted for compatibility.",
        )
        .aliases(&["device"]),
        Key::opt(
            "root-part",
            Kind::Str,
            "tag of the root filesystem's partition, as vmdb2's first releases wanted \
                it (accepted for compatibility): vmdb finds the partition from `tag`, \
                so this must name the same one.",
        ),
    ],
    summary: "Installs GRUB so that the image boots with BIOS or UEFI, from the host's GRUB \
        files (packages grub-pc-bin and grub-efi-amd64-bin on the host; none are \
        needed in the image, and no network is used).",
    cache: CacheRole::Volatile,
    always_saved: false,
};

impl Plugin for Grub {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let fw = c.step.arg().to_string();
        if fw == "ieee1275" {
            c.err("grub", IEEE1275_REFUSED);
        } else if fw != "bios" && fw != "uefi" {
            c.err(
                "grub",
                format!("unknown firmware '{fw}': expected bios or uefi"),
            );
        }
        let root = c.step.opt_str("tag").unwrap_or_default().to_string();
        if c.use_tag("tag", &root) && !c.plan.tags[&root].mounted {
            c.err(
                "tag",
                format!("tag '{root}' is not mounted by an earlier step"),
            );
        }
        if let Some(part) = c.step.opt_str("root-part").map(str::to_string) {
            if c.use_tag("root-part", &part)
                && c.plan.tags.contains_key(&root)
                && c.plan.canonical(&part) != c.plan.canonical(&root)
            {
                let of = match c.plan.canonical(&root) {
                    same if same == root => String::new(),
                    other => format!(", partition '{other}'"),
                };
                let msg = format!(
                    "tag '{part}' is not the partition of the root filesystem ('{root}'{of}); \
                     vmdb finds that partition itself: leave root-part out"
                );
                c.err("root-part", msg);
            }
        }
        match c.step.opt_str("efi").map(str::to_string) {
            Some(efi) => {
                if c.use_tag("efi", &efi) {
                    let fs = &c.plan.tags[&efi].filesystem;
                    // An existing filesystem is checked when the build reads it.
                    if !matches!(fs.made(), Some("vfat" | "fat")) && *fs != Filesystem::Existing {
                        c.err(
                            "efi",
                            format!(
                                "tag '{efi}' must have a vfat filesystem (an EFI system partition)"
                            ),
                        );
                    }
                }
            }
            None if fw == "uefi" => c.err(
                "efi",
                "required for uefi: the tag of the EFI system partition",
            ),
            None => {}
        }
        if let Some(prep) = c.step.opt_str("prep").map(str::to_string) {
            if fw != "ieee1275" {
                c.err(
                    "prep",
                    "only for ieee1275: the tag of the PReP boot partition",
                );
            } else {
                c.use_tag("prep", &prep);
            }
        }
        if let Some(dev) = c.step.opt_str("image-dev").map(str::to_string) {
            super::check_device(c, "image-dev", &dev);
        }
        match fw.as_str() {
            "bios" => {
                c.needs("grub", "grub-install", "grub2-common");
                c.needs("grub", BIOS_MODULES, "grub-pc-bin");
            }
            "uefi" => {
                c.needs("grub", "grub-mkimage", "grub-common");
                // An ESP that is not mounted is written with mtools.
                let efi = c.step.opt_str("efi").unwrap_or_default();
                if c.plan.tags.get(efi).is_some_and(|t| !t.mounted) {
                    c.needs("efi", "mcopy", "mtools");
                }
            }
            _ => {}
        }
        if let Some(con) = c.step.opt_str("console") {
            if con != "serial" {
                let con = con.to_string();
                c.err(
                    "console",
                    format!("unknown console '{con}': expected serial"),
                );
            }
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let root_tag = b.state.tag(step.str("tag")?)?.clone();
        let root_dir = root_tag
            .mount_point
            .clone()
            .context("the root filesystem is not mounted")?;
        let root_uuid = root_tag
            .fs_uuid
            .clone()
            .context("the root filesystem has no UUID (made by mkfs?)")?;
        // A separate /boot holds the kernels; GRUB then sees them at its top.
        let boot = b
            .state
            .tags
            .iter()
            .find(|t| t.target.as_deref() == Some("/boot") && t.mount_point.is_some())
            .cloned();
        let (boot_uuid, boot_prefix) = match &boot {
            Some(t) => (t.fs_uuid.clone().context("/boot has no UUID")?, ""),
            None => (root_uuid.clone(), "/boot"),
        };
        let boot_fs = boot
            .as_ref()
            .unwrap_or(&root_tag)
            .fs_type
            .clone()
            .unwrap_or_else(|| "ext4".into());
        let img = ImageRoot::open(&root_dir)?;
        let kernel = latest_kernel(&img)?;
        let arch = crate::distro::binfmt::image_arch(&root_dir)?.unwrap_or_default();
        let params = kernel_params(step, &root_uuid, &arch);
        let cfg = grub_cfg(&kernel, boot_prefix, &boot_uuid, &params, step);
        img.write_file("/boot/grub/grub.cfg", &mut cfg.as_bytes(), 0o644, None)?;

        let disk = match step.opt_str("image-dev") {
            Some(d) => PathBuf::from(d),
            None => root_tag
                .disk
                .clone()
                .context("the root filesystem is not on a partition of a disk")?,
        };
        match step.arg() {
            "bios" => install_bios(b, &disk, &img, &boot_fs),
            _ => {
                let efi = b.state.tag(step.str("efi")?)?.clone();
                install_uefi(b, &efi, &root_dir, &boot_uuid, boot_prefix, &boot_fs)
            }
        }
    }

    fn teardown(&self, _step: &Step, b: &mut Build) -> Result<()> {
        // Only what an installation of GRUB's modules in the image left half-way.
        crate::distro::chroot::leave(b, APT_OWNER)
    }
}

/// Why `grub: ieee1275` is refused: GRUB for PowerPC's Open Firmware is only built for
/// PowerPC hosts, and none that vmdb is built and tested on is one.
const IEEE1275_REFUSED: &str = "'ieee1275' (GRUB for the Open Firmware of PowerPC \
    machines, written to a PReP partition) is for ppc64el images and needs GRUB's \
    powerpc-ieee1275 modules, which Debian builds for ppc64el and powerpc only \
    (package grub-ieee1275-bin; on amd64 that package has i386-ieee1275 instead); \
    vmdb cannot install it: build ppc64el images with vmdb2 on a ppc64el host, or \
    use 'bios' or 'uefi' for other architectures";

/// GRUB's BIOS modules, which grub-install copies into the image.
const BIOS_MODULES: &str = "/usr/lib/grub/i386-pc";

fn install_bios(b: &mut Build, disk: &Path, img: &ImageRoot, boot_fs: &str) -> Result<()> {
    let boot_dir = boot_dir_for_grub_install(img)?;
    let dev = b.disk_device(disk)?;
    let modules = format!("part_msdos part_gpt {}", grub_fs_module(boot_fs));
    Cmd::new("grub-install")
        .arg("--target=i386-pc")
        .arg(format!("--boot-directory={}", boot_dir.display()))
        .arg(format!("--modules={modules}"))
        .arg("--no-floppy")
        .arg(&dev)
        .run()
        .context("installing GRUB for BIOS")?;
    Ok(())
}

/// The host path of the image's /boot for grub-install, which runs on the host and
/// writes below /boot/grub following links as the host sees them: there must be none.
fn boot_dir_for_grub_install(img: &ImageRoot) -> Result<PathBuf> {
    use rustix::fs::FileType;
    img.create_dir_all("/boot/grub", 0o755)?;
    let grub = PathBuf::from("/boot/grub");
    if img.kind_nofollow(&grub)? != Some(FileType::Directory) {
        return Err(link_refused(&grub));
    }
    let mut dirs = vec![grub];
    while let Some(dir) = dirs.pop() {
        for e in img.read_dir(&dir)?.unwrap_or_default() {
            let p = dir.join(&e.name);
            match e.kind {
                FileType::Symlink => return Err(link_refused(&p)),
                FileType::Directory => dirs.push(p),
                _ => {}
            }
        }
    }
    img.host_path("/boot")
}

fn link_refused(p: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot install GRUB: {} in the image is a symbolic link, which grub-install \
         would follow on the host",
        p.display()
    )
}

fn install_uefi(
    b: &mut Build,
    efi: &Tag,
    root_dir: &Path,
    boot_uuid: &str,
    boot_prefix: &str,
    boot_fs: &str,
) -> Result<()> {
    let arch = image_arch(root_dir)?;
    // GRUB's platform, the removable path's loader, and the Debian package of the modules.
    let (platform, loader, pkg) = match arch.as_str() {
        "amd64" => ("x86_64-efi", "BOOTX64.EFI", "grub-efi-amd64-bin"),
        "i386" => ("i386-efi", "BOOTIA32.EFI", "grub-efi-ia32-bin"),
        "arm64" => ("arm64-efi", "BOOTAA64.EFI", "grub-efi-arm64-bin"),
        other => bail!("no UEFI GRUB platform known for architecture '{other}'"),
    };
    let img = ImageRoot::open(root_dir)?;
    let lib = match efi_modules(&img, platform, pkg) {
        Ok(lib) => lib,
        Err(_) => {
            // As vmdb2 does: install GRUB for the image's platform in the image.
            crate::log::info(&format!(
                "  the host has no GRUB modules for {platform}: installing {pkg} in the image"
            ));
            crate::plugins::apt::install(b, root_dir, &[pkg.to_string()], false, true, APT_OWNER)?;
            efi_modules(&img, platform, pkg)?
        }
    };
    // Modules beside grub.cfg, so that insmod works after the early config hands over.
    let mod_dir = PathBuf::from(format!("/boot/grub/{platform}"));
    img.create_dir_all(&mod_dir, 0o755)?;
    for e in std::fs::read_dir(&lib)?.flatten() {
        let p = e.path();
        if matches!(p.extension().and_then(|x| x.to_str()), Some("mod" | "lst")) {
            let mut f =
                std::fs::File::open(&p).with_context(|| format!("reading {}", p.display()))?;
            img.write_file(mod_dir.join(e.file_name()), &mut f, 0o644, None)?;
        }
    }
    let scratch = b.scratch_dir("grub-")?;
    let early = scratch.join("early.cfg");
    std::fs::write(
        &early,
        format!(
            "search --no-floppy --fs-uuid --set=root {boot_uuid}\nset prefix=($root){boot_prefix}/grub\nconfigfile $prefix/grub.cfg\n"
        ),
    )?;
    let staging = scratch.join("esp");
    let boot_dir = staging.join("EFI/BOOT");
    std::fs::create_dir_all(&boot_dir)?;
    let mut modules = vec![
        "part_gpt",
        "part_msdos",
        "fat",
        "ext2",
        "search",
        "search_fs_uuid",
        "normal",
        "linux",
        "configfile",
        "serial",
        "terminal",
        "echo",
        "test",
        "ls",
        "gzio",
        "boot",
        "all_video",
    ];
    modules.push(grub_fs_module(boot_fs));
    if platform != "arm64-efi" {
        modules.push("efi_gop");
    }
    Cmd::new("grub-mkimage")
        .args(["-O", platform, "-d"])
        .arg(&lib)
        .args(["-p", &format!("{boot_prefix}/grub"), "-c"])
        .arg(&early)
        .arg("-o")
        .arg(boot_dir.join(loader))
        .args(&modules)
        .run()
        .context("building the EFI boot loader")?;
    // Into the ESP: through its mount point if it has one, else straight into the FAT.
    match &efi.mount_point {
        Some(point) => {
            let src = boot_dir.join(loader);
            let mut f =
                std::fs::File::open(&src).with_context(|| format!("reading {}", src.display()))?;
            let esp = ImageRoot::open(point)?;
            esp.write_file(format!("/EFI/BOOT/{loader}"), &mut f, 0o644, None)?;
        }
        None => {
            let disk = efi.disk.clone().context("the EFI tag is not a partition")?;
            crate::host::fat::copy_in(&staging, &disk, efi.offset)?;
        }
    }
    // Firmware looks for the ESP by its type.
    if let (Some(disk), Some(n)) = (&efi.disk, efi.number) {
        if !crate::host::blockdev::is_block_device(disk)
            || disk.to_string_lossy().starts_with("/dev/loop")
        {
            table::set_flag(disk, n, "esp", true)?;
        }
    }
    Ok(())
}

/// The directory of GRUB's modules for `platform`: the host's, else the image's. Debian
/// builds grub-efi-arm64-bin for arm64 only, so an amd64 host cannot install it; an
/// arm64 image can (and the host's grub-mkimage makes images for every platform).
fn efi_modules(img: &ImageRoot, platform: &str, pkg: &str) -> Result<PathBuf> {
    let host = PathBuf::from("/usr/lib/grub").join(platform);
    if host.join("kernel.img").is_file() {
        return Ok(host);
    }
    let image = format!("/usr/lib/grub/{platform}");
    if img.is_file(format!("{image}/kernel.img"))? {
        crate::log::verbose(&format!("  using the image's GRUB modules in {image}"));
        return img.host_path(&image);
    }
    bail!(
        "GRUB's {platform} modules are neither on the host ({}) nor in the image: install \
         {pkg} on the host, or in the image (an apt step before this one)",
        host.display()
    )
}

/// The serial console's kernel device: the PC's 16550 UART, the PL011 of ARM
/// machines, the hypervisor console of POWER.
fn serial_device(arch: &str) -> &'static str {
    match arch {
        "arm64" | "armhf" | "armel" => "ttyAMA0",
        "ppc64el" | "ppc64" => "hvc0",
        _ => "ttyS0",
    }
}

fn grub_fs_module(fs: &str) -> &'static str {
    match fs {
        "xfs" => "xfs",
        "btrfs" => "btrfs",
        _ => "ext2",
    }
}

/// Debian architecture of the image, from dpkg's status of base-files.
fn image_arch(root: &Path) -> Result<String> {
    crate::distro::binfmt::image_arch(root)?
        .context("base-files is not in the image's dpkg status (is Debian installed in it?)")
}

/// The newest vmlinuz-VERSION in the image's /boot, as (kernel file, initrd file if any).
fn latest_kernel(img: &ImageRoot) -> Result<(String, Option<String>)> {
    let mut versions: Vec<String> = img
        .read_dir("/boot")?
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            e.name
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .collect();
    versions.sort_by(|a, b| version_cmp(a, b));
    let Some(v) = versions.pop() else {
        bail!(
            "no kernel in /boot of the image: install one first (for example an apt step with linux-image-amd64)"
        );
    };
    let initrd = format!("initrd.img-{v}");
    let initrd = img.exists(format!("/boot/{initrd}"))?.then_some(initrd);
    Ok((format!("vmlinuz-{v}"), initrd))
}

/// Compare version strings piecewise, numbers numerically ("6.1.0-10" > "6.1.0-9").
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |s: &str| -> Vec<(u64, String)> {
        s.split(|c: char| !c.is_ascii_alphanumeric())
            .map(|p| (p.parse::<u64>().unwrap_or(0), p.to_string()))
            .collect()
    };
    split(a).cmp(&split(b))
}

fn kernel_params(step: &Step, root_uuid: &str, arch: &str) -> Vec<String> {
    let mut p = vec![format!("root=UUID={root_uuid}"), "ro".to_string()];
    if step.opt_str("console") == Some("serial") {
        // The last console= is /dev/console, where systemd starts a getty.
        p.push("console=tty0".into());
        p.push(format!("console={},115200n8", serial_device(arch)));
    }
    let extra = step.list("kernel-params");
    if step.has("kernel-params") {
        p.extend(extra);
    } else {
        p.extend(["net.ifnames=0".to_string(), "consoleblank=0".to_string()]);
    }
    if step.bool("quiet") {
        p.push("quiet".into());
    }
    p
}

fn grub_cfg(
    kernel: &(String, Option<String>),
    prefix: &str,
    boot_uuid: &str,
    params: &[String],
    step: &Step,
) -> String {
    let timeout = step.int("timeout").unwrap_or(0);
    let mut s = String::from("# Written by vmdb.\n");
    s.push_str(&format!("set default=0\nset timeout={timeout}\n"));
    if step.opt_str("console") == Some("serial") {
        s.push_str("serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n");
    }
    s.push_str(&format!(
        "search --no-floppy --fs-uuid --set=root {boot_uuid}\n"
    ));
    s.push_str("menuentry 'Debian GNU/Linux' {\n");
    s.push_str(&format!(
        "    linux {prefix}/{} {}\n",
        kernel.0,
        params.join(" ")
    ));
    if let Some(initrd) = &kernel.1 {
        s.push_str(&format!("    initrd {prefix}/{initrd}\n"));
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{check_errors, steps};

    #[test]
    fn newest_kernel_wins() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("boot")).unwrap();
        for f in [
            "vmlinuz-6.1.0-9-amd64",
            "vmlinuz-6.1.0-10-amd64",
            "initrd.img-6.1.0-10-amd64",
            "config-6.1.0-10-amd64",
        ] {
            std::fs::write(d.path().join("boot").join(f), b"").unwrap();
        }
        assert_eq!(
            latest_kernel(&ImageRoot::open(d.path()).unwrap()).unwrap(),
            (
                "vmlinuz-6.1.0-10-amd64".to_string(),
                Some("initrd.img-6.1.0-10-amd64".to_string())
            )
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(
            latest_kernel(&ImageRoot::open(empty.path()).unwrap())
                .unwrap_err()
                .to_string()
                .contains("no kernel in /boot")
        );
    }

    #[test]
    fn config_finds_root_by_uuid_and_uses_serial() {
        let s = steps(&["grub: bios\ntag: /\nconsole: serial\ntimeout: 3\nquiet: true"]).unwrap();
        let params = kernel_params(&s[0], "1234", "amd64");
        let cfg = grub_cfg(
            &("vmlinuz-6.1".into(), Some("initrd.img-6.1".into())),
            "/boot",
            "1234",
            &params,
            &s[0],
        );
        assert_eq!(
            cfg,
            "# Written by vmdb.\nset default=0\nset timeout=3\n\
             serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n\
             search --no-floppy --fs-uuid --set=root 1234\n\
             menuentry 'Debian GNU/Linux' {\n\
             \x20   linux /boot/vmlinuz-6.1 root=UUID=1234 ro console=tty0 console=ttyS0,115200n8 net.ifnames=0 consoleblank=0 quiet\n\
             \x20   initrd /boot/initrd.img-6.1\n}\n"
        );
    }

    #[test]
    fn serial_console_per_architecture() {
        let s = steps(&["grub: bios\ntag: /\nconsole: serial"]).unwrap();
        assert_eq!(
            kernel_params(&s[0], "u", "arm64"),
            [
                "root=UUID=u",
                "ro",
                "console=tty0",
                "console=ttyAMA0,115200n8",
                "net.ifnames=0",
                "consoleblank=0"
            ]
        );
        assert_eq!(
            kernel_params(&s[0], "u", "i386")[3],
            "console=ttyS0,115200n8"
        );
    }

    #[test]
    fn efi_modules_from_the_image_when_the_host_has_none() {
        let d = tempfile::tempdir().unwrap();
        let img = ImageRoot::open(d.path()).unwrap();
        let e = efi_modules(&img, "no-such-efi", "grub-efi-nope-bin")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "GRUB's no-such-efi modules are neither on the host (/usr/lib/grub/no-such-efi) \
             nor in the image: install grub-efi-nope-bin on the host, or in the image (an apt \
             step before this one)"
        );
        let lib = img.host_root().join("usr/lib/grub/no-such-efi");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("kernel.img"), b"").unwrap();
        assert_eq!(
            efi_modules(&img, "no-such-efi", "grub-efi-nope-bin").unwrap(),
            lib
        );
    }

    /// A build whose root (a temporary directory) has a kernel in /boot and a UUID; its
    /// disk does not exist, so nothing reaches grub-install.
    fn build_with_kernel() -> (Build, tempfile::TempDir) {
        let (mut b, root) = crate::plugins::testing::test_build_with_root();
        let t = b.state.tag_mut("/").unwrap();
        t.fs_uuid = Some("1234".into());
        t.disk = Some(root.path().join("no-such-disk.img"));
        (b, root)
    }

    #[test]
    fn grub_cfg_goes_where_the_images_links_lead() {
        use crate::plugins::testing::{Canary, plant_link, test_step};
        let step = test_step("grub: bios\ntag: /");
        // /boot itself a link to the host's canary (which has no kernel): in the image
        // it leads to the canary's path there, which has one.
        let canary = Canary::new();
        let (mut b, root) = build_with_kernel();
        let inside = canary.inside(root.path());
        std::fs::write(inside.join("vmlinuz-6.1.0-10-amd64"), b"").unwrap();
        plant_link(root.path(), "boot", &canary.path.display().to_string());
        let e = Grub.run(&step, &mut b).unwrap_err();
        canary.assert_untouched();
        let cfg = std::fs::read_to_string(inside.join("grub/grub.cfg")).unwrap();
        assert!(
            cfg.contains("    linux /boot/vmlinuz-6.1.0-10-amd64 root=UUID=1234 ro"),
            "{cfg}"
        );
        // It went on to grub-install's disk, which is missing.
        assert!(format!("{e:#}").contains("no-such-disk.img"), "{e:#}");

        // /boot/grub a link: grub.cfg goes inside the image, and grub-install, which
        // would follow the link on the host, is not run.
        let canary = Canary::new();
        let (mut b, root) = build_with_kernel();
        let inside = canary.inside(root.path());
        std::fs::create_dir(root.path().join("boot")).unwrap();
        std::fs::write(root.path().join("boot/vmlinuz-6.1"), b"").unwrap();
        plant_link(root.path(), "boot/grub", &canary.path.display().to_string());
        let e = Grub.run(&step, &mut b).unwrap_err();
        canary.assert_untouched();
        assert!(inside.join("grub.cfg").is_file());
        assert_eq!(
            format!("{e:#}"),
            "cannot install GRUB: /boot/grub in the image is a symbolic link, which \
             grub-install would follow on the host"
        );
        // A link below /boot/grub likewise.
        std::fs::remove_file(root.path().join("boot/grub")).unwrap();
        plant_link(root.path(), "boot/grub/fonts", &canary.escaping());
        let e = Grub.run(&step, &mut b).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot install GRUB: /boot/grub/fonts in the image is a symbolic link, which \
             grub-install would follow on the host"
        );
        canary.assert_untouched();
    }

    /// A full disk (as a signal, or any failure but a missing package) shows
    /// grub-install's own error, not a guess that grub-pc-bin is missing.
    #[test]
    fn a_full_disk_is_reported_not_a_missing_package() {
        use crate::plugins::testing::specs as testing;
        if !testing::is_root() || !Path::new(BIOS_MODULES).is_dir() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("boot")).unwrap();
        let _guard = testing::Unmounter(root.clone());
        crate::host::mount::mount(
            Path::new("tmpfs"),
            &root.join("boot"),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64k"),
        )
        .unwrap();
        let mut b = testing::build(&root, None);
        let img = ImageRoot::open(&root).unwrap();
        let e = format!(
            "{:#}",
            install_bios(&mut b, &disk, &img, "ext4").unwrap_err()
        );
        assert!(
            e.starts_with(
                "installing GRUB for BIOS: command failed with exit status 1: grub-install --target=i386-pc"
            ),
            "{e}"
        );
        assert!(e.contains("No space left on device"), "{e}");
        assert!(!e.contains("grub-pc-bin"), "{e}");
    }

    #[test]
    fn uefi_needs_an_efi_tag() {
        assert_eq!(
            check_errors("grub: uefi\ntag: /"),
            vec!["key 'efi': required for uefi: the tag of the EFI system partition"]
        );
        assert_eq!(
            check_errors("grub: coreboot\ntag: /"),
            vec!["key 'grub': unknown firmware 'coreboot': expected bios or uefi"]
        );
    }

    #[test]
    fn ieee1275_with_prep_is_refused_naming_ppc64el() {
        // As autopkgtest-build-qemu writes it for ppc64el.
        let e = steps(&[
            "mkimg: d.img\nsize: 1G",
            "mklabel: gpt\ndevice: d.img",
            "mkpart: primary\ndevice: d.img\nstart: 0%\nend: 10MiB\ntag: prep",
            "mkpart: primary\ndevice: d.img\nstart: 10MiB\nend: 100%\ntag: root",
            "mkfs: ext4\npartition: root",
            "mount: root",
            "grub: ieee1275\ntag: root\nprep: prep\nconsole: serial",
        ])
        .unwrap_err();
        assert_eq!(e, [format!("key 'grub': {IEEE1275_REFUSED}")]);
        assert!(IEEE1275_REFUSED.contains("ppc64el"));
        assert_eq!(
            check_errors("grub: bios\ntag: /\nprep: nope"),
            ["key 'prep': only for ieee1275: the tag of the PReP boot partition"]
        );
    }

    #[test]
    fn vmdb2s_early_root_part_and_device() {
        let s = steps(&[
            "mkimg: d.img\nsize: 1G",
            "mklabel: msdos\ndevice: d.img",
            "mkpart: primary\ndevice: d.img\nstart: 0%\nend: 100%\npart-tag: rootpart",
            "mkfs: ext4\npartition: rootpart",
            "mount: rootpart\nfs-tag: rootfs",
            "grub: bios\nroot-fs: rootfs\nroot-part: rootpart\ndevice: d.img",
        ])
        .unwrap();
        assert_eq!(s[5].opt_str("image-dev"), Some("d.img"));
        assert_eq!(s[5].opt_str("tag"), Some("rootfs"));
    }
}

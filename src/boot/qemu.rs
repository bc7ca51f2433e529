//! The qemu command line for a disk image: a pure function of the configuration
//! (architecture, memory, firmware, disks), and what it needs (UEFI variables).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

pub(super) const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub(super) const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
pub(super) const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
pub(super) const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arch {
    X86_64,
    I386,
    Aarch64,
}

impl Arch {
    pub(super) fn parse(s: &str) -> Result<Arch> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "i386" | "i686" => Ok(Arch::I386),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            _ => bail!("unsupported --arch {s:?}: use x86_64, i386 or aarch64"),
        }
    }

    pub(super) fn qemu_binary(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::I386 => "qemu-system-i386",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    pub(super) fn debian_package(self) -> &'static str {
        match self {
            Arch::X86_64 | Arch::I386 => "qemu-system-x86",
            Arch::Aarch64 => "qemu-system-arm",
        }
    }

    /// KVM can only run guests of the host's own architecture.
    pub(super) fn kvm_possible(self) -> bool {
        matches!(
            (self, std::env::consts::ARCH),
            (Arch::X86_64, "x86_64") | (Arch::I386, "x86_64" | "x86") | (Arch::Aarch64, "aarch64")
        )
    }
}

#[derive(Debug, Clone)]
pub(super) struct Disk {
    pub(super) path: PathBuf,
    pub(super) format: String,
}

/// Firmware flash images: read-only code, and a per-boot writable copy of
/// the variable store (the firmware writes boot entries into it, and the
/// system copy must stay pristine).
#[derive(Debug, Clone)]
pub(super) struct Firmware {
    pub(super) code: PathBuf,
    pub(super) vars: PathBuf,
}

#[derive(Debug, Clone)]
pub(super) struct QemuConfig {
    pub(super) arch: Arch,
    pub(super) memory: u32,
    pub(super) kvm: bool,
    pub(super) snapshot: bool,
    /// The image first, then extra drives.
    pub(super) disks: Vec<Disk>,
    pub(super) firmware: Option<Firmware>,
}

pub(super) fn qemu_args(cfg: &QemuConfig) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(OsString::from(s));
    if cfg.arch == Arch::Aarch64 {
        // qemu-system-aarch64 has no default machine; "virt" is the generic one.
        for s in ["-M", "virt", "-cpu", "cortex-a57"] {
            push(s);
        }
    }
    // -cpu host aborts on this kind of host, so KVM uses the default CPU too.
    push("-accel");
    push(if cfg.kvm { "kvm" } else { "tcg" });
    push("-m");
    push(&cfg.memory.to_string());
    // -nographic (not -display none) matters: only then does SeaBIOS print
    // to the serial port, so "No bootable device" reaches us.
    for s in [
        "-nographic",
        "-serial",
        "mon:stdio",
        "-no-reboot",
        "-net",
        "none",
    ] {
        push(s);
    }
    if cfg.snapshot {
        push("-snapshot");
    }
    if let Some(fw) = &cfg.firmware {
        a.push("-drive".into());
        a.push(opt_with_file(
            "if=pflash,format=raw,unit=0,readonly=on,file=",
            &fw.code,
        ));
        a.push("-drive".into());
        a.push(opt_with_file("if=pflash,format=raw,unit=1,file=", &fw.vars));
    }
    for d in &cfg.disks {
        a.push("-drive".into());
        let mut opt = opt_with_file("file=", &d.path);
        opt.push(format!(",format={},if=virtio", d.format));
        a.push(opt);
    }
    a
}

/// qemu splits -drive options on commas; a comma in a file name is written
/// as two commas.
pub(super) fn opt_with_file(prefix: &str, path: &Path) -> OsString {
    let mut bytes = prefix.as_bytes().to_vec();
    for &b in path.as_os_str().as_bytes() {
        bytes.push(b);
        if b == b',' {
            bytes.push(b',');
        }
    }
    OsString::from_vec(bytes)
}

pub(super) fn detect_format(path: &Path) -> String {
    let is_qcow2 = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("qcow2"));
    if is_qcow2 {
        return "qcow2".into();
    }
    // -U: don't take the image lock, another process may hold it.
    let out = Command::new("qemu-img")
        .arg("info")
        .arg("-U")
        .arg(path)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            parse_qemu_img_format(&String::from_utf8_lossy(&o.stdout)).unwrap_or("raw".into())
        }
        // Without qemu-img, raw is the only thing we can assume.
        _ => "raw".into(),
    }
}

/// The first "file format:" line of `qemu-img info` is the top-level image;
/// later ones belong to child nodes.
pub(super) fn parse_qemu_img_format(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("file format:"))
        .map(|f| f.trim().to_string())
        .filter(|f| !f.is_empty())
}

pub(super) fn prepare_firmware(arch: Arch, dir: &Path) -> Result<Firmware> {
    let (code, vars, package) = match arch {
        Arch::X86_64 => (OVMF_CODE, OVMF_VARS, "ovmf"),
        Arch::Aarch64 => (AAVMF_CODE, AAVMF_VARS, "qemu-efi-aarch64"),
        Arch::I386 => bail!("--uefi is not supported for i386 guests"),
    };
    for f in [code, vars] {
        if !Path::new(f).exists() {
            bail!("UEFI firmware {f} not found (install the {package} package)");
        }
    }
    let copy = dir.join(Path::new(vars).file_name().unwrap_or(OsStr::new("VARS.fd")));
    std::fs::copy(vars, &copy)
        .with_context(|| format!("copying UEFI variable store {vars} to {}", copy.display()))?;
    Ok(Firmware {
        code: code.into(),
        vars: copy,
    })
}

pub(super) fn shell_words(program: &Path, args: &[OsString]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    // --- qemu command line ---

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn config(arch: Arch) -> QemuConfig {
        QemuConfig {
            arch,
            memory: 1024,
            kvm: false,
            snapshot: false,
            disks: vec![Disk {
                path: "/img/disk.img".into(),
                format: "raw".into(),
            }],
            firmware: None,
        }
    }

    const COMMON: &[&str] = &[
        "-accel",
        "tcg",
        "-m",
        "1024",
        "-nographic",
        "-serial",
        "mon:stdio",
        "-no-reboot",
        "-net",
        "none",
    ];

    #[test]
    fn qemu_args_bios() {
        let mut want: Vec<&str> = COMMON.to_vec();
        want.extend(["-drive", "file=/img/disk.img,format=raw,if=virtio"]);
        assert_eq!(strings(&qemu_args(&config(Arch::X86_64))), want);
        assert_eq!(Arch::X86_64.qemu_binary(), "qemu-system-x86_64");
    }

    #[test]
    fn qemu_args_uefi() {
        let mut cfg = config(Arch::X86_64);
        cfg.firmware = Some(Firmware {
            code: OVMF_CODE.into(),
            vars: "/tmp/x/OVMF_VARS_4M.fd".into(),
        });
        let mut want: Vec<&str> = COMMON.to_vec();
        want.extend([
            "-drive",
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive",
            "if=pflash,format=raw,unit=1,file=/tmp/x/OVMF_VARS_4M.fd",
            "-drive",
            "file=/img/disk.img,format=raw,if=virtio",
        ]);
        assert_eq!(strings(&qemu_args(&cfg)), want);
    }

    #[test]
    fn qemu_args_i386() {
        assert_eq!(Arch::parse("i386").unwrap(), Arch::I386);
        assert_eq!(Arch::I386.qemu_binary(), "qemu-system-i386");
        let a = strings(&qemu_args(&config(Arch::I386)));
        assert_eq!(a[0], "-accel");
        assert!(!a.contains(&"-M".to_string()));
    }

    #[test]
    fn qemu_args_aarch64() {
        let mut cfg = config(Arch::Aarch64);
        cfg.firmware = Some(Firmware {
            code: AAVMF_CODE.into(),
            vars: "/tmp/x/AAVMF_VARS.fd".into(),
        });
        let a = strings(&qemu_args(&cfg));
        assert_eq!(a[..4], ["-M", "virt", "-cpu", "cortex-a57"]);
        assert!(a.contains(
            &"if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd".into()
        ));
        assert!(a.contains(&"if=pflash,format=raw,unit=1,file=/tmp/x/AAVMF_VARS.fd".into()));
        assert_eq!(Arch::Aarch64.qemu_binary(), "qemu-system-aarch64");
    }

    #[test]
    fn qemu_args_kvm_snapshot_extra_drives() {
        let mut cfg = config(Arch::X86_64);
        cfg.kvm = true;
        cfg.snapshot = true;
        cfg.memory = 2048;
        cfg.disks.push(Disk {
            path: "/img/seed,1.iso".into(),
            format: "raw".into(),
        });
        cfg.disks.push(Disk {
            path: "/img/data.qcow2".into(),
            format: "qcow2".into(),
        });
        let a = strings(&qemu_args(&cfg));
        assert_eq!(a[..4], ["-accel", "kvm", "-m", "2048"]);
        assert!(a.contains(&"-snapshot".into()));
        assert!(!a.contains(&"tcg".into()));
        let drives: Vec<&String> = a
            .iter()
            .zip(a.iter().skip(1))
            .filter(|(k, _)| *k == "-drive")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            drives,
            [
                "file=/img/disk.img,format=raw,if=virtio",
                // qemu's escaping of a comma in a file name
                "file=/img/seed,,1.iso,format=raw,if=virtio",
                "file=/img/data.qcow2,format=qcow2,if=virtio",
            ]
        );
    }

    #[test]
    fn arch_names() {
        assert_eq!(Arch::parse("amd64").unwrap(), Arch::X86_64);
        assert_eq!(Arch::parse("arm64").unwrap(), Arch::Aarch64);
        assert!(Arch::parse("riscv64").is_err());
    }

    #[test]
    fn format_detection() {
        assert_eq!(detect_format(Path::new("/nonexistent/x.QCOW2")), "qcow2");
        assert_eq!(
            parse_qemu_img_format(
                "image: a.img\nfile format: qcow2\nvirtual size: 1 GiB\nChild node '/file':\n    file format: file\n"
            ),
            Some("qcow2".into())
        );
        assert_eq!(parse_qemu_img_format("garbage"), None);
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert_eq!(detect_format(&raw), "raw");
    }

    #[test]
    fn firmware_vars_are_copied_per_boot() {
        assert!(prepare_firmware(Arch::I386, Path::new("/tmp")).is_err());
        if !Path::new(OVMF_VARS).exists() {
            eprintln!("skipped: no OVMF");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fw = prepare_firmware(Arch::X86_64, dir.path()).unwrap();
        assert_eq!(fw.code, Path::new(OVMF_CODE));
        assert!(fw.vars.starts_with(dir.path()));
        assert_eq!(
            std::fs::read(&fw.vars).unwrap(),
            std::fs::read(OVMF_VARS).unwrap()
        );
    }
}

//! Running programs of a foreign architecture (an arm64 image built on an amd64 host):
//! the kernel's binfmt_misc hands them to a qemu-user-static interpreter.
//!
//! binfmt_misc is often not mounted, and qemu-user-static's registrations are not
//! always enabled (they are loaded by systemd-binfmt or binfmt-support at boot, which
//! containers and minimal machines do not run). `ensure` mounts binfmt_misc where it is
//! missing and registers or enables the interpreter from qemu-user-static's own
//! `/usr/lib/binfmt.d/qemu-CPU.conf`. The registration must carry the F (fix binary)
//! flag: the kernel then opens the interpreter when it is registered, so that programs
//! run inside the image's chroot, where the host's interpreter does not exist.
//!
//! Registrations are global to the host's kernel and stay after the build, as those
//! made by systemd-binfmt do.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::MsFlags;

use crate::host::cmd::Cmd;
use crate::host::image_root::ImageRoot;

/// Where binfmt_misc is mounted.
pub const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";
/// Where qemu-user-static installs its registrations (systemd-binfmt's format).
pub const BINFMT_D: &str = "/usr/lib/binfmt.d";
/// The package that provides the interpreters.
pub const PACKAGE: &str = "qemu-user-static";

/// qemu's name of the CPU of a Debian architecture.
pub fn qemu_cpu(debian_arch: &str) -> Option<&'static str> {
    Some(match debian_arch {
        "amd64" => "x86_64",
        "i386" => "i386",
        "arm64" => "aarch64",
        "armhf" | "armel" => "arm",
        "ppc64el" => "ppc64le",
        "ppc64" => "ppc64",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "mips64el" => "mips64el",
        "mipsel" => "mipsel",
        "loong64" => "loongarch64",
        "alpha" => "alpha",
        "hppa" => "hppa",
        "m68k" => "m68k",
        "sh4" => "sh4",
        "sparc64" => "sparc64",
        _ => return None,
    })
}

/// The host runs programs of `target` itself (the same architecture, or i386 on
/// amd64).
pub fn native(host: &str, target: &str) -> bool {
    host == target || (host == "amd64" && target == "i386")
}

/// The host's Debian architecture (dpkg is asked once: several checks of every
/// bootstrap step need it).
pub fn host_arch() -> Result<String> {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(h) = HOST.get() {
        return Ok(h.clone());
    }
    let h = Cmd::new("dpkg")
        .arg("--print-architecture")
        .run()
        .context("asking dpkg for the host's architecture")?
        .trim()
        .to_string();
    Ok(HOST.get_or_init(|| h).clone())
}

/// Debian architecture of the system installed in `root`, from dpkg's status of
/// base-files; None when there is none (nothing installed yet).
pub fn image_arch(root: &Path) -> Result<Option<String>> {
    let Some(status) = ImageRoot::open(root)?.read("/var/lib/dpkg/status")? else {
        return Ok(None);
    };
    Ok(arch_in_status(&String::from_utf8_lossy(&status)))
}

fn arch_in_status(status: &str) -> Option<String> {
    status
        .split("\n\n")
        .find(|p| p.lines().any(|l| l == "Package: base-files"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("Architecture: ")))
        .map(|a| a.trim().to_string())
}

/// qemu-user-static's registration file for `cpu`.
fn conf_file(binfmt_d: &Path, cpu: &str) -> PathBuf {
    binfmt_d.join(format!("qemu-{cpu}.conf"))
}

/// Validation: what keeps this host from running `target` programs, if anything.
/// Looks at files only; changes nothing.
pub fn problem(host: &str, target: &str) -> Option<String> {
    problem_in(host, target, Path::new(BINFMT_D))
}

fn problem_in(host: &str, target: &str, binfmt_d: &Path) -> Option<String> {
    if native(host, target) {
        return None;
    }
    let Some(cpu) = qemu_cpu(target) else {
        return Some(format!(
            "vmdb does not know how to run '{target}' programs on this {host} host"
        ));
    };
    if !conf_file(binfmt_d, cpu).is_file() {
        return Some(format!(
            "'{target}' programs need emulation on this {host} host: install {PACKAGE} \
             (apt-get install {PACKAGE}; {} is missing)",
            conf_file(binfmt_d, cpu).display()
        ));
    }
    None
}

/// One registration as /proc/sys/fs/binfmt_misc/NAME shows it.
#[derive(Debug, PartialEq)]
struct Entry {
    enabled: bool,
    interpreter: String,
    flags: String,
}

fn parse_entry(text: &str) -> Entry {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    Entry {
        enabled: text.lines().next() == Some("enabled"),
        interpreter: field("interpreter "),
        flags: field("flags:"),
    }
}

/// The registration line of a binfmt.d file: its first line that is not a comment.
fn registration(conf: &str) -> Option<&str> {
    conf.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
}

/// Make sure programs of Debian architecture `target` run on this host, in a chroot
/// too. Nothing to do for a native architecture.
pub fn ensure(target: &str) -> Result<()> {
    let host = host_arch()?;
    if native(&host, target) {
        return Ok(());
    }
    if let Some(p) = problem(&host, target) {
        bail!(p);
    }
    let cpu = qemu_cpu(target).expect("checked by problem()");
    let misc = Path::new(BINFMT_MISC);
    if !misc.join("status").exists() {
        crate::host::mount::mount(
            Path::new("binfmt_misc"),
            misc,
            Some("binfmt_misc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        )
        .context("mounting binfmt_misc, which running foreign programs needs")?;
    }
    let status = misc.join("status");
    if std::fs::read_to_string(&status)?.trim() != "enabled" {
        crate::log::verbose("  enabling binfmt_misc");
        std::fs::write(&status, "1").context("enabling binfmt_misc")?;
    }
    let name = format!("qemu-{cpu}");
    let entry_path = misc.join(&name);
    if !entry_path.exists() {
        let conf_path = conf_file(Path::new(BINFMT_D), cpu);
        let conf = std::fs::read_to_string(&conf_path)
            .with_context(|| format!("reading {}", conf_path.display()))?;
        let line = registration(&conf)
            .with_context(|| format!("no registration in {}", conf_path.display()))?;
        crate::log::verbose(&format!(
            "  registering {name} with binfmt_misc from {}",
            conf_path.display()
        ));
        std::fs::write(misc.join("register"), line)
            .with_context(|| format!("registering {name} with binfmt_misc"))?;
    }
    let entry = parse_entry(
        &std::fs::read_to_string(&entry_path)
            .with_context(|| format!("reading {}", entry_path.display()))?,
    );
    if !entry.flags.contains('F') {
        bail!(
            "binfmt_misc's {name} entry (interpreter {}) lacks the F flag, so programs in \
             the image cannot find their interpreter; remove it (echo -1 > {}) and let \
             vmdb register {PACKAGE}'s",
            entry.interpreter,
            entry_path.display()
        );
    }
    if !entry.enabled {
        crate::log::verbose(&format!("  enabling binfmt_misc's {name}"));
        std::fs::write(&entry_path, "1").with_context(|| format!("enabling {name}"))?;
    }
    Ok(())
}

/// Before running programs in the image at `root`: if the system installed there is
/// of a foreign architecture, `ensure` it can run.
pub fn ensure_for_image(root: &Path) -> Result<()> {
    match image_arch(root)? {
        Some(arch) => ensure(&arch),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_names() {
        assert_eq!(qemu_cpu("arm64"), Some("aarch64"));
        assert_eq!(qemu_cpu("armhf"), Some("arm"));
        assert_eq!(qemu_cpu("ppc64el"), Some("ppc64le"));
        assert_eq!(qemu_cpu("i386"), Some("i386"));
        assert_eq!(qemu_cpu("vax"), None);
    }

    #[test]
    fn what_runs_natively() {
        assert!(native("amd64", "amd64"));
        assert!(native("amd64", "i386"));
        assert!(!native("amd64", "arm64"));
        assert!(!native("i386", "amd64"));
        assert!(!native("arm64", "amd64"));
    }

    #[test]
    fn problems_name_the_package() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(problem_in("amd64", "i386", d.path()), None);
        assert_eq!(
            problem_in("amd64", "arm64", d.path()).unwrap(),
            format!(
                "'arm64' programs need emulation on this amd64 host: install qemu-user-static \
                 (apt-get install qemu-user-static; {}/qemu-aarch64.conf is missing)",
                d.path().display()
            )
        );
        assert_eq!(
            problem_in("amd64", "vax", d.path()).unwrap(),
            "vmdb does not know how to run 'vax' programs on this amd64 host"
        );
        std::fs::write(
            d.path().join("qemu-aarch64.conf"),
            ":qemu-aarch64:M::x:y:/q:F\n",
        )
        .unwrap();
        assert_eq!(problem_in("amd64", "arm64", d.path()), None);
    }

    #[test]
    fn entries_and_registrations() {
        assert_eq!(
            parse_entry(
                "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\n"
            ),
            Entry {
                enabled: true,
                interpreter: "/usr/libexec/qemu-binfmt/aarch64-binfmt-P".into(),
                flags: "POF".into()
            }
        );
        assert!(!parse_entry("disabled\ninterpreter /x\nflags: \n").enabled);
        assert_eq!(
            registration("# comment\n\n:qemu-arm:M::\\x7fELF:\\xff:/q:OPF\n"),
            Some(":qemu-arm:M::\\x7fELF:\\xff:/q:OPF")
        );
        assert_eq!(registration("# nothing\n"), None);
    }

    #[test]
    fn architecture_of_an_installed_system() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(image_arch(d.path()).unwrap(), None);
        std::fs::create_dir_all(d.path().join("var/lib/dpkg")).unwrap();
        std::fs::write(
            d.path().join("var/lib/dpkg/status"),
            "Package: adduser\nArchitecture: all\n\nPackage: base-files\nStatus: install ok installed\nArchitecture: arm64\n\n",
        )
        .unwrap();
        assert_eq!(image_arch(d.path()).unwrap().as_deref(), Some("arm64"));
    }

    /// Registers, disables and re-enables qemu-m68k (an interpreter no build here uses,
    /// so builds running meanwhile are not disturbed): needs root and qemu-user-static.
    #[test]
    fn ensure_registers_and_enables_the_interpreter() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        if host_arch().unwrap() != "amd64" || !Path::new(BINFMT_D).join("qemu-m68k.conf").exists() {
            eprintln!("skipped: needs an amd64 host with qemu-user-static");
            return;
        }
        ensure("m68k").unwrap();
        let entry = Path::new(BINFMT_MISC).join("qemu-m68k");
        let read = || parse_entry(&std::fs::read_to_string(&entry).unwrap());
        // Not registered: ensure registers it from qemu-user-static's file.
        std::fs::write(&entry, "-1").unwrap();
        assert!(!entry.exists());
        ensure("m68k").unwrap();
        let e = read();
        assert!(e.enabled && e.flags.contains('F'), "{e:?}");
        assert_eq!(e.interpreter, "/usr/libexec/qemu-binfmt/m68k-binfmt-P");
        // Disabled: ensure enables it.
        std::fs::write(&entry, "0").unwrap();
        assert!(!read().enabled);
        ensure("m68k").unwrap();
        assert!(read().enabled);
        // Native: nothing to do.
        ensure("i386").unwrap();
    }
}

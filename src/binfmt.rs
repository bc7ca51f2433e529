//! Running foreign-architecture programs through qemu-user-static: the kernel's
//! binfmt_misc handlers, registered from the files qemu-user-static installs.
//!
//! Registrations are global to the host and are left in place after the build, as
//! systemd-binfmt would leave them (another build may be using them).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd::Cmd;

/// Where the kernel's binfmt_misc filesystem is mounted.
pub const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";
/// Where qemu-user-static puts its binfmt.d(5) files.
pub const BINFMT_D: &str = "/usr/lib/binfmt.d";

/// qemu's name for a Debian architecture.
pub fn qemu_arch(debian_arch: &str) -> Option<&'static str> {
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
        _ => return None,
    })
}

/// Whether a host of architecture `host` runs `target` binaries without emulation.
pub fn runs_natively(host: &str, target: &str) -> bool {
    host == target || matches!((host, target), ("amd64", "i386") | ("arm64", "armhf"))
}

/// The binfmt.d file of qemu's handler for `qarch`, and the name it registers.
pub fn handler_file(qarch: &str) -> (PathBuf, String) {
    let name = format!("qemu-{qarch}");
    (Path::new(BINFMT_D).join(format!("{name}.conf")), name)
}

/// The registration line of a binfmt.d file: its first line that is not a comment.
pub fn registration(conf: &str) -> Option<&str> {
    conf.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
}

/// Make sure the kernel runs `debian_arch` binaries, with qemu-user-static's handler
/// if the host cannot run them itself. Mounts binfmt_misc (in the build's own mount
/// namespace) when it is not mounted.
pub fn ensure(host_arch: &str, debian_arch: &str) -> Result<()> {
    if runs_natively(host_arch, debian_arch) {
        return Ok(());
    }
    let Some(qarch) = qemu_arch(debian_arch) else {
        bail!("no qemu-user-static emulator is known for architecture '{debian_arch}'");
    };
    let dir = Path::new(BINFMT_DIR);
    if !dir.join("register").exists() {
        Cmd::new("mount")
            .args(["-t", "binfmt_misc", "binfmt_misc", BINFMT_DIR])
            .run()
            .context("mounting binfmt_misc (is the binfmt_misc kernel module available?)")?;
    }
    let (conf, name) = handler_file(qarch);
    if dir.join(&name).exists() {
        let status = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        if status.lines().next() == Some("enabled") {
            return Ok(());
        }
        std::fs::write(dir.join(&name), "1")
            .with_context(|| format!("enabling binfmt_misc handler {name}"))?;
        return Ok(());
    }
    let text = std::fs::read_to_string(&conf).with_context(|| {
        format!(
            "reading {}: install qemu-user-static to build for {debian_arch}",
            conf.display()
        )
    })?;
    let line = registration(&text)
        .with_context(|| format!("{} has no registration line", conf.display()))?;
    std::fs::write(dir.join("register"), line)
        .with_context(|| format!("registering binfmt_misc handler {name}"))?;
    crate::log::verbose(&format!("  registered binfmt_misc handler {name}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures() {
        assert_eq!(qemu_arch("arm64"), Some("aarch64"));
        assert_eq!(qemu_arch("armhf"), Some("arm"));
        assert_eq!(qemu_arch("ppc64el"), Some("ppc64le"));
        assert_eq!(qemu_arch("vax"), None);
        assert!(runs_natively("amd64", "i386"));
        assert!(runs_natively("amd64", "amd64"));
        assert!(!runs_natively("amd64", "arm64"));
        assert_eq!(
            handler_file("aarch64"),
            (
                PathBuf::from("/usr/lib/binfmt.d/qemu-aarch64.conf"),
                "qemu-aarch64".to_string()
            )
        );
    }

    #[test]
    fn registration_line_skips_comments() {
        assert_eq!(
            registration(
                "# qemu\n\n:qemu-arm:M::\\x7fELF:\\xff:/usr/libexec/qemu-binfmt/arm-binfmt-P:OCF\n"
            ),
            Some(":qemu-arm:M::\\x7fELF:\\xff:/usr/libexec/qemu-binfmt/arm-binfmt-P:OCF")
        );
        assert_eq!(registration("# nothing\n"), None);
    }
}

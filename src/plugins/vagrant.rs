//! `vagrant: TAG`: make the image a Vagrant base box: the vagrant user with Vagrant's
//! insecure public keys, password-less sudo, sshd enabled, DHCP on the network.

use std::path::Path;

use anyhow::{Result, bail};

use crate::distro::chroot as image;
use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::cmd::Cmd;
use crate::host::image_root::ImageRoot;

pub struct Vagrant;

static SPEC: StepSpec = StepSpec {
    name: "vagrant",
    value: Kind::Str,
    value_doc: "tag of the image's mounted root filesystem.",
    keys: &[
        Key::opt("user", Kind::Str, "the user name.").default("vagrant"),
        Key::opt(
            "password",
            Kind::Str,
            "the user's password (Vagrant's convention); no newline or `:`.",
        )
        .default("vagrant"),
        Key::opt(
            "network",
            Kind::Bool,
            "configure DHCP with systemd-networkd.",
        )
        .default("true"),
        Key::opt(
            "new-host-keys",
            Kind::Bool,
            "each machine makes its own SSH host keys at first boot.",
        )
        .default("true"),
    ],
    summary: "Makes the image a Vagrant base box, as Vagrant expects one: a user (`vagrant`) \
        that logs in with Vagrant's well-known insecure SSH keys, password-less sudo \
        for that user, the SSH server enabled, and DHCP on the network.",
    cache: CacheRole::Volatile,
    always_saved: false,
};

const OWNER: &str = "vagrant";

/// Vagrant's well-known insecure public keys (published by the Vagrant project; Vagrant
/// replaces them with a machine's own key on first `vagrant up`).
pub const INSECURE_KEYS: &str = "\
                                 ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEFHzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8HfdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NOTd0jMZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9WhQ== vagrant insecure public key
ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN1YdxBpNlzxDqfJyw/QKow1F+wvG9hXGoqiysfJOn5Y vagrant insecure public key
";

/// The packages a base box needs, which this step does not install.
pub const NEEDED: &[&str] = &["openssh-server", "sudo"];

pub const NETWORK_FILE: &str = "etc/systemd/network/80-vagrant-dhcp.network";
const NETWORK: &str = "\
                       # Written by vmdb's vagrant step: DHCP on every Ethernet interface.
[Match]
Name=en* eth*

[Network]
DHCP=yes
";

pub const HOST_KEYS_DROPIN: &str = "etc/systemd/system/ssh.service.d/vmdb-host-keys.conf";
const HOST_KEYS: &str = "\
                         # Written by vmdb's vagrant step: make the host keys at first start.
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
";

/// Which of `NEEDED` the image's dpkg database does not list as installed.
pub fn missing_packages(root: &Path) -> Result<Vec<&'static str>> {
    // Where the image's dpkg database is, inside the image (not through its links).
    let img = ImageRoot::open(root)?;
    let admindir = match img.is_dir("/var/lib/dpkg")? {
        true => img.host_path("/var/lib/dpkg")?,
        false => return Ok(NEEDED.to_vec()),
    };
    let mut missing = Vec::new();
    for p in NEEDED {
        let status = Cmd::new("dpkg-query")
            .arg(format!("--admindir={}", admindir.display()))
            .args(["-W", "-f", "${db:Status-Abbrev}", p])
            .run()
            .unwrap_or_default();
        if status.trim() != "ii" {
            missing.push(*p);
        }
    }
    Ok(missing)
}

pub fn sudoers(user: &str) -> String {
    format!(
        "# Written by vmdb's vagrant step.\nDefaults:{user} !requiretty\n{user} ALL=(ALL) NOPASSWD: ALL\n"
    )
}

/// Write a file of the box's configuration in the image (a symbolic link there is
/// replaced, not followed).
fn write_mode(img: &ImageRoot, path: &str, text: &str, mode: u32) -> Result<()> {
    img.write_file(path, &mut text.as_bytes(), mode, None)
}

fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 32
        && u.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && !u.starts_with('-')
}

impl Plugin for Vagrant {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let tag = c.step.arg().to_string();
        image::check_mounted_tag(c, "vagrant", &tag);
        image::needs_chroot(c);
        c.needs("vagrant", "dpkg-query", "dpkg");
        let user = c.step.opt_str("user").unwrap_or("vagrant").to_string();
        if !valid_user(&user) {
            c.err(
                "user",
                format!("'{user}' is not a user name (lower-case letters, digits, _ and -)"),
            );
        }
        if c.step
            .opt_str("password")
            .is_some_and(|p| p.contains(['\n', ':']))
        {
            c.err("password", "the password must not contain a newline or ':'");
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let root = image::tag_dir(b, step.arg())?;
        let user = step.opt_str("user").unwrap_or("vagrant").to_string();
        let password = step.opt_str("password").unwrap_or("vagrant").to_string();
        let missing = missing_packages(&root)?;
        if !missing.is_empty() {
            bail!(
                "a Vagrant box needs {} installed in the image: add them to an apt step \
                 before this one (apt: install, packages: [{}])",
                missing.join(" and "),
                NEEDED.join(", ")
            );
        }
        image::enter(b, &root, OWNER)?;
        let run = |argv: &[&str]| image::command(&root, argv).run();
        if run(&["getent", "passwd", &user]).is_err() {
            run(&[
                "useradd",
                "--create-home",
                "--user-group",
                "--shell",
                "/bin/bash",
                &user,
            ])?;
        }
        image::command(&root, &["chpasswd"])
            .stdin(format!("{user}:{password}\n"))
            .run()?;
        let home = run(&["getent", "passwd", &user])?
            .trim()
            .split(':')
            .nth(5)
            .unwrap_or_default()
            .to_string();
        if !home.starts_with('/') {
            bail!("user {user} has no home directory");
        }
        let img = ImageRoot::open(&root)?;
        let ssh = format!("{home}/.ssh");
        img.create_dir_all(&ssh, 0o700)?;
        write_mode(
            &img,
            &format!("{ssh}/authorized_keys"),
            INSECURE_KEYS,
            0o600,
        )?;
        run(&["chmod", "0700", &ssh])?;
        run(&["chown", "-R", &format!("{user}:{user}"), &ssh])?;
        write_mode(
            &img,
            &format!("/etc/sudoers.d/{user}"),
            &sudoers(&user),
            0o440,
        )?;
        run(&[
            "visudo",
            "-c",
            "-q",
            "-f",
            &format!("/etc/sudoers.d/{user}"),
        ])?;
        // Vagrant connects by address: no reverse lookup that stalls without DNS.
        write_mode(
            &img,
            "/etc/ssh/sshd_config.d/vagrant.conf",
            "# Written by vmdb's vagrant step.\nUseDNS no\n",
            0o644,
        )?;
        if step.bool("new-host-keys") {
            for e in img.read_dir("/etc/ssh")?.unwrap_or_default() {
                let n = e.name.to_string_lossy();
                if n.starts_with("ssh_host_") && n.contains("_key") {
                    img.remove_file(format!("/etc/ssh/{n}"))?;
                }
            }
            write_mode(&img, HOST_KEYS_DROPIN, HOST_KEYS, 0o644)?;
        }
        run(&["systemctl", "enable", "ssh.service"])?;
        if step.bool("network") {
            write_mode(&img, NETWORK_FILE, NETWORK, 0o644)?;
            run(&["systemctl", "enable", "systemd-networkd.service"])?;
        }
        image::finish(b, &root, OWNER)
    }

    fn teardown(&self, _step: &Step, b: &mut Build) -> Result<()> {
        image::leave(b, OWNER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::specs as testing;

    #[test]
    fn keys_and_checks() {
        let s = testing::step("steps:\n  - vagrant: /\n");
        assert_eq!(s.opt_str("user"), Some("vagrant"));
        assert_eq!(s.opt_str("password"), Some("vagrant"));
        assert!(s.bool("network") && s.bool("new-host-keys"));
        assert_eq!(
            testing::errors("steps:\n  - vagrant: /\n    user: Bad User\n"),
            ["'Bad User' is not a user name (lower-case letters, digits, _ and -)"]
        );
        assert_eq!(
            testing::errors("steps:\n  - vagrant: /\n    password: 'a:b'\n"),
            ["the password must not contain a newline or ':'"]
        );
    }

    #[test]
    fn insecure_keys_are_vagrants() {
        let lines: Vec<&str> = INSECURE_KEYS.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8"));
        assert!(lines[1].starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN1Ydx"));
        assert_eq!(
            sudoers("vagrant"),
            "# Written by vmdb's vagrant step.\nDefaults:vagrant !requiretty\nvagrant ALL=(ALL) NOPASSWD: ALL\n"
        );
    }
}

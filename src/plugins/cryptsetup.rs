//! `cryptsetup: TAG`: encrypt a partition with LUKS2 and open it; the opened mapping
//! (/dev/mapper/NAME) becomes a new tag for mkfs, vgcreate and mount. Needs
//! device-mapper on the host.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::engine::build::Build;
use crate::engine::plan::PlanTag;
use crate::engine::state::{Notes, Tag};
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::cmd::Cmd;
use crate::plugins::devmapper;
use crate::plugins::shell::SH;

pub struct Cryptsetup;

static SPEC: StepSpec = StepSpec {
    name: "cryptsetup",
    value: Kind::Str,
    value_doc: "tag of the partition or volume to encrypt",
    keys: &[
        Key::req(
            "tag",
            Kind::Str,
            "tag of the opened device, also its device-mapper name (letters, digits, \
                `-`, `_`, `.`, `+`); `name` is accepted for it (vmdb2's other \
                cryptsetup step)",
        )
        .aliases(&["name"]),
        Key::opt(
            "key-file",
            Kind::Str,
            "file holding the passphrase, relative to the spec file; this or `key-cmd` \
                is required",
        ),
        Key::opt(
            "key-cmd",
            Kind::Str,
            "shell command (`sh -ec`) whose first line of output is the passphrase; \
                vmdb writes it to a file only root can read in its scratch space; \
                this or `key-file` is required",
        ),
    ],
    summary: "Encrypts a partition (or a logical volume) with LUKS2 and opens it; the opened \
        device, `/dev/mapper/NAME`, becomes a new tag that later steps use like a \
        partition (`mkfs`, `vgcreate`, `mount`).",
    cache: CacheRole::Setup,
    always_saved: false,
};

/// `cryptsetup luksFormat`'s command line.
pub fn format_argv(dev: &Path, key_file: &Path) -> Vec<String> {
    let mut v: Vec<String> = ["cryptsetup", "-q", "luksFormat", "--type", "luks2"]
        .map(String::from)
        .to_vec();
    v.push(dev.display().to_string());
    v.push(key_file.display().to_string());
    v
}

/// `cryptsetup open`'s command line.
pub fn open_argv(dev: &Path, key_file: &Path, name: &str) -> Vec<String> {
    vec![
        "cryptsetup".into(),
        "open".into(),
        "--type".into(),
        "luks2".into(),
        "--key-file".into(),
        key_file.display().to_string(),
        dev.display().to_string(),
        name.into(),
    ]
}

/// `cryptsetup close`'s command line (the teardown).
pub fn close_argv(name: &str) -> Vec<String> {
    vec!["cryptsetup".into(), "close".into(), name.into()]
}

/// The teardown's command, if the step opened its mapping.
pub fn teardown_argv(step: &Step, notes: &Notes) -> Option<Vec<String>> {
    let name = step.opt_str("tag")?;
    notes
        .contains(&devmapper::Active::Luks(name.to_string()))
        .then(|| close_argv(name))
}

/// A device-mapper name: what `cryptsetup open` and /dev/mapper accept.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 127
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
}

fn run_cmd(argv: &[String]) -> Result<String> {
    Cmd::new(&argv[0]).args(&argv[1..]).run()
}

impl Plugin for Cryptsetup {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn shell_keys(&self) -> &'static [&'static str] {
        &["key-cmd"]
    }

    fn check(&self, c: &mut Check) {
        devmapper::check_host(c);
        c.needs("cryptsetup", "cryptsetup", "cryptsetup-bin");
        if c.step.has("key-cmd") {
            c.needs("key-cmd", SH.0, SH.1);
        }
        let under = c.step.arg().to_string();
        c.use_tag("cryptsetup", &under);
        match (c.step.opt_str("key-file"), c.step.has("key-cmd")) {
            (None, false) => c.err(
                "cryptsetup",
                "give the passphrase with 'key-file' or 'key-cmd'",
            ),
            (Some(_), true) => c.err("key-cmd", "give either 'key-file' or 'key-cmd', not both"),
            (Some(f), false) => {
                if !c.plan.spec_dir.path(f).is_file() {
                    let f = f.to_string();
                    c.err(
                        "key-file",
                        format!(
                            "'{f}' is not a file (relative paths are relative to the spec file)"
                        ),
                    );
                }
            }
            (None, true) => {}
        }
        let Some(name) = c.step.opt_str("tag").map(str::to_string) else {
            return;
        };
        if !valid_name(&name) {
            c.err(
                "tag",
                format!("'{name}' cannot be a device-mapper name: use letters, digits, '-', '_', '.' and '+'"),
            );
        }
        let t = PlanTag {
            step: c.step.index,
            ..PlanTag::default()
        };
        if let Err(e) = c.plan.define_tag(&name, t) {
            c.err("tag", e);
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let name = step.str("tag")?.to_string();
        let dev = devmapper::device(b, step.arg())?;
        let key: PathBuf = match step.opt_str("key-file") {
            Some(f) => b.opts.spec_dir.path(f),
            None => {
                let out = Cmd::new(SH.0).arg("-ec").arg(step.str("key-cmd")?).run()?;
                let Some(line) = out.lines().next().filter(|l| !l.is_empty()) else {
                    bail!("key-cmd printed no passphrase");
                };
                let f = b.scratch_dir("luks-")?.join("key");
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&f)
                    .and_then(|mut h| h.write_all(line.as_bytes()))
                    .with_context(|| format!("writing {}", f.display()))?;
                f
            }
        };
        run_cmd(&format_argv(&dev, &key))?;
        b.state
            .notes
            .insert(devmapper::Active::Luks(name.to_string()));
        run_cmd(&open_argv(&dev, &key, &name))?;
        let mapped = PathBuf::from("/dev/mapper").join(&name);
        b.state.add_tag(Tag {
            name: name.clone(),
            device: Some(mapped),
            ..Tag::default()
        })?;
        Ok(())
    }

    fn teardown(&self, step: &Step, b: &mut Build) -> Result<()> {
        if let Some(argv) = teardown_argv(step, &b.state.notes) {
            // Gone with the namespace's last user if the open itself failed.
            if Path::new("/dev/mapper").join(&argv[2]).exists() {
                run_cmd(&argv)?;
            }
            b.state
                .notes
                .remove(&devmapper::Active::Luks(argv[2].to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{plan_with_root, step_errors, validate_step};

    fn dm_plan(dir: &Path) -> crate::engine::plan::Plan {
        let mut p = plan_with_root();
        p.host_has_device_mapper = true;
        p.spec_dir = dir.into();
        p
    }

    #[test]
    fn command_lines() {
        let (dev, key) = (Path::new("/dev/loop3"), Path::new("/w/key"));
        assert_eq!(
            format_argv(dev, key),
            [
                "cryptsetup",
                "-q",
                "luksFormat",
                "--type",
                "luks2",
                "/dev/loop3",
                "/w/key"
            ]
        );
        assert_eq!(
            open_argv(dev, key, "root_crypt"),
            [
                "cryptsetup",
                "open",
                "--type",
                "luks2",
                "--key-file",
                "/w/key",
                "/dev/loop3",
                "root_crypt"
            ]
        );
        assert_eq!(
            close_argv("root_crypt"),
            ["cryptsetup", "close", "root_crypt"]
        );
    }

    #[test]
    fn no_device_mapper_is_a_validation_error() {
        let mut plan = plan_with_root();
        plan.host_has_device_mapper = false;
        assert_eq!(
            step_errors("cryptsetup: /\ntag: crypt\nkey-cmd: echo secret", &mut plan),
            [
                "spec:1:13: step 1 (cryptsetup): key 'cryptsetup': this host has no device-mapper (no 'device-mapper' in /proc/misc), which 'cryptsetup' needs: build this spec on a host with the dm_mod kernel module loaded"
            ]
        );
    }

    #[test]
    fn key_and_tag_checks() {
        let d = tempfile::tempdir().unwrap();
        let s = validate_step(
            "cryptsetup: /\nname: crypt\nkey-cmd: echo x",
            &mut dm_plan(d.path()),
        )
        .unwrap();
        assert_eq!(s.opt_str("tag"), Some("crypt"));
        assert_eq!(
            step_errors("cryptsetup: /\ntag: crypt", &mut dm_plan(d.path())),
            [
                "spec:1:13: step 1 (cryptsetup): key 'cryptsetup': give the passphrase with 'key-file' or 'key-cmd'"
            ]
        );
        assert_eq!(
            step_errors(
                "cryptsetup: nope\ntag: a/b\nkey-file: k\nkey-cmd: echo x",
                &mut dm_plan(d.path())
            ),
            [
                "spec:1:13: step 1 (cryptsetup): key 'cryptsetup': tag 'nope' is not defined by an earlier step (defined so far: '/')",
                "spec:2:6: step 1 (cryptsetup): key 'tag': 'a/b' cannot be a device-mapper name: use letters, digits, '-', '_', '.' and '+'",
                "spec:4:10: step 1 (cryptsetup): key 'key-cmd': give either 'key-file' or 'key-cmd', not both",
            ]
        );
        assert_eq!(
            step_errors(
                "cryptsetup: /\ntag: c\nkey-file: nokey",
                &mut dm_plan(d.path())
            ),
            [
                "spec:3:11: step 1 (cryptsetup): key 'key-file': 'nokey' is not a file (relative paths are relative to the spec file)"
            ]
        );
    }
}

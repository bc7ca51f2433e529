//! `ansible: TAG`: run an Ansible playbook against the image, with Ansible's chroot
//! connection to the directory where the tag's filesystem is mounted.
//!
//! The inventory lists that directory as the only host of the group (`image` unless
//! `group` says otherwise); `extra_vars` and `rootfs_tarball` (the build's
//! `--rootfs-tarball`, empty if none) are passed as extra variables from a file. The
//! image needs python3. The virtual filesystems and a policy-rc.d are in place while
//! the playbook runs, as for a chroot step.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use crate::distro::chroot;
use crate::engine::build::Build;
use crate::engine::cachekey::CacheInputs;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::cmd::Cmd;

pub struct Ansible;

static SPEC: StepSpec = StepSpec {
    name: "ansible",
    value: Kind::Str,
    value_doc: "tag of the image's root filesystem; an earlier step must mount it",
    keys: &[
        Key::req(
            "playbook",
            Kind::Str,
            "the playbook file, relative to the spec file; validation checks that it \
                exists",
        ),
        Key::opt(
            "group",
            Kind::Str,
            "the inventory group the image is in (the playbook's `hosts:`)",
        )
        .default("image"),
        Key::opt(
            "tags",
            Kind::List,
            "run only tasks with these Ansible tags (`--tags a,b`); a string or a list",
        )
        .default("all"),
        Key::opt(
            "config_file",
            Kind::Str,
            "an `ansible.cfg`, relative to the spec file, given as `ANSIBLE_CONFIG`; \
                validation checks that it exists",
        ),
        Key::opt(
            "extra_vars",
            Kind::Map,
            "a mapping of variable names to strings, passed with `-e`, with \
                `rootfs_tarball` added",
        ),
    ],
    summary: "Runs an Ansible playbook against the image with Ansible's `chroot` connection: \
        the image's root filesystem, mounted where the tag is, is the only host of \
        the inventory.",
    cache: CacheRole::Tree,
    always_saved: true,
};

/// Owner of the virtual filesystems mounted for the step's duration.
const OWNER: &str = "ansible";

/// The inventory: the image's directory as the only host of `group`.
pub fn inventory(group: &str, root: &Path) -> String {
    format!("[{group}]\n{}\n", root.display())
}

/// The extra variables, as a JSON object (a YAML file Ansible reads with `-e @FILE`):
/// the step's `extra_vars`, and `rootfs_tarball`.
pub fn vars_file(extra: &BTreeMap<String, String>, rootfs_tarball: Option<&Path>) -> String {
    let mut vars: serde_json::Map<String, serde_json::Value> = extra
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    vars.insert(
        "rootfs_tarball".into(),
        serde_json::Value::String(
            rootfs_tarball
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ),
    );
    serde_json::Value::Object(vars).to_string()
}

/// The program that runs the playbook.
const PLAYBOOK: &str = "ansible-playbook";

/// ansible-playbook's command line.
pub fn argv(inventory: &Path, tags: &[String], vars: &Path, playbook: &Path) -> Vec<String> {
    let mut v: Vec<String> = vec![
        PLAYBOOK.into(),
        "-c".into(),
        "chroot".into(),
        "-i".into(),
        inventory.display().to_string(),
    ];
    if !tags.is_empty() {
        v.push("--tags".into());
        v.push(tags.join(","));
    }
    v.push("-e".into());
    v.push(format!("@{}", vars.display()));
    v.push(playbook.display().to_string());
    v
}

impl Plugin for Ansible {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let tag = c.step.arg().to_string();
        chroot::check_mounted_tag(c, "ansible", &tag);
        c.needs("ansible", PLAYBOOK, "ansible");
        // Ansible's chroot connection runs it.
        chroot::needs_chroot(c);
        for key in ["playbook", "config_file"] {
            if let Some(p) = c.step.opt_str(key) {
                if !c.plan.spec_dir.path(p).is_file() {
                    let p = p.to_string();
                    c.err(
                        key,
                        format!(
                            "'{p}' is not a file (relative paths are relative to the spec file)"
                        ),
                    );
                }
            }
        }
        if let Some(g) = c.step.opt_str("group") {
            if g.is_empty() || g.contains([' ', '[', ']', ':']) {
                let g = g.to_string();
                c.err("group", format!("'{g}' is not an inventory group name"));
            }
        }
    }

    /// The playbook's directory (roles, vars and templates beside it), and the archives
    /// of the image's sources, which its tasks may install packages from.
    fn cache_inputs(&self, step: &Step, inputs: &mut CacheInputs) -> Result<()> {
        if let Some(pb) = step.opt_str("playbook") {
            let dir = Path::new(pb).parent().unwrap_or(Path::new(""));
            let name = match dir.display().to_string() {
                d if d.is_empty() => ".".to_string(),
                d => d,
            };
            let path = inputs.opts().spec_dir.path(dir);
            inputs.file_at(&name, &path)?;
        }
        inputs.fetches_from_sources();
        Ok(())
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let root = chroot::tag_dir(b, step.arg())?;
        let dir = b.scratch_dir("ansible-")?;
        let inv = dir.join("inventory");
        std::fs::write(&inv, inventory(step.str("group")?, &root))
            .with_context(|| format!("writing {}", inv.display()))?;
        let vars = dir.join("vars.json");
        let tarball = b.opts.rootfs_tarball.clone();
        std::fs::write(
            &vars,
            vars_file(&step.map("extra_vars"), tarball.as_deref()),
        )
        .with_context(|| format!("writing {}", vars.display()))?;
        let playbook = b.opts.spec_dir.path(step.str("playbook")?);
        let argv = argv(&inv, &step.list("tags"), &vars, &playbook);
        // Ansible runs on the host, but its chroot connection passes its environment
        // on to the modules it runs in the image: the image's, with the UTF-8 locale
        // Ansible insists on (the host has it).
        let mut cmd = chroot::with_image_env(Cmd::new(&argv[0]).args(&argv[1..]), &root)
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .cwd(b.opts.spec_dir.dir())
            .env("ANSIBLE_NOCOWS", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env("ANSIBLE_HOME", dir.join("home"))
            .env("ANSIBLE_LOCAL_TEMP", dir.join("tmp"));
        if let Some(cfg) = step.opt_str("config_file") {
            cmd = cmd.env("ANSIBLE_CONFIG", b.opts.spec_dir.path(cfg));
        }
        chroot::enter(b, &root, OWNER)?;
        cmd.run()?;
        chroot::finish(b, &root, OWNER)
    }

    fn teardown(&self, _step: &Step, b: &mut Build) -> Result<()> {
        // Only what a run that failed half-way left behind.
        chroot::leave(b, OWNER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::Plan;
    use crate::plugins::testing::{plan_with_root, step_errors, validate_step};

    fn plan_in(dir: &Path) -> Plan {
        let mut p = plan_with_root();
        p.spec_dir = dir.into();
        p
    }

    #[test]
    fn command_line_and_files() {
        assert_eq!(
            argv(
                Path::new("/w/inventory"),
                &["all".into()],
                Path::new("/w/vars.json"),
                Path::new("/spec/site.yml")
            ),
            [
                "ansible-playbook",
                "-c",
                "chroot",
                "-i",
                "/w/inventory",
                "--tags",
                "all",
                "-e",
                "@/w/vars.json",
                "/spec/site.yml"
            ]
        );
        assert_eq!(
            argv(
                Path::new("i"),
                &["a".into(), "b".into()],
                Path::new("v"),
                Path::new("p")
            )[5..7],
            ["--tags", "a,b"]
        );
        assert_eq!(
            inventory("image", Path::new("/tmp/vmdb-x/mnt-1")),
            "[image]\n/tmp/vmdb-x/mnt-1\n"
        );
        let mut extra = BTreeMap::new();
        extra.insert("hostname".to_string(), "pc \"one\"".to_string());
        assert_eq!(
            vars_file(&extra, Some(Path::new("/c/rootfs.tar.zst"))),
            r#"{"hostname":"pc \"one\"","rootfs_tarball":"/c/rootfs.tar.zst"}"#
        );
        assert_eq!(
            vars_file(&BTreeMap::new(), None),
            r#"{"rootfs_tarball":""}"#
        );
    }

    #[test]
    fn defaults_and_checks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("site.yml"), "").unwrap();
        let s = validate_step(
            "ansible: /\nplaybook: site.yml\nextra_vars:\n  a: \"1\"\n  b: x",
            &mut plan_in(d.path()),
        )
        .unwrap();
        assert_eq!(s.opt_str("group"), Some("image"));
        assert_eq!(s.list("tags"), ["all"]);
        assert_eq!(s.map("extra_vars").get("b").map(String::as_str), Some("x"));
        assert_eq!(
            step_errors(
                "ansible: nope\nplaybook: missing.yml\nconfig_file: no.cfg\ngroup: \"a b\"",
                &mut plan_in(d.path())
            ),
            [
                "spec:1:10: step 1 (ansible): key 'ansible': tag 'nope' is not defined by an earlier step (defined so far: '/')",
                "spec:2:11: step 1 (ansible): key 'playbook': 'missing.yml' is not a file (relative paths are relative to the spec file)",
                "spec:3:14: step 1 (ansible): key 'config_file': 'no.cfg' is not a file (relative paths are relative to the spec file)",
                "spec:4:8: step 1 (ansible): key 'group': 'a b' is not an inventory group name",
            ]
        );
    }
}

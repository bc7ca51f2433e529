//! Helpers for plugin unit tests: typed steps from YAML, validated as a real spec
//! would be, and a build with a root filesystem.

use crate::engine::build::{Build, Options};
use crate::engine::plan::{Filesystem, Plan, PlanTag};
use crate::engine::spec::Diag;
use crate::engine::state::Tag;
use crate::engine::step::Step;
use crate::engine::template::Renderer;
use crate::engine::validate::validate;

/// A plan in which an earlier step has mounted tag "/" at the image's root.
pub(crate) fn plan_with_root() -> Plan {
    let mut plan = Plan::default();
    plan.define_tag(
        "/",
        PlanTag {
            step: 0,
            filesystem: Filesystem::Made("ext4".into()),
            mounted: true,
            ..PlanTag::default()
        },
    )
    .expect("a fresh plan");
    plan
}

/// Validate one step written as YAML (a mapping such as "create-dir: /x\nperm: 0700")
/// against `plan`, with no template variables. Returns the typed step or every problem.
pub(crate) fn validate_step(yaml: &str, plan: &mut Plan) -> Result<Step, Vec<Diag>> {
    let node = crate::engine::spec::parse_yaml(yaml).map_err(|d| vec![d])?;
    let renderer = Renderer::new(Default::default());
    let mut steps = validate(&[node], &renderer, super::ALL, plan)?;
    Ok(steps.remove(0))
}

/// The problems validation finds in one step, checked against `plan`, as shown to
/// the user for a spec file named "spec" (file:line:col: step: key: message).
pub(crate) fn step_errors(yaml: &str, plan: &mut Plan) -> Vec<String> {
    match validate_step(yaml, plan) {
        Ok(s) => panic!("expected validation to fail, got {s:?}"),
        Err(diags) => diags.iter().map(|d| d.render("spec")).collect(),
    }
}

/// A typed step from YAML, validated with tag "/" mounted; panics on any problem.
pub(crate) fn test_step(yaml: &str) -> Step {
    validate_step(yaml, &mut plan_with_root()).unwrap_or_else(|diags| {
        let msgs: Vec<String> = diags.iter().map(|d| d.render("<test>")).collect();
        panic!("step does not validate:\n{}", msgs.join("\n"))
    })
}

/// A build whose state has tag "/" mounted (target "/") at a fresh temporary
/// directory, which is returned too: `b.state.root_dir()` is its path.
pub(crate) fn test_build_with_root() -> (Build, tempfile::TempDir) {
    let root = tempfile::Builder::new()
        .prefix("vmdb-test-root-")
        .tempdir()
        .expect("a temporary directory");
    let mut b = Build::new(Options::default()).expect("a build");
    b.state
        .add_tag(Tag {
            name: "/".into(),
            fs_type: Some("ext4".into()),
            mount_point: Some(root.path().to_path_buf()),
            target: Some("/".into()),
            ..Tag::default()
        })
        .expect("a fresh state");
    (b, root)
}

/// Tests that change file owners need root; they call this and return early if false.
pub(crate) fn is_root(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        println!("{test}: skipped (needs root)");
    }
    root
}

/// Validate a spec's steps (YAML list items without the leading "- "), with a plan in
/// which a filesystem is mounted at "/" under the tag "/".
pub fn steps(yaml_steps: &[&str]) -> Result<Vec<Step>, Vec<String>> {
    let mut text = String::from("steps:\n");
    for s in yaml_steps {
        for (i, line) in s.lines().enumerate() {
            text.push_str(if i == 0 { "  - " } else { "    " });
            text.push_str(line);
            text.push('\n');
        }
    }
    let raw = crate::engine::spec::load(&text)
        .map_err(|d| d.iter().map(|d| d.msg.clone()).collect::<Vec<_>>())?;
    let mut plan = Plan::default();
    plan.tags.insert(
        "/".into(),
        PlanTag {
            step: 0,
            mounted: true,
            filesystem: Filesystem::Made("ext4".into()),
            ..PlanTag::default()
        },
    );
    validate(
        &raw.steps,
        &Renderer::new(Default::default()),
        super::ALL,
        &mut plan,
    )
    .map_err(|d| {
        d.iter()
            .map(|d| match &d.key {
                Some(k) => format!("key '{k}': {}", d.msg),
                None => d.msg.clone(),
            })
            .collect()
    })
}

/// The validation errors of one step ("key 'x': message"), or none.
pub fn check_errors(yaml_step: &str) -> Vec<String> {
    steps(&[yaml_step]).err().unwrap_or_default()
}

/// Validate and run one step in a fresh build; returns the build for inspection.
pub fn run_step(yaml_step: &str) -> anyhow::Result<Build> {
    let s = steps(&[yaml_step]).map_err(|e| anyhow::anyhow!(e.join("; ")))?;
    let mut b = Build::new(Options::default())?;
    let p = crate::engine::step::find(super::ALL, s[0].kind).unwrap();
    p.run(&s[0], &mut b)?;
    Ok(b)
}

/// A directory on the host that hostile links in a test image point at: no step may
/// write, create or remove anything in it. It starts with one file ("file": "host").
pub(crate) struct Canary {
    _dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
}

impl Canary {
    pub(crate) fn new() -> Canary {
        // In /tmp whatever TMPDIR says: the canary's path, made inside test images too
        // (`inside`), must not lie below the links the tests plant there (var/tmp,
        // var/lock, ...), as it would with TMPDIR=/var/tmp/...
        let dir = tempfile::Builder::new()
            .prefix("vmdb-canary-")
            .tempdir_in("/tmp")
            .expect("a temporary directory");
        let path = std::fs::canonicalize(dir.path()).expect("a canonical path");
        std::fs::write(path.join("file"), "host").expect("writing the canary");
        Canary { _dir: dir, path }
    }

    /// The canary's path inside the image at `root` (made there): where an absolute
    /// link naming the canary leads for a program running in the image.
    pub(crate) fn inside(&self, root: &std::path::Path) -> std::path::PathBuf {
        let p = root.join(self.path.strip_prefix("/").expect("an absolute path"));
        std::fs::create_dir_all(&p).expect("making the canary's path in the image");
        p
    }

    /// A relative link target that climbs far above any root, then names the canary.
    pub(crate) fn escaping(&self) -> String {
        format!("{}{}", "../".repeat(30), self.path.display())
    }

    /// Everything below the canary: (relative path, contents of files).
    pub(crate) fn snapshot(&self) -> Vec<(std::path::PathBuf, Option<Vec<u8>>)> {
        fn walk(
            base: &std::path::Path,
            dir: &std::path::Path,
            out: &mut Vec<(std::path::PathBuf, Option<Vec<u8>>)>,
        ) {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .expect("reading the canary")
                .map(|e| e.expect("an entry").path())
                .collect();
            entries.sort();
            for p in entries {
                let rel = p
                    .strip_prefix(base)
                    .expect("below the canary")
                    .to_path_buf();
                let m = std::fs::symlink_metadata(&p).expect("an entry");
                if m.is_dir() {
                    out.push((rel, None));
                    walk(base, &p, out);
                } else {
                    out.push((rel, Some(std::fs::read(&p).unwrap_or_default())));
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.path, &self.path, &mut out);
        out
    }

    /// The canary holds its one file and nothing else.
    pub(crate) fn assert_untouched(&self) {
        assert_eq!(
            self.snapshot(),
            [("file".into(), Some(b"host".to_vec()))],
            "something was written on the host through a link in the image"
        );
    }
}

/// Make `link` (a path relative to the image's root) a symbolic link to `target`.
pub(crate) fn plant_link(root: &std::path::Path, link: &str, target: &str) {
    let l = root.join(link);
    std::fs::create_dir_all(l.parent().expect("a parent")).expect("making the link's parent");
    std::os::unix::fs::symlink(target, &l).expect("planting a link");
}

/// A step's `uid:` and `gid:` keys for the user running the tests (chown to oneself
/// works without root).
pub(crate) fn own_ids() -> String {
    format!(
        "uid: {}\ngid: {}",
        nix::unistd::geteuid(),
        nix::unistd::getegid()
    )
}

/// Whole specs (YAML with `steps:`) validated against a plan where "/" is mounted
/// and "unmounted" is not, and builds whose "/" is a directory.
pub(crate) mod specs {

    use std::collections::BTreeMap;

    use crate::engine::plan::{Plan, PlanTag};
    use crate::engine::spec::Diag;
    use crate::engine::step::Step;
    use crate::engine::template::Renderer;

    pub fn validate(yaml: &str) -> Result<Vec<Step>, Vec<Diag>> {
        let raw = crate::engine::spec::load(yaml)?;
        let renderer = Renderer::new(BTreeMap::new());
        let mut plan = Plan::default();
        plan.define_tag(
            "/",
            PlanTag {
                step: 0,
                mounted: true,
                ..PlanTag::default()
            },
        )
        .expect("a fresh plan");
        plan.define_tag(
            "unmounted",
            PlanTag {
                step: 0,
                ..PlanTag::default()
            },
        )
        .expect("a fresh plan");
        crate::engine::validate::validate(&raw.steps, &renderer, crate::plugins::ALL, &mut plan)
    }

    pub fn step(yaml: &str) -> Step {
        match validate(yaml) {
            Ok(mut s) => s.remove(0),
            Err(d) => panic!("{d:?}"),
        }
    }

    /// The messages of the problems found.
    pub fn errors(yaml: &str) -> Vec<String> {
        match validate(yaml) {
            Ok(_) => panic!("no error in {yaml}"),
            Err(d) => d.into_iter().map(|d| d.msg).collect(),
        }
    }

    /// A build whose "/" is the directory `root` (no disk).
    pub fn build(
        root: &std::path::Path,
        tarball: Option<&std::path::Path>,
    ) -> crate::engine::build::Build {
        let mut b = crate::engine::build::Build::new(crate::engine::build::Options {
            rootfs_tarball: tarball.map(|t| t.to_path_buf()),
            ..Default::default()
        })
        .expect("a build");
        b.state
            .add_tag(crate::engine::state::Tag {
                name: "/".into(),
                mount_point: Some(root.to_path_buf()),
                target: Some("/".into()),
                ..Default::default()
            })
            .expect("a fresh state");
        b
    }

    /// Test builds run in the host's mount namespace: whatever a failed test left
    /// mounted below the directory is detached before the directory is removed (it
    /// must be declared after the TempDir, to be dropped first).
    pub struct Unmounter(pub std::path::PathBuf);

    impl Drop for Unmounter {
        fn drop(&mut self) {
            for m in crate::host::mount::mounts_below(&self.0).unwrap_or_default() {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }

    pub fn is_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            true
        } else {
            eprintln!("skipped: needs root");
            false
        }
    }
}

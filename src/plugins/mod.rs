//! The step types, one file each. Order matters where a step could match two types:
//! the first plugin whose name is a key of the step wins (chroot before shell).

use crate::step::Plugin;

pub mod copy_dir;
pub mod copy_file;
pub mod create_dir;
pub mod create_file;
pub mod echo;
pub mod error;
pub mod shell;

pub static ALL: &[&dyn Plugin] = &[
    &echo::Echo,
    &error::Error,
    &create_file::CreateFile,
    &create_dir::CreateDir,
    &copy_file::CopyFile,
    &copy_dir::CopyDir,
    &shell::Shell,
];

#[cfg(test)]
pub(crate) use testing::{test_build_with_root, test_step};

/// Helpers for plugin unit tests: typed steps from YAML, and a build with a root filesystem.
#[cfg(test)]
pub(crate) mod testing {
    use crate::build::{Build, Options};
    use crate::plan::{Plan, PlanTag};
    use crate::spec::Diag;
    use crate::state::Tag;
    use crate::step::Step;
    use crate::template::Renderer;

    /// A plan in which an earlier step has mounted tag "/" at the image's root.
    pub(crate) fn plan_with_root() -> Plan {
        let mut plan = Plan::default();
        plan.define_tag(
            "/",
            PlanTag {
                step: 0,
                fs_type: Some("ext4".into()),
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
        let node = crate::spec::parse_yaml(yaml).map_err(|d| vec![d])?;
        let renderer = Renderer::new(Default::default());
        let mut steps = crate::step::validate(&[node], &renderer, super::ALL, plan)?;
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

    /// The example in each plugins/NAME.md page validates.
    #[test]
    fn documented_examples_validate() {
        let spec_dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(spec_dir.path().join("files")).unwrap();
        std::fs::create_dir_all(spec_dir.path().join("overlay/skel")).unwrap();
        std::fs::write(spec_dir.path().join("files/sources.list"), "").unwrap();
        let pages = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
        for name in [
            "create-file",
            "create-dir",
            "copy-file",
            "copy-dir",
            "shell",
        ] {
            let page = std::fs::read_to_string(pages.join(format!("{name}.md"))).unwrap();
            let start = page.find("```yaml\n").expect("an example") + 8;
            let end = start + page[start..].find("```").unwrap();
            let node = crate::spec::parse_yaml(&page[start..end]).unwrap();
            let crate::spec::Value::Seq(steps) = node.value else {
                panic!("{name}: the example is not a list of steps")
            };
            let mut plan = plan_with_root();
            plan.spec_dir = spec_dir.path().to_path_buf();
            let mounted = PlanTag {
                mounted: true,
                ..PlanTag::default()
            };
            plan.define_tag("root", mounted).unwrap();
            let renderer = Renderer::new(Default::default());
            let typed = crate::step::validate(&steps, &renderer, super::ALL, &mut plan)
                .unwrap_or_else(|d| panic!("{name}: {d:?}"));
            assert_eq!(typed[0].kind, name);
        }
    }
}

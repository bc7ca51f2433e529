//! Helpers for plugin unit tests: a step from YAML, validated as the real spec would be.

use crate::build::{Build, Options};
use crate::plan::{Plan, PlanTag};
use crate::step::{Step, validate};
use crate::template::Renderer;

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
    let raw = crate::spec::load(&text)
        .map_err(|d| d.iter().map(|d| d.msg.clone()).collect::<Vec<_>>())?;
    let mut plan = Plan::default();
    plan.tags.insert(
        "/".into(),
        PlanTag {
            step: 0,
            mounted: true,
            fs_type: Some("ext4".into()),
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
    let p = crate::step::find(super::ALL, s[0].kind).unwrap();
    p.run(&s[0], &mut b)?;
    Ok(b)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

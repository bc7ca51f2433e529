//! Every step type has a reference page in plugins/NAME.md that names each of its keys
//! and has an example that validates.

use std::path::Path;

use vmdb::engine::plan::{Filesystem, Plan, PlanTag};
use vmdb::engine::template::Renderer;
use vmdb::engine::validate::validate;

fn page(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("plugins")
        .join(format!("{name}.md"));
    std::fs::read_to_string(&p)
        .unwrap_or_else(|_| panic!("step type '{name}' has no page {}", p.display()))
}

fn example(name: &str, page: &str) -> String {
    let start = page
        .find("```yaml\n")
        .unwrap_or_else(|| panic!("plugins/{name}.md has no ```yaml example"))
        + 8;
    let end = start + page[start..].find("```").expect("closed example");
    page[start..end].to_string()
}

/// A plan in which earlier steps made and mounted "/" (ext4) and "efi" (vfat).
fn plan_with_disk(spec_dir: &Path) -> Plan {
    let mut plan = Plan {
        spec_dir: spec_dir.into(),
        // The device-mapper steps' examples are for hosts that have it.
        host_has_device_mapper: true,
        ..Plan::default()
    };
    for (tag, fs) in [("/", "ext4"), ("efi", "vfat")] {
        plan.define_tag(
            tag,
            PlanTag {
                step: 0,
                disk: Some("disk.img".into()),
                filesystem: Filesystem::Made(fs.into()),
                mounted: true,
            },
        )
        .unwrap();
    }
    plan
}

/// Where the table of a page's keys is: its lines, after "## Keys".
fn key_table(name: &str, page: &str) -> std::ops::Range<usize> {
    let start = page
        .find("\n## Keys\n\n")
        .unwrap_or_else(|| panic!("plugins/{name}.md has no '## Keys'"))
        + "\n## Keys\n\n".len();
    let len = page[start..]
        .split_inclusive('\n')
        .take_while(|l| l.starts_with('|'))
        .map(str::len)
        .sum::<usize>();
    start..start + len
}

/// The pages' key tables are generated from the registry (`StepSpec::keys_markdown`):
/// a page whose table differs from the code's fails. `VMDB_WRITE_PLUGIN_DOCS=1 cargo
/// test --test plugin_docs` writes the tables after a change in the code.
#[test]
fn every_page_has_its_step_types_key_table_and_summary() {
    let write = std::env::var_os("VMDB_WRITE_PLUGIN_DOCS").is_some();
    for p in vmdb::plugins::ALL {
        let spec = p.spec();
        let text = page(spec.name);
        assert!(
            text.starts_with(&format!("# {}\n\n", spec.name)),
            "plugins/{}.md: title",
            spec.name
        );
        // The summary is the page's first sentence.
        let first: String = text
            .lines()
            .skip(2)
            .take_while(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            first.starts_with(spec.summary),
            "plugins/{}.md begins otherwise than the code's summary:\n{}\n{first}",
            spec.name,
            spec.summary
        );
        let table = spec.keys_markdown();
        let at = key_table(spec.name, &text);
        if write && text[at.clone()] != table {
            let mut new = text.clone();
            new.replace_range(at.clone(), &table);
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("plugins")
                .join(format!("{}.md", spec.name));
            std::fs::write(path, new).unwrap();
            continue;
        }
        assert_eq!(
            text[at].to_string(),
            table,
            "plugins/{}.md: the key table is not the code's (VMDB_WRITE_PLUGIN_DOCS=1 \
             cargo test --test plugin_docs writes it)",
            spec.name
        );
    }
}

#[test]
fn every_example_validates() {
    // Files the examples copy, relative to the spec.
    let dir = tempfile::tempdir().unwrap();
    for f in ["files/sources.list", "files/motd", "playbook.yml"] {
        let p = dir.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "").unwrap();
    }
    std::fs::create_dir_all(dir.path().join("overlay/skel")).unwrap();
    let mut vars = std::collections::BTreeMap::new();
    vars.insert("output".to_string(), "disk.img".to_string());
    vars.insert("rootfs_tarball".to_string(), "rootfs.tar.zst".to_string());
    let renderer = Renderer::new(vars);
    for p in vmdb::plugins::ALL {
        let name = p.spec().name;
        let yaml = example(name, &page(name));
        let text = format!(
            "steps:\n{}",
            yaml.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        let raw = vmdb::engine::spec::load(&text)
            .unwrap_or_else(|d| panic!("plugins/{name}.md example: {d:?}"));
        let mut plan = if yaml.starts_with("- mkimg:") {
            Plan {
                spec_dir: dir.path().into(),
                host_has_device_mapper: true,
                ..Plan::default()
            }
        } else {
            plan_with_disk(dir.path())
        };
        plan.rootfs_tarball = Some("rootfs.tar.zst".into());
        let steps =
            validate(&raw.steps, &renderer, vmdb::plugins::ALL, &mut plan).unwrap_or_else(|d| {
                panic!(
                    "plugins/{name}.md example does not validate: {:#?}",
                    d.iter().map(|d| d.render("example")).collect::<Vec<_>>()
                )
            });
        assert!(
            steps.iter().any(|s| s.kind == name),
            "plugins/{name}.md example has no {name} step"
        );
        assert!(
            plan.warnings.is_empty(),
            "plugins/{name}.md example: {:?}",
            plan.warnings
                .iter()
                .map(|d| d.render("example"))
                .collect::<Vec<_>>()
        );
        check_host_programs(name, &page(name), &plan);
    }
}

/// The programs the example's steps declare are named on their pages, and this host
/// has them (one of them, where any will do), so that a declaration cannot name a
/// program no package has. Not the device-mapper steps' on a host without
/// device-mapper: they cannot run there.
fn check_host_programs(name: &str, page: &str, plan: &Plan) {
    let dm = std::fs::read_to_string("/proc/misc")
        .is_ok_and(|s| s.lines().any(|l| l.ends_with(" device-mapper")));
    for need in &plan.host_needs {
        if need.kind == name {
            for (program, _) in &need.any_of {
                assert!(
                    page.contains(&format!("`{program}`")),
                    "plugins/{name}.md does not name the host program {program}"
                );
            }
        }
        if !dm && ["cryptsetup", "vgcreate", "lvcreate", "lvscan"].contains(&need.kind) {
            continue;
        }
        assert!(
            need.any_of
                .iter()
                .any(|(p, _)| vmdb::host::cmd::host_has(p)),
            "plugins/{name}.md example: {:?} is not on this host",
            need.any_of
        );
    }
}

#[test]
fn keys_every_step_takes_are_documented_once_in_the_readme() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("Keys every step takes")
        .expect("README.md has a table of the keys every step takes");
    let table: Vec<&str> = readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    for key in vmdb::engine::step::COMMON_KEYS {
        let row = format!("| `{}` | {} |", key.name, key.doc);
        assert!(
            table.contains(&row.as_str()),
            "README.md's table of keys every step takes has no row {row}"
        );
    }
    assert_eq!(
        table.len(),
        2 + vmdb::engine::step::COMMON_KEYS.len(),
        "README.md's table of keys every step takes: {table:#?}"
    );
}

#[test]
fn no_page_without_a_step_type() {
    let names: Vec<&str> = vmdb::plugins::ALL.iter().map(|p| p.spec().name).collect();
    for e in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins")).unwrap() {
        let f = e.unwrap().file_name().to_string_lossy().into_owned();
        let stem = f.strip_suffix(".md").unwrap_or(&f);
        assert!(names.contains(&stem), "plugins/{f} documents no step type");
    }
}

//! Many images from one spec: one build per combination of --matrix values, in
//! parallel; a failing image does not spoil the others, and the summary says why.

mod common;

use common::*;

const SPEC: &str = r#"
steps:
  - mkimg: "{{ output }}"
    size: 32M
  - mklabel: msdos
    device: "{{ output }}"
  - mkpart: primary
    device: "{{ output }}"
    start: 0%
    end: 100%
    tag: /
  - mkfs: ext4
    partition: /
  - mount: /
  - create-file: /etc/flavour
    contents: "{{ flavour }} {{ size }}\n"
  - shell: |
      test "{{ flavour }}" != bitter
    root-fs: /
"#;

#[test]
fn one_image_per_combination_and_failures_stay_apart() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "m.vmdb", SPEC);
    let out = d.path().join("{{ flavour }}-{{ size }}.img");
    let r = run(&[
        &spec.to_string_lossy(),
        "--output",
        &out.to_string_lossy(),
        "--matrix",
        "flavour=sweet,bitter",
        "--matrix",
        "size=small,large",
        "-j",
        "2",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let mut imgs: Vec<String> = listing(d.path())
        .into_iter()
        .filter(|f| f.ends_with(".img"))
        .collect();
    imgs.sort();
    assert_eq!(imgs, ["sweet-large.img", "sweet-small.img"]);
    assert!(
        r.stderr.contains("vmdb: building 4 images, 2 at a time"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("built 2, failed 2") || r.stderr.contains(": 2 built, 2 failed"),
        "{}",
        r.stderr
    );
    for bad in ["bitter-small", "bitter-large"] {
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with(&format!("  FAILED {}/{bad}.img", d.path().display())))
            .unwrap_or_else(|| panic!("no summary line for {bad}:\n{}", r.stderr));
        assert!(
            line.contains(&format!("(flavour=bitter size={})", &bad[7..])),
            "{line}"
        );
        assert!(line.contains("step 7 (shell) at line 17 failed"), "{line}");
    }
    // Each image has its own values.
    for (name, text) in [
        ("sweet-small", "sweet small\n"),
        ("sweet-large", "sweet large\n"),
    ] {
        let img = d.path().join(format!("{name}.img"));
        let part = d.path().join("part");
        tool(
            "dd",
            &[
                &format!("if={}", img.display()),
                &format!("of={}", part.display()),
                "bs=512",
                "skip=2048",
                "status=none",
            ],
        );
        assert_eq!(
            tool(
                "debugfs",
                &["-R", "cat /etc/flavour", &part.to_string_lossy()]
            ),
            text
        );
    }
    wait_clean(d.path(), 5).unwrap();
}

#[test]
fn a_bad_cell_stops_the_matrix_before_anything_is_built() {
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "m.vmdb", SPEC);
    let r = run(&[
        &spec.to_string_lossy(),
        "--output",
        &d.path().join("{{ flavour }}.img").to_string_lossy(),
        "--matrix",
        "flavour=sweet,bitter",
    ]);
    // {{ size }} is not defined for any cell.
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("undefined template variable 'size'"),
        "{}",
        r.stderr
    );
    assert_eq!(listing(d.path()), ["m.vmdb"]);

    let r = run(&[
        &spec.to_string_lossy(),
        "--output",
        &d.path().join("same.img").to_string_lossy(),
        "--matrix",
        "flavour=sweet,bitter",
        "--variable",
        "size=1",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("would both build"), "{}", r.stderr);
    assert_eq!(listing(d.path()), ["m.vmdb"]);
}

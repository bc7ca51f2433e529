//! Every example spec in specs/ and bench/ validates.

mod common;

use common::*;

#[test]
fn example_specs_validate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut seen = 0;
    for dir in ["specs", "bench"] {
        for e in std::fs::read_dir(format!("{root}/{dir}")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) != Some("vmdb") {
                continue;
            }
            let r = run(&[
                "validate",
                &p.to_string_lossy(),
                "--output",
                "/tmp/never-built.img",
                "--variable",
                "mirror=http://mirror.invalid/debian",
                // bench/matrix.vmdb takes these from --matrix.
                "--variable",
                "suite=bookworm",
                "--variable",
                "arch=amd64",
            ]);
            assert_eq!(r.code, 0, "{}:\n{}", p.display(), r.stderr);
            assert!(r.stdout.contains(": OK, "), "{}", r.stdout);
            seen += 1;
        }
    }
    assert!(seen >= 4, "found only {seen} specs");
    assert!(!std::path::Path::new("/tmp/never-built.img").exists());
}

/// A byte order mark before the first key is allowed, as YAML allows it (it was
/// reported as an unknown top-level key).
#[test]
fn a_byte_order_mark_is_allowed() {
    let d = tempfile::tempdir().unwrap();
    let spec = write(d.path(), "bom.vmdb", "\u{feff}steps:\n  - echo: hello\n");
    let r = run(&["validate", &spec.to_string_lossy()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
    assert!(r.stdout.ends_with("bom.vmdb: OK, 1 step\n"), "{}", r.stdout);
}

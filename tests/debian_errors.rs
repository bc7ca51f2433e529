//! A bad suite or an unreachable mirror fails in seconds, says why, and leaves nothing.

mod common;

use std::time::Instant;

use common::*;

fn spec(debootstrap: &str) -> String {
    format!(
        r#"
steps:
  - mkimg: "{{{{ output }}}}"
    size: 1G
  - mklabel: msdos
    device: "{{{{ output }}}}"
  - mkpart: primary
    device: "{{{{ output }}}}"
    start: 0%
    end: 100%
    tag: /
  - mkfs: ext4
    partition: /
  - mount: /
{debootstrap}"#
    )
}

fn fails_fast(debootstrap: &str, expected: &str) {
    let d = tempfile::tempdir().unwrap();
    let s = write(d.path(), "s.vmdb", &spec(debootstrap));
    let img = d.path().join("x.img");
    let t = Instant::now();
    let r = run(&[&s.to_string_lossy(), "--output", &img.to_string_lossy()]);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(secs < 30.0, "took {secs:.1}s");
    assert!(
        r.stderr.contains("step 6 (debootstrap) at line 15 failed"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(expected), "{}", r.stderr);
    wait_clean(d.path(), 5).unwrap();
    assert_eq!(listing(d.path()), ["s.vmdb"]);
    eprintln!("failed as expected in {secs:.2}s");
}

#[test]
fn unreachable_mirror() {
    need_root!();
    // Nothing listens on the discard port of the loopback address.
    fails_fast(
        "  - debootstrap: bookworm\n    target: /\n    mirror: http://127.0.0.1:9/debian\n",
        "cannot reach http://127.0.0.1:9/debian",
    );
}

#[test]
#[ignore = "needs the Debian archive"]
fn misspelt_suite() {
    need_root!();
    fails_fast(
        "  - debootstrap: bookwrm\n    target: /\n",
        "suite 'bookwrm' not found at",
    );
}

//! `--json`: one JSON object per line, in the order of docs/json-events.md, for a small
//! spec whose third step fails.

mod common;

use common::*;
use serde_json::Value;

const SPEC: &str = "steps:
  - mkimg: \"{{ output }}\"
    size: 32M
  - mklabel: msdos
    device: \"{{ output }}\"
  - mkpart: primary
    device: \"{{ output }}\"
    start: 0%
    end: 100%
    tag: /
  - kpartx: \"{{ output }}\"
  - mkfs: ext4
    partition: /
  - mount: /
  - shell: |
      echo to stderr >&2
    root-fs: /
  - error: planned failure
    teardown: undone
";

fn events(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn names(ev: &[Value]) -> Vec<String> {
    ev.iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn events_of_a_failing_build() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let s = write(d.path(), "s.vmdb", SPEC);
    let out = d.path().join("x.img");
    let json = d.path().join("events.json");
    let r = run(&[
        &s.to_string_lossy(),
        "--output",
        &out.to_string_lossy(),
        "--json",
        &json.to_string_lossy(),
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let text = std::fs::read_to_string(&json).unwrap();
    let ev = events(&text);
    // Every event has a name and a time, in order.
    let times: Vec<f64> = ev.iter().map(|e| e["time"].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{text}");
    assert!(times[0] > 1.6e9);
    let n = names(&ev);
    assert_eq!(n[0], "build-start");
    assert_eq!(ev[0]["spec"], s.display().to_string());
    assert_eq!(ev[0]["output"], out.display().to_string());
    assert_eq!(ev[0]["steps"], 8);
    assert_eq!(ev[0]["format"], "raw");
    assert_eq!(ev[0]["vmdb_version"], env!("CARGO_PKG_VERSION"));
    // Steps 1..8 start and end in order; commands run between their step's start and end.
    let mut i = 1;
    let mut current = 0;
    for e in &ev[1..] {
        match e["event"].as_str().unwrap() {
            "step-start" => {
                assert_eq!(e["step"], current + 1, "{e}");
                assert_eq!(e["steps"], 8);
                current += 1;
            }
            "command" => {
                assert_eq!(e["step"], current, "{e}");
                assert!(!e["argv"].as_array().unwrap().is_empty());
                assert!(!e["command"].as_str().unwrap().is_empty());
            }
            "step-end" => {
                assert_eq!(e["step"], current, "{e}");
                assert!(e["duration"].as_f64().unwrap() >= 0.0);
                let want = if current == 8 { "failed" } else { "ok" };
                assert_eq!(e["status"], want, "{e}");
            }
            _ => break,
        }
        i += 1;
    }
    assert_eq!(current, 8);
    // mkfs ran mkfs.ext4 as step 5, the shell step ran sh as step 7.
    let cmd_of = |step: i64| -> Vec<String> {
        ev.iter()
            .filter(|e| e["event"] == "command" && e["step"] == step)
            .map(|e| e["argv"][0].as_str().unwrap().to_string())
            .collect()
    };
    assert!(cmd_of(5).contains(&"mkfs.ext4".to_string()), "{text}");
    assert_eq!(cmd_of(7), ["sh"]);
    let failed = &ev[i - 1];
    assert_eq!(failed["type"], "error");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .starts_with("step 8 (error) at line 18 failed after"),
        "{failed}"
    );
    let start8 = ev
        .iter()
        .find(|e| e["event"] == "step-start" && e["step"] == 8)
        .unwrap();
    assert_eq!(start8["line"], 18);
    assert_eq!(start8["description"], "error: planned failure");
    // Then teardown of every step in reverse, the error, and the end.
    let rest: Vec<&Value> = ev[i..].iter().filter(|e| e["event"] != "command").collect();
    let td: Vec<i64> = rest
        .iter()
        .take(8)
        .map(|e| {
            assert_eq!(e["event"], "teardown", "{e}");
            assert_eq!(e["status"], "ok", "{e}");
            e["step"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(td, [8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(rest[8]["event"], "error");
    assert!(
        rest[8]["message"]
            .as_str()
            .unwrap()
            .contains("planned failure"),
        "{}",
        rest[8]
    );
    assert_eq!(rest[9]["event"], "build-end");
    assert_eq!(rest.len(), 10, "{text}");
    assert_eq!(rest[9]["status"], "failed");
    assert_eq!(rest[9]["exit_code"], 1);
    assert_eq!(rest[9]["outputs"], serde_json::json!([]));
    // The human-readable progress is unchanged on stderr.
    assert!(
        r.stderr.contains("[8/8] error: planned failure\n"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("vmdb: build failed; everything was torn down\n")
    );
    assert_eq!(listing(d.path()), ["events.json", "s.vmdb"]);
    wait_clean(d.path(), 5).unwrap();
}

#[test]
fn events_on_stdout_and_skipped_steps() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let spec = "steps:
  - mkimg: \"{{ output }}\"
    size: 32M
  - mklabel: msdos
    device: \"{{ output }}\"
  - mkpart: primary
    device: \"{{ output }}\"
    start: 0%
    end: 100%
    tag: /
  - kpartx: \"{{ output }}\"
  - mkfs: ext4
    partition: /
  - mount: /
  - unpack-rootfs: /
  - echo: printed
  - echo: skipped
    unless: [rootfs_unpacked]
";
    let s = write(d.path(), "s.vmdb", spec);
    let out = d.path().join("x.img");
    // An empty tarball: unpacking it sets rootfs_unpacked.
    let tarball = d.path().join("empty.tar");
    tool(
        "tar",
        &[
            "-cf",
            &tarball.to_string_lossy(),
            "--files-from",
            "/dev/null",
        ],
    );
    let r = run(&[
        &s.to_string_lossy(),
        "--output",
        &out.to_string_lossy(),
        "--json",
        "-",
        "--rootfs-tarball",
        &tarball.to_string_lossy(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Standard output has the events only; what the echo step prints goes to stderr.
    let ev = events(&r.stdout);
    assert!(r.stderr.contains("printed\n"), "{}", r.stderr);
    let n = names(&ev);
    assert_eq!(n[0], "build-start");
    assert_eq!(n.last().unwrap(), "build-end");
    let steps: Vec<(String, i64)> = ev
        .iter()
        .filter(|e| e["event"].as_str().unwrap().starts_with("step-"))
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["step"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut want = Vec::new();
    for i in 1..=8 {
        want.push(("step-start".to_string(), i));
        want.push(("step-end".to_string(), i));
    }
    want.push(("step-skipped".to_string(), 9));
    assert_eq!(steps, want, "{}", r.stdout);
    let skipped = ev.iter().find(|e| e["event"] == "step-skipped").unwrap();
    assert_eq!(skipped["unless"], serde_json::json!(["rootfs_unpacked"]));
    assert_eq!(skipped["description"], "echo: skipped");
    // Commands of the steps are named with their step.
    assert!(
        ev.iter()
            .any(|e| e["event"] == "command" && e["step"] == 5 && e["argv"][0] == "mkfs.ext4"),
        "{}",
        r.stdout
    );
    // Skipped steps are not torn down: 8 teardowns, newest first.
    let td: Vec<i64> = ev
        .iter()
        .filter(|e| e["event"] == "teardown")
        .map(|e| e["step"].as_i64().unwrap())
        .collect();
    assert_eq!(td, [8, 7, 6, 5, 4, 3, 2, 1]);
    let end = ev.last().unwrap();
    assert_eq!(end["status"], "ok");
    assert_eq!(end["exit_code"], 0);
    assert_eq!(
        end["outputs"],
        serde_json::json!([out.display().to_string()])
    );
    wait_clean(d.path(), 5).unwrap();
}

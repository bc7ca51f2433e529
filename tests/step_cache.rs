//! The automatic step cache: a restored build gives the same image tree as one built
//! without the cache; a change invalidates from that step on, never earlier; a damaged
//! entry is detected and never used.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;

const SPEC: &str = r#"
steps:
  - mkimg: "{{ output }}"
    size: 64M
  - mklabel: gpt
    device: "{{ output }}"
  - mkpart: root
    device: "{{ output }}"
    start: 0%
    end: 100%
    tag: /
  - mkfs: ext4
    partition: /
  - mount: /
  - create-file: /first
    contents: "first\n"
  - shell: |
      sleep 1.2
      mkdir -p "$ROOT/srv/data"
      echo slow > "$ROOT/srv/data/one"
      chmod 0640 "$ROOT/srv/data/one"
      chown 1000:100 "$ROOT/srv/data/one"
      ln -s data/one "$ROOT/srv/link"
    root-fs: /
  - copy-file: /srv/copied
    src: input.txt
  - shell: |
      sleep 1.2
      echo "{{ flavour }}" > "$ROOT/srv/flavour"
    root-fs: /
  - fstab: /
"#;

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        let d = Dir(tempfile::tempdir().unwrap());
        write(d.0.path(), "spec.vmdb", SPEC);
        write(d.0.path(), "input.txt", "input one\n");
        d
    }
    fn p(&self) -> &Path {
        self.0.path()
    }
    fn build(&self, cache: &Path, img: &str, extra: &[&str]) -> Run {
        let out = self.p().join(img);
        let mut args = vec![
            self.p().join("spec.vmdb").display().to_string(),
            "--output".into(),
            out.display().to_string(),
            "--cache-dir".into(),
            cache.display().to_string(),
            "--variable".into(),
            "flavour=vanilla".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let r = to_run(vmdb().args(&args).output().unwrap());
        assert_eq!(r.code, 0, "{}", r.stderr);
        r
    }
}

fn from_cache(r: &Run) -> Vec<String> {
    r.stderr
        .lines()
        .filter(|l| l.ends_with(": from the step cache"))
        .map(|l| {
            l.split(']')
                .next()
                .unwrap()
                .trim_start_matches('[')
                .to_string()
        })
        .collect()
}

/// Every file in the image's root filesystem: path → (mode, uid, gid, contents or link).
fn tree(img: &Path) -> BTreeMap<String, String> {
    let j: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["-J", &img.to_string_lossy()])).unwrap();
    let start = j["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let dev = tool(
        "losetup",
        &[
            "-f",
            "--show",
            "-r",
            "-o",
            &(start * 512).to_string(),
            &img.to_string_lossy(),
        ],
    )
    .trim()
    .to_string();
    let mounted = std::process::Command::new("mount")
        .args(["-o", "ro", &dev, &mnt.path().to_string_lossy()])
        .status()
        .unwrap()
        .success();
    let mut out = BTreeMap::new();
    if mounted {
        walk(mnt.path(), mnt.path(), &mut out);
        let _ = std::process::Command::new("umount")
            .arg(mnt.path())
            .status();
    }
    let _ = std::process::Command::new("losetup")
        .args(["-d", &dev])
        .status();
    assert!(mounted, "mounting the image's root filesystem");
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p: PathBuf = e.path();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        if rel == "lost+found" {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        let what = if m.file_type().is_symlink() {
            format!("-> {}", std::fs::read_link(&p).unwrap().display())
        } else if m.is_dir() {
            walk(root, &p, out);
            "dir".into()
        } else {
            String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned()
        };
        out.insert(
            rel,
            format!("{:o} {}:{} {what}", m.mode(), m.uid(), m.gid()),
        );
    }
}

/// What differs between two trees, leaving out /etc/fstab (it names this build's UUIDs).
fn differences(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| k.as_str() != "etc/fstab")
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {:?} vs {:?}", a.get(k), b.get(k)))
        .collect()
}

#[test]
fn restored_builds_equal_uncached_ones_and_changes_invalidate_from_their_step() {
    need_root!();
    let d = Dir::new();
    let cache = d.p().join("cache");

    let plain = d.build(&cache, "plain.img", &["--no-cache"]);
    assert!(from_cache(&plain).is_empty());
    assert!(!cache.exists(), "--no-cache writes no cache");

    let cold = d.build(&cache, "cold.img", &[]);
    assert!(from_cache(&cold).is_empty(), "{}", cold.stderr);
    assert_eq!(
        cold.stderr
            .matches("saved the image tree in the step cache")
            .count(),
        2,
        "{}",
        cold.stderr
    );

    // Nothing changed: the state after the last slow step is restored.
    let hot = d.build(&cache, "hot.img", &[]);
    assert_eq!(
        from_cache(&hot),
        ["6/10", "7/10", "8/10", "9/10"],
        "{}",
        hot.stderr
    );
    assert!(
        hot.stderr
            .contains("starting from the state after step 9 (shell)"),
        "{}",
        hot.stderr
    );

    let t_plain = tree(&d.p().join("plain.img"));
    assert_eq!(t_plain["srv/data/one"], "100640 1000:100 slow\n");
    assert_eq!(t_plain["srv/link"], "120777 0:0 -> data/one");
    assert_eq!(t_plain["srv/flavour"], "100644 0:0 vanilla\n");
    assert_eq!(
        differences(&t_plain, &tree(&d.p().join("cold.img"))),
        Vec::<String>::new()
    );
    assert_eq!(
        differences(&t_plain, &tree(&d.p().join("hot.img"))),
        Vec::<String>::new()
    );

    // A variable used by the last step: only that step runs again.
    let var = d.build(&cache, "var.img", &["--variable", "flavour=chocolate"]);
    assert_eq!(from_cache(&var), ["6/10", "7/10"], "{}", var.stderr);
    let t = tree(&d.p().join("var.img"));
    assert_eq!(t["srv/flavour"], "100644 0:0 chocolate\n");
    assert_eq!(t["srv/copied"], "100644 0:0 input one\n");

    // A copied file: from the copy on, never earlier.
    write(d.p(), "input.txt", "input two\n");
    let file = d.build(&cache, "file.img", &[]);
    assert_eq!(from_cache(&file), ["6/10", "7/10"], "{}", file.stderr);
    assert_eq!(
        tree(&d.p().join("file.img"))["srv/copied"],
        "100644 0:0 input two\n"
    );

    // A step's text: a change in step 6 invalidates everything after mounting.
    let spec = std::fs::read_to_string(d.p().join("spec.vmdb")).unwrap();
    write(
        d.p(),
        "spec.vmdb",
        &spec.replace("first\\n", "first, edited\\n"),
    );
    let edited = d.build(&cache, "edited.img", &[]);
    assert!(from_cache(&edited).is_empty(), "{}", edited.stderr);
    assert_eq!(
        tree(&d.p().join("edited.img"))["first"],
        "100644 0:0 first, edited\n"
    );
    wait_clean(d.p(), 5).unwrap();
}

#[test]
fn a_damaged_entry_is_detected_and_never_used() {
    need_root!();
    let d = Dir::new();
    let cache = d.p().join("cache");
    d.build(&cache, "cold.img", &[]);
    // Damage the newest entry (the state after step 9): the build falls back to the
    // state after step 7 and says why.
    let steps = cache.join("steps");
    let mut metas: Vec<serde_json::Value> = std::fs::read_dir(&steps)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .map(|e| serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap())
        .collect();
    metas.sort_by_key(|m| m["step"].as_u64());
    assert_eq!(metas.len(), 2);
    let key = metas[1]["key"].as_str().unwrap().to_string();
    let archive = steps.join(format!("{key}.tar.zst"));
    let mut bytes = std::fs::read(&archive).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    std::fs::write(&archive, &bytes).unwrap();

    let r = d.build(&cache, "after.img", &[]);
    assert!(
        r.stderr.contains(&format!("cache entry {key} is damaged")),
        "{}",
        r.stderr
    );
    assert_eq!(from_cache(&r), ["6/10", "7/10"], "{}", r.stderr);
    // The damaged entry was dropped; the steps that ran again saved a sound one.
    assert_eq!(
        r.stderr
            .matches("saved the image tree in the step cache")
            .count(),
        1,
        "{}",
        r.stderr
    );
    assert_eq!(
        tree(&d.p().join("after.img"))["srv/flavour"],
        "100644 0:0 vanilla\n"
    );
    let r = d.build(&cache, "again.img", &[]);
    assert_eq!(
        from_cache(&r),
        ["6/10", "7/10", "8/10", "9/10"],
        "{}",
        r.stderr
    );

    // A half-written archive (shorter than its record) is ignored as if absent.
    let bytes = std::fs::read(&archive).unwrap();
    std::fs::write(&archive, &bytes[..bytes.len() / 3]).unwrap();
    let r = d.build(&cache, "short.img", &[]);
    assert!(!r.stderr.contains("damaged"), "{}", r.stderr);
    assert_eq!(from_cache(&r), ["6/10", "7/10"], "{}", r.stderr);

    // An entry without its record (a save that did not finish) is not used either.
    for m in &metas {
        let _ = std::fs::remove_file(steps.join(format!("{}.json", m["key"].as_str().unwrap())));
    }
    let r = d.build(&cache, "third.img", &[]);
    assert!(from_cache(&r).is_empty(), "{}", r.stderr);
    wait_clean(d.p(), 5).unwrap();
}

#[test]
fn cache_list_and_prune() {
    need_root!();
    let d = Dir::new();
    let cache = d.p().join("cache");
    d.build(&cache, "cold.img", &[]);
    let list = to_run(
        vmdb()
            .args(["cache", "list", "--cache-dir", &cache.to_string_lossy()])
            .output()
            .unwrap(),
    );
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert_eq!(
        list.stdout.lines().filter(|l| l.contains(" step ")).count(),
        2,
        "{}",
        list.stdout
    );
    assert!(
        list.stdout.contains("2 saved image trees"),
        "{}",
        list.stdout
    );
    let prune = to_run(
        vmdb()
            .args([
                "cache",
                "prune",
                "--max-size",
                "1",
                "--cache-dir",
                &cache.to_string_lossy(),
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(prune.code, 0, "{}", prune.stderr);
    assert!(
        prune.stdout.starts_with("removed 2 saved image trees"),
        "{}",
        prune.stdout
    );
    assert_eq!(std::fs::read_dir(cache.join("steps")).unwrap().count(), 0);
}

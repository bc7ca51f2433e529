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

/// Run `f` on the image's root filesystem, mounted read-only.
fn with_root<T>(img: &Path, f: impl FnOnce(&Path) -> T) -> T {
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
    let out = mounted.then(|| {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(mnt.path())));
        let _ = std::process::Command::new("umount")
            .arg(mnt.path())
            .status();
        out
    });
    let _ = std::process::Command::new("losetup")
        .args(["-d", &dev])
        .status();
    match out {
        Some(Ok(v)) => v,
        Some(Err(p)) => std::panic::resume_unwind(p),
        None => panic!("mounting the image's root filesystem"),
    }
}

/// Every file in the image's root filesystem: path → (mode, uid, gid, contents or link).
fn tree(img: &Path) -> BTreeMap<String, String> {
    with_root(img, |root| {
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    })
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

/// The setup steps of the specs below: a 64M image with one ext4 filesystem mounted.
const SETUP: &str = r#"steps:
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
"#;

/// Write a file below `dir`, making its directories.
fn put(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// Build `dir`/spec.vmdb into `dir`/`img` with the cache `dir`/cache.
fn build_in(dir: &Path, img: &str, extra: &[&str]) -> Run {
    let cache = dir.join("cache");
    let mut args = vec![
        dir.join("spec.vmdb").display().to_string(),
        "--output".into(),
        dir.join(img).display().to_string(),
        "--cache-dir".into(),
        cache.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let r = to_run(vmdb().args(&args).output().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    r
}

/// The `yaml` example of a step type's page, indented as a step of a spec.
fn page_example(name: &str) -> String {
    let page = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("plugins/{name}.md")),
    )
    .unwrap();
    let start = page.find("```yaml\n").unwrap() + 8;
    let end = start + page[start..].find("```").unwrap();
    page[start..end]
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect()
}

#[test]
fn a_host_file_a_script_installs_is_watched() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    // plugins/shell.md's example, then a slow step: the state after it is saved.
    let example = page_example("shell");
    assert!(example.contains("install -m 0644 files/motd \"$ROOT/etc/motd\""));
    let spec = format!(
        "{SETUP}  - shell: mkdir -p \"$ROOT/etc\"\n    root-fs: /\n{example}  - shell: |\n      \
         sleep 1.2\n      echo slow > \"$ROOT/etc/slow\"\n    root-fs: /\n"
    );
    write(d.path(), "spec.vmdb", &spec);
    put(d.path(), "files/motd", "Welcome, first edition.\n");

    let cold = build_in(d.path(), "cold.img", &[]);
    assert!(from_cache(&cold).is_empty(), "{}", cold.stderr);
    let hot = build_in(d.path(), "hot.img", &[]);
    assert_eq!(from_cache(&hot), ["6/8", "7/8", "8/8"], "{}", hot.stderr);
    assert_eq!(
        tree(&d.path().join("hot.img"))["etc/motd"],
        "100644 0:0 Welcome, first edition.\n"
    );

    // The file changes, the spec does not: the image has the new text, and the log
    // says why the cached state was not used.
    put(d.path(), "files/motd", "Welcome, second edition.\n");
    let edited = build_in(d.path(), "edited.img", &[]);
    assert_eq!(
        tree(&d.path().join("edited.img"))["etc/motd"],
        "100644 0:0 Welcome, second edition.\n",
        "{}",
        edited.stderr
    );
    assert!(from_cache(&edited).is_empty(), "{}", edited.stderr);
    assert!(
        edited
            .stderr
            .lines()
            .any(|l| l == "step cache: step 7 (shell) changed: file files/motd differs"),
        "{}",
        edited.stderr
    );
    wait_clean(d.path(), 5).unwrap();
}

#[test]
fn inputs_cache_false_and_refresh() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let spec = format!(
        "{SETUP}  - shell: |
      sleep 1.2
      mkdir -p \"$ROOT/etc/conf.d\"
      cp conf/*.conf \"$ROOT/etc/conf.d/\"
    root-fs: /
    inputs: [conf]
  - shell: |
      sleep 1.2
      cat /proc/sys/kernel/random/uuid > \"$ROOT/etc/stamp\"
    root-fs: /
    cache: false
"
    );
    write(d.path(), "spec.vmdb", &spec);
    put(d.path(), "conf/a.conf", "a = 1\n");
    let saved = |r: &Run| {
        r.stderr
            .matches("saved the image tree in the step cache")
            .count()
    };

    // The step with `cache: false` is slow, yet never saved, and always runs.
    let cold = build_in(d.path(), "cold.img", &[]);
    assert_eq!(saved(&cold), 1, "{}", cold.stderr);
    let hot = build_in(d.path(), "hot.img", &[]);
    assert_eq!(from_cache(&hot), ["6/7"], "{}", hot.stderr);
    assert_eq!(saved(&hot), 0, "{}", hot.stderr);
    let (t_cold, t_hot) = (
        tree(&d.path().join("cold.img")),
        tree(&d.path().join("hot.img")),
    );
    assert_eq!(t_hot["etc/conf.d/a.conf"], "100644 0:0 a = 1\n");
    assert_ne!(t_cold["etc/stamp"], t_hot["etc/stamp"]);

    // A file of a directory named under `inputs:` (the glob names no file).
    put(d.path(), "conf/a.conf", "a = 2\n");
    let edited = build_in(d.path(), "edited.img", &[]);
    assert!(from_cache(&edited).is_empty(), "{}", edited.stderr);
    assert!(
        edited
            .stderr
            .lines()
            .any(|l| l == "step cache: step 6 (shell) changed: file conf differs"),
        "{}",
        edited.stderr
    );
    assert_eq!(
        tree(&d.path().join("edited.img"))["etc/conf.d/a.conf"],
        "100644 0:0 a = 2\n"
    );

    // --refresh: every step runs and the state is saved anew, then used.
    let fresh = build_in(d.path(), "fresh.img", &["--refresh"]);
    assert!(from_cache(&fresh).is_empty(), "{}", fresh.stderr);
    assert_eq!(saved(&fresh), 1, "{}", fresh.stderr);
    assert!(
        fresh
            .stderr
            .contains("step cache: --refresh: every step runs"),
        "{}",
        fresh.stderr
    );
    let again = build_in(d.path(), "again.img", &[]);
    assert_eq!(from_cache(&again), ["6/7"], "{}", again.stderr);
    wait_clean(d.path(), 5).unwrap();
}

/// A web server for the files below a directory (one request per connection), that
/// stops listening when `stop` is set: a mirror that can go away.
struct Mirror {
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Mirror {
    fn serve(dir: PathBuf) -> Mirror {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let url = format!("http://{}/debian", l.local_addr().unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                let Ok((conn, _)) = l.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                let mut r = BufReader::new(conn);
                let mut first = String::new();
                r.read_line(&mut first).unwrap_or(0);
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
                let body = std::fs::read(dir.join(path.trim_start_matches('/')));
                let mut conn = r.into_inner();
                let _ = match body {
                    Ok(b) => conn
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                b.len()
                            )
                            .as_bytes(),
                        )
                        .and_then(|_| conn.write_all(&b)),
                    Err(_) => conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
            }
        });
        Mirror { url, stop }
    }

    fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Until the listener is closed, a connection would still be accepted.
        for _ in 0..100 {
            let addr = self
                .url
                .trim_start_matches("http://")
                .trim_end_matches("/debian");
            if std::net::TcpStream::connect(addr).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the mirror did not stop");
    }
}

/// Publish a suite in the mirror below `dir` with this Date.
fn publish(dir: &Path, suite: &str, date: &str) {
    put(
        dir,
        &format!("debian/dists/{suite}/InRelease"),
        &format!(
            "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin: Test\nSuite: {suite}\n\
             Date: {date}\nSHA256:\n 0123 10 main/binary-amd64/Packages\n"
        ),
    );
}

#[test]
fn steps_that_fetch_follow_the_archive_and_offline_builds_say_so() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    let (mon, tue) = (
        "Mon, 01 Jan 2024 10:00:00 UTC",
        "Tue, 02 Jan 2024 10:00:00 UTC",
    );
    publish(d.path(), "testing", mon);
    publish(d.path(), "testing-updates", mon);
    let mirror = Mirror::serve(d.path().to_path_buf());
    // The rootfs tarball stands in for debootstrap and apt, which are skipped: their
    // keys count all the same (they are what the tarball was made with).
    let rootfs = d.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc/apt/sources.list.d")).unwrap();
    let tarball = d.path().join("rootfs.tar");
    tool(
        "tar",
        &[
            "-C",
            &rootfs.to_string_lossy(),
            "-cf",
            &tarball.to_string_lossy(),
            ".",
        ],
    );
    let spec = format!(
        "{SETUP}  - unpack-rootfs: /
  - debootstrap: testing
    mirror: \"{{{{ mirror }}}}\"
    target: /
    unless: rootfs_unpacked
  - create-file: /etc/apt/sources.list.d/updates.list
    contents: \"deb {{{{ mirror }}}} testing-updates main\\n\"
  - apt: install
    packages: [hello]
    tag: /
    unless: rootfs_unpacked
  - shell: |
      sleep 1.2
      echo built > \"$ROOT/etc/built\"
    root-fs: /
"
    );
    write(d.path(), "spec.vmdb", &spec);
    let args = [
        "--variable",
        &format!("mirror={}", mirror.url),
        "--rootfs-tarball",
        &tarball.to_string_lossy(),
    ];
    let all = ["6/10", "7/10", "8/10", "9/10", "10/10"];

    let cold = build_in(d.path(), "cold.img", &args);
    assert!(from_cache(&cold).is_empty(), "{}", cold.stderr);
    let hot = build_in(d.path(), "hot.img", &args);
    assert_eq!(from_cache(&hot), all, "{}", hot.stderr);

    // testing-updates publishes new packages: from the apt step on, the state is stale.
    publish(d.path(), "testing-updates", tue);
    let updated = build_in(d.path(), "updated.img", &args);
    assert!(from_cache(&updated).is_empty(), "{}", updated.stderr);
    let want = format!(
        "step cache: step 9 (apt) changed: archive {}/dists/testing-updates differs \
         (Release of {mon}, now {tue})",
        mirror.url
    );
    assert!(
        updated.stderr.lines().any(|l| l == want),
        "{want}\n{}",
        updated.stderr
    );

    // Offline: the newest state saved, and the log says so.
    mirror.stop();
    let offline = build_in(d.path(), "offline.img", &args);
    assert_eq!(from_cache(&offline), all, "{}", offline.stderr);
    for (suite, date) in [("testing", mon), ("testing-updates", tue)] {
        let url = format!("{}/dists/{suite}", mirror.url);
        assert!(
            offline.stderr.lines().any(|l| {
                l.starts_with(&format!(
                    "step cache: archive not reachable ({url}: curl: (7) "
                )) && l.ends_with(&format!("): using the newest cached state from {date}"))
            }),
            "{suite}\n{}",
            offline.stderr
        );
    }
    assert_eq!(
        tree(&d.path().join("offline.img"))["etc/built"],
        "100644 0:0 built\n"
    );
    wait_clean(d.path(), 5).unwrap();
}

/// The names in `dir` that start with a dot: temporaries.
fn dot_files(dir: &Path) -> Vec<String> {
    listing(dir)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn sha256_hex(p: &Path) -> String {
    tool("sha256sum", &[&p.to_string_lossy()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Two builds of one spec sharing a cache save the same state at the same moment (a
/// shell step makes them wait for each other, then leaves 100 MB for tar to pack). Each
/// build is PID 1 of its own PID namespace: a temporary name made from the PID was the
/// same for both, and the entry a mix of two archives. The first save wins; a third
/// build restores a sound tree.
#[test]
fn builds_saving_the_same_state_at_once_leave_a_sound_entry() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    // Outside the spec's directory: a directory named in a script there is hashed into
    // the step's key, and this one changes as the builds arrive.
    let outside = tempfile::tempdir().unwrap();
    let barrier = outside.path().join("barrier");
    std::fs::create_dir(&barrier).unwrap();
    write(
        d.path(),
        "spec.vmdb",
        r#"
steps:
  - mkimg: "{{ output }}"
    size: 512M
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
  - shell: |
      sleep 1.1
      head -c 100M /dev/urandom > "$ROOT/data"
      sha256sum < "$ROOT/data" | cut -d' ' -f1 > "$ROOT/data.sha256"
      mktemp {{ barrier | quote }}/arrived.XXXXXX > /dev/null
      while [ "$(ls {{ barrier | quote }} | wc -l)" -lt 2 ]; do sleep 0.02; done
    root-fs: /
"#,
    );
    let cache = d.path().join("cache");
    let args = |img: &str| {
        [
            d.path().join("spec.vmdb").display().to_string(),
            "--output".into(),
            d.path().join(img).display().to_string(),
            "--cache-dir".into(),
            cache.display().to_string(),
            "--variable".into(),
            format!("barrier={}", barrier.display()),
        ]
    };
    let start = |img: &str| {
        vmdb()
            .args(args(img))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start("a.img"), start("b.img"));
    let runs = [a, b].map(|c| to_run(c.wait_with_output().unwrap()));
    for r in &runs {
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let third = to_run(vmdb().args(args("c.img")).output().unwrap());
    assert_eq!(third.code, 0, "{}", third.stderr);
    assert_eq!(from_cache(&third), ["6/6"], "{}", third.stderr);
    assert!(!third.stderr.contains("damaged"), "{}", third.stderr);
    with_root(&d.path().join("c.img"), |root| {
        let recorded = std::fs::read_to_string(root.join("data.sha256")).unwrap();
        assert_eq!(sha256_hex(&root.join("data")), recorded.trim());
    });
    let both = format!("{}{}", runs[0].stderr, runs[1].stderr);
    assert_eq!(
        both.matches("saved the image tree in the step cache")
            .count(),
        1,
        "{both}"
    );
    assert_eq!(
        both.matches("the step cache has this image tree already")
            .count(),
        1,
        "{both}"
    );
    let steps = cache.join("steps");
    assert_eq!(dot_files(&steps), Vec::<String>::new());
    assert_eq!(
        listing(&steps)
            .iter()
            .filter(|n| n.ends_with(".json"))
            .count(),
        1
    );

    wait_clean(d.path(), 5).unwrap();
}

/// An entry whose record matches its archive, but the archive does not decompress (what
/// the race above made): the build says so, removes it, restores the shallower entry
/// and runs the steps after it, which save a sound entry in its place.
#[test]
fn an_entry_whose_archive_does_not_decompress_is_removed_and_the_steps_run() {
    need_root!();
    let d = Dir::new();
    let cache = d.p().join("cache");
    d.build(&cache, "cold.img", &[]);
    let steps = cache.join("steps");
    let mut metas: Vec<serde_json::Value> = listing(&steps)
        .iter()
        .filter(|n| n.ends_with(".json"))
        .map(|n| serde_json::from_str(&std::fs::read_to_string(steps.join(n)).unwrap()).unwrap())
        .collect();
    metas.sort_by_key(|m| m["step"].as_u64());
    assert_eq!(metas.len(), 2);
    let key = metas[1]["key"].as_str().unwrap().to_string();
    let archive = steps.join(format!("{key}.tar.zst"));
    let mut bytes = std::fs::read(&archive).unwrap();
    let n = bytes.len();
    for i in [n / 3, n / 2, n - 3] {
        bytes[i] ^= 0x5a;
    }
    std::fs::write(&archive, &bytes).unwrap();
    let bad_sum = sha256_hex(&archive);
    let mut meta = metas[1].clone();
    meta["sha256"] = bad_sum.clone().into();
    meta["size"] = n.into();
    write(
        &steps,
        &format!("{key}.json"),
        &serde_json::to_string_pretty(&meta).unwrap(),
    );

    let r = d.build(&cache, "after.img", &[]);
    assert!(
        r.stderr.contains(&format!(
            "vmdb: cache entry {key} is damaged (it does not decompress: command failed"
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(": ignoring and removing it"),
        "{}",
        r.stderr
    );
    assert_eq!(from_cache(&r), ["6/10", "7/10"], "{}", r.stderr);
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
    // In its place, a sound entry of the same state.
    assert_ne!(sha256_hex(&archive), bad_sum);
    let again = d.build(&cache, "again.img", &[]);
    assert_eq!(
        from_cache(&again),
        ["6/10", "7/10", "8/10", "9/10"],
        "{}",
        again.stderr
    );
    wait_clean(d.p(), 5).unwrap();
}

/// A save killed half-way (SIGKILL of vmdb while tar writes the archive) leaves its
/// temporary file: `cache list` counts it, and `cache prune` removes it once no one
/// holds it and it is older than the grace period (a minute).
#[test]
fn the_temporary_of_a_killed_save_is_listed_and_pruned() {
    need_root!();
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "spec.vmdb",
        r#"
steps:
  - mkimg: "{{ output }}"
    size: 1G
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
  - shell: |
      sleep 1.1
      head -c 400M /dev/urandom > "$ROOT/data"
    root-fs: /
"#,
    );
    let cache = d.path().join("cache");
    let steps = cache.join("steps");
    let mut child = vmdb()
        .args([
            &d.path().join("spec.vmdb").to_string_lossy(),
            "--output",
            &d.path().join("x.img").to_string_lossy(),
            "--cache-dir",
            &cache.to_string_lossy(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        if steps.is_dir() && !dot_files(&steps).is_empty() {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the build ended");
        assert!(t0.elapsed().as_secs() < 120, "no save started");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    wait_clean(d.path(), 10).unwrap();
    let left = dot_files(&steps);
    assert_eq!(left.len(), 1, "{left:?}");
    let tmp = steps.join(&left[0]);
    // Nothing writes it any more.
    let size = std::fs::metadata(&tmp).unwrap().len();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(std::fs::metadata(&tmp).unwrap().len(), size);
    assert!(size > 0);

    let cmd = |args: &[&str]| {
        let mut v = vec!["cache"];
        v.extend_from_slice(args);
        let cache_dir = cache.to_string_lossy().into_owned();
        v.extend(["--cache-dir", &cache_dir]);
        let r = to_run(vmdb().args(&v).output().unwrap());
        assert_eq!(r.code, 0, "{}", r.stderr);
        r.stdout
    };
    let mb = format!("{:.1} MB", size as f64 / 1e6);
    let list = cmd(&["list"]);
    assert!(
        list.contains(&format!("unfinished files: 1, {mb} (saves in progress")),
        "{list}"
    );
    // Within the grace period it may be a save that has not locked its file yet.
    let prune = cmd(&["prune"]);
    assert!(
        prune.contains("removed files left by interrupted saves: 0 (0.0 MB)"),
        "{prune}"
    );
    assert!(tmp.exists());
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(120))
        .unwrap();
    let prune = cmd(&["prune"]);
    assert!(
        prune.contains(&format!(
            "removed files left by interrupted saves: 1 ({mb})"
        )),
        "{prune}"
    );
    assert_eq!(listing(&steps), Vec::<String>::new());
    assert!(
        cmd(&["list"]).contains("unfinished files: 0, 0.0 MB"),
        "{list}"
    );
}

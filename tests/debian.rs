//! The Debian packaging matches the crate: same version, a toolchain new enough for
//! the crate in Build-Depends, every file the package installs from the source tree
//! exists, every host program a step declares is in the package's relations, and the
//! autopkgtests run every yarn scenario.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(p: &str) -> String {
    std::fs::read_to_string(root().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// The fields of each paragraph of a deb822 file (debian/control), comments dropped and
/// continuation lines joined.
fn paragraphs(text: &str) -> Vec<Vec<(String, String)>> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in para.lines().filter(|l| !l.starts_with('#')) {
            if line.starts_with(' ') || line.starts_with('\t') {
                let last = fields
                    .last_mut()
                    .expect("a continuation line after a field");
                last.1.push('\n');
                last.1.push_str(line.trim());
            } else if let Some((k, v)) = line.split_once(':') {
                fields.push((k.to_string(), v.trim().to_string()));
            }
        }
        if !fields.is_empty() {
            out.push(fields);
        }
    }
    out
}

fn field<'a>(para: &'a [(String, String)], name: &str) -> Option<&'a str> {
    para.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A relation field as its alternatives: "a (>= 1) | b, c" -> [["a", "b"], ["c"]].
fn relations(value: &str) -> Vec<Vec<String>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| {
            r.split('|')
                .map(|alt| alt.split_whitespace().next().unwrap_or("").to_string())
                .collect()
        })
        .collect()
}

fn binary_package() -> Vec<(String, String)> {
    paragraphs(&read("debian/control"))
        .into_iter()
        .find(|p| field(p, "Package") == Some("vmdb"))
        .expect("a vmdb binary package")
}

/// Packages that every Debian system has (Essential: yes in Debian 12 and 13). Policy
/// forbids unversioned dependencies on them.
const ESSENTIAL: &[&str] = &[
    "base-files",
    "bash",
    "coreutils",
    "dash",
    "diffutils",
    "dpkg",
    "findutils",
    "grep",
    "gzip",
    "hostname",
    "login",
    "sed",
    "tar",
    "util-linux",
];

#[test]
fn changelog_version_is_the_crate_version() {
    let changelog = read("debian/changelog");
    let first = changelog.lines().next().unwrap();
    let version = first
        .strip_prefix("vmdb (")
        .and_then(|r| r.split_once(')'))
        .map(|(v, _)| v)
        .unwrap_or_else(|| panic!("not a changelog entry of vmdb: {first}"));
    // A Debian revision after the upstream version: the source format is 3.0 (quilt).
    let (upstream, revision) = version.rsplit_once('-').expect("a Debian revision");
    assert_eq!(upstream, env!("CARGO_PKG_VERSION"), "{first}");
    assert!(revision.chars().all(|c| c.is_ascii_digit()), "{first}");
}

#[test]
fn build_depends_have_a_new_enough_rust() {
    let manifest = read("Cargo.toml");
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("rust-version in Cargo.toml");
    let source = &paragraphs(&read("debian/control"))[0];
    let bd = field(source, "Build-Depends").expect("Build-Depends");
    // Debian 13's cargo and rustc, or Debian 12's cargo-web and rustc-web.
    for (tool, web) in [("cargo", "cargo-web"), ("rustc", "rustc-web")] {
        let wanted = format!("{tool} (>= {msrv}) | {web} (>= {msrv})");
        assert!(
            bd.split(',').any(|r| r.trim() == wanted),
            "Build-Depends lacks {wanted:?}: {bd}"
        );
    }
    assert!(bd.contains("debhelper-compat (= 13)"), "{bd}");
    assert_eq!(read("debian/source/format"), "3.0 (quilt)\n");
}

#[test]
fn no_unversioned_dependency_on_an_essential_package() {
    let pkg = binary_package();
    for name in ["Depends", "Recommends", "Suggests"] {
        for alts in relations(field(&pkg, name).unwrap_or("")) {
            for a in alts {
                assert!(
                    !ESSENTIAL.contains(&a.as_str()),
                    "{name} names the Essential package {a}"
                );
            }
        }
    }
}

/// Every `.rs` file below `dir`, recursively (whatever the module layout).
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// The string literal `"..."` at the start of `s` (after blanks), if any.
fn literal(s: &str) -> Option<&str> {
    let s = s.trim_start().strip_prefix('"')?;
    s.split_once('"').map(|(l, _)| l)
}

/// `"a", "b")` at the start of `s`: a (program, package) pair, the program in lower case
/// and the package a Debian name.
fn pair(s: &str) -> Option<(&str, &str)> {
    let first = literal(s)?;
    let rest = s.trim_start()[first.len() + 2..]
        .trim_start()
        .strip_prefix(',')?;
    let second = literal(rest)?;
    let end = rest.trim_start()[second.len() + 2..].trim_start();
    let debian_name = second.len() >= 2
        && second.starts_with(|c: char| c.is_ascii_lowercase())
        && second
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    // A program's name or path: lower case (not an environment variable's name).
    let program = !first.is_empty()
        && first
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-._/".contains(c));
    (end.starts_with(')') && debian_name && program).then_some((first, second))
}

/// The Debian packages that steps declare for the programs they run (`c.needs(key,
/// program, package)` and the (program, package) tables handed to `needs` and
/// `needs_one_of`), read from the source: validation declares them only for the keys
/// a spec uses.
fn declared_packages() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for file in rust_files(&root().join("src")) {
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests name made-up programs.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        // Files that call them, or hold (program, package) tables for them.
        let tables = code.contains("(&'static str, &'static str)");
        if !code.contains("needs(") && !code.contains("needs_one_of(") && !tables {
            continue;
        }
        let consts: Vec<(&str, &str)> = code
            .lines()
            .filter_map(|l| {
                let rest = l.trim_start().strip_prefix("const ")?;
                let (name, value) = rest.split_once(": &str = ")?;
                Some((name.trim(), literal(value)?))
            })
            .collect();
        // The third argument of needs(key, program, package): a literal or a constant.
        for call in code.split("needs(").skip(1) {
            let args: Vec<&str> = call.split(')').next().unwrap_or("").split(',').collect();
            if let [_, _, package] = args.as_slice() {
                let package = package.trim();
                if let Some(l) = literal(package) {
                    found.insert(l.to_string());
                } else if let Some((_, v)) = consts.iter().find(|(n, _)| *n == package) {
                    found.insert(v.to_string());
                }
            }
        }
        // ("program", "package") pairs: tables and constants of alternatives.
        for after_paren in code.split('(').skip(1) {
            if let Some((_, package)) = pair(after_paren) {
                found.insert(package.to_string());
            }
        }
    }
    found
}

#[test]
fn every_package_a_step_declares_is_in_the_package_relations() {
    let declared = declared_packages();
    // The scan sees the tables and the constants, not only literal arguments.
    for known in [
        "e2fsprogs",
        "xfsprogs",
        "zstd",
        "xorriso",
        "genisoimage",
        "zerofree",
        "lvm2",
    ] {
        assert!(
            declared.contains(known),
            "{known} not found in {declared:?}"
        );
    }
    let pkg = binary_package();
    let mut related: BTreeSet<String> = BTreeSet::new();
    for name in ["Depends", "Recommends", "Suggests"] {
        for alts in relations(field(&pkg, name).unwrap_or("")) {
            related.extend(alts);
        }
    }
    // ${vmdb:Grub}: debian/rules' list for amd64 and i386.
    let rules = read("debian/rules");
    let grub = rules
        .lines()
        .find_map(|l| l.strip_prefix("GRUB = "))
        .expect("GRUB in debian/rules");
    related.extend(grub.split(',').map(|p| {
        p.trim()
            .replace("$(subst i386,ia32,$(DEB_HOST_ARCH))", "amd64")
    }));
    // Programs vmdb runs outside the steps: qemu-img for --format, qemu and its
    // firmware for `vmdb boot`, qemu-user-static for foreign architectures, curl or
    // wget for the archive's Release files.
    let others = [
        "qemu-utils",
        "qemu-system-x86",
        "ovmf",
        "qemu-system-arm",
        "qemu-efi-aarch64",
        "qemu-user-static",
        "curl",
        "wget",
    ];
    for p in declared.iter().map(String::as_str).chain(others) {
        assert!(
            related.contains(p) || ESSENTIAL.contains(&p),
            "{p} is in none of Depends, Recommends and Suggests of debian/control"
        );
    }
}

#[test]
fn installed_files_exist() {
    assert!(root().join("examples/vmdb-docs.rs").is_file());
    let specs: Vec<_> = std::fs::read_dir(root().join("specs"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "vmdb"))
        .collect();
    assert!(specs.len() >= 3, "example specs: {specs:?}");
    assert_eq!(read("debian/vmdb.examples"), "specs/*.vmdb\n");
    // One page for vmdb and one per subcommand at every depth, as
    // examples/vmdb-docs.rs writes them.
    fn walk(prefix: &str, cmd: &clap::Command, pages: &mut Vec<String>) {
        pages.push(format!("debian/generated/man/{prefix}.1"));
        for sub in cmd.get_subcommands() {
            walk(&format!("{prefix}-{}", sub.get_name()), sub, pages);
        }
    }
    let mut pages = Vec::new();
    walk(
        "vmdb",
        &<vmdb::cli::Cli as clap::CommandFactory>::command(),
        &mut pages,
    );
    assert_eq!(pages.len(), 6, "{pages:?}");
    assert_eq!(read("debian/vmdb.manpages"), pages.join("\n") + "\n");
}

#[test]
fn every_lintian_override_says_why() {
    for file in [
        "debian/vmdb.lintian-overrides",
        "debian/vmdb-vmdb2.lintian-overrides",
        "debian/source/lintian-overrides",
    ] {
        let text = read(file);
        let mut comment = false;
        let mut overrides = 0;
        for line in text.lines() {
            if line.starts_with('#') {
                comment = true;
            } else if line.trim().is_empty() {
                comment = false;
            } else {
                assert!(comment, "{file}: no comment above {line:?}");
                overrides += 1;
            }
        }
        assert!(overrides > 0, "{file} overrides nothing");
    }
}

#[test]
fn autopkgtests_run_every_yarn_scenario() {
    let tests = paragraphs(&read("debian/tests/control"));
    let mut run: BTreeSet<String> = BTreeSet::new();
    let mut names = Vec::new();
    for t in &tests {
        let name = field(t, "Tests").expect("Tests:");
        names.push(name.to_string());
        let restrictions = field(t, "Restrictions").unwrap_or("");
        for r in ["needs-root", "isolation-machine"] {
            assert!(restrictions.contains(r), "{name}: {restrictions}");
        }
        let depends = relations(field(t, "Depends").unwrap_or(""));
        for d in ["vmdb", "cmdtest"] {
            assert!(
                depends.iter().any(|a| a[0] == d),
                "{name} does not depend on {d}"
            );
        }
        let script = root().join("debian/tests").join(name);
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&script.metadata().unwrap().permissions());
        assert!(mode & 0o111 != 0, "{} is not executable", script.display());
        let text = std::fs::read_to_string(&script).unwrap();
        assert!(
            text.contains("exec /usr/bin/yarn "),
            "{name} runs no yarn by its path"
        );
        for e in std::fs::read_dir(root().join("yarns")).unwrap().flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if f.ends_with(".yarn") && text.contains(&f) {
                run.insert(f);
            }
        }
        // `scenarios` runs every file but the booting one, by a listing.
        if text.contains("grep -v /500-boot.yarn") {
            for e in std::fs::read_dir(root().join("yarns")).unwrap().flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if f.ends_with(".yarn") && f != "500-boot.yarn" {
                    run.insert(f);
                }
            }
        }
    }
    assert_eq!(names, ["scenarios", "boot"]);
    let all: BTreeSet<String> = std::fs::read_dir(root().join("yarns"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yarn"))
        .collect();
    assert_eq!(run, all);
    // CI runs the package's checks: the README's test command builds it in chroots
    // and runs the autopkgtests.
    let test = read("scripts/test");
    for s in [
        "scripts/build-source-package",
        "VMDB_SUITE=bookworm VMDB_LINTIAN=trixie scripts/build-package-in-chroot",
        "scripts/test-package",
        "scripts/run-autopkgtest",
    ] {
        assert!(test.contains(s), "scripts/test does not run {s}");
    }
    assert!(read(".ci/run").contains("exec scripts/test\n"));
}

/// vmdb-vmdb2 ships the name vmdb2 (a link to vmdb, and vmdb2(1)) and takes the place
/// of Debian's vmdb2, whose /usr/bin/vmdb2 is a plain file: it conflicts with it,
/// replaces it and provides it (see debian/README.source).
#[test]
fn the_vmdb2_name_replaces_debians_vmdb2() {
    let para = paragraphs(&read("debian/control"))
        .into_iter()
        .find(|p| field(p, "Package") == Some("vmdb-vmdb2"))
        .expect("a vmdb-vmdb2 binary package");
    let names = |f: &str| -> Vec<Vec<String>> { relations(field(&para, f).unwrap_or_default()) };
    for f in ["Provides", "Conflicts", "Replaces"] {
        assert_eq!(names(f), [["vmdb2"]], "{f}");
    }
    // The vmdb of the same build, whose argv[0] handling the link relies on.
    let depends = field(&para, "Depends").unwrap();
    assert!(
        depends
            .split(',')
            .any(|d| d.trim() == "vmdb (= ${binary:Version})"),
        "{depends}"
    );
    assert_eq!(field(&para, "Architecture"), Some("linux-any"));
    assert_eq!(
        read("debian/vmdb-vmdb2.links"),
        "usr/bin/vmdb usr/bin/vmdb2\n"
    );
    assert_eq!(
        read("debian/vmdb-vmdb2.manpages"),
        "debian/generated/man/vmdb2.1\n"
    );
    // The name the link gives is the one vmdb answers to.
    assert!(vmdb::cli::called_as_vmdb2(Some(std::ffi::OsStr::new(
        "/usr/bin/vmdb2"
    ))));
}

//! The Debian packaging matches the crate: same version, and every file the package
//! installs from the source tree exists.

use std::path::Path;

fn read(p: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(p))
        .unwrap_or_else(|e| panic!("{p}: {e}"))
}

#[test]
fn changelog_version_is_the_crate_version() {
    let changelog = read("debian/changelog");
    let first = changelog.lines().next().unwrap();
    assert_eq!(
        first,
        format!(
            "vmdb ({}) unstable; urgency=medium",
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn installed_files_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(root.join("examples/vmdb-docs.rs").is_file());
    let specs: Vec<_> = std::fs::read_dir(root.join("specs"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "vmdb"))
        .collect();
    assert!(specs.len() >= 3, "example specs: {specs:?}");
    assert_eq!(read("debian/vmdb.examples"), "specs/*.vmdb\n");
    // One page for vmdb and one per subcommand, as examples/vmdb-docs.rs writes them.
    let mut pages = vec!["debian/generated/man/vmdb.1".to_string()];
    for sub in <vmdb::cli::Cli as clap::CommandFactory>::command().get_subcommands() {
        pages.push(format!("debian/generated/man/vmdb-{}.1", sub.get_name()));
    }
    assert_eq!(read("debian/vmdb.manpages"), pages.join("\n") + "\n");
    assert_eq!(read("debian/source/format"), "3.0 (native)\n");
}

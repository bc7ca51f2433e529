//! The man pages and shell completions generated from the clap definition (by
//! examples/vmdb-docs.rs, which debian/rules runs) cover every option.

#[allow(dead_code)]
#[path = "../examples/vmdb-docs.rs"]
mod docs;

use clap::CommandFactory;

/// How an option's name appears in roff: every '-' escaped.
fn roff(s: &str) -> String {
    s.replace('-', "\\-")
}

/// Every `--long` and `-s` of `cmd`'s options, and its positional arguments' value names.
fn option_names(cmd: &clap::Command) -> Vec<String> {
    let mut names = Vec::new();
    for a in cmd.get_arguments() {
        if let Some(l) = a.get_long() {
            names.push(format!("--{l}"));
        }
        if let Some(s) = a.get_short() {
            names.push(format!("-{s}"));
        }
        if a.is_positional() {
            for v in a.get_value_names().unwrap_or_default() {
                names.push(format!("<{v}>"));
            }
        }
    }
    names
}

/// The OPTIONS section of a page: from ".SH OPTIONS" to the next ".SH".
fn options_section(page: &str) -> &str {
    let start = page.find(".SH OPTIONS\n").expect("an OPTIONS section");
    let rest = &page[start + 1..];
    &rest[..rest.find("\n.SH").unwrap_or(rest.len())]
}

fn built_cli() -> clap::Command {
    let mut cmd = vmdb::cli::Cli::command();
    cmd.build();
    cmd
}

#[test]
fn man_pages_mention_every_option_with_its_help() {
    let d = tempfile::tempdir().unwrap();
    let files = docs::man_pages(d.path(), None).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["vmdb.1", "vmdb-validate.1", "vmdb-boot.1", "vmdb-cache.1"]
    );

    let cli = built_cli();
    let mut pages = vec![("vmdb.1".to_string(), cli.clone())];
    for sub in cli.get_subcommands().filter(|s| s.get_name() != "help") {
        pages.push((format!("vmdb-{}.1", sub.get_name()), sub.clone()));
    }
    for (file, cmd) in pages {
        let page = std::fs::read_to_string(d.path().join(&file)).unwrap();
        assert!(
            page.starts_with(".ie \\n(.g .ds Aq \\(aq\n"),
            "{file} is not roff"
        );
        assert!(page.contains(".TH vmdb"), "{file} has no title line");
        let options = options_section(&page);
        let wanted = option_names(&cmd);
        assert!(
            wanted.len() >= 3,
            "{file}: too few options found: {wanted:?}"
        );
        for name in wanted {
            let shown = match name.strip_prefix('<') {
                Some(v) => format!("<\\fI{}\\fR>", roff(v.trim_end_matches('>'))),
                None => format!("\\fB{}\\fR", roff(&name)),
            };
            assert!(
                options.contains(&shown),
                "{file} does not show {name} (as {shown}) in OPTIONS:\n{options}"
            );
        }
        for a in cmd.get_arguments() {
            if let Some(help) = a.get_long_help().or(a.get_help()) {
                // The first words of the help text, as roff escapes them.
                let first: String = help.to_string().chars().take(20).collect();
                let first = roff(&first).replace('\'', "\\*(Aq");
                assert!(
                    options.contains(&first),
                    "{file}: the help of {:?} ({first:?}) is missing",
                    a.get_id()
                );
            }
        }
    }
}

#[test]
fn readme_lists_every_build_option() {
    // The man page is generated, the README's table is not: a new option must be added
    // there by hand.
    let cli = built_cli();
    let names = option_names(&cli);
    assert!(names.contains(&"--rootfs-tarball".to_string()), "{names:?}");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for n in names
        .iter()
        .filter(|n| n.starts_with("--") && *n != "--help")
    {
        assert!(
            readme.contains(&format!("`{n}")),
            "README.md does not list {n}"
        );
    }
}

#[test]
fn man_page_has_the_extra_sections() {
    let d = tempfile::tempdir().unwrap();
    docs::man_pages(d.path(), None).unwrap();
    let page = std::fs::read_to_string(d.path().join("vmdb.1")).unwrap();
    let sections: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix(".SH "))
        .collect();
    assert_eq!(
        sections,
        [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "SUBCOMMANDS",
            "VERSION",
            "\"EXIT STATUS\"",
            "EXAMPLES",
            "FILES",
            "\"SEE ALSO\"",
        ]
    );
    let version = format!(".SH VERSION\nv{}\n", env!("CARGO_PKG_VERSION"));
    assert!(page.contains(&version), "no {version:?}");
}

#[test]
fn completions_offer_every_option() {
    let d = tempfile::tempdir().unwrap();
    let files = docs::completions(d.path()).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["vmdb.bash", "_vmdb", "vmdb.fish"]);
    let cli = built_cli();
    let bash = std::fs::read_to_string(d.path().join("vmdb.bash")).unwrap();
    let zsh = std::fs::read_to_string(d.path().join("_vmdb")).unwrap();
    let fish = std::fs::read_to_string(d.path().join("vmdb.fish")).unwrap();
    let mut cmds = vec![cli.clone()];
    cmds.extend(cli.get_subcommands().cloned());
    for cmd in &cmds {
        for a in cmd.get_arguments() {
            if let Some(l) = a.get_long() {
                assert!(bash.contains(&format!("--{l}")), "bash lacks --{l}");
                assert!(zsh.contains(&format!("--{l}")), "zsh lacks --{l}");
                assert!(fish.contains(&format!("-l {l}")), "fish lacks --{l}");
            }
        }
    }
    for sub in ["validate", "boot"] {
        assert!(fish.contains(&format!("-a \"{sub}\"")), "fish lacks {sub}");
    }
    // bash accepts the file: it defines the completion function and registers it.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p vmdb",
            d.path().join("vmdb.bash").display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("-F _vmdb"));
}

#[test]
fn pages_are_dated_when_asked() {
    assert_eq!(docs::utc_date(0), "1970-01-01");
    assert_eq!(docs::utc_date(1709208000), "2024-02-29"); // a leap day, 12:00 UTC
    assert_eq!(docs::utc_date(1735689599), "2024-12-31"); // the last second of a year
    assert_eq!(docs::utc_date(951782400), "2000-02-29");
    let d = tempfile::tempdir().unwrap();
    docs::man_pages(d.path(), Some("2024-02-29")).unwrap();
    for page in ["vmdb.1", "vmdb-validate.1", "vmdb-boot.1", "vmdb-cache.1"] {
        let text = std::fs::read_to_string(d.path().join(page)).unwrap();
        let title = text.lines().find(|l| l.starts_with(".TH")).unwrap();
        let name = page.trim_end_matches(".1");
        assert_eq!(
            title,
            format!(
                ".TH {name} 1 2024-02-29 \"vmdb {}\" \"vmdb manual\"",
                env!("CARGO_PKG_VERSION")
            )
        );
    }
}

#[test]
fn the_cache_page_and_readme_say_what_prune_removes() {
    let d = tempfile::tempdir().unwrap();
    docs::man_pages(d.path(), None).unwrap();
    let page = std::fs::read_to_string(d.path().join("vmdb-cache.1")).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    // Both say "a minute": the grace period of an unlocked temporary.
    assert_eq!(vmdb::host::cachefile::GRACE.as_secs(), 60);
    for (name, text) in [("vmdb-cache.1", page.as_str()), ("README.md", &readme)] {
        let text = text.replace('\n', " ");
        for words in [
            "more than a minute old",
            "user.vmdb.sha256",
            "unique temporary name",
        ] {
            assert!(text.contains(words), "{name} does not say {words:?}");
        }
    }
}

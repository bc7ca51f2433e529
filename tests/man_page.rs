//! The man pages and shell completions generated from the clap definition (by
//! examples/vmdb-docs.rs, which debian/rules runs) cover every subcommand and option,
//! with EXIT STATUS, ENVIRONMENT, FILES and EXAMPLES, refer to no page that is not
//! written, and hold nothing of the machine they are made on.

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

/// Every page and its command: vmdb, and each subcommand at every depth.
fn pages() -> Vec<(String, clap::Command)> {
    fn walk(prefix: &str, cmd: &clap::Command, out: &mut Vec<(String, clap::Command)>) {
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let name = format!("{prefix}-{}", sub.get_name());
            out.push((format!("{name}.1"), sub.clone()));
            walk(&name, sub, out);
        }
    }
    let cli = built_cli();
    let mut out = vec![("vmdb.1".to_string(), cli.clone())];
    walk("vmdb", &cli, &mut out);
    out
}

const PAGES: [&str; 6] = [
    "vmdb.1",
    "vmdb-validate.1",
    "vmdb-boot.1",
    "vmdb-cache.1",
    "vmdb-cache-list.1",
    "vmdb-cache-prune.1",
];

/// The names of a page's sections (".SH NAME" -> "NAME", quotes kept).
fn sections(page: &str) -> Vec<&str> {
    page.lines()
        .filter_map(|l| l.strip_prefix(".SH "))
        .collect()
}

/// The text of section `name` of a page, up to the next one.
fn section<'a>(page: &'a str, name: &str) -> &'a str {
    let head = format!(".SH {name}\n");
    let start = page
        .find(&head)
        .unwrap_or_else(|| panic!("no section {name}"));
    let rest = &page[start + head.len()..];
    &rest[..rest.find("\n.SH").unwrap_or(rest.len())]
}

#[test]
fn man_pages_mention_every_option_with_its_help() {
    let d = tempfile::tempdir().unwrap();
    let files = docs::man_pages(d.path(), None).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, PAGES);
    let pages = pages();
    assert_eq!(
        pages.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(),
        PAGES
    );
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
            wanted.len() >= 2,
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
    assert_eq!(
        sections(&page),
        [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "SUBCOMMANDS",
            "VERSION",
            "\"EXIT STATUS\"",
            "ENVIRONMENT",
            "FILES",
            "EXAMPLES",
            "\"SEE ALSO\"",
        ]
    );
    let version = format!(".SH VERSION\nv{}\n", env!("CARGO_PKG_VERSION"));
    assert!(page.contains(&version), "no {version:?}");
    // Every page: how it ends, examples, and where to read on.
    for file in PAGES {
        let page = std::fs::read_to_string(d.path().join(file)).unwrap();
        let s = sections(&page);
        for wanted in ["\"EXIT STATUS\"", "EXAMPLES", "\"SEE ALSO\""] {
            assert!(s.contains(&wanted), "{file} has no {wanted}: {s:?}");
        }
        assert!(
            section(&page, "\"EXIT STATUS\"").contains("\\fB0\\fR"),
            "{file}"
        );
    }
}

/// The variables vmdb reads are in the ENVIRONMENT section of the pages of the
/// commands that read them: those of options (clap's `env`) and the others.
#[test]
fn every_variable_vmdb_reads_is_documented() {
    let d = tempfile::tempdir().unwrap();
    docs::man_pages(d.path(), None).unwrap();
    let others: &[(&str, &[&str])] = &[
        (
            "vmdb.1",
            &[
                "TMPDIR",
                "http_proxy",
                "https_proxy",
                "no_proxy",
                "VMDB_QEMU",
            ],
        ),
        ("vmdb-boot.1", &["VMDB_QEMU"]),
    ];
    let mut checked = 0;
    for (file, cmd) in pages() {
        let page = std::fs::read_to_string(d.path().join(&file)).unwrap();
        let mut names: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        for (f, vars) in others {
            if *f == file {
                names.extend(vars.iter().map(|v| v.to_string()));
            }
        }
        for name in names {
            let shown = format!("\\fB{}\\fR", roff(&name));
            assert!(
                section(&page, "ENVIRONMENT").contains(&shown),
                "{file}: ENVIRONMENT lacks {name}"
            );
            checked += 1;
        }
    }
    // VMDB_CACHE_DIR on vmdb and the three cache pages, and the others.
    assert!(checked >= 10, "{checked}");
}

/// A page named anywhere (SUBCOMMANDS, SEE ALSO, the text) is one that is written.
#[test]
fn pages_refer_only_to_pages_that_exist() {
    let d = tempfile::tempdir().unwrap();
    docs::man_pages(d.path(), None).unwrap();
    let mut refs = 0;
    for file in PAGES {
        let page = std::fs::read_to_string(d.path().join(file)).unwrap();
        let plain = page
            .replace("\\-", "-")
            .replace("\\fB", "")
            .replace("\\fR", "");
        for (i, _) in plain.match_indices("(1)") {
            let start = plain[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .map_or(0, |p| p + 1);
            let name = &plain[start..i];
            if name.starts_with("vmdb") {
                assert!(
                    PAGES.contains(&format!("{name}.1").as_str()),
                    "{file} refers to {name}(1), which is not written"
                );
                refs += 1;
            }
        }
    }
    assert!(refs >= PAGES.len() * (PAGES.len() - 1), "{refs}");
}

/// Writes the pages and completions into $VMDB_DOCS_OUT when that is set: run by
/// `pages_hold_nothing_of_the_host` in a child process with another environment and
/// another CPU count. Does nothing otherwise.
#[test]
fn write_docs_for_the_reproducibility_check() {
    if let Some(out) = std::env::var_os("VMDB_DOCS_OUT") {
        let out = std::path::Path::new(&out);
        docs::man_pages(&out.join("man"), Some("2024-02-29")).unwrap();
        docs::vmdb2_page(&out.join("man"), Some("2024-02-29")).unwrap();
        docs::completions(&out.join("completions")).unwrap();
    }
}

/// The same pages and completions wherever they are made: with one CPU or all of them
/// (-j's default was the CPU count, printed in the page), whatever the environment
/// says (VMDB_CACHE_DIR is --cache-dir's default).
#[test]
fn pages_hold_nothing_of_the_host() {
    let exe = std::env::current_exe().unwrap();
    let d = tempfile::tempdir().unwrap();
    let make = |dir: &str, one_cpu: bool, env: &[(&str, &str)]| {
        let mut c = if one_cpu {
            let mut c = std::process::Command::new("taskset");
            c.args(["--cpu-list", "0"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        c.args(["--exact", "write_docs_for_the_reproducibility_check"])
            .env("VMDB_DOCS_OUT", d.path().join(dir))
            .env_remove("VMDB_CACHE_DIR")
            .env_remove("VMDB_QEMU");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    make("a", true, &[]);
    make(
        "b",
        false,
        &[
            ("VMDB_CACHE_DIR", "/srv/elsewhere"),
            ("VMDB_QEMU", "/opt/qemu/bin/qemu"),
            ("TMPDIR", "/srv/tmp"),
            ("COLUMNS", "40"),
        ],
    );
    let mut compared = 0;
    for sub in ["man", "completions"] {
        let a = d.path().join("a").join(sub);
        let mut names: Vec<_> = std::fs::read_dir(&a)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let x = std::fs::read(a.join(&n)).unwrap();
            let y = std::fs::read(d.path().join("b").join(sub).join(&n))
                .unwrap_or_else(|e| panic!("{n:?}: {e}"));
            assert!(
                x == y,
                "{n:?} differs with another CPU count or environment"
            );
            compared += 1;
        }
    }
    // The pages, vmdb2.1 and the three completions.
    assert_eq!(compared, PAGES.len() + 1 + 3);
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
    for page in PAGES {
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

/// vmdb2.1, the page of vmdb run as vmdb2: vmdb2's command line, every option with its
/// help, and the sections vmdb's pages have.
#[test]
fn the_vmdb2_page_shows_vmdb2s_command_line() {
    let d = tempfile::tempdir().unwrap();
    let file = docs::vmdb2_page(d.path(), None).unwrap();
    assert_eq!(file, d.path().join("vmdb2.1"));
    let page = std::fs::read_to_string(&file).unwrap();
    assert!(page.contains("\n.TH vmdb2 1 "), "{page}");
    assert!(
        page.contains("\nvmdb2 \\- Build a disk image from a vmdb2 spec"),
        "{page}"
    );
    let mut cmd = vmdb::cli::Vmdb2Cli::command();
    cmd.build();
    let options = options_section(&page);
    let wanted = option_names(&cmd);
    for name in [
        "--image",
        "--output",
        "--rootfs-tarball",
        "--verbose",
        "-v",
        "--log",
        "--variable",
        "--version",
        "--help",
        "<SPECFILE>",
    ] {
        assert!(wanted.iter().any(|w| w == name), "{name}: {wanted:?}");
    }
    for name in wanted {
        let shown = match name.strip_prefix('<') {
            Some(v) => format!("<\\fI{}\\fR>", roff(v.trim_end_matches('>'))),
            None => format!("\\fB{}\\fR", roff(&name)),
        };
        assert!(options.contains(&shown), "{name} ({shown}):\n{options}");
    }
    assert_eq!(
        sections(&page),
        [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "VERSION",
            "\"EXIT STATUS\"",
            "ENVIRONMENT",
            "EXAMPLES",
            "\"SEE ALSO\""
        ]
    );
    // It names vmdb's page, which is written.
    assert!(page.contains("\\fBvmdb\\fR(1)"));
    assert!(PAGES.contains(&"vmdb.1"));
}

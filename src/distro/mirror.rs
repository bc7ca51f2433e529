//! The Debian mirror to bootstrap from when a spec names none: the host's own apt
//! configuration, and a quick reachability check of a mirror and suite.

use std::path::Path;

use anyhow::{Result, bail};

use crate::digest::{Digest, Sha256, hex};
use crate::engine::cachekey::Archive;
use crate::host::cmd::Cmd;

/// Debian release names and aliases; a suite serves Debian when its part before the
/// first '-' is one of these (`bookworm`, `bookworm-updates`, `stable-backports`).
const DEBIAN_SUITES: &[&str] = &[
    "buzz",
    "rex",
    "bo",
    "hamm",
    "slink",
    "potato",
    "woody",
    "sarge",
    "etch",
    "lenny",
    "squeeze",
    "wheezy",
    "jessie",
    "stretch",
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
    "experimental",
];

/// A `deb` source serving a Debian suite that is not a security suite.
fn serves_debian(suite: &str) -> bool {
    let base = suite.split('-').next().unwrap_or("");
    DEBIAN_SUITES.contains(&base)
        && !suite.ends_with("-security")
        && !suite.ends_with("/updates")
        && !suite.contains("security")
}

fn usable_uri(uri: &str) -> bool {
    uri.starts_with("http://") || uri.starts_with("https://") || uri.starts_with("file:/")
}

/// The first Debian mirror in deb822 text (a `.sources` file).
pub fn from_deb822(text: &str) -> Option<String> {
    // Stanzas are separated by blank lines; comment lines are ignored, continuation
    // lines (starting with white space) belong to the field before.
    let mut stanzas: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !stanzas.last().is_some_and(|s| s.is_empty()) {
                stanzas.push(Vec::new());
            }
            continue;
        }
        let cur = stanzas.last_mut().expect("never empty");
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = cur.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            cur.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    for s in &stanzas {
        let field = |name: &str| {
            s.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .unwrap_or("")
        };
        if matches!(
            field("enabled").to_ascii_lowercase().as_str(),
            "no" | "false" | "0"
        ) {
            continue;
        }
        if !field("types").split_whitespace().any(|t| t == "deb") {
            continue;
        }
        if !field("suites").split_whitespace().any(serves_debian) {
            continue;
        }
        if let Some(uri) = field("uris").split_whitespace().find(|u| usable_uri(u)) {
            return Some(uri.to_string());
        }
    }
    None
}

/// The first Debian mirror in one-line-style text (`sources.list`).
pub fn from_one_line(text: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        // Options: `[arch=amd64 signed-by=...]`, possibly spread over several words.
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let Some(end) = rest.iter().position(|w| w.ends_with(']')) else {
                continue;
            };
            rest.drain(..=end);
        }
        if let [uri, suite, ..] = rest.as_slice() {
            if usable_uri(uri) && serves_debian(suite) {
                return Some(uri.to_string());
            }
        }
    }
    None
}

/// The host's Debian mirror: `*.sources` and `*.list` files in
/// `ETC/apt/sources.list.d` (in name order), then `ETC/apt/sources.list`.
pub fn host_default_in(etc: &Path) -> Option<String> {
    let dir = etc.join("apt/sources.list.d");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        let found = match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => from_deb822(&text),
            Some("list") => from_one_line(&text),
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    std::fs::read_to_string(etc.join("apt/sources.list"))
        .ok()
        .and_then(|t| from_one_line(&t))
}

/// The Debian mirror from this host's apt configuration.
pub fn host_default() -> Option<String> {
    host_default_in(Path::new("/etc"))
}

/// Check quickly that `mirror` serves `suite`, so that a typo or an unreachable
/// mirror fails in seconds with a clear message rather than deep inside debootstrap.
/// Uses curl, else wget; with neither, it leaves the check to debootstrap.
pub fn check_suite(mirror: &str, suite: &str) -> Result<()> {
    check_suite_with(mirror, suite, None)
}

/// `check_suite`, trusting the CA certificates in the PEM file `ca` (an https mirror
/// with a private certificate authority).
pub fn check_suite_with(mirror: &str, suite: &str, ca: Option<&Path>) -> Result<()> {
    let base = mirror.trim_end_matches('/');
    if let Some(path) = base.strip_prefix("file://") {
        let dists = Path::new(path).join("dists").join(suite);
        if dists.join("Release").exists() || dists.join("InRelease").exists() {
            return Ok(());
        }
        if !Path::new(path).is_dir() {
            bail!("cannot reach {mirror}: {path} is not a directory");
        }
        bail!("suite '{suite}' not found at {mirror} (no dists/{suite}/Release)");
    }
    let urls = [
        format!("{base}/dists/{suite}/InRelease"),
        format!("{base}/dists/{suite}/Release"),
    ];
    if crate::host::cmd::in_path("curl") {
        for url in &urls {
            let mut curl = Cmd::new("curl");
            if let Some(ca) = ca {
                curl = curl.arg("--cacert").arg(ca);
            }
            let code = curl
                .args(["-sS", "-L", "-o", "/dev/null", "-w", "%{http_code}"])
                .args(["--connect-timeout", "10", "--max-time", "20", "-r", "0-0"])
                .arg(url)
                .run();
            match code {
                Err(e) => bail!("cannot reach {mirror}: {}", last_line(&e)),
                Ok(code) if code.trim().starts_with('2') => return Ok(()),
                Ok(_) => continue,
            }
        }
        bail!("suite '{suite}' not found at {mirror} (no dists/{suite}/InRelease or Release)");
    }
    if crate::host::cmd::in_path("wget") {
        for url in &urls {
            let mut wget = Cmd::new("wget");
            if let Some(ca) = ca {
                wget = wget.arg(format!("--ca-certificate={}", ca.display()));
            }
            let r = wget
                .args(["-q", "--spider", "--timeout=10", "--tries=1"])
                .arg(url)
                .run();
            match r {
                Ok(_) => return Ok(()),
                // wget's exit status 8: the server answered with an error (404).
                Err(e) if e.to_string().contains("exit status 8") => continue,
                Err(e) => bail!("cannot reach {mirror}: {}", last_line(&e)),
            }
        }
        bail!("suite '{suite}' not found at {mirror} (no dists/{suite}/InRelease or Release)");
    }
    crate::log::verbose("  neither curl nor wget: debootstrap itself checks the mirror");
    Ok(())
}

/// The program's own last message from a command's error (curl's "curl: (6) ..."),
/// skipping the bare status code curl prints on stdout.
fn last_line(e: &anyhow::Error) -> String {
    let s = e.to_string();
    s.lines()
        .filter_map(|l| l.strip_prefix("  | "))
        .rfind(|l| !l.trim().chars().all(|c| c.is_ascii_digit()))
        .unwrap_or(s.lines().next().unwrap_or(""))
        .to_string()
}

/// Every `deb` source (URI and suite) written in `text`, in one-line style (a `deb`
/// word followed by the URI and the suite, anywhere in a line: an `echo` in a script
/// counts) or in deb822 stanzas (`URIs:` and `Suites:`). `deb-src` lines are left out:
/// installing packages does not read them.
pub fn sources_in(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line
            .split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | ';'))
            .filter(|w| !w.is_empty())
            .collect();
        for (i, w) in words.iter().enumerate() {
            if *w != "deb" {
                continue;
            }
            let mut rest = &words[i + 1..];
            if rest.first().is_some_and(|w| w.starts_with('[')) {
                match rest.iter().position(|w| w.ends_with(']')) {
                    Some(end) => rest = &rest[end + 1..],
                    None => continue,
                }
            }
            if let [uri, suite, ..] = rest {
                if usable_uri(uri) {
                    found.push((uri.to_string(), suite.to_string()));
                }
            }
        }
    }
    // deb822: a stanza ends at a blank line; fields may stand indented in a script.
    for stanza in text.split("\n\n") {
        let field = |name: &str| -> Vec<&str> {
            stanza
                .lines()
                .filter_map(|l| {
                    let (k, v) = l.trim().split_once(':')?;
                    k.eq_ignore_ascii_case(name).then_some(v)
                })
                .flat_map(str::split_whitespace)
                .collect()
        };
        let types = field("types");
        if !types.is_empty() && !types.contains(&"deb") {
            continue;
        }
        for uri in field("uris").into_iter().filter(|u| usable_uri(u)) {
            for suite in field("suites") {
                found.push((uri.to_string(), suite.to_string()));
            }
        }
    }
    found
}

/// A suite of an archive, as the step cache follows it: its Release files are in
/// `URI/dists/SUITE` (or `URI/SUITE` for a flat repository, whose suite ends with '/').
pub fn archive(uri: &str, suite: &str) -> Archive {
    let uri = uri.trim_end_matches('/');
    let url = if suite.ends_with('/') {
        // `./` or `sub/dir/`: the Release files are in that directory.
        let flat = suite.trim_end_matches('/').trim_start_matches("./");
        match flat {
            "" | "." => uri.to_string(),
            _ => format!("{uri}/{flat}"),
        }
    } else {
        format!("{uri}/dists/{suite}")
    };
    Archive {
        url: url.trim_end_matches('/').to_string(),
        ca: None,
    }
}

/// Whether a script runs apt to install or upgrade packages (or to update its lists):
/// then it fetches from the archives the image's sources name, as an apt step does.
pub fn runs_apt(script: &str) -> bool {
    script.lines().any(|l| {
        let words: Vec<&str> = l
            .split(|c: char| c.is_whitespace() || ";|&()".contains(c))
            .filter(|w| !w.is_empty())
            .collect();
        words
            .iter()
            .position(|w| matches!(w.rsplit('/').next(), Some("apt" | "apt-get" | "aptitude")))
            .is_some_and(|i| {
                words[i + 1..].iter().any(|w| {
                    matches!(
                        *w,
                        "install" | "upgrade" | "dist-upgrade" | "full-upgrade" | "update"
                    )
                })
            })
    })
}

/// What vmdb reads of a Release file: its fields, which start it, hold its Date.
const RELEASE_HEAD: u64 = 8192;
/// Seconds to connect to a mirror, and for a whole request, when looking up the state
/// of an archive: short, so that a build without network does not wait.
const STATE_CONNECT_SECS: u32 = 3;
const STATE_MAX_SECS: u32 = 6;

/// The state of an archive's suite from its (In)Release file: the `Date` field and a
/// hash of the fields before the first checksum list (Origin, Suite, Version, Date,
/// Valid-Until, ...). The archive writes a new Date whenever it publishes new packages.
/// None when the text has no Date field.
pub fn release_state(text: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(text);
    let mut lines = text.lines().peekable();
    if lines
        .peek()
        .is_some_and(|l| l.starts_with("-----BEGIN PGP SIGNED MESSAGE"))
    {
        // The armour's own header lines end at the first blank line.
        for l in lines.by_ref() {
            if l.trim().is_empty() {
                break;
            }
        }
    }
    let mut date = None;
    let mut h = Sha256::new();
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            break;
        };
        // The first checksum list (`MD5Sum:`, `SHA256:`) has its entries on the
        // following lines: the fields of interest are all before it.
        if l.starts_with([' ', '\t']) || v.trim().is_empty() {
            break;
        }
        if k == "Date" {
            date = Some(v.trim().to_string());
        }
        h.update(l.trim_end().as_bytes());
        h.update(b"\n");
    }
    let sum = hex(&h.finalize()[..8]);
    date.map(|d| format!("{d} ({sum})"))
}

/// The Date part of a state made by `release_state`.
pub fn state_date(state: &str) -> &str {
    state.rsplit_once(" (").map_or(state, |(d, _)| d)
}

/// Why a Release file could not be read.
enum FetchError {
    /// The server answered that there is no such file.
    NotFound,
    Failed(String),
}

/// The start of a Release file (`RELEASE_HEAD` bytes, or all of it with `whole`).
fn fetch(url: &str, whole: bool, ca: Option<&Path>) -> Result<Vec<u8>, FetchError> {
    if let Some(path) = url
        .strip_prefix("file://")
        .or_else(|| url.strip_prefix("file:"))
    {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => FetchError::NotFound,
            _ => FetchError::Failed(format!("{path}: {e}")),
        })?;
        let mut buf = Vec::new();
        let limit = if whole { u64::MAX } else { RELEASE_HEAD };
        f.take(limit)
            .read_to_end(&mut buf)
            .map_err(|e| FetchError::Failed(format!("{path}: {e}")))?;
        return Ok(buf);
    }
    let mut c;
    if crate::host::cmd::in_path("curl") {
        c = std::process::Command::new("curl");
        c.args(["-sS", "-f", "-L", "--connect-timeout"])
            .arg(STATE_CONNECT_SECS.to_string())
            .arg("--max-time")
            .arg(STATE_MAX_SECS.to_string());
        if !whole {
            c.arg("-r").arg(format!("0-{}", RELEASE_HEAD - 1));
        }
        if let Some(ca) = ca {
            c.arg("--cacert").arg(ca);
        }
    } else if crate::host::cmd::in_path("wget") {
        c = std::process::Command::new("wget");
        c.args(["-q", "-O", "-", "--tries=1"])
            .arg(format!("--timeout={STATE_CONNECT_SECS}"));
        if !whole {
            c.arg(format!("--header=Range: bytes=0-{}", RELEASE_HEAD - 1));
        }
        if let Some(ca) = ca {
            c.arg(format!("--ca-certificate={}", ca.display()));
        }
    } else {
        return Err(FetchError::Failed(
            "neither curl nor wget is installed".into(),
        ));
    }
    let out = c
        .arg(url)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| FetchError::Failed(format!("running {:?}: {e}", c.get_program())))?;
    // curl's 22 (with -f) and wget's 8: the server answered with an error such as 404.
    match out.status.code() {
        Some(0) => Ok(out.stdout),
        Some(22) if c.get_program() == "curl" => Err(FetchError::NotFound),
        Some(8) if c.get_program() == "wget" => Err(FetchError::NotFound),
        code => {
            let err = String::from_utf8_lossy(&out.stderr);
            let msg = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
            Err(FetchError::Failed(if msg.is_empty() {
                format!("{:?} exited with {code:?}", c.get_program())
            } else {
                msg.trim().to_string()
            }))
        }
    }
}

/// The state of one archive: its InRelease file, else its Release file.
pub fn archive_state(a: &Archive) -> Result<String, String> {
    for name in ["InRelease", "Release"] {
        let url = format!("{}/{name}", a.url);
        match fetch(&url, false, a.ca.as_deref()) {
            Ok(head) => {
                if let Some(s) = release_state(&head) {
                    return Ok(s);
                }
                // No Date among the fields: the whole file stands for the state.
                let all = fetch(&url, true, a.ca.as_deref()).map_err(|e| match e {
                    FetchError::NotFound => format!("{url} went away"),
                    FetchError::Failed(m) => m,
                })?;
                let sum = hex(&Sha256::digest(&all)[..8]);
                return Ok(format!("undated ({sum})"));
            }
            Err(FetchError::NotFound) => continue,
            Err(FetchError::Failed(m)) => return Err(m),
        }
    }
    Err(format!("{}: no InRelease or Release file", a.url))
}

/// The states of several archives, looked up at the same time.
pub fn archive_states(archives: &[Archive]) -> Vec<Result<String, String>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = archives
            .iter()
            .map(|a| s.spawn(|| archive_state(a)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("looking up the archive failed".into()))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
# a comment
Types: deb-src
URIs: http://src.example.org/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://security.example.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://other.example.org/node
Suites: nodistro
Components: main

Types: deb
URIs: http://off.example.org/debian
Suites: bookworm
Enabled: no

Types: deb deb-src
URIs: http://mirror.example.org/debian
 http://second.example.org/debian
Suites: bookworm bookworm-updates
Components: main
";

    #[test]
    fn deb822_takes_the_first_enabled_debian_deb_source() {
        assert_eq!(
            from_deb822(DEB822).as_deref(),
            Some("http://mirror.example.org/debian")
        );
        assert_eq!(
            from_deb822("Types: deb\nURIs: http://x.example.org/\nSuites: bookworm-security\n"),
            None
        );
        assert_eq!(from_deb822(""), None);
    }

    #[test]
    fn one_line_format_skips_options_security_and_others() {
        let text = "\
deb-src http://src.example.org/debian bookworm main
deb http://sec.example.org/debian-security bookworm-security main
deb https://cloud.example.org/apt cloud-sdk-bookworm main
# deb http://commented.example.org/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example.org/debian trixie main
deb http://later.example.org/debian bookworm main
";
        assert_eq!(
            from_one_line(text).as_deref(),
            Some("http://mirror.example.org/debian")
        );
        assert_eq!(
            from_one_line("deb http://old.example.org/debian-security buster/updates main"),
            None
        );
    }

    #[test]
    fn host_files_in_order_then_sources_list() {
        let etc = tempfile::tempdir().unwrap();
        let d = etc.path().join("apt/sources.list.d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            etc.path().join("apt/sources.list"),
            "deb http://list.example.org/debian sid main\n",
        )
        .unwrap();
        assert_eq!(
            host_default_in(etc.path()).as_deref(),
            Some("http://list.example.org/debian")
        );
        std::fs::write(
            d.join("b.sources"),
            "Types: deb\nURIs: http://b.example.org/debian\nSuites: stable\n",
        )
        .unwrap();
        std::fs::write(
            d.join("a.list.disabled"),
            "deb http://disabled.example.org/debian stable main\n",
        )
        .unwrap();
        assert_eq!(
            host_default_in(etc.path()).as_deref(),
            Some("http://b.example.org/debian")
        );
    }

    #[test]
    fn file_mirror_is_checked_on_disk() {
        let m = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(m.path().join("dists/bookworm")).unwrap();
        std::fs::write(m.path().join("dists/bookworm/Release"), "x").unwrap();
        let url = format!("file://{}", m.path().display());
        check_suite(&url, "bookworm").unwrap();
        let e = check_suite(&url, "bookwrm").unwrap_err().to_string();
        assert_eq!(
            e,
            format!("suite 'bookwrm' not found at {url} (no dists/bookwrm/Release)")
        );
    }

    #[test]
    fn sources_in_one_line_and_deb822_text() {
        let script = "echo 'deb [signed-by=/k.gpg] http://m.example.org/debian bookworm-updates main' \
                      > \"$ROOT/etc/apt/sources.list.d/u.list\"\n\
                      # deb-src http://m.example.org/debian bookworm main\n\
                      deb file:/srv/repo ./\n\
                      deb cdrom:[x]/ bookworm main\n";
        assert_eq!(
            sources_in(script),
            [
                (
                    "http://m.example.org/debian".into(),
                    "bookworm-updates".into()
                ),
                ("file:/srv/repo".into(), "./".into()),
            ]
        );
        assert_eq!(
            sources_in(DEB822),
            [
                (
                    "http://security.example.org/debian-security".to_string(),
                    "bookworm-security".to_string()
                ),
                ("http://other.example.org/node".into(), "nodistro".into()),
                ("http://off.example.org/debian".into(), "bookworm".into()),
                ("http://mirror.example.org/debian".into(), "bookworm".into()),
                (
                    "http://mirror.example.org/debian".into(),
                    "bookworm-updates".into()
                ),
            ]
        );
        assert!(sources_in("apt-get install -y less\n").is_empty());
    }

    #[test]
    fn archive_urls() {
        assert_eq!(
            archive("http://m.example.org/debian/", "bookworm").url,
            "http://m.example.org/debian/dists/bookworm"
        );
        assert_eq!(
            archive("http://m.example.org/debian-security", "bookworm/updates").url,
            "http://m.example.org/debian-security/dists/bookworm/updates"
        );
        assert_eq!(archive("file:/srv/repo", "./").url, "file:/srv/repo");
    }

    const IN_RELEASE: &str = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n\
        Origin: Debian\nSuite: stable\nVersion: 12.10\nCodename: bookworm\n\
        Date: Sat, 15 Mar 2025 10:05:43 UTC\nArchitectures: amd64\n\
        Description: Debian 12.10 Released 15 March 2025\nMD5Sum:\n \
        0ed6d4c8891eb86358b94bb35d9e4da4  1484322 contrib/Contents-all\n";

    #[test]
    fn release_state_is_its_date_and_a_hash_of_its_fields() {
        let s = release_state(IN_RELEASE.as_bytes()).unwrap();
        assert!(s.starts_with("Sat, 15 Mar 2025 10:05:43 UTC ("), "{s}");
        assert_eq!(state_date(&s), "Sat, 15 Mar 2025 10:05:43 UTC");
        // A plain Release file with the same fields: the same state.
        let plain = IN_RELEASE.split_once("\n\n").unwrap().1;
        assert_eq!(release_state(plain.as_bytes()), Some(s.clone()));
        // Only the checksums after the fields differ: the fields decide.
        let more = format!("{IN_RELEASE} 1ed4eee5ea09e2dfae1997ef5c8290ce   840868 x\n");
        assert_eq!(release_state(more.as_bytes()), Some(s.clone()));
        // Another publication of the same version.
        let next = IN_RELEASE.replace("10:05:43", "22:11:02");
        let n = release_state(next.as_bytes()).unwrap();
        assert_ne!(n, s);
        assert_eq!(state_date(&n), "Sat, 15 Mar 2025 22:11:02 UTC");
        assert_eq!(release_state(b"Origin: x\nSuite: y\n"), None);
    }

    /// Serve files below `dir` over HTTP/1.1 on 127.0.0.1 (one request per
    /// connection, no Range support: the whole file as curl may also get); returns the
    /// base URL.
    fn serve(dir: std::path::PathBuf) -> String {
        use std::io::{BufRead, BufReader, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let mut r = BufReader::new(conn);
                let mut first = String::new();
                r.read_line(&mut first).unwrap_or(0);
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/");
                let mut conn = r.into_inner();
                let reply = match std::fs::read(dir.join(path.trim_start_matches('/'))) {
                    Ok(body) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        [head.into_bytes(), body].concat()
                    }
                    Err(_) => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = conn.write_all(&reply);
            }
        });
        url
    }

    #[test]
    fn archive_states_over_http_and_from_files() {
        if !crate::host::cmd::in_path("curl") {
            println!("skipped: needs curl");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let dists = d.path().join("debian/dists");
        std::fs::create_dir_all(dists.join("bookworm")).unwrap();
        std::fs::create_dir_all(dists.join("bookworm-updates")).unwrap();
        std::fs::write(dists.join("bookworm/InRelease"), IN_RELEASE).unwrap();
        // Only a Release file, without a Date: the hash of the whole file stands for it.
        std::fs::write(
            dists.join("bookworm-updates/Release"),
            "Origin: x\nSuite: y\n",
        )
        .unwrap();
        let base = serve(d.path().to_path_buf());
        let want = release_state(IN_RELEASE.as_bytes()).unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let archives = [
            archive(&format!("{base}/debian"), "bookworm"),
            archive(&format!("{base}/debian"), "bookworm-updates"),
            archive(&format!("{base}/debian"), "trixie"),
            archive(&closed, "bookworm"),
            archive(&format!("file://{}/debian", d.path().display()), "bookworm"),
        ];
        let t = std::time::Instant::now();
        let got = archive_states(&archives);
        assert!(
            t.elapsed().as_secs() < STATE_MAX_SECS as u64,
            "{:?}",
            t.elapsed()
        );
        assert_eq!(got[0], Ok(want.clone()));
        let undated = got[1].as_ref().unwrap();
        assert!(undated.starts_with("undated ("), "{undated}");
        assert_eq!(
            got[2],
            Err(format!(
                "{base}/debian/dists/trixie: no InRelease or Release file"
            ))
        );
        let refused = got[3].as_ref().unwrap_err();
        assert!(refused.starts_with("curl: (7) "), "{refused}");
        assert_eq!(got[4], Ok(want));
    }
}

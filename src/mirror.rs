//! The Debian mirror to bootstrap from when a spec names none: the host's own apt
//! configuration, and a quick reachability check of a mirror and suite.

use std::path::Path;

use anyhow::{Result, bail};

use crate::cmd::Cmd;

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
    if crate::app::in_path("curl") {
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
    if crate::app::in_path("wget") {
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
}

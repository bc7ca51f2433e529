//! Generate vmdb's man pages and shell completions from its clap command line.
//!
//!     cargo run --example vmdb-docs -- OUTDIR
//!
//! writes OUTDIR/man/vmdb.1 (with a page per subcommand), OUTDIR/man/vmdb2.1 (vmdb run
//! as vmdb2), and
//! OUTDIR/completions/{vmdb.bash,_vmdb,vmdb.fish}. debian/rules runs it at package build
//! time; tests/man_page.rs checks what it writes. It is an example target so that
//! clap_mangen and clap_complete stay dev-dependencies, out of the vmdb binary.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

/// The sections added after the ones clap_mangen writes (roff source), by page: the
/// page's name without ".1". Every page gets EXIT STATUS, EXAMPLES and SEE ALSO;
/// ENVIRONMENT and FILES where something applies. SEE ALSO is made by `see_also`.
fn extra_sections(page: &str) -> String {
    match page {
        "vmdb" => BUILD.to_string(),
        "vmdb-validate" => VALIDATE.to_string(),
        "vmdb-boot" => BOOT.to_string(),
        "vmdb-cache" => [CACHE_EXIT, CACHE_ENV, CACHE_EXAMPLES].concat(),
        "vmdb-cache-list" => [CACHE_EXIT, CACHE_ENV, CACHE_LIST_EXAMPLES].concat(),
        "vmdb-cache-prune" => [CACHE_EXIT, CACHE_ENV, CACHE_PRUNE_EXAMPLES].concat(),
        _ => String::new(),
    }
}

const BUILD: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
The build succeeded: every output was written back to its disk, checked, and put
in place.
.TP
\fB1\fR
The build failed: every started step was torn down in reverse order and the
image was removed (kept as IMAGE.failed with \fB\-\-keep\-failed\fR); an older file
at the output is left as it was. A write the kernel lost (a full disk under the
image) and a signal (SIGINT, SIGTERM, SIGHUP) at any moment before the outputs are
put in place are failures too.
.TP
\fB2\fR
Nothing was done: a usage error, a mistake in the spec, or an output that cannot be
written (a character device, a named pipe, a socket, a symbolic link to anything but
a block device, a block device in use, or an output another vmdb is building).
.SH ENVIRONMENT
.TP
\fBVMDB_CACHE_DIR\fR
The cache directory when \fB\-\-cache\-dir\fR is not given (default
\fI/var/cache/vmdb\fR).
.TP
\fBTMPDIR\fR
Where a build makes its scratch directory (\fIvmdb\-build\-PID\fR: mount points and
temporary files; default \fI/tmp\fR). Programs run in the image do not see it.
.TP
\fBhttp_proxy\fR, \fBhttps_proxy\fR, \fBno_proxy\fR (and in capitals)
The proxy for downloads: curl or wget reading the archive's Release files for the
step cache, debootstrap and mmdebstrap, and, passed on to the programs run in the
image, apt. No other variable of the host reaches the image.
.TP
\fBVMDB_QEMU\fR
The qemu program \fBvmdb boot\fR runs (see \fBvmdb\-boot\fR(1)).
.SH FILES
.TP
\fI/var/cache/vmdb/steps/\fR
The step cache: the image tree after each expensive step, restored by the next build
of the same spec (see \fBvmdb\-cache\fR(1)).
.TP
\fI/var/cache/vmdb/debs/\fR
Downloaded packages, shared by every build on the machine.
.TP
\fI/run/vmdb/\fR
The locks of the outputs being built, and the builds in flight with their temporary
files, so that the next build removes what a killed one left behind.
.TP
\fI/etc/apt/sources.list.d/\fR, \fI/etc/apt/sources.list\fR
The host's apt sources: the Debian mirror of a debootstrap step without \fBmirror\fR.
.TP
\fIIMAGE.sha256\fR, \fIIMAGE.manifest.json\fR
Written with \fB\-\-checksums\fR and \fB\-\-manifest\fR; a build that writes none
removes those an earlier build left beside the image it replaces.
.TP
\fI/usr/share/doc/vmdb/plugins/\fR
The reference page of every step type: its keys, defaults, teardown and an example.
.TP
\fI/usr/share/doc/vmdb/examples/\fR
Example specs that build bootable Debian images (BIOS, UEFI, and both).
.SH EXAMPLES
Build a bootable Debian image, caching the installed root filesystem for next time,
then boot it in qemu:
.PP
.RS
.nf
vmdb /usr/share/doc/vmdb/examples/bookworm\-bios.vmdb \-\-output bios.img \e
    \-\-rootfs\-tarball bookworm.tar.zst \-\-variable hostname=demo
vmdb boot bios.img
.fi
.RE
.PP
A compressed qcow2 image with its checksum and manifest:
.PP
.RS
.nf
vmdb spec.vmdb \-\-output debian.qcow2 \-\-format qcow2 \-\-compress \e
    \-\-checksums \-\-manifest
.fi
.RE
.PP
Four images from one spec, two at a time:
.PP
.RS
.nf
vmdb worker.vmdb \-\-output \(aq{{ suite }}\-{{ arch }}.img\(aq \e
    \-\-matrix suite=bookworm,trixie \-\-matrix arch=amd64,i386 \-j 2
.fi
.RE
"#;

const VALIDATE: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
The spec is valid; its plan is printed (warnings, such as a template variable in a
shell script without the quote filter, do not change this).
.TP
\fB2\fR
A usage error, or problems in the spec: each is printed with its file, line, step
and key, all at once.
.SH FILES
.TP
\fI/etc/apt/sources.list.d/\fR, \fI/etc/apt/sources.list\fR
The host's apt sources: the Debian mirror of a debootstrap step without \fBmirror\fR.
.SH EXAMPLES
Check a spec and print its plan:
.PP
.RS
.nf
vmdb validate /usr/share/doc/vmdb/examples/bookworm\-bios.vmdb
.fi
.RE
.PP
Check it as it will be built, with its variables:
.PP
.RS
.nf
vmdb validate spec.vmdb \-\-output web.img \-\-variable hostname=web1
.fi
.RE
"#;

const BOOT: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
The image booted, the login worked, the command exited 0 and the machine powered
off.
.TP
\fB1\fR
Anything else: qemu failed or is missing, the timeout passed, the login was refused,
or the command failed. The end of the console log says what was seen.
.TP
\fB2\fR
A usage error.
.SH ENVIRONMENT
.TP
\fBVMDB_QEMU\fR
The qemu program to run instead of \fBqemu\-system\-ARCH\fR from PATH (a wrapper, or
a qemu built elsewhere).
.SH FILES
.TP
\fIIMAGE.console.log\fR
The console of the boot, beside the image (see \fB\-\-console\-log\fR).
.TP
\fI/usr/share/OVMF/\fR, \fI/usr/share/AAVMF/\fR
The UEFI firmware for \fB\-\-uefi\fR and aarch64 (packages ovmf and
qemu\-efi\-aarch64).
.SH EXAMPLES
Boot an image, check that it is Debian 12, and keep the image unchanged:
.PP
.RS
.nf
vmdb boot bios.img \-\-snapshot \-\-run \(aqgrep VERSION_ID=.12. /etc/os\-release\(aq
.fi
.RE
.PP
Boot a UEFI image with a cloud\-init seed attached:
.PP
.RS
.nf
vmdb boot cloud.qcow2 \-\-uefi \-\-drive seed.iso \-\-run \(aqcloud\-init status \-\-wait\(aq
.fi
.RE
"#;

const CACHE_EXIT: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Done.
.TP
\fB1\fR
The cache directory could not be read or changed.
.TP
\fB2\fR
A usage error.
"#;

const CACHE_ENV: &str = r#".SH ENVIRONMENT
.TP
\fBVMDB_CACHE_DIR\fR
The cache directory when \fB\-\-cache\-dir\fR is not given (default
\fI/var/cache/vmdb\fR).
.SH FILES
.TP
\fI/var/cache/vmdb/steps/\fR
The step cache: \fIKEY.tar.zst\fR, an image tree, with its record \fIKEY.json\fR.
.TP
\fI/var/cache/vmdb/debs/\fR
The package cache: the .deb files builds downloaded.
"#;

const CACHE_EXAMPLES: &str = r#".SH EXAMPLES
.RS
.nf
vmdb cache list
vmdb cache prune \-\-max\-size 20G \-\-older\-than 30d
.fi
.RE
"#;

const CACHE_LIST_EXAMPLES: &str = r#".SH EXAMPLES
List the cache of the test suite rather than the machine's:
.PP
.RS
.nf
vmdb cache list \-\-cache\-dir target/tmp/cache
.fi
.RE
"#;

const CACHE_PRUNE_EXAMPLES: &str = r#".SH EXAMPLES
Keep at most 20 GiB of image trees, none older than 30 days:
.PP
.RS
.nf
vmdb cache prune \-\-max\-size 20G \-\-older\-than 30d
.fi
.RE
.PP
Remove only what interrupted saves left, and empty the package cache:
.PP
.RS
.nf
vmdb cache prune \-\-packages
.fi
.RE
"#;

/// Pages of other packages named in SEE ALSO (the programs vmdb runs).
const OTHER_PAGES: &[(&str, &str)] =
    &[("debootstrap", "8"), ("mmdebstrap", "1"), ("qemu-img", "1")];

/// SEE ALSO: the other pages written here, and the pages of the programs vmdb runs.
fn see_also(page: &str, pages: &[String]) -> String {
    let roff = |s: &str| s.replace('-', "\\-");
    let refs: Vec<String> = pages
        .iter()
        .filter(|p| p.as_str() != page)
        .map(|p| format!("\\fB{}\\fR(1)", roff(p)))
        .chain(
            OTHER_PAGES
                .iter()
                .map(|(p, s)| format!("\\fB{}\\fR({s})", roff(p))),
        )
        .collect();
    format!(".SH \"SEE ALSO\"\n{}\n", refs.join(", "))
}

/// The date for the pages' title line: SOURCE_DATE_EPOCH (set by dpkg-buildpackage from
/// debian/changelog) as YYYY-MM-DD, so that a rebuild gives the same bytes; none without it.
fn page_date() -> Option<String> {
    let secs: i64 = std::env::var("SOURCE_DATE_EPOCH")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(utc_date(secs))
}

/// Seconds since the epoch as a UTC date YYYY-MM-DD (proleptic Gregorian calendar).
pub fn utc_date(secs: i64) -> String {
    let z = secs.div_euclid(86400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn man(cmd: clap::Command, date: Option<&str>) -> clap_mangen::Man {
    let man = clap_mangen::Man::new(cmd)
        .source(format!("vmdb {}", env!("CARGO_PKG_VERSION")))
        .manual("vmdb manual");
    match date {
        Some(d) => man.date(d),
        None => man,
    }
}

/// The commands that get a page, with the page's name: vmdb and every subcommand, at
/// every depth (vmdb-cache-prune), in order.
fn commands(cmd: &clap::Command) -> Vec<(String, clap::Command)> {
    // After build(), a subcommand's display name is "vmdb-NAME" ("vmdb-cache-prune").
    let name = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
    let mut out = vec![(name, cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        out.extend(commands(sub));
    }
    out
}

/// Write a page for vmdb and for every subcommand into `dir`, dated `date` (none if
/// None); returns the files written.
pub fn man_pages(dir: &Path, date: Option<&str>) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = vmdb::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let pages = commands(&cmd);
    let names: Vec<String> = pages.iter().map(|(n, _)| n.clone()).collect();
    let mut written = Vec::new();
    for (name, c) in pages {
        let mut page = Vec::new();
        man(c, date).render(&mut page)?;
        page.extend_from_slice(extra_sections(&name).as_bytes());
        page.extend_from_slice(see_also(&name, &names).as_bytes());
        let path = dir.join(format!("{name}.1"));
        std::fs::File::create(&path)?.write_all(&page)?;
        written.push(path);
    }
    Ok(written)
}

/// The page of vmdb run as vmdb2 (the vmdb-vmdb2 package's /usr/bin/vmdb2).
const VMDB2: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
The build succeeded and the image is in place.
.TP
\fB1\fR
The build failed: every started step was torn down, and what vmdb made (an image
made by \fBmkimg\fR, a second disk named after it) was removed. A file or device
given with \fB\-\-image\fR that the spec builds into in place is left as the
build left it.
.TP
\fB2\fR
Nothing was done: a usage error or a mistake in the spec.
.SH ENVIRONMENT
.TP
\fBVMDB_CACHE_DIR\fR
As vmdb2, vmdb keeps no step cache under this name, unless this variable names a
cache directory (see \fBvmdb\fR(1)).
.TP
\fBTMPDIR\fR
Where a build makes its scratch directory (default \fI/tmp\fR).
.SH EXAMPLES
What autopkgtest\-build\-qemu runs:
.PP
.RS
.nf
vmdb2 \-\-verbose \-\-image=IMG.raw \-\-log=IMG.log vmdb2.yaml
.fi
.RE
.SH "SEE ALSO"
\fBvmdb\fR(1), \fBautopkgtest\-build\-qemu\fR(1)
"#;

/// Write vmdb2.1, the page of vmdb run as vmdb2 (its own command line), into `dir`.
pub fn vmdb2_page(dir: &Path, date: Option<&str>) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut page = Vec::new();
    man(vmdb::cli::Vmdb2Cli::command(), date).render(&mut page)?;
    page.extend_from_slice(VMDB2.as_bytes());
    let path = dir.join("vmdb2.1");
    std::fs::File::create(&path)?.write_all(&page)?;
    Ok(path)
}

/// Write completions for bash (vmdb.bash), zsh (_vmdb) and fish (vmdb.fish) into `dir`.
pub fn completions(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = vmdb::cli::Cli::command();
    [Shell::Bash, Shell::Zsh, Shell::Fish]
        .into_iter()
        .map(|shell| clap_complete::generate_to(shell, &mut cmd, "vmdb", dir))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out] = args.as_slice() else {
        eprintln!("usage: vmdb-docs OUTDIR");
        std::process::exit(2);
    };
    let out = Path::new(out);
    let date = page_date();
    let result = man_pages(&out.join("man"), date.as_deref()).and_then(|mut files| {
        files.push(vmdb2_page(&out.join("man"), date.as_deref())?);
        files.extend(completions(&out.join("completions"))?);
        Ok(files)
    });
    match result {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
        }
        Err(e) => {
            eprintln!("vmdb-docs: {e}");
            std::process::exit(1);
        }
    }
}

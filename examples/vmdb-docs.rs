//! Generate vmdb's man pages and shell completions from its clap command line.
//!
//!     cargo run --example vmdb-docs -- OUTDIR
//!
//! writes OUTDIR/man/vmdb.1 (with a page per subcommand), and
//! OUTDIR/completions/{vmdb.bash,_vmdb,vmdb.fish}. debian/rules runs it at package build
//! time; tests/man_page.rs checks what it writes. It is an example target so that
//! clap_mangen and clap_complete stay dev-dependencies, out of the vmdb binary.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

/// Sections added to vmdb.1 after the ones clap_mangen writes. Roff source.
const EXTRA: &str = r#".SH "EXIT STATUS"
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
.SH EXAMPLES
Check a spec and print its plan:
.PP
.RS
.nf
vmdb validate /usr/share/doc/vmdb/examples/bookworm\-bios.vmdb
.fi
.RE
.PP
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
.SH FILES
.TP
\fI/usr/share/doc/vmdb/plugins/\fR
The reference page of every step type: its keys, defaults, teardown and an example.
.TP
\fI/usr/share/doc/vmdb/examples/\fR
Example specs that build bootable Debian images (BIOS, UEFI, and both).
.TP
\fI/run/vmdb/\fR
The locks of the outputs being built, and the builds in flight with their temporary
files, so that the next build removes what a killed one left behind.
.SH "SEE ALSO"
\fBvmdb\-validate\fR(1), \fBvmdb\-boot\fR(1), \fBvmdb\-cache\fR(1), \fBdebootstrap\fR(8), \fBqemu\-img\fR(1)
"#;

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

/// Write vmdb.1 and one page per subcommand into `dir`, dated `date` (none if None);
/// returns the files written.
pub fn man_pages(dir: &Path, date: Option<&str>) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = vmdb::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    let top = man(cmd.clone(), date);
    let path = dir.join(top.get_filename());
    let mut page = Vec::new();
    top.render(&mut page)?;
    page.extend_from_slice(EXTRA.as_bytes());
    std::fs::File::create(&path)?.write_all(&page)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // After build(), a subcommand's display name is "vmdb-NAME".
        written.push(man(sub.clone(), date).generate_to(dir)?);
    }
    Ok(written)
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

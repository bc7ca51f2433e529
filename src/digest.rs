//! SHA-256 (the sha2 crate), the one checksum vmdb uses: of outputs, step cache entries
//! and keys, packages, archive states, lock names.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
pub use sha2::{Digest, Sha256};

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `data`, in hexadecimal.
pub fn sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Add what is left to read in `r` to `h`, each block also handed to `also` (to copy
/// it, say) as it is read.
pub fn update_from(
    h: &mut Sha256,
    r: &mut impl Read,
    mut also: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
        also(&buf[..n])?;
    }
}

/// The SHA-256 of what is left to read in `r`, each block also handed to `also` as it
/// is read.
pub fn sha256_of_stream(
    r: &mut impl Read,
    also: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<String> {
    let mut h = Sha256::new();
    update_from(&mut h, r, also)?;
    Ok(hex(&h.finalize()))
}

/// The SHA-256 of what is left to read in `r`.
pub fn sha256_reader(r: &mut impl Read) -> std::io::Result<String> {
    sha256_of_stream(r, |_| Ok(()))
}

/// The SHA-256 of the file at `p`.
pub fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
    sha256_reader(&mut f).with_context(|| format!("reading {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sums() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256(b"abc"), abc);
        assert_eq!(sha256_reader(&mut &b"abc"[..]).unwrap(), abc);
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "abc").unwrap();
        assert_eq!(sha256_file(&d.path().join("f")).unwrap(), abc);
        let mut copy = Vec::new();
        let sum = sha256_of_stream(&mut &b"abc"[..], |b| {
            copy.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!((sum.as_str(), copy.as_slice()), (abc, &b"abc"[..]));
    }
}

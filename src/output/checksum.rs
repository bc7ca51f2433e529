//! SHA-256 checksums of the outputs.

use std::path::Path;

use anyhow::{Result, bail};

use crate::host::cmd::Cmd;

pub fn sha256_file(p: &Path) -> Result<String> {
    let out = Cmd::new("sha256sum").arg("--binary").arg(p).run()?;
    first_word(&out)
}

pub fn sha256_bytes(data: &[u8]) -> Result<String> {
    let out = Cmd::new("sha256sum").stdin(data.to_vec()).run()?;
    first_word(&out)
}

fn first_word(out: &str) -> Result<String> {
    let w = out.split_whitespace().next().unwrap_or("").to_string();
    if w.len() != 64 {
        bail!("unexpected output of sha256sum: {out}");
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_bytes() {
        assert_eq!(
            sha256_bytes(b"abc").unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

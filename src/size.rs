//! Image sizes as mkimg takes them ("4G", "512M", "300MiB"), with qemu-img's meaning:
//! a bare K, M, G or T suffix is binary (300M is 300 MiB).

/// Parse a size in bytes; the error says what is expected.
pub fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!(
            "'{s}' is not a size: expected a number with an optional unit, like 4G, 512M, 300MiB or 10GB"
        )
    };
    if num.is_empty() {
        return Err(bad());
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "k" | "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = n * mult as f64;
    if bytes < 1.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("'{s}' is not a usable size"));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_follow_qemu_img() {
        assert_eq!(parse("4G"), Ok(4 << 30));
        assert_eq!(parse("300M"), Ok(300 << 20));
        assert_eq!(parse("300MiB"), Ok(300 << 20));
        assert_eq!(parse("1.5G"), Ok(3 << 29));
        assert_eq!(parse("10GB"), Ok(10_000_000_000));
        assert_eq!(parse("1048576"), Ok(1 << 20));
    }

    #[test]
    fn bad_sizes() {
        for s in ["", "G", "4Q", "-1G", "0", "four"] {
            assert!(parse(s).is_err(), "{s}");
        }
        assert!(parse("4Q").unwrap_err().contains("like 4G, 512M"));
    }
}

//! Byte sizes on the command line (`16GiB`, `512MiB`, `4G`, `1048576`) and in tables.

/// Errors from [`parse_size`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a whole number with an optional unit.
    #[error(
        "Size {0:?} is not a whole number of bytes with an optional unit (KiB, MiB, GiB, TiB; \
         K, M, G, T and KB, MB, GB, TB mean the same)"
    )]
    Malformed(String),
    /// More than `u64::MAX` bytes.
    #[error("Size {0:?} is too large")]
    TooLarge(String),
}

const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];

/// Parses a byte count with an optional binary unit: `16GiB`, `16G`, `16gb`, `512MiB`, `2048`,
/// `2048B`. All units are powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let malformed = || SizeError::Malformed(text.to_owned());
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(malformed());
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(malformed()),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| SizeError::TooLarge(text.to_owned()))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(text.to_owned()))
}

/// Writes `bytes` in the largest binary unit it reaches: exact sizes as `16GiB`, others with one
/// decimal (`1.5GiB`), below 1 KiB as `512B`.
pub fn format_size(bytes: u64) -> String {
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if bytes.is_multiple_of(scale) {
        format!("{}{}", bytes / scale, UNITS[unit])
    } else {
        // Lossy on purpose: a table cell, not a value to parse back.
        #[allow(clippy::cast_precision_loss)]
        let value = bytes as f64 / scale as f64;
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_units_parse_in_every_spelling() {
        assert_eq!(parse_size("16GiB").unwrap(), 16 << 30);
        assert_eq!(parse_size("16G").unwrap(), 16 << 30);
        assert_eq!(parse_size("16gb").unwrap(), 16 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
        assert_eq!(parse_size("2048").unwrap(), 2048);
        assert_eq!(parse_size("2048B").unwrap(), 2048);
        assert_eq!(parse_size("0").unwrap(), 0);
    }

    #[test]
    fn malformed_sizes_are_refused_with_the_text() {
        for text in [
            "", "GiB", "1.5GiB", "-1G", "16 GiB", "16XiB", "0x10", "16GiBs",
        ] {
            assert_eq!(
                parse_size(text),
                Err(SizeError::Malformed(text.to_owned())),
                "{text:?}"
            );
        }
    }

    #[test]
    fn sizes_beyond_u64_are_too_large() {
        assert_eq!(
            parse_size("16777216TiB"),
            Err(SizeError::TooLarge("16777216TiB".to_owned()))
        );
        assert_eq!(
            parse_size("99999999999999999999"),
            Err(SizeError::TooLarge("99999999999999999999".to_owned()))
        );
    }

    #[test]
    fn sizes_format_in_the_largest_unit_reached() {
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(512), "512B");
        assert_eq!(format_size(16 << 30), "16GiB");
        assert_eq!(format_size(512 << 20), "512MiB");
        assert_eq!(format_size(3 << 29), "1.5GiB");
        assert_eq!(format_size(2 << 40), "2TiB");
        assert_eq!(format_size(1 << 50), "1024TiB");
    }

    #[test]
    fn formatted_exact_sizes_parse_back() {
        for bytes in [0, 1, 1024, 16 << 30, 80 << 30, 512 << 20] {
            assert_eq!(parse_size(&format_size(bytes)).unwrap(), bytes);
        }
    }
}

//! Guest memory sizes, as both VMMs want them on their command lines.

use std::fmt;
use std::str::FromStr;

const MIB: u64 = 1 << 20;

/// Errors from [`MemorySize`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// The text is not a number with an optional K, M, G or T suffix.
    #[error("Memory size {0:?} is not a number with an optional K, M, G or T suffix")]
    Malformed(String),
    /// Zero, not a whole number of MiB, or too large.
    #[error("Memory size of {0} bytes is not a whole, nonzero number of MiB")]
    NotWholeMib(u128),
}

/// A guest memory size: a whole, nonzero number of MiB.
///
/// Both VMMs take it with an `M` suffix (`4096M`): QEMU reads a bare `-m` number as MiB but a bare
/// `memory-backend-*` size as bytes, and cloud-hypervisor reads a bare number as bytes, so a suffix
/// everywhere keeps them from disagreeing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemorySize {
    mib: u64,
}

impl MemorySize {
    /// `mib` MiB; `None` for zero or a size whose byte count overflows `u64`.
    pub fn from_mib(mib: u64) -> Option<MemorySize> {
        (mib != 0 && mib.checked_mul(MIB).is_some()).then_some(MemorySize { mib })
    }

    /// `bytes` bytes, which must be a whole, nonzero number of MiB.
    pub fn from_bytes(bytes: u64) -> Result<MemorySize, SizeError> {
        if bytes == 0 || !bytes.is_multiple_of(MIB) {
            return Err(SizeError::NotWholeMib(u128::from(bytes)));
        }
        Ok(MemorySize { mib: bytes / MIB })
    }

    /// The size in MiB.
    pub fn mib(self) -> u64 {
        self.mib
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        // Cannot overflow: both constructors check it.
        self.mib.saturating_mul(MIB)
    }
}

/// `4096M`: what both VMMs parse as 4096 MiB.
impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}M", self.mib)
    }
}

/// Parses `4G`, `512M`, `1048576K`, `1T` or a byte count (`4294967296`); suffixes are binary.
impl FromStr for MemorySize {
    type Err = SizeError;

    fn from_str(text: &str) -> Result<MemorySize, SizeError> {
        let malformed = || SizeError::Malformed(text.to_owned());
        let trimmed = text.trim();
        let (digits, shift) = match trimmed.char_indices().last() {
            Some((at, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(malformed()),
                };
                (&trimmed[..at], shift)
            }
            _ => (trimmed, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        let value: u64 = digits.parse().map_err(|_| malformed())?;
        // A u64 shifted by at most 40 bits fits in a u128.
        let bytes = u128::from(value) << shift;
        let bytes = u64::try_from(bytes).map_err(|_| SizeError::NotWholeMib(bytes))?;
        MemorySize::from_bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixed_sizes_parse_to_mib() {
        assert_eq!("4G".parse::<MemorySize>().unwrap().mib(), 4096);
        assert_eq!("512M".parse::<MemorySize>().unwrap().mib(), 512);
        assert_eq!("2048k".parse::<MemorySize>().unwrap().mib(), 2);
        assert_eq!("1T".parse::<MemorySize>().unwrap().mib(), 1 << 20);
        assert_eq!("1073741824".parse::<MemorySize>().unwrap().mib(), 1024);
    }

    #[test]
    fn display_uses_the_m_suffix_both_vmms_read_as_mib() {
        assert_eq!(MemorySize::from_mib(4096).unwrap().to_string(), "4096M");
        assert_eq!(MemorySize::from_mib(1).unwrap().bytes(), 1 << 20);
    }

    #[test]
    fn sizes_that_are_not_whole_mib_are_refused() {
        assert_eq!(
            "1000".parse::<MemorySize>(),
            Err(SizeError::NotWholeMib(1000))
        );
        assert_eq!("0G".parse::<MemorySize>(), Err(SizeError::NotWholeMib(0)));
        assert!(MemorySize::from_mib(0).is_none());
        assert!(MemorySize::from_mib(u64::MAX).is_none());
        assert!(matches!(
            "99999999999T".parse::<MemorySize>(),
            Err(SizeError::NotWholeMib(_))
        ));
    }

    #[test]
    fn malformed_sizes_are_refused() {
        for text in ["", "G", "4X", "-1G", "1.5G", "4 G", "0x10M"] {
            assert_eq!(
                text.parse::<MemorySize>(),
                Err(SizeError::Malformed(text.to_owned())),
                "{text:?}"
            );
        }
    }
}

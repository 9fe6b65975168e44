//! NVIDIA fatbins: the container nvcc puts device code in (`.nv_fatbin`),
//! and the `__fatBinC_Wrapper_t` that points at one. Pure parsing, no I/O:
//! the guest uses it to size what it ships, the emulated backend to find the
//! PTX it can run. The input comes from a guest, so every offset and size is
//! checked and decompression is bounded.
//!
//! Layout (little-endian): a fatbin is a 16-byte header (magic
//! `0xBA55ED50`, version `u16`, header size `u16`, payload size `u64`)
//! followed by entries; an entry is a header (kind `u16`: 1 PTX, 2 ELF;
//! version `u16`; header size `u32`; payload size `u64`; compressed size
//! `u32`; ...; SM architecture `u32` at 28; flags `u64` at 40; uncompressed
//! size `u64` at 56) followed by its payload. A payload may be compressed
//! with LZ4 (flag `0x2000`, an LZ4 block) or Zstandard (flag `0x8000`, a
//! zstd frame); nvcc 13 compresses PTX by default.

mod lz4;
mod zstd;

use thiserror::Error;

/// `__fatBinC_Wrapper_t` magic.
pub const WRAPPER_MAGIC: u32 = 0x4662_43b1;
/// Fatbin header magic.
pub const FATBIN_MAGIC: u32 = 0xBA55_ED50;
/// Size of `__fatBinC_Wrapper_t` on 64-bit hosts.
pub const WRAPPER_SIZE: usize = 24;
/// Size of the fatbin header.
pub const HEADER_SIZE: usize = 16;
/// Smallest entry header.
pub const ENTRY_HEADER_SIZE: usize = 64;
/// Entry kind: PTX text.
pub const KIND_PTX: u16 = 1;
/// Entry kind: ELF cubin.
pub const KIND_ELF: u16 = 2;
/// Entry flag: the payload is an LZ4 block.
pub const FLAG_LZ4: u64 = 0x2000;
/// Entry flag: the payload is a Zstandard frame.
pub const FLAG_ZSTD: u64 = 0x8000;
/// The most bytes one entry may decompress to.
pub const MAX_DECOMPRESSED: usize = crate::MAX_MODULE_IMAGE as usize;

/// Why a fatbin (or wrapper, or compressed payload) was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FatbinError {
    /// Fewer bytes than a header or a size field claims.
    #[error("Fatbin is truncated: {0}")]
    Truncated(&'static str),
    /// A magic number or version is not one this parser knows.
    #[error("Fatbin {0} is not recognized")]
    BadMagic(&'static str),
    /// A header field is inconsistent.
    #[error("Fatbin header is invalid: {0}")]
    BadHeader(&'static str),
    /// The payload is compressed in a way this parser does not decode.
    #[error("Fatbin entry uses an unsupported compression (flags {0:#x})")]
    UnsupportedCompression(u64),
    /// The compressed payload is corrupt.
    #[error("Fatbin entry payload is corrupt: {0}")]
    Corrupt(&'static str),
    /// Decompression would exceed the size limit.
    #[error("Fatbin entry decompresses to more than {0} bytes")]
    TooLarge(usize),
    /// The fatbin has no PTX entry.
    #[error("Fatbin has no PTX entry")]
    NoPtx,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The fields of a `__fatBinC_Wrapper_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wrapper {
    /// 1, or 2 when `prelinked` lists relocatable fatbins.
    pub version: u32,
    /// Address of the fatbin (in the address space that built it).
    pub data: u64,
    /// Version 1: a file name or 0; version 2: a NULL-terminated array of
    /// prelinked fatbin addresses.
    pub prelinked: u64,
}

impl Wrapper {
    /// Parses the 24 bytes of a wrapper.
    pub fn parse(bytes: &[u8]) -> Result<Wrapper, FatbinError> {
        let field = |at| u64_at(bytes, at).ok_or(FatbinError::Truncated("wrapper"));
        if u32_at(bytes, 0) != Some(WRAPPER_MAGIC) {
            return Err(FatbinError::BadMagic("wrapper magic"));
        }
        let version = u32_at(bytes, 4).ok_or(FatbinError::Truncated("wrapper"))?;
        if !(1..=2).contains(&version) {
            return Err(FatbinError::BadMagic("wrapper version"));
        }
        Ok(Wrapper {
            version,
            data: field(8)?,
            prelinked: field(16)?,
        })
    }
}

/// One entry of a fatbin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// [`KIND_PTX`], [`KIND_ELF`] or another value.
    pub kind: u16,
    /// The SM architecture (75 for sm_75).
    pub arch: u32,
    /// Entry flags ([`FLAG_LZ4`], [`FLAG_ZSTD`], ...).
    pub flags: u64,
    /// Size after decompression (0 when not compressed).
    pub uncompressed_size: u64,
    /// The payload as stored (compressed or not; may carry padding).
    pub payload: &'a [u8],
}

impl Entry<'_> {
    /// True if the payload is compressed.
    pub fn is_compressed(&self) -> bool {
        self.flags & (FLAG_LZ4 | FLAG_ZSTD) != 0
    }

    /// The entry's contents, decompressed if needed, at most `limit` bytes.
    pub fn contents(&self, limit: usize) -> Result<Vec<u8>, FatbinError> {
        let expected = usize::try_from(self.uncompressed_size).unwrap_or(usize::MAX);
        if self.flags & FLAG_ZSTD != 0 {
            zstd::decompress(self.payload, limit.min(MAX_DECOMPRESSED))
        } else if self.flags & FLAG_LZ4 != 0 {
            if expected > limit.min(MAX_DECOMPRESSED) {
                return Err(FatbinError::TooLarge(limit));
            }
            lz4::decompress_block(self.payload, expected)
        } else {
            if self.payload.len() > limit {
                return Err(FatbinError::TooLarge(limit));
            }
            Ok(self.payload.to_vec())
        }
    }
}

/// A parsed fatbin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatbin<'a> {
    /// The entries, in order.
    pub entries: Vec<Entry<'a>>,
    /// Bytes the fatbin spans (header and payload).
    pub len: usize,
}

/// Parses the fatbin at the start of `bytes` (trailing bytes are ignored).
pub fn parse(bytes: &[u8]) -> Result<Fatbin<'_>, FatbinError> {
    if u32_at(bytes, 0) != Some(FATBIN_MAGIC) {
        return Err(FatbinError::BadMagic("header magic"));
    }
    let header_size = usize::from(u16_at(bytes, 6).ok_or(FatbinError::Truncated("header"))?);
    let payload_size = u64_at(bytes, 8).ok_or(FatbinError::Truncated("header"))?;
    if header_size < HEADER_SIZE {
        return Err(FatbinError::BadHeader("header size below 16"));
    }
    let len = usize::try_from(payload_size)
        .ok()
        .and_then(|n| n.checked_add(header_size))
        .filter(|len| *len <= bytes.len())
        .ok_or(FatbinError::Truncated("payload"))?;
    let mut rest = &bytes[header_size..len];
    let mut entries = Vec::new();
    while rest.len() >= ENTRY_HEADER_SIZE {
        let h = &rest[..ENTRY_HEADER_SIZE];
        let field32 = |at| u32_at(h, at).unwrap_or(0);
        let field64 = |at| u64_at(h, at).unwrap_or(0);
        let kind = u16_at(h, 0).unwrap_or(0);
        let entry_header = field32(4) as usize;
        let stored = field64(8);
        let compressed = u64::from(field32(16));
        let flags = field64(40);
        if entry_header < ENTRY_HEADER_SIZE {
            return Err(FatbinError::BadHeader("entry header size below 64"));
        }
        let end = usize::try_from(stored)
            .ok()
            .and_then(|n| n.checked_add(entry_header))
            .filter(|end| *end <= rest.len())
            .ok_or(FatbinError::Truncated("entry payload"))?;
        let data_len = if flags & (FLAG_LZ4 | FLAG_ZSTD) != 0 {
            if compressed > stored {
                return Err(FatbinError::BadHeader("compressed size above payload size"));
            }
            compressed as usize
        } else {
            stored as usize
        };
        entries.push(Entry {
            kind,
            arch: field32(28),
            flags,
            uncompressed_size: field64(56),
            payload: &rest[entry_header..entry_header + data_len],
        });
        rest = &rest[end..];
    }
    Ok(Fatbin { entries, len })
}

/// Parses consecutive fatbins (the contents of a `.nv_fatbin` section).
pub fn parse_all(mut bytes: &[u8]) -> Result<Vec<Fatbin<'_>>, FatbinError> {
    let mut all = Vec::new();
    while bytes.len() >= HEADER_SIZE && u32_at(bytes, 0) == Some(FATBIN_MAGIC) {
        let fatbin = parse(bytes)?;
        bytes = &bytes[fatbin.len..];
        all.push(fatbin);
    }
    Ok(all)
}

/// The PTX of the newest architecture in a fatbin, decompressed, without
/// trailing NULs.
pub fn extract_ptx(bytes: &[u8]) -> Result<Vec<u8>, FatbinError> {
    let fatbin = parse(bytes)?;
    let entry = fatbin
        .entries
        .iter()
        .filter(|e| e.kind == KIND_PTX)
        .max_by_key(|e| e.arch)
        .ok_or(FatbinError::NoPtx)?;
    let mut text = entry.contents(MAX_DECOMPRESSED)?;
    while text.last() == Some(&0) {
        text.pop();
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &[u8] = include_bytes!("../tests/fixtures/vectorAdd.nv_fatbin");
    const COMPRESSED: &[u8] = include_bytes!("../tests/fixtures/vectorAdd_c.nv_fatbin");
    const SEGMENT: &[u8] = include_bytes!("../tests/fixtures/vectorAdd.nvFatBinSegment");

    #[test]
    fn nvcc_section_holds_two_fatbins_with_two_cubins_and_one_ptx() {
        let all = parse_all(PLAIN).unwrap();
        assert_eq!(all.len(), 2);
        let kinds: Vec<(u16, u32)> = all
            .iter()
            .flat_map(|f| f.entries.iter().map(|e| (e.kind, e.arch)))
            .collect();
        assert_eq!(kinds, [(KIND_ELF, 75), (KIND_ELF, 75), (KIND_PTX, 75)]);
        assert_eq!(all[0].len, 16 + 1512);
        assert_eq!(all[0].len + all[1].len, PLAIN.len());
        let cubin = all[0].entries[0];
        assert!(!cubin.is_compressed());
        assert_eq!(&cubin.contents(1 << 20).unwrap()[..4], b"\x7fELF");
    }

    #[test]
    fn nvcc_ptx_is_zstd_compressed_and_decompresses_to_its_size() {
        let all = parse_all(PLAIN).unwrap();
        let ptx = all[1].entries[1];
        assert!(ptx.flags & FLAG_ZSTD != 0);
        let text = ptx.contents(1 << 20).unwrap();
        assert_eq!(text.len() as u64, ptx.uncompressed_size);
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains(".target sm_75"), "{text}");
        assert!(text.contains(".entry"), "{text}");
    }

    #[test]
    fn compressed_cubins_decompress_to_the_uncompressed_ones() {
        let plain = parse_all(PLAIN).unwrap();
        let packed = parse_all(COMPRESSED).unwrap();
        for (p, c) in plain.iter().zip(&packed) {
            for (pe, ce) in p.entries.iter().zip(&c.entries) {
                assert!(ce.is_compressed());
                let want = pe.contents(1 << 20).unwrap();
                let got = ce.contents(1 << 20).unwrap();
                assert_eq!(got.len() as u64, ce.uncompressed_size);
                if pe.is_compressed() {
                    assert_eq!(got, want);
                } else {
                    assert_eq!(got, pe.payload[..got.len()]);
                }
            }
        }
    }

    #[test]
    fn ptx_is_extracted_from_the_fatbin_that_has_it() {
        let all = parse_all(PLAIN).unwrap();
        assert_eq!(extract_ptx(PLAIN), Err(FatbinError::NoPtx));
        let second = &PLAIN[all[0].len..];
        let ptx = extract_ptx(second).unwrap();
        let text = String::from_utf8(ptx.clone()).unwrap();
        assert!(text.contains(".version"), "{text}");
        assert_ne!(ptx.last(), Some(&0));
        let compressed_second = &COMPRESSED[parse(COMPRESSED).unwrap().len..];
        assert_eq!(extract_ptx(compressed_second).unwrap(), ptx);
    }

    #[test]
    fn decompression_respects_the_limit() {
        let all = parse_all(PLAIN).unwrap();
        let ptx = all[1].entries[1];
        assert!(matches!(ptx.contents(100), Err(FatbinError::TooLarge(_))));
    }

    #[test]
    fn wrappers_from_the_nvcc_segment_parse() {
        let first = Wrapper::parse(&SEGMENT[..24]).unwrap();
        assert_eq!(first.version, 2);
        assert_eq!(first.data, 0x8f9c0);
        let second = Wrapper::parse(&SEGMENT[24..]).unwrap();
        assert_eq!((second.version, second.prelinked), (1, 0));
        assert_eq!(second.data - first.data, 1528);
        assert!(Wrapper::parse(&SEGMENT[..20]).is_err());
        let mut bad = SEGMENT[..24].to_vec();
        bad[4] = 3;
        assert_eq!(
            Wrapper::parse(&bad),
            Err(FatbinError::BadMagic("wrapper version"))
        );
    }

    #[test]
    fn truncated_or_inconsistent_fatbins_are_rejected() {
        assert!(parse(&PLAIN[..10]).is_err());
        assert_eq!(parse(&PLAIN[..100]), Err(FatbinError::Truncated("payload")));
        let mut bad = PLAIN.to_vec();
        bad[6] = 8;
        assert_eq!(
            parse(&bad),
            Err(FatbinError::BadHeader("header size below 16"))
        );
        let mut bad = PLAIN.to_vec();
        // First entry's payload size: far past the fatbin.
        bad[16 + 8..16 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(parse(&bad), Err(FatbinError::Truncated("entry payload")));
        let mut bad = PLAIN.to_vec();
        bad[16 + 4..16 + 8].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(parse(&bad), Err(FatbinError::BadHeader(_))));
        assert_eq!(parse(b"nope"), Err(FatbinError::BadMagic("header magic")));
    }

    #[test]
    fn corrupt_compressed_payloads_fail_without_panicking() {
        let all = parse_all(PLAIN).unwrap();
        let ptx = all[1].entries[1];
        let mut data = ptx.payload.to_vec();
        for i in (8..data.len()).step_by(7) {
            data[i] ^= 0x5a;
        }
        let corrupt = Entry {
            payload: &data,
            ..ptx
        };
        let _ = corrupt.contents(1 << 20);
        for cut in [0, 1, 5, 13, data.len() / 2] {
            let short = Entry {
                payload: &ptx.payload[..cut],
                ..ptx
            };
            assert!(short.contents(1 << 20).is_err());
        }
    }
}

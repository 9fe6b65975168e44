//! LZ4 block decompression (the raw block format, no frame): a series of
//! sequences, each a token (literal length in the high nibble, match length
//! minus 4 in the low one, 15 meaning "more bytes follow"), the literals,
//! and a 16-bit little-endian match offset; the last sequence has literals
//! only.

use super::FatbinError;

/// Reads an extended length: bytes are added while they are 255.
fn extend(input: &[u8], pos: &mut usize, mut len: usize) -> Result<usize, FatbinError> {
    loop {
        let b = *input
            .get(*pos)
            .ok_or(FatbinError::Corrupt("LZ4 length runs past the input"))?;
        *pos += 1;
        len = len
            .checked_add(usize::from(b))
            .ok_or(FatbinError::Corrupt("LZ4 length overflows"))?;
        if b != 255 {
            return Ok(len);
        }
    }
}

/// Decompresses an LZ4 block into at most `limit` bytes.
pub(super) fn decompress_block(input: &[u8], limit: usize) -> Result<Vec<u8>, FatbinError> {
    let mut out: Vec<u8> = Vec::with_capacity(limit.min(1 << 20));
    let mut pos = 0;
    while pos < input.len() {
        let token = input[pos];
        pos += 1;
        let mut literals = usize::from(token >> 4);
        if literals == 15 {
            literals = extend(input, &mut pos, literals)?;
        }
        let end = pos
            .checked_add(literals)
            .filter(|end| *end <= input.len())
            .ok_or(FatbinError::Corrupt("LZ4 literals run past the input"))?;
        if out.len() + literals > limit {
            return Err(FatbinError::TooLarge(limit));
        }
        out.extend_from_slice(&input[pos..end]);
        pos = end;
        if pos == input.len() {
            break;
        }
        let offset = match input.get(pos..pos + 2) {
            Some(b) => usize::from(u16::from_le_bytes([b[0], b[1]])),
            None => return Err(FatbinError::Corrupt("LZ4 offset is truncated")),
        };
        pos += 2;
        if offset == 0 || offset > out.len() {
            return Err(FatbinError::Corrupt("LZ4 offset is out of range"));
        }
        let mut length = usize::from(token & 15);
        if length == 15 {
            length = extend(input, &mut pos, length)?;
        }
        length += 4;
        if out.len() + length > limit {
            return Err(FatbinError::TooLarge(limit));
        }
        let start = out.len() - offset;
        for i in 0..length {
            let b = out[start + i];
            out.push(b);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_overlapping_matches_decode() {
        // "abc" then a match of 9 at offset 3, then literals "xy".
        let block = [0x35, b'a', b'b', b'c', 3, 0, 0x20, b'x', b'y'];
        assert_eq!(decompress_block(&block, 100).unwrap(), b"abcabcabcabcxy");
    }

    #[test]
    fn long_literal_and_match_lengths_use_extension_bytes() {
        let mut block = vec![0xff, 0];
        block.extend(std::iter::repeat_n(b'z', 15));
        block.extend([1, 0, 255, 1]);
        let out = decompress_block(&block, 1000).unwrap();
        assert_eq!(out.len(), 15 + 15 + 4 + 256);
        assert!(out.iter().all(|b| *b == b'z'));
    }

    #[test]
    fn bad_offsets_truncation_and_limits_are_errors() {
        assert!(decompress_block(&[0x10, b'a', 0, 0], 10).is_err());
        assert!(decompress_block(&[0x10, b'a', 5, 0], 10).is_err());
        assert!(decompress_block(&[0x50, b'a'], 10).is_err());
        assert!(decompress_block(&[0x10, b'a', 1], 10).is_err());
        assert_eq!(
            decompress_block(&[0x1f, b'a', 1, 0, 200], 50),
            Err(FatbinError::TooLarge(50))
        );
    }
}

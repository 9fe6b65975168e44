//! A Zstandard decoder (RFC 8878) for the frames nvcc writes into fatbins:
//! raw, RLE and compressed blocks, Huffman-coded literals and FSE-coded
//! sequences. Dictionaries are not supported and the optional content
//! checksum is not verified. Every read is bounds-checked and the output is
//! capped, so corrupt input yields an error.

use super::FatbinError;

mod bits;
mod fse;
mod huffman;
mod sequences;

use bits::Forward;
use fse::Table;
use huffman::HuffTable;

const MAGIC: u32 = 0xFD2F_B528;
const SKIPPABLE_MASK: u32 = 0xFFFF_FFF0;
const SKIPPABLE: u32 = 0x184D_2A50;
const MAX_BLOCK: usize = 128 << 10;

fn corrupt(why: &'static str) -> FatbinError {
    FatbinError::Corrupt(why)
}

/// State carried from block to block within a frame.
#[derive(Default)]
struct FrameState {
    huffman: Option<HuffTable>,
    ll: Option<Table>,
    of: Option<Table>,
    ml: Option<Table>,
    reps: [usize; 3],
}

/// Decompresses every frame in `input` into at most `limit` bytes.
pub(super) fn decompress(input: &[u8], limit: usize) -> Result<Vec<u8>, FatbinError> {
    let mut out = Vec::new();
    let mut pos = 0;
    if input.is_empty() {
        return Err(corrupt("empty zstd input"));
    }
    while pos < input.len() {
        let magic = Forward::u32_at(input, pos).ok_or(corrupt("zstd magic is truncated"))?;
        if magic & SKIPPABLE_MASK == SKIPPABLE {
            let size = Forward::u32_at(input, pos + 4).ok_or(corrupt("skippable frame"))?;
            pos = pos
                .checked_add(8 + size as usize)
                .filter(|p| *p <= input.len())
                .ok_or(corrupt("skippable frame runs past the input"))?;
            continue;
        }
        if magic != MAGIC {
            return Err(corrupt("not a zstd frame"));
        }
        pos = frame(input, pos + 4, &mut out, limit)?;
    }
    Ok(out)
}

/// Decodes one frame whose header starts at `pos`; returns the end.
fn frame(
    input: &[u8],
    mut pos: usize,
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<usize, FatbinError> {
    let byte = |at: usize| {
        input
            .get(at)
            .copied()
            .ok_or(corrupt("zstd frame header is truncated"))
    };
    let fhd = byte(pos)?;
    pos += 1;
    let fcs_flag = fhd >> 6;
    let single_segment = fhd & 0x20 != 0;
    if fhd & 0x08 != 0 {
        return Err(corrupt("zstd reserved bit is set"));
    }
    let checksum = fhd & 0x04 != 0;
    let dict_len = [0usize, 1, 2, 4][usize::from(fhd & 3)];
    if !single_segment {
        pos += 1; // window descriptor: the whole output stays addressable.
    }
    let dict = (0..dict_len).try_fold(0u32, |acc, i| {
        Ok::<_, FatbinError>(acc | u32::from(byte(pos + i)?) << (8 * i))
    })?;
    if dict != 0 {
        return Err(corrupt("zstd dictionaries are not supported"));
    }
    pos += dict_len;
    let fcs_len = match fcs_flag {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let mut content = 0u64;
    for i in 0..fcs_len {
        content |= u64::from(byte(pos + i)?) << (8 * i);
    }
    if fcs_len == 2 {
        content += 256;
    }
    pos += fcs_len;
    if fcs_len > 0 && content > (limit - out.len().min(limit)) as u64 {
        return Err(FatbinError::TooLarge(limit));
    }
    let start = out.len();
    let mut state = FrameState {
        reps: [1, 4, 8],
        ..FrameState::default()
    };
    loop {
        let header = (0..3).try_fold(0u32, |acc, i| {
            Ok::<_, FatbinError>(acc | u32::from(byte(pos + i)?) << (8 * i))
        })?;
        pos += 3;
        let last = header & 1 != 0;
        let kind = (header >> 1) & 3;
        let size = (header >> 3) as usize;
        match kind {
            0 => {
                let data = input
                    .get(pos..pos + size)
                    .ok_or(corrupt("raw block runs past the input"))?;
                push(out, data, limit)?;
                pos += size;
            }
            1 => {
                let b = byte(pos)?;
                if out.len() + size > limit {
                    return Err(FatbinError::TooLarge(limit));
                }
                out.resize(out.len() + size, b);
                pos += 1;
            }
            2 => {
                if size > MAX_BLOCK {
                    return Err(corrupt("compressed block is too large"));
                }
                let data = input
                    .get(pos..pos + size)
                    .ok_or(corrupt("block runs past the input"))?;
                compressed_block(data, &mut state, out, limit)?;
                pos += size;
            }
            _ => return Err(corrupt("reserved block type")),
        }
        if last {
            break;
        }
    }
    if fcs_len > 0 && (out.len() - start) as u64 != content {
        return Err(corrupt("frame content size does not match"));
    }
    if checksum {
        pos += 4;
        if pos > input.len() {
            return Err(corrupt("frame checksum is truncated"));
        }
    }
    Ok(pos)
}

fn push(out: &mut Vec<u8>, data: &[u8], limit: usize) -> Result<(), FatbinError> {
    if out.len() + data.len() > limit {
        return Err(FatbinError::TooLarge(limit));
    }
    out.extend_from_slice(data);
    Ok(())
}

/// Decodes the literals section; returns the literals and the bytes used.
fn literals(block: &[u8], state: &mut FrameState) -> Result<(Vec<u8>, usize), FatbinError> {
    let b0 = *block.first().ok_or(corrupt("literals header is missing"))?;
    let kind = b0 & 3;
    let format = (b0 >> 2) & 3;
    let byte = |i: usize| {
        block
            .get(i)
            .copied()
            .map(usize::from)
            .ok_or(corrupt("literals header is truncated"))
    };
    if kind < 2 {
        let (size, header) = match format {
            0 | 2 => (usize::from(b0 >> 3), 1),
            1 => (usize::from(b0 >> 4) | byte(1)? << 4, 2),
            _ => (usize::from(b0 >> 4) | byte(1)? << 4 | byte(2)? << 12, 3),
        };
        if size > MAX_BLOCK {
            return Err(corrupt("literals are too large"));
        }
        return if kind == 0 {
            let data = block
                .get(header..header + size)
                .ok_or(corrupt("raw literals run past the block"))?;
            Ok((data.to_vec(), header + size))
        } else {
            Ok((vec![byte(header)? as u8; size], header + 1))
        };
    }
    let (header, bits, streams) = match format {
        0 => (3, 10, 1),
        1 => (3, 10, 4),
        2 => (4, 14, 4),
        _ => (5, 18, 4),
    };
    let mut h = 0u64;
    for i in 0..header {
        h |= (byte(i)? as u64) << (8 * i);
    }
    let mask = (1u64 << bits) - 1;
    let regenerated = ((h >> 4) & mask) as usize;
    let compressed = ((h >> (4 + bits)) & mask) as usize;
    if regenerated > MAX_BLOCK {
        return Err(corrupt("literals are too large"));
    }
    let mut data = block
        .get(header..header + compressed)
        .ok_or(corrupt("compressed literals run past the block"))?;
    if kind == 2 {
        let (table, used) = HuffTable::read(data)?;
        data = &data[used..];
        state.huffman = Some(table);
    }
    let table = state
        .huffman
        .as_ref()
        .ok_or(corrupt("treeless literals without a table"))?;
    let lits = if streams == 1 {
        table.decode_stream(data, regenerated)?
    } else {
        table.decode_four(data, regenerated)?
    };
    Ok((lits, header + compressed))
}

fn compressed_block(
    block: &[u8],
    state: &mut FrameState,
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), FatbinError> {
    let (lits, used) = literals(block, state)?;
    sequences::execute(&block[used..], &lits, state, out, limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_rle_blocks_decode() {
        // Frame: single segment, FCS 1 byte = 7; raw block "abcd", last RLE block 'z' x3.
        let frame = [
            0x28,
            0xb5,
            0x2f,
            0xfd,
            0x20,
            7,
            4 << 3,
            0,
            0,
            b'a',
            b'b',
            b'c',
            b'd',
            1 | 2 | 3 << 3,
            0,
            0,
            b'z',
        ];
        assert_eq!(decompress(&frame, 100).unwrap(), b"abcdzzz");
        assert_eq!(decompress(&frame, 5), Err(FatbinError::TooLarge(5)));
        assert!(decompress(&frame[..12], 100).is_err());
    }

    #[test]
    fn garbage_and_wrong_sizes_are_errors() {
        assert!(decompress(b"not zstd", 100).is_err());
        assert!(decompress(&[], 100).is_err());
        let frame = [0x28, 0xb5, 0x2f, 0xfd, 0x20, 9, 1 | 2 | 3 << 3, 0, 0, b'z'];
        assert_eq!(
            decompress(&frame, 100),
            Err(FatbinError::Corrupt("frame content size does not match"))
        );
    }
}

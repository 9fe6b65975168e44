//! The sequences section: the three code tables (literal length, offset,
//! match length), decoding the sequences from one backward stream, and
//! executing them against the literals and the output so far.

use super::bits::Backward;
use super::fse::{read_distribution, State, Table};
use super::{corrupt, FatbinError, FrameState};

/// Predefined literal-length distribution (accuracy log 6).
pub(super) const LL_DEFAULT: [i32; 36] = [
    4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 2, 1, 1, 1, 1, 1,
    -1, -1, -1, -1,
];
/// Predefined match-length distribution (accuracy log 6).
const ML_DEFAULT: [i32; 53] = [
    1, 4, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1,
];
/// Predefined offset distribution (accuracy log 5).
const OF_DEFAULT: [i32; 29] = [
    1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1,
];

/// Literal-length codes 16 and up: (baseline, extra bits).
const LL_CODES: [(u32, u32); 20] = [
    (16, 1),
    (18, 1),
    (20, 1),
    (22, 1),
    (24, 2),
    (28, 2),
    (32, 3),
    (40, 3),
    (48, 4),
    (64, 6),
    (128, 7),
    (256, 8),
    (512, 9),
    (1024, 10),
    (2048, 11),
    (4096, 12),
    (8192, 13),
    (16384, 14),
    (32768, 15),
    (65536, 16),
];
/// Match-length codes 32 and up: (baseline, extra bits).
const ML_CODES: [(u32, u32); 21] = [
    (35, 1),
    (37, 1),
    (39, 1),
    (41, 1),
    (43, 2),
    (47, 2),
    (51, 3),
    (59, 3),
    (67, 4),
    (83, 4),
    (99, 5),
    (131, 7),
    (259, 8),
    (515, 9),
    (1027, 10),
    (2051, 11),
    (4099, 12),
    (8195, 13),
    (16387, 14),
    (32771, 15),
    (65539, 16),
];

fn literal_length(code: u8) -> Result<(u32, u32), FatbinError> {
    match code {
        0..=15 => Ok((u32::from(code), 0)),
        _ => LL_CODES
            .get(usize::from(code) - 16)
            .copied()
            .ok_or(corrupt("literal length code is out of range")),
    }
}

fn match_length(code: u8) -> Result<(u32, u32), FatbinError> {
    match code {
        0..=31 => Ok((u32::from(code) + 3, 0)),
        _ => ML_CODES
            .get(usize::from(code) - 32)
            .copied()
            .ok_or(corrupt("match length code is out of range")),
    }
}

/// Reads one table by its mode; returns the bytes used.
fn table(
    mode: u8,
    input: &[u8],
    slot: &mut Option<Table>,
    default: (&[i32], u32),
    max_symbol: usize,
    max_log: u32,
) -> Result<usize, FatbinError> {
    match mode {
        0 => {
            *slot = Some(Table::build(default.0, default.1)?);
            Ok(0)
        }
        1 => {
            let symbol = *input
                .first()
                .ok_or(corrupt("RLE table symbol is missing"))?;
            if usize::from(symbol) > max_symbol {
                return Err(corrupt("RLE table symbol is out of range"));
            }
            *slot = Some(Table::rle(symbol));
            Ok(1)
        }
        2 => {
            let (probs, log, used) = read_distribution(input, max_symbol, max_log)?;
            *slot = Some(Table::build(&probs, log)?);
            Ok(used)
        }
        _ => {
            if slot.is_none() {
                return Err(corrupt("repeated table without a previous one"));
            }
            Ok(0)
        }
    }
}

/// Decodes the sequences of a block and appends the block's output.
pub(super) fn execute(
    input: &[u8],
    literals: &[u8],
    state: &mut FrameState,
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), FatbinError> {
    let byte = |i: usize| {
        input
            .get(i)
            .copied()
            .map(usize::from)
            .ok_or(corrupt("sequences header is truncated"))
    };
    let b0 = byte(0)?;
    let (count, mut pos) = match b0 {
        0 => (0, 1),
        1..=127 => (b0, 1),
        128..=254 => (((b0 - 128) << 8) + byte(1)?, 2),
        _ => (byte(1)? + (byte(2)? << 8) + 0x7F00, 3),
    };
    let block_start = out.len();
    if count == 0 {
        return append(out, literals, limit);
    }
    let modes = byte(pos)? as u8;
    pos += 1;
    if modes & 3 != 0 {
        return Err(corrupt("reserved sequence mode bits are set"));
    }
    let rest = |pos: usize| {
        input
            .get(pos..)
            .ok_or(corrupt("sequence tables are truncated"))
    };
    pos += table(
        modes >> 6,
        rest(pos)?,
        &mut state.ll,
        (&LL_DEFAULT, 6),
        35,
        9,
    )?;
    pos += table(
        (modes >> 4) & 3,
        rest(pos)?,
        &mut state.of,
        (&OF_DEFAULT, 5),
        31,
        8,
    )?;
    pos += table(
        (modes >> 2) & 3,
        rest(pos)?,
        &mut state.ml,
        (&ML_DEFAULT, 6),
        52,
        9,
    )?;
    let (Some(ll_t), Some(of_t), Some(ml_t)) = (&state.ll, &state.of, &state.ml) else {
        return Err(corrupt("sequence tables are missing"));
    };
    let mut r = Backward::new(rest(pos)?)?;
    let mut ll = State::new(ll_t, &mut r);
    let mut of = State::new(of_t, &mut r);
    let mut ml = State::new(ml_t, &mut r);
    let mut lit_pos = 0usize;
    for i in 0..count {
        let of_code = u32::from(of.symbol());
        if of_code > 31 {
            return Err(corrupt("offset code is out of range"));
        }
        let (ml_base, ml_bits) = match_length(ml.symbol())?;
        let (ll_base, ll_bits) = literal_length(ll.symbol())?;
        let offset_value = (1u64 << of_code) + u64::from(r.read(of_code));
        let match_len = (ml_base + r.read(ml_bits)) as usize;
        let lit_len = (ll_base + r.read(ll_bits)) as usize;
        if i + 1 < count {
            ll.update(&mut r);
            ml.update(&mut r);
            of.update(&mut r);
        }
        if r.overflowed() {
            return Err(corrupt("sequence stream is too short"));
        }
        let offset = resolve_offset(&mut state.reps, offset_value, lit_len)?;
        let lits = literals
            .get(lit_pos..lit_pos + lit_len)
            .ok_or(corrupt("sequence uses more literals than decoded"))?;
        append(out, lits, limit)?;
        lit_pos += lit_len;
        if offset == 0 || offset > out.len() {
            return Err(corrupt("match offset reaches before the output"));
        }
        if out.len() + match_len > limit || out.len() - block_start + match_len > super::MAX_BLOCK {
            return Err(super::FatbinError::TooLarge(limit));
        }
        let start = out.len() - offset;
        for k in 0..match_len {
            let b = out[start + k];
            out.push(b);
        }
    }
    if !r.finished() {
        return Err(corrupt("sequence stream has bits left over"));
    }
    append(out, &literals[lit_pos..], limit)
}

fn append(out: &mut Vec<u8>, data: &[u8], limit: usize) -> Result<(), FatbinError> {
    if out.len() + data.len() > limit {
        return Err(FatbinError::TooLarge(limit));
    }
    out.extend_from_slice(data);
    Ok(())
}

/// Applies the repeat-offset rules; returns the match offset.
fn resolve_offset(reps: &mut [usize; 3], value: u64, lit_len: usize) -> Result<usize, FatbinError> {
    if value > 3 {
        let offset = usize::try_from(value - 3).map_err(|_| corrupt("offset is too large"))?;
        *reps = [offset, reps[0], reps[1]];
        return Ok(offset);
    }
    let index = if lit_len == 0 { value + 1 } else { value };
    let offset = match index {
        1 => reps[0],
        2 => {
            let o = reps[1];
            *reps = [o, reps[0], reps[2]];
            o
        }
        3 => {
            let o = reps[2];
            *reps = [o, reps[0], reps[1]];
            o
        }
        _ => {
            let o = reps[0]
                .checked_sub(1)
                .filter(|o| *o > 0)
                .ok_or(corrupt("repeat offset underflows"))?;
            *reps = [o, reps[0], reps[1]];
            o
        }
    };
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predefined_distributions_fill_their_tables() {
        let total = |d: &[i32]| d.iter().map(|p| p.abs()).sum::<i32>();
        assert_eq!(total(&LL_DEFAULT), 64);
        assert_eq!(total(&ML_DEFAULT), 64);
        assert_eq!(total(&OF_DEFAULT), 32);
    }

    #[test]
    fn repeat_offsets_follow_the_rfc_rules() {
        let mut reps = [1, 4, 8];
        assert_eq!(resolve_offset(&mut reps, 10, 5).unwrap(), 7);
        assert_eq!(reps, [7, 1, 4]);
        assert_eq!(resolve_offset(&mut reps, 1, 5).unwrap(), 7);
        assert_eq!(resolve_offset(&mut reps, 2, 5).unwrap(), 1);
        assert_eq!(reps, [1, 7, 4]);
        assert_eq!(resolve_offset(&mut reps, 3, 5).unwrap(), 4);
        assert_eq!(reps, [4, 1, 7]);
        // With no literals, 1 means the second offset and 3 the first minus one.
        assert_eq!(resolve_offset(&mut reps, 1, 0).unwrap(), 1);
        assert_eq!(reps, [1, 4, 7]);
        assert!(resolve_offset(&mut reps, 3, 0).is_err());
    }
}

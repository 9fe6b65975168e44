//! Huffman-coded literals: the tree description (weights, direct or
//! FSE-compressed) and decoding of one or four streams.

use super::bits::Backward;
use super::fse::{read_distribution, State, Table};
use super::{corrupt, FatbinError};

const MAX_BITS: u32 = 11;
const MAX_SYMBOLS: usize = 256;

/// A decoding table of `1 << max_bits` entries: (symbol, code length).
#[derive(Debug, Clone)]
pub(super) struct HuffTable {
    max_bits: u32,
    entries: Vec<(u8, u8)>,
}

impl HuffTable {
    /// Reads a tree description; returns the table and the bytes used.
    pub(super) fn read(input: &[u8]) -> Result<(HuffTable, usize), FatbinError> {
        let header = usize::from(*input.first().ok_or(corrupt("Huffman header is missing"))?);
        let (weights, used) = if header < 128 {
            let data = input
                .get(1..1 + header)
                .ok_or(corrupt("Huffman weights run past the input"))?;
            (fse_weights(data)?, 1 + header)
        } else {
            let count = header - 127;
            let bytes = count.div_ceil(2);
            let data = input
                .get(1..1 + bytes)
                .ok_or(corrupt("Huffman weights run past the input"))?;
            let weights = (0..count)
                .map(|i| {
                    let b = data[i / 2];
                    if i % 2 == 0 {
                        b >> 4
                    } else {
                        b & 15
                    }
                })
                .collect();
            (weights, 1 + bytes)
        };
        Ok((HuffTable::from_weights(weights)?, used))
    }

    fn from_weights(mut weights: Vec<u8>) -> Result<HuffTable, FatbinError> {
        if weights.len() + 1 > MAX_SYMBOLS {
            return Err(corrupt("too many Huffman symbols"));
        }
        let mut total: u32 = 0;
        for w in &weights {
            if u32::from(*w) > MAX_BITS {
                return Err(corrupt("Huffman weight is too large"));
            }
            if *w > 0 {
                total += 1 << (w - 1);
            }
        }
        if total == 0 {
            return Err(corrupt("Huffman weights are all zero"));
        }
        let max_bits = 32 - total.leading_zeros();
        if max_bits > MAX_BITS {
            return Err(corrupt("Huffman code is too long"));
        }
        let rest = (1u32 << max_bits) - total;
        if !rest.is_power_of_two() {
            return Err(corrupt("Huffman weights do not complete a tree"));
        }
        weights.push((32 - rest.leading_zeros()) as u8);
        let size = 1usize << max_bits;
        // Start of each weight's run of entries: lower weights first.
        let mut start = vec![0usize; max_bits as usize + 2];
        let mut next = 0usize;
        for (w, slot) in start
            .iter_mut()
            .enumerate()
            .take(max_bits as usize + 1)
            .skip(1)
        {
            *slot = next;
            let count = weights.iter().filter(|x| usize::from(**x) == w).count();
            next += count << (w - 1);
        }
        if next != size {
            return Err(corrupt("Huffman table does not fill"));
        }
        let mut entries = vec![(0u8, 0u8); size];
        for (symbol, w) in weights.iter().enumerate() {
            if *w == 0 {
                continue;
            }
            let w = usize::from(*w);
            let len = 1usize << (w - 1);
            let bits = (max_bits as usize + 1 - w) as u8;
            for e in &mut entries[start[w]..start[w] + len] {
                *e = (symbol as u8, bits);
            }
            start[w] += len;
        }
        Ok(HuffTable { max_bits, entries })
    }

    fn decode_into(&self, r: &mut Backward<'_>, count: usize, out: &mut Vec<u8>) {
        for _ in 0..count {
            let (symbol, bits) = self.entries[r.peek(self.max_bits) as usize];
            r.skip(u32::from(bits));
            out.push(symbol);
        }
    }

    /// Decodes one stream of `count` symbols.
    pub(super) fn decode_stream(&self, data: &[u8], count: usize) -> Result<Vec<u8>, FatbinError> {
        let mut r = Backward::new(data)?;
        let mut out = Vec::with_capacity(count);
        self.decode_into(&mut r, count, &mut out);
        if !r.finished() {
            return Err(corrupt("Huffman stream length does not match"));
        }
        Ok(out)
    }

    /// Decodes four streams behind a 6-byte jump table.
    pub(super) fn decode_four(&self, data: &[u8], count: usize) -> Result<Vec<u8>, FatbinError> {
        let size = |i: usize| {
            data.get(i..i + 2)
                .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
                .ok_or(corrupt("Huffman jump table is truncated"))
        };
        let sizes = [size(0)?, size(2)?, size(4)?];
        let total: usize = sizes.iter().sum::<usize>() + 6;
        if total > data.len() {
            return Err(corrupt("Huffman streams run past the literals"));
        }
        let per = count.div_ceil(4);
        if per * 3 > count {
            return Err(corrupt("too few literals for four streams"));
        }
        let mut out = Vec::with_capacity(count);
        let mut at = 6;
        for (i, len) in [sizes[0], sizes[1], sizes[2], data.len() - total]
            .into_iter()
            .enumerate()
        {
            let n = if i < 3 { per } else { count - 3 * per };
            out.extend(self.decode_stream(&data[at..at + len], n)?);
            at += len;
        }
        Ok(out)
    }
}

/// Weights compressed with FSE: two interleaved states on one stream.
fn fse_weights(data: &[u8]) -> Result<Vec<u8>, FatbinError> {
    let (probs, log, used) = read_distribution(data, 255, 6)?;
    let table = Table::build(&probs, log)?;
    let mut r = Backward::new(
        data.get(used..)
            .ok_or(corrupt("Huffman weights are truncated"))?,
    )?;
    let mut one = State::new(&table, &mut r);
    let mut two = State::new(&table, &mut r);
    let mut weights = Vec::new();
    loop {
        if weights.len() >= MAX_SYMBOLS {
            return Err(corrupt("too many Huffman weights"));
        }
        weights.push(one.symbol());
        one.update(&mut r);
        if r.overflowed() {
            weights.push(two.symbol());
            break;
        }
        weights.push(two.symbol());
        two.update(&mut r);
        if r.overflowed() {
            weights.push(one.symbol());
            break;
        }
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_weights_build_a_complete_table() {
        // Two symbols of weight 1 given, the third implied: lengths 2, 2, 1.
        let (t, used) = HuffTable::read(&[128 + 1, 0x11]).unwrap();
        assert_eq!(used, 2);
        assert_eq!(t.max_bits, 2);
        assert_eq!(t.entries, [(0, 2), (1, 2), (2, 1), (2, 1)]);
    }

    #[test]
    fn incomplete_trees_are_rejected() {
        assert!(HuffTable::read(&[128 + 1, 0x31]).is_err());
        assert!(HuffTable::read(&[128 + 1, 0x00]).is_err());
    }
}

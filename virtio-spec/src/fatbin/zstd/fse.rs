//! Finite State Entropy tables: reading a normalized distribution, building
//! the decoding table, and stepping a decoder state.

use super::bits::{Backward, Forward};
use super::{corrupt, FatbinError};

/// One decoding table cell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Cell {
    pub symbol: u8,
    pub bits: u8,
    pub base: u16,
}

/// A decoding table of `1 << log` cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Table {
    pub log: u32,
    pub cells: Vec<Cell>,
}

/// Reads a normalized distribution (probabilities, -1 meaning "less than
/// one") with an accuracy log of at most `max_log`; returns it, the
/// accuracy log and the bytes used.
pub(super) fn read_distribution(
    input: &[u8],
    max_symbol: usize,
    max_log: u32,
) -> Result<(Vec<i32>, u32, usize), FatbinError> {
    let mut r = Forward::new(input);
    let log = r.read(4)? + 5;
    if log > max_log {
        return Err(corrupt("FSE accuracy log is too large"));
    }
    let mut remaining: i32 = (1 << log) + 1;
    let mut threshold: i32 = 1 << log;
    let mut nbits = log + 1;
    let mut probs = Vec::new();
    let mut previous_zero = false;
    while remaining > 1 {
        if previous_zero {
            let mut repeat = r.read(2)?;
            let mut zeros = repeat as usize;
            while repeat == 3 {
                repeat = r.read(2)?;
                zeros += repeat as usize;
            }
            if probs.len() + zeros > max_symbol + 1 {
                return Err(corrupt("FSE distribution has too many symbols"));
            }
            probs.resize(probs.len() + zeros, 0);
            previous_zero = false;
            continue;
        }
        if probs.len() > max_symbol {
            return Err(corrupt("FSE distribution has too many symbols"));
        }
        let max = (2 * threshold - 1) - remaining;
        let low = r.peek(nbits - 1) as i32;
        let value = if low < max {
            r.skip(nbits - 1)?;
            low
        } else {
            let full = r.peek(nbits) as i32;
            r.skip(nbits)?;
            if full >= threshold {
                full - max
            } else {
                full
            }
        };
        let prob = value - 1;
        remaining -= prob.abs();
        probs.push(prob);
        previous_zero = prob == 0;
        while remaining < threshold && nbits > 1 {
            nbits -= 1;
            threshold >>= 1;
        }
    }
    if remaining != 1 {
        return Err(corrupt("FSE distribution does not add up"));
    }
    Ok((probs, log, r.bytes_used()))
}

impl Table {
    /// Builds the decoding table of a distribution.
    pub(super) fn build(probs: &[i32], log: u32) -> Result<Table, FatbinError> {
        let size = 1usize << log;
        let mut cells = vec![Cell::default(); size];
        let mut high = size;
        let mut next = vec![0u32; probs.len()];
        for (s, p) in probs.iter().enumerate() {
            if *p == -1 {
                high = high.checked_sub(1).ok_or(corrupt("FSE table overflows"))?;
                cells[high].symbol = s as u8;
                next[s] = 1;
            } else {
                next[s] = *p as u32;
            }
        }
        let step = (size >> 1) + (size >> 3) + 3;
        let mask = size - 1;
        let mut position = 0usize;
        for (s, p) in probs.iter().enumerate() {
            for _ in 0..(*p).max(0) {
                cells[position].symbol = s as u8;
                loop {
                    position = (position + step) & mask;
                    if position < high {
                        break;
                    }
                }
            }
        }
        if position != 0 {
            return Err(corrupt("FSE distribution does not fill the table"));
        }
        for cell in &mut cells {
            let s = usize::from(cell.symbol);
            let state = next[s];
            next[s] += 1;
            if state == 0 {
                return Err(corrupt("FSE symbol has no state"));
            }
            let bits = log - (31 - state.leading_zeros());
            cell.bits = bits as u8;
            cell.base = ((state << bits) as usize - size) as u16;
        }
        Ok(Table { log, cells })
    }

    /// The table of a single symbol (RLE mode).
    pub(super) fn rle(symbol: u8) -> Table {
        Table {
            log: 0,
            cells: vec![Cell {
                symbol,
                bits: 0,
                base: 0,
            }],
        }
    }
}

/// A decoder state on a table.
pub(super) struct State<'t> {
    table: &'t Table,
    state: usize,
}

impl<'t> State<'t> {
    pub(super) fn new(table: &'t Table, r: &mut Backward<'_>) -> State<'t> {
        let state = r.read(table.log) as usize;
        State { table, state }
    }

    pub(super) fn symbol(&self) -> u8 {
        self.table.cells[self.state].symbol
    }

    pub(super) fn update(&mut self, r: &mut Backward<'_>) {
        let cell = self.table.cells[self.state];
        let low = r.read(u32::from(cell.bits)) as usize;
        self.state = usize::from(cell.base) + low;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predefined_literal_length_table_builds_with_one_cell_per_state() {
        let t = Table::build(&super::super::sequences::LL_DEFAULT, 6).unwrap();
        assert_eq!(t.cells.len(), 64);
        // Symbols with probability -1 sit at the top of the table.
        assert_eq!(t.cells[63].symbol, 32);
        assert_eq!(t.cells[60].symbol, 35);
        assert_eq!(t.cells[63].bits, 6);
        assert!(t
            .cells
            .iter()
            .all(|c| usize::from(c.base) + (1 << c.bits) <= 64));
    }

    #[test]
    fn distributions_that_do_not_add_up_are_rejected() {
        // Accuracy log 5, then the input ends before the table is full.
        assert!(read_distribution(&[0x00], 35, 9).is_err());
        assert!(read_distribution(&[0x0f], 35, 9).is_err());
    }
}

//! Bit readers: forward (least significant bit first, for table headers)
//! and backward (from the end of a stream, for FSE and Huffman streams).

use super::{corrupt, FatbinError};

/// Reads bits forward from the start of a byte slice.
pub(super) struct Forward<'a> {
    bytes: &'a [u8],
    /// Bits consumed.
    pos: usize,
}

impl<'a> Forward<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Forward<'a> {
        Forward { bytes, pos: 0 }
    }

    /// A little-endian `u32` at a byte offset.
    pub(super) fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    }

    /// The next `n` (at most 32) bits without consuming them; bits past the
    /// end read as zero.
    pub(super) fn peek(&self, n: u32) -> u32 {
        let mut value = 0u64;
        for i in 0..(n as usize) {
            let bit = self.pos + i;
            let set = self
                .bytes
                .get(bit / 8)
                .is_some_and(|b| (b >> (bit % 8)) & 1 == 1);
            value |= u64::from(set) << i;
        }
        value as u32
    }

    /// Consumes `n` bits; fails past the end.
    pub(super) fn skip(&mut self, n: u32) -> Result<(), FatbinError> {
        self.pos += n as usize;
        if self.pos > self.bytes.len() * 8 {
            return Err(corrupt("table header runs past the input"));
        }
        Ok(())
    }

    /// Reads `n` bits.
    pub(super) fn read(&mut self, n: u32) -> Result<u32, FatbinError> {
        let value = self.peek(n);
        self.skip(n)?;
        Ok(value)
    }

    /// Bytes touched so far.
    pub(super) fn bytes_used(&self) -> usize {
        self.pos.div_ceil(8)
    }
}

/// Reads bits backward: the stream is a little-endian number whose highest
/// set bit marks its end; reads take the most significant unread bits.
pub(super) struct Backward<'a> {
    bytes: &'a [u8],
    /// Bits left to read; negative once the reads went past the start.
    pos: isize,
}

impl<'a> Backward<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Result<Backward<'a>, FatbinError> {
        let last = *bytes.last().ok_or(corrupt("empty bitstream"))?;
        if last == 0 {
            return Err(corrupt("bitstream has no end marker"));
        }
        let top = 7 - last.leading_zeros() as isize;
        Ok(Backward {
            bytes,
            pos: (bytes.len() as isize - 1) * 8 + top,
        })
    }

    fn bit(&self, at: isize) -> u64 {
        if at < 0 {
            return 0;
        }
        let at = at as usize;
        self.bytes
            .get(at / 8)
            .map_or(0, |b| u64::from((b >> (at % 8)) & 1))
    }

    /// The next `n` (at most 32) bits without consuming them.
    pub(super) fn peek(&self, n: u32) -> u32 {
        let mut value = 0u64;
        for i in 0..n as isize {
            value = (value << 1) | self.bit(self.pos - 1 - i);
        }
        value as u32
    }

    /// Consumes `n` bits.
    pub(super) fn skip(&mut self, n: u32) {
        self.pos -= n as isize;
    }

    /// Reads `n` bits.
    pub(super) fn read(&mut self, n: u32) -> u32 {
        let value = self.peek(n);
        self.skip(n);
        value
    }

    /// True once reads went past the start of the stream.
    pub(super) fn overflowed(&self) -> bool {
        self.pos < 0
    }

    /// True when every bit was read exactly.
    pub(super) fn finished(&self) -> bool {
        self.pos == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_reads_least_significant_bits_first() {
        let mut r = Forward::new(&[0b1010_1100, 0xff]);
        assert_eq!(r.read(2).unwrap(), 0);
        assert_eq!(r.read(3).unwrap(), 0b011);
        assert_eq!(r.read(5).unwrap(), 0b11101);
        assert_eq!(r.bytes_used(), 2);
        assert!(r.read(7).is_err());
    }

    #[test]
    fn backward_reads_from_the_end_marker_down() {
        // Bytes 0b0000_0101, 0b0001_0110: marker at bit 12; data bits below it.
        let mut r = Backward::new(&[0b0000_0101, 0b0001_0110]).unwrap();
        assert_eq!(r.read(4), 0b0110);
        assert_eq!(r.read(3), 0b000);
        assert!(!r.finished());
        assert_eq!(r.read(5), 0b00101);
        assert!(r.finished());
        assert_eq!(r.read(2), 0);
        assert!(r.overflowed());
        assert!(Backward::new(&[1, 0]).is_err());
    }
}

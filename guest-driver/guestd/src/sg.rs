//! Scatter-gather rewriting, as plain logic: which parts of a client's
//! copy buffer can go to the device by physical address (huge-page
//! memory), which must be bounced, and how a copy is cut into requests so
//! that no request bounces more than the DMA heap can spare.

use std::ops::Range;

use vgpu_spec::wire::SgEntry;
use vgpu_spec::Status;

use crate::dma::{split_phys, DmaError};

/// One piece of a client's host-side copy buffer, in copy order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Passed to the device by physical address: no copy.
    Direct {
        /// Physical address.
        phys: u64,
        /// Bytes.
        len: u64,
    },
    /// Copied through a bounce buffer.
    Bounce {
        /// The client's address (its vhost-user guest-physical address).
        gpa: u64,
        /// Bytes.
        len: u64,
    },
}

impl Piece {
    /// Bytes in the piece.
    pub fn len(&self) -> u64 {
        match self {
            Piece::Direct { len, .. } | Piece::Bounce { len, .. } => *len,
        }
    }

    /// True if the piece is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a client range is mapped in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// In huge-page memory at `host`, pages of `page_size` bytes.
    Huge {
        /// Host address of the range.
        host: usize,
        /// The memory's page size.
        page_size: usize,
    },
    /// In ordinary memory: must be bounced.
    Plain,
}

/// Turns a client sg list into pieces. `resolve(gpa, len)` says where a
/// range lives (or fails the request: a range outside client memory);
/// `page_phys(page_start)` gives a huge page's physical address. A range
/// whose pages cannot be translated is bounced instead.
pub fn pieces(
    segs: &[SgEntry],
    resolve: &mut dyn FnMut(u64, u64) -> Result<Backing, Status>,
    page_phys: &mut dyn FnMut(usize) -> Result<u64, DmaError>,
    out: &mut Vec<Piece>,
) -> Result<(), Status> {
    let mut phys = Vec::new();
    for seg in segs {
        let (gpa, len) = (seg.gpa.get(), seg.len.get());
        if len == 0 {
            continue;
        }
        match resolve(gpa, len)? {
            Backing::Huge { host, page_size } => {
                phys.clear();
                match split_phys(host, len, page_size, page_phys, &mut phys) {
                    Ok(()) => {
                        out.extend(phys.iter().map(|&(phys, len)| Piece::Direct { phys, len }))
                    }
                    Err(e) => {
                        tracing::warn!(gpa, len, error = %e, "Cannot translate huge-page memory; bouncing");
                        out.push(Piece::Bounce { gpa, len });
                    }
                }
            }
            Backing::Plain => out.push(Piece::Bounce { gpa, len }),
        }
    }
    Ok(())
}

/// One request's share of a copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    /// Its pieces, in order.
    pub pieces: Vec<Piece>,
    /// Bytes passed directly.
    pub direct: u64,
    /// Bytes bounced.
    pub bounce: u64,
}

impl Chunk {
    /// Bytes the chunk copies.
    pub fn total(&self) -> u64 {
        self.direct + self.bounce
    }

    fn push(&mut self, p: Piece) {
        match p {
            Piece::Direct { len, .. } => self.direct += len,
            Piece::Bounce { len, .. } => self.bounce += len,
        }
        self.pieces.push(p);
    }
}

/// Cuts pieces into requests of at most `max_bounce` bounced bytes and
/// `max_pieces` pieces, splitting bounced pieces where needed. Always
/// returns at least one (possibly empty) chunk.
pub fn chunks(pieces: &[Piece], max_bounce: u64, max_pieces: usize) -> Vec<Chunk> {
    let max_bounce = max_bounce.max(1);
    let max_pieces = max_pieces.max(1);
    let mut out = vec![Chunk::default()];
    for &piece in pieces {
        match piece {
            Piece::Direct { .. } => {
                if out.last().is_some_and(|c| c.pieces.len() >= max_pieces) {
                    out.push(Chunk::default());
                }
                if let Some(c) = out.last_mut() {
                    c.push(piece);
                }
            }
            Piece::Bounce { mut gpa, len } => {
                let mut left = len;
                while left > 0 {
                    let full = out
                        .last()
                        .is_none_or(|c| c.bounce >= max_bounce || c.pieces.len() >= max_pieces);
                    if full {
                        out.push(Chunk::default());
                    }
                    let Some(c) = out.last_mut() else { break };
                    let n = left.min(max_bounce - c.bounce);
                    c.push(Piece::Bounce { gpa, len: n });
                    gpa += n;
                    left -= n;
                }
            }
        }
    }
    out
}

/// Where bounced pieces meet `[range.start, range.end)` of their bounce
/// buffer, in which they lie end to end from offset 0 (direct pieces take
/// no room there): `(client gpa, buffer offset, len)` of each part, in
/// order.
pub fn bounced_parts(
    pieces: &[Piece],
    range: Range<u64>,
) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    pieces
        .iter()
        .filter_map(|p| match *p {
            Piece::Bounce { gpa, len } => Some((gpa, len)),
            Piece::Direct { .. } => None,
        })
        .scan(0u64, |at, (gpa, len)| {
            let from = *at;
            *at = at.saturating_add(len);
            Some((gpa, from, len))
        })
        .take_while(move |&(_, from, _)| from < range.end)
        .filter_map(move |(gpa, from, len)| {
            let lo = from.max(range.start);
            let hi = from.saturating_add(len).min(range.end);
            (lo < hi).then(|| (gpa + (lo - from), lo, hi - lo))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::HUGE_PAGE;

    const MB2: u64 = HUGE_PAGE as u64;

    fn sg(gpa: u64, len: u64) -> SgEntry {
        SgEntry {
            gpa: gpa.into(),
            len: len.into(),
        }
    }

    /// Client memory: huge pages at gpa 0x10_0000_0000 (host 0x7000_0000_0000,
    /// page k at physical 0x8000_0000 - k * 2 MiB, so never contiguous),
    /// plain memory at gpa 0x4000_0000, nothing elsewhere.
    fn resolve(gpa: u64, len: u64) -> Result<Backing, Status> {
        const HUGE_GPA: u64 = 0x10_0000_0000;
        if (HUGE_GPA..HUGE_GPA + 64 * MB2).contains(&gpa) && gpa + len <= HUGE_GPA + 64 * MB2 {
            return Ok(Backing::Huge {
                host: (0x7000_0000_0000 + gpa - HUGE_GPA) as usize,
                page_size: HUGE_PAGE,
            });
        }
        if (0x4000_0000..0x4400_0000).contains(&gpa) && gpa + len <= 0x4400_0000 {
            return Ok(Backing::Plain);
        }
        Err(Status::INVALID_VALUE)
    }

    fn page_phys(page: usize) -> Result<u64, DmaError> {
        let k = (page - 0x7000_0000_0000) as u64 / MB2;
        Ok(0x8000_0000 - k * MB2)
    }

    #[test]
    fn huge_page_buffer_goes_direct_split_at_each_2_mib_boundary() {
        let mut out = Vec::new();
        // From 4 KiB before the end of page 0 to 4 KiB into page 2.
        let start = 0x10_0000_0000 + MB2 - 4096;
        pieces(
            &[sg(start, MB2 + 8192)],
            &mut resolve,
            &mut page_phys,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            [
                Piece::Direct {
                    phys: 0x8000_0000 + MB2 - 4096,
                    len: 4096
                },
                Piece::Direct {
                    phys: 0x8000_0000 - MB2,
                    len: MB2
                },
                Piece::Direct {
                    phys: 0x8000_0000 - 2 * MB2,
                    len: 4096
                },
            ]
        );
    }

    #[test]
    fn plain_memory_is_bounced_and_empty_entries_are_dropped() {
        let mut out = Vec::new();
        let segs = [
            sg(0x4000_1000, 100),
            sg(0x10_0000_0000, 0),
            sg(0x10_0000_0010, 16),
        ];
        pieces(&segs, &mut resolve, &mut page_phys, &mut out).unwrap();
        assert_eq!(
            out,
            [
                Piece::Bounce {
                    gpa: 0x4000_1000,
                    len: 100
                },
                Piece::Direct {
                    phys: 0x8000_0010,
                    len: 16
                }
            ]
        );
    }

    #[test]
    fn range_outside_client_memory_fails_the_request() {
        let mut out = Vec::new();
        let err = pieces(
            &[sg(0x9999_0000, 8)],
            &mut resolve,
            &mut page_phys,
            &mut out,
        );
        assert_eq!(err, Err(Status::INVALID_VALUE));
    }

    #[test]
    fn untranslatable_huge_memory_falls_back_to_bouncing() {
        let mut out = Vec::new();
        pieces(
            &[sg(0x10_0000_0000, 64)],
            &mut resolve,
            &mut |_| Err(DmaError::NoPfn),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            [Piece::Bounce {
                gpa: 0x10_0000_0000,
                len: 64
            }]
        );
    }

    #[test]
    fn direct_only_copy_is_one_chunk_with_nothing_bounced() {
        let p = [
            Piece::Direct { phys: 0, len: MB2 },
            Piece::Direct {
                phys: 4 * MB2,
                len: 5,
            },
        ];
        let c = chunks(&p, 4096, 1024);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].direct, c[0].bounce, c[0].total()),
            (MB2 + 5, 0, MB2 + 5)
        );
    }

    #[test]
    fn bounced_bytes_are_cut_into_chunks_of_the_bounce_limit() {
        let p = [
            Piece::Direct { phys: 0, len: 10 },
            Piece::Bounce {
                gpa: 0x1000,
                len: 2500,
            },
            Piece::Direct { phys: 64, len: 7 },
        ];
        let c = chunks(&p, 1000, 1024);
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[0].pieces,
            [
                Piece::Direct { phys: 0, len: 10 },
                Piece::Bounce {
                    gpa: 0x1000,
                    len: 1000
                }
            ]
        );
        assert_eq!(
            c[1].pieces,
            [Piece::Bounce {
                gpa: 0x1000 + 1000,
                len: 1000
            }]
        );
        assert_eq!(
            c[2].pieces,
            [
                Piece::Bounce {
                    gpa: 0x1000 + 2000,
                    len: 500
                },
                Piece::Direct { phys: 64, len: 7 }
            ]
        );
        let total: u64 = c.iter().map(Chunk::total).sum();
        assert_eq!(total, 10 + 2500 + 7);
        assert!(c.iter().all(|c| c.bounce <= 1000));
    }

    #[test]
    fn piece_count_limit_starts_a_new_chunk() {
        let p: Vec<_> = (0..5)
            .map(|i| Piece::Direct {
                phys: i * 100,
                len: 1,
            })
            .collect();
        let c = chunks(&p, 4096, 2);
        assert_eq!(
            c.iter().map(|c| c.pieces.len()).collect::<Vec<_>>(),
            [2, 2, 1]
        );
    }

    #[test]
    fn empty_copy_is_one_empty_chunk() {
        let c = chunks(&[], 4096, 16);
        assert_eq!(c, [Chunk::default()]);
    }

    #[test]
    fn bounced_parts_map_a_buffer_window_onto_the_client_ranges() {
        let p = [
            Piece::Bounce {
                gpa: 0x1000,
                len: 100,
            },
            Piece::Direct { phys: 0, len: 50 },
            Piece::Bounce {
                gpa: 0x9000,
                len: 200,
            },
        ];
        let all: Vec<_> = bounced_parts(&p, 0..300).collect();
        assert_eq!(all, [(0x1000, 0, 100), (0x9000, 100, 200)]);
        // A window across the boundary of the two bounced pieces.
        let window: Vec<_> = bounced_parts(&p, 90..150).collect();
        assert_eq!(window, [(0x1000 + 90, 90, 10), (0x9000, 100, 50)]);
        // A window inside the second piece only.
        let inner: Vec<_> = bounced_parts(&p, 120..130).collect();
        assert_eq!(inner, [(0x9000 + 20, 120, 10)]);
        assert_eq!(bounced_parts(&p, 40..40).count(), 0);
        assert_eq!(bounced_parts(&p, 300..400).count(), 0);
    }
}

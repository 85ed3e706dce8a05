//! Allocation extents and how the sender cuts a disk into frames.
//!
//! Sources report which ranges read as zeros (NBD `base:allocation`, SEEK_HOLE/SEEK_DATA).
//! The planner turns those ranges into pieces: data pieces never cross a chunk boundary
//! (so NBD requests stay aligned), zero pieces cover up to `MAX_ZERO_LEN` each.

use crate::frame::MAX_ZERO_LEN;

/// libnbd `LIBNBD_STATE_ZERO`: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub zero: bool,
    /// Unchanged since the dirty bitmap was started: a dirty transfer sends nothing for it.
    pub skip: bool,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Turn a server's `(length, flags)` list starting at `start` into extents clipped to `end`,
/// merging neighbours of the same kind. Servers may describe less than asked (the caller
/// asks again from where this stops) or more (clipped). Zero-length entries are skipped.
pub fn from_block_status(start: u64, end: u64, entries: &[(u64, u32)]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = start;
    for &(len, flags) in entries {
        if pos >= end {
            break;
        }
        let len = len.min(end - pos);
        if len == 0 {
            continue;
        }
        push_merged(
            &mut out,
            Extent {
                offset: pos,
                len,
                zero: flags & STATE_ZERO != 0,
                skip: false,
            },
        );
        pos += len;
    }
    out
}

/// Append, merging with the last extent when contiguous and of the same kind.
pub fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        if last.zero == e.zero && last.skip == e.skip && last.end() == e.offset {
            last.len += e.len;
            return;
        }
    }
    out.push(e);
}

/// libnbd's `qemu:dirty-bitmap:` flag: the range changed since the bitmap was started.
pub const STATE_DIRTY: u32 = 1;

/// Mark as `skip` what a dirty bitmap's `(length, flags)` list, starting at `start`, does not
/// mark dirty; `alloc` (from `from_block_status`, starting at `start` too) is cut where
/// the two lists change. The result ends where the shorter description ends (the caller
/// asks again from there). Unchanged neighbours are merged whatever their allocation.
pub fn with_dirty(start: u64, alloc: &[Extent], dirty: &[(u64, u32)]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut runs = Vec::new();
    let mut pos = start;
    for &(len, flags) in dirty {
        if len == 0 {
            continue;
        }
        runs.push((pos, pos.saturating_add(len), flags & STATE_DIRTY != 0));
        pos = pos.saturating_add(len);
    }
    let (mut a, mut d) = (0, 0);
    let mut pos = start;
    while a < alloc.len() && d < runs.len() {
        let (e, (_, dend, dirty)) = (alloc[a], runs[d]);
        let end = e.end().min(dend);
        if end > pos {
            push_merged(
                &mut out,
                Extent {
                    offset: pos,
                    len: end - pos,
                    zero: e.zero && dirty,
                    skip: !dirty,
                },
            );
            pos = end;
        }
        if e.end() <= pos {
            a += 1;
        }
        if dend <= pos {
            d += 1;
        }
    }
    out
}

/// Cut an extent into frame-sized pieces; see the module comment for the rules. An
/// unchanged extent (`skip`) has none.
pub fn pieces(e: &Extent, chunk: u64, out: &mut Vec<Extent>) {
    if e.skip {
        return;
    }
    let end = e.end();
    let mut pos = e.offset;
    while pos < end {
        let stop = if e.zero {
            end.min(pos.saturating_add(MAX_ZERO_LEN))
        } else {
            end.min((pos / chunk + 1) * chunk)
        };
        out.push(Extent {
            offset: pos,
            len: stop - pos,
            zero: e.zero,
            skip: e.skip,
        });
        pos = stop;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_status_is_merged_and_clipped() {
        let got = from_block_status(
            100,
            1000,
            &[(50, 0), (50, 0), (0, 3), (200, 3), (100, 2), (10_000, 0)],
        );
        assert_eq!(
            got,
            vec![
                Extent {
                    offset: 100,
                    len: 100,
                    zero: false,
                    skip: false,
                },
                Extent {
                    offset: 200,
                    len: 300,
                    zero: true,
                    skip: false,
                },
                Extent {
                    offset: 500,
                    len: 500,
                    zero: false,
                    skip: false,
                },
            ]
        );
    }

    #[test]
    fn what_the_bitmap_does_not_mark_is_skipped() {
        let alloc = from_block_status(0, 1000, &[(300, 0), (700, 2)]);
        let got = with_dirty(
            0,
            &alloc,
            &[(100, 0), (100, 1), (200, 1), (100, 0), (300, 1)],
        );
        let spans: Vec<(u64, u64, bool, bool)> = got
            .iter()
            .map(|e| (e.offset, e.len, e.zero, e.skip))
            .collect();
        assert_eq!(
            spans,
            vec![
                (0, 100, false, true),
                (100, 200, false, false),
                (300, 100, true, false),
                (400, 100, false, true),
                (500, 300, true, false),
            ]
        );
        let mut cut = Vec::new();
        pieces(&got[0], 4096, &mut cut);
        assert!(cut.is_empty(), "unchanged ranges become no frame");
    }

    #[test]
    fn hole_without_zero_flag_is_data() {
        // STATE_HOLE alone does not promise zeros.
        let got = from_block_status(0, 10, &[(10, 1)]);
        assert_eq!(
            got,
            vec![Extent {
                offset: 0,
                len: 10,
                zero: false,
                skip: false,
            }]
        );
    }

    #[test]
    fn data_pieces_stop_at_chunk_boundaries() {
        let mut out = Vec::new();
        pieces(
            &Extent {
                offset: 1000,
                len: 10_000,
                zero: false,
                skip: false,
            },
            4096,
            &mut out,
        );
        let spans: Vec<(u64, u64)> = out.iter().map(|p| (p.offset, p.len)).collect();
        assert_eq!(spans, vec![(1000, 3096), (4096, 4096), (8192, 2808)]);
        assert_eq!(out.iter().map(|p| p.len).sum::<u64>(), 10_000);
    }

    #[test]
    fn zero_pieces_are_capped() {
        let mut out = Vec::new();
        pieces(
            &Extent {
                offset: 0,
                len: 2 * MAX_ZERO_LEN + 5,
                zero: true,
                skip: false,
            },
            4096,
            &mut out,
        );
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|p| p.zero && p.len <= MAX_ZERO_LEN));
        assert_eq!(out[2].end(), 2 * MAX_ZERO_LEN + 5);
    }
}

//! Small entry points for the micro benchmarks (`bench/micro/`): the hot per-chunk
//! functions of the data path, called on Python buffers without copying them.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::checksum;
use crate::extents;
use crate::frame::{ChunkHeader, Kind, HEADER_LEN};

/// The frame checksum of `payload` under a fixed header.
#[pyfunction]
fn checksum_of(payload: &[u8]) -> u64 {
    checksum::frame_checksum(&[0u8; 32], payload)
}

/// True when every byte of `data` is zero.
#[pyfunction]
fn is_zero(data: &[u8]) -> bool {
    checksum::is_zero(data)
}

/// Seal a frame around `payload` (header written in front, checksum computed). Kind,
/// session and length default to a DATA frame of session 1 covering `payload`; tests use
/// them to forge frames a hostile publisher could send.
#[pyfunction]
#[pyo3(signature = (seq, offset, payload, session=1, kind=1, length=None))]
fn encode_frame<'py>(
    py: Python<'py>,
    seq: u64,
    offset: u64,
    payload: &[u8],
    session: u32,
    kind: u8,
    length: Option<u64>,
) -> PyResult<Bound<'py, PyBytes>> {
    let kind = Kind::from_u8(kind)
        .ok_or_else(|| pyo3::exceptions::PyValueError::new_err("unknown frame kind"))?;
    let length = length.unwrap_or(payload.len() as u64);
    PyBytes::new_with(py, HEADER_LEN + payload.len(), |buf| {
        buf[HEADER_LEN..].copy_from_slice(payload);
        ChunkHeader {
            kind,
            session,
            seq,
            offset,
            length,
            checksum: 0,
        }
        .seal(buf);
        Ok(())
    })
}

/// Decode and verify a frame; returns (kind, seq, offset, length) or raises ValueError.
#[pyfunction]
fn decode_frame(frame: &[u8]) -> PyResult<(u8, u64, u64, u64)> {
    let (h, _) = ChunkHeader::decode(frame)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    Ok((h.kind as u8, h.seq, h.offset, h.length))
}

/// Merge `(length, flags)` block-status entries from `start`, clipped at `end`.
#[pyfunction]
fn merge_extents(start: u64, end: u64, entries: Vec<(u64, u32)>) -> Vec<(u64, u64, bool)> {
    extents::from_block_status(start, end, &entries)
        .into_iter()
        .map(|e| (e.offset, e.len, e.zero))
        .collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(checksum_of, m)?)?;
    m.add_function(wrap_pyfunction!(is_zero, m)?)?;
    m.add_function(wrap_pyfunction!(encode_frame, m)?)?;
    m.add_function(wrap_pyfunction!(decode_frame, m)?)?;
    m.add_function(wrap_pyfunction!(merge_extents, m)?)?;
    Ok(())
}

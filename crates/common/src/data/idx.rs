//! The IDX format of MNIST and Fashion-MNIST (LeCun et al.): a big-endian header
//! `0x00 0x00 dtype ndim`, one u32 per dimension, then the raw values. Files may be gzipped.

use std::io::Read;
use std::path::Path;

use crate::error::{CommonError, Result};

/// Magic of an unsigned-byte tensor with `ndim` dimensions.
const fn magic(ndim: u8) -> u32 {
    0x0000_0800 | ndim as u32
}

/// A decoded u8 IDX tensor.
#[derive(Debug, Clone)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub values: Vec<u8>,
}

/// Reads an unsigned-byte IDX file with `ndim` dimensions (gzip detected from the content).
pub fn read_idx_u8(path: &Path, ndim: u8) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| CommonError::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| CommonError::dataset(path, format!("not a valid gzip file ({e})")))?;
        out
    } else {
        raw
    };
    parse_idx_u8(&bytes, ndim).map_err(|m| CommonError::dataset(path, m))
}

/// Parses IDX bytes; the error says what was expected.
pub fn parse_idx_u8(bytes: &[u8], ndim: u8) -> std::result::Result<IdxArray, String> {
    let header_len = 4 + 4 * ndim as usize;
    if bytes.len() < header_len {
        return Err(format!(
            "truncated IDX file: {} bytes, expected a header of {header_len}",
            bytes.len()
        ));
    }
    let word = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let found = word(0);
    if found != magic(ndim) {
        return Err(format!(
            "not an IDX u8 file with {ndim} dimensions: magic 0x{found:08x}, expected 0x{:08x}",
            magic(ndim)
        ));
    }
    let dims: Vec<usize> = (0..ndim as usize)
        .map(|d| word(4 + 4 * d) as usize)
        .collect();
    let count: usize = dims.iter().product();
    let body = &bytes[header_len..];
    if body.len() != count {
        return Err(format!(
            "truncated or oversized IDX file: dimensions {dims:?} need {count} bytes of data, found {}",
            body.len()
        ));
    }
    Ok(IdxArray {
        dims,
        values: body.to_vec(),
    })
}

/// Encodes a u8 tensor as IDX bytes (used by tests and conversion tools).
pub fn encode_idx_u8(dims: &[usize], values: &[u8]) -> Vec<u8> {
    let mut out = magic(dims.len() as u8).to_be_bytes().to_vec();
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(values);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let values: Vec<u8> = (0..24).collect();
        let bytes = encode_idx_u8(&[2, 3, 4], &values);
        let back = parse_idx_u8(&bytes, 3).unwrap();
        assert_eq!(back.dims, vec![2, 3, 4]);
        assert_eq!(back.values, values);
    }

    #[test]
    fn rejects_bad_magic_and_truncation() {
        let bytes = encode_idx_u8(&[2, 3, 4], &[0; 24]);
        let err = parse_idx_u8(&bytes, 1).unwrap_err();
        assert!(
            err.contains("magic 0x00000803, expected 0x00000801"),
            "{err}"
        );
        let err = parse_idx_u8(&bytes[..30], 3).unwrap_err();
        assert!(err.contains("need 24 bytes of data, found 14"), "{err}");
        let err = parse_idx_u8(&bytes[..5], 3).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
    }
}

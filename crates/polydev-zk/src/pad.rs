//! Length hiding: plaintexts are padded to buckets (powers of two from 64 bytes to 64 KiB, then
//! multiples of 64 KiB), so a ciphertext tells only the bucket of its plaintext's length.

use crate::Error;

const MIN_BUCKET: usize = 64;
const LARGE: usize = 64 * 1024;

pub(crate) fn bucket(len: usize) -> usize {
    let framed = len + 4;
    if framed <= LARGE {
        framed.next_power_of_two().max(MIN_BUCKET)
    } else {
        framed.div_ceil(LARGE) * LARGE
    }
}

/// `len (u32 BE) || data || zeros` up to the bucket.
pub(crate) fn pad(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bucket(data.len()));
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(bucket(data.len()), 0);
    out
}

/// [`pad`] appended to `out` (which should have room for [`bucket`] more bytes).
pub(crate) fn pad_into(out: &mut Vec<u8>, data: &[u8]) {
    let end = out.len() + bucket(data.len());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(end, 0);
}

pub(crate) fn unpad(padded: &[u8]) -> Result<&[u8], Error> {
    let (len, rest) = padded
        .split_first_chunk::<4>()
        .ok_or(Error::Malformed("padding"))?;
    let len = u32::from_be_bytes(*len) as usize;
    rest.get(..len).ok_or(Error::Malformed("padding"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hide_lengths_within_a_class() {
        assert_eq!(bucket(0), 64);
        assert_eq!(bucket(60), 64);
        assert_eq!(bucket(61), 128);
        assert_eq!(bucket(1000), 1024);
        assert_eq!(bucket(LARGE - 4), LARGE);
        assert_eq!(bucket(LARGE), 2 * LARGE);
        for len in [0, 1, 59, 60, 61, 5000, 70_000] {
            let data = vec![7u8; len];
            let padded = pad(&data);
            assert_eq!(padded.len(), bucket(len));
            assert_eq!(unpad(&padded).unwrap(), &data[..]);
            let mut appended = vec![1, 2];
            pad_into(&mut appended, &data);
            assert_eq!(appended[2..], padded[..]);
        }
        assert!(unpad(&[0, 0, 1, 0, 1, 2]).is_err());
        assert!(unpad(&[1, 2]).is_err());
    }
}

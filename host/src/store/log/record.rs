//! The record format of segments, small state files and the logger's archive:
//! `[len u32 BE][crc32 u32 BE][bincode value]`.

use std::io::{self, Read};

use serde::{de::DeserializeOwned, Serialize};

/// Bytes before a record's body: its length and checksum.
pub const RECORD_HEADER: usize = 8;

pub fn encode_record<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), bincode::Error> {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER]);
    bincode::serialize_into(&mut *out, value)?;
    let len = (out.len() - start - RECORD_HEADER) as u32;
    let crc = crc32fast::hash(&out[start + RECORD_HEADER..]);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// Decode the records in `data`; returns them with their offsets and the length of the
/// valid prefix (shorter than `data` when the tail is torn or corrupt). A record whose
/// checksum matches but which does not decode is no torn write, and is an error: treating
/// it as one would zero the rest of the log (written by another version, or a bug).
pub fn decode_records<T: DeserializeOwned>(data: &[u8]) -> io::Result<(Vec<(u64, T)>, usize)> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while data.len() - pos >= RECORD_HEADER {
        let len = u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_be_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        let body = pos + RECORD_HEADER;
        // A zero length is the preallocated (zeroed) rest of a segment, not a record.
        if len == 0 || data.len() - body < len || crc32fast::hash(&data[body..body + len]) != crc {
            break;
        }
        match bincode::deserialize(&data[body..body + len]) {
            Ok(v) => out.push((pos as u64, v)),
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the record at byte {pos} is intact but cannot be decoded ({e}): written by another version?"
                    ),
                ))
            }
        }
        pos = body + len;
    }
    Ok((out, pos))
}

/// The body length in the record header at the start of `records`.
pub fn body_len(records: &[u8]) -> usize {
    u32::from_be_bytes([records[0], records[1], records[2], records[3]]) as usize
}

/// One step of reading records from a stream, for files too large to hold in memory.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A whole record whose checksum matches; its body is in the caller's buffer.
    Record { len: usize },
    /// The stream ended exactly at a record boundary.
    End,
    /// The stream ended inside a record: `have` bytes of it were there (a torn write).
    Short { have: usize },
    /// A whole record whose checksum does not match, or a zero length (not a record).
    Bad { len: usize },
}

/// Reads the next record of `r` into `body` (cleared first). Bodies longer than `max`
/// are reported `Bad` without reading them, so a corrupt length reserves nothing.
pub fn read_record(r: &mut impl Read, body: &mut Vec<u8>, max: usize) -> io::Result<Next> {
    body.clear();
    let mut head = [0u8; RECORD_HEADER];
    let got = read_full(r, &mut head)?;
    if got == 0 {
        return Ok(Next::End);
    }
    if got < RECORD_HEADER {
        return Ok(Next::Short { have: got });
    }
    let len = body_len(&head);
    let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if len == 0 || len > max {
        // Whether the rest is a torn tail is the caller's to judge (it knows the file size).
        return Ok(Next::Bad { len });
    }
    let got = r.take(len as u64).read_to_end(body)?;
    if got < len {
        return Ok(Next::Short { have: RECORD_HEADER + got });
    }
    if crc32fast::hash(body) != crc {
        return Ok(Next::Bad { len });
    }
    Ok(Next::Record { len })
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_or_flipped_tail_ends_the_valid_prefix() {
        let mut data = Vec::new();
        for v in [1u64, 2, 3] {
            encode_record(&v, &mut data).expect("encode");
        }
        let (records, valid) = decode_records::<u64>(&data).expect("decode");
        assert_eq!(records.iter().map(|(_, v)| *v).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(valid, data.len());
        assert_eq!(body_len(&data), data.len() / 3 - RECORD_HEADER);

        let torn = &data[..data.len() - 1];
        let (records, valid) = decode_records::<u64>(torn).expect("decode");
        assert_eq!((records.len(), valid), (2, 2 * data.len() / 3));

        let mut flipped = data.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let (records, _) = decode_records::<u64>(&flipped).expect("decode");
        assert_eq!(records.len(), 2, "a checksum mismatch ends the valid records");
    }

    #[test]
    fn records_read_one_at_a_time_tell_end_torn_and_bad_apart() {
        let mut data = Vec::new();
        for v in [1u64, 2] {
            encode_record(&v, &mut data).expect("encode");
        }
        let mut body = Vec::new();
        let mut r = &data[..];
        assert_eq!(read_record(&mut r, &mut body, 1 << 20).expect("read"), Next::Record { len: 8 });
        assert_eq!(bincode::deserialize::<u64>(&body).expect("decode"), 1);
        assert_eq!(read_record(&mut r, &mut body, 1 << 20).expect("read"), Next::Record { len: 8 });
        assert_eq!(read_record(&mut r, &mut body, 1 << 20).expect("read"), Next::End);
        let mut torn = &data[..data.len() - 3];
        read_record(&mut torn, &mut body, 1 << 20).expect("read");
        assert_eq!(read_record(&mut torn, &mut body, 1 << 20).expect("read"), Next::Short { have: 13 });
        let mut flipped = data.clone();
        flipped[10] ^= 1;
        assert_eq!(read_record(&mut &flipped[..], &mut body, 1 << 20).expect("read"), Next::Bad { len: 8 });
        assert_eq!(read_record(&mut &data[..], &mut body, 4).expect("read"), Next::Bad { len: 8 }, "over the bound");
    }

    #[test]
    fn an_intact_record_of_another_type_is_an_error_not_a_torn_tail() {
        let mut data = Vec::new();
        encode_record(&1u8, &mut data).expect("encode");
        let err = decode_records::<u64>(&data).expect_err("too short for a u64");
        assert!(err.to_string().contains("cannot be decoded"), "{err}");
    }
}

//! The snapshot file: what `current.snap` holds and what travels to lagging members.
//!
//! ```text
//! "WRSNAP2\n"  u32 BE meta length  bincode SnapshotMeta  guest stream ...  trailer
//! trailer = "WRSNAPT\n"  u64 BE stream length  u8 digest length  the guest's digest at
//!           the snapshot (64 bytes, zero padded)  u128 BE xxh3 of everything before it
//! ```
//!
//! Neither the guests' streams nor the first format had a length, a checksum or an end
//! marker, so a truncated or bit-flipped snapshot restored silently with part of the
//! state missing. Now a reader checks the magic, bounds the meta length, stops the guest
//! stream at its recorded length, and fails the read at its end if the checksum differs
//! (before the guest's `restore.finish`, so a bad stream never replaces a state); the
//! caller then compares the restored guest's digest with the recorded one, which catches
//! a guest whose restore does not rebuild what its snapshot wrote.
//!
//! Files of the first format ("WRSNAP1\n", no trailer) are still read, unchecked.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

use crate::types::SnapshotMeta;

const MAGIC_V1: &[u8; 8] = b"WRSNAP1\n";
const MAGIC: &[u8; 8] = b"WRSNAP2\n";
const TRAILER_MAGIC: &[u8; 8] = b"WRSNAPT\n";
const MAX_DIGEST: usize = 64;
const TRAILER_PREFIX: usize = 8 + 8 + 1 + MAX_DIGEST;
const TRAILER_LEN: u64 = TRAILER_PREFIX as u64 + 16;
/// A bincode `SnapshotMeta` is a few hundred bytes per member; anything near this is not one.
const MAX_META: usize = 1 << 20;
const BUFFER: usize = 1 << 20;

fn invalid(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {why}", path.display()))
}

/// Writes a snapshot file: the header at once, then the guest's stream through
/// [`SnapWriter::stream`], then [`SnapWriter::finish`] with the guest's digest.
pub struct SnapWriter {
    out: BufWriter<File>,
    hash: Xxh3,
    stream_len: u64,
}

impl SnapWriter {
    pub fn create(file: File, meta: &SnapshotMeta) -> io::Result<Self> {
        let meta = bincode::serialize(meta).map_err(io::Error::other)?;
        let mut w = SnapWriter { out: BufWriter::with_capacity(BUFFER, file), hash: Xxh3::new(), stream_len: 0 };
        w.hashed(MAGIC)?;
        w.hashed(&(meta.len() as u32).to_be_bytes())?;
        w.hashed(&meta)?;
        Ok(w)
    }

    fn hashed(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hash.update(bytes);
        self.out.write_all(bytes)
    }

    /// Where the guest's stream goes.
    pub fn stream(&mut self) -> &mut impl Write {
        self
    }

    /// Writes the trailer; returns the file, not yet synced.
    pub fn finish(mut self, digest: &[u8]) -> io::Result<File> {
        if digest.len() > MAX_DIGEST {
            return Err(io::Error::other(format!("a guest digest of {} bytes (at most {MAX_DIGEST})", digest.len())));
        }
        let mut trailer = Vec::with_capacity(TRAILER_LEN as usize);
        trailer.extend_from_slice(TRAILER_MAGIC);
        trailer.extend_from_slice(&self.stream_len.to_be_bytes());
        trailer.push(digest.len() as u8);
        trailer.extend_from_slice(digest);
        trailer.resize(TRAILER_PREFIX, 0);
        self.hash.update(&trailer);
        trailer.extend_from_slice(&self.hash.digest128().to_be_bytes());
        self.out.write_all(&trailer)?;
        self.out.into_inner().map_err(|e| e.into_error())
    }
}

impl Write for SnapWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hash.update(&buf[..n]);
        self.stream_len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// What the trailer promises about the stream.
struct Trailer {
    stream_len: u64,
    hash: u128,
    digest: Vec<u8>,
    /// Its own bytes before the hash, which the hash covers too.
    prefix: Vec<u8>,
}

/// A snapshot file opened for reading: its meta, and its guest stream through `Read`.
/// Reading the stream to its end fails if the file is not exactly what was written.
pub struct SnapReader {
    pub meta: SnapshotMeta,
    input: io::Take<BufReader<File>>,
    hash: Xxh3,
    trailer: Option<Trailer>,
    checked: bool,
    path: std::path::PathBuf,
}

impl SnapReader {
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut file = File::open(path)?;
        let size = file.metadata()?.len();
        let mut head = [0u8; 12];
        file.read_exact(&mut head).map_err(|e| invalid(path, format!("no snapshot header ({e})")))?;
        let (magic, len) = head.split_at(8);
        let v2 = magic == MAGIC;
        if !v2 && magic != MAGIC_V1 {
            return Err(invalid(path, "not a snapshot file"));
        }
        let meta_len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if meta_len > MAX_META {
            return Err(invalid(path, format!("a snapshot header claiming {meta_len} bytes of metadata")));
        }
        let mut meta = vec![0u8; meta_len];
        file.read_exact(&mut meta).map_err(|e| invalid(path, format!("snapshot metadata cut short ({e})")))?;
        let mut hash = Xxh3::new();
        hash.update(&head);
        hash.update(&meta);
        let meta: SnapshotMeta = bincode::deserialize(&meta).map_err(|e| invalid(path, e))?;
        let start = 12 + meta_len as u64;
        let trailer = if v2 {
            let trailer = read_trailer(&mut file, size).map_err(|e| invalid(path, e))?;
            if start + trailer.stream_len + TRAILER_LEN != size {
                return Err(invalid(
                    path,
                    format!(
                        "{size} bytes, but the header and trailer account for {}",
                        start + trailer.stream_len + TRAILER_LEN
                    ),
                ));
            }
            file.seek(SeekFrom::Start(start))?;
            Some(trailer)
        } else {
            tracing::warn!(snapshot = %path.display(), "snapshot of the first format: no checksum to verify");
            None
        };
        let limit = trailer.as_ref().map_or(u64::MAX, |t| t.stream_len);
        Ok(SnapReader {
            meta,
            input: BufReader::with_capacity(BUFFER, file).take(limit),
            hash,
            trailer,
            checked: false,
            path: path.to_path_buf(),
        })
    }

    /// The guest's digest recorded at the snapshot, if the format has one.
    pub fn digest(&self) -> Option<&[u8]> {
        self.trailer.as_ref().map(|t| t.digest.as_slice())
    }

    /// Reads the whole stream, verifying it, without restoring anything.
    pub fn verify(mut self) -> io::Result<SnapshotMeta> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self.meta)
    }
}

fn read_trailer(file: &mut File, size: u64) -> Result<Trailer, String> {
    if size < TRAILER_LEN {
        return Err("too short to hold a trailer: the file was cut short".into());
    }
    file.seek(SeekFrom::Start(size - TRAILER_LEN)).map_err(|e| e.to_string())?;
    let mut t = [0u8; TRAILER_LEN as usize];
    file.read_exact(&mut t).map_err(|e| e.to_string())?;
    if &t[..8] != TRAILER_MAGIC {
        return Err("no trailer at the end: the file was cut short or overwritten".into());
    }
    let stream_len = u64::from_be_bytes(t[8..16].try_into().map_err(|_| "trailer")?);
    let digest_len = usize::from(t[16]);
    if digest_len > MAX_DIGEST {
        return Err(format!("a trailer with a {digest_len}-byte digest"));
    }
    let hash = u128::from_be_bytes(t[TRAILER_PREFIX..].try_into().map_err(|_| "trailer")?);
    Ok(Trailer { stream_len, hash, digest: t[17..17 + digest_len].to_vec(), prefix: t[..TRAILER_PREFIX].to_vec() })
}

impl Read for SnapReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.hash.update(&buf[..n]);
        if n == 0 && !self.checked && !buf.is_empty() {
            if let Some(t) = &self.trailer {
                if self.input.limit() > 0 {
                    return Err(invalid(&self.path, "the guest stream ends early"));
                }
                self.hash.update(&t.prefix);
                if self.hash.digest128() != t.hash {
                    return Err(invalid(&self.path, "checksum mismatch: the snapshot is corrupt"));
                }
            }
            self.checked = true;
        }
        Ok(n)
    }
}

/// A snapshot file read from a stream of known length (a recovery reading one off the
/// network): the same checks as [`SnapReader`], made as the bytes pass, so the file is
/// never held whole nor written anywhere first. The trailer comes last here, so the
/// recorded digest is known only once the stream has been read to its end, which fails if
/// the file is not exactly what was written.
pub struct SnapStream<R: Read> {
    pub meta: SnapshotMeta,
    input: io::Take<R>,
    hash: Xxh3,
    /// Whether the file has a trailer (the second format).
    v2: bool,
    stream_len: u64,
    digest: Option<Vec<u8>>,
    checked: bool,
}

impl<R: Read> SnapStream<R> {
    /// Reads the header of a `total`-byte snapshot file from `input`.
    pub fn open(mut input: R, total: u64) -> io::Result<Self> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let mut head = [0u8; 12];
        input.read_exact(&mut head).map_err(|e| bad(format!("no snapshot header ({e})")))?;
        let (magic, len) = head.split_at(8);
        let v2 = magic == MAGIC;
        if !v2 && magic != MAGIC_V1 {
            return Err(bad("not a snapshot file".into()));
        }
        let meta_len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if meta_len > MAX_META {
            return Err(bad(format!("a snapshot header claiming {meta_len} bytes of metadata")));
        }
        let mut meta = vec![0u8; meta_len];
        input.read_exact(&mut meta).map_err(|e| bad(format!("snapshot metadata cut short ({e})")))?;
        let mut hash = Xxh3::new();
        hash.update(&head);
        hash.update(&meta);
        let meta: SnapshotMeta = bincode::deserialize(&meta).map_err(|e| bad(e.to_string()))?;
        let overhead = 12 + meta_len as u64 + if v2 { TRAILER_LEN } else { 0 };
        let Some(stream_len) = total.checked_sub(overhead) else {
            return Err(bad(format!("a {total}-byte snapshot cannot hold its {overhead} bytes of header and trailer")));
        };
        Ok(SnapStream { meta, input: input.take(stream_len), hash, v2, stream_len, digest: None, checked: false })
    }

    /// The guest's digest recorded at the snapshot: known once the stream has been read to
    /// its end (and verified); `None` before, and for first-format files.
    pub fn digest(&self) -> Option<&[u8]> {
        self.digest.as_deref()
    }

    fn check_trailer(&mut self) -> io::Result<()> {
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
        if self.input.limit() > 0 {
            return Err(bad("the snapshot's guest stream ends early"));
        }
        if !self.v2 {
            return Ok(());
        }
        let stream_len = self.stream_len;
        let mut t = [0u8; TRAILER_LEN as usize];
        self.input
            .get_mut()
            .read_exact(&mut t)
            .map_err(|e| bad(&format!("the snapshot's trailer is cut short ({e})")))?;
        if &t[..8] != TRAILER_MAGIC {
            return Err(bad("no trailer where the snapshot's trailer should be"));
        }
        let recorded_len = u64::from_be_bytes(t[8..16].try_into().map_err(|_| bad("trailer"))?);
        if recorded_len != stream_len {
            return Err(bad(&format!("the trailer records a {recorded_len}-byte stream, {stream_len} came")));
        }
        let digest_len = usize::from(t[16]);
        if digest_len > MAX_DIGEST {
            return Err(bad(&format!("a trailer with a {digest_len}-byte digest")));
        }
        self.hash.update(&t[..TRAILER_PREFIX]);
        let hash = u128::from_be_bytes(t[TRAILER_PREFIX..].try_into().map_err(|_| bad("trailer"))?);
        if self.hash.digest128() != hash {
            return Err(bad("checksum mismatch: the snapshot is corrupt"));
        }
        self.digest = Some(t[17..17 + digest_len].to_vec());
        Ok(())
    }
}

impl<R: Read> Read for SnapStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.hash.update(&buf[..n]);
        if n == 0 && !self.checked && !buf.is_empty() {
            self.check_trailer()?;
            self.checked = true;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{LogId, StoredMembership};
    use openraft::CommittedLeaderId;

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 40)),
            last_membership: StoredMembership::default(),
            snapshot_id: "2-40".into(),
        }
    }

    fn write(path: &Path, stream: &[u8], digest: &[u8]) {
        let mut w = SnapWriter::create(File::create(path).expect("create"), &meta()).expect("header");
        w.stream().write_all(stream).expect("stream");
        w.finish(digest).expect("trailer").sync_all().expect("sync");
    }

    fn read_all(path: &Path) -> io::Result<(SnapshotMeta, Vec<u8>, Vec<u8>)> {
        let mut r = SnapReader::open(path)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok((r.meta.clone(), out, r.digest().map(<[u8]>::to_vec).unwrap_or_default()))
    }

    #[test]
    fn round_trip_and_every_corruption_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.snap");
        let stream: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        write(&path, &stream, b"digest");
        assert_eq!(read_all(&path).expect("intact"), (meta(), stream.clone(), b"digest".to_vec()));
        let good = std::fs::read(&path).expect("read");

        // A bit flipped anywhere: in the stream, in the meta, in the trailer.
        for at in [20, good.len() / 2, good.len() - 60, good.len() - 80] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).expect("write");
            assert!(read_all(&path).is_err(), "a flipped bit at {at} went unnoticed");
        }
        // Cut short, at a record boundary of the guest stream or anywhere else.
        for len in [good.len() - 1, good.len() - TRAILER_LEN as usize, 5000, 10] {
            std::fs::write(&path, &good[..len]).expect("write");
            assert!(read_all(&path).is_err(), "a file cut to {len} bytes went unnoticed");
        }
        // A header claiming an absurd meta length is refused before anything is allocated.
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        std::fs::write(&path, &bad).expect("write");
        let err = read_all(&path).expect_err("absurd header");
        assert!(err.to_string().contains("claiming"), "{err}");
        std::fs::write(&path, b"something else entirely").expect("write");
        assert!(read_all(&path).expect_err("not a snapshot").to_string().contains("not a snapshot"));
    }

    #[test]
    fn a_streamed_snapshot_is_checked_like_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.snap");
        let stream: Vec<u8> = (0..50_000u32).map(|i| (i % 241) as u8).collect();
        write(&path, &stream, b"dg");
        let good = std::fs::read(&path).expect("read");
        let read = |bytes: &[u8]| -> io::Result<(Vec<u8>, Vec<u8>)> {
            let mut r = SnapStream::open(bytes, good.len() as u64)?;
            let mut out = Vec::new();
            r.read_to_end(&mut out)?;
            assert_eq!(r.meta, meta());
            Ok((out, r.digest().map(<[u8]>::to_vec).unwrap_or_default()))
        };
        assert_eq!(read(&good).expect("intact"), (stream, b"dg".to_vec()));
        for at in [20, good.len() / 2, good.len() - 60] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            assert!(read(&bad).is_err(), "a flipped bit at {at} went unnoticed");
        }
        assert!(read(&good[..good.len() - 1]).is_err(), "a stream cut short went unnoticed");
    }

    #[test]
    fn first_format_files_are_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.snap");
        let m = bincode::serialize(&meta()).expect("meta");
        let mut data = MAGIC_V1.to_vec();
        data.extend_from_slice(&(m.len() as u32).to_be_bytes());
        data.extend_from_slice(&m);
        data.extend_from_slice(b"guest stream");
        std::fs::write(&path, &data).expect("write");
        assert_eq!(read_all(&path).expect("v1"), (meta(), b"guest stream".to_vec(), Vec::new()));
    }
}

//! The end mark both key/value guests put on their snapshot streams: after the last
//! record, `[u64 LE bytes before the mark][u64 LE xxh3 of those bytes]["SEND"]`. A
//! restore that does not end in a matching mark is refused, so a stream cut anywhere
//! (even at a record boundary, which the record formats alone cannot tell from the end)
//! or changed in any byte never becomes a silently different state.
//!
//! [`Seal`] counts and hashes what a reader returns and then adds the mark; [`Unseal`]
//! holds the last [`MARK_LEN`] bytes of what a restore receives back from the parser
//! (they may be the mark) and checks them at the end.

use xxhash_rust::xxh3::Xxh3;

pub const MARK_LEN: usize = 20;
const MARK_MAGIC: &[u8; 4] = b"SEND";

/// The reading side: wraps a guest's reader function.
#[derive(Default)]
pub struct Seal {
    hasher: Xxh3,
    len: u64,
    /// The mark, once the records are exhausted, and how much of it was returned.
    mark: Option<([u8; MARK_LEN], usize)>,
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seal").field("len", &self.len).field("mark", &self.mark).finish()
    }
}

impl Seal {
    /// Returns at most `max` bytes of the sealed stream, taking the records from `inner`
    /// (which returns at most the number it is given, and nothing once exhausted). Every
    /// chunk but the last is full.
    pub fn read(
        &mut self,
        max: usize,
        mut inner: impl FnMut(usize) -> Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while out.len() < max {
            if let Some((mark, sent)) = &mut self.mark {
                let take = (MARK_LEN - *sent).min(max - out.len());
                out.extend_from_slice(&mark[*sent..*sent + take]);
                *sent += take;
                break;
            }
            let records = inner(max - out.len())?;
            if records.is_empty() {
                let mut mark = [0u8; MARK_LEN];
                mark[..8].copy_from_slice(&self.len.to_le_bytes());
                mark[8..16].copy_from_slice(&self.hasher.digest().to_le_bytes());
                mark[16..].copy_from_slice(MARK_MAGIC);
                self.mark = Some((mark, 0));
                continue;
            }
            self.hasher.update(&records);
            self.len += records.len() as u64;
            if out.is_empty() {
                out = records;
            } else {
                out.extend_from_slice(&records);
            }
        }
        Ok(out)
    }
}

/// The start of a restore: which of a guest's two magics the stream opens with, its
/// sealed format's or the older unsealed one's. Decided from the first bytes, so another
/// stream is refused at once rather than after the end mark could have arrived.
#[derive(Debug, Default)]
pub struct Opening {
    head: Vec<u8>,
    sealed: Option<bool>,
}

impl Opening {
    /// Looks at `chunk`'s first bytes until the magic is complete; `false` when they open
    /// neither format.
    pub fn take(&mut self, chunk: &[u8], sealed: &[u8; 4], unsealed: &[u8; 4]) -> bool {
        if self.sealed.is_some() {
            return true;
        }
        let want = sealed.len() - self.head.len();
        self.head.extend_from_slice(&chunk[..want.min(chunk.len())]);
        let have = self.head.len();
        if self.head[..] != sealed[..have] && self.head[..] != unsealed[..have] {
            return false;
        }
        if have == sealed.len() {
            self.sealed = Some(self.head[..] == sealed[..]);
        }
        true
    }

    /// `Some(true)`: the sealed format, whose end mark `Unseal::finish` checks.
    pub fn sealed(&self) -> Option<bool> {
        self.sealed
    }
}

/// The restoring side.
#[derive(Default)]
pub struct Unseal {
    hasher: Xxh3,
    len: u64,
    /// The last bytes received, not yet handed to the parser: at most `MARK_LEN`.
    held: Vec<u8>,
}

impl std::fmt::Debug for Unseal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unseal").field("len", &self.len).field("held", &self.held.len()).finish()
    }
}

impl Unseal {
    /// Takes a received chunk; returns the bytes that are certainly records (not the
    /// mark), in order, for the parser.
    pub fn pass(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.held.extend_from_slice(chunk);
        let release = self.held.len().saturating_sub(MARK_LEN);
        let records: Vec<u8> = self.held.drain(..release).collect();
        self.hasher.update(&records);
        self.len += records.len() as u64;
        records
    }

    /// The bytes held back, for a stream that turns out to have no mark (an older format).
    pub fn into_held(self) -> Vec<u8> {
        self.held
    }

    /// Checks that the stream ended with the mark of exactly what came before it.
    pub fn finish(self) -> Result<(), String> {
        let truncated = |why: &str| Err(format!("snapshot is truncated or damaged: {why}"));
        if self.held.len() < MARK_LEN || &self.held[16..] != MARK_MAGIC {
            return truncated("it does not end with its end mark");
        }
        let len = u64::from_le_bytes(self.held[..8].try_into().unwrap_or_default());
        let hash = u64::from_le_bytes(self.held[8..16].try_into().unwrap_or_default());
        if len != self.len {
            return truncated(&format!("the end mark counts {len} bytes, {} arrived", self.len));
        }
        if hash != self.hasher.digest() {
            return truncated("its checksum does not match its contents");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(data: &[u8]) -> impl FnMut(usize) -> Result<Vec<u8>, String> + '_ {
        let mut pos = 0;
        move |max| {
            let take = max.min(data.len() - pos);
            pos += take;
            Ok(data[pos - take..pos].to_vec())
        }
    }

    fn sealed(data: &[u8], max: usize) -> Vec<Vec<u8>> {
        let mut seal = Seal::default();
        let mut inner = records(data);
        let mut chunks = Vec::new();
        loop {
            let chunk = seal.read(max, &mut inner).expect("read");
            assert!(chunk.len() <= max);
            if chunk.is_empty() {
                return chunks;
            }
            chunks.push(chunk);
        }
    }

    fn unsealed(stream: &[u8], chunk: usize) -> Result<Vec<u8>, String> {
        let mut unseal = Unseal::default();
        let mut out = Vec::new();
        for c in stream.chunks(chunk.max(1)) {
            out.extend(unseal.pass(c));
        }
        unseal.finish().map(|()| out)
    }

    #[test]
    fn round_trip_whatever_the_chunks() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        for max in [1, 3, 19, 20, 21, 64, 4096] {
            let chunks = sealed(&data, max);
            for c in &chunks[..chunks.len() - 1] {
                assert_eq!(c.len(), max, "only the last chunk is short");
            }
            let stream = chunks.concat();
            assert_eq!(stream.len(), data.len() + MARK_LEN);
            for chunk in [1, 5, 20, 1000, 2000] {
                assert_eq!(unsealed(&stream, chunk).expect("whole"), data, "max {max}, chunk {chunk}");
            }
        }
        assert_eq!(unsealed(&sealed(b"", 7).concat(), 3).expect("empty"), b"");
    }

    #[test]
    fn every_cut_and_every_flip_is_refused() {
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let stream = sealed(&data, 64).concat();
        for cut in 0..stream.len() {
            assert!(unsealed(&stream[..cut], 7).is_err(), "cut at {cut}");
        }
        for at in 0..stream.len() {
            let mut flipped = stream.clone();
            flipped[at] ^= 1;
            assert!(unsealed(&flipped, 7).is_err(), "flip at {at}");
        }
        let mut longer = stream.clone();
        longer.push(0);
        assert!(unsealed(&longer, 7).is_err(), "a byte after the mark");
    }
}

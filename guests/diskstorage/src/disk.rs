//! The file under the store, behind a trait so that the logic runs natively over memory
//! in tests and over a WASI descriptor in the component.

/// A fixed-size file addressed by offset. Errors are messages: in `apply` they are this
/// member's failure (`store::EnvironmentFailure`), never a command's result; in a snapshot
/// or a restore they fail it.
pub trait Disk {
    /// Exactly `len` bytes from `offset`; a file shorter than that is an error.
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String>;
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String>;
    /// Truncates or extends; extending must leave the new bytes zero without writing them,
    /// so that a huge file costs nothing until it is written.
    fn set_len(&mut self, len: u64) -> Result<(), String>;
    /// Waits until written data is durable.
    fn sync(&mut self) -> Result<(), String>;
}

/// The disk of native tests.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct MemDisk {
    bytes: Vec<u8>,
    /// How often `sync` was called, so tests can check the sync mode.
    pub syncs: u64,
}

/// A summary: the bytes of a test store run to megabytes.
impl std::fmt::Debug for MemDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemDisk")
            .field("len", &self.bytes.len())
            .field("non_zero", &self.bytes.iter().filter(|&&b| b != 0).count())
            .field("syncs", &self.syncs)
            .finish()
    }
}

impl MemDisk {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, String> {
        usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(len)?))
            .ok_or_else(|| format!("offset {offset} + {len} does not fit in memory"))
    }
}

impl Disk for MemDisk {
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        let range = self.range(offset, len)?;
        self.bytes
            .get(range)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| format!("read of {len} bytes at {offset} runs past the end ({})", self.bytes.len()))
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let range = self.range(offset, data.len())?;
        // Like a file, writing past the end extends it.
        if self.bytes.len() < range.end {
            self.bytes.resize(range.end, 0);
        }
        self.bytes[range].copy_from_slice(data);
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> Result<(), String> {
        let len = usize::try_from(len).map_err(|_| format!("{len} bytes do not fit in memory"))?;
        self.bytes.resize(len, 0);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), String> {
        self.syncs += 1;
        Ok(())
    }
}

/// Ors 64 bytes at a time as u64 words (native on wasm32, unlike u128): scanning a mostly
/// empty gigabyte byte by byte would cost the guest several times the fuel and time.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (blocks, rest) = bytes.as_chunks::<64>();
    blocks.iter().all(|block| block.as_chunks::<8>().0.iter().fold(0, |acc, word| acc | u64::from_ne_bytes(*word)) == 0)
        && rest.iter().all(|&b| b == 0)
}

/// A slot's value: its bytes without the zero padding after them.
pub fn trim_zeros(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_disk_behaves_like_a_file() {
        let mut disk = MemDisk::default();
        disk.set_len(10).expect("len");
        assert_eq!(disk.read_at(0, 10), Ok(vec![0; 10]));
        disk.write_at(8, b"abcd").expect("write past the end");
        assert_eq!(disk.bytes().len(), 12);
        assert_eq!(disk.read_at(7, 5), Ok(b"\0abcd".to_vec()));
        assert!(disk.read_at(10, 3).is_err());
        disk.set_len(9).expect("truncate");
        assert_eq!(disk.bytes(), b"\0\0\0\0\0\0\0\0a");
        assert!(disk.read_at(u64::MAX, 1).is_err());
    }

    #[test]
    fn zero_checks() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 200]));
        for i in 0..200 {
            let mut bytes = [0u8; 200];
            bytes[i] = 1;
            assert!(!is_zero(&bytes), "byte {i}");
        }
    }

    #[test]
    fn trimming() {
        assert_eq!(trim_zeros(b""), b"");
        assert_eq!(trim_zeros(b"\0\0"), b"");
        assert_eq!(trim_zeros(b"a\0b\0\0"), b"a\0b");
        assert_eq!(trim_zeros(b"\0a"), b"\0a");
    }
}

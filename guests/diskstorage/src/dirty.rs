//! Which blocks of the file may hold data.
//!
//! WASI offers no way to find a sparse file's holes, and reading a hole still costs the
//! host a zeroed page: a snapshot or recount that read every block of an untouched 1 GiB
//! file took about a second. Tracking the blocks ever written lets them read only those.

use crate::store::SCAN_BLOCK;

/// One bit per [`SCAN_BLOCK`]-sized block, set once anything is written to the block and
/// never cleared (blanking a slot does not prove its block empty): a superset of the
/// blocks that hold non-zero bytes. The rest are zero without being read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyBlocks {
    words: Vec<u64>,
}

const BLOCK: u64 = SCAN_BLOCK as u64;

impl DirtyBlocks {
    /// All clean, for a file of `file_size` bytes: 1 MiB of memory per 32 GiB of file.
    /// An error, not a trap, if that memory is not available.
    pub fn new(file_size: u64) -> Result<DirtyBlocks, String> {
        let too_large = || format!("no memory to track the blocks of a file of {file_size} bytes");
        let words = usize::try_from(file_size.div_ceil(BLOCK).div_ceil(64)).map_err(|_| too_large())?;
        let mut bits = Vec::new();
        bits.try_reserve_exact(words).map_err(|_| too_large())?;
        bits.resize(words, 0);
        Ok(DirtyBlocks { words: bits })
    }

    /// Marks the blocks that `len` bytes at `offset` touch.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK;
        let last = offset.saturating_add(len - 1) / BLOCK;
        for block in first..=last {
            if let Some(word) = usize::try_from(block / 64).ok().and_then(|i| self.words.get_mut(i)) {
                *word |= 1 << (block % 64);
            }
        }
    }

    /// The first block at or after `block` that may hold data.
    pub fn next_dirty(&self, block: u64) -> Option<u64> {
        let mut index = usize::try_from(block / 64).ok()?;
        let mut word = *self.words.get(index)? & (u64::MAX << (block % 64));
        while word == 0 {
            index += 1;
            word = *self.words.get(index)?;
        }
        Some(index as u64 * 64 + u64::from(word.trailing_zeros()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::MAX_FILE_SIZE;

    #[test]
    fn marks_and_finds_blocks() {
        let mut dirty = DirtyBlocks::new(200 * BLOCK).expect("small");
        assert_eq!(dirty.next_dirty(0), None);
        dirty.mark(3 * BLOCK + 10, 1);
        dirty.mark(70 * BLOCK - 1, 2);
        dirty.mark(130 * BLOCK, 0);
        dirty.mark(199 * BLOCK, BLOCK);
        assert_eq!(dirty.next_dirty(0), Some(3));
        assert_eq!(dirty.next_dirty(3), Some(3));
        assert_eq!(dirty.next_dirty(4), Some(69));
        assert_eq!(dirty.next_dirty(70), Some(70));
        assert_eq!(dirty.next_dirty(71), Some(199));
        assert_eq!(dirty.next_dirty(200), None);
        assert_eq!(dirty.next_dirty(u64::MAX), None);
        // Out of range marks are ignored rather than panicking.
        dirty.mark(u64::MAX - 5, 100);
    }

    #[test]
    fn size_is_bounded() {
        assert_eq!(DirtyBlocks::new(0).expect("empty").words.len(), 0);
        assert_eq!(DirtyBlocks::new(1).expect("one block").words.len(), 1);
        assert_eq!(DirtyBlocks::new(1 << 30).expect("1 GiB").words.len(), 256);
        assert_eq!(DirtyBlocks::new(MAX_FILE_SIZE).expect("largest").words.len() * 8, 32 << 20);
    }
}

//! The next log segment, written in full before it is used (see the module doc of `log`
//! for why): a purged segment when there is one, else a file a helper thread fills with
//! zeros, bypassing the page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::segments::SEGMENT_BYTES;

/// The spare's file name while it waits.
pub(super) const SPARE: &str = "spare.tmp";

pub(super) enum Spare {
    Zeroing(std::thread::JoinHandle<io::Result<File>>),
    Recycled(Arc<File>),
}

/// Creates `dir/spare.tmp` filled with zeros, durably.
pub(super) fn make_spare(dir: &Path) -> io::Result<File> {
    let path = dir.join(SPARE);
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    // Bypassing the page cache: copying 16 MiB of zeros into it, then writing it back,
    // took as much CPU as a tenth of all operations under load. Where O_DIRECT is
    // refused (tmpfs, some overlay setups), the ordinary way.
    if zero_fill_direct(&path).is_err() {
        let zeros = vec![0u8; 1 << 20];
        for i in 0..SEGMENT_BYTES / zeros.len() as u64 {
            file.write_all_at(&zeros, i * zeros.len() as u64)?;
        }
    }
    file.sync_all()?;
    Ok(file)
}

fn zero_fill_direct(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    const CHUNK: usize = 1 << 20;
    const ALIGN: usize = 4096;
    // O_DIRECT wants the buffer aligned to the device's block size; a page is enough.
    let buf = vec![0u8; CHUNK + ALIGN];
    let start = buf.as_ptr().align_offset(ALIGN);
    let zeros = buf.get(start..start + CHUNK).ok_or_else(|| io::Error::other("cannot align a buffer"))?;
    let file = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path)?;
    for i in 0..SEGMENT_BYTES / CHUNK as u64 {
        file.write_all_at(zeros, i * CHUNK as u64)?;
    }
    Ok(())
}

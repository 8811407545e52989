//! Small files replaced atomically (write, fsync, rename, fsync the directory): the vote,
//! the purge mark, `node.json`, snapshot pointers.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

use super::log::record::{decode_records, encode_record};

/// A small state file holding one record; `None` if it does not exist.
pub fn read_small<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let (mut records, _) =
        decode_records::<T>(&data).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    match records.pop() {
        Some((_, v)) => Ok(Some(v)),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is corrupt", path.display()))),
    }
}

/// Replace a small state file with one record holding `value`.
pub fn write_small<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let mut data = Vec::new();
    encode_record(value, &mut data).map_err(io::Error::other)?;
    write_file_durably(path, &data)
}

/// Replace `path` with `data` so that a crash leaves either the old or the new content.
pub fn write_file_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_file_is_replaced_whole_and_a_damaged_one_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vote");
        assert_eq!(read_small::<u64>(&path).expect("missing"), None);
        write_small(&path, &7u64).expect("write");
        write_small(&path, &8u64).expect("rewrite");
        assert_eq!(read_small::<u64>(&path).expect("read"), Some(8));
        assert!(!path.with_extension("tmp").exists(), "the temporary file is renamed over the old one");
        fs::write(&path, b"not a record").expect("damage");
        assert!(read_small::<u64>(&path).expect_err("damaged").to_string().contains("corrupt"));
    }
}

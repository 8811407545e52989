//! The component's [`Disk`]: a file in the `/data` preopen, used through the WASI 0.2
//! filesystem interface directly. `std::fs` would go through wasi-libc and a seek per
//! access, about 20 times slower per call.

use wasip2::filesystem::preopens::get_directories;
use wasip2::filesystem::types::{Descriptor, DescriptorFlags, ErrorCode, OpenFlags, PathFlags};

use crate::disk::Disk;

pub const DIR: &str = "/data";
pub const FILE: &str = "diskstorage.dat";
/// Where a restore stages the new file until it replaces [`FILE`].
pub const RESTORE_FILE: &str = "diskstorage.restore";

pub fn data_dir() -> Result<Descriptor, String> {
    get_directories().into_iter().find(|(_, name)| name == DIR).map(|(dir, _)| dir).ok_or_else(|| {
        format!("no {DIR} directory: diskstorage needs the host to preopen a private directory as {DIR}")
    })
}

fn describe(e: ErrorCode) -> String {
    format!("wasi error {}", e.name())
}

#[derive(Debug)]
pub struct WasiDisk(Descriptor);

impl WasiDisk {
    /// Opens `name` in `dir` for reading and writing, creating it if needed and emptying
    /// it if `truncate`. Symlinks are not followed: the file is always the store's own.
    pub fn open(dir: &Descriptor, name: &str, truncate: bool) -> Result<WasiDisk, String> {
        let open_flags = if truncate { OpenFlags::CREATE | OpenFlags::TRUNCATE } else { OpenFlags::empty() };
        dir.open_at(PathFlags::empty(), name, open_flags, DescriptorFlags::READ | DescriptorFlags::WRITE)
            .map(WasiDisk)
            .map_err(|e| format!("cannot open {DIR}/{name}: {}", describe(e)))
    }
}

impl Disk for WasiDisk {
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        let mut data = Vec::new();
        // A read may return less than asked for; only an empty one means the end.
        while data.len() < len {
            let at = offset + data.len() as u64;
            let (bytes, _) = self.0.read((len - data.len()) as u64, at).map_err(describe)?;
            if bytes.is_empty() {
                return Err(format!("the file ends at {at}, before the {len} bytes read at {offset}"));
            }
            if data.is_empty() {
                data = bytes;
            } else {
                data.extend_from_slice(&bytes);
            }
        }
        data.truncate(len);
        Ok(data)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let mut done = 0;
        while done < data.len() {
            let written = self.0.write(&data[done..], offset + done as u64).map_err(describe)?;
            if written == 0 {
                return Err(format!("a write at {} made no progress", offset + done as u64));
            }
            done += written as usize;
        }
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> Result<(), String> {
        self.0.set_size(len).map_err(describe)
    }

    fn sync(&mut self) -> Result<(), String> {
        self.0.sync_data().map_err(describe)
    }
}

//! WASI functions redefined so that what a guest observes is the same on every member.
//!
//! wasmtime-wasi hands a guest real file times, device and inode numbers (through
//! `metadata-hash`), the file system's directory order and real timers. Each of those
//! differs between members holding the same state, so a guest that looked at them could
//! make members diverge. The functions below shadow wasmtime-wasi's definitions in the
//! linker and delegate to its own implementations for everything else.

use std::collections::VecDeque;

use sha2::{Digest, Sha256};
use wasmtime::component::{Linker, Resource, ResourceType};
use wasmtime::StoreContextMut;
use wasmtime_wasi::filesystem::{WasiFilesystemCtxView, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::clocks::wall_clock::Datetime;
use wasmtime_wasi::p2::bindings::filesystem::preopens;
use wasmtime_wasi::p2::bindings::sync::filesystem::types::{
    self as fs, Descriptor, DescriptorFlags, DescriptorStat, DescriptorType, DirectoryEntry, ErrorCode, Host as _,
    MetadataHashValue, OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::{subscribe, DynPollable, FsResult, Pollable};

use super::HostState;

/// The WASI 0.2 release wasmtime-wasi defines. The linker serves every 0.2.x a guest
/// imports from it, so shadowing this one covers them all; `tests/guest_determinism.rs`
/// fails if it stops matching (the shadowed functions would then never be called).
const WASI: &str = "0.2.12";

/// Replaces, in a linker that already holds wasmtime-wasi's sync definitions, the
/// functions whose answers depend on the member rather than on the guest's state.
pub(super) fn shadow(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(&format!("wasi:filesystem/types@{WASI}"))?;
    types.func_wrap("[method]descriptor.stat", |mut store, (fd,): (Resource<Descriptor>,)| {
        let mut view = store.data_mut().filesystem();
        let stat = fs::HostDescriptor::stat(&mut view, fd);
        Ok((answer(&mut view, stat.map(frozen))?,))
    })?;
    types.func_wrap(
        "[method]descriptor.stat-at",
        |mut store, (fd, flags, path): (Resource<Descriptor>, PathFlags, String)| {
            let mut view = store.data_mut().filesystem();
            let stat = fs::HostDescriptor::stat_at(&mut view, fd, flags, path);
            Ok((answer(&mut view, stat.map(frozen))?,))
        },
    )?;
    types.func_wrap("[method]descriptor.metadata-hash", |mut store, (fd,): (Resource<Descriptor>,)| {
        let path = store.data().paths.path(fd.rep());
        let mut view = store.data_mut().filesystem();
        let stat = fs::HostDescriptor::stat(&mut view, fd);
        Ok((answer(&mut view, stat.map(|s| metadata_hash(&path, &frozen(s))))?,))
    })?;
    types.func_wrap(
        "[method]descriptor.metadata-hash-at",
        |mut store, (fd, flags, path): (Resource<Descriptor>, PathFlags, String)| {
            let full = join(&store.data().paths.path(fd.rep()), &path);
            let mut view = store.data_mut().filesystem();
            let stat = fs::HostDescriptor::stat_at(&mut view, fd, flags, path);
            Ok((answer(&mut view, stat.map(|s| metadata_hash(&full, &frozen(s))))?,))
        },
    )?;
    types.func_wrap(
        "[method]descriptor.open-at",
        |mut store: StoreContextMut<'_, HostState>,
         (fd, path_flags, path, open_flags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            let full = join(&store.data().paths.path(fd.rep()), &path);
            let mut view = store.data_mut().filesystem();
            let opened = fs::HostDescriptor::open_at(&mut view, fd, path_flags, path, open_flags, flags);
            let opened = answer(&mut view, opened)?;
            if let Ok(new) = &opened {
                store.data_mut().paths.record(new.rep(), full);
            }
            Ok((opened,))
        },
    )?;
    // wasmtime-wasi's directory stream cannot be built from outside the crate, so the
    // resource is replaced by one holding the sorted listing, and with it both functions
    // that use it.
    types.resource("directory-entry-stream", ResourceType::host::<SortedDirectory>(), |mut store, rep| {
        store.data_mut().table.delete(Resource::<SortedDirectory>::new_own(rep))?;
        Ok(())
    })?;
    types.func_wrap("[method]descriptor.read-directory", |mut store, (fd,): (Resource<Descriptor>,)| {
        let mut view = store.data_mut().filesystem();
        let listing = match fs::HostDescriptor::read_directory(&mut view, fd) {
            Ok(stream) => sorted(&mut view, stream)?,
            Err(e) => return Ok((Err(view.convert_error_code(e)?),)),
        };
        Ok((Ok(view.table.push(listing)?),))
    })?;
    types.func_wrap(
        "[method]directory-entry-stream.read-directory-entry",
        |mut store, (stream,): (Resource<SortedDirectory>,)| {
            let next = store.data_mut().table.get_mut(&stream)?.0.pop_front();
            Ok((next.transpose(),))
        },
    )?;

    linker.instance(&format!("wasi:filesystem/preopens@{WASI}"))?.func_wrap(
        "get-directories",
        |mut store: StoreContextMut<'_, HostState>, (): ()| {
            let dirs = preopens::Host::get_directories(&mut store.data_mut().filesystem())?;
            for (fd, name) in &dirs {
                store.data_mut().paths.record(fd.rep(), name.clone());
            }
            Ok((dirs,))
        },
    )?;

    let mut clock = linker.instance(&format!("wasi:clocks/monotonic-clock@{WASI}"))?;
    clock.func_wrap("subscribe-duration", |mut store, (_,): (u64,)| elapsed(&mut store))?;
    clock.func_wrap("subscribe-instant", |mut store, (_,): (u64,)| elapsed(&mut store))?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A trappable filesystem result as the guest receives it.
fn answer<T>(view: &mut WasiFilesystemCtxView<'_>, r: FsResult<T>) -> wasmtime::Result<Result<T, ErrorCode>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => Ok(Err(view.convert_error_code(e)?)),
    }
}

/// File times are the frozen clock's epoch; a directory's size and link count depend on
/// the file system (ext4 says 4096 bytes, btrfs the length of the names, and link counts
/// vary too), so they are fixed.
fn frozen(mut stat: DescriptorStat) -> DescriptorStat {
    let epoch = Some(Datetime { seconds: 0, nanoseconds: 0 });
    stat.data_access_timestamp = epoch;
    stat.data_modification_timestamp = epoch;
    stat.status_change_timestamp = epoch;
    if stat.type_ == DescriptorType::Directory {
        stat.size = 0;
        stat.link_count = 1;
    }
    stat
}

/// The path, type and size: what every member holding the same state agrees on. The
/// size stands in for the modification time the WASI interface suggests.
fn metadata_hash(path: &str, stat: &DescriptorStat) -> MetadataHashValue {
    let mut h = Sha256::new();
    h.update(b"wasm-raft metadata-hash\0");
    h.update(format!("{:?}\0", stat.type_).as_bytes());
    h.update(stat.size.to_le_bytes());
    h.update(path.as_bytes());
    let d = h.finalize();
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    MetadataHashValue { lower: word(&d[..8]), upper: word(&d[8..16]) }
}

/// `rel` (as a guest passes it to an `*-at` function) under `base`, with `.` and `..`
/// resolved lexically. Paths that would leave the preopen never get this far: wasmtime-wasi
/// refuses them before a hash or a descriptor is produced.
fn join(base: &str, rel: &str) -> String {
    let mut parts: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
    for part in rel.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Where each open descriptor was opened, as the guest named it, by resource index.
/// Descriptors are only made by `get-directories` and `open-at`, which both record theirs,
/// so an index reused after a descriptor was dropped is always overwritten first; the map
/// is no larger than the most resources the guest ever held at once.
#[derive(Default)]
pub(super) struct DescriptorPaths(std::collections::HashMap<u32, String>);

impl DescriptorPaths {
    fn record(&mut self, rep: u32, path: String) {
        self.0.insert(rep, path);
    }

    fn path(&self, rep: u32) -> String {
        self.0.get(&rep).cloned().unwrap_or_default()
    }
}

/// A directory listing read in full and sorted by name; entries that could not be read
/// come after the others, in the order the file system gave them.
pub struct SortedDirectory(VecDeque<Result<DirectoryEntry, ErrorCode>>);

fn sorted(
    view: &mut WasiFilesystemCtxView<'_>,
    stream: Resource<fs::DirectoryEntryStream>,
) -> wasmtime::Result<SortedDirectory> {
    let mut entries = Vec::new();
    let mut failed = Vec::new();
    for item in view.table.delete(stream)? {
        match item {
            Ok(entry) => entries.push(DirectoryEntry::from(entry)),
            Err(e) => failed.push(Err(view.convert_error_code(e)?)),
        }
    }
    entries.sort_unstable_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    Ok(SortedDirectory(entries.into_iter().map(Ok).chain(failed).collect()))
}

/// A timer that has already fired: the guest's clock is frozen, so no time passes
/// between subscribing and polling.
struct Elapsed;

#[wasmtime_wasi::async_trait]
impl Pollable for Elapsed {
    async fn ready(&mut self) {}
}

fn elapsed(store: &mut StoreContextMut<'_, HostState>) -> wasmtime::Result<(Resource<DynPollable>,)> {
    let table = &mut store.data_mut().table;
    let timer = table.push(Elapsed)?;
    Ok((subscribe(table, timer)?,))
}

#[cfg(test)]
mod tests {
    use super::join;

    #[test]
    fn paths_join_lexically() {
        assert_eq!(join("/data", "a"), "/data/a");
        assert_eq!(join("/data", "./a//b/"), "/data/a/b");
        assert_eq!(join("/data/a", "../b"), "/data/b");
        assert_eq!(join("/data", "a/../b/./c"), "/data/b/c");
        assert_eq!(join("", "x"), "/x");
    }
}

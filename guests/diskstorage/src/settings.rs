//! The `init` settings (`--fsm-config K=V`).

use std::fmt;

pub const FILE_SIZE: &str = "file-size";
pub const VALUE_SIZE: &str = "value-size";
pub const SYNC: &str = "sync";

/// 16 TiB, the largest file ext4 allows; it keeps the set of written blocks
/// ([`crate::dirty::DirtyBlocks`]) at 32 MiB or less.
pub const MAX_FILE_SIZE: u64 = 16 << 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Leave flushing to the operating system: the state is rebuilt from the snapshot and
    /// the log on restart anyway, so durability of the file itself is not needed.
    None,
    /// `sync-data` after every write, as the original store's synchronous option did.
    EachWrite,
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncMode::None => "none",
            SyncMode::EachWrite => "each-write",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The file's fixed size in bytes; key K owns bytes `K*value_size..(K+1)*value_size`.
    pub file_size: u64,
    /// u32 because the snapshot header stores it as one.
    pub value_size: u32,
    pub sync: SyncMode,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { file_size: 1 << 30, value_size: 1024, sync: SyncMode::None }
    }
}

impl Settings {
    /// Every member gets the same list, so refusing it here stops the whole cluster from
    /// starting rather than letting a typo run with defaults.
    pub fn parse(config: &[(String, String)]) -> Result<Settings, String> {
        let mut settings = Settings::default();
        kvcommand::settings::each("diskstorage", config, &[FILE_SIZE, VALUE_SIZE, SYNC], |key, value| {
            match key {
                FILE_SIZE => settings.file_size = size(key, value)?,
                VALUE_SIZE => {
                    settings.value_size = u32::try_from(size(key, value)?)
                        .map_err(|_| format!("diskstorage setting {key}={value:?} exceeds 4 GiB"))?
                }
                SYNC => {
                    settings.sync = match value {
                        "none" => SyncMode::None,
                        "each-write" => SyncMode::EachWrite,
                        _ => {
                            return Err(format!(
                                "diskstorage setting {key}={value:?} is not valid (expected none or each-write)"
                            ))
                        }
                    }
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        if settings.file_size > MAX_FILE_SIZE {
            return Err(format!(
                "diskstorage setting {FILE_SIZE}={} is larger than the maximum of {MAX_FILE_SIZE} bytes (16 TiB)",
                settings.file_size
            ));
        }
        if settings.value_size == 0 {
            return Err(format!("diskstorage setting {VALUE_SIZE} must be at least 1"));
        }
        if u64::from(settings.value_size) > settings.file_size {
            return Err(format!(
                "diskstorage setting {VALUE_SIZE}={} is larger than {FILE_SIZE}={}: the file would hold no value",
                settings.value_size, settings.file_size
            ));
        }
        Ok(settings)
    }

    /// How many whole slots fit; a tail shorter than a slot stays unused.
    pub fn slots(&self) -> u64 {
        self.file_size / u64::from(self.value_size)
    }
}

/// Plain bytes or a 1024-based `K`, `M` or `G` suffix, as in `64M`.
fn size(key: &str, value: &str) -> Result<u64, String> {
    let invalid = |why: &str| format!("diskstorage setting {key}={value:?} is not a valid size: {why}");
    let (digits, unit) = match value.as_bytes().last() {
        Some(b'K' | b'k') => (&value[..value.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&value[..value.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&value[..value.len() - 1], 1 << 30),
        _ => (value, 1),
    };
    // `u64::from_str` also takes a leading `+`, which a size should not have.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("expected a number of bytes, optionally followed by K, M or G"));
    }
    let number: u64 = digits.parse().map_err(|_| invalid("too large"))?;
    number.checked_mul(unit).ok_or_else(|| invalid("too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<Settings, String> {
        Settings::parse(&config(pairs))
    }

    #[test]
    fn defaults() {
        let defaults = parse(&[]).expect("defaults");
        assert_eq!(defaults, Settings { file_size: 1_073_741_824, value_size: 1024, sync: SyncMode::None });
        assert_eq!(defaults.slots(), 1_048_576);
    }

    #[test]
    fn all_settings() {
        let settings = parse(&[("sync", "each-write"), ("file-size", "10"), ("value-size", "3")]).expect("valid");
        assert_eq!(settings, Settings { file_size: 10, value_size: 3, sync: SyncMode::EachWrite });
        assert_eq!(settings.slots(), 3);
        assert_eq!(parse(&[("sync", "none")]).expect("valid").sync, SyncMode::None);
    }

    #[test]
    fn size_suffixes_are_1024_based() {
        for (text, bytes) in [
            ("4096", 4096),
            ("1K", 1024),
            ("3k", 3072),
            ("64M", 64 << 20),
            ("2m", 2 << 20),
            ("1G", 1 << 30),
            ("16G", 16 << 30),
        ] {
            assert_eq!(parse(&[("file-size", text)]).expect(text).file_size, bytes, "{text}");
        }
        assert_eq!(parse(&[("value-size", "4K")]).expect("4K").value_size, 4096);
    }

    #[test]
    fn bad_sizes() {
        for value in ["", "K", "-1", "+5", "1.5M", "10T", "1 M", "M1", "ten", "18446744073709551616", "17179869184G"] {
            let err = parse(&[("file-size", value)]).expect_err(value);
            assert!(err.contains("file-size"), "{err}");
            assert!(err.contains("not a valid size"), "{err}");
        }
        let err = parse(&[("file-size", "8G"), ("value-size", "4G")]).expect_err("u32");
        assert!(err.contains("exceeds 4 GiB"), "{err}");
        assert_eq!(parse(&[("file-size", "16384G")]).expect("largest").file_size, MAX_FILE_SIZE);
        let err = parse(&[("file-size", "16385G")]).expect_err("too large");
        assert!(err.contains("larger than the maximum"), "{err}");
    }

    #[test]
    fn value_size_bounds() {
        let err = parse(&[("value-size", "0")]).expect_err("zero");
        assert!(err.contains("at least 1"), "{err}");
        let err = parse(&[("file-size", "100"), ("value-size", "101")]).expect_err("larger");
        assert!(err.contains("larger than file-size"), "{err}");
        let exact = parse(&[("file-size", "100"), ("value-size", "100")]).expect("equal");
        assert_eq!(exact.slots(), 1);
        // The default value size must fit the configured file, not only the default one.
        assert!(parse(&[("file-size", "1000")]).is_err());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(&[("filesize", "1M")]).expect_err("typo");
        assert!(err.contains("unknown"), "{err}");
        assert!(err.contains("\"filesize\""), "{err}");
    }

    #[test]
    fn bad_sync_value() {
        for value in ["", "always", "EACH-WRITE", "each_write"] {
            let err = parse(&[("sync", value)]).expect_err(value);
            assert!(err.contains("sync"), "{err}");
            assert!(err.contains("none or each-write"), "{err}");
        }
    }

    #[test]
    fn repeated_key_is_an_error() {
        let err = parse(&[("sync", "none"), ("sync", "none")]).expect_err("repeated");
        assert!(err.contains("more than once"), "{err}");
    }
}

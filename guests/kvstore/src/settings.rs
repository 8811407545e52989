//! The `init` settings (`--fsm-config K=V`).

pub const PRELOAD_KEYS: &str = "preload-keys";
pub const PRELOAD_VALUE_SIZE: &str = "preload-value-size";
pub const MAX_VALUE_SIZE: &str = "max-value-size";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Keys "0".."N-1" present from the start, so benchmarks need no warm-up writes.
    pub preload_keys: u64,
    pub preload_value_size: u32,
    /// Larger `set` values are refused with an error result.
    pub max_value_size: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { preload_keys: 0, preload_value_size: 1024, max_value_size: 1 << 20 }
    }
}

impl Settings {
    /// Every member gets the same list, so refusing it here stops the whole cluster from
    /// starting rather than letting a typo run with defaults.
    pub fn parse(config: &[(String, String)]) -> Result<Settings, String> {
        let mut settings = Settings::default();
        kvcommand::settings::each(
            "kvstore",
            config,
            &[PRELOAD_KEYS, PRELOAD_VALUE_SIZE, MAX_VALUE_SIZE],
            |key, value| {
                match key {
                    PRELOAD_KEYS => settings.preload_keys = number(key, value)?,
                    // Sizes are u32 because the snapshot format stores lengths as u32.
                    PRELOAD_VALUE_SIZE => settings.preload_value_size = number(key, value)?,
                    MAX_VALUE_SIZE => settings.max_value_size = number(key, value)?,
                    _ => return Ok(false),
                }
                Ok(true)
            },
        )?;
        Ok(settings)
    }
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e| format!("kvstore setting {key}={value:?} is not a valid number: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults() {
        assert_eq!(Settings::parse(&[]), Ok(Settings::default()));
        let defaults = Settings::default();
        assert_eq!(defaults.preload_keys, 0);
        assert_eq!(defaults.preload_value_size, 1024);
        assert_eq!(defaults.max_value_size, 1_048_576);
    }

    #[test]
    fn all_settings() {
        let settings =
            Settings::parse(&config(&[("max-value-size", "10"), ("preload-keys", "3"), ("preload-value-size", "7")]))
                .expect("valid");
        assert_eq!(settings, Settings { preload_keys: 3, preload_value_size: 7, max_value_size: 10 });
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Settings::parse(&config(&[("preload-key", "3")])).expect_err("typo");
        assert!(err.contains("\"preload-key\""), "{err}");
        assert!(err.contains("unknown"), "{err}");
    }

    #[test]
    fn bad_numbers() {
        for (key, value) in [
            ("preload-keys", "-1"),
            ("preload-keys", "ten"),
            ("preload-keys", ""),
            ("max-value-size", "4294967296"),
            ("preload-value-size", "1.5"),
        ] {
            let err = Settings::parse(&config(&[(key, value)])).expect_err(value);
            assert!(err.contains(key), "{err}");
            assert!(err.contains("not a valid number"), "{err}");
        }
    }

    #[test]
    fn repeated_key_is_an_error() {
        let err = Settings::parse(&config(&[("preload-keys", "1"), ("preload-keys", "2")])).expect_err("repeated");
        assert!(err.contains("more than once"), "{err}");
    }
}

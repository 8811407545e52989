//! The walk over `init` settings (`--fsm-config K=V`) both key/value guests make.

use std::collections::BTreeSet;

/// Hands each pair of `config` to `set`, which applies it and returns `Ok(false)` for a
/// key it does not know. A key given twice, or unknown, is an error naming `guest` (and,
/// for an unknown key, the `known` ones): every member gets the same list, so refusing it
/// stops the whole cluster from starting rather than letting a typo run with defaults.
pub fn each(
    guest: &str,
    config: &[(String, String)],
    known: &[&str],
    mut set: impl FnMut(&str, &str) -> Result<bool, String>,
) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for (key, value) in config {
        if !seen.insert(key.as_str()) {
            return Err(format!("{guest} setting {key:?} is given more than once"));
        }
        if !set(key, value)? {
            return Err(format!("unknown {guest} setting {key:?} (known: {})", known.join(", ")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn known_keys_reach_the_setter_in_order_and_others_are_named() {
        let mut got = Vec::new();
        let record = |got: &mut Vec<String>, k: &str, v: &str| {
            got.push(format!("{k}={v}"));
            Ok(k != "c")
        };
        assert_eq!(each("g", &config(&[("a", "1"), ("b", "2")]), &["a", "b"], |k, v| record(&mut got, k, v)), Ok(()));
        assert_eq!(got, ["a=1", "b=2"]);
        assert_eq!(
            each("g", &config(&[("c", "3")]), &["a", "b"], |k, v| record(&mut got, k, v)),
            Err("unknown g setting \"c\" (known: a, b)".into())
        );
        assert_eq!(
            each("g", &config(&[("a", "1"), ("a", "2")]), &["a"], |_, _| Ok(true)),
            Err("g setting \"a\" is given more than once".into())
        );
        assert_eq!(each("g", &config(&[("a", "x")]), &["a"], |_, _| Err("bad".into())), Err("bad".into()));
    }
}

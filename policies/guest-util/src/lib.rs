//! What every policy guest shares. No WIT bindings here: each guest generates its own, so this
//! crate deals in plain strings.

pub mod heap;

/// Longest denial or modification reason the host accepts (the contract in `wit/`).
pub const MAX_REASON_BYTES: usize = 1024;

/// `s` cut to [`MAX_REASON_BYTES`] on a character boundary, marked with `…` when cut.
pub fn truncate_reason(mut s: String) -> String {
    if s.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES - '…'.len_utf8();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Deserialises a policy's config text, reporting the JSON path of the first problem
/// (`robot.rate: invalid type: …`); trailing characters after the object are an error too.
pub fn from_config<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(json);
    let config: T = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        if path == "." { err.inner().to_string() } else { format!("{path}: {}", err.inner()) }
    })?;
    de.end().map_err(|err| err.to_string())?;
    Ok(config)
}

/// The hostile test fixtures' trigger: the instruction contains `attack`, or the config (JSON)
/// has `"always": true`. Otherwise they allow, which is how they pass an upload's dry run.
pub fn hostile(instruction: &str, config_json: &str) -> bool {
    instruction.contains("attack") || config_flag(config_json, "always")
}

/// Whether the config (JSON) has `"<key>": true`.
pub fn config_flag(config_json: &str, key: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(config_json).is_ok_and(|c| c[key] == true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(truncate_reason("short".into()), "short");
        let cut = truncate_reason("é".repeat(1000));
        assert!(cut.len() <= MAX_REASON_BYTES && cut.ends_with('…'), "{}", cut.len());
    }

    #[test]
    fn fixtures_turn_hostile_on_attack_or_always() {
        assert!(hostile("attack now", "{}"));
        assert!(hostile("pick", r#"{"always": true}"#));
        assert!(!hostile("pick", r#"{"always": "yes"}"#));
        assert!(!hostile("pick", "not json"));
    }
}

//! Leaf: the rules for names that appear in paths, logs, configuration keys and metric labels
//! (models, versions, robots, robot types, groups), and the cut that keeps a client's text short
//! in an error message. Imports nothing from the crate.

/// Names of models, versions, robots, types and groups: 1-64 of `[A-Za-z0-9._-]`, not starting
/// with `.` (safe as a directory name and a label value).
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !s.starts_with('.')
}

/// What [`check_name`] says of a name that breaks the rule.
pub const NAME_RULE: &str = "must be 1-64 of [A-Za-z0-9._-], not starting with '.'";

/// `Ok` for a valid name; otherwise the problem, quoting the (shortened) value.
pub fn check_name(s: &str) -> Result<(), String> {
    if is_valid_name(s) { Ok(()) } else { Err(format!("`{}` {NAME_RULE}", clip(s, 80))) }
}

/// Robot ids appear in logs, configuration keys and metric labels.
pub fn check_robot_id(id: &str) -> Result<(), String> {
    check_name(id)
}

/// At most `max` characters of `s`: a client's text quoted in an answer or a log line.
pub fn clip(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// At most `max` bytes of `s`, cut on a character boundary and marked with `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain() {
        assert!(is_valid_name("arm-01.cell_3"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name(".hidden"));
        assert!(!is_valid_name(&"x".repeat(65)));
        assert!(check_robot_id("bad id!").expect_err("refused").contains("`bad id!`"));
    }

    #[test]
    fn cuts_keep_characters_whole() {
        assert_eq!(clip("ééé", 2), "éé");
        assert_eq!(truncate("ééé", 3), "é…");
        assert_eq!(truncate("abc", 5), "abc");
    }
}

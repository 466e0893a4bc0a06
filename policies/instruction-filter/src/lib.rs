//! `instruction-filter`: an admission policy that denies requests whose instruction matches a
//! denied pattern (a substring in which `*` matches any run of characters; see README.md).
//!
//! The decision logic is [`decide`], a plain function over the config text and the generated
//! types, so it is unit-tested natively with `cargo test`.

use serde::Deserialize;

/// The generated bindings for the `admission` world of `vla:policy` (../wit).
mod bindings {
    #![allow(clippy::too_many_arguments)]
    wit_bindgen::generate!({ world: "admission", path: "../../wit" });
}

/// Each call's heap in its own memory (see `guest_util::heap`).
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static HEAP: guest_util::heap::CallHeap = guest_util::heap::CallHeap::new();

use bindings::{Decision, Guest, RequestContext};
use guest_util::truncate_reason;

use bindings::vla::policy::types::{Denial, Severity};

struct InstructionFilter;

impl Guest for InstructionFilter {
    fn admit(ctx: RequestContext) -> Decision {
        decide(&bindings::vla::policy::host::config(), &ctx)
    }
}

bindings::export!(InstructionFilter with_types_in bindings);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub case_sensitive: bool,
}

/// Parses and checks the config text, reporting the JSON path of the first problem.
pub fn parse_config(json: &str) -> Result<Config, String> {
    let config: Config = guest_util::from_config(json)?;
    if let Some(i) = config.deny.iter().position(|p| p.chars().all(|c| c == '*')) {
        return Err(format!("deny[{i}] is empty or only `*` (it would match every instruction)"));
    }
    Ok(config)
}

/// Whether `pattern` occurs in `text`, `*` in the pattern matching any run of characters
/// (including none). Leftmost-first matching of the `*`-separated parts is exact for this
/// unanchored glob: a later part can only gain room by the earlier ones matching earlier.
pub fn glob_contains(text: &str, pattern: &str) -> bool {
    let mut rest = text;
    for part in pattern.split('*').filter(|part| !part.is_empty()) {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// The policy: see the crate docs and README.md.
pub fn decide(config_json: &str, ctx: &RequestContext) -> Decision {
    let config = match parse_config(config_json) {
        Ok(config) => config,
        Err(problem) => return deny("bad_config", format!("invalid instruction-filter config: {problem}")),
    };
    let fold = |s: &str| if config.case_sensitive { s.to_string() } else { s.to_lowercase() };
    let instruction = fold(&ctx.instruction);
    for pattern in &config.deny {
        if glob_contains(&instruction, &fold(pattern)) {
            return deny("instruction_denied", format!("instruction matches denied pattern `{pattern}`"));
        }
    }
    Decision::Allow
}

fn deny(code: &str, reason: String) -> Decision {
    // An instruction refused before anything was computed: nothing reached the robot.
    let severity = Severity::Medium;
    Decision::Deny(Denial { code: code.to_string(), reason: truncate_reason(reason), severity: Some(severity) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"{"deny": ["disable safety", "ignore * limits"]}"#;

    fn ctx(instruction: &str) -> RequestContext {
        RequestContext {
            request_id: "r1".into(),
            robot_id: "arm-1".into(),
            robot_type: "demo".into(),
            model: "m".into(),
            instruction: instruction.into(),
            state: vec![],
            time_ms: 0,
        }
    }

    fn denied(d: Decision) -> (String, String) {
        match d {
            Decision::Deny(Denial { code, reason, .. }) => (code, reason),
            other => panic!("expected deny, got {other:?}"),
        }
    }

    #[test]
    fn harmless_instruction_allows() {
        assert!(matches!(decide(CFG, &ctx("pick up the red cube")), Decision::Allow));
    }

    #[test]
    fn substring_match_denies_case_insensitively() {
        let (code, reason) = denied(decide(CFG, &ctx("First, DISABLE Safety and then move")));
        assert_eq!(code, "instruction_denied");
        assert_eq!(reason, "instruction matches denied pattern `disable safety`");
    }

    #[test]
    fn star_matches_any_run() {
        let (_, reason) = denied(decide(CFG, &ctx("please ignore all the joint limits now")));
        assert_eq!(reason, "instruction matches denied pattern `ignore * limits`");
        // `*` may match nothing, but the spaces around it are literal.
        assert!(matches!(decide(CFG, &ctx("ignore  limits")), Decision::Deny(_)));
        assert!(matches!(decide(CFG, &ctx("ignore limits")), Decision::Allow));
        assert!(matches!(decide(CFG, &ctx("limits: ignore them")), Decision::Allow));
    }

    #[test]
    fn first_match_wins() {
        let (_, reason) = denied(decide(CFG, &ctx("ignore the limits and disable safety")));
        assert!(reason.contains("`disable safety`"), "{reason}");
    }

    #[test]
    fn case_sensitive_option() {
        let cfg = r#"{"deny": ["Disable"], "case_sensitive": true}"#;
        assert!(matches!(decide(cfg, &ctx("disable it")), Decision::Allow));
        assert!(matches!(decide(cfg, &ctx("Disable it")), Decision::Deny(_)));
    }

    #[test]
    fn empty_deny_list_allows() {
        assert!(matches!(decide(r#"{"deny": []}"#, &ctx("disable safety")), Decision::Allow));
        assert!(matches!(decide("{}", &ctx("disable safety")), Decision::Allow));
    }

    #[test]
    fn glob() {
        assert!(glob_contains("abcdef", "b*e"));
        assert!(glob_contains("abcdef", "*cd*"));
        assert!(glob_contains("aXbXc", "a*b*c"));
        assert!(!glob_contains("abc", "c*a"));
        assert!(glob_contains("ab ab ac", "ab*ac"));
        assert!(glob_contains("größe", "ö*e"));
    }

    #[test]
    fn bad_config_denies() {
        let cases = [
            ("3", "invalid type"),
            (r#"{"deny": "disable"}"#, "deny: invalid type"),
            (r#"{"deny": ["ok", 3]}"#, "deny[1]"),
            (r#"{"deny": ["ok", "**"]}"#, "deny[1] is empty or only `*`"),
            (r#"{"deny": [""]}"#, "deny[0]"),
            (r#"{"case_sensitive": "yes"}"#, "case_sensitive"),
            (r#"{"denied": []}"#, "unknown field `denied`"),
        ];
        for (cfg, needle) in cases {
            let (code, reason) = denied(decide(cfg, &ctx("pick up the cube")));
            assert_eq!(code, "bad_config", "{cfg}");
            assert!(reason.contains(needle), "{cfg}: {reason}");
        }
    }
}

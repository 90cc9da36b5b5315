//! Topic and group names, checked the same way by the client and the server.

/// Longest topic or group name, in bytes.
pub const MAX_NAME: usize = 200;
/// The suffix of every dead-letter topic; reserved.
pub const DLQ_SUFFIX: &str = ".dlq";

/// Checks a topic or group name: 1 to 200 of `[A-Za-z0-9._-]`, starting
/// with a letter or digit, without `..` and not ending in `.`. The error is
/// the reason alone (`must not be empty`), for the caller to name the field.
pub fn check(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_NAME {
        return Err(format!("is longer than {MAX_NAME} characters"));
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or a digit".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "may hold only letters, digits, '.', '_' and '-', not {c:?}"
        ));
    }
    if s.contains("..") || s.ends_with('.') {
        return Err("must not contain '..' or end with '.'".into());
    }
    Ok(())
}

/// [`check`], with the reason prefixed by `what` (`topic must not be empty`).
pub fn check_name(what: &str, s: &str) -> Result<(), String> {
    check(s).map_err(|reason| format!("{what} {reason}"))
}

/// Whether `topic` is a dead-letter topic (`<topic>.dlq`).
pub fn is_dead_letter(topic: &str) -> bool {
    topic.ends_with(DLQ_SUFFIX)
}

/// The dead-letter topic of `topic`.
pub fn dead_letter_of(topic: &str) -> String {
    format!("{topic}{DLQ_SUFFIX}")
}

/// The topic a host's compute agent consumes (`compute.<host>`).
pub fn compute_topic(host: &str) -> String {
    format!("compute.{host}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["compute.host-1", "notifications.info", "a", "A_b-9.c"] {
            assert!(check_name("topic", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".a",
            "a..b",
            "a.",
            "a b",
            "a/b",
            "é",
            "-a",
            &"x".repeat(201),
        ] {
            assert!(check_name("topic", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_name("topic", "a..b").unwrap_err(),
            "topic must not contain '..' or end with '.'"
        );
    }

    #[test]
    fn dead_letter_names() {
        assert_eq!(dead_letter_of("compute.h1"), "compute.h1.dlq");
        assert!(is_dead_letter(&dead_letter_of("compute.h1")));
        assert!(!is_dead_letter("compute.h1"));
        assert_eq!(compute_topic("h1"), "compute.h1");
    }
}

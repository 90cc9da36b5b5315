//! Validated request values shared by every service's `grpc.rs`: a handler
//! turns wire strings into these with `TryFrom`-style constructors before the
//! domain code sees them, and the reason for a refusal is one line.

use std::fmt;

use uuid::Uuid;

use crate::error::Error;

/// The longest name any Cirrus object may have, in characters.
pub const MAX_NAME: usize = 255;

/// An object name: 1 to 255 characters, not blank, no control characters,
/// and never shaped like a UUID, so that a name-or-id lookup is never
/// ambiguous.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// Validates `s` as the value of `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<Self, Error> {
        check_text(field, s, MAX_NAME)?;
        if s.trim().is_empty() {
            return Err(Error::invalid(field, "must not be empty"));
        }
        // Unlike free text, a name holds no tab or newline either.
        if s.chars().any(char::is_control) {
            return Err(Error::invalid(field, "contains control characters"));
        }
        if Uuid::try_parse(s).is_ok() {
            return Err(Error::invalid(field, "must not look like an id (a UUID)"));
        }
        Ok(Self(s.to_string()))
    }

    /// Validates an optional name: an empty string means "not given".
    pub fn parse_opt(field: &'static str, s: &str) -> Result<Option<Self>, Error> {
        if s.is_empty() {
            Ok(None)
        } else {
            Self::parse(field, s).map(Some)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// What a client may use to point at an object: its id or its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NameOrId {
    Id(Uuid),
    Name(Name),
}

impl NameOrId {
    /// A UUID-shaped value is an id (names cannot have that shape); anything
    /// else must be a valid [`Name`].
    pub fn parse(field: &'static str, s: &str) -> Result<Self, Error> {
        if s.is_empty() {
            return Err(Error::invalid(field, "is required"));
        }
        match Uuid::try_parse(s) {
            Ok(id) => Ok(NameOrId::Id(id)),
            Err(_) => Name::parse(field, s).map(NameOrId::Name),
        }
    }
}

impl fmt::Display for NameOrId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameOrId::Id(id) => write!(f, "{id}"),
            NameOrId::Name(n) => write!(f, "{n}"),
        }
    }
}

/// A required id: a UUID in any of its usual spellings.
pub fn parse_id(field: &'static str, s: &str) -> Result<Uuid, Error> {
    if s.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    Uuid::try_parse(s)
        .map_err(|_| Error::invalid(field, format!("is not a valid id: {:?}", short(s))))
}

/// An optional id: the empty string means "not given".
pub fn parse_opt_id(field: &'static str, s: &str) -> Result<Option<Uuid>, Error> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_id(field, s).map(Some)
    }
}

/// Free text (descriptions): at most `max` characters, no control characters
/// other than newline and tab.
pub fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), Error> {
    if s.chars().count() > max {
        return Err(Error::invalid(
            field,
            format!("is longer than {max} characters"),
        ));
    }
    if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(Error::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// A page size: 0 means the default; more than `max` is refused.
pub fn page_limit(field: &'static str, limit: u32, default: u32, max: u32) -> Result<u32, Error> {
    match limit {
        0 => Ok(default),
        n if n > max => Err(Error::invalid(field, format!("must be at most {max}"))),
        n => Ok(n),
    }
}

/// Echoed client input, cut so that one error line stays short.
pub fn short(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_blank_control_long_and_uuid_shapes() {
        assert_eq!(
            Name::parse("name", "web-1").map(|n| n.to_string()).ok(),
            Some("web-1".into())
        );
        for (bad, why) in [
            ("", "name: must not be empty"),
            ("   ", "name: must not be empty"),
            ("a\u{7}b", "name: contains control characters"),
            ("tab\tname", "name: contains control characters"),
            (
                "0a0a0a0a-0a0a-4a0a-8a0a-0a0a0a0a0a0a",
                "name: must not look like an id (a UUID)",
            ),
        ] {
            let e = Name::parse("name", bad).err().map(|e| e.to_string());
            assert_eq!(e.as_deref(), Some(why), "{bad:?}");
        }
        assert!(Name::parse("name", &"x".repeat(256)).is_err());
        assert!(Name::parse("name", &"é".repeat(255)).is_ok());
    }

    #[test]
    fn name_or_id_is_never_ambiguous() {
        let id = Uuid::new_v4();
        assert_eq!(
            NameOrId::parse("image", &id.to_string()).ok(),
            Some(NameOrId::Id(id))
        );
        assert_eq!(
            NameOrId::parse("image", &id.simple().to_string()).ok(),
            Some(NameOrId::Id(id))
        );
        assert!(matches!(
            NameOrId::parse("image", "cirros"),
            Ok(NameOrId::Name(_))
        ));
        assert!(NameOrId::parse("image", "").is_err());
    }

    #[test]
    fn ids_are_checked() {
        assert!(parse_id("member", "zz").is_err());
        assert_eq!(
            parse_id("member", "zz")
                .err()
                .map(|e| e.to_string())
                .as_deref(),
            Some("member: is not a valid id: \"zz\"")
        );
        assert_eq!(parse_opt_id("owner", "").ok(), Some(None));
    }
}

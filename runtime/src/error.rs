//! One error type for every Cirrus service, mapped to gRPC in exactly one
//! place ([`From<Error> for tonic::Status`]).
//!
//! Variants name meanings, not codes. What the client may read is kept apart
//! from what only the log may read *by type*: [`Message`] has an `external`
//! and an `internal` half, and the variants that stand for our own faults
//! ([`Error::Internal`], [`Error::Unavailable`], [`Error::Unauthenticated`])
//! carry only internal text, which never reaches the wire. `Display` shows
//! the client-safe text only, so logging an error with `%e` cannot leak it
//! the other way either; use [`Error::internal_detail`] for the log.
//!
//! Anything a caller may not read answers [`Error::NotFound`], exactly as a
//! missing one does: a service must never be an existence oracle.

use std::fmt;

use tonic::{Code, Status};

/// A message in two halves: `external` is shown to the client, `internal`
/// (which may hold paths, SQL states, peer addresses) only to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub external: String,
    pub internal: Option<String>,
}

impl Message {
    /// A message that is safe to show as it is.
    pub fn new(external: impl Into<String>) -> Self {
        Self {
            external: external.into(),
            internal: None,
        }
    }

    /// A client-safe message with detail for the log.
    pub fn with_internal(external: impl Into<String>, internal: impl Into<String>) -> Self {
        Self {
            external: external.into(),
            internal: Some(internal.into()),
        }
    }
}

impl<S: Into<String>> From<S> for Message {
    fn from(s: S) -> Self {
        Message::new(s)
    }
}

/// The client text of every fault on our side.
pub const INTERNAL_MESSAGE: &str = "internal error";
/// The client text when a dependency (the database, a peer) is unreachable.
pub const UNAVAILABLE_MESSAGE: &str = "service temporarily unavailable";
/// The client text of every authentication refusal: the reason (unknown user,
/// wrong password, locked account, bad signature) goes to the log only.
pub const UNAUTHENTICATED_MESSAGE: &str = "authentication failed";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `<kind> <key> not found` — also what a caller gets for something it may not read
    #[error("{kind} {key} not found")]
    NotFound { kind: &'static str, key: String },
    /// `<kind> <name> already exists`
    #[error("{kind} {name} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// `<field>: <reason>` — the request itself is malformed
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// the object is not in a state that allows this (names the state)
    #[error("{}", .0.external)]
    Precondition(Message),
    /// the request reaches outside the data (an offset past the end)
    #[error("{}", .0.external)]
    OutOfRange(Message),
    /// the caller could not be authenticated; the client sees a constant
    #[error("{}", UNAUTHENTICATED_MESSAGE)]
    Unauthenticated { internal: String },
    /// the caller is known but may not do this
    #[error("{}", .0.external)]
    Forbidden(Message),
    /// a quota or a limit would be exceeded
    #[error("{}", .0.external)]
    Exhausted(Message),
    /// the operation was cut short (a client that went away mid-stream)
    #[error("{}", .0.external)]
    Aborted(Message),
    /// a dependency is unreachable; retrying later may work
    #[error("{}", UNAVAILABLE_MESSAGE)]
    Unavailable { internal: String },
    /// a fault on our side; the detail is logged, never sent
    #[error("{}", INTERNAL_MESSAGE)]
    Internal { internal: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn not_found(kind: &'static str, key: impl fmt::Display) -> Self {
        Error::NotFound {
            kind,
            key: key.to_string(),
        }
    }

    pub fn already_exists(kind: &'static str, name: impl fmt::Display) -> Self {
        Error::AlreadyExists {
            kind,
            name: name.to_string(),
        }
    }

    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub fn precondition(m: impl Into<Message>) -> Self {
        Error::Precondition(m.into())
    }

    pub fn out_of_range(m: impl Into<Message>) -> Self {
        Error::OutOfRange(m.into())
    }

    pub fn unauthenticated(internal: impl Into<String>) -> Self {
        Error::Unauthenticated {
            internal: internal.into(),
        }
    }

    pub fn forbidden(m: impl Into<Message>) -> Self {
        Error::Forbidden(m.into())
    }

    pub fn exhausted(m: impl Into<Message>) -> Self {
        Error::Exhausted(m.into())
    }

    pub fn aborted(m: impl Into<Message>) -> Self {
        Error::Aborted(m.into())
    }

    pub fn unavailable(internal: impl Into<String>) -> Self {
        Error::Unavailable {
            internal: internal.into(),
        }
    }

    pub fn internal(internal: impl Into<String>) -> Self {
        Error::Internal {
            internal: internal.into(),
        }
    }

    /// The gRPC code this error answers with.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::Invalid { .. } => Code::InvalidArgument,
            Error::Precondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Unauthenticated { .. } => Code::Unauthenticated,
            Error::Forbidden(_) => Code::PermissionDenied,
            Error::Exhausted(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::Unavailable { .. } => Code::Unavailable,
            Error::Internal { .. } => Code::Internal,
        }
    }

    /// What only the log may read, if anything.
    pub fn internal_detail(&self) -> Option<&str> {
        match self {
            Error::Unauthenticated { internal }
            | Error::Unavailable { internal }
            | Error::Internal { internal } => Some(internal),
            Error::Precondition(m)
            | Error::OutOfRange(m)
            | Error::Forbidden(m)
            | Error::Exhausted(m)
            | Error::Aborted(m) => m.internal.as_deref(),
            _ => None,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        match e.internal_detail() {
            Some(detail) if code == Code::Internal => tracing::error!(%detail, "internal error"),
            Some(detail) => tracing::warn!(%detail, ?code, "request refused"),
            None => {}
        }
        Status::new(code, e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::internal(format!("i/o: {e}"))
    }
}

#[cfg(feature = "db")]
mod db {
    use super::Error;
    use tokio_postgres::error::SqlState;

    /// A lost or refused connection is `Unavailable` (retryable); every other
    /// database failure is `Internal`. Both log the server's own message.
    impl From<tokio_postgres::Error> for Error {
        fn from(e: tokio_postgres::Error) -> Self {
            let detail = format!("database: {}", crate::db::detail(&e));
            if e.is_closed() || e.as_db_error().is_none() && e.code().is_none() && is_io(&e) {
                Error::unavailable(detail)
            } else {
                Error::internal(detail)
            }
        }
    }

    fn is_io(e: &tokio_postgres::Error) -> bool {
        std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
    }

    impl From<deadpool_postgres::PoolError> for Error {
        fn from(e: deadpool_postgres::PoolError) -> Self {
            match e {
                deadpool_postgres::PoolError::Backend(e) => e.into(),
                other => Error::unavailable(format!("database pool: {other}")),
            }
        }
    }

    impl From<crate::db::DbError> for Error {
        fn from(e: crate::db::DbError) -> Self {
            match e {
                crate::db::DbError::Postgres(e) => e.into(),
                other => Error::internal(other.to_string()),
            }
        }
    }

    /// The one mapping of constraint violations: a unique violation is
    /// `AlreadyExists`, a foreign key `Precondition` (still referenced, or
    /// refers to something missing), a check `Invalid`; anything else as
    /// `From<tokio_postgres::Error>`.
    pub fn constraint(e: tokio_postgres::Error, kind: &'static str, name: &str) -> Error {
        match e.code() {
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => Error::already_exists(kind, name),
            Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => Error::precondition(format!(
                "{kind} {name} is still referenced or refers to something missing"
            )),
            Some(c) if *c == SqlState::CHECK_VIOLATION => Error::invalid(kind, "is not valid"),
            _ => e.into(),
        }
    }
}

#[cfg(feature = "db")]
pub use db::constraint;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_detail_never_reaches_the_client() {
        let s = Status::from(Error::internal("relation \"images\" does not exist"));
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(s.message(), "internal error");
        let s = Status::from(Error::unauthenticated("bad signature for kid k1"));
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(s.message(), "authentication failed");
        let s = Status::from(Error::precondition(Message::with_internal(
            "image is active",
            "/var/lib/x",
        )));
        assert_eq!(s.message(), "image is active");
        assert_eq!(
            format!("{}", Error::unavailable("10.0.0.1 refused")),
            UNAVAILABLE_MESSAGE
        );
    }

    #[test]
    fn client_texts_are_one_line_each() {
        assert_eq!(
            Status::from(Error::not_found("image", "abc")).message(),
            "image abc not found"
        );
        assert_eq!(
            Status::from(Error::already_exists("user", "alice")).message(),
            "user alice already exists"
        );
        let s = Status::from(Error::invalid("name", "must not be empty"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "name: must not be empty");
    }
}

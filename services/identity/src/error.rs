//! The identity service's errors and their one mapping to gRPC statuses.
//! Internal detail goes to the log; the client sees a short, safe message.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// the request is malformed: empty or over-long names, bad ids, missing fields
    #[error("{0}")]
    InvalidArgument(String),
    /// the named object does not exist
    #[error("{0} not found")]
    NotFound(String),
    /// an object with that name already exists
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// the object is not in a state that allows this
    #[error("{0}")]
    FailedPrecondition(String),
    /// bad credentials, or a token that is malformed, expired, revoked or forged
    #[error("{0}")]
    Unauthenticated(String),
    /// the caller is known but may not do this
    #[error("{0}")]
    PermissionDenied(String),
    /// a fault on our side; the detail is logged, never sent
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Internal(format!("database: {}", runtime::db::detail(&e)))
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::Internal(format!("database pool: {e}"))
    }
}

impl From<token::TokenError> for Error {
    fn from(e: token::TokenError) -> Self {
        Error::Unauthenticated(e.to_string())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let (code, message) = match e {
            Error::InvalidArgument(m) => (Code::InvalidArgument, m),
            Error::NotFound(what) => (Code::NotFound, format!("{what} not found")),
            Error::AlreadyExists(what) => (Code::AlreadyExists, format!("{what} already exists")),
            Error::FailedPrecondition(m) => (Code::FailedPrecondition, m),
            Error::Unauthenticated(m) => (Code::Unauthenticated, m),
            Error::PermissionDenied(m) => (Code::PermissionDenied, m),
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                (Code::Internal, "internal error".to_string())
            }
        };
        Status::new(code, message)
    }
}

/// Maps a unique or foreign-key violation to a client error; anything else is internal.
pub fn constraint(e: tokio_postgres::Error, what: &str) -> Error {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => Error::AlreadyExists(what.to_string()),
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => Error::FailedPrecondition(format!(
            "{what} is still referenced or refers to something missing"
        )),
        Some(c) if *c == SqlState::CHECK_VIOLATION => {
            Error::InvalidArgument(format!("{what} is not valid"))
        }
        _ => e.into(),
    }
}

//! The image service's errors and their one mapping to gRPC statuses.
//! Internal detail goes to the log; the client sees a short, safe message.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// the request is malformed: bad ids, names, formats, properties
    #[error("{0}")]
    InvalidArgument(String),
    /// the image or member does not exist, or the caller may not see it
    #[error("{0} not found")]
    NotFound(String),
    /// the object already exists
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// the image is not in a state that allows this
    #[error("{0}")]
    FailedPrecondition(String),
    /// the request reaches outside the data (a download offset past the end)
    #[error("{0}")]
    OutOfRange(String),
    /// no caller identity: the request did not come through the sidecar
    #[error("{0}")]
    Unauthenticated(String),
    /// the caller is known but may not do this
    #[error("{0}")]
    PermissionDenied(String),
    /// a quota would be exceeded
    #[error("{0}")]
    ResourceExhausted(String),
    /// the client went away or stopped sending in the middle of an upload
    #[error("{0}")]
    Aborted(String),
    /// a fault on our side; the detail is logged, never sent
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Internal(format!("database: {e}"))
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::Internal(format!("database pool: {e}"))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(format!("store: {e}"))
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let (code, message) = match e {
            Error::InvalidArgument(m) => (Code::InvalidArgument, m),
            Error::NotFound(what) => (Code::NotFound, format!("{what} not found")),
            Error::AlreadyExists(what) => (Code::AlreadyExists, format!("{what} already exists")),
            Error::FailedPrecondition(m) => (Code::FailedPrecondition, m),
            Error::OutOfRange(m) => (Code::OutOfRange, m),
            Error::Unauthenticated(m) => (Code::Unauthenticated, m),
            Error::PermissionDenied(m) => (Code::PermissionDenied, m),
            Error::ResourceExhausted(m) => (Code::ResourceExhausted, m),
            Error::Aborted(m) => (Code::Aborted, m),
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                (Code::Internal, "internal error".to_string())
            }
        };
        Status::new(code, message)
    }
}

/// Maps a unique, foreign-key or check violation to a client error; anything else is internal.
pub fn constraint(e: tokio_postgres::Error, what: &str) -> Error {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => Error::AlreadyExists(what.to_string()),
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => Error::NotFound(what.to_string()),
        Some(c) if *c == SqlState::CHECK_VIOLATION => {
            Error::InvalidArgument(format!("{what} is not valid"))
        }
        _ => e.into(),
    }
}

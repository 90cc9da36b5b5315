//! The queue service's errors and their one mapping to gRPC statuses.
//! Internal detail goes to the log; the client sees a short, safe message.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// the request is malformed: empty or invalid names, missing fields
    #[error("{0}")]
    InvalidArgument(String),
    /// a size or count limit was exceeded (payload, batch, subscriptions)
    #[error("{0}")]
    ResourceExhausted(String),
    /// the named object does not exist
    #[error("{0} not found")]
    NotFound(String),
    /// an object with that name already exists
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// the object is not in a state that allows this (e.g. an ended lease)
    #[error("{0}")]
    FailedPrecondition(String),
    /// no verified caller, and direct callers are not trusted
    #[error("{0}")]
    Unauthenticated(String),
    /// the caller is known but may not do this
    #[error("{0}")]
    PermissionDenied(String),
    /// the server is shutting down or overloaded; retry elsewhere or later
    #[error("{0}")]
    Unavailable(String),
    /// a fault on our side; the detail is logged, never sent
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        // No SQLSTATE: the connection broke or timed out, which a retry may cure.
        if e.is_closed() || e.code().is_none() {
            Error::Unavailable(format!("database: {e}"))
        } else {
            Error::Internal(format!("database: {e}"))
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        // An exhausted or unreachable database is a transient condition for the client.
        Error::Unavailable(format!("database unavailable: {e}"))
    }
}

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        let message = match e {
            Error::NotFound(what) => format!("{what} not found"),
            Error::AlreadyExists(what) => format!("{what} already exists"),
            Error::Unavailable(detail) => {
                tracing::warn!(%detail, "unavailable");
                "the queue is unavailable, retry later".to_string()
            }
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal error".to_string()
            }
            Error::InvalidArgument(m)
            | Error::ResourceExhausted(m)
            | Error::FailedPrecondition(m)
            | Error::Unauthenticated(m)
            | Error::PermissionDenied(m) => m,
        };
        Status::new(code, message)
    }
}

/// Maps a unique or foreign-key violation to a client error; anything else is internal.
pub fn constraint(e: tokio_postgres::Error, what: &str) -> Error {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => Error::AlreadyExists(what.to_string()),
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => Error::NotFound(what.to_string()),
        _ => e.into(),
    }
}

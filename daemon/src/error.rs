//! The control plane's error: a kind, which fixes the HTTP status the API answers with, and the
//! one line the client prints.
//!
//! There is no blanket conversion from other errors: every failure is given its kind where it
//! happens, so a bad argument is a 400 and a taken name a 409 rather than a 500 for anything
//! that went wrong somewhere below.

use std::fmt;

/// What went wrong, as far as the client is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or asks for something invalid (400).
    BadRequest,
    /// The request is valid but not allowed (removing `bridge`, a reserved name) (403).
    Forbidden,
    /// Something the request names does not exist (404).
    NotFound,
    /// The request took too long to arrive (408).
    Timeout,
    /// The request clashes with the current state: a name, address or port in use (409).
    Conflict,
    /// The request is larger than the daemon accepts (413).
    TooLarge,
    /// The daemon failed at something it should have been able to do (500).
    Internal,
    /// The daemon cannot take the request now (503).
    Unavailable,
}

impl ErrorKind {
    /// The HTTP status the API answers with.
    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Timeout => 408,
            Self::Conflict => 409,
            Self::TooLarge => 413,
            Self::Internal => 500,
            Self::Unavailable => 503,
        }
    }
}

/// An error for an API client: its kind and one line of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// What the control plane's operations return.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, m)
    }

    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, m)
    }

    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }

    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, m)
    }

    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, m)
    }

    /// An internal failure, with what was being done: `"cannot save the state: <cause>"`.
    pub fn failed(doing: &str, cause: impl fmt::Display) -> Self {
        Self::internal(format!("{doing}: {cause:#}"))
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

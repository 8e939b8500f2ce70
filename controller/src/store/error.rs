//! Database errors, classified once by kind and SQLSTATE.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is shutting down; retrying later
    /// may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A row read back does not make sense (e.g. a state the code does not
    /// know): a bug or a newer schema.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("cancelled")]
    Cancelled,
    /// The scope rules changed after the scans being stored were checked
    /// against them: check again.
    #[error("the scope policy changed meanwhile")]
    PolicyChanged,
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) { Self::Unavailable(e) } else { Self::Other(e) }
    }
}

/// Errors that mean "the database is not there right now".
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        // Garbage or EOF on the wire, e.g. the server went away mid-handshake.
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P0x: admin/crash shutdown,
            // cannot connect now; 53300: too many connections.
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }),
        _ => false,
    }
}

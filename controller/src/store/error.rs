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
    /// A value this code was asked to write cannot be (checked before the
    /// database sees it).
    #[error("{0}")]
    Invalid(String),
    /// The scope rules changed after the scans being stored were checked
    /// against them: check again.
    #[error("the scope policy changed meanwhile")]
    PolicyChanged,
    /// The database refused the values written (a data exception or a
    /// constraint): the request's fault, retrying cannot help.
    #[error("the database refused the data: {0}")]
    Rejected(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

impl StoreError {
    /// Whether the failure is about the database's availability (or this
    /// controller stopping) rather than the data: worth retrying as is.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Cancelled | Self::PolicyChanged)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // A column the code cannot decode (an unknown state, say): the row
        // is wrong for this code, whatever the query.
        if let sqlx::Error::ColumnDecode { index, source } = &e {
            return Self::Corrupt(format!("column {index}: {source}"));
        }
        if is_transient(&e) {
            UNAVAILABLE.notify_one();
            Self::Unavailable(e)
        } else if is_rejection(&e) {
            Self::Rejected(e)
        } else {
            Self::Other(e)
        }
    }
}

/// SQLSTATE class 22 (data exception: a NUL in text, a value out of
/// range) and 23 (integrity constraint violation).
fn is_rejection(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")))
}

/// Poked whenever an error is classified as `Unavailable`: the health task
/// (`crate::health`) checks the database at once instead of at its next
/// interval. Only a hint - one stored wake-up, however many errors - so a
/// busy pool timing out costs one ping.
static UNAVAILABLE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Notified whenever an error is classified as `Unavailable`, so the
/// health task ([`crate::health`]) checks the database at once instead of
/// at its next interval. A hint only: one stored wake-up, however many
/// errors.
pub fn unavailable_hint() -> &'static tokio::sync::Notify {
    &UNAVAILABLE
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

//! The one place where errors become gRPC statuses. Internal details are
//! logged here and never sent to the client.

use tonic::Status;

use crate::{enroll::EnrollError, scans::ScanError, store::StoreError};

pub fn to_status(err: ScanError) -> Status {
    match err {
        ScanError::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
        ScanError::NotFound(m) => Status::not_found(m),
        ScanError::FailedPrecondition(m) => Status::failed_precondition(m),
        ScanError::PermissionDenied(m) => Status::permission_denied(m),
        ScanError::AlreadyExists(m) => Status::already_exists(m),
        ScanError::Store(e) => store_status(e),
    }
}

pub fn store_status(err: StoreError) -> Status {
    match err {
        StoreError::Unavailable(e) => {
            tracing::warn!(error = %e, "database unavailable");
            Status::unavailable("database unavailable, try again")
        }
        StoreError::Cancelled => Status::unavailable("controller is shutting down"),
        StoreError::PolicyChanged => Status::unavailable("the scope policy kept changing, try again"),
        StoreError::Invalid(m) => Status::invalid_argument(m),
        StoreError::Rejected(e) => {
            let why = match &e {
                sqlx::Error::Database(db) => db.message().to_string(),
                other => other.to_string(),
            };
            tracing::info!(error = %e, "the database refused a request's values");
            Status::invalid_argument(format!(
                "the request cannot be stored: {}",
                portfleet_core::text::sanitize(&why, 200)
            ))
        }
        other => {
            tracing::error!(error = %other, "internal error");
            Status::internal("internal error")
        }
    }
}

/// Enrollment and renewal: a bad token or request is the caller's; a CA
/// that cannot sign needs an operator.
pub fn enroll_status(err: EnrollError) -> Status {
    match err {
        EnrollError::BadToken => Status::permission_denied(err.to_string()),
        EnrollError::BadRequest(_) => Status::invalid_argument(err.to_string()),
        EnrollError::Store(e) => store_status(e),
        EnrollError::Ca(m) => {
            tracing::error!(error = %m, "cannot sign an agent certificate");
            Status::internal("the controller cannot sign certificates")
        }
    }
}

//! Request limits, answered with a status that names the limit.
//!
//! `INVALID_ARGUMENT` is for a request that can never succeed as sent (a field
//! too long, a page too large, too many items in one request);
//! `RESOURCE_EXHAUSTED` is for a quota the caller has used up (devices per
//! user, members per channel, channels per user).

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// `INVALID_ARGUMENT` unless `len` ≤ `max`.
pub fn check_len(field: &str, len: usize, max: usize) -> Result<(), Status> {
    if len > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {len} bytes; the limit is {max}"
        )));
    }
    Ok(())
}

/// `INVALID_ARGUMENT` unless `count` ≤ `max` items in one request.
pub fn check_count(field: &str, count: usize, max: usize) -> Result<(), Status> {
    if count > max {
        return Err(Status::invalid_argument(format!(
            "{count} {field} in one request; the limit is {max}"
        )));
    }
    Ok(())
}

/// `RESOURCE_EXHAUSTED` unless `used` < `max` (room for one more).
pub fn check_quota(what: &str, used: usize, max: usize) -> Result<(), Status> {
    if used >= max {
        return Err(quota_reached(what, max));
    }
    Ok(())
}

/// `RESOURCE_EXHAUSTED`: the limit of `max` `what` is reached.
pub fn quota_reached(what: &str, max: usize) -> Status {
    Status::resource_exhausted(format!("limit of {max} {what} reached"))
}

/// `RESOURCE_EXHAUSTED` for a quota that frees up with time, carrying a
/// standard `google.rpc.RetryInfo` detail (`grpc-status-details-bin`) with
/// `retry_after`, which the message repeats in whole seconds.
pub fn exhausted_retry(what: &str, retry_after: Duration) -> Status {
    let secs = retry_after.as_secs().max(1);
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("{what}; retry in {secs} s"),
        ErrorDetails::with_retry_info(Some(Duration::from_secs(secs))),
    )
}

/// The retry delay a `RESOURCE_EXHAUSTED` answer carries, if any.
pub fn retry_after(status: &Status) -> Option<Duration> {
    status.get_error_details().retry_info()?.retry_delay
}

/// A page size: 0 means `default`; above `max` is `INVALID_ARGUMENT`.
pub fn page_size(requested: u32, default: u32, max: u32) -> Result<usize, Status> {
    match requested {
        0 => Ok(default.min(max) as usize),
        n if n > max => Err(Status::invalid_argument(format!(
            "page size {n} is above the limit of {max}"
        ))),
        n => Ok(n as usize),
    }
}

/// Parses a 32-byte card id field.
pub fn card_id(field: &str, bytes: &[u8]) -> Result<tessera_card::CardId, Status> {
    tessera_card::CardId::from_bytes(bytes).map_err(|_| {
        Status::invalid_argument(format!("{field} must be 32 bytes, got {}", bytes.len()))
    })
}

/// Checks an identity field: shape errors are `INVALID_ARGUMENT` naming the field.
pub fn identity(field: &str, value: &str) -> Result<(), Status> {
    check_len(field, value.len(), tessera_card::MAX_IDENTITY_LEN)?;
    tessera_card::validate_identity(value)
        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

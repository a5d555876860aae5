//! Docker API errors: moby's `{"message":"…"}` with `Content-Type: application/json` exactly
//! (with `; charset=utf-8` the docker CLI prints the raw body).
//!
//! Operations run inside the control plane's store transactions, whose error type is
//! [`OpError`]; a Docker refusal travels in it as an [`ApiError`] (status and message; the
//! restify code is not shown to Docker clients). Store failures become 500 `internal error`
//! and are logged, never shown.

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::control::error::{ApiError, OpError};

/// A Docker refusal: `status` and moby's message text.
pub fn err(status: u16, message: impl Into<String>) -> OpError {
    OpError::Api(api(status, message))
}

/// The same as an [`ApiError`] (for code that returns those).
pub fn api(status: u16, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code: "DockerError",
        message: message.into(),
        errors: Vec::new(),
        with_errors: false,
        extra: Default::default(),
    }
}

/// 400.
pub fn bad_request(message: impl Into<String>) -> OpError {
    err(400, message)
}

/// 404.
pub fn not_found(message: impl Into<String>) -> OpError {
    err(404, message)
}

/// 409.
pub fn conflict(message: impl Into<String>) -> OpError {
    err(409, message)
}

/// 403.
pub fn forbidden(message: impl Into<String>) -> OpError {
    err(403, message)
}

/// moby's 404 for routes and methods it does not serve.
pub fn page_not_found() -> ApiError {
    api(404, "page not found")
}

/// The error response: `{"message":…}`, `Content-Type: application/json`.
pub fn response(e: &ApiError) -> Response<Body> {
    let body = serde_json::to_vec(&json!({ "message": e.message })).unwrap_or_default();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn error_body_and_exact_content_type() {
        let r = response(&api(409, "network with name a already exists"));
        assert_eq!(r.status(), 409);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let b = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(
            &b[..],
            br#"{"message":"network with name a already exists"}"#
        );
    }
}

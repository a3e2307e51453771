//! Extractors whose rejections are [`ApiError`]s in Plane's error shape (instead of axum's plain-text
//! rejections): bad input is always a clear 4xx, never a 500.

use crate::api::AppState;
use crate::error::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::{header, request::Parts, HeaderMap};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

/// A JSON body: `Content-Type: application/json` (or `…+json`) required (415), at most
/// `max_body_bytes` (413), well-formed (400) and of the expected shape (400, with serde's explanation).
pub struct ApiJson<T>(pub T);

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType(
                "Expected request with `Content-Type: application/json`.".into(),
            ));
        }
        let limit = state.config.max_body_bytes;
        let body = Limited::new(req.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    ApiError::PayloadTooLarge { limit }
                } else {
                    ApiError::InvalidRequest(format!("Failed to read the request body: {e}"))
                }
            })?
            .to_bytes();
        serde_json::from_slice(&body).map(ApiJson).map_err(|e| {
            use serde_json::error::Category;
            let what = match e.classify() {
                Category::Syntax | Category::Eof | Category::Io => "Malformed JSON",
                Category::Data => "Invalid request",
            };
            ApiError::InvalidRequest(format!("{what}: {e}"))
        })
    }
}

/// Path parameters; a value that does not parse (e.g. an invalid backend id) is a 400.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|e| ApiError::InvalidRequest(e.body_text()))
    }
}

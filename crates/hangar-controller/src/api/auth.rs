//! Optional bearer-token check for the `/ctrl` routes (node sockets included).

use crate::api::forward_auth::basic_auth_user;
use crate::api::AppState;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hangar_types::token::constant_time_eq;

/// Lets the request through when no token is configured or when it carries
/// `Authorization: Bearer <token>` with the configured token (compared in constant time); 401 otherwise.
/// `Authorization: Basic` with the token as user name and no password (what `curl
/// http://TOKEN@host/` sends) counts as the same token.
pub async fn require_bearer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.config.bearer_token.as_deref() else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        })
        .or_else(|| basic_auth_user(req.headers()));
    match presented {
        Some(token) if constant_time_eq(&token, expected) => next.run(req).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

//! Controller tests: handler tests on the router (`handlers`), and integration tests against a running
//! controller with fake drones and proxies over real WebSockets.

// Tests may unwrap (the workspace lint only exempts `#[test]` functions, not test helpers).
#![allow(clippy::unwrap_used)]

mod cleanup;
mod dashboard;
mod drone_sessions;
mod forward_auth;
mod handlers;
mod listener;
mod lost_drones;
mod metrics;
mod multi_controller;
mod openapi;
mod operator;
mod proxy_sessions;
mod status_stream;
mod support;
mod tls;

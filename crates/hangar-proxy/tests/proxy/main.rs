//! End-to-end tests of the proxy over real sockets: a fake controller, real upstream backends and
//! real HTTP/1.1, HTTP/2 and WebSocket clients.

// Test fixtures outside `#[test]` functions may unwrap too.
#![allow(clippy::unwrap_used)]

mod limits;
mod load;
mod malformed;
mod pipeline;
mod raw;
mod routing;
mod support;
mod tls;
mod websocket;
mod workers;

//! Integration tests of the DNS responder: real UDP/TCP sockets on 127.0.0.1 with a fake TXT source,
//! and the controller-backed source against a fake controller WebSocket.

// Test fixtures outside `#[test]` functions may unwrap too.
#![allow(clippy::unwrap_used)]

mod controller;
mod server;
mod support;

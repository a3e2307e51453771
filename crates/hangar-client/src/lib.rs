//! Typed client of the Hangar controller: the HTTP API ([`ControllerClient`]), the status stream
//! ([`status_stream`]) and node sessions over WebSocket ([`node::NodeSocket`]) used by drones and
//! proxies; and the drone's and proxy's metrics listener ([`metrics_listener`]). Used by the CLI, the
//! drone, the proxy and the tests; it never touches the store.

pub mod backoff;
mod http;
pub mod metrics_listener;
pub mod node;
pub mod status_stream;

pub use http::{ClientError, ControllerClient};

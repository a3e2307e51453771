//! Where TXT values come from: the [`TxtSource`] trait the server asks, so tests can serve fixed values
//! and production asks the controller ([`crate::ControllerTxtSource`]).

use hangar_types::ClusterName;

/// Looks up the ACME DNS-01 TXT value of a cluster.
#[async_trait::async_trait]
pub trait TxtSource: Send + Sync + 'static {
    /// The current TXT value of `cluster`'s challenge; `Ok(None)` when there is none. May wait (e.g. for
    /// a controller connection); the server bounds the wait with its lookup timeout.
    async fn txt_record(&self, cluster: &ClusterName) -> Result<Option<String>, TxtError>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxtError {
    /// The source was shut down and will never answer.
    #[error("the TXT source is shut down")]
    Closed,
    /// The source cannot answer right now (e.g. its backing store failed); a later query may succeed.
    #[error("the TXT source is unavailable")]
    Unavailable,
}

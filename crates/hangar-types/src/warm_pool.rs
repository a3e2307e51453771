//! Warm pools (`/ctrl/warm-pools`, a Hangar extension): an operator keeps `size` backends of one
//! `executable` started and ready, unclaimed, on the drones of a cluster and drone pool; a connect that
//! must spawn the same executable there claims one instead of starting a new backend.

use crate::api::KeyConfig;
use crate::executable::Executable;
use crate::names::{BackendId, ClusterName, WarmPoolName};
use crate::token::ConnectionToken;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Largest accepted `size` of one warm pool.
pub const MAX_WARM_POOL_SIZE: u32 = 1000;

/// Longest accepted `claim_path`.
pub const MAX_CLAIM_PATH_LEN: usize = 1024;

/// Body of `PUT /ctrl/warm-pools/{name}`: creates the pool or changes it (a new `executable` replaces
/// the unclaimed backends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmPoolConfig {
    /// Falls back to the controller's default cluster.
    #[serde(default)]
    pub cluster: Option<ClusterName>,
    /// Drone pool; `""` is the default pool.
    #[serde(default)]
    pub pool: String,
    /// Unclaimed backends to keep (ready or starting), at most [`MAX_WARM_POOL_SIZE`].
    pub size: u32,
    /// What every backend of the pool runs; a connect claims only with an equal executable.
    pub executable: Executable,
    /// Unclaimed backends older than this are replaced. Never when absent.
    #[serde(default)]
    pub max_age_seconds: Option<u32>,
    /// Path the drone `POST`s a claim to before the connect answers (see the README, "Warm pools").
    #[serde(default)]
    pub claim_path: Option<String>,
}

impl WarmPoolConfig {
    /// Checks what serde cannot; the message is fit for an API error.
    pub fn validate(&self) -> Result<(), String> {
        if self.size > MAX_WARM_POOL_SIZE {
            return Err(format!("invalid size: at most {MAX_WARM_POOL_SIZE}"));
        }
        crate::names::validate_key_text(&self.pool).map_err(|e| format!("invalid pool: {e}"))?;
        if self.max_age_seconds == Some(0) {
            return Err("invalid max_age_seconds: must be greater than 0".into());
        }
        if let Some(path) = &self.claim_path {
            if !path.starts_with('/')
                || path.len() > MAX_CLAIM_PATH_LEN
                || path.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(format!(
                    "invalid claim_path: an absolute path without spaces, at most \
                     {MAX_CLAIM_PATH_LEN} characters"
                ));
            }
        }
        Ok(())
    }
}

/// A warm pool as listed by `GET /ctrl/warm-pools` and answered by `PUT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WarmPool {
    pub name: WarmPoolName,
    pub cluster: ClusterName,
    pub pool: String,
    pub size: u32,
    pub executable: Executable,
    pub max_age_seconds: Option<u32>,
    pub claim_path: Option<String>,
    /// Unclaimed backends that are ready now.
    pub ready: u64,
    /// Unclaimed backends on their way to ready now.
    pub starting: u64,
    /// Claims since the pool was created.
    pub claimed: u64,
    /// Backends of the current executable that failed to start in a row (0 once one is ready).
    /// While it is above 0 the pool starts new backends only after an exponential backoff
    /// (2 s doubling per failure, at most 5 min, counted from the last failed start).
    #[serde(default)]
    pub failed_starts: u64,
}

/// Body of `GET /ctrl/warm-pools`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WarmPoolList {
    pub pools: Vec<WarmPool>,
}

/// Body of the claim hook: what the drone `POST`s to a claimed warm backend's `claim_path` before
/// the connect answers (see the README, "Warm pools"). The backend was started without a key; this
/// is who it is from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClaimHook {
    pub backend_id: BackendId,
    pub key: KeyConfig,
    /// Fencing token of the key's lease (as `SESSION_BACKEND_FENCING_TOKEN` of a cold spawn).
    pub fencing_token: i64,
    /// The connect's static token (`use_static_token`), if any.
    pub static_token: Option<ConnectionToken>,
    /// The connect's `executable.env`.
    pub env: BTreeMap<String, String>,
}

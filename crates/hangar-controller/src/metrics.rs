//! The latest resource sample (CPU, memory) of each running backend, as drones report them
//! (`DroneToController::BackendMetrics`). Kept in memory only, for the dashboard and metrics
//! endpoints: samples are high-rate data and never go to the store (design.md §4). Each controller
//! knows the samples of the drones connected to it.

use hangar_types::BackendId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Most backends with a kept sample. When full, a sample for a new backend replaces the oldest one.
pub const MAX_BACKENDS: usize = 100_000;

/// One sample; CPU figures cover the time since the backend's previous sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendSample {
    pub mem_used: u64,
    pub mem_limit: u64,
    pub cpu_used_ns: u64,
    pub sys_cpu_ns: u64,
    /// When this controller received it.
    pub received: Instant,
}

/// Sums over the kept samples (for `GET /metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SampleTotals {
    /// Backends with a sample.
    pub backends: usize,
    /// Memory in use, in bytes.
    pub mem_used: u64,
    /// Memory limits, in bytes.
    pub mem_limit: u64,
}

/// The latest sample per backend, bounded by [`MAX_BACKENDS`]. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct LatestMetrics {
    samples: Arc<Mutex<HashMap<BackendId, BackendSample>>>,
}

impl LatestMetrics {
    pub fn record(&self, backend: BackendId, sample: BackendSample) {
        let mut samples = self.lock();
        if samples.len() >= MAX_BACKENDS && !samples.contains_key(&backend) {
            // O(n), but only once the map is full, which takes a huge fleet or leaked entries.
            let oldest = samples
                .iter()
                .min_by_key(|(_, s)| s.received)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                samples.remove(&oldest);
            }
        }
        samples.insert(backend, sample);
    }

    /// Forgets a backend (it terminated).
    pub fn remove(&self, backend: &BackendId) {
        self.lock().remove(backend);
    }

    pub fn get(&self, backend: &BackendId) -> Option<BackendSample> {
        self.lock().get(backend).copied()
    }

    /// Sums over every kept sample; O(n) under the lock, once per scrape.
    pub fn totals(&self) -> SampleTotals {
        let samples = self.lock();
        samples.values().fold(
            SampleTotals {
                backends: samples.len(),
                ..SampleTotals::default()
            },
            |t, s| SampleTotals {
                mem_used: t.mem_used.saturating_add(s.mem_used),
                mem_limit: t.mem_limit.saturating_add(s.mem_limit),
                ..t
            },
        )
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BackendId, BackendSample>> {
        match self.samples.lock() {
            Ok(samples) => samples,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mem_used: u64) -> BackendSample {
        BackendSample {
            mem_used,
            mem_limit: 10,
            cpu_used_ns: 0,
            sys_cpu_ns: 0,
            received: Instant::now(),
        }
    }

    #[test]
    fn keeps_the_latest_sample_and_forgets_terminated_backends() {
        let metrics = LatestMetrics::default();
        let id: BackendId = "ba-one".parse().unwrap();
        metrics.record(id.clone(), sample(1));
        metrics.record(id.clone(), sample(2));
        assert_eq!(metrics.get(&id).map(|s| s.mem_used), Some(2));
        assert_eq!(metrics.len(), 1);
        metrics.record("ba-two".parse().unwrap(), sample(5));
        let totals = metrics.totals();
        assert_eq!(
            totals,
            SampleTotals {
                backends: 2,
                mem_used: 7,
                mem_limit: 20
            }
        );
        metrics.remove(&"ba-two".parse().unwrap());
        metrics.remove(&id);
        assert!(metrics.is_empty());
    }

    #[test]
    fn is_bounded() {
        let metrics = LatestMetrics::default();
        let first: BackendId = "ba-first".parse().unwrap();
        let oldest = sample(1);
        metrics.record(first.clone(), oldest);
        let later = BackendSample {
            received: oldest.received + std::time::Duration::from_millis(1),
            ..oldest
        };
        for i in 1..=MAX_BACKENDS {
            metrics.record(format!("ba-{i}").parse().unwrap(), later);
        }
        assert_eq!(metrics.len(), MAX_BACKENDS);
        assert!(metrics.get(&first).is_none());
    }
}

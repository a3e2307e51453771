//! Timing constants shared by several components. Their ordering is an invariant (tested below):
//! a drone renews its key well before it would soft-terminate, hard-terminates before the lease can
//! expire on the database clock, and heartbeats are much more frequent than the unhealthy threshold.

use std::time::Duration;

/// How long a key lease lasts on the database clock after acquisition or renewal.
pub const KEY_LEASE: Duration = Duration::from_secs(60);
/// Drone asks to renew this long after its last deadline base (its own clock).
pub const KEY_RENEW_AFTER: Duration = Duration::from_secs(30);
/// Drone soft-terminates the backend when it has not renewed within this time (its own clock).
pub const KEY_SOFT_TERMINATE_AFTER: Duration = Duration::from_secs(40);
/// Drone hard-terminates the backend when it has not renewed within this time (its own clock).
pub const KEY_HARD_TERMINATE_AFTER: Duration = Duration::from_secs(50);

/// A proxy stops using a route this long before the key lease it was resolved (or last confirmed)
/// under runs out, and closes the route's tunnels by the lease's end: a key is taken over as soon as
/// its lease expires, and a proxy cut off from every controller hears of it only through its own
/// clock. The margin covers how late the proxy's lease check may run
/// ([`ROUTE_LEASE_CHECK_INTERVAL`]) with room to spare.
pub const ROUTE_LEASE_MARGIN: Duration = Duration::from_secs(2);
/// How often a proxy looks for backends whose route lease (the key lease less
/// [`ROUTE_LEASE_MARGIN`]) has ended, to close their tunnels.
pub const ROUTE_LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// The four key-lease durations as one value. Production always uses [`KeyTiming::DEFAULT`] (the
/// constants above); tests that exercise partitions shorten them together, keeping their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyTiming {
    /// [`KEY_LEASE`]: lease length on the store clock after acquisition or renewal.
    pub lease: Duration,
    /// [`KEY_RENEW_AFTER`]: drone asks to renew this long after its deadline base.
    pub renew_after: Duration,
    /// [`KEY_SOFT_TERMINATE_AFTER`]: drone soft-terminates this long after its deadline base.
    pub soft_terminate_after: Duration,
    /// [`KEY_HARD_TERMINATE_AFTER`]: drone hard-terminates this long after its deadline base.
    pub hard_terminate_after: Duration,
}

impl KeyTiming {
    pub const DEFAULT: KeyTiming = KeyTiming {
        lease: KEY_LEASE,
        renew_after: KEY_RENEW_AFTER,
        soft_terminate_after: KEY_SOFT_TERMINATE_AFTER,
        hard_terminate_after: KEY_HARD_TERMINATE_AFTER,
    };

    /// renew < soft-terminate < hard-terminate < lease: a partitioned drone stops its backend before
    /// the lease can expire on the store clock.
    pub fn is_ordered(&self) -> bool {
        self.renew_after < self.soft_terminate_after
            && self.soft_terminate_after < self.hard_terminate_after
            && self.hard_terminate_after < self.lease
    }
}

impl Default for KeyTiming {
    fn default() -> Self {
        KeyTiming::DEFAULT
    }
}

/// The controller pings every node session this often (a WebSocket ping), so that the node hears from
/// it even when there is nothing to say.
pub const SESSION_PING_INTERVAL: Duration = Duration::from_secs(15);
/// The controller gives up a node session that sent no frame at all (pongs included) for this long;
/// nodes send a heartbeat or keepalive every [`HEARTBEAT_INTERVAL`].
pub const NODE_SILENCE_LIMIT: Duration = Duration::from_secs(60);
/// A node gives up its session when no frame at all (pings included) came from the controller for this
/// long: three pings missed. It then connects again, to this controller or another.
pub const CONTROLLER_SILENCE_LIMIT: Duration = Duration::from_secs(45);
/// Drone heartbeat and proxy keepalive cadence.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(7);
/// A drone samples each running backend's CPU and memory at most this often (`BackendMetrics`).
pub const BACKEND_METRICS_INTERVAL: Duration = Duration::from_secs(10);
/// How long a proxy's "has open connections" report keeps a backend from being idle unless the
/// proxy repeats it (it does every heartbeat interval while connections stay open).
pub const CONNECTED_REPORT_TTL: Duration = Duration::from_secs(21);
/// A drone whose last heartbeat is older than this is not given new backends.
pub const UNHEALTHY_AFTER: Duration = Duration::from_secs(45);

/// Interval of the controller's idle/lifetime sweeper.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Unacked actions are resent this often.
pub const ACTION_RESEND_INTERVAL: Duration = Duration::from_secs(5);
/// A drone looks this often for its oldest unacked backend event; one still unacked a whole interval
/// after it was last sent (the controller could not record it and kept the connection) is sent again,
/// with every later one, without waiting for a new connection.
pub const EVENT_RESEND_INTERVAL: Duration = Duration::from_secs(5);

/// Grace period between SIGTERM and SIGKILL for a soft termination.
pub const SOFT_TERMINATE_GRACE: Duration = Duration::from_secs(10);

/// How long a backend may take from start to answering on its port.
/// How long a warm backend may take to answer its claim hook (`POST <claim_path>`, measured by the
/// drone) before the claim fails and the backend is terminated.
pub const CLAIM_HOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a controller waits for the drone's answer to a claim hook: the hook's own timeout plus
/// the time to kill a backend that failed it.
pub const CLAIM_HOOK_ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
pub const READINESS_TIMEOUT: Duration = Duration::from_secs(300);

/// Lifetime of a connection token.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// How long a proxy holds its cluster's certificate lease (ACME order coordination, plane-api.md
/// §7.9.3) after acquiring or renewing it, on the store clock. Only the holder may set the cluster's
/// ACME challenge values; the holder renews by asking again.
pub const CERT_LEASE: Duration = Duration::from_secs(60);

/// Status stream keep-alive comment interval.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// Reconnect backoff for node → controller sessions.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_deadlines_are_ordered() {
        assert!(KEY_RENEW_AFTER < KEY_SOFT_TERMINATE_AFTER);
        assert!(KEY_SOFT_TERMINATE_AFTER < KEY_HARD_TERMINATE_AFTER);
        assert!(KEY_HARD_TERMINATE_AFTER < KEY_LEASE);
        assert!(KeyTiming::DEFAULT.is_ordered());
        let swapped = KeyTiming {
            hard_terminate_after: KEY_LEASE,
            ..KeyTiming::DEFAULT
        };
        assert!(!swapped.is_ordered());
        // A proxy's lapsed route closes its tunnels well before the key can change hands.
        assert!(ROUTE_LEASE_CHECK_INTERVAL * 2 <= ROUTE_LEASE_MARGIN);
        assert!(ROUTE_LEASE_MARGIN * 4 < KEY_LEASE - KEY_RENEW_AFTER);
        assert!(HEARTBEAT_INTERVAL < UNHEALTHY_AFTER);
        assert!(HEARTBEAT_INTERVAL * 2 < CONNECTED_REPORT_TTL);
        assert!(BACKOFF_INITIAL < BACKOFF_MAX);
    }
}

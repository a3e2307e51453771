//! Fault schedules, drawn at random from a seed: the same seed and shape give the same schedule, so
//! a violation can be replayed with `--seed`.

use crate::relay::RelayMode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Duration;

/// A process of the system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Component {
    Controller(usize),
    Drone(usize),
    Proxy(usize),
}

/// A link the harness relays, and so can break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Link {
    /// Drone `i` to its controller.
    DroneController(usize),
    /// Proxy `i` to its controller.
    ProxyController(usize),
    /// Controller `i` to PostgreSQL.
    ControllerPostgres(usize),
    /// The proxies (and the drones' readiness probes) to every backend: a relay in front of each
    /// backend process (see `shim.rs`).
    ProxyBackends,
}

/// One fault; it lasts for its step's duration, then is healed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// SIGKILL, restarted when healed.
    Kill(Component),
    /// SIGSTOP, SIGCONT when healed.
    Pause(Component),
    /// SIGTERM, then started again at once (the duration is unused).
    Restart(Component),
    /// Every PostgreSQL connection of the run's database terminated (`pg_terminate_backend`).
    CutPostgres,
    /// The PostgreSQL server crash-stopped (`pg_ctl stop -m immediate`), started again when healed.
    StopPostgres,
    /// Every open connection on the link closed (the duration is unused).
    Drop(Link),
    /// The link misbehaves in `mode` until healed.
    Relay(Link, RelayMode),
}

impl Fault {
    /// The name counted in the figures.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill(_) => "kill",
            Fault::Pause(_) => "pause",
            Fault::Restart(_) => "restart",
            Fault::CutPostgres => "postgres-cut",
            Fault::StopPostgres => "postgres-stop",
            Fault::Drop(_) => "drop",
            Fault::Relay(_, RelayMode::Delay(_)) => "delay",
            Fault::Relay(_, RelayMode::BlackHole) => "black-hole",
            Fault::Relay(_, RelayMode::HalfOpen) => "half-open",
            Fault::Relay(_, RelayMode::Reset) => "reset",
            Fault::Relay(_, RelayMode::Pass) => "pass",
        }
    }

    /// What a fault acts on; two faults on one target never overlap in a schedule.
    fn target(&self) -> String {
        match self {
            Fault::Kill(c) | Fault::Pause(c) | Fault::Restart(c) => format!("{c:?}"),
            Fault::CutPostgres | Fault::StopPostgres => "postgres".into(),
            Fault::Drop(l) | Fault::Relay(l, _) => format!("{l:?}"),
        }
    }
}

/// A fault at a time after the load started.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub at: Duration,
    pub fault: Fault,
    pub duration: Duration,
}

/// The size of the system and of the fault window.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Shape {
    pub controllers: usize,
    /// Drones with the process executor...
    pub drones: usize,
    /// ...and, after them, drones with the Docker executor.
    pub docker_drones: usize,
    pub proxies: usize,
    pub faults: usize,
    /// Faults start within this window after the load started.
    pub window: Duration,
    /// Longest fault.
    pub max_fault: Duration,
    /// Each schedule also freezes one drone (SIGSTOP) for longer than the key lease: 65–75 s.
    pub long_pause: bool,
}

/// The key lease of the binaries under test (`hangar_types::timing::KEY_LEASE`; this crate depends on
/// no Hangar crate).
pub const KEY_LEASE: Duration = Duration::from_secs(60);

/// Draws a schedule from `seed`.
pub fn draw(seed: u64, shape: &Shape) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps: Vec<Step> = Vec::new();
    let window_ms = u64::try_from(shape.window.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let max_ms = u64::try_from(shape.max_fault.as_millis())
        .unwrap_or(u64::MAX)
        .max(200);
    if shape.long_pause {
        let drone = rng.random_range(0..shape.drones + shape.docker_drones);
        steps.push(Step {
            at: Duration::from_millis(rng.random_range(0..window_ms)),
            fault: Fault::Pause(Component::Drone(drone)),
            duration: KEY_LEASE + Duration::from_millis(rng.random_range(5_000..=15_000)),
        });
    }
    let wanted = shape.faults + usize::from(shape.long_pause);
    let mut attempts = 0;
    while steps.len() < wanted && attempts < shape.faults * 20 {
        attempts += 1;
        let fault = draw_fault(&mut rng, shape);
        let at = Duration::from_millis(rng.random_range(0..window_ms));
        let duration = Duration::from_millis(rng.random_range(200..=max_ms));
        let busy = steps.iter().any(|s| {
            s.fault.target() == fault.target() && at < s.at + s.duration && s.at < at + duration
        });
        if !busy {
            steps.push(Step {
                at,
                fault,
                duration,
            });
        }
    }
    steps.sort_by_key(|s| s.at);
    steps
}

fn draw_component(rng: &mut StdRng, shape: &Shape) -> Component {
    match rng.random_range(0..3) {
        0 => Component::Controller(rng.random_range(0..shape.controllers)),
        1 => Component::Drone(rng.random_range(0..shape.drones + shape.docker_drones)),
        _ => Component::Proxy(rng.random_range(0..shape.proxies)),
    }
}

fn draw_link(rng: &mut StdRng, shape: &Shape) -> Link {
    match rng.random_range(0..4) {
        0 => Link::DroneController(rng.random_range(0..shape.drones + shape.docker_drones)),
        1 => Link::ProxyController(rng.random_range(0..shape.proxies)),
        2 => Link::ProxyBackends,
        _ => Link::ControllerPostgres(rng.random_range(0..shape.controllers)),
    }
}

fn draw_fault(rng: &mut StdRng, shape: &Shape) -> Fault {
    match rng.random_range(0..10) {
        0 => Fault::Kill(draw_component(rng, shape)),
        1 => Fault::Pause(draw_component(rng, shape)),
        2 => Fault::Restart(draw_component(rng, shape)),
        3 => Fault::CutPostgres,
        9 => Fault::StopPostgres,
        4 => Fault::Drop(draw_link(rng, shape)),
        5 => Fault::Relay(
            draw_link(rng, shape),
            RelayMode::Delay(Duration::from_millis(rng.random_range(50..1500))),
        ),
        6 => Fault::Relay(draw_link(rng, shape), RelayMode::BlackHole),
        7 => Fault::Relay(draw_link(rng, shape), RelayMode::HalfOpen),
        _ => Fault::Relay(draw_link(rng, shape), RelayMode::Reset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        controllers: 2,
        drones: 3,
        docker_drones: 1,
        proxies: 2,
        faults: 12,
        window: Duration::from_secs(20),
        max_fault: Duration::from_secs(8),
        long_pause: false,
    };

    #[test]
    fn a_seed_gives_one_schedule_and_targets_never_overlap() {
        let a = draw(7, &SHAPE);
        let b = draw(7, &SHAPE);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_ne!(format!("{a:?}"), format!("{:?}", draw(8, &SHAPE)));
        assert!(!a.is_empty());
        for (i, s) in a.iter().enumerate() {
            assert!(s.at < SHAPE.window && s.duration <= SHAPE.max_fault);
            for t in &a[i + 1..] {
                let overlap = t.at < s.at + s.duration && s.at < t.at + t.duration;
                assert!(
                    !(overlap && s.fault.target() == t.fault.target()),
                    "{s:?} {t:?}"
                );
            }
        }
    }

    #[test]
    fn a_long_pause_outlives_the_key_lease() {
        let shape = Shape {
            long_pause: true,
            ..SHAPE
        };
        let a = draw(7, &shape);
        let long: Vec<&Step> = a.iter().filter(|s| s.duration > KEY_LEASE).collect();
        assert_eq!(long.len(), 1, "{a:?}");
        assert!(matches!(long[0].fault, Fault::Pause(Component::Drone(_))));
        assert!(long[0].duration <= KEY_LEASE + Duration::from_secs(15));
        for (i, s) in a.iter().enumerate() {
            for t in &a[i + 1..] {
                let overlap = t.at < s.at + s.duration && s.at < t.at + t.duration;
                assert!(
                    !(overlap && s.fault.target() == t.fault.target()),
                    "{s:?} {t:?}"
                );
            }
        }
    }
}

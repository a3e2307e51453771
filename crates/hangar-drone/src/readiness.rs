//! Readiness probe: a backend is `ready` once an HTTP request to its address gets any HTTP response
//! (any status). Shared by all executors.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Attempts during the first [`FAST_PHASE`] are this far apart; after it the spacing doubles from
/// here up to [`MAX_INTERVAL`]. A local process is often listening a few milliseconds after it
/// starts, and a refused connect to it costs microseconds, so probing each millisecond at first is
/// cheap and finds it within a millisecond. Doubling afterwards keeps slow starters cheap to probe.
const FAST_INTERVAL: Duration = Duration::from_millis(1);
const FAST_PHASE: Duration = Duration::from_millis(25);
const MAX_INTERVAL: Duration = Duration::from_millis(500);
/// One attempt (connect, write, read the status line) may take this long.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the backend did not answer HTTP on {address} within {timeout:?}")]
pub struct ReadinessTimeout {
    pub address: SocketAddr,
    pub timeout: Duration,
}

/// Probes `address` until it answers HTTP or `timeout` passes: once at once, then on the slots of
/// [`Schedule`].
pub async fn wait_ready(address: SocketAddr, timeout: Duration) -> Result<(), ReadinessTimeout> {
    let answered = probe_until(timeout, |attempt_deadline| async move {
        matches!(
            tokio::time::timeout_at(attempt_deadline, answers_http(address)).await,
            Ok(true)
        )
    })
    .await;
    answered
        .then_some(())
        .ok_or(ReadinessTimeout { address, timeout })
}

/// Runs `attempt` (given the instant it must give up by) on the slots of a [`Schedule`] starting
/// now, until one returns `true` (then `true`) or the next slot is not before `timeout` from now
/// (then `false`).
async fn probe_until<F, Fut>(timeout: Duration, mut attempt: F) -> bool
where
    F: FnMut(Instant) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut schedule = Schedule::new(Instant::now());
    let deadline = schedule.started + timeout;
    loop {
        if attempt(deadline.min(Instant::now() + ATTEMPT_TIMEOUT)).await {
            return true;
        }
        let next = schedule.after(Instant::now());
        if next >= deadline {
            return false;
        }
        tokio::time::sleep_until(next).await;
    }
}

/// When attempts are due: at `started`, then every [`FAST_INTERVAL`] until [`FAST_PHASE`] after it,
/// then at doubling intervals up to [`MAX_INTERVAL`].
///
/// The slots are fixed from `started`, not from the end of the previous attempt: tokio fires a timer
/// at the first millisecond tick at or after its deadline, so "1 ms after this attempt" came about
/// 2 ms after it, and the fast phase probed every ~2 ms. Slots a millisecond apart keep the
/// rounding from accumulating. A slot that passed while an attempt ran is skipped rather than
/// probed late (no burst of back-to-back attempts after a slow one).
#[derive(Debug, Clone)]
struct Schedule {
    started: Instant,
    /// The slot of the latest attempt (the first is `started`).
    slot: Instant,
    /// Distance from `slot` to the slot after it.
    interval: Duration,
}

impl Schedule {
    fn new(started: Instant) -> Self {
        Schedule {
            started,
            slot: started,
            interval: FAST_INTERVAL,
        }
    }

    /// The first slot after `now` (the end of an attempt).
    fn after(&mut self, now: Instant) -> Instant {
        while self.slot <= now {
            if self.slot - self.started >= FAST_PHASE {
                self.interval = (self.interval * 2).min(MAX_INTERVAL);
            }
            self.slot += self.interval;
        }
        self.slot
    }
}

/// One attempt: `GET /` and check that the answer starts like an HTTP response.
async fn answers_http(address: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(address).await else {
        return false;
    };
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {address}\r\nUser-Agent: hangar-drone\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await.is_ok() && &head == b"HTTP/"
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Offsets from the start of the slots `after` gives when every attempt ends at once.
    fn slots(count: usize) -> Vec<Duration> {
        let mut schedule = Schedule::new(Instant::now());
        let started = schedule.started;
        let mut now = started;
        (0..count)
            .map(|_| {
                now = schedule.after(now);
                now - started
            })
            .collect()
    }

    #[test]
    fn fast_phase_is_every_millisecond_then_backs_off_to_the_cap() {
        let offsets = slots(40);
        let fast: Vec<Duration> = (1..=25).map(ms).collect();
        assert_eq!(offsets[..25], fast[..]);
        assert_eq!(offsets[25..30], [ms(27), ms(31), ms(39), ms(55), ms(87)]);
        let gaps: Vec<Duration> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[0] <= g[1]), "{gaps:?}");
        assert_eq!(gaps.last(), Some(&MAX_INTERVAL));
    }

    #[test]
    fn slots_passed_during_a_slow_attempt_are_skipped() {
        let mut schedule = Schedule::new(Instant::now());
        let started = schedule.started;
        // Attempts that end 3.5 ms and 0.2 ms after their slot: the next is the first slot after.
        let next = schedule.after(started + Duration::from_micros(3_500));
        assert_eq!(next - started, ms(4));
        let next = schedule.after(next + Duration::from_micros(200));
        assert_eq!(next - started, ms(5));
        // Past the fast phase, skipped slots still double the interval.
        let next = schedule.after(started + ms(30));
        assert_eq!(next - started, ms(31));
        assert_eq!(schedule.after(next) - started, ms(39));
    }

    /// Offsets from the start at which `probe_until` ran its attempts; the attempt numbered
    /// `succeeds_at` (from 0) answers.
    async fn attempt_offsets(
        timeout: Duration,
        succeeds_at: Option<usize>,
    ) -> (bool, Vec<Duration>) {
        let started = Instant::now();
        let offsets = std::sync::Mutex::new(Vec::new());
        let answered = probe_until(timeout, |_| {
            let mut offsets = offsets.lock().unwrap();
            offsets.push(Instant::now() - started);
            let answers = Some(offsets.len() - 1) == succeeds_at;
            async move { answers }
        })
        .await;
        (answered, offsets.into_inner().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn probes_at_once_then_each_millisecond_until_the_timeout() {
        let (answered, offsets) = attempt_offsets(ms(25), None).await;
        assert!(!answered);
        let expected: Vec<Duration> = (0..25).map(ms).collect();
        assert_eq!(offsets, expected);

        let (answered, offsets) = attempt_offsets(ms(1_000), Some(3)).await;
        assert!(answered);
        assert_eq!(offsets, [ms(0), ms(1), ms(2), ms(3)]);
    }

    #[tokio::test]
    async fn ready_once_http_answers() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                // The first connection answers garbage, the second answers HTTP.
                let (mut s, _) = listener.accept().await.unwrap();
                let _ = s.write_all(b"garbage").await;
                drop(s);
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await
                    .unwrap();
            });
            wait_ready(address, Duration::from_secs(5)).await.unwrap();
            server.await.unwrap();
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn times_out_when_nothing_listens() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            drop(listener);
            let err = wait_ready(address, Duration::from_millis(200))
                .await
                .unwrap_err();
            assert_eq!(err.address, address);
        })
        .await
        .unwrap();
    }
}

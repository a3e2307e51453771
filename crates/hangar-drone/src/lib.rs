//! The Hangar drone: the agent on every machine that runs backends. It holds a WebSocket session with
//! the controller (`session`), applies its spawn/terminate actions by driving an [`executor`] through
//! one supervisor task per backend (`supervisor`), keeps every state change in a durable local
//! outbox until the controller acknowledges it (`outbox`), and renews key leases, terminating its
//! backends by its own clock when it cannot (`key_manager`).
//!
//! Entry point: [`start`] with a [`DroneConfig`]; stop with [`DroneHandle::shutdown`].
//!
//! Boundary: the drone never touches the controller's store; all it knows arrives as actions. It owns
//! no business decisions (placement, idle sweeping): it runs, reports and obeys deadlines.

pub mod config;
pub mod executor;
mod key_manager;
mod log_requests;
pub mod log_store;
mod outbox;
mod prometheus;
mod readiness;
mod session;
mod supervisor;

pub use config::{DockerLogConfig, DroneConfig, DroneConfigError};

use anyhow::Context;
use executor::{DockerExecutor, Executor, ProcessExecutor, SocketExecutor};
use hangar_client::ControllerClient;
use hangar_types::executable::ExecutorKind;
use hangar_types::protocol::{DroneToController, Hello, NodeHello};
use hangar_types::{BackendId, DroneName};
use log_store::{LogStore, LogWriter};
use outbox::Outbox;
use prometheus::{DroneMetrics, MetricsSource};
use session::Session;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use supervisor::{SupervisorSettings, Supervisors};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Acks and key renewals waiting for a connection. When full (a long disconnection) new ones are
/// dropped: the controller resends unacked actions and the key manager asks again.
const OUTBOUND_CAPACITY: usize = 1024;
/// Actions received but not yet applied. When full an action is dropped; the controller resends it.
const ACTION_CAPACITY: usize = 1024;
/// Metrics samples waiting for a connection. When full new samples are dropped (they are best
/// effort); a new connection discards the stale ones.
const METRICS_CAPACITY: usize = 256;
/// At shutdown, how long the drone waits for the controller to ack the final events.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(5);
/// At shutdown, how long backends may take to stop beyond the soft-terminate grace period.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);
/// How often the log store deletes the lines of backends past their retention.
const LOG_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// A running drone.
pub struct DroneHandle {
    name: DroneName,
    cancel: CancellationToken,
    tracker: TaskTracker,
    actions_cancel: CancellationToken,
    actions_task: JoinHandle<()>,
    supervisors: Supervisors,
    executors: Vec<Arc<dyn Executor>>,
    outbox: Outbox,
    connected: watch::Receiver<bool>,
    reconnect: watch::Sender<u64>,
    soft_terminate_grace: Duration,
    metrics_addr: Option<SocketAddr>,
    logs: LogStore,
    log_writer: LogWriter,
    /// The log store's directory when it is temporary (no state file): removed at shutdown.
    _log_tmp: Option<tempfile::TempDir>,
}

/// Starts a drone: opens its state, re-adopts the backends left running by a previous run (Docker
/// containers) or reports them terminated (processes, which die with the drone, and containers that
/// stopped or vanished meanwhile), removes this drone's containers that no backend claims, then
/// connects to the controller and keeps reconnecting until [`DroneHandle::shutdown`].
pub async fn start(config: DroneConfig) -> anyhow::Result<DroneHandle> {
    config.validate().context("invalid drone configuration")?;
    // Bound first: a busy port fails the start before anything runs.
    let metrics_listener = hangar_client::metrics_listener::bind(config.metrics_addr).await?;
    let metrics_addr = metrics_listener.as_ref().map(|(_, addr)| *addr);
    let drone_metrics = Arc::new(DroneMetrics::new());
    let client =
        ControllerClient::new(config.controller_url.clone()).context("invalid controller URL")?;
    let outbox = Outbox::open(config.state_file.as_deref())
        .await
        .context("cannot open the drone state")?;
    if let Some(owner) = outbox
        .claim(&config.name)
        .await
        .context("cannot keep the drone's name in its state")?
    {
        let path = config
            .state_file
            .as_deref()
            .unwrap_or(Path::new(""))
            .display();
        anyhow::bail!(
            "the state file {path} belongs to drone {owner}, not {}: start the drone as {owner} \
             (or without a name, to take the one kept there), or give it another state file",
            config.name
        );
    }
    let (logs, log_tmp) = open_log_store(&config, &drone_metrics)?;
    let log_writer =
        LogWriter::start(logs.clone()).context("cannot start the log writer thread")?;
    let kinds = config.offered_executors();
    let (metrics, metrics_rx) = mpsc::channel(METRICS_CAPACITY);
    let (executor_error, executor_error_rx) = watch::channel(None);
    let links = ExecutorLinks {
        metrics,
        executor_error,
        logs: log_writer.clone(),
    };
    let executors = start_executors(&config, &kinds, links).await?;
    let settings = SupervisorSettings {
        soft_terminate_grace: config.soft_terminate_grace,
        readiness_timeout: config.readiness_timeout,
        durable_state: config.state_file.is_some(),
    };
    let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let supervisors = Supervisors::new(
        outbox.clone(),
        executors.clone(),
        settings,
        outbound.clone(),
        drone_metrics.clone(),
    );
    supervisors
        .recover()
        .await
        .context("cannot recover the backends of the previous run")?;
    remove_orphans(&executors, &supervisors.live_ids()).await;

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let actions_cancel = CancellationToken::new();
    let (actions, actions_rx) = mpsc::channel(ACTION_CAPACITY);
    let actions_task = tokio::spawn(session::run_actions(
        supervisors.clone(),
        actions_rx,
        outbound,
        actions_cancel.clone(),
    ));
    let (connected, connected_rx) = watch::channel(false);
    let (reconnect, reconnect_rx) = watch::channel(0);
    let session = Session {
        client,
        path: format!("/ctrl/c/{}/drone-socket", config.cluster),
        hello: Hello::new(NodeHello::Drone {
            name: config.name.clone(),
            pool: config.pool.clone(),
            executors: kinds,
        }),
        outbox: outbox.clone(),
        supervisors: supervisors.clone(),
        actions,
        outbound: outbound_rx,
        metrics: metrics_rx,
        connected,
        reconnect: reconnect_rx,
        prometheus: drone_metrics.clone(),
        executor_error: executor_error_rx,
        logs: Some(logs.clone()),
    };
    tracker.spawn(session.run_session(cancel.child_token()));
    tracker.spawn(run_log_pruning(logs.clone(), cancel.child_token()));
    if let Some((listener, _)) = metrics_listener {
        let source = MetricsSource {
            metrics: drone_metrics,
            outbox: outbox.clone(),
            connected: connected_rx.clone(),
        };
        tracker.spawn(prometheus::run_metrics_listener(
            listener,
            source,
            tracker.clone(),
            cancel.child_token(),
        ));
    }
    tracker.close();
    tracing::info!(drone = %config.name, cluster = %config.cluster, "Drone started");
    if let Some(addr) = metrics_addr {
        tracing::info!(%addr, "Drone metrics at http://{addr}/metrics");
    }
    Ok(DroneHandle {
        name: config.name,
        cancel,
        tracker,
        actions_cancel,
        actions_task,
        supervisors,
        executors,
        outbox,
        connected: connected_rx,
        reconnect,
        soft_terminate_grace: config.soft_terminate_grace,
        metrics_addr,
        logs,
        log_writer,
        _log_tmp: log_tmp,
    })
}

/// The name of the drone whose state `state_file` holds (kept there by [`start`]); `None` when the
/// file does not exist or keeps no name. A drone restarted without a name takes this one, so that it
/// re-adopts its backends under the name the controller knows them by.
pub async fn name_in_state_file(state_file: &Path) -> anyhow::Result<Option<DroneName>> {
    if !state_file.exists() {
        return Ok(None);
    }
    let outbox = Outbox::open(Some(state_file))
        .await
        .context("cannot open the drone state")?;
    let name = outbox.drone_name().await;
    outbox.close().await;
    name.context("cannot read the drone's name from its state")
}

/// Opens the log store in `log_dir` (or a temporary directory, returned to be kept alive).
fn open_log_store(
    config: &DroneConfig,
    metrics: &DroneMetrics,
) -> anyhow::Result<(LogStore, Option<tempfile::TempDir>)> {
    let (dir, tmp) = match config.log_dir() {
        Some(dir) => (dir, None),
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("hangar-drone-logs-")
                .tempdir()
                .context("cannot create a temporary log directory")?;
            (tmp.path().to_path_buf(), Some(tmp))
        }
    };
    let counters = metrics.log_lines.clone();
    let logs = LogStore::open(&dir, config.log_limits(), counters)
        .with_context(|| format!("cannot open the log store in {}", dir.display()))?;
    Ok((logs, tmp))
}

/// Deletes the lines of backends past their retention, every [`LOG_PRUNE_INTERVAL`].
async fn run_log_pruning(logs: LogStore, cancel: CancellationToken) {
    let mut ticks = hangar_types::ticks::every(LOG_PRUNE_INTERVAL, &cancel);
    while ticks.next().await {
        let store = logs.clone();
        let pruned = tokio::task::spawn_blocking(move || store.prune(hangar_types::Millis::now()));
        match pruned.await {
            Ok(0) => {}
            Ok(removed) => {
                tracing::info!(removed, "Deleted the logs of backends past their retention")
            }
            Err(e) => tracing::warn!(error = %e, "Log pruning failed"),
        }
    }
}

/// What the executors report through, besides their backends.
struct ExecutorLinks {
    /// Metrics samples.
    metrics: mpsc::Sender<DroneToController>,
    /// Why the socket executor is unavailable.
    executor_error: watch::Sender<Option<String>>,
    /// Where backend output goes.
    logs: LogWriter,
}

/// The executors of `kinds`, reporting through `links`.
async fn start_executors(
    config: &DroneConfig,
    kinds: &[ExecutorKind],
    links: ExecutorLinks,
) -> anyhow::Result<Vec<Arc<dyn Executor>>> {
    let ExecutorLinks {
        metrics,
        executor_error,
        logs,
    } = links;
    let mut executor_error = Some(executor_error);
    let mut executors: Vec<Arc<dyn Executor>> = Vec::new();
    for kind in kinds {
        match kind {
            ExecutorKind::Process => executors.push(Arc::new(
                ProcessExecutor::new(config.ip).with_log_writer(logs.clone()),
            )),
            ExecutorKind::Docker => {
                if config.state_file.is_none() {
                    tracing::info!(
                        "No state file: a restarted drone could not re-adopt containers, so they are \
                         terminated at shutdown"
                    );
                }
                let settings = config.docker_settings()?;
                let mut docker = DockerExecutor::connect(settings, metrics.clone())
                    .await
                    .context("cannot use the Docker executor (is the Docker engine running?)")?;
                if config.state_file.is_none() {
                    docker = docker.ephemeral();
                }
                executors.push(Arc::new(docker.with_log_writer(logs.clone())));
            }
            ExecutorKind::Socket => {
                let settings = config
                    .socket_settings()
                    .context("the socket executor needs `executor_socket`")?;
                let error = executor_error
                    .take()
                    .context("only one socket executor per drone")?;
                tracing::info!(socket = %settings.path.display(), "Using the executor socket");
                let socket = SocketExecutor::start(settings, metrics.clone(), error);
                executors.push(Arc::new(socket));
            }
        }
    }
    Ok(executors)
}

/// Removes what the executors left for backends nobody supervises (after the recovery).
async fn remove_orphans(executors: &[Arc<dyn Executor>], supervised: &[BackendId]) {
    for executor in executors {
        match executor.remove_orphans(supervised).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, executor = %executor.kind(), "Removed orphans"),
            Err(e) => tracing::warn!(error = %e, "Failed to remove orphaned backends"),
        }
    }
}

impl DroneHandle {
    pub fn name(&self) -> &DroneName {
        &self.name
    }

    /// The address of the metrics listener (`GET /metrics`), if `metrics_addr` is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The store of this drone's backend output.
    pub fn log_store(&self) -> &LogStore {
        &self.logs
    }

    /// Whether a controller session is up right now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Drops the current controller connection without a close handshake; the drone reconnects with
    /// backoff and replays its unacked events. For tests of the reconnect path.
    pub fn reconnect(&self) {
        self.reconnect.send_modify(|n| *n += 1);
    }

    /// Stops taking actions, terminates backends that cannot outlive the drone (SIGTERM, grace period,
    /// SIGKILL), waits briefly for the controller to ack their final events, then closes the session.
    pub async fn shutdown(self) {
        self.shutdown_cut_short_by(std::future::pending()).await;
    }

    /// [`DroneHandle::shutdown`], except that once `cut` resolves (an operator's second Ctrl-C),
    /// backends still in their grace period are killed at once (SIGKILL).
    pub async fn shutdown_cut_short_by(self, cut: impl Future<Output = ()>) {
        let supervisors = self.supervisors.clone();
        let stop = self.stop();
        tokio::pin!(stop);
        tokio::select! {
            biased;
            () = &mut stop => return,
            () = cut => supervisors.kill_all().await,
        }
        stop.await;
    }

    async fn stop(self) {
        tracing::info!(drone = %self.name, "Drone shutting down");
        self.actions_cancel.cancel();
        if let Err(e) = self.actions_task.await {
            tracing::warn!(error = %e, "Action loop ended abnormally");
        }
        self.supervisors
            .shutdown(self.soft_terminate_grace + SHUTDOWN_MARGIN)
            .await;
        wait_for_acks(&self.outbox, self.connected.clone()).await;
        self.cancel.cancel();
        self.tracker.wait().await;
        for executor in &self.executors {
            executor.shutdown().await;
        }
        self.log_writer.flush().await;
        self.outbox.close().await;
        tracing::info!(drone = %self.name, "Drone stopped");
    }
}

/// Waits until the outbox is empty, the connection is down, or [`SHUTDOWN_ACK_WAIT`] passed.
async fn wait_for_acks(outbox: &Outbox, mut connected: watch::Receiver<bool>) {
    let deadline = Instant::now() + SHUTDOWN_ACK_WAIT;
    let mut acks = outbox.subscribe_acks();
    loop {
        acks.borrow_and_update();
        match outbox.pending_events().await {
            Ok(0) => return,
            Ok(pending) if !*connected.borrow_and_update() => {
                tracing::info!(
                    pending,
                    "Not connected; unacked events stay in the drone state"
                );
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Failed to count unacked events");
                return;
            }
        }
        tokio::select! {
            _ = acks.changed() => {}
            _ = connected.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("Controller did not ack the final events in time");
                return;
            }
        }
    }
}

/// The name of a directory entry parsed as a `T` (a pid under `/proc`, a backend id in the log
/// directory); `None` for a name that is not one.
fn parsed_file_name<T: std::str::FromStr>(entry: &std::fs::DirEntry) -> Option<T> {
    entry.file_name().to_str()?.parse().ok()
}

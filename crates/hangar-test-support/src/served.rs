//! An axum router served on a test's listener: the fakes that stand in for a controller or a
//! backend (the components themselves have their own `start`).

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A router being served; it stops accepting on [`Served::shutdown`] or when dropped.
pub struct Served {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Served {
    /// Serves `app` on `listener` (bound by the test, usually to port 0).
    pub fn start(listener: TcpListener, app: axum::Router) -> Served {
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let stop = cancel.clone();
        tasks.spawn(async move {
            // Handlers may read the peer address (`ConnectInfo<SocketAddr>`).
            let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
                .unwrap();
        });
        tasks.close();
        Served { cancel, tasks }
    }

    /// Stops serving and waits until the server has finished.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.wait().await;
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

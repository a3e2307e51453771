//! Fresh PostgreSQL databases for tests, on the server named by `HANGAR_TEST_POSTGRES_URL` (e.g.
//! `postgres://postgres:postgres@127.0.0.1:5432/postgres`, printed by `scripts/start-postgres.sh`).
//!
//! Each [`TestDatabase`] is `hangar_test_<random>`, dropped by [`TestDatabase::drop_database`] or, if a
//! test panicked first, when the value is dropped. Without the variable, tests skip with a message,
//! except under `CI`, where they fail.

use sqlx::{Connection, Executor, PgConnection};

/// The variable naming the PostgreSQL server.
pub const URL_VAR: &str = "HANGAR_TEST_POSTGRES_URL";

/// `CI` is set to something other than empty, `0` or `false`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// The server to test against; `None` (skip, with a message) when not configured outside CI.
pub fn server_url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if in_ci() => panic!(
            "{URL_VAR} is not set, but CI is: the PostgreSQL tests must run in CI. Start a server with \
             scripts/start-postgres.sh and export the URL it prints as {URL_VAR}."
        ),
        _ => {
            eprintln!(
                "skipping a PostgreSQL test: {URL_VAR} is not set (start a server with \
                 scripts/start-postgres.sh and export the URL it prints)"
            );
            None
        }
    }
}

/// A database created for one test.
pub struct TestDatabase {
    server: String,
    name: String,
    url: String,
    dropped: bool,
}

impl TestDatabase {
    /// Creates a fresh database; `None` when PostgreSQL tests are skipped.
    pub async fn create() -> Option<TestDatabase> {
        let server = server_url()?;
        let name = format!("hangar_test_{}", hangar_types::names::random_string());
        let mut admin = PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {URL_VAR}: {e}"));
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let _ = admin.close().await;
        let mut url =
            url::Url::parse(&server).unwrap_or_else(|e| panic!("{URL_VAR} is not a URL: {e}"));
        url.set_path(&name);
        Some(TestDatabase {
            server,
            name,
            url: url.to_string(),
            dropped: false,
        })
    }

    /// URL of the test database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops the database, disconnecting whoever still uses it. Failures are only reported.
    pub async fn drop_database(mut self) {
        self.dropped = true;
        drop_now(&self.server, &self.name).await;
    }
}

async fn drop_now(server: &str, name: &str) {
    let result = async {
        let mut admin = PgConnection::connect(server).await?;
        let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        admin.execute(sql.as_str()).await?;
        admin.close().await
    }
    .await;
    if let Err(e) = result {
        eprintln!("cannot drop test database {name}: {e}");
    }
}

/// A test that panicked before [`TestDatabase::drop_database`] still removes its database: on a
/// separate thread with its own runtime, because `Drop` cannot await and may run inside a runtime.
impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (server, name) = (self.server.clone(), self.name.clone());
        let cleanup =
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(drop_now(&server, &name)),
                    Err(e) => eprintln!("cannot drop test database {name}: {e}"),
                }
            });
        let _ = cleanup.join();
    }
}

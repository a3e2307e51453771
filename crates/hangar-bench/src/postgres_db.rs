//! A fresh PostgreSQL database per run on the server named by `HANGAR_TEST_POSTGRES_URL` (the same
//! variable the store and controller test suites use), dropped afterwards, plus the
//! `pg_stat_database` counters the control-plane scenario reads.

use anyhow::Context;
use sqlx::{Connection, Executor, PgConnection};

/// The variable naming a PostgreSQL server and a user allowed to create databases.
pub const URL_VAR: &str = "HANGAR_TEST_POSTGRES_URL";

/// The server URL, when configured.
pub fn server_url() -> Option<String> {
    std::env::var(URL_VAR)
        .ok()
        .filter(|url| !url.trim().is_empty())
}

pub struct FreshDatabase {
    server: String,
    name: String,
    pub url: String,
}

impl FreshDatabase {
    pub async fn create(server: &str) -> anyhow::Result<FreshDatabase> {
        let name = format!("hangar_bench_{}", hangar_types::names::random_string());
        let mut admin = PgConnection::connect(server)
            .await
            .with_context(|| format!("connecting to {URL_VAR}"))?;
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .with_context(|| format!("creating database {name}"))?;
        let _ = admin.close().await;
        let mut url = url::Url::parse(server).with_context(|| format!("{URL_VAR} is not a URL"))?;
        url.set_path(&name);
        Ok(FreshDatabase {
            server: server.to_string(),
            name,
            url: url.to_string(),
        })
    }

    /// Committed transactions of this database so far (`pg_stat_database.xact_commit`). The statistics
    /// collector lags a little; [`FreshDatabase::flushed_xact_commit`] waits for it.
    async fn xact_commit(&self) -> anyhow::Result<i64> {
        let mut conn = PgConnection::connect(&self.server)
            .await
            .context("connecting to read pg_stat_database")?;
        let (n,): (i64,) =
            sqlx::query_as("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
                .bind(&self.name)
                .fetch_one(&mut conn)
                .await
                .context("reading pg_stat_database")?;
        let _ = conn.close().await;
        Ok(n)
    }

    /// `xact_commit` once it stops moving between two reads (PostgreSQL 15 publishes backend
    /// statistics at the end of transactions, at most once a second per backend). Each read is itself
    /// one committed transaction on the `server` database, not on this one.
    pub async fn flushed_xact_commit(&self) -> anyhow::Result<i64> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut last = self.xact_commit().await?;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
            let now = self.xact_commit().await?;
            if now == last || tokio::time::Instant::now() > deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    /// Best effort; failures are printed.
    pub async fn drop_database(self) {
        let result = async {
            let mut admin = PgConnection::connect(&self.server).await?;
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            admin.execute(sql.as_str()).await?;
            admin.close().await
        }
        .await;
        if let Err(e) = result {
            eprintln!("hangar-bench: cannot drop database {}: {e}", self.name);
        }
    }
}

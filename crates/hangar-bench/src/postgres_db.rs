//! A fresh PostgreSQL database per run on the server named by `HANGAR_TEST_POSTGRES_URL` (the same
//! variable the store and controller test suites use), dropped afterwards.

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

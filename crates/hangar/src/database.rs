//! The controller's database, chosen by `--db`: a `postgres://` (or `postgresql://`) URL opens the
//! PostgreSQL store that several controllers can share; a file path (or `sqlite:PATH`) is a SQLite
//! file (embedded, one controller); any other `scheme://` is refused by name. `hangar migrate --db …` applies the schema ahead of a rollout.

mod waiting;

pub use waiting::open_store_waiting;

use crate::cli::say;
use anyhow::Context;
use clap::Args;
use hangar_store::postgres::PostgresStore;
use hangar_store::sqlite::SqliteStore;
use hangar_store::Store;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

/// What `--db` accepts, for error messages.
const SUPPORTED: &str = "give a SQLite file path (or `sqlite:PATH`) or a \
    `postgres://user:password@host:port/database` URL";

/// Which kind of database a `--db` value names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    Postgres,
    Sqlite,
}

/// What `--db` names, checked before anything is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    pub kind: DatabaseKind,
    /// The PostgreSQL URL or the SQLite file path.
    pub location: String,
}

impl Database {
    pub fn parse(db: &str) -> anyhow::Result<Database> {
        let db = db.trim();
        if db.starts_with("postgres://") || db.starts_with("postgresql://") {
            return Ok(Database {
                kind: DatabaseKind::Postgres,
                location: db.to_string(),
            });
        }
        let path = db
            .strip_prefix("sqlite://")
            .or_else(|| db.strip_prefix("sqlite:"))
            .unwrap_or(db);
        if path.is_empty() {
            anyhow::bail!("--db must not be empty: {SUPPORTED}");
        }
        if let Some((scheme, _)) = path.split_once("://") {
            anyhow::bail!("unsupported database `{scheme}://…` in --db: {SUPPORTED}");
        }
        Ok(Database {
            kind: DatabaseKind::Sqlite,
            location: path.to_string(),
        })
    }

    /// The location with any password hidden, for messages.
    pub fn display(&self) -> String {
        match self.kind {
            DatabaseKind::Sqlite => self.location.clone(),
            DatabaseKind::Postgres => match url::Url::parse(&self.location) {
                Ok(mut url) => {
                    if url.password().is_some() {
                        let _ = url.set_password(Some("redacted"));
                    }
                    url.to_string()
                }
                Err(_) => "<unparseable PostgreSQL URL>".to_string(),
            },
        }
    }
}

/// An open store, kept concrete so it can be closed cleanly on shutdown.
pub enum OpenStore {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PostgresStore>),
}

impl OpenStore {
    /// Opens (and migrates) the store `db` names.
    pub async fn open(db: &Database) -> anyhow::Result<OpenStore> {
        match db.kind {
            DatabaseKind::Postgres => {
                let store = PostgresStore::connect(&db.location)
                    .await
                    .with_context(|| format!("connecting to PostgreSQL at {}", db.display()))?;
                Ok(OpenStore::Postgres(Arc::new(store)))
            }
            DatabaseKind::Sqlite => {
                let store = SqliteStore::open(Path::new(&db.location))
                    .await
                    .with_context(|| format!("opening the SQLite database {}", db.location))?;
                Ok(OpenStore::Sqlite(Arc::new(store)))
            }
        }
    }

    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            OpenStore::Sqlite(s) => s.clone(),
            OpenStore::Postgres(s) => s.clone(),
        }
    }

    /// Waits for running operations and closes every connection.
    pub async fn close(&self) {
        match self {
            OpenStore::Sqlite(s) => s.close().await,
            OpenStore::Postgres(s) => s.close().await,
        }
    }
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Database to migrate: a `postgres://user:password@host:port/database` URL or a SQLite file path
    /// (created if missing).
    #[arg(long, env = "HANGAR_DB")]
    pub db: String,
}

/// `hangar migrate`: applies every pending schema migration and exits. Safe to repeat and to run while
/// controllers are connected.
pub async fn run_migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let db = Database::parse(&args.db)?;
    match db.kind {
        DatabaseKind::Postgres => hangar_store::postgres::migrate(&db.location)
            .await
            .with_context(|| format!("migrating the PostgreSQL database {}", db.display()))?,
        // Opening a SQLite store applies its migrations.
        DatabaseKind::Sqlite => OpenStore::open(&db).await?.close().await,
    }
    say!("Database {} is up to date.", db.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn db_values_are_classified() {
        let pg = Database::parse("postgres://u:secret@h:5432/db").unwrap();
        assert_eq!(pg.kind, DatabaseKind::Postgres);
        assert!(!pg.display().contains("secret"), "{}", pg.display());
        assert_eq!(
            Database::parse("postgresql://h/db").unwrap().kind,
            DatabaseKind::Postgres
        );
        let file = Database::parse("sqlite://./x.db").unwrap();
        assert_eq!(file.kind, DatabaseKind::Sqlite);
        assert_eq!(file.location, "./x.db");
        assert_eq!(Database::parse("x.db").unwrap().location, "x.db");
        assert_eq!(Database::parse("sqlite:x.db").unwrap().location, "x.db");
        assert!(Database::parse("  ").is_err());
        assert!(Database::parse("sqlite://").is_err());
        let err = Database::parse("mysql://u:p@h/db").unwrap_err().to_string();
        assert!(
            err.contains("`mysql://…`")
                && err.contains("SQLite file path")
                && err.contains("postgres://"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unreachable_postgres_is_reported_without_the_password() {
        let db = Database::parse("postgres://u:very-secret@127.0.0.1:1/db").unwrap();
        let err = tokio::time::timeout(Duration::from_secs(30), OpenStore::open(&db))
            .await
            .unwrap()
            .err()
            .unwrap();
        let text = format!("{err:#}");
        assert!(text.contains("connecting to PostgreSQL"), "{text}");
        // The server's own error, not the pool's "timed out" after its retries.
        assert!(text.contains("refused"), "{text}");
        assert!(!text.contains("timed out"), "{text}");
        assert!(!text.contains("very-secret"), "{text}");
    }

    #[tokio::test]
    async fn sqlite_files_are_created_and_migrated_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        for _ in 0..2 {
            let args = MigrateArgs {
                db: path.to_string_lossy().into_owned(),
            };
            tokio::time::timeout(Duration::from_secs(30), run_migrate(args))
                .await
                .unwrap()
                .unwrap();
        }
        assert!(path.exists());
    }
}

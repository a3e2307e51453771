//! The schema's history: one list of migrations ([`MIGRATIONS`]), each a directory
//! `migrations/<version>_<name>/` holding its SQLite and its PostgreSQL DDL side by side (`sqlite.sql`,
//! `postgres.sql`). Adding a migration is one entry here and those two files.
//!
//! Both databases record applied migrations in sqlx's `_sqlx_migrations` table by version and SHA-384
//! checksum of the text, and sqlx refuses to run against a database whose applied text differs. So a
//! released file is never edited, not even a comment (some still name the pre-merge paths
//! `migrations/{sqlite,postgres}/…`): a change is a new migration. The tests pin the released checksums.

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

/// One migration: its directory name (`<version>_<name>`) and its DDL for each database.
#[derive(Debug)]
pub(crate) struct Step {
    pub dir: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

macro_rules! step {
    ($dir:literal) => {
        Step {
            dir: $dir,
            sqlite: include_str!(concat!("../migrations/", $dir, "/sqlite.sql")),
            postgres: include_str!(concat!("../migrations/", $dir, "/postgres.sql")),
        }
    };
}

/// Every migration, oldest first.
pub(crate) const MIGRATIONS: &[Step] = &[
    step!("0001_initial"),
    step!("0002_backend_connection"),
    step!("0003_tls"),
    step!("0004_recent_backends"),
    step!("0005_warm_pools"),
    step!("0006_controller_url"),
];

/// Which of a step's two texts a database runs.
pub(crate) type Ddl = fn(&Step) -> &'static str;

/// The migrator of one database. Version and description come from the directory name exactly as sqlx
/// derives them from a file name (`0003_tls.sql`: version 3, description `tls`).
pub(crate) async fn migrator(ddl: Ddl) -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(Source(ddl)).await
}

#[derive(Debug)]
struct Source(Ddl);

impl MigrationSource<'static> for Source {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        Box::pin(async move { migrations(self.0) })
    }
}

fn migrations(ddl: Ddl) -> Result<Vec<Migration>, BoxDynError> {
    MIGRATIONS
        .iter()
        .map(|step| {
            let (version, name) = step
                .dir
                .split_once('_')
                .ok_or_else(|| format!("migration {:?} is not <version>_<name>", step.dir))?;
            Ok(Migration::new(
                version.parse()?,
                Cow::Owned(name.replace('_', " ")),
                MigrationType::Simple,
                Cow::Borrowed(ddl(step)),
                false,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every migration directory is listed, and holds both texts and nothing else: a migration that one
    /// database has and the other lacks fails here (or, if listed, does not compile).
    #[test]
    fn every_migration_has_both_dialects() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut dirs: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        dirs.sort();
        for dir in &dirs {
            let mut files: Vec<String> = std::fs::read_dir(root.join(dir))
                .unwrap()
                .map(|f| f.unwrap().file_name().into_string().unwrap())
                .collect();
            files.sort();
            assert_eq!(files, ["postgres.sql", "sqlite.sql"], "migration {dir}");
        }
        assert_eq!(dirs, MIGRATIONS.iter().map(|s| s.dir).collect::<Vec<_>>());
        let versions: Vec<i64> = migrations(|s| s.sqlite)
            .unwrap()
            .iter()
            .map(|m| m.version)
            .collect();
        assert_eq!(versions, (1..=MIGRATIONS.len() as i64).collect::<Vec<_>>());
    }

    /// What deployed databases recorded (sqlx's `migrate!` of the former `migrations/sqlite` and
    /// `migrations/postgres` directories): a different text of an applied version makes sqlx refuse them.
    #[test]
    fn released_migrations_keep_version_description_and_checksum() {
        let released = [
            (1, "initial", "e3649fd127591735", "880a8c2ca4b64974"),
            (
                2,
                "backend connection",
                "043f1de5c0d10a6d",
                "043f1de5c0d10a6d",
            ),
            (3, "tls", "5cbdff6da982a4c0", "f3003353a90f15a1"),
            (4, "recent backends", "d653f3052e6dc2d0", "8de1440048ba83e4"),
        ];
        let prefix = |m: &Migration| {
            m.checksum[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let (sqlite, postgres) = (
            migrations(|s| s.sqlite).unwrap(),
            migrations(|s| s.postgres).unwrap(),
        );
        for (i, (version, description, sqlite_sum, postgres_sum)) in
            released.into_iter().enumerate()
        {
            for (m, sum) in [(&sqlite[i], sqlite_sum), (&postgres[i], postgres_sum)] {
                assert_eq!((m.version, &*m.description), (version, description));
                assert_eq!(prefix(m), sum, "migration {version}");
            }
        }
    }
}

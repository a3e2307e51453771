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
    use std::collections::BTreeSet;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Every migration directory is listed, and each has both texts (and nothing else): a migration that
    /// one database has and the other lacks fails here.
    #[test]
    fn every_migration_has_both_dialects() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut dirs = BTreeSet::new();
        for entry in std::fs::read_dir(&root).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            assert!(entry.file_type().unwrap().is_dir(), "stray file {name}");
            let files: BTreeSet<String> = std::fs::read_dir(entry.path())
                .unwrap()
                .map(|f| f.unwrap().file_name().into_string().unwrap())
                .collect();
            let both: BTreeSet<String> = ["postgres.sql", "sqlite.sql"].map(String::from).into();
            assert_eq!(files, both, "migration {name}");
            dirs.insert(name);
        }
        let listed: Vec<&str> = MIGRATIONS.iter().map(|s| s.dir).collect();
        assert_eq!(listed, dirs.iter().map(String::as_str).collect::<Vec<_>>());
        let versions: Vec<i64> = migrations(|s| s.sqlite)
            .unwrap()
            .iter()
            .map(|m| m.version)
            .collect();
        assert_eq!(versions, (1..=MIGRATIONS.len() as i64).collect::<Vec<_>>());
    }

    /// Deployed databases recorded these (sqlx's `migrate!` of the former `migrations/sqlite` and
    /// `migrations/postgres` directories); a different text of an applied version makes sqlx refuse them.
    #[test]
    fn released_migrations_keep_their_version_description_and_checksum() {
        let released: [(&str, Ddl, [&str; 4]); 2] = [
            ("sqlite", |s| s.sqlite, [
                "e3649fd127591735829a65aab61c8f313aedab450f17a5e5bdb435a5fa449245dc769a8aa8fa61730e43d99077e102ec",
                "043f1de5c0d10a6da08c2be70abeae9f206a2e1b0a9c864d0f67fabc19e62a034b7e128ca308d19d972f32cdb2606644",
                "5cbdff6da982a4c014a2ee4af13a829ad398c14f6bb92a34cf9ca2ab1e49052b7305de235effac92c14399987b1f60b0",
                "d653f3052e6dc2d003e0cb65020beac2dcd8dc9c864c368f63143c711387b70c2cd4519747cde70d826a17e38a379115",
            ]),
            ("postgres", |s| s.postgres, [
                "880a8c2ca4b6497435a7b6df6923853faacdcf0f6be3a5d84da94f18bd6fc47b74373d003d1f7d234c697191970404bc",
                "043f1de5c0d10a6da08c2be70abeae9f206a2e1b0a9c864d0f67fabc19e62a034b7e128ca308d19d972f32cdb2606644",
                "f3003353a90f15a15aed90710f303b0826356be1ba17455fafc470d445fadb2768be63182fa4d48c510ce7ef44341ee5",
                "8de1440048ba83e4050037d8dea65fd1f20bf5c9e3541ddf673a2dc136fb269d1271614e07ec383a1c5e0816612962e2",
            ]),
        ];
        let descriptions = ["initial", "backend connection", "tls", "recent backends"];
        for (db, ddl, checksums) in released {
            let migrations = migrations(ddl).unwrap();
            for (i, checksum) in checksums.iter().enumerate() {
                let m = &migrations[i];
                assert_eq!(m.version, i as i64 + 1, "{db}");
                assert_eq!(m.description, descriptions[i], "{db}");
                assert_eq!(&hex(&m.checksum), checksum, "{db} migration {}", m.version);
            }
        }
    }
}

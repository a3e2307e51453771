//! Several writes sent to the database in one round trip ([`Chain`]).
//!
//! A cold spawn writes five tables (backend, state history, action, key, token). One statement each
//! is one round trip each: to the server for PostgreSQL, to the connection's thread for SQLite (sqlx
//! runs every SQLite connection on a thread of its own). A chain sends them as one: PostgreSQL runs
//! the parts as one statement, each part a data-modifying `WITH` query (they all run, in one
//! snapshot); SQLite runs them as one script, part after part, on the connection's thread. A chain
//! of one part is sent as that statement. Either way a failing part fails the whole call with that
//! part's error (a constraint violation names its constraint, so
//! [`crate::dialect::Dialect::violates`] still tells the refusals apart); inside a transaction, the
//! caller rolls back.
//!
//! Parameters are numbered across the whole chain: [`Chain::bind`] hands out the numbers, and each
//! part's text uses the numbers its values got. A chain made [`Chain::with_clock`] binds the store
//! clock as `$1`, which `{now}` reads. At most one part returns rows ([`Chain::push_returning`]);
//! they are the call's rows. Parts must not depend on each other's rows (PostgreSQL's parts see the
//! snapshot from before the statement).

use super::rows::Row;
use super::{Db, D};
use crate::dialect::{render, Dialect};
use crate::{StoreError, StoreResult};
use sqlx::{Arguments, Database, Encode, Type};

pub(super) struct Chain<'q> {
    parts: Vec<String>,
    /// The index in `parts` of the part whose rows are returned.
    returning: Option<usize>,
    args: <Db as Database>::Arguments<'q>,
    bound: usize,
}

impl<'q> Chain<'q> {
    /// An empty chain; its parts must not read `{now}`.
    pub(super) fn new() -> Self {
        Chain {
            parts: Vec::new(),
            returning: None,
            args: Default::default(),
            bound: 0,
        }
    }

    /// An empty chain with the store clock bound as `$1`, for parts that read `{now}`.
    pub(super) fn with_clock(clock: i64) -> StoreResult<Self> {
        let mut chain = Chain::new();
        chain.bind(clock)?;
        Ok(chain)
    }

    /// Binds `value` as the next parameter and returns its number (`$n` in a part's text).
    pub(super) fn bind<T>(&mut self, value: T) -> StoreResult<usize>
    where
        T: Encode<'q, Db> + Type<Db> + Send + 'q,
    {
        self.args
            .add(value)
            .map_err(|e| StoreError::Corrupt(format!("a value could not be bound: {e}")))?;
        self.bound += 1;
        Ok(self.bound)
    }

    /// Adds a write (shared SQL: markers are rendered here) that returns no rows.
    pub(super) fn push(&mut self, template: &str) {
        self.parts.push(render::<D>(template));
    }

    /// Adds the one write whose `RETURNING` rows the chain returns.
    pub(super) fn push_returning(&mut self, template: &str) -> StoreResult<()> {
        if self.returning.is_some() {
            return Err(StoreError::Corrupt(
                "a chain of writes returns the rows of one part only".into(),
            ));
        }
        self.returning = Some(self.parts.len());
        self.push(template);
        Ok(())
    }

    /// The chain as one text for this database (a lone part as it is).
    fn text(&self) -> String {
        if !D::SPELLING.modifying_ctes || self.parts.len() == 1 {
            return self.parts.join(";\n");
        }
        let parts: Vec<String> = self
            .parts
            .iter()
            .enumerate()
            .map(|(i, part)| format!("w{i} AS ({part})"))
            .collect();
        let rows = match self.returning {
            Some(i) => format!("SELECT * FROM w{i}"),
            None => "SELECT 1 WHERE false".to_string(),
        };
        format!("WITH {} {rows}", parts.join(", "))
    }

    /// Runs every part, in one round trip; returns the rows of the returning part (none without one).
    pub(super) async fn run<'c, E>(self, executor: E) -> Result<Vec<Row>, sqlx::Error>
    where
        E: sqlx::Executor<'c, Database = Db>,
    {
        if self.parts.is_empty() {
            return Ok(Vec::new());
        }
        let text = self.text();
        sqlx::query_with(&text, self.args).fetch_all(executor).await
    }
}

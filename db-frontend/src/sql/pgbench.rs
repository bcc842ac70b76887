//! pgbench's tables, built straight into a store (what `pgbench -i`
//! makes, without its `COPY` and `ALTER TABLE`, which the engine lacks).
//!
//! The tables are those of PostgreSQL 15's `pgbench -i`, with the primary
//! keys it adds afterwards declared inline:
//!
//! ```sql
//! CREATE TABLE pgbench_branches (bid INT NOT NULL PRIMARY KEY, bbalance INT, filler CHAR(88));
//! CREATE TABLE pgbench_tellers (tid INT NOT NULL PRIMARY KEY, bid INT, tbalance INT, filler CHAR(84));
//! CREATE TABLE pgbench_accounts (aid INT NOT NULL PRIMARY KEY, bid INT, abalance INT, filler CHAR(84));
//! CREATE TABLE pgbench_history (tid INT, bid INT, aid INT, delta INT, mtime TIMESTAMP, filler CHAR(22));
//! ```
//!
//! and the same rows: scale × 1 branch, 10 tellers and 100 000 accounts,
//! balances 0, an account's filler 84 blanks (pgbench loads `''` into a
//! `char(84)`), other fillers NULL. Rows go in batches of
//! [`LOAD_BATCH_ROWS`], one transaction each, so no transaction grows
//! past what a real store takes.

use super::catalog;
use super::encoding::{encode_key, encode_row};
use super::error::{SqlError, SqlResult};
use super::exec::Outcome;
use super::kv::{KvStore, KvTxn};
use super::session::Session;
use super::types::{Table, Value};

/// Branches per unit of scale.
pub const BRANCHES_PER_SCALE: u64 = 1;
/// Tellers per branch.
pub const TELLERS_PER_BRANCH: u64 = 10;
/// Accounts per branch.
pub const ACCOUNTS_PER_BRANCH: u64 = 100_000;
/// Rows per loading transaction.
pub const LOAD_BATCH_ROWS: u64 = 5_000;
/// The blank filler of an account row (`char(84)` holding `''`).
const ACCOUNT_FILLER_BYTES: usize = 84;

/// The DDL: drops and recreates the four tables.
pub const PGBENCH_SCHEMA: &str = "\
DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers;
CREATE TABLE pgbench_branches (bid INT NOT NULL PRIMARY KEY, bbalance INT, filler CHAR(88));
CREATE TABLE pgbench_tellers (tid INT NOT NULL PRIMARY KEY, bid INT, tbalance INT, filler CHAR(84));
CREATE TABLE pgbench_accounts (aid INT NOT NULL PRIMARY KEY, bid INT, abalance INT, filler CHAR(84));
CREATE TABLE pgbench_history (tid INT, bid INT, aid INT, delta INT, mtime TIMESTAMP, filler CHAR(22));";

/// How many rows of each table were loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgbenchCounts {
    pub branches: u64,
    pub tellers: u64,
    pub accounts: u64,
}

/// Builds the pgbench tables for scale factor `scale` in `store`,
/// replacing any that exist.
pub async fn init_pgbench<S: KvStore>(store: &S, scale: u32) -> SqlResult<PgbenchCounts> {
    init_pgbench_sized(store, scale, ACCOUNTS_PER_BRANCH).await
}

/// [`init_pgbench`] with a different number of accounts per branch (for
/// quick tests; pgbench itself needs [`ACCOUNTS_PER_BRANCH`] to pick
/// valid account ids).
pub async fn init_pgbench_sized<S: KvStore>(
    store: &S,
    scale: u32,
    accounts_per_branch: u64,
) -> SqlResult<PgbenchCounts> {
    let mut session = Session::new(store.clone());
    for result in session.execute_sql(PGBENCH_SCHEMA).await {
        result?;
    }
    let branches = u64::from(scale) * BRANCHES_PER_SCALE;
    let counts =
        PgbenchCounts { branches, tellers: branches * TELLERS_PER_BRANCH, accounts: branches * accounts_per_branch };
    let mut txn = store.begin().await?;
    let tables = [
        catalog::require_table(&mut txn, "pgbench_branches").await?,
        catalog::require_table(&mut txn, "pgbench_tellers").await?,
        catalog::require_table(&mut txn, "pgbench_accounts").await?,
    ];
    txn.rollback().await?;
    let [branch_table, teller_table, account_table] = &tables;
    load(store, branch_table, counts.branches, |bid| Ok(vec![int(bid)?, Value::Int(0), Value::Null])).await?;
    load(store, teller_table, counts.tellers, |tid| {
        Ok(vec![int(tid)?, int((tid - 1) / TELLERS_PER_BRANCH + 1)?, Value::Int(0), Value::Null])
    })
    .await?;
    let filler = " ".repeat(ACCOUNT_FILLER_BYTES);
    load(store, account_table, counts.accounts, |aid| {
        Ok(vec![int(aid)?, int((aid - 1) / accounts_per_branch + 1)?, Value::Int(0), Value::Text(filler.clone())])
    })
    .await?;
    Ok(counts)
}

fn int(number: u64) -> SqlResult<Value> {
    i32::try_from(number).map(Value::Int).map_err(|_| SqlError::out_of_range("integer"))
}

/// Writes rows 1..=count of `table` (keyed by their first column), in
/// batches of [`LOAD_BATCH_ROWS`].
async fn load<S, F>(store: &S, table: &Table, count: u64, row: F) -> SqlResult<Outcome>
where
    S: KvStore,
    F: Fn(u64) -> Result<Vec<Value>, SqlError> + Send,
{
    let mut next = 1;
    while next <= count {
        let last = count.min(next + LOAD_BATCH_ROWS - 1);
        let mut txn = store.begin().await?;
        for id in next..=last {
            let values = row(id)?;
            txn.put(table.tree, &encode_key(&values[..1]), &encode_row(&values)).await?;
        }
        txn.commit().await?;
        next = last + 1;
    }
    Ok(Outcome::Inserted(usize::try_from(count).unwrap_or(usize::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::kv::MemoryKv;

    #[tokio::test]
    async fn the_tables_have_pgbench_rows_and_answer_its_queries() {
        let store = MemoryKv::default();
        let counts = init_pgbench_sized(&store, 2, 1_000).await.unwrap();
        assert_eq!(counts, PgbenchCounts { branches: 2, tellers: 20, accounts: 2_000 });
        let mut session = Session::new(store.clone());
        let script = "select count(*) from pgbench_branches; \
            SELECT count(*), sum(abalance), max(bid) FROM pgbench_accounts; \
            BEGIN; \
            UPDATE pgbench_accounts SET abalance = abalance + -17 WHERE aid = 1500; \
            SELECT abalance FROM pgbench_accounts WHERE aid = 1500; \
            UPDATE pgbench_tellers SET tbalance = tbalance + -17 WHERE tid = 13; \
            UPDATE pgbench_branches SET bbalance = bbalance + -17 WHERE bid = 2; \
            INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (13, 2, 1500, -17, CURRENT_TIMESTAMP); \
            END; \
            vacuum pgbench_branches; truncate pgbench_history;";
        let results: Vec<Outcome> = session.execute_sql(script).await.into_iter().map(Result::unwrap).collect();
        let first = |outcome: &Outcome| match outcome {
            Outcome::Rows { rows, .. } => rows[0].clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(first(&results[0]), vec![Value::BigInt(2)]);
        assert_eq!(first(&results[1]), vec![Value::BigInt(2_000), Value::BigInt(0), Value::Int(2)]);
        assert_eq!(first(&results[4]), vec![Value::Int(-17)]);
        assert_eq!(results[7], Outcome::Inserted(1));
        assert_eq!(results[8], Outcome::Commit);
        assert_eq!(results[10], Outcome::Command("TRUNCATE TABLE"));
        // Running it again replaces the tables.
        init_pgbench_sized(&store, 1, 10).await.unwrap();
        let recount = session.execute_sql("SELECT count(*) FROM pgbench_accounts").await.remove(0).unwrap();
        assert_eq!(first(&recount), vec![Value::BigInt(10)]);
    }
}

//! The catalog: every table's schema, kept in [`CATALOG_TREE`].
//!
//! One entry per table: key `'T'` + the table name, value the record
//! [`encoding::encode_table`] writes (tree, columns, primary key, next
//! hidden row id). Everything lives in the store, read through the
//! current transaction, so a restarted store finds every table, and a
//! rolled-back `CREATE TABLE` leaves no trace. There is no cache: a
//! statement reads the schemas it names (one `get` each), which keeps
//! the catalog trivially consistent with the single-writer transactions.

use std::ops::Bound;

use super::encoding::{self, CATALOG_TABLE_PREFIX};
use super::error::{SqlError, SqlResult, sqlstate};
use super::kv::{CATALOG_TREE, KvTxn};
use super::types::{Column, Table};

/// The schema of table `name`, if it exists.
pub async fn get_table<T: KvTxn>(txn: &mut T, name: &str) -> SqlResult<Option<Table>> {
    match txn.get(CATALOG_TREE, &encoding::catalog_key(name)).await? {
        Some(bytes) => Ok(Some(encoding::decode_table(name, &bytes)?)),
        None => Ok(None),
    }
}

/// The schema of table `name`, or `42P01`.
pub async fn require_table<T: KvTxn>(txn: &mut T, name: &str) -> SqlResult<Table> {
    get_table(txn, name).await?.ok_or_else(|| undefined_table(name))
}

/// The `42P01` error for `name`.
pub fn undefined_table(name: &str) -> SqlError {
    SqlError::new(sqlstate::UNDEFINED_TABLE, format!("relation \"{name}\" does not exist"))
}

/// Writes (or rewrites) a table's record.
pub async fn put_table<T: KvTxn>(txn: &mut T, table: &Table) -> SqlResult<()> {
    txn.put(CATALOG_TREE, &encoding::catalog_key(&table.name), &encoding::encode_table(table)).await?;
    Ok(())
}

/// Creates a table: a new tree for its rows and its catalog record.
/// `Ok(None)` when it exists and `if_not_exists` is set; `42P07` when it
/// exists otherwise.
pub async fn create_table<T: KvTxn>(
    txn: &mut T,
    name: &str,
    columns: Vec<Column>,
    primary_key: Vec<usize>,
    if_not_exists: bool,
) -> SqlResult<Option<Table>> {
    if get_table(txn, name).await?.is_some() {
        if if_not_exists {
            return Ok(None);
        }
        return Err(SqlError::new(sqlstate::DUPLICATE_TABLE, format!("relation \"{name}\" already exists")));
    }
    let tree = txn.create_tree().await?;
    let table = Table { name: name.to_owned(), tree, columns, primary_key, next_row_id: 1 };
    put_table(txn, &table).await?;
    Ok(Some(table))
}

/// Drops table `name` and its rows. `Ok(false)` when it does not exist
/// and `if_exists` is set; `42P01` when it does not exist otherwise.
pub async fn drop_table<T: KvTxn>(txn: &mut T, name: &str, if_exists: bool) -> SqlResult<bool> {
    let Some(table) = get_table(txn, name).await? else {
        return if if_exists { Ok(false) } else { Err(undefined_table(name)) };
    };
    txn.drop_tree(table.tree).await?;
    txn.delete(CATALOG_TREE, &encoding::catalog_key(name)).await?;
    Ok(true)
}

/// Every table, by name.
pub async fn list_tables<T: KvTxn>(txn: &mut T) -> SqlResult<Vec<Table>> {
    let start = Bound::Included(vec![CATALOG_TABLE_PREFIX]);
    let end = Bound::Excluded(vec![CATALOG_TABLE_PREFIX + 1]);
    let entries = txn.scan(CATALOG_TREE, start, end, None).await?;
    entries
        .into_iter()
        .map(|(key, value)| {
            let name = std::str::from_utf8(&key[1..]).map_err(|_| SqlError::corrupt("catalog key"))?;
            encoding::decode_table(name, &value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::kv::{KvStore, MemoryKv};
    use crate::sql::types::DataType;

    #[tokio::test]
    async fn tables_survive_in_the_store_and_names_are_unique() {
        let store = MemoryKv::default();
        let mut txn = store.begin().await.unwrap();
        let columns = vec![Column { name: "id".into(), data_type: DataType::Int, not_null: true }];
        let created = create_table(&mut txn, "t", columns.clone(), vec![0], false).await.unwrap().unwrap();
        assert_eq!(create_table(&mut txn, "t", columns.clone(), vec![0], true).await, Ok(None));
        let duplicate = create_table(&mut txn, "t", columns, vec![0], false).await.unwrap_err();
        assert_eq!(duplicate.code, sqlstate::DUPLICATE_TABLE);
        txn.commit().await.unwrap();

        let mut txn = store.begin().await.unwrap();
        assert_eq!(require_table(&mut txn, "t").await.unwrap(), created);
        assert_eq!(list_tables(&mut txn).await.unwrap(), vec![created]);
        assert!(drop_table(&mut txn, "t", false).await.unwrap());
        assert!(!drop_table(&mut txn, "t", true).await.unwrap());
        assert_eq!(require_table(&mut txn, "t").await.unwrap_err().code, sqlstate::UNDEFINED_TABLE);
    }
}

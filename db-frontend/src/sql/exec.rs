//! The executor: runs a [`Plan`] inside one [`KvTxn`].
//!
//! Reads follow the plan's [`Access`]: a lookup is one `get`, a range or
//! a full scan is a series of `scan` calls of at most
//! [`SCAN_BATCH_ROWS`] entries, each resuming after the last key seen,
//! so no single storage call is unbounded. Every row the access path
//! yields is decoded and run through the whole filter.
//!
//! A SELECT then aggregates, or sorts, skips OFFSET rows, stops at
//! LIMIT, and projects. Without ORDER BY or aggregates the scan itself
//! stops once OFFSET + LIMIT rows have matched.
//!
//! UPDATE and DELETE first collect the matching rows, then change them:
//! a row moved by an update is never seen twice, and a key-changing
//! update is a delete plus an insert that checks the new key is free.
//! Statement atomicity comes from the caller: on any error it rolls the
//! transaction back.

use std::cmp::Ordering;
use std::ops::Bound;

use super::catalog;
use super::encoding::{self, decode_row, encode_key, encode_row, prefix_end};
use super::error::{SqlError, SqlResult, sqlstate};
use super::expr::{Context, Expr};
use super::kv::KvTxn;
use super::plan::{Access, Aggregate, AggregateFunction, OutputColumn, Plan, SelectPlan};
use super::types::{DataType, Table, Value, parse_text};

/// A range of encoded keys, as `KvTxn::scan` takes it.
type KeyRange = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// The most entries one `scan` call asks the store for.
pub const SCAN_BATCH_ROWS: usize = 1024;

/// What a statement did.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A result set: SELECT and SHOW.
    Rows {
        columns: Vec<OutputColumn>,
        rows: Vec<Vec<Value>>,
    },
    Inserted(usize),
    Updated(usize),
    Deleted(usize),
    /// A command without a row count (`CREATE TABLE`, `SET`, ...), by tag.
    Command(&'static str),
    Begin,
    Commit,
    /// Also what COMMIT of a failed transaction block reports.
    Rollback,
}

impl Outcome {
    /// The PostgreSQL command tag: `INSERT 0 3`, `UPDATE 1`, `SELECT 2`.
    pub fn tag(&self) -> String {
        match self {
            Outcome::Rows { rows, .. } => format!("SELECT {}", rows.len()),
            Outcome::Inserted(count) => format!("INSERT 0 {count}"),
            Outcome::Updated(count) => format!("UPDATE {count}"),
            Outcome::Deleted(count) => format!("DELETE {count}"),
            Outcome::Command(tag) => (*tag).to_owned(),
            Outcome::Begin => "BEGIN".to_owned(),
            Outcome::Commit => "COMMIT".to_owned(),
            Outcome::Rollback => "ROLLBACK".to_owned(),
        }
    }
}

/// Runs a plan that needs no store (SELECT without FROM, SHOW, SET,
/// VACUUM); `None` for one that does.
pub fn execute_storeless(plan: &Plan, columns: &[OutputColumn], params: &[Value]) -> Option<SqlResult<Outcome>> {
    match plan {
        Plan::Select(select) if select.source.is_none() => Some(finish_select(select, columns, vec![vec![]], params)),
        Plan::Show { value, .. } => {
            Some(Ok(Outcome::Rows { columns: columns.to_vec(), rows: vec![vec![Value::Text(value.clone())]] }))
        }
        Plan::Ignored { tag } => Some(Ok(Outcome::Command(tag))),
        _ => None,
    }
}

/// Runs a plan in `txn`. Transaction control (BEGIN, COMMIT, ROLLBACK)
/// belongs to the session and is refused here.
pub async fn execute<T: KvTxn>(
    txn: &mut T,
    plan: &Plan,
    columns: &[OutputColumn],
    params: &[Value],
) -> SqlResult<Outcome> {
    if let Some(outcome) = execute_storeless(plan, columns, params) {
        return outcome;
    }
    match plan {
        Plan::CreateTable { name, columns, primary_key, if_not_exists } => {
            catalog::create_table(txn, name, columns.clone(), primary_key.clone(), *if_not_exists).await?;
            Ok(Outcome::Command("CREATE TABLE"))
        }
        Plan::DropTable { names, if_exists } => {
            for name in names {
                catalog::drop_table(txn, name, *if_exists).await?;
            }
            Ok(Outcome::Command("DROP TABLE"))
        }
        Plan::Truncate { tables } => {
            for table in tables {
                // A fresh tree is cheaper than deleting row by row.
                txn.drop_tree(table.tree).await?;
                let tree = txn.create_tree().await?;
                catalog::put_table(txn, &Table { tree, ..table.clone() }).await?;
            }
            Ok(Outcome::Command("TRUNCATE TABLE"))
        }
        Plan::Insert { table, rows } => insert(txn, table, rows, params).await,
        Plan::Update { table, access, filter, assignments } => {
            update(txn, table, access, filter.as_ref(), assignments, params).await
        }
        Plan::Delete { table, access, filter } => {
            let rows = read(txn, table, access, filter.as_ref(), params, None).await?;
            for (key, _) in &rows {
                txn.delete(table.tree, key).await?;
            }
            Ok(Outcome::Deleted(rows.len()))
        }
        Plan::Select(select) => {
            let Some((table, access)) = &select.source else {
                return Err(SqlError::new(sqlstate::INTERNAL_ERROR, "storeless select reached the store"));
            };
            let cap = if select.aggregates.is_empty() && select.order_by.is_empty() {
                match (&select.limit, &select.offset) {
                    (Some(limit), offset) => {
                        let limit = count(limit, params, "LIMIT")?;
                        let offset = offset.as_ref().map(|offset| count(offset, params, "OFFSET")).transpose()?;
                        limit.map(|limit| limit.saturating_add(offset.flatten().unwrap_or(0)))
                    }
                    (None, _) => None,
                }
            } else {
                None
            };
            let rows = read(txn, table, access, select.filter.as_ref(), params, cap).await?;
            finish_select(select, columns, rows.into_iter().map(|(_, row)| row).collect(), params)
        }
        Plan::Begin | Plan::Commit | Plan::Rollback => {
            Err(SqlError::new(sqlstate::INTERNAL_ERROR, "transaction control reached the executor"))
        }
        Plan::Show { .. } | Plan::Ignored { .. } => {
            Err(SqlError::new(sqlstate::INTERNAL_ERROR, "storeless plan reached the store"))
        }
    }
}

fn context<'a>(row: &'a [Value], params: &'a [Value]) -> Context<'a> {
    Context { row, params, aggregates: &[] }
}

/// A LIMIT or OFFSET value: `None` for NULL (no limit).
fn count(expr: &Expr, params: &[Value], clause: &str) -> SqlResult<Option<usize>> {
    match expr.eval(&context(&[], params))? {
        Value::Null => Ok(None),
        value => {
            let number = match value {
                Value::Text(text) => parse_text(&text, DataType::BigInt)?.as_i64(),
                other => other.as_i64(),
            }
            .ok_or_else(|| SqlError::new(sqlstate::DATATYPE_MISMATCH, format!("{clause} must be an integer")))?;
            if number < 0 {
                let code = if clause == "LIMIT" {
                    sqlstate::INVALID_ROW_COUNT_IN_LIMIT
                } else {
                    sqlstate::INVALID_ROW_COUNT_IN_OFFSET
                };
                return Err(SqlError::new(code, format!("{clause} must not be negative")));
            }
            Ok(Some(usize::try_from(number).unwrap_or(usize::MAX)))
        }
    }
}

/// A key value converted to the key column's type, so that it encodes
/// like the stored keys; `None` for NULL, which matches no key.
fn key_value(value: Value, data_type: DataType) -> SqlResult<Option<Value>> {
    match (value, data_type) {
        (Value::Null, _) => Ok(None),
        // Both integer widths encode as i64: no range check needed, and
        // an INT key never equals an out-of-range BIGINT anyway.
        (Value::Int(number), DataType::Int | DataType::BigInt) => Ok(Some(Value::BigInt(i64::from(number)))),
        (value @ Value::BigInt(_), DataType::Int | DataType::BigInt) => Ok(Some(value)),
        (Value::Text(text), DataType::Int | DataType::BigInt) => Ok(Some(parse_text(&text, DataType::BigInt)?)),
        (value, data_type) => value.coerce_to(data_type).map(Some),
    }
}

/// The encoded key for these key-column values; `None` if one is NULL.
fn encode_key_values(table: &Table, values: Vec<Value>) -> SqlResult<Option<Vec<u8>>> {
    let mut normalized = Vec::with_capacity(values.len());
    for (value, &column) in values.into_iter().zip(&table.primary_key) {
        match key_value(value, table.columns[column].data_type)? {
            Some(value) => normalized.push(value),
            None => return Ok(None),
        }
    }
    Ok(Some(encode_key(&normalized)))
}

/// The rows an access path yields that pass the filter, with their keys;
/// at most `cap` of them.
async fn read<T: KvTxn>(
    txn: &mut T,
    table: &Table,
    access: &Access,
    filter: Option<&Expr>,
    params: &[Value],
    cap: Option<usize>,
) -> SqlResult<Vec<(Vec<u8>, Vec<Value>)>> {
    let cap = cap.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    if cap == 0 {
        return Ok(out);
    }
    let keep = |row: &[Value]| filter.map_or(Ok(true), |filter| filter.matches(&context(row, params)));
    let (mut start, end) = match access {
        Access::Lookup(values) => {
            let values = values.iter().map(|value| value.eval(&context(&[], params))).collect::<SqlResult<_>>()?;
            let Some(key) = encode_key_values(table, values)? else {
                return Ok(out);
            };
            if let Some(bytes) = txn.get(table.tree, &key).await? {
                let row = decode_row(&bytes, &table.columns)?;
                if keep(&row)? {
                    out.push((key, row));
                }
            }
            return Ok(out);
        }
        Access::Range { start, end } => match range_bounds(table, start.as_ref(), end.as_ref(), params)? {
            Some(bounds) => bounds,
            None => return Ok(out),
        },
        Access::FullScan => (Bound::Unbounded, Bound::Unbounded),
    };
    loop {
        // Never ask for more than the cap still allows.
        let wanted = SCAN_BATCH_ROWS.min(cap - out.len());
        let batch = txn.scan(table.tree, start.clone(), end.clone(), Some(wanted)).await?;
        let full = batch.len() == wanted;
        let mut last = None;
        for (key, bytes) in batch {
            let row = decode_row(&bytes, &table.columns)?;
            if keep(&row)? {
                out.push((key.clone(), row));
                if out.len() >= cap {
                    return Ok(out);
                }
            }
            last = Some(key);
        }
        match (full, last) {
            (true, Some(last)) => start = Bound::Excluded(last),
            _ => return Ok(out),
        }
    }
}

/// The key range for bounds on the first key column; `None` when it is
/// empty (a NULL bound). With a composite key, the first column's
/// encoding is a prefix of each key, so inclusive and exclusive bounds
/// become prefix bounds (see `docs/sql-format.md`).
fn range_bounds(
    table: &Table,
    start: Option<&(Expr, bool)>,
    end: Option<&(Expr, bool)>,
    params: &[Value],
) -> SqlResult<Option<KeyRange>> {
    let composite = table.primary_key.len() > 1;
    let Some(&first) = table.primary_key.first() else {
        return Err(SqlError::new(sqlstate::INTERNAL_ERROR, "a key range over a table without a primary key"));
    };
    let first_type = table.columns[first].data_type;
    let encode = |expr: &Expr| -> SqlResult<Option<Vec<u8>>> {
        let value = expr.eval(&context(&[], params))?;
        Ok(key_value(value, first_type)?.map(|value| encode_key(&[value])))
    };
    let start = match start {
        None => Bound::Unbounded,
        Some((expr, inclusive)) => {
            let Some(prefix) = encode(expr)? else { return Ok(None) };
            match (composite, inclusive) {
                (false, true) | (true, true) => Bound::Included(prefix),
                (false, false) => Bound::Excluded(prefix),
                (true, false) => match prefix_end(&prefix) {
                    Some(after) => Bound::Included(after),
                    None => return Ok(None),
                },
            }
        }
    };
    let end = match end {
        None => Bound::Unbounded,
        Some((expr, inclusive)) => {
            let Some(prefix) = encode(expr)? else { return Ok(None) };
            match (composite, inclusive) {
                (false, true) => Bound::Included(prefix),
                (_, false) => Bound::Excluded(prefix),
                (true, true) => prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded),
            }
        }
    };
    Ok(Some((start, end)))
}

fn not_null_violation(table: &Table, column: usize) -> SqlError {
    SqlError::new(
        sqlstate::NOT_NULL_VIOLATION,
        format!(
            "null value in column \"{}\" of relation \"{}\" violates not-null constraint",
            table.columns[column].name, table.name
        ),
    )
}

fn unique_violation(table: &Table) -> SqlError {
    SqlError::new(
        sqlstate::UNIQUE_VIOLATION,
        format!("duplicate key value violates unique constraint \"{}_pkey\"", table.name),
    )
}

/// Converts evaluated values to the column types and checks NOT NULL.
fn conform(table: &Table, row: Vec<Value>) -> SqlResult<Vec<Value>> {
    row.into_iter()
        .zip(&table.columns)
        .enumerate()
        .map(|(index, (value, column))| {
            let value = value.coerce_to(column.data_type)?;
            if value.is_null() && column.not_null {
                return Err(not_null_violation(table, index));
            }
            Ok(value)
        })
        .collect()
}

fn primary_key_of(table: &Table, row: &[Value]) -> SqlResult<Vec<u8>> {
    let values = table.primary_key.iter().map(|&index| row[index].clone()).collect();
    // conform() has rejected NULL keys already.
    encode_key_values(table, values)?.ok_or_else(|| SqlError::new(sqlstate::NOT_NULL_VIOLATION, "null key"))
}

async fn insert<T: KvTxn>(txn: &mut T, table: &Table, rows: &[Vec<Expr>], params: &[Value]) -> SqlResult<Outcome> {
    let mut table = table.clone();
    for exprs in rows {
        let values = exprs.iter().map(|expr| expr.eval(&context(&[], params))).collect::<SqlResult<Vec<_>>>()?;
        let row = conform(&table, values)?;
        let key = if table.has_hidden_key() {
            let row_id = table.next_row_id;
            table.next_row_id += 1;
            encoding::encode_row_id(row_id)
        } else {
            let key = primary_key_of(&table, &row)?;
            if txn.get(table.tree, &key).await?.is_some() {
                return Err(unique_violation(&table));
            }
            key
        };
        txn.put(table.tree, &key, &encode_row(&row)).await?;
    }
    if table.has_hidden_key() && !rows.is_empty() {
        catalog::put_table(txn, &table).await?;
    }
    Ok(Outcome::Inserted(rows.len()))
}

async fn update<T: KvTxn>(
    txn: &mut T,
    table: &Table,
    access: &Access,
    filter: Option<&Expr>,
    assignments: &[(usize, Expr)],
    params: &[Value],
) -> SqlResult<Outcome> {
    let rows = read(txn, table, access, filter, params, None).await?;
    let moves_key = assignments.iter().any(|(index, _)| table.primary_key.contains(index));
    for (key, old) in &rows {
        let mut new = old.clone();
        for (index, expr) in assignments {
            new[*index] = expr.eval(&context(old, params))?;
        }
        let new = conform(table, new)?;
        let bytes = encode_row(&new);
        let new_key = if moves_key { primary_key_of(table, &new)? } else { key.clone() };
        if new_key != *key {
            if txn.get(table.tree, &new_key).await?.is_some() {
                return Err(unique_violation(table));
            }
            txn.delete(table.tree, key).await?;
        }
        txn.put(table.tree, &new_key, &bytes).await?;
    }
    Ok(Outcome::Updated(rows.len()))
}

/// One aggregate's running state.
#[derive(Debug)]
enum Accumulator {
    Count(i64),
    Sum(Option<i64>),
    Extreme(Option<Value>),
}

impl Accumulator {
    fn new(aggregate: &Aggregate) -> Accumulator {
        match aggregate.function {
            AggregateFunction::Count => Accumulator::Count(0),
            AggregateFunction::Sum => Accumulator::Sum(None),
            AggregateFunction::Min | AggregateFunction::Max => Accumulator::Extreme(None),
        }
    }

    fn add(&mut self, aggregate: &Aggregate, row: &[Value], params: &[Value]) -> SqlResult<()> {
        let value = match &aggregate.argument {
            None => Value::Bool(true), // COUNT(*) counts every row
            Some(argument) => argument.eval(&context(row, params))?,
        };
        if value.is_null() {
            return Ok(());
        }
        match self {
            Accumulator::Count(count) => *count += 1,
            Accumulator::Sum(sum) => {
                let number = value.as_i64().unwrap_or_default();
                *sum = Some(sum.unwrap_or(0).checked_add(number).ok_or_else(|| SqlError::out_of_range("bigint"))?);
            }
            Accumulator::Extreme(extreme) => {
                let wanted =
                    if aggregate.function == AggregateFunction::Min { Ordering::Less } else { Ordering::Greater };
                let replace = match extreme {
                    None => true,
                    Some(current) => value.compare(current) == Some(wanted),
                };
                if replace {
                    *extreme = Some(value);
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> Value {
        match self {
            Accumulator::Count(count) => Value::BigInt(count),
            Accumulator::Sum(sum) => sum.map_or(Value::Null, Value::BigInt),
            Accumulator::Extreme(extreme) => extreme.unwrap_or(Value::Null),
        }
    }
}

/// Filters (for a SELECT without FROM), aggregates or sorts, applies
/// OFFSET and LIMIT, and projects.
fn finish_select(
    select: &SelectPlan,
    columns: &[OutputColumn],
    mut rows: Vec<Vec<Value>>,
    params: &[Value],
) -> SqlResult<Outcome> {
    if select.source.is_none()
        && let Some(filter) = &select.filter
    {
        let mut kept = Vec::with_capacity(rows.len());
        for row in rows {
            if filter.matches(&context(&row, params))? {
                kept.push(row);
            }
        }
        rows = kept;
    }
    let offset =
        select.offset.as_ref().map(|offset| count(offset, params, "OFFSET")).transpose()?.flatten().unwrap_or(0);
    let limit = select.limit.as_ref().map(|limit| count(limit, params, "LIMIT")).transpose()?.flatten();
    let take = |rows: Vec<Vec<Value>>| rows.into_iter().skip(offset).take(limit.unwrap_or(usize::MAX));
    let mut output = Vec::new();
    if !select.aggregates.is_empty() {
        let mut accumulators: Vec<Accumulator> = select.aggregates.iter().map(Accumulator::new).collect();
        for row in &rows {
            for (accumulator, aggregate) in accumulators.iter_mut().zip(&select.aggregates) {
                accumulator.add(aggregate, row, params)?;
            }
        }
        let results: Vec<Value> = accumulators.into_iter().map(Accumulator::finish).collect();
        let context = Context { row: &[], params, aggregates: &results };
        let row = select.projection.iter().map(|expr| expr.eval(&context)).collect::<SqlResult<Vec<_>>>()?;
        output.extend(take(vec![row]));
    } else {
        if !select.order_by.is_empty() {
            let mut keyed = Vec::with_capacity(rows.len());
            for row in rows {
                let keys = select
                    .order_by
                    .iter()
                    .map(|key| key.expr.eval(&context(&row, params)))
                    .collect::<SqlResult<Vec<_>>>()?;
                keyed.push((keys, row));
            }
            keyed.sort_by(|(left, _), (right, _)| {
                for ((left, right), key) in left.iter().zip(right).zip(&select.order_by) {
                    let ordering = match (left.is_null(), right.is_null()) {
                        (true, true) => Ordering::Equal,
                        (true, false) => {
                            if key.nulls_first {
                                Ordering::Less
                            } else {
                                Ordering::Greater
                            }
                        }
                        (false, true) => {
                            if key.nulls_first {
                                Ordering::Greater
                            } else {
                                Ordering::Less
                            }
                        }
                        (false, false) => {
                            let ordering = left.sort_cmp(right);
                            if key.descending { ordering.reverse() } else { ordering }
                        }
                    };
                    if ordering != Ordering::Equal {
                        return ordering;
                    }
                }
                Ordering::Equal
            });
            rows = keyed.into_iter().map(|(_, row)| row).collect();
        }
        for row in take(rows) {
            output.push(
                select.projection.iter().map(|expr| expr.eval(&context(&row, params))).collect::<SqlResult<_>>()?,
            );
        }
    }
    // Give each value exactly its column's declared type (an INT inside
    // a BIGINT column of a result, for instance).
    for row in &mut output {
        for (value, column) in row.iter_mut().zip(columns) {
            if value.data_type().is_some_and(|data_type| data_type != column.data_type) {
                *value = super::expr::cast(std::mem::replace(value, Value::Null), column.data_type)?;
            }
        }
    }
    Ok(Outcome::Rows { columns: columns.to_vec(), rows: output })
}

//! The planner: a parsed statement and the schemas it names become a
//! [`Plan`], type-checked, with parameter types worked out.
//!
//! Planning is pure. The caller reads the schemas of the tables a
//! statement names ([`referenced_tables`]) from the catalog and hands
//! them in; nothing here touches the store. That keeps the planner easy
//! to unit-test and lets the server describe a prepared statement
//! (parameter and result types) with the same code that runs it.
//!
//! ## Access paths
//!
//! Every table is a tree keyed by its primary key, so the planner looks
//! at the WHERE clause's top-level `AND` terms for comparisons between a
//! key column and a constant (a literal, a parameter, or arithmetic over
//! those):
//!
//! - `=` on every key column: [`Access::Lookup`], one `get`;
//! - `=`, `<`, `<=`, `>`, `>=` on the first key column: [`Access::Range`],
//!   one `scan` over the key range;
//! - anything else: [`Access::FullScan`].
//!
//! The whole WHERE clause is still evaluated on every row the access
//! path yields, so the access path only has to be a superset — a bound
//! that does not narrow exactly is never wrong.
//!
//! ## Types
//!
//! Each expression's type is computed while it is built: mismatches are
//! `42804`/`42883` errors at plan time, not surprises at run time. An
//! untyped string literal (`'42'`) next to an integer column is parsed as
//! an integer right here, as PostgreSQL does with its `unknown` literals.
//! A parameter (`$1`) without a type from the client takes the type of
//! what it is compared with, added to, or assigned to; one that nothing
//! determines is TEXT.

use std::collections::HashMap;

use sqlparser::ast;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::error::{SqlError, SqlResult, sqlstate};
use super::expr::{BinaryOp, Expr};
use super::types::{Column, DataType, Table, Value, parse_text};

/// The most columns a table may have (its catalog record must fit in a
/// value).
pub const TABLE_COLUMNS_MAX: usize = 64;
/// The longest identifier, in bytes (PostgreSQL's NAMEDATALEN - 1).
pub const NAME_BYTES_MAX: usize = 63;
/// The most parameters a statement may have (the protocol's u16 count).
pub const PARAMS_MAX: usize = u16::MAX as usize;

/// The schemas a statement reads, by table name.
pub type Tables = HashMap<String, Table>;

/// One column of a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputColumn {
    pub name: String,
    pub data_type: DataType,
}

/// A planned statement: the plan, the type of each parameter, and the
/// result columns (empty for statements that return no rows).
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub plan: Plan,
    pub params: Vec<DataType>,
    pub columns: Vec<OutputColumn>,
}

/// How a statement reaches its rows.
#[derive(Clone, Debug, PartialEq)]
pub enum Access {
    /// The one row whose key has these values (every key column).
    Lookup(Vec<Expr>),
    /// Rows whose first key column is between the bounds; each bound is
    /// a constant and whether it is inclusive.
    Range { start: Option<(Expr, bool)>, end: Option<(Expr, bool)> },
    /// Every row.
    FullScan,
}

/// An aggregate function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AggregateFunction {
    Count,
    Sum,
    Min,
    Max,
}

/// One aggregate call of a query; `argument` is `None` for `COUNT(*)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate {
    pub function: AggregateFunction,
    pub argument: Option<Expr>,
}

/// One ORDER BY key.
#[derive(Clone, Debug, PartialEq)]
pub struct SortKey {
    pub expr: Expr,
    pub descending: bool,
    pub nulls_first: bool,
}

/// A SELECT.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectPlan {
    /// The table read and how; `None` for a SELECT without FROM, which
    /// sees one empty row.
    pub source: Option<(Table, Access)>,
    pub filter: Option<Expr>,
    /// Non-empty: an aggregate query, with exactly one result row.
    pub aggregates: Vec<Aggregate>,
    /// Evaluated on input rows (not on the projection), before it.
    pub order_by: Vec<SortKey>,
    pub offset: Option<Expr>,
    pub limit: Option<Expr>,
    pub projection: Vec<Expr>,
}

/// What the executor does.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    CreateTable {
        name: String,
        columns: Vec<Column>,
        primary_key: Vec<usize>,
        if_not_exists: bool,
    },
    DropTable {
        names: Vec<String>,
        if_exists: bool,
    },
    Truncate {
        tables: Vec<Table>,
    },
    /// Each row has one expression per table column, in column order.
    Insert {
        table: Table,
        rows: Vec<Vec<Expr>>,
    },
    Update {
        table: Table,
        access: Access,
        filter: Option<Expr>,
        assignments: Vec<(usize, Expr)>,
    },
    Delete {
        table: Table,
        access: Access,
        filter: Option<Expr>,
    },
    Select(Box<SelectPlan>),
    Begin,
    Commit,
    Rollback,
    /// Accepted and ignored (`SET`, `VACUUM`); completes with this tag.
    Ignored {
        tag: &'static str,
    },
    /// `SHOW name`: a one-row, one-column result.
    Show {
        name: String,
        value: String,
    },
}

/// Parses SQL text into statements (`42601` when it does not parse).
pub fn parse(sql: &str) -> SqlResult<Vec<ast::Statement>> {
    Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|error| {
        let message = error.to_string();
        SqlError::syntax(message.strip_prefix("sql parser error: ").unwrap_or(&message).to_owned())
    })
}

/// An identifier as PostgreSQL folds it: lower case unless quoted.
pub fn identifier(ident: &ast::Ident) -> SqlResult<String> {
    let name = if ident.quote_style.is_some() { ident.value.clone() } else { ident.value.to_lowercase() };
    if name.len() > NAME_BYTES_MAX {
        return Err(SqlError::new(sqlstate::NAME_TOO_LONG, format!("identifier \"{name}\" is too long")));
    }
    Ok(name)
}

/// A table name: `name` or `public.name`.
pub fn table_name(name: &ast::ObjectName) -> SqlResult<String> {
    let parts: Vec<&ast::Ident> = name.0.iter().filter_map(ast::ObjectNamePart::as_ident).collect();
    match parts.as_slice() {
        [table] => identifier(table),
        [schema, table] if identifier(schema)? == "public" => identifier(table),
        _ => Err(SqlError::unsupported(format!("the table name {name} (schemas other than public)"))),
    }
}

fn single_table(from: &[ast::TableWithJoins]) -> SqlResult<Option<(String, Option<String>)>> {
    match from {
        [] => Ok(None),
        [only] if only.joins.is_empty() => match &only.relation {
            ast::TableFactor::Table { name, alias, args: None, .. } => {
                let alias = alias.as_ref().map(|alias| identifier(&alias.name)).transpose()?;
                Ok(Some((table_name(name)?, alias)))
            }
            other => Err(SqlError::unsupported(format!("FROM {other}"))),
        },
        _ => Err(SqlError::unsupported("reading more than one table (joins)")),
    }
}

/// The names of the tables whose schemas planning `statement` needs.
/// CREATE and DROP are not among them: the executor looks those up.
pub fn referenced_tables(statement: &ast::Statement) -> SqlResult<Vec<String>> {
    match statement {
        ast::Statement::Insert(insert) => match &insert.table {
            ast::TableObject::TableName(name) => Ok(vec![table_name(name)?]),
            other => Err(SqlError::unsupported(format!("INSERT INTO {other}"))),
        },
        ast::Statement::Update(update) => {
            Ok(single_table(std::slice::from_ref(&update.table))?.map(|(name, _)| name).into_iter().collect())
        }
        ast::Statement::Delete(delete) => {
            let (ast::FromTable::WithFromKeyword(from) | ast::FromTable::WithoutKeyword(from)) = &delete.from;
            Ok(single_table(from)?.map(|(name, _)| name).into_iter().collect())
        }
        ast::Statement::Query(query) => match query.body.as_ref() {
            ast::SetExpr::Select(select) => Ok(single_table(&select.from)?.map(|(name, _)| name).into_iter().collect()),
            _ => Ok(Vec::new()),
        },
        ast::Statement::Truncate(truncate) => {
            truncate.table_names.iter().map(|target| table_name(&target.name)).collect()
        }
        _ => Ok(Vec::new()),
    }
}

/// Whether `statement` runs without the store: `SET`, `SHOW`, `VACUUM`,
/// transaction control, and SELECT without FROM.
pub fn is_storeless(statement: &ast::Statement) -> bool {
    match statement {
        ast::Statement::Set(_)
        | ast::Statement::ShowVariable { .. }
        | ast::Statement::Vacuum(_)
        | ast::Statement::StartTransaction { .. }
        | ast::Statement::Commit { .. }
        | ast::Statement::Rollback { .. } => true,
        ast::Statement::Query(query) => {
            matches!(query.body.as_ref(), ast::SetExpr::Select(select) if select.from.is_empty())
        }
        _ => false,
    }
}

/// Plans one statement. `tables` holds (at least) the schemas
/// [`referenced_tables`] named; `given` the parameter types the client
/// declared (`None`: infer).
pub fn plan(statement: &ast::Statement, tables: &Tables, given: &[Option<DataType>]) -> SqlResult<Planned> {
    let mut planner = Planner { tables, params: given.to_vec() };
    let (plan, columns) = planner.statement(statement)?;
    let params = planner.params.iter().map(|param| param.unwrap_or(DataType::Text)).collect();
    Ok(Planned { plan, params, columns })
}

/// Where aggregate calls may appear while an expression is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Plain row expressions; an aggregate is an error in this clause.
    Scalar(&'static str),
    /// An aggregate query's output: aggregates collect, bare columns err.
    Aggregated,
    /// Inside an aggregate's argument: columns yes, aggregates no.
    InAggregate,
}

/// The table an expression's column names refer to.
#[derive(Clone, Copy, Debug)]
struct Scope<'a> {
    table: &'a Table,
    alias: Option<&'a str>,
}

/// An expression and its type (`None`: NULL or a still-untyped parameter).
type Typed = (Expr, Option<DataType>);

struct Planner<'a> {
    tables: &'a Tables,
    params: Vec<Option<DataType>>,
}

fn aggregate_function(name: &str) -> Option<AggregateFunction> {
    match name {
        "count" => Some(AggregateFunction::Count),
        "sum" => Some(AggregateFunction::Sum),
        "min" => Some(AggregateFunction::Min),
        "max" => Some(AggregateFunction::Max),
        _ => None,
    }
}

fn function_name(function: &ast::Function) -> String {
    function
        .name
        .0
        .last()
        .and_then(ast::ObjectNamePart::as_ident)
        .map(|ident| ident.value.to_lowercase())
        .unwrap_or_default()
}

/// Whether the expression calls an aggregate anywhere.
fn contains_aggregate(expr: &ast::Expr) -> bool {
    match expr {
        ast::Expr::Function(function) => {
            aggregate_function(&function_name(function)).is_some()
                || match &function.args {
                    ast::FunctionArguments::List(list) => list.args.iter().any(|arg| match arg {
                        ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(inner)) => contains_aggregate(inner),
                        _ => false,
                    }),
                    _ => false,
                }
        }
        ast::Expr::BinaryOp { left, right, .. } => contains_aggregate(left) || contains_aggregate(right),
        ast::Expr::UnaryOp { expr, .. }
        | ast::Expr::Nested(expr)
        | ast::Expr::IsNull(expr)
        | ast::Expr::IsNotNull(expr)
        | ast::Expr::Cast { expr, .. } => contains_aggregate(expr),
        _ => false,
    }
}

fn mismatch(message: String) -> SqlError {
    SqlError::new(sqlstate::DATATYPE_MISMATCH, message)
}

fn no_operator(left: Option<DataType>, op: BinaryOp, right: Option<DataType>) -> SqlError {
    SqlError::new(
        sqlstate::UNDEFINED_FUNCTION,
        format!(
            "operator does not exist: {} {} {}",
            left.map_or("unknown", DataType::name),
            op.symbol(),
            right.map_or("unknown", DataType::name)
        ),
    )
}

/// Whether values of the two types compare with each other.
fn comparable(left: Option<DataType>, right: Option<DataType>) -> bool {
    match (left, right) {
        (None, _) | (_, None) => true,
        (Some(left), Some(right)) => left == right || (left.is_integer() && right.is_integer()),
    }
}

/// The output name PostgreSQL gives an unaliased select item.
fn output_name(expr: &ast::Expr) -> String {
    match expr {
        ast::Expr::Identifier(ident) => identifier(ident).unwrap_or_else(|_| ident.value.clone()),
        ast::Expr::CompoundIdentifier(parts) => {
            parts.last().map(|ident| ident.value.to_lowercase()).unwrap_or_default()
        }
        ast::Expr::Function(function) => function_name(function),
        ast::Expr::Cast { expr, .. } | ast::Expr::Nested(expr) => match output_name(expr).as_str() {
            "?column?" => "?column?".to_owned(),
            name => name.to_owned(),
        },
        _ => "?column?".to_owned(),
    }
}

impl Planner<'_> {
    fn statement(&mut self, statement: &ast::Statement) -> SqlResult<(Plan, Vec<OutputColumn>)> {
        let plan = match statement {
            ast::Statement::Query(query) => return self.query(query),
            ast::Statement::Insert(insert) => self.insert(insert)?,
            ast::Statement::Update(update) => self.update(update)?,
            ast::Statement::Delete(delete) => self.delete(delete)?,
            ast::Statement::CreateTable(create) => self.create_table(create)?,
            ast::Statement::Drop { object_type: ast::ObjectType::Table, if_exists, names, .. } => Plan::DropTable {
                names: names.iter().map(table_name).collect::<SqlResult<_>>()?,
                if_exists: *if_exists,
            },
            ast::Statement::Truncate(truncate) => {
                let tables = truncate
                    .table_names
                    .iter()
                    .map(|target| self.table(&table_name(&target.name)?).cloned())
                    .collect::<SqlResult<_>>()?;
                Plan::Truncate { tables }
            }
            ast::Statement::StartTransaction { statements, exception: None, .. } if statements.is_empty() => {
                Plan::Begin
            }
            ast::Statement::Commit { chain: false, .. } => Plan::Commit,
            ast::Statement::Rollback { chain: false, savepoint: None } => Plan::Rollback,
            ast::Statement::Set(_) => Plan::Ignored { tag: "SET" },
            ast::Statement::Vacuum(_) => Plan::Ignored { tag: "VACUUM" },
            ast::Statement::ShowVariable { variable } => return self.show(variable),
            other => {
                let text = other.to_string();
                let words: Vec<&str> = text.split_whitespace().take(2).collect();
                return Err(SqlError::unsupported(words.join(" ").to_uppercase()));
            }
        };
        Ok((plan, Vec::new()))
    }

    fn table(&self, name: &str) -> SqlResult<&Table> {
        self.tables.get(name).ok_or_else(|| super::catalog::undefined_table(name))
    }

    fn show(&mut self, variable: &[ast::Ident]) -> SqlResult<(Plan, Vec<OutputColumn>)> {
        let name = variable.iter().map(|ident| ident.value.to_lowercase()).collect::<Vec<_>>().join(" ");
        let value = match name.as_str() {
            "transaction_isolation" | "transaction isolation level" | "default_transaction_isolation" => "serializable",
            "server_version" => super::SERVER_VERSION,
            "server_encoding" | "client_encoding" => "UTF8",
            "standard_conforming_strings" | "integer_datetimes" => "on",
            "datestyle" => "ISO, MDY",
            "timezone" => "UTC",
            "search_path" => "public",
            "max_connections" => return self.show_value(&name, super::server::CONNECTIONS_MAX.to_string()),
            _ => {
                return Err(SqlError::new(
                    sqlstate::UNDEFINED_OBJECT,
                    format!("unrecognized configuration parameter \"{name}\""),
                ));
            }
        };
        self.show_value(&name, value.to_owned())
    }

    fn show_value(&self, name: &str, value: String) -> SqlResult<(Plan, Vec<OutputColumn>)> {
        let column = OutputColumn { name: name.replace(' ', "_"), data_type: DataType::Text };
        Ok((Plan::Show { name: column.name.clone(), value }, vec![column]))
    }

    fn create_table(&mut self, create: &ast::CreateTable) -> SqlResult<Plan> {
        if create.or_replace || create.temporary || create.query.is_some() || create.like.is_some() {
            return Err(SqlError::unsupported("CREATE TABLE with OR REPLACE, TEMPORARY, AS or LIKE"));
        }
        let name = table_name(&create.name)?;
        if create.columns.len() > TABLE_COLUMNS_MAX {
            return Err(SqlError::new(
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                format!("tables can have at most {TABLE_COLUMNS_MAX} columns"),
            ));
        }
        let mut columns: Vec<Column> = Vec::with_capacity(create.columns.len());
        let mut primary_key: Option<Vec<usize>> = None;
        let multiple_keys = || {
            SqlError::new(
                sqlstate::INVALID_TABLE_DEFINITION,
                format!("multiple primary keys for table \"{name}\" are not allowed"),
            )
        };
        for definition in &create.columns {
            let column_name = identifier(&definition.name)?;
            if columns.iter().any(|column| column.name == column_name) {
                return Err(SqlError::new(
                    sqlstate::DUPLICATE_COLUMN,
                    format!("column \"{column_name}\" specified more than once"),
                ));
            }
            let data_type = column_type(&definition.data_type)?;
            let mut not_null = false;
            for option in &definition.options {
                match &option.option {
                    ast::ColumnOption::Null => {}
                    ast::ColumnOption::NotNull => not_null = true,
                    ast::ColumnOption::PrimaryKey(_) => {
                        if primary_key.is_some() {
                            return Err(multiple_keys());
                        }
                        primary_key = Some(vec![columns.len()]);
                    }
                    other => return Err(SqlError::unsupported(format!("the column option {other}"))),
                }
            }
            columns.push(Column { name: column_name, data_type, not_null });
        }
        for constraint in &create.constraints {
            match constraint {
                ast::TableConstraint::PrimaryKey(key) => {
                    if primary_key.is_some() {
                        return Err(multiple_keys());
                    }
                    let mut indexes = Vec::with_capacity(key.columns.len());
                    for column in &key.columns {
                        let ast::Expr::Identifier(ident) = &column.column.expr else {
                            return Err(SqlError::unsupported(format!("the key expression {}", column.column.expr)));
                        };
                        let column_name = identifier(ident)?;
                        let index = columns.iter().position(|column| column.name == column_name).ok_or_else(|| {
                            SqlError::new(
                                sqlstate::UNDEFINED_COLUMN,
                                format!("column \"{column_name}\" named in key does not exist"),
                            )
                        })?;
                        if indexes.contains(&index) {
                            return Err(SqlError::new(
                                sqlstate::DUPLICATE_COLUMN,
                                format!("column \"{column_name}\" appears twice in primary key constraint"),
                            ));
                        }
                        indexes.push(index);
                    }
                    primary_key = Some(indexes);
                }
                other => return Err(SqlError::unsupported(format!("the constraint {other}"))),
            }
        }
        let primary_key = primary_key.unwrap_or_default();
        for &index in &primary_key {
            columns[index].not_null = true;
        }
        Ok(Plan::CreateTable { name, columns, primary_key, if_not_exists: create.if_not_exists })
    }

    fn insert(&mut self, insert: &ast::Insert) -> SqlResult<Plan> {
        if insert.returning.is_some() || insert.on.is_some() || !insert.assignments.is_empty() || insert.or.is_some() {
            return Err(SqlError::unsupported("INSERT with RETURNING, ON CONFLICT or SET"));
        }
        let ast::TableObject::TableName(name) = &insert.table else {
            return Err(SqlError::unsupported(format!("INSERT INTO {}", insert.table)));
        };
        let table = self.table(&table_name(name)?)?.clone();
        let targets: Vec<usize> = if insert.columns.is_empty() {
            (0..table.columns.len()).collect()
        } else {
            let mut targets = Vec::with_capacity(insert.columns.len());
            for column in &insert.columns {
                let column_name = table_name(column)?;
                let index = column_index(&table, &column_name)?;
                if targets.contains(&index) {
                    return Err(SqlError::new(
                        sqlstate::DUPLICATE_COLUMN,
                        format!("column \"{column_name}\" specified more than once"),
                    ));
                }
                targets.push(index);
            }
            targets
        };
        let values = match insert.source.as_deref() {
            Some(ast::Query { body, order_by: None, limit_clause: None, with: None, .. }) => match body.as_ref() {
                ast::SetExpr::Values(values) => values,
                _ => return Err(SqlError::unsupported("INSERT ... SELECT")),
            },
            Some(_) => return Err(SqlError::unsupported("INSERT with WITH, ORDER BY or LIMIT")),
            None => return Err(SqlError::unsupported("INSERT ... DEFAULT VALUES")),
        };
        let mut rows = Vec::with_capacity(values.rows.len());
        for row in &values.rows {
            let row = &row.content;
            if row.len() > targets.len() {
                return Err(SqlError::syntax("INSERT has more expressions than target columns"));
            }
            if row.len() < targets.len() {
                return Err(SqlError::syntax("INSERT has more target columns than expressions"));
            }
            let mut full: Vec<Expr> = vec![Expr::Literal(Value::Null); table.columns.len()];
            for (&index, value) in targets.iter().zip(row) {
                let typed = self.expr(value, None, Mode::Scalar("VALUES"))?;
                full[index] = self.assign(&table.columns[index], typed)?;
            }
            rows.push(full);
        }
        Ok(Plan::Insert { table, rows })
    }

    /// Checks that an expression can be stored in `column`, typing an
    /// untyped parameter and parsing an untyped literal on the way.
    fn assign(&mut self, column: &Column, (expr, data_type): Typed) -> SqlResult<Expr> {
        let target = column.data_type;
        let (expr, data_type) = self.settle(expr, data_type, Some(target))?;
        match data_type {
            None => Ok(expr),
            Some(source) if source == target || (source.is_integer() && target.is_integer()) => Ok(expr),
            Some(source) => Err(mismatch(format!(
                "column \"{}\" is of type {} but expression is of type {}",
                column.name,
                target.name(),
                source.name()
            ))),
        }
    }

    /// Types an untyped parameter as `wanted`, and parses an untyped
    /// string literal into `wanted`.
    fn settle(&mut self, expr: Expr, data_type: Option<DataType>, wanted: Option<DataType>) -> SqlResult<Typed> {
        let Some(wanted) = wanted else {
            return Ok((expr, data_type));
        };
        match expr {
            Expr::Param(index) if data_type.is_none() => {
                self.params[index] = Some(wanted);
                Ok((expr, Some(wanted)))
            }
            Expr::Literal(Value::Text(text)) if wanted != DataType::Text => {
                Ok((Expr::Literal(parse_text(&text, wanted)?), Some(wanted)))
            }
            expr => Ok((expr, data_type)),
        }
    }

    fn update(&mut self, update: &ast::Update) -> SqlResult<Plan> {
        if update.from.is_some() || update.returning.is_some() || update.limit.is_some() || !update.order_by.is_empty()
        {
            return Err(SqlError::unsupported("UPDATE with FROM, RETURNING, ORDER BY or LIMIT"));
        }
        let Some((name, alias)) = single_table(std::slice::from_ref(&update.table))? else {
            return Err(SqlError::syntax("UPDATE needs a table"));
        };
        let table = self.table(&name)?.clone();
        let scope = Scope { table: &table, alias: alias.as_deref() };
        let mut assignments: Vec<(usize, Expr)> = Vec::with_capacity(update.assignments.len());
        for assignment in &update.assignments {
            let ast::AssignmentTarget::ColumnName(target) = &assignment.target else {
                return Err(SqlError::unsupported("assigning to a tuple of columns"));
            };
            let column_name = match target.0.last().and_then(ast::ObjectNamePart::as_ident) {
                Some(ident) => identifier(ident)?,
                None => return Err(SqlError::syntax(format!("bad assignment target {target}"))),
            };
            let index = column_index(&table, &column_name)?;
            if assignments.iter().any(|(assigned, _)| *assigned == index) {
                return Err(SqlError::new(
                    sqlstate::DUPLICATE_COLUMN,
                    format!("multiple assignments to same column \"{column_name}\""),
                ));
            }
            let typed = self.expr(&assignment.value, Some(scope), Mode::Scalar("UPDATE"))?;
            assignments.push((index, self.assign(&table.columns[index], typed)?));
        }
        let filter = self.filter(update.selection.as_ref(), scope)?;
        let access = choose_access(&table, filter.as_ref());
        Ok(Plan::Update { table, access, filter, assignments })
    }

    fn delete(&mut self, delete: &ast::Delete) -> SqlResult<Plan> {
        if !delete.tables.is_empty() || delete.using.is_some() || delete.returning.is_some() || delete.limit.is_some() {
            return Err(SqlError::unsupported("DELETE with USING, RETURNING or LIMIT"));
        }
        let (ast::FromTable::WithFromKeyword(from) | ast::FromTable::WithoutKeyword(from)) = &delete.from;
        let Some((name, alias)) = single_table(from)? else {
            return Err(SqlError::syntax("DELETE needs a table"));
        };
        let table = self.table(&name)?.clone();
        let filter = self.filter(delete.selection.as_ref(), Scope { table: &table, alias: alias.as_deref() })?;
        let access = choose_access(&table, filter.as_ref());
        Ok(Plan::Delete { table, access, filter })
    }

    /// A WHERE clause: a boolean expression over the table's rows.
    fn filter(&mut self, selection: Option<&ast::Expr>, scope: Scope<'_>) -> SqlResult<Option<Expr>> {
        let Some(selection) = selection else {
            return Ok(None);
        };
        let (expr, data_type) = self.expr(selection, Some(scope), Mode::Scalar("WHERE"))?;
        let (expr, data_type) = self.settle(expr, data_type, Some(DataType::Bool))?;
        match data_type {
            None | Some(DataType::Bool) => Ok(Some(expr)),
            Some(other) => Err(mismatch(format!("argument of WHERE must be type boolean, not type {other}"))),
        }
    }

    fn query(&mut self, query: &ast::Query) -> SqlResult<(Plan, Vec<OutputColumn>)> {
        if query.with.is_some() || query.fetch.is_some() {
            return Err(SqlError::unsupported("WITH and FETCH"));
        }
        let ast::SetExpr::Select(select) = query.body.as_ref() else {
            return Err(SqlError::unsupported(format!("the query {}", query.body)));
        };
        if select.distinct.is_some() || select.top.is_some() || select.into.is_some() {
            return Err(SqlError::unsupported("SELECT with DISTINCT, TOP or INTO"));
        }
        match &select.group_by {
            ast::GroupByExpr::Expressions(expressions, modifiers) if expressions.is_empty() && modifiers.is_empty() => {
            }
            _ => return Err(SqlError::unsupported("GROUP BY")),
        }
        if select.having.is_some() {
            return Err(SqlError::unsupported("HAVING"));
        }
        let source = match single_table(&select.from)? {
            Some((name, alias)) => Some((self.table(&name)?.clone(), alias)),
            None => None,
        };
        let scope = source.as_ref().map(|(table, alias)| Scope { table, alias: alias.as_deref() });
        let filter = match scope {
            Some(scope) => self.filter(select.selection.as_ref(), scope)?,
            None => match &select.selection {
                Some(selection) => {
                    let (expr, data_type) = self.expr(selection, None, Mode::Scalar("WHERE"))?;
                    if !matches!(data_type, None | Some(DataType::Bool)) {
                        return Err(mismatch("argument of WHERE must be type boolean".into()));
                    }
                    Some(expr)
                }
                None => None,
            },
        };

        let aggregated = select.projection.iter().any(|item| match item {
            ast::SelectItem::UnnamedExpr(expr) | ast::SelectItem::ExprWithAlias { expr, .. } => {
                contains_aggregate(expr)
            }
            _ => false,
        });
        let mode = if aggregated { Mode::Aggregated } else { Mode::Scalar("SELECT") };
        let mut aggregates = Vec::new();
        let mut projection = Vec::new();
        let mut columns = Vec::new();
        for item in &select.projection {
            match item {
                ast::SelectItem::UnnamedExpr(expr) => {
                    let (built, data_type) = self.expr_collecting(expr, scope, mode, &mut aggregates)?;
                    projection.push(built);
                    columns
                        .push(OutputColumn { name: output_name(expr), data_type: data_type.unwrap_or(DataType::Text) });
                }
                ast::SelectItem::ExprWithAlias { expr, alias } => {
                    let (built, data_type) = self.expr_collecting(expr, scope, mode, &mut aggregates)?;
                    projection.push(built);
                    columns.push(OutputColumn {
                        name: identifier(alias)?,
                        data_type: data_type.unwrap_or(DataType::Text),
                    });
                }
                ast::SelectItem::Wildcard(_) | ast::SelectItem::QualifiedWildcard(..) => {
                    let Some(scope) = scope else {
                        return Err(SqlError::syntax("SELECT * with no tables specified is not valid"));
                    };
                    if aggregated {
                        return Err(grouping_error(
                            scope.table.columns.first().map_or("*", |column| column.name.as_str()),
                        ));
                    }
                    for (index, column) in scope.table.columns.iter().enumerate() {
                        projection.push(Expr::Column(index));
                        columns.push(OutputColumn { name: column.name.clone(), data_type: column.data_type });
                    }
                }
                other => return Err(SqlError::unsupported(format!("the select item {other}"))),
            }
        }

        let mut order_by = Vec::new();
        if let Some(order) = &query.order_by {
            let ast::OrderByKind::Expressions(keys) = &order.kind else {
                return Err(SqlError::unsupported("ORDER BY ALL"));
            };
            for key in keys {
                let descending = matches!(key.options.sort, Some(ast::OrderBySort::Desc));
                let expr = self.order_key(&key.expr, &projection, &columns, scope, mode, &mut aggregates)?;
                order_by.push(SortKey { expr, descending, nulls_first: key.options.nulls_first.unwrap_or(descending) });
            }
        }
        let (offset, limit) = match &query.limit_clause {
            None => (None, None),
            Some(ast::LimitClause::LimitOffset { limit, offset, limit_by }) if limit_by.is_empty() => {
                let offset = offset.as_ref().map(|offset| self.count_expr(&offset.value, "OFFSET")).transpose()?;
                let limit = limit.as_ref().map(|limit| self.count_expr(limit, "LIMIT")).transpose()?;
                (offset, limit)
            }
            Some(other) => return Err(SqlError::unsupported(format!("the limit clause {other}"))),
        };
        let source = source.map(|(table, _)| {
            let access = choose_access(&table, filter.as_ref());
            (table, access)
        });
        let plan = SelectPlan { source, filter, aggregates, order_by, offset, limit, projection };
        Ok((Plan::Select(Box::new(plan)), columns))
    }

    /// An ORDER BY key: a select-list position, an output column name, or
    /// an expression over the input.
    fn order_key(
        &mut self,
        key: &ast::Expr,
        projection: &[Expr],
        columns: &[OutputColumn],
        scope: Option<Scope<'_>>,
        mode: Mode,
        aggregates: &mut Vec<Aggregate>,
    ) -> SqlResult<Expr> {
        if let ast::Expr::Value(ast::ValueWithSpan { value: ast::Value::Number(number, _), .. }) = key {
            let position: usize = number.parse().unwrap_or(0);
            return projection.get(position.wrapping_sub(1)).cloned().ok_or_else(|| {
                SqlError::new(
                    sqlstate::INVALID_COLUMN_REFERENCE,
                    format!("ORDER BY position {number} is not in select list"),
                )
            });
        }
        if let ast::Expr::Identifier(ident) = key {
            let name = identifier(ident)?;
            if let Some(index) = columns.iter().position(|column| column.name == name) {
                return Ok(projection[index].clone());
            }
        }
        let mode = if mode == Mode::Aggregated { mode } else { Mode::Scalar("ORDER BY") };
        Ok(self.expr_collecting(key, scope, mode, aggregates)?.0)
    }

    /// A LIMIT or OFFSET: a constant integer expression.
    fn count_expr(&mut self, expr: &ast::Expr, clause: &'static str) -> SqlResult<Expr> {
        let (built, data_type) = self.expr(expr, None, Mode::Scalar(clause))?;
        let (built, data_type) = self.settle(built, data_type, Some(DataType::BigInt))?;
        match data_type {
            None => Ok(built),
            Some(data_type) if data_type.is_integer() => Ok(built),
            Some(other) => Err(mismatch(format!("argument of {clause} must be type bigint, not type {other}"))),
        }
    }

    fn expr(&mut self, expr: &ast::Expr, scope: Option<Scope<'_>>, mode: Mode) -> SqlResult<Typed> {
        let mut none = Vec::new();
        self.expr_collecting(expr, scope, mode, &mut none)
    }

    fn expr_collecting(
        &mut self,
        expr: &ast::Expr,
        scope: Option<Scope<'_>>,
        mode: Mode,
        aggregates: &mut Vec<Aggregate>,
    ) -> SqlResult<Typed> {
        let mut recurse =
            |planner: &mut Self, inner: &ast::Expr| planner.expr_collecting(inner, scope, mode, aggregates);
        match expr {
            ast::Expr::Identifier(ident) => self.column(std::slice::from_ref(ident), scope, mode),
            ast::Expr::CompoundIdentifier(parts) => self.column(parts, scope, mode),
            ast::Expr::Value(value) => self.literal(&value.value),
            ast::Expr::Nested(inner) => recurse(self, inner),
            ast::Expr::IsNull(inner) | ast::Expr::IsNotNull(inner) => {
                let (inner_expr, _) = recurse(self, inner)?;
                let negated = matches!(expr, ast::Expr::IsNotNull(_));
                Ok((Expr::IsNull { expr: Box::new(inner_expr), negated }, Some(DataType::Bool)))
            }
            ast::Expr::UnaryOp { op, expr: inner } => {
                let (inner_expr, data_type) = recurse(self, inner)?;
                match op {
                    ast::UnaryOperator::Not => {
                        let (inner_expr, data_type) = self.settle(inner_expr, data_type, Some(DataType::Bool))?;
                        if !matches!(data_type, None | Some(DataType::Bool)) {
                            return Err(mismatch(format!(
                                "argument of NOT must be type boolean, not type {}",
                                data_type.map_or("unknown", DataType::name)
                            )));
                        }
                        Ok((Expr::Not(Box::new(inner_expr)), Some(DataType::Bool)))
                    }
                    ast::UnaryOperator::Minus | ast::UnaryOperator::Plus => {
                        let (inner_expr, data_type) = self.settle(inner_expr, data_type, Some(DataType::Int))?;
                        match data_type {
                            Some(data_type) if data_type.is_integer() => {}
                            other => return Err(no_operator(None, BinaryOp::Sub, other)),
                        }
                        if *op == ast::UnaryOperator::Plus {
                            return Ok((inner_expr, data_type));
                        }
                        Ok((fold_negation(inner_expr), data_type))
                    }
                    other => Err(SqlError::unsupported(format!("the operator {other}"))),
                }
            }
            ast::Expr::BinaryOp { left, op, right } => {
                let op = binary_op(op)?;
                let left = recurse(self, left)?;
                let right = recurse(self, right)?;
                self.binary(op, left, right)
            }
            ast::Expr::Between { expr: inner, negated, low, high } => {
                let value = recurse(self, inner)?;
                let low = recurse(self, low)?;
                let high = recurse(self, high)?;
                let above = self.binary(BinaryOp::GtEq, value.clone(), low)?;
                let below = self.binary(BinaryOp::LtEq, value, high)?;
                let both = self.binary(BinaryOp::And, above, below)?;
                Ok(if *negated { (Expr::Not(Box::new(both.0)), both.1) } else { both })
            }
            ast::Expr::In { expr: inner, target: ast::InTarget::List(list), negated, .. } => {
                let value = recurse(self, inner)?;
                let mut any: Option<Typed> = None;
                for item in list {
                    let item = recurse(self, item)?;
                    let equal = self.binary(BinaryOp::Eq, value.clone(), item)?;
                    any = Some(match any {
                        Some(previous) => self.binary(BinaryOp::Or, previous, equal)?,
                        None => equal,
                    });
                }
                let (any, data_type) = any.ok_or_else(|| SqlError::syntax("IN needs at least one value"))?;
                Ok(if *negated { (Expr::Not(Box::new(any)), data_type) } else { (any, data_type) })
            }
            ast::Expr::Cast {
                kind: ast::CastKind::Cast | ast::CastKind::DoubleColon,
                expr: inner,
                data_type,
                format: None,
            } => {
                let target = column_type(data_type)?;
                let (inner_expr, source) = recurse(self, inner)?;
                let (inner_expr, source) = self.settle(inner_expr, source, Some(target))?;
                if let Some(source) = source
                    && source == DataType::Bool
                    && target.is_integer()
                {
                    return Err(SqlError::new(
                        sqlstate::CANNOT_COERCE,
                        format!("cannot cast type {source} to {target}"),
                    ));
                }
                if source == Some(target) {
                    return Ok((inner_expr, source));
                }
                Ok((Expr::Cast(Box::new(inner_expr), target), Some(target)))
            }
            ast::Expr::Function(function) => self.function(function, scope, mode, aggregates),
            other => Err(SqlError::unsupported(format!("the expression {other}"))),
        }
    }

    fn column(&mut self, parts: &[ast::Ident], scope: Option<Scope<'_>>, mode: Mode) -> SqlResult<Typed> {
        let names = parts.iter().map(identifier).collect::<SqlResult<Vec<_>>>()?;
        let (qualifier, name) = match names.as_slice() {
            [name] => (None, name),
            [qualifier, name] => (Some(qualifier), name),
            _ => return Err(SqlError::unsupported(format!("the column reference {}", names.join(".")))),
        };
        let undefined = || {
            let shown = names.join(".");
            SqlError::new(sqlstate::UNDEFINED_COLUMN, format!("column \"{shown}\" does not exist"))
        };
        let Some(scope) = scope else {
            return Err(undefined());
        };
        if let Some(qualifier) = qualifier
            && *qualifier != scope.table.name
            && Some(qualifier.as_str()) != scope.alias
        {
            return Err(SqlError::new(
                sqlstate::UNDEFINED_TABLE,
                format!("missing FROM-clause entry for table \"{qualifier}\""),
            ));
        }
        let index = scope.table.column_index(name).ok_or_else(undefined)?;
        if mode == Mode::Aggregated {
            return Err(grouping_error(name));
        }
        Ok((Expr::Column(index), Some(scope.table.columns[index].data_type)))
    }

    fn literal(&mut self, value: &ast::Value) -> SqlResult<Typed> {
        match value {
            ast::Value::Number(text, _) => match text.parse::<i64>() {
                Ok(number) => Ok(match i32::try_from(number) {
                    Ok(small) => (Expr::Literal(Value::Int(small)), Some(DataType::Int)),
                    Err(_) => (Expr::Literal(Value::BigInt(number)), Some(DataType::BigInt)),
                }),
                Err(_) if text.bytes().all(|byte| byte.is_ascii_digit()) => Err(SqlError::out_of_range("bigint")),
                Err(_) => Err(SqlError::unsupported(format!("the numeric value {text} (only integers are)"))),
            },
            ast::Value::SingleQuotedString(text) | ast::Value::EscapedStringLiteral(text) => {
                Ok((Expr::Literal(Value::Text(text.clone())), Some(DataType::Text)))
            }
            ast::Value::Boolean(flag) => Ok((Expr::Literal(Value::Bool(*flag)), Some(DataType::Bool))),
            ast::Value::Null => Ok((Expr::Literal(Value::Null), None)),
            ast::Value::Placeholder(name) => {
                let number: usize = name
                    .strip_prefix('$')
                    .and_then(|digits| digits.parse().ok())
                    .filter(|number| (1..=PARAMS_MAX).contains(number))
                    .ok_or_else(|| SqlError::syntax(format!("bad parameter {name}")))?;
                if self.params.len() < number {
                    self.params.resize(number, None);
                }
                Ok((Expr::Param(number - 1), self.params[number - 1]))
            }
            other => Err(SqlError::unsupported(format!("the literal {other}"))),
        }
    }

    fn function(
        &mut self,
        function: &ast::Function,
        scope: Option<Scope<'_>>,
        mode: Mode,
        aggregates: &mut Vec<Aggregate>,
    ) -> SqlResult<Typed> {
        let name = function_name(function);
        if function.over.is_some() || function.filter.is_some() || !function.within_group.is_empty() {
            return Err(SqlError::unsupported(format!("{name} with OVER, FILTER or WITHIN GROUP")));
        }
        let (arguments, distinct) = match &function.args {
            ast::FunctionArguments::None => (Vec::new(), false),
            ast::FunctionArguments::List(list) => {
                if !list.clauses.is_empty() {
                    return Err(SqlError::unsupported(format!("clauses inside {name}()")));
                }
                (
                    list.args.iter().collect::<Vec<_>>(),
                    list.duplicate_treatment == Some(ast::DuplicateTreatment::Distinct),
                )
            }
            ast::FunctionArguments::Subquery(_) => return Err(SqlError::unsupported("subqueries")),
        };
        if let Some(function_kind) = aggregate_function(&name) {
            match mode {
                Mode::Scalar(clause) => {
                    return Err(SqlError::new(
                        sqlstate::GROUPING_ERROR,
                        format!("aggregate functions are not allowed in {clause}"),
                    ));
                }
                Mode::InAggregate => {
                    return Err(SqlError::new(sqlstate::GROUPING_ERROR, "aggregate function calls cannot be nested"));
                }
                Mode::Aggregated => {}
            }
            if distinct {
                return Err(SqlError::unsupported(format!("{name}(DISTINCT ...)")));
            }
            let (argument, data_type) = match arguments.as_slice() {
                [ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Wildcard)]
                    if function_kind == AggregateFunction::Count =>
                {
                    (None, None)
                }
                [ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(argument))] => {
                    let (argument, data_type) = self.expr_collecting(argument, scope, Mode::InAggregate, aggregates)?;
                    (Some(argument), data_type)
                }
                _ => {
                    return Err(SqlError::new(
                        sqlstate::UNDEFINED_FUNCTION,
                        format!("function {name} with these arguments does not exist"),
                    ));
                }
            };
            let result_type = match function_kind {
                AggregateFunction::Count => DataType::BigInt,
                AggregateFunction::Sum => match data_type {
                    Some(data_type) if data_type.is_integer() => DataType::BigInt,
                    other => {
                        return Err(SqlError::new(
                            sqlstate::UNDEFINED_FUNCTION,
                            format!("function sum({}) does not exist", other.map_or("unknown", DataType::name)),
                        ));
                    }
                },
                AggregateFunction::Min | AggregateFunction::Max => data_type.unwrap_or(DataType::Text),
            };
            aggregates.push(Aggregate { function: function_kind, argument });
            return Ok((Expr::Aggregate(aggregates.len() - 1), Some(result_type)));
        }
        if !arguments.is_empty() {
            return Err(SqlError::new(
                sqlstate::UNDEFINED_FUNCTION,
                format!("function {name} with {} arguments does not exist", arguments.len()),
            ));
        }
        match name.as_str() {
            "current_timestamp" | "now" | "localtimestamp" => Ok((Expr::CurrentTimestamp, Some(DataType::Text))),
            "version" => Ok((Expr::Literal(Value::Text(super::VERSION_TEXT.to_owned())), Some(DataType::Text))),
            "current_database" | "current_schema" => Ok((
                Expr::Literal(Value::Text(if name == "current_schema" { "public" } else { "postgres" }.to_owned())),
                Some(DataType::Text),
            )),
            _ => Err(SqlError::new(sqlstate::UNDEFINED_FUNCTION, format!("function {name}() does not exist"))),
        }
    }

    /// Builds `left op right`, typing untyped sides from the other.
    fn binary(&mut self, op: BinaryOp, (left, left_type): Typed, (right, right_type): Typed) -> SqlResult<Typed> {
        let (left, left_type) = match op {
            BinaryOp::And | BinaryOp::Or => self.settle(left, left_type, Some(DataType::Bool))?,
            BinaryOp::Concat => self.settle(left, left_type, Some(DataType::Text))?,
            _ => self.settle(left, left_type, right_type)?,
        };
        let (right, right_type) = match op {
            BinaryOp::And | BinaryOp::Or => self.settle(right, right_type, Some(DataType::Bool))?,
            BinaryOp::Concat => self.settle(right, right_type, Some(DataType::Text))?,
            _ => self.settle(right, right_type, left_type)?,
        };
        let result_type = match op {
            BinaryOp::And | BinaryOp::Or => {
                for side in [left_type, right_type] {
                    if !matches!(side, None | Some(DataType::Bool)) {
                        return Err(mismatch(format!(
                            "argument of {} must be type boolean, not type {}",
                            op.symbol(),
                            side.map_or("unknown", DataType::name)
                        )));
                    }
                }
                DataType::Bool
            }
            BinaryOp::Concat => DataType::Text,
            op if op.is_comparison() => {
                if !comparable(left_type, right_type) {
                    return Err(no_operator(left_type, op, right_type));
                }
                // Two untyped parameters compared: make both text.
                let (left, _) = self.settle(left.clone(), left_type, Some(DataType::Text))?;
                let (right, _) = self.settle(right.clone(), right_type, Some(DataType::Text))?;
                return Ok((Expr::Binary(op, Box::new(left), Box::new(right)), Some(DataType::Bool)));
            }
            _ => {
                let result = match (left_type, right_type) {
                    (Some(DataType::Int) | None, Some(DataType::Int) | None) => DataType::Int,
                    (Some(left_type), Some(right_type)) if left_type.is_integer() && right_type.is_integer() => {
                        DataType::BigInt
                    }
                    (Some(single), None) | (None, Some(single)) if single.is_integer() => single,
                    _ => return Err(no_operator(left_type, op, right_type)),
                };
                let (left, _) = self.settle(left, left_type, Some(result))?;
                let (right, _) = self.settle(right, right_type, Some(result))?;
                return Ok((Expr::Binary(op, Box::new(left), Box::new(right)), Some(result)));
            }
        };
        Ok((Expr::Binary(op, Box::new(left), Box::new(right)), Some(result_type)))
    }
}

fn grouping_error(name: &str) -> SqlError {
    SqlError::new(
        sqlstate::GROUPING_ERROR,
        format!("column \"{name}\" must appear in the GROUP BY clause or be used in an aggregate function"),
    )
}

/// `-literal` is the negative literal (so `-2147483648` is an INT).
fn fold_negation(expr: Expr) -> Expr {
    match expr {
        Expr::Literal(Value::Int(number)) if number != i32::MIN => Expr::Literal(Value::Int(-number)),
        Expr::Literal(Value::BigInt(number)) if number == i64::from(i32::MAX) + 1 => {
            Expr::Literal(Value::Int(i32::MIN))
        }
        Expr::Literal(Value::BigInt(number)) if number != i64::MIN => Expr::Literal(Value::BigInt(-number)),
        other => Expr::Negate(Box::new(other)),
    }
}

fn column_index(table: &Table, name: &str) -> SqlResult<usize> {
    table.column_index(name).ok_or_else(|| {
        SqlError::new(
            sqlstate::UNDEFINED_COLUMN,
            format!("column \"{name}\" of relation \"{}\" does not exist", table.name),
        )
    })
}

fn binary_op(op: &ast::BinaryOperator) -> SqlResult<BinaryOp> {
    Ok(match op {
        ast::BinaryOperator::And => BinaryOp::And,
        ast::BinaryOperator::Or => BinaryOp::Or,
        ast::BinaryOperator::Eq => BinaryOp::Eq,
        ast::BinaryOperator::NotEq => BinaryOp::NotEq,
        ast::BinaryOperator::Lt => BinaryOp::Lt,
        ast::BinaryOperator::LtEq => BinaryOp::LtEq,
        ast::BinaryOperator::Gt => BinaryOp::Gt,
        ast::BinaryOperator::GtEq => BinaryOp::GtEq,
        ast::BinaryOperator::Plus => BinaryOp::Add,
        ast::BinaryOperator::Minus => BinaryOp::Sub,
        ast::BinaryOperator::Multiply => BinaryOp::Mul,
        ast::BinaryOperator::Divide => BinaryOp::Div,
        ast::BinaryOperator::Modulo => BinaryOp::Mod,
        ast::BinaryOperator::StringConcat => BinaryOp::Concat,
        other => return Err(SqlError::unsupported(format!("the operator {other}"))),
    })
}

/// The stored type for a declared SQL type.
pub fn column_type(data_type: &ast::DataType) -> SqlResult<DataType> {
    use ast::DataType as Sql;
    match data_type {
        Sql::Int(_) | Sql::Integer(_) | Sql::Int4(_) | Sql::SmallInt(_) | Sql::Int2(_) => Ok(DataType::Int),
        Sql::BigInt(_) | Sql::Int8(_) => Ok(DataType::BigInt),
        Sql::Text
        | Sql::Char(_)
        | Sql::Character(_)
        | Sql::Varchar(_)
        | Sql::CharacterVarying(_)
        | Sql::Timestamp(_, _) => Ok(DataType::Text),
        Sql::Bool | Sql::Boolean => Ok(DataType::Bool),
        other => Err(SqlError::unsupported(format!("the type {other}"))),
    }
}

/// Splits a filter into its top-level AND terms.
fn conjuncts<'a>(expr: &'a Expr, out: &mut Vec<&'a Expr>) {
    match expr {
        Expr::Binary(BinaryOp::And, left, right) => {
            conjuncts(left, out);
            conjuncts(right, out);
        }
        other => out.push(other),
    }
}

/// Picks the access path for a filter over `table` (see the module docs).
pub fn choose_access(table: &Table, filter: Option<&Expr>) -> Access {
    let (Some(filter), false) = (filter, table.primary_key.is_empty()) else {
        return Access::FullScan;
    };
    let mut terms = Vec::new();
    conjuncts(filter, &mut terms);
    let mut equal: Vec<Option<Expr>> = vec![None; table.primary_key.len()];
    let mut start: Option<(Expr, bool)> = None;
    let mut end: Option<(Expr, bool)> = None;
    for term in terms {
        let Expr::Binary(op, left, right) = term else { continue };
        let (column, value, op) = match (left.as_ref(), right.as_ref()) {
            (Expr::Column(column), value) if value.is_constant() => (*column, value, *op),
            (value, Expr::Column(column)) if value.is_constant() => (*column, value, op.flipped()),
            _ => continue,
        };
        let Some(position) = table.primary_key.iter().position(|&key| key == column) else { continue };
        match op {
            BinaryOp::Eq => {
                equal[position].get_or_insert_with(|| value.clone());
            }
            BinaryOp::Gt | BinaryOp::GtEq if position == 0 => {
                start.get_or_insert_with(|| (value.clone(), op == BinaryOp::GtEq));
            }
            BinaryOp::Lt | BinaryOp::LtEq if position == 0 => {
                end.get_or_insert_with(|| (value.clone(), op == BinaryOp::LtEq));
            }
            _ => {}
        }
    }
    if equal.iter().all(Option::is_some) {
        return Access::Lookup(equal.into_iter().flatten().collect());
    }
    if let Some(first) = equal.into_iter().next().flatten() {
        return Access::Range { start: Some((first.clone(), true)), end: Some((first, true)) };
    }
    if start.is_some() || end.is_some() {
        return Access::Range { start, end };
    }
    Access::FullScan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::kv::TreeId;

    fn accounts() -> Tables {
        let columns = vec![
            Column { name: "aid".into(), data_type: DataType::Int, not_null: true },
            Column { name: "bid".into(), data_type: DataType::Int, not_null: false },
            Column { name: "abalance".into(), data_type: DataType::Int, not_null: false },
            Column { name: "filler".into(), data_type: DataType::Text, not_null: false },
        ];
        let pair = vec![
            Column { name: "a".into(), data_type: DataType::Text, not_null: true },
            Column { name: "b".into(), data_type: DataType::BigInt, not_null: true },
        ];
        let heap = vec![Column { name: "x".into(), data_type: DataType::Int, not_null: false }];
        Tables::from([
            (
                "accounts".into(),
                Table { name: "accounts".into(), tree: TreeId(1), columns, primary_key: vec![0], next_row_id: 1 },
            ),
            (
                "pair".into(),
                Table { name: "pair".into(), tree: TreeId(2), columns: pair, primary_key: vec![0, 1], next_row_id: 1 },
            ),
            (
                "heap".into(),
                Table { name: "heap".into(), tree: TreeId(3), columns: heap, primary_key: vec![], next_row_id: 1 },
            ),
        ])
    }

    fn planned(sql: &str) -> SqlResult<Planned> {
        let statements = parse(sql)?;
        plan(&statements[0], &accounts(), &[])
    }

    fn select(sql: &str) -> SelectPlan {
        match planned(sql).unwrap().plan {
            Plan::Select(select) => *select,
            other => panic!("not a select: {other:?}"),
        }
    }

    fn code(sql: &str) -> &'static str {
        planned(sql).unwrap_err().code
    }

    #[test]
    fn key_equality_is_a_lookup_and_params_take_the_key_type() {
        let planned = planned("SELECT abalance FROM accounts WHERE aid = $1").unwrap();
        assert_eq!(planned.params, vec![DataType::Int]);
        assert_eq!(planned.columns, vec![OutputColumn { name: "abalance".into(), data_type: DataType::Int }]);
        let Plan::Select(lookup) = planned.plan else { panic!("not a select") };
        assert_eq!(lookup.source.unwrap().1, Access::Lookup(vec![Expr::Param(0)]));
        // Either side, with an unrelated term, and through arithmetic.
        let flipped = select("SELECT * FROM accounts WHERE bid = 3 AND 1 + 1 = aid");
        assert!(matches!(flipped.source.unwrap().1, Access::Lookup(_)));
    }

    #[test]
    fn key_comparisons_are_ranges_and_everything_else_a_full_scan() {
        let range = select("SELECT aid FROM accounts WHERE aid >= 10 AND aid < 20");
        assert_eq!(
            range.source.unwrap().1,
            Access::Range {
                start: Some((Expr::Literal(Value::Int(10)), true)),
                end: Some((Expr::Literal(Value::Int(20)), false))
            }
        );
        assert_eq!(select("SELECT * FROM accounts WHERE bid = 1").source.unwrap().1, Access::FullScan);
        assert_eq!(select("SELECT * FROM accounts WHERE aid = 1 OR aid = 2").source.unwrap().1, Access::FullScan);
        assert_eq!(select("SELECT * FROM accounts WHERE aid = bid").source.unwrap().1, Access::FullScan);
        assert_eq!(select("SELECT * FROM heap WHERE x = 1").source.unwrap().1, Access::FullScan);
        let between = select("SELECT * FROM accounts WHERE aid BETWEEN 5 AND 6");
        assert!(matches!(between.source.unwrap().1, Access::Range { start: Some(_), end: Some(_) }));
    }

    #[test]
    fn a_composite_key_looks_up_on_all_columns_and_ranges_on_the_first() {
        assert!(
            matches!(select("SELECT * FROM pair WHERE b = 2 AND a = 'x'").source.unwrap().1, Access::Lookup(keys) if keys.len() == 2)
        );
        let prefix = select("SELECT * FROM pair WHERE a = 'x'").source.unwrap().1;
        let x = Expr::Literal(Value::Text("x".into()));
        assert_eq!(prefix, Access::Range { start: Some((x.clone(), true)), end: Some((x, true)) });
        assert_eq!(select("SELECT * FROM pair WHERE b = 2").source.unwrap().1, Access::FullScan);
    }

    #[test]
    fn types_are_checked_and_untyped_literals_parsed() {
        // '7' next to an integer key is an integer, and still a lookup.
        let literal = select("SELECT * FROM accounts WHERE aid = '7'");
        assert_eq!(literal.source.unwrap().1, Access::Lookup(vec![Expr::Literal(Value::Int(7))]));
        assert_eq!(code("SELECT * FROM accounts WHERE aid = 'seven'"), sqlstate::INVALID_TEXT_REPRESENTATION);
        assert_eq!(code("SELECT * FROM accounts WHERE filler = 1"), sqlstate::UNDEFINED_FUNCTION);
        assert_eq!(code("SELECT * FROM accounts WHERE aid"), sqlstate::DATATYPE_MISMATCH);
        assert_eq!(code("SELECT filler + 1 FROM accounts"), sqlstate::UNDEFINED_FUNCTION);
        assert_eq!(code("SELECT 1 AND true"), sqlstate::DATATYPE_MISMATCH);
        assert_eq!(code("UPDATE accounts SET abalance = true"), sqlstate::DATATYPE_MISMATCH);
        assert_eq!(code("INSERT INTO accounts VALUES (1, 2, 3, 4, 5)"), sqlstate::SYNTAX_ERROR);
        assert_eq!(code("INSERT INTO accounts (nope) VALUES (1)"), sqlstate::UNDEFINED_COLUMN);
        assert_eq!(code("SELECT nope FROM accounts"), sqlstate::UNDEFINED_COLUMN);
        assert_eq!(code("SELECT * FROM nope"), sqlstate::UNDEFINED_TABLE);
        assert_eq!(code("SELECT 99999999999999999999"), sqlstate::NUMERIC_VALUE_OUT_OF_RANGE);
    }

    #[test]
    fn aggregates_and_their_errors() {
        let planned = planned("SELECT count(*), sum(abalance) AS total, max(filler) FROM accounts").unwrap();
        let names: Vec<_> = planned.columns.iter().map(|column| (column.name.as_str(), column.data_type)).collect();
        assert_eq!(names, vec![("count", DataType::BigInt), ("total", DataType::BigInt), ("max", DataType::Text)]);
        assert_eq!(code("SELECT aid, count(*) FROM accounts"), sqlstate::GROUPING_ERROR);
        assert_eq!(code("SELECT * FROM accounts WHERE count(*) > 1"), sqlstate::GROUPING_ERROR);
        assert_eq!(code("SELECT count(max(aid)) FROM accounts"), sqlstate::GROUPING_ERROR);
        assert_eq!(code("SELECT sum(filler) FROM accounts"), sqlstate::UNDEFINED_FUNCTION);
        assert_eq!(code("SELECT bid, count(*) FROM accounts GROUP BY bid"), sqlstate::FEATURE_NOT_SUPPORTED);
    }

    #[test]
    fn parameters_are_typed_from_their_context() {
        let update = planned("UPDATE accounts SET abalance = abalance + $1 WHERE aid = $2").unwrap();
        assert_eq!(update.params, vec![DataType::Int, DataType::Int]);
        let insert = planned("INSERT INTO accounts (aid, filler) VALUES ($1, $2)").unwrap();
        assert_eq!(insert.params, vec![DataType::Int, DataType::Text]);
        let limit = planned("SELECT aid FROM accounts LIMIT $1").unwrap();
        assert_eq!(limit.params, vec![DataType::BigInt]);
        // A type the client gave wins.
        let statements = parse("SELECT * FROM accounts WHERE aid = $1").unwrap();
        assert_eq!(
            plan(&statements[0], &accounts(), &[Some(DataType::BigInt)]).unwrap().params,
            vec![DataType::BigInt]
        );
    }

    #[test]
    fn order_by_resolves_positions_aliases_and_expressions() {
        let ordered = select("SELECT aid AS a, abalance FROM accounts ORDER BY 2 DESC, a, bid + 1");
        assert_eq!(ordered.order_by.len(), 3);
        assert_eq!(ordered.order_by[0], SortKey { expr: Expr::Column(2), descending: true, nulls_first: true });
        assert_eq!(ordered.order_by[1].expr, Expr::Column(0));
        assert_eq!(code("SELECT aid FROM accounts ORDER BY 3"), sqlstate::INVALID_COLUMN_REFERENCE);
    }

    #[test]
    fn create_table_reads_keys_types_and_rejects_nonsense() {
        let statements =
            parse("CREATE TABLE t (id BIGINT PRIMARY KEY, name VARCHAR(10) NOT NULL, at TIMESTAMP, ok BOOL)").unwrap();
        let Plan::CreateTable { columns, primary_key, .. } = plan(&statements[0], &Tables::new(), &[]).unwrap().plan
        else {
            panic!("not a create");
        };
        assert_eq!(primary_key, vec![0]);
        assert!(columns[0].not_null && columns[1].not_null && !columns[2].not_null);
        assert_eq!(
            columns.iter().map(|c| c.data_type).collect::<Vec<_>>(),
            vec![DataType::BigInt, DataType::Text, DataType::Text, DataType::Bool]
        );
        assert_eq!(code("CREATE TABLE t (a INT PRIMARY KEY, b INT PRIMARY KEY)"), sqlstate::INVALID_TABLE_DEFINITION);
        assert_eq!(code("CREATE TABLE t (a INT, a INT)"), sqlstate::DUPLICATE_COLUMN);
        assert_eq!(code("CREATE TABLE t (a FLOAT)"), sqlstate::FEATURE_NOT_SUPPORTED);
        assert_eq!(code("CREATE TABLE t (a INT, PRIMARY KEY (b))"), sqlstate::UNDEFINED_COLUMN);
        assert_eq!(code("SELEC 1"), sqlstate::SYNTAX_ERROR);
        assert_eq!(code("CREATE INDEX i ON accounts (bid)"), sqlstate::FEATURE_NOT_SUPPORTED);
    }
}

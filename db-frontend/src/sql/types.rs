//! Column types, values, and table schemas.
//!
//! Four stored types: `INT` (i32), `BIGINT` (i64), `TEXT` and `BOOL`.
//! `CHAR(n)`, `VARCHAR(n)` and `TIMESTAMP` are accepted in `CREATE TABLE`
//! and stored as `TEXT` (no padding, no length check, timestamps as ISO
//! text): enough for pgbench's `filler char(88)` and `mtime timestamp`.
//!
//! A [`Value`] carries its own type, and `NULL` is a value of every type.
//! Arithmetic follows PostgreSQL: `INT op INT` is computed in i32 and
//! overflows with `22003`, mixing in a `BIGINT` widens to i64.

use std::cmp::Ordering;
use std::fmt;

use super::error::{SqlError, SqlResult, sqlstate};

/// A column's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    /// 32-bit signed integer (`INT`, `INTEGER`, `INT4`, `SMALLINT`).
    Int,
    /// 64-bit signed integer (`BIGINT`, `INT8`).
    BigInt,
    /// UTF-8 text (`TEXT`, `CHAR(n)`, `VARCHAR(n)`, `TIMESTAMP`).
    Text,
    /// `BOOL`, `BOOLEAN`.
    Bool,
}

impl DataType {
    /// The PostgreSQL name, as error messages spell it.
    pub fn name(self) -> &'static str {
        match self {
            DataType::Int => "integer",
            DataType::BigInt => "bigint",
            DataType::Text => "text",
            DataType::Bool => "boolean",
        }
    }

    /// Whether the type is one of the integers.
    pub fn is_integer(self) -> bool {
        matches!(self, DataType::Int | DataType::BigInt)
    }

    /// The one-byte tag used in the catalog encoding.
    pub fn tag(self) -> u8 {
        match self {
            DataType::Int => 1,
            DataType::BigInt => 2,
            DataType::Text => 3,
            DataType::Bool => 4,
        }
    }

    /// The type with the given catalog tag.
    pub fn from_tag(tag: u8) -> Option<DataType> {
        match tag {
            1 => Some(DataType::Int),
            2 => Some(DataType::BigInt),
            3 => Some(DataType::Text),
            4 => Some(DataType::Bool),
            _ => None,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// One value, typed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    Int(i32),
    BigInt(i64),
    Text(String),
    Bool(bool),
}

impl Value {
    /// The value's type; `None` for NULL.
    pub fn data_type(&self) -> Option<DataType> {
        match self {
            Value::Null => None,
            Value::Int(_) => Some(DataType::Int),
            Value::BigInt(_) => Some(DataType::BigInt),
            Value::Text(_) => Some(DataType::Text),
            Value::Bool(_) => Some(DataType::Bool),
        }
    }

    /// Whether it is NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The value as an i64, if it is an integer.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(value) => Some(i64::from(*value)),
            Value::BigInt(value) => Some(*value),
            _ => None,
        }
    }

    /// Converts to `target` where PostgreSQL would do so implicitly on
    /// assignment: integers between each other (range-checked), and
    /// text (from an untyped literal or a text parameter) parsed into the
    /// target type.
    pub fn coerce_to(self, target: DataType) -> SqlResult<Value> {
        match (self, target) {
            (Value::Null, _) => Ok(Value::Null),
            (value @ Value::Int(_), DataType::Int) => Ok(value),
            (Value::Int(value), DataType::BigInt) => Ok(Value::BigInt(i64::from(value))),
            (Value::BigInt(value), DataType::Int) => {
                i32::try_from(value).map(Value::Int).map_err(|_| SqlError::out_of_range("integer"))
            }
            (value @ Value::BigInt(_), DataType::BigInt) => Ok(value),
            (Value::Text(text), target) => parse_text(&text, target),
            (value @ Value::Bool(_), DataType::Bool) => Ok(value),
            (value, target) => Err(SqlError::new(
                sqlstate::DATATYPE_MISMATCH,
                format!(
                    "cannot use a value of type {} as {}",
                    value.data_type().map_or("unknown", DataType::name),
                    target.name()
                ),
            )),
        }
    }

    /// SQL comparison: `None` when either side is NULL (the result is
    /// unknown) or the types do not compare.
    pub fn compare(&self, other: &Value) -> Option<Ordering> {
        match (self, other) {
            (Value::Text(left), Value::Text(right)) => Some(left.cmp(right)),
            (Value::Bool(left), Value::Bool(right)) => Some(left.cmp(right)),
            (left, right) => Some(left.as_i64()?.cmp(&right.as_i64()?)),
        }
    }

    /// A total order for ORDER BY: NULL sorts after everything (as in
    /// PostgreSQL's default ASC NULLS LAST), then by [`Value::compare`].
    pub fn sort_cmp(&self, other: &Value) -> Ordering {
        match (self.is_null(), other.is_null()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => self.compare(other).unwrap_or(Ordering::Equal),
        }
    }

    /// The value in PostgreSQL's text output format (`t`/`f` for bools);
    /// `None` for NULL.
    pub fn to_text(&self) -> Option<String> {
        match self {
            Value::Null => None,
            Value::Int(value) => Some(value.to_string()),
            Value::BigInt(value) => Some(value.to_string()),
            Value::Text(text) => Some(text.clone()),
            Value::Bool(value) => Some(if *value { "t" } else { "f" }.to_owned()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_text() {
            Some(text) => formatter.write_str(&text),
            None => formatter.write_str("NULL"),
        }
    }
}

/// Parses PostgreSQL text input for `target` (`22P02` when it is not one,
/// `22003` when an integer is out of range).
pub fn parse_text(text: &str, target: DataType) -> SqlResult<Value> {
    let invalid = || {
        SqlError::new(
            sqlstate::INVALID_TEXT_REPRESENTATION,
            format!("invalid input syntax for type {}: \"{text}\"", target.name()),
        )
    };
    let trimmed = text.trim();
    match target {
        DataType::Text => Ok(Value::Text(text.to_owned())),
        DataType::Int | DataType::BigInt => {
            if trimmed.is_empty() || !trimmed.trim_start_matches(['-', '+']).bytes().all(|byte| byte.is_ascii_digit()) {
                return Err(invalid());
            }
            let wide: i64 = trimmed.parse().map_err(|_| SqlError::out_of_range(target.name()))?;
            Value::BigInt(wide).coerce_to(target)
        }
        DataType::Bool => match trimmed.to_ascii_lowercase().as_str() {
            "t" | "true" | "yes" | "y" | "on" | "1" => Ok(Value::Bool(true)),
            "f" | "false" | "no" | "n" | "off" | "0" => Ok(Value::Bool(false)),
            _ => Err(invalid()),
        },
    }
}

/// One column of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Lower-cased unless it was quoted.
    pub name: String,
    pub data_type: DataType,
    /// NOT NULL, or part of the primary key.
    pub not_null: bool,
}

/// A table's schema, as the catalog keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    /// The tree holding the rows, keyed by the primary key.
    pub tree: super::kv::TreeId,
    pub columns: Vec<Column>,
    /// Column indexes of the primary key, in key order. Empty: the table
    /// has no primary key and rows are keyed by a hidden BIGINT row id.
    pub primary_key: Vec<usize>,
    /// The next hidden row id to hand out (unused with a primary key).
    pub next_row_id: u64,
}

impl Table {
    /// The index of the column with this name.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|column| column.name == name)
    }

    /// Whether rows are keyed by the hidden row id.
    pub fn has_hidden_key(&self) -> bool {
        self.primary_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_parses_into_every_type_with_postgres_errors() {
        assert_eq!(parse_text(" 42 ", DataType::Int), Ok(Value::Int(42)));
        assert_eq!(parse_text("-9000000000", DataType::BigInt), Ok(Value::BigInt(-9_000_000_000)));
        assert_eq!(
            parse_text("9000000000", DataType::Int).map_err(|e| e.code),
            Err(sqlstate::NUMERIC_VALUE_OUT_OF_RANGE)
        );
        assert_eq!(parse_text("4x", DataType::Int).map_err(|e| e.code), Err(sqlstate::INVALID_TEXT_REPRESENTATION));
        assert_eq!(parse_text("on", DataType::Bool), Ok(Value::Bool(true)));
        assert_eq!(parse_text("maybe", DataType::Bool).map_err(|e| e.code), Err(sqlstate::INVALID_TEXT_REPRESENTATION));
    }

    #[test]
    fn integers_compare_across_widths_and_null_compares_to_nothing() {
        assert_eq!(Value::Int(3).compare(&Value::BigInt(3)), Some(Ordering::Equal));
        assert_eq!(Value::Null.compare(&Value::Int(1)), None);
        assert_eq!(Value::Text("a".into()).compare(&Value::Int(1)), None);
        assert_eq!(Value::Null.sort_cmp(&Value::Int(1)), Ordering::Greater);
        assert_eq!(
            Value::BigInt(1 << 40).coerce_to(DataType::Int).map_err(|e| e.code),
            Err(sqlstate::NUMERIC_VALUE_OUT_OF_RANGE)
        );
        assert_eq!(Value::Bool(true).coerce_to(DataType::Int).map_err(|e| e.code), Err(sqlstate::DATATYPE_MISMATCH));
    }
}

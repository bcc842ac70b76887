//! SQL errors: a PostgreSQL SQLSTATE code and a message.
//!
//! Every failure the engine reports to a client is a [`SqlError`]: a
//! value, never a panic. The server turns it into an `ErrorResponse`
//! carrying the code, so clients (psql, pgbench, drivers) can tell a
//! syntax error from a duplicate key from a storage failure, and the
//! session goes on with the next statement.

use std::fmt;

use super::kv::KvError;

/// The SQLSTATE codes the engine reports (PostgreSQL Appendix A).
pub mod sqlstate {
    /// `42601`: the statement does not parse.
    pub const SYNTAX_ERROR: &str = "42601";
    /// A change asked of a read replica.
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    /// `0A000`: valid SQL this engine does not implement.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// `42P01`: no such table.
    pub const UNDEFINED_TABLE: &str = "42P01";
    /// `42P07`: the table already exists.
    pub const DUPLICATE_TABLE: &str = "42P07";
    /// `42703`: no such column.
    pub const UNDEFINED_COLUMN: &str = "42703";
    /// `42701`: a column named twice in one table or column list.
    pub const DUPLICATE_COLUMN: &str = "42701";
    /// `42P16`: a table definition that makes no sense (two primary keys).
    pub const INVALID_TABLE_DEFINITION: &str = "42P16";
    /// `42622`: an identifier longer than 63 bytes.
    pub const NAME_TOO_LONG: &str = "42622";
    /// `42P10`: an ORDER BY position outside the select list.
    pub const INVALID_COLUMN_REFERENCE: &str = "42P10";
    /// `42846`: a cast that does not exist (`true::int`).
    pub const CANNOT_COERCE: &str = "42846";
    /// `2201W`: a negative LIMIT.
    pub const INVALID_ROW_COUNT_IN_LIMIT: &str = "2201W";
    /// `2201X`: a negative OFFSET.
    pub const INVALID_ROW_COUNT_IN_OFFSET: &str = "2201X";
    /// `42704`: no such object (a configuration parameter for `SHOW`).
    pub const UNDEFINED_OBJECT: &str = "42704";
    /// `42883`: no operator or function for these argument types.
    pub const UNDEFINED_FUNCTION: &str = "42883";
    /// `42803`: a plain column next to an aggregate, without GROUP BY.
    pub const GROUPING_ERROR: &str = "42803";
    /// `42804`: a value of the wrong type for its place.
    pub const DATATYPE_MISMATCH: &str = "42804";
    /// `42P18`: a parameter whose type cannot be worked out.
    pub const INDETERMINATE_DATATYPE: &str = "42P18";
    /// `23505`: a primary key that is already there.
    pub const UNIQUE_VIOLATION: &str = "23505";
    /// `23502`: NULL for a NOT NULL (or primary key) column.
    pub const NOT_NULL_VIOLATION: &str = "23502";
    /// `22P02`: text that is not a value of the type (`'abc'::int`).
    pub const INVALID_TEXT_REPRESENTATION: &str = "22P02";
    /// `22003`: an integer out of its type's range, or an overflow.
    pub const NUMERIC_VALUE_OUT_OF_RANGE: &str = "22003";
    /// `22012`: division by zero.
    pub const DIVISION_BY_ZERO: &str = "22012";
    /// `22023`: a bad argument (a negative LIMIT).
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    /// `08P01`: the client broke the protocol (wrong parameter count).
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// `25P02`: a statement inside a transaction block that already failed.
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    /// `54000`: a key, row or transaction over the storage limits.
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    /// `58030`: the storage underneath failed.
    pub const IO_ERROR: &str = "58030";
    /// `XX000`: a bug or a corrupt record.
    pub const INTERNAL_ERROR: &str = "XX000";
    /// `XX001`: a stored record that does not decode.
    pub const DATA_CORRUPTED: &str = "XX001";
    /// `53300`: the server's connection limit is reached.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// `25001`: a warning-level code, `BEGIN` inside a block.
    pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
    /// `25P01`: a warning-level code, `COMMIT` outside a block.
    pub const NO_ACTIVE_SQL_TRANSACTION: &str = "25P01";
}

/// One failed statement: what to tell the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    /// The five-character SQLSTATE, one of [`sqlstate`].
    pub code: &'static str,
    /// A human-readable message, PostgreSQL style (lower case, no period).
    pub message: String,
}

impl SqlError {
    /// An error with the given code.
    pub fn new(code: &'static str, message: impl Into<String>) -> SqlError {
        SqlError { code, message: message.into() }
    }

    /// `42601`.
    pub fn syntax(message: impl Into<String>) -> SqlError {
        SqlError::new(sqlstate::SYNTAX_ERROR, message)
    }

    /// `0A000`, for a thing this engine does not do.
    pub fn unsupported(what: impl fmt::Display) -> SqlError {
        SqlError::new(sqlstate::FEATURE_NOT_SUPPORTED, format!("{what} is not supported"))
    }

    /// `XX001`, for a stored record that does not decode.
    pub fn corrupt(what: impl fmt::Display) -> SqlError {
        SqlError::new(sqlstate::DATA_CORRUPTED, format!("corrupt record: {what}"))
    }

    /// `22003`, integer out of range.
    pub fn out_of_range(type_name: &str) -> SqlError {
        SqlError::new(sqlstate::NUMERIC_VALUE_OUT_OF_RANGE, format!("{type_name} out of range"))
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for SqlError {}

impl From<KvError> for SqlError {
    fn from(error: KvError) -> SqlError {
        let code = match &error {
            KvError::KeyTooLong { .. } | KvError::ValueTooLong { .. } | KvError::TransactionTooLarge(_) => {
                sqlstate::PROGRAM_LIMIT_EXCEEDED
            }
            KvError::Storage(_) => sqlstate::IO_ERROR,
            KvError::ReadOnly => sqlstate::READ_ONLY_SQL_TRANSACTION,
            KvError::NoSuchTree(_) | KvError::Undroppable(_) => sqlstate::INTERNAL_ERROR,
        };
        SqlError::new(code, error.to_string())
    }
}

/// What every fallible SQL call returns.
pub type SqlResult<T> = Result<T, SqlError>;

//! Resolved expressions and their evaluation.
//!
//! The planner turns sqlparser's expressions into [`Expr`]: column names
//! become column indexes, `$n` placeholders become parameter indexes,
//! aggregate calls become references to the aggregate's result, and every
//! node's type has been checked. Evaluation is then a plain recursive
//! walk over one row, with SQL's three-valued logic (`NULL AND false` is
//! false, `NULL = 1` is NULL) and PostgreSQL's integer arithmetic
//! (overflow is `22003`, division by zero `22012`).

use std::cmp::Ordering;

use super::error::{SqlError, SqlResult, sqlstate};
use super::types::{DataType, Value};

/// A binary operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    And,
    Or,
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Concat,
}

impl BinaryOp {
    /// The SQL spelling, for error messages.
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::And => "AND",
            BinaryOp::Or => "OR",
            BinaryOp::Eq => "=",
            BinaryOp::NotEq => "<>",
            BinaryOp::Lt => "<",
            BinaryOp::LtEq => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::GtEq => ">=",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Mod => "%",
            BinaryOp::Concat => "||",
        }
    }

    /// Whether it is one of the six comparisons.
    pub fn is_comparison(self) -> bool {
        matches!(self, BinaryOp::Eq | BinaryOp::NotEq | BinaryOp::Lt | BinaryOp::LtEq | BinaryOp::Gt | BinaryOp::GtEq)
    }

    /// `a op b` is `b flipped(op) a`, for comparisons.
    pub fn flipped(self) -> BinaryOp {
        match self {
            BinaryOp::Lt => BinaryOp::Gt,
            BinaryOp::LtEq => BinaryOp::GtEq,
            BinaryOp::Gt => BinaryOp::Lt,
            BinaryOp::GtEq => BinaryOp::LtEq,
            other => other,
        }
    }
}

/// A checked expression over one input row.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Literal(Value),
    /// The input row's column with this index.
    Column(usize),
    /// The statement parameter `$(n+1)`.
    Param(usize),
    /// The result of the query's n-th aggregate (aggregate queries only).
    Aggregate(usize),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Negate(Box<Expr>),
    IsNull {
        expr: Box<Expr>,
        negated: bool,
    },
    /// An explicit `CAST(x AS t)` or `x::t`.
    Cast(Box<Expr>, DataType),
    /// `CURRENT_TIMESTAMP`, `now()`: the current UTC time as ISO text.
    CurrentTimestamp,
}

/// What an expression may read while it is evaluated.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    pub row: &'a [Value],
    pub params: &'a [Value],
    pub aggregates: &'a [Value],
}

impl Expr {
    /// Whether the expression reads no column (and no aggregate): its
    /// value is known before any row is read, so it can bound a key scan.
    pub fn is_constant(&self) -> bool {
        match self {
            Expr::Literal(_) | Expr::Param(_) | Expr::CurrentTimestamp => true,
            Expr::Column(_) | Expr::Aggregate(_) => false,
            Expr::Binary(_, left, right) => left.is_constant() && right.is_constant(),
            Expr::Not(inner) | Expr::Negate(inner) | Expr::Cast(inner, _) => inner.is_constant(),
            Expr::IsNull { expr, .. } => expr.is_constant(),
        }
    }

    /// Evaluates the expression.
    pub fn eval(&self, context: &Context<'_>) -> SqlResult<Value> {
        match self {
            Expr::Literal(value) => Ok(value.clone()),
            Expr::Column(index) => {
                context.row.get(*index).cloned().ok_or_else(|| internal(format!("column {index} out of the row")))
            }
            Expr::Param(index) => context.params.get(*index).cloned().ok_or_else(|| {
                SqlError::new(sqlstate::PROTOCOL_VIOLATION, format!("no value for parameter ${}", index + 1))
            }),
            Expr::Aggregate(index) => {
                context.aggregates.get(*index).cloned().ok_or_else(|| internal(format!("aggregate {index} missing")))
            }
            Expr::Binary(op, left, right) => {
                let left = left.eval(context)?;
                // AND and OR look at the right side only when they must.
                match (op, &left) {
                    (BinaryOp::And, Value::Bool(false)) => return Ok(Value::Bool(false)),
                    (BinaryOp::Or, Value::Bool(true)) => return Ok(Value::Bool(true)),
                    _ => {}
                }
                binary(*op, left, right.eval(context)?)
            }
            Expr::Not(inner) => match inner.eval(context)? {
                Value::Null => Ok(Value::Null),
                Value::Bool(flag) => Ok(Value::Bool(!flag)),
                other => Err(mismatch(format!("argument of NOT must be type boolean, not {other}"))),
            },
            Expr::Negate(inner) => match inner.eval(context)? {
                Value::Null => Ok(Value::Null),
                Value::Int(number) => {
                    number.checked_neg().map(Value::Int).ok_or_else(|| SqlError::out_of_range("integer"))
                }
                Value::BigInt(number) => {
                    number.checked_neg().map(Value::BigInt).ok_or_else(|| SqlError::out_of_range("bigint"))
                }
                other => Err(undefined_operator(format!("operator does not exist: - {other}"))),
            },
            Expr::IsNull { expr, negated } => Ok(Value::Bool(expr.eval(context)?.is_null() != *negated)),
            Expr::Cast(inner, target) => cast(inner.eval(context)?, *target),
            Expr::CurrentTimestamp => Ok(Value::Text(current_timestamp())),
        }
    }

    /// Evaluates a filter: only `true` keeps the row (NULL does not).
    pub fn matches(&self, context: &Context<'_>) -> SqlResult<bool> {
        match self.eval(context)? {
            Value::Bool(flag) => Ok(flag),
            Value::Null => Ok(false),
            other => Err(mismatch(format!("argument of WHERE must be type boolean, not {other}"))),
        }
    }
}

fn internal(message: String) -> SqlError {
    SqlError::new(sqlstate::INTERNAL_ERROR, message)
}

fn mismatch(message: String) -> SqlError {
    SqlError::new(sqlstate::DATATYPE_MISMATCH, message)
}

fn undefined_operator(message: String) -> SqlError {
    SqlError::new(sqlstate::UNDEFINED_FUNCTION, message)
}

/// An explicit cast: everything converts to text; text parses into
/// anything; integers convert between widths; bools and integers do not
/// mix (as in PostgreSQL, save `int::bool`, which is not needed here).
pub fn cast(value: Value, target: DataType) -> SqlResult<Value> {
    match (value, target) {
        (Value::Null, _) => Ok(Value::Null),
        (value, DataType::Text) => Ok(value.to_text().map_or(Value::Null, Value::Text)),
        (value, target) => value.coerce_to(target),
    }
}

/// Applies a binary operator to two evaluated operands.
pub fn binary(op: BinaryOp, left: Value, right: Value) -> SqlResult<Value> {
    match op {
        BinaryOp::And => match (&left, &right) {
            (Value::Bool(false), _) | (_, Value::Bool(false)) => Ok(Value::Bool(false)),
            (Value::Bool(true), Value::Bool(true)) => Ok(Value::Bool(true)),
            (Value::Null | Value::Bool(_), Value::Null | Value::Bool(_)) => Ok(Value::Null),
            _ => Err(mismatch("argument of AND must be type boolean".into())),
        },
        BinaryOp::Or => match (&left, &right) {
            (Value::Bool(true), _) | (_, Value::Bool(true)) => Ok(Value::Bool(true)),
            (Value::Bool(false), Value::Bool(false)) => Ok(Value::Bool(false)),
            (Value::Null | Value::Bool(_), Value::Null | Value::Bool(_)) => Ok(Value::Null),
            _ => Err(mismatch("argument of OR must be type boolean".into())),
        },
        BinaryOp::Concat => match (left.to_text(), right.to_text()) {
            (Some(left), Some(right)) => Ok(Value::Text(left + &right)),
            _ => Ok(Value::Null),
        },
        _ if left.is_null() || right.is_null() => Ok(Value::Null),
        op if op.is_comparison() => {
            let ordering = left.compare(&right).ok_or_else(|| {
                undefined_operator(format!(
                    "operator does not exist: {} {} {}",
                    type_name(&left),
                    op.symbol(),
                    type_name(&right)
                ))
            })?;
            Ok(Value::Bool(match op {
                BinaryOp::Eq => ordering == Ordering::Equal,
                BinaryOp::NotEq => ordering != Ordering::Equal,
                BinaryOp::Lt => ordering == Ordering::Less,
                BinaryOp::LtEq => ordering != Ordering::Greater,
                BinaryOp::Gt => ordering == Ordering::Greater,
                _ => ordering != Ordering::Less,
            }))
        }
        op => arithmetic(op, &left, &right),
    }
}

fn type_name(value: &Value) -> &'static str {
    value.data_type().map_or("unknown", DataType::name)
}

fn arithmetic(op: BinaryOp, left: &Value, right: &Value) -> SqlResult<Value> {
    let no_operator = || {
        undefined_operator(format!("operator does not exist: {} {} {}", type_name(left), op.symbol(), type_name(right)))
    };
    if let (Value::Int(a), Value::Int(b)) = (left, right) {
        return integer_op(op, i64::from(*a), i64::from(*b))
            .and_then(|wide| i32::try_from(wide).map(Value::Int).map_err(|_| SqlError::out_of_range("integer")));
    }
    let (Some(a), Some(b)) = (left.as_i64(), right.as_i64()) else {
        return Err(no_operator());
    };
    integer_op(op, a, b).map(Value::BigInt)
}

/// i64 arithmetic with PostgreSQL's errors. i32 operands never overflow
/// i64 here, so the caller range-checks their result afterwards.
fn integer_op(op: BinaryOp, a: i64, b: i64) -> SqlResult<i64> {
    if matches!(op, BinaryOp::Div | BinaryOp::Mod) && b == 0 {
        return Err(SqlError::new(sqlstate::DIVISION_BY_ZERO, "division by zero"));
    }
    let result = match op {
        BinaryOp::Add => a.checked_add(b),
        BinaryOp::Sub => a.checked_sub(b),
        BinaryOp::Mul => a.checked_mul(b),
        BinaryOp::Div => a.checked_div(b),
        BinaryOp::Mod => a.checked_rem(b),
        _ => return Err(internal(format!("{} is not arithmetic", op.symbol()))),
    };
    result.ok_or_else(|| SqlError::out_of_range("bigint"))
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS.ffffff`, the text form of
/// a PostgreSQL `timestamp`.
pub fn current_timestamp() -> String {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format_timestamp(since_epoch.as_secs() as i64, since_epoch.subsec_micros())
}

/// Formats seconds since the Unix epoch (UTC) and microseconds.
pub fn format_timestamp(seconds: i64, micros: u32) -> String {
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{micros:06}",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(expr: &Expr) -> SqlResult<Value> {
        expr.eval(&Context { row: &[], params: &[], aggregates: &[] })
    }

    fn lit(value: Value) -> Box<Expr> {
        Box::new(Expr::Literal(value))
    }

    #[test]
    fn three_valued_logic_and_null_comparisons() {
        let null_and_false = Expr::Binary(BinaryOp::And, lit(Value::Null), lit(Value::Bool(false)));
        assert_eq!(eval(&null_and_false), Ok(Value::Bool(false)));
        let null_or_false = Expr::Binary(BinaryOp::Or, lit(Value::Null), lit(Value::Bool(false)));
        assert_eq!(eval(&null_or_false), Ok(Value::Null));
        assert_eq!(binary(BinaryOp::Eq, Value::Null, Value::Int(1)), Ok(Value::Null));
        assert_eq!(binary(BinaryOp::LtEq, Value::Int(1), Value::BigInt(1)), Ok(Value::Bool(true)));
        let not_null = Expr::Not(lit(Value::Null));
        assert_eq!(eval(&not_null), Ok(Value::Null));
    }

    #[test]
    fn integer_arithmetic_overflows_and_divides_like_postgres() {
        assert_eq!(
            binary(BinaryOp::Add, Value::Int(i32::MAX), Value::Int(1)).unwrap_err().code,
            sqlstate::NUMERIC_VALUE_OUT_OF_RANGE
        );
        assert_eq!(binary(BinaryOp::Add, Value::Int(i32::MAX), Value::BigInt(1)), Ok(Value::BigInt(1 << 31)));
        assert_eq!(binary(BinaryOp::Div, Value::Int(7), Value::Int(0)).unwrap_err().code, sqlstate::DIVISION_BY_ZERO);
        assert_eq!(binary(BinaryOp::Div, Value::Int(-7), Value::Int(2)), Ok(Value::Int(-3)));
        assert_eq!(
            binary(BinaryOp::Div, Value::BigInt(i64::MIN), Value::BigInt(-1)).unwrap_err().code,
            sqlstate::NUMERIC_VALUE_OUT_OF_RANGE
        );
        assert_eq!(
            binary(BinaryOp::Add, Value::Text("a".into()), Value::Int(1)).unwrap_err().code,
            sqlstate::UNDEFINED_FUNCTION
        );
        assert_eq!(binary(BinaryOp::Concat, Value::Text("a".into()), Value::Int(1)), Ok(Value::Text("a1".into())));
    }

    #[test]
    fn timestamps_format_as_postgres_text() {
        assert_eq!(format_timestamp(0, 0), "1970-01-01 00:00:00.000000");
        assert_eq!(format_timestamp(951_782_400 + 3_723, 5), "2000-02-29 01:02:03.000005");
        assert_eq!(current_timestamp().len(), "1970-01-01 00:00:00.000000".len());
    }
}

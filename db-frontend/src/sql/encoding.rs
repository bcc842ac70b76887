//! Byte encodings: order-preserving keys, versioned rows, catalog records.
//!
//! `docs/sql-format.md` describes all three byte by byte; this module is
//! the one implementation.
//!
//! **Keys** are *memcomparable*: comparing two encoded keys as unsigned
//! bytes (what every [`KvTxn::scan`](super::kv::KvTxn::scan) does) gives
//! the same order as comparing the SQL values. Integers of both widths are
//! eight bytes big-endian with the sign bit flipped, so `-1 < 0 < 1` holds
//! bytewise and an `INT` key and a `BIGINT` bound encode alike. Text is
//! its bytes with every `0x00` escaped as `0x00 0xFF`, closed by the
//! terminator `0x00 0x01`: no encoded text is a prefix of another unless
//! the values are equal, so a composite key (the columns' encodings one
//! after another) still sorts column by column.
//!
//! **Rows** carry a version byte, the column count, a NULL bitmap and
//! then every non-NULL column in schema order, little-endian. A row with
//! fewer columns than the schema reads the missing ones as NULL, which
//! leaves room for `ALTER TABLE ADD COLUMN` without rewriting rows.

use super::error::{SqlError, SqlResult};
use super::kv::TreeId;
use super::types::{Column, DataType, Table, Value};

/// The first byte of every encoded row.
pub const ROW_FORMAT_VERSION: u8 = 1;
/// The first byte of every catalog table record.
pub const CATALOG_FORMAT_VERSION: u8 = 1;
/// The prefix byte of a catalog key naming a table.
pub const CATALOG_TABLE_PREFIX: u8 = b'T';
/// Text key bytes: `0x00` inside text is written as these two bytes.
const TEXT_ESCAPED_ZERO: [u8; 2] = [0x00, 0xFF];
/// Text key bytes: the end of a text value.
const TEXT_TERMINATOR: [u8; 2] = [0x00, 0x01];
/// Flipping this bit turns two's-complement order into unsigned order.
const SIGN_BIT: u64 = 1 << 63;

/// Appends the memcomparable encoding of one non-NULL key value.
pub fn encode_key_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Int(_) | Value::BigInt(_) => {
            let wide = value.as_i64().unwrap_or_default();
            out.extend_from_slice(&((wide as u64) ^ SIGN_BIT).to_be_bytes());
        }
        Value::Bool(flag) => out.push(u8::from(*flag)),
        Value::Text(text) => {
            for &byte in text.as_bytes() {
                if byte == 0 {
                    out.extend_from_slice(&TEXT_ESCAPED_ZERO);
                } else {
                    out.push(byte);
                }
            }
            out.extend_from_slice(&TEXT_TERMINATOR);
        }
        // Callers reject NULL keys (23502) before encoding; a NULL would
        // sort first, which is harmless for a scan bound.
        Value::Null => {}
    }
}

/// The key of a row with these primary key values, in key order.
pub fn encode_key(values: &[Value]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 9);
    for value in values {
        encode_key_value(value, &mut out);
    }
    out
}

/// The key of a row of a table without primary key.
pub fn encode_row_id(row_id: u64) -> Vec<u8> {
    encode_key(&[Value::BigInt(row_id as i64)])
}

/// The smallest byte string greater than every string starting with
/// `prefix`, or `None` when there is none (the prefix is all `0xFF`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn push_varint(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7F) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A reader over an encoded record; every read fails as "corrupt" past
/// the end.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> SqlResult<&'a [u8]> {
        if self.bytes.len() < count {
            return Err(SqlError::corrupt(format!("{} is truncated", self.what)));
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> SqlResult<[u8; N]> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> SqlResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> SqlResult<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn varint(&mut self) -> SqlResult<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(SqlError::corrupt(format!("{} has an overlong length", self.what)))
    }

    fn text(&mut self, length: usize) -> SqlResult<String> {
        let bytes = self.take(length)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| SqlError::corrupt(format!("{} holds invalid UTF-8", self.what)))
    }

    fn finish(&self) -> SqlResult<()> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(SqlError::corrupt(format!("{} has {} trailing bytes", self.what, self.bytes.len())))
        }
    }
}

/// Encodes a row whose values already have the column types.
pub fn encode_row(values: &[Value]) -> Vec<u8> {
    let count = values.len();
    let mut out = Vec::with_capacity(3 + count.div_ceil(8) + count * 8);
    out.push(ROW_FORMAT_VERSION);
    out.extend_from_slice(&(count as u16).to_le_bytes());
    let bitmap_start = out.len();
    out.resize(bitmap_start + count.div_ceil(8), 0);
    for (index, value) in values.iter().enumerate() {
        match value {
            Value::Null => out[bitmap_start + index / 8] |= 1 << (index % 8),
            Value::Int(number) => out.extend_from_slice(&number.to_le_bytes()),
            Value::BigInt(number) => out.extend_from_slice(&number.to_le_bytes()),
            Value::Bool(flag) => out.push(u8::from(*flag)),
            Value::Text(text) => {
                push_varint(text.len() as u64, &mut out);
                out.extend_from_slice(text.as_bytes());
            }
        }
    }
    out
}

/// Decodes a row of a table with these columns.
pub fn decode_row(bytes: &[u8], columns: &[Column]) -> SqlResult<Vec<Value>> {
    let mut reader = Reader { bytes, what: "row" };
    let version = reader.u8()?;
    if version != ROW_FORMAT_VERSION {
        return Err(SqlError::corrupt(format!("row format version {version}")));
    }
    let count = usize::from(reader.u16()?);
    if count > columns.len() {
        return Err(SqlError::corrupt(format!("row of {count} columns in a table of {}", columns.len())));
    }
    let bitmap = reader.take(count.div_ceil(8))?;
    let mut values = Vec::with_capacity(columns.len());
    for (index, column) in columns.iter().enumerate().take(count) {
        if bitmap[index / 8] & (1 << (index % 8)) != 0 {
            values.push(Value::Null);
            continue;
        }
        values.push(match column.data_type {
            DataType::Int => Value::Int(i32::from_le_bytes(reader.array()?)),
            DataType::BigInt => Value::BigInt(i64::from_le_bytes(reader.array()?)),
            DataType::Bool => Value::Bool(reader.u8()? != 0),
            DataType::Text => {
                let length = usize::try_from(reader.varint()?).map_err(|_| SqlError::corrupt("row text length"))?;
                Value::Text(reader.text(length)?)
            }
        });
    }
    values.resize(columns.len(), Value::Null);
    reader.finish()?;
    Ok(values)
}

/// The catalog key of the table with this name.
pub fn catalog_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(CATALOG_TABLE_PREFIX);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Encodes a table's catalog record (its name is in the key).
pub fn encode_table(table: &Table) -> Vec<u8> {
    let mut out = vec![CATALOG_FORMAT_VERSION];
    out.extend_from_slice(&table.tree.0.to_le_bytes());
    out.extend_from_slice(&table.next_row_id.to_le_bytes());
    out.extend_from_slice(&(table.columns.len() as u16).to_le_bytes());
    for column in &table.columns {
        out.push(column.data_type.tag());
        out.push(u8::from(column.not_null));
        out.extend_from_slice(&(column.name.len() as u16).to_le_bytes());
        out.extend_from_slice(column.name.as_bytes());
    }
    out.extend_from_slice(&(table.primary_key.len() as u16).to_le_bytes());
    for &index in &table.primary_key {
        out.extend_from_slice(&(index as u16).to_le_bytes());
    }
    out
}

/// Decodes a catalog record of the table `name`.
pub fn decode_table(name: &str, bytes: &[u8]) -> SqlResult<Table> {
    let mut reader = Reader { bytes, what: "catalog record" };
    let version = reader.u8()?;
    if version != CATALOG_FORMAT_VERSION {
        return Err(SqlError::corrupt(format!("catalog format version {version}")));
    }
    let tree = TreeId(u32::from_le_bytes(reader.array()?));
    let next_row_id = u64::from_le_bytes(reader.array()?);
    let column_count = usize::from(reader.u16()?);
    let mut columns = Vec::with_capacity(column_count);
    for _ in 0..column_count {
        let tag = reader.u8()?;
        let data_type = DataType::from_tag(tag).ok_or_else(|| SqlError::corrupt(format!("column type tag {tag}")))?;
        let not_null = reader.u8()? != 0;
        let length = usize::from(reader.u16()?);
        let name = reader.text(length)?;
        columns.push(Column { name, data_type, not_null });
    }
    let key_count = usize::from(reader.u16()?);
    let mut primary_key = Vec::with_capacity(key_count);
    for _ in 0..key_count {
        let index = usize::from(reader.u16()?);
        if index >= columns.len() {
            return Err(SqlError::corrupt(format!("primary key column {index}")));
        }
        primary_key.push(index);
    }
    reader.finish()?;
    Ok(Table { name: name.to_owned(), tree, columns, primary_key, next_row_id })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i32>().prop_map(Value::Int),
            any::<i64>().prop_map(Value::BigInt),
            any::<bool>().prop_map(Value::Bool),
            // Include NUL bytes and 0xFF-heavy text, the escaping's edge cases.
            proptest::collection::vec(prop_oneof![Just('\0'), Just('\u{ff}'), Just('a'), any::<char>()], 0..6)
                .prop_map(|chars| Value::Text(chars.into_iter().collect())),
        ]
    }

    /// The same-shape pairs: both integers, both bools or both text.
    fn comparable(left: &Value, right: &Value) -> bool {
        left.compare(right).is_some()
    }

    proptest! {
        #[test]
        fn key_encoding_preserves_order(left in key_value(), right in key_value()) {
            prop_assume!(comparable(&left, &right));
            let ordering = left.compare(&right).unwrap();
            prop_assert_eq!(encode_key(std::slice::from_ref(&left)).cmp(&encode_key(std::slice::from_ref(&right))), ordering);
        }

        #[test]
        fn composite_keys_sort_column_by_column(
            a in "[a\\x00b]{0,4}", b in any::<i64>(), c in "[a\\x00b]{0,4}", d in any::<i64>()
        ) {
            let left = [Value::Text(a.clone()), Value::BigInt(b)];
            let right = [Value::Text(c.clone()), Value::BigInt(d)];
            let expected = a.cmp(&c).then(b.cmp(&d));
            prop_assert_eq!(encode_key(&left).cmp(&encode_key(&right)), expected);
        }

        #[test]
        fn rows_round_trip(values in proptest::collection::vec(prop_oneof![
            Just(Value::Null), any::<i32>().prop_map(Value::Int), any::<i64>().prop_map(Value::BigInt),
            any::<bool>().prop_map(Value::Bool), ".{0,20}".prop_map(Value::Text)], 0..20)) {
            let columns: Vec<Column> = values.iter().enumerate().map(|(index, value)| Column {
                name: format!("c{index}"),
                data_type: value.data_type().unwrap_or(DataType::Text),
                not_null: false,
            }).collect();
            prop_assert_eq!(decode_row(&encode_row(&values), &columns).unwrap(), values);
        }
    }

    #[test]
    fn integer_keys_are_eight_bytes_with_the_sign_flipped() {
        assert_eq!(encode_key(&[Value::Int(1)]), vec![0x80, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(encode_key(&[Value::BigInt(-1)]), vec![0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(encode_key(&[Value::Text("a\0".into())]), vec![b'a', 0, 0xFF, 0, 1]);
        assert_eq!(prefix_end(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF]), None);
    }

    #[test]
    fn a_short_row_reads_missing_columns_as_null_and_garbage_is_corrupt() {
        let columns = vec![
            Column { name: "a".into(), data_type: DataType::Int, not_null: false },
            Column { name: "b".into(), data_type: DataType::Text, not_null: false },
        ];
        let short = encode_row(&[Value::Int(7)]);
        assert_eq!(decode_row(&short, &columns).unwrap(), vec![Value::Int(7), Value::Null]);
        assert_eq!(short, vec![ROW_FORMAT_VERSION, 1, 0, 0, 7, 0, 0, 0]);
        assert!(decode_row(&short[..5], &columns).is_err());
        assert!(decode_row(&[9, 0, 0], &columns).is_err());
    }

    #[test]
    fn tables_round_trip_through_the_catalog_encoding() {
        let table = Table {
            name: "t".into(),
            tree: TreeId(7),
            columns: vec![
                Column { name: "id".into(), data_type: DataType::BigInt, not_null: true },
                Column { name: "name".into(), data_type: DataType::Text, not_null: false },
            ],
            primary_key: vec![0],
            next_row_id: 3,
        };
        assert_eq!(decode_table("t", &encode_table(&table)).unwrap(), table);
        assert!(decode_table("t", &encode_table(&table)[..10]).is_err());
    }
}

//! Tables read by `COPY … TO STDOUT (FORMAT binary)` and written as JSON on the client. The
//! server sends integers and timestamps as numbers (spelling them as text was a third of the
//! COPY of a table of them) and text as its characters; the client spells each value as the
//! export's format wants it, on its own core while the server produces the next rows.

use futures::TryStreamExt;
use sqlx::PgConnection;
use tokio::io::AsyncWrite;

use super::writer::{FLUSH_BYTES, Output, ended_mid_row, push_raw_json_string, short_row};
use crate::engine::Error;
use crate::engine::catalog::{self, Column};
use crate::engine::identifier::quote_ident;

/// How a format writes values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spelling {
    /// As `row_to_json` writes them with `TimeZone` UTC (statekeeper's logical format).
    Json,
    /// Each as a JSON string of its `::text` form under the exact format's settings (ISO
    /// DateStyle, UTC), `null` for NULL.
    Text,
}

/// What a column's binary value is, for writing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// `smallint`, `integer`, `bigint`: big-endian.
    Integer,
    /// One byte.
    Boolean,
    /// Characters: text-like types, and anything selected as `::text`.
    Chars,
    /// Microseconds from 2000-01-01.
    Timestamp { with_zone: bool },
    /// `jsonb`: a version byte, then its text.
    Jsonb,
    /// JSON text: `json`, or `to_json(column)` computed by the server.
    Json,
}

/// How to select a column of `type_name` (its SQL `column`) and what its binary value is then.
/// Types without a shape of their own are left to PostgreSQL: `to_json` for JSON, which keeps
/// numerics, arrays and domains exact, and `::text` for text.
fn column_shape(type_name: &str, column: &str, spelling: Spelling) -> (Shape, String) {
    let own = |shape| (shape, column.to_owned());
    match (type_name, spelling) {
        ("bigint" | "integer" | "smallint", _) => own(Shape::Integer),
        ("boolean", _) => own(Shape::Boolean),
        ("text", _) => own(Shape::Chars),
        (t, _) if t.starts_with("character varying") => own(Shape::Chars),
        ("jsonb", _) => own(Shape::Jsonb),
        ("json", _) => own(Shape::Json),
        ("timestamp with time zone", _) => own(Shape::Timestamp { with_zone: true }),
        ("timestamp without time zone", _) => own(Shape::Timestamp { with_zone: false }),
        // JSON gets a `char(n)` with its padding and a name as it is, as their binary forms are;
        // their `::text` casts trim the one and keep the other.
        ("name", Spelling::Json) => own(Shape::Chars),
        (t, Spelling::Json) if t.starts_with("character(") => own(Shape::Chars),
        (_, Spelling::Json) => (Shape::Json, format!("to_json({column})")),
        (_, Spelling::Text) => (Shape::Chars, format!("{column}::text")),
    }
}

impl Shape {
    /// Appends the JSON for one non-NULL binary value.
    fn push(self, value: &[u8], spelling: Spelling, json: &mut Vec<u8>) -> Result<(), Error> {
        let quoted = spelling == Spelling::Text;
        match self {
            Self::Integer => {
                let mut digits = itoa::Buffer::new();
                let text = match *value {
                    [a, b] => digits.format(i16::from_be_bytes([a, b])),
                    [a, b, c, d] => digits.format(i32::from_be_bytes([a, b, c, d])),
                    [a, b, c, d, e, f, g, h] => {
                        digits.format(i64::from_be_bytes([a, b, c, d, e, f, g, h]))
                    }
                    _ => return Err(malformed_binary("an integer")),
                };
                push_maybe_quoted(text.as_bytes(), quoted, json);
            }
            Self::Boolean => match value {
                [0] => push_maybe_quoted(b"false", quoted, json),
                [_] => push_maybe_quoted(b"true", quoted, json),
                _ => return Err(malformed_binary("a boolean")),
            },
            Self::Chars => push_raw_json_string(value, json),
            Self::Timestamp { with_zone } => {
                let micros = <[u8; 8]>::try_from(value)
                    .map(i64::from_be_bytes)
                    .map_err(|_| malformed_binary("a timestamp"))?;
                push_timestamp(micros, with_zone, spelling, json);
            }
            Self::Jsonb => match value.split_first() {
                Some((1, text)) => Self::Json.push(text, spelling, json)?,
                _ => return Err(malformed_binary("a jsonb value of version 1")),
            },
            Self::Json if quoted => push_raw_json_string(value, json),
            Self::Json => json.extend_from_slice(value),
        }
        Ok(())
    }
}

fn push_maybe_quoted(text: &[u8], quoted: bool, json: &mut Vec<u8>) {
    if quoted {
        json.push(b'"');
        json.extend_from_slice(text);
        json.push(b'"');
    } else {
        json.extend_from_slice(text);
    }
}

/// Streams the rows of `table` (qualified, aliased `t` in `rest`: a `WHERE`/`ORDER BY` tail) as
/// the JSON objects `row_to_json(t)` makes with `TimeZone` UTC, byte for byte, comma-separated;
/// returns how many. The caller's transaction must have `TimeZone` UTC for the columns the
/// server turns into JSON itself (`row_to_json` for every row had cost PostgreSQL two to three
/// times a COPY).
pub(crate) async fn stream_table_as_objects<W: AsyncWrite + Unpin + Send>(
    conn: &mut PgConnection,
    out: &mut Output<W>,
    schema: &str,
    table: &str,
    rest: &str,
) -> Result<u64, Error> {
    let columns = catalog::columns(conn, schema, table).await?;
    let columns = columns
        .iter()
        .map(|(name, type_name)| (name.as_str(), type_name.as_str()));
    stream_rows(conn, out, schema, table, rest, columns, Spelling::Json).await
}

/// Streams every row of `table` as a JSON array of its values' text forms (`["v", null, …]`),
/// comma-separated; returns how many. The caller's transaction must hold the exact format's
/// settings (ISO DateStyle, UTC).
pub(crate) async fn stream_table_as_arrays<W: AsyncWrite + Unpin + Send>(
    conn: &mut PgConnection,
    out: &mut Output<W>,
    schema: &str,
    table: &str,
    columns: &[Column],
) -> Result<u64, Error> {
    let columns = columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_name.as_str()));
    stream_rows(conn, out, schema, table, "", columns, Spelling::Text).await
}

/// Writes each row as a JSON object of its columns (`Spelling::Json`) or an array of their values
/// (`Spelling::Text`).
async fn stream_rows<'a, W: AsyncWrite + Unpin + Send>(
    conn: &mut PgConnection,
    out: &mut Output<W>,
    schema: &str,
    table: &str,
    rest: &str,
    columns: impl Iterator<Item = (&'a str, &'a str)>,
    spelling: Spelling,
) -> Result<u64, Error> {
    // What goes before each value, and after the last.
    let mut prefixes = Vec::new();
    let mut shapes = Vec::new();
    let mut selected = Vec::new();
    for (i, (name, type_name)) in columns.enumerate() {
        let separator = if i == 0 { "" } else { "," };
        prefixes.push(match spelling {
            Spelling::Json => {
                let key =
                    serde_json::to_string(name).map_err(|e| Error::ExportWrite(e.to_string()))?;
                format!("{}{key}:", if i == 0 { "{" } else { separator }).into_bytes()
            }
            Spelling::Text => if i == 0 { "[" } else { separator }.as_bytes().to_vec(),
        });
        let (shape, select) =
            column_shape(type_name, &format!("t.{}", quote_ident(name)), spelling);
        shapes.push(shape);
        selected.push(select);
    }
    let end = match spelling {
        Spelling::Json => b'}',
        Spelling::Text => b']',
    };
    let sql = format!(
        "COPY (SELECT {} FROM {}.{} t {rest}) TO STDOUT (FORMAT binary)",
        selected.join(", "),
        quote_ident(schema),
        quote_ident(table)
    );
    let mut copy = conn.copy_out_raw(&sql).await?;
    let mut reader = BinaryRows::new(shapes.len());
    let mut rows = 0u64;
    let mut written = Vec::with_capacity(FLUSH_BYTES + 64 * 1024);
    while let Some(chunk) = copy.try_next().await? {
        reader.read(&chunk, |row| {
            if rows > 0 {
                written.push(b',');
            }
            rows += 1;
            let mut fields = BinaryFields(row);
            for (prefix, shape) in prefixes.iter().zip(&shapes) {
                written.extend_from_slice(prefix);
                match fields.next_field()? {
                    None => written.extend_from_slice(b"null"),
                    Some(value) => shape.push(value, spelling, &mut written)?,
                }
            }
            written.push(end);
            Ok(())
        })?;
        if written.len() >= FLUSH_BYTES {
            out.write(&written).await?;
            written.clear();
        }
    }
    reader.finish()?;
    out.write(&written).await?;
    Ok(rows)
}

/// The rows of a `COPY … (FORMAT binary)` from the chunks the server sends, which need not end
/// where rows do: a signature, flags and a header extension; per row an int16 field count and,
/// per field, an int32 length (-1 for NULL) and the value; an int16 -1 at the end.
struct BinaryRows {
    columns: usize,
    header_read: bool,
    ended: bool,
    /// The unread start of a row (or of the header) the last chunk ended in.
    pending: Vec<u8>,
}

pub(crate) const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl BinaryRows {
    fn new(columns: usize) -> Self {
        Self {
            columns,
            header_read: false,
            ended: false,
            pending: Vec::new(),
        }
    }

    /// Hands every row that `chunk` completes to `row` (its fields, after the count).
    fn read(
        &mut self,
        chunk: &[u8],
        row: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if self.pending.is_empty() {
            let used = self.read_whole(chunk, row)?;
            self.pending.extend_from_slice(&chunk[used..]);
        } else {
            let mut buffer = std::mem::take(&mut self.pending);
            buffer.extend_from_slice(chunk);
            let used = self.read_whole(&buffer, row)?;
            buffer.drain(..used);
            self.pending = buffer;
        }
        Ok(())
    }

    /// Reads what is complete in `bytes`; returns how many bytes that was.
    fn read_whole(
        &mut self,
        bytes: &[u8],
        mut row: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<usize, Error> {
        let mut at = 0;
        if !self.header_read {
            let fixed = BINARY_SIGNATURE.len() + 8;
            if bytes.len() < fixed {
                return Ok(0);
            }
            if !bytes.starts_with(BINARY_SIGNATURE) {
                return Err(malformed_binary("the signature"));
            }
            let flags = be_i32(&bytes[BINARY_SIGNATURE.len()..]);
            let extension = be_i32(&bytes[BINARY_SIGNATURE.len() + 4..]);
            if flags != 0 || extension < 0 {
                return Err(malformed_binary("the header"));
            }
            let end = fixed + extension as usize;
            if bytes.len() < end {
                return Ok(0);
            }
            self.header_read = true;
            at = end;
        }
        while at + 2 <= bytes.len() {
            if self.ended {
                return Err(malformed_binary("the end"));
            }
            let count = i16::from_be_bytes([bytes[at], bytes[at + 1]]);
            if count == -1 {
                self.ended = true;
                at += 2;
                continue;
            }
            if count as usize != self.columns {
                return Err(short_row());
            }
            let start = at + 2;
            let mut end = start;
            for _ in 0..self.columns {
                if end + 4 > bytes.len() {
                    return Ok(at);
                }
                let length = be_i32(&bytes[end..]);
                end += 4 + usize::try_from(length).unwrap_or(0);
            }
            if end > bytes.len() {
                return Ok(at);
            }
            row(&bytes[start..end])?;
            at = end;
        }
        Ok(at)
    }

    /// Fails unless the COPY ended where a row did, with its trailer.
    fn finish(&self) -> Result<(), Error> {
        if self.ended && self.pending.is_empty() {
            Ok(())
        } else {
            Err(ended_mid_row())
        }
    }
}

/// The fields of one complete binary row, in order; `None` for NULL.
struct BinaryFields<'a>(&'a [u8]);

impl<'a> BinaryFields<'a> {
    fn next_field(&mut self) -> Result<Option<&'a [u8]>, Error> {
        if self.0.len() < 4 {
            return Err(short_row());
        }
        let length = be_i32(self.0);
        let rest = &self.0[4..];
        if length < 0 {
            self.0 = rest;
            return Ok(None);
        }
        let value = rest.get(..length as usize).ok_or_else(short_row)?;
        self.0 = &rest[value.len()..];
        Ok(Some(value))
    }
}

/// The big-endian int32 `bytes` starts with (callers check that four are there).
fn be_i32(bytes: &[u8]) -> i32 {
    i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn malformed_binary(what: &str) -> Error {
    Error::ExportWrite(format!(
        "PostgreSQL sent a binary COPY with malformed {what}; refusing to write a corrupt export"
    ))
}

/// A timestamp in UTC from its microseconds since 2000-01-01, as a JSON string: as `to_json`
/// writes it (`"2024-05-01T10:20:30.5+00:00"`) or as its text in the ISO DateStyle
/// (`"2024-05-01 10:20:30.5+00"`); years past 9999 in full, ` BC` after the offset, and
/// `"infinity"`/`"-infinity"`. PostgreSQL's calendar is the proleptic Gregorian one.
fn push_timestamp(micros: i64, with_zone: bool, spelling: Spelling, json: &mut Vec<u8>) {
    const MICROS_PER_DAY: i64 = 86_400_000_000;
    /// Days from 1970-01-01 (where the civil-date arithmetic counts from) to 2000-01-01.
    const POSTGRES_EPOCH_DAYS: i64 = 10_957;
    match micros {
        i64::MAX => return json.extend_from_slice(b"\"infinity\""),
        i64::MIN => return json.extend_from_slice(b"\"-infinity\""),
        _ => {}
    }
    let (year, month, day) =
        civil_from_days(micros.div_euclid(MICROS_PER_DAY) + POSTGRES_EPOCH_DAYS);
    let in_day = micros.rem_euclid(MICROS_PER_DAY);
    let seconds = in_day / 1_000_000;
    let fraction = in_day % 1_000_000;
    // Astronomical year 0 is 1 BC.
    let (shown_year, before_christ) = if year <= 0 {
        (1 - year, true)
    } else {
        (year, false)
    };
    json.push(b'"');
    let mut digits = itoa::Buffer::new();
    let year_digits = digits.format(shown_year);
    json.extend(std::iter::repeat_n(
        b'0',
        4usize.saturating_sub(year_digits.len()),
    ));
    json.extend_from_slice(year_digits.as_bytes());
    let (date_time, offset): (u8, &[u8]) = match spelling {
        Spelling::Json => (b'T', b"+00:00"),
        Spelling::Text => (b' ', b"+00"),
    };
    for (separator, value) in [
        (b'-', month),
        (b'-', day),
        (date_time, seconds / 3600),
        (b':', seconds / 60 % 60),
        (b':', seconds % 60),
    ] {
        json.push(separator);
        json.push(b'0' + (value / 10) as u8);
        json.push(b'0' + (value % 10) as u8);
    }
    if fraction != 0 {
        let mut six = [b'0'; 6];
        let mut rest = fraction;
        for digit in six.iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        let kept = six.iter().rposition(|d| *d != b'0').map_or(0, |at| at + 1);
        json.push(b'.');
        json.extend_from_slice(&six[..kept]);
    }
    if with_zone {
        json.extend_from_slice(offset);
    }
    if before_christ {
        json.extend_from_slice(b" BC");
    }
    json.push(b'"');
}

/// The (year, month, day) of a day counted from 1970-01-01, in the proleptic Gregorian calendar
/// with astronomical years (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::{BINARY_SIGNATURE, BinaryFields, BinaryRows};

    /// A binary COPY of two columns: a header with a 3-byte extension, `(7, 'ab')`,
    /// `(NULL, '')`, the trailer.
    fn binary_copy() -> Vec<u8> {
        let mut bytes = BINARY_SIGNATURE.to_vec();
        bytes.extend_from_slice(&0i32.to_be_bytes());
        bytes.extend_from_slice(&3i32.to_be_bytes());
        bytes.extend_from_slice(b"ext");
        for row in [
            [Some(&7i64.to_be_bytes()[..]), Some(b"ab")],
            [None, Some(b"")],
        ] {
            bytes.extend_from_slice(&2i16.to_be_bytes());
            for field in row {
                match field {
                    Some(value) => {
                        bytes.extend_from_slice(&(value.len() as i32).to_be_bytes());
                        bytes.extend_from_slice(value);
                    }
                    None => bytes.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
        }
        bytes.extend_from_slice(&(-1i16).to_be_bytes());
        bytes
    }

    /// Every row `chunks` hold, as its fields.
    fn read_rows(chunks: &[&[u8]]) -> Result<Vec<Vec<Option<Vec<u8>>>>, super::Error> {
        let mut reader = BinaryRows::new(2);
        let mut rows = Vec::new();
        for chunk in chunks {
            reader.read(chunk, |row| {
                let mut fields = BinaryFields(row);
                let mut values = Vec::new();
                for _ in 0..2 {
                    values.push(fields.next_field()?.map(<[u8]>::to_vec));
                }
                rows.push(values);
                Ok(())
            })?;
        }
        reader.finish()?;
        Ok(rows)
    }

    #[test]
    fn binary_rows_are_read_wherever_the_chunks_split_them() {
        let bytes = binary_copy();
        let whole = read_rows(&[&bytes]).unwrap();
        assert_eq!(
            whole,
            vec![
                vec![Some(7i64.to_be_bytes().to_vec()), Some(b"ab".to_vec())],
                vec![None, Some(Vec::new())],
            ]
        );
        for at in 0..=bytes.len() {
            let (first, second) = bytes.split_at(at);
            assert_eq!(read_rows(&[first, second]).unwrap(), whole, "split at {at}");
        }
        let bytes_one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(read_rows(&bytes_one_by_one).unwrap(), whole);
    }

    #[test]
    fn a_cut_or_malformed_binary_copy_is_refused() {
        let bytes = binary_copy();
        for at in 0..bytes.len() {
            assert!(read_rows(&[&bytes[..at]]).is_err(), "cut at {at}");
        }
        let mut other_signature = bytes.clone();
        other_signature[0] = b'X';
        assert!(read_rows(&[&other_signature]).is_err());
        let mut with_oids = bytes.clone();
        with_oids[BINARY_SIGNATURE.len() + 1] = 1;
        assert!(read_rows(&[&with_oids]).is_err());
        let mut three_columns = bytes.clone();
        three_columns[BINARY_SIGNATURE.len() + 11] = 3;
        assert!(read_rows(&[&three_columns]).is_err());
        let mut after_the_end = bytes;
        after_the_end.extend_from_slice(&2i16.to_be_bytes());
        assert!(read_rows(&[&after_the_end]).is_err());
    }
}

//! A streaming cursor over one JSON document. It walks the structure the caller asks for
//! (objects, arrays, keys) and hands out each value it is asked for as raw bytes, found by a byte
//! scan that only tracks strings and nesting; serde then parses those bytes from a slice. This is
//! several times faster than serde's own byte-at-a-time reader, and memory holds one value at a
//! time. The bytes `raw` returns are not validated: callers parse them.

use std::io::Read;

use sha2::{Digest, Sha256};

/// Where a malformed document went wrong.
#[derive(Debug)]
pub struct ScanError(pub String);

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, ScanError>;

pub struct Cursor<R> {
    reader: R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
    /// Bytes dropped from the front of `buf` so far (for error positions).
    offset: u64,
    /// While [`Cursor::digest`] runs: the hash of the value's bytes so far, and where in `buf`
    /// its unhashed part starts.
    tap: Option<(Sha256, usize)>,
}

const READ_SIZE: usize = 256 * 1024;

impl<R: Read> Cursor<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            buf: vec![0; READ_SIZE],
            pos: 0,
            end: 0,
            eof: false,
            offset: 0,
            tap: None,
        }
    }

    /// Reads more, keeping `buf[keep..]`; returns false at the end of the input.
    fn fill(&mut self, keep: usize) -> Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if keep > 0 {
            if let Some((hasher, from)) = self.tap.as_mut() {
                if *from < keep {
                    hasher.update(&self.buf[*from..keep]);
                    *from = keep;
                }
                *from -= keep;
            }
            self.buf.copy_within(keep..self.end, 0);
            self.offset += keep as u64;
            self.end -= keep;
            self.pos -= keep;
        }
        if self.buf.len() - self.end < READ_SIZE / 2 {
            self.buf.resize(self.buf.len().max(READ_SIZE) * 2, 0);
        }
        loop {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ScanError(format!("cannot read the file: {e}"))),
            }
        }
    }

    fn error(&self, what: &str) -> ScanError {
        ScanError(format!("{what} at byte {}", self.offset + self.pos as u64))
    }

    /// The next byte that is not whitespace, not consumed; none at the end of the input.
    fn peek(&mut self) -> Result<Option<u8>> {
        loop {
            while self.pos < self.end {
                match self.buf[self.pos] {
                    b' ' | b'\t' | b'\n' | b'\r' => self.pos += 1,
                    byte => return Ok(Some(byte)),
                }
            }
            if !self.fill(self.pos)? {
                return Ok(None);
            }
        }
    }

    fn expect(&mut self, byte: u8, what: &str) -> Result<()> {
        match self.peek()? {
            Some(b) if b == byte => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => Err(self.error(&format!("expected {what}"))),
            None => Err(self.error(&format!("the file ended where {what} was expected"))),
        }
    }

    /// The first byte of the next value, not consumed.
    pub fn peek_value(&mut self) -> Result<u8> {
        self.peek()?
            .ok_or_else(|| self.error("the file ended where a value was expected"))
    }

    /// Calls `each` with every key of the object that comes next; `each` must consume the
    /// key's value (with `raw`, `object` or `array`).
    pub fn object(&mut self, mut each: impl FnMut(&mut Self, String) -> Result<()>) -> Result<()> {
        self.expect(b'{', "an object")?;
        if self.peek()? == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            let key = self.raw()?;
            if key.first() != Some(&b'"') {
                return Err(self.error("expected a key"));
            }
            let key: String = serde_json::from_slice(&key)
                .map_err(|e| self.error(&format!("a key is not a valid string ({e})")))?;
            self.expect(b':', "':'")?;
            each(self, key)?;
            match self.peek()? {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(_) => return Err(self.error("expected ',' or '}'")),
                None => return Err(self.error("the file ended inside an object")),
            }
        }
    }

    /// Calls `each` for every element of the array that comes next; `each` must consume it.
    pub fn array(&mut self, mut each: impl FnMut(&mut Self) -> Result<()>) -> Result<()> {
        self.expect(b'[', "an array")?;
        if self.peek()? == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            each(self)?;
            match self.peek()? {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(_) => return Err(self.error("expected ',' or ']'")),
                None => return Err(self.error("the file ended inside an array")),
            }
        }
    }

    /// The next value as its bytes, whatever it is.
    pub fn raw(&mut self) -> Result<Vec<u8>> {
        let first = self.peek_value()?;
        let mut start = self.pos;
        let mut i = start;
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escaped = false;
        let scalar = !matches!(first, b'{' | b'[' | b'"');
        loop {
            while i < self.end {
                let byte = self.buf[i];
                if in_string {
                    if escaped {
                        escaped = false;
                    } else if byte == b'\\' {
                        escaped = true;
                    } else if byte == b'"' {
                        in_string = false;
                        if depth == 0 {
                            i += 1;
                            return Ok(self.take(start, i));
                        }
                    } else {
                        // Most of a document is string contents: jump to the next quote or
                        // backslash (or to the end of what is buffered).
                        i = memchr::memchr2(b'"', b'\\', &self.buf[i..self.end])
                            .map_or(self.end, |at| i + at);
                        continue;
                    }
                } else if scalar {
                    if matches!(byte, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        return Ok(self.take(start, i));
                    }
                } else {
                    match byte {
                        b'"' => in_string = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.saturating_sub(1);
                            if depth == 0 {
                                i += 1;
                                return Ok(self.take(start, i));
                            }
                        }
                        _ => {}
                    }
                }
                i += 1;
            }
            // Keep the value's bytes so far (they move to the front), read more.
            let scanned = i - start;
            let more = self.fill(start)?;
            start = self.pos;
            i = start + scanned;
            if !more {
                if scalar && i > start {
                    return Ok(self.take(start, i));
                }
                return Err(self.error("the file ended inside a value"));
            }
        }
    }

    fn take(&mut self, start: usize, end: usize) -> Vec<u8> {
        self.pos = end;
        self.buf[start..end].to_vec()
    }

    /// Runs `read` on the next value and returns, with its result, the hex sha256 of that
    /// value's bytes exactly as they are in the document (from its first byte to its last):
    /// what an export's manifest records of each table. One digest at a time.
    pub fn digest<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T>) -> Result<(T, String)> {
        self.peek_value()?;
        if self.tap.is_some() {
            return Err(self.error("a digest inside a digest"));
        }
        self.tap = Some((Sha256::new(), self.pos));
        let result = read(self);
        let (mut hasher, from) = self
            .tap
            .take()
            .ok_or_else(|| ScanError("the digest was lost".into()))?;
        let value = result?;
        hasher.update(&self.buf[from..self.pos]);
        Ok((value, hex::encode(hasher.finalize())))
    }

    /// Nothing but whitespace may follow the document; reads to the end.
    pub fn end(&mut self) -> Result<()> {
        match self.peek()? {
            None => Ok(()),
            Some(_) => Err(self.error("unexpected data after the document")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out a few bytes at a time, to cross every refill boundary.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.1.min(self.0.len()).min(out.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn walk(text: &str, chunk: usize) -> Result<Vec<String>> {
        let mut cursor = Cursor::new(Trickle(text.as_bytes(), chunk));
        let mut seen = Vec::new();
        cursor.object(|c, key| {
            if key == "list" {
                c.array(|c| {
                    seen.push(String::from_utf8(c.raw()?).unwrap_or_default());
                    Ok(())
                })
            } else {
                seen.push(format!(
                    "{key}={}",
                    String::from_utf8(c.raw()?).unwrap_or_default()
                ));
                Ok(())
            }
        })?;
        cursor.end()?;
        Ok(seen)
    }

    #[test]
    fn a_digest_covers_exactly_the_value_across_refills() {
        let value = r#"[{"a": "x\"]"}, [1, 2], "tail"]"#;
        let text = format!("{{\"first\": 1, \"list\":  {value} , \"last\": true}}");
        let expected = hex::encode(Sha256::digest(value.as_bytes()));
        for chunk in [1, 2, 3, 7, 64] {
            let mut cursor = Cursor::new(Trickle(text.as_bytes(), chunk));
            let mut digests = Vec::new();
            cursor
                .object(|c, key| {
                    if key == "list" {
                        let ((), digest) = c.digest(|c| c.array(|c| c.raw().map(drop)))?;
                        digests.push(digest);
                        Ok(())
                    } else {
                        c.raw().map(drop)
                    }
                })
                .expect("the document is valid");
            assert_eq!(digests, vec![expected.clone()], "chunk {chunk}");
        }
    }

    #[test]
    fn walks_keys_arrays_and_raw_values_across_refills() {
        let text = r#" { "a" : {"x": [1, "]}\"", {}]} , "list": [ 1.5e3 , "s\\\"}" , [ ], {"k":null}, true ],
            "b": null } "#;
        for chunk in [1, 2, 3, 7, 4096] {
            assert_eq!(
                walk(text, chunk).unwrap(),
                [
                    r#"a={"x": [1, "]}\"", {}]}"#,
                    "1.5e3",
                    r#""s\\\"}""#,
                    "[ ]",
                    r#"{"k":null}"#,
                    "true",
                    "b=null"
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn malformed_documents_are_refused_with_a_position() {
        for bad in [
            r#"{"a": 1"#,
            r#"{"a": [1, 2"#,
            r#"{"a" 1}"#,
            r#"{"a": 1} trailing"#,
            r#"{"a": "unterminated}"#,
            r#"[1]"#,
            r#"{1: 2}"#,
        ] {
            let err = walk(bad, 3).unwrap_err();
            assert!(
                err.0.contains("byte") || err.0.contains("ended"),
                "{bad}: {err}"
            );
        }
    }
}

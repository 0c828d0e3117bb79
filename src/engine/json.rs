//! Re-spacing JSON text without parsing it into values, so that key order and number spelling
//! stay exactly as written. Frameworks store JSON text written by their own serializers; these
//! functions reproduce those spellings from any valid JSON text.

/// How characters beyond ASCII are spelled inside strings.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NonAscii {
    /// As they come.
    Keep,
    /// As raw UTF-8 (serde, pydantic): `\uXXXX` escapes of non-ASCII characters are decoded.
    Raw,
    /// As `\uXXXX` escapes (Python's `json.dumps`, `ensure_ascii=True`).
    Escaped,
}

/// Whitespace outside strings removed: `{"a":[1,2]}`.
pub fn minify(text: &str) -> String {
    respace(text, false, NonAscii::Keep)
}

/// The spelling of pydantic's `model_dump_json` (compact, non-ASCII characters as raw UTF-8), of
/// text to be parsed afterwards instead of the original: `None` when removing whitespace would
/// join two tokens (`tr ue`, `1 2`), the one way it could make invalid JSON valid. Parsing the
/// compact text reads fewer bytes than parsing the indented one.
pub fn compact_utf8_for_parsing(text: &str) -> Option<String> {
    let mut joined = false;
    let mut compact = String::with_capacity(text.len());
    respace_into(text, false, NonAscii::Raw, &mut joined, &mut compact);
    (!joined).then_some(compact)
}

/// The spelling of Python's `json.dumps` with its defaults: `", "` and `": "` separators and
/// non-ASCII characters escaped.
pub fn python_dumps(text: &str) -> String {
    respace(text, true, NonAscii::Escaped)
}

/// [`python_dumps`], appended to `out`.
pub fn push_python_dumps(text: &str, out: &mut String) {
    respace_into(text, true, NonAscii::Escaped, &mut false, out);
}

fn respace(text: &str, spaced: bool, non_ascii: NonAscii) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    respace_into(text, spaced, non_ascii, &mut false, &mut out);
    out
}

/// A byte of a literal or a number.
fn in_token(byte: Option<u8>) -> bool {
    byte.is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'))
}

/// [`respace`], appended to `out`, setting `joined` when a run of whitespace it removes stood
/// between two tokens.
fn respace_into(
    text: &str,
    spaced: bool,
    non_ascii: NonAscii,
    joined: &mut bool,
    out: &mut String,
) {
    let mut rest = text;
    let special = |b: u8| {
        matches!(b, b'"' | b' ' | b'\t' | b'\n' | b'\r') || (spaced && matches!(b, b',' | b':'))
    };
    while let Some(i) = rest.bytes().position(special) {
        out.push_str(&rest[..i]);
        let c = rest.as_bytes()[i];
        rest = &rest[i + 1..];
        match c {
            b'"' => {
                out.push('"');
                rest = copy_string(rest, out, non_ascii);
            }
            b',' | b':' => {
                out.push(c as char);
                if spaced {
                    out.push(' ');
                }
            }
            // Indentation comes in runs: skip each at once.
            _ => {
                rest = rest.trim_start_matches([' ', '\t', '\n', '\r']);
                if in_token(out.as_bytes().last().copied()) && in_token(rest.bytes().next()) {
                    *joined = true;
                }
            }
        }
    }
    out.push_str(rest);
}

/// Copies the rest of a string (after its opening quote) up to and including the closing quote;
/// returns what follows it.
fn copy_string<'a>(mut rest: &'a str, out: &mut String, non_ascii: NonAscii) -> &'a str {
    loop {
        let special = match non_ascii {
            NonAscii::Escaped => rest
                .bytes()
                .position(|b| b == b'"' || b == b'\\' || !(b' '..=b'~').contains(&b)),
            NonAscii::Keep | NonAscii::Raw => memchr::memchr2(b'"', b'\\', rest.as_bytes()),
        };
        let Some(i) = special else {
            out.push_str(rest);
            return "";
        };
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        match rest.as_bytes()[0] {
            b'"' => {
                out.push('"');
                return &rest[1..];
            }
            b'\\' => {
                let escaped = rest[1..].chars().next();
                match escaped {
                    Some('u') if rest.get(2..6).is_some() => {
                        let hex = &rest[2..6];
                        let unit = u32::from_str_radix(hex, 16).ok();
                        rest = &rest[6..];
                        match (non_ascii, unit) {
                            (NonAscii::Raw, Some(unit)) if unit >= 0x80 => {
                                rest = push_decoded(rest, out, unit, hex);
                            }
                            _ => {
                                out.push_str("\\u");
                                out.push_str(hex);
                            }
                        }
                    }
                    Some(c) => {
                        out.push('\\');
                        out.push(c);
                        rest = &rest[1 + c.len_utf8()..];
                    }
                    None => {
                        out.push('\\');
                        return "";
                    }
                }
            }
            _ => {
                // Escaped spelling: a character outside printable ASCII.
                let c = rest.chars().next().unwrap_or(' ');
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
                rest = &rest[c.len_utf8()..];
            }
        }
    }
}

/// Decodes one `\uXXXX` escape (and its low surrogate, when it is a high one) into UTF-8; an
/// escape that does not form a character is kept as written. Returns what follows.
fn push_decoded<'a>(rest: &'a str, out: &mut String, unit: u32, hex: &str) -> &'a str {
    if (0xD800..0xDC00).contains(&unit) {
        if let Some(low_hex) = rest.strip_prefix("\\u").and_then(|r| r.get(..4))
            && let Ok(low) = u32::from_str_radix(low_hex, 16)
            && (0xDC00..0xE000).contains(&low)
            && let Some(c) = char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
        {
            out.push(c);
            return &rest[6..];
        }
    } else if let Some(c) = char::from_u32(unit) {
        out.push(c);
        return rest;
    }
    out.push_str("\\u");
    out.push_str(hex);
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minify_keeps_strings_and_numbers_as_written() {
        let text = "{\n  \"a b\": [1.50, 2e3],\n  \"c\": \"x  y\\n\\\" :,\"\n}";
        assert_eq!(
            minify(text),
            "{\"a b\":[1.50,2e3],\"c\":\"x  y\\n\\\" :,\"}"
        );
    }

    #[test]
    fn compacting_for_parsing_refuses_to_join_tokens() {
        let text = "{\n  \"a\": [1, true, -2.5e3, null],\n  \"b\": \"x y\"\n}";
        assert_eq!(
            compact_utf8_for_parsing(text).as_deref(),
            Some("{\"a\":[1,true,-2.5e3,null],\"b\":\"x y\"}")
        );
        for joined in ["[tr ue]", "[1 2]", "{\"a\": - 1}", "[1 .5]", "[null\nnull]"] {
            assert_eq!(compact_utf8_for_parsing(joined), None, "{joined}");
        }
    }

    #[test]
    fn python_spelling_escapes_non_ascii_and_spaces_separators() {
        let text = "{\"k\":[\"é\",\"😀\",1]}";
        assert_eq!(
            python_dumps(text),
            "{\"k\": [\"\\u00e9\", \"\\ud83d\\ude00\", 1]}"
        );
    }

    #[test]
    fn compact_utf8_decodes_escaped_non_ascii_only() {
        let text = "{ \"k\": \"\\u00e9\\ud83d\\ude00\\u000a\\\"\" }";
        assert_eq!(
            compact_utf8_for_parsing(text).as_deref(),
            Some("{\"k\":\"é😀\\u000a\\\"\"}")
        );
    }

    #[test]
    fn spellings_round_trip_to_the_same_value() {
        let text = "{\"a\": {\"b\": [\"é\\t\", null, true, -0.5e-7]}}";
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        let compact = compact_utf8_for_parsing(text).unwrap();
        for respelled in [minify(text), compact, python_dumps(text)] {
            let again: serde_json::Value = serde_json::from_str(&respelled).unwrap();
            assert_eq!(again, value, "{respelled}");
        }
    }
}

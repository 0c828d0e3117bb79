//! One snapshot of a SQLMesh export turned into the rows SQLMesh writes for it: `_snapshots`, its
//! `_intervals` and its `_auto_restatements` entry.

use chrono::{Months, TimeZone, Utc};
use serde_json::Value;
use serde_json::value::RawValue;

use super::layout::{
    AUTO_RESTATEMENT_COLUMNS, INTERVAL_COLUMNS, Names, SNAPSHOT_COLUMNS, StagedRow,
};
use crate::engine::format::reader::Emitter;
use crate::engine::frameworks::sqlmesh::{Fingerprint, STORED_ELSEWHERE};

/// What a node says about itself that a `_snapshots` row needs.
#[derive(serde::Deserialize)]
struct NodeFacts {
    #[serde(default)]
    source_type: Option<String>,
    #[serde(default)]
    kind: Option<KindFacts>,
}

#[derive(serde::Deserialize)]
struct KindFacts {
    #[serde(default)]
    name: Option<String>,
}

/// The rows one snapshot of the file becomes: `_snapshots`, its `_intervals` and its
/// `_auto_restatements` entry. `fields` come from the snapshot already spelled as SQLMesh's
/// serializer spells it (`compact_utf8_for_parsing`).
pub(super) fn snapshot_rows(
    fields: &[(String, Box<RawValue>)],
    names: &Names,
    emitter: &mut Emitter,
) -> Result<(), String> {
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.get());
    let parse = |name: &str| -> Result<Option<Value>, String> {
        field(name)
            .map(|raw| serde_json::from_str::<Value>(raw).map_err(|e| format!("{name}: {e}")))
            .transpose()
    };
    let name = match parse("name")? {
        Some(Value::String(name)) => name,
        _ => return Err("it has no \"name\"".into()),
    };
    let fingerprint: Fingerprint = serde_json::from_str(
        field("fingerprint").ok_or_else(|| format!("{name} has no \"fingerprint\""))?,
    )
    .map_err(|e| format!("{name}: fingerprint: {e}"))?;
    let node: NodeFacts =
        serde_json::from_str(field("node").ok_or_else(|| format!("{name} has no \"node\""))?)
            .map_err(|e| format!("{name}: node: {e}"))?;
    let identifier = fingerprint.to_identifier();
    let version = string_field(parse("version")?, &name, "version")?;
    let dev_version = string_field(parse("dev_version")?, &name, "dev_version")?
        .unwrap_or_else(|| fingerprint.to_version());
    let updated_ts = number_field(parse("updated_ts")?, &name, "updated_ts")?
        .ok_or_else(|| format!("{name} has no \"updated_ts\""))?;
    let ttl = string_field(parse("ttl")?, &name, "ttl")?
        .ok_or_else(|| format!("{name} has no \"ttl\""))?;
    let ttl_ms = ttl_ms(&ttl, updated_ts).ok_or_else(|| {
        format!(
            "{name} has ttl \"{ttl}\", which statekeeper cannot convert (it reads \"in N \
             seconds|minutes|hours|days|weeks|months|years\")"
        )
    })?;
    // Standalone audits have no model kind.
    let kind_name = match node.source_type.as_deref() {
        Some("audit") => None,
        _ => node.kind.and_then(|k| k.name),
    };
    let flag = |name_: &str| -> Result<bool, String> {
        Ok(match parse(name_)? {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(other) => return Err(format!("{name}: {name_} is {other}, not true or false")),
        })
    };
    // The stored JSON is the snapshot without what SQLMesh keeps elsewhere; values are copied as
    // written.
    let mut stored = String::with_capacity(fields.iter().map(|(_, v)| v.get().len()).sum());
    stored.push('{');
    for (key, value) in fields
        .iter()
        .filter(|(k, _)| !STORED_ELSEWHERE.contains(&k.as_str()))
    {
        if stored.len() > 1 {
            stored.push(',');
        }
        stored.push_str(&serde_json::to_string(key).map_err(|e| e.to_string())?);
        stored.push(':');
        stored.push_str(value.get());
    }
    stored.push('}');
    let mut row = StagedRow::new(SNAPSHOT_COLUMNS);
    row.set("name", name.clone());
    row.set("identifier", identifier.clone());
    row.set("version", version.clone());
    row.set("snapshot", stored);
    row.set("kind_name", kind_name);
    row.set("updated_ts", updated_ts.to_string());
    row.set(
        "unpaused_ts",
        number_field(parse("unpaused_ts")?, &name, "unpaused_ts")?.map(|v| v.to_string()),
    );
    row.set("ttl_ms", ttl_ms.to_string());
    row.set("unrestorable", flag("unrestorable")?.to_string());
    row.set("forward_only", flag("forward_only")?.to_string());
    row.set("dev_version", dev_version.clone());
    row.set(
        "fingerprint",
        field("fingerprint").unwrap_or("{}").to_owned(),
    );
    emitter.fields(&names.snapshots, row.fields)?;

    // Intervals as SQLMesh records them on import: one row per interval (empty ones skipped,
    // except pending restatements), pending restatements last and under no identifier. The rows
    // carry no last-altered time: that stays in the stored snapshot.
    let kinds: [(&str, bool, bool); 3] = [
        ("intervals", false, false),
        ("dev_intervals", true, false),
        ("pending_restatement_intervals", false, true),
    ];
    for (list, is_dev, is_pending) in kinds {
        let intervals: Vec<(i64, i64)> = match field(list) {
            Some(raw) => serde_json::from_str(raw).map_err(|e| format!("{name}: {list}: {e}"))?,
            None => Vec::new(),
        };
        for (start, end) in intervals.into_iter().filter(|(s, e)| is_pending || s < e) {
            let mut row = StagedRow::new(INTERVAL_COLUMNS);
            row.set("id", random_id()?);
            row.set("created_ts", names.created_ts.to_string());
            row.set("name", name.clone());
            if !is_pending {
                row.set("identifier", identifier.clone());
                row.set("dev_version", dev_version.clone());
            }
            row.set("version", version.clone());
            row.set("start_ts", start.to_string());
            row.set("end_ts", end.to_string());
            row.set("is_dev", is_dev.to_string());
            row.set("is_removed", "false".to_string());
            row.set("is_compacted", "false".to_string());
            row.set("is_pending_restatement", is_pending.to_string());
            emitter.fields(&names.intervals, row.fields)?;
        }
    }
    if let Some(next) = number_field(
        parse("next_auto_restatement_ts")?,
        &name,
        "next_auto_restatement_ts",
    )? {
        let mut row = StagedRow::new(AUTO_RESTATEMENT_COLUMNS);
        row.set("snapshot_name", name.clone());
        row.set("snapshot_version", version);
        row.set("next_auto_restatement_ts", next.to_string());
        emitter.fields(&names.auto_restatements, row.fields)?;
    }
    Ok(())
}

/// A random interval id, as SQLMesh makes them (`uuid4().hex`). Made here rather than by
/// `gen_random_uuid()` on insert, which cost the server about 5 µs a row.
fn random_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("no random interval id: {e}"))?;
    // Version 4, variant 10xx.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Ok(hex::encode(bytes))
}

fn string_field(
    value: Option<Value>,
    snapshot: &str,
    field: &str,
) -> Result<Option<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{snapshot}: {field} is {other}, not a string")),
    }
}

fn number_field(value: Option<Value>, snapshot: &str, field: &str) -> Result<Option<i64>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| {
            format!("{snapshot}: {field} is {n}, not a whole number of milliseconds")
        }),
        Some(other) => Err(format!("{snapshot}: {field} is {other}, not a number")),
    }
}

/// SQLMesh's `ttl_ms`: how long after `updated_ts` the ttl ("in 1 week") ends, as its date
/// parser counts: calendar months and years first (the day kept, or the month's last day), then
/// fixed-length units.
pub(crate) fn ttl_ms(ttl: &str, updated_ts: i64) -> Option<i64> {
    let lower = ttl.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty() && *w != "and")
        .collect();
    let rest = match words.as_slice() {
        ["in", rest @ ..] if !rest.is_empty() => rest,
        _ => return None,
    };
    let mut months = 0u32;
    let mut millis = 0f64;
    for pair in rest.chunks(2) {
        let [count, unit] = pair else { return None };
        let count: f64 = match *count {
            "a" | "an" | "one" => 1.0,
            "two" => 2.0,
            "three" => 3.0,
            "four" => 4.0,
            "five" => 5.0,
            "six" => 6.0,
            "seven" => 7.0,
            "eight" => 8.0,
            "nine" => 9.0,
            "ten" => 10.0,
            number => number
                .parse()
                .ok()
                .filter(|n: &f64| n.is_finite() && *n >= 0.0)?,
        };
        let unit = unit.strip_suffix('s').unwrap_or(unit);
        let whole = || (count.fract() == 0.0).then_some(count as u32);
        match unit {
            "second" | "sec" => millis += count * 1e3,
            "minute" | "min" => millis += count * 60e3,
            "hour" => millis += count * 3_600e3,
            "day" => millis += count * 86_400e3,
            "week" => millis += count * 604_800e3,
            "month" => months = months.checked_add(whole()?)?,
            "year" => months = months.checked_add(whole()?.checked_mul(12)?)?,
            "decade" => months = months.checked_add(whole()?.checked_mul(120)?)?,
            _ => return None,
        }
    }
    let base = Utc.timestamp_millis_opt(updated_ts).single()?;
    let end = base.checked_add_months(Months::new(months))?;
    Some(end.timestamp_millis() - updated_ts + millis.round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPDATED: i64 = 1_795_790_906_418; // 2026-11-27 UTC

    #[test]
    fn ttl_in_fixed_units() {
        assert_eq!(ttl_ms("in 1 week", UPDATED), Some(604_800_000));
        assert_eq!(ttl_ms("in 2 days", UPDATED), Some(2 * 86_400_000));
        assert_eq!(ttl_ms("in 12 hours", UPDATED), Some(12 * 3_600_000));
        assert_eq!(ttl_ms("in 1 week 1 day", UPDATED), Some(8 * 86_400_000));
    }

    #[test]
    fn ttl_in_calendar_units() {
        // From 27 November: one month is the 30 days to 27 December.
        assert_eq!(ttl_ms("in 1 month", UPDATED), Some(30 * 86_400_000));
        // 2027 is not a leap year.
        assert_eq!(ttl_ms("in 1 year", UPDATED), Some(365 * 86_400_000));
    }

    #[test]
    fn ttl_in_words_and_fractions() {
        assert_eq!(ttl_ms("in one week", UPDATED), Some(604_800_000));
        assert_eq!(ttl_ms("in 1.5 days", UPDATED), Some(129_600_000));
        assert_eq!(ttl_ms("in 2 days 3 hours", UPDATED), Some(183_600_000));
        // 29 February plus a year is 28 February.
        let leap = 1_835_395_200_000; // 2028-02-29 UTC
        assert_eq!(ttl_ms("in 1 year", leap), Some(365 * 86_400_000));
    }

    #[test]
    fn ttl_refuses_what_it_cannot_read() {
        for ttl in [
            "",
            "in",
            "1 week",
            "in 1 fortnight",
            "tomorrow",
            "in 1.5 months",
        ] {
            assert_eq!(ttl_ms(ttl, UPDATED), None, "{ttl}");
        }
    }
}

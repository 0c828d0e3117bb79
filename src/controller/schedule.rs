//! CronJob semantics as pure functions of (schedule, last run, now), shared by every scheduled
//! operation: standard 5-field cron (no hidden seconds field), IANA time zones, `suspend`,
//! `startingDeadlineSeconds`, and at most one catch-up run however long the operator was down.

use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::Timestamp;
use jiff::tz::TimeZone;

/// A parsed schedule in its time zone.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    zone: TimeZone,
}

/// What is due now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing until `next` (None when suspended).
    Wait { next: Option<Timestamp> },
    /// Run now for the occurrence at `scheduled`.
    Run {
        scheduled: Timestamp,
        next: Option<Timestamp>,
    },
    /// The occurrence at `scheduled` was missed by more than the starting deadline.
    Missed {
        scheduled: Timestamp,
        next: Option<Timestamp>,
    },
}

impl Schedule {
    /// Parses a 5-field cron expression (or a nickname such as `@daily`) in `time_zone`
    /// (IANA, default UTC). Errors name the problem for a status condition.
    pub fn parse(expression: &str, time_zone: Option<&str>) -> Result<Self, String> {
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        let cron = parser
            .parse(expression)
            .map_err(|e| format!("invalid schedule \"{expression}\": {e} (use 5 fields: minute hour day-of-month month day-of-week)"))?;
        let zone = match time_zone {
            None | Some("") => TimeZone::UTC,
            Some(name) => TimeZone::get(name).map_err(|_| {
                format!("unknown timeZone \"{name}\" (use an IANA name such as Europe/Berlin)")
            })?,
        };
        Ok(Self { cron, zone })
    }

    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_next_occurrence(&t.to_zoned(self.zone.clone()), false)
            .ok()
            .map(|z| z.timestamp())
    }

    /// The latest occurrence at or before `t`.
    pub fn latest_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_previous_occurrence(&t.to_zoned(self.zone.clone()), true)
            .ok()
            .map(|z| z.timestamp())
    }
}

/// Decides like the CronJob controller: the most recent occurrence after the last scheduled run
/// (or after creation) runs once, unless it is older than the starting deadline.
pub fn decide(
    schedule: &Schedule,
    last_scheduled: Option<Timestamp>,
    created: Timestamp,
    now: Timestamp,
    starting_deadline: Option<Duration>,
    suspend: bool,
) -> Due {
    if suspend {
        return Due::Wait { next: None };
    }
    let next = schedule.next_after(now);
    let since = last_scheduled.unwrap_or(created);
    match schedule.latest_at_or_before(now) {
        Some(scheduled) if scheduled > since => {
            let late = now.duration_since(scheduled);
            let too_late = starting_deadline.is_some_and(|deadline| {
                late > jiff::SignedDuration::try_from(deadline).unwrap_or(jiff::SignedDuration::MAX)
            });
            if too_late {
                Due::Missed { scheduled, next }
            } else {
                Due::Run { scheduled, next }
            }
        }
        _ => Due::Wait { next },
    }
}

/// The Warning Event for a run skipped because it was found more than the starting deadline late.
pub fn missed_event(
    what: &str,
    scheduled: Timestamp,
    deadline_seconds: Option<u64>,
) -> kube::runtime::events::Event {
    kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: "MissedSchedule".into(),
        note: Some(format!(
            "skipped the {what} scheduled for {scheduled}: it is more than \
             startingDeadlineSeconds ({}s) late",
            deadline_seconds.unwrap_or_default()
        )),
        action: "Schedule".into(),
        secondary: None,
    }
}

/// How long to wait before looking again: until the next occurrence, bounded by `cap`.
/// Records a decision in the two times a schedule's status keeps: the next run, and a missed
/// run as the last one scheduled, with the Event that says so (`what` was missed). Returns the
/// run due now, if any (its caller records it as the last once it starts), and that Event.
pub fn record(
    due: &Due,
    what: &str,
    deadline_seconds: Option<u64>,
    last_schedule_time: &mut Option<String>,
    next_schedule_time: &mut Option<String>,
) -> (Option<Timestamp>, Option<kube::runtime::events::Event>) {
    match *due {
        Due::Wait { next } => {
            *next_schedule_time = next.map(|t| t.to_string());
            (None, None)
        }
        Due::Missed { scheduled, next } => {
            *last_schedule_time = Some(scheduled.to_string());
            *next_schedule_time = next.map(|t| t.to_string());
            (None, Some(missed_event(what, scheduled, deadline_seconds)))
        }
        Due::Run { scheduled, next } => {
            *next_schedule_time = next.map(|t| t.to_string());
            (Some(scheduled), None)
        }
    }
}

pub fn requeue_after(due: &Due, now: Timestamp, cap: Duration) -> Duration {
    let next = match due {
        Due::Wait { next } | Due::Run { next, .. } | Due::Missed { next, .. } => *next,
    };
    next.and_then(|n| Duration::try_from(n.duration_since(now)).ok())
        .map(|d| d.max(Duration::from_secs(1)).min(cap))
        .unwrap_or(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn five_fields_only_and_clear_errors() {
        assert!(Schedule::parse("0 3 * * *", None).is_ok());
        assert!(Schedule::parse("@daily", None).is_ok());
        let seconds = Schedule::parse("0 0 3 * * *", None).unwrap_err();
        assert!(seconds.contains("5 fields"), "{seconds}");
        assert!(Schedule::parse("every day", None).is_err());
        let zone = Schedule::parse("0 3 * * *", Some("Mars/Olympus")).unwrap_err();
        assert!(zone.contains("Mars/Olympus"), "{zone}");
    }

    #[test]
    fn time_zones_move_the_occurrence() {
        let utc = Schedule::parse("0 3 * * *", None).unwrap();
        let berlin = Schedule::parse("0 3 * * *", Some("Europe/Berlin")).unwrap();
        let t = ts("2026-11-22T00:00:00Z");
        assert_eq!(utc.next_after(t), Some(ts("2026-11-22T03:00:00Z")));
        // 03:00 in Berlin in November (CET, UTC+1) is 02:00 UTC.
        assert_eq!(berlin.next_after(t), Some(ts("2026-11-22T02:00:00Z")));
        // In July (CEST, UTC+2) it is 01:00 UTC.
        assert_eq!(
            berlin.next_after(ts("2026-07-01T00:00:00Z")),
            Some(ts("2026-07-01T01:00:00Z"))
        );
    }

    #[test]
    fn runs_once_per_occurrence() {
        let s = Schedule::parse("0 * * * *", None).unwrap();
        let created = ts("2026-11-22T09:30:00Z");
        assert_eq!(
            decide(&s, None, created, ts("2026-11-22T09:59:00Z"), None, false),
            Due::Wait {
                next: Some(ts("2026-11-22T10:00:00Z"))
            },
            "nothing before the first occurrence after creation"
        );
        let due = decide(&s, None, created, ts("2026-11-22T10:00:05Z"), None, false);
        assert_eq!(
            due,
            Due::Run {
                scheduled: ts("2026-11-22T10:00:00Z"),
                next: Some(ts("2026-11-22T11:00:00Z"))
            }
        );
        assert_eq!(
            decide(
                &s,
                Some(ts("2026-11-22T10:00:00Z")),
                created,
                ts("2026-11-22T10:30:00Z"),
                None,
                false
            ),
            Due::Wait {
                next: Some(ts("2026-11-22T11:00:00Z"))
            },
            "no second run for the same occurrence"
        );
    }

    #[test]
    fn at_most_one_catch_up_after_downtime() {
        let s = Schedule::parse("0 * * * *", None).unwrap();
        // Down from 10:00 to 15:20: five occurrences missed, one run, for the latest.
        let due = decide(
            &s,
            Some(ts("2026-11-22T10:00:00Z")),
            ts("2026-11-01T00:00:00Z"),
            ts("2026-11-22T15:20:00Z"),
            None,
            false,
        );
        assert_eq!(
            due,
            Due::Run {
                scheduled: ts("2026-11-22T15:00:00Z"),
                next: Some(ts("2026-11-22T16:00:00Z"))
            }
        );
    }

    #[test]
    fn starting_deadline_and_suspend() {
        let s = Schedule::parse("0 * * * *", None).unwrap();
        let last = Some(ts("2026-11-22T10:00:00Z"));
        let created = ts("2026-11-01T00:00:00Z");
        let deadline = Some(Duration::from_secs(300));
        assert!(matches!(
            decide(
                &s,
                last,
                created,
                ts("2026-11-22T11:04:00Z"),
                deadline,
                false
            ),
            Due::Run { .. }
        ));
        assert_eq!(
            decide(
                &s,
                last,
                created,
                ts("2026-11-22T11:06:00Z"),
                deadline,
                false
            ),
            Due::Missed {
                scheduled: ts("2026-11-22T11:00:00Z"),
                next: Some(ts("2026-11-22T12:00:00Z"))
            }
        );
        assert_eq!(
            decide(
                &s,
                last,
                created,
                ts("2026-11-22T11:04:00Z"),
                deadline,
                true
            ),
            Due::Wait { next: None }
        );
    }

    #[test]
    fn requeue_waits_for_the_next_occurrence_within_a_cap() {
        let now = ts("2026-11-22T10:59:00Z");
        let due = Due::Wait {
            next: Some(ts("2026-11-22T11:00:00Z")),
        };
        assert_eq!(
            requeue_after(&due, now, Duration::from_secs(300)),
            Duration::from_secs(60)
        );
        assert_eq!(
            requeue_after(&due, now, Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        assert_eq!(
            requeue_after(&Due::Wait { next: None }, now, Duration::from_secs(300)),
            Duration::from_secs(300)
        );
    }
}

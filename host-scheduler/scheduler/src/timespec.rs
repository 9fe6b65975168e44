//! Times in query strings: Unix nanoseconds, or an RFC 3339 date or date-time.

/// Parses `text` as Unix time in nanoseconds: a plain integer (ns), an RFC 3339 date
/// (`2025-01-31`, midnight UTC) or date-time (`2025-01-31T12:00:00Z`, fractions of a second
/// and `±HH:MM` offsets allowed; `t` or a space may stand for `T`).
pub fn parse_time(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse()
            .map_err(|_| format!("{text:?} is too large for Unix nanoseconds"));
    }
    let bad = || {
        format!(
            "{text:?} is neither Unix nanoseconds nor an RFC 3339 date such as 2025-01-31 or \
             2025-01-31T12:00:00Z"
        )
    };
    let (date, time) = match t.find(['T', 't', ' ']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let days = parse_date(date).ok_or_else(bad)?;
    let (seconds, nanos) = match time {
        None => (0, 0),
        Some(time) => parse_time_of_day(time).ok_or_else(bad)?,
    };
    let total = days * 86_400 + seconds;
    if total < 0 {
        return Err(format!("{text:?} is before 1970"));
    }
    u64::try_from(total)
        .ok()
        .and_then(|s| s.checked_mul(1_000_000_000))
        .and_then(|ns| ns.checked_add(nanos))
        .ok_or_else(|| format!("{text:?} is too far in the future"))
}

/// `YYYY-MM-DD` → days since 1970-01-01.
fn parse_date(date: &str) -> Option<i64> {
    let mut parts = date.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, u32, u32) = (number(y)?, number(m)?, number(d)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let max = *month_days.get(usize::try_from(m).ok()?.checked_sub(1)?)?;
    if d == 0 || d > max {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// `HH:MM:SS[.frac](Z|±HH:MM)` → (seconds from midnight UTC, may be negative or past a day;
/// nanoseconds).
fn parse_time_of_day(time: &str) -> Option<(i64, u64)> {
    let (clock, offset) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let i = time.rfind(['+', '-'])?;
        let (c, o) = time.split_at(i);
        let sign = if o.starts_with('-') { -1 } else { 1 };
        let (oh, om) = o[1..].split_once(':')?;
        if oh.len() != 2 || om.len() != 2 {
            return None;
        }
        let (oh, om): (i64, i64) = (number(oh)?, number(om)?);
        if oh > 23 || om > 59 {
            return None;
        }
        (c, sign * (oh * 3_600 + om * 60))
    };
    let (hms, frac) = match clock.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (clock, None),
    };
    let mut parts = hms.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || [h, m, s].iter().any(|p| p.len() != 2) {
        return None;
    }
    let (h, m, s): (i64, i64, i64) = (number(h)?, number(m)?, number(s)?);
    // 60 is a leap second; it is counted as the next second.
    if h > 23 || m > 59 || s > 60 {
        return None;
    }
    let nanos = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{f:0<9}").parse().ok()?
        }
        Some(_) => return None,
    };
    Some((h * 3_600 + m * 60 + s - offset, nanos))
}

fn number<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_nanoseconds_pass_through() {
        assert_eq!(parse_time("0"), Ok(0));
        assert_eq!(
            parse_time("1700000000000000000"),
            Ok(1_700_000_000_000_000_000)
        );
    }

    #[test]
    fn dates_are_midnight_utc() {
        assert_eq!(parse_time("1970-01-01"), Ok(0));
        assert_eq!(parse_time("2000-03-01"), Ok(951_868_800 * 1_000_000_000));
        assert_eq!(parse_time("2024-02-29"), Ok(1_709_164_800 * 1_000_000_000));
    }

    #[test]
    fn date_times_with_fractions_and_offsets() {
        let base = 1_700_000_000u64 * 1_000_000_000; // 2023-11-14T22:13:20Z
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(base));
        assert_eq!(parse_time("2023-11-14t22:13:20.5z"), Ok(base + 500_000_000));
        assert_eq!(parse_time("2023-11-14 22:13:20.000000001Z"), Ok(base + 1));
        assert_eq!(parse_time("2023-11-15T00:13:20+02:00"), Ok(base));
        assert_eq!(parse_time("2023-11-14T20:43:20-01:30"), Ok(base));
    }

    #[test]
    fn malformed_times_are_refused_with_an_example() {
        for bad in [
            "",
            "yesterday",
            "2023-02-29",
            "2023-13-01",
            "2023-1-01",
            "2023-11-14T25:00:00Z",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20+2:00",
            "-5",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("RFC 3339"), "{bad}: {e}");
        }
        assert_eq!(
            parse_time("1969-12-31"),
            Err("\"1969-12-31\" is before 1970".into())
        );
    }
}

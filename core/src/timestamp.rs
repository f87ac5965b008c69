//! PostgreSQL timestamps (µs since 2000-01-01 UTC) as text for messages, without a server.

/// `us` (a PostgreSQL `TimestampTz`) as `YYYY-MM-DD HH:MM:SS.mmm UTC`.
pub fn utc_text(us: i64) -> String {
    const US_PER_DAY: i64 = 86_400_000_000;
    // Days from 1970-01-01 to 2000-01-01.
    let days = us.div_euclid(US_PER_DAY) + 10_957;
    let in_day = us.rem_euclid(US_PER_DAY);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (secs, millis) = (in_day / 1_000_000, (in_day % 1_000_000) / 1000);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{millis:03} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_print_in_utc() {
        assert_eq!(utc_text(0), "2000-01-01 00:00:00.000 UTC");
        assert_eq!(utc_text(-1), "1999-12-31 23:59:59.999 UTC");
        // 2026-12-05 16:17:25.5 UTC = Unix 1796487445.5
        assert_eq!(utc_text((1_796_487_445i64 - 946_684_800) * 1_000_000 + 500_000), "2026-12-05 16:17:25.500 UTC");
        assert_eq!(utc_text((1_709_164_800i64 - 946_684_800) * 1_000_000), "2024-02-29 00:00:00.000 UTC");
    }
}

//! The one parser of duration flags (`--drain-timeout`, `--wait`, `--ttl`, …).
//!
//! Accepts Go's `time.ParseDuration` syntax, which `serf agent` and Docker users already write
//! (`1h30m`, `1.5s`, `300ms`, `2us`, `10ns`), plus a plain number of seconds (`10`, `0.5`).
//! Negative values and anything beyond [`MAX`] are refused: a duration we accept is one the
//! process can add to `Instant::now()` and sleep for without overflowing.

use std::time::Duration;

/// The longest duration accepted: 100 years. Longer is certainly a typo, and far below what
/// would overflow `Instant + Duration` or a timer wheel.
pub(crate) const MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600 + 25 * 24 * 3600);

/// Units in nanoseconds, longest names first where one is a prefix of another.
const UNITS: [(&str, u128); 9] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3600 * 1_000_000_000),
    ("", 0),
];

/// Parses `text` (a clap `value_parser`). The error names what was given and what is accepted.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let given = text;
    let text = text.trim();
    let invalid = |why: &str| {
        format!("{given:?} is not a duration ({why}; e.g. 1h30m, 1.5s, 300ms or plain seconds)")
    };
    if text.is_empty() {
        return Err(invalid("empty"));
    }
    if text.starts_with('-') {
        return Err(format!("{given:?}: a duration cannot be negative"));
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    let too_long = || format!("{given:?} is longer than the 100-year limit");
    let mut nanos: u128 = 0;
    let mut rest = text;
    let mut components = 0;
    while !rest.is_empty() {
        let (whole, fraction, after) = split_number(rest).ok_or_else(|| invalid("no number"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale = match unit {
            // A bare number is seconds, only as the whole value (Go requires a unit).
            "" if components == 0 && after.is_empty() => 1_000_000_000,
            "" => return Err(invalid("a unit is missing")),
            unit => UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, scale)| *scale)
                .ok_or_else(|| {
                    invalid(&format!("unknown unit {unit:?}; use ns, us, ms, s, m or h"))
                })?,
        };
        nanos = nanos
            .checked_add(component_nanos(whole, fraction, scale).ok_or_else(too_long)?)
            .ok_or_else(too_long)?;
        if nanos > MAX.as_nanos() {
            return Err(too_long());
        }
        components += 1;
        rest = after;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_long())?;
    let subsec = u32::try_from(nanos % 1_000_000_000).expect("a remainder below 10^9 fits");
    Ok(Duration::new(secs, subsec))
}

/// Splits `1.5ms` into (`1`, `5`, `ms`); `None` when it does not start with a number.
fn split_number(text: &str) -> Option<(&str, &str, &str)> {
    let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let whole_len = digits(text);
    let (whole, after) = text.split_at(whole_len);
    let (fraction, after) = match after.strip_prefix('.') {
        Some(after) => after.split_at(digits(after)),
        None => ("", after),
    };
    (!whole.is_empty() || !fraction.is_empty()).then_some((whole, fraction, after))
}

/// `whole.fraction` units of `scale` nanoseconds, or `None` on overflow. Fraction digits past
/// nanosecond precision are dropped, as Go does.
fn component_nanos(whole: &str, fraction: &str, scale: u128) -> Option<u128> {
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut nanos = whole.checked_mul(scale)?;
    let mut divisor: u128 = 1;
    let mut numerator: u128 = 0;
    for digit in fraction.bytes().take(30) {
        numerator = numerator * 10 + u128::from(digit - b'0');
        divisor *= 10;
    }
    nanos = nanos.checked_add(numerator.checked_mul(scale)? / divisor)?;
    Some(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<Duration, &str>) {
        match (parse(text), expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{text:?}"),
            (Err(got), Err(want)) => assert!(got.contains(want), "{text:?}: {got}"),
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn accepts_go_syntax_and_plain_seconds() {
        let ms = Duration::from_millis;
        check("5s", Ok(ms(5000)));
        check("500ms", Ok(ms(500)));
        check("300ms", Ok(ms(300)));
        check("2m", Ok(ms(120_000)));
        check("1h30m", Ok(ms(5_400_000)));
        check("1h0m30.5s", Ok(ms(3_630_500)));
        check("1.5s", Ok(ms(1500)));
        check(".5s", Ok(ms(500)));
        check("1.s", Ok(ms(1000)));
        check("2us", Ok(Duration::from_micros(2)));
        check("2µs", Ok(Duration::from_micros(2)));
        check("10ns", Ok(Duration::from_nanos(10)));
        check("+3s", Ok(ms(3000)));
        check(" 10 ", Ok(ms(10_000)));
        check("10", Ok(ms(10_000)));
        check("1.5", Ok(ms(1500)));
        check("0", Ok(Duration::ZERO));
        check("0s", Ok(Duration::ZERO));
        check("100s", Ok(ms(100_000)));
        check("876000h", Ok(Duration::from_secs(876_000 * 3600)));
    }

    #[test]
    fn refuses_malformed_negative_and_absurd_values_naming_them() {
        check("", Err("\"\" is not a duration (empty"));
        check("s", Err("\"s\" is not a duration"));
        check("fast", Err("\"fast\" is not a duration"));
        check("5x", Err("unknown unit \"x\""));
        check("1h30", Err("a unit is missing"));
        check("1..5s", Err("is not a duration"));
        check(".s", Err("is not a duration"));
        check("-1s", Err("\"-1s\": a duration cannot be negative"));
        check(
            "18000000000000000000s",
            Err("\"18000000000000000000s\" is longer than the 100-year limit"),
        );
        check("18000000000000000000", Err("100-year limit"));
        check(
            "999999999999999999999999999999999999999999h",
            Err("100-year limit"),
        );
        check("101y", Err("unknown unit \"y\""));
        check("900000h", Err("100-year limit"));
        check("876000h876000h", Err("100-year limit"));
    }

    #[test]
    fn every_accepted_duration_can_be_added_to_now() {
        let max = parse("876600h").expect("100 years is accepted");
        assert!(max <= MAX);
        assert!(std::time::Instant::now().checked_add(MAX).is_some());
        assert!(tokio::time::Instant::now().checked_add(MAX).is_some());
    }
}

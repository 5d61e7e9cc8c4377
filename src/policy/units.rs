//! Sizes ("64MiB", "1G"), durations ("200ms", "2m") and percentages ("25%") as policy
//! files write them. Each type deserializes itself, so a bad value is reported by the
//! TOML parser at its exact line and column.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// The largest size a policy may name: the largest memory limit the kernel's page counter
/// can hold (a signed long of bytes, rounded down to the page; on x86_64 this is exactly
/// what `memory.limit_in_bytes` reads when unlimited). Anything above is not a limit.
pub const MAX_SIZE: u64 = 0x7FFF_FFFF_FFFF_F000;

/// The largest percentage a policy may name (10x): `by = "1e30%"` is a typo, not a plan,
/// and a computed limit beyond the kernel's maximum would read back as "unlimited".
pub const MAX_PERCENT: f64 = 1000.0;

/// Parses a size: an integer or decimal followed by B, KiB, MiB, GiB, TiB or K, M, G, T
/// (all powers of 1024). A bare integer is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        other => {
            return Err(format!(
            "invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB or K, M, G, T)"
        ))
        }
    };
    let bad =
        || format!("invalid size {s:?}: expected a number followed by a unit, e.g. \"64MiB\"");
    let too_big = || {
        format!("invalid size {s:?}: above {MAX_SIZE} bytes, the largest limit the kernel can hold")
    };
    let bytes = if num.contains('.') {
        // Decimals ("1.5G"): as a float; compare before the cast, which would saturate.
        let n: f64 = num.parse().map_err(|_| bad())?;
        let b = (n * mult as f64).round();
        if !b.is_finite() || b < 0.0 {
            return Err(bad());
        }
        if b >= MAX_SIZE as f64 + 1.0 {
            return Err(too_big());
        }
        b as u64
    } else {
        let n: u64 = match num.parse() {
            Ok(n) => n,
            Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => return Err(too_big()),
            Err(_) => return Err(bad()),
        };
        n.checked_mul(mult).ok_or_else(too_big)?
    };
    if bytes > MAX_SIZE {
        return Err(too_big());
    }
    Ok(bytes)
}

/// Parses a duration: a number followed by ms, s, m or h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("invalid duration {s:?}: expected a number followed by ms, s, m or h")
    })?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "" => {
            return Err(format!(
                "invalid duration {s:?}: missing unit (ms, s, m or h)"
            ))
        }
        other => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=365.0 * 86400.0).contains(&secs) {
        return Err(format!("invalid duration {s:?}: out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

/// A duration written as "200ms", "5s", "2m", "1h".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// A percentage written as "25%", kept as a fraction (0.25).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(pub f64);

/// Either a percentage of something or an absolute size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    Percent(f64),
    Bytes(u64),
}

impl std::fmt::Display for Amount {
    /// As a policy file writes it: "75%", or bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Amount::Percent(p) => write!(f, "{}%", (p * 1e4).round() / 1e2),
            Amount::Bytes(b) => write!(f, "{b} bytes"),
        }
    }
}

impl Amount {
    /// The amount applied to a base value.
    pub fn of(&self, base: u64) -> u64 {
        match *self {
            Amount::Percent(f) => (base as f64 * f).round() as u64,
            Amount::Bytes(b) => b,
        }
    }
}

fn parse_percent(s: &str) -> Option<Result<f64, String>> {
    let num = s.trim().strip_suffix('%')?;
    Some(match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > MAX_PERCENT => {
            Err(format!("invalid percentage {s:?}: at most {MAX_PERCENT}%"))
        }
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v / 100.0),
        _ => Err(format!(
            "invalid percentage {s:?}: expected a number from 0 to {MAX_PERCENT}, e.g. \"25%\""
        )),
    })
}

fn parse_amount(s: &str) -> Result<Amount, String> {
    match parse_percent(s) {
        Some(r) => r.map(Amount::Percent),
        None => parse_size(s).map(Amount::Bytes),
    }
}

/// Deserializes from a string, or from an integer for sizes (bytes).
struct StrVisitor<F>(F, &'static str, bool);

impl<'de, T, F: Fn(&str) -> Result<T, String>> de::Visitor<'de> for StrVisitor<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        if self.2 && v >= 0 {
            (self.0)(&v.to_string()).map_err(E::custom)
        } else {
            Err(E::invalid_type(de::Unexpected::Signed(v), &self))
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrVisitor(
            |s: &str| parse_size(s).map(Size),
            "a size such as \"64MiB\"",
            true,
        ))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrVisitor(
            |s: &str| parse_duration(s).map(Dur),
            "a duration such as \"500ms\" or \"2m\"",
            false,
        ))
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrVisitor(
            |s: &str| {
                parse_percent(s)
                    .unwrap_or_else(|| {
                        Err(format!("invalid percentage {s:?}: expected e.g. \"90%\""))
                    })
                    .map(Percent)
            },
            "a percentage such as \"90%\"",
            false,
        ))
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrVisitor(
            parse_amount,
            "a percentage (\"25%\") or a size (\"64MiB\")",
            true,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("12B"), Ok(12));
        assert!(parse_size("64MB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("3d").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn amounts_and_percent() {
        assert_eq!(parse_amount("25%"), Ok(Amount::Percent(0.25)));
        assert_eq!(parse_amount("64MiB"), Ok(Amount::Bytes(64 << 20)));
        assert_eq!(Amount::Percent(0.25).of(64 << 20), 16 << 20);
        assert_eq!(Amount::Bytes(5).of(100), 5);
        assert!(parse_amount("x%").is_err());
    }

    #[test]
    fn absurd_values_are_rejected() {
        for bad in [
            "1e30%", "1001%", "NaN%", "nan%", "inf%", "-inf%", "-5%", "1e400%",
        ] {
            assert!(parse_amount(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_amount("1000%"), Ok(Amount::Percent(10.0)));
        for bad in [
            "9EiB",
            "8388608T",
            "18446744073709551615",
            "1e30",
            "NaN",
            "inf",
            "-1",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size("9223372036854771712"), Ok(MAX_SIZE));
        assert!(parse_size("9223372036854771713")
            .unwrap_err()
            .contains("largest limit"));
        assert!(parse_size("8388607T").is_ok());
    }
}

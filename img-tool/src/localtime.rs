//! Local time for snapshot dates. qemu prints them with `localtime(3)`; `img` has no unsafe code
//! and no time-zone crate, so this reads what `localtime(3)` reads: the TZif file named by `$TZ`
//! (or `/etc/localtime`), or a POSIX `TZ` string such as `CET-1CEST,M3.5.0,M10.5.0/3`.
//!
//! Anything that cannot be read or understood means UTC, which is what glibc does too.

use std::path::{Path, PathBuf};

/// Where the system keeps its TZif files.
const ZONEINFO: &str = "/usr/share/zoneinfo";
/// Largest TZif file read (real ones are a few KiB).
const MAX_TZIF_BYTES: u64 = 1 << 20;
const DAY: i64 = 86_400;

/// `%Y-%m-%d %H:%M:%S` of `secs` since the epoch, in the local time zone.
pub fn format_local(secs: i64) -> String {
    format_utc(secs + utc_offset(secs))
}

/// `%Y-%m-%d %H:%M:%S` of `secs` since the epoch, in UTC.
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(DAY);
    let rem = secs.rem_euclid(DAY);
    let (y, mo, d) = civil_from_days(days);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Seconds east of UTC in the local zone at `secs` since the epoch.
pub fn utc_offset(secs: i64) -> i64 {
    zone().map_or(0, |z| z.offset_at(secs))
}

/// The local zone as `localtime(3)` finds it.
fn zone() -> Option<Zone> {
    match std::env::var("TZ") {
        Ok(tz) => {
            let tz = tz.strip_prefix(':').unwrap_or(&tz);
            if tz.is_empty() {
                return None;
            }
            let path = if tz.starts_with('/') {
                PathBuf::from(tz)
            } else {
                Path::new(ZONEINFO).join(tz)
            };
            // A name with ".." could leave the zoneinfo directory; glibc refuses those too.
            let file = if tz.contains("..") {
                None
            } else {
                read_tzif(&path)
            };
            file.or_else(|| parse_posix(tz).map(Zone::Posix))
        }
        Err(_) => read_tzif(Path::new("/etc/localtime")),
    }
}

/// A time zone: a TZif file's transitions (with its POSIX rule for later times), or a rule alone.
#[derive(Debug, Clone, PartialEq)]
enum Zone {
    Tzif {
        /// Transition instants, ascending, with the UTC offset in force from each.
        transitions: Vec<(i64, i64)>,
        /// The offset before the first transition.
        initial: i64,
        /// The rule for instants after the last transition (v2+ footer).
        footer: Option<Posix>,
    },
    Posix(Posix),
}

impl Zone {
    fn offset_at(&self, t: i64) -> i64 {
        match self {
            Zone::Posix(p) => p.offset_at(t),
            Zone::Tzif {
                transitions,
                initial,
                footer,
            } => {
                let i = transitions.partition_point(|&(at, _)| at <= t);
                if i == transitions.len() {
                    if let Some(f) = footer {
                        return f.offset_at(t);
                    }
                }
                match i {
                    0 => *initial,
                    _ => transitions[i - 1].1,
                }
            }
        }
    }
}

fn be32(b: &[u8], at: usize) -> Option<i64> {
    let a: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(i64::from(i32::from_be_bytes(a)))
}

fn be64(b: &[u8], at: usize) -> Option<i64> {
    let a: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
    Some(i64::from_be_bytes(a))
}

fn count(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(be32(b, at)?).ok()
}

fn read_tzif(path: &Path) -> Option<Zone> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_TZIF_BYTES {
        return None;
    }
    parse_tzif(&std::fs::read(path).ok()?)
}

/// Parses a TZif file (RFC 8536), preferring the 64-bit data of version 2 and later.
fn parse_tzif(b: &[u8]) -> Option<Zone> {
    if b.get(..4)? != b"TZif" {
        return None;
    }
    let version = *b.get(4)?;
    let header = |at: usize| -> Option<[usize; 6]> {
        Some([
            count(b, at + 20)?,
            count(b, at + 24)?,
            count(b, at + 28)?,
            count(b, at + 32)?,
            count(b, at + 36)?,
            count(b, at + 40)?,
        ])
    };
    let [isut, isstd, leap, time, typ, chars] = header(0)?;
    let (base, tsize) = if version >= b'2' {
        let v1 = 44 + time * 5 + typ * 6 + chars + leap * 8 + isstd + isut;
        (v1, 8)
    } else {
        (0, 4)
    };
    let [isut, isstd, leap, time, typ, chars] = header(base)?;
    let data = base + 44;
    let ts = |i: usize| {
        if tsize == 8 {
            be64(b, data + i * 8)
        } else {
            be32(b, data + i * 4)
        }
    };
    let idx_at = data + time * tsize;
    let types_at = idx_at + time;
    let ty = |i: usize| -> Option<(i64, bool)> {
        let at = types_at + i * 6;
        Some((be32(b, at)?, *b.get(at + 4)? != 0))
    };
    let mut transitions = Vec::with_capacity(time);
    for i in 0..time {
        let t = usize::from(*b.get(idx_at + i)?);
        transitions.push((ts(i)?, ty(t)?.0));
    }
    // Before the first transition: the first standard-time type (RFC 8536 3.2), else type 0.
    let initial = (0..typ)
        .filter_map(ty)
        .find(|&(_, dst)| !dst)
        .or_else(|| ty(0))
        .map_or(0, |t| t.0);
    let footer = if version >= b'2' {
        let end = types_at + typ * 6 + chars + leap * (tsize + 4) + isstd + isut;
        let rest = b.get(end..)?;
        let text = std::str::from_utf8(rest).ok()?;
        text.trim_matches('\n').lines().next().and_then(parse_posix)
    } else {
        None
    };
    Some(Zone::Tzif {
        transitions,
        initial,
        footer,
    })
}

/// A POSIX TZ rule: standard offset, and optionally a daylight offset with its start and end.
#[derive(Debug, Clone, PartialEq)]
struct Posix {
    /// Seconds east of UTC in standard time.
    std: i64,
    /// Daylight time: offset east of UTC, start and end rules.
    dst: Option<(i64, Rule, Rule)>,
}

/// When daylight time starts or ends: `Mm.w.d` (the d'th weekday of week w of month m), or a
/// day of the year (`Jn`: 1..=365 without Feb 29; `n`: 0..=365), at `time` seconds local time.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Month {
        m: u32,
        w: u32,
        d: u32,
        time: i64,
    },
    Julian {
        n: i64,
        leap_counts: bool,
        time: i64,
    },
}

impl Posix {
    fn offset_at(&self, t: i64) -> i64 {
        let Some((dst, start, end)) = self.dst else {
            return self.std;
        };
        let (y, _, _) = civil_from_days(t.div_euclid(DAY));
        // Start is given in standard time, end in daylight time.
        let s = start.instant(y) - self.std;
        let e = end.instant(y) - dst;
        let in_dst = if s < e {
            t >= s && t < e
        } else {
            // Southern hemisphere: daylight time spans the new year.
            t >= s || t < e
        };
        if in_dst {
            dst
        } else {
            self.std
        }
    }
}

impl Rule {
    /// The rule's instant in year `y`, as local seconds since the epoch.
    fn instant(self, y: i64) -> i64 {
        match self {
            Rule::Month { m, w, d, time } => {
                let first = days_from_civil(y, m, 1);
                // 1970-01-01 was a Thursday (weekday 4).
                let wd_first = (first + 4).rem_euclid(7);
                let mut day = first + (i64::from(d) - wd_first).rem_euclid(7);
                day += 7 * (i64::from(w) - 1);
                let next = if m == 12 {
                    days_from_civil(y + 1, 1, 1)
                } else {
                    days_from_civil(y, m + 1, 1)
                };
                while day >= next {
                    day -= 7;
                }
                day * DAY + time
            }
            Rule::Julian {
                n,
                leap_counts,
                time,
            } => {
                let jan1 = days_from_civil(y, 1, 1);
                let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
                let day = if leap_counts {
                    n
                } else {
                    // Jn counts 1..=365 and never Feb 29.
                    n - 1 + i64::from(leap && n >= 60)
                };
                (jan1 + day) * DAY + time
            }
        }
    }
}

/// `[+-]hh[:mm[:ss]]` to seconds; returns the value and the rest of the text.
fn parse_hms(s: &str) -> Option<(i64, &str)> {
    let (sign, s) = match s.as_bytes().first() {
        Some(b'-') => (-1, &s[1..]),
        Some(b'+') => (1, &s[1..]),
        _ => (1, s),
    };
    let mut total = 0i64;
    let mut rest = s;
    for (i, mult) in [3600i64, 60, 1].into_iter().enumerate() {
        if i > 0 {
            match rest.strip_prefix(':') {
                Some(r) => rest = r,
                None => break,
            }
        }
        let n = rest.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        total += rest[..n].parse::<i64>().ok()? * mult;
        rest = &rest[n..];
    }
    Some((sign * total, rest))
}

/// A zone name: letters, or anything in angle brackets (`<+0330>`).
fn skip_name(s: &str) -> Option<&str> {
    if let Some(r) = s.strip_prefix('<') {
        let end = r.find('>')?;
        return Some(&r[end + 1..]);
    }
    let n = s.bytes().take_while(u8::is_ascii_alphabetic).count();
    (n >= 3).then(|| &s[n..])
}

fn parse_rule(s: &str) -> Option<Rule> {
    let (date, time) = match s.split_once('/') {
        Some((d, t)) => (d, parse_hms(t)?.0),
        None => (s, 7200),
    };
    if let Some(m) = date.strip_prefix('M') {
        let mut it = m.split('.').map(str::parse::<u32>);
        let (m, w, d) = (it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?);
        if !(1..=12).contains(&m) || !(1..=5).contains(&w) || d > 6 {
            return None;
        }
        return Some(Rule::Month { m, w, d, time });
    }
    let (n, leap_counts) = match date.strip_prefix('J') {
        Some(j) => (j.parse().ok()?, false),
        None => (date.parse().ok()?, true),
    };
    Some(Rule::Julian {
        n,
        leap_counts,
        time,
    })
}

/// Parses a POSIX TZ string (`EST5EDT,M3.2.0,M11.1.0`). Offsets in it are west of UTC.
fn parse_posix(s: &str) -> Option<Posix> {
    let rest = skip_name(s)?;
    let (std_west, rest) = parse_hms(rest)?;
    let std = -std_west;
    if rest.is_empty() {
        return Some(Posix { std, dst: None });
    }
    let rest = skip_name(rest)?;
    let (dst, rest) = match rest.as_bytes().first() {
        Some(b',') | None => (std + 3600, rest),
        _ => {
            let (w, r) = parse_hms(rest)?;
            (-w, r)
        }
    };
    let rules = rest.strip_prefix(',')?;
    let (a, b) = rules.split_once(',')?;
    Some(Posix {
        std,
        dst: Some((dst, parse_rule(a)?, parse_rule(b)?)),
    })
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) to days since 1970-01-01, the inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_utc_known_instants() {
        assert_eq!(format_utc(1_795_278_336), "2026-11-21 16:25:36");
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
    }

    #[test]
    fn days_from_civil_inverts_civil_from_days() {
        for d in [-1000, 0, 59, 60, 365, 10_957, 20_000, 60_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn posix_rule_central_europe_switches_on_last_sundays() {
        let p = parse_posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        assert_eq!(p.std, 3600);
        // 2026-03-29 00:59:59 UTC is before the switch (01:00 UTC), 01:00:00 after.
        let switch = days_from_civil(2026, 3, 29) * DAY + 3600;
        assert_eq!(p.offset_at(switch - 1), 3600);
        assert_eq!(p.offset_at(switch), 7200);
        // Back on 2026-10-25 at 01:00 UTC.
        let back = days_from_civil(2026, 10, 25) * DAY + 3600;
        assert_eq!(p.offset_at(back - 1), 7200);
        assert_eq!(p.offset_at(back), 3600);
    }

    #[test]
    fn posix_plain_offsets_and_brackets() {
        assert_eq!(parse_posix("UTC0").unwrap().std, 0);
        assert_eq!(parse_posix("JST-9").unwrap().std, 9 * 3600);
        assert_eq!(parse_posix("<+0530>-5:30").unwrap().std, 19_800);
        assert!(parse_posix("x").is_none());
    }

    #[test]
    fn tzif_v1_transitions_pick_the_offset_in_force() {
        // A v1 file: two transitions (to +1h at t=100, back to 0 at t=200), two types.
        let mut b = b"TZif".to_vec();
        b.push(0);
        b.extend_from_slice(&[0; 15]);
        for c in [0u32, 0, 0, 2, 2, 4] {
            b.extend_from_slice(&c.to_be_bytes());
        }
        b.extend_from_slice(&100i32.to_be_bytes());
        b.extend_from_slice(&200i32.to_be_bytes());
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&3600i32.to_be_bytes());
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(b"UTC\0");
        let z = parse_tzif(&b).unwrap();
        assert_eq!(z.offset_at(50), 0);
        assert_eq!(z.offset_at(150), 3600);
        assert_eq!(z.offset_at(250), 0);
    }

    #[test]
    fn tzif_system_utc_file_reads_as_zero_offset() {
        if let Some(z) = read_tzif(Path::new("/usr/share/zoneinfo/Etc/UTC")) {
            assert_eq!(z.offset_at(1_795_278_336), 0);
        }
    }
}

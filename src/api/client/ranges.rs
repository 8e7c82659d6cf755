//! HTTP range requests (RFC 9110 §14): `bytes=` single, open, suffix and multiple ranges.

/// What a `Range` header asks of a representation of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable Range: serve everything with 200.
    Full,
    /// Byte ranges, each `start..end` (end exclusive), in the order asked.
    Ranges(Vec<(u64, u64)>),
    /// Nothing satisfiable (or malformed): 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// More ranges than this is abuse (many tiny overlapping parts); serve the whole file instead.
const MAX_RANGES: usize = 64;

pub fn parse(header: &str, size: u64) -> RangeRequest {
    let Some((unit, spec)) = header.split_once('=') else {
        return RangeRequest::Unsatisfiable;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        // Other units are ignored, per RFC 9110.
        return RangeRequest::Full;
    }
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    if parts.len() > MAX_RANGES {
        return RangeRequest::Full;
    }
    let mut out = Vec::new();
    for p in parts {
        let Some((a, b)) = p.split_once('-') else {
            return RangeRequest::Unsatisfiable;
        };
        let (a, b) = (a.trim(), b.trim());
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        let range = match (a.is_empty(), b.is_empty()) {
            // "-N": the last N bytes.
            (true, false) if digits(b) => {
                let Ok(n) = b.parse::<u64>() else {
                    return RangeRequest::Unsatisfiable;
                };
                (n > 0 && size > 0).then(|| (size.saturating_sub(n), size))
            }
            // "N-": from N to the end.
            (false, true) if digits(a) => {
                let Ok(start) = a.parse::<u64>() else {
                    return RangeRequest::Unsatisfiable;
                };
                (start < size).then_some((start, size))
            }
            // "N-M": inclusive, M clamped to the end.
            (false, false) if digits(a) && digits(b) => {
                let (Ok(start), Ok(last)) = (a.parse::<u64>(), b.parse::<u64>()) else {
                    return RangeRequest::Unsatisfiable;
                };
                if last < start {
                    return RangeRequest::Unsatisfiable;
                }
                (start < size).then(|| (start, last.saturating_add(1).min(size)))
            }
            _ => return RangeRequest::Unsatisfiable,
        };
        // Unsatisfiable members are dropped; the request fails only if none is left.
        if let Some(r) = range {
            out.push(r);
        }
    }
    if out.is_empty() {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Ranges(coalesce(out))
    }
}

/// Merges overlapping and adjacent ranges (RFC 9110 §14.2 allows it), so the response
/// is never larger than the file plus part headers: `0-,0-,...` asks for the file 64 times and
/// gets it once.
fn coalesce(mut rs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    if rs.len() < 2 {
        return rs;
    }
    let overlapping = {
        let mut sorted = rs.clone();
        sorted.sort_unstable();
        sorted.windows(2).any(|w| w[1].0 <= w[0].1)
    };
    if !overlapping {
        return rs; // disjoint: keep the order asked
    }
    rs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(rs.len());
    for (a, b) in rs {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::RangeRequest::*;
    use super::*;

    #[test]
    fn single_open_suffix_and_multi() {
        assert_eq!(parse("bytes=0-99", 1000), Ranges(vec![(0, 100)]));
        assert_eq!(parse("bytes=990-", 1000), Ranges(vec![(990, 1000)]));
        assert_eq!(parse("bytes=-500", 1000), Ranges(vec![(500, 1000)]));
        assert_eq!(parse("bytes=-5000", 1000), Ranges(vec![(0, 1000)]));
        assert_eq!(parse("bytes=900-5000", 1000), Ranges(vec![(900, 1000)]));
        assert_eq!(
            parse("bytes=0-0, 10-19,-1", 1000),
            Ranges(vec![(0, 1), (10, 20), (999, 1000)])
        );
        assert_eq!(parse("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse("bytes=5-1", 1000), Unsatisfiable);
        assert_eq!(parse("bytes=abc", 1000), Unsatisfiable);
        assert_eq!(parse("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse("items=0-1", 1000), Full);
        assert_eq!(parse("bytes=2000-3000, 0-1", 1000), Ranges(vec![(0, 2)]));
    }

    #[test]
    fn overlapping_ranges_are_merged() {
        let many = vec!["0-"; 64].join(",");
        assert_eq!(
            parse(&format!("bytes={many}"), 1 << 26),
            Ranges(vec![(0, 1 << 26)])
        );
        assert_eq!(
            parse("bytes=500-599,0-99,50-149", 1000),
            Ranges(vec![(0, 150), (500, 600)])
        );
        // Disjoint ranges keep the order they were asked in.
        assert_eq!(
            parse("bytes=500-599,0-99", 1000),
            Ranges(vec![(500, 600), (0, 100)])
        );
    }
}

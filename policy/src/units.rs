//! Durations and rates as policies and configs write them: `250ms`, `10s`, `15m`, `24h`, `7d`;
//! `10/s`, `100/m`, `5/30s`.

use std::time::Duration;

/// `250ms`, `10s`, `5m`, `24h`, `7d`: a whole number and a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m, h, d)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("duration {s:?} must start with a whole number"))?;
    let secs = |k: u64| {
        n.checked_mul(k)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {s:?} is too large"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => Err(format!(
            "duration {s:?} has unknown unit {unit:?} (ms, s, m, h, d)"
        )),
    }
}

/// A rate: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// `N/s`, `N/m`, `N/h`, `N/d`, or `N/<duration>` (`5/30s`); N ≥ 1, the period ≥ 1 ms
    /// and at most 30 days.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let (n, per) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("rate {s:?} must be COUNT/PERIOD, e.g. 10/m"))?;
        let count: u32 = n
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("rate {s:?}: the count must be a whole number ≥ 1"))?;
        let per = per.trim();
        let per = match per {
            "s" | "m" | "h" | "d" => parse_duration(&format!("1{per}")),
            other => parse_duration(other),
        }
        .map_err(|e| format!("rate {s:?}: {e}"))?;
        if per < Duration::from_millis(1) || per > Duration::from_secs(30 * 86_400) {
            return Err(format!(
                "rate {s:?}: the period must be between 1ms and 30d"
            ));
        }
        Ok(Rate { count, per })
    }

    /// The steady interval between two events.
    pub fn interval(&self) -> Duration {
        self.per / self.count
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.per.as_millis();
        match ms {
            1000 => write!(f, "{}/s", self.count),
            60_000 => write!(f, "{}/m", self.count),
            3_600_000 => write!(f, "{}/h", self.count),
            86_400_000 => write!(f, "{}/d", self.count),
            _ => write!(f, "{}/{ms}ms", self.count),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        for bad in ["", "10", "s", "1.5s", "10x", "-1s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates() {
        let r = Rate::parse("10/m").unwrap();
        assert_eq!((r.count, r.per), (10, Duration::from_secs(60)));
        assert_eq!(r.interval(), Duration::from_secs(6));
        assert_eq!(r.to_string(), "10/m");
        let r = Rate::parse(" 5 / 30s ").unwrap();
        assert_eq!((r.count, r.per), (5, Duration::from_secs(30)));
        assert_eq!(Rate::parse("3/s").unwrap().to_string(), "3/s");
        for bad in [
            "10", "0/s", "-1/s", "x/s", "10/", "10/y", "10/0ms", "1/31d", "1.5/s",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }
}

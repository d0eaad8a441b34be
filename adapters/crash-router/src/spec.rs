//! The destination queue list, written as in the original pigeon:
//! `"socorro.normal,15:socorro.submitter"` (optional `THROTTLE:` prefix, 0–100).

use std::fmt;

use rand::Rng;

/// One destination queue and the percentage of accepted crashes it receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Queue name, published to through the default exchange.
    pub name: String,
    /// 0–100: the share of accepted crash ids this queue gets (100 = all).
    pub throttle: u8,
}

/// Why a queue list could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The whole list is empty.
    #[error("no queues given (expected e.g. \"socorro.normal,15:socorro.submitter\")")]
    Empty,
    /// An entry between commas is empty (e.g. a trailing comma).
    #[error("entry {0} is empty")]
    EmptyEntry(usize),
    /// The `THROTTLE:` prefix is not an integer 0–100.
    #[error("entry {index} (`{entry}`): throttle must be an integer from 0 to 100")]
    BadThrottle {
        /// 1-based position in the list.
        index: usize,
        /// The entry as written.
        entry: String,
    },
    /// The queue name is empty, too long or contains whitespace.
    #[error("entry {index} (`{entry}`): {why}")]
    BadName {
        /// 1-based position in the list.
        index: usize,
        /// The entry as written.
        entry: String,
        /// What is wrong with the name.
        why: &'static str,
    },
    /// The same queue appears twice.
    #[error("queue `{0}` is listed more than once")]
    Duplicate(String),
}

impl fmt::Display for QueueSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.throttle == 100 {
            f.write_str(&self.name)
        } else {
            write!(f, "{}:{}", self.throttle, self.name)
        }
    }
}

/// Parses `"q1, 15:q2"`: comma-separated entries, each `[THROTTLE:]QUEUE`, whitespace
/// around entries, throttles and names ignored; no throttle means 100.
pub fn parse_queues(spec: &str) -> Result<Vec<QueueSpec>, SpecError> {
    if spec.trim().is_empty() {
        return Err(SpecError::Empty);
    }
    let mut out: Vec<QueueSpec> = Vec::new();
    for (i, raw) in spec.split(',').enumerate() {
        let index = i + 1;
        let entry = raw.trim();
        if entry.is_empty() {
            return Err(SpecError::EmptyEntry(index));
        }
        let (throttle, name) = match entry.split_once(':') {
            Some((t, n)) => {
                let t = t.trim();
                let throttle = t
                    .parse::<u8>()
                    .ok()
                    .filter(|v| *v <= 100 && t.chars().all(|c| c.is_ascii_digit()))
                    .ok_or_else(|| SpecError::BadThrottle {
                        index,
                        entry: entry.to_string(),
                    })?;
                (throttle, n.trim())
            }
            None => (100, entry),
        };
        let bad = |why| SpecError::BadName {
            index,
            entry: entry.to_string(),
            why,
        };
        if name.is_empty() {
            return Err(bad("queue name is empty"));
        }
        if name.len() > 255 {
            return Err(bad("queue name is longer than 255 bytes"));
        }
        if name.chars().any(char::is_whitespace) {
            return Err(bad("queue name contains whitespace"));
        }
        if name.contains(':') {
            return Err(bad(
                "queue name contains `:` (only one THROTTLE: prefix allowed)",
            ));
        }
        if out.iter().any(|q| q.name == name) {
            return Err(SpecError::Duplicate(name.to_string()));
        }
        out.push(QueueSpec {
            name: name.to_string(),
            throttle,
        });
    }
    Ok(out)
}

/// Whether a queue with `throttle` gets one crash id: always at 100, never at 0,
/// otherwise when a uniform draw in 0..100 is below the throttle.
pub fn selected(throttle: u8, rng: &mut impl Rng) -> bool {
    if throttle >= 100 {
        return true;
    }
    if throttle == 0 {
        return false;
    }
    rng.random_range(0..100u8) < throttle
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn q(name: &str, throttle: u8) -> QueueSpec {
        QueueSpec {
            name: name.into(),
            throttle,
        }
    }

    #[test]
    fn parses_original_examples() {
        assert_eq!(parse_queues("normal").unwrap(), vec![q("normal", 100)]);
        assert_eq!(
            parse_queues("normal,submitter").unwrap(),
            vec![q("normal", 100), q("submitter", 100)]
        );
        assert_eq!(
            parse_queues("normal,15:submitter").unwrap(),
            vec![q("normal", 100), q("submitter", 15)]
        );
        assert_eq!(
            parse_queues("normal,submitter,jimbob").unwrap(),
            vec![q("normal", 100), q("submitter", 100), q("jimbob", 100)]
        );
        assert_eq!(
            parse_queues("socorro.normal,15:socorro.submitter").unwrap(),
            vec![q("socorro.normal", 100), q("socorro.submitter", 15)]
        );
    }

    #[test]
    fn tolerates_whitespace() {
        assert_eq!(
            parse_queues("  socorro.normal ,\t 15 : socorro.submitter  ,0:x\n").unwrap(),
            vec![
                q("socorro.normal", 100),
                q("socorro.submitter", 15),
                q("x", 0)
            ]
        );
    }

    #[test]
    fn throttle_bounds() {
        assert_eq!(parse_queues("0:a").unwrap(), vec![q("a", 0)]);
        assert_eq!(parse_queues("100:a").unwrap(), vec![q("a", 100)]);
        for bad in ["101:a", "-1:a", "+5:a", "x:a", ":a", "1.5:a", "256:a"] {
            assert!(
                matches!(parse_queues(bad), Err(SpecError::BadThrottle { .. })),
                "{bad} must be refused"
            );
        }
    }

    #[test]
    fn refuses_bad_specs() {
        assert_eq!(parse_queues(""), Err(SpecError::Empty));
        assert_eq!(parse_queues("   "), Err(SpecError::Empty));
        assert_eq!(parse_queues("a,"), Err(SpecError::EmptyEntry(2)));
        assert_eq!(parse_queues(",a"), Err(SpecError::EmptyEntry(1)));
        assert!(matches!(
            parse_queues("15:"),
            Err(SpecError::BadName { .. })
        ));
        assert!(matches!(
            parse_queues("my queue"),
            Err(SpecError::BadName { .. })
        ));
        assert!(matches!(
            parse_queues("1:2:a"),
            Err(SpecError::BadName { .. })
        ));
        let long = "q".repeat(256);
        assert!(matches!(
            parse_queues(&long),
            Err(SpecError::BadName { .. })
        ));
        assert_eq!(
            parse_queues("a,15:a"),
            Err(SpecError::Duplicate("a".into()))
        );
    }

    #[test]
    fn display_round_trips() {
        let specs = parse_queues("a, 15:b ,100:c").unwrap();
        let text: Vec<String> = specs.iter().map(ToString::to_string).collect();
        assert_eq!(text.join(","), "a,15:b,c");
        assert_eq!(parse_queues(&text.join(",")).unwrap(), specs);
    }

    #[test]
    fn throttle_0_and_100_ignore_the_draw() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!((0..1000).all(|_| selected(100, &mut rng)));
        assert!((0..1000).all(|_| !selected(0, &mut rng)));
    }

    #[test]
    fn throttle_15_selects_about_15_percent_deterministically() {
        let count = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..10_000).filter(|_| selected(15, &mut rng)).count()
        };
        let n = count(42);
        assert!((1300..=1700).contains(&n), "15% of 10000, got {n}");
        assert_eq!(count(42), n, "the same seed gives the same choices");
        let seq = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..64).map(|_| selected(15, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(seq(7), seq(7));
        assert_ne!(seq(7), seq(8), "different seeds differ");
    }
}

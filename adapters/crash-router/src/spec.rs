//! The destination queue list, written as in the original pigeon:
//! `"socorro.normal,15:socorro.submitter"` (optional `THROTTLE:` prefix, 0–100).

use std::fmt;

use sha2::{Digest, Sha256};

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

/// Seed of the throttle draws when `[crash_router] seed` is unset: draws stay a function of
/// the crash id alone, so every instance and every redelivery agree.
pub const DEFAULT_SEED: u64 = 0;

/// The draw in `0..100` for one (crash id, queue) pair: SHA-256 of the seed, the queue name
/// and the crash id, so it is the same on every instance, process and redelivery, and
/// independent between queues (a 15% queue is not a subset of a 30% one).
pub fn draw(seed: u64, queue: &str, crash_id: &str) -> u8 {
    let mut h = Sha256::new();
    h.update(seed.to_be_bytes());
    // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    for part in [queue, crash_id] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // The modulo bias of 2^64 mod 100 is ~5e-18: irrelevant for a percentage.
    (u64::from_be_bytes(first) % 100) as u8
}

/// Whether a queue with `throttle` gets `crash_id`: always at 100, never at 0, otherwise
/// when the pair's [`draw`] is below the throttle.
pub fn selected(throttle: u8, seed: u64, queue: &str, crash_id: &str) -> bool {
    if throttle >= 100 {
        return true;
    }
    if throttle == 0 {
        return false;
    }
    draw(seed, queue, crash_id) < throttle
}

#[cfg(test)]
mod tests {
    use super::*;

    // Computed independently (Python hashlib) from the documented encoding.
    const PINNED: [u8; 2] = [35, 82];

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
        let id = |n: u32| format!("{n:08x}-2d1c-4865-af09-80bc00180313");
        assert!((0..1000).all(|n| selected(100, 1, "q", &id(n))));
        assert!((0..1000).all(|n| !selected(0, 1, "q", &id(n))));
    }

    #[test]
    fn throttle_15_selects_about_15_percent_deterministically() {
        let id = |n: u32| format!("{n:08x}-2d1c-4865-af09-80bc00180313");
        let count = |seed| {
            (0..10_000)
                .filter(|n| selected(15, seed, "q", &id(*n)))
                .count()
        };
        let n = count(42);
        assert!((1300..=1700).contains(&n), "15% of 10000, got {n}");
        assert_eq!(count(42), n, "the same seed gives the same choices");
        let seq = |seed, q| {
            (0..64)
                .map(|n| selected(15, seed, q, &id(n)))
                .collect::<Vec<_>>()
        };
        assert_eq!(seq(7, "q"), seq(7, "q"));
        assert_ne!(seq(7, "q"), seq(8, "q"), "different seeds differ");
        assert_ne!(
            seq(7, "q"),
            seq(7, "r"),
            "different queues draw independently"
        );
    }

    #[test]
    fn draws_are_a_fixed_function_of_the_inputs() {
        // Pinned values: a change of hash, encoding or reduction would move every
        // deployment's choices, which a redelivery across a version change must not see.
        let id = "00007bd0-2d1c-4865-af09-80bc00180313";
        let pinned = [
            draw(0, "socorro.submitter", id),
            draw(42, "socorro.submitter", id),
        ];
        assert_eq!(pinned, PINNED);
        assert!(pinned.iter().all(|d| *d < 100));
    }

    /// Design §7: a throttled queue gets a crash when its draw is *below* the throttle: a
    /// draw of exactly 15 is not taken at 15 %, and is at 16 % (`<=` would give 16 %).
    #[test]
    fn a_draw_equal_to_the_throttle_is_not_selected() {
        let id = (0..10_000)
            .map(|n| format!("crash-{n}"))
            .find(|id| draw(7, "socorro.submitter", id) == 15)
            .expect("some id draws 15");
        assert!(!selected(15, 7, "socorro.submitter", &id));
        assert!(selected(16, 7, "socorro.submitter", &id));
        let zero = (0..10_000)
            .map(|n| format!("crash-{n}"))
            .find(|id| draw(7, "socorro.submitter", id) == 0)
            .expect("some id draws 0");
        assert!(selected(1, 7, "socorro.submitter", &zero));
    }
}

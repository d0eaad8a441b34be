//! Retry planning: what an outcome publishes before its input is acked — the success
//! message and its extras, the input again through a retry tier (attempt counted, delay
//! chosen, the processor's retry headers kept), or a dead letter once attempts run out.

use tracing::{debug, info, warn};

use crate::config::RetryConfig;
use crate::headers as h;
use crate::processor::{MessageContext, Outcome};
use crate::publisher::{Outgoing, OutputOf, Publisher, output_properties};
use crate::telemetry::LogText;
use crate::topology::Topology;

/// A service's destinations, computed once: where each kind of outcome goes.
pub(crate) struct Planner {
    output_exchange: String,
    success_key: String,
    retry_exchange: String,
    retry: RetryConfig,
}

impl Planner {
    /// The plan of a service with `topology`, success key `<output_routing_key>.success`.
    pub fn new(topology: &Topology, output_routing_key: &str, retry: &RetryConfig) -> Self {
        Self {
            output_exchange: topology.output_exchange.clone(),
            success_key: format!("{output_routing_key}.success"),
            retry_exchange: topology.retry_exchange(),
            retry: retry.clone(),
        }
    }

    /// Turns an outcome of the delivery `body`/`ctx` into the messages to publish (before
    /// the ack) and its metric label.
    pub fn plan(
        &self,
        publisher: &Publisher,
        body: &[u8],
        ctx: &MessageContext,
        outcome: Outcome,
    ) -> (&'static str, Vec<Outgoing>) {
        let origin = ctx.origin();
        let attempts = ctx.attempt.saturating_add(1);
        let progress = ctx.retry_headers();
        let dead_letter = |kind: &str, why: &str| {
            // The attempt's progress marks (records forwarded, ids published) go with the
            // dead letter, so its replay skips what this attempt already did.
            let mut merged;
            let mut origin = ctx.origin();
            if !progress.is_empty() {
                merged = ctx.headers.clone();
                for (k, v) in &progress {
                    h::set_str(&mut merged, k, v);
                }
                origin.headers = &merged;
            }
            // Tries made in place count as the tiers' retries would have.
            let attempts = origin.attempt.saturating_add(1);
            vec![publisher.dead_letter_message(&origin, body.to_vec(), attempts, kind, why)]
        };
        match outcome {
            Outcome::Success {
                body: value,
                extra,
                identity,
            } => {
                let mut msgs = Vec::with_capacity(1 + extra.len());
                // Named, it has the id an extra announcing the same would have: a record
                // announced first by one attempt and as an extra by the next keeps its id.
                let of = match &identity {
                    Some(named) => OutputOf::Publication {
                        exchange: &self.output_exchange,
                        routing_key: &self.success_key,
                        body: named.as_bytes(),
                    },
                    None => OutputOf::Success,
                };
                msgs.push(Outgoing {
                    exchange: self.output_exchange.clone(),
                    routing_key: self.success_key.clone(),
                    body: to_json(&value, body.len()),
                    properties: output_properties(
                        publisher.service(),
                        &origin,
                        "application/json",
                        of,
                    ),
                    mandatory: false,
                    broker_adds: 0,
                });
                for x in extra {
                    let of = OutputOf::Publication {
                        exchange: &x.exchange,
                        routing_key: &x.routing_key,
                        body: x.id_source(),
                    };
                    msgs.push(Outgoing {
                        properties: output_properties(
                            publisher.service(),
                            &origin,
                            &x.content_type,
                            of,
                        ),
                        exchange: x.exchange,
                        routing_key: x.routing_key,
                        body: x.body,
                        mandatory: x.mandatory,
                        broker_adds: 0,
                    });
                }
                // Debug, not info: a line per message is the log's (and the CPU's) biggest
                // cost at volume, and the counters already say how many succeeded.
                debug!("success");
                ("success", msgs)
            }
            Outcome::Drop(reason) => {
                info!(reason = %LogText(&reason), "dropped");
                ("drop", Vec::new())
            }
            // Settled before planning (nack, requeue); never published.
            Outcome::Interrupted(_) => ("interrupted", Vec::new()),
            // An attempt that made progress is planned as such (its delay not raised, no
            // outage clock): a batch a throttling endpoint lets through a slice at a time
            // gets as many attempts as it needs, however long that takes.
            Outcome::Retry(reason)
                if ctx.outage()
                    && self.retry.max_outage_ms > 0
                    && !ctx.made_progress(&progress) =>
            {
                let now = now_ms();
                // A forged or skewed start in the future is an outage starting now; on a
                // first delivery the header is the producer's (or a dead letter moved back
                // by hand), not ours.
                let since = h::get_int(&ctx.headers, h::OUTAGE_SINCE)
                    .filter(|_| ctx.attempt > 0)
                    .and_then(|t| u64::try_from(t).ok())
                    .map_or(now, |t| t.min(now));
                let elapsed = std::time::Duration::from_millis(now - since);
                if now - since >= self.retry.max_outage_ms || attempts == u32::MAX {
                    let why = format!(
                        "gave up after {attempts} attempts over an outage of {} s \
                         (retry.max_outage_ms {} ms); last error: {reason}",
                        elapsed.as_secs(),
                        self.retry.max_outage_ms
                    );
                    warn!(error = %LogText(&why), "outage outlasted its budget; dead-lettering");
                    return ("dead_letter", dead_letter(h::KIND_RETRIES_EXHAUSTED, &why));
                }
                // Not counted: as an attempt that made progress is not.
                let progressed = (ctx.attempt - ctx.counted_attempts()).saturating_add(1);
                let delay = self.retry.outage_delay(elapsed, ctx.retry_wait());
                warn!(
                    error = %LogText(&reason),
                    retry_in_ms = delay,
                    outage_s = elapsed.as_secs(),
                    "unavailable; retrying later (not counted)"
                );
                let msg = self.retry_message(
                    body,
                    ctx,
                    &reason,
                    &progress,
                    attempts,
                    progressed,
                    delay,
                    Outage::Since(since),
                );
                ("retry", vec![msg])
            }
            Outcome::Retry(reason) => {
                // Attempts that finished parts of a batch (records posted, ids published)
                // are not counted toward `max_attempts`, nor do they raise the delay: a
                // batch that a rate-limited peer lets through a slice per attempt gets as
                // many attempts as it needs. Each such attempt settles at least one part
                // more, so they end. `x-retry-count` still counts every attempt.
                // The headers are anyone's numbers: at the count's ceiling (a forged
                // `x-retry-count` near u32::MAX) it can no longer grow, so progress could
                // cancel every attempt forever; such a message is given up on.
                let advanced = ctx.made_progress(&progress);
                let progressed =
                    (ctx.attempt - ctx.counted_attempts()).saturating_add(u32::from(advanced));
                let counted = attempts - progressed.min(attempts);
                if counted >= self.retry.max_attempts || attempts == u32::MAX {
                    let why = format!(
                        "gave up after {attempts} attempts ({counted} without progress); \
                         last error: {reason}"
                    );
                    warn!(error = %LogText(&why), "retries exhausted; dead-lettering");
                    return ("dead_letter", dead_letter(h::KIND_RETRIES_EXHAUSTED, &why));
                }
                let delay = self
                    .retry
                    .delay_at_least(counted.saturating_sub(1), ctx.retry_wait());
                warn!(error = %LogText(&reason), retry_in_ms = delay, "retrying later");
                // Progress shows the downstream working: an outage it carried is over (a
                // later one starts its own clock). A retry of the message's own keeps it:
                // one outage budget in all for a message whose failures alternate.
                let outage = if advanced { Outage::Over } else { Outage::Kept };
                let msg = self.retry_message(
                    body, ctx, &reason, &progress, attempts, progressed, delay, outage,
                );
                ("retry", vec![msg])
            }
            Outcome::Permanent(reason) => {
                warn!(error = %LogText(&reason), kind = h::KIND_PERMANENT, "dead-lettering");
                ("dead_letter", dead_letter(h::KIND_PERMANENT, &reason))
            }
            Outcome::Exhausted(reason) => {
                warn!(error = %LogText(&reason), kind = h::KIND_RETRIES_EXHAUSTED, "dead-lettering");
                (
                    "dead_letter",
                    dead_letter(h::KIND_RETRIES_EXHAUSTED, &reason),
                )
            }
        }
    }

    /// The input again, through the retry tier of `delay`: its attempts so far, those
    /// not counted, its origin, the reason, the processor's retry headers, the trace, and
    /// what becomes of the outage it waits out (`x-outage-since`).
    #[allow(clippy::too_many_arguments)]
    fn retry_message(
        &self,
        body: &[u8],
        ctx: &MessageContext,
        reason: &str,
        progress: &[(String, String)],
        attempts: u32,
        progressed: u32,
        delay: u64,
        outage: Outage,
    ) -> Outgoing {
        let mut hdr = h::without(&ctx.headers, h::BROKER_OWNED);
        // A first delivery's `x-outage-since` is a producer's (or a replayed dead
        // letter's): not carried into the retry, whose next outage retry would take it as
        // the start of its outage (one in 1970 gave up at once).
        if (matches!(outage, Outage::Over) || ctx.attempt == 0) && hdr.contains_key(h::OUTAGE_SINCE)
        {
            hdr = h::without(&hdr, &[h::OUTAGE_SINCE]);
        }
        h::set_int(&mut hdr, h::RETRY_COUNT, i64::from(attempts));
        if progressed > 0 {
            h::set_int(&mut hdr, h::PROGRESS_ATTEMPTS, i64::from(progressed));
        }
        if let Outage::Since(t) = outage {
            h::set_int(
                &mut hdr,
                h::OUTAGE_SINCE,
                i64::try_from(t).unwrap_or(i64::MAX),
            );
        }
        h::set_str(&mut hdr, h::ORIGINAL_EXCHANGE, &ctx.exchange);
        h::set_str(&mut hdr, h::ORIGINAL_ROUTING_KEY, &ctx.routing_key);
        h::set_str(&mut hdr, h::LAST_ERROR, &h::error_text(reason));
        for (k, v) in progress {
            h::set_str(&mut hdr, k, v);
        }
        ctx.trace.write(&mut hdr);
        let props = crate::publisher::republished(&ctx.properties, hdr);
        Outgoing {
            exchange: self.retry_exchange.clone(),
            routing_key: Topology::retry_routing_key(delay),
            body: body.to_vec(),
            properties: props,
            mandatory: true,
            broker_adds: crate::headers::DEAD_LETTERING_ROOM,
        }
    }

    /// A dead letter of the delivery without the input's headers (and without this
    /// attempt's progress marks): for a message whose headers leave no room in one frame
    /// for the framework's own. Its `x-original-*`, attempt count and trace are kept.
    pub fn bare_dead_letter(
        &self,
        publisher: &Publisher,
        body: &[u8],
        ctx: &MessageContext,
        why: &str,
    ) -> Vec<Outgoing> {
        let none = lapin::types::FieldTable::default();
        let mut origin = ctx.origin();
        origin.headers = &none;
        warn!(error = %why, kind = h::KIND_PERMANENT, "dead-lettering without the input's headers");
        vec![publisher.dead_letter_message(
            &origin,
            body.to_vec(),
            origin.attempt.saturating_add(1),
            h::KIND_PERMANENT,
            why,
        )]
    }
}

/// `value` as JSON bytes, the buffer sized like the input it answers (most outputs are
/// about that size) instead of growing from 128 bytes by doubling.
fn to_json(value: &serde_json::Value, like: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(like.clamp(128, 64 * 1024));
    // Writing a Value into a Vec cannot fail: its map keys are strings and Vec writes
    // are infallible.
    if serde_json::to_writer(&mut out, value).is_err() {
        out = value.to_string().into_bytes();
    }
    out
}

/// What a retry does with the outage its message waits out (`x-outage-since`).
#[derive(Clone, Copy)]
enum Outage {
    /// An outage's retry: it began at this time (ms since the epoch).
    Since(u64),
    /// A retry of the message's own: the start it carries is kept.
    Kept,
    /// The attempt made progress: the downstream works, the outage is over.
    Over,
}

/// Now, in milliseconds since the epoch (0 for a clock before it).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

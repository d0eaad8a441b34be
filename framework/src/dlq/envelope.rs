//! The dead-letter envelope of design §3: the original message with the headers that say
//! what failed, where, when and how often, so `dlq list` can show it and `dlq replay` can
//! send it back.

use lapin::BasicProperties;
use lapin::types::FieldTable;

use crate::headers as h;
use crate::trace::TraceContext;

/// What a dead letter is built from: the failed message and why it failed.
pub(crate) struct Envelope<'a> {
    /// Service that dead-letters (`x-service`).
    pub service: &'a str,
    /// The failed message's properties (kept).
    pub properties: &'a BasicProperties,
    /// Its headers (kept, but for the broker's dead-lettering headers it came with: in
    /// `Q-dlq` those say the broker made the dead letter, see `headers::BROKER_OWNED`).
    pub headers: &'a FieldTable,
    /// The exchange it was first published to.
    pub exchange: &'a str,
    /// The routing key it was first published with.
    pub routing_key: &'a str,
    /// The trace it was handled in.
    pub trace: &'a TraceContext,
}

impl Envelope<'_> {
    /// The original properties and headers plus the dead-letter headers: persistent,
    /// `attempts` as `x-retry-count`, `kind` as `x-error-kind`, `error` (≤ 1 KiB) as `x-error`.
    pub fn properties(&self, attempts: u32, kind: &str, error: &str) -> BasicProperties {
        // Without the broker's dead-lettering headers it came with (a dead letter shovelled
        // back, a producer's own): a dead letter in `Q-dlq` whose `x-death` names `Q` is
        // then always one the broker made, whose headers are the producer's (`dlq list`
        // and `replay` read it so) — one of the service's own kept its error and time.
        let mut hdr = h::without(self.headers, h::BROKER_OWNED);
        self.trace.write(&mut hdr);
        h::set_str(&mut hdr, h::ERROR, &h::error_text(error));
        h::set_str(&mut hdr, h::ERROR_KIND, kind);
        h::set_str(&mut hdr, h::ORIGINAL_EXCHANGE, self.exchange);
        h::set_str(&mut hdr, h::ORIGINAL_ROUTING_KEY, self.routing_key);
        h::set_int(&mut hdr, h::RETRY_COUNT, i64::from(attempts));
        h::set_str(
            &mut hdr,
            h::FAILED_AT,
            &chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
        h::set_str(&mut hdr, h::SERVICE, self.service);
        crate::publisher::republished(self.properties, hdr)
    }
}

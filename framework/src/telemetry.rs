//! Logging setup and the Prometheus metrics of design §6.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Messages finished, labelled `queue` and `outcome` (success|retry|dead_letter|drop, and
/// interrupted: handed back unfinished at shutdown or on a lost connection).
pub const MESSAGES_TOTAL: &str = "storagetier_messages_total";
/// Parts of a message (records of a batch) dead-lettered on their own while the rest of
/// it went on, labelled `queue`: `Q-dlq` grows by these as well as by `dead_letter`.
pub const PARTS_DEAD_LETTERED_TOTAL: &str = "storagetier_parts_dead_lettered_total";
/// Handler duration histogram, labelled `queue`.
pub const HANDLER_SECONDS: &str = "storagetier_handler_seconds";
/// Handlers running now, labelled `queue`.
pub const IN_FLIGHT: &str = "storagetier_in_flight";
/// Handlers this replica runs at once at most (`[amqp] concurrency` as it runs: `prefetch`
/// where 0, 1 in event-forwarder's ordered mode), labelled `queue`: the capacity that
/// `IN_FLIGHT` is measured against, which one value for every service could not tell.
pub const CONCURRENCY: &str = "storagetier_concurrency";
/// 1 while connected to the broker and consuming.
pub const CONNECTED: &str = "storagetier_connected";
/// 1 while the service is still being built (its database opened and migrated, another
/// replica's migration awaited), before it connects to the broker; then 0. Lets the
/// not-connected alert tell a database wait from a broker that cannot be reached.
pub const STARTING: &str = "storagetier_starting";
/// 1 once the service was asked to stop (SIGTERM/SIGINT) and drains; 0 before. Lets the
/// not-connected alert tell a drain (an hour's copy finishing) from a broker that cannot
/// be reached.
pub const STOPPING: &str = "storagetier_stopping";
/// 1, labelled `version` (the release running): which release each replica runs during an
/// upgrade.
pub const BUILD_INFO: &str = "storagetier_build_info";
/// When this process started, in seconds since the epoch: a replica that exits and is
/// restarted by its supervisor (`restart: unless-stopped`) shows as a change of it, where
/// `up` stayed 1 between scrapes and its counters only started again.
pub const START_TIME_SECONDS: &str = "storagetier_start_time_seconds";
/// 1 while the broker blocks the service's connection (a memory or disk alarm): outcomes
/// wait for it to clear, so the service stalls while `connected` stays 1. Labelled `queue`.
pub const CONNECTION_BLOCKED: &str = "storagetier_connection_blocked";
/// Failed or refused publishes: outcomes' (the input went back) and handlers' own.
pub const PUBLISH_FAILURES_TOTAL: &str = "storagetier_publish_failures_total";
/// Reconnections after a lost connection, channel or consumer.
pub const RECONNECTS_TOTAL: &str = "storagetier_reconnects_total";
/// Messages ready in each of the service's own queues (`Q`, every retry tier, `Q-dlq`),
/// labelled `queue`, read passively every `[amqp] queue_metrics_interval_ms`.
pub const QUEUE_MESSAGES: &str = "storagetier_queue_messages";
/// 1 while the depth of `queue` cannot be read, disconnected too (its
/// `storagetier_queue_messages` is then the last depth read), else 0.
pub const QUEUE_DEPTH_UNREADABLE: &str = "storagetier_queue_depth_unreadable";

/// Sets [`BUILD_INFO`] and [`START_TIME_SECONDS`] (the first time this process serves).
pub(crate) fn served_from_start() {
    static STARTED: OnceLock<f64> = OnceLock::new();
    let started = *STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64().floor())
    });
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!(START_TIME_SECONDS).set(started);
}

/// The `CONNECTION_BLOCKED` gauge of the service consuming `queue`.
pub fn connection_blocked(queue: &str) -> metrics::Gauge {
    metrics::gauge!(CONNECTION_BLOCKED, "queue" => queue.to_string())
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Text from a message (a routing key, an error quoting its content) shown in a log field
/// (`%LogText(&s)`): control characters escaped, so a newline cannot forge a log line nor
/// an escape sequence reach the operator's terminal in the text format, and at most
/// `headers::MAX_ERROR_BYTES` of it (like `x-error`): a decoding error quoting an 8 MiB
/// field made one 8 MiB line, and the formatter kept a buffer that size for good.
pub struct LogText<'a>(pub &'a str);

impl std::fmt::Display for LogText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = crate::headers::truncate(self.0, crate::headers::MAX_ERROR_BYTES);
        write_escaped(f, kept)?;
        if kept.len() < self.0.len() {
            write!(f, "… ({} bytes in all)", self.0.len())?;
        }
        Ok(())
    }
}

/// Whether `c` would change how a terminal or a log viewer shows the text around it: a
/// control character, a line or paragraph separator (U+2028/9, a line break to many
/// viewers), a bidirectional control (Unicode's `Bidi_Control`: U+061C, U+200E/F,
/// U+202A–E, U+2066–9 — a routing key or error text shown reordered), or a zero-width
/// space or word joiner (U+200B, U+2060, U+FEFF). The zero-width (non-)joiners U+200C/D
/// are left alone: Persian and Indic names and emoji need them.
fn disturbs_display(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200B}'
                | '\u{200E}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// Writes `s` with its control characters (and others that disturb how text is shown:
/// [`disturbs_display`]) escaped (`\n`, `\u{1b}`, `\u{202e}`), the rest as it is.
pub(crate) fn write_escaped(out: &mut impl std::fmt::Write, s: &str) -> std::fmt::Result {
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        if disturbs_display(c) {
            out.write_str(&s[plain..i])?;
            for e in c.escape_default() {
                out.write_char(e)?;
            }
            plain = i + c.len_utf8();
        }
    }
    out.write_str(&s[plain..])
}

/// Exports counter `name` at 0 for each value of its one `label`, with `help` as its
/// `# HELP` line: an `increase()` alert over a series that appears with its first event
/// misses that first burst after a restart. For a service's own documented counters (the
/// framework's do this themselves).
pub fn counters_from_zero(
    name: &'static str,
    help: &'static str,
    label: &'static str,
    values: &[&'static str],
) {
    let _ = metrics_handle();
    metrics::describe_counter!(name, help);
    for value in values {
        metrics::counter!(name, label => *value).increment(0);
    }
}

/// JSON text (serde_json's) with every character that [`disturbs_display`] and JSON
/// leaves raw — DEL, the C1 controls (U+009B is a terminal's CSI), bidirectional controls,
/// line separators, zero-width spaces — written as a `\uXXXX` escape: the same JSON
/// value, shown safely on a terminal (serde_json escapes only U+0000–U+001F).
pub fn json_for_terminal(json: String) -> String {
    if !json.chars().any(disturbs_display) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        // Each is in the Basic Multilingual Plane: one escape, no surrogate pair.
        // serde_json escaped U+0000–U+001F already (a `\n` written as it is would be
        // escaped twice); DEL onwards it left raw.
        if disturbs_display(c) && c >= '\u{7f}' {
            let _ = std::fmt::Write::write_fmt(&mut out, format_args!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// What each framework metric counts, served as its `# HELP` line: Prometheus's metadata
/// and Grafana show it beside the series (docs/operations.md says more).
const HELP: [(&str, &str); 17] = [
    (
        MESSAGES_TOTAL,
        "Messages finished, by queue and outcome (success, retry, dead_letter, drop; \
         interrupted: handed back unfinished)",
    ),
    (
        PARTS_DEAD_LETTERED_TOTAL,
        "Records of a batch dead-lettered on their own while the rest went on",
    ),
    (
        HANDLER_SECONDS,
        "Time a handler took per message, in seconds",
    ),
    (IN_FLIGHT, "Handlers running now"),
    (
        CONCURRENCY,
        "Handlers this replica runs at once at most (the capacity in_flight is measured \
         against)",
    ),
    (CONNECTED, "1 while connected to the broker and consuming"),
    (
        STARTING,
        "1 while the service is being built (database opened and migrated), before it \
         first connects",
    ),
    (
        STOPPING,
        "1 once the service was asked to stop and drains what it holds",
    ),
    (
        CONNECTION_BLOCKED,
        "1 while the broker blocks the connection (a memory or disk alarm)",
    ),
    (BUILD_INFO, "1, labelled with the release running"),
    (
        START_TIME_SECONDS,
        "When the process started, in seconds since the epoch",
    ),
    (
        PUBLISH_FAILURES_TOTAL,
        "Publishes the broker refused or that failed: outcomes (the input went back) and \
         handlers' own",
    ),
    (
        RECONNECTS_TOTAL,
        "Sessions lost (connection, channel or consumer) and made again",
    ),
    (
        QUEUE_MESSAGES,
        "Messages ready in each of the service's own queues (input, retry tiers, DLQ)",
    ),
    (
        QUEUE_DEPTH_UNREADABLE,
        "1 while the depth of the queue cannot be read (queue_messages then holds the last \
         one read)",
    ),
    (
        LOG_LINES_DROPPED_TOTAL,
        "Log lines dropped because stderr did not take them",
    ),
    (
        crate::otlp::SPANS_DROPPED_TOTAL,
        "Spans not exported to the OTLP collector (buffer full or collector failing)",
    ),
];

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    let handle = installed();
    DESCRIBED.get_or_init(|| {
        for (name, help) in HELP {
            metrics::describe_counter!(name, help);
        }
    });
    handle
}

/// Whether [`HELP`] was given to the recorder.
static DESCRIBED: OnceLock<()> = OnceLock::new();

/// The recorder, installed at the first call.
fn installed() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(HANDLER_SECONDS.to_string()),
                    &[
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is already global (embedding app): render our own, unregistered.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Log lines waiting for stderr at most; more are dropped while it does not take them.
const LOG_BUFFER_LINES: usize = 16_384;

/// Log lines dropped because stderr did not take them ([`LOG_BUFFER_LINES`] waiting).
pub const LOG_LINES_DROPPED_TOTAL: &str = "storagetier_log_lines_dropped_total";

/// The log writer's count of dropped lines, read into [`LOG_LINES_DROPPED_TOTAL`] at each
/// scrape.
static LOG_DROPPED: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// Brings [`LOG_LINES_DROPPED_TOTAL`] up to the log writer's count (0 before any logging).
pub fn count_dropped_log_lines() {
    let dropped = LOG_DROPPED.get().map_or(0, |c| c.dropped_lines());
    metrics::counter!(LOG_LINES_DROPPED_TOTAL).absolute(dropped as u64);
}

/// The thread writing log lines, until [`flush_logs`].
static LOG_WRITER: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// Writes out the log lines still buffered, before the process exits: called at the end of
/// `main` and before an exit on a second signal. Waits at most [`LOG_FLUSH`]: the writer's
/// own end waits for a stderr nobody reads (and may then block on stdout), and the exit
/// must not. Lines logged later go nowhere.
pub fn flush_logs() {
    let Some(guard) = LOG_WRITER.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return;
    };
    let (done, flushed) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(move || {
            drop(guard);
            let _ = done.send(());
        });
    if spawned.is_ok() {
        let _ = flushed.recv_timeout(LOG_FLUSH);
    }
}

/// The longest [`flush_logs`] waits.
const LOG_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// The filter of `[log] level`, with the framework's own limits on lapin's logging.
fn log_filter(level: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // lapin logs every channel the broker closes as an ERROR, the expected ones too (the
    // passive check of a producer exchange that does not exist yet closes its channel
    // with 404); whatever such a close means to a service, the framework logs itself.
    // A filter that names `lapin::channel` gets them.
    // lapin also logs every returned (unroutable) message whole, headers and body, at WARN:
    // the framework reports an unroutable publish itself, without the payload.
    for target in ["lapin::channel", "lapin::returned_messages"] {
        if !level.contains(target)
            && let Ok(quiet) = format!("{target}=off").parse()
        {
            filter = filter.add_directive(quiet);
        }
    }
    // At TRACE lapin's I/O loop logs every frame it writes, the connection's `start-ok`
    // with the broker password in it: never, whatever the level asks.
    // `lapin::frames` prints whole frames too, discarding them on a broken channel.
    for capped in ["lapin::io_loop=debug", "lapin::frames=debug"] {
        if let Ok(capped) = capped.parse() {
            filter = filter.add_directive(capped);
        }
    }
    filter
}

/// Starts `tracing` output per `[log]`; later calls are no-ops (tests run many services).
pub fn init_logging(cfg: &LogConfig) {
    use std::io::IsTerminal;
    let filter = log_filter(&cfg.level);
    // Colours only for a person at a terminal: in a log file or a collector they are noise,
    // and styling every span's fields (one span per message) costs CPU.
    let ansi = std::io::stderr().is_terminal();
    // Lines go to stderr from a thread of their own, through a bounded buffer that drops
    // what does not fit: a log collector that stops reading (a full pipe: Docker's
    // default, blocking delivery falling behind) blocked the runtime's threads in `write`,
    // and with them every message, the health endpoints and the shutdown on SIGTERM.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    // Dropped lines are counted where on-call looks (a collector falling behind in an
    // outage loses exactly the lines they need, and nothing else said so).
    let dropped = writer.error_counter();
    // A log line that cannot be written (stderr closed: a log collector gone, `| head`) is
    // lost, and the service goes on: tracing-subscriber would report it with `eprint!`,
    // which panics on that same closed stderr and stopped the service (exit 101).
    let result = match cfg.format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(writer)
            .log_internal_errors(false)
            .try_init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_env_filter(filter)
            .with_writer(writer)
            .log_internal_errors(false)
            .try_init(),
    };
    if result.is_ok() {
        *LOG_WRITER.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
        let _ = LOG_DROPPED.set(dropped);
        let _ = LOG_FORMAT.set(cfg.format);
        // A panic (a processor's, caught and dead-lettered, or one that ends the process)
        // is a log event like any other: in the message's span, its text escaped; the
        // default hook's raw lines broke JSON logs and let a quoted input forge a line.
        std::panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let message = panic_message(info.payload());
            let thread = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_string();
            // `RUST_BACKTRACE` decides, as it does for the default hook.
            let backtrace = std::backtrace::Backtrace::capture();
            if tracing::enabled!(target: "panic", tracing::Level::ERROR) {
                tracing::error!(
                    target: "panic",
                    panic = %LogText(&message),
                    location,
                    thread = %LogText(&thread),
                    backtrace = %backtrace,
                    "panicked"
                );
            } else {
                // A filter that turns it off must not hide a panic.
                eprintln!(
                    "panicked at {location} (thread {thread}): {}\n{backtrace}",
                    LogText(&message)
                );
            }
        }));
    }
}

/// The text of a panic's payload (`panic!`'s message).
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// The format of this process's logs, once [`init_logging`] set them up.
static LOG_FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Whether this process logs JSON lines (for a collector): a failure it ends with is then
/// logged as such too, beside the plain line for the person at the terminal (in the text
/// format that line would say the same thing twice).
pub(crate) fn logs_json() -> bool {
    LOG_FORMAT.get() == Some(&LogFormat::Json)
}

/// One queue's message metrics, each registered on first use (as a lookup would) and then
/// kept: looking a metric up by name and owned labels on every message allocates and
/// searches the registry.
pub(crate) struct QueueMetrics {
    queue: String,
    in_flight: OnceLock<metrics::Gauge>,
    handler_seconds: OnceLock<metrics::Histogram>,
    publish_failures: OnceLock<metrics::Counter>,
    /// `MESSAGES_TOTAL` by outcome, in the order of `OUTCOMES`.
    messages: [OnceLock<metrics::Counter>; OUTCOMES.len()],
}

/// The `outcome` labels of `MESSAGES_TOTAL`.
const OUTCOMES: [&str; 5] = ["success", "retry", "dead_letter", "drop", "interrupted"];

impl QueueMetrics {
    /// The metrics of `queue`, its counters shown at 0 from the start: an alert on
    /// `increase(...) > 0` cannot see a series whose first sample is already 1, so the
    /// first burst of failures of a process would never fire it.
    pub(crate) fn new(queue: &str) -> Self {
        let m = Self {
            queue: queue.to_string(),
            in_flight: OnceLock::new(),
            handler_seconds: OnceLock::new(),
            publish_failures: OnceLock::new(),
            messages: Default::default(),
        };
        m.publish_failures().increment(0);
        m.in_flight().set(0.0);
        // A histogram shows once it has a sample; registered here, it is exported from the
        // first scrape with none recorded.
        let _ = m.handler_seconds();
        for (i, outcome) in OUTCOMES.iter().enumerate() {
            m.messages[i]
                .get_or_init(|| m.counter(outcome))
                .increment(0);
        }
        m
    }

    /// `MESSAGES_TOTAL` of this queue for `outcome`.
    fn counter(&self, outcome: &'static str) -> metrics::Counter {
        metrics::counter!(MESSAGES_TOTAL, "queue" => self.queue.clone(), "outcome" => outcome)
    }

    /// `IN_FLIGHT` of this queue.
    pub(crate) fn in_flight(&self) -> &metrics::Gauge {
        self.in_flight
            .get_or_init(|| metrics::gauge!(IN_FLIGHT, "queue" => self.queue.clone()))
    }

    /// `HANDLER_SECONDS` of this queue.
    pub(crate) fn handler_seconds(&self) -> &metrics::Histogram {
        self.handler_seconds
            .get_or_init(|| metrics::histogram!(HANDLER_SECONDS, "queue" => self.queue.clone()))
    }

    /// `PUBLISH_FAILURES_TOTAL` of this queue.
    pub(crate) fn publish_failures(&self) -> &metrics::Counter {
        self.publish_failures.get_or_init(
            || metrics::counter!(PUBLISH_FAILURES_TOTAL, "queue" => self.queue.clone()),
        )
    }

    /// Counts one message finished as `outcome` in `MESSAGES_TOTAL`.
    pub(crate) fn count(&self, outcome: &'static str) {
        match OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => self.messages[i]
                .get_or_init(|| self.counter(outcome))
                .increment(1),
            // A label outside the list is still counted, only not kept.
            None => self.counter(outcome).increment(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogText;

    /// `dlq list --json` and the replay's JSON lines: a dead letter's id or error from a
    /// publisher holding a C1 control (U+009B, a terminal's CSI), a bidirectional override
    /// or DEL reached the terminal raw (serde_json escapes only U+0000–U+001F); escaped,
    /// the JSON value is the same.
    #[test]
    fn json_for_a_terminal_escapes_what_disturbs_display_and_keeps_the_value() {
        let v = serde_json::json!({"id": "a\u{9b}31mb\u{202e}c\u{7f}d\ne", "ok": "é ✓"});
        let text = super::json_for_terminal(v.to_string());
        for raw in ['\u{9b}', '\u{202e}', '\u{7f}', '\n'] {
            assert!(!text.contains(raw), "{raw:?} in {text}");
        }
        assert!(
            text.contains("\\u009b") && text.contains("\\u202e"),
            "{text}"
        );
        assert!(text.contains("é ✓"), "the rest as it is: {text}");
        let back: serde_json::Value = serde_json::from_str(&text).expect("still JSON");
        assert_eq!(back, v);
    }

    /// What `level` lets through of lapin's I/O loop and another lapin module at TRACE.
    fn traced(level: &str) -> (bool, bool) {
        use std::sync::{Arc, Mutex};
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(super::log_filter(level))
            .with_writer(move || Writer(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "lapin::io_loop", "start-ok with the password");
            tracing::trace!(target: "lapin::frames", "discarded start-ok with the password");
            tracing::trace!(target: "lapin::consumer", "a delivery");
        });
        let text = String::from_utf8_lossy(&out.lock().unwrap()).to_string();
        (text.contains("password"), text.contains("a delivery"))
    }

    struct Writer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Writer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_frames_lapin_writes_never_reach_the_log_whatever_the_level() {
        for (level, rest) in [
            ("trace", true),
            ("lapin=trace", true),
            ("info,lapin::io_loop=trace", false),
        ] {
            let (frames, other) = traced(level);
            assert!(!frames, "{level}: the start-ok frame carries the password");
            assert_eq!(other, rest, "{level}: the rest of lapin's trace as asked");
        }
    }

    #[test]
    fn log_text_escapes_controls_and_keeps_a_bounded_prefix() {
        assert_eq!(
            LogText("k\n2025 ERROR forged\u{1b}]0;x\u{7}").to_string(),
            "k\\n2025 ERROR forged\\u{1b}]0;x\\u{7}"
        );
        assert_eq!(LogText("plain.key é").to_string(), "plain.key é");
        let huge = "x".repeat(8 << 20);
        let shown = LogText(&huge).to_string();
        assert!(shown.len() < 1100, "{}", shown.len());
        assert!(shown.ends_with(&format!("… ({} bytes in all)", 8 << 20)));
    }
}

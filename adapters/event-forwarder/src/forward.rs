//! One HTTP POST of one event, and what its result means for the message.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use framework::Secret;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};

/// How much of a response body an error message quotes.
pub const MAX_QUOTED_BODY: usize = 256;

/// The header naming what a POST delivers, the same on every try of it (a retry after a
/// timeout, a redelivery, a replay), so an endpoint can drop a repeat
/// (draft-ietf-httpapi-idempotency-key-header).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The `Idempotency-Key` value for what `id` names: `id` itself where it is short visible
/// ASCII (readable in the endpoint's logs), else its SHA-256 in hex.
pub fn idempotency_key(id: &str) -> HeaderValue {
    let plain = id.len() <= 200
        && !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    let text = if plain {
        id.to_string()
    } else {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(id.as_bytes()))
    };
    // Visible ASCII either way: always a valid header value.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The result of posting one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostResult {
    /// 2xx: delivered (the status code).
    Delivered(u16),
    /// Connection error, timeout, 408, 429 or 5xx, or a redirect (3xx but 303 and 304: the
    /// endpoint moved; not followed): try again later — no sooner than the endpoint's
    /// `Retry-After`, if it sent one.
    Retryable(String, Option<Duration>, Scope),
    /// Any other status: the endpoint will never take this event.
    Rejected(String),
}

/// What a retryable failure says about the events still to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// An error answer to this event (408, 500, and 5xx other than below): others may go
    /// through.
    Event,
    /// The endpoint as a whole cannot take more now: no answer in time, 502, 504 (a
    /// gateway that cannot reach it, or waited for it in vain), or an answer asking to
    /// wait (`Retry-After`). Events sent now would fare the same, each costing the
    /// endpoint a request (or the handler a timeout). Counted as any retry: a slow or
    /// crashing event can cause these too.
    Endpoint,
    /// As [`Scope::Endpoint`], and the endpoint is down, not this event's trouble: no
    /// connection, 503, 429 (throttled), a redirect (moved). Its retries are an outage's
    /// (`MessageContext::retry_for_outage`).
    Down,
}

impl Scope {
    /// Whether the rest of a batch is held back: the endpoint cannot take more now.
    pub fn whole_endpoint(self) -> bool {
        self != Scope::Event
    }
}

/// Why a forwarder could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The token has characters an HTTP header cannot carry (the token itself is not shown).
    #[error("the token is not a valid HTTP header value (visible ASCII only)")]
    BadToken,
    /// The HTTP client could not be set up.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// What a status code means: delivered, retry later, or rejected for good.
pub fn classify_status(status: StatusCode) -> StatusClass {
    if status.is_success() {
        StatusClass::Delivered
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        StatusClass::Retryable
    } else {
        StatusClass::Rejected
    }
}

/// The wait a `Retry-After` value asks for (RFC 9110: delay-seconds or an HTTP-date),
/// counted from `now`; None for a value that is neither, or a date already past.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = value.trim();
    let wait = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than u64 holds is still "a very long time".
        Duration::from_secs(v.parse().unwrap_or(u64::MAX))
    } else {
        httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .ok()?
    };
    (!wait.is_zero()).then_some(wait)
}

/// The meaning of an HTTP status for a forwarded event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// 2xx.
    Delivered,
    /// 408, 429, 5xx.
    Retryable,
    /// Every other status (4xx, and 1xx); a 3xx but 303 and 304 is retried by
    /// [`Forwarder::post`] instead.
    Rejected,
}

/// POSTs events to one endpoint with the configured token and timeout.
#[derive(Debug, Clone)]
pub struct Forwarder {
    client: reqwest::Client,
    endpoint: url::Url,
    /// The `Authorization` values known; the one sent changes when another is accepted.
    auth: Arc<RwLock<Tokens>>,
    /// Where the token came from, read again when the endpoint refuses it.
    token_file: Option<PathBuf>,
    timeout: Duration,
}

/// The `Authorization` values a forwarder knows: the one it sends, and the one it sent
/// before (kept through a rotation: an endpoint rolling it out across its replicas takes
/// either for a while).
// Debug shows a sensitive header value as `Sensitive`.
#[derive(Debug, Default)]
struct Tokens {
    current: Option<HeaderValue>,
    /// With until when it is tried again: [`ROLLOUT_GRACE`] after `current` replaced it.
    previous: Option<(HeaderValue, std::time::Instant)>,
}

/// How long after the endpoint took a new token the one before it is still tried where the
/// new one is refused: a rotation rolling out across the endpoint's replicas (a rolling
/// restart) takes minutes. After that a refusal is the event's or the token's, as without
/// a rotation: the old token is not sent for ever, nor does a 403 meant for one event
/// become a retry.
const ROLLOUT_GRACE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// `token` as a header value that is never printed.
fn auth_value(token: &str) -> Result<HeaderValue, ForwardError> {
    let mut v = HeaderValue::from_str(token).map_err(|_| ForwardError::BadToken)?;
    v.set_sensitive(true);
    Ok(v)
}

/// How long a connection to the endpoint may take: half the request's timeout (so that
/// reaching it is told apart from its answer), at most 10 s — but at least a second, or
/// three quarters of a shorter request's timeout (the whole request's timer, started
/// first, would fire first and count a host that is down as a timeout): a distant TLS
/// endpoint takes a few round trips to reach, and one not reached in time counts as down,
/// waited out uncounted.
fn connect_timeout(request: Duration) -> Duration {
    (request / 2)
        .max((request * 3 / 4).min(Duration::from_secs(1)))
        .min(Duration::from_secs(10))
}

impl Forwarder {
    /// A forwarder for `endpoint`; `token` (if any) is sent as the `Authorization` value;
    /// `roots` are trusted for https besides the bundled public CAs.
    pub fn new(
        endpoint: url::Url,
        token: Option<&Secret>,
        timeout: Duration,
        roots: Vec<reqwest::Certificate>,
    ) -> Result<Self, ForwardError> {
        let auth = token.map(|t| auth_value(t.expose())).transpose()?;
        let client = roots
            .into_iter()
            .fold(reqwest::Client::builder(), |b, c| b.add_root_certificate(c))
            .timeout(timeout)
            // A connection not made by then is the endpoint's absence (a host off, a
            // firewall dropping packets), not this event's: told apart from a slow answer,
            // it is waited out as an outage instead of counted toward the dead-letter queue.
            .connect_timeout(connect_timeout(timeout))
            .redirect(reqwest::redirect::Policy::none())
            // Below the 5 s after which Node's HTTP server (Rabble Rouser's) closes an idle
            // connection: a request sent on one it is closing fails as "unreachable" and
            // holds back the rest of a batch until its retry.
            .pool_idle_timeout(Duration::from_secs(4))
            .user_agent(concat!(
                "storagetier-event-forwarder/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(ForwardError::Client)?;
        Ok(Self {
            client,
            endpoint,
            auth: Arc::new(RwLock::new(Tokens {
                current: auth,
                previous: None,
            })),
            token_file: None,
            timeout,
        })
    }

    /// Reads the token from `file` again whenever the endpoint answers 401 or 403, and
    /// sends the event once more with it if it changed, and with the token used before if
    /// that is refused too: a rotated secret (a mounted Kubernetes secret, say) is picked
    /// up without a restart, while an endpoint still taking the old token on some of its
    /// replicas gets that one.
    pub fn reloading_token_from(mut self, file: PathBuf) -> Self {
        self.token_file = Some(file);
        self
    }

    fn auth(&self) -> Option<HeaderValue> {
        self.auth
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .current
            .clone()
    }

    /// The tokens to try after the endpoint refused `sent`: the token file's, read again,
    /// then the ones known before (the endpoint's replicas may take either while a
    /// rotation rolls out), each once and none equal to `sent`. With them, why the file
    /// gave no token, if it did not (unreadable, empty, not a header value: a secret
    /// caught half-written).
    async fn tokens_besides(
        &self,
        sent: Option<&HeaderValue>,
    ) -> (Vec<HeaderValue>, Option<String>) {
        let Some(file) = self.token_file.as_ref() else {
            return (Vec::new(), None);
        };
        let (fresh, problem) = match tokio::fs::read_to_string(file).await {
            Err(e) => (None, Some(format!("cannot be read again ({e})"))),
            Ok(text) if text.trim().is_empty() => (None, Some("is empty".to_string())),
            Ok(text) => match auth_value(text.trim()) {
                Ok(v) => (Some(v), None),
                Err(_) => (None, Some("holds no valid token".to_string())),
            },
        };
        if let Some(p) = &problem {
            tracing::warn!(file = %file.display(), "the token file {p}");
        }
        let known = {
            let t = self.auth.read().unwrap_or_else(|p| p.into_inner());
            let previous = t
                .previous
                .as_ref()
                .filter(|(_, until)| std::time::Instant::now() < *until)
                .map(|(p, _)| p.clone());
            [t.current.clone(), previous]
        };
        let mut others: Vec<HeaderValue> = Vec::new();
        for t in std::iter::once(fresh).chain(known).flatten() {
            let same = |a: &HeaderValue| a.as_bytes() == t.as_bytes();
            if !sent.is_some_and(same) && !others.iter().any(same) {
                others.push(t);
            }
        }
        (others, problem)
    }

    /// Makes `accepted` (a token the endpoint did not refuse) the one sent from now on,
    /// the one it replaces kept as the previous: a token is never adopted before the
    /// endpoint took it, so a new one it still refuses does not replace an old one it
    /// still takes.
    fn adopt(&self, accepted: &HeaderValue) {
        let mut t = self.auth.write().unwrap_or_else(|p| p.into_inner());
        if t.current
            .as_ref()
            .is_some_and(|c| c.as_bytes() == accepted.as_bytes())
        {
            return;
        }
        t.previous = t
            .current
            .replace(accepted.clone())
            .map(|p| (p, std::time::Instant::now() + ROLLOUT_GRACE));
        tracing::info!(
            file = %self.token_file.as_deref().unwrap_or(std::path::Path::new("")).display(),
            "the endpoint refused the token and took another one known (the token file's, \
             or the one before it); that one is sent from now on"
        );
    }

    /// The endpoint events go to.
    pub fn endpoint(&self) -> &url::Url {
        &self.endpoint
    }

    /// The longest one POST takes.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn request(
        &self,
        body: &str,
        auth: Option<&HeaderValue>,
        event: &HeaderMap,
    ) -> reqwest::RequestBuilder {
        let req = self
            .client
            .post(self.endpoint.clone())
            .header(CONTENT_TYPE, "application/json")
            .headers(event.clone())
            .body(body.to_string());
        match auth {
            Some(a) => req.header(AUTHORIZATION, a.clone()),
            None => req,
        }
    }

    /// POSTs `body` (JSON text, sent as is) once (again with each other token known, see
    /// [`Forwarder::reloading_token_from`], if the endpoint refused the token), with the
    /// event's own headers (see
    /// [`event_headers`]).
    pub async fn post(&self, body: &str, event: &HeaderMap) -> PostResult {
        // No connection (refused, unresolvable, TLS, not made within the connect timeout):
        // down. Timed out once connected, or the connection lost after the request went
        // (an endpoint this event crashes): possibly the event's own, counted.
        let unreachable = |e: reqwest::Error| {
            let scope = if e.is_connect() {
                Scope::Down
            } else {
                Scope::Endpoint
            };
            PostResult::Retryable(self.describe(&e), None, scope)
        };
        let refused = |s: StatusCode| matches!(s, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
        let sent = self.auth();
        // What an answer quoted in an error must not show: every token sent.
        let mut secrets = secrets_of(sent.as_ref());
        let mut resp = match self.request(body, sent.as_ref(), event).send().await {
            Ok(r) => r,
            Err(e) => return unreachable(e),
        };
        let mut rotated = false;
        if refused(resp.status()) {
            let (others, problem) = self.tokens_besides(sent.as_ref()).await;
            for t in others {
                secrets.extend(secrets_of(Some(&t)));
                rotated = true;
                resp = match self.request(body, Some(&t), event).send().await {
                    Ok(r) => r,
                    Err(e) => return unreachable(e),
                };
                let status = resp.status();
                if !refused(status) {
                    // Taken where the endpoint answered as it does past its authentication
                    // (a success, or another 4xx); a 5xx, 429 or 408 from a gateway or a
                    // rate limiter in front of it says nothing of the token.
                    let past_authentication = status.is_success()
                        || (status.is_client_error()
                            && !matches!(
                                status,
                                StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT
                            ));
                    if past_authentication {
                        self.adopt(&t);
                    }
                    break;
                }
            }
            // A token file that gave no token at the moment (a secret being rewritten):
            // the refusal may be the rotation's, not the event's; counted, so a file left
            // broken ends in the dead-letter queue after `max_attempts`.
            if let Some(p) = problem
                && !rotated
            {
                let status = resp.status();
                return PostResult::Retryable(
                    format!(
                        "endpoint answered {status} and the token file {p}{}",
                        quoted_body(resp, &secrets).await
                    ),
                    None,
                    Scope::Endpoint,
                );
            }
        }
        let status = resp.status();
        // Every token known refused (a rotation rolling out across the endpoint's
        // replicas, the file read half-written): retried, counted, so that a file holding
        // a wrong token ends in the dead-letter queue after `max_attempts`.
        if rotated && refused(status) {
            return PostResult::Retryable(
                format!(
                    "endpoint answered {status} to every token known (the token file's and \
                     the one before it){}",
                    quoted_body(resp, &secrets).await
                ),
                None,
                Scope::Endpoint,
            );
        }
        // 303 (see another resource: what a POST that was taken may answer) and 304 stay
        // rejected, as before.
        if status.is_redirection()
            && !matches!(status, StatusCode::SEE_OTHER | StatusCode::NOT_MODIFIED)
        {
            // Not followed (another host, http from https, the token carried along), nor
            // dead-lettered: a load balancer's move to https would otherwise send every
            // event to the DLQ. The operator learns where to point the endpoint.
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| self.endpoint.join(l).ok())
                .map_or_else(
                    || "somewhere it does not say".to_string(),
                    |u| shown_url(&u),
                );
            return PostResult::Retryable(
                format!(
                    "endpoint answered {status}, redirecting to {to} (not followed): point \
                     [event_forwarder] endpoint there{}",
                    quoted_body(resp, &secrets).await
                ),
                None,
                Scope::Down,
            );
        }
        match classify_status(status) {
            StatusClass::Delivered => PostResult::Delivered(status.as_u16()),
            StatusClass::Retryable => {
                let after = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after(v, std::time::SystemTime::now()));
                let asked = after
                    .map(|d| format!(" (Retry-After: {} s)", d.as_secs()))
                    .unwrap_or_default();
                let msg = format!(
                    "endpoint answered {status}{asked}{}",
                    quoted_body(resp, &secrets).await
                );
                let scope = if matches!(
                    status,
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                ) {
                    Scope::Down
                } else if after.is_some()
                    || matches!(
                        status,
                        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
                    )
                {
                    Scope::Endpoint
                } else {
                    Scope::Event
                };
                PostResult::Retryable(msg, after, scope)
            }
            StatusClass::Rejected => PostResult::Rejected(format!(
                "endpoint answered {status}{}",
                quoted_body(resp, &secrets).await
            )),
        }
    }

    /// A transport error in words: never the request's headers, and without the URL's
    /// query (which may carry credentials).
    fn describe(&self, e: &reqwest::Error) -> String {
        let what = if e.is_connect() && e.is_timeout() {
            format!(
                "no connection to the endpoint within {} ms",
                connect_timeout(self.timeout).as_millis()
            )
        } else if e.is_timeout() {
            format!("request timed out after {} ms", self.timeout.as_millis())
        } else if e.is_connect() {
            "cannot connect to the endpoint".to_string()
        } else {
            "request failed".to_string()
        };
        let mut chain = Vec::new();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            let text = s.to_string();
            // hyper-util's own link says only its kind, in Rust's debug form ("client error
            // (Connect)"), which the words before and the link after say better.
            if !(text.starts_with("client error (") && text.ends_with(')') && s.source().is_some())
            {
                chain.push(text);
            }
            src = s.source();
        }
        let host = self.endpoint.host_str().unwrap_or("?");
        let port = self
            .endpoint
            .port_or_known_default()
            .map(|p| format!(":{p}"))
            .unwrap_or_default();
        if chain.is_empty() {
            format!("{what} ({host}{port})")
        } else {
            format!("{what} ({host}{port}): {}", chain.join(": "))
        }
    }
}

/// `u` as an error shows it: scheme, host, port and path, without credentials, query or
/// fragment (a redirect's target may carry a signed query), a token-like path segment
/// masked as `redacted_url` does.
fn shown_url(u: &url::Url) -> String {
    let mut shown = u.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    let redacted = framework::config::redacted_url(shown.as_str());
    framework::telemetry::LogText(&redacted).to_string()
}

/// The token of `auth` and, for a `Bearer x` style token, its credential part alone (an
/// endpoint may echo either back).
fn secrets_of(auth: Option<&HeaderValue>) -> Vec<String> {
    let Some(t) = auth.and_then(|a| a.to_str().ok()) else {
        return Vec::new();
    };
    let mut v = vec![t.to_string()];
    if let Some((_, cred)) = t.split_once(' ')
        && !cred.trim().is_empty()
    {
        v.push(cred.trim().to_string());
    }
    v.retain(|s| !s.is_empty());
    v
}

/// `": <first bytes of the body>"` with `secrets` masked, or nothing for an empty body.
async fn quoted_body(mut resp: reqwest::Response, secrets: &[String]) -> String {
    let mut buf: Vec<u8> = Vec::new();
    // Enough that a secret starting within the quoted part is read whole, to be masked.
    let want = MAX_QUOTED_BODY + secrets.iter().map(String::len).max().unwrap_or(0);
    let mut whole = false;
    while buf.len() <= want {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            Ok(None) => {
                whole = true;
                break;
            }
            Err(_) => break,
        }
    }
    quoted(&buf, secrets, whole)
}

/// The start of an answer as an error quotes it: every secret masked — one whole, and, if
/// the answer was read only in part, one cut off at its end — then cut to
/// [`MAX_QUOTED_BODY`] bytes.
fn quoted(buf: &[u8], secrets: &[String], whole: bool) -> String {
    let mut text = String::from_utf8_lossy(buf).into_owned();
    // Masked before the answer is cut, so no part of a secret survives at the cut.
    for s in secrets {
        text = text.replace(s.as_str(), "***");
    }
    if !whole {
        // Leading whitespace trimmed below can bring the end of what was read, and so
        // the start of a secret cut there, into the quoted part.
        for s in secrets {
            if let Some(k) = (1..s.len())
                .rev()
                .find(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))
            {
                text.truncate(text.len() - k);
                text.push_str("***");
            }
        }
    }
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let cut = framework::headers::truncate(text, MAX_QUOTED_BODY);
    if cut.len() < text.len() {
        format!(": {cut}…")
    } else {
        format!(": {cut}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Half the request's timeout, at least a second (three quarters of a shorter one,
    /// so the connect timer fires before the whole request's) and at most 10 s.
    #[test]
    fn a_connection_gets_half_the_request_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(connect_timeout(ms(10_000)), ms(5_000));
        assert_eq!(connect_timeout(ms(60_000)), ms(10_000));
        assert_eq!(connect_timeout(ms(1_500)), ms(1_000));
        assert_eq!(connect_timeout(ms(1_000)), ms(750));
        assert_eq!(connect_timeout(ms(300)), ms(225));
    }

    #[test]
    fn a_secret_cut_off_where_the_answer_was_read_is_masked_too() {
        let token = "Bearer s3cr3t-t0ken-value".to_string();
        let read = format!("{}{}", "\n".repeat(300), &token[..15]);
        let q = quoted(read.as_bytes(), std::slice::from_ref(&token), false);
        assert!(!q.contains(&token[..8]), "{q}");
        assert!(q.ends_with("***"), "{q}");
        // Read whole, text that only looks like a secret's start is the endpoint's own.
        let q = quoted(b"error: Bea", std::slice::from_ref(&token), true);
        assert_eq!(q, ": error: Bea");
        let q = quoted(format!("x {token} y").as_bytes(), &[token], true);
        assert_eq!(q, ": x *** y");
    }

    #[test]
    fn status_classes() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(
                classify_status(StatusCode::from_u16(s).unwrap()),
                StatusClass::Delivered
            );
        }
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(
                classify_status(StatusCode::from_u16(s).unwrap()),
                StatusClass::Retryable
            );
        }
        for s in [
            100, 301, 302, 307, 400, 401, 403, 404, 409, 410, 413, 422, 451, 499,
        ] {
            assert_eq!(
                classify_status(StatusCode::from_u16(s).unwrap()),
                StatusClass::Rejected
            );
        }
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = httpdate::parse_http_date("Sun, 29 Nov 2026 21:00:00 GMT").unwrap();
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(retry_after("120", now), secs(120));
        assert_eq!(retry_after(" 5 ", now), secs(5));
        assert_eq!(retry_after("99999999999999999999999", now), secs(u64::MAX));
        assert_eq!(retry_after("Sun, 29 Nov 2026 21:01:30 GMT", now), secs(90));
        // Nothing to wait for, or nothing understood.
        for v in [
            "0",
            "",
            "-5",
            "1.5",
            "soon",
            "Sun, 29 Nov 2026 20:59:00 GMT",
        ] {
            assert_eq!(retry_after(v, now), None, "{v:?}");
        }
    }

    #[test]
    fn a_bad_token_is_refused_without_showing_it() {
        let e = Forwarder::new(
            "http://127.0.0.1:1/".parse().unwrap(),
            Some(&Secret::new("line\nbreak-secret")),
            Duration::from_secs(1),
            Vec::new(),
        )
        .unwrap_err();
        assert!(!e.to_string().contains("secret"));
    }

    /// The token used before a rotation is tried again only while the rotation may still
    /// be rolling out: past [`ROLLOUT_GRACE`] a refusal is the event's or the token's.
    #[tokio::test]
    async fn the_previous_token_is_tried_for_a_rollouts_time_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "new\n").unwrap();
        let f = Forwarder::new(
            "http://127.0.0.1:9/events".parse().unwrap(),
            Some(&Secret::new("old")),
            Duration::from_secs(1),
            Vec::new(),
        )
        .unwrap()
        .reloading_token_from(file);
        let new = auth_value("new").unwrap();
        f.adopt(&new);
        let (others, problem) = f.tokens_besides(Some(&new)).await;
        assert_eq!(problem, None);
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].as_bytes(), b"old");
        match &mut f.auth.write().unwrap().previous {
            Some((_, until)) => *until = std::time::Instant::now(),
            None => panic!("the old token is kept"),
        }
        let (others, _) = f.tokens_besides(Some(&new)).await;
        assert!(others.is_empty(), "{others:?}");
    }
}

//! One POST against a real local HTTP server: status mapping, headers, body, timeouts.

use std::time::Duration;

use event_forwarder::forward::{Forwarder, PostResult, Scope};
use framework::Secret;
use reqwest::header::HeaderMap;
use wiremock::matchers::{body_string, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TOKEN: &str = "s3cr3t-token-value";

async fn server_answering(status: u16, body: &str) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/events"))
        .respond_with(ResponseTemplate::new(status).set_body_string(body))
        .mount(&server)
        .await;
    server
}

fn forwarder(base: &str, timeout_ms: u64) -> Forwarder {
    Forwarder::new(
        format!("{base}/events").parse().unwrap(),
        Some(&Secret::new(TOKEN)),
        Duration::from_millis(timeout_ms),
        Vec::new(),
    )
    .unwrap()
}

#[tokio::test]
async fn posts_the_body_unchanged_with_authorization_and_content_type() {
    let server = MockServer::start().await;
    let body = r#"{"z":1, "a":{"b":[3,2,1]},"type":"member-registered"}"#;
    Mock::given(method("POST"))
        .and(path("/events"))
        .and(header("Authorization", TOKEN))
        .and(header("Content-Type", "application/json"))
        .and(body_string(body))
        .respond_with(ResponseTemplate::new(201))
        .expect(1)
        .mount(&server)
        .await;
    let r = forwarder(&server.uri(), 5000)
        .post(body, &HeaderMap::new())
        .await;
    assert_eq!(r, PostResult::Delivered(201));
}

#[tokio::test]
async fn two_hundreds_are_delivered() {
    for s in [200, 202, 204] {
        let server = server_answering(s, "").await;
        assert_eq!(
            forwarder(&server.uri(), 5000)
                .post("{}", &HeaderMap::new())
                .await,
            PostResult::Delivered(s)
        );
    }
}

#[tokio::test]
async fn four_hundreds_are_rejected_with_status_and_body_but_no_token() {
    for s in [400, 401, 403, 404, 422] {
        let server = server_answering(s, "no such member").await;
        match forwarder(&server.uri(), 5000)
            .post("{}", &HeaderMap::new())
            .await
        {
            PostResult::Rejected(e) => {
                assert!(e.contains(&s.to_string()), "{e}");
                assert!(e.contains("no such member"), "{e}");
                assert!(!e.contains(TOKEN), "{e}");
            }
            r => panic!("{s}: {r:?}"),
        }
    }
}

/// A redirect is not followed (another host, http from https, the token carried along)
/// and not dead-lettered either: a load balancer moved to https would send every event
/// to the DLQ. The error says where to point the endpoint, without the target's query.
#[tokio::test]
async fn redirects_are_not_followed_but_retried_naming_the_target() {
    for (status, location, shown) in [
        (302, "/elsewhere", "/elsewhere"),
        (
            308,
            "https://moved.example/x?X-Amz-Signature=abc#frag",
            "https://moved.example/x",
        ),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).insert_header("Location", location))
            .mount(&server)
            .await;
        match forwarder(&server.uri(), 5000)
            .post("{}", &HeaderMap::new())
            .await
        {
            PostResult::Retryable(e, None, Scope::Down) => {
                assert!(e.contains(shown) && e.contains(&status.to_string()), "{e}");
                assert!(!e.contains("abc") && !e.contains("frag"), "{e}");
            }
            r => panic!("{status}: {r:?}"),
        }
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }
}

/// A connection lost after the request went (an endpoint this event crashes) may be the
/// event's own: counted (`Scope::Endpoint`), not an outage's (`Scope::Down`) that would be
/// retried for a day. A 303 (what a POST that was taken may answer) stays rejected.
#[tokio::test]
async fn a_connection_lost_after_the_request_counts_and_a_303_is_rejected() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        // Dropped without an answer.
    });
    match forwarder(&format!("http://{addr}"), 5000)
        .post("{}", &HeaderMap::new())
        .await
    {
        PostResult::Retryable(_, None, Scope::Endpoint) => {}
        r => panic!("{r:?}"),
    }
    server.await.unwrap();
    let see_other = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(303).insert_header("Location", "/done/1"))
        .mount(&see_other)
        .await;
    assert!(matches!(
        forwarder(&see_other.uri(), 5000)
            .post("{}", &HeaderMap::new())
            .await,
        PostResult::Rejected(_)
    ));
}

/// An endpoint that never completes a connection (a host off behind a firewall that drops
/// packets: here a listener whose accept queue is full, so its SYNs go unanswered) is down
/// — an outage, waited out — not counted as this event's failure, as a request timed out
/// once connected is. Before, only the whole request's timeout ended it: counted, and a
/// day's outage dead-lettered the backlog after `max_attempts`.
#[tokio::test]
async fn an_endpoint_that_never_connects_is_down() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fill the accept queue (never accepted) until a connection gets no answer.
    let mut held = Vec::new();
    for _ in 0..8 {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(s) => held.push(s.unwrap()),
            Err(_) => break,
        }
    }
    match forwarder(&format!("http://{addr}"), 2000)
        .post("{}", &HeaderMap::new())
        .await
    {
        PostResult::Retryable(e, None, Scope::Down) => {
            assert!(
                e.contains("no connection to the endpoint within 1000 ms"),
                "{e}"
            )
        }
        r => panic!("{r:?}"),
    }
    drop((held, listener));
}

/// A refused connection's error reads as words, not the HTTP client's debug form of its
/// kind (`client error (Connect)`), and names the endpoint and the system's reason.
#[tokio::test]
async fn a_refused_connection_is_said_in_words() {
    // Bound, never listening: a connection to it is refused, and while it is held no other
    // test's server can be given its port (a listener bound and dropped left it free).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    match forwarder(&format!("http://{addr}"), 2000)
        .post("{}", &HeaderMap::new())
        .await
    {
        PostResult::Retryable(e, None, _) => {
            assert!(e.starts_with("cannot connect to the endpoint"), "{e}");
            assert!(e.contains(&addr.to_string()), "{e}");
            assert!(!e.contains("client error ("), "{e}");
            assert!(e.to_lowercase().contains("refused"), "{e}");
        }
        r => panic!("{r:?}"),
    }
    drop(socket);
}

/// A 409 is a 4xx like any other (design §7: Permanent), an `Idempotency-Key` sent or not.
#[tokio::test]
async fn a_conflict_is_rejected_keyed_or_not() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(409).insert_header("Retry-After", "3"))
        .mount(&server)
        .await;
    let mut keyed = HeaderMap::new();
    keyed.insert("idempotency-key", "m1:0123".parse().unwrap());
    let f = forwarder(&server.uri(), 5000);
    for headers in [keyed, HeaderMap::new()] {
        assert!(matches!(
            f.post("{}", &headers).await,
            PostResult::Rejected(_)
        ));
    }
}

#[tokio::test]
async fn five_hundreds_408_and_429_are_retryable() {
    // 429, 502, 503 and 504 speak for the whole endpoint (throttled, unreachable,
    // unavailable), 429 and 503 saying it is down (an outage's retries); the others for
    // this request.
    for (s, scope) in [
        (408, Scope::Event),
        (429, Scope::Down),
        (500, Scope::Event),
        (502, Scope::Endpoint),
        (503, Scope::Down),
        (504, Scope::Endpoint),
        (507, Scope::Event),
    ] {
        let server = server_answering(s, "busy").await;
        match forwarder(&server.uri(), 5000)
            .post("{}", &HeaderMap::new())
            .await
        {
            PostResult::Retryable(e, None, sc) if sc == scope => {
                assert!(e.contains(&s.to_string()), "{e}")
            }
            r => panic!("{s}: {r:?}"),
        }
    }
}

#[tokio::test]
async fn a_retry_after_is_passed_on_and_quoted() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "7"))
        .mount(&server)
        .await;
    match forwarder(&server.uri(), 5000)
        .post("{}", &HeaderMap::new())
        .await
    {
        PostResult::Retryable(e, after, scope) => {
            assert_eq!(after, Some(Duration::from_secs(7)));
            assert_eq!(scope, Scope::Down);
            assert!(e.contains("429") && e.contains("Retry-After: 7 s"), "{e}");
        }
        r => panic!("{r:?}"),
    }
}

#[tokio::test]
async fn long_error_bodies_are_truncated() {
    let server = server_answering(500, &"x".repeat(10_000)).await;
    let PostResult::Retryable(e, ..) = forwarder(&server.uri(), 5000)
        .post("{}", &HeaderMap::new())
        .await
    else {
        panic!("retryable expected")
    };
    assert!(e.len() < 400, "{} bytes", e.len());
}

#[tokio::test]
async fn a_timeout_is_retryable() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(600)))
        .mount(&server)
        .await;
    // The answer would take 10 min: only the timeout ends the wait within WAIT.
    let posted = tokio::time::timeout(
        framework::testing::WAIT,
        forwarder(&server.uri(), 200).post("{}", &HeaderMap::new()),
    )
    .await
    .expect("the timeout ended the wait");
    match posted {
        PostResult::Retryable(e, None, Scope::Endpoint) => assert!(e.contains("timed out"), "{e}"),
        r => panic!("{r:?}"),
    }
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let port = framework::testing::broker::free_port();
    match forwarder(&format!("http://127.0.0.1:{port}"), 2000)
        .post("{}", &HeaderMap::new())
        .await
    {
        PostResult::Retryable(e, None, Scope::Down) => {
            assert!(e.contains("connect"), "{e}");
            assert!(!e.contains(TOKEN));
        }
        r => panic!("{r:?}"),
    }
}

#[tokio::test]
async fn without_a_token_no_authorization_is_sent() {
    let server = server_answering(200, "").await;
    let f = Forwarder::new(
        format!("{}/events", server.uri()).parse().unwrap(),
        None,
        Duration::from_secs(5),
        Vec::new(),
    )
    .unwrap();
    assert_eq!(
        f.post("{}", &HeaderMap::new()).await,
        PostResult::Delivered(200)
    );
    let reqs = server.received_requests().await.unwrap();
    assert!(reqs[0].headers.get("authorization").is_none());
}

#[test]
fn an_idempotency_key_is_the_id_where_it_is_plain_text_else_its_digest() {
    use event_forwarder::forward::idempotency_key;
    assert_eq!(idempotency_key("shardId-000:4955"), "shardId-000:4955");
    for odd in ["with space", "é", "quote\"", "", &"x".repeat(201)] {
        let k = idempotency_key(odd);
        assert_eq!(k.len(), 64, "{odd:?}: a SHA-256 in hex");
        assert!(k.to_str().unwrap().bytes().all(|b| b.is_ascii_hexdigit()));
    }
}

/// An https endpoint behind a private CA (an internal service): refused as unverifiable,
/// and so retried, until `ca_file`'s certificates are trusted; then delivered.
#[tokio::test]
async fn an_https_endpoint_under_a_private_ca_is_reached_with_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    framework::testing::tls::make_certificates(dir.path());
    let peer = framework::testing::tls::HttpsPeer::start(dir.path());
    let url: url::Url = format!("https://localhost:{}/events", peer.port)
        .parse()
        .unwrap();
    let untrusting =
        Forwarder::new(url.clone(), None, Duration::from_secs(10), Vec::new()).unwrap();
    let r = untrusting.post("{}", &HeaderMap::new()).await;
    assert!(matches!(r, PostResult::Retryable(..)), "{r:?}");
    let pem = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let roots = reqwest::Certificate::from_pem_bundle(&pem).unwrap();
    let trusting = Forwarder::new(url, None, Duration::from_secs(10), roots).unwrap();
    assert_eq!(
        trusting.post("{}", &HeaderMap::new()).await,
        PostResult::Delivered(200)
    );
}

/// An endpoint that takes only `token-a` until `switched`, then only `token-b`: one of its
/// replicas before or after a rotation that rolls out across them.
async fn rotating_endpoint(switched: std::sync::Arc<std::sync::atomic::AtomicBool>) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(move |r: &wiremock::Request| {
            let wanted = if switched.load(std::sync::atomic::Ordering::SeqCst) {
                "token-b"
            } else {
                "token-a"
            };
            let sent = r.headers.get("authorization").and_then(|v| v.to_str().ok());
            ResponseTemplate::new(if sent == Some(wanted) { 200 } else { 401 })
        })
        .mount(&server)
        .await;
    server
}

fn reloading(base: &str, token: &str, file: &std::path::Path) -> Forwarder {
    Forwarder::new(
        format!("{base}/events").parse().unwrap(),
        Some(&Secret::new(token)),
        Duration::from_millis(5000),
        Vec::new(),
    )
    .unwrap()
    .reloading_token_from(file.to_path_buf())
}

/// A rotation rolling out across the endpoint's replicas: a replica still on the old token
/// refuses the file's new one, which another replica took; the old token is sent again
/// (it was dead-lettered as a plain 401: the file held nothing else to try).
#[tokio::test]
async fn a_replica_still_taking_the_old_token_gets_it_back() {
    let switched = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = rotating_endpoint(switched.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "token-a\n").unwrap();
    let f = reloading(&server.uri(), "token-a", &file);
    assert_eq!(
        f.post("{}", &HeaderMap::new()).await,
        PostResult::Delivered(200)
    );
    std::fs::write(&file, "token-b\n").unwrap();
    switched.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        f.post("{}", &HeaderMap::new()).await,
        PostResult::Delivered(200)
    );
    switched.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        f.post("{}", &HeaderMap::new()).await,
        PostResult::Delivered(200)
    );
    switched.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        f.post("{}", &HeaderMap::new()).await,
        PostResult::Delivered(200)
    );
}

/// A new token in the file that the endpoint refuses is not adopted: the old one, which
/// the endpoint still takes, goes on being sent (adopted, it failed every later event with
/// a 401 and nothing else to try: each dead-lettered).
#[tokio::test]
async fn a_new_token_the_endpoint_refuses_does_not_replace_the_old_one() {
    let switched = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = rotating_endpoint(switched).await;
    // One event the endpoint refuses whatever the token (not authorised for it).
    Mock::given(method("POST"))
        .and(wiremock::matchers::body_string_contains("forbidden"))
        .respond_with(ResponseTemplate::new(403))
        .with_priority(1)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "token-next\n").unwrap();
    let f = reloading(&server.uri(), "token-a", &file);
    match f.post(r#"{"e":"forbidden"}"#, &HeaderMap::new()).await {
        PostResult::Retryable(e, None, Scope::Endpoint) => {
            assert!(e.contains("every token known"), "{e}");
            assert!(!e.contains("token-next") && !e.contains("token-a"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.post(r#"{"e":"ok"}"#, &HeaderMap::new()).await,
        PostResult::Delivered(200)
    );
    let last = server.received_requests().await.unwrap();
    let auth = last
        .last()
        .and_then(|r| r.headers.get("authorization").cloned());
    assert_eq!(auth.as_ref().and_then(|v| v.to_str().ok()), Some("token-a"));
}

/// A token file caught empty as the endpoint refuses the token (a secret being rewritten):
/// a counted retry, not a dead letter.
#[tokio::test]
async fn a_token_file_caught_empty_is_a_retry() {
    let switched = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let server = rotating_endpoint(switched).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "").unwrap();
    match reloading(&server.uri(), "token-a", &file)
        .post("{}", &HeaderMap::new())
        .await
    {
        PostResult::Retryable(e, None, Scope::Endpoint) => {
            assert!(e.contains("401") && e.contains("is empty"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

/// A new token answered 429 (a rate limiter in front of the endpoint's authentication) is
/// not taken for accepted: the old token, which the endpoint takes, goes on being sent.
#[tokio::test]
async fn a_new_token_answered_429_is_not_adopted() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("Authorization", "token-next"))
        .respond_with(ResponseTemplate::new(429))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(wiremock::matchers::body_string_contains("forbidden"))
        .respond_with(ResponseTemplate::new(403))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "token-next\n").unwrap();
    let f = reloading(&server.uri(), "token-a", &file);
    assert!(matches!(
        f.post(r#"{"e":"forbidden"}"#, &HeaderMap::new()).await,
        PostResult::Retryable(..)
    ));
    assert_eq!(
        f.post(r#"{"e":"ok"}"#, &HeaderMap::new()).await,
        PostResult::Delivered(200)
    );
}

//! A publisher speaking AMQP 0-9-1 frame by frame, for what no client library lets a test
//! send: a message id (a short string) that is not UTF-8, as a producer in another
//! language may write one (`string(uuidBytes)` in Go). The broker passes such bytes on
//! unchecked.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME_END: u8 = 0xCE;

/// A message as raw bytes: a message id of any bytes, a persistent delivery.
#[derive(Debug, Clone, Default)]
pub struct RawMessage {
    /// The exchange to publish to (`""`: the default exchange).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
    /// The message id's bytes, sent as they are (at most 255).
    pub message_id: Vec<u8>,
    /// The body.
    pub body: Vec<u8>,
    /// The headers, an encoded field table's entries (without its length) sent as they
    /// are; empty: no headers.
    pub headers: Vec<u8>,
}

/// A field table's entry `name` holding `depth` field arrays nested in one another (a
/// void at the bottom): a header no client library would write, which the broker passes on.
pub fn nested_arrays_header(name: &str, depth: usize) -> Vec<u8> {
    let mut value = vec![b'V'];
    for _ in 0..depth {
        let mut outer = vec![b'A'];
        outer.extend_from_slice(&(value.len() as u32).to_be_bytes());
        outer.extend_from_slice(&value);
        value = outer;
    }
    let mut entry = Vec::new();
    short(&mut entry, name.as_bytes());
    entry.extend_from_slice(&value);
    entry
}

/// Publishes `msg` to the broker at `url` (`amqp://user:pass@host:port/vhost`) over a
/// connection of its own; returns once the broker closed the channel after it (so the
/// message was routed). Panics on anything unexpected: test support only.
pub async fn publish(url: &str, msg: &RawMessage) {
    tokio::time::timeout(Duration::from_secs(30), publish_unbounded(url, msg))
        .await
        .expect("the raw publish finished in time");
}

async fn publish_unbounded(url: &str, msg: &RawMessage) {
    let u = url::Url::parse(url).expect("an amqp:// URL");
    let host = u.host_str().expect("a host").to_string();
    let port = u.port().unwrap_or(5672);
    let user = percent_decode(u.username());
    let pass = percent_decode(u.password().unwrap_or(""));
    let vhost = match u.path().trim_start_matches('/') {
        "" => "/".to_string(),
        v => percent_decode(v),
    };
    let mut s = TcpStream::connect((host.as_str(), port))
        .await
        .expect("connected");
    s.write_all(b"AMQP\x00\x00\x09\x01").await.expect("sent");
    let _ = expect_method(&mut s, 10, 10).await; // connection.start
    let mut a = method(10, 11); // start-ok
    a.extend_from_slice(&0u32.to_be_bytes()); // client properties: none
    short(&mut a, b"PLAIN");
    long(&mut a, format!("\0{user}\0{pass}").as_bytes());
    short(&mut a, b"en_US");
    send(&mut s, 1, 0, &a).await;
    let tune = expect_method(&mut s, 10, 30).await;
    let mut a = method(10, 31); // tune-ok: the server's channel and frame limits, no heartbeat
    a.extend_from_slice(&tune[4..10]);
    a.extend_from_slice(&0u16.to_be_bytes());
    send(&mut s, 1, 0, &a).await;
    let mut a = method(10, 40); // open
    short(&mut a, vhost.as_bytes());
    short(&mut a, b"");
    a.push(0);
    send(&mut s, 1, 0, &a).await;
    let _ = expect_method(&mut s, 10, 41).await;
    let mut a = method(20, 10); // channel.open
    short(&mut a, b"");
    send(&mut s, 1, 1, &a).await;
    let _ = expect_method(&mut s, 20, 11).await;
    let mut a = method(60, 40); // basic.publish
    a.extend_from_slice(&0u16.to_be_bytes());
    short(&mut a, msg.exchange.as_bytes());
    short(&mut a, msg.routing_key.as_bytes());
    a.push(0);
    send(&mut s, 1, 1, &a).await;
    let mut h = Vec::new(); // content header
    h.extend_from_slice(&60u16.to_be_bytes());
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&(msg.body.len() as u64).to_be_bytes());
    // Properties present: headers (bit 13) if any, delivery-mode (bit 12), message-id
    // (bit 7), in that order.
    let with_headers = if msg.headers.is_empty() {
        0
    } else {
        1u16 << 13
    };
    h.extend_from_slice(&(with_headers | (1u16 << 12) | (1u16 << 7)).to_be_bytes());
    if !msg.headers.is_empty() {
        long(&mut h, &msg.headers);
    }
    h.push(2);
    short(&mut h, &msg.message_id);
    send(&mut s, 2, 1, &h).await;
    send(&mut s, 3, 1, &msg.body).await;
    // channel.close after the publish, in order (so the message was routed), then
    // connection.close.
    send(&mut s, 1, 1, &close(20, 40)).await;
    let _ = expect_method(&mut s, 20, 41).await;
    send(&mut s, 1, 0, &close(10, 50)).await;
    let _ = expect_method(&mut s, 10, 51).await;
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A close method (`channel.close` or `connection.close`): reply 200, no text, no cause.
fn close(class: u16, id: u16) -> Vec<u8> {
    let mut a = method(class, id);
    a.extend_from_slice(&200u16.to_be_bytes());
    short(&mut a, b"");
    a.extend_from_slice(&[0; 4]);
    a
}

fn method(class: u16, method: u16) -> Vec<u8> {
    let mut v = class.to_be_bytes().to_vec();
    v.extend_from_slice(&method.to_be_bytes());
    v
}

fn short(v: &mut Vec<u8>, s: &[u8]) {
    v.push(u8::try_from(s.len()).expect("a short string"));
    v.extend_from_slice(s);
}

fn long(v: &mut Vec<u8>, s: &[u8]) {
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s);
}

async fn send(s: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(FRAME_END);
    s.write_all(&f).await.expect("sent");
}

/// Reads frames until a method frame, which must be `class`.`method` (heartbeats skipped);
/// its payload.
async fn expect_method(s: &mut TcpStream, class: u16, method: u16) -> Vec<u8> {
    loop {
        let mut head = [0u8; 7];
        s.read_exact(&mut head).await.expect("a frame");
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        s.read_exact(&mut payload).await.expect("its payload");
        if head[0] != 1 {
            continue;
        }
        let got = (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        );
        assert_eq!(
            got,
            (class, method),
            "the broker answered {:?}",
            String::from_utf8_lossy(&payload)
        );
        return payload;
    }
}

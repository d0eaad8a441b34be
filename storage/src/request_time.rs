//! How long one S3 request may take, by what it carries. object_store bounds every request
//! by one fixed time (30 s by default) from connecting to the end of the response: a
//! part of 525 MiB (a 5 TiB file's) or 5 GiB (`part_size_mib = 5120`) then needs 17.5 to
//! 170 MiB/s per request to finish in time, so on a slower link every attempt timed out,
//! was tried again from the start, and the file was never archived. Here a request may
//! take the base time (object_store's 30 s) plus a second per MiB it sends (a floor of
//! 1 MiB/s), a multipart completion as long as S3 may take to assemble a large object,
//! and reading a response is bounded by the base time for each chunk asked for instead
//! of in total.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService, ReqwestConnector,
};

/// The slowest transfer a request is given time for, on top of the base time.
const FLOOR_BYTES_PER_SECOND: u64 = 1024 * 1024;

/// How long a multipart completion may take to answer: S3 can take minutes over a large
/// upload (as [`crate::s3`]'s own completions).
pub const COMPLETION: Duration = Duration::from_secs(600);

/// The time one request may take: `base`, plus a second per MiB of its body; at least
/// [`COMPLETION`] for a multipart completion (`POST …?uploadId=`).
pub fn limit(
    method: &http::Method,
    query: Option<&str>,
    body_len: usize,
    base: Duration,
) -> Duration {
    let sending = Duration::from_secs(body_len as u64 / FLOOR_BYTES_PER_SECOND);
    let mut t = base.saturating_add(sending);
    let completion = method == http::Method::POST
        && query.is_some_and(|q| q.split('&').any(|p| p.starts_with("uploadId=")));
    if completion {
        t = t.max(COMPLETION);
    }
    t
}

/// The time every request gets, as object_store's own default bound.
pub const BASE: Duration = Duration::from_secs(30);

/// object_store's own HTTP client with [`limit`]s instead of its one fixed timeout.
#[derive(Debug)]
pub struct SizedLimits {
    /// The time every request gets ([`BASE`]; shorter in tests).
    pub base: Duration,
}

impl HttpConnector for SizedLimits {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner =
            ReqwestConnector::default().connect(&options.clone().with_timeout_disabled())?;
        Ok(HttpClient::new(Limited {
            inner,
            base: self.base,
        }))
    }
}

#[derive(Debug)]
struct Limited {
    inner: HttpClient,
    base: Duration,
}

#[async_trait::async_trait]
impl HttpService for Limited {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let t = limit(
            req.method(),
            req.uri().query(),
            req.body().content_length(),
            self.base,
        );
        match tokio::time::timeout(t, self.inner.execute(req)).await {
            Ok(r) => r.map(|resp| {
                resp.map(|body| {
                    HttpResponseBody::new(Idle {
                        inner: body,
                        idle: self.base,
                        timer: Box::pin(tokio::time::sleep(self.base)),
                        waiting: true,
                    })
                })
            }),
            Err(_) => Err(HttpError::new(
                HttpErrorKind::Timeout,
                TimedOut(format!("no answer within {t:?}")),
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TimedOut(String);

/// A response body whose reading fails once a chunk asked for did not come for `idle`
/// (the time the reader spends between chunks is not counted).
struct Idle {
    inner: HttpResponseBody,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Whether the timer runs for a chunk already asked for.
    waiting: bool,
}

impl Body for Idle {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                self.waiting = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                if !self.waiting {
                    // The wait for this chunk starts now.
                    let next = tokio::time::Instant::now() + self.idle;
                    self.timer.as_mut().reset(next);
                    self.waiting = true;
                }
                self.poll_timer(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Idle {
    fn poll_timer(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::new(
                HttpErrorKind::Timeout,
                TimedOut(format!("the response stalled for {:?}", self.idle)),
            )))),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_gets_time_for_what_it_sends_and_a_completion_for_the_assembly() {
        let base = Duration::from_secs(30);
        let get = limit(&http::Method::GET, None, 0, base);
        assert_eq!(get, base);
        // A 5 TiB file's part (525 MiB): 30 s would need 17.5 MiB/s.
        let part = limit(
            &http::Method::PUT,
            Some("partNumber=3&uploadId=u"),
            525 << 20,
            base,
        );
        assert_eq!(part, Duration::from_secs(30 + 525));
        let complete = limit(&http::Method::POST, Some("uploadId=u"), 4096, base);
        assert_eq!(complete, COMPLETION);
        let create = limit(&http::Method::POST, Some("uploads"), 0, base);
        assert_eq!(create, base);
    }
}

//! The one body type that flows through the gateway, in both directions.
//!
//! An enum rather than a boxed trait object: no allocation per request, and every kind
//! of body the gateway handles is visible here. Bodies stream; nothing is buffered
//! except what a variant holds in full (`Full`).

pub use crate::wire::upstream::UpstreamBody;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

/// A request or response body.
#[derive(Default)]
pub enum Body {
    /// No body.
    #[default]
    Empty,
    /// A body held in memory (error responses, small generated bodies).
    Full(Option<Bytes>),
    /// A client's streamed request body, passed through as it arrives. Its trailers are
    /// dropped: they could carry headers (an identity) past every check the gateway makes
    /// on the head, and no upstream protocol the gateway serves needs request trailers.
    Stream(Incoming),
    /// A client's streamed request body of unknown length that must stay under a limit
    /// (trailers dropped, as for `Stream`).
    Limited { inner: Incoming, remaining: u64 },
    /// An HTTP/2 upstream's response body, trailers included (gRPC's status is in them).
    UpstreamH2(Incoming),
    /// A streamed upstream response that fails if the upstream stalls for `idle`.
    Upstream(UpstreamBody),
    /// An upstream response that reports its request when it ends (`pipeline/record.rs`).
    Reported(Pin<Box<dyn http_body::Body<Data = Bytes, Error = BodyError> + Send>>),
}

impl Body {
    /// A body holding `bytes`.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body::Full(Some(bytes.into()))
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::Empty => f.write_str("Empty"),
            Body::Full(b) => f.debug_tuple("Full").field(b).finish(),
            Body::Stream(i) => f.debug_tuple("Stream").field(i).finish(),
            Body::UpstreamH2(i) => f.debug_tuple("UpstreamH2").field(i).finish(),
            Body::Limited { inner, remaining } => {
                f.debug_struct("Limited").field("inner", inner).field("remaining", remaining).finish()
            }
            Body::Upstream(u) => f.debug_tuple("Upstream").field(u).finish(),
            Body::Reported(_) => f.write_str("Reported"),
        }
    }
}

/// Why a body stopped.
#[derive(Debug)]
pub enum BodyError {
    /// The transport failed.
    Hyper(hyper::Error),
    /// The client sent more than the limit.
    TooLarge,
    /// The upstream sent nothing for longer than the route timeout.
    UpstreamStalled,
    /// The upstream's body is not valid HTTP/1.1, or ended early.
    UpstreamWire(crate::wire::h1::WireError),
    /// Reading the upstream's body failed.
    UpstreamIo(std::io::Error),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Hyper(e) => write!(f, "body transport error: {e}"),
            BodyError::TooLarge => f.write_str("request body is over the limit"),
            BodyError::UpstreamStalled => f.write_str("upstream response body stalled"),
            BodyError::UpstreamWire(e) => write!(f, "upstream response body: {e}"),
            BodyError::UpstreamIo(e) => write!(f, "upstream response body: {e}"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Hyper(e) => Some(e),
            BodyError::UpstreamWire(e) => Some(e),
            BodyError::UpstreamIo(e) => Some(e),
            _ => None,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
            Body::Stream(inner) => loop {
                match ready!(Pin::new(&mut *inner).poll_frame(cx)) {
                    Some(Ok(f)) if f.is_trailers() => continue,
                    frame => return Poll::Ready(frame.map(|r| r.map_err(BodyError::Hyper))),
                }
            },
            Body::UpstreamH2(inner) => Pin::new(inner).poll_frame(cx).map_err(BodyError::Hyper),
            Body::Limited { inner, remaining } => {
                let frame = loop {
                    match ready!(Pin::new(&mut *inner).poll_frame(cx)) {
                        Some(Ok(f)) if f.is_trailers() => continue,
                        frame => break frame,
                    }
                };
                if let Some(Ok(f)) = &frame
                    && let Some(data) = f.data_ref()
                {
                    let len = data.len() as u64;
                    if len > *remaining {
                        *remaining = 0;
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                    *remaining -= len;
                }
                Poll::Ready(frame.map(|r| r.map_err(BodyError::Hyper)))
            }
            Body::Upstream(u) => Pin::new(u).poll_frame(cx),
            Body::Reported(r) => r.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            Body::Stream(i) | Body::Limited { inner: i, .. } | Body::UpstreamH2(i) => i.is_end_stream(),
            Body::Upstream(u) => u.is_end_stream(),
            Body::Reported(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(i) | Body::Limited { inner: i, .. } | Body::UpstreamH2(i) => i.size_hint(),
            Body::Upstream(u) => u.size_hint(),
            Body::Reported(r) => r.size_hint(),
        }
    }
}

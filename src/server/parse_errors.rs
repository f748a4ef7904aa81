//! JSON bodies for the errors hyper answers by itself.
//!
//! When hyper cannot parse an HTTP/1 request head (bad request line, bad header,
//! conflicting `Content-Length`, obs-fold, headers too large, URI too long) it writes a
//! bare status line with an empty body and closes the connection, before any of our code
//! sees a request. docs/errors.md promises every error as JSON with a request id, so this transport
//! wrapper recognises that automatic response and writes a JSON error response (docs/errors.md) in its place.
//!
//! Recognising it is unambiguous: every response the gateway itself produces carries
//! `X-Request-Id` (`rewrite::response`, `error::error_response`); hyper's automatic head
//! never does.

use crate::pipeline::error::error_json;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The automatic responses hyper writes on a parse error, and what we send instead.
const REPLACED: [(&[u8], &str, &str); 3] = [
    (b"HTTP/1.1 400 Bad Request\r\n", "400 Bad Request", "Malformed HTTP request"),
    (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
        "431 Request Header Fields Too Large",
        "Request headers are too large",
    ),
    (b"HTTP/1.1 414 URI Too Long\r\n", "414 URI Too Long", "Request target is too long"),
];

/// A transport that rewrites hyper's automatic parse-error responses.
#[derive(Debug)]
pub struct JsonParseErrors<S> {
    inner: S,
    /// Our replacement, how much of it is written, and how many of hyper's bytes it stands for.
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<S> JsonParseErrors<S> {
    pub fn new(inner: S) -> Self {
        JsonParseErrors { inner, pending: None }
    }

    /// The underlying transport.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Our replacement for `head`, when `head` is one of hyper's automatic error responses.
fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    let (_, status, message) = REPLACED.iter().find(|(prefix, _, _)| head.starts_with(prefix))?;
    // Ours always carry a request id; a short head without one is hyper's.
    if head.len() > 512 || contains_ci(head, b"x-request-id:") || !contains_ci(head, b"content-length: 0\r\n") {
        return None;
    }
    let id = uuid::Uuid::now_v7().hyphenated().to_string();
    let body = error_json("invalid_request", message, &id);
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncache-control: no-store\r\nx-request-id: {id}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

impl<S: AsyncWrite + Unpin> JsonParseErrors<S> {
    /// Writes the pending replacement; ready with hyper's byte count once it is all out.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some((bytes, written, claimed)) = self.pending.as_mut() else { return Poll::Ready(Ok(0)) };
        while *written < bytes.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        let claimed = *claimed;
        self.pending = None;
        Poll::Ready(Ok(claimed))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonParseErrors<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_none()
            && buf.starts_with(b"HTTP/1.1 4")
            && let Some(r) = replacement(buf)
        {
            this.pending = Some((r, 0, buf.len()));
        }
        if this.pending.is_some() {
            return this.poll_pending(cx);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_none()
            && let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && first.starts_with(b"HTTP/1.1 4")
            && let Some(r) = replacement(first)
        {
            this.pending = Some((r, 0, bufs.iter().map(|b| b.len()).sum()));
        }
        if this.pending.is_some() {
            return this.poll_pending(cx);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper's automatic 400 is replaced by a JSON error response (docs/errors.md) that closes the connection
    #[test]
    fn hyper_auto_400_is_replaced() {
        let head = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 23 Nov 2026 09:11:03 GMT\r\n\r\n";
        let r = String::from_utf8(replacement(head).unwrap()).unwrap();
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"), "{r}");
        assert!(
            r.contains(
                "\r\n\r\n{\"success\":false,\"message\":\"Malformed HTTP request\",\"code\":\"invalid_request\""
            ),
            "{r}"
        );
    }

    /// a response of ours (it has a request id) or an upstream 400 with a body is left alone
    #[test]
    fn our_own_responses_are_left_alone() {
        assert!(replacement(b"HTTP/1.1 400 Bad Request\r\nx-request-id: a\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(replacement(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 10\r\n\r\n").is_none());
        assert!(replacement(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_none());
    }
}

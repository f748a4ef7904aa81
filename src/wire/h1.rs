//! \[forward\] HTTP/1.1 to the upstream, on the wire: the request head the gateway writes,
//! the response head it parses (httparse, as hyper does), and the response body framing.
//!
//! Only the upstream side is here; clients are still served by hyper. Both directions are
//! strict where it matters for smuggling and bounded whatever the upstream sends:
//!
//! - request heads are written from a `HeaderMap` whose names and values the `http`
//!   crate already vetted (no CR, LF or NUL can be in them), with exactly one framing
//!   header that the gateway chose;
//! - a response head is at most `max_head` bytes and 100 headers; more is an error;
//! - a response with `Transfer-Encoding` ending in `chunked` is read as chunked whatever
//!   `Content-Length` says, and its connection is not reused (RFC 9112 §6.3); several
//!   different or malformed `Content-Length`s are an error, equal ones become one; chunk
//!   sizes are hex without overflow, chunk extensions are bounded per line and per body,
//!   trailers must be well-formed field lines and are bounded; both are then dropped;
//! - a transfer coding other than `chunked` (`gzip, chunked`) is an error, as in nginx:
//!   nobody would remove it, and the client would take coded bytes for the body; so is an
//!   empty list element (`chunked,`), and any `Transfer-Encoding` on an HTTP/1.0 response;
//! - a status outside 100-599 is an error (RFC 9110 §15).

use crate::wire::headers::list_elements;

/// Headers the gateway adds to a response at most (the request id and the two quota
/// headers): a response's header map is sized with room for them.
pub const RESPONSE_HEADERS_ADDED: usize = 3;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// Headers a response head may carry (hyper's client default too).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size and extensions), and longest trailer section, accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Chunk-extension bytes accepted over a whole body (hyper's bound too): extensions are
/// read and dropped, so without a bound an upstream could keep the gateway reading
/// them for ever while the client sees no byte.
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;

/// Why an upstream exchange broke on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed response head")]
    Head,
    #[error("response head over the size limit")]
    HeadTooLarge,
    #[error("malformed or conflicting Content-Length")]
    ContentLength,
    #[error("malformed chunked body")]
    Chunked,
    #[error("transfer coding other than chunked")]
    TransferCoding,
    #[error("connection closed before the response was complete")]
    Closed,
}

/// How the request body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    None,
    /// `Content-Length` bytes (the header is in the head).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// The framing of a request, as hyper's client chose it: nothing when the body is done
/// before it starts; the client's `Content-Length` when it sent one; a known size
/// otherwise; chunked for a streamed body, except on GET, HEAD and CONNECT, which are
/// sent without one. `Transfer-Encoding` never reaches here (hop-by-hop, removed).
pub fn request_framing(method: &Method, headers: &HeaderMap, end_stream: bool, exact: Option<u64>) -> RequestFraming {
    if end_stream {
        return RequestFraming::None;
    }
    if let Some(n) = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
        return RequestFraming::Length(n);
    }
    match exact {
        Some(n) => RequestFraming::Length(n),
        None if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) => RequestFraming::None,
        None => RequestFraming::Chunked,
    }
}

/// The head of one request: what [`write_request_head`] writes.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// Origin form: path and query.
    pub target: &'a str,
    pub host: &'a HeaderValue,
    /// The client's headers, cleaned.
    pub headers: &'a HeaderMap,
    /// The gateway's own, after them.
    pub added: &'a [(HeaderName, HeaderValue)],
    pub framing: RequestFraming,
}

/// Writes `METHOD target HTTP/1.1`, `Host` first (RFC 9110 §7.2), the client's headers,
/// the gateway's, the one framing header `framing` says, and the blank line. The client's
/// own `Content-Length` lines are never copied (an HTTP/2 client may send two): the
/// framing header is always the gateway's, written once.
pub fn write_request_head(out: &mut Vec<u8>, head: &RequestHead<'_>) {
    let RequestHead { method, target, host, headers, added, framing } = *head;
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers.iter().filter(|(n, _)| *n != CONTENT_LENGTH).chain(added.iter().map(|(n, v)| (n, v))) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes one chunk's size line (`{hex}\r\n`) into `out`.
pub fn write_chunk_size(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[v & 15];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body (HEAD, 204, 304, 1xx).
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub framing: ResponseFraming,
    /// The connection may carry another request once this body is read.
    pub keep_alive: bool,
}

/// Parses a response head from the front of `buf` and removes it; `Ok(None)` when more
/// bytes are needed. `head_request`: the request was a HEAD (no body follows).
pub fn parse_response_head(
    buf: &mut BytesMut,
    max_head: usize,
    head_request: bool,
) -> Result<Option<ResponseHead>, WireError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut slots);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Complete(_)) => return Err(WireError::HeadTooLarge),
        Ok(httparse::Status::Partial) if buf.len() >= max_head => return Err(WireError::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(WireError::HeadTooLarge),
        Err(_) => return Err(WireError::Head),
    };
    let status = res
        .code
        .filter(|c| (100..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(WireError::Head)?;
    let version = if res.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Offsets, not slices: the head is split off and frozen, and every value then shares
    // its one buffer instead of being copied.
    let spans: smallvec::SmallVec<[(usize, usize, usize, usize); 24]> = res
        .headers
        .iter()
        .map(|h| {
            let base = buf.as_ptr() as usize;
            (h.name.as_ptr() as usize - base, h.name.len(), h.value.as_ptr() as usize - base, h.value.len())
        })
        .collect();
    let head = buf.split_to(len).freeze();
    // With room for what the gateway adds on the way back: growing the map would rehash it.
    let mut headers = HeaderMap::with_capacity(spans.len() + RESPONSE_HEADERS_ADDED);
    for (n, nl, v, vl) in spans {
        let name = HeaderName::from_bytes(&head[n..n + nl]).map_err(|_| WireError::Head)?;
        let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl)).map_err(|_| WireError::Head)?;
        headers.append(name, value);
    }

    let mut keep_alive = version == Version::HTTP_11 && !has_token(&headers, CONNECTION, b"close");
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        ResponseFraming::Empty
    } else if headers.contains_key(TRANSFER_ENCODING) {
        // RFC 9112 §6.3: chunked wins over Content-Length, which is not passed on, and
        // such a message may be an attempt at smuggling: its connection is not used again.
        if headers.remove(CONTENT_LENGTH).is_some() {
            keep_alive = false;
        }
        // HTTP/1.0 has no transfer codings (RFC 9112 §6.1): a 1.0 peer would read the
        // chunk framing as body bytes, so the two sides could disagree on where it ends.
        if version == Version::HTTP_10 || !only_chunked(&headers) {
            return Err(WireError::TransferCoding);
        }
        ResponseFraming::Chunked
    } else if headers.contains_key(CONTENT_LENGTH) {
        let n = content_length(&headers)?;
        // `Content-Length: 2, 2` (or two equal lines) goes on as the one value it means.
        let mut values = headers.get_all(CONTENT_LENGTH).iter();
        if values.next().is_some_and(|v| v.as_bytes().contains(&b',')) || values.next().is_some() {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
        ResponseFraming::Length(n)
    } else {
        keep_alive = false;
        ResponseFraming::Close
    };
    Ok(Some(ResponseHead { status, headers, framing, keep_alive }))
}

/// The one length every `Content-Length` value gives (a repeated identical value is
/// allowed, RFC 9110 §8.6); anything else is an error.
fn content_length(headers: &HeaderMap) -> Result<u64, WireError> {
    let mut found = None;
    for part in list_elements(headers.get_all(CONTENT_LENGTH).iter()) {
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(WireError::ContentLength);
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return Err(WireError::ContentLength);
        }
        found = Some(n);
    }
    found.ok_or(WireError::ContentLength)
}

fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &[u8]> {
    list_elements(headers.get_all(name).iter())
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &[u8]) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// `Transfer-Encoding` says `chunked` once and nothing else. An empty element is not
/// skipped: hyper reads `chunked,` as ending in a coding that is not chunked (and so as a
/// close-delimited body), and two readers of one message must not disagree on its end.
fn only_chunked(headers: &HeaderMap) -> bool {
    let mut codings = tokens(headers, TRANSFER_ENCODING);
    codings.next().is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")) && codings.next().is_none()
}

/// What the body decoder made of the bytes it has.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// Nothing yet: read more.
    More,
    /// The body is complete.
    End,
}

/// Reads one response body out of the connection's buffer.
#[derive(Debug)]
pub enum Decoder {
    Length(u64),
    /// A chunked body: where it is, and the chunk-extension bytes read so far.
    Chunked(Chunk, usize),
    Close,
    Done,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy)]
pub enum Chunk {
    /// Expecting a size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last (zero) chunk: trailer lines until an empty one, this many bytes and
    /// lines so far.
    Trailers(usize, usize),
}

impl Decoder {
    pub fn new(framing: ResponseFraming) -> Decoder {
        match framing {
            ResponseFraming::Empty | ResponseFraming::Length(0) => Decoder::Done,
            ResponseFraming::Length(n) => Decoder::Length(n),
            ResponseFraming::Chunked => Decoder::Chunked(Chunk::Size, 0),
            ResponseFraming::Close => Decoder::Close,
        }
    }

    /// Bytes still expected, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length(n) => Some(*n),
            Decoder::Done => Some(0),
            _ => None,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Done)
    }

    /// Takes the next piece of body out of `buf`. `eof`: the upstream closed and `buf`
    /// holds all that will come.
    pub fn decode(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Decoded, WireError> {
        loop {
            match self {
                Decoder::Done => return Ok(Decoded::End),
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return if eof { Err(WireError::Closed) } else { Ok(Decoded::More) };
                    }
                    let take = (*left).min(buf.len() as u64) as usize;
                    *left -= take as u64;
                    if *left == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                Decoder::Close => {
                    if !buf.is_empty() {
                        return Ok(Decoded::Data(buf.split().freeze()));
                    }
                    if eof {
                        *self = Decoder::Done;
                        return Ok(Decoded::End);
                    }
                    return Ok(Decoded::More);
                }
                Decoder::Chunked(state, extensions) => match *state {
                    Chunk::Size => {
                        let Some(line) = take_line(buf)? else {
                            return if eof { Err(WireError::Closed) } else { Ok(Decoded::More) };
                        };
                        let (size, ext) = chunk_size(&line)?;
                        *extensions += ext;
                        if *extensions > MAX_CHUNK_EXTENSIONS {
                            return Err(WireError::Chunked);
                        }
                        *state = if size == 0 { Chunk::Trailers(0, 0) } else { Chunk::Data(size) };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return if eof { Err(WireError::Closed) } else { Ok(Decoded::More) };
                        }
                        let take = left.min(buf.len() as u64) as usize;
                        *state = if left == take as u64 { Chunk::DataEnd } else { Chunk::Data(left - take as u64) };
                        return Ok(Decoded::Data(buf.split_to(take).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return if eof { Err(WireError::Closed) } else { Ok(Decoded::More) };
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(WireError::Chunked);
                        }
                        buf.advance(2);
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers(seen, lines) => {
                        let Some(line) = take_line(buf)? else {
                            return if eof { Err(WireError::Closed) } else { Ok(Decoded::More) };
                        };
                        if line.is_empty() {
                            *self = Decoder::Done;
                        } else if seen + line.len() > MAX_CHUNK_LINE || lines == MAX_HEADERS || !is_field_line(&line) {
                            return Err(WireError::Chunked);
                        } else {
                            *state = Chunk::Trailers(seen + line.len(), lines + 1);
                        }
                    }
                },
            }
        }
    }
}

/// One CRLF-terminated line off the front of `buf`, without its CRLF; `None` until it
/// is all there. A line longer than [`MAX_CHUNK_LINE`], a bare LF, or a CR anywhere but
/// before the LF is an error: a reader that ends lines at a bare CR would see other lines.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, WireError> {
    let window = &buf[..buf.len().min(MAX_CHUNK_LINE + 2)];
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) if lf > 0 && buf[lf - 1] == b'\r' => {
            if buf[..lf - 1].contains(&b'\r') {
                return Err(WireError::Chunked);
            }
            let mut line = buf.split_to(lf + 1);
            line.truncate(lf - 1);
            Ok(Some(line))
        }
        Some(_) => Err(WireError::Chunked),
        None if buf.len() > MAX_CHUNK_LINE => Err(WireError::Chunked),
        None => Ok(None),
    }
}

/// The size of a chunk-size line: hex digits, then nothing or `;` extensions (ignored),
/// and how many bytes of extensions (from the `;` on) the line had. Only SP and HTAB may
/// come between the digits and the `;` (BWS, RFC 9112 §7.1.1): other whitespace (VT, FF)
/// is a byte some parsers skip and others do not.
fn chunk_size(line: &[u8]) -> Result<(u64, usize), WireError> {
    let digits_end = line.iter().position(|b| !b.is_ascii_hexdigit()).unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() || digits.len() > 15 {
        return Err(WireError::Chunked);
    }
    let blanks = rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    let rest = &rest[blanks..];
    if !rest.is_empty() && rest[0] != b';' {
        return Err(WireError::Chunked);
    }
    let size = digits.iter().fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        (n << 4) | u64::from(v)
    });
    Ok((size, rest.len()))
}

/// A trailer line is a field line (RFC 9112 §5): a token, `:`, then field-value bytes
/// (visible ASCII, obs-text, SP, HTAB). Trailers are dropped, but one that is not a field
/// line means the upstream and the gateway do not agree on what the body was.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else { return false };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    !name.is_empty()
        && name.iter().all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        && value.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, head_request: bool) -> Result<Option<ResponseHead>, WireError> {
        parse_response_head(&mut BytesMut::from(raw), 64 * 1024, head_request)
    }

    fn framing(raw: &str) -> (ResponseFraming, bool) {
        let h = head(raw, false).unwrap().unwrap();
        (h.framing, h.keep_alive)
    }

    /// the framing and reuse of every kind of response head
    #[test]
    fn response_framing() {
        assert_eq!(framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"), (ResponseFraming::Length(5), true));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"), (ResponseFraming::Length(5), true));
        for equal in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
        ] {
            let h = head(equal, false).unwrap().unwrap();
            let all: Vec<_> = h.headers.get_all(CONTENT_LENGTH).iter().collect();
            assert_eq!(all, ["5"], "equal lengths go on as one value: {equal:?}");
        }
        assert_eq!(framing("HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n"), (ResponseFraming::Chunked, true));
        assert_eq!(framing("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"), (ResponseFraming::Chunked, true));
        let both = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n";
        assert_eq!(framing(both), (ResponseFraming::Chunked, false), "chunked wins, and the connection is not reused");
        let h = head(both, false).unwrap().unwrap();
        assert!(!h.headers.contains_key(CONTENT_LENGTH), "the overridden length is not passed on");
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), (ResponseFraming::Close, false));
        assert_eq!(framing("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"), (ResponseFraming::Empty, true));
        assert_eq!(framing("HTTP/1.1 304 Not Modified\r\n\r\n"), (ResponseFraming::Empty, true));
        assert!(!framing("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n").1);
        assert!(!framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n").1);
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true).unwrap().unwrap();
        assert_eq!(h.framing, ResponseFraming::Empty, "a HEAD response has no body");
    }

    /// conflicting or malformed lengths, bad heads and oversized heads are errors
    #[test]
    fn bad_heads_are_errors() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
        ] {
            assert_eq!(head(raw, false).unwrap_err(), WireError::ContentLength, "{raw:?}");
        }
        for raw in [
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "SMTP 200\r\n\r\n",
            "HTTP/1.1 600 Odd\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 999 Odd\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 099 Odd\r\ncontent-length: 0\r\n\r\n",
        ] {
            assert_eq!(head(raw, false).unwrap_err(), WireError::Head, "{raw:?}");
        }
        for raw in [
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\ncontent-length: 2\r\n\r\n",
        ] {
            assert_eq!(head(raw, false).unwrap_err(), WireError::TransferCoding, "{raw:?}");
        }
        let long = format!("HTTP/1.1 200 OK\r\nx: {}\r\n\r\n", "a".repeat(100));
        assert_eq!(
            parse_response_head(&mut BytesMut::from(&long[..]), 64, false).unwrap_err(),
            WireError::HeadTooLarge
        );
        assert!(parse_response_head(&mut BytesMut::from(&long[..40]), 64, false).unwrap().is_none());
        let many: String = (0..101).map(|i| format!("x{i}: v\r\n")).collect();
        assert_eq!(head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), false).unwrap_err(), WireError::HeadTooLarge);
    }

    /// the head is split off the buffer; what follows it stays; values keep their bytes
    #[test]
    fn the_head_is_taken_off_the_buffer() {
        let mut buf = BytesMut::from("HTTP/1.1 201 Created\r\nx-a: 1\r\nX-A: 2\r\ncontent-length: 2\r\n\r\nokHTTP");
        let h = parse_response_head(&mut buf, 1024, false).unwrap().unwrap();
        assert_eq!(h.status, 201);
        let all: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);
        assert_eq!(&buf[..], b"okHTTP");
        let mut partial = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-le");
        assert!(parse_response_head(&mut partial, 1024, false).unwrap().is_none());
        assert_eq!(partial.len(), 27, "a partial head is left in place");
    }

    fn decode_all(framing: ResponseFraming, input: &[u8], eof: bool) -> Result<(Vec<u8>, bool), WireError> {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        // One byte at a time: every state must survive a split anywhere.
        for (i, b) in input.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let last = i + 1 == input.len();
            loop {
                match d.decode(&mut buf, eof && last)? {
                    Decoded::Data(b) => out.extend_from_slice(&b),
                    Decoded::More => break,
                    Decoded::End => return Ok((out, true)),
                }
            }
        }
        Ok((out, d.is_done()))
    }

    /// chunked bodies decode whatever the split, with extensions and trailers dropped
    #[test]
    fn chunked_bodies() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n";
        assert_eq!(decode_all(ResponseFraming::Chunked, body, false).unwrap(), (b"hello world".to_vec(), true));
        let upper = b"A\r\n0123456789\r\n0\r\n\r\n";
        assert_eq!(decode_all(ResponseFraming::Chunked, upper, false).unwrap(), (b"0123456789".to_vec(), true));
        for bad in [
            &b"5\r\nhelloXX0\r\n\r\n"[..],
            b"g\r\n",
            b"5 x\r\nhello\r\n",
            b"5\nhello\r\n",
            b"ffffffffffffffff\r\n",
            b"\r\n",
        ] {
            assert_eq!(decode_all(ResponseFraming::Chunked, bad, false).unwrap_err(), WireError::Chunked, "{bad:?}");
        }
        let long_ext = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE + 10));
        assert_eq!(decode_all(ResponseFraming::Chunked, long_ext.as_bytes(), false).unwrap_err(), WireError::Chunked);
        assert_eq!(decode_all(ResponseFraming::Chunked, b"5\r\nhel", true).unwrap_err(), WireError::Closed);
        let many_trailers = format!("0\r\n{}\r\n", "x-t: 0123456789\r\n".repeat(MAX_CHUNK_LINE / 10));
        assert_eq!(
            decode_all(ResponseFraming::Chunked, many_trailers.as_bytes(), false).unwrap_err(),
            WireError::Chunked,
            "the trailer section as a whole is bounded, not only each line"
        );
    }

    /// HTTP/1.0 has no transfer codings (RFC 9112 §6.1): a 1.0 response that names one is
    /// a framing error, never read as chunked
    #[test]
    fn an_http_1_0_response_with_transfer_encoding_is_an_error() {
        let raw = "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(head(raw, false).unwrap_err(), WireError::TransferCoding);
        let bodiless = "HTTP/1.0 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(framing(bodiless), (ResponseFraming::Empty, false), "no body, nothing to frame");
    }

    /// an empty element in Transfer-Encoding is refused, not skipped: `chunked,` ends in
    /// an empty coding, which other parsers read as "not chunked"
    #[test]
    fn empty_transfer_coding_elements_are_errors() {
        for te in ["chunked,", ", chunked", ",Chunked", "chunked, ", "chunked,,"] {
            let raw = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n");
            assert_eq!(head(&raw, false).unwrap_err(), WireError::TransferCoding, "{te:?}");
        }
        let raw = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: \r\n\r\n";
        assert_eq!(head(raw, false).unwrap_err(), WireError::TransferCoding, "an empty line is an empty element");
    }

    /// after the chunk size only SP and HTAB may come before `;` or the end (BWS); CR,
    /// VT or FF there are errors
    #[test]
    fn only_blanks_may_follow_a_chunk_size() {
        for ok in [&b"5 \r\nhello\r\n0\r\n\r\n"[..], b"5\t;x\r\nhello\r\n0\r\n\r\n"] {
            assert_eq!(decode_all(ResponseFraming::Chunked, ok, false).unwrap(), (b"hello".to_vec(), true), "{ok:?}");
        }
        for bad in [&b"5\r\r\nhello\r\n"[..], b"5\x0b\r\nhello\r\n", b"5\x0c\r\nhello\r\n", b"5\x0c;x\r\nhello\r\n"] {
            assert_eq!(decode_all(ResponseFraming::Chunked, bad, false).unwrap_err(), WireError::Chunked, "{bad:?}");
        }
    }

    /// a CR anywhere in a chunk line but at its end is an error (a bare CR in an extension)
    #[test]
    fn a_bare_cr_in_a_chunk_extension_is_an_error() {
        for bad in [&b"5;a\rb\r\nhello\r\n0\r\n\r\n"[..], b"5;\r\r\nhello\r\n", b"0;x\ry\r\n\r\n"] {
            assert_eq!(decode_all(ResponseFraming::Chunked, bad, false).unwrap_err(), WireError::Chunked, "{bad:?}");
        }
    }

    /// chunk extensions are bounded per body, not only per line: many short lines of
    /// extensions cannot make the gateway read unbounded data for free
    #[test]
    fn chunk_extensions_are_bounded_per_body() {
        let line = format!("1;{}\r\nx\r\n", "e".repeat(1000));
        let under = format!("{}0\r\n\r\n", line.repeat(15));
        let (body, done) = decode_all(ResponseFraming::Chunked, under.as_bytes(), false).unwrap();
        assert_eq!((body.len(), done), (15, true));
        let over = format!("{}0\r\n\r\n", line.repeat(17));
        assert_eq!(decode_all(ResponseFraming::Chunked, over.as_bytes(), false).unwrap_err(), WireError::Chunked);
    }

    /// trailer lines are field lines: a line that is not `name: value`, a bare CR or a
    /// control byte in it, or more than 100 of them, is an error
    #[test]
    fn trailers_are_checked() {
        let ok = b"1\r\nx\r\n0\r\nx-sum: 1\r\nx-b:\r\nX-C:\tv \xff\r\n\r\n";
        assert_eq!(decode_all(ResponseFraming::Chunked, ok, false).unwrap(), (b"x".to_vec(), true));
        for bad in [
            &b"0\r\nbad line\r\n\r\n"[..],
            b"0\r\nnocolon\r\n\r\n",
            b"0\r\n: empty-name\r\n\r\n",
            b"0\r\nx-a : v\r\n\r\n",
            b"0\r\n folded: v\r\n\r\n",
            b"0\r\nx-a: a\rb\r\n\r\n",
            b"0\r\nx-a: a\x00b\r\n\r\n",
            b"0\r\nx-a: a\x7fb\r\n\r\n",
            b"0\r\nx(a): v\r\n\r\n",
        ] {
            assert_eq!(decode_all(ResponseFraming::Chunked, bad, false).unwrap_err(), WireError::Chunked, "{bad:?}");
        }
        let hundred = format!("0\r\n{}\r\n", "t: 1\r\n".repeat(MAX_HEADERS));
        assert!(decode_all(ResponseFraming::Chunked, hundred.as_bytes(), false).unwrap().1);
        let more = format!("0\r\n{}\r\n", "t: 1\r\n".repeat(MAX_HEADERS + 1));
        assert_eq!(decode_all(ResponseFraming::Chunked, more.as_bytes(), false).unwrap_err(), WireError::Chunked);
    }

    /// a length-delimited body ends at its length; a close-delimited one at the close
    #[test]
    fn length_and_close_bodies() {
        let mut d = Decoder::new(ResponseFraming::Length(3));
        let mut buf = BytesMut::from("abcdef");
        assert_eq!(d.decode(&mut buf, false).unwrap(), Decoded::Data(Bytes::from_static(b"abc")));
        assert_eq!(d.decode(&mut buf, false).unwrap(), Decoded::End);
        assert_eq!(&buf[..], b"def", "bytes after the body are left for the caller to judge");
        assert_eq!(decode_all(ResponseFraming::Length(5), b"ab", true).unwrap_err(), WireError::Closed);
        assert_eq!(decode_all(ResponseFraming::Close, b"abc", true).unwrap(), (b"abc".to_vec(), true));
    }

    /// the request head: every header, one framing header of the gateway's choosing
    #[test]
    fn request_heads() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let host = HeaderValue::from_static("up:80");
        let added = [(HeaderName::from_static("x-gatehouse-user"), HeaderValue::from_static("u1"))];
        let mut out = Vec::new();
        let head = RequestHead {
            method: &Method::POST,
            target: "/p?q=1",
            host: &host,
            headers: &h,
            added: &added,
            framing: RequestFraming::Chunked,
        };
        write_request_head(&mut out, &head);
        assert_eq!(
            out,
            b"POST /p?q=1 HTTP/1.1\r\nhost: up:80\r\nx-a: 1\r\nx-a: 2\r\nx-gatehouse-user: u1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        out.clear();
        write_request_head(&mut out, &RequestHead { method: &Method::PUT, framing: RequestFraming::Length(7), ..head });
        assert!(out.ends_with(b"u1\r\ncontent-length: 7\r\n\r\n"));
        let mut two = h.clone();
        two.insert(CONTENT_LENGTH, HeaderValue::from_static("7"));
        two.append(CONTENT_LENGTH, HeaderValue::from_static("7"));
        out.clear();
        write_request_head(
            &mut out,
            &RequestHead { method: &Method::PUT, framing: RequestFraming::Length(7), headers: &two, ..head },
        );
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(text.matches("content-length").count(), 1, "one framing header, the gateway's: {text}");
        assert_eq!(request_framing(&Method::PUT, &two, false, None), RequestFraming::Length(7));
        assert_eq!(request_framing(&Method::GET, &h, false, None), RequestFraming::None);
        assert_eq!(request_framing(&Method::POST, &h, false, None), RequestFraming::Chunked);
        assert_eq!(request_framing(&Method::POST, &h, true, Some(0)), RequestFraming::None);
        assert_eq!(request_framing(&Method::POST, &h, false, Some(3)), RequestFraming::Length(3));
        let mut size = Vec::new();
        write_chunk_size(&mut size, 0x1a2b);
        assert_eq!(size, b"1a2b\r\n");
    }
}

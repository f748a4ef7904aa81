//! A raw TCP client, for requests no well-behaved client would send (smuggling, malformed
//! heads, slowloris) and for reading exactly what the gateway wrote back.

use super::{Reply, STEP, within};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP connection with a read buffer, so bytes after a response stay readable.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// The peer closed (FIN).
    Eof,
    /// The peer reset the connection.
    Reset,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = within(STEP, "connect", TcpStream::connect(addr)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        RawConn { stream, buf: Vec::new() }
    }

    /// Writes all of `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) {
        within(STEP, "write", self.stream.write_all(bytes)).await.unwrap();
    }

    /// Writes `bytes`, reporting instead of failing when the peer has gone away.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads more bytes into the buffer; `Err` when the connection ended.
    async fn fill(&mut self) -> Result<(), Closed> {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Err(Closed::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Err(Closed::Reset),
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// Reads exactly `n` bytes.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        within(STEP, "raw read", async {
            while self.buf.len() < n {
                self.fill().await.unwrap_or_else(|c| panic!("connection closed ({c:?}) before {n} bytes"));
            }
        })
        .await;
        self.buf.drain(..n).collect()
    }

    /// Reads one response (head and body, by `Content-Length` or chunked).
    pub async fn read_response(&mut self) -> Reply {
        within(STEP, "raw response", self.read_response_inner()).await
    }

    async fn read_response_inner(&mut self) -> Reply {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if let Err(c) = self.fill().await {
                panic!(
                    "connection closed ({c:?}) before a response head; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        };
        let head: Vec<u8> = self.buf.drain(..end).collect();
        let head = String::from_utf8(head).unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut words = status_line.splitn(3, ' ');
        let version = match words.next() {
            Some("HTTP/1.1") => Version::HTTP_11,
            Some("HTTP/1.0") => Version::HTTP_10,
            other => panic!("not an HTTP/1 status line: {other:?} in {head:?}"),
        };
        let status = StatusCode::from_bytes(words.next().unwrap().as_bytes()).unwrap();
        let mut headers = HeaderMap::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once(':').unwrap_or_else(|| panic!("bad header line {line:?}"));
            headers.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v.trim()).unwrap());
        }
        let chunked = headers.get("transfer-encoding").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let body = if status.is_informational() || status == StatusCode::NO_CONTENT {
            Vec::new()
        } else if chunked {
            self.read_chunked().await
        } else if let Some(len) = headers.get("content-length") {
            self.read_exact(len.to_str().unwrap().parse().unwrap()).await
        } else {
            while self.fill().await.is_ok() {}
            std::mem::take(&mut self.buf)
        };
        Reply { status, version, headers, body: Bytes::from(body) }
    }

    async fn read_line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return String::from_utf8(line[..i].to_vec()).unwrap();
            }
            self.fill().await.unwrap_or_else(|c| panic!("connection closed ({c:?}) inside a chunked body"));
        }
    }

    async fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let size_line = self.read_line().await;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                while !self.read_line().await.is_empty() {}
                return body;
            }
            body.extend(self.read_exact(size).await);
            assert_eq!(self.read_line().await, "", "chunk not followed by CRLF");
        }
    }

    /// Waits until the peer closes the connection; fails if it sends anything or stays
    /// open past `limit`.
    pub async fn expect_closed(&mut self, limit: Duration) -> Closed {
        let closed = within(limit, "the gateway to close the connection", async {
            loop {
                if let Err(c) = self.fill().await {
                    return c;
                }
            }
        })
        .await;
        assert!(self.buf.is_empty(), "unexpected bytes before close: {:?}", String::from_utf8_lossy(&self.buf));
        closed
    }

    /// Reads until the connection closes, returning whatever arrived (or `None` if it
    /// is still open after `limit`).
    pub async fn read_until_closed(&mut self, limit: Duration) -> Option<(Vec<u8>, Closed)> {
        let closed = tokio::time::timeout(limit, async {
            loop {
                if let Err(c) = self.fill().await {
                    return c;
                }
            }
        })
        .await
        .ok()?;
        Some((std::mem::take(&mut self.buf), closed))
    }
}

/// Reads from `stream` into `buf` until it holds a whole head (up to its blank line), for
/// scripted upstreams; the offset just past the head, or `None` if the peer went away
/// first. Bytes after the head stay in `buf`.
pub async fn read_head_end(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

//! `gatehouse healthcheck`: GET the admin `/healthz` and exit 0 on 200, 1 otherwise.
//! For container health checks in images without a shell or curl (distroless).

use std::process::ExitCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, clap::Args)]
pub struct HealthcheckArgs {
    /// Plain-HTTP URL to GET.
    #[arg(long, default_value = "http://127.0.0.1:9901/healthz")]
    url: http::Uri,
    /// GET `/healthz` on the admin listener this config names, instead of `--url` (an
    /// unspecified address such as 0.0.0.0 is asked on loopback): the image's health
    /// check follows the config rather than a port written into the Dockerfile.
    #[arg(long, conflicts_with = "url")]
    config: Option<std::path::PathBuf>,
    /// Give up after this long (e.g. 3s).
    #[arg(long, default_value = "3s")]
    timeout: String,
}

pub fn run(mut a: HealthcheckArgs) -> ExitCode {
    if let Some(path) = &a.config {
        match admin_url(path) {
            Ok(url) => a.url = url,
            Err(e) => return super::store_args::fail("healthcheck", e),
        }
    }
    match check(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::store_args::fail("healthcheck", e),
    }
}

/// `http://<admin.address>/healthz` of the config at `path`.
fn admin_url(path: &std::path::Path) -> Result<http::Uri, String> {
    let config = crate::config::Config::load(path).map_err(|e| e.to_string())?;
    let admin = config.admin.ok_or_else(|| format!("{}: no admin listener (admin.address)", path.display()))?;
    let mut addr = admin.address;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("http://{addr}/healthz").parse().map_err(|e| format!("{addr}: {e}"))
}

fn check(a: &HealthcheckArgs) -> Result<(), String> {
    let timeout = crate::config::units::parse_duration(&a.timeout)?;
    if a.url.scheme_str() != Some("http") {
        return Err(format!("{}: only http:// URLs (the admin listener) are supported", a.url));
    }
    let host = a.url.host().ok_or_else(|| format!("{}: no host", a.url))?;
    // An IPv6 host keeps its brackets here, as `[::1]:9901` needs them.
    let addr = format!("{host}:{}", a.url.port_u16().unwrap_or(80));
    let path = a.url.path_and_query().map_or("/", |p| p.as_str());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let status = rt.block_on(async {
        tokio::time::timeout(timeout, get(&addr, host, path))
            .await
            .map_err(|_| format!("{}: no answer within {}", a.url, a.timeout))?
    })?;
    if status == 200 { Ok(()) } else { Err(format!("{}: HTTP {status}", a.url)) }
}

/// One `GET` over HTTP/1.1; the response's status code.
async fn get(addr: &str, host: &str, path: &str) -> Result<u16, String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("{addr}: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| format!("{addr}: {e}"))?;
    let mut head = [0u8; 64];
    let mut n = 0;
    // The status line is all that is needed: `HTTP/1.1 200 OK`.
    while n < head.len() && !head[..n].contains(&b'\n') {
        let got = s.read(&mut head[n..]).await.map_err(|e| format!("{addr}: {e}"))?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: not an HTTP response: {:?}", line.lines().next().unwrap_or_default()))
}

//! \[TLS\] rustls server configuration with certificates that reload in place, and the
//! client configuration of `https://` upstreams (`upstream.rs`).
//!
//! The acceptor is built once; the certificate lives behind an `ArcSwap` in our own
//! resolver, so a reload swaps one pointer and open connections are untouched. A
//! certificate pair that fails to load keeps the last good one in service. An
//! upstream's client certificate (mTLS) is served by the same resolver.

use crate::config::TlsFiles;
use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;
use tokio_rustls::TlsAcceptor;

pub mod upstream;

#[cfg(not(any(feature = "aws-lc", feature = "ring")))]
compile_error!("enable one crypto provider feature: `aws-lc` (default) or `ring`");

/// The crypto provider chosen by cargo feature.
pub fn provider() -> Arc<CryptoProvider> {
    #[cfg(feature = "aws-lc")]
    return Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    #[cfg(all(feature = "ring", not(feature = "aws-lc")))]
    return Arc::new(rustls::crypto::ring::default_provider());
}

/// A certificate and key that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TlsError {
    pub path: String,
    pub reason: String,
}

/// What the metrics say about a listener's certificate: read at each scrape.
#[derive(Debug, Default)]
pub struct CertStatus {
    /// The serving certificate's notAfter (Unix seconds).
    pub not_after: AtomicI64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Set by a failed reload, cleared by a good one: the files on disk are not what is
    /// served, and whatever the operator put there (a renewed certificate) is not in force.
    pub reload_failing: AtomicBool,
}

/// Serves the current certificate for every handshake.
#[derive(Debug)]
pub struct CertResolver {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    status: CertStatus,
    /// The files' fingerprint just before the first load: a change made before the
    /// watcher starts is still seen.
    baseline: u64,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// An upstream's client certificate: the same files, reloaded the same way.
impl ResolvesClientCert for CertResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl CertResolver {
    /// Loads `files` (failing when they cannot be used) into a resolver.
    pub fn load(files: &TlsFiles) -> Result<Arc<CertResolver>, TlsError> {
        let baseline = crate::fs::watch::fingerprint(&[files.cert.clone(), files.key.clone()]);
        let (key, not_after) = load(files)?;
        let status = CertStatus { not_after: AtomicI64::new(not_after), ..CertStatus::default() };
        Ok(Arc::new(CertResolver { current: ArcSwap::from_pointee(key), files: files.clone(), baseline, status }))
    }

    /// Re-reads the files; on failure the last good certificate stays in service.
    pub fn reload(&self) -> Result<(), TlsError> {
        match load(&self.files) {
            Ok((key, not_after)) => {
                self.current.store(Arc::new(key));
                self.status.not_after.store(not_after, Ordering::Relaxed);
                self.status.reloads_ok.fetch_add(1, Ordering::Relaxed);
                self.status.reload_failing.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.status.reloads_failed.fetch_add(1, Ordering::Relaxed);
                self.status.reload_failing.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// The certificate's state, for the metrics.
    pub fn status(&self) -> &CertStatus {
        &self.status
    }

    /// The files this resolver serves.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Reloads whenever the files change, until the process ends.
    pub fn spawn_reloader(self: Arc<Self>) {
        let paths = vec![self.files.cert.clone(), self.files.key.clone()];
        let mut changes = crate::fs::watch::watch_since(paths, Duration::from_secs(60), self.baseline);
        tokio::spawn(async move {
            while changes.recv().await.is_some() {
                match self.reload() {
                    Ok(()) => tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "TLS certificate reload failed; keeping the previous certificate")
                    }
                }
            }
        });
    }
}

/// The certificate and key, and the leaf certificate's notAfter (Unix seconds).
fn load(files: &TlsFiles) -> Result<(CertifiedKey, i64), TlsError> {
    let err = |p: &std::path::Path, reason: String| TlsError { path: p.display().to_string(), reason };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| err(&files.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(&files.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(err(&files.cert, "no certificate in file".into()));
    }
    let not_after = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| err(&files.cert, format!("unreadable certificate: {e}")))?
        .1
        .validity()
        .not_after
        .timestamp();
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| err(&files.key, e.to_string()))?;
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| err(&files.key, e.to_string()))?;
    Ok((key, not_after))
}

/// Builds the acceptor (TLS 1.2 and 1.3, ALPN h2 then http/1.1) and its resolver.
pub fn acceptor(files: &TlsFiles) -> Result<(TlsAcceptor, Arc<CertResolver>), TlsError> {
    let resolver = CertResolver::load(files)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError { path: files.cert.display().to_string(), reason: e.to_string() })?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), resolver))
}

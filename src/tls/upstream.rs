//! \[TLS\] The client side of `https://` upstreams: whom to trust, the name to verify, and
//! the client certificate (mTLS), reloaded in place like a listener's.
//!
//! Verification is always on: there is no setting that turns it off. A private CA is
//! trusted by giving its bundle (`upstream_tls.ca`), which then replaces the system's
//! roots for that route.

use super::{CertResolver, TlsError, provider};
use crate::config::UpstreamTlsConfig;
use crate::wire::balance::{Protocol, TlsClient};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// A route's TLS client, and its client certificate's resolver (to reload) if it has one.
#[derive(Debug)]
pub struct RouteTls {
    pub client: TlsClient,
    pub client_cert: Option<Arc<CertResolver>>,
}

/// Builds one route's client: TLS 1.2 and 1.3, ALPN `http/1.1` or `h2` (the route's
/// protocol), the system's roots unless a CA bundle is given.
pub fn client(cfg: &UpstreamTlsConfig, protocol: Protocol) -> Result<RouteTls, TlsError> {
    let roots = match &cfg.ca {
        Some(path) => Arc::new(ca_bundle(path)?),
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError { path: "upstream_tls".into(), reason: e.to_string() })?
        .with_root_certificates(roots);
    let (mut config, client_cert) = match &cfg.client {
        None => (builder.with_no_client_auth(), None),
        Some(files) => {
            let resolver = CertResolver::load(files)?;
            (builder.with_client_cert_resolver(resolver.clone()), Some(resolver))
        }
    };
    // One protocol offered, the route's: an upstream that cannot speak it fails the
    // handshake (h2) or answers in HTTP/1.1 as before.
    config.alpn_protocols = match protocol {
        Protocol::Http1 => vec![b"http/1.1".to_vec()],
        Protocol::H2 => vec![b"h2".to_vec()],
    };
    let server_name = match &cfg.server_name {
        None => None,
        Some(n) => Some(
            ServerName::try_from(n.clone())
                .map_err(|e| TlsError { path: "upstream_tls.server_name".into(), reason: format!("{n:?}: {e}") })?,
        ),
    };
    Ok(RouteTls { client: TlsClient { config: Arc::new(config), server_name }, client_cert })
}

/// Every certificate of a PEM bundle; at least one.
fn ca_bundle(path: &Path) -> Result<RootCertStore, TlsError> {
    let err = |reason: String| TlsError { path: path.display().to_string(), reason };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(err("no usable CA certificate in file".into()));
    }
    Ok(store)
}

/// The system's trusted roots, read once per process.
fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    if let Some(r) = ROOTS.get() {
        return Ok(r.clone());
    }
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        return Err(TlsError {
            path: "system roots".into(),
            reason:
                "no trusted root certificate found on this system: install ca-certificates, or give upstream_tls.ca"
                    .into(),
        });
    }
    Ok(ROOTS.get_or_init(|| Arc::new(store)).clone())
}

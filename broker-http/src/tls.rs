//! HTTPS between brokers, with the cargo feature `tls` (rustls, ring provider).
//!
//! [`TlsOptions`] mean, for this peer-to-peer backend: `cert_file` + `key_file` are the
//! certificate this broker's endpoint serves (its nodes are then registered with
//! `"secure": "true"`, and publishers use `https`, as in Go Micro); `ca_file` is what a publisher
//! trusts when it posts to `https` nodes (no system roots are loaded: name the CA of your peers),
//! or `insecure_skip_verify` for tests. Without the feature, TLS options are rejected. The check
//! and the rustls configurations are shared with the grpc backend: [`broker_registry::tls`].

use broker_core::Result;
use broker_core::TlsOptions;
use hyper_util::client::legacy::connect::HttpConnector;

/// The client connector: HTTPS-capable with the feature, plain HTTP without.
#[cfg(feature = "tls")]
pub(crate) type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
/// The client connector: HTTPS-capable with the feature, plain HTTP without.
#[cfg(not(feature = "tls"))]
pub(crate) type Connector = HttpConnector;

/// Accepts TLS connections for the endpoint.
#[cfg(feature = "tls")]
pub(crate) type Acceptor = tokio_rustls::TlsAcceptor;
/// Without the feature there is never an acceptor.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub(crate) enum Acceptor {}

/// Whether TLS is compiled in.
pub(crate) const ENABLED: bool = cfg!(feature = "tls");

/// Checks TLS options as this backend reads them (before any I/O).
pub(crate) fn check(tls: &TlsOptions) -> Result<()> {
    #[cfg(not(feature = "tls"))]
    {
        let _ = tls;
        Err(broker_core::Error::unsupported(
            crate::NAME,
            "tls",
            "this build of broker-http has no TLS: enable its cargo feature `tls` (or the micro-broker feature `tls`)",
        ))
    }
    #[cfg(feature = "tls")]
    {
        broker_registry::tls::check(tls)
    }
}

/// The client connector for `tls` (HTTP only when `None`).
pub(crate) fn connector(http: HttpConnector, tls: Option<&TlsOptions>) -> Result<Connector> {
    #[cfg(not(feature = "tls"))]
    {
        let _ = tls;
        Ok(http)
    }
    #[cfg(feature = "tls")]
    {
        let config = broker_registry::tls::client_config(tls)?;
        Ok(hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http))
    }
}

/// The endpoint's acceptor, when `tls` names a certificate.
pub(crate) fn acceptor(tls: Option<&TlsOptions>) -> Result<Option<Acceptor>> {
    #[cfg(not(feature = "tls"))]
    {
        let _ = tls;
        Ok(None)
    }
    #[cfg(feature = "tls")]
    {
        let config = broker_registry::tls::server_config(tls, &[b"http/1.1"])?;
        Ok(config.map(|config| tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))))
    }
}

//! HTTPS between brokers, with the cargo feature `tls` (rustls, ring provider).
//!
//! [`TlsOptions`] mean, for this peer-to-peer backend: `cert_file` + `key_file` are the
//! certificate this broker's endpoint serves (its nodes are then registered with
//! `"secure": "true"`, and publishers use `https`, as in Go Micro); `ca_file` is what a publisher
//! trusts when it posts to `https` nodes (no system roots are loaded: name the CA of your peers),
//! or `insecure_skip_verify` for tests. Without the feature, TLS options are rejected.

use broker_core::Result;
use broker_core::TlsOptions;
#[cfg(feature = "tls")]
use broker_core::{Error, ErrorKind};
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
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(Error::invalid_input(
                "tls: cert_file and key_file go together (the endpoint's certificate and key)",
            ));
        }
        if tls.ca_file.is_none() && !tls.insecure_skip_verify {
            return Err(Error::invalid_input(
                "tls: name the CA that signs your peers' certificates (ca_file), or set insecure_skip_verify for tests",
            ));
        }
        Ok(())
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
        let config = client_config(tls)?;
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
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let Some(tls) = tls else { return Ok(None) };
        let (Some(cert_file), Some(key_file)) = (&tls.cert_file, &tls.key_file) else { return Ok(None) };
        let certs = CertificateDer::pem_file_iter(cert_file)
            .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| tls_error(format!("cannot read the certificate {}", cert_file.display()), e))?;
        let key = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|e| tls_error(format!("cannot read the private key {}", key_file.display()), e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error("no usable TLS protocol version".into(), e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| tls_error("the certificate and key do not make a server identity".into(), e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))))
    }
}

#[cfg(feature = "tls")]
fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(feature = "tls")]
fn tls_error(message: String, source: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorKind::InvalidInput, format!("tls: {message}: {source}")).with_source(source)
}

#[cfg(feature = "tls")]
fn client_config(tls: Option<&TlsOptions>) -> Result<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("no usable TLS protocol version".into(), e))?;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca_file) = tls.and_then(|t| t.ca_file.as_ref()) {
        for cert in CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| tls_error(format!("cannot read the CA file {}", ca_file.display()), e))?
        {
            let cert = cert.map_err(|e| tls_error(format!("bad certificate in {}", ca_file.display()), e))?;
            roots.add(cert).map_err(|e| tls_error(format!("unusable CA certificate in {}", ca_file.display()), e))?;
        }
    }
    let config = if tls.is_some_and(|t| t.insecure_skip_verify) {
        builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(insecure::AcceptAnyCertificate(provider())))
            .with_no_client_auth()
    } else {
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(config)
}

#[cfg(feature = "tls")]
mod insecure {
    use rustls::DigitallySignedStruct;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    /// `insecure_skip_verify`: any certificate is accepted (signatures are still checked).
    #[derive(Debug)]
    pub(super) struct AcceptAnyCertificate(pub(super) Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAnyCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

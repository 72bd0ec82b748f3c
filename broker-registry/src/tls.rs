//! TLS between peer brokers (feature `tls`: rustls with the ring provider), shared by the
//! peer-to-peer backends (http, grpc): the check of [`TlsOptions`] and the rustls configurations
//! built from them. Each backend adds its transport (hyper-rustls, tokio-rustls) and its ALPN.
//!
//! [`TlsOptions`] mean, for a peer-to-peer backend: `cert_file` + `key_file` are the certificate
//! this broker's endpoint serves (its nodes are then registered with `"secure": "true"`, and
//! publishers dial them over TLS, as in Go Micro); `ca_file` is what a publisher trusts when it
//! sends to secure nodes (no system roots are loaded: name the CA of your peers), or
//! `insecure_skip_verify` for tests.

use std::sync::Arc;

use broker_core::{Error, ErrorKind, Result, TlsOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use rustls;
pub use rustls_pki_types;

/// Checks TLS options as the peer-to-peer backends read them (before any I/O).
pub fn check(tls: &TlsOptions) -> Result<()> {
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

/// The endpoint's server configuration, when `tls` names a certificate; `alpn` are the protocols
/// it offers (`http/1.1`, `h2`).
pub fn server_config(tls: Option<&TlsOptions>, alpn: &[&[u8]]) -> Result<Option<rustls::ServerConfig>> {
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
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Some(config))
}

/// The publisher's client configuration: trusts `ca_file` only, or anything with
/// `insecure_skip_verify`; no ALPN (the caller sets its own).
pub fn client_config(tls: Option<&TlsOptions>) -> Result<rustls::ClientConfig> {
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
            .with_custom_certificate_verifier(Arc::new(insecure::AcceptAnyCertificate(provider())))
            .with_no_client_auth()
    } else {
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(config)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(message: String, source: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorKind::InvalidInput, format!("tls: {message}: {source}")).with_source(source)
}

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

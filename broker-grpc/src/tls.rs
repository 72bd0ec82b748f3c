//! TLS between brokers, with the cargo feature `tls` (rustls, ring provider), as the http
//! backend's: the options are checked and turned into rustls configurations by
//! [`broker_registry::tls`] (shared with broker-http); this module adds the gRPC transport:
//! a tokio-rustls acceptor in front of tonic's server (`serve_with_incoming`) and a connector
//! for each node's channel (`connect_with_connector`), both with ALPN `h2`.
//!
//! `cert_file` + `key_file` are the certificate this broker's endpoint serves (its nodes are then
//! registered with `"secure": "true"`, as in Go Micro); `ca_file` is what a publisher trusts when
//! it calls secure nodes (no system roots), or `insecure_skip_verify` for tests. A publisher
//! calls secure nodes over TLS and never in clear text (without TLS options it refuses them);
//! plain nodes it calls in clear text, as Go Micro does. Without the feature, TLS options are
//! rejected with [`broker_core::ErrorKind::Unsupported`].

use broker_core::{Result, TlsOptions};

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
            "this build of broker-grpc has no TLS: enable its cargo feature `tls` (or the micro-broker features `grpc` and `tls`)",
        ))
    }
    #[cfg(feature = "tls")]
    {
        broker_registry::tls::check(tls)
    }
}

#[cfg(feature = "tls")]
pub(crate) use enabled::{Acceptor, Connector, TlsConnection, accept_loop};

/// Without the feature there is never an acceptor.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub(crate) enum Acceptor {}

/// Without the feature there is never a TLS connector.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub(crate) enum Connector {}

/// The endpoint's acceptor, when `tls` names a certificate.
pub(crate) fn acceptor(tls: Option<&TlsOptions>) -> Result<Option<Acceptor>> {
    #[cfg(not(feature = "tls"))]
    {
        let _ = tls;
        Ok(None)
    }
    #[cfg(feature = "tls")]
    {
        let config = broker_registry::tls::server_config(tls, &[b"h2"])?;
        Ok(config.map(|config| Acceptor(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))))
    }
}

/// The publisher's TLS connector for secure nodes, when TLS options are given.
pub(crate) fn connector(tls: Option<&TlsOptions>) -> Result<Option<Connector>> {
    #[cfg(not(feature = "tls"))]
    {
        let _ = tls;
        Ok(None)
    }
    #[cfg(feature = "tls")]
    {
        let Some(tls) = tls else { return Ok(None) };
        let mut config = broker_registry::tls::client_config(Some(tls))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Connector(tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)))))
    }
}

#[cfg(feature = "tls")]
mod enabled {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use broker_registry::tls::rustls_pki_types::ServerName;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;
    use tonic::codegen::{BoxFuture, Service, http::Uri};
    use tonic::transport::server::{Connected, TcpConnectInfo};

    /// How long a peer may take to finish its handshake: one that never does holds nothing for long.
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

    /// Accepts TLS connections for the endpoint.
    #[derive(Clone)]
    pub(crate) struct Acceptor(pub(super) tokio_rustls::TlsAcceptor);

    /// A server-side TLS connection, as tonic's server takes it.
    pub(crate) struct TlsConnection(tokio_rustls::server::TlsStream<TcpStream>);

    impl Connected for TlsConnection {
        type ConnectInfo = TcpConnectInfo;
        fn connect_info(&self) -> TcpConnectInfo {
            self.0.get_ref().0.connect_info()
        }
    }

    impl AsyncRead for TlsConnection {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for TlsConnection {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
        }
        fn is_write_vectored(&self) -> bool {
            self.0.is_write_vectored()
        }
    }

    /// Accepts TCP connections until `stop`, handshakes each in its own task (a slow peer does
    /// not hold up the others) and hands the finished ones to the server through `ready`.
    pub(crate) async fn accept_loop(
        listener: TcpListener,
        acceptor: Acceptor,
        ready: tokio::sync::mpsc::Sender<TlsConnection>,
        stop: CancellationToken,
    ) {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "grpc broker: accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.0.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = ready.send(TlsConnection(stream)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "grpc broker: TLS handshake failed"),
                    Err(_) => tracing::debug!("grpc broker: TLS handshake timed out"),
                }
            });
        }
    }

    /// Dials a node over TCP and TLS (the channel's connect timeout bounds both).
    #[derive(Clone)]
    pub(crate) struct Connector(pub(super) tokio_rustls::TlsConnector);

    impl Service<Uri> for Connector {
        type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
        type Error = io::Error;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, uri: Uri) -> Self::Future {
            let connector = self.0.clone();
            Box::pin(async move {
                let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
                let port = uri.port_u16().unwrap_or(443);
                let name = ServerName::try_from(host.clone()).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?} is not a TLS server name: {e}"))
                })?;
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(name, tcp).await?;
                Ok(TokioIo::new(tls))
            })
        }
    }
}

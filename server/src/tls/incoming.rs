//! A TLS listener for tonic: TCP connections accepted, their handshakes run concurrently (a slow
//! or hostile client delays nobody else), and the finished ones handed to the server.
//!
//! - A handshake has [`HANDSHAKE_TIMEOUT`] to finish; then the connection is closed.
//! - A failed handshake (no or wrong client certificate, a revoked one, not TLS at all) is
//!   logged at warn level, as etcd logs "rejected connection", and the connection closed.
//! - Each connection carries its [`Identity`] (address, and the client certificate's common
//!   name): the user of a request without a token under `--client-cert-auth`.
//! - On the peer URLs, a client certificate must name the address it connects from (etcd's
//!   `checkSAN`, [`super::san`]), unless `--experimental-peer-skip-client-san-verification`.
//! - The configuration is taken anew for each handshake, so rotated files apply to new
//!   connections (see [`super::Reloading`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::Connected;

use crate::net::Listener;

use super::ServerTls;

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the server to take them.
const READY_QUEUE: usize = 128;

/// Who is on the other end of a TLS connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub remote: Option<SocketAddr>,
    /// The verified client certificate's subject CN (none without a client certificate).
    pub common_name: Option<String>,
}

/// An accepted connection whose handshake finished.
#[derive(Debug)]
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    identity: Identity,
    /// Its place under the listener's connection limit, from the accept on.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Connected for TlsConn {
    type ConnectInfo = Identity;

    fn connect_info(&self) -> Identity {
        self.identity.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The TLS connections of `tcp`, for `tonic::transport::Server::serve_with_incoming*`. The
/// accepting task ends (closing the listener) when the returned stream is dropped.
pub fn incoming(
    tcp: impl Into<Listener>,
    tls: Arc<ServerTls>,
    what: &'static str,
    check_san: bool,
) -> impl Stream<Item = std::io::Result<TlsConn>> + Send + 'static {
    let mut tcp = tcp.into();
    let (ready, mut rx) = tokio::sync::mpsc::channel::<TlsConn>(READY_QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = tcp.accept() => a,
                () = ready.closed() => break,
            };
            let (stream, permit) = match accepted {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    // EMFILE and the like: keep accepting once the pressure is gone.
                    tracing::warn!(what, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                None => break,
            };
            let remote = stream.peer_addr().ok();
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.get());
            let ready = ready.clone();
            tokio::spawn(async move {
                let accept = async {
                    let stream = acceptor.accept(stream).await?;
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first());
                    if let (true, Some(cert), Some(remote)) = (check_san, cert, remote) {
                        super::san::check(cert, remote.ip())
                            .await
                            .map_err(std::io::Error::other)?;
                    }
                    std::io::Result::Ok(stream)
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                    Ok(Ok(stream)) => {
                        let common_name = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| super::cn::common_name(c));
                        let identity = Identity {
                            remote,
                            common_name,
                        };
                        let conn = TlsConn {
                            stream,
                            identity,
                            _permit: permit,
                        };
                        let _ = ready.send(conn).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(what, remote = ?remote, error = %e, "rejected connection");
                    }
                    Err(_) => tracing::warn!(
                        what,
                        remote = ?remote,
                        "rejected connection: TLS handshake not finished within {HANDSHAKE_TIMEOUT:?}"
                    ),
                }
            });
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(Ok)))
}

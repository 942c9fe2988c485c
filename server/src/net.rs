//! The network stack clients reach: the tokio runtime of the network threads and the gRPC/HTTP
//! listener on a client URL. `keel-bench noop-server` serves a no-op KV service through these same
//! functions, so the floor it measures is this stack's.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt as _;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;

/// How many network threads: `requested` (`--net-threads`), or one per CPU.
pub fn threads(requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The network threads' runtime: `threads` tokio workers named `keel-net`.
///
/// Without tokio's LIFO slot (`tokio_unstable`, set in `.cargo/config.toml`). With it, a task
/// woken by the running task runs next: the stream task that answers a request wakes its
/// connection's task, which then writes that one response at once, a `writev` and a TCP
/// segment per response. Without it the connection task waits its turn behind the stream tasks
/// already queued, and writes all their responses together. Under 1000 clients on 100
/// connections that is 0.28 `writev` per put instead of 1, and about a fifth of the CPU per put
/// (bench/RESULTS.md, 2026-11-28).
pub fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder
        .worker_threads(threads)
        .thread_name("keel-net")
        // Decoding and answering a txn nested 256 deep recurses through prost and the engine.
        .thread_stack_size(16 << 20)
        .enable_all()
        .build()
        .context("starting the network runtime")
}

/// A listener's accepted connections, at most as many open at once as `permits` has (etcd's
/// `LimitListener` on client URLs: the process's file descriptor limit less 150 kept for its
/// own files). At the limit nothing more is accepted until a connection closes: new clients
/// wait in the kernel's backlog, and the WAL and backend still get their descriptors.
pub struct Listener {
    tcp: TcpIncoming,
    permits: Option<Arc<Semaphore>>,
    warned: Option<std::time::Instant>,
}

impl From<TcpIncoming> for Listener {
    /// No limit (peer URLs, as etcd's).
    fn from(tcp: TcpIncoming) -> Listener {
        Listener {
            tcp,
            permits: None,
            warned: None,
        }
    }
}

impl Listener {
    /// At most `permits` connections open at once (shared by the listeners given the same).
    pub fn limited(tcp: TcpIncoming, permits: Arc<Semaphore>) -> Listener {
        Listener {
            permits: Some(permits),
            ..Listener::from(tcp)
        }
    }

    /// The next connection, with the permit it holds until it is dropped; `None` when the
    /// listener is closed.
    pub async fn accept(
        &mut self,
    ) -> Option<std::io::Result<(TcpStream, Option<OwnedSemaphorePermit>)>> {
        let permit = match &self.permits {
            None => None,
            Some(permits) => Some(match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let now = std::time::Instant::now();
                    if self
                        .warned
                        .is_none_or(|at| now.duration_since(at).as_secs() >= 10)
                    {
                        self.warned = Some(now);
                        tracing::warn!(
                            "client connection limit reached (the file descriptor limit less \
                             150): accepting again once connections close"
                        );
                    }
                    permits.clone().acquire_owned().await.ok()?
                }
            }),
        };
        let next = self.tcp.next().await?;
        Some(next.map(|stream| (stream, permit)))
    }

    /// The accepted connections as a stream, for plain (non-TLS) serving.
    pub fn into_stream(self) -> impl futures::Stream<Item = std::io::Result<Limited<TcpStream>>> {
        futures::stream::unfold(self, |mut listener| async move {
            let next = listener.accept().await?;
            Some((
                next.map(|(io, permit)| Limited {
                    io,
                    _permit: permit,
                }),
                listener,
            ))
        })
    }
}

/// A connection holding its permit of a [`Listener`]'s limit.
pub struct Limited<T> {
    io: T,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Limited<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Limited<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Binds a client listener on `addr` (so that a port in use fails here, with the reason).
/// Accepted connections get `TCP_NODELAY`, as grpc-go's (etcd's) do: a response is sent when it
/// is ready, not held back by Nagle's algorithm until the previous one is acknowledged.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpIncoming> {
    Ok(TcpIncoming::bind(addr)?.with_nodelay(Some(true)))
}

/// HTTP/2 settings of the client listeners, from etcd's flags.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// `--max-concurrent-streams`: streams one connection may have open.
    pub max_concurrent_streams: u32,
    /// `--grpc-keepalive-interval`: how often an idle connection is pinged (zero: never).
    pub keepalive_interval: std::time::Duration,
    /// `--grpc-keepalive-timeout`: how long a ping may go unanswered before the connection is
    /// closed (zero: no limit).
    pub keepalive_timeout: std::time::Duration,
}

impl Default for ClientOptions {
    /// etcd's defaults.
    fn default() -> Self {
        ClientOptions {
            max_concurrent_streams: u32::MAX,
            keepalive_interval: std::time::Duration::from_secs(2 * 3600),
            keepalive_timeout: std::time::Duration::from_secs(20),
        }
    }
}

/// A client connection the listeners serve: a TCP stream or a TLS one over it.
pub trait ClientConnection:
    tokio::io::AsyncRead
    + tokio::io::AsyncWrite
    + tonic::transport::server::Connected<ConnectInfo: Clone + Send + Sync + 'static>
    + Unpin
    + Send
    + 'static
{
}

impl<T> ClientConnection for T where
    T: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected<ConnectInfo: Clone + Send + Sync + 'static>
        + Unpin
        + Send
        + 'static
{
}

/// Serves gRPC (HTTP/2) and plain HTTP/1 (`/health`, `/metrics`) on `incoming` until `stop`.
/// `incoming` is a plain [`TcpIncoming`] or the TLS connections of one
/// ([`crate::tls::incoming::incoming`]).
pub async fn serve_clients<I, IO, IE>(
    incoming: I,
    routes: Routes,
    options: ClientOptions,
    stop: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: ClientConnection,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_service(incoming, routes.prepare(), options, stop).await
}

/// [`serve_clients`] with any service in place of tonic's router: a member's client URLs serve
/// [`crate::api::dispatch::ClientService`].
pub async fn serve_service<S, B, I, IO, IE>(
    incoming: I,
    service: S,
    options: ClientOptions,
    stop: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    S: tower_service::Service<
            axum::http::Request<tonic::body::Body>,
            Response = axum::http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: ClientConnection,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let nonzero = |d: std::time::Duration| (!d.is_zero()).then_some(d);
    let mut builder = tonic::transport::Server::builder()
        .accept_http1(true)
        .max_concurrent_streams(Some(options.max_concurrent_streams))
        .http2_keepalive_interval(nonzero(options.keepalive_interval));
    if let Some(timeout) = nonzero(options.keepalive_timeout) {
        builder = builder.http2_keepalive_timeout(Some(timeout));
    }
    builder
        .serve_with_incoming_shutdown(service, incoming, stop)
        .await
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    /// Accepted client connections have Nagle's algorithm off. Without it, a grpc-go client
    /// (etcdctl, etcd's benchmark tool) waited for the delayed ACK on every reply: one client's
    /// put took 44 ms (bench/RESULTS.md, 2026-11-27).
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let mut incoming = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
        drop(client);
    }

    /// At the limit, a listener accepts again only once a connection it gave out is closed.
    #[tokio::test]
    async fn a_limited_listener_waits_for_a_connection_to_close() {
        let incoming = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(2));
        let mut accepted = Box::pin(super::Listener::limited(incoming, permits).into_stream());
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let first = accepted.next().await.unwrap().unwrap();
        let _second = accepted.next().await.unwrap().unwrap();
        let third = tokio::time::timeout(std::time::Duration::from_millis(200), accepted.next());
        assert!(
            third.await.is_err(),
            "a third connection accepted over the limit"
        );
        drop(first);
        let third = tokio::time::timeout(std::time::Duration::from_secs(10), accepted.next());
        assert!(third.await.unwrap().unwrap().is_ok());
    }

    /// The property the network runtime is built for (tokio's LIFO slot off, see [`runtime`]):
    /// a task woken by the running task (a connection woken by a stream that answered) runs
    /// after the tasks already queued (the other streams), not before them. With the slot, the
    /// woken task runs first. Fails in a build without `--cfg tokio_unstable`
    /// (`.cargo/config.toml`).
    #[test]
    fn a_task_woken_by_a_task_runs_after_those_already_queued() {
        use std::sync::{Arc, Mutex};
        let runtime = super::runtime(1).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let log = |o: &Arc<Mutex<Vec<&'static str>>>, what| o.lock().unwrap().push(what);
        let o = order.clone();
        runtime.block_on(async move {
            // Everything runs on the one worker, in a task, as a connection and its streams do.
            let (woken, queued) = tokio::spawn(async move {
                let notify = Arc::new(tokio::sync::Notify::new());
                let (n, o2) = (notify.clone(), o.clone());
                let woken = tokio::spawn(async move {
                    n.notified().await;
                    log(&o2, "woken");
                });
                // Let it wait on the notification.
                tokio::task::yield_now().await;
                let o3 = o.clone();
                let queued = tokio::spawn(async move { log(&o3, "queued") });
                notify.notify_one();
                (woken, queued)
            })
            .await
            .unwrap();
            woken.await.unwrap();
            queued.await.unwrap();
        });
        assert_eq!(*order.lock().unwrap(), ["queued", "woken"]);
    }

    /// A TCP stream that counts the writes made to it.
    struct CountingIo {
        inner: tokio::net::TcpStream,
        writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl tokio::io::AsyncRead for CountingIo {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for CountingIo {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// The vendored h2's write buffering (third_party/h2/KEEL-PATCH.md): responses of 300 bytes
    /// (a watch event, a range of one key) answered on ten streams of a connection at once go
    /// out in one write, not one each. h2 as released writes any DATA frame of 256 bytes or more
    /// before it buffers another frame: ten writes here.
    #[tokio::test(flavor = "current_thread")]
    async fn responses_of_many_streams_share_a_write() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let io = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut send, conn) = h2::client::handshake(io).await.unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut responses = Vec::new();
            for _ in 0..10 {
                send = send.ready().await.unwrap();
                let request = axum::http::Request::post("http://keel/x").body(()).unwrap();
                let (response, _) = send.send_request(request, true).unwrap();
                responses.push(response);
            }
            let mut total = 0;
            for r in responses {
                let mut body = r.await.unwrap().into_body();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    total += chunk.len();
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
            }
            total
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let writes = Arc::new(AtomicUsize::new(0));
        let io = CountingIo {
            inner: tcp,
            writes: writes.clone(),
        };
        let mut conn = h2::server::handshake(io).await.unwrap();
        let mut pending = Vec::new();
        while pending.len() < 10 {
            let (_, respond) = conn.accept().await.unwrap().unwrap();
            pending.push(respond);
        }
        // Everything the handshake and the requests needed is written: count from here.
        let before = writes.load(Ordering::Relaxed);
        for mut respond in pending {
            let mut stream = respond
                .send_response(axum::http::Response::new(()), false)
                .unwrap();
            stream
                .send_data(bytes::Bytes::from(vec![b'x'; 300]), true)
                .unwrap();
        }
        let serve = tokio::spawn(async move { while conn.accept().await.is_some() {} });
        assert_eq!(client.await.unwrap(), 3000);
        let answered = writes.load(Ordering::Relaxed) - before;
        serve.abort();
        assert!(
            answered <= 2,
            "ten 300-byte responses took {answered} writes"
        );
    }
}

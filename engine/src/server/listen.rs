//! The accept loop: HTTP/1.1 connections served by hyper with a header
//! timeout, an idle timeout and a cap on open connections (a client past
//! the cap gets a 503 and is closed, never queued).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

/// File descriptors kept free for everything but connections (RocksDB,
/// LMDB, lake files, Kafka sockets).
const RESERVED_FDS: u64 = 512;
/// The default connection cap never goes above this.
const MAX_DEFAULT_CONNECTIONS: u64 = 16_384;

/// Raises the soft limit on open files to the hard limit (once per
/// process) and returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    static RAISED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *RAISED.get_or_init(|| {
        let mut l = getrlimit(Resource::Nofile);
        if let Some(hard) = l.maximum
            && l.current.is_some_and(|c| c < hard)
        {
            l.current = Some(hard);
            if let Err(e) = setrlimit(Resource::Nofile, l) {
                tracing::warn!(error = %e, "could not raise the open-file limit");
            }
        }
        getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
    })
}

/// The default connection cap: the open-file limit (raised to its hard
/// limit) less what the rest of the process needs, at most 16,384.
pub fn default_max_connections() -> usize {
    let soft = raise_fd_limit();
    soft.saturating_sub(RESERVED_FDS)
        .clamp(64, MAX_DEFAULT_CONNECTIONS) as usize
}

/// What the accept loop enforces.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Time to send a request's headers (and idle time between requests).
    pub header_timeout: Duration,
    /// Time without any byte read or written.
    pub idle_timeout: Duration,
}

/// Serves `app` on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, app: Router, limits: ConnLimits) {
    raise_fd_limit();
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors or a reset before accept: wait a
                // moment rather than spin; the loop never ends on it.
                metrics::counter!("sluice_serving_accept_errors_total").increment(1);
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!("sluice_serving_connections_refused_total").increment(1);
            refuse(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let _conn = tokio::spawn(async move {
            metrics::gauge!("sluice_serving_connections").increment(1.0);
            let io = TokioIo::new(IdleIo::new(stream, limits.idle_timeout));
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            if let Err(e) = b.serve_connection(io, TowerToHyperService::new(app)).await {
                tracing::debug!(error = %e, "connection ended");
            }
            metrics::gauge!("sluice_serving_connections").decrement(1.0);
            drop(slot);
        });
    }
}

/// Answers a connection past the cap with 503 and closes it: the answer,
/// the write side shut, what the client sent drained for a moment (so it
/// reads the answer, not a reset), then closed. It holds no slot.
fn refuse(stream: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: 64\r\nConnection: close\r\n\r\n{\"error\":\"too many open connections; retry after Retry-After s\"}";
    // Refusals being answered at once; past them a connection is just closed.
    static CLOSING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    use std::sync::atomic::Ordering::Relaxed;
    if CLOSING.fetch_add(1, Relaxed) >= 256 {
        CLOSING.fetch_sub(1, Relaxed);
        let _ = stream.try_write(BUSY);
        return;
    }
    let _closing = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = stream;
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            stream.write_all(BUSY).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
        CLOSING.fetch_sub(1, Relaxed);
    });
}

/// A stream that fails with `TimedOut` once it has moved no byte for the
/// idle timeout while someone waits on it.
struct IdleIo<S> {
    inner: S,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<S> IdleIo<S> {
    fn new(inner: S, idle: Duration) -> Self {
        IdleIo {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn progressed(&mut self) {
        let at = Instant::now() + self.idle;
        self.timer.as_mut().reset(at);
    }

    /// `Pending`, or the timeout error once the timer has run out.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection idle past --idle-timeout-ms",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.waiting(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
        Poll::Ready(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.waiting(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

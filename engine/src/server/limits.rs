//! What a client may ask of the server: sizes, counts, concurrency per
//! route and deadlines, the hosts it answers to, and the token check.
//! Every limit has a default here and a flag on `sluice run`
//! (`docs/operations.md#limits`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::vector::filter::FilterLimits;

/// The serving limits. [`Default`] holds the documented defaults.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Bytes of a request body (413 past it).
    pub max_body_bytes: usize,
    /// Keys of one batch read (413 past it).
    pub max_batch_keys: usize,
    /// `k` × query vectors of one `/nearest` request (400 past it).
    pub max_nearest_work: usize,
    /// Length and nodes of a `/nearest` filter (400 past them).
    pub filter: FilterLimits,
    /// Requests in progress at once, per route (`get`, `batch`, `nearest`).
    pub concurrency: RouteConcurrency,
    /// How long a request waits for a free slot of its route before the
    /// answer is 503 with `Retry-After`.
    pub queue_timeout: Duration,
    /// Deadline of a request from its arrival (body read, wait and work):
    /// past it the answer is 503 with `Retry-After`.
    pub request_timeout: Duration,
    /// Time a client has to send a request's headers, counted from when
    /// the server waits for them (so it also closes keep-alive connections
    /// idle that long between requests).
    pub header_timeout: Duration,
    /// A connection that reads and writes nothing for this long is closed
    /// (a stalled body upload, a client that stopped reading).
    pub idle_timeout: Duration,
    /// Open connections; a client past the cap gets 503 and is closed.
    pub max_connections: usize,
    /// Hosts the server answers to (`Host` header), see [`HostPolicy`].
    pub allowed_hosts: Option<Vec<String>>,
    /// `/metrics` needs the bearer token too.
    pub auth_metrics: bool,
}

/// Requests in progress at once, per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteConcurrency {
    /// `GET /v1/features/{view}/{key}`.
    pub get: usize,
    /// `POST /v1/features/{view}`.
    pub batch: usize,
    /// `POST /v1/features/{view}/nearest` (exact scans included).
    pub nearest: usize,
}

/// Default cap on requests per route: gets are cheap point reads, batches
/// hold a blocking thread for up to [`ServeLimits::max_batch_keys`] reads,
/// nearest-neighbour queries may scan the whole index.
pub const DEFAULT_CONCURRENCY: RouteConcurrency = RouteConcurrency {
    get: 256,
    batch: 32,
    nearest: 8,
};

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_body_bytes: 2 << 20,
            max_batch_keys: 10_000,
            max_nearest_work: 100_000,
            filter: FilterLimits::default(),
            concurrency: DEFAULT_CONCURRENCY,
            queue_timeout: Duration::from_millis(100),
            request_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: super::listen::default_max_connections(),
            allowed_hosts: None,
            auth_metrics: false,
        }
    }
}

impl ServeLimits {
    /// Limits so large they never bind (the benchmark's baseline).
    pub fn unlimited() -> Self {
        let many = 1 << 20;
        ServeLimits {
            max_body_bytes: usize::MAX,
            max_batch_keys: usize::MAX,
            max_nearest_work: usize::MAX,
            filter: FilterLimits {
                max_bytes: usize::MAX,
                max_nodes: crate::vector::filter::MAX_FILTER_NODES,
            },
            concurrency: RouteConcurrency {
                get: many,
                batch: many,
                nearest: many,
            },
            queue_timeout: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(3600),
            header_timeout: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(3600),
            max_connections: many,
            allowed_hosts: None,
            auth_metrics: false,
        }
    }
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every slot of the route stayed taken for the queue timeout.
    Saturated,
    /// The request's deadline passed.
    Deadline,
}

impl Busy {
    /// The answer's message.
    pub fn message(self, route: &str) -> String {
        match self {
            Busy::Saturated => format!(
                "the server is at its limit of concurrent {route} requests; retry after the Retry-After seconds"
            ),
            Busy::Deadline => format!(
                "the {route} request passed its deadline (--request-timeout-ms); retry after the Retry-After seconds"
            ),
        }
    }
}

/// The slots of one route.
#[derive(Debug, Clone)]
pub struct Gate {
    slots: Arc<Semaphore>,
    queue_timeout: Duration,
}

impl Gate {
    /// A gate of `n` slots.
    pub fn new(n: usize, queue_timeout: Duration) -> Self {
        Gate {
            slots: Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS))),
            queue_timeout,
        }
    }

    /// A slot, waited for at most the queue timeout and never past `deadline`.
    pub async fn enter(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, Busy> {
        if let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(p);
        }
        let now = Instant::now();
        let until = (now + self.queue_timeout).min(deadline);
        let wait = until.saturating_duration_since(now);
        match tokio::time::timeout(wait, Arc::clone(&self.slots).acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) | Err(_) if until >= deadline => Err(Busy::Deadline),
            Ok(Err(_)) | Err(_) => Err(Busy::Saturated),
        }
    }
}

/// The gates of the routes.
#[derive(Debug, Clone)]
pub struct Gates {
    /// Point reads.
    pub get: Gate,
    /// Batch reads.
    pub batch: Gate,
    /// Nearest-neighbour queries.
    pub nearest: Gate,
}

impl Gates {
    /// Gates sized by `limits`.
    pub fn new(limits: &ServeLimits) -> Self {
        let q = limits.queue_timeout;
        Gates {
            get: Gate::new(limits.concurrency.get, q),
            batch: Gate::new(limits.concurrency.batch, q),
            nearest: Gate::new(limits.concurrency.nearest, q),
        }
    }
}

/// Which `Host` headers the server answers (against DNS rebinding: a page
/// on another site that resolves its own name to 127.0.0.1 must not read
/// features from a browser's machine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPolicy {
    /// Any host (bound to a non-loopback address without `--allowed-hosts`).
    Any,
    /// `localhost`, `127.0.0.1`, `[::1]` or the bound address, with no
    /// port or this port.
    Loopback {
        /// The bound port.
        port: u16,
        /// The bound address as a `Host` spells it (`127.0.0.2`, `[::1]`).
        ip: String,
    },
    /// These hosts (`name` or `name:port`, compared without case).
    List(Vec<String>),
}

impl HostPolicy {
    /// The policy of a server bound to `addr` with `--allowed-hosts` `list`.
    pub fn new(addr: std::net::SocketAddr, list: Option<&[String]>) -> Self {
        match list {
            Some(l) if !l.is_empty() => {
                HostPolicy::List(l.iter().map(|h| h.trim().to_ascii_lowercase()).collect())
            }
            _ if addr.ip().is_loopback() => HostPolicy::Loopback {
                port: addr.port(),
                ip: match addr.ip() {
                    std::net::IpAddr::V4(v4) => v4.to_string(),
                    std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                },
            },
            _ => HostPolicy::Any,
        }
    }

    /// Whether a request with this `Host` header is answered. A request
    /// without one (HTTP/1.0 tools; browsers always send it) is.
    pub fn allows(&self, host: Option<&str>) -> bool {
        let Some(host) = host else {
            return true;
        };
        let host = host.trim().to_ascii_lowercase();
        match self {
            HostPolicy::Any => true,
            HostPolicy::Loopback { port, ip } => {
                let (name, p) = split_port(&host);
                (matches!(name, "localhost" | "127.0.0.1" | "[::1]") || name == ip)
                    && p.is_none_or(|p| p == port.to_string())
            }
            HostPolicy::List(list) => {
                let (name, _) = split_port(&host);
                list.iter().any(|h| *h == host || h == name)
            }
        }
    }
}

/// `(name, port)` of a `Host` value (`[::1]:8080`, `localhost`).
fn split_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => (
                &host[..=i],
                host[i + 1..].strip_prefix(':').filter(|p| !p.is_empty()),
            ),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    }
}

/// Compares a presented token with the expected one in time that does
/// not depend on where they differ.
pub fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = (presented.len() != expected.len()) as u8;
    for (i, e) in expected.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(p ^ e);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_servers_answer_loopback_names_only() {
        let p = HostPolicy::new("127.0.0.1:8080".parse().unwrap(), None);
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "LOCALHOST",
        ] {
            assert!(p.allows(Some(ok)), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost:9090",
            "127.0.0.2",
            "localhost.evil",
        ] {
            assert!(!p.allows(Some(bad)), "{bad}");
        }
        assert!(p.allows(None));
        let other = HostPolicy::new("127.0.0.2:8080".parse().unwrap(), None);
        assert!(other.allows(Some("127.0.0.2:8080")));
        assert!(!other.allows(Some("127.0.0.3:8080")));
        let any = HostPolicy::new("0.0.0.0:8080".parse().unwrap(), None);
        assert!(any.allows(Some("features.internal")));
        let list = HostPolicy::new(
            "0.0.0.0:8080".parse().unwrap(),
            Some(&["features.internal".to_string()]),
        );
        assert!(list.allows(Some("features.internal:8080")));
        assert!(!list.allows(Some("other.internal")));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret-longer", b"secret"));
        assert!(!token_matches(b"", b"secret"));
    }

    #[tokio::test]
    async fn a_full_gate_says_saturated_after_its_queue_timeout() {
        let g = Gate::new(1, Duration::from_millis(20));
        let far = Instant::now() + Duration::from_secs(10);
        let held = g.enter(far).await.expect("first");
        let t0 = Instant::now();
        assert_eq!(g.enter(far).await.err(), Some(Busy::Saturated));
        assert!(t0.elapsed() >= Duration::from_millis(20));
        let soon = Instant::now() + Duration::from_millis(5);
        assert_eq!(g.enter(soon).await.err(), Some(Busy::Deadline));
        drop(held);
        assert!(g.enter(far).await.is_ok());
    }
}

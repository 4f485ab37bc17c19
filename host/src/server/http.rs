//! The connection loop both listeners (the API and the admin API) are served by.
//!
//! `axum::serve` cannot bound how long a client takes to send its request, so [`serve`] accepts
//! connections itself and serves each with hyper's HTTP/1 server: TCP_NODELAY on every accepted
//! socket, a header read timeout ([`HttpConfig::read_timeout`]: a request head, or the first
//! byte of one on an idle keep-alive connection, must arrive within it or the connection is
//! closed), and [`body_limit::limit_body`] in front of the router (the body must arrive within the
//! same timeout, and fit the size limit). Each connection is its own task, so idle or slow ones
//! cost a socket and a few KiB, never a worker. When `drain` resolves the listener closes and
//! [`serve`] returns once every connection has finished its requests (hyper-util's graceful
//! shutdown). [`raise_open_file_limit`] lifts the soft limit on open files to the hard one, so
//! a thousand idle connections do not exhaust the descriptors.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use super::body_limit::{BodyLimits, limit_body};

/// Default of [`HttpConfig::read_timeout`].
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`HttpConfig::max_body_bytes`]: 8 MiB, room for a batch of 256 long token-id prompts.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;
/// Default of [`HttpConfig::health_stall_timeout`]: well above the slowest legitimate CPU step
/// (a 2048-token prefill batch of SmolLM2-135M takes about 3 s on 2 cores).
pub const DEFAULT_HEALTH_STALL_TIMEOUT: Duration = Duration::from_secs(20);

/// How `serve` treats clients (`--http-read-timeout`, `--max-request-body-bytes`,
/// `--health-stall-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpConfig {
    /// A request head must arrive within this (the connection is closed otherwise), and its body
    /// within this after the head (a 408 otherwise).
    pub read_timeout: Duration,
    /// The largest request body of the API (a 413 above it).
    pub max_body_bytes: usize,
    /// `GET /health` is a 503 when requests are pending and the engine has not completed a step
    /// for this long.
    pub health_stall_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            read_timeout: DEFAULT_READ_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            health_stall_timeout: DEFAULT_HEALTH_STALL_TIMEOUT,
        }
    }
}

/// Serves `app` on `listener` until `drain` resolves and every connection has closed. Bodies
/// larger than `max_body_bytes` get a 413.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    read_timeout: Duration,
    max_body_bytes: usize,
    drain: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let limits = BodyLimits {
        max_bytes: max_body_bytes,
        read_timeout,
    };
    let app = app
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(limits, limit_body));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    tokio::pin!(drain);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut drain => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                accept_failed(&error).await;
                continue;
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http1.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                // Header read timeouts, resets, malformed requests: the client's business.
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// After a failed `accept`: per-connection errors are skipped; anything else (out of file
/// descriptors) is logged and retried after a pause, as `axum::serve` does.
async fn accept_failed(error: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(%error, "accepting a connection failed; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Binds `host:port`.
pub async fn bind(host: &str, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))
}

/// Raises the soft limit on open files (`ulimit -n`) to the hard limit; returns the limit now
/// in force.
pub fn raise_open_file_limit() -> std::io::Result<libc::rlim_t> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one `rlimit` through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let now = raise_open_file_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur, limit.rlim_max);
        assert_eq!(now, limit.rlim_cur);
    }
}

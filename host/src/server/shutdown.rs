//! Graceful shutdown on SIGINT and SIGTERM.
//!
//! The first signal starts the drain: the listener closes, requests in flight (streams
//! included) run to their end, then the caller shuts the engine down and flushes the step
//! traces, and the process exits 0. A second signal during the drain exits at once with status
//! 130, without waiting for streams or flushing traces, for an operator who cannot wait.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Exit status of a forced exit (a second signal while draining).
pub const FORCED_EXIT_CODE: i32 = 130;

/// Resolves once the drain has started.
#[derive(Debug, Clone)]
pub struct DrainSignal(watch::Receiver<bool>);

impl DrainSignal {
    /// Waits for the first signal.
    pub async fn wait(mut self) {
        // An error means the sender is gone, which only happens at exit: stop waiting.
        let _ = self.0.wait_for(|&draining| draining).await;
    }
}

/// Installs the SIGINT/SIGTERM handlers (call from inside the runtime).
pub fn install() -> std::io::Result<DrainSignal> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let first = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(
            "{first} received: not accepting new connections, draining in-flight requests \
             (send it again to exit at once)"
        );
        let _ = tx.send(true);
        let second = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::warn!("second {second} received: exiting without draining");
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(DrainSignal(rx))
}

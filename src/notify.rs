//! systemd's notify protocol (`Type=notify`): READY once every listener is bound, STOPPING
//! when the drain starts, and WATCHDOG pings when the unit sets `WatchdogSec`. Without
//! `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

pub fn ready(node: &str) {
    send(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("serving as node {node}")),
    ]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// Pings the watchdog at half its interval while the runtime runs (a runtime that stops
/// scheduling stops the pings, and systemd restarts us).
pub fn spawn_watchdog(shutdown: CancellationToken) {
    let Some(every) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (every / 2).max(Duration::from_millis(100));
    tracing::info!(interval = ?every, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => send(&[NotifyState::Watchdog]),
            }
        }
    });
}

//! HTTP APIs: the manager-facing API (vfolder control plane), the client-facing API (users'
//! bytes) and the internal API (health, metrics). Backend.AI wire-compatible.

pub mod client;
pub mod conn;
pub mod error;
pub mod extract;
pub mod internal;
pub mod manager;
pub mod params;
mod probes;
mod scrape;
pub mod serve;
pub mod token;
pub mod zerocopy;

use std::sync::Arc;

use axum::http::Request;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::bgtask::BgTasks;
use crate::config::Config;
use crate::health::Health;
use crate::state::State;
use crate::upload::Uploads;
use crate::volume::Volumes;
use token::Tokens;

pub use crate::{COMPAT_VERSION, VERSION};

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub volumes: Volumes,
    pub state: State,
    pub bgtasks: Arc<BgTasks>,
    pub uploads: Arc<Uploads>,
    pub tokens: Tokens,
    pub manager_secret: Arc<String>,
    pub health: Arc<Health>,
    pub shutdown: CancellationToken,
    /// Caps on zip archives being produced.
    pub archives: Arc<client::archive::ArchiveSlots>,
    /// The storage agent, when `[agent] enabled`.
    pub sessions: Option<Arc<crate::session::SessionManager>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub events: crate::events::Events,
}

/// Request spans carry the method and path but never the query string: client-API tokens
/// travel there and must not end up in logs.
pub fn trace_layer<B>() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    impl Fn(&Request<B>) -> tracing::Span + Clone,
> {
    TraceLayer::new_for_http().make_span_with(|req: &Request<B>| {
        tracing::info_span!(
            "request",
            method = %req.method(),
            path = %req.uri().path(),
        )
    })
}

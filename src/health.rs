//! Health and readiness: Backend.AI's HealthResponse shape, built from a list of checks (state
//! database, volumes, and later Docker and Redis). Every check runs under a timeout, so a hung
//! mount cannot hang `/health`. Gating checks decide `/readyz`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::state::State;
use crate::volume::{VolumeStatus, Volumes};

const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

#[async_trait]
pub trait Check: Send + Sync {
    fn service_group(&self) -> &str;
    fn component_id(&self) -> String;
    /// A failing gating check makes the node not ready.
    fn gating(&self) -> bool;
    async fn check(&self) -> Result<(), String>;
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub service_group: String,
    pub component_id: String,
    pub is_healthy: bool,
    pub last_checked_at: String,
    pub error_message: Option<String>,
    #[serde(skip)]
    pub gating: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Connectivity {
    pub overall_healthy: bool,
    pub connectivity_checks: Vec<CheckResult>,
    pub timestamp: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    pub status: &'static str,
    pub version: String,
    pub component: &'static str,
    pub connectivity: Connectivity,
}

impl HealthReport {
    pub fn ready(&self) -> bool {
        self.connectivity
            .connectivity_checks
            .iter()
            .all(|c| c.is_healthy || !c.gating)
    }
}

fn now_iso() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

struct DbCheck(State);

#[async_trait]
impl Check for DbCheck {
    fn service_group(&self) -> &str {
        "state-db"
    }
    fn component_id(&self) -> String {
        "sqlite".into()
    }
    fn gating(&self) -> bool {
        true
    }
    async fn check(&self) -> Result<(), String> {
        self.0.ping().await.map_err(|e| e.to_string())
    }
}

/// File operations run on tokio's blocking pool. When every thread there is stuck (a hung mount,
/// or anything else that parks threads), no file API can answer, so the node is not ready even
/// though the process is up. The check asks the pool for a no-op and waits briefly.
struct BlockingPoolCheck;

/// How long a no-op may wait for a blocking thread before the pool counts as saturated.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

#[async_trait]
impl Check for BlockingPoolCheck {
    fn service_group(&self) -> &str {
        "io-pool"
    }
    fn component_id(&self) -> String {
        "blocking".into()
    }
    fn gating(&self) -> bool {
        true
    }
    async fn check(&self) -> Result<(), String> {
        match tokio::time::timeout(POOL_WAIT, tokio::task::spawn_blocking(|| ())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no blocking thread free within {POOL_WAIT:?}: file I/O is saturated"
            )),
        }
    }
}

struct VolumeCheck {
    volumes: Volumes,
    name: String,
}

#[async_trait]
impl Check for VolumeCheck {
    fn service_group(&self) -> &str {
        "volume"
    }
    fn component_id(&self) -> String {
        self.name.clone()
    }
    fn gating(&self) -> bool {
        true
    }
    async fn check(&self) -> Result<(), String> {
        // The monitor's cached verdict: no I/O here, so a hung mount cannot hang /health.
        let hw = self
            .volumes
            .hwinfo(&self.name)
            .await
            .map_err(|e| e.to_string())?;
        match hw.status {
            VolumeStatus::Healthy => Ok(()),
            s => Err(format!(
                "{}: {}",
                s.as_str(),
                hw.status_info.unwrap_or_default()
            )),
        }
    }
}

pub struct Health {
    checks: Mutex<Vec<Arc<dyn Check>>>,
}

impl Health {
    pub fn new(state: State, volumes: Volumes) -> Arc<Self> {
        let mut checks: Vec<Arc<dyn Check>> =
            vec![Arc::new(DbCheck(state)), Arc::new(BlockingPoolCheck)];
        for v in volumes.iter() {
            checks.push(Arc::new(VolumeCheck {
                volumes: volumes.clone(),
                name: v.name().to_string(),
            }));
        }
        Arc::new(Health {
            checks: Mutex::new(checks),
        })
    }

    pub fn add(&self, check: Arc<dyn Check>) {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(check);
    }

    pub async fn report(&self) -> HealthReport {
        let checks: Vec<_> = self
            .checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let results = futures::future::join_all(checks.iter().map(|c| async move {
            let r = match tokio::time::timeout(CHECK_TIMEOUT, c.check()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            CheckResult {
                service_group: c.service_group().to_string(),
                component_id: c.component_id(),
                is_healthy: r.is_ok(),
                last_checked_at: now_iso(),
                error_message: r.err(),
                gating: c.gating(),
            }
        }))
        .await;
        let overall = results.iter().all(|r| r.is_healthy);
        HealthReport {
            status: if overall { "ok" } else { "degraded" },
            version: crate::VERSION.to_string(),
            component: "storage-proxy",
            connectivity: Connectivity {
                overall_healthy: overall,
                connectivity_checks: results,
                timestamp: now_iso(),
            },
        }
    }
}

//! Backend.AI service discovery (`backendai-dropin.md` §3.1): the node registers itself as a
//! `storage-proxy` service in the `live` role's database, so the manager's Prometheus HTTP-SD
//! (`/metrics/service_discovery`) lists its `/metrics` address. The hash
//! `service_discovery.storage-proxy.<id>` holds one field per `ServiceMetadata` key, each value
//! JSON-encoded, and expires 180 s after the last of the registrations made every 60 s.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::redis::{CoordError, Redis, Role};

pub const SERVICE_GROUP: &str = "storage-proxy";
const EVERY: Duration = Duration::from_secs(60);
const TTL_SECS: u64 = 180;

/// What the node announces.
#[derive(Debug, Clone)]
pub struct Announce {
    pub node_id: String,
    /// `host:port` of the manager API.
    pub address: String,
    /// `host:port` of the internal listener (`/metrics`).
    pub prometheus_address: String,
}

/// `uuid5(NAMESPACE_DNS, "storage-proxy/<prometheus address>")`, the Python proxy's service id.
pub fn service_id(prometheus_address: &str) -> Uuid {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(Uuid::NAMESPACE_DNS.as_bytes());
    h.update(format!("{SERVICE_GROUP}/{prometheus_address}").as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

pub fn key(id: &Uuid) -> String {
    format!("service_discovery.{SERVICE_GROUP}.{id}")
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The `ServiceMetadata` fields, each as the JSON its field value is stored as.
fn fields(a: &Announce, id: &Uuid, registered: f64) -> Vec<(&'static str, String)> {
    let port = a
        .address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or(0);
    let values: [(&str, Value); 7] = [
        ("id", json!(id.hyphenated().to_string())),
        ("display_name", json!(format!("storage-{}", a.node_id))),
        ("service_group", json!(SERVICE_GROUP)),
        // The API level we speak; our own version is a label.
        ("version", json!(crate::api::COMPAT_VERSION)),
        (
            "endpoint",
            json!({
                "address": a.address,
                "port": port,
                "protocol": "http",
                "prometheus_address": a.prometheus_address,
            }),
        ),
        (
            "health_status",
            json!({"registration_time": registered, "last_heartbeat": now()}),
        ),
        (
            "labels",
            json!({"implementation": "storage-agent", "storage_agent_version": crate::api::VERSION}),
        ),
    ];
    values
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
}

async fn register(
    redis: &Redis,
    a: &Announce,
    id: &Uuid,
    registered: f64,
) -> Result<(), CoordError> {
    let key = key(id);
    let mut p = redis::pipe();
    let hset = p.cmd("HSET").arg(&key);
    for (k, v) in fields(a, id, registered) {
        hset.arg(k).arg(v);
    }
    hset.ignore();
    p.cmd("EXPIRE").arg(&key).arg(TTL_SECS).ignore();
    redis.pipe::<()>(Role::Live, &p).await
}

/// Registers now and every 60 s until shutdown, then removes the registration.
pub fn spawn(redis: Arc<Redis>, a: Announce, shutdown: CancellationToken) {
    let id = service_id(&a.prometheus_address);
    let registered = now();
    tracing::info!(id = %id, address = %a.address, prometheus = %a.prometheus_address, "registering for Backend.AI service discovery");
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            match register(&redis, &a, &id, registered).await {
                Ok(()) if failing => {
                    tracing::info!("service discovery registration works again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "cannot register for service discovery; retrying");
                    failing = true;
                }
                Err(_) => {}
            }
            let wait = if failing {
                Duration::from_secs(5)
            } else {
                EVERY
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            redis.query::<i64>(Role::Live, redis::cmd("DEL").arg(key(&id))),
        )
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_id_is_uuid5_of_the_prometheus_address() {
        // Python: uuid.uuid5(uuid.NAMESPACE_DNS, "storage-proxy/127.0.0.1:16023")
        assert_eq!(
            service_id("127.0.0.1:16023").to_string(),
            "45e62db8-a479-5d70-9b87-32982d22e2d4"
        );
    }
}

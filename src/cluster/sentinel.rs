//! Finding the master of a Sentinel group, as redis-py's `discover_master` (which Backend.AI
//! uses) does: ask each sentinel in turn for `SENTINEL MASTERS` and take the first entry with
//! the service's name that is a master and not subjectively or objectively down.

use std::time::Duration;

use crate::config::RedisServer;

const SENTINEL_TIMEOUT: Duration = Duration::from_secs(2);

/// `host:port` of the current master of `service_name`.
pub async fn discover_master(
    server: &RedisServer,
    sentinels: &[String],
    service_name: &str,
) -> Result<String, String> {
    let password = server
        .sentinel_password
        .as_ref()
        .or(server.password.as_ref());
    let mut errors = Vec::new();
    for s in sentinels {
        match ask(s, password.map(String::as_str), service_name).await {
            Ok(Some(addr)) => return Ok(addr),
            Ok(None) => errors.push(format!("{s}: no healthy master named {service_name:?}")),
            Err(e) => errors.push(format!("{s}: {e}")),
        }
    }
    Err(format!(
        "no sentinel knows a master for {service_name:?} ({})",
        errors.join("; ")
    ))
}

async fn ask(
    sentinel: &str,
    password: Option<&str>,
    service_name: &str,
) -> Result<Option<String>, String> {
    let auth = password
        .map(|p| {
            format!(
                ":{}@",
                percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC)
            )
        })
        .unwrap_or_default();
    let client =
        redis::Client::open(format!("redis://{auth}{sentinel}")).map_err(|e| e.to_string())?;
    let mut conn =
        tokio::time::timeout(SENTINEL_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| "no answer within 2 s".to_string())?
            .map_err(|e| e.to_string())?;
    let masters: Vec<Vec<String>> = tokio::time::timeout(
        SENTINEL_TIMEOUT,
        redis::cmd("SENTINEL").arg("MASTERS").query_async(&mut conn),
    )
    .await
    .map_err(|_| "no answer within 2 s".to_string())?
    .map_err(|e| e.to_string())?;
    for m in masters {
        let field = |k: &str| {
            m.chunks(2)
                .find(|kv| kv.len() == 2 && kv[0] == k)
                .map(|kv| kv[1].as_str())
        };
        if field("name") != Some(service_name) {
            continue;
        }
        let flags = field("flags").unwrap_or_default();
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master") || flags.contains(&"s_down") || flags.contains(&"o_down") {
            continue;
        }
        if let (Some(ip), Some(port)) = (field("ip"), field("port")) {
            return Ok(Some(format!("{ip}:{port}")));
        }
    }
    Ok(None)
}

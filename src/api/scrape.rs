//! `GET /metrics` on the internal listener: what lives elsewhere (uploads, sessions, capacity,
//! volumes, mounts, health checks, the event queue) is read into `Metrics` when Prometheus
//! scrapes, so it can never drift from what the daemon reports elsewhere; then the registry is
//! sent in the format the scraper asked for.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use sqlx::Row;

use super::AppState;
use crate::metrics::{
    CheckLabels, Metrics, MountKey, PidLabel, SessionLabels, StateLabel, VolumeLabels, VolumeStatus,
};

/// Refreshes what is read at scrape time, then renders everything.
async fn render(m: &Metrics, st: &AppState) -> String {
    let pool = st.state.pool();
    let grouped = |sql: &'static str| async move {
        sqlx::query(sql)
            .fetch_all(pool)
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    m.uploads.clear();
    for (state, n) in grouped("SELECT state, COUNT(*) FROM uploads GROUP BY state").await {
        m.uploads.get_or_create(&StateLabel { state }).set(n);
    }
    m.bgtasks.clear();
    for (state, n) in grouped("SELECT status, COUNT(*) FROM bgtasks GROUP BY status").await {
        m.bgtasks.get_or_create(&StateLabel { state }).set(n);
    }
    m.mount_holders.clear();
    for (key, n) in grouped(
        "SELECT m.key, COUNT(h.holder) FROM fuse_mounts m
         LEFT JOIN fuse_mount_holders h ON h.key = m.key GROUP BY m.key",
    )
    .await
    {
        m.mount_holders.get_or_create(&MountKey { key }).set(n);
    }
    m.sessions.clear();
    m.capacity.clear();
    if let Some(sessions) = &st.sessions {
        if let Ok(list) = sessions.list(&Default::default()).await {
            for s in list {
                m.sessions
                    .get_or_create(&SessionLabels {
                        kind: s.kind.as_str().to_string(),
                        state: s.state.as_str().to_string(),
                    })
                    .inc();
            }
        }
        if let Ok(c) = sessions.capacity().await {
            for (state, n) in [
                ("max", c.max_containers),
                ("running", c.running),
                ("starting", c.starting),
                ("available", c.available),
            ] {
                m.capacity
                    .get_or_create(&StateLabel {
                        state: state.into(),
                    })
                    .set(n as i64);
            }
        }
    }
    m.volume_status.clear();
    m.volume_bytes.clear();
    for v in st.volumes.iter() {
        let hw = st.volumes.hwinfo(v.name()).await.ok();
        if let Some(hw) = &hw {
            m.volume_status
                .get_or_create(&VolumeStatus {
                    volume: v.name().into(),
                    status: hw.status.as_str().into(),
                })
                .set(1);
        }
        // A remote volume resting unmounted is not mounted just to be measured.
        let resting = hw
            .as_ref()
            .and_then(|h| h.metadata.get("mounted"))
            .is_some_and(|m| m == "false");
        if resting || st.volumes.get(v.name()).is_err() {
            continue;
        }
        if let Ok(Ok(u)) =
            tokio::time::timeout(std::time::Duration::from_secs(2), v.fs_usage()).await
        {
            for (kind, n) in [
                ("capacity", u.capacity_bytes),
                ("used", u.used_bytes),
                ("available", u.available_bytes),
            ] {
                m.volume_bytes
                    .get_or_create(&VolumeLabels {
                        volume: v.name().into(),
                        kind: kind.into(),
                    })
                    .set(n.min(i64::MAX as u64) as i64);
            }
        }
    }
    m.checks.clear();
    for c in st.health.report().await.connectivity.connectivity_checks {
        m.checks
            .get_or_create(&CheckLabels {
                service_group: c.service_group,
                component_id: c.component_id,
            })
            .set(c.is_healthy as i64);
    }
    m.events_queued.set(st.events.queued() as i64);
    process(m);
    m.encode()
}

/// The process's own numbers, as Backend.AI's `SystemMetricObserver` takes them with psutil:
/// live tasks, CPU percent since the last scrape (100 = one core), RSS and VMS bytes.
fn process(m: &Metrics) {
    let pid = PidLabel {
        pid: std::process::id().to_string(),
    };
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    m.async_tasks.get_or_create(&pid).set(tasks as i64);
    // statm: sizes in pages (VMS first, RSS second).
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as i64;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        let mut f = statm
            .split_whitespace()
            .map(|v| v.parse::<i64>().unwrap_or(0));
        let (vms, rss) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
        m.memory_vms.get_or_create(&pid).set(vms * page);
        m.memory_rss.get_or_create(&pid).set(rss * page);
    }
    heap(m);
    // stat: utime and stime (fields 14 and 15, after the parenthesised command name).
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        });
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    if let Some(ticks) = ticks {
        let now = std::time::Instant::now();
        let mut last = m.cpu_last.lock().unwrap_or_else(|p| p.into_inner());
        let percent = match *last {
            Some((at, before)) if now > at => {
                let cpu = ticks.saturating_sub(before) as f64 / hz;
                100.0 * cpu / now.duration_since(at).as_secs_f64()
            }
            // psutil's first call says 0 too.
            _ => 0.0,
        };
        *last = Some((now, ticks));
        m.cpu_percent.get_or_create(&pid).set(percent);
    }
}

/// `GET /metrics`: OpenMetrics for a scraper that asks for it (`Accept:
/// application/openmetrics-text`, as Prometheus does), else the 0.0.4 text format, each body
/// in the format its Content-Type names.
pub async fn handler(State(st): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let body = render(&st.metrics, &st).await;
    let (content_type, body) = if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            openmetrics_to_text(&body),
        )
    };
    ([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response()
}

/// The 0.0.4 text format of an OpenMetrics exposition (what prometheus_client writes): a
/// counter family is named as its `_total` samples, `# UNIT` and `# EOF` go, `unknown` is
/// `untyped`. Everything else (gauges, histograms, labels, values) reads the same in both.
fn openmetrics_to_text(om: &str) -> String {
    use std::collections::HashSet;
    let counters: HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                let tail = if p == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                };
                out.push_str(&format!("{p}{name} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// What glibc's allocator holds: in use (the program's) and free but kept (its arenas). RSS
/// that grows while "in_use" stays flat is memory kept for reuse, not a leak.
fn heap(m: &Metrics) {
    let Some(h) = crate::allocator::heap() else {
        return;
    };
    let set = |state: &str, v: usize| {
        m.heap
            .get_or_create(&StateLabel {
                state: state.to_string(),
            })
            .set(v as i64)
    };
    set("in_use", h.in_use);
    set("free", h.free);
}

#[cfg(test)]
mod tests {
    use super::openmetrics_to_text;

    #[test]
    fn openmetrics_becomes_the_0_0_4_text_format() {
        let om = "# HELP reqs Requests.\n# TYPE reqs counter\nreqs_total{method=\"GET\"} 3\n\
                  # HELP lat Latency.\n# TYPE lat histogram\n# UNIT lat seconds\n\
                  lat_bucket{le=\"+Inf\"} 1\nlat_sum 0.5\nlat_count 1\n\
                  # HELP g Gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP reqs_total Requests.\n# TYPE reqs_total counter\nreqs_total{method=\"GET\"} 3\n\
             # HELP lat Latency.\n# TYPE lat histogram\n\
             lat_bucket{le=\"+Inf\"} 1\nlat_sum 0.5\nlat_count 1\n\
             # HELP g Gauge.\n# TYPE g gauge\ng 2\n"
        );
    }
}

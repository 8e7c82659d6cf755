//! How many more containers this node can host, Kubernetes-allocatable style: the configured
//! maximum, bounded by host memory and CPU after a reserve (with overcommit, since limits are
//! caps and not reservations) and by free ports in the port range.

use std::collections::HashSet;
use std::net::IpAddr;

use super::{Kind, Session, State};
use crate::config::agent::AgentConfig;

#[derive(Debug, Clone, PartialEq)]
pub struct KindCounts {
    pub kind: Kind,
    pub running: u32,
    pub starting: u32,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostHeadroom {
    pub memory_total: u64,
    pub memory_available: u64,
    pub cpus: f64,
    pub memory_reserved: u64,
    pub cpus_reserved: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    pub node_id: String,
    pub max_containers: u32,
    pub configured_max: u32,
    pub running: u32,
    pub starting: u32,
    pub available: u32,
    /// Which bound decides `max_containers`: "config", "memory", "cpu" or "ports".
    pub bounded_by: &'static str,
    pub kinds: Vec<KindCounts>,
    pub host: HostHeadroom,
}

impl HostHeadroom {
    pub fn read(cfg: &AgentConfig) -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| -> u64 {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .map(|kib| kib * 1024)
                .unwrap_or(0)
        };
        HostHeadroom {
            memory_total: field("MemTotal:"),
            memory_available: field("MemAvailable:"),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as f64)
                .unwrap_or(1.0),
            memory_reserved: cfg.reserve_memory,
            cpus_reserved: cfg.reserve_cpus,
        }
    }
}

/// Ports in `range` that something other than our sessions listens on (from /proc/net/tcp{,6}).
pub fn foreign_listeners(range: (u16, u16), ours: &HashSet<u16>) -> u32 {
    let mut found = HashSet::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let mut cols = line.split_whitespace();
            let (Some(local), Some(_remote), Some(state)) = (cols.nth(1), cols.next(), cols.next())
            else {
                continue;
            };
            // 0A = LISTEN
            if state != "0A" {
                continue;
            }
            let Some(port) = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            else {
                continue;
            };
            if (range.0..=range.1).contains(&port) && !ours.contains(&port) {
                found.insert(port);
            }
        }
    }
    found.len() as u32
}

pub fn compute(
    cfg: &AgentConfig,
    node_id: &str,
    live: &[Session],
    host: HostHeadroom,
    foreign_ports: u32,
) -> Capacity {
    let d = cfg.default_limits;
    let usable_mem = host.memory_total.saturating_sub(cfg.reserve_memory) as f64;
    let usable_cpu = (host.cpus - cfg.reserve_cpus).max(0.0);
    let bounds = [
        ("config", cfg.max_containers as f64),
        (
            "memory",
            (usable_mem * cfg.memory_overcommit / d.memory as f64).floor(),
        ),
        ("cpu", (usable_cpu * cfg.cpu_overcommit / d.cpus).floor()),
        (
            "ports",
            cfg.port_count().saturating_sub(foreign_ports) as f64,
        ),
    ];
    let (bounded_by, max) =
        bounds.iter().copied().fold(
            ("config", f64::INFINITY),
            |acc, b| if b.1 < acc.1 { b } else { acc },
        );
    let max = max.max(0.0).min(u32::MAX as f64) as u32;
    let mut kinds = Vec::new();
    for kind in [Kind::Sftp, Kind::Filebrowser] {
        let of_kind = live.iter().filter(|s| s.kind == kind);
        kinds.push(KindCounts {
            kind,
            running: of_kind
                .clone()
                .filter(|s| matches!(s.state, State::Running | State::Terminating))
                .count() as u32,
            starting: of_kind.filter(|s| s.state == State::Starting).count() as u32,
        });
    }
    let running = kinds.iter().map(|k| k.running).sum();
    let starting = kinds.iter().map(|k| k.starting).sum();
    Capacity {
        node_id: node_id.to_string(),
        max_containers: max,
        configured_max: cfg.max_containers,
        running,
        starting,
        available: max.saturating_sub(running + starting),
        bounded_by,
        kinds,
        host,
    }
}

/// The lowest port of the range that no live session holds and that can be bound right now.
pub fn pick_port(range: (u16, u16), addr: IpAddr, held: &HashSet<u16>) -> Option<u16> {
    (range.0..=range.1)
        .filter(|p| !held.contains(p))
        .find(|p| std::net::TcpListener::bind((addr, *p)).is_ok())
}

//! A small typed reader over a parsed TOML table that records every problem (key path, bad value,
//! what is allowed) instead of stopping at the first one, and flags keys nobody asked for.
//! serde stops at the first error, which would make `config check` report one problem per run.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (allowed: {})",
            self.key, self.value, self.allowed
        )
    }
}

/// Collects problems across all sections of one configuration, and warnings: what is accepted
/// but worth an operator's attention (printed by `config check`, logged at start).
#[derive(Default)]
pub struct Problems(RefCell<Vec<Problem>>, RefCell<Vec<String>>);

impl Problems {
    pub fn warn(&self, text: impl Into<String>) {
        self.1.borrow_mut().push(text.into());
    }

    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut self.1.borrow_mut())
    }

    pub fn push(
        &self,
        key: impl Into<String>,
        value: impl Into<String>,
        allowed: impl Into<String>,
    ) {
        self.0.borrow_mut().push(Problem {
            key: key.into(),
            value: value.into(),
            allowed: allowed.into(),
        });
    }

    pub fn into_vec(self) -> Vec<Problem> {
        self.0.into_inner()
    }

    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }
}

/// Keys are compared in kebab-case; `node_id` and `node-id` are the same key.
pub fn normalize_key(key: &str) -> String {
    key.replace('_', "-")
}

/// Shows a TOML value the way the operator wrote it, shortened.
pub fn show(value: &Value) -> String {
    let s = match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    if s.len() > 120 {
        format!("{}…", &s[..s.floor_char_boundary(117)])
    } else {
        s
    }
}

pub struct Section<'a> {
    path: String,
    table: Option<&'a toml::Table>,
    used: RefCell<BTreeSet<String>>,
    problems: &'a Problems,
    /// Relative paths are relative to this directory: the config file's, as in Backend.AI.
    base: &'a Path,
}

impl<'a> Section<'a> {
    pub fn root(table: &'a toml::Table, problems: &'a Problems, base: &'a Path) -> Self {
        Section {
            path: String::new(),
            table: Some(table),
            used: RefCell::default(),
            problems,
            base,
        }
    }

    fn child(&self, path: String, table: Option<&'a toml::Table>) -> Section<'a> {
        Section {
            path,
            table,
            used: RefCell::default(),
            problems: self.problems,
            base: self.base,
        }
    }

    /// The first of several spellings of one key that is present (Backend.AI's aliases).
    pub fn first_of<'k>(&self, keys: &[&'k str]) -> &'k str {
        keys.iter()
            .copied()
            .find(|k| self.get(k).is_some())
            .unwrap_or(keys[0])
    }

    pub fn name(&self) -> &str {
        &self.path
    }

    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    pub fn problems(&self) -> &'a Problems {
        self.problems
    }

    /// Raw access; marks the key as used. Both spellings of a key are looked up, and giving both
    /// is itself a problem.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        let table = self.table?;
        self.used.borrow_mut().insert(key.to_string());
        let mut found = None;
        for (k, v) in table {
            if normalize_key(k) == key {
                if found.is_some() {
                    self.problems.push(
                        self.key_path(key),
                        "given twice (kebab-case and snake_case)",
                        "one spelling of each key",
                    );
                }
                found = Some(v);
            }
        }
        found
    }

    fn bad(&self, key: &str, value: &Value, allowed: &str) {
        self.problems.push(self.key_path(key), show(value), allowed);
    }

    pub fn section(&self, key: &str) -> Section<'a> {
        let table = match self.get(key) {
            None => None,
            Some(Value::Table(t)) => Some(t),
            Some(other) => {
                self.bad(key, other, "a table");
                None
            }
        };
        self.child(self.key_path(key), table)
    }

    /// The sub-tables of a map section such as `[volume.<name>]`, names kept verbatim.
    pub fn named_sections(&self, key: &str) -> Vec<(String, Section<'a>)> {
        let Some(value) = self.get(key) else {
            return Vec::new();
        };
        let Value::Table(map) = value else {
            self.bad(key, value, "a table of named tables");
            return Vec::new();
        };
        let base = self.key_path(key);
        map.iter()
            .filter_map(|(name, v)| match v {
                Value::Table(t) => {
                    Some((name.clone(), self.child(format!("{base}.{name}"), Some(t))))
                }
                other => {
                    self.problems
                        .push(format!("{base}.{name}"), show(other), "a table");
                    None
                }
            })
            .collect()
    }

    /// A free-form table (backend options) passed through untouched.
    pub fn raw_table(&self, key: &str) -> toml::Table {
        match self.get(key) {
            None => toml::Table::new(),
            Some(Value::Table(t)) => t.clone(),
            Some(other) => {
                self.bad(key, other, "a table");
                toml::Table::new()
            }
        }
    }

    pub fn opt_string(&self, key: &str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.bad(key, other, "a string");
                None
            }
        }
    }

    pub fn string(&self, key: &str, default: &str) -> String {
        self.opt_string(key).unwrap_or_else(|| default.to_string())
    }

    /// A string from a fixed set of choices.
    pub fn choice(&self, key: &str, choices: &[&str], default: &str) -> String {
        match self.get(key) {
            None => default.to_string(),
            Some(Value::String(s)) if choices.contains(&s.as_str()) => s.clone(),
            Some(other) => {
                self.bad(key, other, &format!("one of {}", choices.join(", ")));
                default.to_string()
            }
        }
    }

    /// A boolean; also Backend.AI's (pydantic's) spellings: 0/1 and the words true/false,
    /// yes/no, on/off, t/f, y/n in any case.
    pub fn bool(&self, key: &str, default: bool) -> bool {
        let Some(v) = self.get(key) else {
            return default;
        };
        let b = match v {
            Value::Boolean(b) => Some(*b),
            Value::Integer(0) => Some(false),
            Value::Integer(1) => Some(true),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "t" | "y" | "1" => Some(true),
                "false" | "no" | "off" | "f" | "n" | "0" => Some(false),
                _ => None,
            },
            _ => None,
        };
        b.unwrap_or_else(|| {
            self.bad(key, v, "true or false");
            default
        })
    }

    /// An integer; also a numeric string ("1_000", " 1000 ") or an integral float, as pydantic
    /// takes them.
    pub fn int_in(&self, key: &str, min: i64, max: i64, default: i64) -> i64 {
        let Some(v) = self.get(key) else {
            return default;
        };
        match lax_int(v) {
            Some(i) if (min..=max).contains(&i) => i,
            _ => {
                self.bad(key, v, &format!("an integer from {min} to {max}"));
                default
            }
        }
    }

    pub fn float_in(&self, key: &str, min: f64, max: f64, default: f64) -> f64 {
        let v = match self.get(key) {
            None => return default,
            Some(v) => v,
        };
        let f = match v {
            Value::Float(f) => Some(*f),
            Value::Integer(i) => Some(*i as f64),
            _ => None,
        };
        match f {
            Some(f) if f >= min && f <= max => f,
            _ => {
                self.bad(key, v, &format!("a number from {min} to {max}"));
                default
            }
        }
    }

    /// A byte size: an integer, or a string like "100g", "512M", "1.5t" (binary units).
    pub fn size(&self, key: &str, default: u64) -> u64 {
        match self.get(key) {
            None => default,
            Some(Value::Integer(i)) if *i >= 0 => *i as u64,
            Some(v @ Value::String(s)) => parse_size(s).unwrap_or_else(|| {
                self.bad(key, v, "a byte size such as 1048576, \"512m\", \"100g\"");
                default
            }),
            Some(other) => {
                self.bad(
                    key,
                    other,
                    "a byte size such as 1048576, \"512m\", \"100g\"",
                );
                default
            }
        }
    }

    #[allow(dead_code)]
    pub fn opt_size(&self, key: &str) -> Option<u64> {
        self.get(key)?;
        Some(self.size(key, 0))
    }

    /// A duration: integer seconds, or a string like "30s", "15m", "1h", "1d", "1w".
    pub fn duration(&self, key: &str, default: Duration) -> Duration {
        match self.get(key) {
            None => default,
            Some(Value::Integer(i)) if *i >= 0 => Duration::from_secs(*i as u64),
            Some(Value::Float(f)) if *f >= 0.0 && f.is_finite() => Duration::from_secs_f64(*f),
            Some(v @ Value::String(s)) => parse_duration(s).unwrap_or_else(|| {
                self.bad(
                    key,
                    v,
                    "a duration such as 30, \"30s\", \"15m\", \"1h\", \"1d\"",
                );
                default
            }),
            Some(other) => {
                self.bad(
                    key,
                    other,
                    "a duration such as 30, \"30s\", \"15m\", \"1h\", \"1d\"",
                );
                default
            }
        }
    }

    /// A listen address in any of Backend.AI's forms (see [`host_port`]), resolved once.
    pub fn addr(&self, key: &str, default: &str) -> SocketAddr {
        let fallback = || default.parse().expect("default addresses are valid");
        let Some(v) = self.get(key) else {
            return fallback();
        };
        let resolved = host_port(v).and_then(|(host, port)| {
            // A blank host is every interface, as in Backend.AI.
            let host = if host.is_empty() { "0.0.0.0" } else { &host };
            resolve_addr(&join_host_port(host, port))
        });
        match resolved {
            Some(a) => a,
            None => {
                self.bad(key, v, ADDR_FORMS);
                fallback()
            }
        }
    }

    /// An address announced to others (service discovery): Backend.AI's forms, not resolved
    /// here (it is the name others use, e.g. `host.docker.internal`); a port is required.
    pub fn announce_addr(&self, key: &str) -> Option<String> {
        let v = self.get(key)?;
        match host_port(v) {
            Some((host, port)) if !host.is_empty() && port != 0 => {
                Some(join_host_port(&host, port))
            }
            _ => {
                self.bad(key, v, ADDR_FORMS);
                None
            }
        }
    }

    pub fn opt_path(&self, key: &str) -> Option<PathBuf> {
        self.opt_string(key)
            .map(|s| absolutize(Path::new(&s), self.base))
    }

    pub fn path(&self, key: &str, default: &str) -> PathBuf {
        self.opt_path(key)
            .unwrap_or_else(|| absolutize(Path::new(default), self.base))
    }

    /// Reports keys of this section nobody read: typos must not pass silently.
    pub fn finish(self, known_elsewhere: &[&str]) {
        self.finish_with(known_elsewhere, false)
    }

    /// For Backend.AI's own sections: an unknown key is a warning, as in the Python proxy
    /// (its files may carry keys of other versions).
    pub fn finish_lenient(self) {
        self.finish_with(&[], true)
    }

    fn finish_with(self, known_elsewhere: &[&str], lenient: bool) {
        let Some(table) = self.table else { return };
        let used = self.used.borrow();
        for (k, v) in table {
            let nk = normalize_key(k);
            if used.contains(&nk) || known_elsewhere.contains(&nk.as_str()) {
                continue;
            }
            if lenient {
                self.problems.warn(format!(
                    "{}: unknown key (value {}), ignored",
                    self.key_path(k),
                    show(v)
                ));
                continue;
            }
            self.problems.push(
                self.key_path(k),
                format!("unknown key (value {})", show(v)),
                format!(
                    "the keys documented for [{}] in configs/storage-agent.toml",
                    if self.path.is_empty() {
                        "top level"
                    } else {
                        &self.path
                    }
                ),
            );
        }
    }
}

const ADDR_FORMS: &str =
    "\"host:port\", {host = \"...\", port = N}, or [\"host\", N]; port 0-65535";

/// Backend.AI's HostPortPair: `"host:port"` (split at the last `:`, an IPv6 host in
/// brackets), `{host = "h", port = N}` (the port may be a string), or `["h", N]`. The host may
/// be blank (`":6021"`).
pub fn host_port(v: &Value) -> Option<(String, u16)> {
    let port = |p: &Value| -> Option<u16> { u16::try_from(lax_int(p)?).ok() };
    let (host, port) = match v {
        Value::String(s) => {
            let (h, p) = s.trim().rsplit_once(':')?;
            (h.to_string(), p.trim().parse::<u16>().ok()?)
        }
        Value::Table(t) => (t.get("host")?.as_str()?.to_string(), port(t.get("port")?)?),
        Value::Array(a) if a.len() == 2 => (a[0].as_str()?.to_string(), port(&a[1])?),
        _ => return None,
    };
    let host = host.trim();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host.to_string(), port))
}

/// `host:port`, with an IPv6 host in brackets.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An integer as pydantic's lax mode takes it: an integer, an integral float, or a numeric
/// string with `_` separators and surrounding blanks.
fn lax_int(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(*f as i64),
        Value::String(s) => {
            let t: String = s.trim().chars().filter(|c| *c != '_').collect();
            t.parse().ok()
        }
        _ => None,
    }
}

fn resolve_addr(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    // Host names ("localhost:6021") resolve once at load time.
    s.to_socket_addrs().ok()?.next()
}

/// Relative config paths are relative to `base` (the config file's directory, as in
/// Backend.AI); "." components are dropped so logs and `/volumes` show clean paths. ".." is
/// kept (it may cross a symlink).
pub fn absolutize(p: &Path, base: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    joined
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// "100g" → 100 GiB. Backend.AI's BinarySize: case-insensitive k/m/g/t/p/e suffixes, optional
/// trailing "b", "ib", "byte(s)" or "ibyte(s)", `_` separators, fractional numbers allowed.
pub fn parse_size(s: &str) -> Option<u64> {
    let t: String = s
        .trim()
        .to_ascii_lowercase()
        .chars()
        .filter(|c| *c != '_')
        .collect();
    let t = ["ibytes", "ibyte", "ib", "bytes", "byte", "b"]
        .iter()
        .find_map(|end| t.strip_suffix(end))
        .unwrap_or(&t)
        .trim_end();
    let (num, mult) = match t.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let exp = match c {
                'k' => 1,
                'm' => 2,
                'g' => 3,
                't' => 4,
                'p' => 5,
                'e' => 6,
                _ => return None,
            };
            (&t[..i], 1024f64.powi(exp))
        }
        _ => (t, 1.0),
    };
    let n: f64 = num.trim().parse().ok()?;
    let bytes = n * mult;
    (n.is_finite() && n >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// "1h" → 3600 s. Units: ms, s, m, h, d, w, mo (30 d), yr (365 d); a bare number is seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" | "mins" => 60.0,
        "h" | "hr" | "hrs" => 3600.0,
        "d" => 86400.0,
        "w" => 7.0 * 86400.0,
        "mo" => 30.0 * 86400.0,
        "yr" | "y" => 365.0 * 86400.0,
        _ => return None,
    };
    let total = n * secs;
    (n.is_finite() && n >= 0.0 && total < 1e12).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100g"), Some(100 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1.5k"), Some(1536));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("42"), Some(42));
        assert_eq!(parse_size("1_000"), Some(1000));
        assert_eq!(parse_size("100gbytes"), Some(100 << 30));
        assert_eq!(parse_size("100 b"), Some(100));
        assert_eq!(parse_size("-1g"), None);
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn host_port_forms_of_backend_ai() {
        let v = |s: &str| -> Value { toml::from_str::<toml::Table>(s).unwrap()["x"].clone() };
        let hp = |s: &str| host_port(&v(s));
        assert_eq!(hp(r#"x = "h:1""#), Some(("h".into(), 1)));
        assert_eq!(hp(r#"x = "[::1]:2""#), Some(("::1".into(), 2)));
        assert_eq!(hp(r#"x = ":3""#), Some(("".into(), 3)));
        assert_eq!(hp(r#"x = {host = "h", port = "4"}"#), Some(("h".into(), 4)));
        assert_eq!(hp(r#"x = ["h", 5]"#), Some(("h".into(), 5)));
        assert_eq!(hp(r#"x = "nohost""#), None);
        assert_eq!(hp(r#"x = "h:70000""#), None);
        assert_eq!(join_host_port("::1", 7), "[::1]:7");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("2mo"), Some(Duration::from_secs(60 * 86400)));
        assert_eq!(parse_duration("1 fortnight"), None);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let t: toml::Table = toml::from_str(
            "[a]\nsize = \"big\"\nflag = 3\ntypo = 1\nnode_id = \"x\"\nnode-id = \"y\"\n",
        )
        .unwrap();
        let p = Problems::default();
        let root = Section::root(&t, &p, Path::new("/"));
        let a = root.section("a");
        a.size("size", 1);
        a.bool("flag", false);
        a.opt_string("node-id");
        a.finish(&[]);
        root.finish(&[]);
        let keys: Vec<_> = p.into_vec().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["a.size", "a.flag", "a.node-id", "a.typo"]);
    }
}

//! How `ctl` answers: human tables or JSON on stdout, errors on stderr with the server's problem
//! detail, and exit codes a script can act on.

use std::fmt;

use serde_json::Value;

/// Exit codes: 0 success; these otherwise.
pub mod exit {
    /// Bad arguments or a config that cannot be used.
    pub const USAGE: u8 = 2;
    /// The server refused the request (4xx).
    pub const REFUSED: u8 = 3;
    /// The server failed or could not be reached (5xx, connection errors, timeouts).
    pub const UNAVAILABLE: u8 = 4;
    /// A transfer stopped part way; running the same command again resumes it.
    pub const INTERRUPTED: u8 = 5;
}

#[derive(Debug)]
pub struct CtlError {
    pub code: u8,
    pub message: String,
    /// The server's problem document, when it sent one.
    pub problem: Option<Value>,
}

impl CtlError {
    pub fn usage(m: impl Into<String>) -> Self {
        CtlError {
            code: exit::USAGE,
            message: m.into(),
            problem: None,
        }
    }

    pub fn unavailable(m: impl Into<String>) -> Self {
        CtlError {
            code: exit::UNAVAILABLE,
            message: m.into(),
            problem: None,
        }
    }

    pub fn interrupted(m: impl Into<String>) -> Self {
        CtlError {
            code: exit::INTERRUPTED,
            message: m.into(),
            problem: None,
        }
    }

    /// An error answer: its problem detail (`title: msg`) or Backend.AI's `{"msg"}` body.
    pub fn from_answer(status: u16, body: &[u8]) -> Self {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let said = parsed
            .as_ref()
            .map(|v| {
                let title = v["title"].as_str().unwrap_or("");
                let msg = v["msg"].as_str().or(v["detail"].as_str()).unwrap_or("");
                match (title, msg) {
                    ("", "") => v.to_string(),
                    (t, "") => t.to_string(),
                    ("", m) => m.to_string(),
                    (t, m) => format!("{t}: {m}"),
                }
            })
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
        CtlError {
            code: if status >= 500 {
                exit::UNAVAILABLE
            } else {
                exit::REFUSED
            },
            message: format!("{status}: {said}"),
            problem: parsed,
        }
    }
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub type Result<T, E = CtlError> = std::result::Result<T, E>;

/// Prints rows as an aligned table (humans) or the value as JSON (scripts).
pub struct Out {
    pub json: bool,
}

impl Out {
    pub fn value(&self, v: &Value, human: impl FnOnce(&Value)) {
        if self.json {
            println!("{v}");
        } else {
            human(v);
        }
    }

    pub fn error(&self, e: &CtlError) {
        if self.json {
            eprintln!(
                "{}",
                serde_json::json!({"error": e.message, "exit_code": e.code, "problem": e.problem})
            );
        } else {
            eprintln!("error: {e}");
        }
    }
}

/// Columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// 1536 → "1.5 KiB".
pub fn size(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

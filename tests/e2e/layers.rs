//! The module layers import only downwards: `config/` imports none of the others, `volume/`
//! only `config/`, `metrics.rs` and `health.rs` nothing of `api/`, and within `api/` the
//! client and manager APIs neither import each other nor the internal listener's module.
//! Read from the sources, so a new cycle fails here, not in review.

use std::path::{Path, PathBuf};

fn sources(under: &Path) -> Vec<PathBuf> {
    if under.is_file() {
        return vec![under.to_path_buf()];
    }
    let mut out = Vec::new();
    let mut stack = vec![under.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// (file, line) of every use of one of `forbidden` (paths like `crate::api`) under `module`.
fn uses(module: &str, forbidden: &[&str]) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for f in sources(&src.join(module)) {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if forbidden.iter().any(|p| code.contains(p)) {
                found.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn modules_import_only_downwards() {
    let rules: &[(&str, &[&str])] = &[
        (
            "config",
            &[
                "crate::api",
                "crate::volume",
                "crate::metrics",
                "crate::health",
                "crate::session",
            ],
        ),
        (
            "volume",
            &[
                "crate::api",
                "crate::metrics",
                "crate::health::",
                "crate::session",
            ],
        ),
        ("metrics.rs", &["crate::api"]),
        ("health.rs", &["crate::api"]),
        (
            "api/manager",
            &[
                "api::internal",
                "super::internal",
                "api::client",
                "super::client",
            ],
        ),
        (
            "api/client",
            &["api::manager", "super::manager", "api::internal"],
        ),
    ];
    let wrong: Vec<String> = rules
        .iter()
        .flat_map(|(module, forbidden)| uses(module, forbidden))
        .collect();
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

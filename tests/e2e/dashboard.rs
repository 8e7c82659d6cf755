//! docs/grafana-dashboard.json against Grafana's own dashboard schema: `@grafana/schema` (the
//! TypeScript types Grafana generates from its CUE schema) checked by `tsc`, with the dashboard
//! as an object literal so unknown keys are refused too. (Which metric families it queries is
//! checked by the unit test in src/metrics.rs.)

use std::path::{Path, PathBuf};
use std::process::Command;

fn schema_dir() -> PathBuf {
    let cache = std::env::var("SA_CACHE").unwrap_or_else(|_| {
        format!(
            "{}/.cache/storage-agent",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let dir = PathBuf::from(cache).join("grafana-schema");
    assert!(
        dir.join("node_modules/.bin/tsc").exists()
            && dir.join("node_modules/@grafana/schema").exists(),
        "Grafana's schema and tsc are required: scripts/testenv.sh grafana-schema (npm install \
         @grafana/schema typescript into {})",
        dir.display()
    );
    dir
}

/// tsc's verdict on `dashboard` as a `Dashboard`: Ok, or its errors.
fn type_check(schema: &Path, dashboard: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(schema.join("node_modules"), dir.path().join("node_modules"))
        .unwrap();
    let file = dir.path().join("check.ts");
    std::fs::write(
        &file,
        format!(
            "import type {{ Dashboard }} from '@grafana/schema';\n\
             export const dashboard: Dashboard = {dashboard};\n"
        ),
    )
    .unwrap();
    let out = Command::new("timeout")
        .arg("300")
        .arg(schema.join("node_modules/.bin/tsc"))
        .args([
            "--noEmit",
            "--strict",
            "--skipLibCheck",
            "--target",
            "es2022",
        ])
        .args(["--module", "esnext", "--moduleResolution", "bundler"])
        .arg(&file)
        .current_dir(dir.path())
        .output()
        .expect("tsc");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[test]
fn the_grafana_dashboard_follows_grafanas_own_schema() {
    let schema = schema_dir();
    let ours = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana-dashboard.json"),
    )
    .unwrap();
    if let Err(e) = type_check(&schema, &ours) {
        panic!("docs/grafana-dashboard.json does not follow Grafana's schema:\n{e}");
    }
    // The check has teeth: a key Grafana does not know, or a field of the wrong type, fails.
    let unknown = ours.replacen("\"links\": [],", "\"links\": [], \"linkz\": [],", 1);
    assert_ne!(unknown, ours);
    let e = type_check(&schema, &unknown).unwrap_err();
    assert!(e.contains("linkz"), "{e}");
    let wrong = ours.replacen("\"id\": 1,", "\"id\": \"one\",", 1);
    assert_ne!(wrong, ours);
    assert!(type_check(&schema, &wrong).is_err());
}

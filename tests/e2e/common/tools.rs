//! Real external components the tests drive. A missing one fails the test with what to install;
//! nothing is skipped silently.

use std::process::Command;

#[track_caller]
pub fn require(tool: &str, install_hint: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is required by this test but not installed: {install_hint} \
         (./scripts/test.sh installs everything the tests need)"
    );
}

#[track_caller]
pub fn require_python_module(module: &str, pip: &str) {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python module `{module}` is required: pip install {pip} (./scripts/test.sh does)"
    );
}

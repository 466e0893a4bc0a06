//! The standard suite, briefly (`bench suite --smoke`): every part runs against a real
//! appliance (its own process, real HTTPS, real libtorch, the shipped policies) and writes its
//! report and charts. The figures are not judged here (benchmarks are not timed tests); that
//! every request succeeded, and that the report holds what it must, is.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

#[test]
fn the_suite_runs_end_to_end_and_writes_its_report() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["suite", "--smoke", "--out"])
        .arg(out.path())
        // The shipped policies' components are found from the repository root.
        .current_dir(root)
        .env("RUST_BACKTRACE", "0")
        // A policy call descheduled past its 20 ms budget on a busy machine fails closed, by
        // design (the full suite reports it); this run is about the tool, not that budget.
        .env("APPLIANCE_POLICY__TIMEOUT_MS", "2000")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench suite --smoke failed:\n{stderr}");

    let report: Value = serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["settings"]["smoke"], true);
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(report["versions"]["libtorch"], "2.11.0");
    for baseline in ["forward", "pipeline"] {
        let rows = report[baseline].as_array().unwrap();
        assert_eq!(rows.len(), 2, "{baseline}: batch sizes 1 and 8");
        assert!(rows.iter().all(|r| r["samples_per_s"].as_f64().unwrap() > 0.0), "{baseline}: {rows:?}");
    }

    // The comparisons ran with the threads and batch cap the shipped instance measured.
    let variant = |name: &str| report["variants"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap();
    assert!(variant("standard")["pinned"].is_null(), "the shipped instance measures its own");
    let pinned = &variant("no-policies")["pinned"];
    assert!(pinned["threads"].as_u64().unwrap() >= 1 && pinned["largest_batch"].as_u64().unwrap() >= 1, "{pinned}");
    assert_eq!(&variant("interval-quotas")["pinned"], pinned);

    // Every variant ran, every point's requests all succeeded and the appliance said where
    // their time went.
    let points = report["points"].as_array().unwrap();
    for variant in ["standard", "batching-off", "no-policies", "interval-quotas"] {
        assert!(points.iter().any(|p| p["variant"] == variant), "no point for {variant}");
    }
    for p in points {
        let what = format!("{} {} {} {}", p["variant"], p["endpoint"], p["mode"], p["clients"]);
        assert!(p["ok"].as_u64().unwrap() > 0, "{what}: no successful request");
        assert_eq!(p["errors"], serde_json::json!({}), "{what}");
        assert!(p["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{what}");
        assert!(p["server_ms"]["inference"].as_f64().unwrap() > 0.0, "{what}");
        assert!(p["mean_batch"].as_f64().unwrap() >= 1.0, "{what}");
        assert!(p["appliance_cores"].as_f64().unwrap() > 0.0, "{what}: appliance CPU time");
        assert!(p["loadgen_cores"].is_number(), "{what}: load generator CPU time");
        let policies = p["server_ms"]["policy"].as_f64().unwrap();
        assert_eq!(policies > 0.0, p["variant"] != "no-policies", "{what}: policy time {policies}");
    }
    assert!(points.iter().any(|p| p["mode"] == "open" && p["hz"] == 10.0));
    assert!(points.iter().any(|p| p["endpoint"] == "oip"));

    // Every target is judged, met or not.
    let targets = report["targets"].as_array().unwrap();
    let whats: Vec<&str> = targets.iter().map(|t| t["what"].as_str().unwrap()).collect();
    for expected in [
        "batching efficiency, OIP binary",
        "batching efficiency, /v1/inference",
        "overhead at 1 client, /v1/inference, standard",
        "open loop, 4 robots at 10 Hz",
    ] {
        assert!(whats.iter().any(|w| w.starts_with(expected)), "{expected} missing from {whats:?}");
    }

    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    for section in [
        "## Targets",
        "## The model alone",
        "## Closed loop, /v1/inference",
        "## Closed loop, OIP binary",
        "## Open loop",
        "## Comparisons",
        "## Charts",
    ] {
        assert!(md.contains(section), "report.md lacks {section}:\n{md}");
    }
    for chart in ["latency-throughput.svg", "latency-cdf.svg", "batch-sizes.svg"] {
        let svg = std::fs::read_to_string(out.path().join(chart)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>") && svg.contains("<text"), "{chart}");
        assert!(md.contains(&format!("]({chart})")), "report.md does not show {chart}");
    }
}

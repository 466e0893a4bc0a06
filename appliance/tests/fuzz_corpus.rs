//! Replays the fuzz corpus (`fuzz/corpus/<target>/`, seeds) and every input the fuzzers found
//! (`fuzz/regressions/<target>/`: crashes, hangs and slow inputs) through the same code the fuzz
//! targets run (`fuzz/targets.rs`), on stable Rust: none may panic, none may take long.

#![allow(clippy::unwrap_used)]

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;
use std::time::{Duration, Instant};

/// Far above what any of these inputs needs (a few ms); a regression that loops shows here.
const SLOW: Duration = Duration::from_secs(5);

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else { continue };
        for entry in dir {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let started = Instant::now();
            run(&data);
            assert!(started.elapsed() < SLOW, "{} took {:?}", path.display(), started.elapsed());
            inputs += 1;
        }
    }
    assert!(inputs > 0, "no inputs for the {target} target");
}

#[test]
fn robot_endpoint_bodies_from_the_corpus_neither_panic_nor_hang() {
    replay("v1_body", targets::v1_body);
}

#[test]
fn oip_requests_from_the_corpus_neither_panic_nor_hang() {
    replay("oip_request", targets::oip_request);
}

#[test]
fn multipart_uploads_from_the_corpus_neither_panic_nor_hang() {
    replay("multipart_upload", targets::multipart_upload);
}

#[test]
fn camera_frames_from_the_corpus_neither_panic_nor_hang() {
    replay("image", targets::image);
}

#[test]
fn openpi_messages_from_the_corpus_neither_panic_nor_hang() {
    replay("openpi_message", targets::openpi_message);
}

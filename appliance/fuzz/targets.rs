//! What each fuzz target does with its input, shared by the fuzz targets (`cargo fuzz`, see
//! README.md here) and by `tests/fuzz_corpus.rs`, which replays the corpus and every input the
//! fuzzers found on stable Rust in `cargo test`. None of these may panic, whatever the bytes.

#![allow(dead_code)]

use std::sync::OnceLock;

use appliance::config::LimitsConfig;
use appliance::spec::ModelSpec;

fn spec() -> &'static ModelSpec {
    static SPEC: OnceLock<ModelSpec> = OnceLock::new();
    SPEC.get_or_init(|| ModelSpec::parse(appliance::demo::MODEL_TOML, appliance::demo::NAME).expect("the demo spec"))
}

fn text() -> &'static appliance::text::TextEncoder {
    static TEXT: OnceLock<appliance::text::TextEncoder> = OnceLock::new();
    TEXT.get_or_init(|| {
        appliance::text::TextEncoder::load(std::path::Path::new("."), spec()).expect("the demo encoder")
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("a runtime"))
}

/// A `/v1/inference` body: parsed, checked against the demo model, its image decoded.
pub fn v1_body(data: &[u8]) {
    let limits = LimitsConfig::default();
    let Ok(request) = appliance::validate::parse_request(data) else { return };
    if appliance::validate::check_request(&request, spec(), &limits, vla_api::Priority::Normal).is_err() {
        return;
    }
    let frames = request.images.values().filter_map(|f| match f {
        vla_api::FrameWire::Encoded(b64) => Some(b64.as_str()),
        vla_api::FrameWire::Raw { .. } => None,
    });
    for field in request.image.as_deref().into_iter().chain(frames) {
        if let Ok(file) = appliance::preprocess::base64_file(field, &limits) {
            image(&file);
        }
    }
    let _ = text().encode(&request.instruction);
}

/// An OIP infer body: the first two bytes say where the JSON header ends (the binary tensor
/// extension; `0xffff`: no binary part), the rest is the body.
pub fn oip_request(data: &[u8]) {
    let Some((len, body)) = data.split_first_chunk::<2>() else { return };
    let len = u16::from_le_bytes(*len);
    let header_len = (len != u16::MAX).then_some(usize::from(len));
    let body = bytes::Bytes::copy_from_slice(body);
    let Ok(header_len) =
        appliance::http::oip::codec::header_length(header_len.map(axum::http::HeaderValue::from).as_ref(), body.len())
    else {
        return;
    };
    let _ = appliance::http::oip::codec::parse(&body, header_len, spec(), text(), &LimitsConfig::default());
}

/// An openpi observation message (MessagePack, NumPy arrays as msgpack_numpy packs them),
/// decoded and checked against the demo model.
pub fn openpi_message(data: &[u8]) {
    let _ = appliance::http::openpi::check_observation(&bytes::Bytes::copy_from_slice(data), spec());
}

/// A policy upload's multipart body (boundary `fuzz`).
pub fn multipart_upload(data: &[u8]) {
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/admin/policies")
        .header("content-type", "multipart/form-data; boundary=fuzz")
        .body(())
        .expect("a request");
    let (parts, ()) = request.into_parts();
    let body = bytes::Bytes::copy_from_slice(data);
    let _ = runtime().block_on(appliance::http::policies::parse_upload(parts, body));
}

/// An encoded camera frame: its header read within the limits, then decoded and normalised
/// when it is small enough to be quick.
pub fn image(data: &[u8]) {
    let limits = LimitsConfig::default();
    let Ok(probe) = appliance::preprocess::probe(data, &limits) else { return };
    if probe.pixels() > 1 << 20 {
        return;
    }
    let _ = appliance::preprocess::camera_input(data, &probe, &spec().cameras[0]);
}

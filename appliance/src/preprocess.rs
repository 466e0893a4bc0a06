//! Preprocessing stage: a camera frame (base64 or raw JPEG/PNG, or raw RGB pixels) → the
//! camera's input tensor (resized to its size, in its layout, `FP32` normalised or `UINT8`
//! raw), and the robot's state → the model's (normalised by the shipped statistics).
//! CPU-heavy: the pipeline runs the decoding on the blocking pool, never on an async worker.
//!
//! Frames are checked before they are decoded: encoded size against `limits.max_image_bytes`,
//! header dimensions against `limits.max_image_pixels` (a decompression bomb is refused before
//! a pixel is allocated), and the decoder itself runs under an allocation limit (PNG) or with
//! its buffer sized from the checked header and its progressive scans bounded (JPEG).
//!
//! JPEGs are decoded by libjpeg-turbo (as Pillow decodes them), downscaled in the DCT domain
//! when the frame is at least twice the camera's size ([`dct_scale`]); a truncated or corrupt
//! one is refused, never filled in. PNGs (and CMYK JPEGs) by the `image` crate.
//!
//! Every frame-sized buffer is allocated without being zeroed and then written whole
//! ([`buffer`]): the allocator hands back memory a previous request used, where a zeroed
//! allocation of this size is returned to the kernel and faulted in again page by page, which
//! cost more than the decoding on a busy machine.

use std::io::Cursor;

use base64::Engine;
use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};

use crate::config::LimitsConfig;
use crate::model::TensorData;
use crate::spec::{CameraSpec, DataType, Layout, ModelSpec};

/// Why a frame has no tensor. The boundary names the field it came in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the image is {bytes} bytes, more than the limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    #[error("the image is {width}x{height} pixels, more than the limit of {limit} pixels")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("not valid base64: {0}")]
    Base64(String),
    #[error("not a JPEG or PNG image")]
    Format,
    #[error("the {format} image could not be decoded: {reason}")]
    Decode { format: &'static str, reason: String },
    #[error("raw frame: {0}")]
    Raw(String),
}

/// The encoded file in a base64 field (bare, or a `data:` URL), within
/// `limits.max_image_bytes`: refused before the base64 is decoded when it is too long.
pub fn base64_file(field: &str, limits: &LimitsConfig) -> Result<Vec<u8>, FrameError> {
    // Accept a data URL ("data:image/png;base64,....") as well as bare base64.
    let b64 = match field.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(";base64,")
            .map(|(_, data)| data)
            .ok_or_else(|| FrameError::Base64("a data URL must be `data:<type>;base64,<data>`".into()))?,
        None => field,
    };
    let b64 = b64.trim();
    if b64.is_empty() {
        return Err(FrameError::Base64("the image is empty".into()));
    }
    // Refuse oversized images before allocating for them: base64 is 4 chars per 3 bytes.
    let approx_bytes = b64.len() / 4 * 3;
    if approx_bytes > limits.max_image_bytes + 3 {
        return Err(FrameError::TooLarge { bytes: approx_bytes, limit: limits.max_image_bytes });
    }
    base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| FrameError::Base64(e.to_string()))
}

/// Decodes a base64 field into an RGB image, within `limits`.
pub fn decode_image(field: &str, limits: &LimitsConfig) -> Result<DynamicImage, FrameError> {
    decode_image_bytes(&base64_file(field, limits)?, limits)
}

/// What an encoded file's header says, checked against the limits before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

impl Probe {
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    fn name(&self) -> &'static str {
        if self.format == ImageFormat::Jpeg { "JPEG" } else { "PNG" }
    }
}

/// Reads an encoded JPEG or PNG file's header: its format and size, within `limits` (file
/// size, then pixels: a decompression bomb is refused here).
pub fn probe(bytes: &[u8], limits: &LimitsConfig) -> Result<Probe, FrameError> {
    if bytes.len() > limits.max_image_bytes {
        return Err(FrameError::TooLarge { bytes: bytes.len(), limit: limits.max_image_bytes });
    }
    let format = match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => ImageFormat::Jpeg,
        Ok(ImageFormat::Png) => ImageFormat::Png,
        _ => return Err(FrameError::Format),
    };
    let probe = Probe { format, width: 0, height: 0 };
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| FrameError::Decode { format: probe.name(), reason: e.to_string() })?;
    if u64::from(width) * u64::from(height) > limits.max_image_pixels {
        return Err(FrameError::TooManyPixels { width, height, limit: limits.max_image_pixels });
    }
    if width == 0 || height == 0 {
        return Err(FrameError::Decode { format: probe.name(), reason: "the image has no pixels".into() });
    }
    Ok(Probe { width, height, ..probe })
}

/// Decodes a file [`probe`] accepted into an image at its full size (see [`decode_scaled`]).
pub fn decode_probed(bytes: &[u8], probe: &Probe) -> Result<DynamicImage, FrameError> {
    decode_scaled(bytes, probe, None)
}

/// The camera's input from an encoded file [`probe`] accepted: decoded (a JPEG at least twice
/// the camera's size in both dimensions already downscaled while decoding, see [`dct_scale`]),
/// then as [`frame_tensor`].
pub fn camera_input(bytes: &[u8], probe: &Probe, cam: &CameraSpec) -> Result<TensorData, FrameError> {
    Ok(image_tensor(&decode_scaled(bytes, probe, Some((cam.width, cam.height)))?, cam))
}

/// Decodes a file [`probe`] accepted into an image, no smaller than `cover` where one is given:
/// a JPEG with libjpeg-turbo (CMYK ones excepted) at the DCT scale that still covers it; a PNG
/// (or a CMYK JPEG) with the `image` crate under an allocation limit sized for it, 8-bit RGB
/// straight into one buffer, anything else converted.
fn decode_scaled(bytes: &[u8], probe: &Probe, cover: Option<(u32, u32)>) -> Result<DynamicImage, FrameError> {
    use image::ImageDecoder;
    if probe.format == ImageFormat::Jpeg
        && let Some(rgb) = decode_jpeg(bytes, probe, cover)?
    {
        return Ok(DynamicImage::ImageRgb8(rgb));
    }
    let err = |e: image::ImageError| FrameError::Decode { format: probe.name(), reason: e.to_string() };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), probe.format);
    let mut decode_limits = image::Limits::default();
    decode_limits.max_image_width = Some(probe.width);
    decode_limits.max_image_height = Some(probe.height);
    // Room for the decoded pixels at up to 16 bits × 4 channels, plus decoder buffers.
    decode_limits.max_alloc = Some(probe.pixels() * 8 + (64 << 20));
    reader.limits(decode_limits);
    let decoder = reader.into_decoder().map_err(err)?;
    if decoder.color_type() != image::ColorType::Rgb8 {
        return DynamicImage::from_decoder(decoder).map_err(err);
    }
    let (width, height) = decoder.dimensions();
    let mut pixels = buffer(usize::try_from(decoder.total_bytes()).unwrap_or(usize::MAX));
    decoder.read_image(&mut pixels).map_err(err)?;
    RgbImage::from_raw(width, height, pixels)
        .map(DynamicImage::ImageRgb8)
        .ok_or_else(|| FrameError::Decode { format: probe.name(), reason: "the decoder's size disagrees".into() })
}

/// Progressive scans a JPEG may have. Cameras write one (baseline) or about ten; each scan is
/// another pass over the whole frame, so a file of thousands of tiny scans is a CPU bomb.
const MAX_JPEG_SCANS: u32 = 100;

thread_local! {
    /// This thread's libjpeg-turbo decompressor (setting one up allocates); dropped after an
    /// error, so that the next frame gets a fresh one.
    static TURBO: std::cell::RefCell<Option<turbojpeg::Decompressor>> = const { std::cell::RefCell::new(None) };
}

/// The scale a `width` × `height` JPEG is decoded at so that it still covers `cover`: the
/// smallest of 1/8, 1/4 and 1/2 that does in both dimensions, else full size. libjpeg-turbo
/// scales in the DCT domain (a reduced inverse DCT per 8×8 block), so a frame at least twice
/// the camera's size costs a fraction of its full decode, and the resize after it reads a
/// quarter of the pixels or fewer. What the model sees differs from a full decode resized by
/// about half a level of 255 on average, a dozen at sharp edges
/// (`dct_scaled_frames_match_full_decodes`).
fn dct_scale(width: u32, height: u32, cover: Option<(u32, u32)>) -> turbojpeg::ScalingFactor {
    use turbojpeg::ScalingFactor;
    let Some((cover_w, cover_h)) = cover else { return ScalingFactor::ONE };
    [8, 4, 2]
        .into_iter()
        .map(|denom| ScalingFactor::new(1, denom))
        .find(|f| f.scale(width as usize) >= cover_w as usize && f.scale(height as usize) >= cover_h as usize)
        .unwrap_or(ScalingFactor::ONE)
}

/// A JPEG decoded by libjpeg-turbo into 8-bit RGB at [`dct_scale`]; `None` for a CMYK or YCCK
/// file, which it does not convert to RGB. A warning (a truncated or corrupt file, which other
/// decoders fill in with grey) is an error: a robot's action is never computed from half a
/// frame.
fn decode_jpeg(bytes: &[u8], probe: &Probe, cover: Option<(u32, u32)>) -> Result<Option<RgbImage>, FrameError> {
    use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};
    let err = |e: turbojpeg::Error| {
        let reason = match e {
            turbojpeg::Error::TurboJpegError(message) => message,
            other => other.to_string(),
        };
        FrameError::Decode { format: "JPEG", reason }
    };
    TURBO.with_borrow_mut(|slot| {
        let turbo = match slot {
            Some(turbo) => turbo,
            None => slot.insert(Decompressor::new().map_err(err)?),
        };
        let decoded = (|| {
            let header = turbo.read_header(bytes).map_err(err)?;
            if matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK) {
                return Ok(None);
            }
            // The limits were checked on the size `probe` read; a file that tells two readers
            // two sizes gets neither.
            if (header.width, header.height) != (probe.width as usize, probe.height as usize) {
                return Err(FrameError::Decode { format: "JPEG", reason: "its headers disagree on its size".into() });
            }
            let scale =
                if header.is_lossless { ScalingFactor::ONE } else { dct_scale(probe.width, probe.height, cover) };
            turbo.set_scaling_factor(scale).map_err(err)?;
            turbo.set_scan_limit(MAX_JPEG_SCANS).map_err(err)?;
            let out = header.scaled(scale);
            let mut pixels = buffer(out.width * out.height * 3);
            let image = Image {
                pixels: &mut pixels[..],
                width: out.width,
                pitch: out.width * 3,
                height: out.height,
                format: PixelFormat::RGB,
            };
            turbo.decompress(bytes, image).map_err(err)?;
            // Within `probe`'s size, which fits in u32.
            RgbImage::from_raw(out.width as u32, out.height as u32, pixels)
                .map(Some)
                .ok_or_else(|| FrameError::Decode { format: "JPEG", reason: "the decoder's size disagrees".into() })
        })();
        if decoded.is_err() {
            *slot = None;
        }
        decoded
    })
}

/// A buffer of `len` bytes for a frame, allocated without zeroing (see the module header) and
/// then cleared, which costs a pass over memory already resident.
fn buffer<T: Copy + Default>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    v.resize(len, T::default());
    v
}

/// Decodes an encoded JPEG or PNG file into an RGB image, within `limits`.
pub fn decode_image_bytes(bytes: &[u8], limits: &LimitsConfig) -> Result<DynamicImage, FrameError> {
    let probe = probe(bytes, limits)?;
    decode_probed(bytes, &probe)
}

/// Raw RGB pixels (`rgb8`, row-major, 3 bytes a pixel) of `width` × `height`, within `limits`.
pub fn rgb8(width: u32, height: u32, data: Vec<u8>, limits: &LimitsConfig) -> Result<RgbImage, FrameError> {
    let pixels = u64::from(width) * u64::from(height);
    if width == 0 || height == 0 {
        return Err(FrameError::Raw("width and height must be at least 1".into()));
    }
    if pixels > limits.max_image_pixels {
        return Err(FrameError::TooManyPixels { width, height, limit: limits.max_image_pixels });
    }
    let expected = pixels * 3;
    if data.len() as u64 != expected {
        return Err(FrameError::Raw(format!(
            "{} bytes of data, but {width}x{height} rgb8 needs {expected}",
            data.len()
        )));
    }
    RgbImage::from_raw(width, height, data).ok_or_else(|| FrameError::Raw("the data does not fit the size".into()))
}

/// `rgb` resized to `width` × `height` with a bilinear (triangle) convolution, as Pillow's
/// `BILINEAR` does, with SIMD (`fast_image_resize`).
fn resize(rgb: &RgbImage, width: u32, height: u32) -> RgbImage {
    use fast_image_resize::images::{Image, ImageRef};
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    let resized = Image::from_vec_u8(width, height, buffer(width as usize * height as usize * 3), PixelType::U8x3)
        .ok()
        .and_then(|mut out| {
            let src = ImageRef::new(rgb.width(), rgb.height(), rgb.as_raw(), PixelType::U8x3).ok()?;
            Resizer::new().resize(&src, &mut out, &options).ok()?;
            Some(out)
        });
    match resized.and_then(|out| RgbImage::from_raw(width, height, out.into_vec())) {
        Some(image) => image,
        // Not reached (the buffers are the sizes given); the image crate's filter as a fallback.
        None => image::imageops::resize(rgb, width, height, image::imageops::FilterType::Triangle),
    }
}

/// The camera's input for one frame: resized to its size when it has another (bilinear), in
/// its layout, normalised `FP32` or raw `UINT8`.
pub fn frame_tensor(rgb: &RgbImage, cam: &CameraSpec) -> TensorData {
    let resized;
    let rgb = if rgb.width() == cam.width && rgb.height() == cam.height {
        rgb
    } else {
        resized = resize(rgb, cam.width, cam.height);
        &resized
    };
    let raw = rgb.as_raw();
    // Written in order into an allocated, not zeroed, buffer (see the module header): a plane
    // at a time for channel-first layouts.
    match (cam.dtype, cam.layout) {
        (DataType::Uint8, Layout::Nhwc) => TensorData::U8(raw.clone()),
        (DataType::Uint8, Layout::Nchw) => {
            let mut out = Vec::with_capacity(raw.len());
            for c in 0..3 {
                out.extend(raw.chunks_exact(3).map(|px| px[c]));
            }
            TensorData::U8(out)
        }
        (_, layout) => {
            let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * cam.std[c]));
            let shift: [f32; 3] = std::array::from_fn(|c| cam.mean[c] / cam.std[c]);
            let normalise = |c: usize, v: u8| f32::from(v) * scale[c] - shift[c];
            let mut out = Vec::with_capacity(raw.len());
            match layout {
                Layout::Nchw => {
                    for c in 0..3 {
                        out.extend(raw.chunks_exact(3).map(|px| normalise(c, px[c])));
                    }
                }
                Layout::Nhwc => out.extend(raw.iter().enumerate().map(|(i, &v)| normalise(i % 3, v))),
            }
            TensorData::F32(out)
        }
    }
}

/// [`frame_tensor`] of a decoded image (copied to 8-bit RGB first only when it is another
/// kind).
pub fn image_tensor(image: &DynamicImage, cam: &CameraSpec) -> TensorData {
    match image.as_rgb8() {
        Some(rgb) => frame_tensor(rgb, cam),
        None => frame_tensor(&image.to_rgb8(), cam),
    }
}

/// The frame of a camera nobody sent (optional cameras): black.
pub fn blank_frame(cam: &CameraSpec) -> TensorData {
    frame_tensor(&RgbImage::new(cam.width, cam.height), cam)
}

/// The state as the model takes it: `(state - mean) / std` with the shipped statistics.
pub fn normalise_state(spec: &ModelSpec, state: &[f32]) -> Vec<f32> {
    match (&spec.state.mean, &spec.state.std) {
        (Some(mean), Some(std)) => state.iter().zip(mean.iter().zip(std)).map(|(x, (m, s))| (x - m) / s).collect(),
        _ => state.to_vec(),
    }
}

/// UTF-8 bytes as tokens, zero-padded or truncated to `len`.
pub fn instruction_tokens(instruction: &str, len: usize) -> Vec<i64> {
    let mut tokens: Vec<i64> = instruction.bytes().take(len).map(i64::from).collect();
    tokens.resize(len, 0);
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Rgb};

    fn png(width: u32, height: u32, color: [u8; 3]) -> Vec<u8> {
        let img: ImageBuffer<Rgb<u8>, Vec<u8>> = ImageBuffer::from_pixel(width, height, Rgb(color));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).expect("encode png");
        out
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn cam(dtype: DataType, layout: Layout) -> CameraSpec {
        CameraSpec {
            name: "base".into(),
            input: "image".into(),
            height: 4,
            width: 4,
            layout,
            dtype,
            mean: [0.5; 3],
            std: [0.25; 3],
            required: true,
        }
    }

    #[test]
    fn a_png_is_resized_and_normalised_channel_first() {
        let img = decode_image(&b64(&png(8, 8, [255, 0, 128])), &LimitsConfig::default()).expect("decodes");
        let TensorData::F32(t) = image_tensor(&img, &cam(DataType::Fp32, Layout::Nchw)) else { panic!("FP32") };
        assert_eq!(t.len(), 3 * 16);
        assert!((t[0] - (1.0 - 0.5) / 0.25).abs() < 1e-5, "red plane");
        assert!((t[16] - (0.0 - 0.5) / 0.25).abs() < 1e-5, "green plane");
        assert!((t[32] - (128.0 / 255.0 - 0.5) / 0.25).abs() < 1e-2, "blue plane");
    }

    #[test]
    fn uint8_cameras_get_raw_pixels_in_their_layout() {
        let img = rgb8(4, 4, [10u8, 20, 30].repeat(16), &LimitsConfig::default()).expect("fits");
        assert_eq!(frame_tensor(&img, &cam(DataType::Uint8, Layout::Nhwc)), TensorData::U8([10, 20, 30].repeat(16)));
        let TensorData::U8(chw) = frame_tensor(&img, &cam(DataType::Uint8, Layout::Nchw)) else { panic!("UINT8") };
        assert_eq!(&chw[..16], &[10; 16]);
        assert_eq!(&chw[16..32], &[20; 16]);
        let TensorData::F32(hwc) = frame_tensor(&img, &cam(DataType::Fp32, Layout::Nhwc)) else { panic!("FP32") };
        assert!((hwc[1] - (20.0 / 255.0 - 0.5) / 0.25).abs() < 1e-5);
    }

    #[test]
    fn a_raw_frame_must_be_its_size() {
        let err = rgb8(4, 4, vec![0; 47], &LimitsConfig::default()).expect_err("refused");
        assert!(err.to_string().contains("needs 48"), "{err}");
    }

    #[test]
    fn a_data_url_is_accepted() {
        let url = format!("data:image/png;base64,{}", b64(&png(2, 2, [0, 0, 0])));
        assert!(decode_image(&url, &LimitsConfig::default()).is_ok());
    }

    #[test]
    fn non_base64_is_refused_by_name() {
        let err = decode_image("not base64!!", &LimitsConfig::default()).expect_err("refused");
        assert!(matches!(err, FrameError::Base64(_)));
    }

    #[test]
    fn bytes_that_are_no_image_are_refused() {
        let err = decode_image(&b64(b"hello world, not an image"), &LimitsConfig::default()).expect_err("refused");
        assert_eq!(err, FrameError::Format);
    }

    #[test]
    fn a_truncated_png_is_refused_as_undecodable() {
        let bytes = png(64, 64, [1, 2, 3]);
        let err = decode_image(&b64(&bytes[..bytes.len() / 2]), &LimitsConfig::default()).expect_err("refused");
        assert!(matches!(err, FrameError::Decode { .. }));
    }

    #[test]
    fn an_image_over_the_pixel_limit_is_refused_before_decoding() {
        let limits = LimitsConfig { max_image_pixels: 100, ..LimitsConfig::default() };
        let err = decode_image(&b64(&png(20, 20, [0, 0, 0])), &limits).expect_err("refused");
        assert!(matches!(err, FrameError::TooManyPixels { .. }));
        assert!(err.to_string().contains("20x20"), "{err}");
    }

    #[test]
    fn an_image_over_the_byte_limit_is_refused() {
        let limits = LimitsConfig { max_image_bytes: 10, ..LimitsConfig::default() };
        let err = decode_image(&b64(&png(20, 20, [0, 0, 0])), &limits).expect_err("refused");
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    /// A camera-like frame (smooth shading, edges, a little texture) as a JPEG of quality 90.
    fn jpeg(width: u32, height: u32, gray: bool) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| {
            let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
            let edge = if (fx - 0.5).abs() < 0.2 && (fy - 0.5).abs() < 0.2 { 80.0 } else { 0.0 };
            let texture = ((x * 7 + y * 13) % 17) as f32;
            let v = |base: f32| (base + edge + texture).clamp(0.0, 255.0) as u8;
            let (r, g, b) = (v(40.0 + 150.0 * fx), v(60.0 + 120.0 * fy), v(90.0 + 60.0 * (fx * 6.0).sin()));
            if gray { Rgb([g, g, g]) } else { Rgb([r, g, b]) }
        });
        let mut out = Vec::new();
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
        if gray {
            image::DynamicImage::ImageRgb8(img).to_luma8().write_with_encoder(encoder).expect("encode gray jpeg");
        } else {
            img.write_with_encoder(encoder).expect("encode jpeg");
        }
        out
    }

    fn camera(width: u32, height: u32) -> CameraSpec {
        CameraSpec { width, height, ..cam(DataType::Uint8, Layout::Nhwc) }
    }

    fn mean_and_max_difference(a: &[u8], b: &[u8]) -> (f64, u8) {
        assert_eq!(a.len(), b.len());
        let diffs = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y));
        let sum: u64 = diffs.clone().map(u64::from).sum();
        (sum as f64 / a.len() as f64, diffs.max().unwrap_or(0))
    }

    #[test]
    fn jpegs_decode_as_the_image_crate_decodes_them() {
        let limits = LimitsConfig::default();
        for gray in [false, true] {
            let file = jpeg(96, 64, gray);
            let ours = decode_image_bytes(&file, &limits).expect("decodes");
            let theirs = image::load_from_memory_with_format(&file, ImageFormat::Jpeg).expect("decodes").to_rgb8();
            assert_eq!(ours.as_rgb8().map(|i| i.dimensions()), Some((96, 64)), "8-bit RGB, full size");
            let (mean, max) = mean_and_max_difference(ours.as_rgb8().expect("rgb").as_raw(), theirs.as_raw());
            assert!(mean < 0.1 && max <= 2, "gray {gray}: mean {mean}, max {max}");
        }
    }

    #[test]
    fn frames_at_least_twice_the_camera_are_decoded_downscaled() {
        let cover = Some((224, 224));
        let scale = |w, h| {
            let f = dct_scale(w, h, cover);
            (f.num(), f.denom())
        };
        assert_eq!(scale(224, 224), (1, 1));
        assert_eq!(scale(446, 1000), (1, 1), "one side under twice");
        assert_eq!(scale(640, 480), (1, 2));
        assert_eq!(scale(1920, 1080), (1, 4));
        assert_eq!(scale(1800, 1800), (1, 8));
        assert_eq!(dct_scale(1920, 1080, None).denom(), 1, "a full decode asks for none");
    }

    #[test]
    fn dct_scaled_frames_match_full_decodes() {
        let limits = LimitsConfig::default();
        for (width, height) in [(640, 480), (1280, 720)] {
            let file = jpeg(width, height, false);
            let probe = probe(&file, &limits).expect("fits");
            let cam = camera(224, 224);
            let TensorData::U8(scaled) = camera_input(&file, &probe, &cam).expect("decodes") else { panic!("UINT8") };
            let full = decode_probed(&file, &probe).expect("decodes");
            assert_eq!(full.as_rgb8().map(|i| i.dimensions()), Some((width, height)));
            let TensorData::U8(full) = image_tensor(&full, &cam) else { panic!("UINT8") };
            assert_eq!(scaled.len(), 224 * 224 * 3);
            let (mean, max) = mean_and_max_difference(&scaled, &full);
            // Measured: 640x480 mean 0.52, max 13 (at the sharp edge); 1280x720 0.20 and 5.
            assert!(mean < 1.0 && max < 24, "{width}x{height}: mean {mean}, max {max}");
        }
    }

    #[test]
    fn a_truncated_jpeg_is_refused_rather_than_filled_in() {
        let file = jpeg(320, 240, false);
        let err = decode_image_bytes(&file[..file.len() / 2], &LimitsConfig::default()).expect_err("refused");
        assert!(
            matches!(&err, FrameError::Decode { format: "JPEG", reason } if reason.contains("Premature end")),
            "{err}"
        );
        // The thread's decoder is fresh again for the next frame.
        assert!(decode_image_bytes(&file, &LimitsConfig::default()).is_ok());
    }

    #[test]
    fn instructions_are_padded_and_truncated_bytes() {
        assert_eq!(instruction_tokens("ab", 4), vec![97, 98, 0, 0]);
        assert_eq!(instruction_tokens("abcdef", 3), vec![97, 98, 99]);
        assert_eq!(instruction_tokens("é", 3), vec![0xc3, 0xa9, 0]);
    }
}

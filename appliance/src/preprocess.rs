//! Preprocessing stage: a camera frame (base64 or raw JPEG/PNG, or raw RGB pixels) → the
//! camera's input tensor (resized to its size, in its layout, `FP32` normalised or `UINT8`
//! raw), and the robot's state → the model's (normalised by the shipped statistics).
//! CPU-heavy: the pipeline runs the decoding on the blocking pool, never on an async worker.
//!
//! Frames are checked before they are decoded: encoded size against `limits.max_image_bytes`,
//! header dimensions against `limits.max_image_pixels` (a decompression bomb is refused before
//! a pixel is allocated), and the decoder itself runs under an allocation limit.
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

/// Decodes a file [`probe`] accepted into an image, under an allocation limit sized for it:
/// 8-bit RGB (every JPEG in colour) straight into one buffer, anything else converted by the
/// `image` crate.
pub fn decode_probed(bytes: &[u8], probe: &Probe) -> Result<DynamicImage, FrameError> {
    use image::ImageDecoder;
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

    #[test]
    fn instructions_are_padded_and_truncated_bytes() {
        assert_eq!(instruction_tokens("ab", 4), vec![97, 98, 0, 0]);
        assert_eq!(instruction_tokens("abcdef", 3), vec![97, 98, 99]);
        assert_eq!(instruction_tokens("é", 3), vec![0xc3, 0xa9, 0]);
    }
}

//! Preprocessing stage of the robot endpoint: camera image (base64 JPEG/PNG) → normalised
//! `FP32 [3, H, W]`, instruction → byte tokens. CPU-heavy: the server calls [`robot_sample`]
//! on the blocking pool, never on an async worker.
//!
//! Images are checked before they are decoded: encoded size against `limits.max_image_bytes`,
//! header dimensions against `limits.max_image_pixels` (a decompression bomb is refused before
//! a pixel is allocated), and the decoder itself runs under an allocation limit.

use std::io::Cursor;

use base64::Engine;
use image::{DynamicImage, ImageFormat, ImageReader, imageops::FilterType};

use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::model::TensorData;
use crate::spec::{ImagePreprocess, ModelSpec};

/// The encoded file in the request's `image` field (bare base64 or a `data:` URL), within
/// `limits.max_image_bytes`: refused before the base64 is decoded when it is too long.
pub fn base64_file(field: &str, limits: &LimitsConfig) -> Result<Vec<u8>, ApiError> {
    // Accept a data URL ("data:image/png;base64,....") as well as bare base64.
    let b64 = match field.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(";base64,")
            .map(|(_, data)| data)
            .ok_or_else(|| ApiError::InvalidBase64("a data URL must be `data:<type>;base64,<data>`".into()))?,
        None => field,
    };
    let b64 = b64.trim();
    if b64.is_empty() {
        return Err(ApiError::InvalidBase64("the image is empty".into()));
    }
    // Refuse oversized images before allocating for them: base64 is 4 chars per 3 bytes.
    let approx_bytes = b64.len() / 4 * 3;
    if approx_bytes > limits.max_image_bytes + 3 {
        return Err(ApiError::ImageTooLarge { bytes: approx_bytes, limit: limits.max_image_bytes });
    }
    base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| ApiError::InvalidBase64(e.to_string()))
}

/// Decodes the request's `image` field into an RGB image, within `limits`.
pub fn decode_image(field: &str, limits: &LimitsConfig) -> Result<DynamicImage, ApiError> {
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
pub fn probe(bytes: &[u8], limits: &LimitsConfig) -> Result<Probe, ApiError> {
    if bytes.len() > limits.max_image_bytes {
        return Err(ApiError::ImageTooLarge { bytes: bytes.len(), limit: limits.max_image_bytes });
    }
    let format = match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => ImageFormat::Jpeg,
        Ok(ImageFormat::Png) => ImageFormat::Png,
        _ => return Err(ApiError::UnsupportedImageFormat),
    };
    let probe = Probe { format, width: 0, height: 0 };
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| ApiError::ImageDecode { format: probe.name(), reason: e.to_string() })?;
    if u64::from(width) * u64::from(height) > limits.max_image_pixels {
        return Err(ApiError::ImageDimensionsTooLarge { width, height, limit: limits.max_image_pixels });
    }
    if width == 0 || height == 0 {
        return Err(ApiError::ImageDecode { format: probe.name(), reason: "the image has no pixels".into() });
    }
    Ok(Probe { width, height, ..probe })
}

/// Decodes a file [`probe`] accepted into an RGB image, under an allocation limit sized for it.
pub fn decode_probed(bytes: &[u8], probe: &Probe) -> Result<DynamicImage, ApiError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), probe.format);
    let mut decode_limits = image::Limits::default();
    decode_limits.max_image_width = Some(probe.width);
    decode_limits.max_image_height = Some(probe.height);
    // Room for the decoded pixels at up to 16 bits × 4 channels, plus decoder buffers.
    decode_limits.max_alloc = Some(probe.pixels() * 8 + (64 << 20));
    reader.limits(decode_limits);
    reader.decode().map_err(|e| ApiError::ImageDecode { format: probe.name(), reason: e.to_string() })
}

/// Decodes an encoded JPEG or PNG file into an RGB image, within `limits`.
pub fn decode_image_bytes(bytes: &[u8], limits: &LimitsConfig) -> Result<DynamicImage, ApiError> {
    let probe = probe(bytes, limits)?;
    decode_probed(bytes, &probe)
}

/// Resizes to the model's input size and normalises into CHW order.
pub fn image_tensor(image: &DynamicImage, pre: &ImagePreprocess) -> Vec<f32> {
    let rgb = image.to_rgb8();
    let rgb = if rgb.width() == pre.width && rgb.height() == pre.height {
        rgb
    } else {
        image::imageops::resize(&rgb, pre.width, pre.height, FilterType::Triangle)
    };
    let plane = (pre.width * pre.height) as usize;
    let mut out = vec![0f32; 3 * plane];
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * pre.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| pre.mean[c] / pre.std[c]);
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = f32::from(px.0[c]) * scale[c] - shift[c];
        }
    }
    out
}

/// UTF-8 bytes as tokens, zero-padded or truncated to `len`.
pub fn instruction_tokens(instruction: &str, len: usize) -> Vec<i64> {
    let mut tokens: Vec<i64> = instruction.bytes().take(len).map(i64::from).collect();
    tokens.resize(len, 0);
    tokens
}

/// The model inputs for one robot request, in the model's argument order.
pub fn robot_sample(
    spec: &ModelSpec,
    image_field: &str,
    instruction: &str,
    state: &[f32],
    limits: &LimitsConfig,
) -> Result<Vec<TensorData>, ApiError> {
    let image = decode_image(image_field, limits)?;
    let pos = spec.robot_inputs();
    let mut inputs = vec![TensorData::F32(Vec::new()); spec.inputs.len()];
    inputs[pos.image] = TensorData::F32(image_tensor(&image, &spec.preprocess.image));
    inputs[pos.instruction] = TensorData::I64(instruction_tokens(instruction, spec.instruction_len()));
    inputs[pos.state] = TensorData::F32(state.to_vec());
    Ok(inputs)
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

    fn pre() -> ImagePreprocess {
        ImagePreprocess { input: "image".into(), height: 4, width: 4, mean: [0.5; 3], std: [0.25; 3] }
    }

    #[test]
    fn a_png_is_resized_and_normalised_channel_first() {
        let img = decode_image(&b64(&png(8, 8, [255, 0, 128])), &LimitsConfig::default()).expect("decodes");
        let t = image_tensor(&img, &pre());
        assert_eq!(t.len(), 3 * 16);
        assert!((t[0] - (1.0 - 0.5) / 0.25).abs() < 1e-5, "red plane");
        assert!((t[16] - (0.0 - 0.5) / 0.25).abs() < 1e-5, "green plane");
        assert!((t[32] - (128.0 / 255.0 - 0.5) / 0.25).abs() < 1e-2, "blue plane");
    }

    #[test]
    fn a_data_url_is_accepted() {
        let url = format!("data:image/png;base64,{}", b64(&png(2, 2, [0, 0, 0])));
        assert!(decode_image(&url, &LimitsConfig::default()).is_ok());
    }

    #[test]
    fn non_base64_is_refused_by_name() {
        let err = decode_image("not base64!!", &LimitsConfig::default()).expect_err("refused");
        assert_eq!(err.code(), "invalid_base64");
    }

    #[test]
    fn bytes_that_are_no_image_are_refused() {
        let err = decode_image(&b64(b"hello world, not an image"), &LimitsConfig::default()).expect_err("refused");
        assert_eq!(err.code(), "unsupported_image_format");
    }

    #[test]
    fn a_truncated_png_is_refused_as_undecodable() {
        let bytes = png(64, 64, [1, 2, 3]);
        let err = decode_image(&b64(&bytes[..bytes.len() / 2]), &LimitsConfig::default()).expect_err("refused");
        assert_eq!(err.code(), "image_decode_failed");
    }

    #[test]
    fn an_image_over_the_pixel_limit_is_refused_before_decoding() {
        let limits = LimitsConfig { max_image_pixels: 100, ..LimitsConfig::default() };
        let err = decode_image(&b64(&png(20, 20, [0, 0, 0])), &limits).expect_err("refused");
        assert_eq!(err.code(), "image_dimensions_too_large");
        assert!(err.to_string().contains("20x20"), "{err}");
    }

    #[test]
    fn an_image_over_the_byte_limit_is_refused() {
        let limits = LimitsConfig { max_image_bytes: 10, ..LimitsConfig::default() };
        let err = decode_image(&b64(&png(20, 20, [0, 0, 0])), &limits).expect_err("refused");
        assert_eq!(err.code(), "image_too_large");
    }

    #[test]
    fn instructions_are_padded_and_truncated_bytes() {
        assert_eq!(instruction_tokens("ab", 4), vec![97, 98, 0, 0]);
        assert_eq!(instruction_tokens("abcdef", 3), vec![97, 98, 99]);
        assert_eq!(instruction_tokens("é", 3), vec![0xc3, 0xa9, 0]);
    }
}

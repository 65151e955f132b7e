//! The one image reader and the one PNG writer: decoding with memory limits (a file built to
//! exhaust memory is refused, not decoded), tensors in [-1, 1] to u8 pixels, grids, and PNGs
//! carrying their settings in `tEXt` chunks as popular diffusion UIs do.

use std::path::Path;

use burn::tensor::Tensor;
use image::{DynamicImage, ImageReader, Limits};

use crate::checkpoint::atomic_write;
use crate::error::{CommonError, Result};

/// Largest width or height accepted when decoding a user's image.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Largest allocation the decoder may make for one image.
pub const MAX_DECODE_BYTES: u64 = 256 * 1024 * 1024;

fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limits
}

/// Decodes an image file with [`MAX_IMAGE_SIDE`] / [`MAX_DECODE_BYTES`] limits.
pub fn read_image(path: &Path) -> Result<DynamicImage> {
    let mut reader = ImageReader::open(path)
        .map_err(|e| CommonError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| CommonError::io(path, e))?;
    reader.limits(limits());
    reader.decode().map_err(|e| decode_error(path, e))
}

/// Decodes an image held in memory (an upload, say) with the same limits as [`read_image`];
/// errors name it `name`.
pub fn decode_image(bytes: &[u8], name: &str) -> Result<DynamicImage> {
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| CommonError::io(name, e))?;
    reader.limits(limits());
    reader
        .decode()
        .map_err(|e| decode_error(Path::new(name), e))
}

fn decode_error(path: &Path, e: image::ImageError) -> CommonError {
    let message = match e {
        image::ImageError::Limits(l) => format!(
            "refused to decode: {l} (limits: {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels, {} MiB)",
            MAX_DECODE_BYTES >> 20
        ),
        other => format!("unreadable image: {other}"),
    };
    CommonError::Image {
        path: path.to_path_buf(),
        message,
    }
}

/// Pixels of a batch of images, each `[channels, height, width]` u8.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub images: Vec<Vec<u8>>,
}

/// Maps a tensor in [-1, 1] to u8 pixels: round((x + 1) * 127.5) clamped to 0..=255.
///
/// # Shapes
/// - `images`: `[n, channels, height, width]`
pub fn to_pixels(images: Tensor<4>) -> Pixels {
    let [n, c, h, w] = images.dims();
    let values = crate::tensor::to_vec_f32(images);
    let per = c * h * w;
    Pixels {
        channels: c,
        height: h,
        width: w,
        images: (0..n)
            .map(|i| {
                values[i * per..(i + 1) * per]
                    .iter()
                    .map(|&v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
                    .collect()
            })
            .collect(),
    }
}

/// Lays images out in rows of `ncols` with a 2-pixel border; returns interleaved (HWC) pixels
/// and the grid's width and height.
pub fn grid(p: &Pixels, ncols: usize) -> (Vec<u8>, usize, usize) {
    const PAD: usize = 2;
    let ncols = ncols.max(1).min(p.images.len().max(1));
    let nrows = p.images.len().div_ceil(ncols).max(1);
    let (gw, gh) = (
        ncols * (p.width + PAD) + PAD,
        nrows * (p.height + PAD) + PAD,
    );
    let c = p.channels;
    let mut out = vec![40u8; gw * gh * c];
    for (k, img) in p.images.iter().enumerate() {
        let (ox, oy) = (
            PAD + (k % ncols) * (p.width + PAD),
            PAD + (k / ncols) * (p.height + PAD),
        );
        for y in 0..p.height {
            for x in 0..p.width {
                for ch in 0..c {
                    out[((oy + y) * gw + ox + x) * c + ch] = img[(ch * p.height + y) * p.width + x];
                }
            }
        }
    }
    (out, gw, gh)
}

/// One image of a batch as interleaved (HWC) pixels.
pub fn interleaved(p: &Pixels, index: usize) -> Vec<u8> {
    let img = &p.images[index];
    let hw = p.height * p.width;
    (0..hw * p.channels)
        .map(|i| img[(i % p.channels) * hw + i / p.channels])
        .collect()
}

/// Encodes interleaved u8 pixels (1 = gray, 3 = RGB) as PNG with `tEXt` chunks.
pub fn encode_png(
    hwc: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    text: &[(&str, &str)],
) -> Vec<u8> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, width as u32, height as u32);
        enc.set_color(if channels == 3 {
            png::ColorType::Rgb
        } else {
            png::ColorType::Grayscale
        });
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_text_chunk(k.to_string(), v.to_string())
                .expect("keyword of 1-79 Latin-1 characters");
        }
        let mut writer = enc.write_header().expect("valid header");
        writer.write_image_data(hwc).expect("buffer matches size");
    }
    bytes
}

/// Writes a PNG atomically.
pub fn write_png(
    path: &Path,
    hwc: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    text: &[(&str, &str)],
) -> Result<()> {
    atomic_write(path, &encode_png(hwc, width, height, channels, text))
}

/// Writes a grid of a batch in [-1, 1] as a PNG.
pub fn write_grid(path: &Path, images: Tensor<4>, ncols: usize) -> Result<()> {
    let p = to_pixels(images);
    let (hwc, w, h) = grid(&p, ncols);
    write_png(path, &hwc, w, h, p.channels, &[])
}

/// Reads the `tEXt` chunks of a PNG file.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|e| CommonError::io(path, e))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| CommonError::Image {
            path: path.to_path_buf(),
            message: format!("not a PNG: {e}"),
        })?;
    Ok(reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect())
}

/// A PNG whose header declares `side x side` grayscale pixels and whose one IDAT chunk holds
/// a few bytes: the shape of a decompression bomb, for tests of the decoder limits.
pub fn bomb_png(side: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(crc.sum().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(side.to_be_bytes());
    ihdr.extend(side.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grayscale, deflate, no filter, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bomb_is_refused_before_decoding() {
        let e = decode_image(&bomb_png(60_000), "upload")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("upload: refused to decode") && e.contains("8192x8192"),
            "{e}"
        );
        let e = decode_image(b"not an image", "upload")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("upload: unreadable image"), "{e}");
    }

    #[test]
    fn pixels_grid_and_png_text_round_trip() {
        let device = burn::tensor::Device::flex();
        let t = Tensor::<4>::from_floats(
            [[[[-1.0, 1.0], [0.0, 2.0]]], [[[1.0, 1.0], [1.0, 1.0]]]],
            &device,
        );
        let p = to_pixels(t);
        assert_eq!(p.images[0], vec![0, 255, 128, 255]);
        let (hwc, w, h) = grid(&p, 2);
        assert_eq!((w, h), (2 * 4 + 2, 4 + 2));
        assert_eq!(hwc[(2 * w) + 2], 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.png");
        write_png(&path, &hwc, w, h, 1, &[("parameters", "cfg 5")]).unwrap();
        let text = read_png_text(&path).unwrap();
        assert_eq!(text, vec![("parameters".to_string(), "cfg 5".to_string())]);
        let back = read_image(&path).unwrap().to_luma8();
        assert_eq!(back.into_raw(), hwc);
    }
}

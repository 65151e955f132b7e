//! A user's own images: `dir/<class>/<file>` for every class subfolder (sorted by name), any
//! format the `image` crate reads, resized (shorter side) and centre-cropped to the configured
//! resolution. An optional `dir/captions.jsonl` maps file names to captions, one JSON object
//! per line: `{"file": "cat/001.png", "caption": "a sleeping cat"}`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use super::config::DataConfig;
use super::image_set::{ImageSet, Splits};
use crate::error::{CommonError, Result};
use crate::image_io::read_image;

/// Loads an image folder and splits it: a file is held out when a hash of its relative path
/// falls below `held_out_fraction`, so the split is fixed whatever the seed.
pub fn load_image_folder(config: &DataConfig) -> Result<Splits> {
    let dir = config.resolved_dir();
    let mut classes: Vec<PathBuf> = read_dir_sorted(&dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(CommonError::dataset(
            &dir,
            "no class subfolders: expected <dir>/<class name>/<images>",
        ));
    }
    let captions = read_captions(&dir)?;
    let class_names: Vec<String> = classes
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let empty = |n: usize| ImageSet {
        channels: config.channels,
        resolution: config.resolution,
        pixels: Vec::with_capacity(n),
        labels: vec![],
        captions: vec![],
        class_names: class_names.clone(),
    };
    let (mut train, mut held_out) = (empty(0), empty(0));
    for (label, class_dir) in classes.iter().enumerate() {
        for path in read_dir_sorted(class_dir)?
            .into_iter()
            .filter(|p| p.is_file())
        {
            let rel = relative_key(&dir, &path);
            let pixels = load_fitted(&path, config.resolution, config.channels)?;
            let caption = captions
                .get(&rel)
                .or_else(|| {
                    captions.get(path.file_name().unwrap_or_default().to_str().unwrap_or(""))
                })
                .cloned();
            let set = if split_hash(&rel) < config.held_out_fraction {
                &mut held_out
            } else {
                &mut train
            };
            set.pixels.extend_from_slice(&pixels);
            set.labels.push(label);
            set.captions.push(caption);
        }
    }
    if train.labels.is_empty() {
        return Err(CommonError::dataset(
            &dir,
            "no training images found in the class subfolders",
        ));
    }
    train.truncate(config.max_train);
    Ok(Splits { train, held_out })
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| CommonError::io(dir, e))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

fn relative_key(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// FNV-1a of the relative path mapped to [0, 1).
fn split_hash(key: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn read_captions(dir: &Path) -> Result<HashMap<String, String>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        file: String,
        caption: String,
    }
    let path = dir.join("captions.jsonl");
    if !path.exists() {
        return Ok(HashMap::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| CommonError::io(&path, e))?;
    let mut map = HashMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let parsed: Line = serde_json::from_str(line).map_err(|e| {
            CommonError::dataset(
                &path,
                format!(
                    "line {}: {e}; expected {{\"file\": \"<class>/<name>\", \"caption\": \"...\"}}",
                    i + 1
                ),
            )
        })?;
        map.insert(parsed.file, parsed.caption);
    }
    Ok(map)
}

/// Decodes one image, resizes its shorter side to `res`, centre-crops, and converts it to
/// `channels` channels in `[c, h, w]` order.
fn load_fitted(path: &Path, res: usize, channels: usize) -> Result<Vec<u8>> {
    let img = read_image(path)?;
    let (w, h) = (img.width() as f64, img.height() as f64);
    let scale = res as f64 / w.min(h);
    let (nw, nh) = (
        ((w * scale).round() as u32).max(res as u32),
        ((h * scale).round() as u32).max(res as u32),
    );
    let resized = img.resize_exact(nw, nh, FilterType::Triangle);
    let (x0, y0) = ((nw - res as u32) / 2, (nh - res as u32) / 2);
    let cropped = resized.crop_imm(x0, y0, res as u32, res as u32);
    Ok(if channels == 1 {
        cropped.to_luma8().into_raw()
    } else {
        // HWC -> CHW
        let rgb = cropped.to_rgb8().into_raw();
        let mut out = vec![0u8; 3 * res * res];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * res * res + i] = px[c];
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_hash_is_uniform_enough() {
        let held = (0..10_000)
            .filter(|i| split_hash(&format!("cls/{i}.png")) < 0.1)
            .count();
        assert!((800..1200).contains(&held), "{held}");
    }
}

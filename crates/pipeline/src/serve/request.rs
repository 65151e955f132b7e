//! The body of `POST /api/generate`: a JSON object with the fields of `pipeline generate`'s
//! flags, read one field at a time so that every error names its field. No field ever becomes
//! a filesystem path: images arrive as base64 bytes, and classifier guidance uses the
//! classifier the server was started with.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use axum::http::StatusCode;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ldm_common::image_io::decode_image;

use super::error::ApiError;
use super::model::ModelInfo;
use crate::classifier_stage;
use crate::cli::SamplerFlags;
use crate::generate::{GenerateArgs, sampler_options};
use crate::img2img::{ImageInput, Img2ImgArgs};

/// The fields `POST /api/generate` accepts (the flags of `pipeline generate`, `-` as `_`).
pub const FIELDS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "class",
    "cfg",
    "sampler",
    "steps",
    "eta",
    "spacing",
    "clip_x0",
    "guidance_rescale",
    "n",
    "seed",
    "init_image",
    "strength",
    "mask",
    "classifier_scale",
    "trajectory",
];

/// Longest prompt accepted, in characters.
pub const MAX_PROMPT_CHARS: usize = 1000;

/// Parses and checks a request against the model and the server's image cap; a missing
/// `seed` is drawn at random (the answer reports the seed used).
pub fn parse(body: &[u8], model: &ModelInfo) -> Result<GenerateArgs, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "expected a JSON object with some of the fields {}",
                FIELDS.join(", ")
            ),
        ));
    };
    if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::field(
            unknown,
            format!("unknown field; valid fields: {}", FIELDS.join(", ")),
        ));
    }
    let prompt = text(&map, "prompt")?;
    let negative_prompt = text(&map, "negative_prompt")?;
    let class: Option<String> = get(&map, "class", "a class name (a string)")?;
    if let Some(name) = &class
        && model.class_conditional()
        && !model
            .classes
            .iter()
            .any(|c| c.eq_ignore_ascii_case(name.trim()))
    {
        return Err(ApiError::field(
            "class",
            format!(
                "{name:?} is not a class of this model; valid classes: {}",
                model.classes.join(", ")
            ),
        ));
    }
    let cfg: Option<f64> = get(&map, "cfg", "a number")?;
    if let Some(cfg) = cfg
        && cfg < 0.0
    {
        return Err(ApiError::field(
            "cfg",
            format!("expected a number >= 0, got {cfg}"),
        ));
    }
    let flags = SamplerFlags {
        sampler: get(&map, "sampler", "a sampler name (a string)")?,
        steps: get(&map, "steps", "an integer")?,
        eta: get(&map, "eta", "a number")?,
        spacing: get(
            &map,
            "spacing",
            "leading, trailing, linspace or karras (a string)",
        )?,
        clip_x0: get(&map, "clip_x0", "a number")?,
        guidance_rescale: get(&map, "guidance_rescale", "a number")?,
        // the model's `sampler.precision`
        precision: None,
    };
    let sampler = sampler_options(&model.default_sampler, &model.schedule, &flags)
        .map_err(|e| ApiError::from_library(&e, FIELDS))?;
    let n: Option<i64> = get(&map, "n", "an integer")?;
    let n = n.unwrap_or(1);
    let max = model.limits.max_images;
    if n < 1 || n as usize > max {
        return Err(ApiError::field(
            "n",
            format!("expected 1 to {max} (the server's --max-images), got {n}"),
        ));
    }
    let seed: Option<u64> = get(&map, "seed", "an integer from 0 to 2^64 - 1")?;
    let img2img = img2img(&map, model)?;
    let classifier_scale: Option<f64> = get(&map, "classifier_scale", "a number")?;
    let classifier = match (classifier_scale, &model.classifier) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(ApiError::field(
                "classifier_scale",
                "this server has no classifier (start it with --classifier DIR)",
            ));
        }
        (Some(scale), Some(dir)) => classifier_stage::from_flags(Some(dir.clone()), Some(scale))
            .map_err(|e| ApiError::from_library(&e, FIELDS))?,
    };
    let trajectory: Option<bool> = get(&map, "trajectory", "true or false")?;
    Ok(GenerateArgs {
        prompt,
        negative_prompt,
        class,
        cfg,
        sampler,
        n: n as usize,
        seed: seed.unwrap_or_else(|| rand::random::<u32>() as u64),
        img2img,
        classifier,
        trajectory: trajectory.unwrap_or(false),
    })
}

/// A prompt field: a string of at most [`MAX_PROMPT_CHARS`] characters.
fn text(map: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    let value: Option<String> = get(map, field, "a string")?;
    if let Some(p) = &value
        && p.chars().count() > MAX_PROMPT_CHARS
    {
        return Err(ApiError::field(
            field,
            format!("longer than {MAX_PROMPT_CHARS} characters"),
        ));
    }
    Ok(value)
}

/// `init_image`, `strength`, `mask`: checked together as `generate`'s flags are; each image
/// is decoded here (with the decoder's limits) so that a bad upload is refused before it waits
/// in the queue.
fn img2img(map: &Map<String, Value>, model: &ModelInfo) -> Result<Option<Img2ImgArgs>, ApiError> {
    let init = upload(map, "init_image", model)?;
    let strength: Option<f64> = get(map, "strength", "a number")?;
    let mask = upload(map, "mask", model)?;
    let Some(init) = init else {
        if mask.is_some() {
            return Err(ApiError::field(
                "mask",
                "needs init_image: inpainting repaints the white part of an init image",
            ));
        }
        if let Some(s) = strength {
            return Err(ApiError::field(
                "strength",
                format!("{s} needs init_image: it says how far that image is noised"),
            ));
        }
        return Ok(None);
    };
    let strength = strength.unwrap_or(crate::img2img::DEFAULT_STRENGTH);
    crate::img2img::check_strength(strength).map_err(|e| ApiError::from_library(&e, FIELDS))?;
    Ok(Some(Img2ImgArgs {
        init,
        strength,
        mask,
    }))
}

/// An image field: base64 (optionally a `data:image/...;base64,` URL) of an image file of the
/// model's size.
fn upload(
    map: &Map<String, Value>,
    field: &str,
    model: &ModelInfo,
) -> Result<Option<ImageInput>, ApiError> {
    let Some(encoded) = get::<String>(map, field, "a base64-encoded image file")? else {
        return Ok(None);
    };
    let encoded = match encoded.split_once(";base64,") {
        Some((head, data)) if head.starts_with("data:") => data,
        _ => encoded.as_str(),
    };
    let bytes = BASE64
        .decode(encoded.trim())
        .map_err(|e| ApiError::field(field, format!("not base64: {e}")))?;
    let image = decode_image(&bytes, field).map_err(|e| {
        let message = e.to_string();
        let message = message
            .strip_prefix(&format!("{field}: "))
            .unwrap_or(&message);
        ApiError::field(field, message)
    })?;
    let [_, h, w] = model.image_shape;
    if (image.width() as usize, image.height() as usize) != (w, h) {
        return Err(ApiError::field(
            field,
            format!(
                "{}x{} pixels, but the model makes {w}x{h} images; resize it to {w}x{h}",
                image.width(),
                image.height()
            ),
        ));
    }
    Ok(Some(ImageInput::Bytes {
        name: field.to_string(),
        bytes,
    }))
}

/// A field of type `T`; absent or `null` is `None`.
fn get<T: DeserializeOwned>(
    map: &Map<String, Value>,
    field: &str,
    expected: &str,
) -> Result<Option<T>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
            let mut shown = v.to_string();
            if shown.len() > 40 {
                shown = format!("{}...", shown.chars().take(40).collect::<String>());
            }
            ApiError::field(field, format!("expected {expected}, got {shown}"))
        }),
    }
}

//! The one error shape of the API: an HTTP status and a one-line JSON body
//! `{"error": "...", "field": "cfg"}` naming the request field at fault (`null` when none is).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error answer of the API.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    /// One line, starting with the field's name when there is one.
    pub error: String,
    pub field: Option<String>,
}

impl ApiError {
    /// A request field with a bad value: 422, the message starts with the field's name.
    pub fn field(field: &str, message: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            error: one_line(&format!("{field}: {message}")),
            field: Some(field.to_string()),
        }
    }

    /// Any other error, with its status.
    pub fn new(status: StatusCode, message: impl std::fmt::Display) -> Self {
        Self {
            status,
            error: one_line(&message.to_string()),
            field: None,
        }
    }

    /// An error of the library call behind `generate`, whose messages start with the flag at
    /// fault (`--steps 0: ...`, `-n 0: ...`, `sampler = x: ...`, `sampler.eta = 2: ...`):
    /// a flag that is one of `fields` becomes that field (422, `--negative-prompt` ->
    /// `negative_prompt`); a message naming no field is the server's fault (500).
    pub fn from_library(e: &anyhow::Error, fields: &[&str]) -> Self {
        let message = one_line(&format!("{e:#}"));
        let lead = message
            .split([' ', ':', '='])
            .next()
            .unwrap_or_default()
            .to_string();
        let name = flag_field(&lead);
        if fields.contains(&name.as_str()) {
            return Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                error: format!("{name}{}", &message[lead.len()..]),
                field: Some(name),
            };
        }
        let named = message
            .split([' ', ',', ';', '(', ')'])
            .filter(|w| w.starts_with('-'))
            .map(flag_field)
            .find(|f| fields.contains(&f.as_str()));
        match named {
            Some(field) => Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                error: message,
                field: Some(field),
            },
            None => Self::new(StatusCode::INTERNAL_SERVER_ERROR, message),
        }
    }
}

/// `--negative-prompt` -> `negative_prompt`, `-n` -> `n`, `sampler.eta` -> `eta`.
fn flag_field(flag: &str) -> String {
    let name = flag.trim_start_matches('-').replace('-', "_");
    match name.strip_prefix("sampler.") {
        Some(key) => key.to_string(),
        None => name,
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(&self)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_errors_name_the_request_field() {
        let fields = ["steps", "n", "sampler", "eta", "negative_prompt", "class"];
        let e = ApiError::from_library(&anyhow::anyhow!("--steps 0: expected 1 to 100"), &fields);
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.field.as_deref(), Some("steps"));
        assert_eq!(e.error, "steps 0: expected 1 to 100");
        let e = ApiError::from_library(&anyhow::anyhow!("-n 0: expected at least one"), &fields);
        assert_eq!(
            (e.field.as_deref(), e.error.as_str()),
            (Some("n"), "n 0: expected at least one")
        );
        let e = ApiError::from_library(&anyhow::anyhow!("sampler.eta = 2: in [0, 1]"), &fields);
        assert_eq!(e.field.as_deref(), Some("eta"));
        let e = ApiError::from_library(&anyhow::anyhow!("--negative-prompt x: no"), &fields);
        assert_eq!(e.field.as_deref(), Some("negative_prompt"));
        let e = ApiError::from_library(
            &anyhow::anyhow!(
                "run was trained unconditionally: it cannot follow --prompt or --class (x)"
            ),
            &fields,
        );
        assert_eq!(e.field.as_deref(), Some("class"));
        let e = ApiError::from_library(&anyhow::anyhow!("out of memory\nin layer 3"), &fields);
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            (e.field, e.error.as_str()),
            (None, "out of memory in layer 3")
        );
    }
}

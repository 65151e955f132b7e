//! The HTTP routes: the page, `GET /api/model`, `POST /api/generate` (JSON, or server-sent
//! events with `Accept: text/event-stream`), `GET /api/jobs/{id}/events` and
//! `POST /api/jobs/{id}/cancel`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::error::ApiError;
use super::model::ModelInfo;
use super::page;
use super::queue::{JobHandle, Queue, Status};
use super::request;

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    pub model: Arc<ModelInfo>,
    pub queue: Arc<Queue>,
    /// Whether the server listens on loopback only (then the Host header must be local).
    pub loopback: bool,
}

/// The routes of the server.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/app.js", get(page::script))
        .route("/style.css", get(page::style))
        .route("/api/model", get(model))
        .route("/api/generate", post(generate))
        .route("/api/jobs/{id}/events", get(job_events))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Refuses requests that a web page of another site could make through the user's browser:
/// a Host other than a local name while on loopback (DNS rebinding), and a POST that is not
/// `application/json` (a form or `text/plain` post needs no CORS preflight).
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.loopback {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !local_host(host) {
            return ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                format!("Host {host:?}: this server answers only to localhost, 127.0.0.1 or [::1]"),
            )
            .into_response();
        }
    }
    if request.method() == Method::POST && request.uri().path() == "/api/generate" {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|c| c.trim_start().starts_with("application/json"));
        if !json {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type: expected application/json",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn local_host(host: &str) -> bool {
    let name = if host.starts_with('[') {
        host.split(']').next().map(|h| &h[1..]).unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn model(State(state): State<AppState>) -> Json<ModelInfo> {
    Json(state.model.as_ref().clone())
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("{method} {}: no such route", uri.path()),
    )
}

/// `POST /api/generate`: checks the body, queues the job (429 when the queue is full), and
/// answers with the images when done, or streams its progress as server-sent events.
async fn generate(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    match start(&state, body).await {
        Ok(job) if wants_events(&headers) => {
            let accepted = Status::Queued { ahead: job.ahead };
            events(job.id, job.status.clone(), Some((accepted, job)))
        }
        Ok(job) => finish(job).await,
        Err(e) => e.into_response(),
    }
}

async fn start(state: &AppState, body: Body) -> Result<JobHandle, ApiError> {
    let limit = state.model.limits.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body: larger than {limit} bytes (the server's --max-body)"),
        )
    };
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())?;
    let model = state.model.clone();
    let args = tokio::task::spawn_blocking(move || request::parse(&bytes, &model))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))??;
    state.queue.submit(args)
}

fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"))
}

/// Waits for the job's end and answers with its images or its error.
async fn finish(job: JobHandle) -> Response {
    let mut status = job.status.clone();
    loop {
        let now = status.borrow_and_update().clone();
        if now.finished() {
            return match result(job.id, &now) {
                Ok(body) => Json(body).into_response(),
                Err(e) => e.into_response(),
            };
        }
        if status.changed().await.is_err() {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the worker stopped")
                .into_response();
        }
    }
}

/// The answer of a finished job: `{id, settings, images: [base64 PNG], grid,
/// init_reconstruction, trajectory, warnings}`.
fn result(id: u64, status: &Status) -> Result<Value, ApiError> {
    match status {
        Status::Done {
            generation: g,
            warnings,
        } => Ok(json!({
            "id": id,
            "settings": g.record,
            "images": g.images.iter().map(|png| BASE64.encode(png)).collect::<Vec<_>>(),
            "grid": BASE64.encode(&g.grid),
            "init_reconstruction": g.init_reconstruction.as_ref().map(|png| BASE64.encode(png)),
            "trajectory": g.trajectory.as_ref().map(|png| BASE64.encode(png)),
            "warnings": warnings,
        })),
        Status::Failed(e) => Err(e.clone()),
        Status::Cancelled { step } => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("job {id} was cancelled after {step} steps"),
        )),
        Status::Queued { .. } | Status::Running { .. } => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the job has not finished",
        )),
    }
}

/// One server-sent event for a status: `queued`, `progress`, `done`, `error` or `cancelled`.
fn event(id: u64, status: &Status) -> Event {
    let (name, data) = match status {
        Status::Queued { ahead } => ("queued", json!({"id": id, "ahead": ahead})),
        Status::Running { step, total } => {
            ("progress", json!({"id": id, "step": step, "total": total}))
        }
        Status::Cancelled { step } => ("cancelled", json!({"id": id, "step": step})),
        done => match result(id, done) {
            Ok(body) => ("done", body),
            Err(e) => (
                "error",
                json!({"id": id, "status": e.status.as_u16(), "error": e.error, "field": e.field}),
            ),
        },
    };
    Event::default().event(name).data(data.to_string())
}

/// The events of a job until it ends. A job's own request passes `submitted`: the status it
/// was accepted with (so its stream always opens with `queued`, however fast the worker takes
/// it) and the handle that keeps the job alive while the stream is read (the client closing
/// it cancels the job). A follower starts from the job's current status.
fn events(
    id: u64,
    status: watch::Receiver<Status>,
    submitted: Option<(Status, JobHandle)>,
) -> Response {
    let (opening, hold) = match submitted {
        Some((accepted, handle)) => (
            Some(Ok::<_, std::convert::Infallible>(event(id, &accepted))),
            Some(handle),
        ),
        None => (None, None),
    };
    // After the opening event, `changed()` reports every status published since acceptance
    // (the handle's receiver has seen only the initial one).
    let first = opening.is_none();
    let rest = futures_util::stream::unfold(
        (status, hold, first, false),
        move |(mut status, hold, first, over)| async move {
            if over {
                return None;
            }
            if !first && status.changed().await.is_err() {
                let lost = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the worker stopped");
                return Some((
                    Ok::<_, std::convert::Infallible>(event(id, &Status::Failed(lost))),
                    (status, hold, false, true),
                ));
            }
            let now = status.borrow_and_update().clone();
            let over = now.finished();
            Some((Ok(event(id, &now)), (status, hold, false, over)))
        },
    );
    let stream = futures_util::stream::iter(opening).chain(rest);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}

fn job_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("job {raw:?}: no such queued or running job"),
        )
    })
}

/// `GET /api/jobs/{id}/events`: the progress of a queued or running job (watching does not
/// keep it alive).
async fn job_events(State(state): State<AppState>, Path(raw): Path<String>) -> Response {
    let id = match job_id(&raw) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match state.queue.watch(id) {
        Some(status) => events(id, status, None),
        None => no_job(id).into_response(),
    }
}

fn no_job(id: u64) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("job {id}: no such queued or running job"),
    )
}

/// `POST /api/jobs/{id}/cancel`: stops a queued or running job at its next sampler step.
async fn cancel(State(state): State<AppState>, Path(raw): Path<String>) -> Response {
    match job_id(&raw) {
        Ok(id) if state.queue.cancel(id) => {
            Json(json!({"id": id, "cancelled": true})).into_response()
        }
        Ok(id) => no_job(id).into_response(),
        Err(e) => e.into_response(),
    }
}

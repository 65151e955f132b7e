//! `pipeline serve`: a local web page and JSON API over the same library call as `generate`
//! ([`crate::generate::generate_images`]). The model is loaded once and kept; one generation
//! runs on the device at a time on a worker thread, others wait in a bounded queue (HTTP 429
//! past it); progress streams as server-sent events and a job can be cancelled.

mod api;
mod error;
mod model;
mod page;
mod queue;
mod request;

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use ldm_common::device::DeviceChoice;
use ldm_common::precision::Precision;

pub use request::FIELDS;

/// The flags of `pipeline serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: PathBuf,
    /// A noisy-latent classifier for requests with `classifier_scale`.
    pub classifier: Option<PathBuf>,
    pub host: String,
    pub port: u16,
    /// Requests that may wait while one runs.
    pub queue: usize,
    /// Most images per request.
    pub max_images: usize,
    /// Largest request body in bytes.
    pub max_body: usize,
    pub device: DeviceChoice,
    /// The network's arithmetic (`--precision`; default the model's `sampler.precision`).
    pub precision: Option<Precision>,
}

/// The address to listen on: an IP address or a name such as `localhost`.
fn listen_address(host: &str, port: u16) -> Result<SocketAddr> {
    let mut addrs = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("--host {host}: not an address this machine can listen on"))?;
    match addrs.next() {
        Some(a) => Ok(a),
        None => bail!("--host {host}: the name resolves to no address"),
    }
}

/// Loads the model, listens, prints `serving http://ADDR/` on stdout, and serves until Ctrl-C.
pub fn serve(options: ServeOptions) -> Result<()> {
    if options.max_images == 0 {
        bail!("--max-images 0: expected at least 1");
    }
    let addr = listen_address(&options.host, options.port)?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!(
            "--host {} --port {}: cannot listen",
            options.host, options.port
        )
    })?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let loopback = bound.ip().is_loopback();
    if !loopback {
        eprintln!(
            "warning: listening on {bound}, not loopback: the page and API have no authentication, anyone who can reach this address can use them"
        );
    }
    eprintln!("loading {}", options.model.display());
    let (queue, mut info) = queue::Queue::start(
        options.model.clone(),
        options.classifier.clone(),
        options.device,
        options.queue,
        options.precision,
    )?;
    info.limits = model::Limits {
        max_images: options.max_images,
        queue: options.queue,
        max_body_bytes: options.max_body,
    };
    eprintln!(
        "{} on {}: {} classes, {} steps of {} by default{}; queue {}, at most {} images a request",
        info.model.display(),
        info.device,
        info.classes.len(),
        info.default_sampler.steps,
        info.default_sampler.kind,
        if info.default_sampler.precision.is_f32() {
            ""
        } else {
            " in bf16"
        },
        options.queue,
        options.max_images
    );
    let state = api::AppState {
        model: Arc::new(info),
        queue: queue.clone(),
        loopback,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _graceful = crate::interrupt::Graceful::begin();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        println!("serving http://{bound}/ (Ctrl-C stops)");
        std::io::stdout().flush()?;
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async move {
                while !crate::interrupt::requested() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                queue.cancel_all();
            })
            .await?;
        anyhow::Ok(())
    })?;
    eprintln!("stopped");
    Ok(())
}

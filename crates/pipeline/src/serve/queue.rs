//! One generation at a time: a worker thread owns the model and the device, and runs the
//! requests it takes from a queue. At most `1 + --queue` jobs are accepted and unfinished at
//! once; a request past that is refused at once (HTTP 429) instead of piling up memory. A job
//! leaves the count before its end is published, so a client that sends its next request after
//! the answer never finds the queue full because of its own last job.
//!
//! Each job publishes its [`Status`] on a `watch` channel (queued, step i of N, done, failed,
//! cancelled); a [`JobHandle`] held by the request cancels the job when it is dropped, so a
//! client that goes away stops its job at the next sampler step.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::http::StatusCode;
use tokio::sync::watch;

use ldm_common::device::{DeviceChoice, select};
use ldm_common::precision::Precision;

use super::error::ApiError;
use super::model::ModelInfo;
use crate::classifier_stage::ClassifierRun;
use crate::generate::{GenerateArgs, Generation, generate_images, request_warnings};
use crate::ldm_stage::LdmRun;

/// Where a job is.
#[derive(Debug, Clone)]
pub enum Status {
    /// Accepted; `ahead` jobs (the running one included) were ahead of it then.
    Queued {
        ahead: usize,
    },
    /// Sampling: `step` of `total` sampler steps done.
    Running {
        step: usize,
        total: usize,
    },
    /// Finished: the images, and warnings about the request (unknown prompt words, an
    /// ill-conditioned sampler start).
    Done {
        generation: Arc<Generation>,
        warnings: Vec<String>,
    },
    Failed(ApiError),
    /// Stopped by a cancel request (or its client leaving) after `step` steps.
    Cancelled {
        step: usize,
    },
}

impl Status {
    /// Whether the job is over.
    pub fn finished(&self) -> bool {
        matches!(
            self,
            Self::Done { .. } | Self::Failed(_) | Self::Cancelled { .. }
        )
    }
}

struct Job {
    args: GenerateArgs,
    cancel: Arc<AtomicBool>,
    status: watch::Sender<Status>,
}

#[derive(Clone)]
struct Entry {
    cancel: Arc<AtomicBool>,
    status: watch::Receiver<Status>,
}

/// The queue in front of the worker.
pub struct Queue {
    sender: Sender<Job>,
    /// Jobs accepted and not finished (the running one included).
    active: Arc<AtomicUsize>,
    next_id: AtomicU64,
    jobs: Mutex<HashMap<u64, Entry>>,
    capacity: usize,
}

/// A submitted job; dropping it cancels the job if it is still queued or running.
pub struct JobHandle {
    pub id: u64,
    /// Jobs ahead of this one when it was accepted (the running one included).
    pub ahead: usize,
    pub status: watch::Receiver<Status>,
    cancel: Arc<AtomicBool>,
    queue: Arc<Queue>,
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.queue.jobs.lock().unwrap().remove(&self.id);
    }
}

impl Queue {
    /// Loads the model (and the classifier behind `classifier_scale`, checked against it) on a
    /// new worker thread with `device` and starts it; returns when they are loaded, with what
    /// the API says about them.
    pub fn start(
        model: PathBuf,
        classifier: Option<PathBuf>,
        device: DeviceChoice,
        capacity: usize,
        precision: Option<Precision>,
    ) -> Result<(Arc<Self>, ModelInfo)> {
        let (sender, receiver) = channel::<Job>();
        let (loaded_tx, loaded_rx) = channel();
        let active = Arc::new(AtomicUsize::new(0));
        let worker_active = active.clone();
        std::thread::Builder::new()
            .name("generate".into())
            .spawn(move || {
                ldm_common::threads::on_worker_thread(move || {
                    let loaded = select(device).map_err(anyhow::Error::from).and_then(|d| {
                        let mut run = LdmRun::load(&model, &d.device)?;
                        // the weights cast once here, not on every request
                        run.set_sampling_precision(
                            precision.unwrap_or(run.config.sampler.precision),
                        );
                        let mut info = ModelInfo::of(&run, &d.description);
                        if let Some(dir) = classifier {
                            ClassifierRun::load(&dir, &d.device)?.check_model(&run)?;
                            info.classifier = Some(std::path::absolute(&dir).unwrap_or(dir));
                        }
                        Ok((run, d.device, info))
                    });
                    match loaded {
                        Ok((run, device, info)) => {
                            let _ = loaded_tx.send(Ok(info));
                            work(&run, &device, receiver, &worker_active);
                        }
                        Err(e) => {
                            let _ = loaded_tx.send(Err(e));
                        }
                    }
                })
            })?;
        let info = loaded_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the model loader stopped without an answer"))??;
        let queue = Arc::new(Self {
            sender,
            active,
            next_id: AtomicU64::new(1),
            jobs: Mutex::new(HashMap::new()),
            capacity,
        });
        Ok((queue, info))
    }

    /// Queues a generation, or refuses it with 429 when one job runs and `capacity` wait.
    pub fn submit(self: &Arc<Self>, args: GenerateArgs) -> Result<JobHandle, ApiError> {
        let admitted = self
            .active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n <= self.capacity).then_some(n + 1)
            });
        let ahead = admitted.map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "busy: one generation is running and {} wait (the server's --queue); retry later",
                    self.capacity
                ),
            )
        })?;
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = watch::channel(Status::Queued { ahead });
        let cancel = Arc::new(AtomicBool::new(false));
        // Registered before the worker can see it, so that a cancel always finds it.
        self.jobs.lock().unwrap().insert(
            id,
            Entry {
                cancel: cancel.clone(),
                status: rx.clone(),
            },
        );
        let handle = JobHandle {
            id,
            ahead,
            status: rx,
            cancel: cancel.clone(),
            queue: self.clone(),
        };
        let job = Job {
            args,
            cancel,
            status: tx,
        };
        if self.sender.send(job).is_err() {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the generation worker has stopped",
            ));
        }
        Ok(handle)
    }

    /// Asks a queued or running job to stop; `false` if there is no such job.
    pub fn cancel(&self, id: u64) -> bool {
        match self.jobs.lock().unwrap().get(&id) {
            Some(entry) => {
                entry.cancel.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Cancels every job (at shutdown).
    pub fn cancel_all(&self) {
        for entry in self.jobs.lock().unwrap().values() {
            entry.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// The status channel of a queued or running job.
    pub fn watch(&self, id: u64) -> Option<watch::Receiver<Status>> {
        self.jobs.lock().unwrap().get(&id).map(|e| e.status.clone())
    }
}

/// The worker loop: one job at a time, until every sender is gone.
fn work(run: &LdmRun, device: &burn::tensor::Device, jobs: Receiver<Job>, active: &AtomicUsize) {
    for job in jobs {
        let status = &job.status;
        if job.cancel.load(Ordering::SeqCst) {
            active.fetch_sub(1, Ordering::SeqCst);
            status.send_replace(Status::Cancelled { step: 0 });
            continue;
        }
        let mut last = 0;
        status.send_replace(Status::Running {
            step: 0,
            total: job.args.sampler.steps,
        });
        let mut progress = |step: usize, total: usize| {
            last = step;
            status.send_replace(Status::Running { step, total });
            !job.cancel.load(Ordering::SeqCst)
        };
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let warnings = request_warnings(run, &job.args)?;
            generate_images(run, &job.args, device, &mut progress).map(|g| (g, warnings))
        }));
        let end = match outcome {
            Ok(Ok((generation, warnings))) => Status::Done {
                generation: Arc::new(generation),
                warnings,
            },
            Ok(Err(_)) if job.cancel.load(Ordering::SeqCst) => Status::Cancelled { step: last },
            Ok(Err(e)) => Status::Failed(ApiError::from_library(&e, super::request::FIELDS)),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Status::Failed(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the generation failed: {what}"),
                ))
            }
        };
        active.fetch_sub(1, Ordering::SeqCst);
        status.send_replace(end);
    }
}

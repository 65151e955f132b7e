//! Training, shared by every stage: config, loop, metrics and resumable state.

pub mod config;
pub mod metrics;
pub mod parallel;
pub mod state;
pub mod trainer;

pub use config::{TrainConfig, TrainOverrides};
pub use parallel::ShardedTask;
pub use trainer::{Outcome, TrainTask, train, train_sharded};

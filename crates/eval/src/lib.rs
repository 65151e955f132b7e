//! Yardsticks for the three stages: evaluator CNN, FID, precision/recall, PSNR, SSIM.

pub mod error;
pub mod evaluator;
pub mod features;
pub mod frechet;
mod images;
pub mod prdc;
pub mod psnr;
pub mod ssim;
pub mod train;

pub use error::EvalError;
pub use evaluator::{Evaluator, EvaluatorConfig};
pub use features::Features;
pub use frechet::{GaussianStats, fid, frechet_distance};
pub use prdc::{DEFAULT_K, PrecisionRecall, precision_recall};
pub use psnr::{mean_psnr, psnr, psnr_per_image};
pub use ssim::{mean_ssim, ssim, ssim_per_image};
pub use train::{StepMetrics, accuracy, train_step};

//! Yardsticks for the three stages: evaluator CNN, FID (overall and per class), KID,
//! precision/recall, PSNR, SSIM.

pub mod class_fid;
pub mod error;
pub mod evaluator;
pub mod features;
pub mod frechet;
mod images;
pub mod kid;
pub mod pca;
pub mod prdc;
pub mod psnr;
pub mod ssim;

pub use class_fid::{ClassFid, ClassFidReport, class_fids};
pub use error::EvalError;
pub use evaluator::{Evaluator, EvaluatorConfig, batch_accuracy};
pub use features::Features;
pub use frechet::{GaussianStats, fid, frechet_distance};
pub use kid::{feature_scale, kid};
pub use pca::Pca;
pub use prdc::{DEFAULT_K, PrecisionRecall, precision_recall};
pub use psnr::{mean_psnr, psnr, psnr_per_image};
pub use ssim::{mean_ssim, ssim, ssim_per_image};

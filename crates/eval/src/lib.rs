//! Yardsticks for the three stages: evaluator CNN, FID, precision/recall, PSNR, SSIM.

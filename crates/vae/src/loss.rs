//! The VAE objective: the negative ELBO (Luo 2022 eq. 19) with a weighted KL.

use burn::prelude::*;

use crate::config::Reconstruction;
use crate::model::Posterior;

/// The loss of one batch and its parts (scalars as 1-element tensors, so no host sync is
/// forced until they are read).
#[derive(Debug, Clone)]
pub struct VaeLoss {
    pub loss: Tensor<1>,
    /// Mean reconstruction error per pixel.
    pub recon: Tensor<1>,
    /// Mean KL per latent dimension, in nats.
    pub kl: Tensor<1>,
    /// The decoded images, `[batch, channels, h, w]`.
    pub reconstruction: Tensor<4>,
}

/// KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) per latent element
/// (Kingma & Welling 2014, appendix B).
pub fn kl_to_standard_normal(q: &Posterior) -> Tensor<4> {
    (q.mean.clone().powi_scalar(2) + q.logvar.clone().exp() - q.logvar.clone() - 1.0) * 0.5
}

/// Mean absolute (L1) or squared (L2) error per element.
pub fn reconstruction_loss(x_hat: Tensor<4>, x: Tensor<4>, kind: Reconstruction) -> Tensor<1> {
    let diff = x_hat - x;
    match kind {
        Reconstruction::L1 => diff.abs().mean(),
        Reconstruction::L2 => diff.powi_scalar(2).mean(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ldm_common::tensor::to_vec_f32 as values;

    #[test]
    fn kl_matches_hand_computed_values() {
        let device = Device::flex();
        // mu = 1, sigma^2 = e (logvar 1): 0.5 (1 + e - 1 - 1) = 0.5 (e - 1) = 0.859140914
        // mu = 0, logvar = 0: 0.  mu = -2, logvar = ln 0.25: 0.5 (4 + 0.25 - 1 + 1.386294361) = 2.318147181
        let q = Posterior {
            mean: Tensor::<4>::from_floats([[[[1.0, 0.0, -2.0]]]], &device),
            logvar: Tensor::<4>::from_floats([[[[1.0, 0.0, 0.25f32.ln()]]]], &device),
        };
        let kl = values(kl_to_standard_normal(&q));
        let expected = [0.859_140_9, 0.0, 2.318_147_2];
        for (a, b) in kl.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{kl:?}");
        }
    }

    #[test]
    fn reconstruction_losses() {
        let device = Device::flex();
        let a = Tensor::<4>::from_floats([[[[1.0, -1.0, 0.5, 0.0]]]], &device);
        let b = Tensor::<4>::from_floats([[[[0.0, 1.0, 0.5, 0.0]]]], &device);
        let l1 = values(reconstruction_loss(
            a.clone(),
            b.clone(),
            Reconstruction::L1,
        ))[0];
        let l2 = values(reconstruction_loss(a, b, Reconstruction::L2))[0];
        assert!((l1 - 0.75).abs() < 1e-7);
        assert!((l2 - 1.25).abs() < 1e-7);
    }
}

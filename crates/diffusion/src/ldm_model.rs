//! The network that is trained: a backbone (U-Net or DiT) and, for a text-conditioned model,
//! the text encoder tau_theta trained jointly with it (Rombach et al. 2022, eq. 3:
//! L = E ||eps - eps_theta(z_t, t, tau_theta(y))||^2, minimised over both). One module, so the
//! optimizer, the EMA, checkpoints and published weights always cover both.

use burn::prelude::*;
use burn::tensor::{Bool, Int};
use ldm_common::precision::{param_dtype, to_dtype, to_f32};

use crate::backbone::{BackboneConfig, BackboneModel, ConditioningSpec};
use crate::denoiser::{Backbone, Conditioning, TextConditioning};
use crate::error::Result;
use crate::text_encoder::{TextEncoder, TextEncoderConfig};

/// A backbone and its optional text encoder.
#[derive(Module, Debug)]
pub struct LdmModel {
    pub backbone: BackboneModel,
    pub text_encoder: Option<TextEncoder>,
}

impl LdmModel {
    /// Validates the configs, then builds the backbone for `latent_channels x latent_size x
    /// latent_size` latents, class-conditional with `num_classes` classes, and text-conditional
    /// when a text encoder config is given (its width is the backbone's `text_dim`).
    pub fn init(
        backbone: &BackboneConfig,
        latent_channels: usize,
        latent_size: usize,
        num_classes: Option<usize>,
        text: Option<&TextEncoderConfig>,
        device: &Device,
    ) -> Result<Self> {
        if let Some(t) = text {
            t.validate()?;
        }
        let spec = ConditioningSpec {
            num_classes,
            text_dim: text.map(|t| t.dim),
        };
        Ok(Self {
            backbone: backbone.init(latent_channels, latent_size, &spec, device)?,
            text_encoder: text.map(|t| t.init(device)),
        })
    }

    /// tau_theta(y) of a batch of token ids, or `None` for a model without text.
    ///
    /// # Shapes
    /// - `tokens`, `padding_mask`: `[batch, len]` (true = padding)
    /// - output: tokens `[batch, len, dim]`, pooled `[batch, dim]`
    pub fn encode_text(
        &self,
        tokens: Tensor<2, Int>,
        padding_mask: Tensor<2, Bool>,
    ) -> Option<TextConditioning> {
        self.text_encoder
            .as_ref()
            .map(|encoder| encoder.forward(tokens, padding_mask))
    }
}

impl Backbone for LdmModel {
    /// In the weights' dtype (bf16 under mixed precision: `ldm_common::precision`), out in f32;
    /// t stays f32 for the sinusoidal embedding.
    fn forward(&self, z_t: Tensor<4>, t: Tensor<1>, cond: &Conditioning) -> Tensor<4> {
        let z_t = to_dtype(z_t, param_dtype(self));
        to_f32(self.backbone.forward(z_t, t, cond))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::test_util::perturb;
    use crate::dit::{DiTConfig, MlpActivation, PosEmbed};
    use burn::optim::{AdamConfig, GradientsParams};
    use burn::tensor::TensorData;
    use ldm_common::rng::{randn, stream};
    use ldm_common::tensor::{scalar, to_vec_f32};

    fn dit() -> BackboneConfig {
        BackboneConfig::DiT(DiTConfig {
            patch_size: 2,
            hidden_size: 16,
            depth: 1,
            num_heads: 2,
            mlp_ratio: 2.0,
            pos_embed: PosEmbed::Sincos,
            activation: MlpActivation::Gelu,
        })
    }

    fn text() -> TextEncoderConfig {
        TextEncoderConfig {
            vocab_size: 12,
            max_len: 4,
            dim: 8,
            depth: 1,
            heads: 2,
        }
    }

    fn ids(rows: &[[i64; 4]], device: &Device) -> (Tensor<2, Int>, Tensor<2, Bool>) {
        let flat: Vec<i64> = rows.iter().flatten().copied().collect();
        let pad: Vec<bool> = flat.iter().map(|&i| i == 0).collect();
        (
            Tensor::from_ints(TensorData::new(flat, [rows.len(), 4]), device),
            Tensor::from_bool(TensorData::new(pad, [rows.len(), 4]), device),
        )
    }

    /// The text encoder is part of the module (its parameters are counted and saved), and a
    /// model without text has none.
    #[test]
    fn the_text_encoder_is_part_of_the_module() {
        let device = Device::flex();
        device.seed(61);
        let plain = LdmModel::init(&dit(), 4, 8, Some(3), None, &device).unwrap();
        let with_text = LdmModel::init(&dit(), 4, 8, None, Some(&text()), &device).unwrap();
        assert!(plain.text_encoder.is_none());
        let encoder = with_text.text_encoder.as_ref().unwrap().num_params();
        assert!(encoder > 0);
        assert!(with_text.num_params() > encoder);
        let (t, m) = ids(&[[2, 5, 0, 0]], &device);
        assert!(plain.encode_text(t.clone(), m.clone()).is_none());
        assert_eq!(
            with_text.encode_text(t, m).unwrap().tokens.dims(),
            [1, 4, 8]
        );
        let err = LdmModel::init(
            &dit(),
            4,
            8,
            None,
            Some(&TextEncoderConfig { heads: 3, ..text() }),
            &device,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("text_encoder.heads = 3"), "{err}");
    }

    /// Mixed precision: a bf16 compute copy of a class DiT, a U-Net and a text DiT takes f32
    /// inputs, hands back f32 close to the f32 model's output (bf16 keeps 8 bits of mantissa),
    /// and its backward puts f32 gradients on every weight of the f32 model.
    #[test]
    fn bf16_compute_copies_match_f32_and_train_the_f32_weights() {
        use crate::unet::UNetConfig;
        use burn::tensor::DType;
        use ldm_common::precision::{Precision, param_dtype};
        let device = Device::flex().autodiff();
        device.seed(63);
        let unet = BackboneConfig::UNet(UNetConfig {
            base_channels: 8,
            channel_mult: vec![1, 2],
            num_res_blocks: 1,
            attention_levels: vec![1],
            num_heads: 2,
            groups: 4,
            dropout: 0.0,
        });
        let cases: [(&str, BackboneConfig, bool); 3] = [
            ("dit", dit(), false),
            ("unet", unet, false),
            ("text dit", dit(), true),
        ];
        for (name, backbone, with_text) in cases {
            let classes = (!with_text).then_some(3);
            let text_cfg = with_text.then(text);
            let master =
                LdmModel::init(&backbone, 4, 8, classes, text_cfg.as_ref(), &device).unwrap();
            let master = perturb(master, 0.05, 63);
            let z = randn(&mut stream(63, "z", 0), [2, 4, 8, 8], &device);
            let (t, m) = ids(&[[2, 5, 6, 0], [2, 7, 0, 0]], &device);
            let labels = Tensor::<1, Int>::from_ints([0, 2], &device);
            let run = |precision: Precision| {
                let model = precision.compute_copy(&master);
                let cond = Conditioning {
                    class: classes.map(|_| labels.clone()),
                    text: model.encode_text(t.clone(), m.clone()),
                };
                let steps = Tensor::<1>::from_floats([10.0, 500.0], &device);
                let out = model.forward(z.clone(), steps, &cond);
                assert_eq!(out.dtype(), DType::F32, "{name}: the output is f32");
                let grads =
                    GradientsParams::from_grads(out.clone().square().mean().backward(), &master);
                (to_vec_f32(out), grads)
            };
            let (full, full_grads) = run(Precision::F32);
            let (mixed, grads) = run(Precision::Bf16);
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            let diff: Vec<f32> = full.iter().zip(&mixed).map(|(a, b)| a - b).collect();
            let rel = norm(&diff) / norm(&full);
            assert!(rel < 0.03, "{name}: bf16 output off by {rel} (relative)");
            assert!(rel > 0.0, "{name}: identical outputs: nothing ran in bf16");
            assert!(!grads.is_empty());
            assert_eq!(
                grads.len(),
                full_grads.len(),
                "{name}: a gradient per weight"
            );
            assert_eq!(param_dtype(&master), DType::F32);
        }
    }

    /// One optimizer step on the denoising loss changes what the text encoder outputs: the
    /// gradient reaches it through cross-attention and the pooled embedding.
    #[test]
    fn joint_training_updates_the_text_encoder() {
        let device = Device::flex().autodiff();
        device.seed(62);
        let model = LdmModel::init(&dit(), 4, 8, None, Some(&text()), &device).unwrap();
        let model = perturb(model, 0.05, 62);
        let (t, m) = ids(&[[2, 5, 6, 0], [2, 7, 0, 0]], &device);
        let z = randn(&mut stream(62, "z", 0), [2, 4, 8, 8], &device);
        let target = randn(&mut stream(62, "eps", 0), [2, 4, 8, 8], &device);
        let pooled =
            |model: &LdmModel| to_vec_f32(model.encode_text(t.clone(), m.clone()).unwrap().pooled);
        let before = pooled(&model);
        let cond = Conditioning {
            class: None,
            text: model.encode_text(t.clone(), m.clone()),
        };
        let steps = Tensor::<1>::from_floats([10.0, 500.0], &device);
        let loss = (model.forward(z, steps, &cond) - target).square().mean();
        assert!(scalar(loss.clone()).is_finite());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let mut optim = AdamConfig::new().init();
        let model = optim.step(1e-2, model, grads);
        assert_ne!(before, pooled(&model), "the text encoder did not move");
    }
}

//! FID per class: the generated images of class c against the held-out real images of class
//! c, next to the floor of that class (two disjoint halves of its real images at the same
//! sample size).
//!
//! FID fits a d x d covariance to each set, so it is undefined for n <= d samples: a class
//! with fewer images than the evaluator has features (Animal-MNIST holds out 100 per class,
//! halves of 50, for d = 128) gets no full-dimensional figure, and the report says why. Each
//! class is also scored in the top-k principal directions of the pooled real held-out
//! features (k = [`PCA_DIM`]), fitted on real data only: an orthogonal projection cannot
//! increase the Fréchet (2-Wasserstein) distance of Gaussians, so that figure is a lower
//! bound of the full one, reported under its own name with the variance the k directions keep.
//! KID ([`crate::kid`]) needs no covariance: each class gets it in the full d from two
//! images up, with its floor on the same halves.

use serde::Serialize;

use crate::error::{EvalError, Result};
use crate::features::Features;
use crate::frechet::fid;
use crate::kid::{feature_scale, kid};
use crate::pca::Pca;

/// k of the principal-direction FID: small enough for 50 samples per set.
pub const PCA_DIM: usize = 16;

/// The figures of one class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassFid {
    pub class: String,
    /// Generated images of the class, G.
    pub generated: usize,
    /// Held-out real images of the class, R.
    pub held_out: usize,
    /// Real images compared with the generated ones: the first min(G, R) of the class.
    pub real: usize,
    /// Images in each disjoint half of the floor: the first and the last min(G, R / 2).
    pub floor_size: usize,
    /// FID in the evaluator's d features (null where a set has n <= d, see `note`).
    pub fid: Option<f64>,
    pub fid_floor: Option<f64>,
    /// FID in the report's `pca_dim` principal directions (a lower bound of `fid`).
    pub fid_pca: Option<f64>,
    pub fid_pca_floor: Option<f64>,
    /// KID in the evaluator's d features (null where a set has fewer than 2 images).
    pub kid: Option<f64>,
    pub kid_floor: Option<f64>,
    /// Why a figure is null.
    pub note: Option<String>,
}

/// Per-class FID of a model, with the dimensions it was measured in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassFidReport {
    /// d: the evaluator's feature dimension.
    pub feature_dim: usize,
    /// k: the principal directions of `fid_pca`, min([`PCA_DIM`], d).
    pub pca_dim: usize,
    /// Fraction of the pooled real features' variance the k directions keep (null when the
    /// held-out set is too small to fit them).
    pub pca_explained_variance: Option<f64>,
    pub classes: Vec<ClassFid>,
}

/// Scores every class of `class_names`: `real` are the held-out features with their labels,
/// `generated` the generated features with the labels they were conditioned on.
pub fn class_fids(
    class_names: &[String],
    real: &Features,
    real_labels: &[usize],
    generated: &Features,
    generated_labels: &[usize],
) -> Result<ClassFidReport> {
    for (what, set, labels) in [
        ("real features and labels", real, real_labels),
        ("generated features and labels", generated, generated_labels),
    ] {
        if set.len() != labels.len() {
            return Err(EvalError::ShapeMismatch {
                what,
                left: format!("{} samples", set.len()),
                right: format!("{} labels", labels.len()),
            });
        }
    }
    if real.dim() != generated.dim() {
        return Err(EvalError::FeatureDims {
            real: real.dim(),
            generated: generated.dim(),
        });
    }
    let d = real.dim();
    let pca_dim = PCA_DIM.min(d);
    let pca = Pca::fit(real, pca_dim).ok();
    let scale = feature_scale(real);
    let rows_of = |labels: &[usize], c: usize| -> Vec<usize> {
        (0..labels.len()).filter(|&i| labels[i] == c).collect()
    };
    let mut classes = Vec::with_capacity(class_names.len());
    for (c, name) in class_names.iter().enumerate() {
        let (gen_rows, real_rows) = (rows_of(generated_labels, c), rows_of(real_labels, c));
        let (g, r) = (gen_rows.len(), real_rows.len());
        let (n_real, half) = (g.min(r), g.min(r / 2));
        let gen_c = generated.select(&gen_rows);
        let real_c = real.select(&real_rows[..n_real]);
        let floor_a = real.select(&real_rows[..half]);
        let floor_b = real.select(&real_rows[r - half..]);
        let mut notes = Vec::new();
        let [fid_full, floor_full] = pair(d, [(&real_c, &gen_c), (&floor_a, &floor_b)])?;
        if fid_full.is_none() || floor_full.is_none() {
            notes.push(shortfall(&format!("d = {d}"), d, g, r, half));
        }
        let [fid_pca, floor_pca] = match &pca {
            Some(p) => {
                let proj = |f: &Features| p.project(f);
                let (real_p, gen_p) = (proj(&real_c)?, proj(&gen_c)?);
                let (a_p, b_p) = (proj(&floor_a)?, proj(&floor_b)?);
                let figures = pair(pca_dim, [(&real_p, &gen_p), (&a_p, &b_p)])?;
                if figures.iter().any(Option::is_none) {
                    notes.push(shortfall(&format!("k = {pca_dim}"), pca_dim, g, r, half));
                }
                figures
            }
            None => {
                notes.push(format!(
                    "no principal directions: the held-out set has {} images for d = {d}",
                    real.len()
                ));
                [None, None]
            }
        };
        let kernel =
            |a: &Features, b: &Features| (a.len() >= 2 && b.len() >= 2).then(|| kid(a, b, scale));
        let kid_c = kernel(&real_c, &gen_c).transpose()?;
        let kid_floor = kernel(&floor_a, &floor_b).transpose()?;
        classes.push(ClassFid {
            class: name.clone(),
            generated: g,
            held_out: r,
            real: n_real,
            floor_size: half,
            fid: fid_full,
            fid_floor: floor_full,
            fid_pca,
            fid_pca_floor: floor_pca,
            kid: kid_c,
            kid_floor,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        });
    }
    Ok(ClassFidReport {
        feature_dim: d,
        pca_dim,
        pca_explained_variance: pca.map(|p| p.explained_variance()),
        classes,
    })
}

/// FID of each pair of sets, or `None` for a pair where a set has n <= `dim` samples.
fn pair(dim: usize, sets: [(&Features, &Features); 2]) -> Result<[Option<f64>; 2]> {
    let one = |(a, b): (&Features, &Features)| -> Result<Option<f64>> {
        if a.len().min(b.len()) <= dim {
            Ok(None)
        } else {
            fid(a, b).map(Some)
        }
    };
    Ok([one(sets[0])?, one(sets[1])?])
}

/// Why FID in `space` (of `dim` dimensions) is undefined for a class with `generated`
/// images, `held_out` real ones and floor halves of `half`.
fn shortfall(space: &str, dim: usize, generated: usize, held_out: usize, half: usize) -> String {
    let mut short = Vec::new();
    if generated <= dim {
        short.push(format!("{generated} generated"));
    }
    if held_out <= dim {
        short.push(format!("{held_out} held-out"));
    }
    if half <= dim {
        short.push(format!("floor halves of {half}"));
    }
    format!(
        "FID in {space} needs more than {dim} images per set, got {} (-n {} or more and at least {} held-out images of the class)",
        short.join(", "),
        dim + 1,
        2 * (dim + 1)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` samples of `d` features around `centre`, deterministic.
    fn blob(seed: u64, n: usize, d: usize, centre: f32) -> Features {
        let mut rng = ldm_common::rng::stream(seed, "features", 0);
        let z = ldm_common::rng::randn(&mut rng, [n, d], &burn::tensor::Device::flex());
        let f = Features::from_tensor(z);
        let rows: Vec<Vec<f32>> = f
            .rows()
            .map(|r| r.iter().map(|v| v + centre).collect())
            .collect();
        Features::from_rows(&rows).unwrap()
    }

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|c| format!("c{c}")).collect()
    }

    /// Class c of `counts[c]` samples centred at `2c`, classes concatenated in order.
    fn labelled(seed: u64, counts: &[usize], d: usize, offset: f32) -> (Features, Vec<usize>) {
        let mut all: Option<Features> = None;
        let mut labels = Vec::new();
        for (c, &n) in counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let f = blob(seed + c as u64, n, d, 2.0 * c as f32 + offset);
            labels.extend(std::iter::repeat_n(c, n));
            match &mut all {
                Some(a) => a.append(&f).unwrap(),
                None => all = Some(f),
            }
        }
        (all.unwrap(), labels)
    }

    #[test]
    fn per_class_figures_match_fid_on_the_class_subsets() {
        let d = 3;
        let (real, real_labels) = labelled(10, &[40, 40], d, 0.0);
        // class 1 of the "model" is shifted by 1.5 in every coordinate
        let (generated, gen_labels) = labelled(20, &[10, 10], d, 0.0);
        let shifted: Vec<Vec<f32>> = generated
            .rows()
            .zip(&gen_labels)
            .map(|(r, &l)| r.iter().map(|v| v + 1.5 * l as f32).collect())
            .collect();
        let generated = Features::from_rows(&shifted).unwrap();
        let report = class_fids(&names(2), &real, &real_labels, &generated, &gen_labels).unwrap();
        assert_eq!((report.feature_dim, report.pca_dim), (3, 3));
        let c1 = &report.classes[1];
        assert_eq!(
            (c1.generated, c1.held_out, c1.real, c1.floor_size),
            (10, 40, 10, 10)
        );
        let expected = fid(
            &real.select(&(40..50).collect::<Vec<_>>()),
            &generated.select(&(10..20).collect::<Vec<_>>()),
        )
        .unwrap();
        assert!((c1.fid.unwrap() - expected).abs() < 1e-9);
        let floor = fid(
            &real.select(&(40..50).collect::<Vec<_>>()),
            &real.select(&(70..80).collect::<Vec<_>>()),
        )
        .unwrap();
        assert!((c1.fid_floor.unwrap() - floor).abs() < 1e-9);
        // the shifted class is far above its floor; the faithful class is not
        let c0 = &report.classes[0];
        assert!(c1.fid.unwrap() > 5.0 && c1.fid.unwrap() > 3.0 * c1.fid_floor.unwrap());
        assert!(c0.fid.unwrap() < c1.fid.unwrap() / 3.0, "{c0:?} {c1:?}");
        // k = d: the principal directions only rotate, FID is unchanged
        assert!((c1.fid_pca.unwrap() - c1.fid.unwrap()).abs() < 1e-4 * c1.fid.unwrap());
        assert!(c1.note.is_none());
        // KID on the same subsets, far above the faithful class's
        let expected_kid = kid(
            &real.select(&(40..50).collect::<Vec<_>>()),
            &generated.select(&(10..20).collect::<Vec<_>>()),
            feature_scale(&real),
        )
        .unwrap();
        assert!((c1.kid.unwrap() - expected_kid).abs() < 1e-12);
        assert!(
            c1.kid.unwrap() > 10.0 * c0.kid.unwrap().abs(),
            "{c0:?} {c1:?}"
        );
        assert!(
            c1.kid.unwrap() > 10.0 * c1.kid_floor.unwrap().abs(),
            "{c1:?}"
        );
    }

    #[test]
    fn too_few_samples_give_null_and_a_reason_not_a_number() {
        let d = 40;
        // 30 generated per class > k = 16 but <= d = 40; 60 held-out: halves of 30
        let (real, real_labels) = labelled(1, &[60, 60, 0], d, 0.0);
        let (generated, gen_labels) = labelled(2, &[30, 30, 30], d, 0.0);
        let report = class_fids(&names(3), &real, &real_labels, &generated, &gen_labels).unwrap();
        assert_eq!(report.pca_dim, PCA_DIM);
        let v = report.pca_explained_variance.unwrap();
        assert!(v > 0.0 && v < 1.0, "{v}");
        let c0 = &report.classes[0];
        assert_eq!((c0.fid, c0.fid_floor), (None, None));
        assert!(c0.fid_pca.unwrap().is_finite() && c0.fid_pca_floor.unwrap().is_finite());
        assert_eq!(
            c0.note.as_deref(),
            Some(
                "FID in d = 40 needs more than 40 images per set, got 30 generated, floor halves of 30 (-n 41 or more and at least 82 held-out images of the class)"
            )
        );
        // KID needs no covariance: defined in the full d from 30 images
        assert!(c0.kid.unwrap().is_finite() && c0.kid_floor.unwrap().is_finite());
        // a class without held-out images
        let c2 = &report.classes[2];
        assert_eq!((c2.held_out, c2.real, c2.floor_size), (0, 0, 0));
        assert!(c2.fid.is_none() && c2.fid_pca.is_none() && c2.fid_pca_floor.is_none());
        assert!(c2.kid.is_none() && c2.kid_floor.is_none());
        assert!(c2.note.as_deref().unwrap().contains("k = 16"), "{c2:?}");
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["classes"][0]["fid"].is_null());
        assert!(json["classes"][0]["fid_pca"].as_f64().is_some());
    }

    #[test]
    fn mismatched_inputs_are_refused() {
        let (real, labels) = labelled(1, &[5], 2, 0.0);
        let err = class_fids(&names(1), &real, &labels[..4], &real, &labels).unwrap_err();
        assert_eq!(
            err.to_string(),
            "real features and labels: shapes differ, 5 samples vs 4 labels"
        );
        let other = Features::new(vec![0.0; 3], 3).unwrap();
        assert!(matches!(
            class_fids(&names(1), &real, &labels, &other, &[0]).unwrap_err(),
            EvalError::FeatureDims { .. }
        ));
    }
}

//! Feature sets: n samples of d features each, row-major, as the evaluator's penultimate layer
//! emits them; the input of FID and precision/recall.

use burn::tensor::Tensor;

use crate::error::{EvalError, Result};

/// `len()` samples of `dim()` features, stored row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    values: Vec<f32>,
    dim: usize,
}

impl Features {
    /// Rows of `dim` features laid end to end; `values.len()` must be a multiple of `dim`.
    pub fn new(values: Vec<f32>, dim: usize) -> Result<Self> {
        if dim == 0 || !values.len().is_multiple_of(dim) {
            return Err(EvalError::RaggedFeatures {
                what: "features".into(),
                len: values.len(),
                dim,
            });
        }
        Ok(Self { values, dim })
    }

    /// One `Vec` per sample, all of the same length (at least one row).
    pub fn from_rows(rows: &[Vec<f32>]) -> Result<Self> {
        let dim = rows.first().map_or(0, Vec::len);
        if let Some((i, row)) = rows.iter().enumerate().find(|(_, r)| r.len() != dim) {
            return Err(EvalError::RaggedFeatures {
                what: format!("feature row {i}"),
                len: row.len(),
                dim,
            });
        }
        Self::new(rows.concat(), dim)
    }

    /// The rows of a `[n, d]` tensor (one device sync).
    pub fn from_tensor(features: Tensor<2>) -> Self {
        let [_, dim] = features.dims();
        let values = ldm_common::tensor::to_vec_f32(features);
        Self { values, dim }
    }

    /// Appends the samples of `other`, which must have the same dimension.
    pub fn append(&mut self, other: &Features) -> Result<()> {
        if other.dim != self.dim {
            return Err(EvalError::ShapeMismatch {
                what: "appending features",
                left: format!("d = {}", self.dim),
                right: format!("d = {}", other.dim),
            });
        }
        self.values.extend_from_slice(&other.values);
        Ok(())
    }

    /// Number of samples n.
    pub fn len(&self) -> usize {
        self.values.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Number of features d per sample.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Sample `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    /// All samples in order.
    pub fn rows(&self) -> std::slice::ChunksExact<'_, f32> {
        self.values.chunks_exact(self.dim)
    }

    /// The samples at `indices`, in that order (each index below `len()`).
    pub fn select(&self, indices: &[usize]) -> Features {
        let values = indices.iter().flat_map(|&i| self.row(i)).copied().collect();
        Self {
            values,
            dim: self.dim,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn rows_round_trip_and_errors() {
        let f = Features::from_rows(&[vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 6.0]]).unwrap();
        assert_eq!((f.len(), f.dim()), (3, 2));
        assert_eq!(f.row(1), &[3.0, 4.0]);
        assert_eq!(f.rows().count(), 3);

        let err = Features::from_rows(&[vec![1.0, 2.0], vec![3.0]]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "feature row 1: 1 values do not form rows of 2 features; expected a multiple of 2"
        );
        assert!(Features::new(vec![1.0; 5], 2).is_err());
        assert!(Features::from_rows(&[]).is_err());
    }

    #[test]
    fn from_tensor_keeps_row_order() {
        let device = Device::flex();
        let t = Tensor::<2>::from_floats([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], &device);
        let mut f = Features::from_tensor(t);
        assert_eq!((f.len(), f.dim()), (2, 3));
        assert_eq!(f.row(1), &[4.0, 5.0, 6.0]);
        f.append(&f.clone()).unwrap();
        assert_eq!(f.len(), 4);
        assert!(f.append(&Features::new(vec![0.0; 2], 2).unwrap()).is_err());
        let picked = f.select(&[3, 0]);
        assert_eq!((picked.len(), picked.dim()), (2, 3));
        assert_eq!(picked.row(0), &[4.0, 5.0, 6.0]);
        assert_eq!(picked.row(1), &[1.0, 2.0, 3.0]);
        assert!(f.select(&[]).is_empty());
    }
}

//! Many libtorch tensors as one flat tensor and back: the buffers of the multi-tensor
//! (`foreach`) optimizer step and EMA update, which touch every parameter with a dozen kernel
//! launches instead of a dozen per parameter.
//!
//! [`split`] hands the pieces of a flat result back as views of it, in order, so that the next
//! step's [`flatten`] of the same list finds them side by side in one storage and takes a view
//! of the whole instead of copying (as PyTorch's `_foreach_*` kernels work on the tensors where
//! they lie; tch does not bind those kernels).

#![allow(deprecated)]

use std::sync::Arc;

use burn::backend::libtorch::{Storage, TchTensor};
use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};

/// The tensors' elements as one 1-D tensor, in order: a view when they are contiguous,
/// consecutive pieces of one storage (as [`split`] leaves them), else a copy (`torch.cat`).
pub(crate) fn flatten(parts: &[&tch::Tensor]) -> tch::Tensor {
    if let Some(view) = consecutive_view(parts) {
        return view;
    }
    let pieces: Vec<tch::Tensor> = parts.iter().map(|t| t.reshape([-1])).collect();
    tch::Tensor::cat(&pieces, 0)
}

/// A view of `parts` as one 1-D tensor if each starts where the previous one ends, all
/// contiguous, of one dtype and device. The view is taken on the first part's storage, and
/// libtorch refuses one that reaches past that storage's end, so pieces of different
/// allocations that happen to lie side by side are copied, not viewed.
fn consecutive_view(parts: &[&tch::Tensor]) -> Option<tch::Tensor> {
    let first = parts.first()?;
    let (kind, device) = (first.kind(), first.device());
    let element = kind.elt_size_in_bytes();
    let mut next = first.data_ptr() as usize;
    let mut total = 0usize;
    for t in parts {
        let n = t.numel();
        if n == 0 {
            continue;
        }
        if t.kind() != kind
            || t.device() != device
            || !t.is_contiguous()
            || t.data_ptr() as usize != next
        {
            return None;
        }
        total += n;
        next += n * element;
    }
    first.f_as_strided([total as i64], [1], None).ok()
}

/// `parts` as one flat tensor that may be written in place: each part a view of one buffer
/// (as [`split`] leaves them), side by side, that buffer held by no other handle than
/// `handles` on each part (a module's and the caller's copy, say), and none of `others` (the
/// tensors to be read; contiguous ones only) in its memory; `None` otherwise. Writing through
/// it changes every handle on the parts, so the caller must know them all.
pub(crate) fn exclusive_flat(
    parts: &[&TchTensor],
    handles: usize,
    others: &[&TchTensor],
) -> Option<tch::Tensor> {
    let Storage::View { buffer_ref, .. } = &parts.first()?.storage else {
        return None;
    };
    let one_buffer = parts.iter().all(
        |t| matches!(&t.storage, Storage::View { buffer_ref: b, .. } if Arc::ptr_eq(b, buffer_ref)),
    );
    if !one_buffer || Arc::strong_count(buffer_ref) != parts.len() * handles {
        return None;
    }
    let flat = consecutive_view(&parts.iter().map(|t| &t.tensor).collect::<Vec<_>>())?;
    // the others' memory, whoever holds it, must lie outside
    let start = flat.data_ptr() as usize;
    let end = start + flat.numel() * flat.kind().elt_size_in_bytes();
    let outside = |t: &&TchTensor| {
        let at = t.tensor.data_ptr() as usize;
        let size = t.tensor.numel() * t.tensor.kind().elt_size_in_bytes();
        t.tensor.is_contiguous() && (at + size <= start || at >= end)
    };
    others.iter().all(outside).then_some(flat)
}

/// `flat`'s elements as tensors of `shapes`, in order, each a view of `flat` that burn-tch
/// knows shares its buffer (so it is never updated in place while another piece is alive).
pub(crate) fn split(flat: &tch::Tensor, shapes: &[Vec<i64>]) -> Vec<TchTensor> {
    #[allow(clippy::arc_with_non_send_sync)]
    let buffer_ref = Arc::new(flat.data_ptr());
    let mut offset = 0i64;
    shapes
        .iter()
        .map(|shape| {
            let view = flat.as_strided(shape.as_slice(), contiguous_strides(shape), offset);
            offset += shape.iter().product::<i64>();
            #[allow(clippy::arc_with_non_send_sync)]
            let view_ref = Arc::new(view.data_ptr());
            TchTensor {
                tensor: view,
                storage: Storage::View {
                    buffer_ref: buffer_ref.clone(),
                    view_ref,
                },
            }
        })
        .collect()
}

/// The libtorch tensor of a dispatch tensor on burn-tch without autodiff (a parameter's
/// inner value, a gradient, a moment).
pub(crate) fn to_tch(t: DispatchTensor) -> TchTensor {
    match t.kind {
        DispatchTensorKind::LibTorch(BackendTensor::Float(t)) => t,
        _ => unreachable!("expected a libtorch float tensor without autodiff"),
    }
}

/// The libtorch tensor inside a dispatch tensor on burn-tch without autodiff, if it is one.
pub(crate) fn as_tch(t: &DispatchTensor) -> Option<&tch::Tensor> {
    as_tch_tensor(t).map(|t| &t.tensor)
}

/// [`as_tch`] with burn-tch's handle on its storage.
pub(crate) fn as_tch_tensor(t: &DispatchTensor) -> Option<&TchTensor> {
    match &t.kind {
        DispatchTensorKind::LibTorch(BackendTensor::Float(t)) => Some(t),
        _ => None,
    }
}

/// The dispatch tensor of a libtorch tensor (without autodiff).
pub(crate) fn from_tch(t: TchTensor) -> DispatchTensor {
    DispatchTensor {
        kind: DispatchTensorKind::LibTorch(BackendTensor::Float(t)),
        autodiff: DispatchAutodiffContext::Disabled,
    }
}

/// Row-major strides of `shape`.
fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &tch::Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.reshape([-1])).unwrap()
    }

    #[test]
    fn split_then_flatten_is_a_view_and_separate_tensors_are_copied() {
        let flat = tch::Tensor::arange(2 * 3 + 4 + 5, (tch::Kind::Float, tch::Device::Cpu));
        let shapes = vec![vec![2, 3], vec![4], vec![5, 1]];
        let pieces = split(&flat, &shapes);
        assert_eq!(pieces[0].tensor.size(), [2, 3]);
        assert_eq!(values(&pieces[1].tensor), [6.0, 7.0, 8.0, 9.0]);
        assert_eq!(pieces[2].tensor.size(), [5, 1]);
        // burn-tch sees a shared buffer: no piece may be updated in place
        assert!(pieces.iter().all(|p| !p.storage.can_mut()));

        let refs: Vec<&tch::Tensor> = pieces.iter().map(|p| &p.tensor).collect();
        let again = flatten(&refs);
        assert_eq!(again.data_ptr(), flat.data_ptr(), "a view, not a copy");
        assert_eq!(values(&again), values(&flat));

        // the same values in separate allocations, or out of order: copied, in list order
        let separate: Vec<tch::Tensor> = pieces.iter().map(|p| p.tensor.copy()).collect();
        let refs: Vec<&tch::Tensor> = separate.iter().collect();
        let copied = flatten(&refs);
        assert_ne!(copied.data_ptr(), flat.data_ptr());
        assert_eq!(values(&copied), values(&flat));
        let swapped = flatten(&[&pieces[1].tensor, &pieces[0].tensor]);
        assert_eq!(
            values(&swapped)[..5],
            [6.0, 7.0, 8.0, 9.0, 0.0],
            "pieces out of order are concatenated in the order given"
        );
        // a transposed piece is not contiguous: copied in its logical order
        let t = pieces[0].tensor.transpose(0, 1);
        assert_eq!(values(&flatten(&[&t])), [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }

    #[test]
    fn a_view_never_reaches_past_its_storage() {
        // the first piece's storage ends where it ends: libtorch refuses the wider view, so
        // a neighbour that merely lies next to it in memory is copied
        let a = tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cpu));
        assert!(a.f_as_strided([8], [1], None).is_err());
    }
}

//! Bucketed gradient averaging and state broadcast, the two things training needs from
//! the collectives: DDP's flat buckets (default 25 MB), without DDP's hooks.
//!
//! Gradients are packed into a few large flat buffers so that the all-reduce runs on
//! big messages (latency paid per bucket, not per parameter); bucket `k` is in flight
//! while bucket `k + 1` is packed, and unpacked while later buckets are still moving.

use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::error::CollectiveError;
use super::ffi::{self, RawWork};
use super::group::ProcessGroup;

/// DDP's default bucket size (`bucket_cap_mb=25`).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// One parameter's slice of a bucket.
#[derive(Debug, Clone)]
struct Member {
    /// Index into the tensor list.
    index: usize,
    /// First element in the flat buffer.
    offset: i64,
    /// Elements.
    numel: i64,
    /// The tensor's shape.
    shape: Vec<i64>,
}

/// Consecutive tensors of one kind and device, at most `bucket_bytes` in total (a
/// larger tensor gets a bucket of its own).
#[derive(Debug, Clone)]
struct BucketLayout {
    kind: Kind,
    device: Device,
    numel: i64,
    members: Vec<Member>,
}

/// What a layout depends on: a changed list of tensors needs a new one.
type Signature = Vec<(Vec<i64>, Kind, Device)>;

fn signature(tensors: &[Tensor]) -> Signature {
    tensors
        .iter()
        .map(|t| (t.size(), t.kind(), t.device()))
        .collect()
}

/// Splits `tensors` (in order) into buckets. Deterministic in shapes, kinds and order,
/// so every rank holding the same model gets the same layout.
fn plan_buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<BucketLayout> {
    let mut buckets: Vec<BucketLayout> = Vec::new();
    let mut bytes_in_last = 0usize;
    for (index, t) in tensors.iter().enumerate() {
        let (kind, device, shape) = (t.kind(), t.device(), t.size());
        let numel: i64 = shape.iter().product();
        let bytes = numel as usize * kind.elt_size_in_bytes();
        let fits = buckets.last().is_some_and(|b| {
            b.kind == kind && b.device == device && bytes_in_last + bytes <= bucket_bytes
        });
        if !fits {
            buckets.push(BucketLayout {
                kind,
                device,
                numel: 0,
                members: Vec::new(),
            });
            bytes_in_last = 0;
        }
        let Some(bucket) = buckets.last_mut() else {
            unreachable!("a bucket was just pushed");
        };
        bucket.members.push(Member {
            index,
            offset: bucket.numel,
            numel,
            shape,
        });
        bucket.numel += numel;
        bytes_in_last += bytes;
    }
    buckets
}

/// What one [`GradientSync::average`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncStats {
    /// Buckets all-reduced.
    pub buckets: usize,
    /// Bytes all-reduced (summed over buckets).
    pub bytes: usize,
    /// Parameters whose gradient was undefined here and counted as zero.
    pub missing_grads: usize,
    /// Wall time of packing, all-reduce and unpacking.
    pub elapsed: Duration,
}

/// Averages gradients across ranks in flat buckets. Each rank scales its gradients by
/// `local_weight / total_weight` (its share of the global batch, so uneven shards count
/// by size) before the sum, so every rank ends with the weighted mean. Reuses its flat
/// buffers across steps.
#[derive(Debug)]
pub struct GradientSync {
    bucket_bytes: usize,
    layout: Option<(Signature, Vec<BucketLayout>, Vec<Tensor>)>,
}

impl Default for GradientSync {
    fn default() -> Self {
        GradientSync::new(DEFAULT_BUCKET_BYTES)
    }
}

impl GradientSync {
    /// `bucket_bytes`: target bucket size (DDP's default is [`DEFAULT_BUCKET_BYTES`]).
    pub fn new(bucket_bytes: usize) -> Self {
        GradientSync {
            bucket_bytes: bucket_bytes.max(1),
            layout: None,
        }
    }

    /// Replaces each parameter's gradient with the weighted mean over all ranks. A
    /// parameter without a gradient counts as zero here, and receives the mean (if it
    /// requires grad). All ranks must pass the same parameter list (shapes, order) and the
    /// same `total_weight` (e.g. the global batch size, `local_weight` summed over ranks).
    ///
    /// Afterwards each gradient is a view into this sync's flat buffers (as with DDP's
    /// `gradient_as_bucket_view=True`): later backward passes accumulate into the
    /// buckets directly and the next call copies nothing. Zero gradients in place
    /// between steps; a gradient set to none or replaced is copied in again.
    pub fn average(
        &mut self,
        pg: &ProcessGroup,
        params: &[Tensor],
        local_weight: f64,
        total_weight: f64,
    ) -> Result<SyncStats, CollectiveError> {
        if !(total_weight.is_finite() && total_weight > 0.0) {
            return Err(CollectiveError::InvalidArgument(format!(
                "total weight {total_weight} must be finite and positive (the global batch size)"
            )));
        }
        if !(local_weight.is_finite() && (0.0..=total_weight).contains(&local_weight)) {
            return Err(CollectiveError::InvalidArgument(format!(
                "local weight {local_weight} must lie in [0, total weight {total_weight}] (this rank's share of the batch)"
            )));
        }
        let start = Instant::now();
        let scale = local_weight / total_weight;
        let sig = signature(params);
        if self.layout.as_ref().is_none_or(|(s, _, _)| *s != sig) {
            let plan = plan_buckets(params, self.bucket_bytes);
            let buffers = plan
                .iter()
                .map(|b| Tensor::f_empty([b.numel], (b.kind, b.device)))
                .collect::<Result<Vec<_>, _>>()?;
            self.layout = Some((sig, plan, buffers));
        }
        let Some((_, plan, buffers)) = &self.layout else {
            unreachable!("the layout was just built");
        };
        let mut missing = 0usize;
        let mut bytes = 0usize;
        tch::no_grad(|| -> Result<(), CollectiveError> {
            let mut in_flight: Vec<(RawWork, Vec<bool>)> = Vec::with_capacity(plan.len());
            for (bucket, flat) in plan.iter().zip(buffers) {
                let (bucket_missing, copy_back) = pack_grads(bucket, flat, params, scale)?;
                missing += bucket_missing;
                bytes += bucket.numel as usize * bucket.kind.elt_size_in_bytes();
                in_flight.push((pg.start_all_reduce_sum(&[flat])?, copy_back));
            }
            for ((bucket, flat), (work, copy_back)) in plan.iter().zip(buffers).zip(in_flight) {
                pg.wait(work, "all_reduce")?;
                unpack_grads(bucket, flat, params, &copy_back)?;
            }
            Ok(())
        })?;
        Ok(SyncStats {
            buckets: plan.len(),
            bytes,
            missing_grads: missing,
            elapsed: start.elapsed(),
        })
    }
}

/// Brings each member's gradient into `flat` and scales the bucket by `scale`; returns
/// how many gradients were missing, and per member whether its reduced slice must be
/// copied back after the all-reduce.
///
/// Like DDP's `gradient_as_bucket_view=True`, a gradient becomes a view of its slot: the
/// first call copies it in and points the parameter's `.grad` at the slot; afterwards
/// backward accumulates straight into the slot (autograd adds into an existing gradient
/// in place, and zeroing in place keeps the view), so steady-state steps copy nothing
/// and the bucket is scaled in one pass. A gradient that was replaced (set to none,
/// reassigned) is copied in and re-pointed again.
fn pack_grads(
    bucket: &BucketLayout,
    flat: &Tensor,
    params: &[Tensor],
    scale: f64,
) -> Result<(usize, Vec<bool>), CollectiveError> {
    let mut missing = 0;
    let mut copy_back = Vec::with_capacity(bucket.members.len());
    for m in &bucket.members {
        let param = &params[m.index];
        let mut slot = flat
            .f_narrow(0, m.offset, m.numel)?
            .f_view(m.shape.as_slice())?;
        let grad = param.f_grad()?;
        if grad.defined() && grad.data_ptr() == slot.data_ptr() && grad.size() == m.shape {
            copy_back.push(false);
            continue;
        }
        if grad.defined() {
            slot.f_copy_(&grad)?;
        } else {
            let _ = slot.f_zero_()?;
            missing += 1;
        }
        if param.requires_grad() {
            ffi::set_grad(param, &alias(flat, m)?).map_err(|e| {
                CollectiveError::InvalidArgument(format!(
                    "cannot point the gradient of parameter {} at its bucket: {}",
                    m.index, e.message
                ))
            })?;
            copy_back.push(false);
        } else {
            copy_back.push(grad.defined());
        }
    }
    if scale != 1.0 {
        let _ = flat.shallow_clone().f_mul_scalar_(scale)?;
    }
    Ok((missing, copy_back))
}

/// A tensor over `m`'s slot of `flat` that shares its memory but is not an autograd
/// view (`set_` instead of `narrow`): optimisers may `detach_()` a gradient, which
/// PyTorch refuses on views.
fn alias(flat: &Tensor, m: &Member) -> Result<Tensor, CollectiveError> {
    let mut strides = vec![1i64; m.shape.len()];
    for i in (0..m.shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * m.shape[i + 1].max(1);
    }
    let mut out = Tensor::f_empty([0], (flat.kind(), flat.device()))?;
    let _ = out.f_set_source_tensor_storage_offset_(
        flat,
        m.offset,
        m.shape.as_slice(),
        strides.as_slice(),
    )?;
    Ok(out)
}

/// Copies the reduced slices back into the gradients that are not views of the bucket.
fn unpack_grads(
    bucket: &BucketLayout,
    flat: &Tensor,
    params: &[Tensor],
    copy_back: &[bool],
) -> Result<(), CollectiveError> {
    for (m, _) in bucket.members.iter().zip(copy_back).filter(|(_, c)| **c) {
        let slot = flat
            .f_narrow(0, m.offset, m.numel)?
            .f_view(m.shape.as_slice())?;
        params[m.index].f_grad()?.f_copy_(&slot)?;
    }
    Ok(())
}

/// Gathers the rows of a step split across ranks: this rank's `local` `[n, ...]` are
/// rows `first_row .. first_row + n` of the whole `[total_rows, ...]`, which every rank
/// receives, in that order. One all-reduce of a zero-padded buffer: exact (every
/// element is one rank's value plus zeros), and it needs no row counts from the others
/// (`n` may be 0). No gradient flows through the result.
pub fn all_gather_rows(
    pg: &ProcessGroup,
    local: &Tensor,
    first_row: i64,
    total_rows: i64,
) -> Result<Tensor, CollectiveError> {
    let mut shape = local.size();
    let rows = shape.first().copied().unwrap_or(0);
    if shape.is_empty() || first_row < 0 || first_row + rows > total_rows {
        return Err(CollectiveError::InvalidArgument(format!(
            "all_gather_rows: rows {first_row}..{} (shape {shape:?}) do not fit in {total_rows} rows",
            first_row + rows
        )));
    }
    shape[0] = total_rows;
    tch::no_grad(|| -> Result<Tensor, CollectiveError> {
        let whole = Tensor::f_zeros(shape.as_slice(), (local.kind(), local.device()))?;
        if rows > 0 {
            whole.f_narrow(0, first_row, rows)?.f_copy_(local)?;
        }
        let work = pg.start_all_reduce_sum(&[&whole])?;
        pg.wait(work, "all_gather_rows")?;
        Ok(whole)
    })
}

/// Makes every rank's `tensors` (parameters, buffers, optimiser moments...) bitwise
/// identical to `root`'s, in buckets of about `bucket_bytes`. All ranks must pass
/// tensors of the same shapes, kinds and order.
pub fn broadcast_state(
    pg: &ProcessGroup,
    tensors: &[Tensor],
    root: usize,
    bucket_bytes: usize,
) -> Result<(), CollectiveError> {
    let plan = plan_buckets(tensors, bucket_bytes.max(1));
    let is_root = pg.rank() == root;
    tch::no_grad(|| -> Result<(), CollectiveError> {
        let mut in_flight = Vec::with_capacity(plan.len());
        for bucket in &plan {
            let flat = Tensor::f_empty([bucket.numel], (bucket.kind, bucket.device))?;
            if is_root {
                for m in &bucket.members {
                    flat.f_narrow(0, m.offset, m.numel)?
                        .f_view(m.shape.as_slice())?
                        .f_copy_(&tensors[m.index])?;
                }
            }
            let work = pg.start_broadcast(&[&flat], root)?;
            in_flight.push((flat, work));
        }
        for (bucket, (flat, work)) in plan.iter().zip(in_flight) {
            pg.wait(work, "broadcast")?;
            if is_root {
                continue;
            }
            for m in &bucket.members {
                let slot = flat
                    .f_narrow(0, m.offset, m.numel)?
                    .f_view(m.shape.as_slice())?;
                tensors[m.index].shallow_clone().f_copy_(&slot)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeros(shape: &[i64], kind: Kind) -> Tensor {
        Tensor::zeros(shape, (kind, Device::Cpu))
    }

    #[test]
    fn buckets_respect_size_kind_and_order() {
        // 4-byte floats: 10 + 10 elements fit in 100 bytes, the third does not.
        let tensors = [
            zeros(&[10], Kind::Float),
            zeros(&[2, 5], Kind::Float),
            zeros(&[10], Kind::Float),
            zeros(&[1], Kind::Int64),
            zeros(&[100], Kind::Float),
        ];
        let plan = plan_buckets(&tensors, 100);
        let members: Vec<Vec<usize>> = plan
            .iter()
            .map(|b| b.members.iter().map(|m| m.index).collect())
            .collect();
        assert_eq!(members, vec![vec![0, 1], vec![2], vec![3], vec![4]]);
        assert_eq!(plan[0].numel, 20);
        assert_eq!(plan[0].members[1].offset, 10);
        assert_eq!(plan[2].kind, Kind::Int64);
    }
}

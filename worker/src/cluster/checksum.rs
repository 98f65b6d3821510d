//! A cheap fingerprint of the model's parameters, sent with every step report so the
//! coordinator can check that all ranks hold bitwise identical weights.

use tch::{Kind, Tensor};

use crate::error::Result;

/// FNV-1a style 64-bit mix over the raw bits of every tensor, in order.
///
/// Any difference in any bit of any element changes the value with overwhelming
/// probability; it is not cryptographic, and does not need to be (ranks are not
/// adversaries, they just must not drift apart silently).
pub fn parameter_checksum(tensors: &[Tensor]) -> Result<u64> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for tensor in tensors {
        let flat = tensor
            .f_detach()?
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?
            .f_flatten(0, -1)?;
        let values = Vec::<f32>::try_from(&flat)?;
        for value in values {
            hash ^= u64::from(value.to_bits());
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Tensor boundaries count too: [a, b] + [c] differs from [a] + [b, c].
        hash ^= values_len_marker(flat.numel());
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(hash)
}

fn values_len_marker(len: usize) -> u64 {
    (len as u64).rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_tensors_equal_checksums_and_one_bit_changes_it() -> Result<()> {
        let a = Tensor::f_from_slice(&[1.0f32, 2.0, 3.0])?;
        let b = Tensor::f_from_slice(&[4.0f32])?;
        let base = parameter_checksum(&[a.shallow_clone(), b.shallow_clone()])?;
        assert_eq!(base, parameter_checksum(&[a.copy(), b.copy()])?);
        let nudged = Tensor::f_from_slice(&[1.0f32, 2.0, f32::from_bits(3.0f32.to_bits() + 1)])?;
        assert_ne!(base, parameter_checksum(&[nudged, b.shallow_clone()])?);
        // Same values, other split between tensors.
        let left = Tensor::f_from_slice(&[1.0f32, 2.0])?;
        let right = Tensor::f_from_slice(&[3.0f32, 4.0])?;
        assert_ne!(base, parameter_checksum(&[left, right])?);
        Ok(())
    }
}

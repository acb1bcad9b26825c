//! The float element views the codecs read ([`Floats`]) and write ([`FloatsMut`]): f32, bf16
//! and f16 slices, their conversions to and from f32, and casts between the three as torch's
//! `.to(dtype)` rounds ([`FloatBuf::cast`]). No quantization logic.

use crate::dtype::Dtype;

/// Input elements of a floating type.
#[derive(Debug, Clone, Copy)]
pub enum Floats<'a> {
    F32(&'a [f32]),
    /// bfloat16 bit patterns.
    Bf16(&'a [u16]),
    /// IEEE half bit patterns.
    F16(&'a [u16]),
}

impl Floats<'_> {
    pub fn len(&self) -> usize {
        match self {
            Floats::F32(x) => x.len(),
            Floats::Bf16(x) | Floats::F16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements' little-endian bytes (as safetensors stores them).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Floats::F32(v) => bytemuck::cast_slice(v),
            Floats::Bf16(v) | Floats::F16(v) => bytemuck::cast_slice(v),
        }
    }

    /// Copies elements `start..start + out.len()` into `out` as f32.
    #[inline(always)]
    pub(super) fn load(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Floats::F32(x) => out.copy_from_slice(&x[start..start + n]),
            Floats::Bf16(x) => {
                for (o, &b) in out.iter_mut().zip(&x[start..start + n]) {
                    *o = f32::from_bits((b as u32) << 16);
                }
            }
            Floats::F16(x) => {
                for (o, &b) in out.iter_mut().zip(&x[start..start + n]) {
                    *o = half::f16::from_bits(b).to_f32();
                }
            }
        }
    }
}

/// Output elements of a floating type.
#[derive(Debug)]
pub enum FloatsMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
    F16(&'a mut [u16]),
}

/// Owned float elements: what a cast produces.
#[derive(Debug, Clone, PartialEq)]
pub enum FloatBuf {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
}

impl FloatBuf {
    /// `x` as `to` (F32, BF16 or F16; anything else is None), rounded as torch's `.to(dtype)`:
    /// through f32 (exact for bf16 and f16), then to the nearest even value of the target; NaN
    /// stays NaN and infinities stay infinite.
    pub fn cast(x: Floats<'_>, to: Dtype) -> Option<FloatBuf> {
        let mut wide = vec![0f32; x.len()];
        x.load(0, &mut wide);
        Some(match to {
            Dtype::F32 => FloatBuf::F32(wide),
            Dtype::BF16 => FloatBuf::Bf16(
                wide.iter()
                    .map(|&v| if v.is_nan() { 0x7fc0 } else { bf16_bits(v) })
                    .collect(),
            ),
            Dtype::F16 => FloatBuf::F16(
                wide.iter()
                    .map(|&v| half::f16::from_f32(v).to_bits())
                    .collect(),
            ),
            _ => return None,
        })
    }

    /// The elements as a [`Floats`] view.
    pub fn view(&self) -> Floats<'_> {
        match self {
            FloatBuf::F32(v) => Floats::F32(v),
            FloatBuf::Bf16(v) => Floats::Bf16(v),
            FloatBuf::F16(v) => Floats::F16(v),
        }
    }
}

/// bfloat16 bits of a finite f32, rounded to nearest even (as torch's `.to(torch.bfloat16)`).
#[inline(always)]
pub(super) fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

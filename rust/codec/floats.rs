//! The float element views the codecs read ([`Floats`]) and write ([`FloatsMut`]): f32, bf16
//! and f16 slices, and their conversions to and from f32. No quantization logic.

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

/// bfloat16 bits of a finite f32, rounded to nearest even (as torch's `.to(torch.bfloat16)`).
#[inline(always)]
pub(super) fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

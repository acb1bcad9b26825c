//! Blockwise quantization codecs, bit-compatible with bitsandbytes on the CPU: 4-bit nf4/fp4
//! (quantize, dequantize, nibble packing), the signed dynamic 8-bit map used to double-quantize
//! absmax, and LLM.int8() row-wise quantization. Pure functions over slices, parallel over
//! blocks with rayon; knows nothing about files or Python.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// bitsandbytes' nf4 code table (sorted ascending), as f32 bit patterns.
const NF4_BITS: [u32; 16] = [
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
];
/// bitsandbytes' fp4 code table, indexed by code (bit 3 is the sign), as f32 bit patterns.
const FP4_BITS: [u32; 16] = [
    0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000, 0x3e2aaaab, 0x3e800000,
    0x00000000, 0xbbaaaaab, 0xbf2aaaab, 0xbf800000, 0xbeaaaaab, 0xbf000000, 0xbe2aaaab, 0xbe800000,
];
/// bitsandbytes' signed dynamic map (`create_dynamic_map()`, 256 sorted values), as f32 bits.
const DYNAMIC_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];
/// Decision thresholds of bitsandbytes' CPU blockwise quantizer over the dynamic map (f32 bits):
/// a normalized value `z` gets code `#{k : DYNAMIC_THRESHOLDS[k] <= z}`. Its bucketed search does
/// not always return the nearest map entry, so the thresholds were measured from bitsandbytes
/// 0.50.2 (`tools/probe_dynamic_thresholds.py`, which also checks them on 400k random values).
const DYNAMIC_THRESHOLDS: [u32; 255] = [
    0xbf7c66fc, 0xbf78ccf8, 0xbf7532f5, 0xbf7198f1, 0xbf6e00ee, 0xbf6a66ea, 0xbf66cce6, 0xbf6332e3,
    0xbf5f98df, 0xbf5c00dc, 0xbf5866d8, 0xbf54ccd4, 0xbf5132d1, 0xbf4d98cd, 0xbf4a00ca, 0xbf4666c6,
    0xbf42ccc2, 0xbf3f32bf, 0xbf3b98bb, 0xbf3800b8, 0xbf3466b4, 0xbf30ccb1, 0xbf2d32ad, 0xbf2998a9,
    0xbf2600a6, 0xbf2266a2, 0xbf1ecc9f, 0xbf1b329b, 0xbf179a97, 0xbf140094, 0xbf106690, 0xbf0ccc8d,
    0xbf093289, 0xbf059a85, 0xbf020082, 0xbefcccfd, 0xbef598f6, 0xbeee64ee, 0xbee734e9, 0xbee000e1,
    0xbed8ccd9, 0xbed198d2, 0xbeca64ca, 0xbec334c5, 0xbebc00bd, 0xbeb4ccb5, 0xbead98ae, 0xbea664a6,
    0xbe9f34a1, 0xbe980099, 0xbe90cc91, 0xbe89988a, 0xbe826482, 0xbe7668fa, 0xbe6800ea, 0xbe5998da,
    0xbe4b30cd, 0xbe3cd0bd, 0xbe2e68b2, 0xbe2000a2, 0xbe119892, 0xbe033085, 0xbde9a0eb, 0xbdd290d4,
    0xbdc710cb, 0xbdc140c4, 0xbdbb80bb, 0xbdb5c0bb, 0xbdb000b4, 0xbdaa40ab, 0xbda480ab, 0xbd9eb0a4,
    0xbd98f09b, 0xbd933094, 0xbd8d7094, 0xbd87b08b, 0xbd81f084, 0xbd786108, 0xbd6cc0f7, 0xbd6140e8,
    0xbd55c0d7, 0xbd4a40d7, 0xbd3ec0c8, 0xbd3340b7, 0xbd27a0a8, 0xbd1c20a8, 0xbd10a097, 0xbd052088,
    0xbcf34110, 0xbcdc40ef, 0xbcc500d0, 0xbcae00af, 0xbc9700af, 0xbc800090, 0xbc5200df, 0xbc2d00df,
    0xbc1a80a0, 0xbc1180a0, 0xbc0800a0, 0xbbfe0140, 0xbbec0140, 0xbbd90140, 0xbbc70140, 0xbbb400bf,
    0xbba200bf, 0xbb8f00bf, 0xbb7a017f, 0xbb54017f, 0xbb30017f, 0xbb0c017f, 0xbacc0100, 0xba900100,
    0xba680200, 0xba480200, 0xba300200, 0xba100200, 0xb9e00400, 0xb9b00400, 0xb9600800, 0xb9000800,
    0xb8c01000, 0xb8801000, 0xb8002000, 0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000,
    0xb3000000, 0xb3000000, 0xb3000000, 0x37ff8000, 0x387fc000, 0x38bfe000, 0x38ffe000, 0x395ff000,
    0x39aff800, 0x39dff800, 0x3a0ffc00, 0x3a2ffc00, 0x3a47fc00, 0x3a67fc00, 0x3a8ffe00, 0x3acbfe00,
    0x3b0bff00, 0x3b2fff00, 0x3b53ff00, 0x3b79ff00, 0x3b8f0081, 0x3ba20081, 0x3bb40081, 0x3bc70081,
    0x3bd90081, 0x3bec0081, 0x3bfe0081, 0x3c080041, 0x3c118041, 0x3c1a8041, 0x3c2d0041, 0x3c5200c0,
    0x3c800060, 0x3c970060, 0x3cae00a1, 0x3cc500a1, 0x3cdc40a1, 0x3cf340e0, 0x3d052070, 0x3d10a091,
    0x3d1c2091, 0x3d27a091, 0x3d3340b0, 0x3d3ec0b0, 0x3d4a40b0, 0x3d55c0d1, 0x3d6140d1, 0x3d6cc0d1,
    0x3d7860f0, 0x3d81f078, 0x3d87b078, 0x3d8d7089, 0x3d933089, 0x3d98f098, 0x3d9eb098, 0x3da48098,
    0x3daa40a9, 0x3db000a9, 0x3db5c0a9, 0x3dbb80b8, 0x3dc140b8, 0x3dc710b8, 0x3dd290c9, 0x3de9a0e9,
    0x3e03307c, 0x3e11988c, 0x3e20009c, 0x3e2e68ac, 0x3e3cd0bc, 0x3e4b30c5, 0x3e5998d5, 0x3e6800e5,
    0x3e7668f5, 0x3e826483, 0x3e899886, 0x3e90cc8e, 0x3e980096, 0x3e9f349e, 0x3ea664a6, 0x3ead98ab,
    0x3eb4ccb3, 0x3ebc00bb, 0x3ec334c3, 0x3eca64cb, 0x3ed198ce, 0x3ed8ccd6, 0x3ee000de, 0x3ee734e6,
    0x3eee64ee, 0x3ef598f3, 0x3efcccfb, 0x3f020082, 0x3f059a86, 0x3f09328a, 0x3f0ccc8b, 0x3f10668f,
    0x3f140093, 0x3f179a97, 0x3f1b329b, 0x3f1ecc9e, 0x3f2266a2, 0x3f2600a6, 0x3f2998aa, 0x3f2d32ae,
    0x3f30ccaf, 0x3f3466b3, 0x3f3800b7, 0x3f3b98bb, 0x3f3f32bf, 0x3f42ccc2, 0x3f4666c6, 0x3f4a00ca,
    0x3f4d98ce, 0x3f5132d2, 0x3f54ccd3, 0x3f5866d7, 0x3f5c00db, 0x3f5f98df, 0x3f6332e3, 0x3f66cce6,
    0x3f6a66ea, 0x3f6e00ee, 0x3f7198f2, 0x3f7532f6, 0x3f78ccf7, 0x3f7c66fb, 0x3f7f18ff,
];
/// fp4 magnitude codes (sign bit clear) in ascending order of their value.
const FP4_POSITIVE_ORDER: [u8; 8] = [0, 1, 6, 7, 4, 5, 2, 3];

/// The 4-bit data types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// NormalFloat4: 16 quantiles of a normal distribution, code = index in sorted order.
    Nf4,
    /// FP4 (e2m1 with bitsandbytes' bias): bit 3 is the sign, bits 0-2 the magnitude.
    Fp4,
}

impl QuantType {
    /// The code table: value of each 4-bit code.
    pub fn code(self) -> [f32; 16] {
        let bits = match self {
            QuantType::Nf4 => &NF4_BITS,
            QuantType::Fp4 => &FP4_BITS,
        };
        bits.map(f32::from_bits)
    }

    /// `"nf4"` or `"fp4"`.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }
}

impl std::str::FromStr for QuantType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::invalid(format!(
                "quant_type must be 'nf4' or 'fp4', got {other:?}"
            ))),
        }
    }
}

/// How two 4-bit codes share a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nibble4Layout {
    /// bitsandbytes: element `2k` in the high nibble, `2k + 1` in the low nibble; an odd count
    /// pads the last low nibble with the code of 0.0. Codes `[0x1, 0x2, 0x3]` (nf4) pack to
    /// `[0x12, 0x37]` (0x7 is nf4's code for 0.0).
    HighFirst,
}

/// The signed dynamic 8-bit map bitsandbytes uses for nested (double) quantization.
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_BITS.map(f32::from_bits)
}

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
    fn load(&self, start: usize, out: &mut [f32]) {
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

fn check_blocksize(blocksize: usize) -> Result<()> {
    if !(32..=4096).contains(&blocksize) || !blocksize.is_power_of_two() {
        return Err(Error::invalid(format!(
            "blocksize must be a power of two in 32..=4096, got {blocksize}"
        )));
    }
    Ok(())
}

/// Sorted decision bounds (midpoints of neighbouring codes, computed in f32 like bitsandbytes).
fn midpoints(sorted: &[f32]) -> Vec<f32> {
    sorted.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// Number of packed bytes for `n` 4-bit codes.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Number of blocks for `n` elements.
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Quantizes `input` blockwise to 4-bit codes, bitsandbytes' way.
///
/// Per block: `absmax = max |x|`; full blocks scale with `x * (1 / absmax)`, the last partial
/// block with `x / absmax` (both in f32, absmax clamped to 1e-38, results clamped to [-1, 1]);
/// each value takes the nearest code, ties to the lower code. For fp4, a value that rounds to
/// zero gets the sign bit when its scaled value is negative (bitsandbytes' CUDA rule: `x < 0`
/// unless `x / absmax` underflows to -0.0; its CPU path sets it for small positive values instead). The stored absmax of the last partial block is the clamped one.
///
/// `packed` must hold `packed_len(n)` bytes and `absmax` `num_blocks(n, blocksize)` floats.
/// Non-finite input is an error.
pub fn quantize_4bit(
    input: Floats<'_>,
    blocksize: usize,
    quant_type: QuantType,
    layout: Nibble4Layout,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    quantize_4bit_with(input, blocksize, quant_type, layout, packed, absmax, true)
}

/// [`quantize_4bit`] on the portable code path only (no vector kernels), so tests can check that
/// both paths give identical bytes.
#[doc(hidden)]
pub fn quantize_4bit_portable(
    input: Floats<'_>,
    blocksize: usize,
    quant_type: QuantType,
    layout: Nibble4Layout,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    quantize_4bit_with(input, blocksize, quant_type, layout, packed, absmax, false)
}

fn quantize_4bit_with(
    input: Floats<'_>,
    blocksize: usize,
    quant_type: QuantType,
    layout: Nibble4Layout,
    packed: &mut [u8],
    absmax: &mut [f32],
    simd: bool,
) -> Result<()> {
    check_blocksize(blocksize)?;
    let Nibble4Layout::HighFirst = layout;
    let n = input.len();
    if packed.len() != packed_len(n) || absmax.len() != num_blocks(n, blocksize) {
        return Err(Error::invalid(format!(
            "output sizes: packed {} (need {}), absmax {} (need {})",
            packed.len(),
            packed_len(n),
            absmax.len(),
            num_blocks(n, blocksize)
        )));
    }
    let bounds = decision_bounds(quant_type);
    let mut zero = [0u32; 1];
    encode_block(&[0.0], quant_type, &bounds, &mut zero);
    let zero_code = zero[0] as u8;
    let blocks_per_task = (1 << 16) / blocksize + 1;
    let bytes_per_block = blocksize / 2;
    let bad = std::sync::atomic::AtomicBool::new(false);
    let job = QuantizeJob {
        input,
        blocksize,
        quant_type,
        bounds: &bounds,
        zero_code,
        n,
        blocks_per_task,
    };
    packed
        .par_chunks_mut(blocks_per_task * bytes_per_block)
        .zip(absmax.par_chunks_mut(blocks_per_task))
        .enumerate()
        .for_each(|(task, (out, amax))| {
            let ok = if simd {
                job.run_dispatch(task, out, amax)
            } else {
                job.run(task, out, amax)
            };
            if !ok {
                bad.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    if bad.into_inner() {
        return Err(Error::invalid("cannot quantize NaN or infinite values"));
    }
    Ok(())
}

/// One `quantize_4bit` call's parameters, shared by its parallel tasks.
struct QuantizeJob<'a> {
    input: Floats<'a>,
    blocksize: usize,
    quant_type: QuantType,
    bounds: &'a [f32],
    zero_code: u8,
    n: usize,
    blocks_per_task: usize,
}

impl QuantizeJob<'_> {
    /// Runs one task with the widest vector instructions the CPU has.
    fn run_dispatch(&self, task: usize, out: &mut [u8], amax: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU supports AVX2 and F16C, checked just above.
            return unsafe { avx2::quantize_task(self, task, out, amax) };
        }
        self.run(task, out, amax)
    }

    /// Quantizes the blocks of one task with portable code; false when a block holds NaN or
    /// infinity.
    fn run(&self, task: usize, out: &mut [u8], amax: &mut [f32]) -> bool {
        let mut buf = vec![0f32; self.blocksize];
        let mut codes = vec![0u32; self.blocksize];
        (0..amax.len()).all(|b| self.block(task, b, out, amax, &mut buf, &mut codes))
    }

    /// Quantizes block `b` of a task (portable code; any length, including the partial last
    /// block). `buf` and `codes` are scratch space of `blocksize` elements.
    #[inline(always)]
    fn block(
        &self,
        task: usize,
        b: usize,
        out: &mut [u8],
        amax: &mut [f32],
        buf: &mut [f32],
        codes: &mut [u32],
    ) -> bool {
        let (blocksize, bytes_per_block) = (self.blocksize, self.blocksize / 2);
        let start = (task * self.blocks_per_task + b) * blocksize;
        let len = blocksize.min(self.n - start);
        let x = &mut buf[..len];
        self.input.load(start, x);
        let (m, non_finite) = block_absmax(x);
        if non_finite {
            return false;
        }
        let clamped = m.max(1e-38);
        if len == blocksize {
            amax[b] = m;
            let inv = 1.0 / clamped;
            for v in x.iter_mut() {
                *v = (*v * inv).clamp(-1.0, 1.0);
            }
        } else {
            amax[b] = clamped;
            for v in x.iter_mut() {
                *v = (*v / clamped).clamp(-1.0, 1.0);
            }
        }
        encode_block(x, self.quant_type, self.bounds, codes);
        let bytes = &mut out[b * bytes_per_block..b * bytes_per_block + len.div_ceil(2)];
        let mut pairs = codes[..len].chunks_exact(2);
        for (byte, pair) in bytes.iter_mut().zip(&mut pairs) {
            *byte = ((pair[0] << 4) | pair[1]) as u8;
        }
        if let [last] = pairs.remainder() {
            bytes[bytes.len() - 1] = ((last << 4) as u8) | self.zero_code;
        }
        true
    }
}

/// The AVX2 quantizer: one pass converts a block to f32 and finds its absmax, a second scales,
/// clamps and encodes eight values at a time with every decision bound held in registers, and
/// packs the codes straight into bytes. Same float operations as the portable code (one IEEE
/// multiply or divide, then the clamp), so the results are identical bit for bit.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Floats, QuantType, QuantizeJob};

    /// Input element kinds, as const generic parameters.
    const F32: u8 = 0;
    const BF16: u8 = 1;
    const F16: u8 = 2;

    /// Quantizes the blocks of one task; false when a block holds NaN or infinity.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn quantize_task(
        job: &QuantizeJob<'_>,
        task: usize,
        out: &mut [u8],
        amax: &mut [f32],
    ) -> bool {
        match (job.input, job.quant_type) {
            (Floats::F32(x), QuantType::Nf4) => {
                blocks::<F32, false>(job, x.as_ptr() as *const u8, task, out, amax)
            }
            (Floats::Bf16(x), QuantType::Nf4) => {
                blocks::<BF16, false>(job, x.as_ptr() as *const u8, task, out, amax)
            }
            (Floats::F16(x), QuantType::Nf4) => {
                blocks::<F16, false>(job, x.as_ptr() as *const u8, task, out, amax)
            }
            (Floats::F32(x), QuantType::Fp4) => {
                blocks::<F32, true>(job, x.as_ptr() as *const u8, task, out, amax)
            }
            (Floats::Bf16(x), QuantType::Fp4) => {
                blocks::<BF16, true>(job, x.as_ptr() as *const u8, task, out, amax)
            }
            (Floats::F16(x), QuantType::Fp4) => {
                blocks::<F16, true>(job, x.as_ptr() as *const u8, task, out, amax)
            }
        }
    }

    /// Eight input elements starting at element `i`, as f32.
    #[inline(always)]
    unsafe fn load8<const K: u8>(base: *const u8, i: usize) -> __m256 {
        match K {
            F32 => _mm256_loadu_ps((base as *const f32).add(i)),
            BF16 => {
                let h = _mm_loadu_si128((base as *const u16).add(i) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            _ => _mm256_cvtph_ps(_mm_loadu_si128(
                (base as *const u16).add(i) as *const __m128i
            )),
        }
    }

    /// Largest of eight unsigned 32-bit lanes.
    #[inline(always)]
    unsafe fn hmax_u32(v: __m256i) -> u32 {
        let m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
        let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
        _mm_cvtsi128_si32(m) as u32
    }

    /// Packs eight codes (one per 32-bit lane, 0..=15) into four bytes, even element high.
    #[inline(always)]
    unsafe fn pack8(codes: __m256i) -> u32 {
        // Each 64-bit lane holds (c_even, c_odd); its low half becomes c_even << 4 | c_odd.
        let pairs = _mm256_or_si256(
            _mm256_slli_epi32::<4>(codes),
            _mm256_srli_epi64::<32>(codes),
        );
        let low = _mm256_permutevar8x32_epi32(pairs, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
        let w = _mm_packus_epi32(_mm256_castsi256_si128(low), _mm256_castsi256_si128(low));
        _mm_cvtsi128_si32(_mm_packus_epi16(w, w)) as u32
    }

    #[inline(always)]
    unsafe fn blocks<const K: u8, const FP4: bool>(
        job: &QuantizeJob<'_>,
        base: *const u8,
        task: usize,
        out: &mut [u8],
        amax: &mut [f32],
    ) -> bool {
        let bs = job.blocksize;
        let mut buf = vec![0f32; bs];
        let mut codes = vec![0u32; bs];
        // nf4: 15 bounds on the value; fp4: 7 bounds on the magnitude, compared as integers.
        let mut bounds = [_mm256_setzero_ps(); 15];
        for (v, &b) in bounds.iter_mut().zip(job.bounds) {
            *v = _mm256_set1_ps(b);
        }
        let (lo, hi) = (_mm256_set1_ps(-1.0), _mm256_set1_ps(1.0));
        let abs_mask = _mm256_set1_epi32(0x7fff_ffff);
        let fp4_order = _mm256_setr_epi32(0, 1, 6, 7, 4, 5, 2, 3);
        let sign_bit = _mm256_set1_epi32(8);
        for b in 0..amax.len() {
            let start = (task * job.blocks_per_task + b) * bs;
            if start + bs > job.n {
                // The partial last block of the tensor.
                if !job.block(task, b, out, amax, &mut buf, &mut codes) {
                    return false;
                }
                continue;
            }
            let mut mx = _mm256_setzero_si256();
            let p = buf.as_mut_ptr();
            for j in (0..bs).step_by(8) {
                let v = load8::<K>(base, start + j);
                _mm256_storeu_ps(p.add(j), v);
                mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_castps_si256(v), abs_mask));
            }
            let m = hmax_u32(mx);
            if m >= 0x7f80_0000 {
                return false;
            }
            let m = f32::from_bits(m);
            amax[b] = m;
            let inv = _mm256_set1_ps(1.0 / m.max(1e-38));
            let dst = out.as_mut_ptr().add(b * (bs / 2));
            for j in (0..bs).step_by(8) {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(j)), inv);
                let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
                let c = if FP4 {
                    // Magnitude bits, plus one for negative values: `key > bound` is then
                    // `|x| > b` for x >= 0 and `|x| >= b` for x < 0 (ties to the larger
                    // magnitude, the mirror of "ties to the lower code").
                    let neg =
                        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_setzero_ps()));
                    let key =
                        _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(v), abs_mask), neg);
                    let mut a0 = _mm256_setzero_si256();
                    let mut a1 = _mm256_setzero_si256();
                    for k in (0..7).step_by(2) {
                        a0 = _mm256_sub_epi32(
                            a0,
                            _mm256_cmpgt_epi32(key, _mm256_castps_si256(bounds[k])),
                        );
                        if k + 1 < 7 {
                            a1 = _mm256_sub_epi32(
                                a1,
                                _mm256_cmpgt_epi32(key, _mm256_castps_si256(bounds[k + 1])),
                            );
                        }
                    }
                    let rank = _mm256_add_epi32(a0, a1);
                    let mag = _mm256_permutevar8x32_epi32(fp4_order, rank);
                    _mm256_or_si256(mag, _mm256_and_si256(neg, sign_bit))
                } else {
                    let mut a0 = _mm256_setzero_si256();
                    let mut a1 = _mm256_setzero_si256();
                    let mut a2 = _mm256_setzero_si256();
                    for k in (0..15).step_by(3) {
                        a0 = _mm256_sub_epi32(
                            a0,
                            _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, bounds[k])),
                        );
                        a1 = _mm256_sub_epi32(
                            a1,
                            _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, bounds[k + 1])),
                        );
                        a2 = _mm256_sub_epi32(
                            a2,
                            _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, bounds[k + 2])),
                        );
                    }
                    _mm256_add_epi32(_mm256_add_epi32(a0, a1), a2)
                };
                std::ptr::write_unaligned(dst.add(j / 2) as *mut u32, pack8(c));
            }
        }
        true
    }

    /// LLM.int8() quantization of one float16 row (see `quantize_int8_rows`); false when the row
    /// holds NaN or infinity.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn int8_row(row: &[u16], out: &mut [i8], scb: &mut f32) -> bool {
        let n = row.len();
        let body = n - n % 8;
        let abs_mask = _mm256_set1_epi32(0x7fff_ffff);
        let mut mx = _mm256_setzero_si256();
        for j in (0..body).step_by(8) {
            let v = load8::<F16>(row.as_ptr() as *const u8, j);
            mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_castps_si256(v), abs_mask));
        }
        let mut m = hmax_u32(mx);
        for &h in &row[body..] {
            m = m.max(half::f16::from_bits(h).to_f32().to_bits() & 0x7fff_ffff);
        }
        if m >= 0x7f80_0000 {
            return false;
        }
        let m = f32::from_bits(m);
        *scb = m;
        if m == 0.0 {
            // 0 * (1 / 0) is NaN, which the portable code stores as 0.
            out.fill(0);
            return true;
        }
        // As torch evaluates `127.0 / row_stats`: reciprocal first, then the scalar product.
        let s = (1.0 / m) * 127.0;
        let scale = _mm256_set1_ps(s);
        let dst = out.as_mut_ptr();
        for j in (0..body).step_by(8) {
            let v = _mm256_mul_ps(load8::<F16>(row.as_ptr() as *const u8, j), scale);
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            let i = _mm256_cvtps_epi32(r);
            let w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256::<1>(i));
            let b = _mm_packs_epi16(w, w);
            _mm_storel_epi64(dst.add(j) as *mut __m128i, b);
        }
        for (o, &h) in out[body..].iter_mut().zip(&row[body..]) {
            *o = (half::f16::from_bits(h).to_f32() * s).round_ties_even() as i8;
        }
        true
    }
}

/// Decision bounds for a 4-bit type: nf4 over the whole sorted table, fp4 over the sorted
/// magnitudes (midpoints of neighbours, computed in f32 as bitsandbytes does).
fn decision_bounds(quant_type: QuantType) -> Vec<f32> {
    let code = quant_type.code();
    match quant_type {
        QuantType::Nf4 => midpoints(&code),
        QuantType::Fp4 => midpoints(&FP4_POSITIVE_ORDER.map(|c| code[c as usize])),
    }
}

/// Codes of scaled values in [-1, 1], written to `codes`. Counts the bounds below each value
/// (ties to the lower code); loops are laid out bound by bound so they vectorize.
#[inline(always)]
fn encode_block(scaled: &[f32], quant_type: QuantType, bounds: &[f32], codes: &mut [u32]) {
    let codes = &mut codes[..scaled.len()];
    codes.fill(0);
    match quant_type {
        QuantType::Nf4 => {
            for &b in bounds {
                for (c, &x) in codes.iter_mut().zip(scaled) {
                    *c += (x > b) as u32;
                }
            }
        }
        QuantType::Fp4 => {
            for &b in bounds {
                for (c, &x) in codes.iter_mut().zip(scaled) {
                    let mag = x.abs();
                    // Negative values take ties to the larger magnitude (mirror of "ties to lower").
                    *c += ((mag > b) | ((x < 0.0) & (mag == b))) as u32;
                }
            }
            for (c, &x) in codes.iter_mut().zip(scaled) {
                let k = *c;
                // FP4_POSITIVE_ORDER[k] without a lookup: 0, 1, 6, 7, 4, 5, 2, 3.
                let mag_code = if k < 2 { k } else { (8 - (k & 6)) | (k & 1) };
                *c = mag_code | (((x < 0.0) as u32) << 3);
            }
        }
    }
}

/// Largest |x| of a block and whether it holds NaN or infinity, on the bit patterns
/// (integer max vectorizes; the float max would be a serial chain).
#[inline(always)]
fn block_absmax(x: &[f32]) -> (f32, bool) {
    let mut m = 0u32;
    for v in x {
        m = m.max(v.to_bits() & 0x7fff_ffff);
    }
    (f32::from_bits(m), m >= 0x7f80_0000)
}

/// Dequantizes 4-bit codes: `code[c] * absmax[block]` in f32, then rounded (to nearest even)
/// to the output type.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    quant_type: QuantType,
    layout: Nibble4Layout,
    out: FloatsMut<'_>,
) -> Result<()> {
    check_blocksize(blocksize)?;
    let Nibble4Layout::HighFirst = layout;
    let n = match &out {
        FloatsMut::F32(o) => o.len(),
        FloatsMut::Bf16(o) | FloatsMut::F16(o) => o.len(),
    };
    if packed.len() != packed_len(n) || absmax.len() != num_blocks(n, blocksize) {
        return Err(Error::invalid(format!(
            "input sizes: packed {} (need {}), absmax {} (need {}) for {n} values",
            packed.len(),
            packed_len(n),
            absmax.len(),
            num_blocks(n, blocksize)
        )));
    }
    let code = quant_type.code();
    // Both values of every possible byte, so each byte costs one lookup.
    let mut pairs = [[0f32; 2]; 256];
    for (b, p) in pairs.iter_mut().enumerate() {
        *p = [code[b >> 4], code[b & 0xF]];
    }
    let blocks_per_task = (1 << 16) / blocksize + 1;
    let task = blocks_per_task * blocksize;
    // Values of one run of blocks, in f32.
    let fill = |t: usize, out: &mut [f32]| {
        for (b, vals) in out.chunks_mut(blocksize).enumerate() {
            let block = t * blocks_per_task + b;
            let scale = absmax[block];
            let bytes = &packed[block * blocksize / 2..];
            let half = vals.len() / 2;
            let mut it = vals.chunks_exact_mut(2);
            for (v, &byte) in (&mut it).zip(bytes) {
                let [a, c] = pairs[byte as usize];
                v[0] = a * scale;
                v[1] = c * scale;
            }
            if let [last] = it.into_remainder() {
                *last = pairs[bytes[half] as usize][0] * scale;
            }
        }
    };
    match out {
        FloatsMut::F32(o) => o
            .par_chunks_mut(task)
            .enumerate()
            .for_each(|(t, chunk)| fill(t, chunk)),
        FloatsMut::Bf16(o) => o.par_chunks_mut(task).enumerate().for_each(|(t, chunk)| {
            let mut tmp = vec![0f32; chunk.len()];
            fill(t, &mut tmp);
            for (d, v) in chunk.iter_mut().zip(&tmp) {
                *d = bf16_bits(*v);
            }
        }),
        FloatsMut::F16(o) => o.par_chunks_mut(task).enumerate().for_each(|(t, chunk)| {
            let mut tmp = vec![0f32; chunk.len()];
            fill(t, &mut tmp);
            for (d, v) in chunk.iter_mut().zip(&tmp) {
                *d = half::f16::from_f32(*v).to_bits();
            }
        }),
    }
    Ok(())
}

/// bfloat16 bits of a finite f32, rounded to nearest even (as torch's `.to(torch.bfloat16)`).
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Quantizes `values - offset` blockwise with the signed dynamic map (nested quantization of
/// absmax), as bitsandbytes' CPU kernel does: per block `absmax = max |v|`,
/// `z = v * (1 / absmax)` in f32, and the code its search picks for `z` (see
/// `DYNAMIC_THRESHOLDS`; NaN, from 0 * inf, takes code 0).
/// Returns the codes and the per-block absmax.
pub fn quantize_dynamic(
    values: &[f32],
    offset: f32,
    blocksize: usize,
) -> Result<(Vec<u8>, Vec<f32>)> {
    if blocksize == 0 {
        return Err(Error::invalid("blocksize must be positive"));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid("cannot quantize NaN or infinite values"));
    }
    let thresholds = DYNAMIC_THRESHOLDS.map(f32::from_bits);
    let mut codes = vec![0u8; values.len()];
    let mut absmax = vec![0f32; num_blocks(values.len(), blocksize)];
    codes
        .par_chunks_mut(blocksize)
        .zip(values.par_chunks(blocksize))
        .zip(absmax.par_iter_mut())
        .for_each(|((out, vals), am)| {
            let m = vals
                .iter()
                .fold(f32::MIN, |acc, v| acc.max((v - offset).abs()));
            *am = m;
            // bitsandbytes' kernel computes `x / absmax` as `x * (1 / absmax)` (one rounding more;
            // 1 / absmax overflows to infinity below 2**-128, which saturates the codes).
            let inv = 1.0 / m;
            for (o, &v) in out.iter_mut().zip(vals) {
                let z = (v - offset) * inv;
                *o = if z.is_nan() {
                    0
                } else {
                    thresholds.partition_point(|&t| t <= z) as u8
                };
            }
        });
    Ok((codes, absmax))
}

/// Undoes [`quantize_dynamic`]: `map[c] * absmax[block] + offset`.
pub fn dequantize_dynamic(
    codes: &[u8],
    absmax: &[f32],
    offset: f32,
    blocksize: usize,
) -> Result<Vec<f32>> {
    if blocksize == 0 || absmax.len() != num_blocks(codes.len(), blocksize) {
        return Err(Error::invalid("absmax does not match codes and blocksize"));
    }
    let map = dynamic_map();
    Ok(codes
        .iter()
        .enumerate()
        .map(|(i, &c)| map[c as usize] * absmax[i / blocksize] + offset)
        .collect())
}

/// LLM.int8() row-wise quantization of a `rows x cols` half-precision matrix, bitsandbytes'
/// way: `SCB[r] = max |x|` of the row, `q = round_half_even(x * ((1 / SCB[r]) * 127))` in f32.
pub fn quantize_int8_rows(
    input: &[u16],
    rows: usize,
    cols: usize,
    q: &mut [i8],
    scb: &mut [f32],
) -> Result<()> {
    if rows.checked_mul(cols) != Some(input.len()) || q.len() != input.len() || scb.len() != rows {
        return Err(Error::invalid(
            "int8 quantization: buffer sizes do not match rows x cols",
        ));
    }
    if cols == 0 {
        scb.fill(0.0);
        return Ok(());
    }
    let bad = std::sync::atomic::AtomicBool::new(false);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        q.par_chunks_mut(cols)
            .zip(input.par_chunks(cols))
            .zip(scb.par_iter_mut())
            .for_each(|((out, row), s)| {
                // SAFETY: the CPU supports AVX2 and F16C, checked just above.
                if !unsafe { avx2::int8_row(row, out, s) } {
                    bad.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            });
        if bad.into_inner() {
            return Err(Error::invalid("cannot quantize NaN or infinite values"));
        }
        return Ok(());
    }
    q.par_chunks_mut(cols)
        .zip(input.par_chunks(cols))
        .zip(scb.par_iter_mut())
        .for_each(|((out, row), s)| {
            let vals: Vec<f32> = row
                .iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect();
            let m = vals.iter().fold(0f32, |acc, v| acc.max(v.abs()));
            if !m.is_finite() || vals.iter().any(|v| v.is_nan()) {
                bad.store(true, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            *s = m;
            // As torch evaluates `127.0 / row_stats`: reciprocal first, then the scalar product.
            let scale = (1.0 / m) * 127.0;
            for (o, v) in out.iter_mut().zip(&vals) {
                let r = (v * scale).round_ties_even();
                *o = if r.is_nan() { 0 } else { r as i8 };
            }
        });
    if bad.into_inner() {
        return Err(Error::invalid("cannot quantize NaN or infinite values"));
    }
    Ok(())
}

/// Undoes [`quantize_int8_rows`]: `q * SCB[r] / 127` in f32.
pub fn dequantize_int8_rows(q: &[i8], scb: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
    if cols == 0 || q.len() != out.len() || scb.len().checked_mul(cols) != Some(q.len()) {
        return Err(Error::invalid(
            "int8 dequantization: buffer sizes do not match",
        ));
    }
    out.par_chunks_mut(cols)
        .zip(q.par_chunks(cols))
        .zip(scb.par_iter())
        .for_each(|((o, row), &s)| {
            for (v, &c) in o.iter_mut().zip(row) {
                *v = c as f32 * s / 127.0;
            }
        });
    Ok(())
}

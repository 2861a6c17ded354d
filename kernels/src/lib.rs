//! Egret's CPU kernel library: the hand-written kernels that generated code
//! calls, compiled by rustc for the widest vector unit the host has, and the
//! scheduler that splits kernels across threads.
//!
//! Cranelift's x86-64 backend emits 128-bit vectors only. For the work that
//! is bound by arithmetic rather than memory — the exponentials of
//! attention's online softmax, the erf of a GELU epilogue — that is a
//! quarter of what an AVX-512 core can do. These kernels are plain Rust
//! loops over fixed-width lane arrays, written so that LLVM vectorises
//! them, and compiled three times: for AVX-512, for AVX2 + FMA, and for the
//! baseline ISA. `Isa::host` picks one once per process.
//!
//! Products without a packed weight use the `gemm` crate (`sgemm`).
//!
//! The JIT links this crate as a Rust library and hands its functions'
//! addresses to Cranelift. The crate depends on nothing of the compiler's:
//! parameters arrive as plain data blocks whose layouts are defined here and
//! filled in by `egret-backends` (`cpu::library`), so the same code can be
//! linked into ahead-of-time artifacts as a static archive (the
//! `egret-kernels-archive` crate, with the C ABI of `artifact`), which
//! `egret compile` links into every shared library it writes.

pub mod artifact;
pub mod attention;
pub mod epilogue;
pub mod gemm;
pub mod int8;
pub mod pool;
pub mod rows;
pub mod sgemm;

/// Products with fewer multiply-adds than this run on one thread (about
/// 20 us of work at full speed): waking a second worker costs microseconds,
/// and the zoo's small models ran slower on two threads than on one.
pub const MATMUL_PARALLEL_MACS: usize = 1 << 22;

/// A product of a few rows (a decode step's matrix-vector products) is
/// bound by reading its weight, not by arithmetic: one of at least this
/// many weight elements (1 MiB of f32, about 30 us of reading) splits its
/// columns across threads whatever its multiply-adds.
pub const MATVEC_PARALLEL_WEIGHTS: usize = 1 << 18;

/// Whether an `m x k` by `k x n` product splits across threads.
pub fn matmul_splits(m: usize, k: usize, n: usize) -> bool {
    m * n * k >= MATMUL_PARALLEL_MACS || k * n >= MATVEC_PARALLEL_WEIGHTS
}

/// How many threads a kernel may use from inside: those of the pool running
/// it (see `pool::Pool`), or one outside any pool. The thread count is the
/// pool's, not the process's, so two pools of different sizes (two
/// artifact contexts, say) each get what they were created with.
pub fn threads() -> usize {
    if rayon::current_thread_index().is_some() {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// `2u = x (c1 + c3 x^2)` in GELU's tanh form: `c1 = 2 sqrt(2 / pi)`,
/// `c3 = 0.044715 c1`. The generated code uses the same constants.
pub fn gelu_tanh_coefficients() -> (f32, f32) {
    const C1: f32 = 2.0 * 0.797_884_6;
    (C1, C1 * 0.044715)
}

/// Lanes per step of the vectorised loops: one AVX-512 register of f32.
pub const LANES: usize = 16;

/// The instruction set the kernels run with on this host, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Baseline,
    Avx2,
    Avx512,
}

/// Caps the instruction set the kernels use (`avx2` or `baseline`), so the
/// narrower builds can be run and tested on a wider host.
pub const ISA_ENV: &str = "EGRET_KERNEL_ISA";

impl Isa {
    /// Detected once (and capped by `EGRET_KERNEL_ISA`); every later call
    /// is a load.
    pub fn host() -> Isa {
        static HOST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        // An unusable request (`requested` says why; compiling refuses it)
        // caps nothing here: the kernels never run a path the CPU lacks.
        *HOST.get_or_init(|| Isa::detect().min(Isa::requested().ok().flatten().unwrap_or(Isa::Avx512)))
    }

    /// The path `EGRET_KERNEL_ISA` asks for, if set: an error for a name
    /// that is none of `avx512`, `avx2` and `baseline`, or for a path this
    /// CPU lacks.
    pub fn requested() -> Result<Option<Isa>, String> {
        let Ok(value) = std::env::var(ISA_ENV) else { return Ok(None) };
        let isa = match value.as_str() {
            "avx512" => Isa::Avx512,
            "avx2" => Isa::Avx2,
            "baseline" => Isa::Baseline,
            other => return Err(format!("{ISA_ENV}={other} names no kernel path (avx512, avx2 or baseline)")),
        };
        if isa > Isa::detect() {
            return Err(format!(
                "{ISA_ENV}={value}, but this CPU's best path is {}: it lacks the instructions {value} needs",
                Isa::detect().name()
            ));
        }
        Ok(Some(isa))
    }

    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            // Every AVX2 machine has F16C (Haswell, Zen), which both paths
            // use for half-precision weights; checked all the same.
            let (avx2, fma, f16c) = (
                std::is_x86_feature_detected!("avx2"),
                std::is_x86_feature_detected!("fma"),
                std::is_x86_feature_detected!("f16c"),
            );
            if std::is_x86_feature_detected!("avx512f") && avx2 && fma && f16c {
                return Isa::Avx512;
            }
            if avx2 && fma && f16c {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Baseline => "baseline",
        }
    }
}

/// Defines `fn $name(args) -> R` that runs `$generic::<true>` compiled with
/// AVX-512 or AVX2 + FMA when the host has them, else `$generic::<false>`
/// (the const parameter says whether fused multiply-adds are cheap: without
/// FMA hardware `f32::mul_add` is a library call).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis unsafe fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $generic:ident;) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    unsafe { $generic::<true>($($arg),*) }
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    unsafe { $generic::<true>($($arg),*) }
                }
                match $crate::Isa::host() {
                    $crate::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::Isa::Baseline => {}
                }
            }
            unsafe { $generic::<false>($($arg),*) }
        }
    };
}
pub(crate) use multiversion;

/// `a * b + c`, fused where the hardware has it.
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `p(x)` for coefficients from the highest degree down (Horner).
#[inline(always)]
fn poly<const FMA: bool>(x: f32, coeffs: &[f32]) -> f32 {
    let mut acc = coeffs[0];
    for &c in &coeffs[1..] {
        acc = madd::<FMA>(acc, x, c);
    }
    acc
}

/// Below this, `exp` is 0 in f32 (flushed; e^-86.99 is 1.8e-38, the
/// smallest normal f32 1.2e-38): the result is exactly 0, as for a masked
/// score of -inf.
pub const EXP_LOW: f32 = -86.99;
/// Above this, `e^x` overflows f32: the result is infinity.
pub const EXP_OVERFLOW: f32 = 88.722_84;

/// `e^x`, branch-free so it vectorises: Cephes `expf` (range reduction by
/// ln 2 in two parts, a degree-5 polynomial, 2^n from the exponent bits),
/// the same algorithm as the generated code's `vmath::exp`; about 1 ulp
/// from `EXP_LOW` to the overflow. `n` reaches 128 at the top of the
/// range, one past the largest exponent, so the exponent bits hold `n - 1`
/// and the product is doubled (a fuzzer found `e^88.6` 26% short when the
/// range was clamped at 88.3).
#[inline(always)]
pub fn exp<const FMA: bool>(x: f32) -> f32 {
    // Not `clamp`: that keeps NaN, and NaN must not reach the integer
    // conversion below (`min`/`max` map it to a bound).
    #[allow(clippy::manual_clamp)]
    let xc = x.min(EXP_OVERFLOW).max(EXP_LOW);
    // n = round(x / ln 2) by the add-and-subtract-2^23 trick (no libm call).
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let n = madd::<FMA>(xc, std::f32::consts::LOG2_E, ROUND) - ROUND;
    let r = madd::<FMA>(n, -0.693_359_4, xc);
    let r = madd::<FMA>(n, 2.121_944_4e-4, r);
    let z = r * r;
    let p = poly::<FMA>(r, &[1.987_569_2e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5]);
    let p = madd::<FMA>(p, z, r) + 1.0;
    // `n` is a whole number in [-125, 128] (`xc` is clamped and never NaN),
    // so the unchecked conversion is exact; the checked `as` would not
    // vectorise. `2^(n - 1)` is a normal f32 throughout.
    let ni: i32 = unsafe { n.to_int_unchecked() };
    let y = p * f32::from_bits(((ni + 126) << 23) as u32) * 2.0;
    // NaN stays NaN (the clamp above maps it to EXP_LOW); -inf and tiny
    // inputs give exactly 0.
    if x.is_nan() {
        x
    } else if x < EXP_LOW {
        0.0
    } else if x > EXP_OVERFLOW {
        f32::INFINITY
    } else {
        y
    }
}

/// `erf(x) / x` for `|x| < 0.5`, a polynomial in `x^2` (highest power
/// first): `2 / sqrt(pi)` times the Taylor series' `1 - x^2/3 + x^4/10 -
/// x^6/42 + x^8/216 - x^10/1320`, whose next term is below 1e-8 there.
pub const ERF_NEAR_ZERO: [f32; 6] =
    [-0.000_854_832_7, 0.005_223_978, -0.026_866_171, 0.112_837_92, -0.376_126_39, std::f32::consts::FRAC_2_SQRT_PI];

/// `erf(x)`: Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7),
/// and below `|x| = 0.5`, where that is poor relative to `erf(x)` itself
/// (22% off at 6e-7), the Taylor series (`ERF_NEAR_ZERO`); as the
/// generated code's `vmath::erf`.
#[inline(always)]
pub fn erf<const FMA: bool>(x: f32) -> f32 {
    let ax = x.abs();
    if ax < 0.5 {
        return poly::<FMA>(x * x, &ERF_NEAR_ZERO) * x;
    }
    let t = 1.0 / madd::<FMA>(0.327_591_1, ax, 1.0);
    let q = poly::<FMA>(t, &[1.061_405_4, -1.453_152_1, 1.421_413_8, -0.284_496_72, 0.254_829_6]) * t;
    let y = 1.0 - q * exp::<FMA>(-ax * ax);
    y.copysign(x)
}

/// `tanh(x)`: `1 - 2 / (e^2x + 1)`, with a Taylor polynomial near 0 where
/// that form loses relative precision (as `vmath::tanh`).
#[inline(always)]
pub fn tanh<const FMA: bool>(x: f32) -> f32 {
    let far = 1.0 - 2.0 / (exp::<FMA>(2.0 * x) + 1.0);
    let s = x * x;
    let near = poly::<FMA>(s, &[-17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0, 1.0]) * x;
    if x.abs() < 0.125 {
        near
    } else {
        far
    }
}

/// The largest element of a row, NaN if any is (as the generated code's
/// `fmax`), in lanes.
#[inline(always)]
pub fn row_max(row: &[f32]) -> f32 {
    let max = |a: f32, b: f32| if a > b || a.is_nan() { a } else { b };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| max(a, b));
    for c in chunks {
        for l in 0..LANES {
            lanes[l] = max(lanes[l], c[l]);
        }
    }
    lanes.iter().fold(tail, |a, &b| max(a, b))
}

/// `x = e^(x - max)` in place, in lanes; returns the sum.
#[inline(always)]
pub fn exp_and_sum<const FMA: bool>(row: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = exp::<FMA>(c[l] - max);
            c[l] = e;
            lanes[l] += e;
        }
    }
    let mut total = 0.0;
    for x in chunks.into_remainder() {
        *x = exp::<FMA>(*x - max);
        total += *x;
    }
    total + lanes.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_math_matches_libm() {
        let mut worst = [0f32; 3];
        // From the flush to the overflow: [-86.99, 88.72], both ends
        // included (e^88.6 came out 26% short when the top was clamped to
        // 88.3).
        for i in -17397..=17744 {
            let x = i as f32 * 0.005;
            let want = (x as f64).exp();
            let e = [exp::<true>(x), exp::<false>(x)].map(|y| ((y as f64 - want).abs() / want) as f32);
            worst[0] = worst[0].max(e[0].max(e[1]));
            worst[1] = worst[1].max((erf::<true>(x) - libm::erff(x)).abs());
            worst[2] = worst[2].max((tanh::<false>(x) - x.tanh()).abs());
        }
        assert!(worst[0] < 1e-6 && worst[1] < 5e-7 && worst[2] < 1e-6, "{worst:?}");
        assert_eq!(exp::<true>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp::<true>(-100.0), 0.0);
        assert!(exp::<true>(f32::NAN).is_nan());
        assert!((exp::<true>(88.0) - 88f32.exp()).abs() / 88f32.exp() < 1e-6);
        assert_eq!(exp::<true>(88.8), f32::INFINITY);
        assert_eq!(exp::<false>(f32::INFINITY), f32::INFINITY);
    }
}

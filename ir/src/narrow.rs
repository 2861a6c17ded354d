//! Narrow types carried in wider ones: ONNX's 8- and 4-bit floats (opsets
//! 19-23) as f32 values exactly on their grid, its 4- and 2-bit integers
//! (opsets 21 and 25) as 8-bit integers in their range.
//!
//! Egret computes with the carrier: a cast to a narrow type rounds (or
//! wraps) onto it (`Op::CastNarrow`), a cast from one is a cast from its
//! carrier, and the importer decodes narrow tensors into their carrier. The
//! rounding is round-to-nearest-even, as ONNX's reference (`ml_dtypes`)
//! rounds, except `f8e8m0`'s, which its `round_mode` chooses.

use crate::dtype::DType;
use crate::op::{NarrowType, RoundMode};

/// A small float format: `man` stored mantissa bits, the smallest normal
/// exponent, the largest finite value, and what it lacks.
struct Format {
    man: i32,
    min_exp: i32,
    max: f64,
    /// Overflow without saturation gives infinity (else NaN).
    has_inf: bool,
    /// NaN has an encoding (else NaN saturates like infinity does).
    has_nan: bool,
    /// No negative zero (the `fnuz` types): a zero result is +0.
    unsigned_zero: bool,
}

impl NarrowType {
    pub const ALL: [NarrowType; 10] = [
        NarrowType::F8E4M3FN,
        NarrowType::F8E4M3FNUZ,
        NarrowType::F8E5M2,
        NarrowType::F8E5M2FNUZ,
        NarrowType::F8E8M0,
        NarrowType::F4E2M1,
        NarrowType::I4,
        NarrowType::U4,
        NarrowType::I2,
        NarrowType::U2,
    ];

    /// The type Egret stores and computes it in.
    pub fn carrier(self) -> DType {
        match self {
            NarrowType::I4 | NarrowType::I2 => DType::I8,
            NarrowType::U4 | NarrowType::U2 => DType::U8,
            _ => DType::F32,
        }
    }

    /// Its width in bits, as ONNX packs it.
    pub fn bits(self) -> u32 {
        match self {
            NarrowType::I2 | NarrowType::U2 => 2,
            NarrowType::F4E2M1 | NarrowType::I4 | NarrowType::U4 => 4,
            _ => 8,
        }
    }

    pub fn is_float(self) -> bool {
        self.carrier() == DType::F32
    }

    /// ONNX's `TensorProto.DataType` code.
    pub fn onnx_code(self) -> i32 {
        match self {
            NarrowType::F8E4M3FN => 17,
            NarrowType::F8E4M3FNUZ => 18,
            NarrowType::F8E5M2 => 19,
            NarrowType::F8E5M2FNUZ => 20,
            NarrowType::U4 => 21,
            NarrowType::I4 => 22,
            NarrowType::F4E2M1 => 23,
            NarrowType::F8E8M0 => 24,
            NarrowType::U2 => 25,
            NarrowType::I2 => 26,
        }
    }

    pub fn from_onnx(code: i32) -> Option<NarrowType> {
        NarrowType::ALL.into_iter().find(|t| t.onnx_code() == code)
    }

    /// The range of an integer type, `None` for a float one.
    pub fn int_range(self) -> Option<(i64, i64)> {
        match self {
            NarrowType::I4 => Some((-8, 7)),
            NarrowType::U4 => Some((0, 15)),
            NarrowType::I2 => Some((-2, 1)),
            NarrowType::U2 => Some((0, 3)),
            _ => None,
        }
    }

    fn format(self) -> Option<Format> {
        let f = |man, min_exp, max, has_inf, has_nan, unsigned_zero| Format {
            man,
            min_exp,
            max,
            has_inf,
            has_nan,
            unsigned_zero,
        };
        Some(match self {
            NarrowType::F8E4M3FN => f(3, -6, 448.0, false, true, false),
            NarrowType::F8E4M3FNUZ => f(3, -7, 240.0, false, true, true),
            NarrowType::F8E5M2 => f(2, -14, 57344.0, true, true, false),
            NarrowType::F8E5M2FNUZ => f(2, -15, 57344.0, false, true, true),
            NarrowType::F4E2M1 => f(1, 0, 6.0, false, false, false),
            _ => return None,
        })
    }

    /// An integer's value wrapped into the type (its low bits, sign-extended
    /// for the signed ones), as ONNX's casts to 4- and 2-bit integers do.
    pub fn wrap(self, x: i64) -> i64 {
        let bits = self.bits();
        let low = x & ((1i64 << bits) - 1);
        match self {
            NarrowType::I4 | NarrowType::I2 if low >= 1 << (bits - 1) => low - (1 << bits),
            _ => low,
        }
    }

    /// A float cast to an integer type: truncated toward zero and wrapped
    /// (NaN to 0), as ONNX's reference casts.
    pub fn wrap_float(self, x: f64) -> i64 {
        let whole = if x.is_nan() { 0 } else { x.trunc().clamp(i64::MIN as f64, i64::MAX as f64) as i64 };
        self.wrap(whole)
    }

    /// A float cast to the type, as its carrier's value: rounded onto a
    /// float type's grid, or `wrap_float` into an integer type.
    pub fn cast_f32(self, x: f32, saturate: bool, round_mode: RoundMode) -> f32 {
        if self.int_range().is_some() {
            return self.wrap_float(x as f64) as f32;
        }
        if self == NarrowType::F8E8M0 {
            return e8m0(x, saturate, round_mode);
        }
        let f = self.format().expect("a float format");
        let overflow = |negative: bool| {
            let v = if saturate || !f.has_nan {
                f.max
            } else if f.has_inf {
                f64::INFINITY
            } else {
                return f32::NAN;
            };
            (if negative { -v } else { v }) as f32
        };
        if x.is_nan() {
            // Without a NaN, `f4e2m1` takes ml_dtypes' choice: negative zero.
            return if f.has_nan { f32::NAN } else { -0.0 };
        }
        if x.is_infinite() {
            return overflow(x < 0.0);
        }
        let a = (x as f64).abs();
        if a == 0.0 {
            return if f.unsigned_zero { 0.0 } else { x };
        }
        // The quantum at a's binade (fixed below the smallest normal): a
        // power of two, so a / q, its rounding and the product are exact.
        // (An f32 subnormal lies far below every format's smallest normal.)
        let exp = (((x.to_bits() >> 23) & 0xff) as i32 - 127).max(f.min_exp);
        let q = 2f64.powi(exp - f.man);
        let r = (a / q).round_ties_even() * q;
        if r > f.max {
            return overflow(x < 0.0);
        }
        let r = if x < 0.0 { -r } else { r };
        if r == 0.0 && f.unsigned_zero {
            0.0
        } else {
            r as f32
        }
    }
}

/// `f8e8m0`: 2^e for e in -127..=127, NaN for 255, no zero or sign. A
/// value's exponent is kept (its sign and a subnormal's fraction dropped;
/// ONNX leaves negative values unspecified) and rounded by its mantissa as
/// `round_mode` says, as ONNX's reference does on the f32 bits. Infinity
/// saturates to 2^127 and zero is NaN without saturation, as the spec's
/// table says.
fn e8m0(x: f32, saturate: bool, round_mode: RoundMode) -> f32 {
    let bits = x.to_bits();
    let exp = (bits >> 23) & 0xff;
    if x.is_infinite() && saturate {
        return 2f32.powi(127);
    }
    if exp == 0xff || (x == 0.0 && !saturate) {
        return f32::NAN;
    }
    let round_up = match round_mode {
        RoundMode::Down => false,
        RoundMode::Up => bits & 0x7f_ffff != 0,
        RoundMode::Nearest => {
            let (g, r, s) = (bits & 0x40_0000 != 0, bits & 0x20_0000 != 0, bits & 0x1f_ffff != 0);
            g && (r || s || exp > 0)
        }
    };
    let exp = exp + (round_up && !(saturate && exp == 0xfe)) as u32;
    if exp == 0xff {
        return f32::NAN;
    }
    // 2^(exp - 127); the smallest, 2^-127, is an f32 subnormal.
    2f64.powi(exp as i32 - 127) as f32
}

/// Decodes one narrow value from its bits (the low `bits()` of `code`) into
/// its carrier's value.
pub fn decode(t: NarrowType, code: u8) -> f64 {
    let bits = t.bits();
    let code = code & ((1u16 << bits) - 1) as u8;
    if let Some((lo, _)) = t.int_range() {
        return if lo < 0 { t.wrap(code as i64) as f64 } else { code as f64 };
    }
    if t == NarrowType::F8E8M0 {
        return if code == 0xff { f64::NAN } else { 2f64.powi(code as i32 - 127) };
    }
    let f = t.format().expect("a float format");
    let exp_bits = bits as i32 - 1 - f.man;
    let sign = code >> (bits - 1) & 1 == 1;
    let e = (code as i32 >> f.man) & ((1 << exp_bits) - 1);
    let m = code as i32 & ((1 << f.man) - 1);
    // fnuz: the negative zero's code is NaN.
    if f.unsigned_zero && sign && e == 0 && m == 0 {
        return f64::NAN;
    }
    let all_ones = e == (1 << exp_bits) - 1;
    if f.has_inf && all_ones {
        return match (m, sign) {
            (0, false) => f64::INFINITY,
            (0, true) => f64::NEG_INFINITY,
            _ => f64::NAN,
        };
    }
    // e4m3fn: only the all-ones code is NaN.
    if !f.has_inf && !f.unsigned_zero && f.has_nan && all_ones && m == (1 << f.man) - 1 {
        return f64::NAN;
    }
    let bias = 1 - f.min_exp;
    let v = if e == 0 {
        m as f64 * 2f64.powi(f.min_exp - f.man)
    } else {
        (1.0 + m as f64 / (1 << f.man) as f64) * 2f64.powi(e - bias)
    };
    if sign {
        -v
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code of every float type decodes to a value that casts back to
    /// itself (the grid is what the cast rounds onto), and the largest
    /// finite value is the format's.
    #[test]
    fn every_code_round_trips_through_the_cast() {
        for t in NarrowType::ALL.into_iter().filter(|t| t.is_float()) {
            let mut max = 0f64;
            for code in 0..(1u16 << t.bits()) {
                let v = decode(t, code as u8);
                if !v.is_finite() {
                    continue;
                }
                max = max.max(v);
                let back = t.cast_f32(v as f32, false, RoundMode::Nearest) as f64;
                assert_eq!(back, v, "{t:?} code {code:#x}");
            }
            if let Some(f) = t.format() {
                assert_eq!(max, f.max, "{t:?}");
            }
        }
    }

    /// Halfway between two neighbours rounds to the even one; just past
    /// halfway rounds up; past the largest value saturates or overflows.
    #[test]
    fn rounding_is_to_nearest_even_and_overflow_follows_saturate() {
        let t = NarrowType::F8E4M3FN;
        let up = RoundMode::Up;
        // 1.0625 lies halfway between 1 (even) and 1.125.
        assert_eq!(t.cast_f32(1.0625, true, up), 1.0);
        assert_eq!(t.cast_f32(1.0626, true, up), 1.125);
        // 1.1875 lies halfway between 1.125 and 1.25 (even).
        assert_eq!(t.cast_f32(1.1875, true, up), 1.25);
        assert_eq!(t.cast_f32(464.0, false, up), 448.0);
        assert!(t.cast_f32(470.0, false, up).is_nan());
        assert_eq!(t.cast_f32(470.0, true, up), 448.0);
        assert_eq!(t.cast_f32(f32::NEG_INFINITY, true, up), -448.0);
        assert_eq!(NarrowType::F8E5M2.cast_f32(1e9, false, up), f32::INFINITY);
        assert_eq!(NarrowType::F4E2M1.cast_f32(-3.5, false, up), -4.0);
        assert_eq!(NarrowType::F4E2M1.cast_f32(0.25, false, up), 0.0);
        // Subnormals of e4m3fn are multiples of 2^-9.
        assert_eq!(t.cast_f32(3.0 * 2f32.powi(-10), true, up), 2f32.powi(-8));
        assert_eq!(NarrowType::F8E4M3FNUZ.cast_f32(-1e-9, true, up).to_bits(), 0);
        assert_eq!(NarrowType::I4.cast_f32(9.0, true, up), -7.0);
        assert_eq!(NarrowType::U2.cast_f32(-1.0, true, up), 3.0);
        assert_eq!(NarrowType::I2.cast_f32(-1.7, true, up), -1.0);
        assert_eq!(NarrowType::F8E8M0.cast_f32(1.1, true, up), 2.0);
        assert_eq!(NarrowType::F8E8M0.cast_f32(1.1, true, RoundMode::Down), 1.0);
        assert_eq!(NarrowType::F8E8M0.cast_f32(0.0, true, up), 2f32.powi(-127));
        assert!(NarrowType::F8E8M0.cast_f32(0.0, false, RoundMode::Nearest).is_nan());
        assert_eq!(NarrowType::F8E8M0.cast_f32(f32::INFINITY, true, up), 2f32.powi(127));
        assert_eq!(NarrowType::F8E8M0.cast_f32(3.0, false, RoundMode::Nearest), 4.0);
        assert_eq!(NarrowType::F8E8M0.cast_f32(2.9, false, RoundMode::Nearest), 2.0);
    }
}

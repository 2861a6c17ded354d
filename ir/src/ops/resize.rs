//! Resize: separable nearest / linear / cubic resampling.
//!
//! Each axis maps an output coordinate to a list of (input index, weight)
//! taps; an output element is the sum over the product of its axes' taps.
//! Indices outside the input clamp to the edge, as the ONNX reference does.

use super::{arity, OpResult};
use crate::dtype::Type;
use crate::op::{CoordMode, NearestMode, Op, ResizeMode};
use crate::tensor::{strides_of, Data, Tensor};

pub fn infer(op: &Op, inputs: &[&Type]) -> OpResult<Vec<Type>> {
    arity(inputs, 1, 1)?;
    let Op::Resize { sizes, scales, roi, .. } = op else {
        return Err("not a resize".into());
    };
    let x = inputs[0];
    if sizes.len() != x.rank() || scales.len() != x.rank() {
        return Err(format!("sizes {sizes:?} / scales {scales:?} must have one entry per axis"));
    }
    if !roi.is_empty() && roi.len() != 2 * x.rank() {
        return Err(format!("roi must have 2 x rank entries, found {}", roi.len()));
    }
    if x.dtype == crate::DType::Bool {
        return Err("resize is not defined on bool".into());
    }
    Ok(vec![Type::new(x.dtype, sizes.clone())])
}

type Taps = Vec<Vec<(Option<usize>, f64)>>;

#[allow(clippy::too_many_arguments)]
fn axis_taps(
    len_in: usize,
    len_out: usize,
    scale: f64,
    roi: (f64, f64),
    mode: ResizeMode,
    coord: CoordMode,
    nearest: NearestMode,
    a: f64,
    exclude_outside: bool,
) -> Taps {
    (0..len_out)
        .map(|o| {
            let xo = o as f64;
            let li = len_in as f64;
            // ONNX measures the resized length as `scale * len_in`, which is
            // fractional when scales (not sizes) were given.
            let lo = scale * li;
            let x = match coord {
                CoordMode::HalfPixel => (xo + 0.5) / scale - 0.5,
                CoordMode::HalfPixelSymmetric => {
                    let adj = len_out as f64 / lo;
                    let center = li / 2.0;
                    let offset = center * (1.0 - adj);
                    offset + (xo + 0.5) / scale - 0.5
                }
                CoordMode::PytorchHalfPixel => {
                    if len_out > 1 {
                        (xo + 0.5) / scale - 0.5
                    } else {
                        0.0
                    }
                }
                CoordMode::AlignCorners => {
                    if len_out == 1 {
                        0.0
                    } else {
                        xo * (li - 1.0) / (lo - 1.0)
                    }
                }
                CoordMode::Asymmetric => xo / scale,
                CoordMode::TfCropAndResize => {
                    if len_out > 1 {
                        roi.0 * (li - 1.0) + xo * (roi.1 - roi.0) * (li - 1.0) / (lo - 1.0)
                    } else {
                        0.5 * (roi.0 + roi.1) * (li - 1.0)
                    }
                }
            };
            if coord == CoordMode::TfCropAndResize && (x < 0.0 || x > li - 1.0) {
                // Outside the crop: the extrapolation value (marked by `None`).
                return vec![(None, 1.0)];
            }
            let clamp = |i: i64| i.clamp(0, len_in as i64 - 1) as usize;
            match mode {
                ResizeMode::Nearest => {
                    let frac = x - x.floor();
                    let r = match nearest {
                        NearestMode::RoundPreferFloor => {
                            if frac == 0.5 {
                                x.floor()
                            } else {
                                x.round()
                            }
                        }
                        NearestMode::RoundPreferCeil => {
                            if frac == 0.5 {
                                x.ceil()
                            } else {
                                x.round()
                            }
                        }
                        NearestMode::Floor => x.floor(),
                        NearestMode::Ceil => x.ceil(),
                    };
                    vec![(Some(clamp(r as i64)), 1.0)]
                }
                ResizeMode::Linear => {
                    let x0 = x.floor();
                    let t = x - x0;
                    vec![(Some(clamp(x0 as i64)), 1.0 - t), (Some(clamp(x0 as i64 + 1)), t)]
                }
                ResizeMode::Cubic => {
                    let x0 = x.floor();
                    let s = x - x0;
                    let w = [
                        ((a * (s + 1.0) - 5.0 * a) * (s + 1.0) + 8.0 * a) * (s + 1.0) - 4.0 * a,
                        ((a + 2.0) * s - (a + 3.0)) * s * s + 1.0,
                        ((a + 2.0) * (1.0 - s) - (a + 3.0)) * (1.0 - s) * (1.0 - s) + 1.0,
                        ((a * (2.0 - s) - 5.0 * a) * (2.0 - s) + 8.0 * a) * (2.0 - s) - 4.0 * a,
                    ];
                    let mut taps: Vec<(Option<usize>, f64)> = Vec::with_capacity(4);
                    let mut total = 0.0;
                    for (k, wk) in w.iter().enumerate() {
                        let i = x0 as i64 - 1 + k as i64;
                        let inside = (0..len_in as i64).contains(&i);
                        let wk = if exclude_outside && !inside { 0.0 } else { *wk };
                        total += wk;
                        taps.push((Some(clamp(i)), wk));
                    }
                    if exclude_outside && total != 0.0 {
                        for t in taps.iter_mut() {
                            t.1 /= total;
                        }
                    }
                    taps
                }
            }
        })
        .collect()
}

pub fn eval(op: &Op, inputs: &[&Tensor]) -> OpResult<Vec<Tensor>> {
    let Op::Resize { sizes, scales, mode, coord, nearest, cubic_coeff_a, exclude_outside, extrapolation_value, roi } =
        op
    else {
        return Err("not a resize".into());
    };
    let x = inputs[0];
    let shape = x.shape();
    let r = shape.len();
    let taps: Vec<Taps> = (0..r)
        .map(|a| {
            let roi_a = if roi.is_empty() { (0.0, 1.0) } else { (roi[a] as f64, roi[a + r] as f64) };
            if shape[a] == sizes[a] && scales[a] == 1.0 && *coord != CoordMode::TfCropAndResize {
                return (0..sizes[a]).map(|o| vec![(Some(o), 1.0)]).collect();
            }
            axis_taps(
                shape[a],
                sizes[a],
                scales[a] as f64,
                roi_a,
                *mode,
                *coord,
                *nearest,
                *cubic_coeff_a as f64,
                *exclude_outside,
            )
        })
        .collect();
    let xs = strides_of(shape);
    let v = x.to_f64_vec();
    let n: usize = sizes.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut coord_out = vec![0usize; r];
    for _ in 0..n {
        // Sum over the product of this element's taps along every axis.
        let mut acc = vec![(0usize, 1.0f64, true)];
        for a in 0..r {
            let mut next = Vec::with_capacity(acc.len() * taps[a][coord_out[a]].len());
            for &(off, w, ok) in &acc {
                for &(i, tw) in &taps[a][coord_out[a]] {
                    match i {
                        Some(i) => next.push((off + i * xs[a], w * tw, ok)),
                        None => next.push((off, w * tw, false)),
                    }
                }
            }
            acc = next;
        }
        let val = if acc.iter().any(|t| !t.2) {
            *extrapolation_value as f64
        } else {
            acc.iter().map(|&(o, w, _)| w * v[o]).sum()
        };
        out.push(val);
        for a in (0..r).rev() {
            coord_out[a] += 1;
            if coord_out[a] < sizes[a] {
                break;
            }
            coord_out[a] = 0;
        }
    }
    let data = if x.dtype().is_float() {
        Data::from_f64s(x.dtype(), &out)
    } else {
        // Integer images round to the nearest value.
        let rounded: Vec<f64> = out.iter().map(|v| v.round()).collect();
        Data::from_f64s(x.dtype(), &rounded)
    };
    Ok(vec![Tensor::new(sizes.clone(), data)])
}

//! What lets the kernels' loops vectorise: the element trait, a branch-free `exp`, reductions
//! with independent lanes (a float sum in one accumulator is a serial chain the compiler may
//! not reorder), and run-time selection of AVX-512 / AVX2 code for each row function (the
//! crate is built for baseline x86-64, SSE2 only).

use candle_core::WithDType;

/// Element types the kernels are written for.
pub(crate) trait Real: WithDType + num_traits::Float {
    /// eˣ in a form the compiler can vectorise (f32: a branch-free polynomial within 2 ulp of
    /// the correctly rounded value; f64: the standard library's).
    fn exp_fast(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp_fast(self) -> f64 {
        self.exp()
    }
}

/// eˣ for f32 by range reduction x = n·ln2 + r, |r| ≤ ln2/2, and a degree-6 polynomial for eʳ
/// (Cephes `expf` coefficients), scaled by 2ⁿ through the exponent bits. Inputs below −87.34
/// give 0 (as `f32::exp` underflows there), above 88.72 give +∞; NaN stays NaN. Every step
/// is a select or arithmetic, so loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_83;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // t = 1.5·2²³ + k holds the integer k in its low mantissa bits: rounding to an integer
    // and reading it without a float → int conversion.
    const MAGIC: f32 = 12_582_912.0;
    const MAGIC_BITS: i32 = 0x4B40_0000;
    // max/min (not clamp) send NaN to a bound, keeping the bit tricks defined; NaN is put back
    // at the end.
    #[allow(clippy::manual_clamp)]
    let xc = x.max(LO).min(HI);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let k = t.to_bits() as i32 - MAGIC_BITS;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let er = p * r * r + r + 1.0;
    // 2ᵏ for k in [−126, 128] as 2ᵃ·2ᵇ, a = ⌊k/2⌋, b = k − a, each a normal float.
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = er * pow2(k >> 1) * pow2(k - (k >> 1));
    let y = if x < LO { 0.0 } else { y };
    let y = if x > HI { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// Independent accumulators per reduction: one AVX-512 register of f32.
const LANES: usize = 16;

/// Σ f(aᵢ).
#[inline(always)]
pub(crate) fn sum_map<T: Real>(a: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = a.chunks_exact(LANES);
    let mut total = chunks.remainder().iter().fold(T::zero(), |s, &v| s + f(v));
    for c in chunks {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    for v in acc {
        total += v;
    }
    total
}

/// Σ f(aᵢ, bᵢ) over slices of equal length.
#[inline(always)]
pub(crate) fn sum_map2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); LANES];
    let split = n - n % LANES;
    for (ca, cb) in a[..split]
        .chunks_exact(LANES)
        .zip(b[..split].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += f(ca[l], cb[l]);
        }
    }
    let mut total = a[split..]
        .iter()
        .zip(&b[split..])
        .fold(T::zero(), |s, (&x, &y)| s + f(x, y));
    for v in acc {
        total += v;
    }
    total
}

/// Σ f(aᵢ, bᵢ, cᵢ) over slices of equal length.
#[inline(always)]
pub(crate) fn sum_map3<T: Real>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) -> T {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [T::zero(); LANES];
    let split = n - n % LANES;
    for ((ca, cb), cc) in a[..split]
        .chunks_exact(LANES)
        .zip(b[..split].chunks_exact(LANES))
        .zip(c[..split].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += f(ca[l], cb[l], cc[l]);
        }
    }
    let mut total = T::zero();
    for i in split..n {
        total += f(a[i], b[i], c[i]);
    }
    for v in acc {
        total += v;
    }
    total
}

/// The largest element (−∞ for an empty slice; NaNs are skipped).
#[inline(always)]
pub(crate) fn max_of<T: Real>(a: &[T]) -> T {
    let pick = |m: T, v: T| if v > m { v } else { m };
    let mut acc = [T::neg_infinity(); LANES];
    let chunks = a.chunks_exact(LANES);
    let mut m = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &v| pick(m, v));
    for c in chunks {
        for l in 0..LANES {
            acc[l] = pick(acc[l], c[l]);
        }
    }
    for v in acc {
        m = pick(m, v);
    }
    m
}

/// Instruction sets the row functions are compiled for, best first.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Level {
    Avx512,
    Avx2,
    Baseline,
}

/// The best level this CPU runs (detected once).
#[inline]
pub(crate) fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Level::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// Defines `fn name<T: Real>(args) -> ret` (or a non-generic `fn name(args) -> ret`) whose body is compiled three times (AVX-512,
/// AVX2 + FMA, baseline) and picked at run time by [`level`]. The body must only call
/// `#[inline(always)]` helpers for them to share the wider instructions.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident<$T:ident: Real>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[inline]
        pub(crate) fn $name<$T: $crate::fused::simd::Real>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp<$T: $crate::fused::simd::Real>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512<$T: $crate::fused::simd::Real>($($arg: $ty),*) $(-> $ret)? {
                    imp::<$T>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$T: $crate::fused::simd::Real>($($arg: $ty),*) $(-> $ret)? {
                    imp::<$T>($($arg),*)
                }
                match $crate::fused::simd::level() {
                    // SAFETY: `level` reported these instruction sets on this CPU.
                    $crate::fused::simd::Level::Avx512 => return unsafe { avx512::<$T>($($arg),*) },
                    $crate::fused::simd::Level::Avx2 => return unsafe { avx2::<$T>($($arg),*) },
                    $crate::fused::simd::Level::Baseline => {}
                }
            }
            imp::<$T>($($arg),*)
        }
    };
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[inline]
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                match $crate::fused::simd::level() {
                    // SAFETY: `level` reported these instruction sets on this CPU.
                    $crate::fused::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::fused::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::fused::simd::Level::Baseline => {}
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_two_ulp_of_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        // 2 ulp of f32 is 2·2⁻²³ ≈ 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn lane_reductions_match_plain_loops() {
        // Lengths around the lane width, so remainders of every size are covered.
        for n in [0usize, 1, 15, 16, 17, 40, 100] {
            let a: Vec<f64> = (0..n).map(|i| (i as f64 * 0.7).sin()).collect();
            let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.3).cos()).collect();
            let c: Vec<f64> = (0..n).map(|i| i as f64 * 0.01).collect();
            let close = |x: f64, y: f64| (x - y).abs() < 1e-12;
            assert!(close(sum_map(&a, |v| v * v), a.iter().map(|v| v * v).sum()));
            let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(close(sum_map2(&a, &b, |x, y| x * y), dot));
            let triple: f64 = (0..n).map(|i| a[i] * b[i] + c[i]).sum();
            assert!(close(sum_map3(&a, &b, &c, |x, y, z| x * y + z), triple));
            let max = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(max_of(&a), max);
        }
    }

    multiversion! {
        fn scaled_sum<T: Real>(a: &[T], k: T) -> T {
            sum_map(a, |v| v * k)
        }
    }

    #[test]
    fn the_multiversioned_function_matches_a_plain_loop() {
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.01).sin()).collect();
        let got = scaled_sum(&a, 2.0f32);
        let want: f32 = 2.0 * a.iter().sum::<f32>();
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    }
}

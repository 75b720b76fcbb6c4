//! `C = A·B` with `B` in bf16 and packed once, `A` rounded to bf16 as it is packed, and f32
//! accumulation and output: the frozen base's matmuls on CPUs with AVX-512-BF16.
//!
//! Two kernels, picked at run time: AMX (`tdpbf16ps`, a 16 × 16 tile of f32 sums from a
//! 16 × 32 and a 32 × 16 bf16 tile per instruction) where the CPU has it and the OS grants
//! the tile state, else AVX-512-BF16 (`vdpbf16ps`, 16 sums of bf16 pairs per instruction; on
//! Sapphire Rapids it issues on one port, so it runs at about half the f32 GEMM's rate and
//! is kept for CPUs where it is faster). A frozen weight is packed once into column panels of
//! [`NR`] columns, holding per pair of rows of `B` the two bf16 values of every column side
//! by side (both instructions' layout for `B`); `A` is packed per call. Products run over
//! blocks of [`KC`] pairs, so a panel's block stays in L2 while a row block passes over it.

use rayon::prelude::*;

/// Rows of an AVX-512 strip (14 × 2 accumulators + 2 panel registers of 32).
const MR: usize = 14;
/// Rows of an AMX strip: two tiles of 16.
const MR_AMX: usize = 32;
/// Pairs per AMX tile (a tile row is 64 bytes); packed weights pad `k` to a multiple.
const TILE_PAIRS: usize = 16;
/// Columns of a panel: two 16-lane registers.
pub const NR: usize = 32;
/// Pairs of `k` per block: a panel's block is KC × NR × 4 bytes = 32 KB.
const KC: usize = 256;

/// The bf16 kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Intel AMX tiles.
    Amx,
    /// AVX-512-BF16 dot products.
    Avx512Bf16,
}

impl Kernel {
    /// Name for records and tables.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "AMX-BF16",
            Kernel::Avx512Bf16 => "AVX-512-BF16",
        }
    }

    /// Whether this CPU (and OS) runs it.
    pub fn runs_here(self) -> bool {
        match self {
            Kernel::Amx => amx_granted(),
            Kernel::Avx512Bf16 => avx512_bf16(),
        }
    }
}

fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AMX-TILE and AMX-BF16 in CPUID, and Linux's permission for the tile data state (asked
/// once per process: without it the first tile instruction faults).
fn amx_granted() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let (tile, bf16) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 22 & 1 == 1);
            if !(avx512_bf16() && tile && bf16) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: arch_prctl with these arguments only asks for a permission.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// The fastest kernel this machine runs (`PEFTBENCH_BF16_KERNEL=avx512` skips AMX), or none.
pub fn best() -> Option<Kernel> {
    // Decided once: every frozen product asks.
    static BEST: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        let skip_amx = std::env::var("PEFTBENCH_BF16_KERNEL").is_ok_and(|v| v == "avx512");
        [Kernel::Amx, Kernel::Avx512Bf16]
            .into_iter()
            .filter(|&k| !(skip_amx && k == Kernel::Amx))
            .find(|k| k.runs_here())
    })
}

/// Whether any bf16 kernel runs here.
pub fn available() -> bool {
    best().is_some()
}

/// f32 → bf16, rounding to nearest even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// bf16 → f32 (exact).
#[inline(always)]
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// `B [k, n]` in bf16, packed into panels: `[panel][pair][column][2]`, `k` padded to an even
/// count and `n` to whole panels with zeros.
#[derive(Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    pairs: usize,
    data: Vec<u16>,
}

impl PackedB {
    /// Packs `B[i][j] = b[i·rs + j·cs]` for `i < k`, `j < n`.
    pub fn pack(b: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Self {
        let pairs = k.div_ceil(2).div_ceil(TILE_PAIRS) * TILE_PAIRS;
        let panels = n.div_ceil(NR);
        let mut data = vec![0u16; panels * pairs * NR * 2];
        data.par_chunks_mut(pairs * NR * 2)
            .enumerate()
            .for_each(|(panel, dst)| {
                for p in 0..pairs {
                    for c in 0..NR {
                        let j = panel * NR + c;
                        if j >= n {
                            break;
                        }
                        for h in 0..2 {
                            let i = 2 * p + h;
                            if i < k {
                                dst[(p * NR + c) * 2 + h] = to_bf16(b[i * rs + j * cs]);
                            }
                        }
                    }
                }
            });
        Self { k, n, pairs, data }
    }

    /// Rows of `B` (the product's inner dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of `B`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// Packs rows `rows` of `A [m, k]` (row-major) as strips of [`MR`] rows: `[strip][pair][row]`
/// u32, each the bf16 pair (k = 2p low, 2p + 1 high); missing rows and the odd `k` are zero.
fn pack_a(a: &[f32], k: usize, rows: std::ops::Range<usize>, pairs: usize, dst: &mut Vec<u32>) {
    let strips = rows.len().div_ceil(MR);
    dst.clear();
    dst.resize(strips * pairs * MR, 0);
    for s in 0..strips {
        let strip = &mut dst[s * pairs * MR..(s + 1) * pairs * MR];
        for r in 0..MR {
            let row = rows.start + s * MR + r;
            if row >= rows.end {
                break;
            }
            let src = &a[row * k..(row + 1) * k];
            for p in 0..pairs {
                let lo = src.get(2 * p).map_or(0, |&v| to_bf16(v) as u32);
                let hi = src.get(2 * p + 1).map_or(0, |&v| to_bf16(v) as u32);
                strip[p * MR + r] = lo | (hi << 16);
            }
        }
    }
}

/// `c [m, n] = a [m, k] · B` (row-major `a` and `c`) with the [`best`] kernel. Panics
/// unless one is [`available`] and the sizes agree.
pub fn matmul(a: &[f32], m: usize, b: &PackedB, c: &mut [f32]) {
    let kernel = best().expect("bf16 GEMM on a CPU without AMX or AVX-512-BF16");
    matmul_with(kernel, a, m, b, c)
}

thread_local! {
    /// This thread's products since [`trace_start`], as `[m, k, n]` (ops call the kernel on
    /// the thread running the forward or backward).
    static TRACE: std::cell::RefCell<Option<Vec<[usize; 3]>>> = const { std::cell::RefCell::new(None) };
}

/// Starts recording the shape of every product this thread makes (for the GEMM floor,
/// `gemm_floor.rs`).
pub fn trace_start() {
    TRACE.with(|t| *t.borrow_mut() = Some(Vec::new()));
}

/// Stops recording; returns the shapes recorded since [`trace_start`].
pub fn trace_stop() -> Vec<[usize; 3]> {
    TRACE.with(|t| t.borrow_mut().take().unwrap_or_default())
}

/// [`matmul`] with a given kernel. Panics unless it [`Kernel::runs_here`].
pub fn matmul_with(kernel: Kernel, a: &[f32], m: usize, b: &PackedB, c: &mut [f32]) {
    assert!(
        kernel.runs_here(),
        "{} does not run on this machine",
        kernel.name()
    );
    let (k, n) = (b.k, b.n);
    TRACE.with(|t| {
        if let Some(t) = t.borrow_mut().as_mut() {
            t.push([m, k, n]);
        }
    });
    assert!(
        a.len() >= m * k && c.len() >= m * n,
        "bf16 GEMM: operand sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    let threads = candle_core::utils::get_num_threads().max(1);
    // Row blocks: a few per thread for balance, whole strips, at most 16 strips (the A
    // block then stays in L2 while the panels pass over it).
    let mr = match kernel {
        Kernel::Amx => MR_AMX,
        Kernel::Avx512Bf16 => MR,
    };
    let strips = m.div_ceil(mr);
    let per = strips.div_ceil(threads * 3).clamp(1, 16);
    let mc = per * mr;
    c[..m * n].par_chunks_mut(mc * n).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(packed, packed16), (blk, c)| {
            let rows = blk * mc..((blk + 1) * mc).min(m);
            match kernel {
                Kernel::Avx512Bf16 => {
                    pack_a(a, k, rows.clone(), b.pairs, packed);
                    block(packed, rows.len(), b, c);
                }
                Kernel::Amx => {
                    // SAFETY: `runs_here` checked AVX-512-BF16 and the AMX grant.
                    unsafe { pack_a_amx(a, k, rows.clone(), b.pairs, packed16) };
                    unsafe { block_amx(packed16, rows.len(), b, c) };
                }
            }
        },
    );
}

/// One row block: every panel, every strip, over blocks of [`KC`] pairs.
fn block(a: &[u32], rows: usize, b: &PackedB, c: &mut [f32]) {
    let (n, pairs) = (b.n, b.pairs);
    let strips = rows.div_ceil(MR);
    for k0 in (0..pairs).step_by(KC) {
        let kp = KC.min(pairs - k0);
        for panel in 0..n.div_ceil(NR) {
            let cols = NR.min(n - panel * NR);
            let bp = &b.data[(panel * pairs + k0) * NR * 2..];
            for s in 0..strips {
                let r = MR.min(rows - s * MR);
                let ap = &a[(s * pairs + k0) * MR..];
                let cp = &mut c[s * MR * n + panel * NR..];
                // SAFETY: `available` was checked; `ap` holds kp × MR pairs, `bp` kp × NR × 2
                // values, and `cp` r rows of `cols` columns at stride n.
                unsafe {
                    kernel(
                        kp,
                        ap.as_ptr(),
                        bp.as_ptr(),
                        cp.as_mut_ptr(),
                        n,
                        r,
                        cols,
                        k0 > 0,
                    )
                };
            }
        }
    }
}

/// Packs rows `rows` of `A [m, k]` for AMX: `[strip][tile block][row][32 bf16]`, strips of
/// [`MR_AMX`] rows, tile blocks of 32 values of `k` (one tile row, 64 bytes), zero beyond
/// `m` and `k`; rounded to nearest even by `vcvtne2ps2bf16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_a_amx(
    a: &[f32],
    k: usize,
    rows: std::ops::Range<usize>,
    pairs: usize,
    dst: &mut Vec<u16>,
) {
    use std::arch::x86_64::*;
    let blocks = pairs / TILE_PAIRS;
    let strips = rows.len().div_ceil(MR_AMX);
    // Every element is written below (zeros past `k` and for the last strip's missing rows),
    // so the buffer is not zero-filled first: that fill was a pass as long as the packing.
    let len = strips * blocks * MR_AMX * 32;
    dst.clear();
    dst.reserve(len);
    // SAFETY: u16 has no invalid bit patterns; the loop writes all `len` elements.
    #[allow(clippy::uninit_vec)]
    dst.set_len(len);
    for i in 0..strips * MR_AMX {
        let (s, r) = (i / MR_AMX, i % MR_AMX);
        let row = rows.start + i;
        for kb in 0..blocks {
            let v = if row < rows.end {
                let src = a[row * k..(row + 1) * k].as_ptr();
                let (m0, m1) = column_masks(k.saturating_sub(kb * 32));
                // Masked-off lanes are not read: the pointers may pass the row's end.
                let lo = _mm512_maskz_loadu_ps(m0, src.wrapping_add(kb * 32));
                let hi = _mm512_maskz_loadu_ps(m1, src.wrapping_add(kb * 32 + 16));
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
            } else {
                _mm512_setzero_si512()
            };
            let at = ((s * blocks + kb) * MR_AMX + r) * 32;
            _mm512_storeu_si512(dst.as_mut_ptr().add(at) as *mut _, v);
        }
    }
}

/// The tile shapes: every tile 16 rows × 64 bytes (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// One AMX row block: tiles configured once, then every panel and strip over blocks of
/// [`KC`] pairs (as [`block`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_amx(a: &[u16], rows: usize, b: &PackedB, c: &mut [f32]) {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        (cfg.colsb[t], cfg.rows[t]) = (64, 16);
    }
    std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
    let (n, pairs) = (b.n, b.pairs);
    let blocks = pairs / TILE_PAIRS;
    let strips = rows.div_ceil(MR_AMX);
    let mut tmp = [0f32; MR_AMX * NR];
    for k0 in (0..pairs).step_by(KC) {
        let kp = KC.min(pairs - k0);
        for panel in 0..n.div_ceil(NR) {
            let cols = NR.min(n - panel * NR);
            let bp = b.data.as_ptr().add((panel * pairs + k0) * NR * 2);
            for s in 0..strips {
                let r = MR_AMX.min(rows - s * MR_AMX);
                let ap = a.as_ptr().add((s * blocks + k0 / TILE_PAIRS) * MR_AMX * 32);
                amx_tiles(kp / TILE_PAIRS, ap, bp, &mut tmp);
                store(
                    &tmp,
                    c.as_mut_ptr().add(s * MR_AMX * n + panel * NR),
                    n,
                    r,
                    cols,
                    k0 > 0,
                );
            }
        }
    }
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// `tmp [32, 32] = Σ over `blocks` tile blocks of A [32, 32 bf16] · B [16 pairs, 32 columns]`:
/// four 16 × 16 accumulator tiles (tmm0–3), two A tiles (tmm4–5), two B tiles (tmm6–7).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn amx_tiles(blocks: usize, a: *const u16, b: *const u16, tmp: &mut [f32; MR_AMX * NR]) {
    use std::arch::asm;
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    for kb in 0..blocks {
        let ap = a.add(kb * MR_AMX * 32);
        let bp = b.add(kb * TILE_PAIRS * NR * 2);
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) ap,
            a1 = in(reg) ap.add(16 * 32),
            sa = in(reg) 64usize,
            b0 = in(reg) bp,
            b1 = in(reg) bp.add(32),
            sb = in(reg) NR * 4,
            options(nostack, readonly),
        );
    }
    let t = tmp.as_mut_ptr();
    asm!(
        "tilestored [{c00} + {s}*1], tmm0",
        "tilestored [{c01} + {s}*1], tmm1",
        "tilestored [{c10} + {s}*1], tmm2",
        "tilestored [{c11} + {s}*1], tmm3",
        c00 = in(reg) t,
        c01 = in(reg) t.add(16),
        c10 = in(reg) t.add(16 * NR),
        c11 = in(reg) t.add(16 * NR + 16),
        s = in(reg) NR * 4,
        options(nostack),
    );
}

/// Adds (or writes) `rows` × `cols` of `tmp [32, 32]` into `c` at row stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store(
    tmp: &[f32; MR_AMX * NR],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let (m0, m1) = column_masks(cols);
    for r in 0..rows {
        let row = c.add(r * ldc);
        let mut v0 = _mm512_loadu_ps(tmp.as_ptr().add(r * NR));
        let mut v1 = _mm512_loadu_ps(tmp.as_ptr().add(r * NR + 16));
        if accumulate {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
        }
        _mm512_mask_storeu_ps(row, m0, v0);
        _mm512_mask_storeu_ps(row.add(16), m1, v1);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_a_amx(
    _a: &[f32],
    _k: usize,
    _rows: std::ops::Range<usize>,
    _pairs: usize,
    _dst: &mut Vec<u16>,
) {
    unreachable!("AMX off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_amx(_a: &[u16], _rows: usize, _b: &PackedB, _c: &mut [f32]) {
    unreachable!("AMX off x86-64")
}

/// The lane masks of a panel's two 16-column halves for its first `cols` columns.
fn column_masks(cols: usize) -> (u16, u16) {
    let half = |n: usize| if n >= 16 { 0xffff } else { (1u16 << n) - 1 };
    (half(cols), half(cols.saturating_sub(16)))
}

/// `C[r][0..cols] (+)= Σ_p A[p][r] · B[p][0..cols]` for one strip and one panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    kp: usize,
    a: *const u32,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR * 2) as *const _));
        let b1: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(b.add(p * NR * 2 + NR) as *const _));
        for (r, acc) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + r) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
    }
    let (m0, m1) = column_masks(cols);
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let row = c.add(r * ldc);
        let (mut v0, mut v1) = (acc[0], acc[1]);
        if accumulate {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
        }
        _mm512_mask_storeu_ps(row, m0, v0);
        _mm512_mask_storeu_ps(row.add(16), m1, v1);
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    _kp: usize,
    _a: *const u32,
    _b: *const u16,
    _c: *mut f32,
    _ldc: usize,
    _rows: usize,
    _cols: usize,
    _accumulate: bool,
) {
    unreachable!("bf16 GEMM without AVX-512-BF16")
}

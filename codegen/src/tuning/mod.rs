//! Tunable kernels: the parameters a template exposes, as an explicit,
//! enumerable space; the variant the scheduler builds for a kernel; and
//! the table of measured winners ([`Tuning`]) it takes variants from.
//!
//! A [`Site`] is what is fixed about a kernel (its template and static
//! sizes and dtypes); a [`Variant`] is one choice of everything the
//! template leaves open (tile sizes, accumulator sets, the weight layout,
//! Cranelift or LLVM). A site's [`Space`] lists every variant as families
//! of discrete axes, which is what the tuner (`smelt-tune`) searches.
//! Every variant of a site computes the same function; they differ in
//! speed only (and in the order float sums are added).
//!
//! A site's [`Site::signature`] names the site, its space and the text of
//! its default kernels: records measured for it stop applying when any of
//! them changes (a new template, another domain, a build with or without
//! LLVM). The tuning database (in `smelt-tune`) keys records by signature,
//! shape bucket and device; [`Tuning`] is what one compile takes from it.
//!
//! Tunable today: the CPU weight products (a matmul or gated MLP with a
//! constant `[n, k]` weight), which are most of a decoder's time, over
//! tile rows and columns, accumulator sets along `k` for one-row tiles
//! (the unroll of their inner loop), how many weight panels a one-row tile
//! reads at once (`streams`: each thread reads that many sequential
//! streams), `fma` or multiply-add, the vector width of packed tiles
//! through LLVM, the weight layout and the lowering. Not in the space: how
//! work is split across threads (contiguous chunks of the one `Parallel`
//! loop).
//! On the GPU the weight products (`Site::GpuWeightProduct`, the
//! generated kernels of `templates::gpu::weight_product`) are tunable over
//! their block size, the GEMV's thread groups and rows per pass, the point
//! where the tiled GEMM takes over, its tile and `k` slice, and the grid
//! (`gpu`), or done by cuBLAS instead ([`Variant::Cublas`]).
//! Other kernels (norms, rope, attention, elementwise) have no parameters
//! yet and are recorded as [`TuningSource::Fixed`]; the other GPU kernels
//! take their block sizes from `select::GpuConfig`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use smelt_ir::{DType, Dim, TensorType};
use smelt_runtime::plan::{KernelTuning, TuningSource};

mod gpu;
pub use gpu::{GpuParams, AXES as GPU_AXES};

use crate::kir::Scalar;
use crate::select::{self, Instance, Packing, PanelParams, SelectError};
use crate::templates::matmul_dyn::{Act, Layout, TileParams};

/// Which code generator lowers a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lowering {
    Cranelift,
    /// LLVM at `O3` for the host (cargo feature `llvm`).
    Llvm,
    /// LLVM's NVPTX backend (GPU kernels; cargo feature `llvm`).
    Nvptx,
}

impl Lowering {
    pub fn name(self) -> &'static str {
        match self {
            Lowering::Cranelift => "cranelift",
            Lowering::Llvm => "llvm",
            Lowering::Nvptx => "nvptx",
        }
    }

    /// The host lowerings this build has.
    pub fn available() -> Vec<Lowering> {
        if cfg!(feature = "llvm") {
            vec![Lowering::Cranelift, Lowering::Llvm]
        } else {
            vec![Lowering::Cranelift]
        }
    }
}

/// A tunable kernel: its template and what is fixed about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// `x · Wᵀ` (`act` none) or the gated MLP `act(x · Wgᵀ) * (x · Wuᵀ)`
    /// with constant weights given `[n, k]` and stored as `w` (f32, bf16 or
    /// f16); the rows of `x` are a scalar parameter of the kernel.
    WeightProduct { n: usize, k: usize, act: Option<Act>, w: Scalar },
    /// The same product as a GPU kernel (f32 activations, weights `[n, k]`
    /// as stored), whose rows `m` are a scalar parameter.
    GpuWeightProduct { n: usize, k: usize, act: Option<Act>, w: Scalar },
}

/// One choice of a site's open parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Weights packed in panels (`templates::packed`).
    Panels { p: PanelParams, lowering: Lowering },
    /// Weights read as `[n, k]` rows (`templates::matmul_dyn`, `NK`).
    Rows { t: TileParams, lowering: Lowering },
    /// A GPU weight product's parameters (`gpu`).
    Gpu { p: GpuParams },
    /// A GPU weight product done by cuBLAS (`select::gpu_library`, f32
    /// compute: the same function, unlike TF32, which stays the user's
    /// choice with `--gpu-gemm cublas-tf32`).
    Cublas,
}

impl Variant {
    pub fn lowering(&self) -> Lowering {
        match self {
            Variant::Panels { lowering, .. } | Variant::Rows { lowering, .. } => *lowering,
            Variant::Gpu { .. } | Variant::Cublas => Lowering::Nvptx,
        }
    }
}

/// A kernel built for a variant, and how its weights must be laid out.
#[derive(Clone, Debug)]
pub struct Built {
    pub instance: Instance,
    /// `Some`: each weight is packed so (see [`Packing::apply_bytes`]);
    /// `None`: each weight is stored `[n, k]` row-major.
    pub packing: Option<Packing>,
    pub lowering: Lowering,
}

/// One parameter of a family: its name and the values it may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Axis {
    pub name: &'static str,
    pub values: Vec<usize>,
}

/// The kinds of kernels a weight product's variants come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FamilyKind {
    Panels,
    Rows,
    Gpu,
    /// One variant, no axes: [`Variant::Cublas`].
    Cublas,
}

/// Variants of one kind and lowering: the product of its axes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Family {
    pub kind: FamilyKind,
    pub lowering: Lowering,
    pub axes: Vec<Axis>,
}

impl Family {
    /// The variant at `point` (one value index per axis).
    pub fn variant(&self, point: &[usize]) -> Variant {
        let v = |i: usize| self.axes[i].values[point[i]];
        match self.kind {
            FamilyKind::Panels => Variant::Panels {
                p: PanelParams {
                    mr: v(0),
                    nr: v(1),
                    ksplit: v(2),
                    fma: v(3) == 1,
                    lanes: v(4) as u8,
                    streams: v(5),
                    prefetch: v(6),
                },
                lowering: self.lowering,
            },
            FamilyKind::Rows => {
                Variant::Rows { t: TileParams { mr: v(0), nc: v(1), ksplit: v(2) }, lowering: self.lowering }
            }
            FamilyKind::Gpu => Variant::Gpu { p: GpuParams::from_values(std::array::from_fn(v)) },
            FamilyKind::Cublas => Variant::Cublas,
        }
    }

    /// The point of `v` in this family, if it is one of its variants.
    pub fn point_of(&self, v: &Variant) -> Option<Vec<usize>> {
        let values: Vec<usize> = match (self.kind, v) {
            (FamilyKind::Panels, Variant::Panels { p, lowering }) if *lowering == self.lowering => {
                vec![p.mr, p.nr, p.ksplit, p.fma as usize, p.lanes as usize, p.streams, p.prefetch]
            }
            (FamilyKind::Rows, Variant::Rows { t, lowering }) if *lowering == self.lowering => {
                vec![t.mr, t.nc, t.ksplit]
            }
            (FamilyKind::Gpu, Variant::Gpu { p }) => p.values().to_vec(),
            (FamilyKind::Cublas, Variant::Cublas) => vec![],
            _ => return None,
        };
        self.axes.iter().zip(values).map(|(a, x)| a.values.iter().position(|&y| y == x)).collect()
    }

    /// How many variants the family has.
    pub fn len(&self) -> usize {
        self.axes.iter().map(|a| a.values.len()).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every variant, in a fixed order.
    pub fn variants(&self) -> Vec<Variant> {
        let mut out = vec![];
        let mut point = vec![0; self.axes.len()];
        loop {
            out.push(self.variant(&point));
            let mut i = 0;
            loop {
                if i == point.len() {
                    return out;
                }
                point[i] += 1;
                if point[i] < self.axes[i].values.len() {
                    break;
                }
                point[i] = 0;
                i += 1;
            }
        }
    }
}

/// Every variant of a site, as families.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Space {
    pub families: Vec<Family>,
}

impl Space {
    /// The family `v` belongs to and its point there.
    pub fn locate(&self, v: &Variant) -> Option<(usize, Vec<usize>)> {
        self.families.iter().enumerate().find_map(|(i, f)| f.point_of(v).map(|p| (i, p)))
    }

    pub fn contains(&self, v: &Variant) -> bool {
        self.locate(v).is_some()
    }

    pub fn len(&self) -> usize {
        self.families.iter().map(Family::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for Space {
    /// `panels/cranelift mr=1,2,..;nr=4,8,.. | rows/cranelift ...`: the
    /// domain, as the signature hashes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, fam) in self.families.iter().enumerate() {
            if i > 0 {
                write!(f, " | ")?;
            }
            let kind = match fam.kind {
                FamilyKind::Panels => "panels",
                FamilyKind::Rows => "rows",
                FamilyKind::Gpu => "gpu",
                FamilyKind::Cublas => "cublas",
            };
            write!(f, "{kind}/{}", fam.lowering.name())?;
            for a in &fam.axes {
                let vals: Vec<String> = a.values.iter().map(|v| v.to_string()).collect();
                write!(f, " {}={}", a.name, vals.join(","))?;
            }
        }
        Ok(())
    }
}

impl Site {
    /// The site of a weight product, or `None` for an activation this
    /// template does not know.
    pub fn weight_product(n: usize, k: usize, act: Option<&str>, w: Scalar) -> Option<Site> {
        Some(Site::WeightProduct { n, k, act: parse_act(act)?, w })
    }

    /// The site of a GPU weight product, or `None` for an activation the
    /// template does not know.
    pub fn gpu_weight_product(n: usize, k: usize, act: Option<&str>, w: Scalar) -> Option<Site> {
        Some(Site::GpuWeightProduct { n, k, act: parse_act(act)?, w })
    }

    /// The product's shape, activation and weight type.
    pub fn product(&self) -> (usize, usize, Option<Act>, Scalar) {
        match *self {
            Site::WeightProduct { n, k, act, w } | Site::GpuWeightProduct { n, k, act, w } => (n, k, act, w),
        }
    }

    /// Whether the site is a GPU kernel.
    pub fn is_gpu(&self) -> bool {
        matches!(self, Site::GpuWeightProduct { .. })
    }

    /// The space of variants with the given (host) lowerings available; a
    /// GPU site's space does not depend on them.
    pub fn space(&self, lowerings: &[Lowering]) -> Space {
        let axis = |name, values: &[usize]| Axis { name, values: values.to_vec() };
        if self.is_gpu() {
            let axes = GPU_AXES.iter().map(|(name, values)| axis(name, values)).collect();
            return Space {
                families: vec![
                    Family { kind: FamilyKind::Gpu, lowering: Lowering::Nvptx, axes },
                    Family { kind: FamilyKind::Cublas, lowering: Lowering::Nvptx, axes: vec![] },
                ],
            };
        }
        let mut families = vec![];
        for &lowering in lowerings {
            families.push(Family {
                kind: FamilyKind::Panels,
                lowering,
                axes: vec![
                    // Taller tiles than 8 rows fit only AVX-512's 32 registers.
                    axis("mr", &[1, 2, 3, 4, 5, 6, 7, 8, 10, 12]),
                    // 64 columns (4 vectors of 16 lanes) made bf16 prefills of
                    // 8-32 tokens 15-35% faster on a Zen 5, and decode no faster.
                    axis("nr", &[4, 8, 12, 16, 32, 64]),
                    axis("ksplit", &[1, 2, 4, 8]),
                    axis("fma", &[0, 1]),
                    axis("lanes", &host_lanes(lowering)),
                    axis("streams", &[1, 2, 3, 4]),
                    // Only the LLVM lowering emits prefetches.
                    axis("prefetch", if lowering == Lowering::Llvm { &[0, 1024, 2048, 4096] } else { &[0] }),
                ],
            });
            families.push(Family {
                kind: FamilyKind::Rows,
                lowering,
                axes: vec![axis("mr", &[1, 2, 3, 4, 6]), axis("nc", &[1, 2, 4, 8]), axis("ksplit", &[1, 2, 4])],
            });
        }
        Space { families }
    }

    /// The parameters used without a measurement (the templates' own
    /// estimates): on the CPU packed panels for Cranelift (what it runs
    /// fastest), or `[n, k]` rows, lowered by LLVM where the build has it;
    /// on the GPU `WeightProductParams::for_shape`.
    pub fn default_variant(&self, packed_weights: bool, lowerings: &[Lowering]) -> Variant {
        let (n, k, act, w) = self.product();
        if self.is_gpu() {
            return Variant::Gpu { p: GpuParams::default_for(n, k, w, act) };
        }
        if packed_weights {
            let (p, lowering) = default_panels(lowerings);
            Variant::Panels { p: p.for_weights(w).balanced(n, host_team()), lowering }
        } else {
            let lowering = if lowerings.contains(&Lowering::Llvm) { Lowering::Llvm } else { Lowering::Cranelift };
            Variant::Rows { t: TileParams::default_for(Layout::NK, act.is_some()), lowering }
        }
    }

    /// Where a search of `family` starts: the template's default
    /// parameters in that family.
    pub fn start(&self, family: &Family) -> Vec<usize> {
        let (n, _, act, w) = self.product();
        let v = match family.kind {
            FamilyKind::Panels if family.lowering == Lowering::Llvm => Variant::Panels {
                p: default_panels(&[Lowering::Llvm]).0.for_weights(w).balanced(n, host_team()),
                lowering: family.lowering,
            },
            FamilyKind::Panels => {
                Variant::Panels { p: PanelParams::DEFAULT.balanced(n, host_team()), lowering: family.lowering }
            }
            FamilyKind::Rows => {
                Variant::Rows { t: TileParams::default_for(Layout::NK, act.is_some()), lowering: family.lowering }
            }
            FamilyKind::Gpu => self.default_variant(false, &[]),
            FamilyKind::Cublas => Variant::Cublas,
        };
        family.point_of(&v).unwrap_or_else(|| vec![0; family.axes.len()])
    }

    /// The rows operand the tuner builds kernels for: `f32[m, k]`.
    pub fn rows_type(&self) -> TensorType {
        let (_, k, _, _) = self.product();
        TensorType::new(DType::F32, vec![Dim::sym("m"), Dim::c(k as i64)])
    }

    /// Builds the kernel of variant `v` for rows `x` (`[.., m, k]`); a
    /// [`Variant::Cublas`] is library calls, built by the scheduler
    /// (`select::gpu_library`), not here.
    pub fn build(&self, x: &TensorType, v: &Variant) -> Result<Built, SelectError> {
        let (n, k, act, w) = self.product();
        match (self.is_gpu(), *v) {
            (false, Variant::Panels { p, lowering }) => {
                let wk = select::weight_product_panels(x, n, k, act, w, p)?;
                Ok(Built { instance: wk.instance, packing: Some(wk.packs[0]), lowering })
            }
            (false, Variant::Rows { t, lowering }) => {
                let instance = select::weight_product_rows(x, n, k, act, w, t)?;
                Ok(Built { instance, packing: None, lowering })
            }
            (true, Variant::Gpu { p }) => {
                let fail = |why: String| {
                    let op = match act {
                        None => smelt_ir::Op::MatMul {},
                        Some(a) => smelt_ir::Op::GatedMlp { act: a.name().to_string() },
                    };
                    SelectError::unsupported(&op, std::slice::from_ref(x), why)
                };
                let params = p.resolve(n).map_err(fail)?;
                let instance = select::weight_node_gpu(x, n, k, act.map(Act::name), w, Some(&params))?;
                Ok(Built { instance, packing: None, lowering: Lowering::Nvptx })
            }
            _ => Err(SelectError::unsupported(
                &smelt_ir::Op::MatMul {},
                std::slice::from_ref(x),
                format!("variant `{v}` is not one of site `{self}`'s"),
            )),
        }
    }

    /// How many `[n, k]` weights the kernel reads (2 for the gated MLP).
    pub fn weights(&self) -> usize {
        if self.product().2.is_some() {
            2
        } else {
            1
        }
    }

    /// The stable name of the site, its space and its default kernels'
    /// text: `weight_product-<12 hex digits>` (FNV-1a, so the same on every
    /// run and platform).
    pub fn signature(&self, lowerings: &[Lowering]) -> String {
        let mut text = format!("{self}\n{}\n", self.space(lowerings));
        let defaults = if self.is_gpu() { &[false][..] } else { &[true, false][..] };
        for &packed in defaults {
            let v = self.default_variant(packed, lowerings);
            match self.build(&self.rows_type(), &v) {
                Ok(b) => text.push_str(&b.instance.kernel.to_string()),
                Err(e) => text.push_str(&e.to_string()),
            }
        }
        format!("{}-{:012x}", self.template(), fnv1a(text.as_bytes()) >> 16)
    }

    /// The template's name.
    pub fn template(&self) -> &'static str {
        match self {
            Site::WeightProduct { .. } => "weight_product",
            Site::GpuWeightProduct { .. } => "gpu_weight_product",
        }
    }

    /// A short readable name, like the kernels': `matmul k576 n960`
    /// (`gpu matmul k576 n960` on the GPU).
    pub fn label(&self) -> String {
        let (n, k, act, w) = self.product();
        let what = match act {
            None => "matmul".to_string(),
            Some(a) => format!("gated_mlp_{}", a.name()),
        };
        let w = match w {
            Scalar::BF16 => " bf16",
            Scalar::F16 => " f16",
            _ => "",
        };
        let gpu = if self.is_gpu() { "gpu " } else { "" };
        format!("{gpu}{what} k{k} n{n}{w}")
    }

    /// Floating-point operations and bytes moved by one call with `m`
    /// rows (weights once, activations in, results out), for roofline
    /// estimates.
    pub fn work(&self, m: usize) -> (f64, f64) {
        let (n, k, _, w) = self.product();
        let ws = self.weights() as f64;
        let flops = 2.0 * ws * (m * n * k) as f64;
        let wbytes = ws * (n * k * w.size()) as f64;
        (flops, wbytes + 4.0 * (m * k + m * n) as f64)
    }
}

fn parse_act(act: Option<&str>) -> Option<Option<Act>> {
    match act {
        None => Some(None),
        Some(a) => Some(Some(Act::parse(a)?)),
    }
}

/// FNV-1a, 64 bits.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, c| (h ^ *c as u64).wrapping_mul(0x0100_0000_01b3))
}

fn scalar_name(s: Scalar) -> &'static str {
    match s {
        Scalar::F32 => "f32",
        Scalar::BF16 => "bf16",
        Scalar::F16 => "f16",
        Scalar::I32 => "i32",
        Scalar::I64 => "i64",
        Scalar::Bool => "bool",
    }
}

impl fmt::Display for Site {
    /// `weight_product n=960 k=576 act=none w=f32` (`gpu_weight_product
    /// ...` on the GPU).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (n, k, act, w) = self.product();
        let act = act.map_or("none", Act::name);
        write!(f, "{} n={n} k={k} act={act} w={}", self.template(), scalar_name(w))
    }
}

impl fmt::Display for Variant {
    /// `panels mr=6 nr=8 ksplit=4 fma=0 lanes=4 streams=2 prefetch=0 lowering=cranelift`,
    /// `rows mr=3 nc=4 ksplit=2 lowering=llvm`, or `gpu threads=256 wpg=1 ...`
    /// (the GPU axes in order).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Variant::Panels { p, lowering } => write!(
                f,
                "panels mr={} nr={} ksplit={} fma={} lanes={} streams={} prefetch={} lowering={}",
                p.mr,
                p.nr,
                p.ksplit,
                p.fma as u8,
                p.lanes,
                p.streams,
                p.prefetch,
                lowering.name()
            ),
            Variant::Rows { t, lowering } => {
                write!(f, "rows mr={} nc={} ksplit={} lowering={}", t.mr, t.nc, t.ksplit, lowering.name())
            }
            Variant::Cublas => write!(f, "cublas"),
            Variant::Gpu { p } => {
                write!(f, "gpu")?;
                for ((name, _), v) in GPU_AXES.iter().zip(p.values()) {
                    write!(f, " {name}={v}")?;
                }
                Ok(())
            }
        }
    }
}

/// Why a site or variant string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}`: {why}")]
pub struct ParseError {
    pub text: String,
    pub why: String,
}

/// `word key=value ...` as the word and a map (every key once).
fn fields(s: &str) -> Result<(&str, BTreeMap<&str, &str>), ParseError> {
    let err = |why: String| ParseError { text: s.to_string(), why };
    let mut words = s.split_whitespace();
    let head = words.next().ok_or_else(|| err("empty".into()))?;
    let mut map = BTreeMap::new();
    for w in words {
        let (k, v) = w.split_once('=').ok_or_else(|| err(format!("`{w}` is not key=value")))?;
        if map.insert(k, v).is_some() {
            return Err(err(format!("`{k}` given twice")));
        }
    }
    Ok((head, map))
}

/// Takes the named fields out of `map`, refusing missing and unknown ones.
fn take<'a, const N: usize>(
    s: &str,
    mut map: BTreeMap<&'a str, &'a str>,
    names: [&str; N],
) -> Result<[&'a str; N], ParseError> {
    let err = |why: String| ParseError { text: s.to_string(), why };
    let mut out = [""; N];
    for (o, n) in out.iter_mut().zip(names) {
        *o = map.remove(n).ok_or_else(|| err(format!("`{n}` is missing")))?;
    }
    if let Some(k) = map.keys().next() {
        return Err(err(format!("unknown field `{k}`")));
    }
    Ok(out)
}

fn number(s: &str, what: &str, v: &str) -> Result<usize, ParseError> {
    v.parse().map_err(|_| ParseError { text: s.to_string(), why: format!("`{what}={v}` is not a number") })
}

impl FromStr for Lowering {
    type Err = String;
    fn from_str(s: &str) -> Result<Lowering, String> {
        match s {
            "cranelift" => Ok(Lowering::Cranelift),
            "llvm" => Ok(Lowering::Llvm),
            "nvptx" => Ok(Lowering::Nvptx),
            _ => Err(format!("unknown lowering `{s}` (cranelift, llvm, nvptx)")),
        }
    }
}

impl FromStr for Site {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Site, ParseError> {
        let err = |why: String| ParseError { text: s.to_string(), why };
        let (head, map) = fields(s)?;
        if head != "weight_product" && head != "gpu_weight_product" {
            return Err(err(format!("unknown template `{head}`")));
        }
        let [n, k, act, w] = take(s, map, ["n", "k", "act", "w"])?;
        let (n, k) = (number(s, "n", n)?, number(s, "k", k)?);
        let w = match w {
            "f32" => Scalar::F32,
            "bf16" => Scalar::BF16,
            "f16" => Scalar::F16,
            _ => return Err(err(format!("unknown weight type `{w}`"))),
        };
        let act = if act == "none" { None } else { Some(act) };
        let site = if head == "gpu_weight_product" {
            Site::gpu_weight_product(n, k, act, w)
        } else {
            Site::weight_product(n, k, act, w)
        };
        site.ok_or_else(|| err("unknown activation".into()))
    }
}

impl FromStr for Variant {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Variant, ParseError> {
        let err = |why: String| ParseError { text: s.to_string(), why };
        let (head, map) = fields(s)?;
        match head {
            "panels" => {
                let [mr, nr, ks, fma, lanes, streams, prefetch, lw] =
                    take(s, map, ["mr", "nr", "ksplit", "fma", "lanes", "streams", "prefetch", "lowering"])?;
                let fma = match fma {
                    "0" => false,
                    "1" => true,
                    _ => return Err(err(format!("`fma={fma}` is not 0 or 1"))),
                };
                let p = PanelParams {
                    mr: number(s, "mr", mr)?,
                    nr: number(s, "nr", nr)?,
                    ksplit: number(s, "ksplit", ks)?,
                    fma,
                    lanes: u8::try_from(number(s, "lanes", lanes)?)
                        .map_err(|_| err(format!("`lanes={lanes}` is too wide")))?,
                    streams: number(s, "streams", streams)?,
                    prefetch: number(s, "prefetch", prefetch)?,
                };
                Ok(Variant::Panels { p, lowering: lw.parse().map_err(err)? })
            }
            "rows" => {
                let [mr, nc, ks, lw] = take(s, map, ["mr", "nc", "ksplit", "lowering"])?;
                let t =
                    TileParams { mr: number(s, "mr", mr)?, nc: number(s, "nc", nc)?, ksplit: number(s, "ksplit", ks)? };
                Ok(Variant::Rows { t, lowering: lw.parse().map_err(err)? })
            }
            "cublas" => match map.keys().next() {
                Some(k) => Err(err(format!("unknown field `{k}`"))),
                None => Ok(Variant::Cublas),
            },
            "gpu" => {
                let mut map = map;
                let mut values = [0usize; 9];
                for (v, (name, _)) in values.iter_mut().zip(GPU_AXES) {
                    let text = map.remove(name).ok_or_else(|| err(format!("`{name}` is missing")))?;
                    *v = number(s, name, text)?;
                }
                if let Some(k) = map.keys().next() {
                    return Err(err(format!("unknown field `{k}`")));
                }
                Ok(Variant::Gpu { p: GpuParams::from_values(values) })
            }
            _ => Err(err(format!("unknown kernel family `{head}`"))),
        }
    }
}

/// The winners one compile uses: a variant per site signature, with the
/// key of the database record it came from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tuning {
    chosen: BTreeMap<String, (Variant, String)>,
}

impl Tuning {
    /// Uses `variant` for sites with `signature` (replacing an earlier one).
    pub fn insert(&mut self, signature: &str, variant: Variant, key: &str) {
        self.chosen.insert(signature.to_string(), (variant, key.to_string()));
    }

    pub fn get(&self, signature: &str) -> Option<&(Variant, String)> {
        self.chosen.get(signature)
    }

    pub fn len(&self) -> usize {
        self.chosen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }
}

/// What the scheduler builds for a site: the variant and how it was chosen.
#[derive(Clone, Debug)]
pub struct Choice {
    pub variant: Variant,
    pub record: KernelTuning,
}

/// The variant for `site`: the measured winner in `tuning` when there is
/// one this build can lower and that belongs to the site's space, else the
/// default (estimated) one.
pub fn choose(site: &Site, tuning: Option<&Tuning>, packed_weights: bool) -> Choice {
    let lowerings = Lowering::available();
    let default = site.default_variant(packed_weights, &lowerings);
    let measured = tuning.and_then(|t| {
        let (v, key) = t.get(&site.signature(&lowerings))?;
        site.space(&lowerings).contains(v).then(|| (*v, key.clone()))
    });
    match measured {
        Some((variant, key)) => Choice {
            variant,
            record: KernelTuning {
                source: TuningSource::Measured,
                site: site.to_string(),
                params: variant.to_string(),
                key: Some(key),
            },
        },
        None => Choice {
            variant: default,
            record: KernelTuning {
                source: TuningSource::Estimated,
                site: site.to_string(),
                params: default.to_string(),
                key: None,
            },
        },
    }
}

/// The thread team the default parameters are balanced for
/// ([`PanelParams::balanced`]): every core of this machine, the size of
/// the runtime's team unless it is told otherwise. A compile for another
/// team size gets parameters measured for it from `smelt tune --threads`.
pub fn host_team() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The packed-panel parameters used without a measurement, and their
/// lowering, where the build has LLVM: 6x32 tiles of 16-lane vectors with
/// FMA on hosts with AVX-512, 6x16 tiles of 8-lane vectors where the host
/// has AVX2 and FMA (the classic Haswell GEMM micro-kernel), 4-lane tiles
/// with FMA on other hosts; Cranelift's 6x8 tiles without LLVM.
pub fn default_panels(lowerings: &[Lowering]) -> (PanelParams, Lowering) {
    if !lowerings.contains(&Lowering::Llvm) {
        return (PanelParams::DEFAULT, Lowering::Cranelift);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return (PanelParams::WIDE_AVX512, Lowering::Llvm);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return (PanelParams::WIDE, Lowering::Llvm);
    }
    (PanelParams { fma: true, ..PanelParams::DEFAULT }, Lowering::Llvm)
}

/// The vector widths (f32 lanes) worth trying with `lowering` on this
/// host: Cranelift lowers 4-lane vectors only; LLVM also 8 (AVX2 or
/// wider) and 16 where the host has AVX-512 (on other hosts LLVM would
/// split them into narrower vectors, which only wastes the budget).
fn host_lanes(lowering: Lowering) -> Vec<usize> {
    if lowering != Lowering::Llvm {
        return vec![4];
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return vec![4, 8, 16];
    }
    vec![4, 8]
}

/// The record of a kernel without tunable parameters.
pub fn fixed() -> KernelTuning {
    KernelTuning { source: TuningSource::Fixed, site: String::new(), params: String::new(), key: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> Site {
        Site::weight_product(24, 16, Some("silu"), Scalar::F32).unwrap()
    }

    #[test]
    fn strings_round_trip() {
        let s = site();
        assert_eq!(s.to_string(), "weight_product n=24 k=16 act=silu w=f32");
        assert_eq!(s.to_string().parse::<Site>().unwrap(), s);
        let plain = Site::weight_product(960, 576, None, Scalar::BF16).unwrap();
        assert_eq!(plain.to_string().parse::<Site>().unwrap(), plain);
        for fam in &s.space(&[Lowering::Cranelift, Lowering::Llvm]).families {
            for v in fam.variants() {
                assert_eq!(v.to_string().parse::<Variant>().unwrap(), v, "{v}");
            }
        }
        let gpu = Site::gpu_weight_product(960, 576, Some("silu"), Scalar::BF16).unwrap();
        assert_eq!(gpu.to_string(), "gpu_weight_product n=960 k=576 act=silu w=bf16");
        assert_eq!(gpu.to_string().parse::<Site>().unwrap(), gpu);
        let d = gpu.default_variant(false, &[]);
        assert_eq!(d.to_string(), "gpu threads=256 wpg=1 rpg=2 unroll=1 mtile=4 gemv_max_m=32 tile=0 bk=32 bps=4");
        for v in [d, Variant::Cublas] {
            assert_eq!(v.to_string().parse::<Variant>().unwrap(), v, "{v}");
            assert!(gpu.space(&[]).contains(&v), "{v}");
        }
        assert!("gpu threads=256".parse::<Variant>().is_err() && "cublas x=1".parse::<Variant>().is_err());
        for bad in [
            "",
            "panels mr=1",
            "panels mr=1 nr=8 ksplit=1 fma=2 lowering=cranelift",
            "rows mr=x nc=1 ksplit=1 lowering=llvm",
            "rows mr=1 nc=1 ksplit=1 lowering=llvm extra=1",
            "weight_product n=1 k=1 act=relu w=f32",
        ] {
            assert!(bad.parse::<Variant>().is_err() && bad.parse::<Site>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_space_enumerates_and_locates_every_variant() {
        let s = site();
        let space = s.space(&[Lowering::Cranelift]);
        assert_eq!(space.len(), 10 * 6 * 4 * 2 * 4 + 5 * 4 * 3);
        assert_eq!(s.space(&[Lowering::Llvm]).families[0].axes.last().map(|a| a.values.len()), Some(4));
        for fam in &space.families {
            let all = fam.variants();
            assert_eq!(all.len(), fam.len());
            for v in &all {
                let (_, p) = space.locate(v).unwrap();
                assert_eq!(fam.variant(&p), *v);
            }
        }
        for packed in [true, false] {
            assert!(space.contains(&s.default_variant(packed, &[Lowering::Cranelift])));
        }
        // The host's LLVM space holds the host's default panels (16-lane
        // ones on AVX-512 hosts, 8-lane ones on AVX2 hosts).
        let llvm_space = s.space(&[Lowering::Llvm]);
        assert!(llvm_space.contains(&s.default_variant(true, &[Lowering::Llvm])));
        // An LLVM variant is not in a Cranelift-only space.
        let llvm = Variant::Rows { t: TileParams { mr: 1, nc: 1, ksplit: 1 }, lowering: Lowering::Llvm };
        assert!(!space.contains(&llvm));
    }

    #[test]
    fn signatures_are_stable_and_tell_sites_and_domains_apart() {
        let s = site();
        let a = s.signature(&[Lowering::Cranelift]);
        assert_eq!(a, s.signature(&[Lowering::Cranelift]));
        assert!(a.starts_with("weight_product-") && a.len() == "weight_product-".len() + 12, "{a}");
        assert_ne!(a, s.signature(&[Lowering::Cranelift, Lowering::Llvm]));
        let other = Site::weight_product(24, 16, Some("gelu"), Scalar::F32).unwrap();
        assert_ne!(a, other.signature(&[Lowering::Cranelift]));
    }

    #[test]
    fn choose_takes_a_measured_variant_only_from_the_space() {
        let s = site();
        let est = choose(&s, None, true);
        assert_eq!(est.record.source, TuningSource::Estimated);
        let (p, lowering) = default_panels(&Lowering::available());
        assert_eq!(est.variant, Variant::Panels { p: p.balanced(24, host_team()), lowering });
        let mut t = Tuning::default();
        let v = Variant::Panels {
            p: PanelParams { mr: 4, nr: 16, ksplit: 2, fma: true, lanes: 4, streams: 4, prefetch: 0 },
            lowering: Lowering::Cranelift,
        };
        t.insert(&s.signature(&Lowering::available()), v, "sig/bucket/dev");
        let m = choose(&s, Some(&t), true);
        assert_eq!(
            (m.variant, m.record.source, m.record.key.as_deref()),
            (v, TuningSource::Measured, Some("sig/bucket/dev"))
        );
        // A variant outside the space (mr = 9) is ignored.
        let bad = Variant::Panels { p: PanelParams { mr: 9, ..PanelParams::DEFAULT }, lowering: Lowering::Cranelift };
        t.insert(&s.signature(&Lowering::available()), bad, "k");
        assert_eq!(choose(&s, Some(&t), true).record.source, TuningSource::Estimated);
    }
}

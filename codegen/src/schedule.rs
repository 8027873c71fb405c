//! Scheduling: turns a fused, verified graph into the launch plan of a
//! native artifact: the distinct kernels, every buffer the forward call
//! touches, the ordered launches and the constant data (weights and folded
//! constants) laid out for memory mapping.
//!
//! What it assumes and guarantees:
//! - the graph verifies and its nodes are in a valid topological order;
//! - nodes whose operands are all constants and whose shapes are concrete are
//!   evaluated here with the reference interpreter (weight transposes, rope
//!   tables), so no kernel runs on constants alone;
//! - identical kernels (same name and body) are emitted once and shared by
//!   every launch that needs them, e.g. across layers;
//! - a matmul or gated MLP whose weight operands are 2-D constants `[K, N]`
//!   (in practice `transpose` of a checkpoint's `[N, K]` weight) reads the
//!   weights as `[N, K]`, rows contiguous along K, which is what a decode
//!   GEMV streams best; identical constants (a tied embedding and its
//!   transposed-back head) are stored once;
//! - with [`ScheduleOptions::weight_dtype`] `bf16`/`f16`, those matmul
//!   weights and the tables of embedding lookups (`gather` from a 2-D
//!   constant) are stored narrow, rounded to nearest even, and widened to
//!   f32 as kernels load them; every other constant (norm weights, biases,
//!   rope tables) stays f32, and all arithmetic is f32;
//! - weights are read where they are placed, from their stored bytes (a
//!   memory-mapped checkpoint): casts that widen them exactly and 2-D
//!   transposes are kept as views, not evaluated, so a bf16 `[n, k]`
//!   checkpoint weight stored bf16 `[n, k]` is appended as it is, and any
//!   other layout or type costs one conversion pass (see [`crate::constants`]);
//! - constants are deduplicated by a sampled key, then compared in full;
//!   the constants file is written (and hashed) by a background thread as
//!   it grows ([`ConstantsWriter`]), never held whole;
//! - every launch argument's `needs` equals the element count of the buffer
//!   bound to it (checked symbolically here, re-checked numerically by the
//!   runtime), so a kernel never reads or writes past a buffer.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use smelt_ir::{interp, DType, Data, Dim, Graph, NodeId, Op, StoredTensor, Tensor, ValueId};
use smelt_runtime::constants::ConstantsWriter;
use smelt_runtime::plan::{Buffer, Elem, KernelEntry, KernelTuning, Launch, NativePlan, Storage};

use crate::constants::{convertible, sample_key, Chunk, Matrix};
use crate::kir::{BinOp, Expr, Kernel, Scalar};
use crate::select::{self, elem_of, Instance, SelectError, Selected};
use crate::tuning::{Site, Tuning};

/// Alignment of every constant in the weights file, in bytes.
pub const WEIGHT_ALIGN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Every node no kernel family handles, all at once (not one per compile).
    #[error("no CPU kernel for {} node(s):\n{}", .0.len(), .0.iter().map(|(n, e)| format!("  {n}: {e}")).collect::<Vec<_>>().join("\n"))]
    Unsupported(Vec<(String, SelectError)>),
    #[error("node {node}: weight `{name}` has no data")]
    MissingWeight { node: String, name: String },
    #[error("node {node}: folding a constant subgraph failed: {message}")]
    Fold { node: String, message: String },
    #[error("node {node}: kernel `{kernel}` declares {what}, but the value bound to it has {found} elements (a template bug)")]
    Contract { node: String, kernel: String, what: String, found: String },
    #[error("graph: {0}")]
    Graph(String),
}

/// The result of scheduling.
pub struct Schedule {
    /// Distinct kernels, in first-use order; `plan.kernels[i]` describes
    /// `kernels[i]`. The plan's entries after these are library calls
    /// ([`smelt_runtime::plan::LibraryCall`], with [`GpuGemm::Cublas`]),
    /// which have no kernel.
    pub kernels: Vec<Kernel>,
    /// The plan, with `library` and `weights` file names left empty for the
    /// artifact writer to fill.
    pub plan: NativePlan,
    /// The constant data the plan's `Storage::Weight` offsets point into,
    /// possibly still being written: `finish` it after other work (building
    /// the kernels), which the writing then overlaps.
    pub constants: ConstantsWriter,
    /// Nodes folded at compile time.
    pub folded: usize,
}

/// What a value is while scheduling.
enum Slot {
    /// A compile-time constant not yet placed in the weights file.
    Const(Tensor),
    /// A weight (or an exact view of one), read only where it is placed.
    Stored(StoredView),
    /// A plan buffer.
    Buf(usize),
    /// A slice read in place by the transposes after it (see
    /// [`crate::strided_slices`]): the buffer it views, and how.
    Strided(usize, crate::strided_slices::Strided),
}

/// A weight's stored bytes seen as a value: a cast that widens them
/// exactly (bf16 to f32) changes `dtype`, a 2-D transpose flips `transposed`.
#[derive(Clone)]
struct StoredView {
    t: StoredTensor,
    /// The value's dtype: the stored one, or f32 widened from f16/bf16.
    dtype: DType,
    /// The value is the transpose of the stored 2-D matrix.
    transposed: bool,
}

impl StoredView {
    /// The value as a matrix of stored elements and whether it is the
    /// transpose of that matrix; `None` unless it is a 2-D float value
    /// (a 1-D one is a single row).
    fn matrix(&self) -> Option<(Matrix, bool)> {
        if !convertible(self.t.dtype) || !self.dtype.is_float() {
            return None;
        }
        let (rows, cols) = match self.t.shape[..] {
            [r, c] => (r, c),
            [n] => (1, n),
            _ => return None,
        };
        Some((Matrix { data: Chunk::Shared(self.t.clone()), dtype: self.t.dtype, rows, cols }, self.transposed))
    }

    /// The value as a tensor (to fold an op on it).
    fn to_tensor(&self) -> Tensor {
        let mut t = if self.transposed {
            let (r, c) = (self.t.shape[0], self.t.shape[1]);
            let bytes = smelt_ir::stored::transpose(self.t.bytes(), r, c, self.t.dtype.size_bytes());
            Tensor::from_le_bytes("weight", self.t.dtype, vec![c, r], &bytes).expect("same length")
        } else {
            self.t.to_tensor()
        };
        // f16/bf16 values are held as f32 already: widening is a retag.
        t.dtype = self.dtype;
        t
    }

    /// The value's bytes as kernels read it (floats as f32).
    fn kernel_bytes(&self) -> Chunk {
        match self.matrix() {
            Some((m, transposed)) => m.laid_out(DType::F32, transposed).expect("f32 holds every float value"),
            None => Chunk::Owned(const_bytes(&self.to_tensor())),
        }
    }
}

struct Scheduler<'g> {
    graph: &'g Graph,
    /// The KV caches kept in place (CPU only).
    in_place: Option<crate::kv_in_place::InPlace>,
    /// Weights packed weight kernels read as their `[n, k]` matrix, which
    /// an embedding lookup then reads packed too ([`packed_tables`]).
    packed_tables: Vec<StoredTensor>,
    slots: HashMap<ValueId, Slot>,
    buffers: Vec<Buffer>,
    /// Buffer index of each placed constant value by the element type it
    /// is stored as, so it is stored once.
    placed: HashMap<(ValueId, Scalar), usize>,
    /// Offsets of the constants in the weights file by [`sample_key`].
    stored: HashMap<(usize, u64), Vec<u64>>,
    /// Stored tensors appended as they are, by offset: the same bytes
    /// again (a tied weight) need no comparison.
    shared: Vec<(StoredTensor, u64)>,
    constants: ConstantsWriter,
    kernels: Vec<Kernel>,
    kernel_index: HashMap<String, usize>,
    launches: Vec<Launch>,
    folded: usize,
    unsupported: Vec<(String, SelectError)>,
    options: ScheduleOptions,
    /// How the parameters of each tunable kernel (by index) were chosen.
    tuned: HashMap<usize, KernelTuning>,
    /// Library calls' plan entries (distinct), and the launches of them
    /// (their `kernel` is an index here until the plan is built).
    library: Vec<KernelEntry>,
    library_launches: Vec<usize>,
    /// GPU: f32 results stored narrow by the kernel that computes them,
    /// because their only use is a cast to a narrow type ([`narrow_stores`]).
    narrow_stores: HashMap<ValueId, Scalar>,
}

/// What the kernels run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// Host kernels (Cranelift / LLVM), run by the CPU thread team.
    #[default]
    Cpu,
    /// NVIDIA GPU kernels (KIR with launch geometry, lowered to PTX).
    Gpu,
}

/// Choices the scheduler leaves to its caller.
#[derive(Clone, Debug, Default)]
pub struct ScheduleOptions {
    /// Which kernel families to select from.
    pub device: Device,
    /// Weight matmuls use the packed-panel kernels (`select::weight_matmul`),
    /// which is what the Cranelift lowering runs fastest; otherwise the
    /// `[N, K]` kernels, which LLVM widens to 256-bit vectors.
    pub packed_weights: bool,
    /// How the weights of weight matmuls and embedding tables are stored.
    pub weight_dtype: WeightDtype,
    /// The vector width of the CPU attention kernels (`panel.lanes`: 4 for
    /// Cranelift, 8 for LLVM on AVX2); a compile passes the default weight
    /// panels ([`crate::tuning::default_panels`]), whose tiles the weight
    /// products take from [`crate::tuning::choose`].
    pub panel: crate::templates::packed::PanelParams,
    /// Block sizes and split attention of the GPU kernels.
    pub gpu: select::GpuConfig,
    /// Measured winners for tunable kernels, CPU or GPU (see
    /// [`crate::tuning`]); kernels without one get their templates'
    /// default parameters.
    pub tuning: Option<Arc<Tuning>>,
    /// What computes the GPU weight products.
    pub gpu_gemm: GpuGemm,
}

/// What computes the GPU weight products (`x · Wᵀ`, the gated MLP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuGemm {
    /// Generated kernels ([`select::weight_product_gpu`]).
    #[default]
    Kernels,
    /// cuBLAS GEMMs through the runtime (`select::gpu_library`), with KIR
    /// kernels for the activations' conversion and the gated MLP's
    /// elementwise product; f32 products in f32.
    Cublas,
    /// As `Cublas`, but f32 weight products round their operands to TF32
    /// on tensor cores (bf16/f16 ones are unchanged).
    CublasTf32,
}

/// The storage type of the weights (see the module docs); computation is
/// f32 whatever it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightDtype {
    /// Exact f32.
    #[default]
    F32,
    /// bfloat16 (8 bits of significand, f32's range): half the bytes, so
    /// a weight-bandwidth-bound decode step reads half as much.
    BF16,
    /// IEEE half (11 bits of significand, finite up to 65504). A constant
    /// with a value that would overflow stays f32.
    F16,
}

impl WeightDtype {
    /// The element type of a weight.
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::BF16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
        }
    }

    /// The KIR element type of a weight buffer.
    pub fn scalar(self) -> Scalar {
        match self {
            WeightDtype::F32 => Scalar::F32,
            WeightDtype::BF16 => Scalar::BF16,
            WeightDtype::F16 => Scalar::F16,
        }
    }
}

/// Schedules `graph` whose weights are in `weights` (by weight name),
/// keeping the constants in memory.
pub fn schedule(
    graph: &Graph,
    weights: &BTreeMap<String, StoredTensor>,
    options: ScheduleOptions,
) -> Result<Schedule, ScheduleError> {
    schedule_into(graph, weights, options, ConstantsWriter::in_memory())
}

/// Schedules `graph`, appending its constants to `constants` (e.g. a file
/// written as it grows).
pub fn schedule_into(
    graph: &Graph,
    weights: &BTreeMap<String, StoredTensor>,
    options: ScheduleOptions,
    constants: ConstantsWriter,
) -> Result<Schedule, ScheduleError> {
    let order = graph.topo_order().map_err(|e| ScheduleError::Graph(e.to_string()))?;
    // The GPU runtime keeps its cache by swapping whole buffers; only the
    // CPU plan appends in place.
    let in_place = match options.device {
        Device::Cpu => crate::kv_in_place::find(graph),
        Device::Gpu => None,
    };
    let packed_tables = match options.device {
        Device::Cpu if options.packed_weights => packed_tables(graph, weights),
        _ => vec![],
    };
    let narrow_stores = match options.device {
        Device::Cpu => HashMap::new(),
        Device::Gpu => narrow_stores(graph),
    };
    let mut s = Scheduler {
        narrow_stores,
        in_place,
        packed_tables,
        graph,
        slots: HashMap::new(),
        buffers: vec![],
        placed: HashMap::new(),
        stored: HashMap::new(),
        shared: vec![],
        constants,
        kernels: vec![],
        kernel_index: HashMap::new(),
        launches: vec![],
        folded: 0,
        unsupported: vec![],
        options,
        tuned: HashMap::new(),
        library: vec![],
        library_launches: vec![],
    };
    let mut inputs = vec![];
    for n in order {
        let node = graph.node(n);
        match &node.op {
            Op::Input { name } => {
                let v = node.outputs[0];
                let name = name.clone();
                let b = s.new_buffer(v, Storage::Input { name: name.clone() });
                inputs.push((name, b));
                s.slots.insert(v, Slot::Buf(b));
            }
            Op::Weight { name } => {
                let t = weights
                    .get(name)
                    .cloned()
                    .ok_or_else(|| ScheduleError::MissingWeight { node: describe(graph, n), name: name.clone() })?;
                let view = StoredView { dtype: t.dtype, t, transposed: false };
                s.slots.insert(node.outputs[0], Slot::Stored(view));
            }
            Op::Constant { value } => {
                s.slots.insert(node.outputs[0], Slot::Const(value.clone()));
            }
            _ => s.node(n)?,
        }
    }
    if !s.unsupported.is_empty() {
        return Err(ScheduleError::Unsupported(s.unsupported));
    }
    let mut outputs = vec![];
    for (name, v) in graph.outputs() {
        let b = s.buffer_of(*v);
        outputs.push((name.clone(), b));
    }
    let mut symbols: Vec<(String, i64, i64)> = graph.symbols().iter().map(|(k, b)| (k.clone(), b.min, b.max)).collect();
    let kv_cache = s.in_place.as_ref().map(|ip| {
        // Every symbol at its largest gives the largest value of a dim (the
        // dims here are sums of symbols).
        let most = |d: &Dim| {
            let env = graph.symbols().iter().map(|(k, b)| (k.clone(), b.max)).collect();
            d.eval_map(&env).unwrap_or(i64::MAX)
        };
        symbols.push((ip.capacity.clone(), 0, most(&ip.filled)));
        symbols.push((ip.copied.clone(), 0, most(&ip.past)));
        smelt_runtime::plan::KvCachePlan {
            capacity: ip.capacity.clone(),
            copied: ip.copied.clone(),
            past: ip.past.to_string(),
            filled: ip.filled.to_string(),
        }
    });
    // Library calls' entries follow the kernels'.
    let mut kernels: Vec<KernelEntry> = s.kernels.iter().enumerate().map(|(i, k)| s.kernel_entry(i, k)).collect();
    let mut launches = s.launches;
    for &l in &s.library_launches {
        launches[l].kernel += s.kernels.len();
    }
    kernels.extend(s.library);
    let plan = NativePlan {
        library: String::new(),
        weights: String::new(),
        kernels,
        // Filled by whoever links the library (it knows the target).
        arch: String::new(),
        cpu_features: vec![],
        ptx: vec![],
        buffers: s.buffers,
        launches,
        symbols,
        inputs,
        outputs,
        kv_cache,
    };
    Ok(Schedule { kernels: s.kernels, plan, constants: s.constants, folded: s.folded })
}

impl Scheduler<'_> {
    /// The plan entry of kernel `i`, with how its parameters were chosen
    /// (measured, estimated, or fixed for a kernel without parameters).
    fn kernel_entry(&self, i: usize, k: &Kernel) -> KernelEntry {
        let mut e = crate::aot::kernel_entry(k);
        let t = self.tuned.get(&i).cloned().unwrap_or_else(crate::tuning::fixed);
        if self.options.device == Device::Cpu && t.params.contains("lowering=llvm") {
            e.lowering = "llvm".into();
        }
        e.tuning = Some(t);
        e
    }

    fn node(&mut self, n: NodeId) -> Result<(), ScheduleError> {
        let g = self.graph;
        let node = g.node(n);
        let all_const = node.inputs.iter().all(|v| matches!(self.slots.get(v), Some(Slot::Const(_) | Slot::Stored(_))));
        let concrete = node.outputs.iter().all(|v| g.ty(*v).shape.iter().all(Dim::is_const));
        if all_const && concrete && !node.inputs.is_empty() {
            if self.view(n) {
                return Ok(());
            }
            return self.fold(n);
        }
        if self.free_cast(n) {
            return Ok(());
        }
        if let Some(done) = self.weight_stationary(n)? {
            return Ok(done);
        }
        if let Some(done) = self.packed_table_gather(n)? {
            return Ok(done);
        }
        if let Some(done) = self.narrow_table_gather(n)? {
            return Ok(done);
        }
        if let Some(done) = self.strided_slice(n)? {
            return Ok(done);
        }
        let in_tys: Vec<_> = node.inputs.iter().map(|v| g.ty(*v).clone()).collect();
        let out_tys: Vec<_> = node.outputs.iter().map(|v| g.ty(*v).clone()).collect();
        let in_place = self.in_place.as_ref().filter(|ip| ip.appends.contains(&n) || ip.attentions.contains(&n));
        if let Some((kv, capacity, append)) =
            in_place.map(|ip| (ip.kv.clone(), ip.capacity.clone(), ip.appends.contains(&n)))
        {
            // A cache kept in place: the append's result is laid out with
            // room for `capacity` positions, and attention reads it so.
            let inst = match select::select_in_place(&node.op, &in_tys, &kv, self.options.panel.lanes) {
                Ok(Selected::Kernel(inst)) => inst,
                // Attention over the cache: split decode's two launches.
                Ok(Selected::Steps(steps)) if !append => {
                    let operands = node.inputs.iter().map(|v| self.buffer_of(*v)).collect();
                    return self.steps(n, steps, operands);
                }
                Ok(_) => unreachable!("in-place cache appends are single kernels"),
                Err(e) => {
                    self.unsupported.push((describe(g, n), e));
                    return Ok(());
                }
            };
            let mut args: Vec<usize> = node.inputs.iter().map(|v| self.buffer_of(*v)).collect();
            if append {
                let v = node.outputs[0];
                let b = self.new_buffer(v, Storage::Arena);
                self.buffers[b].shape[2] = capacity;
                self.slots.insert(v, Slot::Buf(b));
                args.push(b);
                self.push_launch(n, inst, args)?;
                // It moves the copied positions and the new ones (along
                // axis 2, as every in-place append is), a few kilobytes in
                // a decode step, though its result is the whole cache.
                let (cache, new) = (&in_tys[0], &in_tys[1]);
                let outer = Dim::product(&cache.shape[..2]);
                let row = Dim::product(&cache.shape[3..]);
                let moved = outer * (kv.copied.clone() * row + Dim::product(&new.shape[2..]));
                let bytes = Dim::c(2 * plan_elem(elem_of(cache.dtype)).size() as i64) * moved;
                if let Some(l) = self.launches.last_mut() {
                    l.work = Some(bytes.to_string());
                }
                return Ok(());
            }
            return self.launch(n, inst, args);
        }
        let selected = match self.select(&node.op, &in_tys, &out_tys) {
            Ok(s) => s,
            Err(e) => {
                // Keep going with placeholder results, so the error lists
                // every unsupported node, not only the first.
                self.unsupported.push((describe(g, n), e));
                for v in &node.outputs {
                    let b = self.new_buffer(*v, Storage::Arena);
                    self.slots.insert(*v, Slot::Buf(b));
                }
                return Ok(());
            }
        };
        match selected {
            Selected::Alias { offset } => {
                let of = self.buffer_of(node.inputs[0]);
                let v = node.outputs[0];
                let b = self.new_buffer(v, Storage::Alias { of, offset: offset.to_string() });
                // A view has its operand's elements (a narrow buffer seen
                // through a widening cast stays narrow).
                self.buffers[b].elem = self.buffers[of].elem;
                self.slots.insert(v, Slot::Buf(b));
            }
            Selected::Kernel(inst) => {
                let args = node.inputs.iter().map(|v| self.buffer_of(*v)).collect();
                self.launch(n, inst, args)?
            }
            Selected::Steps(steps) => {
                let operands = node.inputs.iter().map(|v| self.buffer_of(*v)).collect();
                self.steps(n, steps, operands)?
            }
        }
        Ok(())
    }

    /// The result buffers of node `n`, and its scratch buffers (arena
    /// memory named after its first result) for a multi-launch node.
    fn node_buffers(&mut self, n: NodeId, scratch: &[select::Scratch]) -> (Vec<usize>, Vec<usize>) {
        let results = self.result_buffers(n);
        let base = results.first().map_or_else(|| format!("node{}", n.index()), |&b| self.buffers[b].name.clone());
        let scratch = scratch
            .iter()
            .map(|sc| {
                self.buffers.push(Buffer {
                    name: format!("{base}.{}", sc.name),
                    elem: plan_elem(sc.elem),
                    shape: vec![sc.len.to_string()],
                    storage: Storage::Arena,
                });
                self.buffers.len() - 1
            })
            .collect();
        (results, scratch)
    }

    /// Adds the launches of `steps` for node `n` on operand buffers
    /// `operands`, creating the result buffers and the scratch buffers
    /// (arena memory that lives from the node's first launch to its last).
    fn steps(&mut self, n: NodeId, steps: select::Steps, operands: Vec<usize>) -> Result<(), ScheduleError> {
        let (results, scratch) = self.node_buffers(n, &steps.scratch);
        for step in steps.steps {
            let mut args = Vec::with_capacity(step.args.len());
            for a in &step.args {
                let (list, i, what) = match *a {
                    select::Arg::Operand(i) => (&operands, i, "operand"),
                    select::Arg::Result(i) => (&results, i, "result"),
                    select::Arg::Scratch(i) => (&scratch, i, "scratch buffer"),
                };
                let b = *list.get(i).ok_or_else(|| ScheduleError::Contract {
                    node: describe(self.graph, n),
                    kernel: step.instance.kernel.name.clone(),
                    what: format!("an argument bound to {what} {i}"),
                    found: format!("{} of them", list.len()),
                })?;
                args.push(b);
            }
            self.push_launch(n, step.instance, args)?;
            if let (Some(work), Some(l)) = (step.work, self.launches.last_mut()) {
                l.work = Some(work.to_string());
            }
        }
        Ok(())
    }

    /// Adds the launches of a library weight product (see
    /// [`select::gpu_library`]) for node `n` on operand buffers `operands`:
    /// its KIR kernels as [`Self::steps`] does, its GEMMs as library calls
    /// whose needs are `m·k`, `n·k` and `m·n`, checked against the buffers
    /// bound to them; `tuning` (a measured choice of the library) is
    /// recorded on the GEMMs' entries.
    fn library_steps(
        &mut self,
        n: NodeId,
        lib: select::gpu_library::LibrarySteps,
        operands: Vec<usize>,
        tuning: Option<KernelTuning>,
    ) -> Result<(), ScheduleError> {
        use select::gpu_library::LibStep;
        use smelt_runtime::plan::{GemmCall, GemmCompute, LibraryCall};
        let (results, scratch) = self.node_buffers(n, &lib.scratch);
        let bind = |a: select::Arg| match a {
            select::Arg::Operand(i) => operands.get(i).copied(),
            select::Arg::Result(i) => results.get(i).copied(),
            select::Arg::Scratch(i) => scratch.get(i).copied(),
        };
        for step in lib.steps {
            match step {
                LibStep::Kernel(step) => {
                    let args = step.args.iter().map(|&a| bind(a)).collect::<Option<Vec<usize>>>();
                    let args = args.ok_or_else(|| ScheduleError::Contract {
                        node: describe(self.graph, n),
                        kernel: step.instance.kernel.name.clone(),
                        what: "arguments bound to existing buffers".into(),
                        found: format!("{:?}", step.args),
                    })?;
                    self.push_launch(n, step.instance, args)?;
                }
                LibStep::Gemm(gm) => {
                    let call = GemmCall {
                        library: "cublas".into(),
                        n: gm.n as u64,
                        k: gm.k as u64,
                        a: plan_elem(gm.a),
                        b: plan_elem(gm.b),
                        c: Elem::F32,
                        compute: match self.options.gpu_gemm {
                            GpuGemm::CublasTf32 if gm.a == Scalar::F32 => GemmCompute::Tf32,
                            _ => GemmCompute::F32,
                        },
                    };
                    let tf32 = if call.compute == GemmCompute::Tf32 { "_tf32" } else { "" };
                    let symbol = format!("cublas_gemm_{:?}{tf32}_n{}_k{}", call.a, gm.n, gm.k).to_lowercase();
                    let (nd, kd) = (Dim::c(gm.n as i64), Dim::c(gm.k as i64));
                    let needs = [gm.m.clone() * kd.clone(), nd.clone() * kd, gm.m.clone() * nd];
                    let elems = [call.a, call.b, call.c];
                    let mut args = vec![];
                    for ((a, need), elem) in [gm.x, gm.w, gm.y].into_iter().zip(&needs).zip(elems) {
                        let b = bind(a).filter(|&b| {
                            Dim::product(self.buffer_shape(b).iter()) == *need && self.buffers[b].elem == elem
                        });
                        let b = b.ok_or_else(|| ScheduleError::Contract {
                            node: describe(self.graph, n),
                            kernel: symbol.clone(),
                            what: format!("{elem:?}[{need}] for {a:?}"),
                            found: bind(a).map_or("no buffer".into(), |b| {
                                format!("{:?}{:?}", self.buffers[b].elem, self.buffer_shape(b))
                            }),
                        })?;
                        args.push(b);
                    }
                    let entry = KernelEntry {
                        symbol: symbol.clone(),
                        lowering: "cublas".into(),
                        buffers: elems.to_vec(),
                        scalars: 1,
                        block: None,
                        tuning: tuning.clone(),
                        library: Some(LibraryCall::Gemm(call)),
                    };
                    let kernel = match self.library.iter().position(|e| *e == entry) {
                        Some(i) => i,
                        None => {
                            self.library.push(entry);
                            self.library.len() - 1
                        }
                    };
                    self.library_launches.push(self.launches.len());
                    self.launches.push(Launch {
                        kernel,
                        args,
                        needs: needs.iter().map(|d| d.to_string()).collect(),
                        scalars: vec![gm.m.to_string()],
                        node: describe(self.graph, n),
                        grid: None,
                        work: None,
                    });
                }
            }
        }
        Ok(())
    }

    /// A CPU kernel instance made to run on the scheduler's device.
    fn on_device(&self, inst: Instance) -> Result<Instance, String> {
        match self.options.device {
            Device::Cpu => Ok(inst),
            Device::Gpu => {
                let kernel = crate::templates::gpu::gpuize::gpuize(&inst.kernel).map_err(|e| e.to_string())?;
                Ok(Instance { kernel, scalars: inst.scalars })
            }
        }
    }

    /// The kernel for one node on the scheduler's device.
    fn select(
        &self,
        op: &Op,
        inputs: &[smelt_ir::TensorType],
        outputs: &[smelt_ir::TensorType],
    ) -> Result<Selected, SelectError> {
        match self.options.device {
            Device::Cpu => select::select(op, inputs, outputs),
            Device::Gpu => select::select_gpu_with(op, inputs, outputs, &self.options.gpu),
        }
    }

    /// A 2-D float constant as a stored matrix and whether the value is
    /// its transpose; `None` for anything else.
    fn matrix(&self, v: ValueId) -> Option<(Matrix, bool)> {
        match self.slots.get(&v)? {
            Slot::Stored(s) if s.t.shape.len() == 2 => s.matrix(),
            Slot::Const(t) if t.shape.len() == 2 && matches!(t.data, Data::F32(_)) => {
                let data = Chunk::Owned(const_bytes(t));
                Some((Matrix { data, dtype: DType::F32, rows: t.shape[0], cols: t.shape[1] }, false))
            }
            _ => None,
        }
    }

    /// Keeps a cast that widens a weight exactly, or a 2-D transpose of
    /// one, as a view of its stored bytes (applied where it is placed);
    /// false when the node is not one.
    fn view(&mut self, n: NodeId) -> bool {
        let node = self.graph.node(n);
        let Some(Slot::Stored(s)) = self.slots.get(&node.inputs[0]) else { return false };
        let mut s = s.clone();
        match &node.op {
            Op::Cast { to } if *to == s.dtype => {}
            Op::Cast { to } if *to == DType::F32 && matches!(s.dtype, DType::BF16 | DType::F16) => s.dtype = *to,
            Op::Transpose { perm } if perm[..] == [1, 0] && s.t.shape.len() == 2 => s.transposed = !s.transposed,
            _ => return false,
        }
        self.slots.insert(node.outputs[0], Slot::Stored(s));
        self.folded += 1;
        true
    }

    /// GPU: a cast that needs no kernel, because kernels widen narrow
    /// buffers exactly as they load them (a cast to f32 of a bf16/f16
    /// buffer is a view of it) or because the operand's kernel already
    /// stored it in the cast's type ([`narrow_stores`]); false when the
    /// node is not one. A graph output keeps a buffer of its own type.
    fn free_cast(&mut self, n: NodeId) -> bool {
        let node = self.graph.node(n);
        let Op::Cast { to } = node.op else { return false };
        let Some(&Slot::Buf(b)) = self.slots.get(&node.inputs[0]) else { return false };
        let v = node.outputs[0];
        if self.options.device != Device::Gpu || self.graph.is_output(v) || !to.is_float() {
            return false;
        }
        let have = self.buffers[b].elem;
        let widening = to == DType::F32 && matches!(have, Elem::BF16 | Elem::F16);
        if !widening && have != plan_elem(select::gpu_elem_of(to)) {
            return false;
        }
        self.slots.insert(v, Slot::Buf(b));
        true
    }

    /// A matmul or gated MLP whose weights are 2-D float constants `[K, N]`
    /// runs the kernel that reads them as `[N, K]`; `None` when the node is
    /// not one.
    fn weight_stationary(&mut self, n: NodeId) -> Result<Option<()>, ScheduleError> {
        let g = self.graph;
        let node = g.node(n);
        let weights: &[ValueId] = match &node.op {
            Op::MatMul {} => &node.inputs[1..],
            Op::GatedMlp { .. } => &node.inputs[1..],
            _ => return Ok(None),
        };
        let mut mats = vec![];
        for w in weights {
            match self.matrix(*w) {
                Some(m) => mats.push(m),
                None => return Ok(None),
            }
        }
        // The value is `[k, n]`; kernels read `[n, k]`, its transpose, which
        // is the stored matrix itself when the value is a transpose.
        let (k_, n_) = match &mats[0] {
            (m, false) => (m.rows, m.cols),
            (m, true) => (m.cols, m.rows),
        };
        let x_ty = g.ty(node.inputs[0]).clone();
        let wanted = self.options.weight_dtype.scalar();
        let laid_out = |elem: Scalar| -> Option<Vec<Chunk>> {
            mats.iter().map(|(m, transposed)| m.laid_out(scalar_dtype(elem), !transposed)).collect()
        };
        // A weight with a value the narrow type cannot hold keeps all of
        // the node's weights f32.
        let (welem, nk) = match laid_out(wanted) {
            Some(nk) => (wanted, nk),
            None => (Scalar::F32, laid_out(Scalar::F32).expect("f32 holds every float value")),
        };
        let act = match &node.op {
            Op::GatedMlp { act } => Some(act.as_str()),
            _ => None,
        };
        // On the GPU, parameters set in the options (tests' small blocks)
        // or `--gpu-gemm cublas` win; otherwise the tuning table's winner
        // for this GPU (generated kernel parameters, or cuBLAS), or the
        // template's estimate.
        let gpu_choice = (self.options.device == Device::Gpu
            && self.options.gpu.weight_products.is_none()
            && self.options.gpu_gemm == GpuGemm::Kernels)
            .then(|| Site::gpu_weight_product(n_, k_, act, welem))
            .flatten()
            .map(|site| (site, crate::tuning::choose(&site, self.options.tuning.as_deref(), false)));
        let tuned_library = gpu_choice.as_ref().filter(|(_, c)| c.variant == crate::tuning::Variant::Cublas);
        if self.options.device == Device::Gpu && (self.options.gpu_gemm != GpuGemm::Kernels || tuned_library.is_some())
        {
            let x = self.buffer_of(node.inputs[0]);
            let x_elem = scalar_of_elem(self.buffers[x].elem);
            let y_elem = self.gpu_stored_elem(node.outputs[0]);
            // A product the library form does not take keeps its kernel.
            if let Ok(lib) = select::gpu_library::cublas_weight_product(&x_ty, x_elem, y_elem, n_, k_, act, welem) {
                let mut operands = vec![x];
                for (w, chunk) in weights.iter().zip(nk) {
                    operands.push(self.place_chunk(&format!("%{}ᵀ", w.index()), &[n_, k_], welem, chunk));
                }
                self.library_steps(n, lib, operands, tuned_library.map(|(_, c)| c.record.clone()))?;
                return Ok(Some(()));
            }
        }
        if self.options.device == Device::Gpu {
            // The GPU weight products read `[n, k]` rows with 16-byte
            // loads. A choice that does not build here (cuBLAS for a
            // product it does not take) falls back to the estimate.
            let built = gpu_choice.as_ref().and_then(|(site, c)| {
                let estimate = || {
                    let d = crate::tuning::choose(site, None, false);
                    site.build(&x_ty, &d.variant).map(|b| (b, d.record))
                };
                site.build(&x_ty, &c.variant).map(|b| (b, c.record.clone())).or_else(|_| estimate()).ok()
            });
            let (inst, record) = match built {
                Some((b, record)) => (b.instance, Some(record)),
                None => {
                    let params = self.options.gpu.weight_products;
                    let inst = select::weight_node_gpu(&x_ty, n_, k_, act, welem, params.as_ref());
                    let Ok(inst) = inst else { return Ok(None) };
                    (inst, None)
                }
            };
            let mut args = vec![self.buffer_of(node.inputs[0])];
            for (w, chunk) in weights.iter().zip(nk) {
                args.push(self.place_chunk(&format!("%{}ᵀ", w.index()), &[n_, k_], welem, chunk));
            }
            self.launch(n, inst, args)?;
            if let Some(record) = record {
                let kernel = self.launches.last().expect("a launch was just added").kernel;
                self.tuned.insert(kernel, record);
            }
            return Ok(Some(()));
        }
        // On the CPU the tuning table, or the templates' estimate, picks
        // the variant: packed panels or `[n, k]` rows, its tile sizes and
        // its lowering.
        let Some(site) = Site::weight_product(n_, k_, act, welem) else { return Ok(None) };
        let choice = crate::tuning::choose(&site, self.options.tuning.as_deref(), self.options.packed_weights);
        // A shape the weight kernels do not take (e.g. a 1-D activation)
        // falls back to the general kernel.
        let Ok(built) = site.build(&x_ty, &choice.variant) else { return Ok(None) };
        let mut args = vec![self.buffer_of(node.inputs[0])];
        let esize = scalar_dtype(welem).size_bytes();
        for (w, chunk) in weights.iter().zip(nk) {
            // The weight's type tells the `[n, k]` kernels how it is stored.
            args.push(match built.packing {
                Some(pack) => {
                    let packed = pack.apply_bytes(chunk.bytes(), esize, n_, k_);
                    let shape = [packed.len() / esize];
                    let name = format!("%{}ᵀ packed", w.index());
                    self.place_chunk(&name, &shape, welem, Chunk::Owned(packed))
                }
                None => self.place_chunk(&format!("%{}ᵀ", w.index()), &[n_, k_], welem, chunk),
            });
        }
        self.launch(n, built.instance, args)?;
        let kernel = self.launches.last().expect("a launch was just added").kernel;
        self.tuned.insert(kernel, choice.record);
        Ok(Some(()))
    }

    /// An embedding lookup (`gather` along axis 0) in a table that a packed
    /// weight kernel also reads (a tied embedding and output head) reads the
    /// table in the packed layout, which is placed here with the bytes the
    /// weight kernel's packing gives, so [`Self::store`] keeps one copy;
    /// `None` when the node is not one.
    fn packed_table_gather(&mut self, n: NodeId) -> Result<Option<()>, ScheduleError> {
        let g = self.graph;
        let node = g.node(n);
        let Op::Gather { axis: 0 | -2 } = &node.op else { return Ok(None) };
        let Some(Slot::Stored(s)) = self.slots.get(&node.inputs[0]) else { return Ok(None) };
        if s.transposed || s.t.shape.len() != 2 || !self.packed_tables.iter().any(|t| t.same_bytes(&s.t)) {
            return Ok(None);
        }
        let Some((m, false)) = s.matrix() else { return Ok(None) };
        let elem = self.options.weight_dtype.scalar();
        // The packing the output head's kernel will use (the same choice
        // `weight_stationary` makes for a product with this `[n, k]`
        // weight); a head read as rows leaves the table as it is.
        let Some(site) = Site::weight_product(m.rows, m.cols, None, elem) else { return Ok(None) };
        let choice = crate::tuning::choose(&site, self.options.tuning.as_deref(), self.options.packed_weights);
        let crate::tuning::Variant::Panels { p, .. } = choice.variant else { return Ok(None) };
        let packing = p.normalized().packing(elem);
        let (data, idx, out) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]), g.ty(node.outputs[0]));
        let Ok(inst) = select::gather_packed(data, idx, out, elem, packing) else { return Ok(None) };
        let Some(chunk) = m.laid_out(scalar_dtype(elem), false) else { return Ok(None) };
        let esize = scalar_dtype(elem).size_bytes();
        let packed = packing.apply_bytes(chunk.bytes(), esize, m.rows, m.cols);
        let shape = [packed.len() / esize];
        let table =
            self.place_chunk(&format!("%{} packed", node.inputs[0].index()), &shape, elem, Chunk::Owned(packed));
        let args = vec![table, self.buffer_of(node.inputs[1])];
        self.launch(n, inst, args)?;
        Ok(Some(()))
    }

    /// With a narrow [`WeightDtype`], an embedding lookup (`gather` along
    /// axis 0 of a 2-D float constant) reads its table stored narrow;
    /// `None` when the node is not one. A tied embedding's table then has
    /// the bytes of its `[n, k]` head weight, which is stored once.
    fn narrow_table_gather(&mut self, n: NodeId) -> Result<Option<()>, ScheduleError> {
        let elem = self.options.weight_dtype.scalar();
        let g = self.graph;
        let node = g.node(n);
        let Op::Gather { axis } = &node.op else { return Ok(None) };
        if elem == Scalar::F32 || !matches!(axis, 0 | -2) {
            return Ok(None);
        }
        let Some((m, transposed)) = self.matrix(node.inputs[0]) else { return Ok(None) };
        let shape = if transposed { [m.cols, m.rows] } else { [m.rows, m.cols] };
        let (data, idx, out) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]), g.ty(node.outputs[0]));
        let Ok(inst) = select::gather_stored(data, idx, out, *axis, elem) else { return Ok(None) };
        let Ok(inst) = self.on_device(inst) else { return Ok(None) };
        let table = match self.placed.get(&(node.inputs[0], elem)) {
            Some(&b) => b,
            None => {
                let Some(chunk) = m.laid_out(scalar_dtype(elem), transposed) else { return Ok(None) };
                let b = self.place_chunk(&format!("%{}", node.inputs[0].index()), &shape, elem, chunk);
                self.placed.insert((node.inputs[0], elem), b);
                b
            }
        };
        let args = vec![table, self.buffer_of(node.inputs[1])];
        self.launch(n, inst, args)?;
        Ok(Some(()))
    }

    /// Evaluates a node whose operands are all constants.
    fn fold(&mut self, n: NodeId) -> Result<(), ScheduleError> {
        let node = self.graph.node(n);
        let operands: Vec<Cow<'_, Tensor>> = node
            .inputs
            .iter()
            .map(|v| match &self.slots[v] {
                Slot::Const(t) => Cow::Borrowed(t),
                Slot::Stored(s) => Cow::Owned(s.to_tensor()),
                Slot::Buf(_) | Slot::Strided(..) => unreachable!("fold is only called with constant operands"),
            })
            .collect();
        let refs: Vec<&Tensor> = operands.iter().map(|t| t.as_ref()).collect();
        let results = interp::eval_op(&node.op, &refs, &BTreeMap::new())
            .map_err(|e| ScheduleError::Fold { node: describe(self.graph, n), message: e.to_string() })?;
        for (v, t) in node.outputs.iter().zip(results) {
            self.slots.insert(*v, Slot::Const(t));
        }
        self.folded += 1;
        Ok(())
    }

    /// On the CPU, a slice whose every use is a transpose (directly or
    /// through reshapes that split axes) becomes a view of its operand's
    /// buffer, the reshapes carry it, and the transposes copy straight from
    /// that buffer (see [`crate::strided_slices`]); `None` when node `n` is
    /// none of these.
    fn strided_slice(&mut self, n: NodeId) -> Result<Option<()>, ScheduleError> {
        use crate::strided_slices::{deferrable, slice};
        let g = self.graph;
        let node = g.node(n);
        if self.options.device != Device::Cpu || node.inputs.is_empty() || node.outputs.len() != 1 {
            return Ok(None);
        }
        let (x, v) = (node.inputs[0], node.outputs[0]);
        let strided = match self.slots.get(&x) {
            Some(Slot::Strided(b, view)) => Some((*b, view.clone())),
            _ => None,
        };
        match (&node.op, strided) {
            (Op::Slice { axes, starts, steps, .. }, None) if deferrable(g, n) => {
                let Ok(view) = slice(g.ty(x), g.ty(v), axes, starts, steps) else { return Ok(None) };
                let b = self.buffer_of(x);
                self.slots.insert(v, Slot::Strided(b, view));
                Ok(Some(()))
            }
            (Op::Reshape { .. }, Some((b, view))) => {
                // `deferrable` proved the reshape carries the view.
                let shape = &g.ty(v).shape;
                let view = view.reshape(shape).ok_or_else(|| ScheduleError::Contract {
                    node: describe(g, n),
                    kernel: "reshape".into(),
                    what: "a reshape that splits the axes of a deferred slice".into(),
                    found: format!("{:?} -> {shape:?}", view.shape),
                })?;
                self.slots.insert(v, Slot::Strided(b, view));
                Ok(Some(()))
            }
            (Op::Transpose { perm }, Some((b, view))) => {
                let x_ty = g.ty(x);
                let out = g.ty(v);
                let copy = view.transpose(x_ty, perm).ok_or_else(|| ScheduleError::Contract {
                    node: describe(g, n),
                    kernel: "transpose".into(),
                    what: format!("a permutation of {} axes", view.shape.len()),
                    found: format!("{perm:?}"),
                })?;
                let prefix = format!("transpose_{}", out.dtype.name());
                let (kernel, scalars) = crate::templates::strided::map(
                    &prefix,
                    &out.shape,
                    select::elem_of(out.dtype),
                    &[copy],
                    true,
                    &|a, _| a[0].clone(),
                )
                .map_err(|e| ScheduleError::Contract {
                    node: describe(g, n),
                    kernel: prefix.clone(),
                    what: "a strided copy".into(),
                    found: e.to_string(),
                })?;
                self.launch(n, Instance { kernel, scalars }, vec![b])?;
                Ok(Some(()))
            }
            _ => Ok(None),
        }
    }

    /// Adds the launch of `inst` for node `n` on operand buffers `args`,
    /// creating the result buffers.
    fn launch(&mut self, n: NodeId, inst: Instance, mut args: Vec<usize>) -> Result<(), ScheduleError> {
        args.extend(self.result_buffers(n));
        self.push_launch(n, inst, args)
    }

    /// Arena buffers for the results of node `n`.
    fn result_buffers(&mut self, n: NodeId) -> Vec<usize> {
        let outputs = self.graph.node(n).outputs.clone();
        outputs
            .into_iter()
            .map(|v| {
                let b = self.new_buffer(v, Storage::Arena);
                self.slots.insert(v, Slot::Buf(b));
                b
            })
            .collect()
    }

    /// Adds the launch of `inst` for node `n` with its global buffers bound
    /// to `args`, after checking every length against the kernel's
    /// declarations.
    fn push_launch(&mut self, n: NodeId, mut inst: Instance, args: Vec<usize>) -> Result<(), ScheduleError> {
        let g = self.graph;
        if self.options.device == Device::Gpu {
            // Kernels compute in f32: an f32 buffer of the kernel bound to
            // a narrow one (narrow activations) loads it widened and stores
            // into it rounded.
            let narrow: Vec<(usize, Scalar)> = inst
                .kernel
                .global_buffers()
                .zip(&args)
                .enumerate()
                .filter_map(|(i, ((_, d), &b))| match (d.elem, self.buffers.get(b).map(|b| b.elem)) {
                    (Scalar::F32, Some(Elem::BF16)) => Some((i, Scalar::BF16)),
                    (Scalar::F32, Some(Elem::F16)) => Some((i, Scalar::F16)),
                    _ => None,
                })
                .collect();
            inst.kernel = select::narrow_buffers(&inst.kernel, &narrow).map_err(|e| ScheduleError::Contract {
                node: describe(g, n),
                kernel: inst.kernel.name.clone(),
                what: "f32 buffers where the plan has narrow ones".into(),
                found: e.to_string(),
            })?;
        }
        let k = &inst.kernel;
        let decls: Vec<_> = k.global_buffers().map(|(_, d)| d.clone()).collect();
        let contract = |what: String, found: String| ScheduleError::Contract {
            node: describe(g, n),
            kernel: k.name.clone(),
            what,
            found,
        };
        if decls.len() != args.len() || inst.scalars.len() != k.scalars.len() {
            return Err(contract(
                format!("{} buffers and {} scalars", decls.len(), k.scalars.len()),
                format!("{} operands and results and {} scalar values", args.len(), inst.scalars.len()),
            ));
        }
        let mut needs = vec![];
        for (d, &b) in decls.iter().zip(&args) {
            let need = len_dim(k, &d.len, &inst.scalars)
                .ok_or_else(|| contract(format!("a length for `{}` that is not a polynomial", d.name), "?".into()))?;
            let have = Dim::product(self.buffer_shape(b).iter());
            if need != have || plan_elem(d.elem) != self.buffers[b].elem {
                return Err(contract(
                    format!("`{}`: {:?}[{need}]", d.name, d.elem),
                    format!("{:?}[{have}]", self.buffers[b].elem),
                ));
            }
            needs.push(need.to_string());
        }
        let grid = match &k.gpu {
            None => None,
            Some(g) => {
                let dim = |e| {
                    len_dim(k, e, &inst.scalars)
                        .map(|d| d.to_string())
                        .ok_or_else(|| contract("a grid size that is not a polynomial".into(), "?".into()))
                };
                Some([dim(&g.grid[0])?, dim(&g.grid[1])?, dim(&g.grid[2])?])
            }
        };
        let kernel = self.intern(inst.kernel);
        self.launches.push(Launch {
            grid,
            work: None,
            kernel,
            args,
            needs,
            scalars: inst.scalars.iter().map(|d| d.to_string()).collect(),
            node: describe(g, n),
        });
        Ok(())
    }

    /// The kernel's index, adding it if no identical kernel exists; kernels
    /// with equal names but different bodies get distinct names.
    fn intern(&mut self, mut k: Kernel) -> usize {
        let text = k.to_string();
        if let Some(&i) = self.kernel_index.get(&text) {
            return i;
        }
        let base = k.name.clone();
        let mut suffix = 2;
        while self.kernels.iter().any(|o| o.name == k.name) {
            k.name = format!("{base}_{suffix}");
            suffix += 1;
        }
        self.kernels.push(k);
        self.kernel_index.insert(text, self.kernels.len() - 1);
        self.kernels.len() - 1
    }

    /// The element type a computed value `v` is stored in on the GPU: its
    /// own (bf16/f16 activations narrow), or the narrow type of the cast
    /// that is its only use ([`narrow_stores`]).
    fn gpu_stored_elem(&self, v: ValueId) -> Scalar {
        self.narrow_stores.get(&v).copied().unwrap_or_else(|| select::gpu_elem_of(self.graph.ty(v).dtype))
    }

    fn new_buffer(&mut self, v: ValueId, storage: Storage) -> usize {
        let ty = self.graph.ty(v);
        let elem = match self.options.device {
            Device::Cpu => elem_of(ty.dtype),
            // Constants are laid out as kernels read them (floats as f32).
            Device::Gpu if matches!(storage, Storage::Weight { .. }) => elem_of(ty.dtype),
            Device::Gpu => self.gpu_stored_elem(v),
        };
        self.buffers.push(Buffer {
            name: format!("%{}", v.index()),
            elem: plan_elem(elem),
            shape: ty.shape.iter().map(|d| d.to_string()).collect(),
            storage,
        });
        self.buffers.len() - 1
    }

    /// Stores a constant's bytes (once per distinct content) and returns
    /// the file offset.
    fn store(&mut self, chunk: Chunk) -> u64 {
        if let Chunk::Shared(t) = &chunk {
            if let Some((_, o)) = self.shared.iter().find(|(s, _)| s.same_bytes(t)) {
                return *o;
            }
        }
        let key = sample_key(chunk.bytes());
        if let Some(offsets) = self.stored.get(&key) {
            for &o in offsets {
                if self.constants.matches(o, chunk.bytes()) {
                    return o;
                }
            }
        }
        let shared = match &chunk {
            Chunk::Shared(t) => Some(t.clone()),
            Chunk::Owned(_) => None,
        };
        let offset = self.constants.append(chunk.boxed(), WEIGHT_ALIGN);
        self.stored.entry(key).or_default().push(offset);
        if let Some(t) = shared {
            self.shared.push((t, offset));
        }
        offset
    }

    /// A buffer holding float constants stored as `elem` (`chunk` holds
    /// them as such), such as a re-laid-out weight.
    fn place_chunk(&mut self, name: &str, shape: &[usize], elem: Scalar, chunk: Chunk) -> usize {
        let offset = self.store(chunk);
        self.buffers.push(Buffer {
            name: name.to_string(),
            elem: plan_elem(elem),
            shape: shape.iter().map(|d| d.to_string()).collect(),
            storage: Storage::Weight { offset },
        });
        self.buffers.len() - 1
    }

    fn buffer_shape(&self, b: usize) -> Vec<Dim> {
        self.buffers[b].shape.iter().map(|s| s.parse().expect("shapes are printed dims")).collect()
    }

    /// The buffer holding `v`, placing a constant in the weights file the
    /// first time a launch needs it.
    fn buffer_of(&mut self, v: ValueId) -> usize {
        if let Some(&b) = self.placed.get(&(v, Scalar::F32)) {
            return b;
        }
        match self.slots.get(&v) {
            Some(Slot::Buf(b)) => *b,
            Some(Slot::Const(t)) => {
                let chunk = Chunk::Owned(const_bytes(t));
                let offset = self.store(chunk);
                let b = self.new_buffer(v, Storage::Weight { offset });
                self.placed.insert((v, Scalar::F32), b);
                b
            }
            Some(Slot::Stored(s)) => {
                let chunk = s.kernel_bytes();
                let offset = self.store(chunk);
                let b = self.new_buffer(v, Storage::Weight { offset });
                self.placed.insert((v, Scalar::F32), b);
                b
            }
            // `strided_slice` defers a slice only when transposes are its
            // only readers, and they read the buffer it views.
            Some(Slot::Strided(..)) => unreachable!("a deferred slice is read by transposes only"),
            None => unreachable!("operands are scheduled before their users (topological order)"),
        }
    }
}

/// GPU: the f32 values whose only use is a cast to bf16/f16 and that a
/// kernel computes (not inputs, weights or constants, not graph outputs):
/// that kernel stores them narrow, rounding as it stores, which is what
/// the cast would do, and the cast is free. (Narrow activations put such a
/// cast after every op with mixed operands, see `smelt_passes::narrow`.)
fn narrow_stores(graph: &Graph) -> HashMap<ValueId, Scalar> {
    let mut out = HashMap::new();
    for n in graph.node_ids() {
        let node = graph.node(n);
        let Op::Cast { to: to @ (DType::BF16 | DType::F16) } = node.op else { continue };
        let r = node.inputs[0];
        let computed = !matches!(graph.def(r).op, Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. });
        if computed && graph.ty(r).dtype == DType::F32 && !graph.is_output(r) && graph.users(r).len() == 1 {
            out.insert(r, select::gpu_elem_of(to));
        }
    }
    out
}

/// The stored weights that weight-stationary products read as their
/// `[n, k]` matrix: a matmul's (or gated MLP's) weight operand that is the
/// transpose of a checkpoint weight, seen through exact casts.
fn packed_tables(graph: &Graph, weights: &BTreeMap<String, StoredTensor>) -> Vec<StoredTensor> {
    let mut found: Vec<StoredTensor> = vec![];
    for n in graph.node_ids() {
        let node = graph.node(n);
        let operands = match node.op {
            Op::MatMul {} | Op::GatedMlp { .. } => &node.inputs[1..],
            _ => continue,
        };
        for &w in operands {
            // Back to the weight through casts and 2-D transposes.
            let (mut v, mut flips) = (w, 0);
            let name = loop {
                let def = graph.def(v);
                match &def.op {
                    Op::Weight { name } => break Some(name),
                    Op::Cast { to } if to.is_float() => v = def.inputs[0],
                    Op::Transpose { perm } if perm[..] == [1, 0] => {
                        flips += 1;
                        v = def.inputs[0];
                    }
                    _ => break None,
                }
            };
            if let Some(t) = name.filter(|_| flips % 2 == 1).and_then(|n| weights.get(n)) {
                if !found.iter().any(|f| f.same_bytes(t)) {
                    found.push(t.clone());
                }
            }
        }
    }
    found
}

/// The element type of a KIR float element type.
fn scalar_dtype(s: Scalar) -> DType {
    match s {
        Scalar::BF16 => DType::BF16,
        Scalar::F16 => DType::F16,
        _ => DType::F32,
    }
}

/// A constant in the element type kernels read (floats as f32).
fn const_bytes(t: &Tensor) -> Vec<u8> {
    match &t.data {
        Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::F64(v) => v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect(),
        Data::I64(v) if elem_of(t.dtype) == Scalar::I32 => v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
        Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::Bool(v) => v.iter().map(|b| *b as u8).collect(),
    }
}

fn plan_elem(s: Scalar) -> Elem {
    match s {
        Scalar::F32 => Elem::F32,
        Scalar::I32 => Elem::I32,
        Scalar::I64 => Elem::I64,
        Scalar::Bool => Elem::Bool,
        Scalar::BF16 => Elem::BF16,
        Scalar::F16 => Elem::F16,
    }
}

/// The KIR element type of a plan buffer's elements.
pub(crate) fn scalar_of_elem(e: Elem) -> Scalar {
    match e {
        Elem::F32 => Scalar::F32,
        Elem::I32 => Scalar::I32,
        Elem::I64 => Scalar::I64,
        Elem::Bool => Scalar::Bool,
        Elem::BF16 => Scalar::BF16,
        Elem::F16 => Scalar::F16,
    }
}

/// A KIR length expression as a dim, with the instance's scalar dims
/// substituted for the kernel's parameters; `None` when it is not a
/// polynomial (division by a non-constant, a load).
pub fn len_dim(k: &Kernel, e: &Expr, scalars: &[Dim]) -> Option<Dim> {
    Some(match e {
        Expr::Int(x, _) => Dim::c(*x),
        Expr::Var(v) => scalars.get(k.scalars.iter().position(|s| s == v)?)?.clone(),
        Expr::Cast(_, a) => len_dim(k, a, scalars)?,
        Expr::Bin(op, a, b) => {
            let (a, b) = (len_dim(k, a, scalars)?, len_dim(k, b, scalars)?);
            match op {
                BinOp::Add => a + b,
                BinOp::Sub => a - b,
                BinOp::Mul => a * b,
                BinOp::Div => a.floor_div(b.as_const().filter(|&c| c > 0)?),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// `%12 = rope @"layer 0 self_attn"`, for messages and profiles.
fn describe(g: &Graph, n: NodeId) -> String {
    let node = g.node(n);
    let outs: Vec<String> = node.outputs.iter().map(|v| format!("%{}", v.index())).collect();
    let mut s = format!("{} = {}", outs.join(", "), node.op.name());
    if let Some(l) = &node.label {
        s.push_str(&format!(" @\"{l}\""));
    }
    if let Some(line) = node.line {
        s.push_str(&format!(" (line {line})"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tied embedding: the table of the lookup is the transposed-back
    /// head weight. With `weight_dtype`, both are stored narrow; the norm
    /// weight stays f32.
    fn tied_lm() -> (Graph, BTreeMap<String, StoredTensor>) {
        let g = smelt_ir::text::parse(
            r#"
func @lm(%ids: i64[1, seq]) -> (logits) {
  %e = weight name="embed" : f32[11, 8]
  %h = gather %e, %ids axis=0 : f32[1, seq, 8]
  %n = weight name="norm" : f32[8]
  %hn = mul %h, %n : f32[1, seq, 8]
  %et = transpose %e perm=[1, 0] : f32[8, 11]
  %logits = matmul %hn, %et : f32[1, seq, 11]
  return logits=%logits
}
"#,
        )
        .unwrap();
        let embed: Vec<f32> = (0..88).map(|i| (i as f32 * 0.37).sin()).collect();
        let weights = BTreeMap::from([
            ("embed".to_string(), Tensor::from_f32(DType::F32, vec![11, 8], embed).unwrap()),
            ("norm".to_string(), Tensor::from_f32(DType::F32, vec![8], vec![1.5; 8]).unwrap()),
        ]);
        (g, weights.iter().map(|(n, t)| (n.clone(), StoredTensor::from_tensor(t))).collect())
    }

    /// The constant buffers as (elem, offset, bytes).
    fn constants(s: &Schedule) -> Vec<(Elem, u64, usize)> {
        let mut out: Vec<_> = s
            .plan
            .buffers
            .iter()
            .filter_map(|b| match b.storage {
                Storage::Weight { offset } => {
                    let n: usize = b.shape.iter().map(|d| d.parse::<usize>().unwrap()).product();
                    Some((b.elem, offset, n * b.elem.size()))
                }
                _ => None,
            })
            .collect();
        out.sort_by_key(|c| c.1);
        out
    }

    #[test]
    fn narrow_weights_keep_tied_embeddings_stored_once() {
        let (g, w) = tied_lm();
        for (dtype, elem) in
            [(WeightDtype::F32, Elem::F32), (WeightDtype::BF16, Elem::BF16), (WeightDtype::F16, Elem::F16)]
        {
            let s = schedule(
                &g,
                &w,
                ScheduleOptions { packed_weights: false, weight_dtype: dtype, ..ScheduleOptions::default() },
            )
            .unwrap();
            let c = constants(&s);
            // The table and the head: one offset; the norm weight: f32.
            assert_eq!(c.len(), 3, "{dtype:?}: {c:?}");
            let (table, norm): (Vec<&(Elem, u64, usize)>, Vec<_>) = c.iter().partition(|x| x.2 == 88 * elem.size());
            assert!(table.iter().all(|t| t.0 == elem && t.1 == table[0].1), "{dtype:?}: {c:?}");
            assert_eq!(norm, vec![&(Elem::F32, norm[0].1, 32)], "{dtype:?}");
            assert_eq!(s.constants.len(), c.iter().map(|x| x.1 + x.2 as u64).max().unwrap(), "{dtype:?}");
            let names: Vec<&str> = s.kernels.iter().map(|k| k.name.as_str()).collect();
            let suffix = match dtype {
                WeightDtype::F32 => "",
                WeightDtype::BF16 => "_bf16",
                WeightDtype::F16 => "_f16",
            };
            assert!(names.iter().any(|n| n.starts_with(&format!("matmul_nk_k8_n11{suffix}_"))), "{names:?}");
        }
    }

    #[test]
    fn packed_weights_are_stored_narrow() {
        let (g, w) = tied_lm();
        let s = schedule(
            &g,
            &w,
            ScheduleOptions { packed_weights: true, weight_dtype: WeightDtype::BF16, ..ScheduleOptions::default() },
        )
        .unwrap();
        let c = constants(&s);
        // The packed head (11 columns padded to whole panels of the
        // build's and host's `nr`: 16 columns in panels of 8 or 16, 32 on
        // AVX-512 hosts of the llvm build, by 8), which the table lookup
        // reads too (one offset, stored once), and the norm.
        let nr = crate::tuning::default_panels(&crate::tuning::Lowering::available()).0.nr;
        let elems: Vec<(Elem, usize)> = c.iter().map(|x| (x.0, x.2)).collect();
        let packed: Vec<_> = c.iter().filter(|x| x.0 == Elem::BF16).collect();
        assert_eq!(packed.len(), 2, "{c:?}");
        assert!(packed.iter().all(|x| x.1 == packed[0].1 && x.2 == 11usize.next_multiple_of(nr) * 8 * 2), "{c:?}");
        assert!(elems.contains(&(Elem::F32, 32)), "{c:?}");
        let lookup = |k: &&Kernel| k.name.starts_with("gather_packed") && k.name.contains("_bf16_");
        assert!(s.kernels.iter().any(|k| lookup(&k)), "no packed lookup");
    }

    /// f16 cannot hold 1e5: such a weight stays f32 rather than turning
    /// into infinities.
    #[test]
    fn weights_that_overflow_f16_stay_f32() {
        let (g, mut w) = tied_lm();
        let mut big = w["embed"].to_tensor().to_f32_vec();
        big[3] = 1e5;
        w.insert("embed".into(), StoredTensor::from_tensor(&Tensor::from_f32(DType::F32, vec![11, 8], big).unwrap()));
        let s = schedule(
            &g,
            &w,
            ScheduleOptions { packed_weights: false, weight_dtype: WeightDtype::F16, ..ScheduleOptions::default() },
        )
        .unwrap();
        assert!(constants(&s).iter().all(|c| c.0 == Elem::F32), "{:?}", constants(&s));
    }

    /// On the GPU an attention node is two launches sharing a scratch
    /// buffer: the runtime's plan checker accepts the plan and sizes it,
    /// and running the launches in order in the interpreter (arena memory
    /// starting as NaN) gives the reference interpreter's result within
    /// 1e-5 * (1 + |want|), for a decode step and for a prefill.
    #[test]
    fn gpu_attention_steps_share_a_scratch_buffer() {
        use crate::kir::interp::{self as kinterp, BufData, Mode};
        use crate::kir::Access;
        use smelt_runtime::artifact::Signature;
        use smelt_runtime::native::checked::CheckedPlan;

        let g = smelt_ir::text::parse(
            r#"
func @attn(%q: f32[batch, 4, seq, 8], %k: f32[batch, 2, past + seq, 8], %v: f32[batch, 2, past + seq, 8]) -> (out) {
  %o = attention %q, %k, %v scale=0.35 causal=true : f32[batch, 4, seq, 8]
  return out=%o
}
"#,
        )
        .unwrap();
        // Small blocks for the interpreter: 4 splits per kv head, 32
        // threads, up to 2 queries.
        let gpu = select::GpuConfig {
            attention_threads: 32,
            flash_rows: 16,
            flash_keys: 8,
            flash_row_threads: 4,
            split_threads: 32,
            split_blocks: 8,
            split_max_queries: 2,
            ..select::GpuConfig::default()
        };
        let options = ScheduleOptions { device: Device::Gpu, gpu, ..ScheduleOptions::default() };
        let s = schedule(&g, &BTreeMap::new(), options).unwrap();
        assert_eq!(s.plan.launches.len(), 2, "{:?}", s.plan.launches);
        let scratch: Vec<usize> =
            (0..s.plan.buffers.len()).filter(|&b| s.plan.buffers[b].name.ends_with(".partials")).collect();
        assert_eq!(scratch.len(), 1, "{:?}", s.plan.buffers);
        assert_eq!(s.plan.buffers[scratch[0]].storage, Storage::Arena);
        assert!(s.plan.launches.iter().all(|l| l.args.contains(&scratch[0])));
        let checked = CheckedPlan::new(s.plan.clone(), Signature::from_graph(&g), s.constants.len() as usize).unwrap();
        assert_eq!(checked.lifetimes[scratch[0]], Some((0, 1)));
        for (batch, seq, past) in [(1usize, 1usize, 6usize), (1, 5, 2)] {
            let what = format!("batch {batch} seq {seq} past {past}");
            let t = past + seq;
            let inputs: BTreeMap<String, Tensor> = [("q", 4, seq), ("k", 2, t), ("v", 2, t)]
                .iter()
                .enumerate()
                .map(|(i, &(name, heads, rows))| {
                    let shape = vec![batch, heads, rows, 8];
                    let n = shape.iter().product();
                    let data = crate::templates::testing::rand(n, 40 + i as u64);
                    (name.to_string(), Tensor::from_f32(DType::F32, shape, data).unwrap())
                })
                .collect();
            let sizes =
                checked.size_call(&inputs, &BTreeMap::new(), smelt_runtime::native::checked::KvBinding::Dense).unwrap();
            let mut mem: Vec<BufData> = s
                .plan
                .buffers
                .iter()
                .enumerate()
                .map(|(i, b)| match &b.storage {
                    Storage::Input { name } => BufData::F32(inputs[name].to_f32_vec()),
                    Storage::Arena => BufData::F32(vec![f32::NAN; sizes.lens[i]]),
                    other => panic!("unexpected storage {other:?}"),
                })
                .collect();
            for l in &s.plan.launches {
                let k = &s.kernels[l.kernel];
                let eval = |d: &String| d.parse::<Dim>().unwrap().eval_map(&sizes.syms).unwrap();
                let scalars: Vec<i64> = l.scalars.iter().map(eval).collect();
                let grid = l.grid.as_ref().unwrap().clone().map(|d| eval(&d) as usize);
                assert_eq!(k.grid(&scalars).unwrap().unwrap(), grid, "{what}: {}", k.name);
                let block = k.gpu.as_ref().unwrap().block.map(|d| d as usize);
                let mut args: Vec<BufData> = l.args.iter().map(|&b| mem[b].clone()).collect();
                kinterp::run(k, &mut args, &scalars, Mode::Gpu { grid, block })
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                for ((&b, data), (_, d)) in l.args.iter().zip(args).zip(k.global_buffers()) {
                    if d.access == Access::Write {
                        mem[b] = data;
                    }
                }
            }
            let want = smelt_ir::interp::run(&g, &BTreeMap::new(), &inputs).unwrap()["out"].to_f32_vec();
            let got = mem[s.plan.outputs[0].1].f32();
            assert_eq!(got.len(), want.len(), "{what}");
            for (j, (x, y)) in got.iter().zip(&want).enumerate() {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}: element {j}: got {x}, expected {y}");
            }
        }
    }

    /// With `GpuGemm::Cublas` a projection and a gated MLP become library
    /// GEMMs (after a conversion of the activations for narrow weights) and
    /// a gated elementwise kernel; the runtime's plan checker accepts the
    /// plan, and simulating it (kernels in the interpreter's GPU mode, each
    /// GEMM by a reference matmul over what its buffers hold, so the
    /// activations are those the conversion rounded to the weights' type)
    /// gives the reference interpreter's outputs within the rounding of the
    /// weights' type, for a decode-sized and a prefill-sized call.
    #[test]
    fn cublas_weight_products_simulate_to_the_reference() {
        use smelt_runtime::artifact::Signature;
        use smelt_runtime::plan::{GemmCompute, LibraryCall};

        let g = smelt_ir::text::parse(
            r#"
func @mlp(%x: f32[batch, seq, 16]) -> (y) {
  %wq = weight name="wq" : f32[24, 16]
  %wqt = transpose %wq perm=[1, 0] : f32[16, 24]
  %h = matmul %x, %wqt : f32[batch, seq, 24]
  %wg = weight name="wg" : f32[40, 24]
  %wgt = transpose %wg perm=[1, 0] : f32[24, 40]
  %wu = weight name="wu" : f32[40, 24]
  %wut = transpose %wu perm=[1, 0] : f32[24, 40]
  %y = gated_mlp %h, %wgt, %wut act="silu" : f32[batch, seq, 40]
  return y=%y
}
"#,
        )
        .unwrap();
        let weight = |name: &str, n: usize, k: usize, seed: u64| {
            let data = crate::templates::testing::rand(n * k, seed);
            (name.to_string(), StoredTensor::from_tensor(&Tensor::from_f32(DType::F32, vec![n, k], data).unwrap()))
        };
        let weights = BTreeMap::from([weight("wq", 24, 16, 1), weight("wg", 40, 24, 2), weight("wu", 40, 24, 3)]);
        let f32_weights: BTreeMap<String, Tensor> = weights.iter().map(|(n, t)| (n.clone(), t.to_tensor())).collect();
        let cases = [
            (WeightDtype::F32, GpuGemm::Cublas, 1e-6),
            (WeightDtype::F32, GpuGemm::CublasTf32, 4e-3),
            (WeightDtype::BF16, GpuGemm::Cublas, 1e-2),
            (WeightDtype::F16, GpuGemm::CublasTf32, 2e-3),
        ];
        for (wd, gemm, tol) in cases {
            let tf32 = gemm == GpuGemm::CublasTf32 && wd == WeightDtype::F32;
            let options =
                ScheduleOptions { device: Device::Gpu, weight_dtype: wd, gpu_gemm: gemm, ..ScheduleOptions::default() };
            let s = schedule(&g, &weights, options).unwrap();
            // The launches: [convert], gemm, [convert], gemm, gemm, gated.
            let kinds: Vec<String> = s
                .plan
                .launches
                .iter()
                .map(|l| {
                    let e = &s.plan.kernels[l.kernel];
                    match &e.library {
                        Some(LibraryCall::Gemm(c)) => {
                            assert_eq!(e.lowering, "cublas");
                            assert_eq!(c.compute, if tf32 { GemmCompute::Tf32 } else { GemmCompute::F32 });
                            assert_eq!((c.a, c.b, c.c), (wd_elem(wd), wd_elem(wd), Elem::F32));
                            format!("gemm n={} k={}", c.n, c.k)
                        }
                        None => s.kernels[l.kernel].name.split("_m").next().unwrap().to_string(),
                    }
                })
                .collect();
            let mut want = vec![];
            let convert = |k: usize| format!("gpu_convert_f32_to_{}_c{k}", wd_name(wd));
            if wd != WeightDtype::F32 {
                want.push(convert(16));
            }
            want.push("gemm n=24 k=16".to_string());
            if wd != WeightDtype::F32 {
                want.push(convert(24));
            }
            want.extend(["gemm n=40 k=24".to_string(), "gemm n=40 k=24".to_string(), "gpu_gated_silu_n40".into()]);
            assert_eq!(kinds, want, "{wd:?}");
            // Both gated GEMMs share one library entry, after the kernels.
            assert_eq!(s.plan.kernels.len(), s.kernels.len() + 2, "{wd:?}");
            let len = s.constants.len() as usize;
            // The GPU runtime's checks (library calls included) accept it.
            let mut with_ptx = s.plan.clone();
            with_ptx.ptx = vec![smelt_runtime::plan::PtxModule { arch: "sm_90".into(), file: "k.ptx".into() }];
            smelt_runtime::cuda::CudaPlan::new(with_ptx, Signature::from_graph(&g), len).unwrap();
            let file = s.constants.finish().unwrap().read().unwrap();
            for (batch, seq) in [(1usize, 1usize), (2, 5)] {
                let what = format!("{wd:?} {gemm:?} batch {batch} seq {seq}");
                let data = crate::templates::testing::rand(batch * seq * 16, 7);
                let x = Tensor::from_f32(DType::F32, vec![batch, seq, 16], data).unwrap();
                let inputs = BTreeMap::from([("x".to_string(), x)]);
                let out = crate::simulate::run_gpu_plan(&g, &s.kernels, &s.plan, &file, &inputs)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let want = smelt_ir::interp::run(&g, &f32_weights, &inputs).unwrap()["y"].to_f32_vec();
                let got = out["y"].to_f32_vec();
                assert_eq!(got.len(), want.len(), "{what}");
                let scale = want.iter().fold(0f32, |a, y| a.max(y.abs()));
                let err = got.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                assert!(err <= tol * (1.0 + scale), "{what}: max error {err} against max |y| {scale}");
            }
        }
    }

    fn wd_elem(wd: WeightDtype) -> Elem {
        plan_elem(wd.scalar())
    }

    fn wd_name(wd: WeightDtype) -> &'static str {
        match wd {
            WeightDtype::F32 => "f32",
            WeightDtype::BF16 => "bf16",
            WeightDtype::F16 => "f16",
        }
    }
}

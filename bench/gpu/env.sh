# Shared setup of the GPU scripts (sourced by run.sh and tune.sh, which set
# G, the prepared folder, and W, the work folder): unpacks the prebuilt
# smelt into $W/smelt (S), fills in the shared libraries the system lacks
# from $G/lib, and puts cuBLAS on LD_LIBRARY_PATH when the system's loader
# has none (SKIP_CUBLAS=1: not looked for).
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('$G/smelt.xz'), open('$W/smelt','wb'))" || exit 1
chmod +x "$W/smelt"
S="$W/smelt"
# The bundled libraries only fill in what the system lacks.
missing=$(ldd "$S" | awk '/not found/ { print $1 }')
if [ -n "$missing" ]; then
  mkdir -p "$W/lib"
  for l in $missing; do cp "$G/lib/$l" "$W/lib/" 2>/dev/null || echo "warning: $l missing"; done
  export LD_LIBRARY_PATH="$W/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# cuBLAS for the `--gpu-gemm cublas` artifacts: smelt looks for
# libcublas.so(.12) by name; when the system's loader has none, the pip
# wheel PyTorch uses (nvidia-cublas-cu12's nvidia/cublas/lib, or CUDA 13's
# nvidia/cu13/lib, whose cublasGemmEx has the same ABI) is linked in as
# libcublas.so.
if [ -z "${SKIP_CUBLAS:-}" ] && ! ldconfig -p 2>/dev/null | grep -qE 'libcublas\.so(\.12)? '; then
  cublas=$(python3 -c '
import glob, os, nvidia
for root in nvidia.__path__:
    for pat in ("cublas/lib/libcublas.so.*", "cu*/lib/libcublas.so.*"):
        hits = sorted(glob.glob(os.path.join(root, pat)))
        if hits:
            print(hits[-1])
            raise SystemExit
' 2>/dev/null)
  if [ -n "$cublas" ]; then
    mkdir -p "$W/cublas" && ln -sf "$cublas" "$W/cublas/libcublas.so"
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$W/cublas:$(dirname "$cublas")"
    echo "cuBLAS: $cublas"
  else
    echo "warning: no libcublas found; the cublas rows will fail"
  fi
fi

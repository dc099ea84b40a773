#!/usr/bin/env bash
# The one script to run on an NVIDIA GPU machine (a fresh clone, no .venv): it prints the GPU,
# makes .venv, installs the project and the GPU packages (TensorRT 10 + pycuda), runs the GPU tests
# and the inference benchmarks for tensorrt and onnxruntime, and exits non-zero when the GPU tests
# fail or TensorRT cannot run at all (every GPU test skipped proves nothing). About 4-6 minutes on
# an H100 with PyPI in reach: pycuda is an sdist compiled against the local CUDA toolkit (2-3
# minutes), so it builds in the background while the project and TensorRT install.
#
#   bash load-tests/gpu.sh                  # output to stdout, and to $OUT/gpu.log when OUT is set
#   bash load-tests/gpu.sh --fetch-wheels   # run where pip works: puts the project's runtime wheels
#                                           # for CPython 3.12 and the pycuda sdist (about 6 MB) in
#                                           # .whl/ for a GPU machine that cannot reach PyPI.
#                                           # TensorRT's own wheels are far too big to travel that
#                                           # way: there the script reports it and exits 3.
#
# Exit codes: 0 GPU tests passed; pytest's code when they failed; 3 TensorRT cannot run here (its
# tests all skipped); 4 the project could not be installed. A failed benchmark is reported only.
#
# Environment: TRT_PIN (default tensorrt-cu12==10.16.1.11, the CUDA 12 build, for any driver that
# runs CUDA 12; tensorrt-cu13==10.16.1.11 is the CUDA 13 one, driver >= 580), PYCUDA_PIN (default
# pycuda==2026.1), WHEEL_DIR (default .whl), GPU_SH_OFFLINE=1 (skip PyPI even if reachable; not
# OUTPOST_*: the settings reject unknown OUTPOST_ variables),
# OUT (folder for gpu.log, gpu-junit.xml and the benchmarks' JSON).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 4
TRT_PIN="${TRT_PIN:-tensorrt-cu12==10.16.1.11}"
PYCUDA_PIN="${PYCUDA_PIN:-pycuda==2026.1}"
WHEEL_DIR="${WHEEL_DIR:-$ROOT/.whl}"
# What the GPU machine's image lacks to run the project offline (it has numpy, onnx, onnxruntime,
# pytest, pytest-timeout, PyYAML, typer, rich, psutil, setuptools): the other runtime pins of
# pyproject.toml, the build backend (hatchling, for the editable install without build isolation)
# and pycuda's dependencies. pip resolves their own dependencies when fetching.
OFFLINE_PKGS=(pydantic==2.14.3 pydantic-settings==2.16.3 paho-mqtt==2.2.0 aiomqtt==2.5.1 orjson==3.13.0
    hdrhistogram==0.10.8 hatchling==1.33.0 pytools platformdirs mako)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEEL_DIR" || exit 4
    plats=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        plats+=(--platform "$p")
    done
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plats[@]}" \
        -d "$WHEEL_DIR" "${OFFLINE_PKGS[@]}" || exit 4
    python3 -m pip download -q --no-deps --no-binary=pycuda -d "$WHEEL_DIR" "$PYCUDA_PIN" || exit 4
    ls -1 "$WHEEL_DIR"
    du -sh "$WHEEL_DIR"
    echo "carry $WHEEL_DIR to the GPU machine (and list it in .git/info/exclude so it is never committed)"
    exit 0
fi

TEE_PID=""
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu.log") 2>&1
    TEE_PID=$!
fi
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off
WORK="$(mktemp -d /tmp/outpost-gpu.XXXXXX)"
T0=$SECONDS
step() { printf '\n=== [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
finish() {
    step "done: exit $1"
    if [[ -n "$TEE_PID" ]]; then
        exec 1>&- 2>&-
        wait "$TEE_PID" 2>/dev/null || true
    fi
    exit "$1"
}

step "machine"
date -u
uname -a
nvidia-smi || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>/dev/null || true

# pycuda compiles against the toolkit's cuda.h and links -lcuda. Its build reads its settings from
# ~/.aksetup-defaults.py, so it runs with a HOME of its own that names the toolkit found here, a
# folder holding libcuda.so (the driver's, else the toolkit's stub), and no cuRAND (unused here).
CUDA_ROOT=""
for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-*; do
    if [[ -n "$d" && -f "$d/include/cuda.h" ]]; then
        CUDA_ROOT="$d"
        break
    fi
done
if [[ -n "$CUDA_ROOT" && -x "$CUDA_ROOT/bin/nvcc" ]]; then
    export PATH="$CUDA_ROOT/bin:$PATH"
    nvcc --version | tail -n 2
fi
LIBCUDA="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so(\.1)? /{print $NF; exit}')"
if [[ -z "$LIBCUDA" ]]; then
    for f in /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 /usr/lib64/libcuda.so.1 \
        "$CUDA_ROOT/lib64/stubs/libcuda.so" "$CUDA_ROOT/targets/x86_64-linux/lib/stubs/libcuda.so"; do
        if [[ -e "$f" ]]; then
            LIBCUDA="$f"
            break
        fi
    done
fi
echo "CUDA toolkit: ${CUDA_ROOT:-not found, so pycuda cannot be built}; libcuda: ${LIBCUDA:-not found}"
mkdir -p "$WORK/home" "$WORK/cudalib"
[[ -n "$LIBCUDA" ]] && ln -sf "$LIBCUDA" "$WORK/cudalib/libcuda.so"
{
    echo "CUDA_ROOT = '$CUDA_ROOT'"
    echo "CUDA_INC_DIR = ['$CUDA_ROOT/include']"
    echo "CUDADRV_LIB_DIR = ['$WORK/cudalib', '$CUDA_ROOT/lib64', '$CUDA_ROOT/lib64/stubs']"
    echo "CUDA_ENABLE_CURAND = False"
} >"$WORK/home/.aksetup-defaults.py"
for f in "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
    if [[ -f "$f" && -z "${PIP_CONFIG_FILE:-}" ]]; then export PIP_CONFIG_FILE="$f"; fi
done
pycuda_env() { HOME="$WORK/home" "$@"; }

PY=""
for c in python3.11 python3; do
    if command -v "$c" >/dev/null; then
        PY="$c"
        break
    fi
done
[[ -n "$PY" ]] || { echo "no python3"; finish 4; }
PYV="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
IGNORE_RP=()
if [[ "$PYV" != "3.11" ]]; then
    echo "python $PYV (the project pins 3.11): installing with --ignore-requires-python"
    IGNORE_RP=(--ignore-requires-python)
fi
ONLINE=0
if [[ "${GPU_SH_OFFLINE:-0}" != 1 ]] && timeout 30 "$PY" -m pip index versions pycuda >/dev/null 2>&1; then
    ONLINE=1
fi
echo "python: $(command -v "$PY") $PYV; PyPI reachable: $ONLINE; tensorrt pin: $TRT_PIN; pycuda pin: $PYCUDA_PIN"

VPY="$ROOT/.venv/bin/python"
PYTEST_PATHS=()
if [[ "$ONLINE" == 1 ]]; then
    step "venv + project (pip install -e '.[dev]'); $PYCUDA_PIN builds in the background"
    [[ -x "$VPY" ]] || "$PY" -m venv "$ROOT/.venv" || finish 4
    "$VPY" -m pip install -q --upgrade pip setuptools wheel || true
    (
        pycuda_env timeout 420 "$VPY" -m pip wheel -q --no-deps -w "$WORK/wheels" "$PYCUDA_PIN" \
            >"$WORK/pycuda.log" 2>&1
        echo $? >"$WORK/pycuda.rc"
    ) &
    PYCUDA_BUILD=$!
    timeout 300 "$VPY" -m pip install -q "${IGNORE_RP[@]}" -e '.[dev]' || { echo "project install failed"; finish 4; }
    step "tensorrt ($TRT_PIN)"
    timeout 300 "$VPY" -m pip install -q "$TRT_PIN" || echo "tensorrt install failed"
    step "pycuda ($PYCUDA_PIN): waiting for its build"
    wait "$PYCUDA_BUILD"
    if [[ "$(cat "$WORK/pycuda.rc" 2>/dev/null)" == 0 ]]; then
        timeout 120 "$VPY" -m pip install -q "$WORK"/wheels/pycuda-*.whl || echo "pycuda install failed"
    else
        echo "pycuda build failed:"
        tail -n 40 "$WORK/pycuda.log"
    fi
else
    step "PyPI not reachable: a venv that also sees $PY's packages, wheels from $WHEEL_DIR"
    if [[ ! -x "$VPY" ]]; then
        "$PY" -m venv "$ROOT/.venv" || finish 4
        # --system-site-packages would show the base interpreter's packages, not those of the
        # environment python3 runs in (itself a venv on some images): a .pth names its folders.
        SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        "$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
            >"$SITE/_outpost_parent_site.pth"
    fi
    if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
        timeout 120 "$VPY" -m pip install -q --no-index --no-deps "$WHEEL_DIR"/*.whl || echo "some wheels did not install"
    else
        echo "no wheels in $WHEEL_DIR (make them with: bash load-tests/gpu.sh --fetch-wheels, where pip works)"
    fi
    for sdist in "$WHEEL_DIR"/pycuda-*.tar.gz; do
        [[ -f "$sdist" ]] || continue
        step "building $(basename "$sdist")"
        pycuda_env timeout 420 "$VPY" -m pip install -q --no-index --no-deps --no-build-isolation "$sdist" \
            || echo "pycuda build failed"
    done
    timeout 120 "$VPY" -m pip install -q --no-index --no-deps --no-build-isolation "${IGNORE_RP[@]}" -e . \
        || { echo "project install failed"; finish 4; }
    # Offline, an optional test dependency may be missing: collect only the GPU tests.
    PYTEST_PATHS=(tests/gpu)
fi

step "versions"
"$VPY" - <<'PYEOF'
import importlib
import sys

print("python", sys.version.split()[0])
for name in ("numpy", "onnx", "onnxruntime", "tensorrt", "pycuda"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", getattr(mod, "VERSION_TEXT", "?")))
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
PYEOF
TRT_REASON="$("$VPY" -c 'from outpost.services.inference.backends.tensorrt import unavailable_reason as u; print(u() or "")' 2>&1)" \
    || TRT_REASON="cannot import the backend: $TRT_REASON"
echo "tensorrt backend: ${TRT_REASON:-can run}"

step "pytest -m gpu -v"
JUNIT=()
[[ -n "${OUT:-}" ]] && JUNIT=(--junitxml "$OUT/gpu-junit.xml")
timeout 330 "$VPY" -m pytest -m gpu -v -rs -p no:cacheprovider "${JUNIT[@]}" "${PYTEST_PATHS[@]}"
GPU_RC=$?
echo "pytest exit code: $GPU_RC"

for backend in tensorrt onnxruntime; do
    step "outpost bench inference --backend $backend --quick --json"
    timeout 120 "$ROOT/.venv/bin/outpost" bench inference --backend "$backend" --quick --json \
        >"$WORK/bench-$backend.json" 2>"$WORK/bench-$backend.err"
    rc=$?
    cat "$WORK/bench-$backend.err" "$WORK/bench-$backend.json"
    echo "bench $backend exit code: $rc"
    [[ -n "${OUT:-}" && -s "$WORK/bench-$backend.json" ]] && cp "$WORK/bench-$backend.json" "$OUT/"
done

step "summary"
echo "pytest -m gpu: exit $GPU_RC; tensorrt backend: ${TRT_REASON:-can run}"
if [[ "$GPU_RC" != 0 ]]; then
    echo "FAIL: GPU tests failed"
    finish "$GPU_RC"
fi
if [[ -n "$TRT_REASON" ]]; then
    echo "FAIL: TensorRT cannot run here, so every GPU test was skipped: $TRT_REASON"
    finish 3
fi
echo "OK: GPU tests passed"
finish 0

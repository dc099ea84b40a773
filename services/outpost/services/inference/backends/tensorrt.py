"""Native TensorRT: an engine built from the ONNX file, cached on disk, run through pycuda buffers.

Targets TensorRT 10 (pinned 10.16.1.11) and its name-based tensor API: ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``. 11.x is accepted too, with the caveat that it has no
FP16 builder flag, so an FP16 request builds FP32 there (and ``name`` says so). Nothing here imports
tensorrt or pycuda at module import: a machine without a GPU imports this module, and
:func:`unavailable_reason` says why it cannot run.

Lifecycle. The backend owns one CUDA context (``make_context`` on device 0), made current only
around each call: the service loads a model on its loader thread and scores on its network thread; a
driver context is current per thread, so every entry point pushes it and pops it again. One
execution context, one stream, and device plus pinned host buffers sized for ``max_batch`` are
allocated once; a larger batch runs in ``max_batch`` chunks. A lock serializes calls (one stream,
one set of buffers).

Engine cache. ``{cache_dir}/{sha}-{precision}-b{max_batch}-{key}.engine`` where the key hashes the
model's SHA-256, the GPU's name and compute capability, the TensorRT version, the precision and
``max_batch``: an engine is only valid for the GPU and TensorRT version that built it. A file that
does not deserialize is rebuilt and replaced; files are written to a temporary name and renamed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from outpost.log import get_logger
from outpost.services.inference.backends.base import BackendUnavailable, FloatArray, ModelLoadError
from outpost.services.inference.backends.config import TensorRTConfig

log = get_logger("outpost.inference.tensorrt")

MIN_TENSORRT_MAJOR: Final = 10
"""The tensor-name API (set_tensor_address / execute_async_v3) replaced bindings in 10.0."""
OPT_BATCH: Final = 32
"""The batch size the optimization profile tunes for (capped at max_batch)."""


def _major(version: str) -> int:
    try:
        return int(version.split(".", 1)[0])
    except ValueError:
        return 0


def _missing(exc: ImportError, *names: str) -> bool:
    """True when the import failed because the package is absent (not because it is broken)."""
    return isinstance(exc, ModuleNotFoundError) and exc.name in names


@functools.cache
def unavailable_reason() -> str | None:
    """Why native TensorRT cannot run here (None when it can). Imports tensorrt and pycuda and asks
    the CUDA driver for a device; the answer is cached for the life of the process."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        if _missing(exc, "tensorrt"):
            return (
                "the tensorrt package is not installed (pip install 'outpost[gpu]' on an NVIDIA GPU machine)"
            )
        return f"tensorrt is installed but cannot load: {exc}"
    except Exception as exc:  # noqa: BLE001 (a native library that fails to load raises OSError and more)
        return f"tensorrt is installed but cannot load: {type(exc).__name__}: {exc}"
    version = str(getattr(trt, "__version__", "unknown"))
    if _major(version) < MIN_TENSORRT_MAJOR:
        return f"tensorrt {version} is older than {MIN_TENSORRT_MAJOR}.0 (this backend uses the tensor API)"
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        if _missing(exc, "pycuda", "pycuda.driver"):
            return "the pycuda package is not installed (pip install 'outpost[gpu]' on an NVIDIA GPU machine)"
        return f"pycuda is installed but cannot load (is the NVIDIA driver installed?): {exc}"
    except Exception as exc:  # noqa: BLE001 (as above: a broken native extension)
        return f"pycuda is installed but cannot load: {type(exc).__name__}: {exc}"
    try:
        cuda.init()
        count = int(cuda.Device.count())
    except Exception as exc:  # noqa: BLE001 (pycuda raises its own pycuda._driver.Error family)
        return f"the CUDA driver cannot be initialized (no usable NVIDIA GPU or driver): {exc}"
    if count == 0:
        return "the CUDA driver reports no GPU"
    return None


@functools.cache
def _trt_logger() -> Any:
    """One TensorRT logger per process: TensorRT keeps the first logger it is given."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def _fast_fp16(cc: tuple[int, int]) -> bool:
    """Whether the GPU runs FP16 at (at least) the FP32 rate: sm_53, sm_60, sm_62 and sm_70 on.
    NVIDIA deprecated Builder.platform_has_fast_fp16 in 10.5 in favour of asking CUDA."""
    return cc >= (7, 0) or cc in {(5, 3), (6, 0), (6, 2)}


def engine_file(
    cache_dir: Path,
    *,
    model_sha256: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    trt_version: str,
    fp16: bool,
    max_batch: int,
) -> Path:
    """Where the engine for this model, GPU, TensorRT version, precision and batch limit lives."""
    parts = [
        f"model={model_sha256}",
        f"gpu={gpu_name}",
        f"sm={compute_capability[0]}.{compute_capability[1]}",
        f"tensorrt={trt_version}",
        f"fp16={int(fp16)}",
        f"max_batch={max_batch}",
    ]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    prefix = re.sub(r"[^0-9A-Za-z]", "", model_sha256)[:16] or "model"
    precision = "fp16" if fp16 else "fp32"
    return cache_dir / f"{prefix}-{precision}-b{max_batch}-{key}.engine"


def _write_atomic(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a temporary file and a rename; False (logged) on failure,
    since an engine that cannot be cached still runs."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        return True
    except OSError as exc:
        log.warning("tensorrt engine not cached", extra={"path": str(path), "error": str(exc)})
        return False
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _build_plan(trt: Any, model_path: Path, cfg: TensorRTConfig, *, fp16: bool) -> bytes:
    """Parse the ONNX file and build a serialized engine with one profile over the batch dim."""
    logger = _trt_logger()
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; the EXPLICIT_BATCH flag is deprecated and
    # ignored, so no creation flags are passed.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    try:
        data = model_path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {model_path}: {exc}") from None
    if not parser.parse(data, str(model_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelLoadError(
            f"TensorRT {trt.__version__} cannot parse {model_path}: "
            + ("; ".join(errors) or "no details given")
        )
    if network.num_inputs != 1:
        raise ModelLoadError(f"{model_path}: expected one input, the graph has {network.num_inputs}")
    inp = network.get_input(0)
    shape = tuple(int(d) for d in inp.shape)
    if inp.dtype != trt.DataType.FLOAT or len(shape) != 2 or shape[1] <= 0:
        raise ModelLoadError(
            f"{model_path}: input {inp.name!r} is {inp.dtype} {shape}, not float32 (N, features)"
        )
    if shape[0] != -1:
        raise ModelLoadError(
            f"{model_path}: input {inp.name!r} has a fixed batch of {shape[0]}; it must be dynamic"
        )
    features = shape[1]

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb * 1024 * 1024)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default and rounds MatMul inputs to 10 mantissa bits: FP32 means FP32.
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    opt = min(OPT_BATCH, cfg.max_batch)
    profile.set_shape(inp.name, (1, features), (opt, features), (cfg.max_batch, features))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelLoadError(
            f"TensorRT {trt.__version__} could not build an engine for {model_path} (see its log)"
        )
    return bytes(memoryview(plan))


class TensorRTBackend:
    """One ONNX model as a TensorRT engine on GPU 0. See the module docstring for the lifecycle."""

    def __init__(self, model_path: Path, cfg: TensorRTConfig, *, model_sha256: str, cache_dir: Path) -> None:
        why = unavailable_reason()
        if why is not None:
            raise BackendUnavailable(f"tensorrt backend: {why}")
        if not model_path.is_file():
            raise ModelLoadError(f"no model file at {model_path}")
        import pycuda.driver as cuda
        import tensorrt as trt

        self._trt: Any = trt
        self._cuda: Any = cuda
        self._lock = threading.Lock()
        self._closed = False
        self.max_batch = cfg.max_batch
        self.built = False
        self.input_name = ""
        self.features = 0
        self.output_names: list[str] = []
        self._rows = 0
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._h_in: npt.NDArray[np.float32] | None = None
        self._d_in: Any = None
        self._h_out: dict[str, npt.NDArray[Any]] = {}
        self._d_out: dict[str, Any] = {}

        cuda.init()
        device = cuda.Device(0)
        major, minor = device.compute_capability()
        cc = (int(major), int(minor))
        self.gpu_name = str(device.name())
        self.trt_version = str(trt.__version__)
        self.fp16 = bool(cfg.fp16 and _fast_fp16(cc) and hasattr(trt.BuilderFlag, "FP16"))
        if cfg.fp16 and not self.fp16:
            log.info("tensorrt: building fp32", extra={"gpu": self.gpu_name, "sm": f"{cc[0]}.{cc[1]}"})
        self.name = "tensorrt-fp16" if self.fp16 else "tensorrt-fp32"
        self.engine_path = engine_file(
            cache_dir,
            model_sha256=model_sha256,
            gpu_name=self.gpu_name,
            compute_capability=cc,
            trt_version=self.trt_version,
            fp16=self.fp16,
            max_batch=cfg.max_batch,
        )
        try:
            self._ctx: Any = device.make_context()  # created current on this thread
        except Exception as exc:  # noqa: BLE001 (pycuda's untyped driver errors)
            raise BackendUnavailable(f"tensorrt backend: no CUDA context on {self.gpu_name}: {exc}") from None
        try:
            self._load(model_path, cfg)
        except BaseException:
            self._release()  # the context is current here; release detaches (and so pops) it
            raise
        cuda.Context.pop()
        log.info(
            "tensorrt engine ready",
            extra={
                "backend": self.name,
                "built": self.built,
                "engine": str(self.engine_path),
                "gpu": self.gpu_name,
                "tensorrt": self.trt_version,
                "max_batch": self.max_batch,
            },
        )

    # -- loading -------------------------------------------------------------------------------

    def _load(self, model_path: Path, cfg: TensorRTConfig) -> None:
        trt = self._trt
        self._runtime = trt.Runtime(_trt_logger())
        engine = self._load_cached() if self.engine_path.is_file() else None
        if engine is None:
            plan = _build_plan(trt, model_path, cfg, fp16=self.fp16)
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise ModelLoadError(
                    f"TensorRT {self.trt_version} cannot load the engine it just built for {model_path}"
                )
            self.built = True
            _write_atomic(self.engine_path, plan)
        self._engine = engine
        self._bind(model_path)

    def _load_cached(self) -> Any:
        """The cached engine, or None (logged) when it is unreadable or does not deserialize."""
        try:
            engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        except Exception as exc:  # noqa: BLE001 (OSError, or TensorRT's own error for a corrupt plan)
            log.warning(
                "tensorrt cached engine unusable, rebuilding",
                extra={"path": str(self.engine_path), "error": str(exc)},
            )
            return None
        if engine is None:
            log.warning(
                "tensorrt cached engine does not deserialize, rebuilding",
                extra={"path": str(self.engine_path)},
            )
        return engine

    def _bind(self, model_path: Path) -> None:
        """Check the engine's I/O, create the execution context, allocate and bind the buffers."""
        trt, cuda, engine = self._trt, self._cuda, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise ModelLoadError(
                f"{model_path}: engine has inputs {inputs} and outputs {outputs}; need one input"
            )
        self.input_name = inputs[0]
        in_shape = tuple(int(d) for d in engine.get_tensor_shape(self.input_name))
        in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        if len(in_shape) != 2 or in_shape[1] <= 0 or in_dtype != np.float32:
            raise ModelLoadError(
                f"{model_path}: engine input is {in_dtype} {in_shape}, not float32 (N, features)"
            )
        self.features = in_shape[1]

        context = engine.create_execution_context()
        if context is None:
            raise ModelLoadError(
                f"{model_path}: TensorRT could not create an execution context (GPU memory?)"
            )
        self._context = context
        if not context.set_input_shape(self.input_name, (self.max_batch, self.features)):
            raise ModelLoadError(f"{model_path}: engine rejects a batch of {self.max_batch}")
        self._rows = self.max_batch
        self._stream = cuda.Stream()
        self._h_in = cuda.pagelocked_empty((self.max_batch, self.features), np.float32)
        self._d_in = cuda.mem_alloc(self._h_in.nbytes)
        context.set_tensor_address(self.input_name, int(self._d_in))
        for name in outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if not shape or shape[0] != self.max_batch or any(d < 0 for d in shape):
                raise ModelLoadError(
                    f"{model_path}: output {name!r} has shape {shape} for a batch of {self.max_batch}; "
                    "outputs must have the batch as their first dimension and fixed others"
                )
            host = cuda.pagelocked_empty(shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
            dev = cuda.mem_alloc(host.nbytes)
            self._h_out[name] = host
            self._d_out[name] = dev
            context.set_tensor_address(name, int(dev))
        self.output_names = outputs

    # -- scoring -------------------------------------------------------------------------------

    def run(self, x: FloatArray) -> dict[str, FloatArray]:
        arr = np.ascontiguousarray(x, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.features:
            raise ValueError(f"expected float32 (rows, {self.features}), got shape {arr.shape}")
        rows = int(arr.shape[0])
        if rows == 0:
            return {
                n: np.empty((0, *self._h_out[n].shape[1:]), dtype=self._h_out[n].dtype)
                for n in self.output_names
            }
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} backend is closed")
            self._ctx.push()
            try:
                parts = [self._run_chunk(arr[s : s + self.max_batch]) for s in range(0, rows, self.max_batch)]
            finally:
                self._cuda.Context.pop()
        if len(parts) == 1:
            return parts[0]
        return {n: np.concatenate([p[n] for p in parts], axis=0) for n in self.output_names}

    def _run_chunk(self, chunk: npt.NDArray[np.float32]) -> dict[str, FloatArray]:
        """Copy in, execute, copy out, synchronize: one chunk of at most max_batch rows (the lock
        is held and the context current)."""
        cuda, context, stream = self._cuda, self._context, self._stream
        assert self._h_in is not None
        n = int(chunk.shape[0])
        if n != self._rows:
            if not context.set_input_shape(self.input_name, (n, self.features)):
                raise RuntimeError(f"TensorRT rejects a batch of {n} rows")
            self._rows = n
        host_in = self._h_in[:n]
        np.copyto(host_in, chunk)
        cuda.memcpy_htod_async(self._d_in, host_in, stream)
        if not context.execute_async_v3(stream.handle):
            raise RuntimeError(f"TensorRT execute_async_v3 failed on a batch of {n} rows")
        for name in self.output_names:
            cuda.memcpy_dtoh_async(self._h_out[name][:n], self._d_out[name], stream)
        stream.synchronize()
        return {name: self._h_out[name][:n].copy() for name in self.output_names}

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the buffers, the engine and the CUDA context. Safe to call twice, from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._ctx.push()
            except Exception:  # a context already gone: nothing left to free on it
                log.warning("tensorrt: cannot make the CUDA context current to close it", exc_info=True)
                return
            self._release()

    def _release(self) -> None:
        """With the context current: free what was allocated, then detach the context, which
        destroys it and pops it off this thread's stack."""
        self._closed = True
        try:
            hosts = [self._h_in, *self._h_out.values()]
            devices = [self._d_in, *self._d_out.values()]
            self._h_in, self._d_in = None, None
            self._h_out, self._d_out = {}, {}
            for h in hosts:
                free = getattr(getattr(h, "base", None), "free", None)  # the PagelockedHostAllocation
                if callable(free):
                    free()
            for d in devices:
                if d is not None:
                    d.free()
            # TensorRT objects go in dependency order while the context is still current.
            self._context = None
            self._engine = None
            self._runtime = None
            self._stream = None
        except Exception:  # never leave the context behind because one free failed
            log.warning("tensorrt: error while freeing device memory", exc_info=True)
        finally:
            try:
                self._ctx.detach()
            except Exception:
                log.warning("tensorrt: cannot detach the CUDA context", exc_info=True)

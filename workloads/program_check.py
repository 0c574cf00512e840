"""The checks a user program passes before any node runs it (and before a client sends it).

A user program is a ``torch.export`` ExportedProgram saved as a ``.pt2`` archive, with
its inputs in a safetensors file (``workloads.program_tensors``). Every check failure is
``WorkRefused(code, detail)``: any honest node refuses the same bytes with the same code.

Order, cheapest and most dangerous first (nothing in the archive reaches torch's loader
until the archive checks pass):

1. ``check_hashes``: the bytes are the ones the signed submission named (``bad-hash``).
2. ``check_sizes``: at most ``MAX_PROGRAM_BYTES`` and ``MAX_INPUT_BYTES``
   (``program-too-large``, ``bad-input``).
3. ``check_archive`` (pure Python, on the zip): only the members a pickle-free pt2
   archive of one model has; every member stored uncompressed (no zip bombs); no
   pickle: no ``.pkl``, no member that starts with a pickle protocol-2..5 header or is a
   nested zip (``torch.save``'s format), except the raw weight and constant payloads
   that the archive's own configs declare raw (``use_pickle: false``): those are read
   as bare storage bytes by torch and never unpickled, and an honest float32 weight may
   well begin with ``0x80 0x02``. Every config entry must be raw; custom and opaque
   objects (which torch unpickles) are refused; the example inputs, which
   ``torch.export.save`` pickles, must be absent (``save_program`` drops them). Then
   ``models/model.json``, the graph, is read as JSON: no symbolic sizes (their
   expressions go through ``sympy.sympify``, an ``eval``), no subgraphs (higher-order
   ops), no custom objects, no operators passed as values, and every node's target is
   ``torch.ops.aten.<op>.<overload>`` with ``<op>`` on ``ALLOWED_OPS``
   (``pickle-in-program``, ``bad-program``, ``disallowed-op``).
4. ``load_program``: ``torch.export.load`` with ``torch.load``, ``pickle.load(s)`` and
   torch's object unpickler replaced by functions that raise, so an accepted archive is
   proven not to unpickle on this torch version (2.15: weights and constants are raw
   bytes, only tensor subclasses, script objects, opaque objects, the legacy formats and
   the example inputs are pickled, all refused by step 3).
5. ``check_graph`` on the loaded graph (defence in depth: the same allowlist, on the
   objects torch resolved), static shapes, tensor-only positional inputs and outputs, no
   mutated buffers or inputs (all state must travel through outputs, so ``carry``
   captures it).
6. ``check_shapes``: the input file matches the program's inputs, and the first
   ``carry`` outputs match the first ``carry`` inputs (``shape-mismatch``).

What this gives: the submitter supplies no Python and no pickle, and the graph calls
only the listed ATen kernels. What it does not give: protection from a bug in an ATen
kernel (an out-of-bounds index in a kernel that fails to check it), which only the
child process's limits contain (``workloads.program_sandbox``).
"""

from __future__ import annotations

import hashlib
import io
import json
import operator
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from workloads.base import WorkRefused
from workloads.lazy import torch

MAX_PROGRAM_BYTES = 64 * 2**20
"""Largest .pt2 archive accepted (64 MiB): weights travel inside it."""
MAX_INPUT_BYTES = 64 * 2**20
"""Largest input tensor file accepted (64 MiB)."""
MAX_UNPACKED_BYTES = 2 * MAX_PROGRAM_BYTES
"""Sum of the archive's declared member sizes (members are stored, so about its size)."""
MAX_MEMBERS = 4096
"""Most members in an archive (one per weight and constant, plus ten fixed files)."""
MAX_GRAPH_NODES = 100_000
"""Most operator calls in one step of the graph."""

# ATen operator packets (``torch.ops.aten.<name>``) a program may call, any overload; an
# in-place variant (``add_``) of an allowed op is allowed too. No randomness (dropout,
# rand*: a replica's draws would differ), no uninitialized memory (``empty*``: its
# contents differ between replicas; leaving it out lets the run skip torch's NaN-filling
# of every new tensor in deterministic mode, a full extra memory pass), no I/O, no
# custom ops, no higher-order ops (``while_loop``, ``cond``, ``map``, callbacks): iteration
# is the task's ``steps``, which
# the runtime bound covers, so there is no unbounded loop inside a step.
_ELEMENTWISE = """
abs acos acosh add addcdiv addcmul alias asin asinh atan atan2 atanh bitwise_and
bitwise_not bitwise_or bitwise_xor ceil clamp clamp_max clamp_min clip copysign cos cosh
deg2rad div eq erf erfc erfinv exp exp2 expm1 fill floor floor_divide fmax fmin fmod frac ge
gt hypot isfinite isinf isnan le lerp lgamma log log10 log1p log2 logaddexp logical_and
logical_not logical_or logical_xor logit lt maximum minimum mul nan_to_num ne neg
positive pow rad2deg reciprocal remainder round rsqrt sgn sigmoid sign sin sinc sinh sqrt
square sub tan tanh true_divide trunc where xlogy masked_fill
"""
_ACTIVATIONS = """
celu elu gelu glu hardshrink hardsigmoid hardswish hardtanh leaky_relu log_sigmoid
log_sigmoid_forward mish prelu relu relu6 rrelu_with_noise_functional selu silu
softplus softshrink tanhshrink threshold _softmax _log_softmax softmax log_softmax
"""
_LINALG = """
addbmm addmm addmv addr baddbmm bmm conv1d conv2d conv3d conv_transpose1d
conv_transpose2d conv_transpose3d convolution _convolution dot einsum linear matmul mm mv
outer tensordot vdot cross
"""
_NN = """
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d
_adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d avg_pool1d avg_pool2d
avg_pool3d max_pool1d max_pool2d max_pool3d max_pool2d_with_indices
max_pool3d_with_indices batch_norm native_batch_norm _native_batch_norm_legit
_native_batch_norm_legit_no_training _native_batch_norm_legit_functional layer_norm
native_layer_norm group_norm native_group_norm instance_norm rms_norm _fused_rms_norm
embedding upsample_nearest1d upsample_nearest2d upsample_bilinear2d upsample_linear1d
pixel_shuffle pixel_unshuffle constant_pad_nd pad reflection_pad1d reflection_pad2d
reflection_pad3d replication_pad1d replication_pad2d replication_pad3d circular_pad
cosine_similarity pairwise_distance cdist _cdist_forward
scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu
"""
_LOSSES = """
mse_loss l1_loss smooth_l1_loss huber_loss nll_loss nll_loss_forward nll_loss2d_forward
nll_loss_nd cross_entropy_loss binary_cross_entropy binary_cross_entropy_with_logits
kl_div soft_margin_loss margin_ranking_loss hinge_embedding_loss poisson_nll_loss
"""
_BACKWARD = """
threshold_backward gelu_backward silu_backward sigmoid_backward tanh_backward
_softmax_backward_data _log_softmax_backward_data convolution_backward
native_layer_norm_backward native_batch_norm_backward native_group_norm_backward
max_pool2d_with_indices_backward max_pool3d_with_indices_backward avg_pool2d_backward
avg_pool3d_backward _adaptive_avg_pool2d_backward _adaptive_avg_pool3d_backward
nll_loss_backward nll_loss2d_backward mse_loss_backward l1_loss_backward
smooth_l1_loss_backward huber_loss_backward binary_cross_entropy_backward
leaky_relu_backward elu_backward hardtanh_backward softplus_backward
hardsigmoid_backward hardswish_backward log_sigmoid_backward mish_backward
embedding_dense_backward upsample_nearest2d_backward upsample_bilinear2d_backward
reflection_pad2d_backward replication_pad2d_backward _fused_rms_norm_backward
"""
_REDUCTIONS = """
all amax amin aminmax any argmax argmin count_nonzero cummax cummin cumprod cumsum
linalg_vector_norm logcumsumexp logsumexp max mean median min norm prod std std_mean sum
var var_mean sort topk argsort kthvalue
"""
_SHAPE = """
_reshape_alias _to_copy _unsafe_view as_strided cat chunk clone contiguous copy
diag diag_embed diagonal detach expand expand_as flatten flip index index_add
index_copy index_fill index_put index_select gather lift_fresh_copy movedim narrow
permute repeat repeat_interleave reshape roll rot90 scatter scatter_add scatter_reduce
select select_scatter slice slice_scatter split split_with_sizes squeeze stack t
tile to transpose tril triu type_as unbind unflatten unfold unsqueeze view view_as
masked_select_scatter alias_copy view_copy permute_copy expand_copy t_copy
transpose_copy unsqueeze_copy squeeze_copy slice_copy select_copy split_copy
diagonal_copy _assert_tensor_metadata
"""
_CREATION = """
arange eye full full_like linspace new_full new_ones new_zeros ones ones_like
scalar_tensor zeros zeros_like zero
"""
ALLOWED_OPS: frozenset[str] = frozenset(" ".join(
    (_ELEMENTWISE, _ACTIVATIONS, _LINALG, _NN, _LOSSES, _BACKWARD, _REDUCTIONS, _SHAPE,
     _CREATION)).split())
"""ATen operator packet names a program may call (see the comment above)."""

_TARGET_RE = re.compile(r"torch\.ops\.aten\.([a-z0-9_]+)\.([A-Za-z0-9_]+)")
# Argument kinds of the serialized graph that make torch evaluate or resolve something
# beyond a static tensor graph: symbolic sizes (sympy.sympify), subgraphs of higher-order
# ops, script objects, operators passed as values.
_FORBIDDEN_KEYS = frozenset({
    "as_expr", "as_graph", "as_custom_obj", "as_operator", "as_sym_int", "as_sym_ints",
    "as_sym_float", "as_sym_floats", "as_sym_bool", "as_sym_bools",
})
_FIXED_MEMBERS = frozenset({
    "archive_format", "archive_version", "byteorder", ".data/version",
    ".data/serialization_id", "models/model.json", "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json", "data/sample_inputs/model.pt",
})
_PAYLOAD_RE = re.compile(r"data/(weights/weight|constants/tensor)_[0-9]{1,6}")
_PICKLE_HEADS = tuple(bytes([0x80, v]) for v in range(2, 6))


def op_allowed(name: str) -> bool:
    """Whether ATen packet ``name`` (``add``, ``add_``) may be called."""
    return name in ALLOWED_OPS or (name.endswith("_") and name[:-1] in ALLOWED_OPS)


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_hashes(program: bytes, inputs: bytes, program_sha256: str,
                 input_sha256: str) -> None:
    """``WorkRefused("bad-hash")`` unless the bytes are those the submission names."""
    for what, data, want in (("program", program, program_sha256),
                             ("input", inputs, input_sha256)):
        got = sha256_hex(data)
        if got != want:
            raise WorkRefused("bad-hash", f"the {what} hashes to {got}, the task names {want}")


def check_sizes(program: bytes, inputs: bytes) -> None:
    """Refuse a program over ``MAX_PROGRAM_BYTES`` or an input over ``MAX_INPUT_BYTES``."""
    if len(program) > MAX_PROGRAM_BYTES:
        raise WorkRefused("program-too-large",
                          f"{len(program)} bytes; at most {MAX_PROGRAM_BYTES}")
    if len(inputs) > MAX_INPUT_BYTES:
        raise WorkRefused("bad-input", f"input file of {len(inputs)} bytes; at most "
                          f"{MAX_INPUT_BYTES}")


# --------------------------------------------------------------------------- archive


@dataclass(frozen=True)
class ArchiveInfo:
    """What the archive check learned: the graph's JSON and its operator targets."""

    graph: dict[str, Any]
    """``models/model.json``, parsed."""
    targets: tuple[str, ...]
    """Each node's target string, in graph order."""


def _members(program: bytes) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    """The zip and its members by path below the single root folder."""
    try:
        z = zipfile.ZipFile(io.BytesIO(program))
        infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise WorkRefused("bad-program", f"not a zip archive: {e}") from None
    if not infos or len(infos) > MAX_MEMBERS:
        raise WorkRefused("bad-program", f"{len(infos)} members; 1 to {MAX_MEMBERS} allowed")
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1 or any("/" not in i.filename for i in infos):
        raise WorkRefused("bad-program", "members must all lie in one root folder")
    by_path: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        path = info.filename.split("/", 1)[1]
        if info.filename.endswith(".pkl") or "pickle" in path.lower():
            raise WorkRefused("pickle-in-program", f"member {info.filename!r} is a pickle")
        if path not in _FIXED_MEMBERS and not _PAYLOAD_RE.fullmatch(path):
            raise WorkRefused("bad-program", f"member {info.filename[:80]!r} is not part of "
                              "a pickle-free pt2 archive of one model named 'model'")
        if info.compress_type != zipfile.ZIP_STORED:
            raise WorkRefused("bad-program", f"member {path!r} is compressed; pt2 members "
                              "are stored")
        if path in by_path:
            raise WorkRefused("bad-program", f"member {path!r} appears twice")
        by_path[path] = info
    if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
        raise WorkRefused("program-too-large", "members total over "
                          f"{MAX_UNPACKED_BYTES} bytes")
    return z, by_path


def _read(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return z.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise WorkRefused("bad-program", f"member {info.filename!r} unreadable: {e}") from None


def _json(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    try:
        return json.loads(_read(z, info).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WorkRefused("bad-program", f"member {info.filename!r} is not JSON: {e}") from None


def _raw_payloads(z: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> set[str]:
    """Paths of the weight and constant payloads the configs declare raw; refuse any
    entry torch would unpickle (``use_pickle``, custom or opaque objects)."""
    raw: set[str] = set()
    for folder, prefix in (("weights", "weight_"), ("constants", "tensor_")):
        config_path = f"data/{folder}/model_{folder}_config.json"
        if config_path not in members:
            raise WorkRefused("bad-program", f"member {config_path!r} is missing")
        config = _json(z, members[config_path])
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise WorkRefused("bad-program", f"{config_path!r} has no 'config' map")
        for fqn, meta in entries.items():
            path_name = meta.get("path_name") if isinstance(meta, dict) else None
            if not isinstance(path_name, str) or not path_name.startswith(prefix):
                raise WorkRefused("pickle-in-program", f"{folder} entry {fqn!r} is not a "
                                  "raw tensor (custom and opaque objects are pickled)")
            if meta.get("use_pickle") is not False or not isinstance(
                    meta.get("tensor_meta"), dict):
                raise WorkRefused("pickle-in-program", f"{folder} entry {fqn!r} is pickled")
            path = f"data/{folder}/{path_name}"
            if path not in members:
                raise WorkRefused("bad-program", f"{folder} entry {fqn!r} names missing "
                                  f"member {path!r}")
            raw.add(path)
    return raw


def _walk_graph_json(node: Any, targets: list[str]) -> None:
    """Refuse forbidden argument kinds anywhere; collect node targets."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            bad = _FORBIDDEN_KEYS.intersection(item)
            if bad:
                raise WorkRefused("disallowed-op", f"the graph uses {sorted(bad)[0]!r} "
                                  "(symbolic sizes, subgraphs, custom objects or operator "
                                  "values are not allowed)")
            if "target" in item and "inputs" in item and isinstance(item["target"], str):
                targets.append(item["target"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_graph_json(graph: Any) -> tuple[str, ...]:
    if not isinstance(graph, dict) or not isinstance(graph.get("graph_module"), dict):
        raise WorkRefused("bad-program", "models/model.json has no graph_module")
    if graph.get("range_constraints"):
        raise WorkRefused("disallowed-op", "the program has dynamic shapes; export it with "
                          "static shapes")
    gm = graph["graph_module"]
    if (gm.get("graph") or {}).get("custom_obj_values"):
        raise WorkRefused("disallowed-op", "the program holds custom objects")
    targets: list[str] = []
    _walk_graph_json(gm, targets)
    if len(targets) > MAX_GRAPH_NODES:
        raise WorkRefused("disallowed-op", f"{len(targets)} operator calls; at most "
                          f"{MAX_GRAPH_NODES}")
    for target in targets:
        m = _TARGET_RE.fullmatch(target)
        if m is None or not op_allowed(m.group(1)):
            raise WorkRefused("disallowed-op", f"operator {target[:120]!r} is not on the "
                              "allowlist (workloads.program_check.ALLOWED_OPS)")
    return tuple(targets)


def check_archive(program: bytes) -> ArchiveInfo:
    """Step 3 of the module docstring, on the zip alone (torch is not involved)."""
    z, members = _members(program)
    for path in ("archive_format", "models/model.json", "data/sample_inputs/model.pt"):
        if path not in members:
            raise WorkRefused("bad-program", f"member {path!r} is missing")
    if _read(z, members["archive_format"]) != b"pt2":
        raise WorkRefused("bad-program", "archive_format is not 'pt2'")
    if members["data/sample_inputs/model.pt"].file_size != 0:
        raise WorkRefused("pickle-in-program", "the archive carries pickled example inputs; "
                          "save it with workloads.program.save_program (drops them)")
    raw = _raw_payloads(z, members)
    for path, info in members.items():
        if path in raw:
            continue  # raw storage bytes, declared raw: never unpickled (module docstring)
        head = _read(z, info)[:4]
        if head.startswith(_PICKLE_HEADS) or head.startswith(b"PK"):
            raise WorkRefused("pickle-in-program", f"member {path!r} is a pickle or a "
                              "nested archive")
        if _PAYLOAD_RE.fullmatch(path):
            raise WorkRefused("bad-program", f"member {path!r} is named by no config")
    graph = _json(z, members["models/model.json"])
    return ArchiveInfo(graph=graph, targets=_check_graph_json(graph))


# --------------------------------------------------------------------------- loading


def _refuse_unpickling(*_args: Any, **_kwargs: Any) -> Any:
    raise WorkRefused("pickle-in-program", "loading the program tried to unpickle")


@contextmanager
def no_unpickling() -> Iterator[None]:
    """Within: ``torch.load``, ``pickle.load(s)`` and torch's object unpickler raise.

    Process-wide (module attributes): use it where nothing else runs, as the node's
    child process, or around a client's one load."""
    saved = (torch.load, pickle.load, pickle.loads, torch._C._pickle_load_obj)
    torch.load = _refuse_unpickling
    pickle.load = pickle.loads = _refuse_unpickling
    torch._C._pickle_load_obj = _refuse_unpickling
    try:
        yield
    finally:
        torch.load, pickle.load, pickle.loads, torch._C._pickle_load_obj = saved


def load_program(program: bytes) -> torch.export.ExportedProgram:
    """Check the archive, load it with unpickling disabled, then check the graph.
    ``WorkRefused`` for any failure, ``bad-program`` when torch cannot load it."""
    check_archive(program)
    with no_unpickling():
        try:
            ep = torch.export.load(io.BytesIO(program))
        except WorkRefused:
            raise
        except Exception as e:  # torch's loader raises many kinds; all mean "malformed"
            raise WorkRefused("bad-program", f"torch.export.load failed: "
                              f"{type(e).__name__}: {str(e)[:200]}") from None
    check_graph(ep)
    return ep


# --------------------------------------------------------------------------- graph


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one positional input or output."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


def _spec(value: Any, what: str) -> TensorSpec:
    if not isinstance(value, torch.Tensor):
        raise WorkRefused("bad-program", f"{what} is a {type(value).__name__}, not a tensor")
    if not all(isinstance(d, int) for d in value.shape):
        raise WorkRefused("disallowed-op", f"{what} has a symbolic shape")
    return TensorSpec(tuple(int(d) for d in value.shape), value.dtype)


def check_graph(ep: torch.export.ExportedProgram) -> None:
    """The loaded graph: allowed ATen calls only (and ``operator.getitem``, which
    unpacks multi-output ops), no submodules, no mutation, static tensor signature."""
    gm = ep.graph_module
    if any(True for _ in gm.named_children()):
        raise WorkRefused("disallowed-op", "the program has subgraphs (higher-order ops)")
    for node in ep.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            raise WorkRefused("disallowed-op", f"graph node {node.name!r} is a {node.op}")
        target = node.target
        if target is operator.getitem:
            continue
        if not (isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
                and op_allowed(target._opname)):
            raise WorkRefused("disallowed-op", f"operator {target!s:.120} is not on the "
                              "allowlist (workloads.program_check.ALLOWED_OPS)")
    sig = ep.graph_signature
    kinds = torch.export.graph_signature.OutputKind
    for out in sig.output_specs:
        if out.kind != kinds.USER_OUTPUT:
            raise WorkRefused("bad-program", f"the program mutates {out.target!r} "
                              f"({out.kind.name}); return new state as outputs instead")
    signature_specs(ep)


def signature_specs(ep: torch.export.ExportedProgram
                    ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The specs of the program's positional tensor inputs and of its outputs."""
    nodes = {n.name: n for n in ep.graph.nodes}
    sig = ep.graph_signature
    ins = [_spec(nodes[name].meta.get("val"), f"input {name!r}") for name in sig.user_inputs]
    outs = []
    for i, name in enumerate(sig.user_outputs):
        if name is None or name not in nodes:
            raise WorkRefused("bad-program", f"output {i} is not a tensor")
        outs.append(_spec(nodes[name].meta.get("val"), f"output {i}"))
    n = len(ins)
    expected = torch.utils._pytree.tree_structure((tuple(range(n)), {}))
    if ep.call_spec.in_spec != expected:
        raise WorkRefused("bad-program", "the program must take only positional tensors "
                          "(no keyword arguments, no nested structures)")
    for i, spec in enumerate(ep.graph_signature.input_specs):
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT and not isinstance(
                spec.arg, torch.export.graph_signature.TensorArgument):
            raise WorkRefused("bad-program", f"input spec {i} is not a tensor")
    return ins, outs


def check_shapes(ins: list[TensorSpec], outs: list[TensorSpec],
                 given: list[torch.Tensor], carry: int) -> None:
    """``WorkRefused("shape-mismatch")`` unless ``given`` fits ``ins`` and the first
    ``carry`` outputs fit the first ``carry`` inputs."""
    if len(given) != len(ins):
        raise WorkRefused("shape-mismatch", f"the program takes {len(ins)} inputs, the "
                          f"input file holds {len(given)}")
    for i, (spec, t) in enumerate(zip(ins, given, strict=True)):
        got = TensorSpec(tuple(t.shape), t.dtype)
        if got != spec:
            raise WorkRefused("shape-mismatch", f"input in{i} is {got}, the program takes "
                              f"{spec}")
    if carry > min(len(ins), len(outs)):
        raise WorkRefused("shape-mismatch", f"carry={carry} but the program has "
                          f"{len(ins)} inputs and {len(outs)} outputs")
    for i in range(carry):
        if outs[i] != ins[i]:
            raise WorkRefused("shape-mismatch", f"carried output {i} is {outs[i]}, but "
                              f"input {i} is {ins[i]}")

"""Name and layout rules between torch state_dicts and Flax NNX states, shared by every model.

jaxgen models copy the attribute names of the torch modules whose checkpoints they load, so a torch
key and an NNX state path name the same parameter:

    torch "down_blocks.0.resnets.1.conv1.weight"  <->  NNX ('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')

Only the last name and the memory layout differ. `LEAF_RULES` lists those differences once. The
rule for a parameter is picked from the NNX side: the leaf name that the target state contains at
that module path (kernel, scale, embedding, ...) and the rank of its array. So "weight" becomes
`kernel` for nnx.Linear and nnx.Conv, `scale` for norms and `embedding` for nnx.Embed, with no
per-model code.

Layouts: torch Linear weights are (out, in) and NNX kernels (in, out). Torch convolutions are
(out, in, *spatial), for example OIHW, and NNX kernels (*spatial, in, out), for example HWIO.
Only nnx.Param and nnx.BatchStat variables are converted. Other variables, such as RNG state,
are not checkpoint content and keep their target values.

Checkpoints saved under older module names are read through `LEGACY_RENAMES`, one table of
old -> current module names that `rename_legacy_keys` applies by key before conversion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "CONVERTED_VARIABLES",
    "LEAF_RULES",
    "LEGACY_RENAMES",
    "TORCH_ONLY_BUFFERS",
    "CheckpointMismatchError",
    "LeafRule",
    "LegacyRename",
    "nnx_to_torch",
    "rename_legacy_keys",
    "torch_key",
    "torch_shapes",
    "torch_to_nnx",
]

# Variable types that hold checkpoint content.
CONVERTED_VARIABLES = (nnx.Param, nnx.BatchStat)


@dataclasses.dataclass(frozen=True)
class LeafRule:
    """Torch name and layout of one kind of NNX leaf.

    nnx_leaf and rank select the rule (rank None matches any rank). torch_to_nnx_axes is the
    np.transpose permutation from the torch layout to the NNX layout (None keeps the layout).
    """

    nnx_leaf: str
    rank: int | None
    torch_leaf: str
    torch_to_nnx_axes: tuple[int, ...] | None = None


LEAF_RULES: tuple[LeafRule, ...] = (
    LeafRule("kernel", 2, "weight", (1, 0)),  # Linear: (out, in) -> (in, out)
    LeafRule("kernel", 3, "weight", (2, 1, 0)),  # Conv1d: OIW -> WIO
    LeafRule("kernel", 4, "weight", (2, 3, 1, 0)),  # Conv2d: OIHW -> HWIO
    LeafRule("kernel", 5, "weight", (2, 3, 4, 1, 0)),  # Conv3d: OIDHW -> DHWIO
    LeafRule("scale", None, "weight"),  # GroupNorm, LayerNorm, RMSNorm, BatchNorm
    LeafRule("embedding", None, "weight"),  # Embedding: (num_embeddings, features) in both
    LeafRule("mean", None, "running_mean"),  # BatchNorm statistics
    LeafRule("var", None, "running_var"),
)
# Any other leaf (bias, or a bare parameter such as a positional embedding) keeps its name and
# layout.

# Torch buffers without an NNX counterpart: skipped when reading, written with this value next
# to a module that has every leaf in the set (torch's strict load_state_dict requires them).
TORCH_ONLY_BUFFERS: dict[str, tuple[frozenset[str], np.ndarray]] = {
    "num_batches_tracked": (frozenset({"mean", "var"}), np.array(0, dtype=np.int64)),
}


@dataclasses.dataclass(frozen=True)
class LegacyRename:
    """A module name that older checkpoints use in place of the current one (the last name before the leaf)."""

    old: str
    new: str


# Older diffusers checkpoints name the VAE mid-block attention (and any attention block that
# diffusers builds with `_from_deprecated_attn_block`) query, key, value and proj_attn, and
# diffusers 0.42.1 still renames them on load. The original Stable Diffusion checkpoints store
# these weights as 1x1 convolutions [O, I, 1, 1], and checkpoints converted from them may too.
LEGACY_RENAMES: tuple[LegacyRename, ...] = (
    LegacyRename("query", "to_q"),
    LegacyRename("key", "to_k"),
    LegacyRename("value", "to_v"),
    LegacyRename("proj_attn", "to_out.0"),
)


def _find_rule(nnx_leaf: str, rank: int) -> LeafRule | None:
    for rule in LEAF_RULES:
        if rule.nnx_leaf == nnx_leaf and rule.rank in (None, rank):
            return rule
    return None


def _torch_leaf_and_axes(nnx_leaf: str, rank: int) -> tuple[str, tuple[int, ...] | None]:
    """Return the torch leaf name and the torch->NNX permutation for an NNX leaf of this rank."""
    rule = _find_rule(nnx_leaf, rank)
    if rule is not None:
        return rule.torch_leaf, rule.torch_to_nnx_axes
    if any(r.nnx_leaf == nnx_leaf for r in LEAF_RULES):
        ranks = sorted(r.rank for r in LEAF_RULES if r.nnx_leaf == nnx_leaf)
        raise ValueError(f"No conversion rule for an NNX {nnx_leaf!r} of rank {rank}; known ranks are {ranks}.")
    return nnx_leaf, None


def torch_key(path: tuple[str | int, ...], rank: int) -> str:
    """Return the torch state_dict key of the NNX variable at `path` whose array has this rank."""
    leaf, _ = _torch_leaf_and_axes(str(path[-1]), rank)
    return ".".join([*(str(part) for part in path[:-1]), leaf])


def _permute_shape(shape: tuple[int, ...], axes: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(shape) if axes is None else tuple(shape[axis] for axis in axes)


class CheckpointMismatchError(ValueError):
    """A checkpoint and a model disagree; lists every missing, unexpected and mis-shaped key.

    Attributes:
        missing: torch keys the model needs and the checkpoint lacks.
        unexpected: checkpoint keys that match no model parameter.
        shape_mismatches: (torch key, checkpoint shape, expected shape), both in torch layout.
    """

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.shape_mismatches = sorted(shape_mismatches)
        lines = ["Checkpoint does not match the model (shapes in torch layout):"]
        lines += [f"  missing key: {key}" for key in self.missing]
        lines += [f"  unexpected key: {key}" for key in self.unexpected]
        lines += [
            f"  wrong shape: {key}: checkpoint {list(got)}, model expects {list(expected)}"
            for key, got, expected in self.shape_mismatches
        ]
        lines.append(
            "Check that the config matches the checkpoint; keys are compared after mapping "
            "NNX paths to torch names with conversion.rules.LEAF_RULES."
        )
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class _Slot:
    path: tuple
    variable: nnx.Variable
    torch_to_nnx_axes: tuple[int, ...] | None
    nnx_to_torch_axes: tuple[int, ...] | None
    torch_shape: tuple[int, ...]


def _converted_slots(state: nnx.State) -> tuple[dict[str, _Slot], dict[str, set[str]]]:
    """Map each torch key to its NNX slot; also return the leaf names at each module path."""
    slots: dict[str, _Slot] = {}
    leaves_by_module: dict[str, set[str]] = {}
    for path, variable in nnx.to_flat_state(state):
        if not isinstance(variable, CONVERTED_VARIABLES):
            continue
        shape = tuple(variable.get_value().shape)
        leaf, axes = _torch_leaf_and_axes(str(path[-1]), len(shape))
        module = ".".join(str(part) for part in path[:-1])
        key = f"{module}.{leaf}" if module else leaf
        if key in slots:
            raise ValueError(
                f"NNX paths {slots[key].path} and {path} both map to torch key {key!r}; rename one of them."
            )
        inverse = None if axes is None else tuple(int(axis) for axis in np.argsort(axes))
        slots[key] = _Slot(path, variable, axes, inverse, _permute_shape(shape, inverse))
        leaves_by_module.setdefault(module, set()).add(str(path[-1]))
    return slots, leaves_by_module


def _is_torch_only_buffer(key: str, leaves_by_module: Mapping[str, set[str]]) -> bool:
    module, _, leaf = key.rpartition(".")
    if leaf not in TORCH_ONLY_BUFFERS:
        return False
    required, _ = TORCH_ONLY_BUFFERS[leaf]
    return required <= leaves_by_module.get(module, set())


def torch_shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
    """Return the torch key and torch-layout shape of every converted variable of `state`.

    Works on abstract states from nnx.eval_shape, so a model's checkpoint layout can be checked
    without allocating its weights. Torch-only buffers are not included.
    """
    slots, _ = _converted_slots(state)
    return {key: slot.torch_shape for key, slot in slots.items()}


def torch_to_nnx(state_dict: Mapping[str, np.ndarray], target: nnx.State) -> nnx.State:
    """Convert a torch state_dict into a copy of `target` filled with its tensors.

    Args:
        state_dict: torch key -> array (numpy, or anything np.asarray accepts, such as a CPU
            torch tensor). Values are cast to the dtype of the target variable.
        target: the state to fill, for example `nnx.state(model)` or the abstract state of
            `nnx.eval_shape`. Its leaf names and ranks choose the rules.

    Returns:
        A state with the structure of `target`: every nnx.Param and nnx.BatchStat contains the
        converted checkpoint array as a jax.Array, and other variables keep their target values.

    Raises:
        CheckpointMismatchError: listing every missing key, unexpected key and wrong shape.
    """
    slots, leaves_by_module = _converted_slots(target)
    missing = [key for key in slots if key not in state_dict]
    unexpected = []
    shape_mismatches = []
    converted: dict[tuple, np.ndarray] = {}
    for key, value in state_dict.items():
        slot = slots.get(key)
        if slot is None:
            if not _is_torch_only_buffer(key, leaves_by_module):
                unexpected.append(key)
            continue
        array = np.asarray(value)
        if tuple(array.shape) != slot.torch_shape:
            shape_mismatches.append((key, tuple(array.shape), slot.torch_shape))
            continue
        if slot.torch_to_nnx_axes is not None:
            array = np.transpose(array, slot.torch_to_nnx_axes)
        converted[slot.path] = np.ascontiguousarray(array, dtype=slot.variable.get_value().dtype)

    if missing or unexpected or shape_mismatches:
        raise CheckpointMismatchError(missing, unexpected, shape_mismatches)
    # Coverage: every converted variable of the target must have been filled exactly once.
    unfilled = [slot.path for slot in slots.values() if slot.path not in converted]
    if unfilled or len(converted) != len(slots):
        raise AssertionError(f"Conversion left NNX variables unfilled: {unfilled}")

    flat = []
    for path, variable in nnx.to_flat_state(target):
        if path in converted:
            variable = variable.replace(jnp.asarray(converted[path]))
        flat.append((path, variable))
    return nnx.from_flat_state(flat)


def nnx_to_torch(state: nnx.State) -> dict[str, np.ndarray]:
    """Convert the nnx.Param and nnx.BatchStat variables of `state` into a torch-style state_dict.

    Returns writable, C-contiguous numpy arrays in torch layout, keyed by torch names, plus the
    torch-only buffers of `TORCH_ONLY_BUFFERS` that torch's strict loading requires.
    """
    slots, leaves_by_module = _converted_slots(state)
    state_dict: dict[str, np.ndarray] = {}
    for key, slot in slots.items():
        array = np.asarray(slot.variable.get_value())
        if slot.nnx_to_torch_axes is not None:
            array = np.transpose(array, slot.nnx_to_torch_axes)
        # A copy, because numpy views of jax arrays are read-only and torch.from_numpy warns on them.
        state_dict[key] = np.array(array, order="C")
    for module, leaves in leaves_by_module.items():
        for buffer_name, (required, value) in TORCH_ONLY_BUFFERS.items():
            if required <= leaves:
                state_dict[f"{module}.{buffer_name}" if module else buffer_name] = value.copy()
    return state_dict


def rename_legacy_keys(
    state_dict: Mapping[str, np.ndarray], expected_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Return `state_dict` with the legacy module names of `LEGACY_RENAMES` replaced.

    A key "prefix.old.leaf" becomes "prefix.new.leaf" only when the model has no parameter of
    the old name and does have one of the new name that the checkpoint lacks. So models whose
    modules are really called `key` or `value` keep their keys. A renamed weight of shape
    [O, I, 1, 1] becomes [O, I] when the model expects [O, I]. Keys that match no rule are
    returned unchanged, so `torch_to_nnx` still reports them.

    Args:
        state_dict: torch key -> array, as read from the checkpoint.
        expected_shapes: torch key -> torch-layout shape of every model parameter, as
            `torch_shapes` returns them.
    """
    renames = {rule.old: rule.new for rule in LEGACY_RENAMES}
    renamed: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        parent, _, module = prefix.rpartition(".")
        new_key = None
        if module in renames and key not in expected_shapes:
            candidate = ".".join(part for part in (parent, renames[module], leaf) if part)
            if candidate in expected_shapes and candidate not in state_dict:
                new_key = candidate
        if new_key is None:
            renamed[key] = value
            continue
        expected = tuple(expected_shapes[new_key])
        if len(expected) == 2 and tuple(np.shape(value)) == (*expected, 1, 1):
            value = np.asarray(value).reshape(expected)  # 1x1 convolution -> Linear, same layout
        renamed[new_key] = value
    return renamed

"""Input checks that run before any kernel, with errors that name the argument and what was expected.

Shape, dtype and device checks read only metadata and always run. Checks that must read tensor values
(label range, rows without a live label, ``cu_seqlens``' values, finite reference log-probs) are gathered in a
:class:`ValueChecks`: each leaves a failure flag on the device, and all of a call's flags are read with one host
synchronisation. They are on by default and can be switched off with ``check_values=False`` once a data
pipeline is trusted.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable

import torch

_FLOATING = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_FLOATING = (torch.float32, torch.bfloat16, torch.float16)
_INTEGER = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _same(a, b) -> bool:
    """Key entries: tensors (and None) by identity, anything else by type and value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a is None or b is None:
        return a is b
    return type(a) is type(b) and a == b


def _same_key(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


class ValueChecks:
    """Value checks read with one host sync: :meth:`add` a 0-d bool tensor that is True on failure and a function
    that words the error; :meth:`run` reads every flag at once (one ``bool``, the only sync when all pass) and,
    when one failed, raises the ``ValueError`` of the first failed check in the order they were added (working
    out its message reads more values, on the way to raising)."""

    def __init__(self) -> None:
        self._flags: list[torch.Tensor] = []
        self._explain: list[Callable[[], str]] = []
        self._keys: list[tuple] = []

    def add(self, failed: torch.Tensor, explain: Callable[[], str], key: tuple | None = None) -> None:
        """``key``: skip the check when one with the same key (tensors compared by identity) was added already."""
        if key is not None:
            if any(_same_key(key, k) for k in self._keys):
                return
            self._keys.append(key)
        self._flags.append(failed.reshape(()))
        self._explain.append(explain)

    def run(self) -> None:
        if not self._flags:
            return
        flags = torch.stack(self._flags)
        self._flags, explain, self._explain, self._keys = [], self._explain, [], []
        if not bool(flags.any()):  # the one host sync of all the value checks
            return
        for failed, words in zip(flags.tolist(), explain):
            if failed:
                raise ValueError(words())


@contextlib.contextmanager
def _own_checks(checks: ValueChecks | None):
    """``checks`` as given (its owner runs them), or a fresh set run on leaving the block."""
    if checks is not None:
        yield checks
        return
    own = ValueChecks()
    yield own
    own.run()


# Inputs prepared (validated, laid out) once per loss call: the op the loss then calls finds them here instead of
# validating them again. Entries are (key, value); tensors in keys are compared by identity.
_PREPARED: contextvars.ContextVar[list | None] = contextvars.ContextVar("alphadpo_prepared", default=None)


@contextlib.contextmanager
def prepared_once():
    """Scope in which :func:`remember` / :func:`recall` memoise prepared inputs (a loss call's)."""
    token = _PREPARED.set([])
    try:
        yield
    finally:
        _PREPARED.reset(token)


def recall(key: tuple):
    """The value remembered for ``key`` in the enclosing :func:`prepared_once` scope, or None."""
    memo = _PREPARED.get()
    for k, v in memo or ():
        if _same_key(k, key):
            return v
    return None


def remember(key: tuple, value) -> None:
    memo = _PREPARED.get()
    if memo is not None:
        memo.append((key, value))


def _require_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_sequence_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ignore_index: int,
    shift: bool,
    softcap: float | None,
    check_values: bool,
    prefix: str = "",
    allow_float64: bool = False,
    checks: ValueChecks | None = None,
) -> None:
    """Validate the inputs of ``fused_sequence_logps`` (``prefix`` is ``"ref_"`` for reference inputs; every
    message names the argument the caller passed). ``checks``: where the value checks go (run here when None)."""
    h_name, w_name, b_name = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    hidden = _require_tensor(hidden, h_name)
    weight = _require_tensor(weight, w_name)
    labels = _require_tensor(labels, "labels")
    for name, t in ((h_name, hidden), (w_name, weight), (b_name, bias)):
        if type(t).__name__ == "DTensor":
            raise TypeError(
                f"{name} is a sharded DTensor (FSDP2 or tensor parallel holds a shard of it here): call the loss inside "
                f"the root module's forward, where FSDP has gathered the head (see README, Distributed), or pass "
                f"{name}.full_tensor()")
    if hidden.dtype not in (_FLOATING if allow_float64 else _KERNEL_FLOATING):
        extra = "" if allow_float64 else "; float64 is for reference_sequence_logps"
        raise TypeError(f"{h_name} must be a floating tensor (float32, bfloat16, float16), got {hidden.dtype}{extra}")
    if hidden.dim() != 3:
        raise ValueError(f"{h_name} must have shape [rows, T, H], got {tuple(hidden.shape)}")
    rows, seq, hdim = hidden.shape
    if rows == 0 or seq == 0 or hdim == 0:
        raise ValueError(f"{h_name} must be non-empty, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hdim:
        raise ValueError(f"{w_name} must have shape [V, H] with H = {hdim} (from {h_name}), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} must have at least one vocabulary row")
    if not weight.is_floating_point():
        raise TypeError(f"{w_name} must be a floating tensor, got {weight.dtype}")
    if labels.dtype not in _INTEGER:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max or weight.shape[0] - 1 > info.max:
        raise TypeError(
            f"labels of dtype {labels.dtype} cannot hold ignore_index={ignore_index} and token ids up to "
            f"{weight.shape[0] - 1} (the vocabulary of {w_name}); use int64 (or int32) labels"
        )
    if tuple(labels.shape) != (rows, seq):
        raise ValueError(f"labels must have shape [rows, T] = {(rows, seq)} to match {h_name}, got {tuple(labels.shape)}")
    if shift and seq < 2:
        raise ValueError(f"shift=True needs T >= 2 (logit t predicts label t+1), got T = {seq}")
    for name, t in ((w_name, weight), ("labels", labels)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but {h_name} is on {hidden.device}; put them on one device")
    if bias is not None:
        bias = _require_tensor(bias, b_name)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{b_name} must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"{b_name} is on {bias.device} but {h_name} is on {hidden.device}")
        if not bias.is_floating_point():
            raise TypeError(f"{b_name} must be a floating tensor, got {bias.dtype}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap}")
    if check_values:
        check_label_values(labels, weight.shape[0], ignore_index=ignore_index, shift=shift, vocab_of=w_name,
                           checks=checks)


def check_label_values(labels: torch.Tensor, vocab: int, *, ignore_index: int, shift: bool,
                       vocab_of: str = "weight", checks: ValueChecks | None = None) -> None:
    """Every label is in ``[0, vocab)`` or ``ignore_index``, and every row keeps a live label."""
    scored = labels[:, 1:] if shift else labels
    live = scored != ignore_index
    bad = live & ((scored < 0) | (scored >= vocab))

    def out_of_range() -> str:
        r, t = (int(i) for i in bad.nonzero()[0])
        t = t + 1 if shift else t
        return (f"labels must be in [0, {vocab}) (the vocabulary of {vocab_of}) or ignore_index={ignore_index}; "
                f"labels[{r}, {t}] = {int(labels[r, t])}")

    empty = ~live.any(dim=1)

    def no_live_label() -> str:
        rows = empty.nonzero().flatten().tolist()
        where = " after the next-token shift" if shift else ""
        return (f"labels has rows with no live label (every entry is ignore_index={ignore_index}{where}): rows "
                f"{rows[:8]}{' ...' if len(rows) > 8 else ''}; their log-prob would be 0/0")

    with _own_checks(checks) as c:  # (a reference head's checks of the same labels add only a smaller vocabulary)
        c.add(bad.any(), out_of_range, key=("label range", labels, vocab, shift, ignore_index))
        c.add(empty.any(), no_live_label, key=("live rows", labels, shift, ignore_index))


def check_pair_rows(rows: int, name: str = "hidden") -> int:
    """The chosen-first layout needs an even number of sequences; returns the number of pairs."""
    if rows % 2 != 0:
        what = "rows" if name == "hidden" else "sequences"
        raise ValueError(
            f"{name} must hold 2·P {what} (P chosen responses, then P rejected ones), got an odd number: {rows}"
        )
    return rows // 2


def check_ref_logps(t: object, name: str, pairs: int, device: torch.device, check_values: bool = False,
                    against: str = "hidden", checks: ValueChecks | None = None) -> torch.Tensor:
    t = _require_tensor(t, name)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != (pairs,):
        raise ValueError(f"{name} must have shape [P] = ({pairs},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {against} is on {device}")
    if check_values:
        def not_finite() -> str:
            bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
            return (f"{name} must be finite; pairs {bad[:8]}{' ...' if len(bad) > 8 else ''} are "
                    f"{[float(t[i]) for i in bad[:3]]}")

        with _own_checks(checks) as c:
            c.add(~torch.isfinite(t).all(), not_finite)
    return t


def _finite_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_loss_hparams(*, beta, gamma_beta_ratio, alpha, ema_momentum, label_smoothing, std_eps,
                       softcap, logit_scale=1.0) -> None:
    """The loss's hyper-parameters, checked once for the module and the functional form alike."""
    if not _finite_number(beta, "beta") > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    _finite_number(gamma_beta_ratio, "gamma_beta_ratio")
    _finite_number(alpha, "alpha")
    if not 0.0 <= _finite_number(ema_momentum, "ema_momentum") < 1.0:
        raise ValueError(f"ema_momentum must be in [0, 1), got {ema_momentum}")
    if not 0.0 <= _finite_number(label_smoothing, "label_smoothing") < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if not _finite_number(std_eps, "std_eps") >= 0:
        raise ValueError(f"std_eps must be >= 0, got {std_eps}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not (math.isfinite(softcap) and softcap > 0)):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    check_logit_scale(logit_scale)


def check_logit_scale(logit_scale) -> None:
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not (
            math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive finite number, got {logit_scale!r}")


def check_packed_inputs(hidden: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
                        prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes and dtypes of packed input; returns ``hidden`` as ``[N, H]`` and ``labels`` as ``[N]``."""
    h_name = f"{prefix}hidden"
    hidden = _require_tensor(hidden, h_name)
    labels = _require_tensor(labels, "labels")
    cu_seqlens = _require_tensor(cu_seqlens, "cu_seqlens")
    if hidden.dim() == 3 and hidden.shape[0] == 1:
        hidden = hidden[0]
    if labels.dim() == 2 and labels.shape[0] == 1:
        labels = labels[0]
    if hidden.dim() != 2:
        raise ValueError(f"with cu_seqlens, {h_name} must be packed as [N, H] or [1, N, H], got {tuple(hidden.shape)}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"with cu_seqlens, labels must be packed as [N] or [1, N] with N = {hidden.shape[0]} "
                         f"(from {h_name}), got {tuple(labels.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise TypeError(f"cu_seqlens must be a 1-D int32 / int64 tensor [S + 1] of sequence boundaries, got "
                        f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {h_name} is on {hidden.device}")
    return hidden, labels


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, n_tokens: int, checks: ValueChecks | None = None) -> None:
    """``cu_seqlens`` starts at 0, ends at N, never decreases and holds no empty sequence."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]

    def ends() -> str:
        return (f"cu_seqlens must start at 0 and end at N = {n_tokens} (the packed tokens), got "
                f"{int(cu[0])} ... {int(cu[-1])}")

    def decreasing() -> str:
        i = int((lengths < 0).nonzero()[0])
        return f"cu_seqlens must not decrease; cu_seqlens[{i + 1}] = {int(cu[i + 1])} < cu_seqlens[{i}] = {int(cu[i])}"

    def empty() -> str:
        rows = (lengths == 0).nonzero().flatten().tolist()
        return f"cu_seqlens holds empty sequences {rows[:8]}{' ...' if len(rows) > 8 else ''}"

    with _own_checks(checks) as c:
        key = ("cu_seqlens", cu_seqlens, n_tokens)
        c.add((cu[0] != 0) | (cu[-1] != n_tokens), ends, key=(*key, "ends"))
        c.add((lengths < 0).any(), decreasing, key=(*key, "decreasing"))
        c.add((lengths == 0).any(), empty, key=(*key, "empty"))


def check_packed_values(labels: torch.Tensor, seg: torch.Tensor, n_seq: int, vocab: int, *, ignore_index: int,
                        shift: bool, vocab_of: str = "weight", checks: ValueChecks | None = None) -> None:
    """Packed labels (already shifted when ``shift``) are in range and every sequence keeps a live one; added
    after :func:`check_cu_seqlens_values` (whose errors come first). ``seg`` must index ``[0, n_seq)`` whatever
    ``cu_seqlens`` holds (``packed_layout`` clamps it): the flags are computed before anything is read."""
    live = labels != ignore_index
    bad = live & ((labels < 0) | (labels >= vocab))

    def out_of_range() -> str:
        t = int(bad.nonzero()[0])
        return (f"labels must be in [0, {vocab}) (the vocabulary of {vocab_of}) or ignore_index={ignore_index}; "
                f"packed position {t} (sequence {int(seg[t])}) holds {int(labels[t])}")

    counts = torch.zeros(n_seq, device=labels.device).index_add_(0, seg, live.float())

    def no_live_label() -> str:
        rows = (counts == 0).nonzero().flatten().tolist()
        where = " after the next-token shift" if shift else ""
        return (f"cu_seqlens sequences {rows[:8]}{' ...' if len(rows) > 8 else ''} have no live label{where}; "
                f"their log-prob would be 0/0")

    with _own_checks(checks) as c:
        c.add(bad.any(), out_of_range, key=("packed label range", labels, vocab, shift, ignore_index))
        c.add((counts == 0).any(), no_live_label, key=("packed live sequences", labels, seg, shift, ignore_index))

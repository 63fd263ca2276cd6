"""Host synchronisations, counted: every path makes exactly the syncs it is documented to make, and no more.

``count_host_syncs`` counts the aten ops that make the host wait for a CUDA device (``.item()`` / ``bool(t)``,
``nonzero``, boolean-mask indexing, ...). It sees them on CPU tensors too, so these tests hold every path to
its CUDA sync budget without a GPU. The budgets, per call:

* the op's forward: Triton 0; torch / cublas 1 (``torch_chunked.forward`` compacts the live tokens with a
  ``nonzero``);
* the op's backward: 1 on every backend (``chunked_backward``: the number of live tokens sizes its chunks);
* ``check_values=True`` (the loss module's default): 1 more, for every value check of the call together (label
  range, rows without a live label, ``cu_seqlens``' values, finite reference log-probs);
* the loss adds none of its own (margin statistics, metrics and heads stay on the device).
"""

from __future__ import annotations

import pytest
import torch

from alphadpo_kernels import FusedAlphaDPOLoss, fused_alpha_dpo_loss, fused_sequence_logps
from alphadpo_kernels.ops.sequence_logps.instrument import count_host_syncs
from helpers import cublas_on_cpu, make_inputs

NONZERO = "aten.nonzero.default"
VALUE_CHECKS = "aten._local_scalar_dense.default"
FORWARD = {"torch": [NONZERO], "cublas": [NONZERO], "triton": []}
BACKWARD = [NONZERO]


@pytest.fixture(params=["torch", "triton", "cublas"])
def backend(request, monkeypatch, device):
    if request.param == "cublas":
        if device == "cpu":
            cublas_on_cpu(monkeypatch)
        else:
            from alphadpo_kernels import _extension

            if _extension.cuda_module() is None:
                pytest.skip("the compiled CUDA epilogue is not built")
    return request.param


def _packed(hidden, labels):
    """Rows cut to different lengths (one of them keeps only its prompt and a live label), concatenated."""
    lengths = [hidden.shape[1] - 2 * r for r in range(hidden.shape[0])]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return (torch.cat([hidden[r, :n] for r, n in enumerate(lengths)]),
            torch.cat([labels[r, :n] for r, n in enumerate(lengths)]), cu)


def _inputs(layout, device="cpu", seed=5):
    hidden, weight, labels, _ = make_inputs(rows=4, seq=14, hdim=16, vocab=40, seed=seed, device=device)
    labels[:, -3] = 7  # every row (and packed sequence, after the shift too) keeps a live label
    if layout == "packed":
        hidden, labels, cu = _packed(hidden, labels)
        return hidden, weight, labels, dict(cu_seqlens=cu)
    return hidden, weight, labels, {}


# --------------------------------------------------------------------------------------- the counter itself


def _count(fn) -> list[str]:
    with count_host_syncs() as log:
        fn()
    assert log.count == len(log.ops)
    return log.ops


def test_the_counter_sees_each_kind_of_sync():
    x = torch.arange(10)
    mask = x > 4
    put = x.clone()
    syncing = {
        "item": lambda: x.sum().item(), "bool": lambda: bool(mask.any()), "if": lambda: 1 if mask.any() else 0,
        "int": lambda: int(x[3]), "float": lambda: float(x[3]), "nonzero": lambda: mask.nonzero(),
        "argwhere": lambda: torch.argwhere(mask), "where1": lambda: torch.where(mask),
        "masked_select": lambda: x.masked_select(mask), "bool index": lambda: x[mask],
        "bool index_put": lambda: put.__setitem__(mask, 0), "repeat_interleave": lambda: x.repeat_interleave(x),
        "unique": lambda: x.unique(), "unique_consecutive": lambda: x.unique_consecutive(),
        "equal": lambda: torch.equal(x, x), "allclose": lambda: torch.allclose(x.float(), x.float()),
        "bincount": lambda: x.bincount(), "histc": lambda: x.float().histc(),
    }
    for what, fn in syncing.items():
        assert len(_count(fn)) == 1, what
    quiet = {
        "long index": lambda: x[torch.tensor([1, 2])], "long index_put": lambda: put.__setitem__(torch.tensor([1]), 0),
        "repeat_interleave output_size": lambda: x.repeat_interleave(x, output_size=45),
        "repeat_interleave int": lambda: x.repeat_interleave(3), "where": lambda: torch.where(mask, x, 0),
        "masked_fill": lambda: x.masked_fill(mask, 0), "searchsorted": lambda: torch.searchsorted(x, x),
        "index_add_": lambda: torch.zeros(10).index_add_(0, x, x.float()),
        "histc with a range": lambda: x.float().histc(5, 0, 10), "full": lambda: torch.full((), 2.0),
    }
    for what, fn in quiet.items():
        assert _count(fn) == [], what


def test_the_counter_sees_host_copies_of_fake_cuda_tensors_and_nests_in_fake_mode():
    """Under FakeTensorMode (a CUDA dry run without a GPU): copies to and from the host are counted, a
    non-blocking one is not, and a data-dependent read is counted before the fake tensor refuses it."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    with FakeTensorMode():
        with count_host_syncs() as log:
            a = torch.full((3,), 2.0, device="cuda")
            a.cpu()
            a.to("cpu", non_blocking=True)
            torch.empty(3).copy_(a)
            torch.tensor(1.0, device="cuda")
            with pytest.raises(DataDependentOutputException):
                a.sum().item()
    assert log.ops == ["aten._to_copy.default(to cpu)", "aten.copy_.default(to cpu)",
                       "aten._to_copy.default(from cpu)", "aten._local_scalar_dense.default"]


# --------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_op_syncs(backend, layout, device):
    """Forward: Triton none, torch / cublas one; backward one; check_values one more, for every check."""
    hidden, weight, labels, kw = _inputs(layout, device)
    for check_values in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with count_host_syncs() as fwd:
            out = fused_sequence_logps(h, w, labels, shift=True, backend=backend, check_values=check_values, **kw)
        expected = ([VALUE_CHECKS] if check_values else []) + FORWARD[backend]
        assert fwd.ops == expected, (check_values, fwd.ops)
        with count_host_syncs() as bwd:
            out.sum().backward()
        assert bwd.ops == BACKWARD, bwd.ops


# --------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("reference", ["given", "ref_hidden"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_loss_syncs(backend, layout, reference, device):
    """The module with its default check_values=True: one sync for all the value checks of both heads and the
    reference log-probs, plus each forward's own (the reference head's too); the backward's one."""
    hidden, weight, labels, kw = _inputs(layout, device)
    if reference == "given":
        kw.update(ref_chosen_logps=torch.tensor([-2.0, -2.5], device=device),
                  ref_rejected_logps=torch.tensor([-2.2, -2.1], device=device))
        forwards = 1
    else:
        kw.update(ref_hidden=hidden + 0.01, ref_weight=weight)
        forwards = 2
    module = FusedAlphaDPOLoss(shift=True).to(device)
    assert module.check_values
    h = hidden.clone().requires_grad_()
    with count_host_syncs() as fwd:
        out = module(h, weight, labels, backend=backend, **kw)
    assert fwd.ops == [VALUE_CHECKS] + FORWARD[backend] * forwards, fwd.ops
    with count_host_syncs() as bwd:
        out.loss.backward()
    assert bwd.ops == BACKWARD, bwd.ops
    assert torch.isfinite(out.loss) and module.margin_std > 0

    module.check_values = False
    with count_host_syncs() as unchecked:
        module(hidden, weight, labels, backend=backend, **kw)
    assert unchecked.ops == FORWARD[backend] * forwards, unchecked.ops


def test_loss_from_logps_checks_both_references_with_one_sync(device):
    module = FusedAlphaDPOLoss().to(device)
    pol = torch.tensor([-1.0, -2.0], device=device, requires_grad=True)
    ref = torch.tensor([-1.5, -2.5], device=device)
    with count_host_syncs() as log:
        module.loss_from_logps(pol, pol.detach() - 0.5, ref, ref - 0.1)
    assert log.ops == [VALUE_CHECKS]
    with pytest.raises(ValueError, match=r"ref_rejected_logps must be finite; pairs \[0\]"):
        module.loss_from_logps(pol, pol.detach(), ref, torch.tensor([float("nan"), 0.0], device=device))


def test_margin_state_given_as_numbers_is_filled_on_the_device():
    """A number is filled in (a copy from the host would synchronise the stream on CUDA): seen as a copy on fake
    CUDA tensors, where the loss's head runs without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from alphadpo_kernels.loss import _margin_state
    from alphadpo_kernels.losses import update_margin_stats

    hidden, weight, labels, _ = _inputs("padded")
    refs = dict(ref_chosen_logps=torch.tensor([-2.0, -2.5]), ref_rejected_logps=torch.tensor([-2.2, -2.1]))
    a = fused_alpha_dpo_loss(hidden, weight, labels, margin_mean=0.05, margin_std=0.4, backend="torch", **refs)
    b = fused_alpha_dpo_loss(hidden, weight, labels, margin_mean=torch.tensor([0.05]),
                             margin_std=torch.tensor(0.4), backend="torch", **refs)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.margin_mean, b.margin_mean)
    with FakeTensorMode():
        margins = torch.full((4,), 0.5, device="cuda")
        with count_host_syncs() as log:
            state = _margin_state(0.05, "margin_mean", torch.device("cuda"))
            update_margin_stats(state, state, margins)
    assert log.ops == []


# --------------------------------------------------------------------------------------- validated once


def _calls(monkeypatch, module, name):
    seen = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.parametrize("reference", ["given", "ref_hidden", "ref_hidden_smaller_vocab"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_inputs_are_validated_and_laid_out_once_per_loss_call(monkeypatch, layout, reference):
    """The loss validates each head's inputs once (the op it calls reuses that), lays packed input out once (the
    reference head shares the policy's layout) and reads the value checks once, none twice."""
    import alphadpo_kernels._validation as validation
    import alphadpo_kernels.ops.sequence_logps as op

    hidden, weight, labels, kw = _inputs(layout)
    heads = 1
    if reference == "given":
        kw.update(ref_chosen_logps=torch.tensor([-2.0, -2.5]), ref_rejected_logps=torch.tensor([-2.2, -2.1]))
    else:
        vocab = weight.shape[0] - (5 if reference == "ref_hidden_smaller_vocab" else 0)
        labels = labels.masked_fill(labels >= vocab, 3)
        kw.update(ref_hidden=hidden + 0.01, ref_weight=weight[:vocab].clone())
        heads = 2
    meta = _calls(monkeypatch, op, "check_sequence_inputs")
    packed_meta = _calls(monkeypatch, op, "check_packed_inputs")
    layouts = _calls(monkeypatch, op, "packed_layout")
    read = []
    real_run = validation.ValueChecks.run

    def run(self):
        read.append(len(self._flags))
        return real_run(self)

    monkeypatch.setattr(validation.ValueChecks, "run", run)
    out = fused_alpha_dpo_loss(hidden, weight, labels, shift=True, backend="torch", **kw)
    assert torch.isfinite(out.loss)
    assert len(meta) == heads
    assert len(packed_meta) == (heads if layout == "packed" else 0)
    assert len(layouts) == (1 if layout == "packed" else 0)
    # label range + rows with a live label (+ cu_seqlens' start/end, order, empties when packed), the reference
    # log-probs' finiteness, or the reference head's range check when its vocabulary is smaller
    per_head = 5 if layout == "packed" else 2
    extra = {"given": 2, "ref_hidden": 0, "ref_hidden_smaller_vocab": 1}[reference]
    assert read == [per_head + extra]


# --------------------------------------------------------------------------------------- errors through one sync


@pytest.mark.parametrize("case,match", [
    ("cu_and_label", "cu_seqlens must start at 0 and end at N"),  # the first failed check, in the old order
    ("cu_beyond_n", r"cu_seqlens must not decrease; cu_seqlens\[2\]"),  # no index error on the way
    ("label_and_ref", r"labels must be in \[0, 40\)"),
    ("ref_only", r"ref_rejected_logps must be finite; pairs \[1\] are \[inf\]"),
])
def test_the_first_failed_check_is_named(case, match):
    hidden, weight, labels, kw = _inputs("packed")
    cu = kw["cu_seqlens"].clone()
    rr = torch.tensor([-2.2, -2.1])
    labels = labels.clone()
    if case == "cu_and_label":
        cu[-1] -= 1
        labels[3] = 40
    elif case == "cu_beyond_n":
        cu[1] = hidden.shape[0] + 5
    elif case == "label_and_ref":
        labels[3] = 40
        rr[1] = float("inf")
    elif case == "ref_only":
        rr[1] = float("inf")
    with pytest.raises(ValueError, match=match):
        fused_alpha_dpo_loss(hidden, weight, labels, cu_seqlens=cu, shift=True, backend="torch",
                             ref_chosen_logps=torch.tensor([-2.0, -2.5]), ref_rejected_logps=rr)


# --------------------------------------------------------------------------------------- the packed layout


def _old_packed_layout(cu_seqlens, n_tok):
    """The layout as it was computed before (with a boolean-mask index: a host sync)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=n_tok)
    last = torch.zeros(n_tok, dtype=torch.bool)
    last[(cu[1:] - 1).clamp(min=0)[lengths > 0]] = True
    return seg, last


@pytest.mark.parametrize("lengths", [[5], [1, 1, 1], [0, 3, 2], [3, 0, 0, 2], [2, 3, 0], [0, 0, 4, 0], [7, 1, 0, 1]])
def test_packed_layout_is_sync_free_and_unchanged(lengths):
    from alphadpo_kernels.ops.sequence_logps import packed_layout

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    n_tok = sum(lengths)
    with count_host_syncs() as log:
        seg, last = packed_layout(cu, n_tok)
    assert log.ops == []
    old_seg, old_last = _old_packed_layout(cu, n_tok)
    assert torch.equal(seg, old_seg) and torch.equal(last, old_last)


# --------------------------------------------------------------------------------------- the out_dtype probe


def test_capability_probe_caches_only_real_answers(monkeypatch):
    """Only "not supported"-type errors mean no (and are cached like any answer); out of memory or any other
    error propagates and is not cached, so the next call probes again."""
    from alphadpo_kernels.ops.sequence_logps import gemm

    answer: dict = {}

    def probe(kind, dtype, device_index):
        answer["calls"] = answer.get("calls", 0) + 1
        if isinstance(answer["now"], BaseException):
            raise answer["now"]
        return answer["now"]

    monkeypatch.setattr(gemm, "_probe", probe)
    try:
        for err in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"),
                    RuntimeError("CUDA error: an illegal memory access was encountered"),
                    RuntimeError("CUDA error: out of memory"),
                    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
                    TypeError("mm() takes 2 positional arguments but 3 were given")):
            gemm._cuda_has.cache_clear()
            answer.update(now=err, calls=0)
            with pytest.raises(type(err)):
                gemm._cuda_has("mm", torch.bfloat16, 0)
            answer["now"] = True  # the transient failure is gone: probed again, and the answer is yes
            assert gemm._cuda_has("mm", torch.bfloat16, 0) is True
            assert answer["calls"] == 2
        for err in (NotImplementedError("Could not run 'aten::mm.dtype_out' with arguments from the 'CUDA' backend"),
                    TypeError("mm() got an unexpected keyword argument 'out_dtype'"),
                    RuntimeError("out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs"),
                    RuntimeError("\"addmm_cuda\" not implemented for 'BFloat16'"),
                    RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx(...)`"),
                    RuntimeError("CUDA error: no kernel image is available for execution on the device")):
            gemm._cuda_has.cache_clear()
            answer.update(now=err, calls=0)
            assert gemm._cuda_has("addmm", torch.float16, 1) is False
            answer["now"] = True
            assert gemm._cuda_has("addmm", torch.float16, 1) is False  # a real "no" is cached
            assert answer["calls"] == 1
    finally:
        gemm._cuda_has.cache_clear()  # a GPU run of the rest of the suite probes for real

"""What one initialisation allocates, phase by phase, as closed forms in bytes (docs/DESIGN.md §4):
the activations of a calibration batch, the op calls' workspaces, and the peak of each phase of
a memory mode. Nothing is allocated; :mod:`fisherlora.plan` turns these into plans.

The phases, each counted beyond the weights (which are allocated before a run starts):

- ``fingerprints``: one target's weight in float64 (:func:`fisherlora.fingerprint.weight_fingerprint`);
- ``svd`` (projected only): a layer group's singular bases so far and one SVD's workspace;
- ``calibration``: the statistics held, one batch's activations with a hook's op call in them;
- ``decomposition``: the statistics, one SVD's workspace next to the previous layer's bases, or
  one layer's bases with the energy's temporaries, and what the decomposed layers leave;
- ``write``: those results, PEFT's LoRA weights, and one residual ``W − s·BA`` being formed
  while the previous one is still bound.

On a quantised base (``dequantised=True``, docs/DESIGN.md §8) the fingerprints, the SVDs, the
decomposition and the write each add one target's weight dequantised to float32, and the
calibration one weight dequantised in the weights' dtype (bitsandbytes' matmuls do that).

Each phase also holds its CPU RNG snapshots (:data:`SNAPSHOTS`, 5,056 bytes each).

The figures were read off the CPU allocator (``fisherlora.testing.peak_memory``) for
``transformers``' Llama with the compiled (``ext``) backend; the Triton kernels work in tiles
as well. The ``torch`` reference backend, which ``auto`` falls back to without the compiled
extension, copies its operands and forms factor-sized products, and is counted as such.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fisherlora.config import MemoryMode
from fisherlora.layers import decoder_layer_index
from fisherlora.svd import svd_workspace_bytes

__all__ = ["Architecture", "activation_bytes", "Footprint", "PHASES"]

PHASES = ("fingerprints", "svd", "calibration", "decomposition", "write")
#: logits the summed loss processes at once (``calibration._SumCrossEntropy.CHUNK_ELEMENTS``)
LOSS_CHUNK_ELEMENTS = 1 << 22
#: bytes of one CPU RNG state (``torch.get_rng_state()``), saved by every snapshot and checkpoint
RNG_STATE = 5056
#: CPU RNG snapshots held in each phase: the entry points' (``snapshot.keeps_global_rng``:
#: initialize_fisher_lora, collect_statistics, compute_initialization) and the model states'
#: (the collector's, the write's rollback, the planner's meta collector before the fingerprints)
SNAPSHOTS = {"fingerprints": 2, "svd": 1, "calibration": 3, "decomposition": 2, "write": 2}


def _bookkeeping(phase: str) -> int:
    """A phase's RNG snapshots and 1 KiB of scalars."""
    return SNAPSHOTS[phase] * RNG_STATE + 1024


@dataclass
class Architecture:
    """What the activation model reads from a config (Llama names; GPT-2's as fallbacks)."""

    hidden: int
    inter: int
    layers: int
    vocab: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module, widest: int) -> Architecture:
        """From ``model.config``; ``widest`` (the widest target) stands in for a missing width."""
        cfg = getattr(model, "config", None)
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or widest
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
        return cls(hidden, getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden,
                   getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 1,
                   getattr(cfg, "vocab_size", 0) or 0, heads, getattr(cfg, "head_dim", None) or hidden // heads)


def _loss_chunks(vocab: int, tokens: int, elem: int) -> int:
    """The loss backward's float32 chunks of logits at its peak: a chunk's difference and its
    exponential, while the previous chunk's is still bound."""
    rows = max(1, LOSS_CHUNK_ELEMENTS // max(vocab, 1))
    alive = 2 * tokens if tokens <= rows else rows + 2 * min(rows, tokens - rows)
    return alive * vocab * max(elem, 4)


def activation_bytes(arch: Architecture, batch_size: int, max_length: int, elem: int, *, graph_layers: int,
                     checkpointed: bool, hook_op: int = 0, head_target: bool = False, mc_samples: int = 0) -> int:
    """Peak bytes of one padded calibration batch ``(B, T)`` of a Llama-style model (weights
    frozen), with the collector's op calls of ``hook_op`` bytes in it.

    Per token, each decoder layer with a graph saves ``S = 8h + 8 + (4q + 3i + T)·e + 4·heads``:
    the two RMSNorms' float32 inputs and scales, the attention's query, its key and value
    repeated to the query width (a padded batch goes through a mask), its output and float32
    log-sum-exp, one mask row, and the MLP's three ``i``-wide tensors (``h`` hidden, ``i``
    intermediate, ``q`` heads × head_dim, ``e`` the weights' bytes; the log-sum-exp is float64 for
    a float64 model). Once per token: the rotary tables ``2·head_dim·e`` and 33 bytes of token
    indices. On top of what is saved, the largest of these moments: the top layer's MLP backward
    (``3i·e + 4h``, ``8h`` in float64); the final norm's backward (``6h·e``, plus ``14h`` below
    float32 and ``16h`` in float64); the loss (the logits ``V·e`` and ``4h``, ``6h`` below float32 and ``12h`` in
    float64, and the backward's chunks of logits in at least float32); a hook's op call with what
    it reads in flight: two hidden gradients (``2h``, at least float32), the top MLP's input,
    product and output (``(2h + i)·e``, when its down projection's input is accumulated) with,
    outside float32, ``h·e`` each for the hidden states the forward holds beside them: the
    residual stream, the top layer's input (held by the model's loop over its layers) and the
    embeddings' output (held to the forward's end). In float32 the norms save these very tensors
    (counted in ``S``); otherwise they save float32 copies, and the streams stay beside them. Or the
    logits' gradient when ``head_target`` (an output head is hooked).
    ``mc_samples`` label draws of the true Fisher (0: the empirical one) add 24 bytes per token
    for each draw's labels and the sampling moment (the logits and two float32 copies of the
    predictive distribution); from two draws the graph is kept for the next draw, so the logits
    stay through every backward moment (with ``4h`` per token for each draw past the first) and
    the loss forms a new gradient of them.
    ``checkpointed`` (the projected mode): every layer keeps its input ``h·e``
    and the CPU RNG state (5,056 bytes per call), the boolean mask (``T`` bytes per token) stays,
    and the top layer's ``S`` is recomputed for its backward. Checked against the CPU allocator
    (docs/DESIGN.md §4): exact in float32, within 0.5 % in bfloat16 from hidden size 64 up, an
    upper bound in float64.
    """
    h, i, q, n = arch.hidden, arch.inter, arch.heads * arch.head_dim, batch_size * max_length
    half, double = elem < 4, elem > 4  # the norms and the loss work in float32 (at least)
    layer = 8 * h + 8 + (4 * q + 3 * i + max_length) * elem + max(elem, 4) * arch.heads
    mlp_backward = 3 * i * elem + max(elem, 4) * h
    # outside float32 the norms save float32 copies, not the hidden states the forward holds: the residual
    # stream, and unless checkpointed (which counts every layer's input), the top layer's input and the embeddings'
    stream = (h * elem if elem != 4 else 0) * (1 if checkpointed else 3)
    mlp_forward = (2 * h + i) * elem + stream
    in_flight = max(2 * h * max(elem, 4), mlp_forward, arch.vocab * elem + 4 * h if head_target else 0)
    norm_backward = n * (6 * h * elem + (14 * h if half else 16 * h if double else 0))
    loss = n * (arch.vocab * elem + (6 if half else 12 if double else 4) * h) + _loss_chunks(arch.vocab, n, elem)
    once = n * (2 * arch.head_dim * elem + 33)
    if mc_samples:  # the true Fisher: each draw's labels (24 bytes a token); the distribution sampled
        # from and multinomial's float32 copy of it; from two draws the logits outlive the loss (the
        # graph is kept for the next draw), in every backward moment, and the loss makes a new gradient
        once += 24 * n * mc_samples
        kept = n * (arch.vocab * elem + 4 * h * (mc_samples - 1)) if mc_samples >= 2 else 0
        loss = max(loss + kept, n * arch.vocab * (elem + 2 * max(elem, 4)))
        mlp_backward, norm_backward, in_flight = (mlp_backward + kept // n, norm_backward + kept,
                                                  in_flight + kept // n)
    if not checkpointed:
        return once + n * graph_layers * layer + max(n * mlp_backward, norm_backward, loss, n * in_flight + hook_op)
    # the layers' inputs include the boolean mask; in float32 the recomputed top layer's norm saves
    # its input itself, already counted among the inputs (other dtypes save a float32 copy)
    recomputed = n * (layer - (h * elem if elem == 4 else 0) + max_length)
    # outside float32, the recomputed layer's first norm runs its float32 backward while that
    # layer's attention tensors are still held
    first_norm = (n * ((4 * q + max_length) * elem + max(elem, 4) * arch.heads + max_length + 6 * h * elem
                       + (18 * h if half else 20 * h)) if half or double else 0)
    return (once + n * max_length + graph_layers * (n * h * elem + RNG_STATE)
            + max(norm_backward, recomputed + n * mlp_backward, first_norm, loss, recomputed + n * in_flight + hook_op))


def _tri(d: int) -> int:
    return d * (d + 1) // 2


class Footprint:
    """The closed forms of one memory mode for one model, batch and set of dtypes.

    Args:
        shapes, ranks: layer name -> ``(d_out, d_in)`` and ``r``, in model order.
        a_key: layer name -> key of its activation factor (shared by q/k/v, gate/up).
        arch: the model's :class:`Architecture`.
        mode: a held :class:`~fisherlora.config.MemoryMode`; ``None`` for the naive baseline
            (``full`` without sharing).
        batch_size, max_length: one calibration batch. elem: the weights' bytes per element.
        stats_bytes, bases_bytes: bytes per element of the statistics and the projected bases.
        reference: the op calls go to the ``torch`` reference backend.
        threads: the intra-op threads the compiled kernels split their tiles over.
        mc_samples: label draws per batch of the true Fisher; 0 for the empirical one.
        dequantised: the targets are quantised (docs/DESIGN.md §8): each is dequantised to
            float32 one at a time where it is read.
        gradient: the initialisation gathers the weight gradient (``init`` other than ``filet``):
            a ``(d_out, d_in)`` statistic per layer, each layer's input held until its output
            gradient arrives, and a decomposition of the (whitened) gradient instead of the weight's
            SVD (full and packed modes only).
    """

    # tile sizes of the compiled kernels (csrc/cpu/curvature_cpu.cpp)
    SYRK_TILE, ENERGY_COLS, ENERGY_ROWS, PROJ_TOKENS, PROJ_CHUNK, PROJ_GROUPS = 256, 64, 256, 128, 512, 64
    GRAD_PANEL_BYTES, GRAD_MIN_CHUNK = 32 << 20, 256

    def __init__(self, shapes, ranks, a_key, arch: Architecture, mode: MemoryMode | None, *, batch_size: int,
                 max_length: int, elem: int, stats_bytes: int, bases_bytes: int, reference: bool, threads: int,
                 mc_samples: int = 0, dequantised: bool = False, gradient: bool = False):
        self.shapes, self.ranks, self.a_key, self.arch = shapes, ranks, a_key, arch
        self.share, self.mode = mode is not None, mode or MemoryMode.FULL
        self.dense, self.projected = self.mode is not MemoryMode.PACKED, self.mode is MemoryMode.PROJECTED
        self.B, self.T, self.n, self.e = batch_size, max_length, batch_size * max_length, elem
        self.s, self.b, self.reference, self.threads = stats_bytes, bases_bytes, reference, threads
        self.mc = mc_samples
        self.q = dequantised
        self.gradient = gradient

    # ------------------------------------------------------------------ per layer
    def k(self, name: str) -> int:
        return min(self.shapes[name])

    def deq(self, name: str, elem: int = 4) -> int:
        """One quantised target's weight dequantised (``elem`` bytes an entry); 0 for a float base."""
        return self.shapes[name][0] * self.shapes[name][1] * elem if self.q else 0

    def bases(self, name: str, out_bytes: int) -> int:
        """``U``, ``Vh`` in ``out_bytes`` and ``S`` in float32."""
        return sum(self.shapes[name]) * self.k(name) * out_bytes + 4 * self.k(name)

    def results(self, name: str) -> int:
        """What a decomposed layer leaves until the end: ``B``, ``A`` and its selection (float64)."""
        return sum(self.shapes[name]) * self.ranks[name] * 4 + 8 * (3 * self.k(name) + 2 * self.ranks[name])

    def decompose(self, name: str) -> int:
        """One layer's decomposition on its bases: the larger side's ``fisher_energy`` with a cast
        of the bases to float64 statistics (full and packed), the selection's float64 scores and
        sorts, and the chosen columns scaled into ``B`` and ``A``."""
        d_out, d_in = self.shapes[name]
        k, r, s = self.k(name), self.ranks[name], self.s
        small = 8 * 8 * k + 2 * (d_out + d_in) * r * 4
        if self.projected:  # elementwise on (k,) energies, on float32 copies of lower-precision bases
            return small + ((d_out + d_in) * k * 4 if self.b != 4 else 0)
        worst = 0
        for d in (d_out, d_in):
            cast = d * k * s if s != 4 else 0
            if self.reference:  # M @ Q and its product with Q; a packed M unpacked first
                op = 2 * d * k * s + (0 if self.dense else max(2 * _tri(d) * 8, d * d * s))
            else:  # per thread: a (d, 64) column block of Q and one row panel's product
                cols = min(k, self.ENERGY_COLS)
                per_thread = (d + self.ENERGY_ROWS) * cols * s + (0 if self.dense else self.ENERGY_ROWS ** 2 * s)
                op = min(self.threads, -(-k // cols)) * per_thread + k * s
            worst = max(worst, cast + op)
        return worst + small

    def gradient_decompose(self, name: str) -> int:
        """One layer's gradient start in float64 (an estimate, not yet checked against measurement):
        each factor, its eigenvectors and its inverse square root, the gradient, the whitened
        gradient and a product, the SVD's factors and the mapped directions."""
        d_out, d_in = self.shapes[name]
        k = self.k(name)
        return 8 * (3 * d_out * d_out + 3 * d_in * d_in + 4 * d_out * d_in + 2 * (d_out + d_in) * k)

    def gradient_op(self, d_out: int, d_in: int) -> int:
        """One ``gradient_accumulate_`` call (an estimate): the reference's float copies of the
        rows and its ``(d_out, d_in)`` product; the compiled kernel's two panels of one token
        chunk (at most ``GRAD_PANEL_BYTES``, at least ``GRAD_MIN_CHUNK`` rows) and row offsets."""
        row = (d_out + d_in) * self.s
        if self.reference:
            return 2 * self.n * row + d_out * d_in * self.s
        chunk = min(self.n, max(self.GRAD_MIN_CHUNK, self.GRAD_PANEL_BYTES // row))
        return chunk * row + 16 * self.n

    def syrk(self, d: int) -> int:
        """One ``syrk_accumulate_`` call on a ``d``-wide factor."""
        n, s = self.n, self.s
        if self.reference:  # rows converted and masked, the dense update, its packed gather
            return 2 * n * d * s + d * d * s + (0 if self.dense else 2 * _tri(d) * 8 + _tri(d) * s)
        tiles = -(-d // self.SYRK_TILE)
        per_thread = (2 * min(n, self.SYRK_TILE) * self.SYRK_TILE + min(d, self.SYRK_TILE) ** 2) * s
        return min(self.threads, tiles * (tiles + 1) // 2) * per_thread + 8 * n

    def projected_sq(self, d: int, k: int) -> int:
        """One ``projected_sq_accumulate_`` call with ``Q`` ``(d, k)`` in the bases dtype."""
        n, s = self.n, self.s
        cols = k if self.b == s or self.reference else min(k, self.PROJ_CHUNK)
        cast = d * cols * s if self.b != s else 0
        if self.reference:
            return cast + 2 * n * d * s + 2 * n * k * s
        groups = min(-(-n // self.PROJ_TOKENS), self.PROJ_GROUPS)
        return cast + min(self.threads, groups) * self.PROJ_TOKENS * (d + cols) * s + 8 * n

    # ------------------------------------------------------------------ per group
    def statistics(self, names: list[str]) -> int:
        """The factors of ``names`` (shared ``A`` once)."""
        if self.projected:
            return sum(2 * self.k(n) for n in names) * self.s
        size = _tri if not self.dense else (lambda d: d * d)
        inputs = {self.a_key[n] if self.share else n: self.shapes[n][1] for n in names}
        grads = sum(self.shapes[n][0] * self.shapes[n][1] for n in names) if self.gradient else 0
        return (sum(size(d) for d in inputs.values()) + sum(size(self.shapes[n][0]) for n in names) + grads) * self.s

    def activations(self, names: list[str], *, with_hooks: bool = False) -> int:
        """One batch's activations for a pass over ``names``: the graph starts at their lowest
        decoder layer (at the embeddings when they are not all in one stack, which also turns
        the projected mode's recomputation off); ``with_hooks`` adds the op calls."""
        where = [decoder_layer_index(n) for n in names]
        in_stack = None not in where and len({stack for stack, _ in where}) == 1
        lowest = min(i for _, i in where) if in_stack else 0
        hook_op = 0
        if with_hooks:
            hook_op = max(self.projected_sq(d, self.k(n)) if self.projected else self.syrk(d)
                          for n in names for d in self.shapes[n])
            if self.gradient:  # the inputs held for the weight gradient (an over-count where autograd saves them)
                held = {self.a_key[n] if self.share else n: self.shapes[n][1] for n in names}
                hook_op = max(hook_op, max(self.gradient_op(*self.shapes[n]) for n in names)) \
                    + self.n * self.e * sum(held.values())
        return activation_bytes(self.arch, self.B, self.T, self.e, graph_layers=self.arch.layers - lowest,
                                checkpointed=self.projected and in_stack, hook_op=hook_op, mc_samples=self.mc,
                                head_target=with_hooks and any(self.shapes[n][0] == self.arch.vocab for n in names))

    # ------------------------------------------------------------------ a whole run
    def phases(self, groups: list[list[str]], keep_statistics: bool) -> tuple[dict[str, int], dict[str, int]]:
        """``(phases, components)`` of a run over ``groups`` (lists of layer names, in the order
        they are processed). ``phases``: bytes beyond the weights at the peak of each phase.
        ``components``: the largest activations, statistics held at once, and SVD workspace
        (with the projected bases) of the run."""
        names = [n for g in groups for n in g]
        fingerprint = max(d_out * d_in * (8 if self.e != 8 or self.q else 0) + 12 * (d_out + d_in) * 8
                          + self.deq(n) for n, (d_out, d_in) in self.shapes.items())
        phases = {"fingerprints": fingerprint, **dict.fromkeys(PHASES[1:] if self.projected else PHASES[2:], 0)}
        phases = {name: bytes_ + _bookkeeping(name) for name, bytes_ in phases.items()}
        kept = done = 0  # statistics kept from earlier groups, results of the layers decomposed
        held = activations = bases_held = 0
        for group in groups:
            stats = self.statistics(group)
            activations, held = max(activations, self.activations(group)), max(held, kept + stats)
            before = kept + done
            calibration = before + stats + _bookkeeping("calibration") + self.activations(group, with_hooks=True) \
                + max(self.deq(n, self.e) for n in group)
            if self.projected:  # the SVDs first; their bases stay through the pass and the decomposition
                so_far = 0
                for n in group:
                    ws = svd_workspace_bytes(*self.shapes[n], out_bytes=self.b) + self.deq(n)
                    phases["svd"] = max(phases["svd"], before + so_far + ws + _bookkeeping("svd"))
                    so_far += self.bases(n, self.b)
                bases_held = max(bases_held, so_far)
                phases["calibration"] = max(phases["calibration"], calibration + so_far)
                phases["decomposition"] = max(phases["decomposition"], before + so_far + stats + max(
                    self.decompose(n) + self.deq(n) for n in group) + sum(self.results(n) for n in group)
                    + _bookkeeping("decomposition"))
            else:
                phases["calibration"] = max(phases["calibration"], calibration)
                inner = previous = 0  # the consumer still holds the previous layer's U, S, Vh
                for n in group:
                    svd = svd_workspace_bytes(*self.shapes[n]) + previous
                    own = self.bases(n, 4) + self.decompose(n)
                    work = self.gradient_decompose(n) if self.gradient else max(svd, own)
                    phases["decomposition"] = max(phases["decomposition"], before + stats + inner + work
                                                  + self.deq(n) + _bookkeeping("decomposition"))
                    previous, inner = (0 if self.gradient else self.bases(n, 4)), inner + self.results(n)
            done += sum(self.results(n) for n in group)
            kept += stats if keep_statistics else 0
        lora = sum(sum(self.shapes[n]) * self.ranks[n] * 4 for n in names)
        # s·BA and W − s·BA in at least float32, plus W in float32 below it (decompose.residual_weight)
        # a quantised base: deq(W), s·BA and W_res in float32, then W_res and its dequantised requantisation
        copies, work = (2, self.e) if self.e >= 4 and not self.q else (3, 4)
        residual = previous = 0
        for n in names:
            size = self.shapes[n][0] * self.shapes[n][1] * work
            residual, previous = max(residual, previous + copies * size), size
        phases["write"] = kept + done + lora + residual + _bookkeeping("write")
        svd_ws = max(svd_workspace_bytes(*s) for s in self.shapes.values())
        return phases, {"activations": activations, "statistics": held, "svd_workspace": svd_ws + bases_held}

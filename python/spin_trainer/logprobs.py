"""Log-probs of the labelled tokens: the one place where the trainer runs a model's LM head.

Every log-prob of the trainer comes from a `Scorer` (the run's layout, precision and LM head): the
SPIN policy loss, the reference log-probs, the SFT loss and the validation numbers, of padded
batches (data.py) or packed ones (packing.py). The backbone runs over the whole batch, the LM head
only over the positions whose label is counted (the response tokens, EOS included; a packed
batch's `targets`), so prompt and padding positions never produce logits. With SPIN's prompts, a
quarter of a sequence on the benchmark shape, that is the same share of the head's matmul, of its
logits and of the loss's work. Both heads (`Scorer.head`) run inside the model's own forward, as
the output embedding's call (lm_head.py), so that FSDP's and tensor parallelism's hooks run as usual:

- "logits": the hidden states are compacted to the labelled positions [N, H] before the head,
  which writes their logits [N, V] (under tensor parallelism this rank's vocab shard [N, V/tp]);
  `token_logprobs` (vocab-parallel over the tp group) reads them.
- "fused" (the default on CUDA): the head's forward is redirected (as TRL's and verl's "forward
  redirection") to spin_kernels' fused head, which takes the hidden states and `head.weight` and
  never materializes logits (its FLOPs and memory: spin_kernels/loss/linear.py's docstring):
  `linear_token_logprobs` on the compacted rows (SFT loss, validation), `linear_spin_loss` for the
  policy loss and the reference's sums, on the [2b, T, H] padded batch or a packed batch's
  compacted targets. Being the module's own call, FSDP2's root pre-forward has unsharded
  `head.weight` (bf16 under mixed precision), the output reaches the root's pre-backward hook, and
  the weight's gradient lands on the unsharded parameter for the post-backward reduce-scatter; tied
  embeddings share that one parameter. Under tensor parallelism the fused head takes the local
  tensors of the replicated hidden states and of the vocab-sharded weight with
  `process_group=ctx.tp_group` (d hidden summed over the group: the all-reduce the logits path's
  DTensor backward does).

Mixed precision is FSDP's cast in every layout (parallel/precision.py): a `Scorer` of a mixed
precision needs a model under FSDP, on a data-parallel axis of one rank if need be.
"""
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from spin_kernels.loss import linear_spin_loss, linear_token_logprobs, spin_loss_from_logps, token_logprobs
from spin_kernels.loss.packed import sums_by_index

from .lm_head import compacted_input, fused_output, output_embedding, redirected_head
from .packed_attention import packed_forward
from .packing import PackedPairs
from .parallel.mesh import ParallelContext
from .parallel.precision import Precision


def default_head(device_type):
    """The head's default: the fused head on CUDA, the logits elsewhere (the tested CPU path)."""
    return "fused" if device_type == "cuda" else "logits"


@dataclass
class LabelledLogps:
    token_logps: torch.Tensor   # [N] float32 log-prob of each labelled token, row-major order
    rows: torch.Tensor          # [N] the batch row of each
    num_rows: int

    def sequence_sums(self):
        """[S] float32 sum per row (differentiable); a row with no labelled token gives 0."""
        return sums_by_index(self.token_logps, self.rows, self.num_rows)


@dataclass
class Scorer:
    """The trainer's forwards: `ctx`'s layout, `precision` and the LM `head` ("fused" or "logits")."""
    ctx: ParallelContext
    precision: Precision = Precision()
    head: str = "logits"
    packing: str | None = None   # packed_scoring.choose_packing's layout (pair and SFT batches); None: padded

    def __post_init__(self):
        assert self.ctx.dp_mesh is not None or not self.precision.mixed, \
            "mixed precision is FSDP's cast: setup_parallel(..., fsdp_alone=True) and parallelize_model"

    def _run(self, model, batch):
        with warnings.catch_warnings():
            # Under TP the LM head returns its local vocab shard, a view (DTensor.to_local), which FSDP
            # warns about in case the caller modifies it in place in the forward. Nothing does: the
            # loss's in-place write (inplace_backward) is its own gradient, in the backward, after
            # FSDP's pre-backward hook has run on it.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
            if isinstance(batch, PackedPairs):
                return packed_forward(model, batch).logits
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits

    def _token_logps(self, model, batch, positions, labels, *, inplace_backward):
        """[M] float32 log-probs of `labels`, each scored from the output at one of the flat `positions`."""
        ctx, head = self.ctx, output_embedding(model)
        with compacted_input(head, positions):
            if self.head == "fused":
                def compute(hidden, weight, bias):
                    return linear_token_logprobs(hidden, weight, labels, bias=bias, process_group=ctx.tp_group)

                with redirected_head(head, ctx, compute) as produced:
                    return fused_output(model, produced, self._run(model, batch))
            logits = self._run(model, batch)   # [M, V], under --tp this rank's vocab shard [M, V/tp]
            assert logits.shape[0] == positions.shape[0], (tuple(logits.shape), positions.shape)
            return token_logprobs(logits, labels, process_group=ctx.tp_group, inplace_backward=inplace_backward)

    def labelled_logps(self, model, batch, *, inplace_backward=False):
        """Log-probs of the tokens that `batch.loss_mask` counts (a data.Batch, or a PackedPairs as one row).

        `inplace_backward=True` lets the loss's gradient overwrite the logits' memory (nothing else
        reads them after the loss; the fused head has no logits).
        """
        num_rows, width = batch.labels.shape
        positions = batch.loss_mask.reshape(-1).nonzero().squeeze(1)   # [N]
        labels = batch.labels.reshape(-1).index_select(0, positions)    # [N]
        logps = self._token_logps(model, batch, positions, labels, inplace_backward=inplace_backward)
        return LabelledLogps(logps, torch.div(positions, width, rounding_mode="floor"), num_rows)

    @torch.no_grad()
    def sequence_logps(self, model, batch):
        """[2b] masked sums of the response log-probs (EOS included) of a pair batch, float32, no
        gradient: the reference's numbers, by `pair_loss`'s own arithmetic (the fused head: its op,
        with its chunks and its summation order), so that π − ref is exactly 0 at θ_t."""
        count = batch.num_sequences if isinstance(batch, PackedPairs) else batch.labels.shape[0]
        unused = torch.zeros(count, device=batch.labels.device)
        return self.pair_loss(model, batch, unused, beta=1.0, loss_type="sigmoid").policy_logps

    def pair_loss(self, model, batch, ref_logps, *, beta, loss_type):
        """The SPIN loss (a SpinLossOutput: loss, metrics, per-sequence log-probs and rewards) of a
        [2b]-sequence pair batch (sequences [0, b) actual, [b, 2b) generated) against the reference's [2b] sums."""
        if self.head == "logits":
            # Nothing else reads the logits after the loss: their gradient can take their memory.
            if isinstance(batch, PackedPairs):   # the targets: the first generated tokens too (packing.py)
                positions, labels, _ = batch.targets
                policy = batch.sequence_sums(self._token_logps(model, batch, positions, labels, inplace_backward=True))
            else:
                policy = self.labelled_logps(model, batch, inplace_backward=True).sequence_sums()
            return spin_loss_from_logps(policy, ref_logps, beta=beta, loss_type=loss_type)
        head = output_embedding(model)
        if isinstance(batch, PackedPairs):   # hidden [M, H]: the targets' positions
            positions, labels, sequences = batch.targets
            compacted = compacted_input(head, positions)
            layout = dict(seq_ids=sequences, num_sequences=batch.num_sequences)
        else:   # hidden [2b, T, H]: the fused head compacts the labelled rows itself
            compacted, labels, layout = nullcontext(), batch.labels, dict(loss_mask=batch.loss_mask)
        results = []

        def compute(hidden, weight, bias):
            out = linear_spin_loss(hidden, weight, labels, ref_logps, bias=bias, beta=beta, loss_type=loss_type,
                                   process_group=self.ctx.tp_group, **layout)
            results.append(out)
            return out.loss.reshape(1)   # a dim to be the plan's Shard(-1) under --tp

        with compacted, redirected_head(head, self.ctx, compute) as produced:
            loss = fused_output(model, produced, self._run(model, batch))
        return results[0]._replace(loss=loss[0])
